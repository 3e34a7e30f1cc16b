"""Conformance checks of an adapter against its real source, without publishing.

Three runs: the first from an empty state, the second from the state of the first run's
last checkpoint, the third from its first checkpoint. Checks: every event validates
against the contract, keys are present, versions rise per key (or, for unsorted adapters,
no version of a key carries two different changes), the cursor resumes (the second run
re-emits nothing already checkpointed, and nothing the first run emitted when it reached
the end), checkpoints cover what follows them (the third run emits again every record the
first emitted after that checkpoint, at its version or above, and a checkpoint's state
does not change after it was yielded), deletes are seen when the adapter says it emits
them, and origins do not hold the record's key. Commit callbacks (deleting outbox rows,
moving files) are never called: the source is left as it was. Failing examples name the
record's origin and a masked key.
"""

from __future__ import annotations

import inspect
import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from producers.sdk import Adapter, Checkpoint, Record, SkippableRecord, State
from schemas import InvalidEvent, parse_event
from schemas.identifiers import mask_key

CHECKS = (
    "events validate",
    "keys present",
    "versions rise per key",
    "cursor resumes",
    "checkpoints cover",
    "deletes seen",
    "origins hide keys",
)
# Keys at least this long are looked for in origins (a personal id has 12 digits, a tax
# code 10 or 13): a shorter one is too likely to occur in any text.
KEY_IN_ORIGIN = 6
MAX_EXAMPLES = 5


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str
    examples: list[str] = field(default_factory=list)


@dataclass
class Emitted:
    origin: str
    entity: str
    key: str
    version: int
    event_id: str
    op: str
    body: str


@dataclass
class Run:
    emitted: list[Emitted] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    skipped: int = 0
    state: State | None = None  # of the last checkpoint
    checkpointed: set[str] = field(default_factory=set)  # event ids before it
    complete: bool = True
    error: str | None = None
    # The first checkpoint: how many events came before it, and its state.
    early: tuple[int, State] | None = None
    unstable: int | None = None  # events before a checkpoint whose state changed later
    leaks: list[str] = field(default_factory=list)  # origins that hold their record's key


@dataclass
class ConformanceReport:
    source_id: str
    adapter: str
    first: Run
    results: list[CheckResult]
    warnings: list[str] = field(default_factory=list)  # shown, never failing

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def result(self, name: str) -> CheckResult:
        return next(r for r in self.results if r.name == name)


mask = mask_key


def run_adapter(adapter: Adapter, state: State, limit: int | None = None) -> Run:
    """Read without publishing; stop at the first checkpoint after `limit` events."""
    run = Run()
    # The newest checkpoint and its state as yielded, asked again after the next record:
    # the framework may ask for it later (once the broker acknowledged what came before).
    pending: tuple[Checkpoint, str] | None = None
    try:
        for item in adapter.read(json.loads(json.dumps(state))):
            if isinstance(item, Checkpoint):
                text = json.dumps(item.value(), sort_keys=True)
                run.state = json.loads(text)
                pending = (item, text)
                if run.early is None:
                    run.early = (len(run.emitted), run.state)
                run.checkpointed |= {e.event_id for e in run.emitted}
                if limit is not None and len(run.emitted) >= limit:
                    run.complete = False
                    break
            elif isinstance(item, SkippableRecord):
                run.skipped += 1
            elif isinstance(item, Record):  # a `Reservation` matters only to a run that sends
                _emit(adapter, item, run)
                if pending is not None:
                    checkpoint, text = pending
                    pending = None
                    again = json.dumps(checkpoint.value(), sort_keys=True)
                    if again != text and run.unstable is None:
                        run.unstable = len(run.emitted) - 1
    except Exception as error:  # where, never the message (it can quote a value)
        run.error = f"{type(error).__name__}{_where(adapter, error)}"
    return run


