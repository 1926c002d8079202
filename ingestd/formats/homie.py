"""The homie format: devices following the Homie convention, version 5 (and 4).

A device describes itself in a retained JSON document,
`homie/5/<device>/$description`: its nodes, each node's properties, and each
property's datatype and unit. Values arrive one per topic,
`homie/5/<device>/<node>/<property>`, as text to be read by that datatype.
`homie/5/<device>/$state` says whether the device is init, ready,
disconnected, sleeping or lost.

Stateful, like the convention: the descriptions and states seen so far are
kept in the device state (`ingestd.devices`, kept across a reload). A
value whose device has not described itself, or whose property its description lacks, is
quarantined with that reason, never guessed; a later description applies to
later values. Integer and float properties are stored, booleans as 1/0; other
datatypes (string, enum, color, datetime, duration, json) are not numbers:
counted (`DecodeCounts.non_numeric`) and not stored. Values carry no time: a
retained value re-sent at subscribe is not a new reading and is not read at
all (counted with the retained messages ignored); the route's `retained` is
"store" for homie so that the retained descriptions and states are read.

Homie 4 (`homie/<device>/...`, no version level) describes each property in
topics of its own, `<node>/<property>/$datatype` and `$unit`; a value whose
property has no `$datatype` yet is quarantined with that reason. A route
`homie/#` takes both conventions.

Memory, and ids nobody described: a description is expensive to lose (it is
retained, re-sent only at subscribe), so only a description (Homie 5
`$description`, Homie 4 `$datatype`/`$unit`) earns a device a place among the
descriptions, the 65,536 most recently used (~0.35 KB each plus ~0.25 KB per
property; a description is at most `max_payload_bytes`). The `$state` of a
device that has not described itself is kept apart, in its own cache of the
65,536 most recent (~0.1 KB each), and a value from an unknown id is
quarantined without keeping anything: a flood of `$state` or values from
junk ids never evicts a described device.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from ingestd.errors import DecodeError
from ingestd.events import Reading, Rejected
from ingestd.formats.base import Format
from ingestd.formats.common import json_type, parse_json
from ingestd.recent import RecentCache, kept_in

if TYPE_CHECKING:
    from ingestd.devices import DeviceState
    from ingestd.formats.base import DecodeContext, RouteMatch

log = structlog.get_logger("ingestd.formats.homie")

STATES = frozenset({"init", "ready", "disconnected", "sleeping", "lost"})
STATES_V4 = STATES | {"alert"}
NUMERIC = frozenset({"integer", "float", "boolean"})
DATATYPES = NUMERIC | {"string", "enum", "color", "datetime", "duration", "json"}
DATATYPES_V4 = DATATYPES - {"json"}
_DESCRIPTIONS_KEPT = 65536  # described devices
_STATES_KEPT = 65536  # $state of devices not described
_NAMES_KEPT = 65536  # (sensor, metric) per value topic


@dataclass(slots=True)
class Device:
    # (node, property) -> (datatype, unit)
    properties: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    version: int | None = None
    described: bool = False
    state: str = ""
    homie4: bool = False  # described by Homie 4 $datatype / $unit topics


def _devices(state: DeviceState) -> RecentCache[str, Device]:
    """Devices that described themselves, by id."""
    devices: RecentCache[str, Device] = kept_in(state.format_state, "homie", _DESCRIPTIONS_KEPT)
    return devices


def _states(state: DeviceState) -> RecentCache[str, str]:
    """The last `$state` of devices that have not described themselves."""
    states: RecentCache[str, str] = kept_in(state.format_state, "homie_states", _STATES_KEPT)
    return states


def _device(state: DeviceState, device_id: str) -> Device:
    """The device, given a place among the described (only a description does that)."""
    devices = _devices(state)
    found = devices.recent(device_id)
    if found is None:
        found = devices[device_id] = Device(state=_states(state).pop(device_id, ""))
    return found


def device_state(state: DeviceState, device_id: str) -> Device | None:
    """What ingestd knows of a described device (for `explain` and tests)."""
    return _devices(state).recent(device_id)


def decode(
    ctx: DecodeContext,
    match: RouteMatch,
    topic: str,
    payload: bytes,
    received_ns: int,
    readings: list[Reading],
    rejected: list[Rejected],
) -> None:
    parts = topic.split("/")
    try:
        at = next(i for i in range(len(parts) - 1) if parts[i] == "homie")
    except StopIteration:
        raise DecodeError("not a Homie topic (expected .../homie/5/<device>/...)") from None
    if parts[at + 1] != "5":
        _decode_v4(ctx, match, topic, payload, received_ns, readings, parts[at + 1 :])
        return
    rest = parts[at + 2 :]
    if len(rest) < 2 or not rest[0]:
        raise DecodeError("not a Homie 5 device topic (expected homie/5/<device>/...)")
    device_id, level = rest[0], rest[1]
    if level == "$description" and len(rest) == 2:
        _describe(ctx.state, device_id, payload)
        return
    if level == "$state" and len(rest) == 2:
        _state(ctx.state, match, device_id, payload)
        return
    if level.startswith("$") or len(rest) != 3 or rest[2].startswith("$"):
        return  # other device attributes, /set commands, $target: not readings
    node, prop = rest[1], rest[2]
    _value_reading(ctx, match, topic, payload, received_ns, readings, device_id, node, prop)


def _decode_v4(
    ctx: DecodeContext,
    match: RouteMatch,
    topic: str,
    payload: bytes,
    received_ns: int,
    readings: list[Reading],
    rest: list[str],
) -> None:
    """Homie 4: `homie/<device>/...`, each attribute its own retained topic:
    a property's `$datatype` and `$unit` at `<node>/<property>/$datatype` and
    `/$unit`, its value at `<node>/<property>`, the device's `$state`."""
    state = ctx.state
    if len(rest) < 2 or not rest[0] or rest[0].startswith("$"):
        raise DecodeError("not a Homie device topic (expected homie/<device>/...)")
    device_id = rest[0]
    if rest[1] == "$state" and len(rest) == 2:
        _state(state, match, device_id, payload, STATES_V4)
        return
    if len(rest) == 4 and rest[3] in ("$datatype", "$unit") and not rest[1].startswith("$"):
        device = _device(state, device_id)
        device.homie4 = True
        key = (rest[1], rest[2])
        text = payload.decode("utf-8", "replace").strip()
        datatype, unit = device.properties.get(key, ("", ""))
        if rest[3] == "$datatype":
            if text not in DATATYPES_V4:
                raise DecodeError(
                    f"property {rest[1]}/{rest[2]} has $datatype {text[:32]!r} "
                    f"(Homie 4 knows {', '.join(sorted(DATATYPES_V4))})"
                )
            datatype = text
        else:
            unit = text
        device.properties[key] = (datatype, unit)
        return
    if len(rest) != 3 or rest[1].startswith("$") or rest[2].startswith("$"):
        return  # $homie, $nodes, $properties, $name, /set: not readings
    if ctx.retained:
        state.counts.retained_ignored += 1  # as for Homie 5: no time of its own
        return
    node, prop = rest[1], rest[2]
    known = device_state(state, device_id)
    spec = known.properties.get((node, prop)) if known is not None and known.homie4 else None
    if spec is None or not spec[0]:
        raise DecodeError(
            f"property {node}/{prop} of device {device_id!r} has no $datatype (Homie 4): a "
            "value is not stored without it (the route must cover its $datatype topic too)"
        )
    _store_value(state, match, topic, payload, received_ns, readings, device_id, node, prop, spec)


