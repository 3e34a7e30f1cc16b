"""`portal-sync publish`: events from JSON Lines to their change topics."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from portal_sync.settings import Settings
from schemas import InvalidEvent, parse_event
from schemas.dead_letter import Reason
from schemas.signing import Signer
from store import Store
from transport.admin import ensure_topics
from transport.publisher import Publisher

OTHER_SOURCE = "source is not the signing key's source"
STALE_VERSION = "stale_version"
# Sent, an older version would be the last event of its compaction key: the log cleaner
# would remove the newer one the store holds, and a rebuild would bring the old data back.
OLDER = "version {version} is older than the store's {stored} of its source's view"


@dataclass
class PublishResult:
    sent: int = 0
    invalid: list[tuple[int, str, str]] = field(default_factory=list)  # line, code, message


def publish_lines(
    settings: Settings,
    lines: Iterable[bytes],
    signer: Signer | None = None,
    store: Store | None = None,
) -> PublishResult:
    """Validate every line; send the valid ones and wait for the broker's acknowledgement.
    With a `signer`, each event is signed, and a line of another source than the key's is
    refused (`bad_signature`): the worker would refuse it. With a `store`, a version older
    than the store holds of its source's view is refused (`stale_version`); an equal one
    is a duplicate (a topic migration sends those), harmless."""
    result = PublishResult()
    topics = settings.topics()
    ensure_topics(settings.connection(), topics, needed=topics.change_topics())
    publisher = Publisher(settings.connection(), settings.topics(), client_id="portal-sync-publish")
    try:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                event = parse_event(line.rstrip(b"\r\n")).event
            except InvalidEvent as error:
                result.invalid.append((number, error.code, error.message))
                continue
            if signer is not None and event.source != signer.source:
                result.invalid.append((number, Reason.BAD_SIGNATURE, OTHER_SOURCE))
                continue
            if store is not None:
                stored = store.view_version(event.entity, event.key, event.source)
                if stored is not None and event.version < stored:
                    message = OLDER.format(version=event.version, stored=stored)
                    result.invalid.append((number, STALE_VERSION, message))
                    continue
            publisher.send_event(event, signer)
        result.sent = publisher.flush()
    finally:
        publisher.close()
    return result
