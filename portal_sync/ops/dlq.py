"""`portal-sync dlq`: list, show and re-drive dead letters.

A dead letter's id is `<partition>:<offset>` in the dead-letter topic (the topic has one
partition, so the offset alone is accepted too). Re-driving re-publishes the original
bytes to the original topic, with header `ps.attempt` carrying the attempt count and the
original's signature headers (`ps.sig`, `ps.kid`, `ps.origin.timestamp`), and
records it in the store (`dead_letter_redrives`): each dead letter is re-driven once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from consumers.config import RULES_FILES, load_registry
from consumers.registry import Registry
from consumers.signatures import check_signer, signed_at_ms, verify
from portal_sync.ops.access import checked_operator
from portal_sync.ops.rules import registry_missing
from portal_sync.settings import Settings
from schemas import ENTITIES
from schemas.dead_letter import (
    DEAD_LETTER_REASONS,
    HEADER_PREFIX,
    KEPT_HEADERS,
    letter_from_line,
)
from schemas.errors import RecordError, Refused, TransientError
from schemas.identifiers import (
    LONG_NUMBER,
    REFERENCE_PREFIX,
    SOURCE_ID,
    ReferenceKey,
    key_reference,
    mask_key,
)
from schemas.partitioning import message_key, partition_for
from schemas.signing import KEY_ID_HEADER
from schemas.validation import MAX_EVENT_BYTES
from store import Store
from store.purge import touches, undoable_purges
from transport import admin
from transport.publisher import Publisher
from transport.reader import TP, Message, OffsetRange, RangeReader, Selection, nothing_before
from transport.topics import Topics

log = logging.getLogger(__name__)

# Headers every dead letter portal-sync writes carries (schemas.dead_letter); a letter
# without one was not written by portal-sync, or lost it.
REQUIRED_HEADERS = ("ps.reason.code", "ps.origin.topic", "ps.failed_at")


@dataclass(frozen=True)
class DeadLetterRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason_code: str
    reason: str
    origin_topic: str
    origin_partition: str
    origin_offset: str
    failed_at: datetime | None
    attempt: int
    source: str | None  # from the event, when it could be read
    unreadable: tuple[str, ...] = ()  # what could not be read, e.g. "ps.failed_at: not a time"
    kept: tuple[tuple[str, bytes], ...] = ()  # the original's signature and first send time

    @property
    def id(self) -> str:
        return f"{self.partition}:{self.offset}"

    @property
    def signed_by(self) -> str | None:
        """The key id (`ps.kid`) the original message named, if any."""
        for name, value in self.kept:
            if name == KEY_ID_HEADER:
                return value.decode("utf-8", "backslashreplace")
        return None

    @property
    def redrivable(self) -> bool:
        """Only events read from a change topic go back to one; rows a producer rejected
        are fixed at their source; a letter that does not say where it came from stays."""
        return bool(self.origin_topic) and not self.origin_topic.startswith("source:")


@dataclass(frozen=True)
class Filters:
    reasons: list[str] | None = None
    source: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    ids: list[str] | None = None
    # The IDs named that a kept letter answered to (`p:o`, or the offset alone).
    matched: set[str] = field(default_factory=set)

    def keep(self, letter: DeadLetterRecord) -> bool:
        named = None
        if self.ids is not None:
            named = {letter.id, str(letter.offset)} & set(self.ids)
            if not named:
                return False
        if self.reasons and letter.reason_code not in self.reasons:
            return False
        if self.source and letter.source != self.source:
            return False
        when = letter.failed_at
        if self.since and (when is None or when < self.since):
            return False
        if self.until and (when is None or when >= self.until):
            return False
        self.matched.update(named or ())
        return True

    def unmatched(self) -> list[str]:
        """The IDs named that no letter kept answered to."""
        return sorted(set(self.ids or ()) - self.matched)


def read_dead_letters(settings: Settings, filters: Filters | None = None) -> list[DeadLetterRecord]:
    """Every dead letter the topic retains that passes the filters, oldest first."""
    return list(iter_dead_letters(settings, filters))


def iter_dead_letters(
    settings: Settings, filters: Filters | None = None
) -> Iterator[DeadLetterRecord]:
    """`read_dead_letters` one by one, as they are read: a letter the filters refuse is
    never kept (a topic's letters can hold up to 1 MiB each)."""
    filters = filters or Filters()
    for message in _dead_letter_messages(settings, filters.ids):
        letter = _letter(message)
        if filters.keep(letter):
            yield letter


def _dead_letter_messages(settings: Settings, ids: list[str] | None = None) -> Iterator[Message]:
    """Every message of the dead-letter topic, from its log start to its end now; with
    `ids`, only the offsets they name (`dlq show 3:120` read the whole topic, millions of
    letters at national scale, for one)."""
    with RangeReader(settings.connection()) as reader:
        ranges = reader.resolve(Selection([settings.topics().dead_letters]))
        if ids is not None:
            ranges = _named(ranges, ids)
        for batch in reader.read(ranges):
            yield from batch


_ID = re.compile(r"(?:([0-9]{1,9}):)?([0-9]{1,19})")


def _named(ranges: Mapping[TP, OffsetRange], ids: Iterable[str]) -> dict[TP, OffsetRange]:
    """Of each partition's range, the part from the first offset the IDs name in it to
    the last (`p:o` in partition p, an offset alone in every partition); a partition none
    names is left out. An ID of neither form names nothing."""
    anywhere: list[int] = []
    by_partition: dict[int, list[int]] = {}
    for each in ids:
        if (found := _ID.fullmatch(each)) is None:
            continue
        partition, offset = found.groups()
        if partition is None:
            anywhere.append(int(offset))
        else:
            by_partition.setdefault(int(partition), []).append(int(offset))
    narrowed: dict[TP, OffsetRange] = {}
    for tp, (start, end) in ranges.items():
        offsets = by_partition.get(tp[1], []) + anywhere
        if offsets and (first := max(start, min(offsets))) < (last := min(end, max(offsets) + 1)):
            narrowed[tp] = (first, last)
    return narrowed


def _letter(message: Message) -> DeadLetterRecord:
    """A dead letter as far as it can be read. Anyone who can write to the topic can put
    anything there: a header or value that cannot be read gets a neutral default and is
    named in `unreadable`; it never stops the listing of the rest."""
    problems: list[str] = []
    headers = _headers(message.headers, problems)
    origin_topic = headers.get("ps.origin.topic", "")
    origin_partition = headers.get("ps.origin.partition", "")
    origin_offset = headers.get("ps.origin.offset", "")
    if not origin_topic.startswith("source:"):  # from a change topic: Kafka coordinates
        _integer("ps.origin.partition", origin_partition or "0", problems)
        _integer("ps.origin.offset", origin_offset or "0", problems)
    attempt = _integer("ps.attempt", headers.get("ps.attempt", "1"), problems)
    source = _source_of(message.value, problems)
    if source is None and origin_topic.startswith("source:"):
        # A producer's letter (a file it could not read, a row it could not map): the
        # source is its producer's, whose value is no event (`--source` missed them).
        source = _source_id(origin_topic.removeprefix("source:"))
    return DeadLetterRecord(
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        reason_code=headers.get("ps.reason.code") or "unknown",
        reason=headers.get("ps.reason.message", ""),
        origin_topic=origin_topic,
        origin_partition=origin_partition,
        origin_offset=origin_offset,
        failed_at=_time("ps.failed_at", headers.get("ps.failed_at"), problems),
        attempt=max(attempt or 1, 1),
        source=source,
        unreadable=tuple(problems),
        kept=tuple((name, value) for name, value in message.headers if name in KEPT_HEADERS),
    )


def _headers(raw: Iterable[tuple[str, bytes]], problems: list[str]) -> dict[str, str]:
    """The `ps.*` headers as text (bytes that are not UTF-8 shown as `\\xNN`)."""
    headers: dict[str, str] = {}
    for name, value in raw:
        if not name.startswith(HEADER_PREFIX):
            continue
        try:
            headers[name] = (value or b"").decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"{name}: not UTF-8")
            headers[name] = value.decode("utf-8", "backslashreplace")
    problems.extend(f"{name}: missing" for name in REQUIRED_HEADERS if name not in headers)
    return headers


