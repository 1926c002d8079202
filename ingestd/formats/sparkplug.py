"""The sparkplug format: Eclipse Sparkplug B 3.0 edge nodes and devices.

Topics are `spBv1.0/<group>/<type>/<edge_node>[/<device>]`; payloads are
protobuf (`sparkplug_pb`). What a DATA message means depends on what came
before it, so the state is kept per edge node, as the specification's host
application keeps it:

- NBIRTH declares the node's metrics (name, alias, datatype, properties: the
  unit is the `engUnit` property) and starts its sequence at 0; its `bdSeq`
  metric ties it to the NDEATH that will end it. DBIRTH does the same for a
  device of the node. BIRTH values are readings too.
- NDATA / DDATA may name metrics by alias only; they are resolved with the
  table their BIRTH gave. The sequence number (0-255, shared by the node and
  its devices) must follow on: any other number is a gap, however far it
  jumps, except a redelivery (below).
- A gap in the sequence, DATA from a node (or device) whose BIRTH ingestd has
  not seen (it started after the BIRTH, say), or an alias no BIRTH declared
  make the node's state unknown: the message is quarantined with that reason,
  never guessed, and a rebirth is requested (NCMD `Node Control/Rebirth`, at
  most once per `rebirth_interval` seconds per node, and at most
  `rebirth_max_per_second` in all, so junk from new node ids cannot make
  ingestd publish at their rate). Everything after the new NBIRTH is stored
  again.
- Redeliveries. After a reconnect the broker sends again, with the DUP flag
  and their packet ids, the messages ingestd had not acknowledged. One this
  process read already (the source tells, by packet id and content:
  `tells_redeliveries`) is skipped whatever its number or time: its
  readings are on their way to the store, and reading it again after a
  later BIRTH would resolve it with aliases that were never its own
  (counted as `redelivered` in `DecodeCounts.skipped`). One it never read
  follows on like any other. After a restart the node's state comes from
  the store as of the last commit (`save_state` / `load_state`), and the
  source counts as read the redeliveries that were committed before (the
  store keeps the packet ids and CRCs of the last messages committed).
  A device that publishes its last message again (a lost PUBACK) is read
  again; its readings are duplicates.
- NDEATH (with the BIRTH's bdSeq; an older one is ignored) marks the node and
  its devices offline, DDEATH the device; a BIRTH marks them online. The state
  is stored per sensor (`ingestd sensors`).

Mapping: sensor `{group}/{source}` (`source`: the edge node, or edge node /
device), metric `{name}` (the metric's name), unit from `engUnit`, time the
metric's timestamp, else the payload's, else the receive time. Integer,
float, double and boolean metrics are stored (booleans as 1/0), historical
ones too; transient and null values, strings, text, UUIDs, date-times, bytes,
files, datasets, templates, property sets and arrays are not numbers to
store: counted per kind (`DecodeCounts.skipped`) and not stored.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from google.protobuf.message import DecodeError as ProtobufDecodeError
from pydantic import Field

from ingestd.errors import DecodeError
from ingestd.events import Reading, Rejected
from ingestd.formats.base import Format, FormatOptions
from ingestd.formats.sparkplug_pb import BY_NAME, DATATYPES, Payload
from ingestd.recent import RecentCache, kept_in

if TYPE_CHECKING:
    from ingestd.devices import DeviceState
    from ingestd.formats.base import DecodeContext, RouteMatch

log = structlog.get_logger("ingestd.formats.sparkplug")

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"
_NODES_KEPT = 65536
_SIGNED_ANY = {BY_NAME["Int8"], BY_NAME["Int16"], BY_NAME["Int32"], BY_NAME["Int64"]}
_UINT64 = BY_NAME["UInt64"]
_FLOAT, _DOUBLE, _BOOLEAN = BY_NAME["Float"], BY_NAME["Double"], BY_NAME["Boolean"]
# Not numbers to store, by what they are (the key counted in DecodeCounts.skipped).
_SKIPPED = {
    BY_NAME["String"]: "string",
    BY_NAME["Text"]: "string",
    BY_NAME["UUID"]: "string",
    BY_NAME["DateTime"]: "datetime",
    BY_NAME["Bytes"]: "bytes",
    BY_NAME["File"]: "bytes",
    BY_NAME["DataSet"]: "dataset",
    BY_NAME["Template"]: "template",
    BY_NAME["PropertySet"]: "propertyset",
    BY_NAME["PropertySetList"]: "propertyset",
}
_NS_PER_MS = 1_000_000
_MAX_MS = (1 << 63) // _NS_PER_MS


class SparkplugOptions(FormatOptions):
    # Seconds between two rebirth requests to one edge node.
    rebirth_interval: float = Field(10.0, gt=0)
    # Whether to ask for rebirths at all (false: quarantine and wait for the
    # node's next BIRTH).
    request_rebirth: bool = True
    # Rebirth requests at most per second, all nodes together (the excess is
    # counted and asked for again when the node's data goes on arriving).
    rebirth_max_per_second: float = Field(10.0, gt=0)


@dataclass(slots=True)
class Metric:
    name: str
    datatype: int
    unit: str


@dataclass(slots=True)
class Scope:
    """A node or one of its devices: what its BIRTH declared."""

    born: bool = False
    by_alias: dict[int, Metric] = field(default_factory=dict)
    by_name: dict[str, Metric] = field(default_factory=dict)
    online: bool = False


@dataclass(slots=True)
class Node:
    scope: Scope = field(default_factory=Scope)
    devices: dict[str, Scope] = field(default_factory=dict)
    seq: int = -1  # last sequence number followed
    count: int = 0  # messages followed since the NBIRTH, the NBIRTH included (0: never born)
    bd_seq: int | None = None
    rebirth_at: float = -math.inf  # monotonic time of the last rebirth request
    rebirths: int = 0
    # Sensor names used for the node and its devices (to mark them offline).
    sensors: dict[str, str] = field(default_factory=dict)  # device ("" node) -> sensor


def _nodes(state: DeviceState, kind: str = "sparkplug") -> RecentCache[tuple[str, str], Node]:
    """Nodes whose NBIRTH ingestd read ("sparkplug"), or ids it has only heard
    DATA or a DEATH from ("sparkplug_strangers"): each bounded by recency, so
    junk from new ids never takes a born node's place."""
    nodes: RecentCache[tuple[str, str], Node] = kept_in(state.format_state, kind, _NODES_KEPT)
    return nodes


