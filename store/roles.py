"""Two PostgreSQL roles for one store (`portal-sync store grant ROLE`).

The role that owns the store's tables (it ran `store upgrade`) can do anything to them,
the access log's append-only trigger included: it may disable the trigger, or delete rows
with the purge's setting. The worker and the commands need much less. `grant` gives a
second role exactly that: reading and writing the project's tables, but only reading and
appending to `access_log`, `offset_changes` and `apply_journal`, and never deleting from
`source_purges` and `dead_letter_redrives` (the records of what was done), nor updating
more of their rows than a purge's progress and a redrive's claim; reading
Alembic's version (not changing it); the id sequences; and running the retention purges of
the access log, a function that runs as its owner (migration 0017), written again here so
that it never deletes a row younger than `floor_days`, whatever it is asked, and of the
batches' journal (migration 0018), which never deletes a row younger than
`JOURNAL_FLOOR_DAYS`.
A role so granted cannot change the schema, the trigger or the function.

Run it as the owner after every `store upgrade` (a new revision may add a table): it
revokes what it does not grant on the project's tables, so it can be run again at any time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text

from schemas.errors import ConfigurationError
from store.schema import (
    JOURNAL_PURGE_FUNCTION,
    PURGE_FUNCTION,
    SCHEMA_LOCK,
    VERSION_TABLE,
    no_schema,
    require_current,
)
from store.tables import (
    REDRIVE_CLAIM,
    SOURCE_PURGE_PROGRESS,
    access_log,
    apply_journal,
    dead_letter_redrives,
    metadata,
    offset_changes,
    source_purges,
)

READ_WRITE = "SELECT, INSERT, UPDATE, DELETE"
APPEND_ONLY = "SELECT, INSERT"
KEPT = "SELECT, INSERT"  # and UPDATE of the columns `UPDATED` names; never deleted
# The records of what was done, which no code path deletes: the access log; the operators'
# moves of the offsets (who skipped an event, and why); the batches' journal, whose
# contiguous ranges prove nothing was lost or applied twice. Appended to only: the role
# the operators' commands run as cannot erase what they did.
APPENDED = (access_log, offset_changes, apply_journal)
# Audit rows updated in place but never deleted, in those columns only: a purge's row
# grows with each chunk (who purged what, when and why stays as written); a redrive's
# claim is taken over from an earlier topic's letter at the same place.
UPDATED = {source_purges: SOURCE_PURGE_PROGRESS, dead_letter_redrives: REDRIVE_CLAIM}


# The access log's purge (migration 0017; `grant` writes it again with the owner's floor).
# PostgreSQL lets no role but a superuser attach a setting of its own (a placeholder) to a
# function, so the function sets `portal_sync.access_log_purge` itself, for its DELETE
# alone, and holds its floor as a constant.
PURGE_FUNCTION_SQL = """
CREATE OR REPLACE FUNCTION portal_sync_purge_access_log(before timestamp without time zone,
                                                        max_rows integer)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER
SET search_path = {schema}, pg_temp
AS $$
DECLARE
    cutoff timestamp := least(before, (pg_catalog.now() AT TIME ZONE 'UTC')
                                      - pg_catalog.make_interval(days => {floor_days}));
    deleted integer;
BEGIN
    PERFORM pg_catalog.set_config('portal_sync.access_log_purge', 'on', true);
    DELETE FROM access_log WHERE id IN (
        SELECT id FROM access_log WHERE accessed_at < cutoff
        ORDER BY accessed_at LIMIT max_rows);
    GET DIAGNOSTICS deleted = ROW_COUNT;
    PERFORM pg_catalog.set_config('portal_sync.access_log_purge', '', true);
    RETURN deleted;
END
$$
"""


# The batches' journal's purge (migration 0018): of the `max_rows` oldest rows (by id: the
# order they committed in, read by the primary key, no index of the time needed), those
# committed before `before` and at least `JOURNAL_FLOOR_DAYS` ago. The role the worker runs
# as only appends to the journal: the journal of the last week stays, whoever asks. (A
# change of this text needs a migration of its own.)
JOURNAL_FLOOR_DAYS = 7
JOURNAL_PURGE_FUNCTION_SQL = f"""
CREATE OR REPLACE FUNCTION portal_sync_purge_apply_journal(before timestamp without time zone,
                                                           max_rows integer)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER
SET search_path = {{schema}}, pg_temp
AS $$
DECLARE
    cutoff timestamp := least(before, (pg_catalog.now() AT TIME ZONE 'UTC')
                                      - pg_catalog.make_interval(days => {JOURNAL_FLOOR_DAYS}));
    deleted integer;
BEGIN
    DELETE FROM apply_journal WHERE id IN (
        SELECT id FROM apply_journal ORDER BY id LIMIT max_rows) AND committed_at < cutoff;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$