def _integer(name: str, text: str, problems: list[str]) -> int | None:
    if re.fullmatch(r"[0-9]{1,18}", text):
        return int(text)
    _report(problems, name, "not an integer")
    return None


def _time(name: str, text: str | None, problems: list[str]) -> datetime | None:
    if text is None:
        return None  # already reported as missing
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        _report(problems, name, "not a time")
        return None
    if moment.tzinfo is None:  # not comparable with --since/--until
        _report(problems, name, "no UTC offset")
        return None
    if not 1 < moment.year < 9999:  # the clocks' skew added or taken away overflowed
        _report(problems, name, "out of range")
        return None
    return moment


def _report(problems: list[str], name: str, what: str) -> None:
    """One problem per header: a header that is not UTF-8 is not also "not a time"."""
    if not any(problem.startswith(f"{name}: ") for problem in problems):
        problems.append(f"{name}: {what}")


def _source_of(value: bytes | None, problems: list[str]) -> str | None:
    """The event's `source`, when the value is a JSON object (orjson: a nesting deeper
    than 1024 levels is an error, never a RecursionError)."""
    if not value:
        problems.append("value: empty")
        return None
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError as error:
        if "depth limit" in str(error):
            problems.append("value: nested over 1024 levels")
            return None
        try:  # what orjson refuses and the worker's parser reads (1e400, "\ud800")
            event = json.loads(value.decode("utf-8"))
        except UnicodeDecodeError:
            problems.append("value: not UTF-8")
            return None
        except (ValueError, RecursionError):
            problems.append("value: not JSON")
            return None
    if not isinstance(event, dict):
        problems.append(f"value: JSON {_kind(event)}, not an object")
        return None
    source = event.get("source")
    return _source_id(source) if isinstance(source, str) else None


