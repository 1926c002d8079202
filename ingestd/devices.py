"""What ingestd learned of devices from their messages, owned apart from routing.

`DeviceState` is one pipeline's: device counters (`sequence_field`), when
each route and sensor was last heard (`expect_within`), rate-limit buckets,
what stateful formats keep (Homie descriptions, Sparkplug nodes), the states
devices report, commands formats ask to send, and the decode counts of the
accounting identity. A reload swaps the route table and keeps this. Every
per-device cache is bounded by recency (`ingestd.recent`): never cleared at
once. What must outlive the process goes to the store with each chunk
(`take_status`) and comes back at start (`restore`).

A format's decoder gets it in a `DecodeContext` (`ingestd.formats.base`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ingestd.events import SensorStatus
from ingestd.observe.device_log import DeviceLog
from ingestd.ratelimit import RateLimiter
from ingestd.recent import RecentCache

# Sensors and (route, sensor) pairs each cache keeps, the most recently used
# (see ingestd.recent for what an entry weighs).
KEPT = 65536
# A counter that goes back by more than this restarted (a redelivery goes back
# by at most the broker's in-flight window).
_RESTART_BACKSTEP = 65535


@dataclass(slots=True)
class DecodeCounts:
    """What decoding did with readings, for the accounting identity (metrics).

    `decoded`: readings the payloads gave (what `explain` lists). Of those, the
    rate limit dropped `rate_dropped` and quarantined `rate_quarantined`, and
    `retained_untimed` came from a retained message without a device time.
    `retained_ignored` counts retained messages not decoded at all.
    """

    decoded: int = 0
    rate_dropped: int = 0
    rate_quarantined: int = 0
    retained_untimed: int = 0
    retained_ignored: int = 0
    sequence_gaps: int = 0
    sequence_missing: int = 0
    non_numeric: int = 0  # values a format knows are not numbers (homie strings, enums)
    # Values a format read and did not store, by why (sparkplug: "string",
    # "dataset", "transient", "null", ...).
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    rebirth_requests: int = 0  # Sparkplug rebirths asked for
    rebirths_suppressed: int = 0  # not asked: over rebirth_max_per_second in all


@dataclass(slots=True)
class SequenceState:
    """A device's message counter as ingestd has followed it: the last number
    seen, and the gaps found since the state was last taken for the store
    (`DeviceState.take_status`). The store adds those to the counts it holds,
    so a state forgotten (evicted) and rebuilt, or kept by another instance,
    never replaces counts already stored; `last` is persisted too, so a gap
    across an ingestd restart still counts."""

    last: int
    gaps: int = 0
    missing: int = 0


_NO_STATUS = SensorStatus()


class Stateful(Protocol):
    """A format that keeps device state across restarts (`ingestd.formats.Format`)."""

    @property
    def name(self) -> str: ...
    @property
    def save_state(
        self,
    ) -> Callable[[DeviceState], dict[str, tuple[bytes, bytes | None]]] | None: ...
    @property
    def load_state(
        self,
    ) -> Callable[[DeviceState, list[tuple[str, bytes, bytes]]], None] | None: ...


class DeviceState:
    def __init__(self, kept: int = KEPT) -> None:
        # `kept`: entries each per-sensor cache holds (tests make it small).
        self.counts = DecodeCounts()
        self.rate = RateLimiter(kept)
        # Per sensor: the device's sequence counter; `sequences_changed` holds the
        # states whose gaps the next chunk carries to the store (by reference: a
        # state evicted meanwhile still reports what it found).
        self.sequences: RecentCache[str, SequenceState] = RecentCache(kept)
        self.sequences_changed: dict[str, SequenceState] = {}
        # Per route, and per (route, sensor): time of the last message, for
        # routes with expect_within. Sensors by recency: one forgotten (silent
        # longest, past the bound) no longer counts in ingestd_sensors_stale;
        # `ingestd sensors` judges staleness from the store, for all.
        self.route_seen: dict[int, int] = {}
        self.sensor_seen: RecentCache[tuple[int, str], int] = RecentCache(kept)
        # Sensors first heard of (this run) on a route with expect_within, and
        # that limit: the store keeps it so `ingestd sensors` can flag staleness.
        self.expect_changed: dict[str, float] = {}
        # What stateful formats learned from earlier messages, by format name
        # (homie: device descriptions and states).
        self.format_state: dict[str, Any] = {}
        # A stateful format changed what it keeps across restarts (its
        # `save_state` says what): the next chunk carries it to the store.
        self.devices_changed = False
        # Lines about single devices share one budget (ids come from anyone).
        self.device_log = DeviceLog()
        # The state devices report of themselves (Homie's $state), changed
        # since the last chunk: the store keeps it for `ingestd sensors`.
        self.states_changed: dict[str, str] = {}
        # MQTT messages a format asks to send (Sparkplug rebirth requests):
        # (topic, payload), published by the source after the chunk.
        self.commands: list[tuple[str, bytes]] = []

    def take_status(self, stateful: Sequence[Stateful] = ()) -> SensorStatus:
        """The per-sensor state changed since the last call, for the store
        (`stateful`: the formats whose device state to save, the table's)."""
        if not (
            self.sequences_changed
            or self.expect_changed
            or self.states_changed
            or self.devices_changed
        ):
            return _NO_STATUS  # the common chunk: nothing to store, nothing to allocate
        devices: dict[tuple[str, str], tuple[bytes, bytes | None]] = {}
        if self.devices_changed:
            self.devices_changed = False
            for fmt in stateful:
                assert fmt.save_state is not None
                saved = fmt.save_state(self)
                devices.update(((fmt.name, d), v) for d, v in saved.items())
        seqs: dict[str, tuple[int, int, int]] = {}
        for sensor, st in self.sequences_changed.items():
            # Gaps found since the last call: the store adds them to its counts.
            seqs[sensor] = (st.last, st.gaps, st.missing)
            st.gaps = st.missing = 0
        self.sequences_changed = {}
        expect, self.expect_changed = self.expect_changed, {}
        states, self.states_changed = self.states_changed, {}
        return SensorStatus(seqs, expect, states, devices)

    def restore(
        self, stateful: Sequence[Stateful], devices: dict[str, list[tuple[str, bytes, bytes]]]
    ) -> None:
        """Give each stateful format what the store kept of it (at start)."""
        for fmt in stateful:
            rows = devices.get(fmt.name)
            if rows and fmt.load_state is not None:
                fmt.load_state(self, rows)

    def sequence(self, sensor: str, seq: int) -> None:
        """Follow a device's message counter: a jump forward is a gap (messages
        lost upstream: device, network or broker); a step back is a redelivery
        or a device restart, not a gap."""
        state = self.sequences.recent(sensor)
        if state is None:
            # First seen (this run), or forgotten: no gap can be judged yet; the
            # store keeps the counts found before.
            state = self.sequences[sensor] = SequenceState(seq)
        elif seq > state.last:
            if seq > state.last + 1:
                missed = seq - state.last - 1
                state.gaps += 1
                state.missing += missed
                self.counts.sequence_gaps += 1
                self.counts.sequence_missing += missed
            state.last = seq
        elif seq < state.last and state.last - seq > _RESTART_BACKSTEP:
            state.last = seq  # the device restarted its counter
        else:
            return
        self.sequences_changed[sensor] = state