def node_state(state: DeviceState, group: str, edge_node: str) -> Node | None:
    """What ingestd knows of an edge node (for `explain` and tests)."""
    key = (group, edge_node)
    return _nodes(state).get(key) or _nodes(state, "sparkplug_strangers").get(key)


def _node(state: DeviceState, key: tuple[str, str], birth: bool) -> Node:
    """The node; an NBIRTH (`birth`) gives it a place among the born."""
    found = _nodes(state).recent(key)
    if found is not None:
        return found
    strangers = _nodes(state, "sparkplug_strangers")
    if birth:
        found = strangers.pop(key, None) or Node()
        _nodes(state)[key] = found
        return found
    found = strangers.recent(key)
    if found is None:
        found = strangers[key] = Node()
    return found


def rebirth_request(group: str, edge_node: str, now_ms: int) -> tuple[str, bytes]:
    """The NCMD that asks an edge node to publish its BIRTHs again."""
    payload = Payload(timestamp=now_ms)
    payload.metrics.add(name=REBIRTH, datatype=_BOOLEAN, timestamp=now_ms, boolean_value=True)
    return f"{NAMESPACE}/{group}/NCMD/{edge_node}", payload.SerializeToString()


def parse_topic(topic: str) -> tuple[str, str, str, str] | None:
    """(group, type, edge node, device or "") of a Sparkplug B topic, else None."""
    parts = topic.split("/")
    try:
        at = parts.index(NAMESPACE)
    except ValueError:
        return None
    rest = parts[at + 1 :]
    if len(rest) == 4:
        return rest[0], rest[1], rest[2], rest[3]
    if len(rest) == 3:
        return rest[0], rest[1], rest[2], ""
    return None


