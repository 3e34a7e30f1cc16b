"""What `adapters check` points out about a `sql` source without failing it.

- a cursor column of whole seconds (or coarser): two changes of a row within one tick share
  their `updated_at`; they are told apart by the version column, else by the content hash
  the state keeps for `lookback_seconds`;
- no version column: versions derive from `updated_at`, so a source clock running
  backwards gives a lower one (sent as the last version + 1 while the row is remembered);
- on PostgreSQL, a `lookback_seconds` shorter than the longest open transaction (one that
  wrote) seen in `pg_stat_activity`: such a transaction stamps its rows with its start time;
- many rows under one cursor time (a bulk update's, an import's): while they are in the
  window the state remembers each, a cost that grows with their square (docs/adapters.md,
  "Bulk updates"). Counted over the whole table: a check is run once, not every poll;
- with a `pk_column`, keys that more than one row holds: versions rise per row, so two
  live rows of one key overwrite each other's values (docs/adapters.md, "One row per
  key"; a soft delete whose key another row holds live is not sent).

Messages name columns and options, never values.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from producers.sql_polling import SqlPollingAdapter
from producers.sql_snapshot import longest_transaction_seconds

SAMPLE = 1000
# Rows under one cursor time above which the check warns (50,000 such rows: a 4 MB state
# rewritten at every checkpoint, docs/adapters.md "Bulk updates").
CROWDED = 10_000


def check_warnings(poller: SqlPollingAdapter) -> list[str]:
    config = poller.config
    notes = []
    coarse = _whole_seconds(poller)
    if coarse is not None:
        apart = (
            "the version column tells them apart"
            if config.version_column
            else f"a content hash kept {config.lookback_seconds:g} s tells them apart"
        )
        notes.append(
            f"cursor column {config.updated_at_column} has whole seconds only ({coarse}): "
            f"two changes of a row within one second share its time; {apart}"
        )
    if config.version_column is None:
        notes.append(
            "no version_column: versions derive from the cursor time, so a source clock "
            "running backwards is corrected (last version + 1) only while the state "
            f"remembers the row ({config.lookback_seconds:g} s behind the cursor)"
        )
    leading = poller.leading_columns()
    if leading is not None and config.updated_at_column not in leading:
        notes.append(
            f"no index of {config.table} begins with {config.updated_at_column}: every page "
            "and every idle poll reads the whole table at the source's expense; create one "
            f"on ({config.updated_at_column}, {poller.pk.name})"
        )
    unplaced = poller.rows_without_cursor_time()
    if unplaced:
        notes.append(
            f"{unplaced} rows have no {config.updated_at_column} (or an infinite one) or no "
            f"{poller.pk.name}: without a place in the cursor's order a row is never read; "
            "give the columns a value on insert (a default or a trigger)"
        )
    try:  # a query the source refuses or times out loses this note only
        crowded = _most_rows_at_one_time(poller)
    except Exception as error:
        crowded = 0
        notes.append(f"rows per cursor time not counted ({type(error).__name__})")
    if crowded > CROWDED:
        notes.append(
            f"{crowded} rows share one {config.updated_at_column} (a bulk update's or an "
            "import's): while they are within lookback_seconds of the newest row, the "
            "state remembers each of them and is rewritten at every checkpoint "
            '(docs/adapters.md, "Bulk updates"); give each row its own change time'
        )
    if config.pk_column and config.pk_column != config.key_column:
        try:
            shared = _keys_of_several_rows(poller)
        except Exception as error:
            shared = 0
            notes.append(f"keys held by several rows not counted ({type(error).__name__})")
        if shared:
            notes.append(
                f"{shared} {config.key_column} values are held by more than one row: versions "
                f"rise per {config.pk_column}, so two rows of one key live at once overwrite "
                "each other's values (a soft-deleted one beside a live one is handled: its "
                'delete is not sent) (docs/adapters.md, "One row per key")'
            )
    if poller.postgresql:
        notes += _long_transactions(poller)
    return notes


def _keys_of_several_rows(poller: SqlPollingAdapter) -> int:
    """How many keys more than one row of the table holds."""
    key = poller.table.c[poller.config.key_column]
    shared = (
        select(key)
        .select_from(poller.table)
        .where(key.is_not(None))
        .group_by(key)
        .having(func.count() > 1)
        .subquery()
    )
    with poller.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(shared)).scalar() or 0)


def _most_rows_at_one_time(poller: SqlPollingAdapter) -> int:
    """The most rows the cursor reads under one time (as it orders them: on SQLite one
    instant written in two forms is one time)."""
    rows = func.count().label("rows")
    query = (
        select(rows)
        .select_from(poller.table)
        .where(poller.updated_at.is_not(None), poller.pk.is_not(None))
        .group_by(poller.cursor_order(poller.updated_at))
        .order_by(rows.desc())
        .limit(1)
    )
    with poller.engine.connect() as conn:
        return int(conn.execute(query).scalar() or 0)


def _whole_seconds(poller: SqlPollingAdapter) -> str | None:
    """Why the cursor column holds whole seconds at most, or None."""
    if poller.config.updated_at_format is not None:
        return f"updated_at_format {poller.config.updated_at_format}"
    kind: Any = poller.updated_at.type
    if getattr(kind, "precision", None) == 0 or getattr(kind, "fsp", None) == 0:
        return f"column type {kind}"
    query = select(poller.updated_at).where(poller.placed()).order_by(poller.updated_at.desc())
    query = query.limit(SAMPLE)  # the rows read (PostgreSQL's `infinity` cannot be)
    with poller.engine.connect() as conn:
        values = [v for (v,) in conn.execute(query) if v is not None]
    moments = [poller.cursor_time(v) for v in values]
    if len(moments) > 1 and all(m.microsecond == 0 for m in moments):
        return f"the newest {len(moments)} values all fall on whole seconds"
    return None


def _long_transactions(poller: SqlPollingAdapter) -> list[str]:
    seconds = longest_transaction_seconds(poller.engine)
    lookback = poller.config.lookback_seconds
    if seconds is None or seconds <= lookback:
        return []
    if poller.snapshot:
        effect = (
            "snapshot capture still reads its rows, but they carry an updated_at older "
            "than the rows the state remembers, so a version derived from it is not "
            "checked against the last one sent"
        )
    else:
        effect = "a row it commits with an older updated_at is missed (lookback capture)"
    return [
        f"lookback_seconds {lookback:g} is shorter than the longest open writing transaction "
        f"seen in pg_stat_activity ({seconds:.0f} s): {effect}"
    ]
