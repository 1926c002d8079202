"""What flows through the pipeline.

The hot path carries chunks (every delivery that arrived in one loop tick), never
one event per reading: each hop and each await is paid per chunk.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

NS = 1_000_000_000  # nanoseconds per second
_encode = msgspec.json.encode


def canonical_tags(tags: dict[str, str]) -> str:
    """Tags as stored: a JSON object with sorted keys, or "" for none."""
    if not tags:
        return ""
    return _encode(tags, order="sorted").decode()


class SensorStatus(msgspec.Struct, frozen=True):
    """Per-sensor state to store with a chunk: sequence (last, gaps, missing),
    gaps and missing being those found since the previous status (the store
    adds them up), expect_within, and the state a device reports of itself
    (Homie's $state), for sensors whose state changed.

    `devices`: what a stateful format must find again after a restart (a
    Sparkplug node's BIRTH and sequence), by (format, device): (position,
    description), the description None when only the position changed.
    Written with the chunk, it is the state as of the last commit."""

    sequences: dict[str, tuple[int, int, int]] = {}
    expect_within: dict[str, float] = {}
    states: dict[str, str] = {}
    devices: dict[tuple[str, str], tuple[bytes, bytes | None]] = {}
    # (packet id, CRC-32 of topic and payload) of the QoS 1/2 messages of
    # routes whose format tells redeliveries (`Format.tells_redeliveries`):
    # from the source, a chunk's own; to the store, the last ones committed
    # through this batch, so that after a restart a redelivery among them is
    # known to be committed already.
    packets: tuple[tuple[int, int], ...] = ()

    def __bool__(self) -> bool:
        return bool(
            self.sequences or self.expect_within or self.states or self.devices or self.packets
        )


def merge_statuses(statuses: Iterable[SensorStatus]) -> SensorStatus:
    """The state of several chunks (or batches) in order, as one write: the
    later state wins, sequence gaps add up (they are deltas), a device keeps
    the latest description any of them had. Packets are the caller's."""
    sequences: dict[str, tuple[int, int, int]] = {}
    expect: dict[str, float] = {}
    states: dict[str, str] = {}
    devices: dict[tuple[str, str], tuple[bytes, bytes | None]] = {}
    for status in statuses:
        for sensor, seq in status.sequences.items():
            before = sequences.get(sensor)
            if before is not None:
                seq = (seq[0], before[1] + seq[1], before[2] + seq[2])  # noqa: PLW2901
            sequences[sensor] = seq
        expect.update(status.expect_within)
        states.update(status.states)
        for device, (position, description) in status.devices.items():
            if description is None and device in devices:
                description = devices[device][1]  # noqa: PLW2901
            devices[device] = (position, description)
    return SensorStatus(sequences, expect, states, devices)


class Reading(msgspec.Struct, frozen=True, gc=False):
    """One measured value: `metric` of `sensor` at `ts_ns` (Unix nanoseconds, UTC).

    Time is an exact integer so that distinct device timestamps stay distinct at
    the precision the device sent (a float of Unix seconds resolves ~240 ns).
    `seq` tells apart readings of one message that share a series and a time
    (an array without timestamps, a repeated timestamp): the stored key is
    (series, ts_ns, seq), so a redelivered message maps onto the same keys.

    `topic` is the MQTT topic it arrived on, kept so that a reading the
    processor rejects can be quarantined with its origin.
    """

    sensor: str
    metric: str
    ts_ns: int
    value: float
    topic: str = ""
    # Canonical JSON of the reading's tags (topic levels, influx tags), or "".
    tags: str = ""
    unit: str = ""
    seq: int = 0


class Rejected(msgspec.Struct, frozen=True, gc=False):
    """Input that will not be stored as readings, and why; it goes to quarantine."""

    topic: str
    payload: bytes
    reason: str
    received_at: float
    # A small fixed set, for counting (a metrics label): see REJECT_KINDS.
    kind: str = "decode"


# Why input is quarantined, by kind (the free-text reason says the rest), and
# where each is applied: the one list of quarantine reasons.
REJECT_KINDS: dict[str, str] = {
    "decode": "the route's format could not read the payload (decode.decode_message, formats/)",
    "no_route": "no route's filter matches the topic (decode.decode_message)",
    "bad_topic": "the topic is not UTF-8 (source) or gives an empty sensor id (decode)",
    "out_of_range": "a value outside [processor.limits], or scaled to NaN/inf (checks)",
    "too_large": "over input.max_payload_bytes, or the maximum packet size (decode, mqtt.link)",
    "clock": "a device time too far ahead or too old (checks.apply_clock)",
    "rate_limited": "over the route's rate_limit, rate_policy = quarantine (decode)",
    "conflict": "a key already stored with another value (store batches)",
    "internal": "a decoder or check raised: a bug in ingestd, the message kept (decode, checks)",
}


class Decoded(msgspec.Struct, frozen=True):
    """The decoded form of every delivery received in one loop tick.

    `acks` are the (message id, QoS) pairs to acknowledge once this chunk is
    committed; they belong to connection `epoch` and are void on any other.
    `deliveries` counts the messages, acknowledged or not (QoS 0), that the
    chunk holds against the in-flight window.

    Control travels in band, so it keeps its place behind the data before it:
    `flush` asks the writer to commit now rather than wait for the batch to
    fill or age; `last` says the source has stopped and each stage is to
    finish its work and return.
    """

    readings: list[Reading]
    rejected: list[Rejected]
    deliveries: int
    acks: list[tuple[int, int]]
    epoch: int
    flush: bool = False
    last: bool = False
    # Per-sensor state (device sequence counters, expect_within) to store with
    # this chunk's readings, in the same transaction.
    status: SensorStatus = SensorStatus()
    # (gaps, messages missing) in devices' counters found decoding this chunk:
    # counted once it is committed (a chunk a lost primary term never
    # committed is read, and its gaps found, again by the next primary).
    gaps: tuple[int, int] = (0, 0)


class Processed(Decoded, frozen=True):
    """A chunk after validation: what remains in `readings` is to be stored.

    `rejected_readings`: readings the processor moved into `rejected` (limits,
    clocks): with `readings`, every reading the chunk carried in.
    """

    rejected_readings: int = 0


# What `duplicates` counts, said where the count shows (the summary and
# stopped lines, stats): a second quick start shows some, unexplained.
DUPLICATES_ARE = (
    "readings already stored with the same values, delivered again (redelivered "
    "after a restart or reconnect, a retained message, a device repeating "
    "itself): not stored twice"
)


class BatchCommitted(msgspec.Struct, frozen=True):
    readings: int
    duplicates: int
    quarantined: int
    deliveries: int
    seconds: float
    size: int = 0  # rows written: readings offered (inserted or duplicate) + quarantined
    # Readings not stored because their series and time hold another value;
    # quarantined in the same transaction (and counted in `quarantined`).
    conflicts: list[Rejected] = []
    # Readings committed to the local spool instead (acknowledged, not yet in
    # the store), or forwarded from it by this commit.
    spooled: int = 0
    forwarded: int = 0


def reading_payload(r: Reading, **extra: object) -> bytes:
    """A reading as the payload of its quarantine record (JSON), with `extra`
    fields (a conflict adds the value stored in its place). Its tags, unit and
    seq when it has them: `ingestd quarantine replay` rebuilds the reading
    from this, whole (`ingestd.tools.replay`)."""
    doc: dict[str, object] = {
        "sensor": r.sensor,
        "metric": r.metric,
        "ts": r.ts_ns / NS,
        "ts_ns": r.ts_ns,
        "value": r.value,
    }
    if r.tags:
        doc["tags"] = r.tags
    if r.unit:
        doc["unit"] = r.unit
    if r.seq:
        doc["seq"] = r.seq
    doc.update(extra)
    return _encode(doc)


_encode = msgspec.json.encode


def control(*, last: bool, epoch: int = 0) -> Decoded:
    """An empty chunk that only carries `flush` (and, if `last`, end of stream)."""
    return Decoded([], [], 0, [], epoch, flush=True, last=last)
