"""Two PostgreSQL roles for one store (`portal-sync store grant`): the owner upgrades, the
role the worker and the commands use works the store but cannot change the access log, its
guard, its purge or the schema."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from consumers.merge import Authority
from consumers.retention import Retention, purge
from portal_sync.ops.purge import new_purge
from portal_sync.ops.purge import run as run_purge
from schemas.errors import ConfigurationError
from schemas.identifiers import ReferenceKey
from store import utcnow
from store.core import Store
from store.roles import journal_purge_function, purge_function
from store.schema import JOURNAL_PURGE_FUNCTION, PURGE_FUNCTION
from tests.support.store_helpers import CITIZEN, CITIZEN_2, Feed, event

DAY = timedelta(days=1)


class Roles:
    def __init__(self, url: str) -> None:
        tag = uuid.uuid4().hex[:8]
        self.url = url
        self.owner, self.runtime, self.other = f"owner_{tag}", f"runtime_{tag}", f"other_{tag}"
        self.admin = create_engine(url, isolation_level="AUTOCOMMIT")  # the server's superuser
        database = make_url(url).database
        with self.admin.connect() as conn:
            for role in (self.owner, self.runtime, self.other):
                conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
            conn.exec_driver_sql(f'ALTER DATABASE "{database}" OWNER TO {self.owner}')
            conn.exec_driver_sql(f"ALTER SCHEMA public OWNER TO {self.owner}")

    def url_of(self, role: str) -> str:
        return make_url(self.url).set(username=role).render_as_string(hide_password=False)

    def store(self, role: str) -> Store:
        return Store(self.url_of(role))

    def refused(self, role: str, statement: str) -> str:
        engine = create_engine(self.url_of(role))
        try:
            with pytest.raises(DBAPIError) as caught, engine.begin() as conn:
                conn.exec_driver_sql(statement)
            return str(caught.value.orig)
        finally:
            engine.dispose()


@pytest.fixture
def roles(postgres_store_url: str) -> Iterator[Roles]:
    roles = Roles(postgres_store_url)
    yield roles
    roles.admin.dispose()


def operators(store: Store) -> list[str]:
    return [row["operator"] for row in store.access_entries()]


def test_the_granted_role_works_the_store_and_only_appends_to_the_access_log(
    roles: Roles,
) -> None:
    owner = roles.store(roles.owner)
    owner.create_schema()
    now = utcnow()
    owner.log_access("an", "show", "ticket 1", [("citizen", "ref-1")], now=now - 40 * DAY)
    owner.log_access("binh", "history", "ticket 2", [("citizen", "ref-2")], now=now - 20 * DAY)
    with owner.engine.begin() as conn:  # a hand-made role's rights, which grant takes back
        conn.exec_driver_sql(f"GRANT ALL ON SEQUENCE access_log_id_seq TO {roles.runtime}")
    granted = owner.grant(roles.runtime, 30)
    appended = ("access_log", "offset_changes", "apply_journal")
    assert (granted.append_only, granted.floor_days) == (appended, 30)
    assert granted.sequences >= 1  # the access log's id at least
    owner.close()

    store = roles.store(roles.runtime)
    try:
        store.create_schema()  # a current store: nothing to create, nothing refused
        feed = Feed(store)
        feed.apply(
            event("citizen", CITIZEN, "province-79", 1, {"full_name": "Nguyễn Thị Lan"}),
            event("citizen", CITIZEN, "province-01", 1, {"full_name": "Nguyễn Thị Lan Anh"}),
            event("citizen", CITIZEN_2, "province-79", 1, {"full_name": "Trần Văn Đức"}),
        )
        feed.apply(event("citizen", CITIZEN, "province-79", 2, {"full_name": "Nguyễn Lan"}))
        feed.apply(event("citizen", CITIZEN_2, "province-79", 2, None))
        assert sum(store.count_records().values()) >= 1
        store.set_meta("checked_by", "test")
        store.log_access("chi", "export", "ticket 3", [])
        # A source purge, its audit row updated chunk by chunk (a key a chunk)
        purging = new_purge("province-01", None, None, "ticket 4", "dung", None)
        purged = run_purge(store, Authority(), purging, None, chunk=1)
        assert purged.counts.views == 1 and purged.finished_at is not None

        # The retention job as this role: the history goes, the access log only past the
        # owner's floor (30 days), whatever the job's own retention (1 day) asks.
        later = now + 800 * DAY
        retention = Retention(history_days=1, deleted_days=1, access_log_days=1,
                              reference_key=ReferenceKey(b"r" * 32))  # fmt: skip
        done = purge(store, retention, later)
        assert done["history"] >= 1
        assert done["access_log"] == 1
        assert done["apply_journal"] == 0  # its last 7 days stay, whatever the clock says
        assert operators(store) == ["binh", "chi"]

        # Asking the function itself, the purge's setting on in the session
        with store.engine.begin() as conn:
            conn.exec_driver_sql("SET portal_sync.access_log_purge = 'on'")
            asked = text("SELECT portal_sync_purge_access_log(now()::timestamp + '1 day', 100)")
            assert conn.execute(asked).scalar_one() == 0
        assert operators(store) == ["binh", "chi"]
    finally:
        store.close()

    denied = [
        "UPDATE access_log SET reason = 'nothing to see'",
        "DELETE FROM access_log",
        "SET LOCAL portal_sync.access_log_purge = 'on'; DELETE FROM access_log",
        "TRUNCATE access_log",
        "ALTER TABLE access_log DISABLE TRIGGER access_log_append_only",
        purge_function("public", floor_days=0),
        journal_purge_function("public"),
        f"ALTER FUNCTION {JOURNAL_PURGE_FUNCTION} OWNER TO {roles.runtime}",
        f"ALTER FUNCTION {PURGE_FUNCTION} OWNER TO {roles.runtime}",
        "DROP FUNCTION portal_sync_access_log_append_only() CASCADE",
        "UPDATE alembic_version SET version_num = '0001'",
        # who moved the offsets, the batches' journal, the purges and redrives: the role
        # the operators' commands run as cannot erase what they did
        "DELETE FROM offset_changes",
        "UPDATE offset_changes SET operator = 'nobody'",
        "TRUNCATE offset_changes",
        "DELETE FROM apply_journal",
        "UPDATE apply_journal SET events = 0",
        "DELETE FROM source_purges",
        "UPDATE source_purges SET operator = 'nobody', reason = 'nothing'",
        "UPDATE source_purges SET started_at = now()",
        "DELETE FROM dead_letter_redrives",
        "UPDATE dead_letter_redrives SET topic = 'elsewhere'",
        "SELECT setval('access_log_id_seq', 1)",  # the log's next inserts would fail
        "DROP TABLE records",
        "CREATE TABLE public.scratch (a int)",
    ]
    for statement in denied:
        message = roles.refused(roles.runtime, statement)
        assert "permission denied" in message or "must be owner" in message, statement
    assert operators(roles.store(roles.owner)) == ["binh", "chi"]


def test_the_granted_role_cannot_rewrite_what_a_purge_or_a_redrive_recorded(
    roles: Roles,
) -> None:
    """A column grant covers every row: the role could set a finished purge's counts to 0
    and its end before its start (then nothing warned of the purge any more), or write
    another operator and time into any redrive. Only the commands' own updates pass."""
    owner = roles.store(roles.owner)
    owner.create_schema()
    owner.grant(roles.runtime, 30)
    owner.close()
    letters, citizens = "portal.dead-letters", "portal.changes.citizen"
    store = roles.store(roles.runtime)
    try:
        Feed(store).apply(
            event("citizen", CITIZEN, "province-79", 1, {"full_name": "Nguyễn Thị Lan"}),
            event("citizen", CITIZEN, "province-01", 1, {"full_name": "Nguyễn Thị Lan Anh"}),
            event("citizen", CITIZEN_2, "province-01", 1, {"full_name": "Trần Văn Đức"}),
        )
        purging = new_purge("province-01", None, None, "ticket 4", "dung", None)
        purged = run_purge(store, Authority(), purging, None, chunk=1)  # updated per chunk
        assert purged.counts.views == 2 and purged.finished_at is not None
        with store.claim_redrive(letters, 0, 3, "invalid_field", citizens, "id-1", "an") as mine:
            assert mine
        for operator in ("an", "binh"):  # a letter of an earlier topic's is claimed again
            with store.claim_redrive(
                letters, 0, 4, "invalid_field", citizens, "", operator
            ) as mine:
                assert mine
        with store.engine.begin() as conn:  # a purge still running: its counts grow
            conn.exec_driver_sql(
                "INSERT INTO source_purges (id, source, operator, reason, started_at, views,"
                " tombstones, records_remerged, records_changed, records_removed) VALUES"
                " ('running', 'province-02', 'chi', 'ticket 5',"
                " now() AT TIME ZONE 'UTC' - interval '1 hour', 5, 0, 0, 0, 0)"
            )
            conn.exec_driver_sql("UPDATE source_purges SET views = 7 WHERE id = 'running'")
    finally:
        store.close()

    refused = [
        "UPDATE source_purges SET views = 0, tombstones = 0 WHERE finished_at IS NOT NULL",
        "UPDATE source_purges SET finished_at = started_at - interval '3 years'",
        "UPDATE source_purges SET finished_at = NULL WHERE finished_at IS NOT NULL",
        "UPDATE source_purges SET views = 1 WHERE id = 'running'",
        "UPDATE source_purges SET finished_at = started_at - interval '1 day' WHERE id = 'running'",
        "UPDATE dead_letter_redrives SET operator = 'mallory' WHERE topic_id = 'id-1'",
        "UPDATE dead_letter_redrives SET redriven_at = '2020-01-01' WHERE topic_id = ''",
    ]
    for statement in refused:
        message = roles.refused(roles.runtime, statement)
        assert "source_purges:" in message or "dead_letter_redrives:" in message, statement
    # an interrupted purge "finished" at its start would hide it: it finishes now
    engine = create_engine(roles.url_of(roles.runtime))
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE source_purges SET finished_at = started_at WHERE id = 'running'"
        )
    engine.dispose()
    query = "SELECT views, operator FROM source_purges ORDER BY started_at"
    with roles.admin.connect() as conn:
        assert [tuple(r) for r in conn.exec_driver_sql(query)] == [(7, "chi"), (2, "dung")]
        ended = "SELECT finished_at - started_at FROM source_purges WHERE id = 'running'"
        assert conn.exec_driver_sql(ended).scalar_one() > timedelta(minutes=59)
        query = 'SELECT "offset", operator FROM dead_letter_redrives ORDER BY 1'
        assert [tuple(r) for r in conn.exec_driver_sql(query)] == [(3, "an"), (4, "binh")]


