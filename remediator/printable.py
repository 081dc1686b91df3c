"""Text that a process controls (comm, cmdline, exe, paths) made safe for a terminal or a log line.

Any local user can name a process `x\\n<0>forged` or put terminal escape sequences in its command
line. Printed raw, the first forges a journald entry of its own (with its own priority) and the
second drives an operator's terminal. Control characters become visible escapes instead; the audit
log is JSON and keeps the exact bytes.
"""

from __future__ import annotations

import re

# C0 controls (newline, carriage return, escape...), DEL, C1 controls, the Unicode line and
# paragraph separators some viewers break lines on, and the bidirectional marks, embeddings,
# overrides and isolates, which reorder what a terminal shows ("trojan source": a name can be made
# to read as another, or to hide the columns after it).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """'x\\n<0>y' -> 'x\\\\n<0>y': one line, no control characters; anything else unchanged."""
    return _UNPRINTABLE.sub(lambda match: _NAMED.get(match.group(), f"\\x{ord(match.group()):02x}" if ord(match.group()) < 0x100 else f"\\u{ord(match.group()):04x}"), text)
