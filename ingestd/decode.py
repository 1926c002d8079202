"""Payload decoders: bytes in, readings out, or a reason why not.

Pure functions of their input: no I/O, no clock (the receive time is passed
in). Every format ends the same way: readings, and at most one `Rejected` per
message naming every problem it had. Nothing a device sends can raise out of
`decode_message`: the decoders raise only `DecodeError`, and the input-size
and nesting limits are checked before anything deep is attempted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog

from ingestd import influx, senml
from ingestd.errors import DecodeError
from ingestd.events import Reading, Rejected
from ingestd.routes import FormatOptions, RouteMatch, RouteTable, canonical_tags

log = structlog.get_logger("ingestd.decode")

# Device clocks in seconds: 1970 .. 2286. A larger number is almost always
# milliseconds or microseconds sent where seconds were expected.
_TS_MAX = 1e10
_json_decode = msgspec.json.Decoder().decode
_NUMBER = re.compile(rb"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
_DIVISOR = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}


def parse_timestamp(raw: Any, unit: str = "auto") -> float:
    """Unix time in `unit` (auto: seconds for a number) or ISO 8601 (naive = UTC)."""
    if isinstance(raw, bool):
        raise DecodeError(f"timestamp must be a number or an ISO 8601 string, got {raw!r}")
    if isinstance(raw, int | float):
        if unit == "iso":
            raise DecodeError(f"timestamp {raw!r} is a number; this route expects ISO 8601")
        try:
            ts = float(raw) / _DIVISOR.get(unit, 1.0)
        except OverflowError:
            raise DecodeError("timestamp is out of range") from None
    elif isinstance(raw, str):
        if unit not in ("auto", "iso"):
            raise DecodeError(f"timestamp {raw[:64]!r} is a string; this route expects a "
                              f"number in {unit}")
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
    return check_seconds(ts, raw)


def check_seconds(ts: float, raw: Any) -> float:
    if not math.isfinite(ts) or ts < 0:
        raise DecodeError(f"timestamp {raw!r} is out of range")
    if ts >= _TS_MAX:
        raise DecodeError(
            f"timestamp {raw!r} is too large for Unix seconds (milliseconds sent as "
            "seconds? set the route's timestamp_unit)"
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
    except UnicodeDecodeError:
        raise DecodeError("payload is not valid UTF-8") from None
    except RecursionError:
        raise DecodeError("JSON is nested too deeply") from None


_MISSING: Any = object()


def _object_readings(
    doc: dict[str, Any],
    match: RouteMatch,
    received_at: float,
    topic: str,
    out: list[Reading],
    problems: list[str],
    max_depth: int,
) -> None:
    """Append one Reading per numeric field of `doc` (nested objects flattened).

    The hot path of the json format: one pass, and no call per field for a
    flat object without field filters. msgspec never yields a non-finite
    float (JSON has no NaN or Infinity; out-of-range literals are decode
    errors); a huge integer can still overflow a float.
    """
    opts = match.options
    ts_field = match.ts_field
    raw_ts = doc.get(ts_field, _MISSING)
    if raw_ts is _MISSING:
        when = received_at
    elif type(raw_ts) is float and opts.ts_unit == "auto" and 0.0 <= raw_ts < _TS_MAX:
        when = raw_ts  # the common case, without the call
    else:
        when = parse_timestamp(raw_ts, opts.ts_unit)
    before, problems_before = len(out), len(problems)
    prefix, suffix = match.metric_prefix, match.metric_suffix
    plain = not prefix and not suffix
    sensor, tags = match.sensor, match.tags
    filtered = opts.fields is not None or bool(opts.exclude_fields)
    for key, raw in doc.items():
        if key == ts_field:
            continue
        if not key:
            problems.append("a field with an empty name")
            continue
        kind = type(raw)
        if kind is float:
            value = raw
        elif kind is int:
            try:
                value = float(raw)
            except OverflowError:
                if not filtered or _wanted(opts, key):
                    problems.append(f"field {key!r} is not a finite number (got number)")
                continue
        elif kind is bool:
            value = 1.0 if raw else 0.0
        elif kind is dict:
            _nested(raw, key, match, when, topic, out, problems, 2, max_depth)
            continue
        else:
            if not filtered or _wanted(opts, key):
                problems.append(f"field {key!r} is not a finite number (got {_json_type(raw)})")
            continue
        if filtered and not _wanted(opts, key):
            continue
        out.append(Reading(sensor, key if plain else prefix + key + suffix, when, value, topic,
                           tags))
    if len(out) == before and len(problems) == problems_before:
        raise DecodeError("JSON object has no numeric fields")


def _wanted(opts: FormatOptions, key: str) -> bool:
    if opts.fields is not None and key not in opts.fields:
        return False
    return key not in opts.exclude_fields


def _nested(
    doc: dict[str, Any], path: str, match: RouteMatch, when: float, topic: str,
    out: list[Reading], problems: list[str], depth: int, max_depth: int,
) -> None:
    """A nested object's fields as `path<sep>field` readings."""
    opts = match.options
    if depth > max_depth:
        problems.append(f"field {path!r} is nested deeper than {max_depth} levels")
        return
    sep = opts.flatten_separator
    for key, raw in doc.items():
        if not key:
            problems.append(f"a field with an empty name in {path!r}")
            continue
        name = path + sep + key
        kind = type(raw)
        if kind is dict:
            _nested(raw, name, match, when, topic, out, problems, depth + 1, max_depth)
            continue
        if not _wanted(opts, name):
            continue
        if kind is float:
            value = raw
        elif kind is int:
            try:
                value = float(raw)
            except OverflowError:
                problems.append(f"field {name!r} is not a finite number (got number)")
                continue
        elif kind is bool:
            value = 1.0 if raw else 0.0
        else:
            problems.append(f"field {name!r} is not a finite number (got {_json_type(raw)})")
            continue
        out.append(Reading(match.sensor, match.metric_prefix + name + match.metric_suffix,
                           when, value, topic, match.tags))


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
    limit = table.limits.max_payload_bytes
    if len(payload) > limit:
        rejected.append(Rejected(
            topic, payload[:1024], f"payload is {len(payload):,} bytes, over the limit of "
            f"{limit:,} (input.max_payload_bytes; first 1 KiB kept)", received_at, "too_large"))
        return
    before = len(readings)
    try:
        fmt = match.format
        if fmt == "json":
            _decode_json(match, topic, payload, received_at, readings, rejected,
                         table.limits.max_json_depth)
        elif fmt == "value":
            if not match.metric_prefix:
                raise DecodeError("topic gives an empty metric name")
            value = decode_value(payload)
            readings.append(Reading(match.sensor, match.metric_prefix, received_at, value, topic,
                                    match.tags))
        elif fmt == "senml":
            _decode_senml(match, topic, payload, received_at, readings, rejected)
        else:
            _decode_influx(match, topic, payload, received_at, readings, rejected)
    except DecodeError as exc:
        del readings[before:]
        rejected.append(Rejected(topic, payload, str(exc), received_at))
        return
    except Exception as exc:
        # A bug of ours, not the device's: quarantine the message rather than
        # let it stop the daemon (and stop it again at every redelivery).
        del readings[before:]
        log.error("decoder error; message quarantined (please report this as a bug)",
                  topic=topic, format=match.format, error=repr(exc))
        rejected.append(Rejected(topic, payload, f"decoder error (a bug in ingestd): {exc!r}",
                                 received_at))
        return
    if match.options.rate_limit and len(readings) > before:
        _rate_limit(table, match, topic, payload, received_at, readings, before, rejected)


