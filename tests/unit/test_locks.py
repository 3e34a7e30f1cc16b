"""The locks (requirements/*.txt, `make lock`) pin what pyproject.toml asks for.

`make` installs requirements/dev.txt and the image requirements/runtime.txt, each with
`--require-hashes`: a dependency added to pyproject.toml without `make lock` would be
missing from the image, or a version outside pyproject's range would be what is tested.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
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


def closure(requirements: list[Requirement]) -> set[str]:
    """Every package these requirements install, their extras' packages included, from the
    installed packages' metadata (a package missing from a lock is missing here too)."""
    found: set[str] = set()
    todo = [(r, frozenset()) for r in requirements]
    while todo:
        requirement, extras = todo.pop()
        wanted = {"", *extras}
        if requirement.marker and not any(
            requirement.marker.evaluate({"extra": e}) for e in wanted
        ):
            continue
        name = canonicalize_name(requirement.name)
        key = f"{name}[{','.join(sorted(requirement.extras))}]"
        if key in found:
            continue
        found.add(key)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name} is not installed: run `make lock`, then `make`")
        todo += [(Requirement(r), frozenset(requirement.extras)) for r in requires]
    return {key.split("[")[0] for key in found}


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_each_lock_holds_exactly_what_its_requirements_install(lock: str) -> None:
    """Extras' packages included (kafka-python[lz4,snappy,zstd]); nothing left over."""
    pins = set(read_lock(ROOT / "requirements" / lock))
    needed = closure(LOCKS[lock])
    assert not needed - pins, f"{lock} lacks {sorted(needed - pins)}: run `make lock`"
    assert not pins - needed, f"{lock} pins what nothing needs: {sorted(pins - needed)}"


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


def _ignore_pattern(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\*\*|\*|\?)", pattern.strip("/"))
    wild = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wild.get(part, re.escape(part)) for part in parts))


def test_the_image_build_context_holds_everything_the_dockerfile_copies() -> None:
    """BuildKit reads deploy/docker/Dockerfile.dockerignore: a COPY of a path it leaves out
    fails the image's build, which CI does not run."""
    docker = ROOT / "deploy" / "docker"
    rules = [
        (line.startswith("!"), _ignore_pattern(line.lstrip("!")))
        for line in (docker / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def included(path: str) -> bool:
        keep = True
        parents = [path] + [path.rsplit("/", n)[0] for n in range(1, path.count("/") + 1)]
        for negated, pattern in rules:
            if any(pattern.fullmatch(p) for p in parents):
                keep = negated
        return keep

    copies = [
        line.split()[1:-1]
        for line in (docker / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ") and "--from=" not in line
    ]
    sources = [source for sources in copies for source in sources]
    assert "requirements/runtime.txt" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert included(source), f"Dockerfile.dockerignore leaves out {source}"