def decode(
    ctx: DecodeContext,
    match: RouteMatch,
    topic: str,
    payload: bytes,
    received_ns: int,
    readings: list[Reading],
    rejected: list[Rejected],
) -> None:
    parsed = parse_topic(topic)
    if parsed is None:
        if "/STATE/" in f"/{topic}/" or topic.endswith("/STATE"):
            return  # a host application's STATE (ours or another's): not data
        raise DecodeError(
            "not a Sparkplug B topic (expected spBv1.0/<group>/<type>/<edge_node>[/<device>])"
        )
    group, kind, edge_node, device = parsed
    if group == "STATE":
        return
    if kind in ("NCMD", "DCMD"):
        return  # commands, ours or another host's: not data
    if kind not in ("NBIRTH", "NDEATH", "NDATA", "DBIRTH", "DDEATH", "DDATA"):
        raise DecodeError(f"unknown Sparkplug message type {kind!r}")
    if (kind[0] == "D") != bool(device):
        raise DecodeError(f"{kind} topic {'without' if device else 'with'} a device id")
    state = ctx.state
    if ctx.read_before:
        # Sent again, read already (or committed before a restart) with the
        # state it had then: its readings are on their way, its effect is in
        # the node's state. Whatever its number, time or kind: not read again.
        _skipped(state, "redelivered")
        return
    try:
        message = Payload.FromString(payload)
    except (ProtobufDecodeError, RuntimeError, ValueError) as exc:
        raise DecodeError(f"not a Sparkplug B protobuf payload: {exc}") from None
    key = (group, edge_node)
    node = _node(state, key, kind == "NBIRTH")
    params: SparkplugOptions = match.params
    names = {**match.values, "group": group, "edge_node": edge_node, "device": device}
    names["source"] = f"{edge_node}/{device}" if device else edge_node
    sensor = match.sensor.format_map(names)
    if node.sensors.get(device) != sensor:
        node.sensors[device] = sensor
        _changed(state, key, described=True)
    if kind == "NDEATH":
        if _death(state, node, group, edge_node, message):
            _changed(state, key, described=True)
        return
    if kind == "NBIRTH":
        # Unborn until this BIRTH reads whole: a bad one leaves nothing to resolve with.
        node.devices.clear()
        node.scope = Scope()
        node.scope = _birth(message)
        node.seq = message.seq if message.HasField("seq") else 0
        node.count = 1
        for metric in message.metrics:
            if metric.name == "bdSeq":
                node.bd_seq = _bd_seq(metric)
        state.states_changed[sensor] = "online"
        _changed(state, key, described=True)
        try:
            _values(state, match, topic, message, node.scope, names, sensor, received_ns, readings)
        except _Unresolved as exc:
            raise DecodeError(f"Sparkplug NBIRTH of {group}/{edge_node}: {exc}") from None
        return
    # Every other message follows the node's sequence.
    scope = node.devices.get(device) if device else node.scope
    step = _follow(node, message)
    if step is _NEXT:
        _changed(state, key)
    problem: str | None = step if isinstance(step, str) else None
    known = scope is not None and scope.born
    if problem is None and kind != "DBIRTH" and not known:
        what = f"device {device!r} of node {group}/{edge_node}" if device else "node"
        problem = f"DATA from {what} whose BIRTH ingestd has not seen"
    if problem is None and kind == "DDEATH":
        if scope is not None:
            scope.born = False
            _offline(state, node, device)
            _changed(state, key, described=True)
        return
    if problem is None:
        if kind == "DBIRTH" and (step is _NEXT or not known):
            node.devices.pop(device, None)
            scope = node.devices[device] = _birth(message)
            state.states_changed[sensor] = "online"
            _changed(state, key, described=True)
        assert scope is not None
        try:
            _values(state, match, topic, message, scope, names, sensor, received_ns, readings)
            return
        except _Unresolved as exc:
            problem = str(exc)
    # The node's state is not known: nothing in this message is guessed.
    node.scope.born = False
    _changed(state, key)
    asked = _ask_rebirth(state, node, params, group, edge_node, problem)
    raise DecodeError(
        f"Sparkplug node {group}/{edge_node}: {problem}; "
        + ("rebirth requested" if asked else "waiting for its rebirth")
    )


class _Unresolved(Exception):
    pass


