"""The dossier lifecycle's tables cover every status the contract takes: a status added to
`DossierStatus` without its transitions made every move into it an unusual one."""

from __future__ import annotations

from consumers.merge import DOSSIER_TRANSITIONS, LIFECYCLE_STAGE, unusual_transition
from schemas.events import DossierStatus


def test_every_status_has_its_transitions_and_they_name_statuses() -> None:
    statuses = {status.value for status in DossierStatus}
    assert set(DOSSIER_TRANSITIONS) == statuses
    assert all(nexts <= statuses for nexts in DOSSIER_TRANSITIONS.values())
    assert set(LIFECYCLE_STAGE) <= statuses


def test_the_usual_path_is_not_unusual_and_going_back_is() -> None:
    for old, nexts in DOSSIER_TRANSITIONS.items():
        for new in nexts:
            assert not unusual_transition(old, new)
    assert not unusual_transition(1, 4)  # a snapshot skipped a status: forward
    assert unusual_transition(9, 4)  # finished, then processing again
    assert unusual_transition(10, 1)  # a final status left
