"""Reading a source's signing key file (`portal-sync keys new` writes them).

The key is a secret: a file every user of the host can read or write is refused; one its
group may write, or one of our own its group may read (0600 is ours to set), is used with
a warning; another's file the group reads (a Kubernetes secret mounted 0440 for the pod's
group, root's) is as it has to be. Its content is never printed.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from schemas.errors import ConfigurationError
from schemas.signing import KeyFormatError, Signer

log = logging.getLogger(__name__)


def load_signer(path: Path, source: str | None = None) -> Signer:
    """The signing key in `path`; with `source`, it must be that source's key."""
    try:
        text = path.read_text(encoding="utf-8")
        status = path.stat()
        mode = stat.S_IMODE(status.st_mode)
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise ConfigurationError(f"signing key file {path}: {reason}") from None
    try:
        signer = Signer.from_key_file_text(text)
    except KeyFormatError as error:
        raise ConfigurationError(f"signing key file {path}: {error}") from None
    if source is not None and signer.source != source:
        raise ConfigurationError(
            f"signing key file {path} is a key of source {signer.source}, not of {source}"
        )
    if mode & 0o007:
        raise ConfigurationError(
            f"signing key file {path}: every user may read or write it (mode {mode:o}): "
            "make it 0600 (0440 for a mounted secret)"
        )
    if mode & 0o020 or (mode & 0o070 and status.st_uid == os.geteuid()):
        log.warning("signing key file %s is open to its group (mode %o): make it 0600",
                    path, mode)  # fmt: skip
    return signer
