"""Export the JSON Schema of the contract into schemas/json/ (`python -m schemas.export`).

The exported files are checked in; tests/test_contract.py fails when they are stale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from schemas.events import CHANGE_EVENT, JSON_SCHEMA_PATTERNS, PAYLOAD_MODELS

JSON_DIR = Path(__file__).parent / "json"


def rendered_schemas() -> dict[str, str]:
    """File name to JSON text of every exported schema."""
    schemas: dict[str, Any] = {"change-event.v1.schema.json": CHANGE_EVENT.json_schema()}
    for entity, model in PAYLOAD_MODELS.items():
        schemas[f"{entity}.v1.schema.json"] = model.model_json_schema()
    return {
        name: json.dumps(_ecma(schema), indent=2, ensure_ascii=False, sort_keys=True) + "\n"
        for name, schema in schemas.items()
    }


def _ecma(schema: Any) -> Any:
    """The schema with each pattern in ECMA-262's syntax, which JSON Schema validators
    compile (the contract's own run on pydantic's Rust engine; Python's named groups
    `(?P<name>` are `(?<name>` there)."""
    if isinstance(schema, dict):
        return {
            key: JSON_SCHEMA_PATTERNS.get(value, value).replace("(?P<", "(?<")
            if key == "pattern" and isinstance(value, str)
            else _ecma(value)
            for key, value in schema.items()
        }
    if isinstance(schema, list):
        return [_ecma(item) for item in schema]
    return schema


def main() -> None:
    JSON_DIR.mkdir(exist_ok=True)
    for name, text in rendered_schemas().items():
        (JSON_DIR / name).write_text(text, encoding="utf-8")
        print(f"wrote {JSON_DIR / name}")


if __name__ == "__main__":
    main()
