"""sched = "idle" | "batch" on every thread of a real process: never a raise, restored per thread
(realtime priority included), new threads and children born under the change included."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

from helpers.faults import FaultySyscalls
from helpers.remediation import identity_of, new_executor, tids_of  # noqa: F401  (fixture)
from helpers.workloads import hog_argv
from remediator.model import ActionRequest

pytestmark = pytest.mark.root


def sched_request(pid: int, name: str, step: int = 0) -> ActionRequest:
    return ActionRequest(identity_of(pid), "sched", "log-shippers", step, {"sched": name})


def thread_policies(pid: int) -> dict[int, tuple[int, int]]:
    """tid -> (policy number with flags, realtime priority)."""
    return {tid: (os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority) for tid in tids_of(pid)}


def test_idle_reaches_every_thread_and_each_gets_its_own_policy_back(spawn, new_executor):
    hog = spawn(hog_argv(threads=3))
    main, first, second, third = hog.tids()
    os.sched_setscheduler(main, os.SCHED_BATCH | os.SCHED_RESET_ON_FORK, os.sched_param(0))  # the flag comes back too
    os.sched_setscheduler(second, os.SCHED_BATCH, os.sched_param(0))
    # A realtime thread is never touched (the unit's RestrictRealtime= could not give it back).
    # Its priority is the lowest, and the workers stop at teardown.
    os.sched_setscheduler(third, os.SCHED_FIFO, os.sched_param(1))
    before = thread_policies(hog.pid)
    executor = new_executor()

    outcome = executor.apply(sched_request(hog.pid, "idle"), protected_pids=())

    assert outcome.status == "applied", outcome
    assert outcome.message.startswith(f"sched_setscheduler(tid, SCHED_IDLE, 0) on 3 threads of pid {hog.pid} (was ")
    assert "batch+reset-on-fork on 1 thread" in outcome.message and "batch on 1 thread" in outcome.message
    assert {tid: policy for tid, (policy, _) in thread_policies(hog.pid).items()} == {
        main: os.SCHED_IDLE, first: os.SCHED_IDLE, second: os.SCHED_IDLE, third: os.SCHED_FIFO}
    [restored] = executor.restore()
    assert restored.status == "restored", restored
    assert thread_policies(hog.pid) == before
    assert executor.active() == []


def test_never_a_raise_a_thread_already_lower_is_left(spawn, new_executor):
    hog = spawn(hog_argv(threads=2))
    main, first, second = hog.tids()
    os.sched_setscheduler(first, os.SCHED_IDLE, os.sched_param(0))
    executor = new_executor()

    outcome = executor.apply(sched_request(hog.pid, "batch"), ())

    assert outcome.status == "applied", outcome
    assert outcome.threads == 2  # the idle worker is not raised to batch
    assert os.sched_getscheduler(first) == os.SCHED_IDLE
    assert os.sched_getscheduler(main) == os.sched_getscheduler(second) == os.SCHED_BATCH
    executor.restore()
    assert os.sched_getscheduler(first) == os.SCHED_IDLE
    assert os.sched_getscheduler(main) == os.sched_getscheduler(second) == os.SCHED_OTHER


def test_a_process_already_idle_everywhere_is_unchanged(spawn, new_executor):
    hog = spawn(hog_argv(threads=1))
    for tid in hog.tids():
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    syscalls = FaultySyscalls()
    executor = new_executor(syscalls=syscalls)
    for name in ("idle", "batch"):
        outcome = executor.apply(sched_request(hog.pid, name), ())
        assert outcome.status == "unchanged", outcome
    assert syscalls.changes() == []
    assert executor.active() == []


def test_a_thread_born_later_gets_it_and_a_child_born_under_the_change_is_restored(spawn, new_executor, tmp_path):
    flag = tmp_path / "fork-now"
    script = textwrap.dedent(f"""
        import os, subprocess, sys, threading, time
        print("ready", flush=True)
        while not os.path.exists({str(flag)!r}):
            time.sleep(0.01)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        thread = threading.Thread(target=time.sleep, args=(600,), daemon=True)
        thread.start()
        print(f"child={{child.pid}} tid={{thread.native_id}}", flush=True)
        time.sleep(600)
    """)
    parent = spawn([sys.executable, "-c", script])
    old_child = spawn([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(600)"])  # not a descendant
    executor = new_executor()
    assert executor.apply(sched_request(parent.pid, "idle"), ()).status == "applied"
    os.sched_setscheduler(old_child.pid, os.SCHED_IDLE, os.sched_param(0))  # idle on its own: never ours to undo

    flag.write_text("")
    words = dict(word.split("=") for word in parent.read_line().split())
    child, tid = int(words["child"]), int(words["tid"])
    assert os.sched_getscheduler(child) == os.SCHED_IDLE  # inherited at fork
    assert os.sched_getscheduler(tid) == os.SCHED_IDLE

    [restored] = executor.restore()

    assert restored.status == "restored", restored
    assert "of 1 descendant born under the change" in restored.message, restored.message
    assert {policy for policy, _ in thread_policies(parent.pid).values()} == {os.SCHED_OTHER}
    assert {policy for policy, _ in thread_policies(child).values()} == {os.SCHED_OTHER}
    assert os.sched_getscheduler(old_child.pid) == os.SCHED_IDLE


def test_dry_run_says_the_exact_call_and_changes_nothing(spawn, new_executor):
    hog = spawn(hog_argv(threads=2))
    before = thread_policies(hog.pid)
    executor = new_executor(None, dry_run=True)
    outcome = executor.apply(sched_request(hog.pid, "idle"), ())
    assert outcome.status == "would-apply", outcome
    assert outcome.message.startswith(f"sched_setscheduler(tid, SCHED_IDLE, 0) on 3 threads of pid {hog.pid} (was other)")
    assert thread_policies(hog.pid) == before


def test_a_thread_born_under_the_change_never_gets_a_realtime_class_back(spawn, new_executor, tmp_path):
    """The main thread realtime (rtkit, RLIMIT_RTPRIO) and its workers normal: the step leaves the
    main thread and idles the workers; a thread a worker makes inherits idle. Restored, it gets
    SCHED_OTHER, not the main thread's FIFO: realtime for a thread that never held it."""
    flag = tmp_path / "spawn-now"
    script = textwrap.dedent(f"""
        import os, threading, time
        def worker():
            while not os.path.exists({str(flag)!r}):
                time.sleep(0.01)
            born = threading.Thread(target=time.sleep, args=(600,), daemon=True)
            born.start()
            print(f"tid={{born.native_id}}", flush=True)
            time.sleep(600)
        threading.Thread(target=worker, daemon=True).start()
        print("ready", flush=True)
        time.sleep(600)
    """)
    process = spawn([sys.executable, "-c", script])
    os.sched_setscheduler(process.pid, os.SCHED_FIFO, os.sched_param(1))  # the main thread only; it sleeps
    executor = new_executor()
    assert executor.apply(sched_request(process.pid, "idle"), ()).status == "applied"
    assert os.sched_getscheduler(process.pid) == os.SCHED_FIFO  # realtime threads are never touched

    flag.write_text("")
    tid = int(process.read_line().split("=")[1])
    assert os.sched_getscheduler(tid) == os.SCHED_IDLE  # inherited from the idled worker

    [restored] = executor.restore()

    assert restored.status == "restored", restored
    assert os.sched_getscheduler(tid) == os.SCHED_OTHER
    assert os.sched_getscheduler(process.pid) == os.SCHED_FIFO
