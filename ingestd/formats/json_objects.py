"""The json format: an object of numeric fields, or an array of such objects.

`{"ts": 1700000000.5, "temperature": 21.5, "humidity": 40}` gives two
readings; true/false count as 1/0; nested objects are flattened
(`env.temperature`); an array's elements each carry their own time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from ingestd.errors import DecodeError
from ingestd.events import NS, Reading, Rejected
from ingestd.formats.base import Format, FormatOptions
from ingestd.formats.common import (
    TS_MAX,
    join,
    json_type,
    number_repeats,
    parse_json,
    parse_timestamp,
)

if TYPE_CHECKING:
    from ingestd.formats.base import DecodeContext, RouteMatch


class JsonOptions(FormatOptions):
    timestamp_field: str = "ts"
    timestamp_unit: Literal["auto", "s", "ms", "us", "ns", "iso"] = "auto"
    flatten_separator: str = Field(".", min_length=1, max_length=8)
    fields: list[str] = Field(default_factory=list)
    exclude_fields: list[str] = Field(default_factory=list)
    sequence_field: str = ""


@dataclass(frozen=True, slots=True)
class JsonParams:
    """What the decoder reads per message."""

    ts_field: str = "ts"
    ts_unit: str = "auto"
    flatten_separator: str = "."
    fields: frozenset[str] | None = None  # allow list (None: every field)
    exclude_fields: frozenset[str] = frozenset()
    sequence_field: str = ""


def _prepare(options: FormatOptions) -> JsonParams:
    assert isinstance(options, JsonOptions)
    return JsonParams(
        options.timestamp_field,
        options.timestamp_unit,
        options.flatten_separator,
        frozenset(options.fields) if options.fields else None,
        frozenset(options.exclude_fields),
        options.sequence_field,
    )


_MISSING: Any = object()


def decode(
    ctx: DecodeContext,
    match: RouteMatch,
    topic: str,
    payload: bytes,
    received_ns: int,
    readings: list[Reading],
    rejected: list[Rejected],
) -> None:
    """An object, or an array of objects (each with its own timestamp).

    An array element that is not an object, or whose timestamp is bad, is a
    problem quarantined with its index; the other elements still count. The
    device sequence numbers the message carried (the route's
    `sequence_field`) are followed in order by the device state.
    """
    max_depth = ctx.limits.max_json_depth
    doc = parse_json(payload)
    problems: list[str] = []
    before = len(readings)
    field = match.params.sequence_field
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
                problems.append(f"element {i} is not an object (got {json_type(element)})")
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
        what = "an empty array" if isinstance(doc, list) else json_type(doc)
        raise DecodeError(f"JSON payload is not an object or an array of objects (got {what})")
    if problems:
        rejected.append(Rejected(topic, payload, join(problems), received_ns / NS))
    for seq in sequences:
        ctx.state.sequence(match.sensor, seq)


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
                f"sequence field {field!r} is not a whole number >= 0 (got {json_type(raw)})"
            )
    return found


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
    opts: JsonParams = match.params
    ts_field = opts.ts_field
    raw_ts = doc.get(ts_field, _MISSING)
    if raw_ts is _MISSING:
        when = received_ns
    elif type(raw_ts) is float and opts.ts_unit == "auto" and 0.0 <= raw_ts < TS_MAX:
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
                problems.append(f"field {key!r} is not a finite number (got {json_type(raw)})")
            continue
        if filtered and not _wanted(opts, key):
            continue
        out.append(
            Reading(sensor, key if plain else prefix + key + suffix, when, value, topic, tags)
        )
    if len(out) == before and len(problems) == problems_before:
        raise DecodeError("JSON object has no numeric fields")
    return flattened


def _wanted(opts: JsonParams, key: str) -> bool:
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
    opts: JsonParams = match.params
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
            problems.append(f"field {name!r} is not a finite number (got {json_type(raw)})")
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


FORMAT = Format(
    name="json",
    summary="an object of numeric fields, or an array of such objects",
    decode=decode,
    options=JsonOptions,
    template_fields=frozenset({"field"}),
    metric_from="field",
    default_metric="{field}",
    prepare=_prepare,
)
