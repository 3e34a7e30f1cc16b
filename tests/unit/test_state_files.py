"""Producers' state files (producers.state): written with orjson, every value still fits."""

from __future__ import annotations

from pathlib import Path

import pytest

from producers.state import load_json_state, remove_leftovers, write_json_atomic


def test_a_state_round_trips_whatever_its_primary_keys(tmp_path: Path) -> None:
    path = tmp_path / "state" / "hcm-citizens.state.json"
    assert load_json_state(path) == {}
    usual = {"updated_at": "2025-08-01T08:00:00", "pk": 7, "note": "Hồ Chí Minh",
             "seen": {"7": [3, "2025-08-01T08:00:00", "a1b2", None]}}  # fmt: skip
    write_json_atomic(path, usual)
    assert load_json_state(path) == usual
    # an Oracle NUMBER(38) key is beyond orjson's 64-bit integers: still written and read
    huge = usual | {"pk": 10**30, "seen": {str(10**30): [1, "2025-08-01T08:00:00", "c3", 2**64]}}
    write_json_atomic(path, huge)
    assert load_json_state(path) == huge
    write_json_atomic(path, {1: "key written as text"})
    assert load_json_state(path) == {"1": "key written as text"}
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_a_damaged_state_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.state.json"
    path.write_text('{"pk": 1', encoding="utf-8")
    with pytest.raises(ValueError):
        load_json_state(path)
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="does not hold a JSON object"):
        load_json_state(path)


def test_temporary_files_a_killed_save_left_are_removed_and_only_they(tmp_path: Path) -> None:
    path = tmp_path / "hcm-citizens.state.json"
    write_json_atomic(path, {"pk": 1})
    left = [
        tmp_path / "hcm-citizens.state.jsonab3_x9qz.tmp",
        tmp_path / "hcm-citizens.state.json01234567.tmp",
    ]
    others = [tmp_path / "hcm-citizens.journal.jsonl", tmp_path / "hcm.state.jsonab3_x9qz.tmp",
              tmp_path / "hcm-citizens.state.json-backup.tmp"]  # fmt: skip
    for file in left + others:
        file.write_bytes(b"{")
    assert remove_leftovers(path) == 2
    assert sorted(tmp_path.iterdir()) == sorted([path, *others])
    assert load_json_state(path) == {"pk": 1}


def test_a_new_line_file_s_name_is_synced_with_its_first_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal is removed at a save and made again by the next page: its first line
    synced, but not its name in the directory, could vanish with the power, after the page
    it guards was sent."""
    from producers import state

    synced: list[Path] = []
    monkeypatch.setattr(state, "_sync_directory", synced.append)
    path = tmp_path / "hcm-citizens.journal.jsonl"
    state.append_json_line(path, {"top": 1})
    state.append_json_line(path, {"top": 2})
    assert synced == [tmp_path]
    assert state.read_json_lines(path) == [{"top": 1}, {"top": 2}]
    assert path.stat().st_mode & 0o777 == 0o600
