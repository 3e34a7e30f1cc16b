"""Jars fetched once through Maven, checked against the SHA-256 sums this repository pins.

Maven's `--strict-checksums` compares a jar with the `.sha1` file served beside it by the
same repository, which proves nothing against that repository, a mirror, or a poisoned
`~/.m2`. So every jar the copy step resolves must appear, with the same SHA-256, in a
manifest kept here (`deploy/kafka/jars.sha256`, `deploy/debezium/jars.sha256`, in
`sha256sum`'s format); a jar that differs, is missing, or is not listed is refused and the
fetched folder thrown away.

The verified folder is moved into place whole (a private staging folder, renamed) under a
file lock, so two processes fetching at once (a parallel test run on an empty cache, two
`kafka up`) wait for each other instead of leaving a half-filled folder marked complete.
Its `.complete` file names the POM it was fetched by (its SHA-256) and lists each jar's sum
and size; a later start reuses the folder when the POM and that list are still the ones
in the repository and every jar still has its size (a cheap check against a truncated or
hand-edited cache; the full sums are taken at each fetch). A version bumped in the POM
without a new manifest therefore fails at once, on every machine, not only a fresh one.

After a version change, `python -m transport.jars` prints a new manifest for a folder
fetched without the check (see `--help`).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from schemas.errors import PortalSyncError

COMPLETE = ".complete"


class JarsRefused(PortalSyncError):
    """A fetched jar is not the one the manifest pins (exit 1): nothing fetched is used."""


def read_manifest(manifest: Path) -> dict[str, str]:
    """The manifest's {relative path: sha256}."""
    sums: dict[str, str] = {}
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise JarsRefused(f"{manifest}:{number}: not a `sha256  path` line")
        sums[name] = digest
    return sums


def _jars(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*.jar"))}


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify(folder: Path, manifest: Path) -> list[str]:
    """Check every jar of `folder` against the manifest; the `.complete` lines if it holds."""
    pinned = read_manifest(manifest)
    found = _jars(folder)
    problems = [f"{name}: not in {manifest.name}" for name in sorted(found.keys() - pinned)]
    problems += [f"{name}: missing" for name in sorted(pinned.keys() - found)]
    lines = []
    for name, path in found.items():
        if name not in pinned:
            continue
        digest = _sha256(path)
        if digest != pinned[name]:
            problems.append(f"{name}: SHA-256 {digest[:16]}…, pinned {pinned[name][:16]}…")
        lines.append(f"{digest} {path.stat().st_size} {name}")
    if problems:
        shown = "; ".join(problems[:5]) + (
            f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        )
        raise JarsRefused(f"the fetched jars do not match {manifest}: {shown}")
    return lines


def reusable(folder: Path, manifest: Path, pom: Path) -> bool:
    """True when `folder` was fetched by this POM and verified against this manifest, and
    no jar changed size since."""
    try:
        first, *recorded = (folder / COMPLETE).read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError):
        return False
    if first != _pom_line(pom):
        return False
    sizes: dict[str, int] = {}
    sums: dict[str, str] = {}
    for line in recorded:
        parts = line.split(" ", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return False
        sums[parts[2]], sizes[parts[2]] = parts[0], int(parts[1])
    if sums != read_manifest(manifest):
        return False
    found = _jars(folder)
    if found.keys() != sizes.keys():
        return False
    return all(path.stat().st_size == sizes[name] for name, path in found.items())


@contextmanager
def _locked(lock: Path) -> Iterator[None]:
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pom_line(pom: Path) -> str:
    return f"pom {hashlib.sha256(pom.read_bytes()).hexdigest()}"


def fetch_once(target: Path, manifest: Path, pom: Path, fetch: Callable[[Path], None]) -> Path:
    """`target`, fetched by `fetch(staging)` (with `pom`) and verified, unless a verified
    copy is there."""
    if reusable(target, manifest, pom):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if reusable(target, manifest, pom):  # another process fetched it meanwhile
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            fetch(staging)
            lines = [_pom_line(pom), *verify(staging, manifest)]
            (staging / COMPLETE).write_text("\n".join(lines) + "\n", encoding="utf-8")
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m transport.jars",
        description="Print a manifest (sha256sum format) of the jars under FOLDER, to review "
        "and commit as deploy/kafka/jars.sha256 or deploy/debezium/jars.sha256 after a "
        "version change. Fetch FOLDER with the Maven command of transport/local.py or "
        "transport/connect.py.",
    )
    parser.add_argument("folder", type=Path)
    folder = parser.parse_args(argv).folder
    for name, path in _jars(folder).items():
        print(f"{_sha256(path)}  {name}")


if __name__ == "__main__":
    main()
