"""The sd_notify protocol, spoken directly (no libsystemd dependency).

A datagram of newline-separated `KEY=VALUE` fields to the unix socket named
by `$NOTIFY_SOCKET` (a leading '@' means the abstract namespace).
"""

from __future__ import annotations

import os
import socket


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