def _source_id(source: str) -> str | None:
    if not SOURCE_ID.fullmatch(source) or LONG_NUMBER.search(source):
        return None  # not a source's id: perhaps a name, a personal id or a phone number
    return source


def _event_of_its_key(letter: DeadLetterRecord, topics: Topics) -> tuple[str, str, str, int] | None:
    """The letter's event (entity, key, source, version), when its value reads as an event
    whose own topic and compaction key are the letter's origin topic and key, and it fits
    that topic. Only such a letter can go back: anything else sent under its key would
    become that key's last message (a null value a tombstone), and the log cleaner would
    remove the key's events before it, which a rebuild then lacks; a letter over the
    contract's size would be refused again (and one over the change topic's limit would
    stop the redrive at each run)."""
    value = letter.value
    if not value or len(value) > MAX_EVENT_BYTES:  # refused again as too large
        return None
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict):
        return None
    entity, key, source, version = (event.get(n) for n in ("entity", "key", "source", "version"))
    if not (isinstance(entity, str) and isinstance(key, str) and isinstance(source, str)):
        return None
    if type(version) is not int or len(key) > 64 or len(source) > 64 or len(entity) > 16:
        return None
    if entity not in ENTITIES or letter.origin_topic != topics.change_topic(entity):
        return None
    if letter.key != message_key(entity, key, source):
        return None
    return entity, key, source, version


def _superseded(store: Store, event: tuple[str, str, str, int]) -> bool:
    """Whether the store already holds the letter's version, or a newer one, of its
    source's view of its record."""
    entity, key, source, version = event
    stored = store.view_version(entity, key, source)
    return stored is not None and stored >= version


