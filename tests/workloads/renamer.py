"""A process that renames itself on command, as a Node service setting process.title or a Python
one calling setproctitle does (prctl PR_SET_NAME on its main thread, no exec).

Prints "ready", then reads commands on stdin, printing "ok" after each:
  name X     the process (its main thread) renames itself X
  thread X   a new thread names itself X and waits (thread pools name their threads)
  exit       the process exits
"""

from __future__ import annotations

import ctypes
import sys
import threading

PR_SET_NAME = 15
libc = ctypes.CDLL(None, use_errno=True)
parked = threading.Event()


def set_name(name: str) -> None:
    if libc.prctl(PR_SET_NAME, name.encode(), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")


def named_thread(name: str) -> None:
    set_name(name)
    print("ok", flush=True)
    parked.wait()


def main() -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        command, _, name = line.strip().partition(" ")
        if command == "name":
            set_name(name)
            print("ok", flush=True)
        elif command == "thread":
            threading.Thread(target=named_thread, args=(name,), daemon=True).start()
        else:
            break
    parked.set()


if __name__ == "__main__":
    main()
