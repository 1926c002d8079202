"""The sd_notify protocol, spoken directly (no libsystemd dependency).

A datagram of newline-separated `KEY=VALUE` fields to the unix socket named
by `$NOTIFY_SOCKET` (a leading '@' means the abstract namespace).
"""

from __future__ import annotations

import os
import socket
import time


class SystemdNotifier:
    def __init__(self, path: str | None = None) -> None:
        self.path = path if path is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._sock: socket.socket | None = None
        if self.path:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str) -> bool:
        if self._sock is None:
            return False
        address = "\0" + self.path[1:] if self.path.startswith("@") else self.path
        try:
            self._sock.sendto("\n".join(fields).encode(), address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds within which systemd expects WATCHDOG=1 (WatchdogSec=), or None.

    systemd sets WATCHDOG_USEC, and WATCHDOG_PID naming the process meant
    (a child that inherited the variables must not answer for its parent).
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, for RELOADING=1's MONOTONIC_USEC=."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