def _value_reading(
    ctx: DecodeContext,
    match: RouteMatch,
    topic: str,
    payload: bytes,
    received_ns: int,
    readings: list[Reading],
    device_id: str,
    node: str,
    prop: str,
) -> None:
    state = ctx.state
    if ctx.retained:
        # The broker re-sends the last value at every subscribe, in no set order
        # with the description: it has no time of its own and is not a new
        # reading. Counted (as a retained message not decoded), never stored,
        # never quarantined.
        state.counts.retained_ignored += 1
        return
    device = device_state(state, device_id)
    if device is None or not device.described:
        raise DecodeError(
            f"device {device_id!r} has not sent its $description: a value is not stored "
            "without its datatype (the route must cover homie/5/+/$description too)"
        )
    spec = device.properties.get((node, prop))
    if spec is None:
        raise DecodeError(
            f"property {node}/{prop} is not in device {device_id!r}'s $description "
            f"(version {device.version})"
        )
    _store_value(state, match, topic, payload, received_ns, readings, device_id, node, prop, spec)


def _store_value(
    state: DeviceState,
    match: RouteMatch,
    topic: str,
    payload: bytes,
    received_ns: int,
    readings: list[Reading],
    device_id: str,
    node: str,
    prop: str,
    spec: tuple[str, str],
) -> None:
    """A value read by its property's (datatype, unit)."""
    datatype, unit = spec
    if datatype not in NUMERIC:
        state.counts.non_numeric += 1
        return
    value = _value(datatype, payload)
    names = _names(state, match, topic, device_id, node, prop)
    readings.append(Reading(names[0], names[1], received_ns, value, topic, match.tags, unit))


