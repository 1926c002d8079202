"""Payload decoders: bytes in, readings out, or a reason why not.

Pure functions of their input: no I/O, no clock (the receive time is passed
in). Every format ends the same way: readings, and at most one `Rejected` per
message naming every problem it had. Nothing a device sends can raise out of
`decode_message`: the decoders raise only `DecodeError`, and the input-size
and nesting limits are checked before anything deep is attempted.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog

from ingestd import influx, senml
from ingestd.errors import DecodeError
from ingestd.events import NS, Reading, Rejected
from ingestd.routes import FormatOptions, RouteMatch, RouteTable, canonical_tags

log = structlog.get_logger("ingestd.decode")

# Device clocks: 1970 .. 2255 (an int64 of nanoseconds ends in 2262). A larger
# number of seconds is almost always milliseconds or microseconds sent where
# seconds were expected.
_TS_MAX = 9e9
_TS_MAX_NS = 9_000_000_000 * NS
_json_decode = msgspec.json.Decoder().decode
_NUMBER = re.compile(rb"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
# Nanoseconds per unit.
_NS_PER = {"s": NS, "ms": 1_000_000, "us": 1_000, "ns": 1, "auto": NS}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_BOM = b"\xef\xbb\xbf"


def parse_timestamp(raw: Any, unit: str = "auto") -> int:
    """Unix time in `unit` (auto: seconds for a number) or ISO 8601 (naive = UTC),
    as integer nanoseconds.

    An integer is exact; a float is taken to the microsecond (a double cannot
    carry nanoseconds of today's Unix time), so a device sending 6 decimals of
    seconds keeps every one of them.
    """
    if isinstance(raw, bool):
        raise DecodeError(f"timestamp must be a number or an ISO 8601 string, got {raw!r}")
    if isinstance(raw, int | float):
        if unit == "iso":
            raise DecodeError(f"timestamp {raw!r} is a number; this route expects ISO 8601")
        per = _NS_PER.get(unit, NS)
        ns = raw * per if isinstance(raw, int) else float_ns(raw, per, raw)
    elif isinstance(raw, str):
        if unit not in ("auto", "iso"):
            raise DecodeError(
                f"timestamp {raw[:64]!r} is a string; this route expects a number in {unit}"
            )
        try:
            dt = datetime.fromisoformat(raw)
        except ValueError:
            raise DecodeError(f"timestamp {raw[:64]!r} is not ISO 8601") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        delta = dt - _EPOCH
        ns = ((delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds) * 1000
    else:
        raise DecodeError(
            f"timestamp must be a number or an ISO 8601 string, got {type(raw).__name__}"
        )
    return check_ns(ns, raw)


def float_ns(value: float, ns_per_unit: int, raw: Any) -> int:
    """A float count of units as integer nanoseconds, rounded to the microsecond
    (to the nanosecond for units finer than a microsecond)."""
    if not math.isfinite(value):
        raise DecodeError(f"timestamp {raw!r} is out of range")
    try:
        if ns_per_unit >= 1000:
            return round(value * (ns_per_unit // 1000)) * 1000
        return round(value * ns_per_unit)
    except OverflowError:
        raise DecodeError(f"timestamp {raw!r} is out of range") from None


def check_ns(ns: int, raw: Any) -> int:
    if ns < 0:
        raise DecodeError(f"timestamp {raw!r} is out of range")
    if ns >= _TS_MAX_NS:
        raise DecodeError(_too_large(raw))
    return ns


def _too_large(raw: Any, unit_hint: bool = True) -> str:
    """`unit_hint`: the route has a timestamp_unit to point at (SenML's times
    are seconds by its RFC: it does not)."""
    hint = " set the route's timestamp_unit" if unit_hint else ""
    return f"timestamp {raw!r} is too large for Unix seconds (milliseconds sent as seconds?{hint})"


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
        doc = _json_decode(payload)
    except msgspec.DecodeError as exc:
        if payload.startswith(_BOM):
            # RFC 8259 8.1: a parser may ignore a byte order mark (checked only
            # when decoding failed: the common case pays nothing for it).
            return _parse_json(payload[3:])
        raise DecodeError(f"payload is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise DecodeError("payload is not valid UTF-8") from None
    except RecursionError:
        raise DecodeError("JSON is nested too deeply") from None
    kind = type(doc)
    if kind is dict:
        keys = len(doc)  # equal to the marks: a flat object, no key lost
    elif kind is list:
        keys = sum([len(e) for e in doc if type(e) is dict])  # an array of flat objects
    else:
        return doc
    if payload.count(b'":') != keys:
        _check_unique_keys(payload, doc)
    return doc


def _check_unique_keys(payload: bytes, doc: Any) -> None:
    """Reject an object that names a field twice, which a dict would silently
    collapse to its last value.

    Every key ends in `":` (or `" :`). A string value can only add such marks
    and a repeated key can only remove a decoded key, so when the marks equal
    the decoded keys, nothing was collapsed: the common case costs two counts
    and a walk of the decoded objects. Otherwise the standard parser checks.
    """
    marks = payload.count(b'":') + payload.count(b'" :')
    if marks == _count_keys(doc):
        return

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            names: set[str] = set()
            for k, _ in items:
                if k in names:
                    raise DecodeError(
                        f"field {k[:64]!r} appears more than once in an object "
                        "(which value is meant is ambiguous)"
                    )
                names.add(k)
        return out

    # msgspec accepted it; only duplicate names are this check's business.
    with contextlib.suppress(ValueError, RecursionError):
        json.loads(payload, object_pairs_hook=pairs)


def _count_keys(doc: Any) -> int:
    """Keys in every object of a decoded document."""
    n = 0
    stack = [doc]
    while stack:
        node = stack.pop()
        if type(node) is dict:
            n += len(node)
            node = node.values()
        for v in node:
            kind = type(v)
            if kind is dict or kind is list:
                stack.append(v)
    return n


_MISSING: Any = object()


def _object_readings(
    doc: dict[str, Any],
    match: RouteMatch,
    received_ns: int,
    topic: str,
    out: list[Reading],
    problems: list[str],
    max_depth: int,
) -> bool:
    """Append one Reading per numeric field of `doc` (nested objects flattened).

    The hot path of the json format: one pass, and no call per field for a
    flat object without field filters. msgspec never yields a non-finite
    float (JSON has no NaN or Infinity; out-of-range literals are decode
    errors); a huge integer can still overflow a float. Returns True if a
    nested object was flattened (only then can two fields share a metric name).
    """
    opts = match.options
    ts_field = match.ts_field
    raw_ts = doc.get(ts_field, _MISSING)
    if raw_ts is _MISSING:
        when = received_ns
    elif type(raw_ts) is float and opts.ts_unit == "auto" and 0.0 <= raw_ts < _TS_MAX:
        when = round(raw_ts * 1e6) * 1000  # the common case, without the call
    else:
        when = parse_timestamp(raw_ts, opts.ts_unit)
    before, problems_before = len(out), len(problems)
    prefix, suffix = match.metric_prefix, match.metric_suffix
    plain = not prefix and not suffix
    sensor, tags = match.sensor, match.tags
    filtered = opts.fields is not None or bool(opts.exclude_fields)
    flattened = False
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
            flattened = True
            _nested(raw, key, match, when, topic, out, problems, 2, max_depth)
            continue
        else:
            if not filtered or _wanted(opts, key):
                problems.append(f"field {key!r} is not a finite number (got {_json_type(raw)})")
            continue
        if filtered and not _wanted(opts, key):
            continue
        out.append(
            Reading(sensor, key if plain else prefix + key + suffix, when, value, topic, tags)
        )
    if len(out) == before and len(problems) == problems_before:
        raise DecodeError("JSON object has no numeric fields")
    return flattened


def _wanted(opts: FormatOptions, key: str) -> bool:
    if opts.fields is not None and key not in opts.fields:
        return False
    return key not in opts.exclude_fields


def _nested(
    doc: dict[str, Any],
    path: str,
    match: RouteMatch,
    when: int,
    topic: str,
    out: list[Reading],
    problems: list[str],
    depth: int,
    max_depth: int,
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
        out.append(
            Reading(
                match.sensor,
                match.metric_prefix + name + match.metric_suffix,
                when,
                value,
                topic,
                match.tags,
            )
        )


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


def number_repeats(readings: list[Reading], before: int, one_sensor: bool = False) -> None:
    """Give readings of one message that share series and time a distinct `seq`.

    They are distinct readings (an array without timestamps, a repeated
    timestamp, two fields that flatten to one name): each is stored. The
    numbering follows the message's order, so a redelivery of the message
    yields the same keys and is recognised as one. `one_sensor`: every reading
    has the message's sensor and tags (json, senml), so a narrower key checks.
    """
    n = len(readings) - before
    if n < 2:
        return
    fresh = readings[before:]
    if one_sensor:
        if len({(r.metric, r.unit, r.ts_ns) for r in fresh}) == n:
            return
    elif len({(r.sensor, r.metric, r.tags, r.unit, r.ts_ns) for r in fresh}) == n:
        return
    seen: dict[tuple[str, str, str, str, int], int] = {}
    for i, r in enumerate(fresh):
        key = (r.sensor, r.metric, r.tags, r.unit, r.ts_ns)
        seq = seen.get(key, -1) + 1
        seen[key] = seq
        if seq:
            readings[before + i] = Reading(
                r.sensor, r.metric, r.ts_ns, r.value, r.topic, r.tags, r.unit, seq
            )


def decode_message(
    table: RouteTable,
    topic: str,
    payload: bytes,
    received_ns: int,
    readings: list[Reading],
    rejected: list[Rejected],
    retained: bool = False,
) -> None:
    """Decode one message, appending to `readings` and `rejected`.

    `received_ns` is the receive time (Unix ns), unique per message: readings
    without a device time are stamped with it. `retained`: the broker sent this
    message because we subscribed (MQTT 3.3.1.3), not because it was just
    published; the route's `retained` option says whether it counts.
    """
    limit = table.limits.max_payload_bytes
    if len(payload) > limit:
        # Before anything else: no route, bad topic or good, nothing over the
        # limit is kept whole.
        rejected.append(
            Rejected(
                topic,
                payload[:1024],
                f"payload is {len(payload):,} bytes, over the limit of "
                f"{limit:,} (input.max_payload_bytes; first 1 KiB kept)",
                received_ns / NS,
                "too_large",
            )
        )
        return
    match = table.match(topic)
    if match is None:
        rejected.append(
            Rejected(topic, payload, "no route matches this topic", received_ns / NS, "no_route")
        )
        return
    if not match.sensor:
        rejected.append(
            Rejected(
                topic, payload, "topic gives an empty sensor id", received_ns / NS, "bad_topic"
            )
        )
        return
    opts = match.options
    if retained and opts.retained == "ignore":
        # Sent again at every (re)subscribe, stamped "now" it would look like a
        # fresh reading from a sensor that may be long dead.
        table.counts.retained_ignored += 1
        return
    if opts.expect_within and not retained:
        table.route_seen[match.route] = received_ns
        seen = (match.route, match.sensor)
        if seen not in table.sensor_seen:
            table.expect_changed[match.sensor] = opts.expect_within
        table.sensor_seen[seen] = received_ns
    before = len(readings)
    try:
        fmt = match.format
        if fmt == "json":
            sequences = _decode_json(
                match, topic, payload, received_ns, readings, rejected, table.limits.max_json_depth
            )
            for seq in sequences:
                table.sequence(match.sensor, seq)
        elif fmt == "value":
            if not match.metric_prefix:
                raise DecodeError("topic gives an empty metric name")
            value = decode_value(payload)
            readings.append(
                Reading(match.sensor, match.metric_prefix, received_ns, value, topic, match.tags)
            )
        elif fmt == "senml":
            _decode_senml(match, topic, payload, received_ns, readings, rejected)
        else:
            _decode_influx(match, topic, payload, received_ns, readings, rejected)
    except DecodeError as exc:
        del readings[before:]
        rejected.append(Rejected(topic, payload, str(exc), received_ns / NS))
        return
    except Exception as exc:
        # A bug of ours, not the device's: quarantine the message rather than
        # let it stop the daemon (and stop it again at every redelivery).
        del readings[before:]
        log.error(
            "decoder error; message quarantined (please report this as a bug)",
            topic=topic,
            format=match.format,
            error=repr(exc),
        )
        rejected.append(
            Rejected(
                topic,
                payload,
                f"internal error: decoder failed (a bug in ingestd): {exc!r}",
                received_ns / NS,
                "internal",
            )
        )
        return
    table.counts.decoded += len(readings) - before
    if retained:
        # Only a device time says when a retained value was measured; the receive
        # time would invent a new reading at every subscribe.
        timed = [r for r in readings[before:] if r.ts_ns != received_ns]
        table.counts.retained_untimed += len(readings) - before - len(timed)
        readings[before:] = timed
    if opts.rate_limit and len(readings) > before:
        _rate_limit(table, match, topic, payload, received_ns / NS, readings, before, rejected)


def _rate_limit(
    table: RouteTable,
    match: RouteMatch,
    topic: str,
    payload: bytes,
    received_at: float,
    readings: list[Reading],
    before: int,
    rejected: list[Rejected],
) -> None:
    """Keep what each sensor's token bucket allows; drop or quarantine the rest.

    The bucket runs on the device's clock (the readings' time, which is the
    receive time only where the device sends none): a backlog delivered at
    once after an outage was produced at the device's pace and passes.
    """
    fresh = readings[before:]
    counts: dict[str, int] = {}
    latest: dict[str, int] = {}
    for r in fresh:
        counts[r.sensor] = counts.get(r.sensor, 0) + 1
        if r.ts_ns > latest.get(r.sensor, -1):
            latest[r.sensor] = r.ts_ns
    opts = match.options
    allowed = {s: table.allow(match.route, s, opts, n, latest[s] / NS) for s, n in counts.items()}
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
        table.counts.rate_quarantined += excess
        over = ", ".join(sorted(s for s in counts if allowed[s] == 0))
        rejected.append(
            Rejected(
                topic,
                payload,
                f"rate limit: {excess} reading(s) over {opts.rate_limit:g}/s "
                f"(burst {opts.rate_burst:g}) from {over}",
                received_at,
                "rate_limited",
            )
        )
    else:
        table.counts.rate_dropped += excess


def _decode_json(
    match: RouteMatch,
    topic: str,
    payload: bytes,
    received_ns: int,
    readings: list[Reading],
    rejected: list[Rejected],
    max_depth: int,
) -> list[int]:
    """An object, or an array of objects (each with its own timestamp).

    An array element that is not an object, or whose timestamp is bad, is a
    problem quarantined with its index; the other elements still count.
    Returns the device sequence numbers the message carried (the route's
    `sequence_field`), in order.
    """
    doc = _parse_json(payload)
    problems: list[str] = []
    before = len(readings)
    field = match.options.sequence_field
    sequences = _take_sequences(doc, field, problems) if field else _NO_SEQUENCES
    if type(doc) is dict:
        # One object: one time, so only a flattened name can repeat a metric.
        if (
            _object_readings(doc, match, received_ns, topic, readings, problems, max_depth)
            and len({r.metric for r in readings[before:]}) != len(readings) - before
        ):
            number_repeats(readings, before, one_sensor=True)
    elif isinstance(doc, list) and doc:
        for i, element in enumerate(doc):
            if type(element) is not dict:
                problems.append(f"element {i} is not an object (got {_json_type(element)})")
                continue
            seen = len(problems)
            try:
                _object_readings(element, match, received_ns, topic, readings, problems, max_depth)
            except DecodeError as exc:
                problems.append(f"element {i}: {exc}")
                continue
            if len(problems) > seen:  # the element's own problems, prefixed with its index
                problems[seen:] = [f"element {i}: {p}" for p in problems[seen:]]
        if len(readings) == before:
            raise DecodeError("; ".join(problems[:5]) or "no usable elements")
        number_repeats(readings, before, one_sensor=True)
    else:
        what = "an empty array" if isinstance(doc, list) else _json_type(doc)
        raise DecodeError(f"JSON payload is not an object or an array of objects (got {what})")
    if problems:
        rejected.append(Rejected(topic, payload, _join(problems), received_ns / NS))
    return sequences


_NO_SEQUENCES: list[int] = []  # never appended to


def _take_sequences(doc: Any, field: str, problems: list[str]) -> list[int]:
    """Remove the device's message counter from the object (or each object of
    an array), so it is not taken for a reading; return the numbers in order."""
    found: list[int] = []
    for element in [doc] if type(doc) is dict else doc if type(doc) is list else ():
        raw = element.pop(field, None) if type(element) is dict else None
        if type(raw) is int and raw >= 0:
            found.append(raw)
        elif raw is not None:
            problems.append(
                f"sequence field {field!r} is not a whole number >= 0 (got {_json_type(raw)})"
            )
    return found


def _settle(
    readings: list[Reading],
    before: int,
    problems: list[str],
    nothing: str,
    topic: str,
    payload: bytes,
    received_ns: int,
    rejected: list[Rejected],
    one_sensor: bool = False,
) -> None:
    """A message's end: no readings at all is a decode error (its problems, or
    `nothing`); readings with problems keep the readings and quarantine once."""
    if len(readings) == before:
        raise DecodeError(_join(problems) or nothing)
    number_repeats(readings, before, one_sensor)
    if problems:
        rejected.append(Rejected(topic, payload, _join(problems), received_ns / NS))


def _join(problems: list[str], most: int = 20) -> str:
    shown = "; ".join(problems[:most])
    if len(problems) > most:
        shown += f"; and {len(problems) - most} more"
    return shown


def _decode_senml(
    match: RouteMatch,
    topic: str,
    payload: bytes,
    received_ns: int,
    readings: list[Reading],
    rejected: list[Rejected],
) -> None:
    problems: list[str] = []
    records = senml.resolve(_parse_json(payload), received_ns / NS, problems)
    before = len(readings)
    prefix, suffix, sensor, tags = (
        match.metric_prefix,
        match.metric_suffix,
        match.sensor,
        match.tags,
    )
    for rec in records:
        # resolve() checked the time is finite and >= 0; to the microsecond.
        when = round(rec.time * 1e6) * 1000
        if when >= _TS_MAX_NS:
            problems.append(f"{rec.name}: {_too_large(rec.time, unit_hint=False)}")
            continue
        metric = prefix + rec.name + suffix
        if rec.value is not None:
            readings.append(Reading(sensor, metric, when, rec.value, topic, tags, rec.unit))
        if rec.sum is not None:
            readings.append(Reading(sensor, metric + "_sum", when, rec.sum, topic, tags, rec.unit))
    _settle(
        readings,
        before,
        problems,
        "SenML pack has no numeric records",
        topic,
        payload,
        received_ns,
        rejected,
        one_sensor=True,
    )


def _decode_influx(
    match: RouteMatch,
    topic: str,
    payload: bytes,
    received_ns: int,
    readings: list[Reading],
    rejected: list[Rejected],
) -> None:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("payload is not valid UTF-8") from None
    points, problems = influx.parse(text)
    opts = match.options
    # Line protocol's default unit is the nanosecond.
    per = 1 if opts.ts_unit == "auto" else _NS_PER[opts.ts_unit]
    template, values = match.metric_template, match.values
    before = len(readings)
    # Lines of one message mostly repeat their measurement, fields and tags.
    metrics: dict[tuple[str, str], str] = {}
    tag_texts: dict[tuple[tuple[str, str], ...], tuple[str, str]] = {}
    for p in points:
        if p.timestamp is None:
            when = received_ns
        else:
            try:
                when = check_ns(p.timestamp * per, p.timestamp)
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
                    {**values, "measurement": p.measurement, "field": field}
                )
            readings.append(Reading(sensor, metric, when, value, topic, tag_text))
    _settle(
        readings,
        before,
        problems,
        "no points with numeric fields",
        topic,
        payload,
        received_ns,
        rejected,
    )


def decode_all(
    table: RouteTable,
    deliveries: Iterable[tuple[str, bytes, int]],
    retained: Iterable[tuple[str, bytes, int]] = (),
) -> tuple[list[Reading], list[Rejected]]:
    """Decode a chunk of (topic, payload, received_ns) deliveries, and of
    deliveries the broker flagged as retained (see `decode_message`)."""
    readings: list[Reading] = []
    rejected: list[Rejected] = []
    for topic, payload, received_ns in deliveries:
        decode_message(table, topic, payload, received_ns, readings, rejected)
    for topic, payload, received_ns in retained:
        decode_message(table, topic, payload, received_ns, readings, rejected, retained=True)
    return readings, rejected
