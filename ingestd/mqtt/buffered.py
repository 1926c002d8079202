"""The socket paho reads from: its many small reads served from one large one.

paho reads each packet with three or more `recv()` calls (the command byte,
each Remaining Length byte, the rest), a system call each. `BufferedSocket`
stands in front of the real socket (`ingestd.mqtt.link` puts it there when
the connection opens) and serves them from one read of up to 64 KiB; the
adapter's fast path parses complete packets straight from `buf` at `pos`.

It is also where a packet over the bound shows first: paho asks for a
packet's whole body at once, so a request over `limit` raises
`PacketTooLarge` before any of the body is read, and the adapter reads past
the packet instead.
"""

from __future__ import annotations

from typing import Any

# Bytes asked of the kernel per read: a few hundred typical PUBLISH packets.
_READ_SIZE = 64 * 1024


class PacketTooLarge(Exception):
    """Raised through paho when it asks for a packet body over the bound: paho
    has read the fixed header (its `_in_packet`) and none of the body."""


class BufferedSocket:
    """A socket whose `recv(n)` is served from one large read of the real socket.

    Everything else (send, fileno, close, TLS attributes) goes to the real
    socket. `pending()` counts the buffered bytes too, so the reader knows to
    go on reading although the kernel has nothing more to report readable.
    """

    __slots__ = ("_sock", "buf", "limit", "pos")

    def __init__(self, sock: Any, limit: int = 0) -> None:
        self._sock = sock
        self.buf = b""
        self.pos = 0
        # paho asks for a packet's whole body at once (then for what is left):
        # a request over `limit` (0: none) means a packet over the bound.
        self.limit = limit

    def recv(self, n: int) -> bytes:
        if self.limit and n > self.limit:
            raise PacketTooLarge(n)
        buf, pos = self.buf, self.pos
        if pos < len(buf):
            end = pos + n
            self.pos = end
            return buf[pos:end]
        data: bytes = self._sock.recv(max(n, _READ_SIZE))  # may raise BlockingIOError
        if len(data) <= n:
            return data
        self.buf, self.pos = data, n
        return data[:n]

    def pending(self) -> int:
        buffered = len(self.buf) - self.pos
        inner = getattr(self._sock, "pending", None)
        return max(buffered, 0) + (inner() if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
