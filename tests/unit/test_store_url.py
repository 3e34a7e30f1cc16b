"""The store's URL: what reads as one, with the driver each backend has here, and a
one-line configuration error (exit 2) for the rest. Before, `postgres://…`, a URL that
did not parse or another driver ended in a traceback in every command."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from portal_sync.cli import app
from schemas.errors import ConfigurationError
from store import Store
from store.engine import store_url


@pytest.mark.parametrize(
    ("given", "drivername"),
    [
        ("postgres://portal@db.example:5432/store", "postgresql+psycopg"),
        ("postgresql://portal@db.example/store", "postgresql+psycopg"),
        ("postgresql+psycopg://portal@db.example/store", "postgresql+psycopg"),
        ("sqlite:////var/lib/portal-sync/store.db", "sqlite"),
        ("sqlite+pysqlite:///store.db", "sqlite+pysqlite"),
    ],
)
def test_the_forms_the_store_reads(given: str, drivername: str) -> None:
    assert store_url(given).drivername == drivername


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("notaurl", "the store URL does not read as one"),
        ("postgresql+psycopg://portal:s3cr3t-pw@db:bad/store", "the store URL does not read"),
        ("mysql://portal:s3cr3t-pw@db/store", "names 'mysql', which the store does not use"),
        ("postgresql+psycopg2://portal:s3cr3t-pw@db/store", "names 'postgresql\\+psycopg2'"),
        ("", "the store URL does not read as one"),
    ],
)
def test_other_urls_are_a_configuration_error_that_never_quotes_them(given: str, said: str) -> None:
    with pytest.raises(ConfigurationError, match=said) as refused:
        Store(given)
    assert "s3cr3t" not in str(refused.value)
    assert "sqlite:///PATH or postgresql+psycopg://" in str(refused.value)


def test_a_command_given_another_url_exits_2_with_one_line() -> None:
    result = CliRunner().invoke(app, ["store", "upgrade", "--store", "mysql://u:pw@h/db"])
    assert isinstance(result.exception, ConfigurationError)  # exit 2 (cli.EXIT_CODES)


def test_lag_reading_the_stores_offsets_refuses_another_url_at_start() -> None:
    """The lag exporter read the store at each poll only: every poll failed, and it paged
    as blind instead of refusing to start."""
    result = CliRunner().invoke(
        app, ["lag", "--store", "mysql://u:pw@h/db", "--bootstrap", "127.0.0.1:1"]
    )
    assert isinstance(result.exception, ConfigurationError)


def test_two_spellings_of_one_database_are_the_same_store(tmp_path: Path) -> None:
    """`rebuild --store` naming the live store is refused (it advised dropping it)."""
    from store import same_database

    live = f"sqlite:///{tmp_path}/store.db"
    assert same_database(live, f"sqlite:///{tmp_path}/./sub/../store.db")
    assert not same_database(live, f"sqlite:///{tmp_path}/rebuilt.db")
    assert not same_database("sqlite:///:memory:", "sqlite:///:memory:")  # two databases
    pg = "postgresql+psycopg://portal:secret@db.example:5432/store"
    assert same_database(pg, "postgres://owner@db.example/store")  # another user, same db
    assert not same_database(pg, "postgresql://portal@db.example/rebuilt")
    assert not same_database(pg, "postgresql://portal@replica.example/store")
    assert not same_database(pg, live)
