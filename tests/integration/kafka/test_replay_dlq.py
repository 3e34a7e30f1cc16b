"""Replay, rebuild, dead-letter redrive and offset reset against the real broker."""

from __future__ import annotations

import json
import re
import time
import unicodedata
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import create_engine, delete, func, select, text, update

from consumers.merge import Authority
from observability.kafka_lag import Filters, LagReader
from observability.lag import Status
from schemas import derive_event_id
from schemas.errors import Refused
from schemas.identifiers import key_reference
from schemas.partitioning import message_key
from store import schema
from store.core import Store
from store.tables import record_deletions, record_history, records, source_views, topic_ids
from tests.support.kafka_helpers import commit_group_offsets, end_offsets, publisher_for
from tests.support.pipeline_helpers import (
    citizen_events,
    cli,
    expected_export,
    exported,
    registry_without_signatures,
    shuffled_with_duplicates,
    start_worker,
    write_jsonl,
)
from tests.support.store_helpers import refuse_views_of
from transport import admin

pytestmark = pytest.mark.kafka
PID = "001090012345"


def _store_at(url: str, revision: str) -> None:
    store = Store(url)
    config = schema._config()
    with store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
    store.close()


def _published(settings: Any, tmp_path: Path, events: list[dict[str, Any]]) -> None:
    feed = write_jsonl(tmp_path / f"feed-{time.monotonic_ns()}.jsonl", events)
    result = cli(settings, "publish", str(feed))
    assert result.returncode == 0, result.stderr


def _caught_up(settings: Any) -> None:
    result = cli(settings, "worker", "--until-caught-up")
    assert result.returncode == 0, result.stdout + result.stderr


def _counts(store: Store) -> tuple[int, int, int]:
    with store.engine.connect() as conn:
        return tuple(  # type: ignore[return-value]
            conn.execute(select(func.count()).select_from(table)).scalar_one()
            for table in (records, source_views, record_history)
        )


def test_replay_restores_a_wiped_part_of_the_store(
    settings_for: Any, store_url: str, tmp_path: Path
) -> None:
    settings = settings_for(store_url)
    events = citizen_events(80, 2)
    _published(settings, tmp_path, shuffled_with_duplicates(events))
    _caught_up(settings)
    before = exported(settings)
    assert before == expected_export(events, Authority())  # the merge, not only itself
    store = Store(settings.store_url)
    with store.write_transaction() as conn:  # an incident: part of the store is lost
        lost = conn.execute(select(records.c.key).limit(30)).scalars().all()
        conn.execute(delete(records).where(records.c.key.in_(lost)))
        conn.execute(delete(source_views).where(source_views.c.key.in_(lost)))
    assert exported(settings) != before

    result = cli(settings, "replay", "--since", "1h", "--json")

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["outcomes"]["applied"] > 0
    assert summary["changed_records"]["citizen"] >= len(lost)
    assert exported(settings) == before
    store.close()


