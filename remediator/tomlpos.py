"""TOML with positions: tomli decides what the document means, a small scanner says where each key is.

tomli (like tomllib) returns plain dicts without line numbers, and a review tool must point at the
offending key. So a document is parsed twice: tomli parses it (and alone decides validity: syntax
errors come from it, with its line and column), then, only for text tomli accepted, `_Scanner`
walks the same text and records for every key path the position of the key and of its value.

A key path is a tuple of table keys and array indices, as the decoded data is addressed:
("policy", 2, "actions", 1, "nice") is `nice` in the second `[[policy.actions]]` of the third
`[[policy]]`. Array elements get positions too (("policy", 0, "match", "comm", 1) is the second glob).
Lines and columns are 1-based; columns count characters, as tomli's do.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Any, Union

import tomli

from .errors import Location

KeyPath = tuple[Union[str, int], ...]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_WHITESPACE = " \t"
# A date followed by a space and a time is one value ("1979-05-27 07:32:00"): the space is not the end.
_DATE_THEN_TIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:")


def format_key_path(path: KeyPath) -> str:
    """("policy", 0, "actions", 1, "nice") -> "policy[0].actions[1].nice" (keys quoted when not bare)."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if _BARE_KEY.fullmatch(part) else '"' + part.replace("\\", "\\\\").replace('"', '\\"') + '"'
            text += ("." if text else "") + name
    return text


@dataclass(frozen=True)
class Span:
    """Where a key and its value start (1-based line and column)."""

    key_line: int
    key_column: int
    value_line: int
    value_column: int


class TomlSyntaxError(Exception):
    """tomli refused the text (or it is not UTF-8); `location` says where."""

    def __init__(self, location: Location, message: str):
        super().__init__(f"{location}: {message}")
        self.location = location
        self.message = message


@dataclass
class Document:
    """A parsed TOML document: the decoded data plus the position of every key path in the text."""

    path: str
    text: str
    data: dict[str, Any]
    spans: dict[KeyPath, Span] = field(default_factory=dict)
    complete: bool = True  # False if the scanner gave up (a bug); positions then fall back to parents

    def _nearest(self, path: KeyPath) -> tuple[KeyPath, Span | None]:
        while path:
            span = self.spans.get(path)
            if span is not None:
                return path, span
            path = path[:-1]
        return (), None

    def key_location(self, path: KeyPath) -> Location:
        """Where the key at `path` is written (or its nearest written parent)."""
        _, span = self._nearest(path)
        if span is None:
            return Location(self.path, 1, 1)  # the document itself (even an empty one) starts there
        return Location(self.path, span.key_line, span.key_column)

    def value_location(self, path: KeyPath) -> Location:
        """Where the value at `path` starts (for a table: its header or its opening brace)."""
        _, span = self._nearest(path)
        if span is None:
            return Location(self.path, 1, 1)
        return Location(self.path, span.value_line, span.value_column)


def decode_utf8(raw: bytes, path: str) -> str:
    """TOML is UTF-8; a bad byte is reported where it is."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start]
        line = before.count(b"\n") + 1
        column = len(before[before.rfind(b"\n") + 1 :].decode("utf-8", errors="replace")) + 1
        raise TomlSyntaxError(
            Location(path, line, column), f"not UTF-8: byte 0x{raw[exc.start]:02x} cannot start or continue a character"
        ) from None


def parse(source: str | bytes, path: str) -> Document:
    """Parse TOML text into a Document; raise TomlSyntaxError with the position of the first problem."""
    text = decode_utf8(source, path) if isinstance(source, bytes) else source
    try:
        data = tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        line, column, message = _decode_error_position(exc, text)
        if message == "Illegal character '\\n'":
            # tomli says this only inside a one-line string that reaches the end of its line.
            message = "string not closed before the end of the line (\"...\" and '...' are one line; use \"\"\"...\"\"\" for several)"
        if "nested more than the allowed" in message:
            message = TOO_DEEP  # tomli 2.1+; older ones hit the recursion limit (below)
        raise TomlSyntaxError(Location(path, line, column), f"TOML syntax: {_sentence(message)}") from None
    except RecursionError:
        # tomli before 2.1 (Debian 12's) refuses arrays and inline tables nested this deep by
        # running out of stack, without a position.
        line, column = _deepest_nesting(text)
        raise TomlSyntaxError(Location(path, line, column), f"TOML syntax: {TOO_DEEP}") from None
    document = Document(path, text, data)
    try:
        document.spans = _Scanner(text).scan()
    except (_ScanError, RecursionError):
        document.complete = False  # positions fall back to the nearest known parent
    return document


# One message whatever the tomli version: 2.1+ says "nested more than the allowed 400 levels",
# older ones run out of stack at a depth that depends on the interpreter.
TOO_DEEP = "inline arrays/tables are nested too deeply (a few hundred levels at most)"
_POSITION_SUFFIX = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$", re.S)
_END_SUFFIX = " (at end of document)"


def _decode_error_position(exc: Exception, text: str) -> tuple[int, int, str]:
    """(line, column, message) of a TOMLDecodeError. tomli 2.1+ carries them as attributes; older
    ones (Debian 12's 2.0.1, the stdlib's tomllib) only in the message: '... (at line 3, column 5)'."""
    if getattr(exc, "lineno", None):
        return exc.lineno, getattr(exc, "colno", 0) or 0, getattr(exc, "msg", None) or str(exc)
    message = str(exc)
    match = _POSITION_SUFFIX.match(message)
    if match:
        return int(match.group(2)), int(match.group(3)), match.group(1)
    if message.endswith(_END_SUFFIX):
        last_line = text.rsplit("\n", 1)[-1]
        return text.count("\n") + 1, len(last_line) + 1, message[: -len(_END_SUFFIX)]
    return 0, 0, message


def _deepest_nesting(text: str) -> tuple[int, int]:
    """Where brackets first reach their deepest nesting (strings are not skipped: good enough to point at)."""
    depth = deepest = 0
    line, column = 1, 0
    where = (1, 1)
    for char in text:
        column += 1
        if char == "\n":
            line, column = line + 1, 0
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest, where = depth, (line, column)
        elif char in "]}":
            depth = max(0, depth - 1)
    return where


def _sentence(message: str) -> str:
    """tomli's message as the rest of a sentence: 'Invalid value' -> 'invalid value', 'TOML ...' kept."""
    if len(message) > 1 and message[1].isupper():
        return message
    return message[:1].lower() + message[1:]


