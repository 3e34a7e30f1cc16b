"""`portal-sync lag-exporter`: one process exporting the lag of every group and partition.

Every poll replaces the exported snapshot, so the series of a group or partition that goes
away disappear with it. A poll reports every partition whose leader answers (a node just
killed leads its partitions until it is fenced: those are left out, not guessed). A failed
poll (no leader answers) is tried once more at once, with fresh clients (a broker that just
came back often fails the first request of a client that knew the old leaders); if that
fails too, the snapshot is dropped (stale lag is worse than none) and /readyz fails until
a poll succeeds again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from observability.http import serve
from observability.kafka_lag import GroupLag, LagReader
from observability.web_config import WebConfig

log = logging.getLogger(__name__)


class LagCollector(Collector):
    """Exports the latest snapshot of consumer lag."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: list[GroupLag] = []
        # Exported as the exporter's start until a poll reads: "blind for 56 years" would
        # page with a figure nobody can act on, and blind since the start is the truth.
        self.started = time.time()
        self.last_success: float | None = None

    def update(self, groups: list[GroupLag]) -> None:
        with self._lock:
            self._groups = groups
            self.last_success = time.time()

    def clear(self) -> None:
        with self._lock:
            self._groups = []

    def collect(self) -> Iterator[Metric]:
        labels = ["group", "topic", "partition"]
        messages = GaugeMetricFamily(
            "portal_sync_consumer_lag_messages",
            "Messages after the group's committed (applied) offset, per partition.",
            labels=labels,
        )
        seconds = GaugeMetricFamily(
            "portal_sync_consumer_lag_seconds",
            "Age of the oldest message not yet applied (0 when caught up), per partition.",
            labels=labels,
        )
        status = GaugeMetricFamily(
            "portal_sync_consumer_status",
            "Group status over a sliding window: 0 OK, 1 WARN, 2 STALL, 3 STOP.",
            labels=["group"],
        )
        with self._lock:
            groups = list(self._groups)
            last_success = self.started if self.last_success is None else self.last_success
        # Never cleared: a poll that keeps failing drops the lag series (and with them the
        # consumer alerts), and this one is what still shows it.
        yield GaugeMetricFamily(
            "portal_sync_lag_exporter_last_success_timestamp_seconds",
            "When the last poll read the lag (Unix seconds; until then the exporter's start).",
            value=last_success,
        )
        for group in groups:
            status.add_metric([group.group], float(group.status))
            for p in group.partitions:
                values = [group.group, p.topic, str(p.partition)]
                messages.add_metric(values, float(p.lag_messages))
                if p.lag_seconds is not None:
                    seconds.add_metric(values, p.lag_seconds)
        yield messages
        yield seconds
        yield status


def poll(
    read: Callable[[], list[GroupLag]],
    collector: LagCollector,
    attempts: int = 2,
    beat: Callable[[], None] = lambda: None,
) -> bool:
    """One poll into `collector`, tried up to `attempts` times (`LagReader.read` starts
    afresh after a failure); the snapshot is dropped only when every attempt failed.
    `beat` before each attempt: brokers that do not answer make each one last its whole
    timeout (30 s), and the process is alive meanwhile."""
    for attempt in range(1, attempts + 1):
        beat()
        try:
            collector.update(read())
            return True
        except Exception as error:
            log.log(
                logging.ERROR if attempt == attempts else logging.WARNING,
                "lag poll failed, attempt %d of %d (%s: %s)",
                attempt,
                attempts,
                type(error).__name__,
                error,
            )
    collector.clear()
    return False


def run_exporter(
    reader: LagReader,
    port: int,
    host: str = "127.0.0.1",
    interval: float = 10.0,
    stop: threading.Event | None = None,
    web: WebConfig | None = None,
) -> None:
    """Poll every `interval` seconds until `stop` is set (or forever)."""
    stop = stop or threading.Event()
    collector = LagCollector()
    REGISTRY.register(collector)

    def healthy() -> bool:  # beaten before each attempt of a poll, which may take 30 s
        return time.monotonic() - heartbeat[0] < max(45.0, 3 * interval)

    def ready() -> bool:
        last = collector.last_success
        return last is not None and time.time() - last < max(30.0, 3 * interval)

    heartbeat = [time.monotonic()]

    def beat() -> None:
        heartbeat[0] = time.monotonic()

    server = serve(port, host, healthy=healthy, ready=ready, web=web)
    try:
        while not stop.is_set():
            began = time.monotonic()
            poll(reader.read, collector, beat=beat)
            stop.wait(max(0.0, interval - (time.monotonic() - began)))
    finally:
        server.shutdown()
        REGISTRY.unregister(collector)
        reader.close()
