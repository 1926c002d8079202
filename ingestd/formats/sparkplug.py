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

import time
from typing import TYPE_CHECKING, Any

import structlog
from google.protobuf.message import DecodeError as ProtobufDecodeError
from pydantic import Field

from ingestd.errors import DecodeError
from ingestd.events import Reading, Rejected
from ingestd.formats.base import Format, FormatOptions
from ingestd.formats.sparkplug_metrics import Unresolved, bd_seq, birth, values
from ingestd.formats.sparkplug_nodes import (
    Node,
    Scope,
    changed,
    load_state,
    node_for,
    node_state,
    save_state,
)
from ingestd.formats.sparkplug_pb import BY_NAME, DATATYPES, payload_class

if TYPE_CHECKING:
    from ingestd.devices import DeviceState
    from ingestd.formats.base import DecodeContext, RouteMatch

log = structlog.get_logger("ingestd.formats.sparkplug")

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"


class SparkplugOptions(FormatOptions):
    # Seconds between two rebirth requests to one edge node.
    rebirth_interval: float = Field(10.0, gt=0)
    # Whether to ask for rebirths at all (false: quarantine and wait for the
    # node's next BIRTH).
    request_rebirth: bool = True
    # Rebirth requests at most per second, all nodes together (the excess is
    # counted and asked for again when the node's data goes on arriving).
    rebirth_max_per_second: float = Field(10.0, gt=0)


def rebirth_request(group: str, edge_node: str, now_ms: int) -> tuple[str, bytes]:
    """The NCMD that asks an edge node to publish its BIRTHs again."""
    payload = payload_class()(timestamp=now_ms)
    payload.metrics.add(
        name=REBIRTH, datatype=BY_NAME["Boolean"], timestamp=now_ms, boolean_value=True
    )
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
    parsed = _data_topic(topic)
    if parsed is None:
        return  # a host's STATE, or a command: not data
    group, kind, edge_node, device = parsed
    state = ctx.state
    if ctx.read_before:
        # Sent again, read already (or committed before a restart) with the
        # state it had then: its readings are on their way, its effect is in
        # the node's state. Whatever its number, time or kind: not read again.
        _skipped(state, "redelivered")
        return
    try:
        message = payload_class().FromString(payload)
    except (ProtobufDecodeError, RuntimeError, ValueError) as exc:
        raise DecodeError(f"not a Sparkplug B protobuf payload: {exc}") from None
    key = (group, edge_node)
    node = node_for(state, key, kind == "NBIRTH")
    names = {**match.values, "group": group, "edge_node": edge_node, "device": device}
    names["source"] = f"{edge_node}/{device}" if device else edge_node
    sensor = match.sensor.format_map(names)
    if node.sensors.get(device) != sensor:
        node.sensors[device] = sensor
        changed(state, key, described=True)
    if kind == "NDEATH":
        if _death(state, node, group, edge_node, message):
            changed(state, key, described=True)
        return
    if kind == "NBIRTH":
        _node_birth(state, node, key, message, sensor)
        try:
            values(state, match, topic, message, node.scope, names, sensor, received_ns, readings)
        except Unresolved as exc:
            raise DecodeError(f"Sparkplug NBIRTH of {group}/{edge_node}: {exc}") from None
        return
    # Every other message follows the node's sequence.
    problem = _in_sequence(
        state, match, topic, message, node, key, kind, device, names, sensor, received_ns, readings
    )
    if problem is None:
        return
    # The node's state is not known: nothing in this message is guessed.
    node.scope.born = False
    changed(state, key)
    asked = _ask_rebirth(state, node, match.params, group, edge_node, problem)
    raise DecodeError(
        f"Sparkplug node {group}/{edge_node}: {problem}; "
        + ("rebirth requested" if asked else "waiting for its rebirth")
    )


def _data_topic(topic: str) -> tuple[str, str, str, str] | None:
    """(group, kind, edge node, device) of a message that carries data or
    state; None for a host's STATE or a command; DecodeError for anything
    else."""
    parsed = parse_topic(topic)
    if parsed is None:
        if "/STATE/" in f"/{topic}/" or topic.endswith("/STATE"):
            return None  # a host application's STATE (ours or another's): not data
        raise DecodeError(
            "not a Sparkplug B topic (expected spBv1.0/<group>/<type>/<edge_node>[/<device>])"
        )
    group, kind, _edge_node, device = parsed
    if group == "STATE" or kind in ("NCMD", "DCMD"):
        return None  # commands, ours or another host's: not data
    if kind not in ("NBIRTH", "NDEATH", "NDATA", "DBIRTH", "DDEATH", "DDATA"):
        raise DecodeError(f"unknown Sparkplug message type {kind!r}")
    if (kind[0] == "D") != bool(device):
        raise DecodeError(f"{kind} topic {'without' if device else 'with'} a device id")
    return parsed


def _node_birth(
    state: DeviceState, node: Node, key: tuple[str, str], message: Any, sensor: str
) -> None:
    """An NBIRTH: the node's aliases, sequence and bdSeq start again from it.
    Unborn until it reads whole: a bad one leaves nothing to resolve with."""
    node.devices.clear()
    node.scope = Scope()
    node.scope = birth(message)
    node.seq = message.seq if message.HasField("seq") else 0
    node.count = 1
    for metric in message.metrics:
        if metric.name == "bdSeq":
            node.bd_seq = bd_seq(metric)
    state.states_changed[sensor] = "online"
    changed(state, key, described=True)


def _in_sequence(
    state: DeviceState,
    match: RouteMatch,
    topic: str,
    message: Any,
    node: Node,
    key: tuple[str, str],
    kind: str,
    device: str,
    names: dict[str, str],
    sensor: str,
    received_ns: int,
    readings: list[Reading],
) -> str | None:
    """A DATA, DBIRTH or DDEATH, which follows the node's sequence: read with
    the aliases of its BIRTH, or the problem that keeps it from being read."""
    scope = node.devices.get(device) if device else node.scope
    step = _follow(node, message)
    if step is _NEXT:
        changed(state, key)
    if isinstance(step, str):
        return step
    known = scope is not None and scope.born
    if kind != "DBIRTH" and not known:
        what = f"device {device!r} of node {key[0]}/{key[1]}" if device else "node"
        return f"DATA from {what} whose BIRTH ingestd has not seen"
    if kind == "DDEATH":
        if scope is not None:
            scope.born = False
            _offline(state, node, device)
            changed(state, key, described=True)
        return None
    if kind == "DBIRTH" and (step is _NEXT or not known):
        node.devices.pop(device, None)
        scope = node.devices[device] = birth(message)
        state.states_changed[sensor] = "online"
        changed(state, key, described=True)
    assert scope is not None
    try:
        values(state, match, topic, message, scope, names, sensor, received_ns, readings)
    except Unresolved as exc:
        return str(exc)
    return None


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


def _death(state: DeviceState, node: Node, group: str, edge_node: str, message: Any) -> bool:
    """An NDEATH; False if it was an earlier session's, ignored."""
    ended = None  # the bdSeq of the session this DEATH ends
    for m in message.metrics:
        if m.name == "bdSeq":
            ended = bd_seq(m)
    if node.bd_seq is not None and ended is not None and ended != node.bd_seq:
        # The will of an earlier session, delivered late: this birth still stands.
        state.device_log.info(
            log,
            "sparkplug NDEATH of an earlier session ignored",
            node=f"{group}/{edge_node}",
            bd_seq=ended,
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
    metric_requires=("name",),
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
