"""Untrusted text reaches the terminal only as visible, unmarked text (observability.terminal)."""

from __future__ import annotations

import io
import re
import unicodedata

from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from rich.table import Table

from observability.terminal import UNSAFE_CATEGORIES, markup, plain, visible

# Any code point, lone surrogates, controls and bidi overrides included, with the hostile
# pieces over-represented.
HOSTILE = [
    "[/]", "[link=https://evil.example]", "[/link]", "[bold red]", "\\", "\\[", ":smile:",
    "\x1b]8;;https://evil.example\x1b\\", "\x1b[2J", "\x1b]52;c;cm0gLXJmIH4=\x07", "\x9b31m",
    "\u202e", "\u2066", "\u200b", "\ufeff", "\r", "\n", "\t", "\x00", "\ud800", "{}",
]  # fmt: skip
untrusted = st.lists(
    st.one_of(st.sampled_from(HOSTILE), st.text(st.characters(exclude_categories=()))),
    max_size=8,
).map("".join)
SGR = re.compile(r"\x1b\[[0-9;]*m")


def printed(renderable: object, color: bool = False) -> str:
    out = io.StringIO()
    console = Console(
        file=out,
        width=10_000,
        force_terminal=color,
        color_system="truecolor" if color else None,
        highlight=False,
    )
    console.print(renderable, soft_wrap=True)
    return out.getvalue()


def unsafe(text: str) -> list[str]:
    return [char for char in text if unicodedata.category(char) in UNSAFE_CATEGORIES]


@given(untrusted)
def test_visible_text_holds_no_control_format_or_surrogate_character(value: str) -> None:
    assert unsafe(visible(value)) == []
    assert unsafe(visible(value, newlines=True).replace("\n", "")) == []
    assert "\x1b" not in visible(value) and "\x9b" not in visible(value)


@given(untrusted)
def test_rich_prints_exactly_the_visible_text(value: str) -> None:
    assert printed(plain(value)) == visible(value) + "\n"
    assert printed(markup("[bold]{}[/bold] = {}", value, value)) == (
        f"{visible(value)} = {visible(value)}\n"
    )


@given(untrusted)
def test_no_escape_sequence_but_rich_own_colours(value: str) -> None:
    colored = printed(markup("[red]{}[/red] {}", value, value), color=True)
    assert "\x1b]" not in colored  # no hyperlink (OSC 8), no clipboard (OSC 52)
    assert SGR.sub("", colored) == f"{visible(value)} {visible(value)}\n"


@given(st.text(st.characters(exclude_categories=("Cc", "Cf", "Cs", "Zl", "Zp"))))
def test_printable_text_is_left_as_it_is(value: str) -> None:
    assert visible(value) == value


@given(st.binary())
def test_bytes_are_read_as_utf8_and_other_bytes_shown(value: bytes) -> None:
    shown = visible(value)
    assert unsafe(shown) == []
    if all(byte < 0x80 and chr(byte).isprintable() for byte in value):
        assert shown == value.decode()


def test_vietnamese_text_stays_intact() -> None:
    name = unicodedata.normalize("NFC", "Nguyễn Thị Bích Ngọc, Đặng Quốc Việt, Hồ Chí Minh")
    assert visible(name) == name
    assert visible(name.encode()) == name
    assert visible(unicodedata.normalize("NFD", name)) == unicodedata.normalize("NFD", name)


def test_escapes_are_visible_and_markup_is_shown_as_written() -> None:
    assert visible("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert visible("\x1b]8;;https://evil\x1b\\x") == "\\x1b]8;;https://evil\\x1b\\x"
    assert visible("exe.\u202egpj") == "exe.\\u202egpj"
    assert visible("\x85\x9b") == "\\x85\\x9b"
    assert visible("\U000e0041") == "\\U000e0041"  # a tag character (format)
    assert visible(b"\xff\xfe{}") == "\\xff\\xfe{}"
    assert visible("two\nlines\r") == "two\\x0alines\\x0d"
    assert visible("two\nlines\r", newlines=True) == "two\nlines\\x0d"
    assert visible(None) == ""
    assert printed(plain("[/] [link=https://evil]x[/link] :smile:")) == (
        "[/] [link=https://evil]x[/link] :smile:\n"
    )


def test_a_table_of_hostile_cells_renders() -> None:
    table = Table(title=plain("[/]"))
    table.add_column(plain("[bold]"))
    table.add_row(plain("[link=https://evil]click[/link]"))
    out = printed(table, color=True)
    assert "\x1b]8" not in out
    assert "[link=https://evil]click[/link]" in SGR.sub("", out)