class _Step:
    """How a message stands in its node's sequence (besides a problem, a str)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_NEXT = _Step("next")  # the next number: followed
_AGAIN = _Step("again")  # the last message again (a device's retry): read again


def _follow(node: Node, message: Any) -> _Step | str:
    """Check and advance the node's sequence: a step, or the problem. (A
    redelivery read before never gets here; one never read follows on like
    any other message.)"""
    seq = message.seq if message.HasField("seq") else None
    born = node.scope.born
    if born and (seq is None or seq > 255):
        return f"sequence number {seq} is missing or out of range"
    if born and seq == (node.seq + 1) % 256:
        node.seq = seq
        node.count += 1
        return _NEXT
    if not born or seq is None:
        return "message before the node's NBIRTH (ingestd has not seen its birth)"
    if seq == node.seq:
        return _AGAIN  # the last message again: a device that did not get its PUBACK
    expected = (node.seq + 1) % 256
    missing = (seq - expected) % 256
    return f"sequence gap: expected {expected}, got {seq} ({missing} message(s) missing)"


def _skipped(state: DeviceState, kind: str) -> None:
    skipped = state.counts.skipped
    skipped[kind] = skipped.get(kind, 0) + 1


def _ask_rebirth(
    state: DeviceState,
    node: Node,
    params: SparkplugOptions,
    group: str,
    edge_node: str,
    why: str,
) -> bool:
    if not params.request_rebirth:
        return False
    now = time.monotonic()
    if now - node.rebirth_at < params.rebirth_interval:
        return False
    # All nodes together: a token bucket of one second's worth.
    rate = params.rebirth_max_per_second
    bucket: list[float] = state.format_state.setdefault("sparkplug_rebirths", [rate, now])
    tokens = min(max(rate, 1.0), bucket[0] + (now - bucket[1]) * rate)
    bucket[1] = now
    if tokens < 1:
        bucket[0] = tokens
        state.counts.rebirths_suppressed += 1
        return False
    bucket[0] = tokens - 1
    node.rebirth_at = now
    node.rebirths += 1
    state.counts.rebirth_requests += 1
    state.commands.append(rebirth_request(group, edge_node, int(time.time() * 1000)))
    state.device_log.info(
        log, "sparkplug rebirth requested", node=f"{group}/{edge_node}", reason=why
    )
    return True


def _birth(message: Any) -> Scope:
    scope = Scope(born=True, online=True)
    for m in message.metrics:
        unit = ""
        if m.HasField("properties"):
            props = m.properties
            for key, value in zip(props.keys, props.values, strict=False):
                if key == "engUnit" and value.WhichOneof("value") == "string_value":
                    unit = _text(value.string_value, "an engUnit")
        metric = Metric(_text(m.name, "a metric name"), m.datatype, unit)
        if m.name:
            scope.by_name[m.name] = metric
        if m.HasField("alias"):
            scope.by_alias[m.alias] = metric
    return scope


def _values(
    state: DeviceState,
    match: RouteMatch,
    topic: str,
    message: Any,
    scope: Scope,
    names: dict[str, str],
    sensor: str,
    received_ns: int,
    readings: list[Reading],
) -> None:
    """The message's numeric metrics as readings; raises _Unresolved (before
    appending anything) if a metric cannot be named."""
    default_ns = received_ns
    if message.HasField("timestamp"):
        default_ns = _time_ns(message.timestamp)
    out: list[Reading] = []
    skipped = state.counts.skipped
    template = match.metric_template
    for m in message.metrics:
        if m.name:
            declared = scope.by_name.get(m.name)
        elif m.HasField("alias"):
            declared = scope.by_alias.get(m.alias)
            if declared is None:
                raise _Unresolved(f"alias {m.alias} was not declared by the BIRTH")
        else:
            raise _Unresolved("a metric has neither a name nor an alias")
        name = _text(m.name, "a metric name") or (declared.name if declared else "")
        datatype = m.datatype or (declared.datatype if declared else 0)
        unit = declared.unit if declared else ""
        if m.is_transient:
            skipped["transient"] = skipped.get("transient", 0) + 1
            continue
        if m.is_null or m.WhichOneof("value") is None:
            skipped["null"] = skipped.get("null", 0) + 1
            continue
        if name == "bdSeq" or name.startswith(("Node Control/", "Device Control/")):
            continue  # the protocol's own metrics, not measurements
        value = _number(m, datatype)
        if value is None:
            which = m.WhichOneof("value")
            kind = _SKIPPED.get(datatype, "array" if datatype >= 22 else "unknown")
            if which in ("float_value", "double_value") and datatype not in _SKIPPED:
                kind = "not_finite"
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        ts_ns = _time_ns(m.timestamp) if m.HasField("timestamp") else default_ns
        metric = template.format_map({**names, "name": name}) if template != "{name}" else name
        out.append(Reading(sensor, metric, ts_ns, value, topic, match.tags, unit))
    readings.extend(out)


def _text(value: str | bytes, what: str) -> str:
    """A protobuf string field: proto2 does not check UTF-8, and upb hands
    back bytes where it is not."""
    if type(value) is not str:
        raise DecodeError(f"{what} is not valid UTF-8")
    return value


def _time_ns(ms: int) -> int:
    """Unix ms (uint64 on the wire) as ns; one past what a store can hold is bad input."""
    if ms >= _MAX_MS:
        raise DecodeError(f"timestamp {ms} ms is out of range (after the year 2262)")
    return ms * _NS_PER_MS


def _number(m: Any, datatype: int) -> float | None:
    """The metric's value as a number, None if it is not one to store.

    The datatype (the metric's, else its BIRTH's) says whether the value is a
    measurement and how to sign an integer; the value is read from the field
    the payload actually carries (a protobuf default is never taken for a
    value that was not sent)."""
    if datatype in _SKIPPED or datatype >= 22:
        return None
    which = m.WhichOneof("value")
    if which == "int_value":
        v = m.int_value
        return float(v - (1 << 32) if v >= 1 << 31 and datatype in _SIGNED_ANY else v)
    if which == "long_value":
        v = m.long_value
        return float(v - (1 << 64) if v >= 1 << 63 and datatype in _SIGNED_ANY else v)
    if which == "boolean_value":
        return 1.0 if m.boolean_value else 0.0
    if which == "double_value":
        f = m.double_value
    elif which == "float_value":
        f = m.float_value
    else:
        return None
    if not math.isfinite(f):
        return None  # NaN is how Sparkplug devices often say "no value"
    return float(f)


def _bd_seq(m: Any) -> int | None:
    value = _number(m, m.datatype or _UINT64)
    return None if value is None else int(value)


def _death(state: DeviceState, node: Node, group: str, edge_node: str, message: Any) -> bool:
    """An NDEATH; False if it was an earlier session's, ignored."""
    bd_seq = None
    for m in message.metrics:
        if m.name == "bdSeq":
            bd_seq = _bd_seq(m)
    if node.bd_seq is not None and bd_seq is not None and bd_seq != node.bd_seq:
        # The will of an earlier session, delivered late: this birth still stands.
        state.device_log.info(
            log,
            "sparkplug NDEATH of an earlier session ignored",
            node=f"{group}/{edge_node}",
            bd_seq=bd_seq,
            current=node.bd_seq,
        )
        return False
    node.scope.born = False
    for scope in node.devices.values():
        scope.born = False
    _offline(state, node, "")
    for device in node.devices:
        _offline(state, node, device)
    return True


