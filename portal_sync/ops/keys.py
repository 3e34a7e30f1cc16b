"""`portal-sync keys new`: a source's Ed25519 signing key.

The private key goes to `<dir>/<source>.key` (mode 0600, a new directory 0700; an existing
file is never overwritten); the registry needs only the public key, printed as the TOML
inline table to add to the source's `public_keys`.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from schemas.errors import ConfigurationError, Refused
from schemas.identifiers import SOURCE_ID, SOURCE_ID_RULE
from schemas.signing import Signer, new_key_id


def default_keys_dir() -> Path:
    """Under the user's config dir (XDG): `~/.config/portal-sync/keys`."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "portal-sync" / "keys"


@dataclass(frozen=True)
class NewKey:
    path: Path
    signer: Signer
    shared_directory: bool  # the directory existed and others may enter it


def new_key(source: str, directory: Path | None = None) -> NewKey:
    """Make a key for `source`, write its private half; refuse to replace a key file."""
    if not SOURCE_ID.fullmatch(source):
        raise ConfigurationError(f"SOURCE must be a source id: {SOURCE_ID_RULE}")
    directory = directory or default_keys_dir()
    key_id = new_key_id(source, datetime.now(UTC).date(), secrets.token_hex(3))
    signer = Signer.generate(source, key_id)
    existed = directory.is_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not existed:
            directory.chmod(0o700)  # whatever the umask
        path = directory / f"{source}.key"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise Refused(
            f"{directory / f'{source}.key'} exists: a key is never overwritten "
            "(move it away first, or use --dir)"
        ) from None
    except OSError as error:
        raise ConfigurationError(f"cannot write in {directory}: {error.strerror}") from None
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)  # whatever the umask
        handle.write(signer.key_file_text())
        handle.flush()
        os.fsync(handle.fileno())
    shared = existed and bool(stat.S_IMODE(directory.stat().st_mode) & 0o077)
    return NewKey(path, signer, shared)