def _where(adapter: Adapter, error: Exception) -> str:
    """` at file:line` of the innermost frame in the adapter's own package (else the
    innermost frame): what to look at, without the message."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    try:
        home: Path | None = Path(inspect.getfile(type(adapter))).parent
    except (TypeError, OSError):  # a class of no file (`python -c`, `exec`)
        home = None
    own = [f for f in frames if home is not None and Path(f.filename).is_relative_to(home)]
    frame = (own or frames)[-1]
    return f" at {frame.filename}:{frame.lineno}"


def _emit(adapter: Adapter, record: Record, run: Run) -> None:
    event = record.event(adapter.source, adapter.entity)
    body = json.dumps(event, ensure_ascii=False, sort_keys=True)
    key = str(event.get("key") or "")
    origin = record.origin
    if len(key) >= KEY_IN_ORIGIN and key in origin:  # shown masked, and failed
        origin = origin.replace(key, mask(key))
        run.leaks.append(f"{origin}: the origin holds the record's key")
    try:
        parse_event(body.encode())
    except InvalidEvent as error:
        run.invalid.append(f"{origin} {mask(key)}: {error.code}: {error.message}")
    run.emitted.append(
        Emitted(
            origin,
            str(event["entity"]),
            key,
            record.version,
            event["event_id"],
            event["op"],
            json.dumps(event.get("data"), sort_keys=True),
        )
    )


def check_adapter(
    adapter: Adapter, source_id: str, adapter_name: str = "", limit: int | None = None
) -> ConformanceReport:
    first = run_adapter(adapter, {}, limit)
    second = run_adapter(adapter, first.state or {}) if first.error is None else Run()
    results = [
        _validates(first),
        _keys(first),
        _versions(first, adapter.sorted_output),
        _resumes(first, second),
        _covers(adapter, first),
        _deletes(first, adapter.emits_deletes, limit),
        _origins(first),
    ]
    name = adapter_name or type(adapter).__name__
    return ConformanceReport(source_id, name, first, results, _warnings(adapter))


def _warnings(adapter: Adapter) -> list[str]:
    try:
        return adapter.check_warnings()
    except Exception as error:  # the type only: driver messages can quote values
        return [f"could not inspect the source ({type(error).__name__})"]


def _validates(run: Run) -> CheckResult:
    if run.error:
        return CheckResult(CHECKS[0], False, f"the adapter raised {run.error}")
    valid = len(run.emitted) - len(run.invalid)
    detail = f"{valid}/{len(run.emitted)} valid, {run.skipped} skipped by the adapter"
    return CheckResult(CHECKS[0], not run.invalid, detail, run.invalid[:MAX_EXAMPLES])


def _keys(run: Run) -> CheckResult:
    missing = [f"{e.origin}: {e.entity} without key" for e in run.emitted if not e.key.strip()]
    detail = f"{len(run.emitted) - len(missing)}/{len(run.emitted)} with a key"
    return CheckResult(CHECKS[1], not missing, detail, missing[:MAX_EXAMPLES])


def _versions(run: Run, sorted_output: bool) -> CheckResult:
    last: dict[tuple[str, str], Emitted] = {}
    seen: dict[tuple[str, str, int], str] = {}
    bad: list[str] = []
    for event in run.emitted:
        slot = (event.entity, event.key)
        before = last.get(slot)
        if sorted_output and before is not None and event.version <= before.version:
            bad.append(
                f"{event.origin} {mask(event.key)}: version {event.version} "
                f"after {before.version} ({before.origin})"
            )
        body = seen.setdefault((event.entity, event.key, event.version), event.body)
        if not sorted_output and body != event.body:
            bad.append(f"{event.origin} {mask(event.key)}: version {event.version} reused")
        last[slot] = event
    rule = "strictly rising in output order" if sorted_output else "one change per version"
    return CheckResult(CHECKS[2], not bad, f"{len(last)} keys, {rule}", bad[:MAX_EXAMPLES])


def _resumes(first: Run, second: Run) -> CheckResult:
    if first.error:
        return CheckResult(CHECKS[3], True, "not judged: the first run raised")
    if first.emitted and first.state is None:
        return CheckResult(CHECKS[3], False, "no checkpoint: no position is ever saved")
    if second.error:
        return CheckResult(CHECKS[3], False, f"the second run raised {second.error}")
    # A first run that reached the end checkpointed all it emitted: a record it emitted
    # with the same content is a repeat, whatever its version; rows written or changed
    # since (a busy source) are new.
    if first.complete:
        contents = {(e.entity, e.key, e.op, e.body) for e in first.emitted}
        repeated = [e for e in second.emitted if (e.entity, e.key, e.op, e.body) in contents]
    else:
        repeated = [e for e in second.emitted if e.event_id in first.checkpointed]
    examples = [f"{e.origin} {mask(e.key)} v{e.version} emitted again" for e in repeated]
    detail = f"second run from the checkpoint: {len(second.emitted)} events"
    if first.complete and len(second.emitted) > len(repeated):
        detail += f" ({len(second.emitted) - len(repeated)} new since the first run)"
    detail += "" if first.complete else f" (first run stopped at the limit, {len(first.emitted)})"
    return CheckResult(CHECKS[3], not repeated, detail, examples[:MAX_EXAMPLES])


def _covers(adapter: Adapter, first: Run) -> CheckResult:
    """A run from the first checkpoint emits again every record the first run emitted
    after it, at its version or above: else a run that fails after that checkpoint was
    saved (the framework saves the newest one acknowledged) never sends them."""
    if first.error or first.early is None:
        return CheckResult(CHECKS[4], True, "not judged: no checkpoint")
    if first.unstable is not None:
        return CheckResult(
            CHECKS[4],
            False,
            f"the state of the checkpoint after {first.unstable} events had changed when it "
            "was read again: a checkpoint's value must be the state as it was when yielded",
        )
    at, state = first.early
    after = first.emitted[at:]
    if not after:
        return CheckResult(CHECKS[4], True, "not judged: nothing followed the first checkpoint")
    # As many as the first run emitted: a state that starts over emits those before, too.
    again = run_adapter(adapter, state, limit=len(first.emitted))
    if again.error:
        return CheckResult(
            CHECKS[4], False, f"the run from the first checkpoint raised {again.error}"
        )
    newest: dict[tuple[str, str], int] = {}
    for event in again.emitted:
        slot = (event.entity, event.key)
        newest[slot] = max(newest.get(slot, event.version), event.version)
    missing = [e for e in after if newest.get((e.entity, e.key), e.version - 1) < e.version]
    examples = []
    for e in missing[:MAX_EXAMPLES]:
        got = newest.get((e.entity, e.key))
        shown = "not emitted" if got is None else f"emitted at v{got}"
        examples.append(f"{e.origin} {mask(e.key)} v{e.version}: {shown}")
    detail = f"run from the first checkpoint (after {at} events): {len(again.emitted)} events"
    return CheckResult(CHECKS[4], not missing, detail, examples)


def _deletes(run: Run, emits_deletes: bool, limit: int | None) -> CheckResult:
    deletes = sum(1 for e in run.emitted if e.op == "delete")
    if run.error:
        return CheckResult(CHECKS[5], True, f"{deletes} seen before the adapter raised: not judged")
    if not emits_deletes:
        return CheckResult(CHECKS[5], True, f"not claimed ({deletes} seen)")
    detail = f"{deletes} deletes seen"
    if deletes:
        return CheckResult(CHECKS[5], True, detail)
    if not run.complete:
        return CheckResult(CHECKS[5], True, f"{detail} in the first {limit}: not judged")
    hint = "claimed, but none in the source data read: delete one record at the source"
    return CheckResult(CHECKS[5], False, f"{detail}; {hint}")


def _origins(run: Run) -> CheckResult:
    """An origin is logged, and kept in dead-letter headers, where no key may appear."""
    detail = f"{len(run.emitted) - len(run.leaks)}/{len(run.emitted)} without the key"
    return CheckResult(CHECKS[6], not run.leaks, detail, run.leaks[:MAX_EXAMPLES])
