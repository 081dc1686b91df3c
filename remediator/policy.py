"""Policies: compile checked TOML into frozen dataclasses the engine consumes, and `policy check`.

Two steps, as in oomd: tomlpos parses a file into a position-annotated Document; schema.Checker
checks every key against the format description; `compile_policies` here checks what involves
several keys (trigger forms, ladders, CPU lists against min_cpus) and builds `Policy` objects.
Across files: names are unique, and two policies at the same priority and specificity that name
the same selector value must agree on their ladder (else which one acts would be an accident of
file order).

Compiling is pure: nothing here reads /proc or /sys. The optional host check (CPUs a list names
that this host does not have) takes the online CPU set as an argument.

Precedence when several policies match one process: higher `priority`; then higher specificity
(more match fields given); then the earlier file (sorted path) and the earlier position in it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .actuators import kind_for_action
from .config import (
    DaemonConfig,
    config_diagnostics,
    host_cpu_warnings,
    looks_like_config,
    parse_source,
)
from .cpulist import format_cpulist
from .errors import Location
from .matching import FIELDS, Match
from .model import CpuSpec, Limits, Policy, PolicySet, Step, Trigger
from .schema import POLICY_FILE, BaselineMultiple, Checker, Diagnostic, PolicyErrors, format_duration, has_errors
from .tomlpos import Document, KeyPath, format_key_path
from .trustedfs import Trust, TrustedDirectory, UntrustedPath, open_file, read_all

__all__ = [
    "CompiledPolicy",
    "Diagnostic",
    "PolicyErrors",
    "check_paths",
    "check_sources",
    "compile_policies",
    "load_policies",
    "read_policy_files",
]


# -- compile one document -----------------------------------------------------------------------

@dataclass
class CompiledPolicy:
    """A compiled policy with what the checks across files need: where it and its selectors are."""

    policy: Policy
    document: Document
    path: KeyPath  # ("policy", index)
    selector_paths: dict[tuple[str, str], KeyPath] = field(default_factory=dict)  # (field, value) -> where written


def compile_policies(document: Document, online_cpus: frozenset[int] | None = None) -> tuple[list[CompiledPolicy], list[Diagnostic]]:
    """Check and compile one policy document. Policies with an error are left out of the result."""
    checker = Checker(document)
    clean = checker.check_table(POLICY_FILE, document.data, ())
    diagnostics = checker.diagnostics
    compiled: list[CompiledPolicy] = []
    if clean is None:
        return compiled, diagnostics
    if "policy" not in document.data and not has_errors(diagnostics):
        diagnostics.append(Diagnostic(Location(document.path), "warning", "no [[policy]] table in this file", "no-policy"))
    for index, values in enumerate(clean.get("policy") or []):
        path: KeyPath = ("policy", index)
        # Checks across keys need every key valid: a policy the checker rejected is not compiled
        # (its problems are reported; the rest follow once they are fixed).
        if values is None or _has_errors_under(diagnostics, path):
            continue
        result = _PolicyCompiler(document, path, values, diagnostics, online_cpus).compile()
        if result is not None:
            compiled.append(result)
    return compiled, diagnostics


def _has_errors_under(diagnostics: list[Diagnostic], path: KeyPath) -> bool:
    prefix = format_key_path(path)
    return any(
        d.severity == "error" and (d.key == prefix or d.key.startswith(prefix + ".") or d.key.startswith(prefix + "["))
        for d in diagnostics
    )


class _PolicyCompiler:
    """The checks that span several keys of one structurally valid [[policy]], then the Policy.

    `values` is the checker's clean tree: every required key present, defaults filled in,
    durations in seconds, CPU lists as frozensets.
    """

    def __init__(
        self, document: Document, path: KeyPath, values: dict, diagnostics: list[Diagnostic], online_cpus: frozenset[int] | None
    ):
        self.document = document
        self.path = path
        self.values = values
        self.diagnostics = diagnostics
        self.online_cpus = online_cpus
        self.failed = False

    def problem(self, key_path: KeyPath, message: str, code: str, severity: str = "error", at_key: bool = False) -> None:
        location = self.document.key_location(key_path) if at_key else self.document.value_location(key_path)
        where = format_key_path(key_path)
        self.diagnostics.append(Diagnostic(location, severity, f"{where}: {message}", code, where))
        if severity == "error":
            self.failed = True

    def compile(self) -> CompiledPolicy | None:
        values = self.values
        match = self._match()
        trigger = self._trigger()
        limits = Limits(
            cooldown_s=values["limits"]["cooldown"],
            max_actions_per_hour=values["limits"]["max_actions_per_hour"],
            revert_after_quiet_s=values["limits"]["revert_after_quiet"],
            min_cpus=values["limits"]["min_cpus"],
        )
        steps = tuple(self._step(self.path + ("actions", index), action, limits) for index, action in enumerate(values["actions"]))
        if self.failed or match is None or trigger is None:
            return None
        policy = Policy(
            name=values["name"],
            description=values["description"],
            priority=values["priority"],
            match=match,
            trigger=trigger,
            steps=steps,
            limits=limits,
            location=self.document.value_location(self.path),
        )
        result = CompiledPolicy(policy, self.document, self.path)
        written_match = self.document.data["policy"][self.path[1]]["match"]
        for name in FIELDS:
            items = values["match"].get(name)
            if items is None:
                continue
            if name == "cmdline":
                result.selector_paths[(name, items)] = self.path + ("match", name)
                continue
            as_list = isinstance(written_match[name], list)
            for index, item in enumerate(items):
                result.selector_paths.setdefault((name, item), self.path + ("match", name) + ((index,) if as_list else ()))
        return result

    def _match(self) -> Match | None:
        values = self.values["match"]
        if not any(name in values for name in FIELDS):
            self.problem(
                self.path + ("match",), f"is empty, which would match every process; give at least one of {', '.join(FIELDS)}", "empty-match"
            )
            return None
        return Match.build(**{name: values[name] for name in FIELDS if name in values}, descendants=values["descendants"])

    def _trigger(self) -> Trigger | None:
        values = self.values["trigger"]
        path = self.path + ("trigger",)
        if values["always"]:
            for name in ("tail", "offender"):
                if name in values:
                    self.problem(
                        path + (name,),
                        f"always = true means static placement at exec with no condition; remove {name} (or set always = false)",
                        "exclusive",
                        at_key=True,
                    )
            return Trigger(True, None, None, None, None, None, "mean", None, "any")
        for name in ("tail", "offender"):
            if name not in values:
                self.problem(path, f"missing required key '{name}' (or set always = true for a static placement)", "missing-key")
        tail, offender = values.get("tail"), values.get("offender")
        if tail is None or offender is None:
            return None
        if tail["windows"] > tail["of"]:
            self.problem(path + ("tail", "windows"), f"{tail['windows']} is more than of = {tail['of']} (N of the last M windows)", "range")
        if "waits" in tail and "within" not in tail:
            self.problem(path + ("tail", "waits"), "counts waits within a span: give within too (e.g. within = \"50ms\")", "missing-key")
        if "cpu" not in offender and "blame_share" not in offender:
            self.problem(
                path + ("offender",), "give cpu, blame_share or both: the use that makes a matched process an offender", "missing-key"
            )
        above, relative = self._threshold(path + ("tail",), tail)
        self._cpu_alone(path + ("offender",), offender)
        if self.failed:
            return None
        return Trigger(
            always=False,
            tail_percentile=tail["percentile"],
            tail_above_us=above,
            windows=tail["windows"],
            of_windows=tail["of"],
            offender_cpu=offender.get("cpu"),
            offender_cpu_kind=offender["cpu_kind"],
            offender_blame_share=offender.get("blame_share"),
            offender_require=offender["require"],
            burst_within_s=tail.get("within"),
            burst_waits=tail.get("waits", 2),
            **relative,
        )

    def _threshold(self, path: KeyPath, tail: dict) -> tuple[float, dict]:
        """(the absolute threshold in us, or at_most for a relative one; the relative fields)."""
        def us(seconds: float) -> float:
            return round(seconds * 1e6, 6)  # 30us is 30.0, not 29.999999999999996

        above = tail["above"]
        if not isinstance(above, BaselineMultiple):
            for name in ("at_least", "at_most"):
                if name in tail:
                    self.problem(path + (name,), f"applies to a relative threshold only (above = \"5x baseline\"); "
                                 f"above = \"{format_duration(above)}\" is absolute: remove {name}", "exclusive", at_key=True)
            return us(above), {}
        missing = [name for name in ("at_least", "at_most") if name not in tail]
        if missing:
            self.problem(path + ("above",), f"a threshold relative to the baseline needs {' and '.join(missing)}: at_least keeps a "
                         "tiny baseline from making the trigger hair-trigger, at_most keeps a poisoned one from disabling it "
                         "(and holds until the baseline is learned)", "missing-key")
            return 0.0, {}
        if tail["at_least"] > tail["at_most"]:
            self.problem(path + ("at_least",), f"{format_duration(tail['at_least'])} is more than at_most = "
                         f"{format_duration(tail['at_most'])}", "range")
        return us(tail["at_most"]), {
            "tail_baseline_factor": above.factor,
            "tail_at_least_us": us(tail["at_least"]),
            "tail_at_most_us": us(tail["at_most"]),
        }

    def _cpu_alone(self, path: KeyPath, offender: dict) -> None:
        """Warn when the trigger can fire on CPU use alone: a process busy on another CPU, with no
        share of the protected wait, does the service no harm, yet would be acted on."""
        if "cpu" not in offender:
            return
        written = self.document.data["policy"][self.path[1]]["trigger"]["offender"]
        if "blame_share" not in offender:
            self.problem(path + ("cpu",), "with no blame_share this trigger fires on CPU use alone: a process busy on "
                         "another CPU, with no share of the protected wait, would be acted on; add blame_share", "cpu-alone",
                         severity="warning")
        elif offender["require"] == "any":
            self.problem(path + ("require",) if "require" in written else path,
                         '"any" lets this trigger fire on CPU use alone: a process busy on another CPU, with no share of '
                         'the protected wait, would be acted on; use require = "all" (the default)', "cpu-alone", severity="warning")

    def _step(self, path: KeyPath, action: dict, limits: Limits) -> Step:
        kind = kind_for_action(action)
        params = kind.compile(action, _StepCompiling(self, path, limits.min_cpus))
        return Step(kind.name, action["settle"], self.document.value_location(path), params)


class _StepCompiling:
    """What a kind's compile may ask of the compiler (actuators/kind.py `Compiling`): its problems
    are located at the step's keys, in this document."""

    def __init__(self, compiler: _PolicyCompiler, path: KeyPath, min_cpus: int):
        self.compiler = compiler
        self.path = path
        self.min_cpus = min_cpus

    def problem(self, key: KeyPath, message: str, code: str, severity: str = "error") -> None:
        self.compiler.problem(self.path + key, message, code, severity=severity)

    def host_cpus(self, key: KeyPath, cpus: frozenset[int]) -> None:
        compiler = self.compiler
        if compiler.online_cpus is not None:
            compiler.diagnostics.extend(host_cpu_warnings(compiler.document, self.path + key, cpus, compiler.online_cpus))