def _offline(state: DeviceState, node: Node, device: str) -> None:
    sensor = node.sensors.get(device)
    if sensor:
        state.states_changed[sensor] = "offline"


# -- across restarts ---------------------------------------------------------------------

_pack = msgspec.msgpack.encode
_unpack = msgspec.msgpack.decode


def _changed(state: DeviceState, key: tuple[str, str], described: bool = False) -> None:
    """The node's state changed: its position (sequence, born), and with
    `described` what its BIRTHs declared too. The next chunk saves it."""
    dirty: dict[tuple[str, str], bool] = state.format_state.setdefault("sparkplug_dirty", {})
    dirty[key] = described or dirty.get(key, False)
    state.devices_changed = True


def _dump_scope(scope: Scope) -> list[Any]:
    aliased = {id(m) for m in scope.by_alias.values()}
    metrics: list[list[Any]] = [
        [m.name, m.datatype, m.unit, alias] for alias, m in scope.by_alias.items()
    ]
    metrics += [
        [m.name, m.datatype, m.unit, None] for m in scope.by_name.values() if id(m) not in aliased
    ]
    return [scope.born, scope.online, metrics]


def _load_scope(dumped: list[Any]) -> Scope:
    born, online, metrics = dumped
    scope = Scope(born=born, online=online)
    for name, datatype, unit, alias in metrics:
        metric = Metric(name, datatype, unit)
        if name:
            scope.by_name.setdefault(name, metric)
        if alias is not None:
            scope.by_alias[alias] = metric
    return scope