def test_the_purge_function_is_nobody_s_until_granted(roles: Roles) -> None:
    owner = roles.store(roles.owner)
    owner.create_schema()
    owner.log_access("an", "show", "ticket 1", [], now=utcnow() - 40 * DAY)
    # The owner's own purge (one role for everything, as before 0017) has no floor.
    assert owner.purge_access_log(utcnow() - DAY) == 1
    owner.close()
    message = roles.refused(
        roles.other, "SELECT portal_sync_purge_access_log(now()::timestamp, 10)"
    )
    assert "permission denied" in message
    message = roles.refused(
        roles.other, "SELECT portal_sync_purge_apply_journal(now()::timestamp, 10)"
    )
    assert "permission denied" in message


def test_a_grant_that_would_not_bind_is_refused_and_changes_nothing(
    roles: Roles, sqlite_store_url: str
) -> None:
    owner = roles.store(roles.owner)
    owner.create_schema()
    refusals = {
        roles.owner: "owns the store's tables",
        "portal": "superuser",
        "nobody_such": "no PostgreSQL role",
    }
    for role, reason in refusals.items():
        with pytest.raises(ConfigurationError, match=reason):
            owner.grant(role, 30)
    with roles.admin.connect() as conn:
        conn.exec_driver_sql(f"GRANT {roles.owner} TO {roles.other}")
    with pytest.raises(ConfigurationError, match="member of the owner"):
        owner.grant(roles.other, 30)

    # Rights that let a role drop the log, plant a function the owner's sessions would
    # call, or make itself the owner: each refused, and refused no more once taken back.
    database = make_url(roles.url).database
    ways = [
        (f"ALTER ROLE {roles.runtime} CREATEROLE", f"ALTER ROLE {roles.runtime} NOCREATEROLE",
         "CREATEROLE"),
        (f"GRANT CREATE ON SCHEMA public TO {roles.runtime}",
         f"REVOKE CREATE ON SCHEMA public FROM {roles.runtime}", "may create objects"),
        (f"ALTER SCHEMA public OWNER TO {roles.runtime}",
         f"ALTER SCHEMA public OWNER TO {roles.owner}", "owns, or may create objects in"),
        (f'GRANT CREATE ON DATABASE "{database}" TO {roles.runtime}',
         f'REVOKE CREATE ON DATABASE "{database}" FROM {roles.runtime}', "may create schemas"),
        (f'ALTER DATABASE "{database}" OWNER TO {roles.runtime}',
         f'ALTER DATABASE "{database}" OWNER TO {roles.owner}', "owns the database"),
    ]  # fmt: skip
    for give, take, reason in ways:
        with roles.admin.connect() as conn:
            conn.exec_driver_sql(give)
        with pytest.raises(ConfigurationError, match=reason):
            owner.grant(roles.runtime, 30)
        with roles.admin.connect() as conn:
            conn.exec_driver_sql(take)

    with owner.engine.begin() as conn:
        conn.exec_driver_sql("GRANT DELETE ON access_log TO PUBLIC")
    with pytest.raises(ConfigurationError, match=r"may still DELETE .*access_log"):
        owner.grant(roles.runtime, 30)
    with owner.engine.begin() as conn:  # a column's right, which the table's check missed
        conn.exec_driver_sql("REVOKE DELETE ON access_log FROM PUBLIC")
        conn.exec_driver_sql("GRANT UPDATE (operator, reason) ON offset_changes TO PUBLIC")
    with pytest.raises(ConfigurationError, match=r"UPDATE \(operator\) of.*offset_changes"):
        owner.grant(roles.runtime, 30)
    with owner.engine.begin() as conn:
        conn.exec_driver_sql("REVOKE UPDATE (operator, reason) ON offset_changes FROM PUBLIC")
        conn.exec_driver_sql("GRANT DELETE ON access_log TO PUBLIC")
    assert "permission denied" in roles.refused(roles.runtime, "SELECT 1 FROM records")

    not_owner = roles.store(roles.runtime)
    with pytest.raises(ConfigurationError, match="runs as the store's owner"):
        not_owner.grant(roles.runtime, 30)
    not_owner.close()
    with owner.engine.begin() as conn:
        conn.exec_driver_sql("REVOKE DELETE ON access_log FROM PUBLIC")
    owner.grant(roles.runtime, 30)  # every right above taken back: granted
    owner.close()
    sqlite = Store(sqlite_store_url)
    sqlite.create_schema()
    with pytest.raises(ConfigurationError, match="SQLite"):
        sqlite.grant("anyone", 30)
    sqlite.close()


