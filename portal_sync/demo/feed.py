"""The demo's portal feed: a one-stop system that drops portal-integration JSON files
(TrangThaiHoSo, NgayCapNhat) for the `portal` adapter."""

from __future__ import annotations

import hashlib
import json
import random
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from portal_sync.demo.population import PROCEDURES, ZONE, World
from portal_sync.demo.systems import toml_value

PORTAL_FEED_SOURCE = "province-48-motcua"
PORTAL_UNIT = "000.00.02.H17"
# The feed reports the transitions the portal needs: accepted and processing, finished,
# result returned (with its documents).
NEXT_STATUS = {1: 4, 2: 4, 4: 9, 9: 10}


class PortalFeed:
    """Đà Nẵng's one-stop system: drops the JSON it sends to the national portal into a
    folder (the `portal` adapter's inbox), one file per batch of dossier changes."""

    def __init__(self, directory: Path, world: World) -> None:
        self.directory = directory
        self.world = world
        self.rng = random.Random(f"{world.rng.random()}-portal")
        self.dossiers: dict[str, dict[str, Any]] = {}
        self.files = 0

    def submit(self, count: int) -> None:
        for seq in range(1, count + 1):
            received = datetime(2025, 7, 1, 8) + timedelta(minutes=self.rng.randrange(200_000))
            person = self.rng.choice(self.world.people)
            code = f"{PORTAL_UNIT}-{received:%y%m%d}-{seq:04d}"
            self.dossiers[code] = {
                "MaHoSo": code,
                "MaTTHC": self.rng.choice(PROCEDURES),
                "DonViXuLy": PORTAL_UNIT,
                "ChuHoSo": {"HoTen": person.name, "SoDinhDanh": person.pid},
                "LoaiDoiTuong": "1",
                "NgayTiepNhan": f"{received:%Y%m%d%H%M%S}",
                "NgayHenTra": f"{received + timedelta(days=5):%Y%m%d%H%M%S}",
                "TrangThaiHoSo": "1",
            }
        self._drop(list(self.dossiers))

    def advance(self, count: int) -> None:
        """Move some dossiers one status on; returned results carry their documents."""
        open_codes = [c for c, d in self.dossiers.items() if int(d["TrangThaiHoSo"]) < 10]
        chosen = self.rng.sample(open_codes, min(count, len(open_codes)))
        for code in chosen:
            payload = self.dossiers[code]
            status = NEXT_STATUS[int(payload["TrangThaiHoSo"])]
            payload["TrangThaiHoSo"] = str(status)
            if status == 10:
                payload["NgayTra"] = datetime.now(ZONE).strftime("%Y%m%d%H%M%S")
                payload["DanhSachGiayToKetQua"] = [
                    {
                        "MaGiayTo": f"{code}:KQ",
                        "TenGiayTo": "Kết quả giải quyết thủ tục hành chính",
                        "FileSha256": hashlib.sha256(code.encode()).hexdigest(),
                    }
                ]
        self._drop(chosen)

    def _drop(self, codes: list[str]) -> None:
        """Write the file whole, then rename it in: the adapter never sees half a file."""

        stamp = datetime.now(ZONE).strftime("%Y%m%d%H%M%S")
        payloads = [self.dossiers[code] | {"NgayCapNhat": stamp} for code in codes]
        self.files += 1
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f".batch-{self.files:04d}.part"
        partial.write_text(json.dumps(payloads, ensure_ascii=False), encoding="utf-8")
        partial.rename(self.directory / f"batch-{self.files:04d}.json")


def portal_feed_toml(feed: PortalFeed, interval: float, signing_key: Path | None = None) -> str:
    """The deployment-file entry of the one-stop system's portal feed."""
    return "\n".join(
        [
            "",
            "[[sources]]",
            f'id = "{PORTAL_FEED_SOURCE}.portal"',
            f'source = "{PORTAL_FEED_SOURCE}"',
            'adapter = "portal"',
            f"interval_seconds = {interval}",
            # the feed renames each file in whole: complete at once, no settle time needed
            f"connection = {{ directory = {toml_value(feed.directory)}, settle_seconds = 0 }}",
            *([f"signing_key_file = {toml_value(signing_key)}"] if signing_key else []),
            "",
        ]
    )
