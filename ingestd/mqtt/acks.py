"""Which acknowledgements the broker is known to have processed.

A broker handles a connection's packets in order, so a PINGRESP answered
after an acknowledgement was written means the broker has processed it. A
quiet link (no new acknowledgement for `QUIET_BEFORE_CONFIRM`) has its last
ones confirmed this way (a PINGREQ, at most one a second), so a stop finds
them confirmed even when the broker is stopped at the same moment (a
terminal's Ctrl-C reaches both).
"""

from __future__ import annotations

import time

QUIET_BEFORE_CONFIRM = 0.2


class AckConfirmations:
    def __init__(self) -> None:
        self.sent = 0  # acknowledgement writes
        self.confirmed = 0  # of those, how many the broker is known to have processed
        self._ping_covers: int | None = None
        self._written_at = 0.0

    def written(self) -> None:
        self.sent += 1
        self._written_at = time.monotonic()

    @property
    def unconfirmed(self) -> int:
        """Acknowledgement writes the broker is not yet known to have processed."""
        return self.sent - self.confirmed

    def confirmed_up_to(self, covers: int) -> None:
        """A ping sent after `covers` writes was answered."""
        self.confirmed = max(self.confirmed, covers)

    def answered(self, ping_outstanding: bool) -> None:
        """The ping asked for is answered: what was written before it is confirmed."""
        if self._ping_covers is not None and not ping_outstanding:
            self.confirmed_up_to(self._ping_covers)
            self._ping_covers = None

    def wants_ping(self, ping_outstanding: bool, paused: bool) -> bool:
        """Ask the broker to confirm: writes are unconfirmed, the link has been
        quiet a moment, and no ping is on its way (nor reading paused)."""
        return (
            self._ping_covers is None
            and self.unconfirmed > 0
            and not paused
            and not ping_outstanding
            and time.monotonic() - self._written_at >= QUIET_BEFORE_CONFIRM
        )

    def ping_sent(self) -> None:
        self._ping_covers = self.sent
