"""A Sparkplug payload's metrics as readings (`ingestd.formats.sparkplug`):
a BIRTH's declarations, and values resolved by name or alias with the
datatype their BIRTH declared; what is not a number to store is counted by
kind and skipped."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ingestd.errors import DecodeError
from ingestd.events import Reading
from ingestd.formats.sparkplug_nodes import Metric, Scope
from ingestd.formats.sparkplug_pb import BY_NAME

if TYPE_CHECKING:
    from ingestd.devices import DeviceState
    from ingestd.formats.base import RouteMatch

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


class Unresolved(Exception):
    pass


def birth(message: Any) -> Scope:
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


def values(
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
    """The message's numeric metrics as readings; raises Unresolved (before
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
                raise Unresolved(f"alias {m.alias} was not declared by the BIRTH")
        else:
            raise Unresolved("a metric has neither a name nor an alias")
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


def bd_seq(m: Any) -> int | None:
    value = _number(m, m.datatype or _UINT64)
    return None if value is None else int(value)
