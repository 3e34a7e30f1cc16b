"""Every printed URL goes through one redaction: whatever the password holds and wherever
it stands (authority, query string, libpq key=value, a deployment file), it never shows."""

from __future__ import annotations

import tomllib
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import make_url

from producers.deployment import load_deployment
from schemas.errors import ConfigurationError
from schemas.redaction import MASK, UNREADABLE, redacted_text
from store import redacted_url
from transport.config import KafkaConnection

# Any text but `*` (the mask itself, which would match across its edges).
PASSWORDS = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="*"), min_size=3
)
USERS = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
SCHEMES = st.sampled_from(["postgresql+psycopg", "postgresql", "postgres", "mysql+pymysql"])
QUERY_KEYS = st.sampled_from(["password", "PASSWORD", "Password", "sslpassword", "pass%77ord"])
DSN_KEYS = st.sampled_from(["password", "PASSWORD", "sslpassword", "'password'", '"password"'])
HOST = "db.example.vn:5432"
TAIL = "/portal?sslmode=verify-full&sslrootcert=/etc/ca.pem"


def _never_shows(text: str, secret: str, skeleton: str) -> None:
    """`skeleton` is `text` as it should print: a secret that is part of it proves nothing."""
    if secret in skeleton:
        return
    assert secret not in text, text


def _dsn_quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _dsn_bare(value: str) -> str:
    return "".join("\\" + c if c.isspace() or c in "\\'" else c for c in value)


@settings(max_examples=300)
@given(scheme=SCHEMES, user=USERS, password=PASSWORDS, encoded=st.booleans())
@example(scheme="postgresql+psycopg", user="sync", password="p@ss:w/rd?#x", encoded=False)
@example(scheme="postgresql", user="sync", password="a b@c", encoded=True)
def test_a_password_in_the_authority_never_shows(
    scheme: str, user: str, password: str, encoded: bool
) -> None:
    written = quote(password, safe="") if encoded else password
    url = f"{scheme}://{user}:{written}@{HOST}{TAIL}"
    skeleton = f"{scheme}://{user}:{MASK}@{HOST}{TAIL}"

    shown = redacted_url(url)

    assert shown == skeleton
    _never_shows(shown, password, skeleton)
    _never_shows(shown, written, skeleton)


@settings(max_examples=300)
@given(scheme=SCHEMES, user=USERS, key=QUERY_KEYS, password=PASSWORDS)
@example(scheme="postgresql", user="u", key="password", password="x&y=z@h")
def test_a_password_in_the_query_string_never_shows(
    scheme: str, user: str, key: str, password: str
) -> None:
    url = f"{scheme}://{user}@{HOST}{TAIL}&{key}={quote_plus(password)}&application_name=sync"
    skeleton = f"{scheme}://{user}@{HOST}{TAIL}&{key}={MASK}&application_name=sync"

    shown = redacted_url(url)

    assert shown == skeleton
    _never_shows(shown, password, skeleton)
    _never_shows(shown, quote_plus(password), skeleton)


@settings(max_examples=300)
@given(key=DSN_KEYS, password=PASSWORDS, quoted=st.booleans(), spaced=st.booleans())
@example(key="password", password="a b", quoted=True, spaced=False)
@example(key="password", password="it's", quoted=False, spaced=True)
def test_a_password_in_a_libpq_key_value_string_never_shows(
    key: str, password: str, quoted: bool, spaced: bool
) -> None:
    written = _dsn_quoted(password) if quoted else _dsn_bare(password)
    eq = " = " if spaced else "="
    dsn = f"host=db.example.vn port=5432 {key}{eq}{written} dbname=portal sslmode=verify-full"
    skeleton = f"host=db.example.vn port=5432 {key}{eq}{MASK} dbname=portal sslmode=verify-full"

    shown = redacted_url(dsn)

    assert shown == skeleton
    _never_shows(shown, password, skeleton)
    _never_shows(shown, written, skeleton)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("sqlite:////var/lib/portal-sync/store.db", "sqlite:////var/lib/portal-sync/store.db"),
        ("postgresql+psycopg://sync@db/portal", "postgresql+psycopg://sync@db/portal"),
        # An `@` past the authority: the host is hidden too, rather than the password shown.
        ("postgresql://u:pw@db/portal?application_name=a@b", "postgresql://u:***@b"),
        ("postgresql://db/portal?sslmode=require;password=pw", "postgresql://db/portal?sslmode=require;password=***"),
        ("host=db&password=pw", "host=db&password=***"),
        ("not a url: pw", UNREADABLE),
        ("", UNREADABLE),
    ],
)  # fmt: skip
def test_what_stays_readable_and_what_cannot_be_read(url: str, shown: str) -> None:
    assert redacted_url(url) == shown


def _toml_basic(value: str) -> str:
    escaped = "".join(
        '\\"' if c == '"' else "\\\\" if c == "\\" else f"\\u{ord(c):04x}"
        if ord(c) < 0x20 or ord(c) == 0x7F else c
        for c in value
    )  # fmt: skip
    return f'"{escaped}"'


def _toml_string(value: str, literal: bool) -> str:
    ok = literal and "'" not in value and all(ord(c) >= 0x20 and c != "\x7f" for c in value)
    return f"'{value}'" if ok else _toml_basic(value)


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [value] if isinstance(value, str) else []


