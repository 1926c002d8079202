"""Messages to readings: the steps every payload takes, whatever its format.

Pure functions of their input: no I/O, no clock (the receive time is passed
in). A message is checked against the input limits, matched to its route,
decoded by the route's format (`ingestd.formats`), and rate-limited. Every
message ends the same way: readings, and at most one `Rejected` naming every
problem it had. Nothing a device sends can raise out of `decode_message`:
formats raise only `DecodeError`, and anything else they raise is a bug of
ours, quarantined as such.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import structlog

from ingestd.devices import DeviceState
from ingestd.errors import DecodeError
from ingestd.events import NS, Reading, Rejected
from ingestd.formats.base import DecodeContext, RouteMatch
from ingestd.routes import RouteTable

log = structlog.get_logger("ingestd.decode")


def decode_message(
    table: RouteTable,
    ctx: DecodeContext,
    topic: str,
    payload: bytes,
    received_ns: int,
    readings: list[Reading],
    rejected: list[Rejected],
    retained: bool = False,
    read_before: bool = False,
) -> None:
    """Decode one message, appending to `readings` and `rejected`.

    `received_ns` is the receive time (Unix ns), unique per message: readings
    without a device time are stamped with it. `retained`: the broker sent this
    message because we subscribed (MQTT 3.3.1.3), not because it was just
    published; the route's `retained` option says whether it counts.
    `read_before`: the broker sent it again (DUP) and this process read that
    very message already, or committed it before a restart (the source knows,
    for formats that ask: `Format.tells_redeliveries`). `ctx`: the device
    state the format reads and changes (`ingestd.devices`).
    """
    state = ctx.state
    limit = table.limits.max_payload_bytes
    if len(payload) > limit:
        # Before anything else: no route, bad topic or good, nothing over the
        # limit is kept whole.
        rejected.append(too_large(topic, payload, len(payload), limit, received_ns))
        return
    match = table.match(topic)
    if match is None or not match.sensor:
        why, kind = (
            ("no route matches this topic", "no_route")
            if match is None
            else ("topic gives an empty sensor id", "bad_topic")
        )
        rejected.append(Rejected(topic, payload, why, received_ns / NS, kind))
        return
    opts = match.options
    if retained and opts.retained == "ignore":
        # Sent again at every (re)subscribe, stamped "now" it would look like a
        # fresh reading from a sensor that may be long dead.
        state.counts.retained_ignored += 1
        return
    if opts.expect_within and not retained:
        _heard(state, match, received_ns)
    before = len(readings)
    try:
        ctx.retained = retained
        ctx.read_before = read_before
        match.fmt.decode(ctx, match, topic, payload, received_ns, readings, rejected)
    except Exception as exc:
        del readings[before:]
        rejected.append(_failed(match, topic, payload, received_ns, exc))
        return
    state.counts.decoded += len(readings) - before
    if retained:
        # Only a device time says when a retained value was measured; the receive
        # time would invent a new reading at every subscribe.
        timed = [r for r in readings[before:] if r.ts_ns != received_ns]
        state.counts.retained_untimed += len(readings) - before - len(timed)
        readings[before:] = timed
    if opts.rate_limit and len(readings) > before:
        _rate_limit(state, match, topic, payload, received_ns, readings, before, rejected)


def _heard(state: DeviceState, match: RouteMatch, received_ns: int) -> None:
    """A message on a route with expect_within: when its route and sensor were heard."""
    state.route_seen[match.route] = received_ns
    seen = (match.route, match.sensor)
    if seen not in state.sensor_seen:
        state.expect_changed[match.sensor] = match.options.expect_within
    state.sensor_seen[seen] = received_ns


def _failed(
    match: RouteMatch, topic: str, payload: bytes, received_ns: int, exc: Exception
) -> Rejected:
    """The quarantine record of a message its format could not read: the
    device's fault (DecodeError, its reason), or a bug of ours, quarantined
    rather than let it stop the daemon (and stop it again at every redelivery)."""
    if isinstance(exc, DecodeError):
        return Rejected(topic, payload, str(exc), received_ns / NS)
    log.error(
        "decoder error; message quarantined (please report this as a bug)",
        topic=topic,
        format=match.fmt.name,
        error=repr(exc),
    )
    return Rejected(
        topic,
        payload,
        f"internal error: decoder failed (a bug in ingestd): {exc!r}",
        received_ns / NS,
        "internal",
    )


def _rate_limit(
    state: DeviceState,
    match: RouteMatch,
    topic: str,
    payload: bytes,
    received_ns: int,
    readings: list[Reading],
    before: int,
    rejected: list[Rejected],
) -> None:
    """The route's rate limit on one message's readings; the rest dropped or
    quarantined (`rate_policy`), and counted either way."""
    opts = match.options
    n = len(readings)
    over = state.rate.keep(match.route, opts.rate_limit, opts.rate_burst, readings, before)
    if not over:
        return
    excess = n - len(readings)
    if opts.rate_policy == "quarantine":
        state.counts.rate_quarantined += excess
        rejected.append(
            Rejected(
                topic,
                payload,
                f"rate limit: {excess} reading(s) over {opts.rate_limit:g}/s "
                f"(burst {opts.rate_burst:g}) from {', '.join(over)}",
                received_ns / NS,
                "rate_limited",
            )
        )
    else:
        state.counts.rate_dropped += excess


def too_large(
    topic: str, payload: bytes, size: int, limit: int, received_ns: int, *, skipped: bool = False
) -> Rejected:
    """The quarantine record of a payload of `size` bytes over `limit`: its first
    1 KiB (`payload` may be just that). `skipped`: the packet was over the
    maximum packet size and read past without being buffered (`ingestd.mqtt.link`)."""
    how = "; skipped while reading, never held whole" if skipped else ""
    return Rejected(
        topic,
        payload[:1024],
        f"payload is {size:,} bytes, over the limit of {limit:,} "
        f"(input.max_payload_bytes; first 1 KiB kept{how})",
        received_ns / NS,
        "too_large",
    )


def decode_all(
    table: RouteTable,
    state: DeviceState,
    deliveries: Iterable[tuple[str, bytes, int]],
    retained: Iterable[tuple[str, bytes, int]] = (),
    retained_at: Collection[int] = (),
    read_before: Collection[int] = (),
) -> tuple[list[Reading], list[Rejected]]:
    """Decode a chunk of (topic, payload, received_ns) deliveries, in their
    order, and then `retained`: deliveries the broker flagged as retained
    (see `decode_message`). `retained_at` and `read_before`: the positions in
    `deliveries` the broker flagged retained, and those it sent again that
    were read already. The source marks retained ones in place: a
    description re-sent at subscribe must be read before the values that
    arrived after it."""
    readings: list[Reading] = []
    rejected: list[Rejected] = []
    ctx = DecodeContext(state, table.limits)
    if retained_at or read_before:
        for i, (topic, payload, received_ns) in enumerate(deliveries):
            decode_message(
                table,
                ctx,
                topic,
                payload,
                received_ns,
                readings,
                rejected,
                retained=i in retained_at,
                read_before=i in read_before,
            )
        return _retained(table, ctx, retained, readings, rejected)
    for topic, payload, received_ns in deliveries:
        decode_message(table, ctx, topic, payload, received_ns, readings, rejected)
    return _retained(table, ctx, retained, readings, rejected)


def _retained(
    table: RouteTable,
    ctx: DecodeContext,
    retained: Iterable[tuple[str, bytes, int]],
    readings: list[Reading],
    rejected: list[Rejected],
) -> tuple[list[Reading], list[Rejected]]:
    for topic, payload, received_ns in retained:
        decode_message(table, ctx, topic, payload, received_ns, readings, rejected, retained=True)
    return readings, rejected
