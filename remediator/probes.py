"""Load probes/sched_monitor.bpf.c with bcc and read its cumulative maps as plain Python values.

Thin on purpose: no differences, no policy, no /proc. It turns map bytes into numbers; the
collector does the rest and is tested on recorded values. Map reads go through libbcc's raw
calls with buffers allocated once: bcc's own batch helper allocates max_entries-sized arrays on
every call, which would dominate the daemon's CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ctypes as ct
import errno
import math
import mmap
import os
import re
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterable, Mapping, NamedTuple, Sequence

from . import histogram
from .errors import SetupError
from .hostcheck import bpf_problem, kernel_headers_description, perf_permission_hint, tracefs_root

PROBES_DIR_ENV = "REMEDIATOR_PROBES_DIR"
PROGRAM_FILE = "sched_monitor.bpf.c"

WAIT_TOTAL_FIELDS = (
    "waits",
    "wait_ns",
    "wakeups",
    "preemptions",
    "blamed_ns",
    "unattributed_ns",
    "protected_map_full",
    "stale_starts",
    "proc_map_full",
    "blame_map_full",
    "exec_events_dropped",
    "protected_forks",
    "own_ns",
    "overflow_ns",
    "migrated_waits",
    "task_events_dropped",
    "protected_exits",
)

# Tracepoints that tell of a process renamed or moved to another cgroup (task events): compiled
# in where tracefs has them, (category, event) -> the cflag that compiles the handler in.
TASK_EVENT_TRACEPOINTS = {
    ("task", "task_rename"): "-DHAVE_TASK_RENAME",
    ("cgroup", "cgroup_attach_task"): "-DHAVE_CGROUP_ATTACH",
}
EXEC_FILENAME_LEN = 128  # as in probes/sched_monitor.h
TASK_RENAMED, TASK_MOVED = 1, 2  # struct task_event's kinds (probes/sched_monitor.h)

# The head of struct cpu_state, before its run ring: since, busy_ns, current_tid, head, owed_ns,
# changed_epoch[2], changed_count[2].
CPU_STATE_HEAD = "<QQIIQQQII"

# (process, CPU) entries per possible CPU when the loader sizes proc_cpu from the host, and the bounds.
PROC_CPU_ENTRIES_PER_CPU = 256
PROC_CPU_ENTRIES_MIN = 32768
PROC_CPU_ENTRIES_MAX = 1 << 20
COMM_TEXTS_MAX = 4096  # comm fields whose text is kept (cleared past it: a host of changing comms)


def _read_pid_max() -> int | None:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return None


def _read_possible_cpus() -> int | None:
    from .cpulist import parse_cpulist

    try:
        cpus = parse_cpulist(Path("/sys/devices/system/cpu/possible").read_text())
    except (OSError, ValueError):
        return None
    return max(cpus) + 1 if cpus else None


def proc_cpu_entries_for(possible_cpus: int) -> int:
    """The proc_cpu map's size for a host: room for PROC_CPU_ENTRIES_PER_CPU processes on every CPU
    (a process that ran on many CPUs has an entry on each), within the bounds. The map is an LRU, so
    a host beyond that loses the least recently used entries, not new processes."""
    return max(PROC_CPU_ENTRIES_MIN, min(PROC_CPU_ENTRIES_MAX, possible_cpus * PROC_CPU_ENTRIES_PER_CPU))


def window_picks(slot_count: int, since_window: int, current_window: int, first_slot: int = 0) -> tuple[tuple[int, int, int], ...]:
    """(window index, position of its slot, the tag the slot holds for it) of the windows from
    `since_window` to `current_window` that a ring of `slot_count` slots can still hold, the slots
    starting at `first_slot`. Slot w % slot_count holds window w as (w's low 32 bits << 32) | ns:
    the kernel keeps indices in 32 bits, user space full ones, so a wrap (after 2^32 windows)
    changes nothing here. The same for every entry of one read: worked out once per read."""
    return tuple((window, first_slot + window % slot_count, window & 0xFFFFFFFF)
                 for window in range(max(since_window, current_window - slot_count + 1), current_window + 1))


def windows_at(values: Sequence[int], picks: tuple[tuple[int, int, int], ...]) -> tuple[tuple[int, int], ...]:
    """(window index, ns) of the picked windows (window_picks) that `values` holds."""
    return tuple([(window, packed & 0xFFFFFFFF) for window, at, tag in picks if (packed := values[at]) and packed >> 32 == tag])


def windows_since(slots: Sequence[int], since_window: int, current_window: int) -> tuple[tuple[int, int], ...]:
    """(window index, ns) of the windows from `since_window` to `current_window` that a proc_cpu
    entry's ring (`slots`) holds. Only those windows are decoded: older ones closed before the
    previous read."""
    return windows_at(slots, window_picks(len(slots), since_window, current_window))


def probes_dir() -> Path:
    override = os.environ.get(PROBES_DIR_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "probes"


def task_state_mask(format_text: str) -> int:
    """The mask under which sched_switch's prev_state is 0 for a runnable (preempted) task.

    Read from the tracepoint's print fmt so it follows the running kernel: since 4.14 it is
    TASK_REPORT_MAX - 1 (0xff), before that TASK_STATE_MAX - 1.
    """
    modern = re.search(r"REC->prev_state & \(\(\(\(([^)]*)\) \+ 1\) << 1\) - 1\)", format_text)
    if modern:
        report_bits = 0
        for number in re.findall(r"0x[0-9a-fA-F]+|\d+", modern.group(1)):
            report_bits |= int(number, 0)
        return ((report_bits + 1) << 1) - 1
    legacy = re.search(r"REC->prev_state & \((\d+)-1\)", format_text)
    if legacy:
        return int(legacy.group(1)) - 1
    return 0xFF


def exit_state_bits(format_text: str) -> int:
    """sched_switch's prev_state bits of a thread switched out for the last time: the "X"
    (EXIT_DEAD) and "Z" (EXIT_ZOMBIE) flags of the tracepoint's print fmt. The probe reads an
    exiting thread's entry at once; 0 (not found) only leaves its last sub-floor time late."""
    bits = 0
    for value, letter in re.findall(r'\{ *(0x[0-9a-fA-F]+|\d+), *"([XZ])" *\}', format_text):
        bits |= int(value, 0)
    return bits


def sum_wait_stats(per_cpu: list[tuple], closed_epoch: int) -> tuple[dict[str, int], int, list[int]]:
    """The per-CPU copies of wait_stats (each unpacked) summed: (totals, the largest wait of
    `closed_epoch`, the histogram). Its cost grows with the CPU count (bench/scale.py models it):
    every column is summed in one pass (the epoch columns too, unused), not a generator each."""
    count = len(WAIT_TOTAL_FIELDS)
    if not per_cpu:
        return dict.fromkeys(WAIT_TOTAL_FIELDS, 0), 0, [0] * histogram.SLOTS
    sums = list(map(sum, zip(*per_cpu)))
    epoch_at = count + 2 * (closed_epoch & 1)
    max_ns = max((cpu[epoch_at + 1] for cpu in per_cpu if cpu[epoch_at] == closed_epoch), default=0)
    return dict(zip(WAIT_TOTAL_FIELDS, sums)), max_ns, sums[count + 4:]


REPORT_FLOOR_MIN_NS = 1_000_000
REPORT_FLOOR_MAX_NS = 4_000_000


def report_floor_for(tick_s: float) -> int:
    """The report floor for a daemon that reads every `tick_s`: 1/64 of the tick (1.6% of a CPU
    per tick), within 1 to 4 ms. A tick reads about (the CPU time of the processes that barely
    run) / floor entries, at 15-30 us each in Python (bench/scale.py): at 250 ms, 3.9 ms reads a
    third as many as 1 ms (25 against 75 a tick there), and any share a policy acts on is still
    read the tick it happens."""
    return max(REPORT_FLOOR_MIN_NS, min(REPORT_FLOOR_MAX_NS, round(tick_s * 1e9 / 64)))


def window_shift_for(window_ms: float) -> int:
    """The power-of-two window nearest to `window_ms` (the probes shift, they do not divide)."""

    return max(20, min(31, round(math.log2(max(window_ms, 1.0) * 1e6))))


def probe_settings_for(tick_s: float) -> "ProbeSettings":
    """The daemon's probe settings for its tick: several windows per tick, so bursts show, and
    the report floor the tick allows."""
    window_ms = max(1.0, tick_s * 1000 / 4)
    return ProbeSettings(window_shift=window_shift_for(window_ms), report_floor_ns=report_floor_for(tick_s))


@dataclass(frozen=True)
class ProbeSettings:
    window_shift: int = 27  # 2**27 ns = 134 ms windows
    window_slots: int = 16
    segment_ring: int = 16
    segment_merge_ns: int = 50_000  # short runs of two processes taking turns share the ring's slots
    max_wait_ns: int = 10_000_000_000
    max_protected_threads: int = 65536
    pid_max: int = 4194304  # sizes the protected bitmap; the loader passes kernel.pid_max
    max_proc_cpu_entries: int | None = None  # None: sized from the host (proc_cpu_entries_for)
    # A (process, cpu) entry is read once this much on-CPU or blamed time is unreported (and at a
    # thread's exit): processes that barely run cost no read per tick. The daemon sets it from its
    # tick (report_floor_for: 3.9 ms at 250 ms).
    report_floor_ns: int = REPORT_FLOOR_MIN_NS
    changed_queue_slots: int = 1024  # keys per CPU per epoch; past that, one full read
    process_ring_pages: int = 16  # exec and task events
    max_cpus: int | None = None  # None: the host's possible CPUs (the loader fills it in)
    max_burst_candidates: int = 4096
    burst_ring_pages: int = 8

    def __post_init__(self) -> None:
        for name in ("window_slots", "segment_ring", "process_ring_pages", "burst_ring_pages"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, not {value}")
        if not 20 <= self.window_shift <= 31:
            raise ValueError("window_shift must be between 20 (1 ms) and 31 (2.1 s)")

    @property
    def window_ns(self) -> int:
        return 1 << self.window_shift

    @property
    def cpus(self) -> int:
        return self.max_cpus or os.cpu_count() or 1

    @property
    def proc_cpu_entries(self) -> int:
        return self.max_proc_cpu_entries or proc_cpu_entries_for(self.cpus)

    def layouts(self) -> dict[str, struct.Struct]:
        """The byte layouts of the map values in probes/sched_monitor.h under these settings (a test
        compiles the header and checks every size and offset against these)."""
        return {
            "protected_thread": struct.Struct("<QQII"),  # wait_start, queued_since, wait_cpu, pad
            # totals, then max[2] as (epoch, max_ns) pairs, then the histogram
            "wait_stats": struct.Struct(f"<{len(WAIT_TOTAL_FIELDS)}Q4Q{histogram.SLOTS}Q"),
            # since, busy_ns, current_tid, head, owed_ns, then the ring of (start, end, ns, last_start, tgid, pad)
            # CPU_STATE_HEAD, then the ring of (start, end, ns, last_start, tgid, pad)
            "cpu_state": struct.Struct(CPU_STATE_HEAD + "QQQQII" * self.segment_ring),
            "proc_cpu_key": struct.Struct("<II"),
            # total_ns, blame_ns, windows, comm, marked_epoch, unreported_ns
            "proc_cpu": struct.Struct(f"<QQ{self.window_slots}Q16sQQ"),
        }

    def cflags(self, state_mask: int, exit_bits: int = 0x30, task_tracepoints: Collection[tuple[str, str]] = ()) -> list[str]:
        """`task_tracepoints`: those of TASK_EVENT_TRACEPOINTS the kernel has."""
        return [
            f"-I{probes_dir()}",
            f"-DHIST_SUB_BITS={histogram.SUB_BITS}",
            f"-DHIST_MAX_POW={histogram.MAX_POW}",
            f"-DWINDOW_SHIFT={self.window_shift}",
            f"-DWINDOW_SLOTS={self.window_slots}",
            f"-DSEGMENT_RING={self.segment_ring}",
            f"-DSEGMENT_MERGE_NS={self.segment_merge_ns}",
            f"-DMAX_WAIT_NS={self.max_wait_ns}ull",
            f"-DMAX_PROTECTED_THREADS={self.max_protected_threads}",
            f"-DPROTECTED_BITMAP_WORDS={(self.pid_max + 63) // 64}",
            f"-DMAX_PROC_CPU_ENTRIES={self.proc_cpu_entries}",
            f"-DMAX_CPUS={self.cpus}",
            f"-DREPORT_FLOOR_NS={self.report_floor_ns}ull",
            f"-DCHANGED_QUEUE_SLOTS={self.changed_queue_slots}",
            f"-DPROCESS_RING_PAGES={self.process_ring_pages}",
            f"-DMAX_BURST_CANDIDATES={self.max_burst_candidates}",
            f"-DBURST_RING_PAGES={self.burst_ring_pages}",
            f"-DTASK_STATE_MASK={state_mask:#x}",
            f"-DEXIT_STATE_BITS={exit_bits:#x}",
        ] + [flag for tracepoint, flag in TASK_EVENT_TRACEPOINTS.items() if tracepoint in task_tracepoints]


class ProcCpuEntry(NamedTuple):  # a tuple: a tick builds one per entry read
    tgid: int
    cpu: int
    total_ns: int
    windows: tuple[tuple[int, int], ...]  # (window index, ns) on this CPU, of the windows since the previous read
    comm: str
    blame_ns: int = 0  # protected wait charged to its runs on this CPU


@dataclass(frozen=True)
class CpuState:
    since_ns: int
    busy_ns: int
    current_tid: int


@dataclass
class RawSnapshot:
    """Cumulative counters as the kernel holds them, at one moment (CLOCK_MONOTONIC ns)."""

    mono_ns: int
    totals: dict[str, int]
    histogram: list[int]
    max_ns: int  # the largest wait since the previous snapshot
    cpus: list[CpuState]
    # The probes pass their table itself, not a copy (a copy costs every entry, every tick): read
    # it before the next snapshot, which updates it in place; keep proc_cpu_changed instead.
    proc_cpu: Mapping[tuple[int, int], ProcCpuEntry]
    # The entries as they were at the previous snapshot, of the keys that changed since (None: no
    # entry then); None: not known, compare whole tables. With it, a tick costs what ran.
    proc_cpu_changed: Mapping[tuple[int, int], ProcCpuEntry | None] | None = None
    cpus_of: Mapping[int, Collection[int]] | None = None  # tgid -> the CPUs it has entries for


@dataclass(frozen=True)
class BurstCandidate:
    """What the probe counts for one candidate: waits longer than `threshold_ns` it is blamed
    for; `count` of them within `span_ns` wake user space (count >= 2: never a lone spike)."""

    threshold_ns: int
    count: int
    span_ns: int


# The most counted waits a candidate may need (BURST_RECENT in sched_monitor.h).
BURST_MAX_COUNT = 8


@dataclass(frozen=True)
class BurstEvent:
    """A candidate crossed its count: `count` blamed waits over its threshold from first_ns to mono_ns."""

    mono_ns: int
    first_ns: int
    wait_ns: int  # the wait that completed the count
    tgid: int
    count: int


@dataclass(frozen=True)
class ExecEvent:
    mono_ns: int
    pid: int
    old_pid: int
    filename: str


class _RawMap:
    """Raw lookups on one BPF map by fd, with buffers allocated once."""

    def __init__(self, lib, table, possible_cpus: int, percpu: bool):
        self.lib = lib
        self.fd = table.map_fd
        self.key_size = ct.sizeof(table.Key)
        value_size = ct.sizeof(table.sLeaf if percpu else table.Leaf)
        # The kernel copies per-CPU values each rounded up to 8 bytes.
        self.value_stride = (value_size + 7) & ~7 if percpu else value_size
        self.value_size = value_size
        self.copies = possible_cpus if percpu else 1
        self.max_entries = table.max_entries
        self._value = ct.create_string_buffer(self.value_stride * self.copies)
        self._batch_keys = None
        self._batch_values = None
        self._batch_supported = True

    def mapped(self) -> mmap.mmap:
        """The values of an array created with BPF_F_MMAPABLE, in this process's memory (read-only):
        each at index * the value size rounded up to 8 bytes."""
        stride = (self.value_size + 7) & ~7
        return mmap.mmap(self.fd, stride * self.max_entries, mmap.MAP_SHARED, mmap.PROT_READ)

    def lookup(self, key: bytes) -> bytes | None:
        key_buf = ct.create_string_buffer(key, self.key_size)
        if self.lib.bpf_lookup_elem(self.fd, key_buf, self._value) != 0:
            return None
        return self._value.raw

    def lookup_each(self, keys: Iterable[bytes]) -> Iterable[tuple[bytes, bytes | None]]:
        """(key, value or None) for each key, through one key buffer (a tick looks up hundreds)."""
        key_buf = ct.create_string_buffer(self.key_size)
        value = self._value
        lookup, fd = self.lib.bpf_lookup_elem, self.fd
        for key in keys:
            ct.memmove(key_buf, key, self.key_size)
            yield key, (value.raw if lookup(fd, key_buf, value) == 0 else None)

    def delete_many(self, keys: bytes, count: int) -> None:
        """Delete `count` keys packed in `keys`: one syscall (kernel 5.6+), else one per key."""
        if not count:
            return
        if self._batch_supported:
            done = ct.c_uint32(count)
            buffer = ct.create_string_buffer(keys, len(keys))
            if self.lib.bpf_delete_batch(self.fd, buffer, ct.byref(done)) == 0:
                return
            error = ct.get_errno()
            if error != errno.ENOENT:  # ENOENT: a key already gone; the rest are deleted one by one
                if error not in (errno.EINVAL, 524):  # 524: ENOTSUPP
                    raise OSError(error, os.strerror(error))
                self._batch_supported = False
            keys = keys[done.value * self.key_size:]
            count -= done.value
        for index in range(count):
            self.delete(keys[index * self.key_size:(index + 1) * self.key_size])

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        key_buf = ct.create_string_buffer(key, self.key_size)
        value_buf = ct.create_string_buffer(value, self.value_size)
        if self.lib.bpf_update_elem(self.fd, key_buf, value_buf, flags) != 0:
            error = ct.get_errno()
            raise OSError(error, f"bpf map update: {os.strerror(error)}")

    def delete(self, key: bytes) -> None:
        key_buf = ct.create_string_buffer(key, self.key_size)
        self.lib.bpf_delete_elem(self.fd, key_buf)  # a missing key is fine

    def keys(self) -> list[bytes]:
        result = []
        key = ct.create_string_buffer(self.key_size)
        next_key = ct.create_string_buffer(self.key_size)
        if self.lib.bpf_get_first_key(self.fd, key, self.key_size) != 0:
            return result
        result.append(key.raw)
        while self.lib.bpf_get_next_key(self.fd, key, next_key) == 0:
            result.append(next_key.raw)
            ct.memmove(key, next_key, self.key_size)
            if len(result) > self.max_entries:
                break  # the map changed under us; enough
        return result

    def items(self) -> tuple[bytes, bytes, int]:
        """All entries as (keys buffer, values buffer, count); one syscall per batch."""
        if self._batch_supported:
            try:
                return self._items_batch()
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTSUPP if hasattr(errno, "ENOTSUPP") else 524):
                    raise
                self._batch_supported = False  # kernels before 5.6
        keys = self.keys()
        values = []
        kept = []
        for key in keys:
            value = self.lookup(key)
            if value is not None:
                kept.append(key)
                values.append(value[: self.value_stride * self.copies])
        return b"".join(kept), b"".join(values), len(kept)

    def _items_batch(self) -> tuple[bytes, bytes, int]:
        entry_bytes = self.value_stride * self.copies
        if self._batch_keys is None:
            self._resize_batch(min(self.max_entries, 256))
        in_batch = ct.c_uint32(0)
        out_batch = ct.c_uint32(0)
        count = ct.c_uint32(0)
        total = 0
        first = True
        while True:
            capacity = len(self._batch_keys) // self.key_size
            if total == capacity:
                if capacity >= self.max_entries:
                    break
                self._resize_batch(min(self.max_entries, capacity * 2), keep=total)
                capacity = len(self._batch_keys) // self.key_size
            count.value = capacity - total
            result = self.lib.bpf_lookup_batch(
                self.fd,
                None if first else ct.byref(in_batch),
                ct.byref(out_batch),
                ct.byref(self._batch_keys, self.key_size * total),
                ct.byref(self._batch_values, entry_bytes * total),
                ct.byref(count),
            )
            error = ct.get_errno()
            total += count.value
            if result != 0:
                if error == errno.ENOENT:
                    break  # walked the whole map
                if error == errno.ENOSPC and capacity < self.max_entries:
                    # One hash bucket holds more entries than the space left: grow and retry it.
                    self._resize_batch(min(self.max_entries, capacity * 2), keep=total)
                    continue
                raise OSError(error, os.strerror(error))
            if count.value == 0:
                break
            in_batch.value = out_batch.value
            first = False
        keys = self._batch_keys.raw[: self.key_size * total]
        values = self._batch_values.raw[: entry_bytes * total]
        return keys, values, total

    def _resize_batch(self, entries: int, keep: int = 0) -> None:
        entry_bytes = self.value_stride * self.copies
        keys = ct.create_string_buffer(self.key_size * entries)
        values = ct.create_string_buffer(entry_bytes * entries)
        if keep:
            ct.memmove(keys, self._batch_keys, self.key_size * keep)
            ct.memmove(values, self._batch_values, entry_bytes * keep)
        self._batch_keys, self._batch_values = keys, values


@contextlib.contextmanager
def _captured_stderr():
    """bcc and clang write compile errors to fd 2; keep them for a one-line error instead."""
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        output: list[str] = []
        try:
            yield output
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            output.append(capture.read().decode(errors="replace"))


def _first_error_line(text: str) -> str:
    for line in text.splitlines():
        if "error" in line.lower() or "invalid" in line.lower() or "failed" in line.lower():
            return line.strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "no output from bcc"


class SchedProbes:
    """The loaded sched_monitor program."""

    def __init__(self, settings: ProbeSettings | None = None):
        problem = bpf_problem()
        if problem:
            raise SetupError(problem)
        from bcc import BPF  # imported here: only the kernel path needs bcc
        from bcc.libbcc import lib
        from bcc.utils import get_possible_cpus

        self.settings, self.cflags = settings_for_this_kernel(settings)
        self.source_path = probes_dir() / PROGRAM_FILE
        self.headers = kernel_headers_description()
        with _captured_stderr() as output:
            try:
                self.bpf = BPF(src_file=str(self.source_path).encode(), cflags=self.cflags)
            except Exception:
                failed = True
            else:
                failed = False
        if failed:
            first = _first_error_line("".join(output))
            hint = perf_permission_hint(first)
            raise SetupError(
                f"could not load the eBPF probes from {self.source_path}: {first} (kernel headers: {self.headers})"
                + (f": {hint}" if hint else "")
            )
        self._lib = lib
        self.possible_cpus = len(get_possible_cpus())
        self._maps = {
            name: _RawMap(lib, self.bpf[name.encode()], self.possible_cpus, percpu)
            for name, percpu in (
                ("protected_threads", False),
                ("user_protected_bits", False),
                ("wait_stats", True),
                ("max_epoch", False),
                ("cpu_state", False),
                ("proc_cpu", False),
                ("changed_queue", False),
                ("burst_candidates", False),
                ("burst_floor", False),
            )
        }
        self._burst_candidates: dict[int, BurstCandidate] = {}
        self._burst_floor: int | None = None  # as last written to the burst_floor map
        self._burst_events: list[BurstEvent] = []
        self.bpf[b"burst_events"].open_ring_buffer(self._on_burst_event)
        self._epoch = 0
        self.protect_failures = 0  # threads the protected map could not take (user space adds)
        self.last_protect_error = ""
        self._exec_events: list[ExecEvent] = []
        self._fresh_exec_pids: list[int] = []  # for burst detection's candidates (take_exec_pids)
        # Renamed processes and moved threads since task_changes() was last asked (task events).
        self._renamed: set[int] = set()
        self._moved: set[int] = set()
        # Both tracepoints, or some changes go unseen until a rescan judges every process.
        self.has_task_events = all(flag in self.cflags for flag in TASK_EVENT_TRACEPOINTS.values())
        self.bpf[b"process_events"].open_ring_buffer(self._on_process_event)
        layouts = self.settings.layouts()
        self._protected_value = layouts["protected_thread"]
        self._proc_value = layouts["proc_cpu"]
        self._proc_key = layouts["proc_cpu_key"]
        self._wait_stats = layouts["wait_stats"]
        self._cpu_state = struct.Struct(CPU_STATE_HEAD)
        self._cpu_count = min(self.possible_cpus, self._maps["cpu_state"].max_entries)
        self._changed_queue = self._maps["changed_queue"].mapped()
        self.changed_overflows = 0  # reads that found a CPU's queue overflowed (and read everything)
        # proc_cpu as last read: the changed set says which entries to read again
        self._proc_cache: dict[tuple[int, int], ProcCpuEntry] = {}
        self._proc_cpus_of: dict[int, set[int]] = {}  # tgid -> its CPUs in _proc_cache
        self._comm_texts: dict[bytes, str] = {}  # comm field -> text (_comm)
        self._full_read_at = float("-inf")
        self._last_read_window = 0  # the window of the previous snapshot

    # -- the protected set --------------------------------------------------------------------
    def _set_user_bits(self, tids: Iterable[int], present: bool) -> None:
        """Only user space writes this half of the bitmap, so read-modify-write cannot race."""
        bitmap = self._maps["user_protected_bits"]
        words: dict[int, list[int]] = {}
        for tid in tids:
            if tid >> 6 < bitmap.max_entries:
                words.setdefault(tid >> 6, []).append(tid & 63)
        for word, bits in words.items():
            key = struct.pack("<I", word)
            raw = bitmap.lookup(key)
            value = struct.unpack_from("<Q", raw)[0] if raw else 0
            for bit in bits:
                value = value | (1 << bit) if present else value & ~(1 << bit)
            bitmap.update(key, struct.pack("<Q", value))

    def protect(self, tids: Iterable[int]) -> set[int]:
        """Add threads to the protected map; the set of those it could not hold (full: E2BIG).

        A full map is not fatal: those threads' waits go unmeasured, the caller retries them and
        reports how many there are (and the kernel counts the forks it could not add)."""
        protected = self._maps["protected_threads"]
        not_waiting = self._protected_value.pack(0, 0, 0, 0)
        added, refused = [], set()
        for tid in tids:
            try:
                # BPF_NOEXIST: a thread the kernel already added keeps its wait start.
                protected.update(struct.pack("<I", tid), not_waiting, flags=1)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    refused.add(tid)
                    self.protect_failures += 1
                    self.last_protect_error = f"{exc.strerror} (the protected map holds {self.settings.max_protected_threads})"
                    continue
            added.append(tid)
        self._set_user_bits(added, True)
        return refused

    def unprotect(self, tids: Iterable[int]) -> None:
        tids = list(tids)
        for tid in tids:
            self._maps["protected_threads"].delete(struct.pack("<I", tid))
        self._set_user_bits(tids, False)

    def protected_tids(self) -> set[int]:
        return {struct.unpack("<I", key)[0] for key in self._maps["protected_threads"].keys()}

    # -- reading ------------------------------------------------------------------------------
    def _percpu(self, name: str, index: int, layout: struct.Struct) -> list[tuple]:
        raw = self._maps[name].lookup(struct.pack("<I", index))
        if raw is None:
            return []
        stride = self._maps[name].value_stride
        return [layout.unpack_from(raw, cpu * stride) for cpu in range(self.possible_cpus)]

    def snapshot(self) -> RawSnapshot:
        # Bump the epoch first: the maximum and the changed-set queues of the epoch that just closed
        # are then no longer written (a program already past its epoch read finishes within
        # microseconds, long before the queues are read below).
        closed = self._epoch
        self._epoch += 1
        self._maps["max_epoch"].update(struct.pack("<I", 0), struct.pack("<Q", self._epoch))
        mono_ns = time.monotonic_ns()
        totals, max_ns, hist = sum_wait_stats(self._percpu("wait_stats", 0, self._wait_stats), closed)
        cpus, queued = self._read_cpus(closed)
        current_window = mono_ns >> self.settings.window_shift
        changed = self._read_proc_cpu_changed(queued, current_window)
        self._last_read_window = current_window
        return RawSnapshot(
            mono_ns=mono_ns,
            totals=totals,
            histogram=hist,
            max_ns=max_ns,
            cpus=cpus,
            proc_cpu=self._proc_cache,
            proc_cpu_changed=changed,
            cpus_of=self._proc_cpus_of,
        )

    def _read_cpus(self, closed_epoch: int) -> tuple[list[CpuState], set[bytes] | None]:
        """Each CPU's state (one batch call for all CPUs), and the keys the CPUs queued as changed
        in `closed_epoch` (None: a queue overflowed, read everything) from the queue mapped into
        this process's memory."""
        _keys, memory, _count = self._maps["cpu_state"].items()
        queue, stride = self._changed_queue, self._maps["cpu_state"].value_stride
        slots = self.settings.changed_queue_slots
        parity = closed_epoch & 1
        cpus: list[CpuState] = []
        queued: set[bytes] | None = set()
        for cpu in range(self._cpu_count):
            since, busy, tid, _head, _owed, *marks = self._cpu_state.unpack_from(memory, cpu * stride)
            cpus.append(CpuState(since, busy, tid))
            epoch_plus_one, count = marks[parity], marks[2 + parity]
            if queued is None or epoch_plus_one != closed_epoch + 1 or not count:
                continue
            if count > slots:
                queued = None
                self.changed_overflows += 1
                continue
            start = (cpu * 2 + parity) * slots * 8
            keys = queue[start:start + 8 * count]
            queued.update(keys[i:i + 8] for i in range(0, len(keys), 8))
        return cpus, queued

    def _picks(self, since_window: int, current_window: int) -> tuple[tuple[int, int, int], ...]:
        """The windows an entry read now decodes (older ones closed before the previous read: no
        tick asks for them again), at their positions in the unpacked value (after total_ns and
        blame_ns)."""
        return window_picks(self.settings.window_slots, since_window, current_window, first_slot=2)

    def _comm(self, raw: bytes) -> str:
        """The text of a comm field; kept by its bytes (a tick reads the same few comms again)."""
        text = self._comm_texts.get(raw)
        if text is None:
            if len(self._comm_texts) >= COMM_TEXTS_MAX:
                self._comm_texts.clear()
            text = self._comm_texts[raw] = raw.split(b"\0", 1)[0].decode(errors="replace")
        return text

    def _proc_entry(self, tgid: int, cpu: int, raw, picks: tuple[tuple[int, int, int], ...], offset: int = 0) -> ProcCpuEntry:
        """The entry with the picked windows (_picks)."""
        fields = self._proc_value.unpack_from(raw, offset)
        return ProcCpuEntry(tgid, cpu, fields[0], windows_at(fields, picks), self._comm(fields[-3]), fields[1])

    def _read_proc_cpu(self, current_window: int | None = None) -> dict[tuple[int, int], ProcCpuEntry]:
        """Every entry (one batch syscall per few hundred). The probe's clock is CLOCK_MONOTONIC."""
        if current_window is None:
            current_window = time.monotonic_ns() >> self.settings.window_shift
        keys, values, count = self._maps["proc_cpu"].items()
        size = self._proc_value.size
        picks = self._picks(0, current_window)
        return {(tgid, cpu): self._proc_entry(tgid, cpu, values, picks, index * size)
                for index, (tgid, cpu) in enumerate(self._proc_key.iter_unpack(keys))}

    # The whole table is read at the first snapshot, after a queue overflowed, and this often as a
    # safety net (a queue entry lost to a race leaves its time late until the entry is queued again).
    FULL_READ_EVERY_S = 300.0

    def _read_proc_cpu_changed(self, queued: set[bytes] | None, current_window: int) -> dict[tuple[int, int], ProcCpuEntry | None]:
        """Bring the table (_proc_cache) up to date, reading only the entries queued as changed in
        the epoch just closed (`queued`; None: read everything). Returns the changed keys'
        previous entries. Entries not queued may hold up to the report floor of time not yet
        read; otherwise the table equals a full read: see tests/test_probes_changed_set.py."""
        cache, cpus_of = self._proc_cache, self._proc_cpus_of
        now = time.monotonic()
        if queued is None or now - self._full_read_at >= self.FULL_READ_EVERY_S:
            fresh = self._read_proc_cpu(current_window)
            self._full_read_at = now
            before = {key: cache.get(key) for key, entry in fresh.items() if cache.get(key) != entry}
            before.update((key, entry) for key, entry in cache.items() if key not in fresh)
            cache.clear()
            cache.update(fresh)
            cpus_of.clear()
            for tgid, cpu in fresh:
                cpus_of.setdefault(tgid, set()).add(cpu)
            return before
        before: dict[tuple[int, int], ProcCpuEntry | None] = {}
        picks = self._picks(self._last_read_window, current_window)  # the same for every entry
        for raw_key, raw in self._maps["proc_cpu"].lookup_each(queued):
            key = tgid, cpu = self._proc_key.unpack(raw_key)
            before[key] = cache.get(key)
            if raw is None:
                if cache.pop(key, None) is not None:
                    cpus = cpus_of.get(tgid)
                    if cpus is not None:
                        cpus.discard(cpu)
                        if not cpus:
                            del cpus_of[tgid]
                continue
            cache[key] = self._proc_entry(tgid, cpu, raw, picks)
            cpus = cpus_of.get(tgid)
            if cpus is None:
                cpus_of[tgid] = {cpu}
            else:
                cpus.add(cpu)
        return before

    def forget_processes(self, tgids: Iterable[int], cpus: Iterable[int]) -> None:
        """Drop the entries of processes that exited (their last values were already read: a
        thread's last run queues its entry)."""
        cpu_list = list(cpus)
        for tgid in tgids:
            for cpu in cpu_list:
                self._maps["proc_cpu"].delete(struct.pack("<II", tgid, cpu))
                self._proc_cache.pop((tgid, cpu), None)
            self._proc_cpus_of.pop(tgid, None)

    # -- exec events --------------------------------------------------------------------------
    def _on_process_event(self, _ctx, data, size) -> None:
        """An exec or a task event (struct task_event is the small one)."""
        if size == self._TASK_EVENT.size:
            pid, kind = self._TASK_EVENT.unpack(ct.string_at(data, size))
            changes = self._renamed if kind == TASK_RENAMED else self._moved
            if len(changes) < 65536:
                changes.add(pid)
            return
        # Decoded by hand: bcc's event() takes one struct per ring, and this ring carries two.
        ts, pid, old_pid, filename = self._EXEC_EVENT.unpack(ct.string_at(data, self._EXEC_EVENT.size))
        self._renamed.discard(pid)  # the rename its exec made, just before (or older: superseded)
        self._exec_events.append(ExecEvent(ts, pid, old_pid, filename.split(b"\0", 1)[0].decode(errors="replace")))
        if len(self._fresh_exec_pids) < 65536:
            self._fresh_exec_pids.append(pid)

    _TASK_EVENT = struct.Struct("<II")  # struct task_event: pid, kind
    _EXEC_EVENT = struct.Struct(f"<QII{EXEC_FILENAME_LEN}s")  # struct exec_event: ts, pid, old_pid, filename

    def task_changes(self) -> tuple[set[int], set[int]]:
        """(processes renamed, threads moved to another cgroup) since the last call, renames made
        by an exec left out (the exec event stands for them). Non-blocking. The kernel sends one
        event per pid and kind per epoch: ask after snapshot() closed the epoch, so that a process
        renamed again since its event is read after that too."""
        self.bpf.ring_buffer_consume()
        changes = self._renamed, self._moved
        self._renamed, self._moved = set(), set()
        return changes

    def exec_events(self) -> list[ExecEvent]:
        """Exec events since the last call (non-blocking)."""
        self.bpf.ring_buffer_consume()
        events, self._exec_events = self._exec_events, []
        return events

    # -- burst detection ------------------------------------------------------------------------
    _CANDIDATE = struct.Struct(f"<QQIIII QQ {BURST_MAX_COUNT}Q".replace(" ", ""))
    _BURST_EVENT = struct.Struct("<QQQII")

    def set_burst_candidates(self, wanted: dict[int, BurstCandidate]) -> int:
        """Make the candidate map hold exactly `wanted` (tgid -> what to count). A candidate whose
        settings did not change keeps its counted waits; only differences touch the map. Returns
        how many of `wanted` the map could not hold (it is full)."""
        candidates = self._maps["burst_candidates"]
        left_out = 0
        for tgid in [tgid for tgid in self._burst_candidates if tgid not in wanted]:
            candidates.delete(struct.pack("<I", tgid))
            del self._burst_candidates[tgid]
        for tgid, candidate in wanted.items():
            if self._burst_candidates.get(tgid) == candidate:
                continue
            count = max(2, min(BURST_MAX_COUNT, candidate.count))
            value = self._CANDIDATE.pack(candidate.threshold_ns, candidate.span_ns, count, 0, 0, 0, 0, 0, *([0] * BURST_MAX_COUNT))
            try:
                candidates.update(struct.pack("<I", tgid), value)
            except OSError:
                left_out += 1  # the map is full: that process is left to the tick (tried again next tick)
                continue
            self._burst_candidates[tgid] = candidate
        floor = min((c.threshold_ns for c in self._burst_candidates.values()), default=0)
        if floor != self._burst_floor:  # one syscall fewer per tick when the candidates stay
            self._maps["burst_floor"].update(struct.pack("<I", 0), struct.pack("<Q", floor))
            self._burst_floor = floor
        return left_out

    def burst_candidates(self) -> dict[int, BurstCandidate]:
        return dict(self._burst_candidates)

    def inherited_burst_candidates(self) -> set[int]:
        """Entries the kernel added on fork that user space has not judged (processes or threads)."""
        keys = {struct.unpack("<I", key)[0] for key in self._maps["burst_candidates"].keys()}
        return keys - self._burst_candidates.keys()

    def drop_burst_candidates(self, tgids: Iterable[int]) -> None:
        for tgid in tgids:
            self._maps["burst_candidates"].delete(struct.pack("<I", tgid))
            self._burst_candidates.pop(tgid, None)

    def _on_burst_event(self, _ctx, data, size) -> None:
        ts, first_ts, wait_ns, tgid, count = self._BURST_EVENT.unpack(ct.string_at(data, self._BURST_EVENT.size))
        self._burst_events.append(BurstEvent(ts, first_ts, wait_ns, tgid, count))

    def poll(self, timeout_s: float) -> list[BurstEvent]:
        """Wait up to `timeout_s` for an event (a burst, or an exec: those are kept for
        exec_events()); the burst events since the last call. A signal ends the wait early."""
        self.bpf.ring_buffer_poll(max(1, math.ceil(timeout_s * 1000)))  # 0 would return at once: a spin
        events, self._burst_events = self._burst_events, []
        return events

    def take_exec_pids(self) -> list[int]:
        """Pids that exec'd since the last call (the events also stay for exec_events())."""
        pids, self._fresh_exec_pids = self._fresh_exec_pids, []
        return pids

    def program_stats(self) -> dict[str, tuple[int, int]]:
        """run_time_ns and run_cnt per program (needs kernel.bpf_stats_enabled=1)."""
        stats = {}
        for name, fn in self.bpf.funcs.items():
            try:
                info = Path(f"/proc/self/fdinfo/{fn.fd}").read_text()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in info.splitlines() if ":\t" in line)
            stats[name.decode() if isinstance(name, bytes) else name] = (
                int(fields.get("run_time_ns", "0")),
                int(fields.get("run_cnt", "0")),
            )
        return stats

    def close(self) -> None:
        self.bpf.cleanup()


