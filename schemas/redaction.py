"""Secrets out of everything printed: the one place that redacts URLs and configuration text.

`redacted_url` takes one store URL (SQLAlchemy or libpq URI, `scheme://user:pw@host/db?k=v`)
or one libpq key=value string (`host=db user=u password='a b'`) and masks every secret in
it: the password of the authority part (up to the *last* `@`, so a raw `@`, `:` or `/` in
a password stays hidden), and the value of every query or key=value parameter whose name
looks secret (`password`, `sslpassword`, `passfile`, `pwd`, `secret`, `token`, ...; names
compared percent-decoded and unquoted, in any case). A string it cannot read as either is
not echoed at all. It masks more than needed rather than less: a `@` in the query hides
the host too.

`redacted_text` does the same inside free text (a deployment file as written, a list of
bootstrap servers): every URL or key=value string inside a quoted string, every bare URL,
and the value of every key named like a secret (TOML bare, quoted or dotted keys, inline
tables, any string form).

Pure string work, no parser of any driver: it never fails, whatever it is given.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

MASK = "***"
UNREADABLE = "(unreadable store URL)"

_SECRET_NAME = re.compile(r"pass|pwd|secret|token|credential|api[_-]?key", re.IGNORECASE)
_SCHEME = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.\-]*://")
# libpq key=value: a value is single-quoted (backslash escapes) or runs to whitespace.
_DSN_VALUE = r"'(?:[^'\\]|\\[\s\S])*(?:'|\\?$)|(?:[^\s\\]|\\[\s\S]?)+"
_LOOSE_VALUE = r"[^&;,#\s]*"
_DSN_PAIR = re.compile(
    r"""(?P<key>(?P<q>["']?)[A-Za-z_][\w.\-]*(?P=q))(?P<eq>\s*=\s*)(?P<value>""" + _DSN_VALUE + ")",
    re.DOTALL,
)
_URL_TEXT = r"""[A-Za-z][A-Za-z0-9+.\-]*://[^\s"'<>,]+"""
_URL = re.compile(_URL_TEXT)
# A TOML (or INI-like) assignment: bare, quoted or dotted key, then any value form.
_KEY_PART = r"""(?:[A-Za-z0-9_\-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
_STRING = r'''"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:[^"\\\n]|\\.)*"?|'[^'\n]*'?'''
_TEXT_TOKEN = re.compile(
    rf"""(?P<assign>(?P<key>{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)(?P<eq>[ \t]*=[ \t]*)"""
    rf"""(?P<value>{_STRING}|\{{(?:{_STRING}|[^}}\n"'])*\}}?|\[(?:{_STRING}|[^\]"'])*\]?"""
    r"""|(?![{\[])[^\n]*?(?=[ \t]*(?:[,}\]#\n]|$))))"""
    rf"""|(?P<string>{_STRING})"""
    rf"""|(?P<url>{_URL_TEXT})""",
    re.MULTILINE,
)


def is_secret_name(name: str) -> bool:
    """A parameter or key whose value must never be printed (decoded, unquoted, any case)."""
    return bool(_SECRET_NAME.search(unquote_plus(name).strip("\"' ")))


def redacted_url(url: str) -> str:
    """One store URL or libpq key=value string, fit to print (see the module docstring)."""
    if _SCHEME.match(url):
        return _redacted_uri(url)
    if _DSN_PAIR.search(url):
        return _redacted_dsn(url)
    return UNREADABLE


def redacted_text(text: str) -> str:
    """Free text (a configuration file as written, a server list) with every secret masked:
    the values of keys named like a secret, and every URL or key=value string in it."""
    return _TEXT_TOKEN.sub(_redacted_token, text)


def _redacted_uri(url: str) -> str:
    head = _SCHEME.match(url)
    assert head is not None
    prefix, rest = url[: head.end()], url[head.end() :]
    at = rest.rfind("@")
    if at >= 0:
        user, colon, _password = rest[:at].partition(":")
        if not any(c in user for c in "/?#"):  # else the `@` is past the authority
            prefix += user + (":" + MASK if colon else "") + "@"
            rest = rest[at + 1 :]
    path, question, query = rest.partition("?")
    if question:
        query = "&".join(_redacted_query_item(item) for item in query.split("&"))
    # Secret-looking key=value pairs anywhere else too (a `;` list, a stray `&`).
    return prefix + _redacted_pairs(path + question + query, _LOOSE_VALUE)


def _redacted_query_item(item: str) -> str:
    key, equals, _value = item.partition("=")
    return f"{key}={MASK}" if equals and is_secret_name(key) else item


def _redacted_pairs(text: str, value: str) -> str:
    pattern = re.compile(rf"(?<![\w.\-])([\"']?[\w.\-%]+[\"']?\s*=\s*)({value})")

    def mask(match: re.Match[str]) -> str:
        name = match.group(1).rstrip().rstrip("=")
        return match.group(1) + MASK if is_secret_name(name) else match.group(0)

    return pattern.sub(mask, text)


def _redacted_dsn(text: str) -> str:
    def mask(match: re.Match[str]) -> str:
        if is_secret_name(match.group("key")):
            return match.group("key") + match.group("eq") + MASK
        return match.group(0)

    return _redacted_pairs(_DSN_PAIR.sub(mask, text), _LOOSE_VALUE)


def _redacted_token(match: re.Match[str]) -> str:
    if match.group("assign") is not None:
        key, eq, value = match.group("key"), match.group("eq"), match.group("value")
        if is_secret_name(key):
            return f'{key}{eq}"{MASK}"'
        if value.startswith(("{", "[")):  # an inline table or array: each item on its own
            return key + eq + redacted_text(value)
        return key + eq + _redacted_value(value)
    if match.group("string") is not None:
        return _redacted_value(match.group("string"))
    return _redacted_uri(match.group("url"))


def _redacted_value(value: str) -> str:
    """A value as written: a quoted string's content redacted as a URL or key=value string
    when it holds one (or URLs inside when it holds text); anything else unchanged."""
    for quote in ('"""', "'''", '"', "'"):
        if value.startswith(quote):
            body = value[len(quote) :]
            end = quote if len(body) >= len(quote) and body.endswith(quote) else ""
            return quote + _redacted_inline(body[: len(body) - len(end)]) + end
    return _redacted_inline(value)


def _redacted_inline(body: str) -> str:
    if _SCHEME.match(body):
        return _redacted_uri(body)
    if _DSN_PAIR.search(body):
        return _redacted_dsn(body)
    return _URL.sub(lambda match: _redacted_uri(match.group()), body)