def _rate_limit(table: RouteTable, match: RouteMatch, topic: str, payload: bytes,
                received_at: float, readings: list[Reading], before: int,
                rejected: list[Rejected]) -> None:
    """Keep what each sensor's token bucket allows; drop or quarantine the rest."""
    fresh = readings[before:]
    counts: dict[str, int] = {}
    for r in fresh:
        counts[r.sensor] = counts.get(r.sensor, 0) + 1
    opts = match.options
    allowed = {s: table.allow(match.route, s, opts, n, received_at) for s, n in counts.items()}
    if all(allowed[s] == n for s, n in counts.items()):
        return
    kept: list[Reading] = []
    for r in fresh:
        if allowed[r.sensor] > 0:
            allowed[r.sensor] -= 1
            kept.append(r)
    excess = len(fresh) - len(kept)
    del readings[before:]
    readings.extend(kept)
    if opts.rate_policy == "quarantine":
        table.rate_quarantined += excess
        over = ", ".join(sorted(s for s in counts if allowed[s] == 0))
        rejected.append(Rejected(
            topic, payload, f"rate limit: {excess} reading(s) over {opts.rate_limit:g}/s "
            f"(burst {opts.rate_burst:g}) from {over}", received_at, "rate_limited"))
    else:
        table.rate_dropped += excess


