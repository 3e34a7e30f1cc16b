"""`portal-sync publish`: events from JSON Lines to their change topics."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from portal_sync.ops.dlq import CaughtUp
from portal_sync.settings import Settings
from schemas import ChangeEvent, InvalidEvent, message_key, parse_event
from schemas.dead_letter import Reason
from schemas.signing import Signer
from store import Store
from transport.admin import ensure_topics
from transport.publisher import Publisher

if TYPE_CHECKING:
    from consumers.registry import Registry

OTHER_SOURCE = "source is not the signing key's source"
# Sent unsigned, the worker would letter it `unsigned`, and as the newest message of its
# compaction key the unsigned event would outlive the source's signed one in the topic.
SIGNED_ONLY = (
    "the source registry wants this source's events signed: publish with --sign-key "
    "(the source's own key, where its producer runs)"
)
STALE_VERSION = "stale_version"
HELD_BACK = "held_back"
# Sent, a version older than the store's (or than one sent before it) would be the last
# event of its compaction key: the log cleaner would remove the newer one, and a rebuild
# would bring the old data back. An equal one is not sent either (a file published again):
# with other data, the store would ignore it and the topic keep it.
OLDER = "version {version} is older than the {where}'s {newer} of its source's view"
PRESENT = ("present", "")
BEHIND = (
    "the worker has not applied its partition up to the log's end (a newer event of its "
    "key may wait there): publish it again once it has"
)


@dataclass
class PublishResult:
    sent: int = 0
    invalid: list[tuple[int, str, str]] = field(default_factory=list)  # line, code, message
    present: int = 0  # with a store: its version is the store's or an earlier line's


def publish_lines(
    settings: Settings,
    lines: Iterable[bytes],
    signer: Signer | None = None,
    store: Store | None = None,
    wait: float = 30.0,
    registry: Registry | None = None,
) -> PublishResult:
    """Validate every line; send the valid ones and wait for the broker's acknowledgement.
    With a `signer`, each event is signed, and a line of another source than the key's is
    refused (`bad_signature`): the worker would refuse it. With a `store` (an operator's
    corrections), as `dlq redrive` does: a version older than the store's of its source's
    view, or than an earlier line's, is refused (`stale_version`), and so is one whose
    partition the worker has not applied up to the log's end within `wait` seconds in all
    (`held_back`); an equal one is not sent (`present`: a file published again). The
    versions sent are kept for the run (one per view). Without a signer, a line the
    `registry` wants signed (all, or its source's) is refused (`unsigned`)."""
    result = PublishResult()
    caught_up = CaughtUp(settings, store, wait) if store is not None else None
    sent: dict[tuple[str, str, str], int] = {}
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
            if signer is None and registry is not None and _wants_signed(registry, event):
                result.invalid.append((number, Reason.UNSIGNED, SIGNED_ONLY))
                continue
            if store is not None and caught_up is not None:
                topic = topics.change_topic(event.entity)
                refused = _not_newer(store, caught_up, sent, event, topic)
                if refused == PRESENT:  # a file published again: not sent, no error
                    result.present += 1
                    continue
                if refused is not None:
                    result.invalid.append((number, *refused))
                    continue
                sent[(event.entity, event.key, event.source)] = event.version
            publisher.send_event(event, signer)
        result.sent = publisher.flush()
    finally:
        publisher.close()
    return result


def _wants_signed(registry: Registry, event: ChangeEvent) -> bool:
    return registry.require_signatures or registry.signs(event.source)


def _not_newer(
    store: Store,
    caught_up: CaughtUp,
    sent: dict[tuple[str, str, str], int],
    event: ChangeEvent,
    topic: str,
) -> tuple[str, str] | None:
    """Why this correction must not be sent (code, message), or None."""
    view = (event.entity, event.key, event.source)
    newer: int | None
    if view in sent:
        newer, where = sent[view], "file"
    else:
        key = message_key(event.entity, event.key, event.source)
        if not caught_up(caught_up.partition(topic, key)):
            return HELD_BACK, BEHIND
        newer, where = store.view_version(*view), "store"
    if newer is not None and event.version == newer:
        return PRESENT
    if newer is not None and event.version < newer:
        return STALE_VERSION, OLDER.format(version=event.version, where=where, newer=newer)
    return None
