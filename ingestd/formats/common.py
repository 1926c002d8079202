"""What several formats share: timestamps, JSON parsing, a message's end.

Pure functions: no I/O, no clock. They raise only `DecodeError`.
"""

from __future__ import annotations

import contextlib
import json
import math
from datetime import UTC, datetime
from typing import Any

import msgspec

from ingestd.errors import DecodeError
from ingestd.events import NS, Reading, Rejected

# Device clocks: 1970 .. 2255 (an int64 of nanoseconds ends in 2262). A larger
# number of seconds is almost always milliseconds or microseconds sent where
# seconds were expected.
TS_MAX = 9e9
TS_MAX_NS = 9_000_000_000 * NS
_json_decode = msgspec.json.Decoder().decode
# Nanoseconds per unit.
NS_PER = {"s": NS, "ms": 1_000_000, "us": 1_000, "ns": 1, "auto": NS}
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
        per = NS_PER.get(unit, NS)
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
    if ns >= TS_MAX_NS:
        raise DecodeError(too_large(raw))
    return ns


def too_large(raw: Any, unit_hint: bool = True) -> str:
    """`unit_hint`: the route has a timestamp_unit to point at (SenML's times
    are seconds by its RFC: it does not)."""
    hint = ": check the route's timestamp_unit" if unit_hint else ""
    return (
        f"timestamp {raw!r} is too large for a Unix time in the unit the route reads "
        f"(a finer unit sent?){hint}"
    )


def parse_json(payload: bytes) -> Any:
    try:
        doc = _json_decode(payload)
    except msgspec.DecodeError as exc:
        if payload.startswith(_BOM):
            # RFC 8259 8.1: a parser may ignore a byte order mark (checked only
            # when decoding failed: the common case pays nothing for it).
            return parse_json(payload[3:])
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
    if key_marks(payload) != keys:
        _check_unique_keys(payload, doc)
    return doc


_JSON_SPACE = b" \t\n\r"


def key_marks(payload: bytes) -> int:
    """How many times `"` is followed by `:`, JSON whitespace between them
    skipped: at least once for every key in the document (a string value can
    only add such marks), so a count equal to the keys decoded means no key
    was repeated, and no key's value was null where a decoder would not
    count one. Without skipping the whitespace, `"k" :` would go uncounted."""
    marks = payload.count(b'":')
    if payload.count(b":") == marks:
        return marks  # every colon right after a quote: none behind whitespace
    return payload.translate(None, _JSON_SPACE).count(b'":')


def _check_unique_keys(payload: bytes, doc: Any) -> None:
    """Reject an object that names a field twice, which a dict would silently
    collapse to its last value.

    Every key ends in `"`, whitespace, `:` (`key_marks`). A string value can
    only add such marks and a repeated key can only remove a decoded key, so
    when the marks equal the decoded keys, nothing was collapsed: the common
    case costs a count and a walk of the decoded objects. Otherwise the
    standard parser checks.
    """
    if key_marks(payload) == _count_keys(doc):
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


def json_type(value: Any) -> str:
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


def settle(
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
        raise DecodeError(join(problems) or nothing)
    number_repeats(readings, before, one_sensor)
    if problems:
        rejected.append(Rejected(topic, payload, join(problems), received_ns / NS))


def join(problems: list[str], most: int = 20) -> str:
    shown = "; ".join(problems[:most])
    if len(problems) > most:
        shown += f"; and {len(problems) - most} more"
    return shown