class RegistryMissing(Refused):
    """A redrive without the registry the store's worker runs with."""


def _registry_to_vouch(settings: Settings, store: Store) -> Registry:
    """The registry whose keys vouch for a letter's claims (`_vouched`): the one this run
    is given; development mode's (every claim taken) when neither this run nor the store's
    worker has one. Refused when the worker has one and this run has not: no letter's
    claim could be taken, and an older letter of a key would go after a newer one."""
    if registry_missing(store, settings):
        raise RegistryMissing(
            "this redrive runs without a registry, but the worker of this store runs with "
            f"{store.meta(RULES_FILES) or 'one'}: set PORTAL_SYNC_REGISTRY as the worker "
            "has it (a letter's version is only a claim without its source's keys)"
        )
    return load_registry(settings.registry)


def _vouched(letter: DeadLetterRecord, source: str, registry: Registry) -> bool:
    """Whether the letter's own signature shows that its event is `source`'s: checked as
    the worker checks it (`consumers.signatures`), with the letter's original headers.

    A letter is any writer's message that failed, and its version only a claim: anyone
    who may write a change topic can plant a letter that names another source and the
    highest version. Only a vouched letter's version stops an older letter of its key
    from being sent in the same run; else such a forgery, re-driven (and refused again)
    first, had the source's genuine letter counted superseded and recorded, never sent."""
    if registry.development_mode:
        return True  # nothing is signed: any writer is any source, as for the worker
    headers = list(letter.kept)
    at_ms = signed_at_ms(headers, None, int(time.time() * 1000))
    try:
        key = verify(letter.value, headers, registry.keys, at_ms, registry.require_signatures)
        check_signer(key, source, key is None and registry.signs(source))
    except RecordError:
        return False
    return True  # signed by the source, or unsigned where the worker takes it unsigned


