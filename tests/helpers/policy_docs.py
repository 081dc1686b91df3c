"""Generated policy and config documents, a TOML writer that varies its style, and mutations.

Everything here is a function of a `random.Random` that the tests draw from hypothesis
(st.randoms), so a failure is reported with its document and replays exactly. The writer varies
every spelling the format allows:
[table] headers, dotted keys or inline tables; [[array]] headers or inline arrays of tables;
basic, literal and multi-line strings, with or without escapes; bare or quoted keys; one-line or
multi-line arrays with comments and trailing commas."""

from __future__ import annotations

import copy
import random
import string

from remediator.schema import MAX_SETTLE_S

# -- values ---------------------------------------------------------------------------------------
# Plain functions of a random.Random rather than composite strategies: a document takes ~100
# choices, and as hypothesis draws they cost ~6 ms per document, which would put 10,000
# documents far over the time budget. The Random comes from hypothesis (st.randoms), so a failing
# document is still reported and replayed.

NAME_CHARS = string.ascii_lowercase + string.digits + "-"
COMM_CHARS = string.ascii_lowercase + string.digits + "-_."
MATCH_FIELDS = ("comm", "exe", "cmdline", "cgroup", "unit", "user", "ancestor")
CMDLINES = (r"--config\s+/etc/\w+", r"org\.logstash\.Logstash", "(^|/)fluentd( |$)", "x")
DESCRIPTION_EXTRAS = ("\n", "\t", '"', "'", "\\", "é", "日本", "\U0001f600", "'" * 3, '"' * 3, "#", "=", "[", "}")


def name(rng: random.Random, max_size: int = 12) -> str:
    text = "".join(rng.choice(NAME_CHARS) for _ in range(rng.randint(1, max_size)))
    return rng.choice(string.ascii_lowercase) + text[1:]


def comm_glob(rng: random.Random) -> str:
    literal = "".join(rng.choice(COMM_CHARS) for _ in range(rng.randint(1, 14)))
    return rng.choice([literal, literal + "*", literal[:13] + "?", "[ab]" + literal[:10]])


def duration(rng: random.Random, min_s: float, max_s: float) -> str:
    while True:
        unit = rng.choice(("ms", "s", "m"))
        value = rng.randint(0, 600)
        if min_s <= value * {"ms": 1e-3, "s": 1.0, "m": 60.0}[unit] <= max_s:
            return f"{value}{unit}"


def cpu_list(rng: random.Random, at_least: int = 1) -> str:
    return ",".join(map(str, sorted(rng.sample(range(64), rng.randint(at_least, 6)))))


def description(rng: random.Random) -> str:
    characters = string.ascii_letters + " .,;:!?0123456789"
    return "".join(
        rng.choice(DESCRIPTION_EXTRAS) if rng.random() < 0.3 else rng.choice(characters) for _ in range(rng.randint(1, 12))
    )


def match_table(rng: random.Random) -> dict:
    table: dict = {}
    for field in sorted(rng.sample(MATCH_FIELDS, rng.randint(1, 3))):
        if field == "cmdline":
            table[field] = rng.choice(CMDLINES)
            continue
        if field in ("comm", "ancestor"):
            items = [comm_glob(rng) for _ in range(rng.randint(1, 3))]
        elif field == "exe":
            items = [f"/usr/bin/{name(rng)}" for _ in range(rng.randint(1, 3))]
        elif field == "cgroup":
            items = [f"/system.slice/{name(rng)}.service" for _ in range(rng.randint(1, 2))]
        elif field == "unit":
            items = [f"{name(rng)}.service" for _ in range(rng.randint(1, 2))]
        else:
            items = [name(rng) for _ in range(rng.randint(1, 2))]
        table[field] = items[0] if len(items) == 1 and rng.random() < 0.5 else items
    return table


