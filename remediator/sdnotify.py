"""sd_notify(3) without libsystemd: READY, WATCHDOG and STATUS over $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import time


# A STATUS at most this often: systemd (PID 1) wakes to take each message, and `systemctl status`
# needs no four a second.
STATUS_EVERY_S = 1.0


class Notifier:
    def __init__(self, environ: dict | None = None, clock=time.monotonic, status_every_s: float = STATUS_EVERY_S):
        environ = os.environ if environ is None else environ
        self.address = environ.get("NOTIFY_SOCKET", "")
        self.clock = clock
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        watchdog_for_us = not pid or pid == str(os.getpid())
        # Ping at half the watchdog interval, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and watchdog_for_us else None
        self._last_ping = float("-inf")
        self.status_every_s = status_every_s
        self._last_status = float("-inf")
        self._socket = None
        if self.address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, message: str) -> None:
        if not self._socket:
            return
        address = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            self._socket.sendto(message.encode(), address)
        except OSError:
            pass  # systemd gone or not listening: nothing to do about it here

    def ready(self, status: str = "") -> None:
        self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def status_due(self) -> bool:
        """Whether to build and send a STATUS now: someone listens, and status_every_s has passed
        since the last (the caller then sends one)."""
        if not self.enabled:
            return False
        now = self.clock()
        if now - self._last_status < self.status_every_s:
            return False
        self._last_status = now
        return True

    def watchdog(self) -> None:
        if self.watchdog_interval is None:
            return
        now = self.clock()
        if now - self._last_ping >= self.watchdog_interval:
            self._last_ping = now
            self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def close(self) -> None:
        if self._socket:
            self._socket.close()
            self._socket = None
