"""Copy the repository's deploy files the Helm chart reads into the chart's files/ dir.

A chart reads only files inside its own directory (`.Files.Get`), and `helm package` does
not follow symbolic links out of it, so the chart carries copies:

    python deploy/helm/sync_files.py           # after `python -m observability.deploy`
    python deploy/helm/sync_files.py --check   # exit 1 when a copy differs (a test runs it)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHART_FILES = Path("deploy/helm/portal-sync/files")

# chart copy -> original (paths relative to the repository)
COPIES: dict[Path, Path] = {
    CHART_FILES / "alerts.yml": Path("deploy/prometheus/alerts.yml"),
    CHART_FILES / "portal-sync.json": Path("deploy/grafana/dashboards/portal-sync.json"),
    CHART_FILES / "registry.toml": Path("deploy/registry.toml"),
    CHART_FILES / "authority.toml": Path("deploy/authority.toml"),
}


def stale(root: Path = REPO) -> list[Path]:
    """The chart copies that are missing or differ from their original."""
    return [
        copy
        for copy, original in COPIES.items()
        if not (root / copy).is_file()
        or (root / copy).read_bytes() != (root / original).read_bytes()
    ]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale copies")
    options = parser.parse_args(argv)
    outdated = stale()
    if options.check:
        for copy in outdated:
            print(f"stale: {copy} (run python deploy/helm/sync_files.py)")
        return 1 if outdated else 0
    for copy in outdated:
        (REPO / copy).parent.mkdir(parents=True, exist_ok=True)
        (REPO / copy).write_bytes((REPO / COPIES[copy]).read_bytes())
        print(f"wrote {copy}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
