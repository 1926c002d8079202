"""Sparkplug edge nodes as ingestd follows them (`ingestd.formats.sparkplug`):
what each BIRTH declared (aliases, datatypes, units), the sequence, bdSeq and
whether it is born; kept in the pipeline's device state, by recency, born
nodes apart from ids only heard from; saved with the chunk that changed them
and read back at start (`save_state` / `load_state`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from ingestd.recent import RecentCache, kept_in

if TYPE_CHECKING:
    from ingestd.devices import DeviceState

log = structlog.get_logger("ingestd.formats.sparkplug")

NODES_KEPT = 65536
_pack = msgspec.msgpack.encode
_unpack = msgspec.msgpack.decode


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


def nodes(state: DeviceState, kind: str = "sparkplug") -> RecentCache[tuple[str, str], Node]:
    """Nodes whose NBIRTH ingestd read ("sparkplug"), or ids it has only heard
    DATA or a DEATH from ("sparkplug_strangers"): each bounded by recency, so
    junk from new ids never takes a born node's place."""
    nodes: RecentCache[tuple[str, str], Node] = kept_in(state.format_state, kind, NODES_KEPT)
    return nodes


def node_state(state: DeviceState, group: str, edge_node: str) -> Node | None:
    """What ingestd knows of an edge node (for `explain` and tests)."""
    key = (group, edge_node)
    return nodes(state).get(key) or nodes(state, "sparkplug_strangers").get(key)


def node_for(state: DeviceState, key: tuple[str, str], birth: bool) -> Node:
    """The node; an NBIRTH (`birth`) gives it a place among the born."""
    found = nodes(state).recent(key)
    if found is not None:
        return found
    strangers = nodes(state, "sparkplug_strangers")
    if birth:
        found = strangers.pop(key, None) or Node()
        nodes(state)[key] = found
        return found
    found = strangers.recent(key)
    if found is None:
        found = strangers[key] = Node()
    return found


def changed(state: DeviceState, key: tuple[str, str], described: bool = False) -> None:
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
    born = nodes(state)
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
    born = nodes(state)
    for device, position, description in reversed(rows[:NODES_KEPT]):
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
