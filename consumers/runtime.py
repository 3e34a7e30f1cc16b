"""How the worker's processes run: the collector's thresholds and the GIL's switch interval.

Both the worker and its validator children (`consumers.validators`) hold a batch's tens of
thousands of small containers while they work on it; each tunes its collector at start.
`portal-sync produce` tunes its process's collector the same way: a source's run holds a
second's sent messages (their futures until the next checkpoint) and, for a SQL source,
the rows of its lookback window, which the default thresholds kept rescanning
(`bench/sql_publish_rate.py`, 50,000 rows, three alternating pairs: 8,485-9,998 events/s
with the defaults, 11,387-12,038 with these)."""

from __future__ import annotations

import gc

# Each batch keeps tens of thousands of small containers alive (events, views, rows), so
# CPython's default thresholds (700, 10, 10) ran young and middle collections that kept
# rescanning them: with the defaults, parsing took 51 µs per event and applying 83 µs;
# with (50,000, 20, 100), 23 and 72 µs (docs/performance-log.md). A young collection every
# 200,000 allocations (about one per batch of 2,000 events) instead of every 50,000 took
# the worker from 86-96 to 73-78 µs of CPU per event (three alternating pairs), RSS the
# same. The batch's objects are freed by reference counting; the collector only has
# cycles to find, and few are made. A validator child checking its slices of 2,000
# messages with the defaults spent 56-63 µs per event, with these 44-51 (fourteenth round).
GC_THRESHOLDS = (200_000, 20, 100)


# How long a thread keeps the GIL when another wants it (CPython's default: 5 ms). The
# batch's thread gives the GIL up at every exchange with PostgreSQL (a batch's statements,
# sent part after part) and then waited behind the consumer's thread, which parses the next
# batch meanwhile, up to 5 ms each time. With 0.5 ms, three alternating pairs of
# `bench/e2e.py throughput --events 60000 --store postgresql`: 9,118, 9,483, 9,409 →
# 9,942, 10,336, 9,542 events/s (+6 %), the worker's CPU per event the same.
SWITCH_INTERVAL_SECONDS = 0.0005


def tune_garbage_collector() -> None:
    """Move what startup built (modules, rules, the province list) out of the collector's
    sight and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
