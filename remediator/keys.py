"""One key of the policy and config formats, as plain data (schema.py describes the formats with them).

Apart from the TOML stack, so that an action kind (actuators/<kind>.py) can declare its own keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

_NO_DEFAULT = object()

ItemCheck = Callable[[str], str]  # returns the normalised item, or raises ValueError(message)


@dataclass(frozen=True)
class Key:
    """One key of the format. `type` is one of schema.TYPES; the other fields apply to some types only."""

    name: str
    type: str
    doc: str
    required: bool = False
    default: Any = _NO_DEFAULT  # as written in TOML (e.g. "60s"), so docs and schema show it verbatim
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] = ()  # enum
    keyword: str = ""  # cpus: the word accepted besides a CPU list ("auto", "unprotected")
    pattern: str = ""  # string: a regex the whole value must match
    pattern_hint: str = ""
    item_check: Optional[ItemCheck] = None  # strings/string: per-item semantic check
    allow_empty: bool = False  # strings/integers/table-array: [] allowed
    item_name: str = "item"  # table-array: what one element is called in messages
    empty_message: str = "is an empty list; give at least one item"  # strings: when [] is not allowed
    keys: tuple["Key", ...] = ()  # table, table-array
    exactly_one_of: tuple[str, ...] = ()  # table: one and only one of these keys
    example: str = ""

    @property
    def has_default(self) -> bool:
        return self.default is not _NO_DEFAULT

    def key(self, name: str) -> "Key | None":
        for child in self.keys:
            if child.name == name:
                return child
        return None