def test_dry_run_writes_nothing_and_predicts_the_real_run(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    settings = settings_for(sqlite_store_url)
    events = citizen_events(60, 2, seed=3)
    _published(settings, tmp_path, events)
    _caught_up(settings)
    store = Store(settings.store_url)
    with store.write_transaction() as conn:
        conn.execute(delete(source_views).where(source_views.c.source == "province-79"))
    counts = _counts(store)
    snapshot = exported(settings)

    dry = cli(settings, "replay", "--since", "1h", "--json", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert _counts(store) == counts, "a dry run wrote to the store"
    assert exported(settings) == snapshot

    real = cli(settings, "replay", "--since", "1h", "--json")
    assert real.returncode == 0, real.stderr
    predicted, done = json.loads(dry.stdout), json.loads(real.stdout)
    assert predicted["outcomes"]["applied"] > 0
    for name in ("outcomes", "by_entity", "changed_records", "sample"):
        assert predicted[name] == done[name]
    assert exported(settings) == expected_export(events, Authority())
    store.close()


def test_replay_filters_by_source_and_entity(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    settings = settings_for(sqlite_store_url)
    _published(settings, tmp_path, citizen_events(30, 1, seed=4))
    # An invalid event of each of two sources (an unknown `sex`), as a producer keys it.
    publisher = publisher_for(settings)
    for source in ("province-01", "province-79"):
        bad = citizen_events(1, 1, seed=5)[0] | {"source": source, "data": {"sex": "x"}}
        key = message_key("citizen", bad["key"], source)
        publisher.send(settings.topics().change_topic("citizen"), key,
                       json.dumps(bad).encode(), [])  # fmt: skip
    publisher.flush()
    publisher.close()
    _caught_up(settings)

    result = cli(settings, "replay", "--since", "1h", "--json", "--source", "province-01",
                 "--entity", "citizen")  # fmt: skip

    summary = json.loads(result.stdout)
    by_source = sum(1 for e in citizen_events(30, 1, seed=4) if e["source"] == "province-01")
    assert summary["outcomes"]["unchanged"] == by_source
    # the other source's invalid event is skipped by the filter, not this replay's failure
    assert summary["outcomes"]["dead_lettered"] == 1
    assert summary["outcomes"]["skipped"] == summary["read"] - by_source - 1
    assert "not in the source registry" not in result.stderr

    # A misspelt source: a warning, and every outcome in the JSON, 0 included
    registered = settings.model_copy(update={"registry": registry_without_signatures(tmp_path)})
    typo = cli(registered, "replay", "--since", "1h", "--json", "--source", "province-1",
               "--rules-mismatch-ok")  # fmt: skip
    assert typo.returncode == 0, typo.stderr
    assert "--source province-1: not in the source registry (a typo?)" in typo.stderr
    outcomes = json.loads(typo.stdout)["outcomes"]
    assert outcomes["applied"] == outcomes["dead_lettered"] == outcomes["apply_failed"] == 0
    assert outcomes["skipped"] == summary["read"]


def _unregistered_province_79(
    settings_for: Any, store_url: str, tmp_path: Path, keys: int, seed: int
) -> tuple[Any, Path, list[dict[str, Any]], list[dict[str, Any]]]:
    """Settings whose registry names province-01 only, and citizen events of it and of
    province-79 applied: (settings, the registry, the events, province-79's: letters)."""
    registry = tmp_path / "registry.toml"
    registry.write_text('[sources.province-01]\nkind = "province"\nname = "Hà Nội"\n')
    settings = settings_for(store_url, registry=registry)
    events = [e for e in citizen_events(keys, 1, seed=seed) if e["source"] != "ministry-btp"]
    _published(settings, tmp_path, events)
    _caught_up(settings)
    return settings, registry, events, [e for e in events if e["source"] == "province-79"]


def _register_province_79(registry: Path) -> None:
    registry.write_text(registry.read_text() + '[sources.province-79]\nkind = "province"\n'
                        'name = "TP. Hồ Chí Minh"\n')  # fmt: skip


def test_unregistered_source_is_redriven_after_registration_once(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    settings, registry, events, late = _unregistered_province_79(
        settings_for, sqlite_store_url, tmp_path, 20, 5
    )
    only_late = {e["key"] for e in late} - {e["key"] for e in events if e not in late}
    assert late and only_late and not only_late & {r["key"] for r in exported(settings)}
    listed = cli(settings, "dlq", "list", "--reason", "unregistered_source")
    assert f"unregistered_source: {len(late)}" in listed.stdout

    # A purge of the source after its letters failed that removed nothing (the source
    # had no views yet): nothing of it can come back, the redrive applies them as any
    # other (test_letters_of_a_record_purged_after_they_failed_are_held_back: one that
    # removed something).
    purge = cli(settings, "source", "purge", "province-79", "--reason", "drill", "--yes")
    assert purge.returncode == 0, purge.stdout + purge.stderr
    _register_province_79(registry)
    for bad in ("x" * 129, "Trần\tĐức"):  # refused before anything is sent
        refused = cli(settings, "dlq", "redrive", "--reason", "unregistered_source",
                      "--operator", bad)  # fmt: skip
        assert refused.returncode == 1 and "--operator: printable text" in refused.stderr
    operator = unicodedata.normalize("NFD", "Trần Văn Đức")  # as a terminal may type it
    first = cli(settings, "dlq", "redrive", "--reason", "unregistered_source",
                "--operator", operator)  # fmt: skip
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"re-driven {len(late)}, already re-driven 0" in first.stdout, first.stdout
    assert "purged" not in first.stdout + first.stderr
    engine = create_engine(settings.store_url)
    with engine.connect() as conn:  # who re-drove each letter, recorded with it
        who = conn.execute(text("SELECT operator FROM dead_letter_redrives")).scalars().all()
    engine.dispose()
    assert who == ["Trần Văn Đức"] * len(late)
    ends = sum(end_offsets(settings).values())
    _caught_up(settings)
    assert exported(settings) == expected_export(events, Authority())

    second = cli(settings, "dlq", "redrive", "--reason", "unregistered_source")
    assert f"re-driven 0, already re-driven {len(late)}" in second.stdout, second.stdout
    assert "purged" not in second.stderr  # none sent
    assert sum(end_offsets(settings).values()) == ends
    # An ID the topic does not hold (mistyped) is no success.
    unknown = cli(settings, "dlq", "redrive", "0:999999")
    assert unknown.returncode == 1, unknown.stdout + unknown.stderr
    assert "not found or not selected: 0:999999" in unknown.stdout
    typo = cli(settings, "replay", "--topic", "portal-sync.changes.citizens", "--dry-run")
    assert typo.returncode == 1 and "not a change topic" in typo.stdout + typo.stderr


def test_letters_of_a_record_purged_after_they_failed_are_held_back(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """A source's letters fail; the source is registered, its events sent again and
    applied, then one of its records purged (wrong data). The redrive sent that record's
    letter, which brought the purged data back, and only warned. It now holds it back
    (exit 1) until told the record was sent again (--despite-purge); the other letters,
    whose records the purge left, go on as usual (here superseded: the store holds them)."""
    settings, registry, _, late = _unregistered_province_79(
        settings_for, sqlite_store_url, tmp_path, 12, 8
    )
    assert len(late) > 1
    _register_province_79(registry)
    _published(settings, tmp_path, late)
    _caught_up(settings)
    wrong = late[0]
    purge = cli(settings, "source", "purge", "province-79", "--entity", "citizen", "--key",
                wrong["key"], "--reason", "sai dữ liệu", "--yes")  # fmt: skip
    assert purge.returncode == 0, purge.stdout + purge.stderr

    held = cli(settings, "dlq", "redrive", "--reason", "unregistered_source")
    assert held.returncode == 1, held.stdout + held.stderr
    said = " ".join(held.stdout.split())
    assert "re-driven 0," in said and f"superseded (the store holds, or this run sent, that " \
        f"version or a newer one) {len(late) - 1}" in said, said  # fmt: skip
    assert "held back 1 of sources purged after they failed (province-79)" in said, said
    assert wrong["key"] not in held.stdout + held.stderr

    sent = cli(settings, "dlq", "redrive", "--reason", "unregistered_source", "--despite-purge")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "re-driven 1," in sent.stdout, sent.stdout
    said = " ".join(sent.stderr.split())
    assert "re-driven letters of sources purged after they failed: province-79 (citizen" in said


def test_dlq_show_hides_the_event_unless_revealed(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    settings = settings_for(sqlite_store_url, change_partitions=1)
    from tests.support.kafka_helpers import change_topic, ensure_topics, publisher_for

    ensure_topics(settings)
    publisher = publisher_for(settings)
    secret = b'{"schema_version": 1, "full_name": "Nguy\\u1ec5n Th\\u1ecb B\\u00edch"}'
    publisher.send(change_topic(settings, "citizen"), f"citizen:{PID}".encode(), secret)
    publisher.flush()
    publisher.close()
    _caught_up(settings)

    hidden = cli(settings, "dlq", "show", "0:0")
    unexplained = cli(settings, "dlq", "show", "0:0", "--reveal")
    revealed = cli(settings, "dlq", "show", "0:0", "--reveal", "--reason", "ticket 9",
                   "--operator", "eng-1")  # fmt: skip

    assert "missing_field" in hidden.stdout
    assert "full_name" not in hidden.stdout
    assert unexplained.returncode == 1 and "--reason" in unexplained.stderr
    assert "full_name" not in unexplained.stdout + unexplained.stderr
    assert revealed.returncode == 0, revealed.stderr
    assert "full_name" in revealed.stdout
    store = Store(settings.store_url)
    rows = store.access_entries()
    store.close()
    assert [(r["operator"], r["command"], r["entity"], r["reference"], r["reason"])
            for r in rows] == [
        ("eng-1", "dlq show --reveal", "citizen", f"dead letter 0:0: {key_reference(PID, None)}",
         "ticket 9"),
    ]  # fmt: skip

    # a store that cannot take the row (older than the access log): nothing is revealed
    old = f"sqlite:///{tmp_path / 'old.db'}"
    _store_at(old, "0004")
    refused = cli(settings, "dlq", "show", "0:0", "--reveal", "--reason", "ticket 9",
                  PORTAL_SYNC_STORE_URL=old)  # fmt: skip
    assert refused.returncode == 2 and "store upgrade" in refused.stderr
    assert "full_name" not in refused.stdout + refused.stderr


def test_replay_shows_values_only_with_a_reason_and_logs_the_records(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    settings = settings_for(sqlite_store_url)
    _published(settings, tmp_path, citizen_events(20, 1, seed=9))
    _caught_up(settings)
    store = Store(settings.store_url)
    with store.write_transaction() as conn:  # an incident: three records are lost
        lost = conn.execute(select(records.c.key).order_by(records.c.key).limit(3)).scalars().all()
        conn.execute(delete(records).where(records.c.key.in_(lost)))
        conn.execute(delete(source_views).where(source_views.c.key.in_(lost)))

    refused = cli(settings, "replay", "--since", "1h", "--json", "--show-values")
    assert refused.returncode == 1 and "--reason" in refused.stderr
    assert refused.stdout == "" and store.access_entries() == []

    shown = cli(settings, "replay", "--since", "1h", "--json", "--show-values", "--dry-run",
                "--reason", "incident 5")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    sample = json.loads(shown.stdout)["sample"]
    assert {item["key"] for item in sample} == set(lost)
    assert any(item["changes"].get("full_name") for item in sample)  # the values themselves
    rows = store.access_entries()
    assert sorted((r["command"], r["entity"], r["reference"], r["reason"]) for r in rows) == sorted(
        ("replay --show-values", "citizen", key_reference(key, None), "incident 5") for key in lost
    )

    plain = cli(settings, "replay", "--since", "1h", "--json")  # no values: no reason, no row
    assert plain.returncode == 0, plain.stderr
    assert len(store.access_entries()) == len(rows)
    store.close()


def _citizen(source: str, key: str, version: int, data: dict[str, Any] | None) -> dict[str, Any]:
    """One event of the contract; no data: a delete."""
    raw: dict[str, Any] = {
        "schema_version": 1,
        "event_id": str(derive_event_id(source, "citizen", key, version)),
        "source": source,
        "entity": "citizen",
        "key": key,
        "op": "upsert" if data is not None else "delete",
        "version": version,
        "occurred_at": f"2025-08-01T08:00:0{version}+07:00",
    }
    return raw if data is None else {**raw, "data": data}


def test_the_worker_forgets_deleted_records_past_their_retention(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    settings = settings_for(sqlite_store_url)
    gone, kept = "001090000001", "001090000002"
    _published(settings, tmp_path, [
        _citizen("province-01", gone, 1, {"full_name": "Trần Thị Bích"}),
        _citizen("province-79", gone, 1, {"phone": "0912345678"}),
        _citizen("province-01", kept, 1, {"full_name": "Lê Văn Tám"}),
        _citizen("province-01", gone, 2, None),
        _citizen("province-79", gone, 2, None),
    ])  # fmt: skip
    _caught_up(settings)
    store = Store(settings.store_url)
    long_ago = datetime.now(UTC) - timedelta(days=200)
    with store.write_transaction() as conn:  # every source deleted it 200 days ago
        conn.execute(
            update(source_views).where(source_views.c.key == gone).values(applied_at=long_ago)
        )
        noted = conn.execute(
            update(record_deletions)
            .where(record_deletions.c.key == gone)
            .values(deleted_at=long_ago)
        )
        assert noted.rowcount == 1  # the batch that deleted it noted it

    _published(settings, tmp_path, [_citizen("province-01", kept, 2, {"full_name": "Lê Văn"})])
    _caught_up(settings)  # a batch, then the retention job (PORTAL_SYNC_DELETED_RETENTION_DAYS)

    with store.engine.connect() as conn:
        views = conn.execute(select(source_views.c.key)).scalars().all()
        entries = conn.execute(
            select(record_history.c.key, record_history.c.changes, record_history.c.purged_at)
        ).all()
    store.close()
    assert views == [kept]
    assert all(key != gone for key, _, _ in entries)  # kept under another name alone
    secret = settings.reference_key()
    forgotten = [key for key, _, _ in entries if key != kept]
    assert set(forgotten) == {key_reference(gone, secret)} if secret else len(set(forgotten)) == 1
    purged = [(changes, at) for key, changes, at in entries if key != kept]
    assert len(purged) == 4 and all(at is not None for _, at in purged)
    assert all(value == [None, None] for changes, _ in purged for value in changes.values())
    assert [changes for key, changes, _ in entries if key == kept][-1] == {
        "full_name": ["Lê Văn Tám", "Lê Văn"]
    }


def test_replay_beside_the_live_worker_equals_a_clean_run(
    settings_for: Any, store_url: str, tmp_path: Path
) -> None:
    settings = settings_for(store_url)
    events = citizen_events(400, 3, seed=6)
    _published(settings, tmp_path, shuffled_with_duplicates(events, seed=7)[:3000])
    live = start_worker(settings)
    _published(settings, tmp_path, shuffled_with_duplicates(events, seed=7)[3000:])
    deadline = time.monotonic() + 120
    while not _applied_any(settings):  # the live worker has joined and applies
        assert live.poll() is None and time.monotonic() < deadline, (
            "the live worker applied nothing"
        )
        time.sleep(0.05)
    replayed = cli(settings, "replay", "--since", "1h", "--json")
    assert replayed.returncode == 0, replayed.stderr
    live.terminate()
    assert live.wait(timeout=60) == 0
    # The replay went through every event published, whatever the live worker had done.
    assert exported(settings) == expected_export(events, Authority())
    _caught_up(settings)

    assert exported(settings) == expected_export(events, Authority())


def _applied_any(settings: Any) -> bool:
    store = Store(settings.store_url)
    try:
        return sum(store.all_offsets().values()) > 0
    except Exception:  # no schema yet: the worker creates it at its start
        return False
    finally:
        store.close()


def test_offsets_reset_plans_refuses_active_groups_and_acts_with_yes(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    settings = settings_for(sqlite_store_url)
    _published(settings, tmp_path, citizen_events(30, 1, seed=8))
    _caught_up(settings)
    store = Store(settings.store_url)
    assert sum(store.all_offsets().values()) == sum(end_offsets(settings).values())

    live = start_worker(settings)
    try:
        from tests.support.kafka_helpers import wait_group_stable

        assert wait_group_stable(settings, settings.group_id)
        refused = cli(settings, "offsets", "reset", "--group", settings.group_id,
                      "--to-time", "1h", "--yes")  # fmt: skip
        assert refused.returncode == 1
        assert "active member" in refused.stdout
        # The plan can be read before the workers stop; it is only not carried out.
        preview = cli(settings, "offsets", "reset", "--group", settings.group_id,
                      "--to-time", "1h")  # fmt: skip
        said = " ".join(preview.stdout.split())
        assert preview.returncode == 0, said + preview.stderr
        assert "stop its workers before --yes" in said and "plan only" in said, said
        assert sum(store.all_offsets().values()) == sum(end_offsets(settings).values())
        # A member that joins after the command's check: the coordinator refuses the
        # commit partition by partition, and kafka-python raises nothing for it.
        with admin.cluster(settings.connection()) as kafka, pytest.raises(Refused) as moved:
            kafka.alter_group_offsets(settings.group_id, dict.fromkeys(store.all_offsets(), 0))
        assert f"group {settings.group_id}'s offsets not moved on " in str(moved.value)
        assert "Error" in str(moved.value)
    finally:
        live.terminate()
        live.wait(timeout=60)

    plan = cli(settings, "offsets", "reset", "--group", settings.group_id, "--to-time", "1h")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "plan only" in plan.stdout
    assert sum(store.all_offsets().values()) > 0
    done = cli(settings, "offsets", "reset", "--group", settings.group_id, "--to-time", "1h",
               "--yes")  # fmt: skip
    assert done.returncode == 0, done.stdout
    assert sum(store.all_offsets().values()) == 0  # back to the first offsets of the hour
    _caught_up(settings)  # re-applies everything: unchanged, the store is the same
    assert exported(settings) == expected_export(citizen_events(30, 1, seed=8), Authority())
    store.close()


def test_a_reset_of_another_group_is_recorded_and_leaves_the_stores_offsets(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """`offsets reset` records every reset (operator, time, from, to, reason), of any
    group: another group's was carried out in Kafka and recorded nowhere."""

    settings = settings_for(sqlite_store_url)
    _published(settings, tmp_path, citizen_events(30, 1, seed=9))
    _caught_up(settings)
    store = Store(settings.store_url)
    applied = store.all_offsets()
    other = f"{settings.group_id}-analytics"
    # A mistyped group was made by the reset, exit 0, and showed as a stalled consumer.
    typo = f"{settings.group_id}-analitics"
    refused = cli(settings, "offsets", "reset", "--group", typo, "--to-time", "1h", "--yes")
    said = " ".join((refused.stdout + refused.stderr).split())
    assert refused.returncode == 1 and f"group {typo} has no offsets" in said, said
    assert "--new-group" in said and store.offset_changes() == []
    commit_group_offsets(settings, other, applied)
    # A store it cannot reach: refused before Kafka is touched (Kafka moved, and the move
    # went unrecorded for good: a run again recorded "from 0 to 0").
    away = settings.model_copy(update={"store_url": f"sqlite:///{tmp_path}/away/store.db"})
    refused = cli(away, "offsets", "reset", "--group", other, "--to-time", "1h", "--yes")
    assert refused.returncode != 0, refused.stdout + refused.stderr
    with admin.cluster(settings.connection()) as c:
        assert c.group_offsets([other])[other] == applied
    done = cli(settings, "offsets", "reset", "--group", other, "--to-time", "1h", "--yes",
               "--reason", "analytics rebuilds its cache", "--operator", "an.nguyen")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert store.all_offsets() == applied  # the store's own offsets did not move
    changes = store.offset_changes()
    assert {(c["topic"], c["partition"]) for c in changes} >= set(applied)
    for change in changes:  # every partition of the plan, the ones it had none of too
        assert change["kind"] == "reset" and change["consumer_group"] == other
        assert change["from_offset"] == applied.get((change["topic"], change["partition"]))
        assert change["to_offset"] == 0 and change["operator"] == "an.nguyen"
        assert change["reason"] == "analytics rebuilds its cache"
    store.close()


def test_reading_back_before_a_source_purge_warns_that_it_undoes_the_purge(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    settings = settings_for(sqlite_store_url)
    _published(settings, tmp_path, citizen_events(30, 1, seed=8))
    _caught_up(settings)
    purged = cli(settings, "source", "purge", "province-01", "--entity", "citizen",
                 "--reason", "INC-1: wrong data", "--yes")  # fmt: skip
    assert purged.returncode == 0, purged.stdout + purged.stderr
    store = Store(settings.store_url)

    def views_of_the_purged_source() -> int:
        with store.engine.connect() as conn:
            query = select(func.count()).where(source_views.c.source == "province-01")
            return int(conn.execute(query.select_from(source_views)).scalar_one())

    assert views_of_the_purged_source() == 0
    after = datetime.now(UTC).isoformat()
    time.sleep(0.01)
    _published(settings, tmp_path, citizen_events(5, 1, seed=9))  # after the purge
    _caught_up(settings)
    for args in (("offsets", "reset", "--group", settings.group_id, "--to-time", after),
                 ("replay", "--since", after, "--dry-run")):  # fmt: skip
        # back over the events after the purge only, with clocks that agree
        quiet = cli(settings, *args, PORTAL_SYNC_MAX_CLOCK_SKEW_SECONDS="0")
        assert quiet.returncode == 0, quiet.stdout + quiet.stderr
        assert "source purges" not in quiet.stdout + quiet.stderr
        assert "plan only" in quiet.stdout or "replay" in args
    # An event's time is its host's clock: one within the skew after the purge's start
    # may be from before it.
    skewed = cli(settings, "offsets", "reset", "--group", settings.group_id, "--to-time", after)
    assert "source purges after the target: province-01" in " ".join(skewed.stdout.split())
    skewed = cli(settings, "replay", "--since", after, "--dry-run")
    assert "source purges after the target: province-01" in " ".join(skewed.stderr.split())
    replay = cli(settings, "replay", "--since", "1h", "--dry-run", "--json")
    assert replay.returncode == 0, replay.stderr
    json.loads(replay.stdout)  # the warning stays off the JSON summary
    plan = cli(settings, "offsets", "reset", "--group", settings.group_id, "--to-time", "1h")
    for said in (" ".join(replay.stderr.split()), " ".join(plan.stdout.split())):
        assert "source purges after the target: province-01 (citizen," in said
        assert "purge again only what came back" in said

    # A rebuild starts from an empty store: the purged source's events are applied again.
    (tmp_path / "rebuilt-url").write_text(f"sqlite:///{tmp_path / 'rebuilt.db'}\n")
    rebuilt = cli(settings, "rebuild", "--store-file", str(tmp_path / "rebuilt-url"), "--compare")
    said = " ".join(rebuilt.stderr.split())
    assert "the live store records source purges: province-01 (citizen," in said, said
    assert rebuilt.returncode == 1 and "only_rebuilt: 0" not in rebuilt.stdout, rebuilt.stdout

    done = cli(settings, "offsets", "reset", "--group", settings.group_id, "--to-time", "1h",
               "--yes")  # fmt: skip
    assert done.returncode == 0, done.stdout
    _caught_up(settings)
    assert views_of_the_purged_source() > 0  # what the warning said: the purge is undone
    store.close()


def test_rebuild_builds_an_equal_store_from_the_topics(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    settings = settings_for(sqlite_store_url)
    events = shuffled_with_duplicates(citizen_events(50, 2, seed=9))
    _published(settings, tmp_path, events)
    _caught_up(settings)

    rebuilt = f"sqlite:///{tmp_path / 'rebuilt.db'}"
    (tmp_path / "rebuilt-url").write_text(rebuilt + "\n")  # a URL with a password: not in `ps`
    result = cli(settings, "rebuild", "--store-file", str(tmp_path / "rebuilt-url"), "--compare",
                 "--reason", "restore drill", "--operator", "Lê Thị Hoa")  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert "different: 0" in result.stdout and "only_live: 0" in result.stdout
    # the copy of every record is in the live store's access log
    (entry,) = Store(settings.store_url).access_entries()
    assert (entry["operator"], entry["command"], entry["reason"]) == (
        "Lê Thị Hoa", "rebuild", "restore drill")  # fmt: skip
    assert entry["reference"] == f"all records to {rebuilt}"
    copy = settings.model_copy(update={"store_url": rebuilt})
    assert exported(settings) == expected_export(events, Authority())
    assert exported(copy) == exported(settings)
    assert Store(rebuilt).all_offsets() == Store(settings.store_url).all_offsets()


def test_a_long_rebuild_checks_each_batch_in_validator_processes_while_one_is_applied(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebuild checked every batch in its own process before applying it, at about half
    the worker's rate. A long one now checks them as the worker does, the next batch while
    one is applied, and keeps the records it applied: the same store, offsets included."""
    from consumers.validators import Validators
    from portal_sync.ops import replay as replaying
    from transport.reader import Selection

    settings = settings_for(sqlite_store_url)
    events = shuffled_with_duplicates(citizen_events(60, 2, seed=19))
    _published(settings, tmp_path, events)
    _caught_up(settings)
    live = Store(settings.store_url)
    checked: list[int] = []
    in_children = Validators.classify

    def counted(self: Validators, messages: Any, now: Any = None) -> Any:
        checked.append(len(messages))
        return in_children(self, messages, now)

    monkeypatch.setattr(Validators, "classify", counted)
    monkeypatch.setattr(replaying, "CHECKED_APART_FROM", 0)  # as a range past 20,000 is
    rebuilt = f"sqlite:///{tmp_path / 'rebuilt.db'}"
    target = Store(rebuilt)
    target.create_schema()
    copy = settings.model_copy(
        update={"store_url": rebuilt, "validator_processes": 1, "batch_max_events": 16}
    )
    selection = Selection(settings.topics().change_topics())
    summary = replaying.replay(copy, selection, target, track_offsets=True,
                               until=replaying.rebuild_until(live))  # fmt: skip
    assert summary.read == len(events) and sum(checked) == len(events) and len(checked) > 4
    assert exported(copy) == exported(settings) == expected_export(events, Authority())
    assert target.all_offsets() == live.all_offsets()


def test_a_rebuild_stops_at_the_live_stores_offsets_so_what_follows_is_dead_lettered(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """The live worker is behind (down, in a disaster recovery) when the store is rebuilt,
    and an invalid message follows its offset. A rebuild counts invalid messages without
    dead letters (the live worker sent them): one that read past the live store's offset
    left the rebuilt store's offsets past a message that was nowhere, neither applied nor
    in the dead-letter topic, once the rebuilt store took over."""
    from tests.integration.kafka.test_pipeline_kafka import _read_all
    from tests.support.kafka_helpers import dead_letter_topic, publisher_for

    settings = settings_for(sqlite_store_url, change_partitions=1)
    events = citizen_events(16, 1, seed=48)
    _published(settings, tmp_path, events[:10])
    _caught_up(settings)
    topic = settings.topics().change_topic("citizen")
    publisher = publisher_for(settings)
    publisher.send(topic, b"citizen:1", b"not json", [])  # offset 10: the worker is down
    publisher.flush()
    publisher.close()
    _published(settings, tmp_path, events[10:])

    rebuilt = f"sqlite:///{tmp_path / 'rebuilt.db'}"
    (tmp_path / "rebuilt-url").write_text(rebuilt + "\n")
    result = cli(settings, "rebuild", "--store-file", str(tmp_path / "rebuilt-url"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "from 10 events" in result.stdout, result.stdout
    assert Store(rebuilt).all_offsets() == {(topic, 0): 10}

    takeover = settings.model_copy(update={"store_url": rebuilt})  # the rebuilt store's turn
    _caught_up(takeover)
    assert Store(rebuilt).all_offsets() == {(topic, 0): len(events) + 1}
    assert exported(takeover) == expected_export(events, Authority())
    (letter,) = _read_all(settings, dead_letter_topic(settings), 1)
    origin = {name: value for name, value in letter.headers}
    assert (origin["ps.origin.offset"], origin["ps.reason.code"]) == (b"10", b"invalid_json")


def test_a_rebuild_says_how_many_events_it_refused_and_why(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """A rebuild printed only "rebuilt N records": events the rules refuse (the live
    worker's dead letters, or events a rule tightened since refuses now) leave out the
    records only they held, and nothing said so unless `--compare` was asked."""
    from tests.support.kafka_helpers import publisher_for

    settings = settings_for(sqlite_store_url, change_partitions=1)
    events = citizen_events(8, 1, seed=49)
    _published(settings, tmp_path, events)
    topic = settings.topics().change_topic("citizen")
    publisher = publisher_for(settings)
    publisher.send(topic, b"citizen:1", b"not json", [])
    publisher.flush()
    publisher.close()
    _caught_up(settings)

    replayed = cli(settings, "replay", "--since", "1h", "--json")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert json.loads(replayed.stdout)["invalid"] == {"invalid_json": 1}
    rebuilt = f"sqlite:///{tmp_path / 'rebuilt.db'}"
    (tmp_path / "rebuilt-url").write_text(rebuilt + "\n")
    result = cli(settings, "rebuild", "--store-file", str(tmp_path / "rebuilt-url"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 events refused (invalid_json 1)" in " ".join(result.stderr.split())


def test_replay_and_rebuild_pass_over_events_the_store_refuses(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """Contract-valid events the store refuses (here a trigger refuses their keys, in the
    live store and in the new one): the worker dead-letters them as `apply_failed`; a replay
    and a rebuild find them the same way (halving the batch) and go on past them, instead
    of stopping at them every time."""
    settings = settings_for(sqlite_store_url, change_partitions=1)
    events = citizen_events(40, 1, seed=44)
    refused = []
    for n in range(2):
        key = f"00109009{n:04d}"
        refused.append(key)
        poison = events[0] | {"key": key,
                              "event_id": str(derive_event_id(events[0]["source"], "citizen",
                                                              key, 1))}  # fmt: skip
        events.insert(10 + 20 * n, poison)
    refuse_views_of(sqlite_store_url, refused)
    _published(settings, tmp_path, events)
    _caught_up(settings)
    live = Store(settings.store_url)
    assert sum(live.all_offsets().values()) == len(events)

    replayed = cli(settings, "replay", "--since", "1h", "--json")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    outcomes = json.loads(replayed.stdout)["outcomes"]
    assert outcomes["apply_failed"] == 2 and outcomes["unchanged"] == len(events) - 2, outcomes

    rebuilt = f"sqlite:///{tmp_path / 'rebuilt.db'}"
    refuse_views_of(rebuilt, refused)
    (tmp_path / "rebuilt-url").write_text(rebuilt + "\n")
    result = cli(settings, "rebuild", "--store-file", str(tmp_path / "rebuilt-url"), "--compare")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "different: 0" in result.stdout and "only_live: 0" in result.stdout
    said = " ".join(result.stderr.split())
    assert "2 events the store refused alone were passed over" in said, said
    assert Store(rebuilt).all_offsets() == live.all_offsets()


def _twenty_applied_then_deleted(
    settings: Any, tmp_path: Path, events: list[dict[str, Any]]
) -> tuple[str, Store, str]:
    """The citizen topic, after its first 20 events were applied and it was deleted; the
    store; the deleted topic's id."""
    from transport import admin

    _published(settings, tmp_path, events[:20])
    _caught_up(settings)
    topic = settings.topics().change_topic("citizen")
    store = Store(settings.store_url)
    assert store.all_offsets() == {(topic, 0): 20}
    with admin.cluster(settings.connection()) as cluster:
        first_id = cluster.topic_ids([topic])[topic]
        cluster.delete_topics([topic])
    return topic, store, first_id


def test_a_change_topic_created_again_behind_the_store_stops_the_worker_until_reset(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """The store has applied 20 events of a topic that is then deleted and created again
    (or a cluster restored from an older state): the log ends below the store's offset.
    The worker refuses to start there, instead of taking the new events below that offset
    as applied already; once the store's offsets are moved back, it applies them."""
    settings = settings_for(sqlite_store_url, change_partitions=1)
    events = citizen_events(25, 1, seed=47)
    topic, store, _ = _twenty_applied_then_deleted(settings, tmp_path, events)
    _published(settings, tmp_path, events[20:25])  # `publish` creates the topic again

    past = f"past the end of {topic}:0 (the store at 20, the log's end at 5)"
    stopped = cli(settings, "worker", "--until-caught-up", timeout=120)
    assert stopped.returncode != 0, stopped.stdout + stopped.stderr
    assert past in " ".join(stopped.stderr.split())
    live = start_worker(settings)  # a worker that runs on: refused when the group assigns,
    output, _ = live.communicate(timeout=120)  # by the topic's id (checked first)
    refused = f"earlier topic of the same name: {topic} "
    assert live.returncode != 0 and refused in " ".join(output.split()), output
    assert store.all_offsets() == {(topic, 0): 20}

    # A target past the new log's events skips them all, though the store is "ahead".
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    skipping = cli(settings, "offsets", "reset", "--group", settings.group_id, "--topic", topic,
                   "--to-time", later, "--yes", "--reason", "topic created again")  # fmt: skip
    assert skipping.returncode == 1 and "skip 5 events" in skipping.stdout + skipping.stderr
    reset = cli(settings, "offsets", "reset", "--group", settings.group_id, "--topic", topic,
                "--to-time", "1h", "--yes", "--reason", "topic created again")  # fmt: skip
    assert reset.returncode == 0, reset.stdout + reset.stderr
    _caught_up(settings)
    assert store.all_offsets() == {(topic, 0): 5}  # the other topics untouched
    assert exported(settings) == expected_export(events[:25], Authority())
    store.close()


def test_a_change_topic_created_again_past_the_store_stops_the_worker_by_its_id(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """As above, but the new log is already longer than the store's offset (20): its end
    looks right, and the worker would take the new events below 20 as applied. The topic's
    id (recorded at the first assignment) tells the two logs apart; the reset records the
    new one, and every event of the new log is applied."""
    from transport import admin

    settings = settings_for(sqlite_store_url, change_partitions=1)
    events = citizen_events(45, 1, seed=48)
    topic, store, first_id = _twenty_applied_then_deleted(settings, tmp_path, events)
    assert store.topic_ids()[topic] == first_id
    _published(settings, tmp_path, events[20:45])  # the new log: 25 events
    with admin.cluster(settings.connection()) as cluster:
        second_id = cluster.topic_ids([topic])[topic]
    assert second_id != first_id
    assert store.all_offsets() == {(topic, 0): 20}

    refused = f"earlier topic of the same name: {topic} "
    stopped = cli(settings, "worker", "--until-caught-up", timeout=120)
    assert stopped.returncode != 0, stopped.stdout + stopped.stderr
    assert refused in " ".join(stopped.stderr.split()), stopped.stderr
    # Not one batch: one fetched from the new log's start while the assignment was being
    # checked (aiokafka fetches meanwhile) took its events below 20 as applied.
    assert store.all_offsets() == {(topic, 0): 20}
    assert store.topic_ids()[topic] == first_id
    # The lag: the whole new log, and STOP (read against its end, the store's 20 made it 5).
    reader = LagReader(settings.connection(), settings.topics(), settings.group_id,
                       settings.store_url, filters=Filters(topic=re.escape(topic)))  # fmt: skip
    try:
        own = {g.group: g for g in reader.read()}[settings.group_id]
        assert [(p.committed, p.end, p.status) for p in own.partitions] == [(0, 25, Status.STOP)]
        assert reader.moved == {topic}
        # The store unreadable: Kafka's copy stands in, and no STOP of the store's is kept.
        reader._store = Store("postgresql+psycopg://u:p@127.0.0.1:1/db?connect_timeout=2")
        reader.read()
        assert reader.moved == set()
    finally:
        reader.close()

    # The plan counts the new log from its start: the store's 20 are of the earlier one.
    later = (datetime.now(UTC) + timedelta(days=1)).isoformat(timespec="seconds")
    skips = cli(settings, "offsets", "reset", "--group", settings.group_id, "--topic", topic,
                "--to-time", later, "--yes", "--reason", "past the end", COLUMNS="400")  # fmt: skip
    assert skips.returncode != 0, skips.stdout + skips.stderr
    assert "this reset skips 25 events" in " ".join(skips.stdout.split()), skips.stdout
    assert "20 (an earlier topic)" in skips.stdout
    assert store.all_offsets() == {(topic, 0): 20}

    reset = cli(settings, "offsets", "reset", "--group", settings.group_id, "--topic", topic,
                "--to-time", "1h", "--yes", "--reason", "topic created again")  # fmt: skip
    assert reset.returncode == 0, reset.stdout + reset.stderr
    assert store.topic_ids()[topic] == second_id
    _caught_up(settings)
    assert store.all_offsets() == {(topic, 0): 25}
    assert exported(settings) == expected_export(events[:45], Authority())
    assert _own_lag(settings, topic) == [(0, 25, 25, Status.OK)]
    store.close()


def _own_lag(settings: Any, topic: str) -> list[tuple[int, int, int, Status]]:
    """The reconciler group's partitions of the topic as the lag exporter reads them:
    (partition, committed, end, status)."""
    reader = LagReader(settings.connection(), settings.topics(), settings.group_id,
                       settings.store_url, filters=Filters(topic=re.escape(topic)))  # fmt: skip
    try:
        own = {g.group: g for g in reader.read()}[settings.group_id]
    finally:
        reader.close()
    return [(p.partition, p.committed, p.end, p.status) for p in own.partitions]


def test_a_running_worker_checks_its_topics_ids_between_rebalances(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """No rebalance comes when the store and the cluster part ways under a running worker
    (here: the store's recorded id of its topic is another cluster's, as after a store
    restored beside a rebuilt cluster). The check every `PORTAL_SYNC_TOPIC_CHECK_SECONDS`
    stops the worker."""
    import uuid

    settings = settings_for(sqlite_store_url, change_partitions=1)
    _published(settings, tmp_path, citizen_events(20, 1, seed=49))
    topic = settings.topics().change_topic("citizen")
    end = end_offsets(settings)[(topic, 0)]
    store = Store(settings.store_url)
    store.create_schema()
    live = start_worker(settings, PORTAL_SYNC_TOPIC_CHECK_SECONDS="1")
    try:
        deadline = time.monotonic() + 120
        while store.all_offsets().get((topic, 0)) != end and live.poll() is None:
            assert time.monotonic() < deadline, "the worker did not apply the events"
            time.sleep(0.1)
        assert live.poll() is None
        assert topic in store.topic_ids()
        with store.engine.begin() as conn:  # what a store restored elsewhere would hold
            conn.execute(
                update(topic_ids)
                .where(topic_ids.c.topic == topic)
                .values(topic_id=str(uuid.uuid4()))
            )
        output, _ = live.communicate(timeout=60)
    finally:
        if live.poll() is None:
            live.kill()
            live.communicate()
    refused = f"earlier topic of the same name: {topic} "
    assert live.returncode != 0 and refused in " ".join(output.split()), output
    assert store.all_offsets() == {(topic, 0): end}
    store.close()


def test_a_letter_the_store_has_since_superseded_is_not_redriven(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """A source's first versions are refused (not registered yet); once registered, its
    next versions are applied. Re-driving the old letters would make them the last events
    of their compaction keys, and the log cleaner would then remove the newer versions the
    store holds: they are counted as superseded and not sent."""
    registry = tmp_path / "registry.toml"
    registry.write_text('[sources.province-01]\nkind = "province"\nname = "Hà Nội"\n')
    settings = settings_for(sqlite_store_url, registry=registry)
    events = [e for e in citizen_events(10, 2, seed=6) if e["source"] == "province-79"]
    first = [e for e in events if e["version"] == 1]
    _published(settings, tmp_path, first)
    _caught_up(settings)
    _register_province_79(registry)
    _published(settings, tmp_path, [e for e in events if e["version"] == 2])
    _caught_up(settings)
    ends = end_offsets(settings)

    redrive = cli(settings, "dlq", "redrive", "--reason", "unregistered_source")
    assert redrive.returncode == 0, redrive.stdout + redrive.stderr
    said = " ".join(redrive.stdout.split())
    assert "re-driven 0," in said, said
    assert f"the store holds, or this run sent, that version or a newer one) {len(first)}" in said
    assert end_offsets(settings) == ends
    assert exported(settings) == expected_export(events, Authority())


def test_a_redrive_never_sends_a_key_s_older_version_last(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """Letters of one key sent out of order (v2, then v1) are re-driven newest only: the
    older, sent after it, would be the key's last message, which the log cleaner keeps. And
    while the worker has not applied a letter's partition up to the log's end (a newer
    event of its key may wait there), the letter is held back: exit 1, nothing sent."""
    registry = tmp_path / "registry.toml"
    registry.write_text('[sources.province-01]\nkind = "province"\nname = "Hà Nội"\n')
    settings = settings_for(sqlite_store_url, registry=registry)
    events = [e for e in citizen_events(10, 3, seed=8) if e["source"] == "province-79"]
    by_version = {v: [e for e in events if e["version"] == v] for v in (1, 2, 3)}
    _published(settings, tmp_path, by_version[2])
    _published(settings, tmp_path, by_version[1])  # late, as after a producer's restart
    _caught_up(settings)
    keys = len(by_version[2])
    listed = cli(settings, "dlq", "list", "--reason", "unregistered_source")
    assert f"unregistered_source: {2 * keys}" in listed.stdout, listed.stdout
    _register_province_79(registry)

    ends = sum(end_offsets(settings).values())
    redrive = cli(settings, "dlq", "redrive", "--reason", "unregistered_source")
    assert redrive.returncode == 0, redrive.stdout + redrive.stderr
    said = " ".join(redrive.stdout.split())
    assert f"re-driven {keys}," in said and f"newer one) {keys}" in said, said
    assert sum(end_offsets(settings).values()) == ends + keys  # the v2 letters alone
    _caught_up(settings)
    assert exported(settings) == expected_export(by_version[2], Authority())

    # Another source's first versions refused (not registered yet), then, once it is,
    # its next ones published while no worker runs: its letters are held back.
    late = [e | {"source": "province-48"} for e in by_version[1]]
    _published(settings, tmp_path, late)
    _caught_up(settings)
    registry.write_text(registry.read_text() + '[sources.province-48]\nkind = "province"\n'
                        'name = "Đà Nẵng"\n')  # fmt: skip
    newer = [e | {"source": "province-48"} for e in by_version[3]]
    _published(settings, tmp_path, newer)  # not applied yet: no worker runs
    ends = sum(end_offsets(settings).values())
    held = cli(settings, "dlq", "redrive", "--reason", "unregistered_source", "--wait", "3")
    said = " ".join(held.stdout.split())
    assert held.returncode == 1, said + held.stderr
    assert f"already re-driven {2 * keys}," in said, said  # province-79's, recorded
    assert f"held back {keys}: the worker has not applied" in said, said
    assert sum(end_offsets(settings).values()) == ends
    _caught_up(settings)
    again = cli(settings, "dlq", "redrive", "--reason", "unregistered_source")
    said = " ".join(again.stdout.split())
    assert again.returncode == 0 and "re-driven 0," in said and f"newer one) {keys}" in said, said
    assert exported(settings) == expected_export(by_version[2] + newer, Authority())


def test_a_redrive_holds_back_a_letter_whose_partition_an_open_transaction_holds(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """A transaction still open holds back the worker on its partition, and whatever comes
    after it there (a newer event of the letter's key may): the letter waits. Its check
    read committed records only up to the open transaction, found nothing, and sent it."""
    from kafka import KafkaProducer

    from tests.support.kafka_helpers import change_topic

    registry = tmp_path / "registry.toml"
    registry.write_text('[sources.province-01]\nkind = "province"\nname = "Hà Nội"\n')
    settings = settings_for(sqlite_store_url, registry=registry, change_partitions=1)
    event = citizen_events(1, 1, seed=11)[0] | {"source": "province-79", "op": "upsert"}
    event["data"] = event.get("data") or {"full_name": "Trần Thị Bình"}
    _published(settings, tmp_path, [event])
    _caught_up(settings)
    _register_province_79(registry)
    topic = change_topic(settings, "citizen")
    writer = KafkaProducer(
        bootstrap_servers=settings.connection().bootstrap, transactional_id=f"{topic}-open"
    )
    writer.init_transactions()
    writer.begin_transaction()
    writer.send(topic, key=b"citizen:001090000009:province-01", value=b"{}", partition=0)
    writer.flush()
    try:
        held = cli(settings, "dlq", "redrive", "--reason", "unregistered_source", "--wait", "3")
        said = " ".join(held.stdout.split())
        assert held.returncode == 1, said + held.stderr
        assert "held back 1: the worker has not applied" in said, said
    finally:
        writer.abort_transaction()
        writer.close()
    _caught_up(settings)
    # The log ends in the abort's marker, the store one before it: asked once the store's
    # offset stays put, not after the whole --wait (it took the default 30 s).
    sent = cli(settings, "dlq", "redrive", "--reason", "unregistered_source", "--wait", "600",
               timeout=120)  # fmt: skip
    assert sent.returncode == 0 and "re-driven 1," in " ".join(sent.stdout.split()), sent.stdout


def test_a_replay_refuses_what_the_live_worker_refused_for_a_producer_clock_ahead(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """A producer whose clock runs an hour ahead stamps its message an hour ahead, and its
    event 15 s ahead of the worker. Live, a message time past now is cut to now, and the
    event is `future_timestamp`. A replay 20 s later took the message time as now + 20 s
    and applied it. The change topics take the broker's time of the append
    (LogAppendTime): one verdict on every read."""
    from schemas import message_key, partition_for
    from transport import clients
    from transport.admin import ensure_topics

    settings = settings_for(sqlite_store_url, change_partitions=1)
    ensure_topics(settings.connection(), settings.topics())
    now = datetime.now(UTC)
    event = citizen_events(1, 1, seed=50)[0]
    event |= {"op": "upsert", "occurred_at": (now + timedelta(seconds=15)).isoformat()}
    event["data"] = event.get("data") or {"full_name": "Nguyễn Văn An"}
    key = message_key("citizen", event["key"], event["source"])
    producer = clients.producer(settings.connection(), "clock-ahead")
    try:
        producer.send(
            settings.topics().change_topic("citizen"),
            key=key,
            value=json.dumps(event, ensure_ascii=False).encode(),
            partition=partition_for(key, 1),
            timestamp_ms=int((now + timedelta(hours=1)).timestamp() * 1000),
        ).get(timeout=30)
    finally:
        producer.close()
    skew = {"PORTAL_SYNC_MAX_CLOCK_SKEW_SECONDS": "5"}
    live = cli(settings, "worker", "--until-caught-up", **skew)
    assert live.returncode == 0, live.stdout + live.stderr
    store = Store(settings.store_url)
    assert _counts(store)[0] == 0  # refused: the dead-letter topic has it
    time.sleep(max(0.0, (now + timedelta(seconds=21) - datetime.now(UTC)).total_seconds()))
    again = cli(settings, "replay", "--since", "1h", "--json", **skew)
    assert again.returncode == 0, again.stdout + again.stderr
    outcomes = json.loads(again.stdout)["outcomes"]
    assert outcomes.get("applied", 0) == 0 and outcomes["dead_lettered"] == 1, outcomes
    assert _counts(store)[0] == 0
    store.close()


def test_offsets_reset_of_a_topic_the_cluster_does_not_have_is_refused(
    settings_for: Any, sqlite_store_url: str
) -> None:
    """A plan of no partition: with `--yes`, its record failed in the store, shown as
    `apply_failed`."""
    settings = settings_for(sqlite_store_url)
    topic = settings.topics().change_topic("citizen")  # never created
    result = cli(settings, "offsets", "reset", "--group", "another-group", "--topic", topic,
                 "--to-time", "1h", "--yes", "--reason", "a topic not there")  # fmt: skip
    said = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0, said
    assert "no partition to reset" in said and "apply_failed" not in said, said


def test_a_misspelt_selection_is_refused_or_warned_of_not_an_empty_success(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """A typo read nothing and exited 0: `replay --entity person`, a partition the topics
    lack, an empty range; `dlq list --reason unregisterd_source`; a letter named by its
    ID that cannot go back."""
    settings = settings_for(sqlite_store_url)  # 3 partitions
    _published(settings, tmp_path, citizen_events(4, 1, seed=3))
    refusals = [
        (("--entity", "person"), "--entity person: not one of"),
        (("--partition", "3"), "--partition 3: the change topics have partitions 0 to 2"),
        (("--from-offset", "2", "--to-offset", "1"), "--from-offset must be below"),
        (("--since", "1m", "--until", "1h"), "--since must be before --until"),
        # both bounds of one end: the offset won, and the time was not a limit at all
        (("--since", "1h", "--from-offset", "0"), "--since and --from-offset both set"),
        (("--until", "1m", "--to-offset", "5"), "--until and --to-offset both set"),
        (
            ("--entity", "organization", "--topic", settings.topics().change_topic("citizen")),
            "--entity organization: its topic",
        ),
    ]
    for args, said in refusals:
        refused = cli(settings, "replay", "--dry-run", *args)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert said in " ".join((refused.stdout + refused.stderr).split())
    for verb in ("list", "redrive"):
        odd = cli(settings, "dlq", verb, "--reason", "unregisterd_source")
        said = " ".join(odd.stderr.split())
        assert "--reason unregisterd_source: none of the pipeline's reason codes" in said, said
    quiet = cli(settings, "dlq", "list", "--reason", "unregistered_source")
    assert quiet.returncode == 0 and "reason codes" not in quiet.stderr


def test_dlq_list_and_replay_refuse_a_topic_they_do_not_see(
    settings_for: Any, sqlite_store_url: str
) -> None:
    """Under a mistyped topic prefix (or a principal the ACLs do not let describe the
    topic) `dlq list` said "dead letters (0)" and exited 0, and `replay` applied nothing:
    both are refused now, naming the topic."""
    settings = settings_for(sqlite_store_url)  # its topics never created
    listed = cli(settings, "dlq", "list")
    assert listed.returncode == 1, listed.stdout
    assert f"sees no topic {settings.topics().dead_letters}" in listed.stderr
    assert "dead letters (0)" not in listed.stdout
    store = Store(settings.store_url)
    store.create_schema()
    store.close()
    replayed = cli(settings, "replay", "--entity", "citizen", "--dry-run")
    assert replayed.returncode == 1, replayed.stdout
    assert "sees no topic" in replayed.stderr


def test_a_mistyped_store_or_a_rebuild_onto_the_live_store_is_refused_as_such(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """`offsets reset`, `offsets skip` and `rebuild` on a mistyped SQLite path made an
    empty file there and failed with "the store failed: OperationalError", exit 1; and a
    rebuild given the live store as its target advised dropping it."""
    settings = settings_for(sqlite_store_url)
    _published(settings, tmp_path, citizen_events(4, 1, seed=5))
    _caught_up(settings)
    typo = tmp_path / "typo" / "stor.db"
    mistyped = settings.model_copy(update={"store_url": f"sqlite:///{typo}"})
    topic = settings.topics().change_topic("citizen")
    (tmp_path / "rebuilt-url").write_text(f"sqlite:///{tmp_path / 'rebuilt.db'}\n")
    for args in (
        ("offsets", "reset", "--group", settings.group_id, "--to-time", "1h"),
        ("offsets", "skip", "--topic", topic, "--partition", "0", "--offset", "0",
         "--reason", "drill"),
        ("rebuild", "--store-file", str(tmp_path / "rebuilt-url")),
    ):  # fmt: skip
        result = cli(mistyped, *args)
        said = " ".join((result.stdout + result.stderr).split())
        assert result.returncode == 2 and "holds no portal-sync schema" in said, (args, said)
        assert not typo.exists()
    onto = cli(settings, "rebuild", "--store", f"sqlite:///{tmp_path}/./store.db")  # the live
    said = " ".join((onto.stdout + onto.stderr).split())
    assert onto.returncode == 1 and "--store names the live store" in said, said
    assert "drop that database" not in said
