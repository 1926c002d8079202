"""`ingestd explain`: what the daemon would do with one message, without a broker.

The same route table, decoders and processor the daemon runs, on a sample
topic and payload: the matching route, the sensor and tags the topic gives,
and the readings (or the reasons for quarantine) that would be stored.
"""

from __future__ import annotations

import time

from ingestd.checks import process
from ingestd.config import ProcessorSettings, Settings, route_table
from ingestd.decode import decode_message
from ingestd.devices import DeviceState
from ingestd.events import NS, Reading, Rejected
from ingestd.formats.base import DecodeContext
from ingestd.metric_rules import MetricRules
from ingestd.printable import printable
from ingestd.routes import RouteTable
from ingestd.tools.report import iso_ns


def outcome(
    table: RouteTable,
    devices: DeviceState,
    processor: ProcessorSettings,
    topic: str,
    payload: bytes,
    received_ns: int,
    rules: MetricRules | None = None,
) -> tuple[list[Reading], list[Rejected]]:
    """What the daemon's decode and processing stages make of one live message
    (with what `devices` learned before): the readings to store and the
    quarantine records. `rules`: the limits and scaling as for the daemon's
    routes (default: `processor`'s alone)."""
    readings: list[Reading] = []
    rejected: list[Rejected] = []
    ctx = DecodeContext(devices, table.limits)
    decode_message(table, ctx, topic, payload, received_ns, readings, rejected)
    return process(readings, processor, received_ns / NS, rejected, rules), rejected


def explain(
    settings: Settings,
    topic: str,
    payload: bytes | None,
    now: float | None = None,
    after: list[tuple[str, bytes]] | None = None,
) -> str:
    """`after`: messages decoded first, as the daemon would have seen them
    (a Sparkplug BIRTH before its DATA, a Homie $description before values)."""
    now = time.time() if now is None else now
    table = route_table(settings)
    rules = MetricRules(settings.processor, settings.routes)
    devices = DeviceState()
    lines = [f"topic:   {topic}"]
    for i, (earlier, body) in enumerate(after or []):
        kept, rejected = outcome(
            table, devices, settings.processor, earlier, body, int(now * NS) - 1000 + i, rules
        )
        told = f"{len(kept)} reading(s)" + (
            f", quarantined: {rejected[0].reason}" if rejected else ""
        )
        lines.append(f"after:   {earlier} ({len(body)} bytes): {told}")
    match = table.match(topic)
    if match is None:
        lines.append(
            'route:   none matches: such a message is quarantined ("no route matches this topic")'
        )
        return _shown(lines)
    route = settings.routes[match.route]
    lines += [
        f"route:   #{match.route + 1} {_quoted(route.topic)} "
        f"(format {route.format}, qos {route.qos})",
        f"format:  {match.fmt.summary}",
        f"sensor:  {_quoted(match.sensor)}",
        f"tags:    {match.tags or '(none)'}",
    ]
    if match.fmt.metric_from == "topic":
        lines.append(f"metric:  {_quoted(match.metric_prefix)}")
    else:
        lines.append(f"metric:  template {_quoted(route.effective_metric)}")
    if match.fmt.describe_state is not None:
        known = match.fmt.describe_state(devices, topic)
        lines.append("state:   " + (known[0] if known else "(none)"))
        lines += [f"         {line}" for line in known[1:]]
    if payload is None:
        return _shown(lines)
    received_ns = int(now * NS)
    kept, rejected = outcome(table, devices, settings.processor, topic, payload, received_ns, rules)
    lines.append(f"payload: {len(payload)} bytes")
    if kept:
        lines.append(f"readings ({len(kept)}):")
        for r in kept:
            unit = f" {r.unit}" if r.unit else ""
            when = "receive time" if r.ts_ns == received_ns else iso_ns(r.ts_ns)
            tags = f"  tags {r.tags}" if r.tags and r.tags != match.tags else ""
            seq = f"  (seq {r.seq}: another reading of this series at this time)" if r.seq else ""
            lines.append(f"  {r.sensor} {r.metric} = {r.value:g}{unit} at {when}{tags}{seq}")
            if rules.active:
                lines.append(f"    {rules.applied(r).describe()}")
    else:
        lines.append("readings: none")
    for rej in rejected:
        lines.append(f"quarantined ({rej.kind}): {rej.reason}")
    for command_topic, _body in devices.commands:
        lines.append(f"would send: {command_topic} (the daemon sends it; explain does not)")
    if devices.counts.rate_dropped:
        lines.append(f"dropped by the rate limit: {devices.counts.rate_dropped}")
    return _shown(lines)


def _quoted(text: str) -> str:
    # Quotes show where the text starts and ends; `printable` (in _shown) makes
    # what is between them visible, once (repr() would escape, then be escaped again).
    return f"'{text}'"


def _shown(lines: list[str]) -> str:
    """The report for a terminal: the topic, sensor, metric, tags and reasons
    come from the sample (a device's text), so each line is escaped."""
    return "\n".join(printable(line) for line in lines)
