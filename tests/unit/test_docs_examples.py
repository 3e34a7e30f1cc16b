"""The TOML examples of the README and the docs are TOML: an operator copies them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = [
    (f"{path.relative_to(ROOT)}:{text[: found.start()].count(chr(10)) + 1}", found.group(1))
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for text in [path.read_text("utf-8")]
    for found in re.finditer(r"```toml\n(.*?)```", text, re.S)
]


def test_there_are_toml_examples() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize(("where", "block"), BLOCKS, ids=[where for where, _ in BLOCKS])
def test_every_toml_example_parses(where: str, block: str) -> None:
    tomllib.loads(block)  # an inline table split over lines fails here (TOML 1.0)