def _names(
    state: DeviceState, match: RouteMatch, topic: str, device_id: str, node: str, prop: str
) -> tuple[str, str]:
    """(sensor, metric) of a value topic, formatted once per topic and templates
    (a reload may change the templates; the cache goes on with the new table)."""
    cache: RecentCache[tuple[str, str, str], tuple[str, str]] = kept_in(
        state.format_state, "homie_names", _NAMES_KEPT
    )
    key = (topic, match.sensor, match.metric_template)
    found = cache.recent(key)
    if found is None:
        names = {**match.values, "device": device_id, "node": node, "property": prop}
        found = cache[key] = (
            match.sensor.format_map(names),
            match.metric_template.format_map(names),
        )
    return found


def _value(datatype: str, payload: bytes) -> float:
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise DecodeError("payload is not valid UTF-8") from None
    if datatype == "boolean":
        if text not in ("true", "false"):
            raise DecodeError(f"boolean property: {text[:32]!r} is not true or false")
        return 1.0 if text == "true" else 0.0
    try:
        value = int(text) if datatype == "integer" else float(text)
    except ValueError:
        raise DecodeError(f"{datatype} property: {text[:32]!r} is not a {datatype}") from None
    number = float(value)
    if not math.isfinite(number):
        raise DecodeError(f"{datatype} property: {text[:32]!r} is not a finite number")
    return number


def _describe(state: DeviceState, device_id: str, payload: bytes) -> None:
    if not payload:
        # An empty retained message removes the device (Homie 5: deletion).
        _devices(state).pop(device_id, None)
        _states(state).pop(device_id, None)
        return
    doc: Any = parse_json(payload)
    if type(doc) is not dict:
        raise DecodeError(f"$description is not a JSON object (got {json_type(doc)})")
    nodes = doc.get("nodes", {})
    if type(nodes) is not dict:
        raise DecodeError(f"$description: 'nodes' is not an object (got {json_type(nodes)})")
    properties: dict[tuple[str, str], tuple[str, str]] = {}
    for node_id, node in nodes.items():
        props = node.get("properties", {}) if type(node) is dict else None
        if type(props) is not dict:
            raise DecodeError(f"$description: node {node_id!r} has no 'properties' object")
        for prop_id, spec in props.items():
            datatype = spec.get("datatype") if type(spec) is dict else None
            if datatype not in DATATYPES:
                raise DecodeError(
                    f"$description: property {node_id}/{prop_id} has datatype {datatype!r} "
                    f"(Homie 5 knows {', '.join(sorted(DATATYPES))})"
                )
            unit = spec.get("unit", "")
            properties[(node_id, prop_id)] = (datatype, unit if type(unit) is str else "")
    device = _device(state, device_id)
    version = doc.get("version")
    device.properties = properties
    device.version = version if type(version) is int else None
    device.described = True


