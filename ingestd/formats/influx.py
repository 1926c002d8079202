"""InfluxDB line protocol: `measurement[,tag=v...] field=v[,field=v...] [timestamp]`.

One point per line; several lines per message; `#` comment lines and blank
lines are skipped. Escapes as the reference says: in the measurement `\\,`
and `\\ `; in tag keys, tag values and field keys also `\\=`; string field
values are double-quoted with `\\"` and `\\\\`. Field values: floats (`1`,
`-1.5e3`), integers (`1i`), unsigned (`1u`), booleans (`t`, `true`, `F`, ...)
and strings; strings are not numbers and are reported, the other fields kept.
The timestamp is an integer in the route's unit (nanoseconds by default).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Literal, NamedTuple

from ingestd.errors import DecodeError
from ingestd.events import Reading, Rejected, canonical_tags
from ingestd.formats.base import Format, FormatOptions
from ingestd.formats.common import NS_PER, check_ns, settle

if TYPE_CHECKING:
    from ingestd.formats.base import DecodeContext, RouteMatch

_TRUE = frozenset(("t", "T", "true", "True", "TRUE"))
_FALSE = frozenset(("f", "F", "false", "False", "FALSE"))
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_INT = re.compile(r"^[-+]?\d+[iu]$")
_TIMESTAMP = re.compile(r"^-?\d{1,19}$")  # a signed 64-bit integer, as InfluxDB stores it
_UNESCAPE = re.compile(r"\\([ ,=\"\\])")
MAX_LINE = 65536


class Point(NamedTuple):
    measurement: str
    tags: tuple[tuple[str, str], ...]
    fields: tuple[tuple[str, float], ...]
    timestamp: int | None


def _unescape(text: str) -> str:
    return _UNESCAPE.sub(r"\1", text) if "\\" in text else text


def _split(text: str, sep: str, quotes: bool = False) -> list[str]:
    """Split on `sep` where it is neither escaped nor (with quotes) inside "..."."""
    if "\\" not in text and not (quotes and '"' in text):
        return text.split(sep)
    parts: list[str] = []
    start = i = 0
    n = len(text)
    quoted = False
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if quotes and c == '"':
            quoted = not quoted
        elif c == sep and not quoted:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    if quoted:
        raise DecodeError("unterminated string field value")
    parts.append(text[start:])
    return parts


def parse_line(line: str) -> tuple[Point, list[str]]:
    """One point, and problems with single fields (a string value, say)."""
    if len(line) > MAX_LINE:
        raise DecodeError(f"line is longer than {MAX_LINE} characters")
    sections = _split(line, " ", quotes=True)
    sections = [s for s in sections if s != ""] if "" in sections else sections
    if len(sections) < 2:
        raise DecodeError("line has no field set (expected 'measurement field=value')")
    if len(sections) > 3:
        raise DecodeError("unexpected text after the timestamp (unescaped space?)")
    head = _split(sections[0], ",")
    measurement = _unescape(head[0])
    if not measurement:
        raise DecodeError("line has an empty measurement")
    tags: list[tuple[str, str]] = []
    for item in head[1:]:
        key, eq, value = _partition(item)
        if not eq or not key or not value:
            raise DecodeError(f"tag {item[:64]!r} is not key=value")
        tags.append((key, value))
    fields: list[tuple[str, float]] = []
    problems: list[str] = []
    for item in _split(sections[1], ",", quotes=True):
        key, eq, raw = _partition(item, unescape_value=False)
        if not eq or not key or not raw:
            raise DecodeError(f"field {item[:64]!r} is not key=value")
        number = _field_value(raw)
        if number is None:
            problems.append(f"field {key!r} of {measurement!r} is a string, not a number")
            continue
        if not math.isfinite(number):
            problems.append(f"field {key!r} of {measurement!r} is not a finite number")
            continue
        fields.append((key, number))
    ts: int | None = None
    if len(sections) == 3:
        if not _TIMESTAMP.match(sections[2]):
            raise DecodeError(f"timestamp {sections[2][:32]!r} is not a 64-bit integer")
        ts = int(sections[2])
    return Point(measurement, tuple(tags), tuple(fields), ts), problems


def _partition(item: str, unescape_value: bool = True) -> tuple[str, str, str]:
    parts = _split(item, "=") if "\\" in item else item.split("=", 1)
    if len(parts) < 2:
        return _unescape(item), "", ""
    key = parts[0]
    value = "=".join(parts[1:])
    return _unescape(key), "=", _unescape(value) if unescape_value else value


def _field_value(raw: str) -> float | None:
    """A number, or None for a string; DecodeError for anything else."""
    if raw[0] == '"':
        if len(raw) < 2 or raw[-1] != '"':
            raise DecodeError(f"string field value {raw[:32]!r} is not closed")
        return None
    if _FLOAT.match(raw):
        return float(raw)
    if raw in _TRUE:
        return 1.0
    if raw in _FALSE:
        return 0.0
    if _INT.match(raw):
        if raw[-1] == "u" and raw[0] == "-":
            raise DecodeError(f"unsigned field value {raw[:32]!r} is negative")
        try:
            return float(int(raw[:-1]))
        except OverflowError:
            return math.inf
    raise DecodeError(f"field value {raw[:32]!r} is not a number, boolean or string")


def parse(payload: str) -> tuple[list[Point], list[str]]:
    """Every line of a message: (points, problems). A bad line is a problem, not
    the end of the message."""
    points: list[Point] = []
    problems: list[str] = []
    for number, raw_line in enumerate(payload.split("\n"), 1):
        line = raw_line.strip(" \t\r")
        if not line or line[0] == "#":
            continue
        try:
            point, field_problems = parse_line(line)
        except DecodeError as exc:
            problems.append(f"line {number}: {exc}")
            continue
        problems.extend(f"line {number}: {p}" for p in field_problems)
        if point.fields:
            points.append(point)
    return points, problems


class InfluxOptions(FormatOptions):
    # Line protocol's default unit is the nanosecond ("auto").
    timestamp_unit: Literal["auto", "s", "ms", "us", "ns"] = "auto"
    # The tag whose value is the sensor id (then not stored as a tag); empty:
    # the topic's sensor.
    sensor_tag: str = ""


def decode(
    ctx: DecodeContext,
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
    points, problems = parse(text)
    opts: InfluxOptions = match.params
    # Line protocol's default unit is the nanosecond.
    per = 1 if opts.timestamp_unit == "auto" else NS_PER[opts.timestamp_unit]
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
    settle(
        readings,
        before,
        problems,
        "no points with numeric fields",
        topic,
        payload,
        received_ns,
        rejected,
    )


FORMAT = Format(
    name="influx",
    summary="InfluxDB line protocol, one point per line",
    decode=decode,
    options=InfluxOptions,
    template_fields=frozenset({"measurement", "field"}),
    metric_from="payload",
    default_metric="{measurement}.{field}",
)
