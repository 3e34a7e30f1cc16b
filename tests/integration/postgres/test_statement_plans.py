"""A batch's lookups by key are planned at every run, never prepared (PostgreSQL).

psycopg prepares a statement after its fifth run; PostgreSQL may then keep the generic plan
it made while the tables were small (a hash join over a sequential scan) as they grow.
Prepared statements are listed by the session that holds them: after many batches on one
connection, the writes are there and the lookups by key in the store's growing tables are
not."""

from __future__ import annotations

from sqlalchemy import text

from consumers.reconciler import Reconciler
from store.core import Store
from tests.unit.test_national_store_properties import AUTHORITY_A, Spec, split, stream


def test_lookups_by_key_are_never_prepared_and_writes_are(postgres_store_url: str) -> None:
    store = Store(postgres_store_url)
    store.drop_schema()
    store.create_schema()
    try:
        name = {"full_name": "Nguyễn Văn An"}
        specs = [
            Spec(record, source, version, version, name if version % 3 else None)
            for version in range(1, 13)
            for record in (0, 1)
            for source in ("province-01", "province-79")
        ]
        items = stream(specs)
        reconciler = Reconciler(store, AUTHORITY_A, part_events=3)
        for batch in split(items, list(range(4, len(items), 4))):
            reconciler.apply(batch, [c.message for c in batch])
        with store.engine.connect() as conn:  # the pool's one connection: the batches'
            rows = conn.execute(text("SELECT statement FROM pg_prepared_statements"))
            prepared = [" ".join(statement.split()) for (statement,) in rows]
        assert any(s.startswith("INSERT INTO source_views") for s in prepared), prepared
        # (the offsets' read is left prepared: one row per partition, a table that stays small)
        tables = ("source_views", "records", "field_conflicts", "document_owners")
        lookups = [
            s
            for s in prepared
            if ("JOIN unnest" in s or "USING unnest" in s or "JOIN LATERAL" in s)
            and any(f"FROM {t} " in s for t in tables)
        ]
        assert lookups == [], lookups
    finally:
        store.close()


def test_lookups_by_key_use_the_primary_key_whatever_the_estimates(
    postgres_store_url: str,
) -> None:
    """A batch's 2,000 keys among 40,000 rows: as a join, PostgreSQL hashed the whole table
    (a sequential scan); the lookups go through the primary key's index instead."""
    from store.batch_postgres import CANONICAL_SQL, VIEWS_SQL
    from store.pg_arrays import text_array

    store = Store(postgres_store_url)
    store.drop_schema()
    store.create_schema()
    try:
        with store.engine.connect() as conn:
            conn.execute(
                text(
                    "INSERT INTO source_views SELECT 'citizen', lpad(n::text, 12, '0'),"
                    " 'province-79', 1, 'e', now(), false, '{}'::json, now()"
                    " FROM generate_series(1, 40000) AS n"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO records SELECT 'citizen', lpad(n::text, 12, '0'),"
                    " '{}'::json, '{}'::json, now(), '{}'::json FROM generate_series(1, 40000) AS n"
                )
            )
            conn.commit()
            conn.execute(text("ANALYZE source_views"))
            conn.execute(text("ANALYZE records"))
            dbapi = conn.connection.driver_connection
            assert dbapi is not None
            keys = [f"{n:012d}" for n in range(1, 40001, 20)]
            params = [text_array(["citizen"] * len(keys)), text_array(keys)]
            for sql, table in ((VIEWS_SQL, "source_views"), (CANONICAL_SQL, "records")):
                cursor = dbapi.cursor()
                cursor.execute("EXPLAIN " + sql, params, prepare=False)
                plan = "\n".join(row[0] for row in cursor.fetchall())
                assert f"Index Scan using {table}_pkey" in plan, plan
                assert "Seq Scan" not in plan and "Hash" not in plan, plan
            conn.rollback()
    finally:
        store.close()