def trigger_table(rng: random.Random) -> dict:
    if rng.random() < 0.25:
        return {"always": True}
    tail: dict = {"above": duration(rng, 0.001, 10.0)}
    if rng.random() < 0.3:  # relative to the learned baseline, with its floor and ceiling
        tail = {"above": f"{rng.choice([1.5, 3, 5, 10])}x baseline", "at_least": duration(rng, 0.0001, 0.001),
                "at_most": duration(rng, 0.001, 10.0)}
    if rng.random() < 0.5:
        tail["percentile"] = rng.choice([50, 90, 99, 99.9, 100])
    if rng.random() < 0.5:
        of = rng.randint(1, 20)
        tail["windows"] = rng.randint(1, of)
        tail["of"] = of
    offender: dict = {}
    form = rng.choice(("cpu", "blame", "both"))
    if form in ("cpu", "both"):
        offender["cpu"] = rng.choice([0.1, 0.5, 1, 2.5])
        if rng.random() < 0.5:
            offender["cpu_kind"] = rng.choice(("mean", "peak"))
    if form in ("blame", "both"):
        offender["blame_share"] = rng.choice([0.05, 0.2, 1])
    if rng.random() < 0.5:
        offender["require"] = rng.choice(("any", "all"))
    trigger: dict = {"tail": tail, "offender": offender}
    if rng.random() < 0.3:
        trigger["always"] = False
    return trigger


def action_table(rng: random.Random, min_cpus: int = 1) -> dict:
    kind = rng.choice(("nice", "affinity", "cpuset"))
    cpus = "unprotected" if rng.random() < 0.4 else cpu_list(rng, at_least=min_cpus)
    if kind == "nice":
        action: dict = {"nice": rng.randint(0, 19)}
    elif kind == "affinity":
        action = {"affinity": cpus}
    else:
        action = {"cpuset": {"cpus": cpus, "cgroup": name(rng)}}
    if rng.random() < 0.5:
        action["settle"] = duration(rng, 0, int(MAX_SETTLE_S))  # the engine keeps that much history
    return action


def policy_table(rng: random.Random, policy_name: str) -> dict:
    policy: dict = {"name": policy_name, "description": description(rng), "match": match_table(rng), "trigger": trigger_table(rng)}
    min_cpus = 1
    if rng.random() < 0.5:
        limits: dict = {}
        if rng.random() < 0.5:
            limits["cooldown"] = duration(rng, 0, 3600)
        if rng.random() < 0.5:
            limits["max_actions_per_hour"] = rng.randint(1, 3600)
        if rng.random() < 0.5:
            limits["revert_after_quiet"] = "never" if rng.random() < 0.3 else duration(rng, 1, 3600)
        if rng.random() < 0.5:
            min_cpus = rng.randint(1, 2)
            limits["min_cpus"] = min_cpus
        policy["limits"] = limits
    steps = 1 if policy["trigger"].get("always") else rng.randint(1, 4)
    policy["actions"] = [action_table(rng, min_cpus) for _ in range(steps)]
    return policy


def policy_document(rng: random.Random) -> dict:
    policies = []
    for index in range(rng.randint(1, 3)):
        policy = policy_table(rng, f"p{index}-{name(rng, 6)}")
        # Distinct priorities rule out conflicting-selector errors between generated policies.
        policy["priority"] = index * 10
        policies.append(policy)
    return {"policy": policies}


def config_document(rng: random.Random) -> dict:
    protect: dict = {"comm": [comm_glob(rng) for _ in range(rng.randint(1, 3))]}
    if rng.random() < 0.5:
        protect["pids"] = [rng.randint(1, 4194304) for _ in range(rng.randint(0, 3))]
    if rng.random() < 0.5:
        protect["unit"] = [f"{name(rng)}.service" for _ in range(rng.randint(0, 2))]
    if rng.random() < 0.5:
        protect["cgroup"] = [f"/system.slice/{name(rng)}" for _ in range(rng.randint(0, 2))]
    if rng.random() < 0.5:
        protect["request_cpus"] = "auto" if rng.random() < 0.5 else cpu_list(rng)
    document: dict = {"protect": protect}
    if rng.random() < 0.5:
        daemon: dict = {}
        if rng.random() < 0.5:
            daemon["mode"] = rng.choice(("live", "dry-run"))
        if rng.random() < 0.5:
            daemon["tick"] = rng.choice(("10ms", "250ms", "1s", "60s"))
        if rng.random() < 0.5:
            daemon["policies"] = rng.choice((".", ["."], "policies", [".", "policies"]))
        if rng.random() < 0.5:
            daemon["journal"] = "/var/lib/remediator/journal.jsonl"
        if rng.random() < 0.5:
            daemon["on_start"] = rng.choice(("restore", "keep"))
        if rng.random() < 0.5:
            daemon["revert_on_exit"] = rng.random() < 0.5
        if rng.random() < 0.5:
            daemon["source"] = rng.choice(("bpf", "auto", "procfs"))
        document["daemon"] = daemon
    if rng.random() < 0.5:
        document["limits"] = {"max_changes_per_minute": rng.randint(1, 10000)}
    if rng.random() < 0.3:
        document["recording"] = {"path": "/var/lib/remediator/recording.jsonl"}
        if rng.random() < 0.5:
            document["recording"]["max_bytes"] = rng.randint(65536, 1 << 40)
    return document