def _state(
    state: DeviceState,
    match: RouteMatch,
    device_id: str,
    payload: bytes,
    states: frozenset[str] = STATES,
) -> None:
    text = payload.decode("utf-8", "replace").strip()
    if text not in states:
        version = 4 if states is STATES_V4 else 5
        raise DecodeError(
            f"$state {text[:32]!r} is not one of {', '.join(sorted(states))} (Homie {version})"
        )
    # A device not described keeps its state apart: a $state alone must not
    # take (and evict) a description's place.
    device = device_state(state, device_id)
    if device is not None:
        was = device.state
        device.state = text
    else:
        undescribed = _states(state)
        was = undescribed.recent(device_id) or ""
        if was != text:
            undescribed[device_id] = text
    if was != text:
        state.device_log.info(
            log, "homie device state", device=device_id, state=text, was=was or None
        )
        names = collections.defaultdict(str, {**match.values, "device": device_id})
        state.states_changed[match.sensor.format_map(names)] = text


def describe_state(state: DeviceState, topic: str) -> list[str]:
    """What ingestd knows of the topic's device, for `explain`."""
    parts = topic.split("/")
    at = next((i for i in range(len(parts) - 1) if parts[i] == "homie"), None)
    if at is None:
        return []
    v5 = parts[at + 1] == "5"
    if v5 and len(parts) < at + 3:
        return []
    device_id = parts[at + 2] if v5 else parts[at + 1]
    device = device_state(state, device_id)
    if not v5:
        if device is None or not device.homie4:
            return [f"device {device_id!r}: no $datatype seen (values would be quarantined)"]
        lines = [f"device {device_id!r} (Homie 4): state {device.state or '?'}"]
        for (node, prop), (datatype, unit) in sorted(device.properties.items()):
            lines.append(
                f"{node}/{prop}: {datatype or '(no $datatype yet)'}"
                + (f" [{unit}]" if unit else "")
            )
        return lines
    if device is None or not device.described:
        return [f"device {device_id!r}: no $description seen (values would be quarantined)"]
    lines = [f"device {device_id!r}: version {device.version}, state {device.state or '?'}"]
    for (node, prop), (datatype, unit) in sorted(device.properties.items()):
        lines.append(f"{node}/{prop}: {datatype}" + (f" [{unit}]" if unit else ""))
    return lines


def state_topics(subscription: str) -> list[str]:
    """The filters of the topics devices describe themselves in, under the
    route's filter: Homie 5's `$description` and `$state`, Homie 4's `$state`,
    `$datatype` and `$unit` (the source keeps those the route's filter covers)."""
    levels = subscription.split("/")
    at = levels.index("homie") if "homie" in levels else 0
    root = "/".join([*levels[:at], "homie"])
    return [
        f"{root}/5/+/$description",
        f"{root}/5/+/$state",
        f"{root}/+/$state",
        f"{root}/+/+/+/$datatype",
        f"{root}/+/+/+/$unit",
    ]


FORMAT = Format(
    name="homie",
    summary="Homie 5 devices: $description gives datatypes and units, one value per topic",
    decode=decode,
    template_fields=frozenset({"device", "node", "property"}),
    metric_from="payload",
    default_metric="{node}.{property}",
    sensor_fields=frozenset({"device", "node", "property"}),
    default_sensor="{device}",
    default_retained="store",
    metric_requires=("property",),
    describe_state=describe_state,
    state_topics=state_topics,
)
