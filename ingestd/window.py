"""The in-flight window: how many received messages are not yet settled.

A message is in flight from the moment the MQTT client hands it over until
every reading it carried is committed (or quarantined) and, for QoS >= 1, it
is acknowledged. The window bounds the memory ingestd holds for the broker:
when it is full the source stops reading from the socket, and TCP flow
control (or the broker's in-flight limit, or MQTT 5 Receive Maximum) holds
the rest on the broker, where the session keeps it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class InFlightWindow:
    def __init__(self, limit: int, broker_limit: int = 0) -> None:
        """`limit`: most messages in flight; `broker_limit`: the most unacknowledged
        QoS >= 1 messages the broker will send before it waits for acks (0: none).
        """
        if limit < 1:
            raise ValueError("the in-flight window must hold at least one message")
        self.limit = limit
        self.broker_limit = broker_limit
        self.in_flight = 0
        self.unacked = 0
        # Readings decoded from messages in flight and not yet committed or
        # quarantined (a term of the accounting identity).
        self.readings = 0
        self.peak = 0
        self.recent_peak = 0  # since the last `take_recent_peak` (the log summary's)
        self.pauses = 0
        # monotonic time of the last settle, or of the first take after idle:
        # work in flight with no progress for long means a stalled pipeline.
        self.progress_at = time.monotonic()
        self._idle = asyncio.Event()
        self._idle.set()
        self._room = asyncio.Event()
        self._room.set()
        self._on_full: Callable[[], None] | None = None
        self._on_room: Callable[[], None] | None = None
        self._paused = False

    def on_flow(self, on_full: Callable[[], None], on_room: Callable[[], None]) -> None:
        """Callbacks that stop and restart reading from a (new) broker connection.

        If the window is already full (a persistent session's backlog can
        arrive before the callbacks are wired), reading stops at once.
        """
        self._on_full, self._on_room = on_full, on_room
        self._paused = False
        if self.in_flight >= self.limit:
            self._paused = True
            self.pauses += 1
            on_full()

    def take(self, messages: int, unacked: int) -> None:
        if self.in_flight == 0:
            self.progress_at = time.monotonic()
        self.in_flight += messages
        self.unacked += unacked
        self.peak = max(self.peak, self.in_flight)
        self.recent_peak = max(self.recent_peak, self.in_flight)
        if messages:
            self._idle.clear()
        if self.in_flight >= self.limit:
            self._room.clear()
        if self.in_flight >= self.limit and not self._paused and self._on_full is not None:
            self._paused = True
            self.pauses += 1
            self._on_full()

    def take_recent_peak(self) -> int:
        peak, self.recent_peak = self.recent_peak, self.in_flight
        return peak

    def settle(self, messages: int, unacked: int) -> None:
        self.progress_at = time.monotonic()
        self.in_flight -= messages
        self.unacked -= unacked
        if self.in_flight <= 0:
            self.in_flight = 0
            self._idle.set()
        if self.in_flight < self.limit:
            self._room.set()
        if self._paused and self.in_flight < self.limit and self._on_room is not None:
            self._paused = False
            self._on_room()

    @property
    def saturated(self) -> bool:
        """Nothing more will arrive until something is settled: commit now."""
        if self.in_flight >= self.limit:
            return True
        return self.broker_limit > 0 and self.unacked >= self.broker_limit

    # The sizing rule, in one place: the source hands chunks of at most a
    # quarter of the window to the pipeline, and the writer commits a batch
    # once it holds half the window (or half of what the broker sends before
    # it waits for acks). A read can take the whole window at once (the broker
    # sends it in one burst after a commit's acknowledgements); as one chunk it
    # would be one batch however many readings it held, written while nothing
    # else could be. Committing at half, not at full, lets the other half be
    # read while this half is written, and a store that takes batches side by
    # side (PostgreSQL) writes the next at the same time.

    @property
    def chunk_size(self) -> int:
        """The most messages the source puts in one chunk."""
        return max(1, self.limit // 4)

    def batch_full(self, deliveries: int, unacked: int) -> bool:
        """A batch holding `deliveries` messages (`unacked` of them to acknowledge)
        is to be committed now: more can only arrive as fast as it commits."""
        if self.saturated or deliveries * 2 >= self.limit:
            return True
        return self.broker_limit > 0 and unacked * 2 >= self.broker_limit

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def wait_room(self) -> None:
        """Until fewer than `limit` messages are in flight."""
        await self._room.wait()
