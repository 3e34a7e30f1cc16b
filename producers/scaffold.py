"""`portal-sync adapters new NAME`: a plug-in package that installs and passes its own tests.

The generated adapter reads an example JSON Lines export (line number as cursor); a
province engineer replaces `read` with their source and the example data with theirs.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

from producers.adapters import installed
from schemas import errors

NAME = re.compile(r"^[a-z][a-z0-9-]{1,40}$")


class ScaffoldError(errors.Refused):
    pass


PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "portal-sync-adapter-$name"
version = "0.1.0"
description = "portal-sync source adapter $name"
requires-python = ">=3.11"
dependencies = ["portal-sync"]

[project.entry-points."portal_sync.adapters"]
$name = "$module.adapter:$cls"

[tool.setuptools.packages.find]
include = ["$module*"]

[tool.pytest.ini_options]
testpaths = ["tests"]
"""

ADAPTER = '''\
"""Source adapter `$name` for portal-sync.

Replace `read` with your source: yield one Record per change, in cursor order, and a
Checkpoint whose state lets the next run resume. The framework validates, publishes,
checkpoints after the broker's acknowledgement and retries; see docs/adapters.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from producers.sdk import (
    Adapter,
    Checkpoint,
    FatalError,
    Item,
    Record,
    SkippableRecord,
    State,
)
from pydantic import BaseModel, ConfigDict


class ${cls}Config(BaseModel):
    """`connection` and `mapping` of a source in the deployment file."""

    model_config = ConfigDict(extra="forbid")

    path: Path  # JSON Lines: {"id", "version", "changed_at", "name", "deleted"}


class $cls(Adapter):
    """$name: citizens from a JSON Lines export.

    An example: replace it with your source."""

    entity = "citizen"
    key = "id"
    cursor = "line number"
    sorted_output = True
    emits_deletes = True
    Config = ${cls}Config

    def read(self, state: State) -> Iterator[Item]:
        config = self.config
        assert isinstance(config, ${cls}Config)
        path = self.base_dir / config.path
        if not path.exists():
            raise FatalError("the export file does not exist")
        lines = path.read_text(encoding="utf-8").splitlines()
        position = int(state.get("line", 0))
        for number, line in enumerate(lines[position:], start=position + 1):
            yield self._record(line, f"line {number}")
        yield Checkpoint({"line": len(lines)})

    def _record(self, line: str, origin: str) -> Record | SkippableRecord:
        # the line as read: `dlq show` can then say which record failed
        raw = line.encode("utf-8", "surrogateescape")
        try:
            row = json.loads(line)
        except ValueError:
            return SkippableRecord("invalid_json", "not JSON", origin, raw=raw)
        try:
            changed = datetime.fromisoformat(row["changed_at"])
            data = None if row.get("deleted") else {"full_name": row.get("name")}
            return Record(str(row["id"]), int(row["version"]), changed, data, origin)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            reason = f"not a change record ({type(error).__name__})"
            return SkippableRecord("unmappable_record", reason, origin, raw=raw)
'''

EXAMPLE_DATA = """\
{"id":"001090000001","version":1,"changed_at":"2025-08-01T08:00:00+07:00","name":"Nguyễn Văn An"}
{"id":"001190000002","version":1,"changed_at":"2025-08-01T08:05:00+07:00","name":"Trần Thị Bình"}
{"id":"001090000001","version":2,"changed_at":"2025-08-02T09:00:00+07:00","name":"Nguyễn Văn Ân"}
{"id":"001190000002","version":2,"changed_at":"2025-08-03T10:00:00+07:00","deleted":true}
"""

CONFIG = """\
# Deployment configuration: one [[sources]] entry per source. Secrets: "$${ENV_VAR}".
[producer]
state_dir = "state"
metrics_port = 0

[[sources]]
id = "$name-example"
source = "$name"
adapter = "$name"
interval_seconds = 30

[sources.connection]
path = "example/changes.jsonl"
"""

TEST = """\
from producers.pytest_plugin import conformance_tests

test_conformance = conformance_tests("../example.toml")
"""

README = """\
# portal-sync-adapter-$name

```sh
pip install -e .                                            # registers adapter "$name"
pytest                                                      # conformance checks on example/
portal-sync adapters list                                   # shows "$name"
portal-sync adapters check --config example.toml            # the check table
portal-sync produce --config example.toml --once            # publish to Kafka
```
"""


def scaffold(name: str, parent: Path) -> Path:
    """Write the package `portal-sync-adapter-NAME` under `parent`; return its directory."""
    if not NAME.match(name):  # a wrong argument, as a wrong option is
        raise errors.ConfigurationError("name: lowercase letters, digits and '-', 2-41 characters")
    if name in installed():  # two entry points of one name: one of them is never loaded
        raise ScaffoldError(f"an adapter named {name!r} is installed already: choose another")
    root = parent / f"portal-sync-adapter-{name}"
    if root.exists():
        raise ScaffoldError(f"{root} already exists")
    module = f"portal_sync_adapter_{name.replace('-', '_')}"
    cls = "".join(part.capitalize() for part in name.split("-")) + "Adapter"
    values = {"name": name, "module": module, "cls": cls}
    files = {
        "pyproject.toml": PYPROJECT,
        f"{module}/__init__.py": '"""portal-sync source adapter $name."""\n',
        f"{module}/adapter.py": ADAPTER,
        "example/changes.jsonl": EXAMPLE_DATA,
        "example.toml": CONFIG,
        "tests/test_conformance.py": TEST,
        "README.md": README,
        ".gitignore": "state/\n*.egg-info/\n__pycache__/\n",
    }
    for relative, template in files.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(Template(template).substitute(values), encoding="utf-8")
    return root