def settings_for_this_kernel(settings: ProbeSettings | None = None) -> tuple[ProbeSettings, list[str]]:
    """The settings fitted to the running kernel (its pid_max, sched_switch's state mask), and the
    cflags they give: what the loader passes and what `--ebpf` prints."""
    settings = settings or ProbeSettings()
    pid_max = _read_pid_max()
    if pid_max and pid_max != settings.pid_max:
        settings = dataclasses.replace(settings, pid_max=pid_max)
    if settings.max_cpus is None:
        settings = dataclasses.replace(settings, max_cpus=_read_possible_cpus() or os.cpu_count() or 1)
    root = tracefs_root()
    fmt = root / "events/sched/sched_switch/format" if root else None
    text = fmt.read_text() if fmt is not None and fmt.exists() else ""
    task_tracepoints = [(category, event) for category, event in TASK_EVENT_TRACEPOINTS
                        if root is not None and (root / "events" / category / event / "format").exists()]
    return settings, settings.cflags(task_state_mask(text), exit_state_bits(text), task_tracepoints)


def describe_program(settings: ProbeSettings | None = None) -> str:
    """What would be loaded: the cflags and the program text (for `--ebpf`)."""
    _, cflags = settings_for_this_kernel(settings)
    source = probes_dir() / PROGRAM_FILE
    header = probes_dir() / "sched_monitor.h"
    return (
        f"// cflags: {' '.join(cflags)}\n"
        f"// ---- {header} ----\n{header.read_text()}\n"
        f"// ---- {source} ----\n{source.read_text()}"
    )