"""


def journal_purge_function(schema: str) -> str:
    """The journal's purge function's definition in `schema` (quoted)."""
    return JOURNAL_PURGE_FUNCTION_SQL.format(schema=schema)


def purge_function(schema: str, floor_days: int) -> str:
    """The purge function's definition in `schema` (quoted), with its floor in days."""
    return PURGE_FUNCTION_SQL.format(schema=schema, floor_days=int(floor_days))


@dataclass(frozen=True)
class Granted:
    """What `grant` gave: the role, the schema, how many tables (and which append-only),
    how many sequences, and the access log's floor in days."""

    role: str
    schema: str
    tables: int
    append_only: tuple[str, ...]
    sequences: int
    floor_days: int


def grant(engine: Engine, role: str, floor_days: int) -> Granted:
    """Give `role` what the worker and the commands need of the store, and no more; run as
    the tables' owner (or a superuser). Refused: SQLite, a store not at the newest
    revision, and a role that no grant would bind (`_unbound`)."""
    if engine.dialect.name != "postgresql":
        raise ConfigurationError(
            "store grant is for PostgreSQL: a SQLite store has no roles (whoever can write "
            "its file can change it)"
        )
    if floor_days < 0:
        raise ConfigurationError("the access log's floor is a number of days, 0 or more")
    with engine.begin() as conn:
        # Built-ins by their schema: these statements run as the owner, and an unqualified
        # name could resolve to a function another role created earlier in the path.
        conn.exec_driver_sql(f"SELECT pg_catalog.pg_advisory_xact_lock({SCHEMA_LOCK})")
        found_table = conn.execute(
            text(
                "SELECT pg_catalog.quote_ident(t.schemaname::text), t.schemaname,"
                " t.tableowner, r.rolname, r.rolsuper FROM pg_catalog.pg_tables t,"
                " pg_catalog.pg_roles r WHERE t.schemaname = pg_catalog.current_schema()"
                " AND t.tablename = :table AND r.rolname = CURRENT_USER"
            ),
            {"table": access_log.name},
        ).one_or_none()
        if found_table is None:
            raise no_schema()
        schema, schema_name, owner, me, me_super = found_table
        found = conn.execute(
            text(
                "SELECT pg_catalog.quote_ident(rolname::text) FROM pg_catalog.pg_roles"
                " WHERE rolname = :role"
            ),
            {"role": role},
        ).one_or_none()
        if found is None:
            raise ConfigurationError(f"no PostgreSQL role named {role!r}: create it first")
        (quoted,) = found
        if me != owner and not me_super:
            raise ConfigurationError(
                f"store grant runs as the store's owner ({owner!r}), not {me!r}"
            )
        problem = _unbound(conn, role, owner, schema_name)
        if problem:
            raise ConfigurationError(f"{role!r} {problem}")
        require_current(engine)  # (another session: it only reads)
        return _grant(conn, schema, quoted, role, floor_days)


# What makes a role's grants moot, as (query, the refusal's text). Each query takes the
# role, the tables' owner and the store's schema, and is true when the role:
UNBOUND = (
    (
        "SELECT :role = :owner",
        "owns the store's tables, and an owner is bound by no grant: give the worker and "
        "the commands a role of their own",
    ),
    (
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE (r.rolsuper OR r.rolcreaterole)"
        " AND pg_catalog.pg_has_role(:role, r.oid, 'MEMBER'))",
        "is, or may act as, a superuser or a role with CREATEROLE, which can make itself "
        "the owner: give the worker and the commands a role without either",
    ),
    (
        "SELECT pg_catalog.pg_has_role(:role, :owner, 'MEMBER')",
        "is a member of the owner and has its rights: give the worker and the commands a "
        "role that is not",
    ),
    (
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_namespace n WHERE n.nspname = ANY"
        " (pg_catalog.current_schemas(false) || CAST(:schema AS name)) AND"
        " (pg_catalog.pg_has_role(:role, n.nspowner, 'MEMBER')"
        " OR pg_catalog.has_schema_privilege(:role, n.oid, 'CREATE')))",
        "owns, or may create objects in, the store's schema or another of the owner's "
        "search path, where it could drop the log or plant a function the owner's sessions "
        "would call: `REVOKE CREATE ON SCHEMA public FROM PUBLIC` (and from the role), and "
        "let the owner own the schema and the database",
    ),
    (
        "SELECT pg_catalog.has_database_privilege(:role, pg_catalog.current_database(),"
        " 'CREATE') OR EXISTS (SELECT FROM pg_catalog.pg_database d WHERE d.datname ="
        " pg_catalog.current_database() AND pg_catalog.pg_has_role(:role, d.datdba, 'MEMBER'))",
        "owns the database or may create schemas in it (a schema named as the owner comes "
        "first in its search path): `ALTER DATABASE … OWNER TO` the owner, `REVOKE CREATE ON "
        "DATABASE … FROM` the role and PUBLIC",
    ),
)