# -- across files ---------------------------------------------------------------------------------

def cross_file_diagnostics(compiled: list[CompiledPolicy]) -> list[Diagnostic]:
    """Duplicate names, and policies that would fight over a selector."""
    diagnostics: list[Diagnostic] = []
    first_by_name: dict[str, CompiledPolicy] = {}
    for item in compiled:
        name = item.policy.name
        earlier = first_by_name.get(name)
        if earlier is None:
            first_by_name[name] = item
            continue
        where = item.document.value_location(item.path + ("name",))
        diagnostics.append(
            Diagnostic(
                where,
                "error",
                f"{format_key_path(item.path + ('name',))}: policy name '{name}' is already used at "
                f"{earlier.document.value_location(earlier.path + ('name',))}; names must be unique across files",
                "duplicate-name",
                format_key_path(item.path + ("name",)),
            )
        )
    for later_index, later in enumerate(compiled):
        for earlier in compiled[:later_index]:
            a, b = earlier.policy, later.policy
            if a.name == b.name or a.priority != b.priority or a.match.specificity != b.match.specificity:
                continue
            if a.same_ladder(b):
                continue
            shared = [key for key in later.selector_paths if key in earlier.selector_paths]
            if not shared:
                continue
            field_name, value = shared[0]
            diagnostics.append(
                Diagnostic(
                    later.document.value_location(later.selector_paths[shared[0]]),
                    "error",
                    f"{format_key_path(later.selector_paths[shared[0]])}: {field_name} '{value}' is also selected by policy "
                    f"'{a.name}' ({earlier.document.value_location(earlier.selector_paths[shared[0]])}) at the same priority "
                    f"({a.priority}) and specificity ({a.match.specificity}) with a different ladder; which one acts would "
                    "depend on file order: give one a higher priority or make the ladders equal",
                    "conflict",
                    format_key_path(later.selector_paths[shared[0]]),
                )
            )
    return diagnostics


