"""The demo's sample dossiers carry valid, distinct codes however many it makes: one count
for every day ran past 9999 at 60,000 people, and the demo wrote codes the contract
refuses."""

from __future__ import annotations

from pathlib import Path

from portal_sync.demo.population import World
from portal_sync.demo.systems import SOURCES, SampleSource
from schemas.identifiers import DOSSIER_CODE


def test_dossier_codes_count_within_their_day(tmp_path: Path) -> None:
    world = World.create(seed=6, people=50, companies=20)
    source = SampleSource(SOURCES[0], tmp_path / "source.db", world)
    try:
        codes = [source.dossier_row()["ma_ho_so"] for _ in range(12_000)]
    finally:
        source.engine.dispose()
    assert all(DOSSIER_CODE.fullmatch(code) for code in codes)
    assert len(set(codes)) == len(codes)
