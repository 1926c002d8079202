"""SenML JSON (RFC 8428): a pack of records, resolved as section 4.6 says.

Base fields (`bn`, `bt`, `bu`, `bv`, `bs`, `bver`) apply to their record and
every later one until replaced. A record resolves to: name = bn + n, time =
bt + t (a result below 2**28 is relative to now, in seconds), unit = u or bu,
value = bv + v, or vb as 1/0, and sum = bs + s (stored as metric
`<name>_sum`). String (`vs`) and data (`vd`) values are not numbers: such a
record is reported as a problem and the others are kept. A field ending in
`_` that this decoder does not know must not be ignored (RFC 8428 4.4): the
whole pack is rejected.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from ingestd.errors import DecodeError
from ingestd.events import NS, Reading, Rejected
from ingestd.formats.base import Format
from ingestd.formats.common import TS_MAX_NS, parse_json, settle, too_large

if TYPE_CHECKING:
    from ingestd.routes import RouteMatch, RouteTable

RELATIVE_LIMIT = 2**28  # RFC 8428 4.5.3
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-:./_]*$")
_KNOWN = frozenset(
    ("bn", "bt", "bu", "bv", "bs", "bver", "n", "u", "v", "vs", "vb", "vd", "s", "t", "ut")
)
_BASE = frozenset(("bn", "bt", "bu", "bv", "bs", "bver"))
SENML_VERSION = 10


class SenmlRecord:
    __slots__ = ("name", "sum", "time", "unit", "value")

    def __init__(
        self, name: str, time: float, unit: str, value: float | None, sum_: float | None
    ) -> None:
        self.name, self.time, self.unit, self.value, self.sum = name, time, unit, value, sum_


def _number(record: dict[str, Any], key: str, i: int) -> float | None:
    raw = record.get(key)
    if raw is None:
        return None
    if type(raw) is bool or not isinstance(raw, int | float):
        raise DecodeError(f"record {i}: {key!r} must be a number")
    try:
        value = float(raw)
    except OverflowError:
        raise DecodeError(f"record {i}: {key!r} is not a finite number") from None
    if not math.isfinite(value):
        raise DecodeError(f"record {i}: {key!r} is not a finite number")
    return value


def _string(record: dict[str, Any], key: str, i: int) -> str | None:
    raw = record.get(key)
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise DecodeError(f"record {i}: {key!r} must be a string")
    return raw


def resolve(pack: Any, now: float, problems: list[str]) -> list[SenmlRecord]:
    """Resolve a decoded SenML pack. Raises DecodeError for a pack that must be
    rejected whole; appends per-record problems to `problems`."""
    if not isinstance(pack, list):
        raise DecodeError("SenML pack must be a JSON array of records")
    if not pack:
        raise DecodeError("SenML pack is empty")
    bn, bt, bu, bv, bs = "", 0.0, "", 0.0, 0.0
    out: list[SenmlRecord] = []
    for i, record in enumerate(pack):
        if not isinstance(record, dict):
            raise DecodeError(f"record {i} is not an object")
        for key in record:
            if key not in _KNOWN and key.endswith("_"):
                raise DecodeError(
                    f"record {i}: must-understand field {key!r} is not supported (RFC 8428 4.4)"
                )
        try:
            if "bver" in record:
                ver = _number(record, "bver", i)
                if ver is None or ver != int(ver) or ver > SENML_VERSION:
                    raise DecodeError(f"record {i}: unsupported SenML version {record['bver']!r}")
            if "bn" in record:
                bn = _string(record, "bn", i) or ""
            if "bt" in record:
                bt = _number(record, "bt", i) or 0.0
            if "bu" in record:
                bu = _string(record, "bu", i) or ""
            if "bv" in record:
                bv = _number(record, "bv", i) or 0.0
            if "bs" in record:
                bs = _number(record, "bs", i) or 0.0
            name = bn + (_string(record, "n", i) or "")
            if not name:
                raise DecodeError(f"record {i} has no name (n or bn)")
            if not _NAME.match(name):
                raise DecodeError(
                    f"record {i}: name {name[:64]!r} has characters SenML does not allow"
                )
            t = bt + (_number(record, "t", i) or 0.0)
            time = now + t if t < RELATIVE_LIMIT else t
            unit = _string(record, "u", i)
            unit = bu if unit is None else unit
            v = _number(record, "v", i)
            value = bv + v if v is not None else None
            vb = record.get("vb")
            if vb is not None:
                if type(vb) is not bool:
                    raise DecodeError(f"record {i}: 'vb' must be true or false")
                if value is not None:
                    raise DecodeError(f"record {i} has more than one value field")
                value = 1.0 if vb else 0.0
            s = _number(record, "s", i)
            total = bs + s if s is not None else None
            if "vs" in record or "vd" in record:
                if value is not None:
                    raise DecodeError(f"record {i} has more than one value field")
                if total is None:
                    kind = "string" if "vs" in record else "data"
                    raise DecodeError(f"record {i} ({name}): a {kind} value is not a number")
            if value is None and total is None:
                if set(record) <= _BASE:
                    continue  # a record that only sets base fields
                raise DecodeError(f"record {i} ({name}) has no value")
            if time < 0 or not math.isfinite(time):
                raise DecodeError(f"record {i}: time {time!r} is out of range")
        except DecodeError as exc:
            problems.append(str(exc))
            continue
        out.append(SenmlRecord(name, time, unit, value, total))
    return out


def decode(
    table: RouteTable,
    match: RouteMatch,
    topic: str,
    payload: bytes,
    received_ns: int,
    readings: list[Reading],
    rejected: list[Rejected],
) -> None:
    problems: list[str] = []
    records = resolve(parse_json(payload), received_ns / NS, problems)
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
        if when >= TS_MAX_NS:
            problems.append(f"{rec.name}: {too_large(rec.time, unit_hint=False)}")
            continue
        metric = prefix + rec.name + suffix
        if rec.value is not None:
            readings.append(Reading(sensor, metric, when, rec.value, topic, tags, rec.unit))
        if rec.sum is not None:
            readings.append(Reading(sensor, metric + "_sum", when, rec.sum, topic, tags, rec.unit))
    settle(
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


FORMAT = Format(
    name="senml",
    summary="SenML JSON (RFC 8428) packs, base fields resolved",
    decode=decode,
    template_fields=frozenset({"field"}),
    metric_from="field",
    default_metric="{field}",
)
