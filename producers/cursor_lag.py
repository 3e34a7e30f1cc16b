"""`portal_sync_source_cursor_lag_seconds{source}`: how far an adapter's cursor is behind
the newest change in its source (0 when it has read everything), the worst of a source's
adapters. Measured after every poll by reading the source's newest `updated_at`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from producers.sql_cursor import CursorState
from producers.sql_polling import SqlPollingAdapter


def cursor_lag(
    newest: datetime | None, oldest: datetime | None, cursor: datetime | str | None
) -> float:
    """Seconds between the cursor and the newest change; with no cursor yet, everything
    from the oldest change on is still to read."""
    if newest is None:
        return 0.0
    start = datetime.fromisoformat(cursor) if isinstance(cursor, str) else cursor
    start = start if start is not None else oldest
    if start is None:
        return 0.0
    return max(0.0, (newest - start).total_seconds())


class CursorLag(Collector):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lags: dict[tuple[str, str], float] = {}

    def set(self, source: str, adapter_id: str, seconds: float) -> None:
        """The lag of one adapter (a deployment entry) of a contract source."""
        with self._lock:
            self._lags[(source, adapter_id)] = seconds

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "portal_sync_source_cursor_lag_seconds",
            "How far the adapter cursor is behind the newest change in the source (worst adapter).",
            labels=["source"],
        )
        worst: dict[str, float] = {}
        with self._lock:
            for (source, _), seconds in self._lags.items():
                worst[source] = max(seconds, worst.get(source, 0.0))
        for source, seconds in sorted(worst.items()):
            family.add_metric([source], seconds)
        yield family


CURSOR_LAG = CursorLag()
REGISTRY.register(CURSOR_LAG)


def cursor_lag_of(adapter: SqlPollingAdapter, state: CursorState) -> float:
    """Read the source's newest and oldest change time: the cursor's lag behind them. Every
    value is read as the cursor reads it (date text in `updated_at_format`, zones converted)
    and compared as an instant."""
    column = adapter.updated_at
    with adapter.engine.connect() as conn:
        newest, oldest = conn.execute(select(func.max(column), func.min(column))).one()

    def instant(value: object) -> datetime | None:
        return None if value is None else adapter.instant(adapter.cursor_time(value))

    cursor = state.updated_at
    start = None if cursor is None else adapter.instant(datetime.fromisoformat(cursor))
    return cursor_lag(instant(newest), instant(oldest), start)