def unprotected_warnings(compiled: list[CompiledPolicy], request_cpus: frozenset[int], online: frozenset[int]) -> list[Diagnostic]:
    """Steps aimed at `unprotected` CPUs when the config's request CPUs leave none on this host."""
    if online - request_cpus:
        return []
    diagnostics = []
    for item in compiled:
        for index, step in enumerate(item.policy.steps):
            spec = step.params.get("cpus")
            if isinstance(spec, CpuSpec) and spec.unprotected:
                path = item.path + ("actions", index, step.kind)  # the affinity value, or the cpuset table
                diagnostics.append(
                    Diagnostic(
                        item.document.value_location(path),
                        "warning",
                        f"{format_key_path(path)}: 'unprotected' resolves to no CPU on this host: request_cpus "
                        f"{format_cpulist(request_cpus)} covers every online CPU ({format_cpulist(online)}); this step will be skipped",
                        "unprotected-empty",
                        format_key_path(path),
                    )
                )
    return diagnostics


# -- files ----------------------------------------------------------------------------------------

def read_policy_files(
    paths: Iterable[Path | str], trust: Trust | None = None
) -> tuple[list[tuple[Path, bytes]], list[Diagnostic]]:
    """(path, content) of the files named and of every *.toml in the directories named, sorted by
    path, each file once. Every file is read from the descriptor whose owner and mode were checked
    (trustedfs), and a directory is listed and its files opened through its own descriptor."""
    found: dict[tuple[int, int], tuple[Path, bytes]] = {}
    diagnostics: list[Diagnostic] = []

    def add(path: Path, opener) -> None:
        try:
            fd = opener()
            try:
                info = os.fstat(fd)
                found.setdefault((info.st_dev, info.st_ino), (path, read_all(fd)))
            finally:
                os.close(fd)
        except UntrustedPath as exc:
            diagnostics.append(Diagnostic(Location(_display(path)), "error", f"refusing to read it: {exc.reason}", "untrusted"))
        except FileNotFoundError:
            diagnostics.append(Diagnostic(Location(_display(path)), "error", "no such file or directory", "not-found"))
        except OSError as exc:
            diagnostics.append(Diagnostic(Location(_display(path)), "error", f"cannot read: {exc.strerror or exc}", "unreadable"))

    for entry in paths:
        path = Path(entry)
        if not path.is_dir():
            add(path, lambda: open_file(path, trust))
            continue
        try:
            with TrustedDirectory(path, trust) as directory:
                for name in directory.names():
                    if name.endswith(".toml") and directory.kind(name) != "directory":
                        try:
                            add(path / name, lambda: directory.open_file(name))
                        except IsADirectoryError:
                            continue  # a link to a directory named *.toml
        except UntrustedPath as exc:
            diagnostics.append(Diagnostic(Location(_display(path)), "error", f"refusing to read it: {exc.reason}", "untrusted"))
        except OSError as exc:
            diagnostics.append(Diagnostic(Location(_display(path)), "error", f"cannot list: {exc.strerror or exc}", "unreadable"))
    return sorted(found.values(), key=lambda item: os.path.abspath(item[0])), diagnostics