def _kind(value: object) -> str:
    names = {list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


@dataclass
class RedriveSummary:
    selected: int = 0
    redriven: int = 0
    already_redriven: int = 0
    not_redrivable: int = 0
    # the store holds the same or a newer version of that source's view, or this run sent one
    superseded: int = 0
    held_back: int = 0  # their partition's worker had not caught up (`CaughtUp`)
    # letters of a source purged after they failed, not sent (`redrive`'s `despite_purge`)
    purged: int = 0
    purged_sources: set[str] = field(default_factory=set)
    behind: set[tuple[str, int]] = field(default_factory=set)  # those partitions
    # Per source re-driven: the entities, and the earliest time one of its letters failed
    # (None: one did not say), for the purges of that source since (`purged_since`).
    sources: dict[str, tuple[set[str], datetime | None]] = field(default_factory=dict)

    def note_sent(self, source: str, entity: str, failed_at: datetime | None) -> None:
        entities, earliest = self.sources.get(source, (set(), failed_at))
        entities.add(entity)
        if earliest is not None and (failed_at is None or failed_at < earliest):
            earliest = failed_at
        self.sources[source] = (entities, earliest)

    def purged_since(self, store: Store, skew: timedelta = timedelta(0)) -> list[str]:
        """The source purges recorded after a re-driven letter of their source failed
        (`purges_after`; the worker's clock against the operator's, less their allowed
        `skew`): each such letter was applied as any other, unless the store held a newer
        version of its view, and can bring back what the purge removed."""
        from portal_sync.ops.purge import purges_after

        return [
            found
            for source, (entities, earliest) in sorted(self.sources.items())
            for found in purges_after(
                store, None if earliest is None else earliest - skew, source, entities
            )
        ]


class CaughtUp:
    """Whether the store has applied the partition of a message key in a change topic up
    to the log end it had when first asked in this run: its next offset there, or no
    message left before that end (a transaction's marker ends a log without one). Waits
    for that at most `wait` seconds in all the run. Only then does the store's version of
    a view say whether a letter is superseded: a newer event of the same key still
    unapplied in the log would come before the re-driven one, which the log cleaner would
    then keep as the key's last."""

    def __init__(self, settings: Settings, store: Store, wait: float) -> None:
        self.settings = settings
        self.store = store
        self.wait = wait
        self.deadline: float | None = None
        self.ends: dict[str, dict[tuple[str, int], int]] = {}
        self.known: dict[tuple[str, int], bool] = {}

    def partition(self, topic: str, key: bytes) -> tuple[str, int]:
        """The message's partition, as the publisher places it (the topic's own count)."""
        if topic not in self.ends:
            self.ends[topic] = admin.end_offsets(self.settings.connection(), [topic])
        return topic, partition_for(key, max(len(self.ends[topic]), 1))

    def __call__(self, place: tuple[str, int]) -> bool:
        if place not in self.known:
            if self.deadline is None:
                self.deadline = time.monotonic() + self.wait
            end = self.ends[place[0]].get(place, 0)
            last: int | None = None
            asked: int | None = None  # the store's offset last asked at, and answered no
            still_since, settled = time.monotonic(), False
            while True:
                applied = self.store.stored_offsets([place]).get(place)
                now = time.monotonic()
                if (applied or 0) >= end or now >= self.deadline:
                    break
                if applied != last:
                    last, still_since = applied, now
                elif (
                    applied is not None
                    and applied != asked
                    and now - still_since >= SETTLED_AFTER_SECONDS
                ):
                    # The store's offset stays put before the end: a log that ends in a
                    # transaction's markers (exactly-once writers) or aborted events is
                    # applied with its last event, before its end; the whole wait was
                    # spent on every such partition before it was asked. Asked once per
                    # store offset (a read of the topic each time): no is no while the
                    # worker stands still, but for a transaction still open, asked again
                    # at the end of the wait.
                    settled = _nothing_before(self.settings, place, applied, end)
                    if settled:
                        break
                    asked = applied
                time.sleep(0.25)
            if applied is None:  # none applied: from the log's start
                with admin.cluster(self.settings.connection()) as c:
                    applied = c.beginning_offsets([place]).get(place, 0)
            self.known[place] = (
                settled or applied >= end or _nothing_before(self.settings, place, applied, end)
            )
        return self.known[place]


# How long the store's offset of a partition stays put before the redrive asks whether
# anything committed is left before the log's end (one read of the topic each time).
SETTLED_AFTER_SECONDS = 1.0


def _nothing_before(settings: Settings, place: tuple[str, int], start: int, end: int) -> bool:
    """No committed message left in [start, end); not known (held back) while a transaction
    still open holds back that range or it cannot be read now."""
    try:
        return nothing_before(settings.connection(), place, start, end)
    except TransientError as error:
        log.info("%s:%d: nothing left unknown (%s)", *place, type(error).__name__)
        return False


def redrive(
    settings: Settings,
    store: Store,
    letters: Iterable[DeadLetterRecord],
    wait: float = 30.0,
    operator: str | None = None,
    despite_purge: bool = False,
) -> RedriveSummary:
    """Re-publish each selected dead letter to its original topic once, and record it.
    Only to one of the change topics, and only an event of its own key and topic
    (`_event_of_its_key`): a letter whose origin is unknown, or a source, or any other
    topic, and one that is no such event, counts as not re-drivable. The letters are taken
    one at a time as they come (`iter_dead_letters`): a broad selection is never held in
    memory, only the versions this run sent.

    A re-driven event becomes the last of its compaction key: never one older than what
    the store holds, nor than what this run already sent of the key and its signature
    vouches for (`_vouched`; superseded: without the worker's registry, refused), nor
    while its partition has events the worker has not applied yet (held back: `CaughtUp`,
    waiting up to `wait` seconds in all the run). What a source sends of the same key while
    the redrive runs may still come before it; the live store keeps the newer either way.

    A letter of a source purged (`source purge`: of its entity or of all, or of its own
    record) after it failed, by the worker's clock against the operator's less their
    allowed skew, is not sent unless `despite_purge` (counted `purged`, not recorded): the
    purge removed the source's views, so the store cannot tell it is older than the
    source's data, and it would bring back what the purge removed. Once the source was
    snapshotted again, its letters are superseded or newer, and `despite_purge` sends them
    (the summary's `sources` name those sent so, for the warning: `purged_since`)."""
    summary = RedriveSummary()
    who = checked_operator(operator)  # recorded with each redrive
    topics = settings.topics()
    caught_up = CaughtUp(settings, store, wait)
    sent: dict[tuple[str, str, str], int] = {}
    topic = topics.dead_letters
    # The topic's id (a topic created again numbers its letters from 0 again); '' when the
    # cluster does not say: then the place alone, as recorded before migration 0014.
    topic_id = admin.topic_ids(settings.connection(), [topic]).get(topic, "")
    # The redrives recorded of letters the topic still holds
    starts = admin.beginning_offsets(settings.connection(), [topic])
    done = store.redriven(topic, topic_id, {p: start for (_, p), start in starts.items()})
    skew = timedelta(seconds=settings.max_clock_skew_seconds)
    purged = undoable_purges(store)
    secret = settings.reference_key()  # a purge of one record names it by its reference
    vouching = _registry_to_vouch(settings, store)
    publisher = Publisher(settings.connection(), settings.topics(), client_id="portal-sync-redrive")
    try:
        for letter in letters:
            summary.selected += 1
            if _redriven_already(done, letter, skew):
                summary.already_redriven += 1
                continue
            event = _event_of_its_key(letter, topics) if letter.redrivable else None
            if event is None:
                summary.not_redrivable += 1
                continue
            after_purge = _purged_after(purged, event, letter.failed_at, skew, secret)
            if after_purge and not despite_purge:
                summary.purged += 1
                summary.purged_sources.add(event[2])
                continue
            claim = partial(
                store.claim_redrive, topic, letter.partition, letter.offset, _code(letter),
                letter.origin_topic, topic_id, who,
                None if letter.failed_at is None else letter.failed_at + skew,
            )  # fmt: skip
            if event[3] <= sent.get(event[:3], -1):  # this run sent that key's newer one
                # Recorded as the redrive it is part of: a run again does not send it.
                with claim():
                    summary.superseded += 1
                continue
            place = caught_up.partition(letter.origin_topic, letter.key or b"")
            if not caught_up(place):
                summary.held_back += 1
                summary.behind.add(place)
                continue
            if _superseded(store, event):
                # Sent again, it would be the last event of its compaction key: the log
                # cleaner would then remove the newer version (or delete) the store holds,
                # and a rebuild would bring the old one back.
                summary.superseded += 1
                continue
            with claim() as claimed:  # recorded only once the broker has it
                if not claimed:  # another redrive sent it since this one began
                    summary.already_redriven += 1
                    continue
                # The original signature goes back as it was: the worker verifies it again.
                headers = [("ps.attempt", str(letter.attempt).encode()), *letter.kept]
                publisher.send(letter.origin_topic, letter.key, letter.value, headers)
                publisher.flush()
            summary.redriven += 1
            # every letter sent: a purge that began while the redrive ran is warned of too
            summary.note_sent(event[2], event[0], letter.failed_at)
            if _vouched(letter, event[2], vouching):  # else its version is anyone's claim
                sent[event[:3]] = event[3]
    finally:
        publisher.close()
    return summary


def _purged_after(
    purged: list[dict[str, Any]],
    event: tuple[str, str, str, int],
    failed_at: datetime | None,
    skew: timedelta,
    secret: ReferenceKey | None,
) -> bool:
    """Whether one of the `purged` (`undoable_purges`) took the letter's record away after
    the letter failed at `failed_at` (any, when the letter does not say), less the clocks'
    `skew`: a purge of its source, of its entity or of all, or of its key. A purge of one
    key names it by its reference (`source purge --key`), which is compared only where it
    can be: a masked key (no reference key then) matches every key of the same mask, and
    a keyed one cannot be checked without a reference key here: both hold the letter back
    (a reference key rotated since the purge is not seen: re-drive with care)."""
    entity, key, source, _ = event
    moment = None if failed_at is None else failed_at - skew
    for row in purged:
        if not touches(row, moment, source, {entity}):
            continue
        reference = row["reference"]
        if reference is None or _may_name(reference, key, secret):
            return True
    return False


def _may_name(reference: str, key: str, secret: ReferenceKey | None) -> bool:
    """Whether a purge's `reference` may name `key` (`_purged_after`)."""
    if not reference.startswith(REFERENCE_PREFIX):
        return reference == mask_key(key)
    return secret is None or reference == key_reference(key, secret)


def _code(letter: DeadLetterRecord) -> str:
    return letter.reason_code if letter.reason_code in DEAD_LETTER_REASONS else "unknown"


def _redriven_already(
    done: Mapping[tuple[int, int], datetime | None],
    letter: DeadLetterRecord,
    skew: timedelta,
) -> bool:
    """Whether the letter's redrive is recorded (`Store.redriven`). A redrive recorded
    without the topic's id may be of an earlier topic of the same name, whose letter had
    the same place: it stands for this letter only if this one had failed by then, by the
    worker's clock against the operator's, less the clocks' allowed skew. Else the letter
    is re-driven: at worst its event is sent twice, which the version rule makes a
    duplicate; never re-driven, it would be lost. So is a letter that does not say when it
    failed."""
    if (place := (letter.partition, letter.offset)) not in done:
        return False
    recorded_at = done[place]
    if recorded_at is None:  # recorded with this topic's id
        return True
    return letter.failed_at is not None and letter.failed_at <= recorded_at - skew


Letter = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]  # key, value, headers


