"""`portal-sync export`: canonical records as sorted JSON Lines."""

from __future__ import annotations

import json
from typing import TextIO

from store.core import Store


def export_records(
    store_url: str, out: TextIO, entity: str | None = None, provenance: bool = False
) -> int:
    """Write `{"entity", "key", "data", "sources"}` per record, sorted; return the count.
    With `provenance`, each line also has `"provenance": {field: {"source", "version"}}`."""
    store = Store(store_url)
    count = 0
    try:
        for entity_name, key, data, sources, origins in store.iter_records(entity):
            line = {"entity": entity_name, "key": key, "data": data, "sources": sources}
            if provenance:
                line["provenance"] = origins or {}
            out.write(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n")
            count += 1
    finally:
        store.close()
    return count
