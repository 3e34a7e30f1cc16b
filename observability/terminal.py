"""Untrusted text made safe for the terminal.

Anything that came from data or headers (names, sources, keys, reasons, event bytes, even
consumer-group names) may hold Rich markup (`[/]` ends the command with a MarkupError,
`[link=…]` makes a clickable hyperlink), escape sequences (`ESC ] 8`, `ESC [ 2J`, OSC 52
writes the clipboard) or bidirectional overrides that make text read differently from what
it is. Before it reaches a console it goes through this module:

- `visible(value)`: control characters (C0, DEL, C1), format characters (bidi embeddings,
  overrides and isolates, zero-width characters, BOM), line/paragraph separators and lone
  surrogates become visible escapes (`\\x1b`, `\\u202e`); everything else, Vietnamese
  letters with their diacritics included, stays as it is. Bytes are read as UTF-8, a byte
  that is not shown as `\\xNN`.
- `plain(value)`: a Rich `Text` of `visible(value)`: no markup, no emoji codes.
- `markup(template, *values)`: our own markup (`template`, trusted) with each `{}` filled by
  an untrusted value as plain, visible text.

It lives in the lowest layer that renders to a terminal (the `lag` tables); the command
line, the demo and the adapter checks use it too. Pure: no I/O.
"""

from __future__ import annotations

import unicodedata

from rich.text import Text

# Unicode categories never passed through: controls, format characters (bidi, zero-width),
# lone surrogates, line and paragraph separators.
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
PLACEHOLDERS = 0xF0000  # supplementary private use area A: never in our templates


def visible(value: str | bytes | None, newlines: bool = False) -> str:
    """`value` with every unsafe character replaced by a visible escape; with `newlines`,
    line feeds are kept (a multi-line document stays readable), carriage returns are not."""
    if value is None:
        return ""
    text = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value
    if text.isprintable():  # the common case: nothing to replace
        return text
    return "".join(char if _safe(char, newlines) else _escaped(char) for char in text)


def plain(value: str | bytes | None, style: str = "", newlines: bool = False) -> Text:
    """A table cell, title or line of untrusted text: never parsed as markup."""
    return Text(visible(value, newlines), style=style)


def markup(template: str, *values: object) -> Text:
    """`template` is our Rich markup with one `{}` per value; the values (untrusted, any
    type) are shown as plain, visible text: `markup("[bold]{}[/bold]: {}", name, value)`."""
    # Rich's `escape` cannot say whether a value's trailing backslash escapes the tag that
    # follows; so the template is rendered with a placeholder character per value, and
    # each placeholder is then replaced by its value, which takes the placeholder's style.
    marks = [chr(PLACEHOLDERS + index) for index in range(len(values))]
    rendered = Text.from_markup(template.format(*marks), emoji=False)
    cuts = sorted(
        {at + step for at, char in enumerate(rendered.plain) if char in marks for step in (0, 1)}
    )
    result = Text(style=rendered.style)
    for piece in rendered.divide(cuts):
        if piece.plain in marks:
            value = Text(visible(str(values[marks.index(piece.plain)])))
            for span in piece.spans:
                value.stylize(span.style)
            piece = value
        result.append_text(piece)
    return result


def _safe(char: str, newlines: bool) -> bool:
    if char.isprintable() or (newlines and char == "\n"):
        return True
    return unicodedata.category(char) not in UNSAFE_CATEGORIES


def _escaped(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