@dataclass(frozen=True)
class ImportSummary:
    imported: int
    skipped: list[int]  # line numbers that hold no kept letter (with skip_bad)
    present: int = 0  # letters the topic held already (an earlier import): not sent again
    repeated: int = 0  # lines that repeat a letter of the file: sent once
    expired: int = 0  # failed longer ago than the topic keeps letters: not sent


def import_letters(settings: Settings, path: Path, skip_bad: bool = False) -> ImportSummary:
    """Publish the dead letters a producer kept on disk (`<state_dir>/<source
    id>.dead-letters.jsonl`: its cluster does not let a source write the dead letters)
    into the dead-letter topic, as they are. Every line is read before any is sent: a line
    that is no letter a producer kept (a line torn by a crash, a letter naming a change
    topic as its origin or carrying a signature) refuses the file, or with `skip_bad` is
    skipped and reported.

    Idempotent: a letter the topic already holds, byte for byte (an earlier import of the
    file, whole or interrupted), is not sent again, nor one the file holds twice. The topic
    is read for that first, from its log start; what is kept of it meanwhile is only the
    file's letters. A letter that failed longer ago than the topic's retention (less the
    clocks' skew) is not sent: the topic would have removed it by now, so it may have been
    imported and removed already, and its record is not to be kept longer than that."""
    letters: dict[bytes, Letter] = {}
    skipped = []
    lines = 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                letter = _kept_letter(json.loads(line))
            except (ValueError, KeyError, TypeError) as error:
                if not skip_bad:
                    why = str(error) if isinstance(error, NotKept) else "not a kept dead letter"
                    raise Refused(
                        f"{path.name}, line {number}: {why} (--skip-bad imports the others)"
                    ) from None
                skipped.append(number)
                continue
            lines += 1
            letters.setdefault(letter_digest(*letter), letter)
    expired = _expired(settings, letters)
    for digest in expired:
        del letters[digest]
    present = _held_by_topic(settings, set(letters)) if letters else set()
    todo = [letter for digest, letter in letters.items() if digest not in present]
    if todo:
        publisher = Publisher(
            settings.connection(), settings.topics(), client_id="portal-sync-import"
        )
        try:
            for key, value, headers in todo:
                publisher.send_dead_letter(key, value, headers)
            publisher.flush()
        finally:
            publisher.close()
    repeated = lines - len(letters) - len(expired)
    return ImportSummary(len(todo), skipped, len(present), repeated, len(expired))