def save_state(state: DeviceState) -> dict[str, tuple[bytes, bytes | None]]:
    """What changed of born nodes since the last call: position (sequence,
    count, bdSeq, born) and, where a BIRTH or DEATH changed it, the
    description (the node's and its devices' alias tables)."""
    dirty: dict[tuple[str, str], bool] | None = state.format_state.pop("sparkplug_dirty", None)
    if not dirty:
        return {}
    born = _nodes(state)
    out: dict[str, tuple[bytes, bytes | None]] = {}
    for key, described in dirty.items():
        node = born.get(key)
        if node is None or not node.count:
            continue  # never born (junk ids are not kept), or forgotten since
        position = _pack([node.seq, node.count, node.bd_seq, node.scope.born])
        description = None
        if described:
            description = _pack(
                [
                    _dump_scope(node.scope),
                    {d: _dump_scope(sc) for d, sc in node.devices.items()},
                    node.sensors,
                ]
            )
        out[f"{key[0]}/{key[1]}"] = (position, description)
    return out


def load_state(state: DeviceState, rows: list[tuple[str, bytes, bytes]]) -> None:
    """Born nodes as the store kept them at the last commit (the most recent
    first; as many as the node cache holds)."""
    born = _nodes(state)
    for device, position, description in reversed(rows[:_NODES_KEPT]):
        group, _, edge_node = device.partition("/")
        try:
            seq, count, bd_seq, node_born = _unpack(position)
            scope, devices, sensors = _unpack(description)
            node = Node(
                scope=_load_scope(scope),
                devices={d: _load_scope(sc) for d, sc in devices.items()},
                seq=seq,
                count=count,
                bd_seq=bd_seq,
                sensors=dict(sensors),
            )
        except Exception as exc:
            log.warning(
                "sparkplug node state not readable; it waits for a rebirth",
                node=device,
                error=str(exc),
            )
            continue
        node.scope.born = bool(node_born)
        born[(group, edge_node)] = node


def describe(datatype: int) -> str:
    return DATATYPES.get(datatype, f"datatype {datatype}")


def describe_state(state: DeviceState, topic: str) -> list[str]:
    """What ingestd knows of the topic's edge node (or device), for `explain`."""
    parsed = parse_topic(topic)
    if parsed is None:
        return []
    group, _kind, edge_node, device = parsed
    node = node_state(state, group, edge_node)
    if node is None:
        return [f"node {group}/{edge_node}: no BIRTH seen (DATA would be quarantined)"]
    scope = node.devices.get(device) if device else node.scope
    what = f"device {device} of node {group}/{edge_node}" if device else f"node {group}/{edge_node}"
    if scope is None or not scope.born:
        return [f"{what}: not born (DATA would be quarantined until its BIRTH)"]
    lines = [f"{what}: born, last seq {node.seq}, bdSeq {node.bd_seq}"]
    for alias, m in sorted(scope.by_alias.items()):
        unit = f" [{m.unit}]" if m.unit else ""
        lines.append(f"alias {alias} = {m.name!r} ({describe(m.datatype)}){unit}")
    named = [m for name, m in scope.by_name.items() if m not in scope.by_alias.values()]
    for m in named:
        lines.append(f"{m.name!r} ({describe(m.datatype)}), no alias")
    return lines


FORMAT = Format(
    name="sparkplug",
    summary="Sparkplug B 3.0 edge nodes and devices: protobuf, metrics named by their BIRTH",
    decode=decode,
    options=SparkplugOptions,
    template_fields=frozenset({"group", "edge_node", "device", "source", "name"}),
    metric_from="payload",
    default_metric="{name}",
    sensor_fields=frozenset({"group", "edge_node", "device", "source"}),
    default_sensor="{group}/{source}",
    metric_requires="name",
    describe_state=describe_state,
    tells_redeliveries=True,
    save_state=save_state,
    load_state=load_state,
    unshareable=(
        "a shared subscription hands each message to one member, and a Sparkplug "
        "node's DATA can only be read in order with its BIRTH and sequence, which the "
        "other members would not see"
    ),
)