class _ScanError(Exception):
    pass


class _Scanner:
    """Walks TOML text that tomli accepted and records where each key path is."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.line_starts = [0] + [index + 1 for index, char in enumerate(text) if char == "\n"]
        self.spans: dict[KeyPath, Span] = {}
        # Arrays of tables ([[x]]) seen so far, by concrete path, with their element count: a later
        # header naming x (e.g. [x.y] or [[x.y]]) refers to the last element.
        self.table_arrays: dict[KeyPath, int] = {}

    # -- positions ----------------------------------------------------------------------------
    def _line_column(self, offset: int) -> tuple[int, int]:
        index = bisect.bisect_right(self.line_starts, offset) - 1
        return index + 1, offset - self.line_starts[index] + 1

    def _record(self, path: KeyPath, key_offset: int, value_offset: int, overwrite: bool = True) -> None:
        if not overwrite and path in self.spans:
            return
        self.spans[path] = Span(*self._line_column(key_offset), *self._line_column(value_offset))

    # -- characters ---------------------------------------------------------------------------
    def _peek(self, offset: int = 0) -> str:
        index = self.pos + offset
        return self.text[index] if index < len(self.text) else ""

    def _expect(self, char: str) -> None:
        if self._peek() != char:
            raise _ScanError(f"expected {char!r} at offset {self.pos}")
        self.pos += 1

    def _skip_whitespace(self) -> None:
        while self._peek() and self._peek() in _WHITESPACE:
            self.pos += 1

    def _skip_comment(self) -> None:
        if self._peek() == "#":
            end = self.text.find("\n", self.pos)
            self.pos = len(self.text) if end < 0 else end

    def _skip_blank(self) -> None:
        """Whitespace, newlines and comments (inside arrays and inline tables, and between statements)."""
        while True:
            start = self.pos
            self._skip_whitespace()
            self._skip_comment()
            while self._peek() in ("\n", "\r") and self._peek():
                self.pos += 1
            if self.pos == start:
                return

    # -- document -----------------------------------------------------------------------------
    def scan(self) -> dict[KeyPath, Span]:
        table: KeyPath = ()
        while True:
            self._skip_blank()
            if self.pos >= len(self.text):
                return self.spans
            start = self.pos
            if self.text.startswith("[[", self.pos):
                self.pos += 2
                keys = self._key_parts()
                self._skip_whitespace()
                self._expect("]")
                self._expect("]")
                table = self._open_table_array(keys, start)
            elif self._peek() == "[":
                self.pos += 1
                keys = self._key_parts()
                self._skip_whitespace()
                self._expect("]")
                table = self._open_table(keys, start)
            else:
                self._key_value(table)
            self._skip_whitespace()
            self._skip_comment()
            if self.pos < len(self.text) and self._peek() not in ("\n", "\r"):
                raise _ScanError(f"unexpected text at offset {self.pos}")

    def _record_parents(self, keys: list[tuple[str, int]], header_offset: int, upto: int) -> KeyPath:
        path: KeyPath = ()
        for name, offset in keys[:upto]:
            path = path + (name,)
            self._record(path, offset, header_offset, overwrite=False)
            count = self.table_arrays.get(path)
            if count:
                path = path + (count - 1,)
        return path

    def _open_table(self, keys: list[tuple[str, int]], header_offset: int) -> KeyPath:
        parent = self._record_parents(keys, header_offset, len(keys) - 1)
        name, offset = keys[-1]
        path = parent + (name,)
        self._record(path, offset, header_offset)
        return path

    def _open_table_array(self, keys: list[tuple[str, int]], header_offset: int) -> KeyPath:
        parent = self._record_parents(keys, header_offset, len(keys) - 1)
        name, offset = keys[-1]
        array_path = parent + (name,)
        self._record(array_path, offset, header_offset, overwrite=False)
        index = self.table_arrays.get(array_path, 0)
        self.table_arrays[array_path] = index + 1
        path = array_path + (index,)
        self._record(path, offset, header_offset)
        return path

    # -- keys ---------------------------------------------------------------------------------
    def _key_parts(self) -> list[tuple[str, int]]:
        """A dotted key: [(name, offset of the name), ...]."""
        parts = []
        while True:
            self._skip_whitespace()
            offset = self.pos
            parts.append((self._simple_key(), offset))
            self._skip_whitespace()
            if self._peek() != ".":
                return parts
            self.pos += 1

    def _simple_key(self) -> str:
        char = self._peek()
        if char == '"':
            start = self.pos
            self._basic_string_end()
            return _decode_string(self.text[start : self.pos])
        if char == "'":
            start = self.pos
            self._literal_string_end()
            return self.text[start + 1 : self.pos - 1]
        match = _BARE_KEY.match(self.text, self.pos)
        if not match:
            raise _ScanError(f"expected a key at offset {self.pos}")
        self.pos = match.end()
        return match.group(0)

    def _key_value(self, table: KeyPath) -> None:
        keys = self._key_parts()
        self._skip_whitespace()
        self._expect("=")
        self._skip_whitespace()
        value_offset = self.pos
        path = table
        for name, offset in keys[:-1]:
            path = path + (name,)
            self._record(path, offset, offset, overwrite=False)
        name, offset = keys[-1]
        path = path + (name,)
        self._record(path, offset, value_offset)
        self._value(path)

    # -- values -------------------------------------------------------------------------------
    def _value(self, path: KeyPath) -> None:
        char = self._peek()
        if char == '"':
            self._basic_string_end()
        elif char == "'":
            self._literal_string_end()
        elif char == "[":
            self._array(path)
        elif char == "{":
            self._inline_table(path)
        else:
            self._scalar_end()

    def _basic_string_end(self) -> None:
        if self.text.startswith('"""', self.pos):
            self._multiline_end('"""', escapes=True)
            return
        self.pos += 1
        while True:
            char = self._peek()
            if char == "":
                raise _ScanError("unterminated string")
            if char == "\\":
                self.pos += 2
            elif char == '"':
                self.pos += 1
                return
            else:
                self.pos += 1

    def _literal_string_end(self) -> None:
        if self.text.startswith("'''", self.pos):
            self._multiline_end("'''", escapes=False)
            return
        end = self.text.find("'", self.pos + 1)
        if end < 0:
            raise _ScanError("unterminated literal string")
        self.pos = end + 1

    def _multiline_end(self, delimiter: str, escapes: bool) -> None:
        self.pos += 3
        while self.pos < len(self.text):
            char = self._peek()
            if escapes and char == "\\":
                self.pos += 2
            elif self.text.startswith(delimiter, self.pos):
                self.pos += 3
                # Up to two more quote characters belong to the content ('''a''''' is "a''").
                for _ in range(2):
                    if self._peek() == delimiter[0]:
                        self.pos += 1
                return
            else:
                self.pos += 1
        raise _ScanError("unterminated multi-line string")

    def _scalar_end(self) -> None:
        start = self.pos
        if _DATE_THEN_TIME.match(self.text, self.pos):
            self.pos += 11
        while self._peek() and self._peek() not in " \t\r\n,]}#":
            self.pos += 1
        if self.pos == start:
            raise _ScanError(f"expected a value at offset {start}")

    def _array(self, path: KeyPath) -> None:
        self._expect("[")
        index = 0
        while True:
            self._skip_blank()
            if self._peek() == "]":
                self.pos += 1
                return
            element = path + (index,)
            self._record(element, self.pos, self.pos)
            self._value(element)
            index += 1
            self._skip_blank()
            if self._peek() == ",":
                self.pos += 1
            elif self._peek() != "]":
                raise _ScanError(f"expected ',' or ']' at offset {self.pos}")

    def _inline_table(self, path: KeyPath) -> None:
        self._expect("{")
        while True:
            self._skip_blank()  # TOML 1.1 allows newlines and comments in inline tables
            if self._peek() == "}":
                self.pos += 1
                return
            self._key_value(path)
            self._skip_blank()
            if self._peek() == ",":
                self.pos += 1
            elif self._peek() != "}":
                raise _ScanError(f"expected ',' or '}}' at offset {self.pos}")


def _decode_string(token: str) -> str:
    """The value of one basic-string token, decoded by tomli itself so escapes agree exactly."""
    try:
        value = tomli.loads("k = " + token)["k"]
    except tomli.TOMLDecodeError:
        raise _ScanError(f"undecodable key {token!r}") from None
    if not isinstance(value, str):
        raise _ScanError(f"key {token!r} is not a string")
    return value