def _expired(settings: Settings, letters: Mapping[bytes, Letter]) -> list[bytes]:
    """The letters that failed before the dead-letter topic's retention less the clocks'
    skew; a letter whose `ps.failed_at` does not read as a time is not one of them."""
    retention = _retention_ms(settings) if letters else None
    if retention is None:
        return []
    skew = timedelta(seconds=settings.max_clock_skew_seconds)
    oldest = datetime.now(UTC) - timedelta(milliseconds=retention) + skew
    expired = []
    for digest, (_, _, headers) in letters.items():
        try:
            failed = datetime.fromisoformat(dict(headers)["ps.failed_at"].decode())
        except (KeyError, ValueError):
            continue
        if failed.tzinfo is not None and failed <= oldest:
            expired.append(digest)
    return expired


def _retention_ms(settings: Settings) -> int | None:
    """The dead-letter topic's `retention.ms` as the cluster applies it (None: for ever);
    the setting's where the operator may not describe the topic's configs."""
    topics = settings.topics()
    try:
        with admin.cluster(settings.connection()) as cluster:
            return cluster.retention_ms(topics.dead_letters)
    except Refused as error:
        hours = topics.dead_letter_retention_hours
        log.warning("the dead-letter topic's retention.ms not read (%s): the setting's "
                    "%d hours are used", type(error).__name__, hours)  # fmt: skip
        return hours * 3_600_000