# -- TOML text ------------------------------------------------------------------------------------

BARE_KEY = set(string.ascii_letters + string.digits + "_-")
_SHORT_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}
_COMMENTS = ["", "", "", "  # note", " #", "\t# = [ { ' \" ]"]


def _escape(char: str, escape_unicode: bool, keep_newline: bool = False) -> str:
    """One character in a TOML basic string (TOML's \\u takes scalar values, not JSON's surrogate pairs)."""
    if keep_newline and char == "\n":
        return char
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    if code < 0x20 or code == 0x7F or (escape_unicode and code > 0x7E):
        return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
    return char


def basic_string(value: str, escape_unicode: bool = False) -> str:
    return '"' + "".join(_escape(char, escape_unicode) for char in value) + '"'


class TomlWriter:
    """Writes a decoded document back as TOML, choosing each spelling with `rng`."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def comment(self) -> str:
        return self.rng.choice(_COMMENTS)

    def key(self, key: str) -> str:
        if key and set(key) <= BARE_KEY and self.rng.random() < 0.8:
            return key
        if "'" not in key and "\n" not in key and self.rng.random() < 0.5:
            return f"'{key}'"
        return basic_string(key, self.rng.random() < 0.5)

    def string(self, value: str) -> str:
        style = self.rng.choice(["basic", "literal", "ml-basic", "ml-literal"])
        if style == "literal" and not any(c in value for c in "'\n\r"):
            return f"'{value}'"
        if style == "ml-literal" and "'''" not in value and not value.endswith("'") and "\r" not in value:
            return f"'''\n{value}'''" if value.startswith("\n") else f"'''{value}'''"
        escape_unicode = self.rng.random() < 0.5
        if style == "ml-basic":
            body = "".join(_escape(char, escape_unicode, keep_newline=True) for char in value)
            return f'"""\n{body}"""' if body.startswith("\n") else f'"""{body}"""'
        return basic_string(value, escape_unicode)

    def value(self, value) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int):
            return f"+{value}" if value > 0 and self.rng.random() < 0.2 else str(value)
        if isinstance(value, float):
            return repr(value)
        if isinstance(value, str):
            return self.string(value)
        if isinstance(value, list):
            items = [self.value(item) for item in value]
            if self.rng.random() < 0.5:
                trailing = "," if items and self.rng.random() < 0.5 else ""
                return "[" + ", ".join(items) + trailing + "]"
            return "[\n" + "".join(f"    {item},{self.comment()}\n" for item in items) + "]"
        if isinstance(value, dict):
            parts = [f"{self.key(k)} = {self.value(v)}" for k, v in value.items()]
            return "{ " + ", ".join(parts) + " }" if parts else "{}"
        raise TypeError(type(value))

    def body(self, table: dict, header: list[str], lines: list[str]) -> None:
        """Write the keys of `table` (its header is written), then its sub-tables under headers."""
        deferred = []
        for key, value in table.items():
            roll = self.rng.random()
            if isinstance(value, dict) and value and roll < 0.35:
                deferred.append((key, value, "table"))
            elif isinstance(value, dict) and value and roll < 0.7:
                for sub_key, sub_value in value.items():  # dotted keys: match.comm = ...
                    lines.append(f"{self.key(key)}.{self.key(sub_key)} = {self.value(sub_value)}{self.comment()}")
            elif _is_table_array(value) and roll < 0.6:
                deferred.append((key, value, "array"))
            else:
                lines.append(f"{self.key(key)} = {self.value(value)}{self.comment()}")
        for key, value, kind in deferred:
            path = header + [self.key(key)]
            if kind == "table":
                lines += ["", f"[{'.'.join(path)}]{self.comment()}"]
                self.body(value, path, lines)
            else:
                for item in value:
                    lines += ["", f"[[{' . '.join(path) if self.rng.random() < 0.1 else '.'.join(path)}]]{self.comment()}"]
                    self.body(item, path, lines)

    def document(self, document: dict) -> str:
        lines: list[str] = ["# generated"] if self.rng.random() < 0.5 else []
        # Plain values first (TOML needs them before the first header), then tables.
        plain = {k: v for k, v in document.items() if not isinstance(v, dict) and not _is_table_array(v)}
        self.body(plain, [], lines)
        for key, value in document.items():
            if key in plain:
                continue
            name = self.key(key)
            if isinstance(value, dict):
                lines += ["", f"[{name}]"]
                self.body(value, [name], lines)
            elif self.rng.random() < 0.25:
                lines.append(f"{name} = {self.value(value)}")
            else:
                for item in value:
                    lines += ["", f"[[{name}]]"]
                    self.body(item, [name], lines)
        return "\n".join(lines) + self.rng.choice(["\n", "", "\n\n", "\r\n"])


def _is_table_array(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def write_toml(document: dict, rng: random.Random) -> str:
    return TomlWriter(rng).document(document)


# -- mutations ------------------------------------------------------------------------------------

WRONG_VALUES = [0, -1, 25, 1.5, float("nan"), float("inf"), True, "", "x", "3", "never", "unprotected", "0-", [], [1], {}, {"a": 1}, ["a"]]
EXTRA_KEYS = ["extra", "comms", "nicee", "tail", "cpus", "policy", "Name", "settle"]


def walk_paths(value, path=()):
    """Every key path in a decoded document."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield path + (key,)
            yield from walk_paths(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield path + (index,)
            yield from walk_paths(item, path + (index,))


def mutate_structure(document: dict, rng: random.Random) -> dict:
    """One structural change: a key deleted, renamed (a typo), added, or given a wrong value."""
    document = copy.deepcopy(document)
    path = rng.choice(list(walk_paths(document)))
    parent = document
    for part in path[:-1]:
        parent = parent[part]
    key = path[-1]
    kind = rng.choice(["delete", "rename", "wrong-type", "add"])
    if kind == "delete":
        del parent[key]
    elif kind == "rename" and isinstance(key, str):
        position = rng.randrange(len(key) + 1)
        new_key = key[:position] + rng.choice(["x", "_", "", "s"]) + key[position + 1 :]
        if new_key and new_key not in parent:
            parent[new_key] = parent.pop(key)
    elif kind == "add" and isinstance(parent, dict):
        parent[rng.choice(EXTRA_KEYS)] = rng.choice(WRONG_VALUES)
    else:
        parent[key] = rng.choice(WRONG_VALUES)
    return document


_PIECES = ['"', "'", "[", "]", "{", "}", "=", "\n", "#", ".", ",", "\\", "\x00", "é", " ", "[[", "]]", '"""', "'''", "-", "\r", "\t"]


def mutate_text(text: str, rng: random.Random) -> str:
    """Text damage: truncation, a duplicated, deleted or swapped line, an inserted or replaced character."""
    kind = rng.choice(["truncate", "duplicate-line", "delete-line", "swap-lines", "insert", "replace"])
    lines = text.split("\n")
    if kind == "truncate":
        return text[: rng.randrange(len(text) + 1)]
    if kind in ("duplicate-line", "delete-line", "swap-lines"):
        index = rng.randrange(len(lines))
        if kind == "duplicate-line":
            lines.insert(index, lines[index])
        elif kind == "delete-line":
            del lines[index]
        else:
            other = rng.randrange(len(lines))
            lines[index], lines[other] = lines[other], lines[index]
        return "\n".join(lines)
    position = rng.randrange(len(text) + 1)
    piece = rng.choice(_PIECES)
    if kind == "insert":
        return text[:position] + piece + text[position:]
    return text[:position] + piece + text[position + 1 :]
