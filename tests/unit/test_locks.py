"""The locks (requirements/*.txt, `make lock`) pin what pyproject.toml asks for.

`make` installs requirements/dev.txt and the image requirements/runtime.txt, each with
`--require-hashes`: a dependency added to pyproject.toml without `make lock` would be
missing from the image, or a version outside pyproject's range would be what is tested.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def read_lock(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) of every pinned requirement."""
    pins: dict[str, tuple[str, int]] = {}
    name = ""
    for line in path.read_text().splitlines():
        pin = PIN.match(line)
        if pin is not None:
            name = canonicalize_name(pin.group(1))
            assert name not in pins, f"{path.name}: {name} pinned twice"
            pins[name] = (pin.group(2), 0)
        elif line.strip().startswith("--hash=sha256:") and name:
            version, hashes = pins[name]
            pins[name] = (version, hashes + 1)
        elif line and not line.startswith((" ", "#")):
            pytest.fail(f"{path.name}: a line that pins nothing: {line!r}")
    return pins


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RUNTIME = [Requirement(r) for r in PROJECT["project"]["dependencies"]]
DEV = [Requirement(r) for r in PROJECT["project"]["optional-dependencies"]["dev"]]
BUILD = [Requirement(r) for r in PROJECT["build-system"]["requires"]]
LOCKS = {
    "runtime.txt": RUNTIME + BUILD,
    "dev.txt": RUNTIME + DEV + BUILD,
}


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_requirement_is_pinned_within_its_range_with_hashes(lock: str) -> None:
    pins = read_lock(ROOT / "requirements" / lock)
    for requirement in LOCKS[lock]:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{lock} lacks {name}: run `make lock`"
        version = pins[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock} pins {name}=={version}, outside pyproject.toml's {requirement}"
        )
    unhashed = sorted(name for name, (_, hashes) in pins.items() if hashes == 0)
    assert not unhashed, f"{lock}: pinned without a hash: {unhashed}"


def test_what_is_tested_is_what_ships() -> None:
    """A package in both locks has the same version in both."""
    runtime = read_lock(ROOT / "requirements" / "runtime.txt")
    dev = read_lock(ROOT / "requirements" / "dev.txt")
    differ = {n: (v, dev[n][0]) for n, (v, _) in runtime.items() if dev.get(n, (v,))[0] != v}
    assert not differ, f"runtime.txt and dev.txt pin these differently: {differ}"
    assert set(runtime) <= set(dev), f"only in runtime.txt: {sorted(set(runtime) - set(dev))}"


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_the_lock_says_how_it_is_made(lock: str) -> None:
    text = (ROOT / "requirements" / lock).read_text()
    assert "#    make lock\n" in text
    assert "--find-links" not in text  # a machine's own wheel folder stays out of the lock
    makefile = (ROOT / "Makefile").read_text()
    assert f"--output-file requirements/{lock}" in makefile
