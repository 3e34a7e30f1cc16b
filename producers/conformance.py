"""Conformance checks of an adapter against its real source, without publishing.

Two runs: the first from an empty state, the second from the state of the first run's last
checkpoint. Checks: every event validates against the contract, keys are present, versions
rise per key (or, for unsorted adapters, no version of a key carries two different
changes), the cursor resumes (the second run re-emits nothing already checkpointed, and
nothing at all when the first run reached the end), and deletes are seen when the adapter
says it emits them. Commit callbacks (deleting outbox rows, moving files) are never called:
the source is left as it was. Failing examples name the record's origin and a masked key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from producers.sdk import Adapter, Checkpoint, Record, SkippableRecord, State
from schemas import InvalidEvent, parse_event
from schemas.identifiers import mask_key

CHECKS = (
    "events validate",
    "keys present",
    "versions rise per key",
    "cursor resumes",
    "deletes seen",
)
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
    try:
        for item in adapter.read(json.loads(json.dumps(state))):
            if isinstance(item, Checkpoint):
                run.state = item.value()
                run.checkpointed |= {e.event_id for e in run.emitted}
                if limit is not None and len(run.emitted) >= limit:
                    run.complete = False
                    break
            elif isinstance(item, SkippableRecord):
                run.skipped += 1
            elif isinstance(item, Record):  # a `Reservation` matters only to a run that sends
                _emit(adapter, item, run)
    except Exception as error:
        run.error = type(error).__name__
    return run


def _emit(adapter: Adapter, record: Record, run: Run) -> None:
    event = record.event(adapter.source, adapter.entity)
    body = json.dumps(event, ensure_ascii=False, sort_keys=True)
    key = str(event.get("key") or "")
    try:
        parse_event(body.encode())
    except InvalidEvent as error:
        run.invalid.append(f"{record.origin} {mask(key)}: {error.code}: {error.message}")
    run.emitted.append(
        Emitted(
            record.origin,
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
        _deletes(first, adapter.emits_deletes, limit),
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
    if first.emitted and first.state is None:
        return CheckResult(CHECKS[3], False, "no checkpoint: no position is ever saved")
    if second.error:
        return CheckResult(CHECKS[3], False, f"the second run raised {second.error}")
    repeated = [e for e in second.emitted if e.event_id in first.checkpointed]
    if first.complete:
        repeated = second.emitted
    examples = [f"{e.origin} {mask(e.key)} v{e.version} emitted again" for e in repeated]
    detail = f"second run from the checkpoint: {len(second.emitted)} events"
    detail += "" if first.complete else f" (first run stopped at the limit, {len(first.emitted)})"
    return CheckResult(CHECKS[3], not repeated, detail, examples[:MAX_EXAMPLES])


def _deletes(run: Run, emits_deletes: bool, limit: int | None) -> CheckResult:
    deletes = sum(1 for e in run.emitted if e.op == "delete")
    if not emits_deletes:
        return CheckResult(CHECKS[4], True, f"not claimed ({deletes} seen)")
    detail = f"{deletes} deletes seen"
    if deletes:
        return CheckResult(CHECKS[4], True, detail)
    if not run.complete:
        return CheckResult(CHECKS[4], True, f"{detail} in the first {limit}: not judged")
    hint = "claimed, but none in the source data read: delete one record at the source"
    return CheckResult(CHECKS[4], False, f"{detail}; {hint}")


def report_table(report: ConformanceReport) -> Any:
    """A Rich table of one report."""
    from rich.table import Table
    from rich.text import Text

    from observability.terminal import markup, plain

    verdict = "[green]PASS[/green]" if report.passed else "[red]FAIL[/red]"
    title = markup("{} ({}): {} events " + verdict, report.source_id, report.adapter,
                   len(report.first.emitted))  # fmt: skip
    table = Table(title=title)
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    table.add_column("failing examples")
    for result in report.results:
        mark = "[green]pass[/green]" if result.passed else "[red]FAIL[/red]"
        examples = Text("\n").join(map(plain, result.examples))  # rows' origins: source data
        table.add_row(result.name, mark, plain(result.detail), examples)
    for warning in report.warnings:
        table.add_row("warning", "[yellow]warn[/yellow]", plain(warning), "")
    return table