def _decode_json(
    match: RouteMatch,
    topic: str,
    payload: bytes,
    received_at: float,
    readings: list[Reading],
    rejected: list[Rejected],
    max_depth: int,
) -> None:
    """An object, or an array of objects (each with its own timestamp).

    An array element that is not an object, or whose timestamp is bad, is a
    problem quarantined with its index; the other elements still count.
    """
    doc = _parse_json(payload)
    problems: list[str] = []
    if isinstance(doc, dict):
        _object_readings(doc, match, received_at, topic, readings, problems, max_depth)
    elif isinstance(doc, list) and doc:
        before = len(readings)
        for i, element in enumerate(doc):
            if type(element) is not dict:
                problems.append(f"element {i} is not an object (got {_json_type(element)})")
                continue
            seen = len(problems)
            try:
                _object_readings(element, match, received_at, topic, readings, problems,
                                 max_depth)
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
        rejected.append(Rejected(topic, payload, _join(problems), received_at))


def _settle(readings: list[Reading], before: int, problems: list[str], nothing: str,
            topic: str, payload: bytes, received_at: float, rejected: list[Rejected]) -> None:
    """A message's end: no readings at all is a decode error (its problems, or
    `nothing`); readings with problems keep the readings and quarantine once."""
    if len(readings) == before:
        raise DecodeError(_join(problems) or nothing)
    if problems:
        rejected.append(Rejected(topic, payload, _join(problems), received_at))


def _join(problems: list[str], most: int = 20) -> str:
    shown = "; ".join(problems[:most])
    if len(problems) > most:
        shown += f"; and {len(problems) - most} more"
    return shown


def _decode_senml(
    match: RouteMatch,
    topic: str,
    payload: bytes,
    received_at: float,
    readings: list[Reading],
    rejected: list[Rejected],
) -> None:
    problems: list[str] = []
    records = senml.resolve(_parse_json(payload), received_at, problems)
    before = len(readings)
    prefix, suffix, sensor, tags = (match.metric_prefix, match.metric_suffix, match.sensor,
                                    match.tags)
    for rec in records:
        try:
            when = check_seconds(rec.time, rec.time)
        except DecodeError as exc:
            problems.append(f"{rec.name}: {exc}")
            continue
        metric = prefix + rec.name + suffix
        if rec.value is not None:
            readings.append(Reading(sensor, metric, when, rec.value, topic, tags, rec.unit))
        if rec.sum is not None:
            readings.append(Reading(sensor, metric + "_sum", when, rec.sum, topic, tags, rec.unit))
    _settle(readings, before, problems, "SenML pack has no numeric records", topic, payload,
            received_at, rejected)


def _decode_influx(
    match: RouteMatch,
    topic: str,
    payload: bytes,
    received_at: float,
    readings: list[Reading],
    rejected: list[Rejected],
) -> None:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("payload is not valid UTF-8") from None
    points, problems = influx.parse(text)
    opts = match.options
    divisor = _DIVISOR.get(opts.ts_unit, 1e9)  # line protocol's default: nanoseconds
    template, values = match.metric_template, match.values
    before = len(readings)
    # Lines of one message mostly repeat their measurement, fields and tags.
    metrics: dict[tuple[str, str], str] = {}
    tag_texts: dict[tuple[tuple[str, str], ...], tuple[str, str]] = {}
    for p in points:
        if p.timestamp is None:
            when = received_at
        else:
            try:
                when = check_seconds(p.timestamp / divisor, p.timestamp)
            except DecodeError as exc:
                problems.append(f"{p.measurement}: {exc}")
                continue
        known = tag_texts.get(p.tags)
        if known is None:
            sensor = match.sensor
            tags = dict(match.topic_tags)
            for key, tag_value in p.tags:
                if key == opts.sensor_tag:
                    sensor = tag_value
                else:
                    tags[key] = tag_value
            known = tag_texts[p.tags] = (sensor, canonical_tags(tags))
        sensor, tag_text = known
        for field, value in p.fields:
            metric = metrics.get((p.measurement, field))
            if metric is None:
                metric = metrics[(p.measurement, field)] = template.format_map(
                    {**values, "measurement": p.measurement, "field": field})
            readings.append(Reading(sensor, metric, when, value, topic, tag_text))
    _settle(readings, before, problems, "no points with numeric fields", topic, payload,
            received_at, rejected)


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
