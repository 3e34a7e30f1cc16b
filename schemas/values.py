"""`value_class`: the class decorator of the small read-only records made per event (a message,
a checked event, a source's view, a merged record, ...).

A frozen dataclass sets each field in `__init__` through `object.__setattr__`, a generic
call that cost the worker about 9 % of its instructions per event (callgrind, the bench's
mix: docs/performance-log.md, eighth round). A `value_class` is a dataclass with slots whose fields
are set directly, and the type checker still treats it as frozen (`dataclass_transform`
with `frozen_default`): mypy, strict in CI, rejects an assignment to a field. Equality and
hashing are a frozen dataclass's: by field values (`unsafe_hash`: the hash of a value with
an unhashable field, such as a dict, raises as it would for a frozen one).
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field
from typing import TypeVar, dataclass_transform

T = TypeVar("T")


@dataclass_transform(frozen_default=True, field_specifiers=(field, Field))
def value_class(cls: type[T]) -> type[T]:
    """A dataclass with slots, read-only for the type checker, hashable by its fields."""
    return dataclass(slots=True, unsafe_hash=True)(cls)
