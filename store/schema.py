"""Store schema management with Alembic (`portal-sync store upgrade`).

Alembic is imported only to migrate. Every worker and command checks the store's revision at
start, and that check reads Alembic's version table itself against `HEAD_REVISION`: loading
Alembic and its migration scripts (with Mako and Pygments) took 12 MB of each worker's
memory and a fifth of its imports' time, for a string (docs/performance.md, target 5).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, inspect

from schemas.errors import ConfigurationError
from store.tables import metadata

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
FIRST_REVISION = "0001"
# The newest migration's revision: a new migration moves it (a unit test compares it with
# the migration scripts' own head).
HEAD_REVISION = "0020"
VERSION_TABLE = "alembic_version"  # Alembic's default, which the migrations keep
# The access log's retention purge on PostgreSQL (migration 0017, store/roles.py).
PURGE_FUNCTION = "portal_sync_purge_access_log(timestamp without time zone, integer)"
# The batches' journal's retention purge on PostgreSQL (migration 0018, store/roles.py).
JOURNAL_PURGE_FUNCTION = "portal_sync_purge_apply_journal(timestamp without time zone, integer)"
# The functions of the triggers that keep the purges' and redrives' rows as their commands
# wrote them (migration 0020).
AUDIT_GUARD_FUNCTIONS = (
    "portal_sync_source_purges_progress_only",
    "portal_sync_dead_letter_redrives_claims_only",
)


class SchemaOutdated(ConfigurationError):
    """The store's schema is older than this code: run `portal-sync store upgrade`."""


class SchemaNewer(SchemaOutdated):
    """The store's schema is newer than this code knows (a later release upgraded it, as in
    a rolling upgrade): this release can neither use nor migrate it. A kind of
    `SchemaOutdated`: both are a store that is not this code's."""


def _newer(revision: str | None) -> bool:
    """Whether a revision comes after this code's head (the revisions are numbered
    `0001`, `0002`, …: a unit test holds them so)."""
    return (
        revision is not None
        and revision.isdigit()
        and len(revision) == len(HEAD_REVISION)
        and revision > HEAD_REVISION
    )


def _config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    return HEAD_REVISION


def script_head() -> str | None:
    """The head of the migration scripts themselves (Alembic's reading of them)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The store's revision; the first_schema's revision for stores made before migrations."""
    with engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
        revisions: list[str] = []
        if VERSION_TABLE in tables:
            revisions = list(
                conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").scalars()
            )
        if len(revisions) > 1:  # as Alembic's own reading refuses them
            raise ConfigurationError(
                f"the store's {VERSION_TABLE} names {len(revisions)} revisions, this project's "
                "migrations one: check --store (PORTAL_SYNC_STORE_URL)"
            )
        if revisions:
            return str(revisions[0])
        return FIRST_REVISION if "source_views" in tables else None


# Workers started together on a new store all find it empty: one creates the schema, the
# others wait for it and find it done (else their CREATE TABLE fails on the catalog).
SCHEMA_LOCK = 0x706F7274616C  # PostgreSQL advisory lock key ("portal")


def upgrade(engine: Engine, *, only_new: bool = False) -> tuple[str | None, str]:
    """Migrate the store to the newest revision; return (from, to). Concurrent callers are
    serialised (PostgreSQL: an advisory lock; SQLite: a writer transaction). `only_new`:
    create a new store, leave a current one alone, refuse an older one (SchemaOutdated)."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    config = _config()
    head = head_revision()
    with engine.connect() as connection:
        conn = connection.execution_options(writer=True)  # SQLite: BEGIN IMMEDIATE
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
            before = MigrationContext.configure(conn).get_current_revision()
            first_schema = before is None and "source_views" in inspect(conn).get_table_names()
            if first_schema:
                before = FIRST_REVISION  # a first-schema store, made before migrations
            if _newer(before):  # Alembic would fail on a revision it has no script of
                raise _outdated(before)
            if only_new and before not in (None, head):
                raise _outdated(before)
            if first_schema:
                config.attributes["connection"] = conn
                command.stamp(config, FIRST_REVISION)
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
    return before, head


def _outdated(revision: str | None) -> SchemaOutdated:
    if _newer(revision):
        return SchemaNewer(
            f"the store is at schema revision {revision}, newer than this version knows "
            f"({head_revision()}): a later release upgraded it; run that release (or a "
            "newer one) against this store"
        )
    return SchemaOutdated(
        f"the store is at schema revision {revision}, this version needs "
        f"{head_revision()}: run `portal-sync store upgrade`"
    )


def ensure_current(engine: Engine) -> None:
    """A new store is created at the newest revision; an older one must be upgraded first.
    Anything but a current store is decided under the schema lock: a store that another
    process is creating at that moment can be seen half-made without it (its tables
    already there, its version not yet), which once made a worker starting beside it
    refuse the store as revision 0001."""
    if current_revision(engine) != head_revision():
        upgrade(engine, only_new=True)


def no_schema() -> ConfigurationError:
    return ConfigurationError(
        "the store holds no portal-sync schema (a new or another database): check "
        "--store (PORTAL_SYNC_STORE_URL), or let the worker create the store first"
    )


def require_current(engine: Engine) -> None:
    """For commands that only read: nothing is created. A database without the project's
    schema (a new one, or another application's) is refused, an older store must be
    upgraded first."""
    revision = current_revision(engine)
    if revision is None:
        raise no_schema()
    if revision != head_revision():
        raise _outdated(revision)


def drop_project_tables(engine: Engine) -> None:
    """Drop the project's tables, Alembic's version table and the functions of their
    triggers and purges; any other table of the same database is left alone."""
    metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
        if conn.dialect.name == "postgresql":  # the access log's guard and purge (0005, 0017)
            conn.exec_driver_sql("DROP FUNCTION IF EXISTS portal_sync_access_log_append_only()")
            conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {PURGE_FUNCTION}")
            conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {JOURNAL_PURGE_FUNCTION}")  # 0018
            for guard in AUDIT_GUARD_FUNCTIONS:  # the audit rows' guards (0020)
                conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {guard}()")