def _unbound(conn: Connection, role: str, owner: str, schema: str) -> str | None:
    """Why no grant would bind `role` (a refusal's text), or None."""
    values = {"role": role, "owner": owner, "schema": schema}
    for query, problem in UNBOUND:
        if conn.execute(text(query), values).scalar_one():
            return problem
    return None


def _grant(conn: Connection, schema: str, quoted: str, role: str, floor_days: int) -> Granted:
    run = conn.exec_driver_sql
    run(f"GRANT USAGE ON SCHEMA {schema} TO {quoted}")
    sequences = 0
    for table in metadata.sorted_tables:
        name = f"{schema}.{conn.dialect.identifier_preparer.quote(table.name)}"
        run(f"REVOKE ALL ON {name} FROM {quoted}")
        rights = APPEND_ONLY if table in APPENDED else KEPT if table in UPDATED else READ_WRITE
        run(f"GRANT {rights} ON {name} TO {quoted}")
        if table in UPDATED:
            run(f"GRANT UPDATE ({_columns(conn, UPDATED[table])}) ON {name} TO {quoted}")
        for column in table.primary_key.columns:
            sequence = conn.execute(
                text("SELECT pg_catalog.pg_get_serial_sequence(:table, :column)"),
                {"table": name, "column": column.name},
            ).scalar_one()
            if sequence is not None:  # `setval` (UPDATE) could make the log's inserts fail
                run(f"REVOKE ALL ON SEQUENCE {sequence} FROM {quoted}")
                run(f"GRANT USAGE, SELECT ON SEQUENCE {sequence} TO {quoted}")
                sequences += 1
    versions = f"{schema}.{VERSION_TABLE}"
    run(f"REVOKE ALL ON {versions} FROM {quoted}")
    run(f"GRANT SELECT ON {versions} TO {quoted}")
    # Only the roles granted run the purge (migration 0017 let the roles that could delete
    # from the log run it, PUBLIC among them)
    run(f"REVOKE EXECUTE ON FUNCTION {schema}.{PURGE_FUNCTION} FROM PUBLIC")
    run(f"GRANT EXECUTE ON FUNCTION {schema}.{PURGE_FUNCTION} TO {quoted}")
    run(f"REVOKE EXECUTE ON FUNCTION {schema}.{JOURNAL_PURGE_FUNCTION} FROM PUBLIC")
    run(f"GRANT EXECUTE ON FUNCTION {schema}.{JOURNAL_PURGE_FUNCTION} TO {quoted}")
    run(purge_function(schema, floor_days))  # its owner, its EXECUTE grants are kept
    for table in (*APPENDED, *UPDATED):  # a trigger of its own could drop new rows
        fixed = [c.name for c in table.columns if c.name not in UPDATED.get(table, ())]
        withheld = ("DELETE", "TRUNCATE", "TRIGGER")
        _still_allowed(conn, f"{schema}.{table.name}", role, withheld, fixed)
    _still_allowed(conn, versions, role, ("INSERT", "UPDATE", "DELETE", "TRUNCATE"))
    return Granted(
        role=role,
        schema=schema,
        tables=len(metadata.sorted_tables) + 1,
        append_only=tuple(table.name for table in APPENDED),
        sequences=sequences,
        floor_days=floor_days,
    )


def _columns(conn: Connection, names: tuple[str, ...]) -> str:
    return ", ".join(conn.dialect.identifier_preparer.quote(name) for name in names)


def _still_allowed(
    conn: Connection,
    table: str,
    role: str,
    privileges: tuple[str, ...],
    fixed: Sequence[str] = (),
) -> None:
    """Refuse (and roll the grant back) if `role` keeps a right this grant withholds, by
    PUBLIC or by another role it belongs to: one of `privileges` on `table`, or UPDATE of
    a column in `fixed` (granted on the column alone, which `has_table_privilege` does not
    see)."""
    kept = [
        privilege
        for privilege in privileges
        if conn.execute(
            text("SELECT pg_catalog.has_table_privilege(:role, :table, :privilege)"),
            {"role": role, "table": table, "privilege": privilege},
        ).scalar_one()
    ]
    kept += [
        f"UPDATE ({column}) of"
        for column in fixed
        if conn.execute(
            text("SELECT pg_catalog.has_column_privilege(:role, :table, :column, 'UPDATE')"),
            {"role": role, "table": table, "column": column},
        ).scalar_one()
    ]
    if kept:
        raise ConfigurationError(
            f"{role!r} may still {', '.join(kept)} {table}, through PUBLIC or another role "
            "it belongs to: revoke that first"
        )