def letter_digest(
    key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes]]
) -> bytes:
    """What tells one letter from another: its key, value and headers, in order (SHA-256
    of their lengths and bytes). A letter with neither key nor value is published with an
    empty value (`Publisher.send_dead_letter`), and counts as one."""
    if key is None and value is None:
        value = b""
    digest = hashlib.sha256()
    for part in (key, value):
        digest.update(b"-" if part is None else b"+%d:" % len(part) + part)
    for name, raw in headers:
        encoded = name.encode("utf-8", "surrogatepass")
        digest.update(b"%d:" % len(encoded) + encoded + b"%d:" % len(raw) + raw)
    return digest.digest()


def _held_by_topic(settings: Settings, wanted: set[bytes]) -> set[bytes]:
    """Which of these digests the dead-letter topic holds, among its producers' letters
    (their origin a source, `source:<id>`)."""
    found: set[bytes] = set()
    for message in _dead_letter_messages(settings):
        if dict(message.headers).get("ps.origin.topic", b"").startswith(b"source:"):
            digest = letter_digest(message.key, message.value, message.headers)
            if digest in wanted:
                found.add(digest)
    return found


class NotKept(Refused, ValueError):
    """A line that reads as a letter, but not as one a producer keeps."""


def _kept_letter(line: object) -> Letter:
    """A producer's letter: the headers every dead letter has, its origin a source
    (`source:<id>`, which `dlq redrive` never sends to a change topic), no signature."""
    if not isinstance(line, dict):
        raise TypeError("not an object")
    key, value, headers = letter_from_line(line)
    named = dict(headers)
    if any(name not in named for name in REQUIRED_HEADERS):
        raise NotKept("a header every dead letter has is missing")
    if not named["ps.origin.topic"].startswith(b"source:"):
        raise NotKept("its origin is no source (ps.origin.topic = source:<id>)")
    if any(name in named for name in KEPT_HEADERS):
        raise NotKept("it carries a signature header: a producer's own letters have none")
    for name in named:
        try:
            name.encode("utf-8")  # what the client sends a header's name as
        except UnicodeEncodeError:
            raise NotKept("a header's name is not UTF-8 text") from None
    return key, value, headers
