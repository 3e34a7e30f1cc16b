"""The broker's and Connect's jars: used only as the repository pins them, fetched once.

`transport.jars` stands between Maven and the jar folders the local broker and Connect run.
Here `fetch` writes small stand-in jars: what is under test is the check against the
manifest and the folder's hand-over, not Maven.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import time
from pathlib import Path

import pytest

from transport import jars

ROOT = Path(__file__).resolve().parents[2]
JARS = {"lib/a-1.0.jar": b"first jar", "lib/b-2.0.jar": b"second jar", "plugins/c.jar": b"c"}


def _pom(tmp_path: Path, version: str = "1.0") -> Path:
    pom = tmp_path / "pom.xml"
    pom.write_text(f"<project><version>{version}</version></project>")
    return pom


def _manifest(tmp_path: Path, files: dict[str, bytes] = JARS) -> Path:
    manifest = tmp_path / "jars.sha256"
    lines = [f"{hashlib.sha256(data).hexdigest()}  {name}" for name, data in files.items()]
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _writer(files: dict[str, bytes], pause: float = 0.0):  # type: ignore[no-untyped-def]
    def fetch(staging: Path) -> None:
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
            time.sleep(pause)

    return fetch


def test_a_fetch_that_matches_the_manifest_is_kept_and_reused(tmp_path: Path) -> None:
    manifest, target = _manifest(tmp_path), tmp_path / "cache" / "lib"
    assert jars.fetch_once(target, manifest, _pom(target.parent.parent), _writer(JARS)) == target
    assert (target / "lib" / "a-1.0.jar").read_bytes() == b"first jar"

    def never(staging: Path) -> None:
        raise AssertionError("a verified folder is fetched again")

    assert jars.fetch_once(target, manifest, _pom(target.parent.parent), never) == target
    assert [p.name for p in target.parent.iterdir() if p.is_dir()] == ["lib"]  # no staging left


@pytest.mark.parametrize(
    ("files", "said"),
    [
        ({**JARS, "lib/a-1.0.jar": b"another first jar"}, "lib/a-1.0.jar: SHA-256"),
        ({**JARS, "lib/extra.jar": b"x"}, "lib/extra.jar: not in jars.sha256"),
        ({k: v for k, v in JARS.items() if k != "plugins/c.jar"}, "plugins/c.jar: missing"),
    ],
    ids=["changed", "extra", "missing"],
)
def test_a_fetch_that_differs_from_the_manifest_is_refused_and_not_kept(
    tmp_path: Path, files: dict[str, bytes], said: str
) -> None:
    manifest, target = _manifest(tmp_path), tmp_path / "cache" / "lib"
    with pytest.raises(jars.JarsRefused, match=said):
        jars.fetch_once(target, manifest, _pom(target.parent.parent), _writer(files))
    assert list(target.parent.iterdir()) == [target.parent / ".lib.lock"]


def test_a_cache_that_changed_or_a_new_manifest_is_fetched_again(tmp_path: Path) -> None:
    manifest, target = _manifest(tmp_path), tmp_path / "cache" / "lib"
    jars.fetch_once(target, manifest, _pom(target.parent.parent), _writer(JARS))
    (target / "lib" / "b-2.0.jar").write_bytes(b"cut")  # truncated by hand or a full disk
    assert not jars.reusable(target, manifest, _pom(target.parent.parent))
    jars.fetch_once(target, manifest, _pom(target.parent.parent), _writer(JARS))
    assert jars.reusable(target, manifest, _pom(target.parent.parent))
    (target / "lib" / "dropped-in.jar").write_bytes(b"x")
    assert not jars.reusable(target, manifest, _pom(target.parent.parent))
    jars.fetch_once(target, manifest, _pom(target.parent.parent), _writer(JARS))
    assert not (target / "lib" / "dropped-in.jar").exists()
    # A version bumped in the POM: fetched again, and refused while the manifest is old.
    with pytest.raises(jars.JarsRefused, match=r"lib/a-1\.0\.jar: SHA-256"):
        jars.fetch_once(
            target,
            manifest,
            _pom(tmp_path, "2.0"),
            _writer({**JARS, "lib/a-1.0.jar": b"first jar, next version"}),
        )
    assert jars.reusable(target, manifest, _pom(tmp_path))  # the verified copy stays
    newer = {**JARS, "lib/a-1.0.jar": b"first jar, next version"}
    assert not jars.reusable(
        target, _manifest(tmp_path, newer), _pom(tmp_path)
    )  # a version change in a pin


def _fetch_in_process(target: str, manifest: str) -> None:
    pom = Path(target).parent.parent / "pom.xml"
    jars.fetch_once(Path(target), Path(manifest), pom, _writer(JARS, pause=0.2))


def test_two_processes_fetching_at_once_leave_one_whole_folder(tmp_path: Path) -> None:
    # Before the lock, the second caller's clean-up of the shared staging folder and its
    # rename left a folder marked complete holding part of the jars.
    manifest, target = _manifest(tmp_path), tmp_path / "cache" / "lib"
    _pom(tmp_path)
    context = multiprocessing.get_context("spawn")
    runs = [context.Process(target=_fetch_in_process, args=(str(target), str(manifest)))]
    runs.append(context.Process(target=_fetch_in_process, args=(str(target), str(manifest))))
    for run in runs:
        run.start()
        time.sleep(0.25)
    for run in runs:
        run.join(60)
    assert [run.exitcode for run in runs] == [0, 0]
    assert jars.reusable(target, manifest, _pom(target.parent.parent))
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*.jar")) == sorted(JARS)


@pytest.mark.parametrize("folder", ["kafka", "debezium"])
def test_the_shipped_manifests_pin_every_jar_once_with_a_sha256(folder: str) -> None:
    pinned = jars.read_manifest(ROOT / "deploy" / folder / "jars.sha256")
    assert len(pinned) > 40
    assert all(len(d) == 64 and int(d, 16) >= 0 for d in pinned.values())
    assert all(name.endswith(".jar") and ".." not in name for name in pinned)