def _display(path: Path) -> str:
    """Paths as a reviewer would type them: relative to the working directory when below it."""
    if not path.is_absolute():
        return str(path)
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def load_policies(
    paths: Sequence[Path | str], online_cpus: frozenset[int] | None = None, trust: Trust | None = None
) -> PolicySet:
    """Load and compile every policy file under `paths`; raise PolicyErrors on any error (a file
    a privileged caller must not trust is one: see trustedfs; `trust` defaults to this process's).

    Warnings (e.g. CPUs this host lacks, when `online_cpus` is given) are kept in PolicySet.warnings.
    """
    files, diagnostics = read_policy_files(paths, trust)
    sources = [(str(path), raw) for path, raw in files]
    compiled, more = _check_policy_sources(sources, online_cpus)
    diagnostics += more
    if has_errors(diagnostics):
        raise PolicyErrors(diagnostics)
    return PolicySet(tuple(item.policy for item in compiled), tuple(diagnostics))


def _check_policy_sources(
    sources: Sequence[tuple[str, bytes | str]], online_cpus: frozenset[int] | None
) -> tuple[list[CompiledPolicy], list[Diagnostic]]:
    compiled: list[CompiledPolicy] = []
    diagnostics: list[Diagnostic] = []
    for display, source in sources:
        document, problems = parse_source(source, display)
        diagnostics += problems
        if document is None:
            continue
        found, problems = compile_policies(document, online_cpus)
        compiled += found
        diagnostics += problems
    diagnostics += cross_file_diagnostics(compiled)
    return compiled, diagnostics


