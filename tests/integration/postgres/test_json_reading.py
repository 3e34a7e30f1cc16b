"""JSONB as the store reads it from PostgreSQL: with orjson, and with the standard library
for what orjson refuses, so that no stored value can make a batch's read fail."""

from __future__ import annotations

from psycopg import pq
from psycopg.adapt import Loader

from schemas.json_text import loads_exact
from store.core import Store


def test_jsonb_is_read_with_orjson_and_every_value_still_reads(postgres_store_url: str) -> None:
    store = Store(postgres_store_url)
    try:
        with store.engine.connect() as conn:
            dbapi = conn.connection.driver_connection
            assert dbapi is not None
            for type_name in ("json", "jsonb"):
                oid = dbapi.adapters.types[type_name].oid
                for fmt in (pq.Format.TEXT, pq.Format.BINARY):
                    loader: type[Loader] | None = dbapi.adapters.get_loader(oid, fmt)
                    assert loader is not None
                    assert getattr(loader, "_loads", None) is loads_exact
            cursor = dbapi.cursor()
            cursor.execute(
                'SELECT \'{"họ_tên": "Nguyễn Văn Ân", "v": [1, 2.5, null, true]}\'::jsonb,'
                " '{\"big\": 184467440737095516160}'::jsonb"
            )
            usual, big = cursor.fetchone()
    finally:
        store.close()
    assert usual == {"họ_tên": "Nguyễn Văn Ân", "v": [1, 2.5, None, True]}
    # beyond 64 bits orjson would read a float (equal here, yet not the integer stored)
    assert big == {"big": 184467440737095516160} and type(big["big"]) is int
