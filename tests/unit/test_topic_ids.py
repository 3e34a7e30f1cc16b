"""The worker's check of a change topic's id against the one the store recorded
(`transport.group.check_topic_ids`): a topic created again is refused only where the store
has applied events of the earlier one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.errors import ConfigurationError
from transport.group import check_topic_ids

CITIZEN, DOSSIER = "portal.changes.citizen", "portal.changes.dossier"


def test_a_topic_created_again_after_events_were_applied_is_refused_by_name() -> None:
    with pytest.raises(ConfigurationError, match=f"earlier topic of the same name: {CITIZEN} "):
        check_topic_ids({(CITIZEN, 0): 0, (CITIZEN, 1): 20}, {CITIZEN: "a"}, {CITIZEN: "b"})


@pytest.mark.parametrize(
    ("stored", "saved", "current"),
    [
        ({(CITIZEN, 0): 20}, {CITIZEN: "a"}, {CITIZEN: "a"}),  # the same topic
        ({(CITIZEN, 0): 0}, {CITIZEN: "a"}, {CITIZEN: "b"}),  # nothing applied of it
        ({}, {CITIZEN: "a"}, {CITIZEN: "b"}),  # no offsets at all
        ({(CITIZEN, 0): 20}, {}, {CITIZEN: "b"}),  # no id recorded yet (a store before 0013)
        ({(CITIZEN, 0): 20}, {CITIZEN: "a"}, {}),  # a cluster that gives no ids
        ({(CITIZEN, 0): 20}, {CITIZEN: "a", DOSSIER: "x"}, {CITIZEN: "a", DOSSIER: "y"}),
    ],
)
def test_what_is_not_refused(
    stored: dict[tuple[str, int], int], saved: dict[str, str], current: dict[str, str]
) -> None:
    check_topic_ids(stored, saved, current)


topics = st.sampled_from([CITIZEN, DOSSIER, "portal.changes.document"])


@given(
    st.dictionaries(st.tuples(topics, st.integers(0, 3)), st.integers(0, 50)),
    st.dictionaries(topics, st.sampled_from("ab")),
    st.dictionaries(topics, st.sampled_from("ab")),
)
def test_refused_exactly_when_an_applied_topic_has_another_id(
    stored: dict[tuple[str, int], int], saved: dict[str, str], current: dict[str, str]
) -> None:
    changed = {
        t for (t, _), offset in stored.items()
        if offset > 0 and t in saved and t in current and saved[t] != current[t]
    }  # fmt: skip
    if changed:
        with pytest.raises(ConfigurationError) as refused:
            check_topic_ids(stored, saved, current)
        assert all(t in str(refused.value) for t in changed)
    else:
        check_topic_ids(stored, saved, current)
