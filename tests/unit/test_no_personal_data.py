"""No personal data in reasons or logs: reasons name the rule and the
field's path in the contract, never a value nor a name that came from the data; every
engine hides statement parameters; the Kafka clients never log records.
(The worker over the hostile corpus: tests/integration/kafka/test_no_personal_data_leaks.py.)"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from schemas import InvalidEvent, parse_event
from store.engine import create_store_engine
from tests.support.hostile import SECRETS, hostile_corpus, needles

ROOT = Path(__file__).resolve().parents[2]
PERSONAL_ID = "079185123456"
UNKNOWN_FIELD = "<unknown field>"  # stands for a field name that came from the data
NAME = "Trần Thị B"
EVENT: dict[str, Any] = {
    "schema_version": 1,
    "event_id": "0b8b2e0e-4c38-4c43-9d46-3b8a1f6c2a11",
    "source": "province-01",
    "entity": "citizen",
    "key": "001090012345",
    "op": "upsert",
    "version": 7,
    "occurred_at": "2024-01-15T10:00:00+07:00",
    "data": {"full_name": "Nguyễn Văn An"},
}


def reject(event: Any) -> InvalidEvent:
    raw = event if isinstance(event, bytes) else json.dumps(event, ensure_ascii=False).encode()
    with pytest.raises(InvalidEvent) as caught:
        parse_event(raw)
    return caught.value


def test_an_unknown_field_named_by_a_personal_id_and_a_name_is_not_echoed() -> None:
    error = reject(EVENT | {f"{PERSONAL_ID} {NAME}": 1})
    assert error.code == "unknown_field"
    assert error.message == f"{UNKNOWN_FIELD}: Extra inputs are not permitted"
    assert PERSONAL_ID not in str(error) and NAME not in str(error)


ADDRESS = f"data.permanent_address.{UNKNOWN_FIELD}"


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({PERSONAL_ID: NAME}, f"data.{UNKNOWN_FIELD}"),
        ({"permanent_address": {f"{NAME} {PERSONAL_ID}": 1}}, ADDRESS),
        ({"a": {PERSONAL_ID: {NAME: 1}}}, f"data.{UNKNOWN_FIELD}"),
        ({"full_name": {NAME: PERSONAL_ID}}, "data.full_name"),
        ({"permanent_address": NAME}, "data.permanent_address"),
    ],
)
def test_a_location_is_a_path_of_the_contract(data: dict[str, Any], path: str) -> None:
    error = reject(EVENT | {"data": data})
    assert error.message.split(": ", 1)[0] == path
    assert PERSONAL_ID not in error.message and NAME not in error.message


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("event_id", PERSONAL_ID, "event_id: Input should be a valid UUID"),
        ("event_id", f"n{PERSONAL_ID}", "event_id: Input should be a valid UUID"),
        ("occurred_at", NAME, "occurred_at: Input should be an RFC 3339 date-time with an offset"),
    ],
)
def test_parsing_details_that_quote_the_input_are_dropped(
    field: str, value: str, message: str
) -> None:
    assert reject(EVENT | {field: value}).message == message


def test_a_date_of_birth_made_of_a_personal_id_names_the_rule_only() -> None:
    error = reject(EVENT | {"data": {"date_of_birth": PERSONAL_ID}})
    assert error.message == (
        "data.date_of_birth: Input should be a valid date in the format YYYY-MM-DD"
    )


def test_no_reason_of_the_hostile_corpus_carries_its_personal_data() -> None:
    found = 0
    for message in hostile_corpus():
        try:
            parse_event(message.value)
        except InvalidEvent as error:
            found += 1
            leaked = [n for n in needles(SECRETS) if n in str(error)]
            assert leaked == [], (message.label, str(error))
    assert found >= 60


def test_the_contract_validators_raise_fixed_texts_only() -> None:
    """Their messages become reasons: no f-string, no formatting of a value."""
    tree = ast.parse((ROOT / "schemas" / "events.py").read_text())
    raised = [node.exc for node in ast.walk(tree) if isinstance(node, ast.Raise)]
    assert raised
    for exc in raised:
        assert isinstance(exc, ast.Call)
        assert all(isinstance(arg, (ast.Constant, ast.Name)) for arg in exc.args), ast.unparse(exc)


PACKAGES = (
    "schemas",
    "transport",
    "store",
    "producers",
    "consumers",
    "observability",
    "portal_sync",
)


def test_every_engine_the_project_creates_hides_statement_parameters() -> None:
    """SQLAlchemy puts `[parameters: …]` (personal data) into its errors and SQL logs
    unless `hide_parameters=True`: source engines included."""
    calls = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "create_engine":
                    hidden = any(
                        k.arg == "hide_parameters"
                        and isinstance(k.value, ast.Constant)
                        and k.value.value is True
                        for k in node.keywords
                    )
                    calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", hidden))
    assert len(calls) >= 4  # the store, SQLite apart, the sources (`source_engine`), the demo
    assert [where for where, hidden in calls if not hidden] == []


@pytest.mark.parametrize(
    "url", ["sqlite:///:memory:", "postgresql+psycopg://portal@127.0.0.1:1/store"]
)
def test_the_store_engine_hides_parameters_on_every_backend(url: str) -> None:
    engine = create_store_engine(url)  # no connection is made
    assert engine.hide_parameters is True
    engine.dispose()


def test_the_kafka_clients_never_log_records_even_when_the_root_logger_is_at_debug() -> None:
    """kafka-python's DEBUG lines are `Sending (key=… value=… headers=…)` and every request's
    bytes; the transport caps its loggers at INFO unless someone set them on purpose."""
    from transport.clients import CLIENT_LOGGERS, quiet_client_debug

    root = logging.getLogger()
    saved = root.level, {name: logging.getLogger(name).level for name in CLIENT_LOGGERS}
    try:
        root.setLevel(logging.DEBUG)
        logging.getLogger("kafka").setLevel(logging.NOTSET)
        logging.getLogger("aiokafka").setLevel(logging.DEBUG)  # asked for on purpose: kept
        quiet_client_debug()
        sender = logging.getLogger("kafka.producer.kafka")
        assert sender.isEnabledFor(logging.INFO) and not sender.isEnabledFor(logging.DEBUG)
        assert logging.getLogger("kafka.protocol.parser").getEffectiveLevel() == logging.INFO
        assert logging.getLogger("aiokafka.producer").isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(saved[0])
        for name, level in saved[1].items():
            logging.getLogger(name).setLevel(level)
