"""How a producer process runs: its collector's thresholds.

A source's run holds a second's worth of sent messages (their futures until the broker
acknowledges them at the next checkpoint) and, for a SQL source, every row of its lookback
window; with CPython's default thresholds (700, 10, 10) the collector kept rescanning
them. `bench/sql_publish_rate.py`, 50,000 rows, three alternating pairs: 8,485-9,998
events/s with the defaults, 11,387-12,038 with these (docs/performance.md). Messages and
rows are freed by reference counting; the collector only has cycles to find."""

from __future__ import annotations

import gc

GC_THRESHOLDS = (200_000, 20, 100)


def tune_garbage_collector() -> None:
    """Move what startup built (modules, the deployment, the adapters) out of the
    collector's sight and collect less often. Call it once the sources are built."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
