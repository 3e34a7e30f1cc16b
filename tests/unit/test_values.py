"""`schemas.values.value_class`: what a frozen dataclass promised, kept without its cost."""

from __future__ import annotations

import pickle
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mypy import api as mypy_api

from consumers.checks import Checked, DeadLetter
from consumers.reconciler import EventOutcome
from schemas.validation import ValidEvent
from schemas.views import CanonicalRecord, SourceView
from store.core import ViewRow
from transport.reader import Message

VALUES = [Message, SourceView, CanonicalRecord, ValidEvent, Checked, DeadLetter, EventOutcome,
          ViewRow]  # fmt: skip


def test_equal_by_fields_hashable_and_picklable() -> None:
    message = Message("portal-sync.changes.citizen", 3, 42, b"{}", b"k", 1, (("h", b"v"),))
    same = Message("portal-sync.changes.citizen", 3, 42, b"{}", b"k", 1, (("h", b"v"),))
    assert message == same and hash(message) == hash(same)
    assert message != Message("portal-sync.changes.citizen", 3, 43, b"{}", b"k", 1)
    assert len({message, same}) == 1
    # Messages go to the validator processes pickled.
    assert pickle.loads(pickle.dumps(message)) == message


def test_a_value_with_a_dict_field_is_not_hashable_as_with_frozen() -> None:
    view = SourceView("so-tu-phap", 1, "e", datetime(2025, 7, 1, tzinfo=UTC), False, {"a": 1})
    with pytest.raises(TypeError):
        hash(view)


@pytest.mark.parametrize("cls", VALUES, ids=lambda cls: cls.__name__)
def test_slots_and_no_attribute_beyond_the_fields(cls: type) -> None:
    assert "__slots__" in vars(cls)
    assert "__dict__" not in dir(cls)


def test_the_type_checker_refuses_an_assignment_to_a_field(tmp_path: Path) -> None:
    """The guarantee frozen gave at run time is mypy's now (strict in CI)."""
    snippet = tmp_path / "assign.py"
    snippet.write_text(
        textwrap.dedent("""
        from datetime import UTC, datetime
        from schemas.views import SourceView
        from transport.reader import Message
        view = SourceView("a", 1, "e", datetime.now(UTC), False, None)
        view.version = 2
        message = Message("t", 0, 1, b"")
        message.offset = 3
        """)
    )
    out, _, status = mypy_api.run(
        ["--strict", "--no-incremental", "--follow-imports=silent", str(snippet)]
    )
    assert status == 1
    assert '"version" defined in "SourceView" is read-only' in out
    assert '"offset" defined in "Message" is read-only' in out
