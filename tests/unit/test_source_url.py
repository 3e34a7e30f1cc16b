"""A source database's URL may be spelt `postgres://` (libpq's and most tools' spelling):
SQLAlchemy does not know it, and the adapter failed with NoSuchModuleError (and the
snapshot capture said the source was not PostgreSQL)."""

from __future__ import annotations

import pytest

from producers.sdk import source_engine, source_url


@pytest.mark.parametrize(
    ("given", "drivername"),
    [
        ("postgres://reader@db.hcm.gov.vn/dossiers", "postgresql"),
        ("postgres+psycopg://reader@db/dossiers", "postgresql+psycopg"),
        ("postgresql://reader@db/dossiers", "postgresql"),
        ("oracle+oracledb://reader@db/dossiers", "oracle+oracledb"),
        ("sqlite:////srv/exports/source.db", "sqlite"),
    ],
)
def test_the_forms_a_source_url_reads_as(given: str, drivername: str) -> None:
    assert source_url(given).drivername == drivername


def test_a_postgres_url_makes_a_postgresql_engine() -> None:
    engine = source_engine("postgres://reader@127.0.0.1:1/dossiers")
    assert engine.dialect.name == "postgresql"
    assert engine.dialect.driver == "psycopg"
    engine.dispose()