def check_sources(
    sources: Sequence[tuple[str, bytes | str]], online_cpus: frozenset[int] | None = None
) -> list[Diagnostic]:
    """Check in-memory files (display path, content): each is a config or a policy file."""
    diagnostics: list[Diagnostic] = []
    policy_sources = []
    config_documents: list[Document] = []
    for display, source in sources:
        document, problems = parse_source(source, display)
        if looks_like_config(document, display):
            diagnostics += problems
            if document is not None:
                config_documents.append(document)
        else:
            policy_sources.append((display, source))
    configs: list[DaemonConfig] = []
    for document in config_documents:
        config, problems = config_diagnostics(document, online_cpus)
        diagnostics += problems
        if config is not None:
            configs.append(config)
    compiled, problems = _check_policy_sources(policy_sources, online_cpus)
    diagnostics += problems
    if online_cpus is not None:
        for config in configs:
            if config.request_cpus is not None:
                diagnostics += unprotected_warnings(compiled, config.request_cpus, online_cpus)
    return diagnostics


def check_paths(paths: Sequence[Path | str], online_cpus: frozenset[int] | None = None) -> list[Diagnostic]:
    """What `policy check` reports for files and directories. A config file found among them
    (by name, or by its [protect] / [daemon] tables) is checked too, and the policy paths it names
    are checked with the rest (each file once)."""
    files, diagnostics = read_policy_files(paths)
    seen = {os.path.realpath(path) for path, _ in files}
    sources: list[tuple[str, bytes]] = []
    queue = list(files)
    while queue:
        path, raw = queue.pop(0)
        display = _display(path)
        sources.append((display, raw))
        document, _ = parse_source(raw, display)
        if document is None or not looks_like_config(document, display):
            continue
        config, _ = config_diagnostics(document)
        if config is None:
            continue
        more, problems = read_policy_files(config.policy_paths)
        diagnostics += [item for item in problems if item.code != "not-found"]  # missing: the config check says so
        for extra, content in more:
            if os.path.realpath(extra) not in seen:
                seen.add(os.path.realpath(extra))
                queue.append((extra, content))
    # Policy order (sorted absolute paths) is the last precedence tie-breaker, as in load_policies.
    sources.sort(key=lambda item: os.path.abspath(item[0]))
    diagnostics += check_sources(sources, online_cpus)
    return sorted(diagnostics, key=_diagnostic_order(sources))


def _diagnostic_order(sources: list[tuple[str, bytes]]):
    rank = {display: index for index, (display, _) in enumerate(sources)}

    def key(diagnostic: Diagnostic):
        location = diagnostic.location
        return (rank.get(location.path, -1), location.line, location.column)

    return key

