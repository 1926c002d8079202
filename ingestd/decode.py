"""Payload decoders: bytes in, readings out, or a DecodeError saying why not.

Pure functions of their input: no I/O, no clock (the receive time is passed in).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec

from ingestd.errors import DecodeError
from ingestd.events import Reading, Rejected
from ingestd.routes import RouteMatch, RouteTable

# Device clocks in seconds: 1970 .. 2286. A larger number is almost always
# milliseconds or microseconds sent where seconds were expected.
_TS_MAX = 1e10
_json_decode = msgspec.json.Decoder().decode
_NUMBER = re.compile(rb"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def parse_timestamp(raw: Any) -> float:
    """Unix seconds (int or float) or an ISO 8601 string; naive times are UTC."""
    if isinstance(raw, bool):
        raise DecodeError(f"timestamp must be a number or an ISO 8601 string, got {raw!r}")
    if isinstance(raw, int | float):
        ts = float(raw)
    elif isinstance(raw, str):
        try:
            dt = datetime.fromisoformat(raw)
        except ValueError:
            raise DecodeError(f"timestamp {raw[:64]!r} is not ISO 8601") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        ts = dt.timestamp()
    else:
        raise DecodeError(
            f"timestamp must be a number or an ISO 8601 string, got {type(raw).__name__}"
        )
    if not math.isfinite(ts) or ts < 0:
        raise DecodeError(f"timestamp {raw!r} is out of range")
    if ts >= _TS_MAX:
        raise DecodeError(
            f"timestamp {raw!r} is too large for Unix seconds (milliseconds sent as seconds?)"
        )
    return ts


def decode_value(payload: bytes) -> float:
    """A plain number (`21.5`), or `true`/`false` as 1/0."""
    text = payload.strip()
    if text in (b"true", b"false"):
        return 1.0 if text == b"true" else 0.0
    if not _NUMBER.match(text):
        shown = payload[:32].decode("utf-8", "backslashreplace")
        raise DecodeError(f"payload is not a number: {shown!r}")
    value = float(text)
    if not math.isfinite(value):
        raise DecodeError("value is not a finite number")
    return value


def _parse_json(payload: bytes) -> Any:
    try:
        return _json_decode(payload)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"payload is not valid JSON: {exc}") from None
    # msgspec raises these two outside its DecodeError; a device can send either.
    except UnicodeDecodeError:
        raise DecodeError("payload is not valid UTF-8") from None
    except RecursionError:
        raise DecodeError("JSON is nested too deeply") from None


def _object_readings(
    doc: dict[str, Any],
    ts_field: str,
    received_at: float | None,
    sensor: str,
    prefix: str,
    suffix: str,
    topic: str,
    out: list[Reading],
    problems: list[str],
) -> float | None:
    """Append one Reading per numeric field of `doc`; return its device time (or None).

    The hot path of the json format, so one pass and no helper calls per field.
    msgspec never yields a non-finite float (JSON has no NaN or Infinity, and
    out-of-range literals are decode errors); a huge integer can still
    overflow a float.
    """
    raw_ts = doc.get(ts_field, _MISSING)
    if raw_ts is _MISSING:
        ts = None
    elif type(raw_ts) is float and 0.0 <= raw_ts < _TS_MAX:
        ts = raw_ts  # the common case, without the call
    else:
        ts = parse_timestamp(raw_ts)
    when = ts if ts is not None else received_at if received_at is not None else 0.0
    before, problems_before = len(out), len(problems)
    plain = not prefix and not suffix
    for key, raw in doc.items():
        kind = type(raw)
        if kind is float:
            value = raw
        elif kind is int:
            try:
                value = float(raw)
            except OverflowError:
                problems.append(f"field {key!r} is not a finite number (got number)")
                continue
        elif kind is bool:
            value = 1.0 if raw else 0.0
        else:
            if key != ts_field:
                problems.append(f"field {key!r} is not a finite number (got {_json_type(raw)})")
            continue
        if key == ts_field:
            continue
        out.append(Reading(sensor, key if plain else prefix + key + suffix, when, value, topic))
    if len(out) == before and len(problems) == problems_before:
        raise DecodeError("JSON object has no numeric fields")
    return ts


_MISSING: Any = object()


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def decode_message(
    table: RouteTable,
    topic: str,
    payload: bytes,
    received_at: float,
    readings: list[Reading],
    rejected: list[Rejected],
) -> None:
    """Decode one message, appending to `readings` and `rejected`."""
    match = table.match(topic)
    if match is None:
        rejected.append(Rejected(topic, payload, "no route matches this topic", received_at,
                                 "no_route"))
        return
    if not match.sensor:
        rejected.append(Rejected(topic, payload, "topic gives an empty sensor id", received_at,
                                 "bad_topic"))
        return
    try:
        if match.format == "json":
            _decode_json(match, topic, payload, received_at, readings, rejected)
        else:
            if not match.metric_prefix:
                raise DecodeError("topic gives an empty metric name")
            value = decode_value(payload)
            readings.append(Reading(match.sensor, match.metric_prefix, received_at, value, topic))
    except DecodeError as exc:
        rejected.append(Rejected(topic, payload, str(exc), received_at))


def _decode_json(
    match: RouteMatch,
    topic: str,
    payload: bytes,
    received_at: float,
    readings: list[Reading],
    rejected: list[Rejected],
) -> None:
    """An object, or an array of objects (each with its own timestamp).

    An array element that is not an object, or whose timestamp is bad, is a
    problem quarantined with its index; the other elements still count.
    """
    doc = _parse_json(payload)
    problems: list[str] = []
    args = (match.ts_field, received_at, match.sensor, match.metric_prefix, match.metric_suffix,
            topic, readings)
    if isinstance(doc, dict):
        _object_readings(doc, *args, problems)
    elif isinstance(doc, list) and doc:
        before = len(readings)
        for i, element in enumerate(doc):
            if type(element) is not dict:
                problems.append(f"element {i} is not an object (got {_json_type(element)})")
                continue
            seen = len(problems)
            try:
                _object_readings(element, *args, problems)
            except DecodeError as exc:
                problems.append(f"element {i}: {exc}")
                continue
            if len(problems) > seen:  # the element's own problems, prefixed with its index
                problems[seen:] = [f"element {i}: {p}" for p in problems[seen:]]
        if len(readings) == before:
            raise DecodeError("; ".join(problems[:5]) or "no usable elements")
    else:
        what = "an empty array" if isinstance(doc, list) else _json_type(doc)
        raise DecodeError(f"JSON payload is not an object or an array of objects (got {what})")
    if problems:
        rejected.append(Rejected(topic, payload, "; ".join(problems), received_at))


def decode_all(
    table: RouteTable,
    deliveries: Iterable[tuple[str, bytes, float]],
) -> tuple[list[Reading], list[Rejected]]:
    """Decode a chunk of (topic, payload, received_at) deliveries."""
    readings: list[Reading] = []
    rejected: list[Rejected] = []
    for topic, payload, received_at in deliveries:
        decode_message(table, topic, payload, received_at, readings, rejected)
    return readings, rejected
