"""The framework side of the SDK: run an adapter, validate, publish, checkpoint, retry.

A checkpoint's state is saved only after `Publisher.flush()` returned, i.e. after the broker
acknowledged every event yielded before it (at least once, never a loss); events re-sent
after a crash keep their event id and version, so the reconciler drops them.

A checkpoint without a `commit` is saved at most once per `checkpoint_interval` seconds (the
newest one reached), and always when the run ends, fails or stops: a SQL source yields one
per page, and waiting for the broker and rewriting the state file after each page of 1,000
rows was a sixth of its publishing (docs/performance-log.md); a crash re-sends at most that
interval's events. A checkpoint with a `commit` is saved at once, and the adapter resumes
after its clean-up ran (the outbox names in its state only the rows whose clean-up has not
run yet); so is one marked `at_once`.

A `Reservation` is appended to the source's journal (`<entry id>.journal.jsonl`, one line
synced to disk) before anything after it is sent: the `sql` adapter's versions of a page,
so that a run that dies after sending the page and before its checkpoint is saved never
gives a row's next change a version at or below one sent (the reconciler would drop that
change as stale). The next run takes the journal in (`Adapter.recover`) and saves the state
so recovered in its place; a saved checkpoint yielded after every line of it removes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections import Counter as Tally
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from producers.cursor_lag import CURSOR_LAG
from producers.metrics import (
    KEPT_DEAD_LETTERS,
    PRODUCED,
    SOURCE_ERRORS,
    SOURCE_STOPPED,
    export_at_zero,
)
from producers.sdk import (
    Adapter,
    AdapterError,
    Checkpoint,
    ConfigurationError,
    FatalError,
    Record,
    Reservation,
    SkippableRecord,
    State,
)
from producers.state import (
    append_json_line,
    load_json_state,
    read_json_lines,
    remove_leftovers,
    write_json_atomic,
)
from schemas import InvalidEvent, message_key, parse_event
from schemas.builder import event_bytes
from schemas.dead_letter import Reason, dead_letter_headers, fit_letter, letter_line
from schemas.errors import Backoff, Refused
from schemas.redaction import redacted_text
from schemas.signing import Signer
from transport.publisher import Publisher
from transport.topics import CHANGE_MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)
# A record's origin beyond this size is not carried whole by its dead letter (shortened,
# with a digest). Its key and value are fitted as the worker's letters are (`fit_letter`):
# within one producer request, so one huge record cannot block its source.
DEAD_LETTER_ORIGIN_LIMIT = 512
# Seconds between two saved checkpoints of one run (0: every checkpoint is saved).
CHECKPOINT_INTERVAL_SECONDS = 1.0
# Once a stop is asked (SIGTERM, Ctrl-C), how long a flush still waits for the broker's
# acknowledgement (of the progress the run then saves): with the broker away, a run waited
# its whole 60 s, twice, and its close as long again, past a pod's 30 s of grace. What was
# not acknowledged is sent again from the last saved checkpoint, with the same event ids.
STOP_GRACE_SECONDS = 5.0
# The cursor lag measured inside a run (a first snapshot's), at most this often.
CURSOR_LAG_INTERVAL_SECONDS = 30.0


# What a log line never shows of an adapter's message: a credential after its scheme or
# its name (`Authorization: Bearer …`, `api_key: …`, `{"password": "…"}`), and a number of
# nine digits or more, separators between them or not (a personal id, a tax code, a phone).
_MASKED = (
    (re.compile(r"(?i)\b(bearer|basic|token)\s+[^\s,;]+"), r"\1 ***"),
    (
        re.compile(
            r"(?i)(\"?[\w.-]*(?:pass|secret|token|key|auth|cookie|session)[\w.-]*\"?\s*[:=]\s*)"
            r"(\"[^\"]*\"|[^\s,;}]+)"
        ),
        r"\1***",
    ),
    (re.compile(r"\+?[0-9](?:[ .()-]?[0-9]){8,}"), "…"),
)


def said(error: Exception) -> str:
    """What a log line says of an adapter's error: an adapter's own classified error
    (`RetriableError`, `ConfigurationError`, `FatalError`) by its message, which adapters
    write without record values (docs/adapters.md), its credentials and long numbers
    masked all the same (`_MASKED`, and the URLs' and key=value secrets); any other error
    by its type only: a driver's message can quote row values (personal data)."""
    name = type(error).__name__
    if not isinstance(error, AdapterError) or not str(error):
        return name
    text = redacted_text(str(error))
    for pattern, replacement in _MASKED:
        text = pattern.sub(replacement, text)
    return f"{name}: {text}"


@dataclass
class RunStats:
    published: int = 0
    dead_lettered: int = 0
    checkpoints: int = 0

    def add(self, other: RunStats) -> None:
        self.published += other.published
        self.dead_lettered += other.dead_lettered
        self.checkpoints += other.checkpoints


@dataclass
class _Reached:
    """Checkpoints reached and not saved yet: how many, and the newest (only the newest can
    carry a `commit` or be `at_once`: such a checkpoint is saved at once)."""

    newest: Checkpoint | None = None
    count: int = 0
    journaled: int = 0  # the journal's lines of this run before the newest

    def add(self, item: Checkpoint, journaled: int) -> None:
        self.newest = item
        self.count += 1
        self.journaled = journaled


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    first_delay: float = 0.5
    max_delay: float = 30.0

    def delay(self, attempt: int) -> float:
        return Backoff(self.first_delay, self.max_delay).nth(attempt)


def kept_letters_path(state_dir: Path, entry_id: str) -> Path:
    """Where a deployment entry keeps the dead letters its cluster refused."""
    return state_dir / f"{entry_id}.dead-letters.jsonl"


class AdapterRunner:
    """Runs one configured source: `run_once` for one pass, `run` to poll on a schedule."""

    def __init__(
        self,
        source_id: str,
        adapter: Adapter,
        publisher: Publisher,
        state_dir: Path,
        retry: RetryPolicy | None = None,
        signer: Signer | None = None,
        checkpoint_interval: float = CHECKPOINT_INTERVAL_SECONDS,
    ) -> None:
        self.source_id = source_id
        self.adapter = adapter
        self.publisher = publisher
        self.signer = signer  # None: events go unsigned
        self.state_path = state_dir / f"{source_id}.state.json"
        self.journal_path = state_dir / f"{source_id}.journal.jsonl"
        self._journaled = 0  # lines appended to the journal by this run
        if removed := remove_leftovers(self.state_path):
            log.info("%s: removed %d unfinished state files of a killed run", source_id, removed)
        # dead letters the cluster does not let this source write (docs/operations.md)
        self.kept_letters_path = kept_letters_path(state_dir, source_id)
        KEPT_DEAD_LETTERS.watch(adapter.source, self.kept_letters_path)
        self.retry = retry or RetryPolicy()
        self.checkpoint_interval = checkpoint_interval
        self._lag_due = time.monotonic() + CURSOR_LAG_INTERVAL_SECONDS  # next one mid-run
        self.stopped_fatally = False
        self._stop: threading.Event | None = None
        export_at_zero(adapter.source, adapter.entity)

    def _saved_state(self) -> State:
        """The state saved last. One that does not read (a disk's damage, a hand's edit:
        the saves themselves are atomic) stops the source, naming the file: retried, it
        failed every run as a source's read error, the file never named."""
        try:
            return load_json_state(self.state_path)
        except ValueError:  # the content is the source's: never quoted
            raise FatalError(
                f"{self.source_id}: the state file {self.state_path} is not a JSON object: "
                "restore it from a backup, or remove it to read the source from its start "
                "again (docs/operations.md, re-sending a source's current records)"
            ) from None

    def run_once(
        self, stop: threading.Event | None = None, stats: RunStats | None = None
    ) -> RunStats:
        """Publish everything new at the source now (from the last saved checkpoint). Once
        `stop` is set the run ends at the next item, as a finished one (the checkpoints
        reached saved, everything sent acknowledged); the rest waits for the next run.
        Counted into `stats` as it goes (a failed run's count is kept too)."""
        stats = RunStats() if stats is None else stats
        self._stop = stop
        produced: Tally[str] = Tally()
        journal = read_json_lines(self.journal_path)
        if journal and type(self.adapter).recover is Adapter.recover:
            raise FatalError(
                f"{self.source_id}: the adapter yields reservations but does not take them "
                "back in (`Adapter.recover`): its journal would be dropped unread"
            )
        state = self.adapter.recover(self._saved_state(), journal)
        if journal:  # taken in and saved: runs that fail before a save never pile it up
            write_json_atomic(self.state_path, state)
            self.journal_path.unlink()
        self._journaled = 0
        reached = _Reached()
        due = time.monotonic() + self.checkpoint_interval
        items = self.adapter.read(state)
        try:
            for item in items:
                if stop is not None and stop.is_set():
                    if isinstance(item, Checkpoint):  # all before it sent: it is reached
                        reached.add(item, self._journaled)
                    break
                if isinstance(item, Reservation):
                    append_json_line(self.journal_path, item.entry)
                    self._journaled += 1
                elif isinstance(item, Checkpoint):
                    reached.add(item, self._journaled)
                    if item.commit is not None or item.at_once or time.monotonic() >= due:
                        # taken first: a save or commit that fails is not tried again below
                        saving, reached = reached, _Reached()
                        self._checkpoint(saving, produced, stats)
                        due = time.monotonic() + self.checkpoint_interval
                elif isinstance(item, SkippableRecord):
                    self._dead_letter(item)
                    stats.dead_lettered += 1
                elif not self._send(item, produced):  # counted once acknowledged (`_count`)
                    stats.dead_lettered += 1
        except BaseException:
            # What was acknowledged up to the last checkpoint reached is kept: the next
            # run resumes there, not from the last one saved.
            if reached.count:
                self._save_on_the_way_out(reached, produced, stats)
            raise
        try:
            if reached.count:
                self._checkpoint(reached, produced, stats)
            self._flush()
        finally:
            close = getattr(items, "close", None)
            if close is not None:  # a generator left at a stop ends its reads once saved
                close()
        self._count(produced, stats)
        self._measure_cursor_lag()
        return stats

    def _measure_cursor_lag(self) -> None:
        """How far the saved cursor is behind the newest change in the source: after
        every run, and at a checkpoint saved at least CURSOR_LAG_INTERVAL_SECONDS after
        the last measure (its query reads the source)."""
        self._lag_due = time.monotonic() + CURSOR_LAG_INTERVAL_SECONDS
        try:
            seconds = self.adapter.cursor_lag_seconds(load_json_state(self.state_path))
        except Exception as error:  # a measurement never fails a run that was saved
            log.warning("%s: cursor lag not measured (%s)", self.source_id, type(error).__name__)
            return
        if seconds is not None:
            CURSOR_LAG.set(self.adapter.source, self.source_id, seconds)

    def run_with_retries(
        self, stop: threading.Event | None = None, stats: RunStats | None = None
    ) -> RunStats:
        """`run_once`, retried with backoff; FatalError is not retried, nor the SDK's
        ConfigurationError that an adapter raises while reading (a token the source
        refuses): retrying would not mend it, so it stops the source as a fatal error does
        (the transport's refusals, a broker's TLS or SASL, are retried as before). Every
        attempt counts into `stats`: what a failed attempt sent was sent (and counted again
        if a retry sends it again: at least once)."""
        stats = RunStats() if stats is None else stats
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return self.run_once(stop, stats)
            except FatalError:
                raise
            except ConfigurationError as error:
                raise FatalError(f"configuration: {said(error)}") from error
            except Exception as error:
                SOURCE_ERRORS.labels(self.adapter.source, "read_error").inc()
                # Measured after a failed run too: a producer that keeps failing falls
                # behind, and the gauge kept its last good value (often 0) meanwhile.
                self._measure_cursor_lag()
                log.warning("%s: run failed (%s), attempt %d", self.source_id, said(error), attempt)
                if attempt == self.retry.attempts:
                    raise
                if stop is not None and stop.wait(self.retry.delay(attempt)):
                    break
                if stop is None:
                    time.sleep(self.retry.delay(attempt))
        return stats

    def stop_fatally(self, error: FatalError) -> None:
        """Count and log a fatal error; the caller stops scheduling this source."""
        SOURCE_ERRORS.labels(self.adapter.source, "fatal").inc()
        log.error("%s: stopped (fatal: %s)", self.source_id, said(error))
        if not self.stopped_fatally:
            SOURCE_STOPPED.labels(self.adapter.source).inc()  # the alert stays until a restart
        self.stopped_fatally = True

    def _send(self, record: Record, produced: Tally[str]) -> bool:
        entity = record.entity or self.adapter.entity
        try:
            value = event_bytes(record.event(self.adapter.source, self.adapter.entity))
        except (ValueError, TypeError, ArithmeticError, RecursionError) as error:
            # A value no JSON can hold (bytes, a time of day, an infinite decimal, nesting
            # beyond the encoder's depth): this record is dead-lettered, the source goes
            # on. The type only: such messages can quote the value.
            message = f"a value that cannot be written as JSON ({type(error).__name__})"
            key = record.key if isinstance(record.key, str) else None
            item = SkippableRecord(Reason.UNMAPPABLE_RECORD, message, record.origin, entity, key)
            self._dead_letter(item)
            return False
        try:
            valid = parse_event(value, warn=False)  # the worker reports the warnings
        except InvalidEvent as error:
            self._dead_letter(
                SkippableRecord(error.code, error.message, record.origin, entity, record.key, value)
            )
            return False
        # Bytes validated as they are (already NFC) go out as they are: the worker's
        # `parse_event` of them is the one just done here.
        self.publisher.send_event(valid.event, self.signer, value if valid.as_sent else None)
        produced[valid.event.entity] += 1
        return True

    def _dead_letter(self, item: SkippableRecord) -> None:
        kind = "unreadable_file" if item.code == Reason.UNREADABLE_FILE else "invalid_record"
        SOURCE_ERRORS.labels(self.adapter.source, kind).inc()
        origin = _bounded_origin(item.origin)
        # A lone surrogate (a file name read with `surrogateescape`) as the header has it:
        # a log handler writing UTF-8 fails on it raw.
        printable = origin.encode("utf-8", "backslashreplace").decode("utf-8")
        log.warning("%s: record %s rejected (%s)", self.source_id, printable, item.code)
        headers = dead_letter_headers(
            item.code, item.message, f"source:{self.adapter.source}", self.source_id, origin
        )
        try:
            key = (
                message_key(item.entity, item.key, self.adapter.source)
                if item.entity and item.key
                else None
            )
        except UnicodeEncodeError:  # a key with a lone surrogate: no message key is one
            key = None
        # A dead letter keeps the original bytes; an adapter that has none sends its origin.
        raw = item.raw or json.dumps({"origin": origin}).encode()
        key, value, headers = fit_letter(key, raw, headers, [], origin, CHANGE_MAX_MESSAGE_BYTES)
        assert value is not None
        try:
            self.publisher.send_dead_letter(key, value, headers)
        except Refused:  # a secured cluster lets a source write the change topics only
            # Kept on disk before the checkpoint that cleans the record up (an outbox row
            # deleted, a file moved) is saved: an operator imports them (`dlq import`).
            self._keep(key, value, headers, origin)
        self.adapter.rejected(item.origin, item.code, item.message)

    def _checkpoint(self, reached: _Reached, produced: Tally[str], stats: RunStats) -> None:
        """Save the newest checkpoint reached once the broker acknowledged everything sent
        (events and dead letters before it, and any after it), then run its commit."""
        assert reached.newest is not None
        self._flush()
        write_json_atomic(self.state_path, reached.newest.value())
        if reached.journaled == self._journaled:  # the state holds all the journal holds
            self.journal_path.unlink(missing_ok=True)
        if reached.newest.commit is not None:
            reached.newest.commit()
        self._count(produced, stats)
        stats.checkpoints += reached.count
        if time.monotonic() >= self._lag_due:  # a first load's run lasts an hour: its panel
            self._measure_cursor_lag()

    def _save_on_the_way_out(
        self, reached: _Reached, produced: Tally[str], stats: RunStats
    ) -> None:
        """`_checkpoint` while an error ends the run: the error is the one to raise, so a
        failure here (the broker gone too) is logged and leaves the state saved before."""
        try:
            self._checkpoint(reached, produced, stats)
        except Exception as error:
            log.warning("%s: last checkpoint not saved (%s)", self.source_id, type(error).__name__)

    def _flush(self) -> None:
        try:  # a stop (SIGTERM) leaves the broker STOP_GRACE_SECONDS to acknowledge
            self.publisher.flush(stop=self._stop, grace=STOP_GRACE_SECONDS)
        except Exception:
            SOURCE_ERRORS.labels(self.adapter.source, "publish_error").inc()
            raise
        # Dead letters the cluster refused only when they were written (the principal may
        # see the topic, not write it): kept on disk, as those refused at once, before the
        # checkpoint that cleans their records up is saved.
        for key, value, headers in self.publisher.take_refused_letters():
            self._keep(key, value, headers, "a refused write")

    def _keep(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        origin: str,
    ) -> None:
        append_json_line(self.kept_letters_path, letter_line(key, value, list(headers)))
        log.warning(
            "%s: record %s kept out of the dead letters (ACL), in %s for `portal-sync "
            "dlq import`", self.source_id, origin, self.kept_letters_path.name,
        )  # fmt: skip

    def _count(self, produced: Tally[str], stats: RunStats) -> None:
        """The events sent since the last count, all acknowledged now (after a flush)."""
        for entity, count in produced.items():
            PRODUCED.labels(self.adapter.source, entity).inc(count)
            stats.published += count
        produced.clear()


def _bounded_origin(origin: str) -> str:
    """A record's origin (`table:pk`, `file:line`) as a dead letter and the log carry it:
    one beyond `DEAD_LETTER_ORIGIN_LIMIT` characters is cut, with a digest of it whole."""
    if len(origin) <= DEAD_LETTER_ORIGIN_LIMIT:
        return origin
    digest = hashlib.sha256(origin.encode("utf-8", "backslashreplace")).hexdigest()[:16]
    return f"{origin[: DEAD_LETTER_ORIGIN_LIMIT // 2]}…(sha256 {digest})"
