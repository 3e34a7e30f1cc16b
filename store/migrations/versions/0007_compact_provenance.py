"""Provenance kept per source, not per field: `records.provenance` becomes source -> the
fields it gave (sorted), instead of field -> {"source", "version"}. A field's version is
its source's in `records.sources`, so it was kept twice; the compact form is about a third
of the JSON and makes the record row (and its upsert) smaller. Readers expand it
(`schemas.views.expand_provenance`), so `export --provenance` and `store show` print what
they printed before.

On PostgreSQL one `UPDATE` rewrites every row in place (about 59,000 records/s on the
2-core development machine); on SQLite, Python rewrites them in chunks of 5,000 in key
order (about 29,000 records/s). Both in the migration's one transaction. The downgrade
expands them back, in Python on both.

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from schemas.views import compact_provenance, expand_provenance

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

CHUNK = 5000


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _rewrite(convert: Callable[[Mapping[str, Any], Mapping[str, int]], Any]) -> None:
    conn = op.get_bind()
    records = sa.table(
        "records",
        sa.column("entity", sa.String()),
        sa.column("key", sa.String()),
        sa.column("sources", _json()),
        sa.column("provenance", _json()),
    )
    update = (
        records.update()
        .where(records.c.entity == sa.bindparam("e"), records.c.key == sa.bindparam("k"))
        .values(provenance=sa.bindparam("p", type_=_json()))
    )
    after: tuple[str, str] | None = None
    while True:
        query = (
            sa.select(records.c.entity, records.c.key, records.c.sources, records.c.provenance)
            .where(records.c.provenance.is_not(None))
            .order_by(records.c.entity, records.c.key)
            .limit(CHUNK)
        )
        if after is not None:
            query = query.where(sa.tuple_(records.c.entity, records.c.key) > sa.tuple_(*after))
        rows = conn.execute(query).all()
        if not rows:
            return
        changed = []
        for entity, key, sources, provenance in rows:
            if not isinstance(provenance, Mapping):  # JSON null: nothing to rewrite
                continue
            rewritten = convert(provenance, sources)
            if rewritten != provenance:
                changed.append({"e": entity, "k": key, "p": rewritten})
        if changed:
            conn.execute(update, changed)
        after = (rows[-1].entity, rows[-1].key)


# PostgreSQL: the same rewrite in one statement, row by row (no aggregate over the whole
# table: memory stays flat whatever its size); fields in code point order, as Python sorts
# them. A record without fields, {}, keeps it; rows already rewritten are left alone.
COMPACT_SQL = """
UPDATE records r SET provenance = (
    SELECT jsonb_object_agg(source, fields)
    FROM (
        SELECT f.value ->> 'source' AS source,
               jsonb_agg(f.key ORDER BY f.key COLLATE "C") AS fields
        FROM jsonb_each(r.provenance) AS f
        GROUP BY f.value ->> 'source'
    ) AS by_source
)
WHERE jsonb_typeof(r.provenance) = 'object'
  AND EXISTS (SELECT 1 FROM jsonb_each(r.provenance) AS f WHERE jsonb_typeof(f.value) = 'object')
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(COMPACT_SQL)
        return
    _rewrite(lambda provenance, _: compact_provenance(provenance))


def downgrade() -> None:
    _rewrite(expand_provenance)
