"""/proc reads that can block do not stall the daemon's loop.

Reading /proc/PID/cmdline takes the target's mmap lock, so it blocks while a task in D state holds
that lock. A FIFO standing in for the file in a fake /proc tree blocks the same way (open waits
for a writer), and can be released at will.
"""

from __future__ import annotations

import os

import pytest

from remediator.procfs import ProcFS

from helpers.fakeproc import FakeProc, FakeProcess


@pytest.fixture
def blocking_cmdline(tmp_path):
    """A fake /proc where pid 20's cmdline is a FIFO nobody writes; released at teardown."""
    proc = FakeProc(tmp_path / "proc")
    proc.add(FakeProcess(10, "api", cmdline=("api", "--serve")))
    proc.add(FakeProcess(20, "stuck", cmdline=("stuck",)))
    proc.write()
    fifo = proc.root / "20" / "cmdline"
    fifo.unlink()
    os.mkfifo(fifo)
    yield proc.root, fifo
    release(fifo)


def release(fifo) -> None:
    """Let a reader blocked in open() go: a writer appears and leaves (the reader then reads EOF)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader waiting


def test_a_blocked_cmdline_read_gives_up_and_is_not_retried_while_blocked(blocking_cmdline):
    root, fifo = blocking_cmdline
    procfs = ProcFS(root, read_timeout_s=0.2)
    info = procfs.process_info(20)
    assert info.comm == "stuck" and info.cmdline == ()  # unknown: a cmdline policy cannot match it
    # only the cmdline read blocks (exe is a readlink, which does not take the mmap lock)
    stuck_paths = set(procfs._bounded.stuck)
    assert stuck_paths == {f"{root}/20/cmdline"} and procfs.blocked_reads == 1
    assert procfs.process_info(20).cmdline == ()  # refused at once: no new worker, no new wait
    assert set(procfs._bounded.stuck) == stuck_paths and procfs.blocked_reads > len(stuck_paths)
    assert procfs.process_info(10).cmdline == ("api", "--serve")  # other processes are read as usual

    stuck = list(procfs._bounded.stuck.values())
    release(fifo)  # the holder of the lock lets go: the stuck read finishes and its thread ends
    for thread in stuck:
        thread.join(10)
    assert not any(t.is_alive() for t in stuck) and procfs._bounded.stuck == {}
    fifo.unlink()
    fifo.write_bytes(b"stuck\0--again\0")
    assert procfs.process_info(20).cmdline == ("stuck", "--again")


def test_reads_are_refused_once_too_many_are_stuck(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    for pid in (20, 21, 22):
        proc.add(FakeProcess(pid, f"stuck{pid}"))
    proc.write()
    fifos = []
    for pid in (20, 21, 22):
        fifo = proc.root / str(pid) / "cmdline"
        fifo.unlink()
        os.mkfifo(fifo)
        fifos.append(fifo)
    procfs = ProcFS(proc.root, read_timeout_s=0.1)
    procfs._bounded.max_stuck = 2
    try:
        assert procfs.cmdline(20) == () and procfs.cmdline(21) == ()
        assert len(procfs._bounded.stuck) == 2 and procfs.blocked_reads == 2
        assert procfs.cmdline(22) == ()  # refused without a thread of its own: two are stuck already
        assert len(procfs._bounded.stuck) == 2 and procfs.blocked_reads == 3
    finally:
        for fifo in fifos:
            release(fifo)