def portal_sync(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_SYNC_")}
    return subprocess.run([sys.executable, "-m", "portal_sync", *args], capture_output=True,
                          text=True, env={**env, "COLUMNS": "200"}, timeout=120)  # fmt: skip


def test_store_grant_runs_again_and_names_what_it_gave(roles: Roles) -> None:
    owner = roles.store(roles.owner)
    owner.create_schema()
    owner.close()
    command = ["store", "grant", roles.runtime, "--store", roles.url_of(roles.owner)]
    for _ in range(2):
        result = portal_sync(*command, "--access-log-floor-days", "90")
        assert result.returncode == 0, result.stderr
        assert f"granted {roles.runtime}:" in result.stdout
        assert "access_log, offset_changes, apply_journal append-only" in result.stdout
        assert "never rows younger than 90 days" in result.stdout
    as_runtime = portal_sync(*command[:3], "--store", roles.url_of(roles.runtime))
    assert as_runtime.returncode == 2, as_runtime.stderr
    assert "runs as the store's owner" in as_runtime.stderr


def test_a_role_that_deleted_from_the_log_before_the_upgrade_still_purges(roles: Roles) -> None:
    """A commands' role made by hand before migration 0017 (the docs' advice then) purged
    with the setting and a DELETE; the upgrade lets it run the purge function instead."""
    from alembic import command

    from store import schema

    owner = roles.store(roles.owner)
    config = schema._config()
    with owner.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0016")
        conn.exec_driver_sql(f"GRANT SELECT, INSERT, DELETE ON access_log TO {roles.runtime}")
        conn.exec_driver_sql(f"GRANT USAGE ON SEQUENCE access_log_id_seq TO {roles.runtime}")
        conn.exec_driver_sql(f"GRANT SELECT ON alembic_version TO {roles.runtime}")
        conn.exec_driver_sql("GRANT DELETE ON access_log TO PUBLIC")
    # upgraded by a superuser: the function is still the log owner's, to run and replace
    superuser = Store(roles.url)
    superuser.upgrade()
    superuser.close()
    owner.log_access("an", "show", "ticket 1", [], now=utcnow() - 40 * DAY)
    owner.log_access("binh", "show", "ticket 2", [], now=utcnow() - 40 * DAY)
    store = roles.store(roles.runtime)
    try:
        assert store.purge_access_log(utcnow() - DAY) == 2
    finally:
        store.close()
    assert owner.purge_access_log(utcnow() - DAY) == 0  # the owner's own purge runs
    other = "SELECT portal_sync_purge_access_log(now()::timestamp, 10)"
    with create_engine(roles.url_of(roles.other)).begin() as conn:
        assert conn.exec_driver_sql(other).scalar_one() == 0  # PUBLIC could delete
    with owner.engine.begin() as conn:
        conn.exec_driver_sql("REVOKE DELETE ON access_log FROM PUBLIC")
    owner.grant(roles.runtime, 30)  # the owner replaces the function; PUBLIC's run ends
    owner.close()
    assert "permission denied" in roles.refused(roles.other, other)


def docs_recipe() -> str:
    """The SQL block of docs/operations.md's "A store one role owns today"."""
    text = (Path(__file__).parents[3] / "docs" / "operations.md").read_text()
    after = text[text.index("**A store one role owns today**") :]
    start = after.index("```sql\n") + len("```sql\n")
    return after[start : after.index("\n```", start)]


def test_the_docs_recipe_gives_a_one_role_store_to_an_owner(postgres_store_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    runtime, owner = f"sync_{tag}", f"owner_{tag}"
    database = make_url(postgres_store_url).database
    admin = create_engine(postgres_store_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {runtime} LOGIN")
        conn.exec_driver_sql(f'ALTER DATABASE "{database}" OWNER TO {runtime}')
        conn.exec_driver_sql("ALTER SCHEMA public OWNER TO pg_database_owner")  # a new one's
    url = make_url(postgres_store_url)
    as_runtime = url.set(username=runtime).render_as_string(hide_password=False)
    store = Store(as_runtime)
    store.create_schema()
    Feed(store).apply(event("citizen", CITIZEN, "province-79", 1, {"full_name": "Đỗ Minh"}))
    store.log_access("an", "show", "ticket 1", [], now=utcnow() - 40 * DAY)
    store.close()

    recipe = (
        docs_recipe()
        .replace("portal_owner", owner)
        .replace("= 'portal_sync'", f"= '{runtime}'")
        .replace("ALTER DATABASE portal ", f'ALTER DATABASE "{database}" ')
    )
    with admin.connect() as conn:
        conn.connection.driver_connection.execute(recipe)  # no parameters: `%` as written
        left = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            f" WHERE n.nspname = 'public' AND pg_get_userbyid(c.relowner) = '{runtime}'"
        ).scalar_one()
        assert left == 0  # tables and their sequences: the owner's now
    admin.dispose()

    owned = Store(url.set(username=owner).render_as_string(hide_password=False))
    head = owned.upgrade()[1]
    assert owned.upgrade() == (head, head)  # the store found, not a new one made
    owned.grant(runtime, 30)
    owned.close()
    store = Store(as_runtime)
    try:
        assert store.count_records() == {"citizen": 1}
        assert store.purge_access_log(utcnow()) == 1
    finally:
        store.close()
    engine = create_engine(as_runtime)
    with pytest.raises(DBAPIError, match="permission denied"), engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM access_log")
    engine.dispose()


def test_a_grant_missing_on_a_table_is_retried_and_named(
    roles: Roles,
) -> None:
    """A table a store upgrade added, `store grant` not run yet: each batch failed with
    "the store failed: ProgrammingError", the cause in no log. Retried still (a rollout's
    upgrade and grant may be a moment apart), and named."""
    from schemas.errors import TransientError
    from store.failures import StoreMisconfigured

    owner = roles.store(roles.owner)
    owner.create_schema()
    owner.grant(roles.runtime, 30)
    with owner.engine.begin() as conn:
        conn.exec_driver_sql(f"REVOKE ALL ON record_history FROM {roles.runtime}")
    owner.close()
    store = roles.store(roles.runtime)
    try:
        with pytest.raises(StoreMisconfigured) as refused:
            Feed(store).apply(
                event("citizen", CITIZEN, "province-79", 1, {"full_name": "Nguyễn Thị Lan"})
            )
        assert "insufficient privilege" in str(refused.value)
        assert "(SQLSTATE 42501)" in str(refused.value)
        assert isinstance(refused.value, TransientError)
    finally:
        store.close()