PLACEMENTS = {
    "key": "password = {pw}\n",
    "quoted key": '"db password" = {pw}\n',
    "dotted key": "db.'password' = {pw}\n",
    "inline table": 'connection = {{ url = "sqlite:///x.db", password = {pw}, n = 3 }}\n',
    "url": "url = {url}\n",
    "url in an inline table": "connection = {{ url = {url} }}\n",
    "url in an array": "urls = [{url}, 'x']\n",
    "query": "url = {query}\n",
    "dsn": "dsn = {dsn}\n",
    "array": "tokens = [{pw}, {pw}]\n",
}


@settings(max_examples=300)
@given(placement=st.sampled_from(sorted(PLACEMENTS)), password=PASSWORDS, literal=st.booleans())
@example(placement="url", password='p@ss"w\\rd', literal=False)
def test_a_password_anywhere_in_a_deployment_file_never_shows(
    placement: str, password: str, literal: bool
) -> None:
    def document(secret: str) -> str:
        values = {
            "pw": _toml_string(secret, literal),
            "url": _toml_string(f"postgresql+psycopg://sync:{secret}@db/portal", literal),
            "query": _toml_string(f"postgresql://db/portal?password={quote_plus(secret)}", literal),
            "dsn": _toml_string(f"host=db password={_dsn_quoted(secret)}", literal),
        }
        return "[sources.connection]\n" + PLACEMENTS[placement].format(**values)

    text = document(password)
    values = " ".join(_strings(tomllib.loads(text)))  # the generated file is valid TOML
    assert any(f in values for f in (password, quote_plus(password), _dsn_quoted(password)))

    shown = redacted_text(text)

    skeleton = document(MASK)
    dsn = _dsn_quoted(password)[1:-1]
    for written in {
        password,
        quote_plus(password),
        dsn,
        *(_toml_basic(w)[1:-1] for w in (password, dsn)),
    }:
        _never_shows(shown, written, skeleton)


def test_the_deployment_file_printed_masks_quoted_keys_inline_tables_and_query_strings(
    tmp_path: Path,
) -> None:
    config = tmp_path / "sources.toml"
    config.write_text(
        """
[[sources]]
id = "hn-db"
adapter = "sql"
connection = { url = "postgresql+psycopg://sync:p@ss-1@db/hn?password=pw-2", "password" = "pw-3" }
[sources.mapping.extra]
"api token" = 'pw-4'
dsn = "host=db password='pw 5'"
inbox = "${INBOX}"
""",
        encoding="utf-8",
    )

    shown = load_deployment(config, environ={"INBOX": "in"}).redacted()

    for secret in ("p@ss-1", "ss-1", "pw-2", "pw-3", "pw-4", "pw 5"):
        assert secret not in shown
    assert "sync:***@db/hn?password=***" in shown and '"password" = "***"' in shown
    assert "${INBOX}" in shown and 'id = "hn-db"' in shown


def test_the_kafka_connection_printed_masks_credentials_in_server_urls() -> None:
    connection = KafkaConnection(bootstrap="SASL_SSL://sync:pw-1@k1:9093,k2:9093")
    assert "pw-1" not in connection.redacted() and "k2:9093" in connection.redacted()


def _sql_sources(directory: Path, *urls: str) -> Path:
    """A deployment file of one `sql` source a connection URL."""
    entries = [
        f'[[sources]]\nid = "db-{n}"\nadapter = "sql"\nconnection = {{ url = "{url}" }}\n'
        for n, url in enumerate(urls)
    ]
    config = directory / "sources.toml"
    config.write_text("".join(entries), encoding="utf-8")
    return config


def test_a_referenced_password_in_a_url_is_percent_encoded(tmp_path: Path) -> None:
    """`postgresql://sync:${PASSWORD}@db/tthc` with a password `p@ss`: the URL's host became
    `ss@db`, its tail went to the DNS resolver and the driver's error. A value inside the
    URL's credentials is percent-encoded now; one already encoded, a whole URL given by one
    reference, or a value after the `@` is taken as it is."""
    config = _sql_sources(
        tmp_path,
        "postgresql+psycopg://${USER}:${PASSWORD}@${HOST}/tthc",
        "${WHOLE}",
        "postgresql+psycopg://sync:${ENCODED}@db/tthc",
    )
    environ = {
        "USER": "đồng bộ",
        "PASSWORD": "p@ss:/w?rd#1",
        "HOST": "db.tthc.local",
        "WHOLE": "postgresql+psycopg://sync:x@db/hcm",
        "ENCODED": "p%40ss",
    }
    entries = load_deployment(config, environ=environ).sources
    urls = [make_url(entry.connection["url"]) for entry in entries]
    assert (urls[0].username, urls[0].password, urls[0].host) == (
        "đồng bộ",
        "p@ss:/w?rd#1",
        "db.tthc.local",
    )
    assert (urls[1].password, urls[1].database) == ("x", "hcm")
    assert urls[2].password == "p@ss"


def test_a_secret_can_come_from_a_file(tmp_path: Path) -> None:
    """A province's database password came from the environment only; a Kubernetes or
    systemd secret is a file. `${file:PATH}` reads one (relative to the deployment file),
    its last line break off, percent-encoded inside a URL's credentials as `${NAME}` is."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "db-password").write_text("p@ss w\n", encoding="utf-8")
    url = "postgresql+psycopg://sync:${file:secrets/db-password}@db/tthc"
    loaded = load_deployment(_sql_sources(tmp_path, url), environ={})
    (entry,) = loaded.sources
    assert make_url(entry.connection["url"]).password == "p@ss w"
    shown = loaded.redacted()
    assert "sync:***@db/tthc" in shown and "p@ss" not in shown

    (tmp_path / "secrets" / "db-password").unlink()
    with pytest.raises(ConfigurationError, match=r"cannot read the secret file .*db-password"):
        load_deployment(tmp_path / "sources.toml", environ={})
