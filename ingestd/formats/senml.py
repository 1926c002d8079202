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

import msgspec

from ingestd.errors import DecodeError
from ingestd.events import NS, Reading, Rejected
from ingestd.formats.base import Format
from ingestd.formats.common import TS_MAX, TS_MAX_NS, parse_json, settle, too_large
from ingestd.recent import RecentCache

if TYPE_CHECKING:
    from ingestd.formats.base import DecodeContext, RouteMatch

RELATIVE_LIMIT = 2**28  # RFC 8428 4.5.3
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-:./_]*")  # the whole name (fullmatch)
_KNOWN = frozenset(
    ("bn", "bt", "bu", "bv", "bs", "bver", "n", "u", "v", "vs", "vb", "vd", "s", "t", "ut")
)
_BASE = frozenset(("bn", "bt", "bu", "bv", "bs", "bver"))
_SIMPLE = frozenset(("n", "t", "v", "u"))
# Names already found valid (the regex costs more than the rest of a record),
# the most recently used.
_NAMES_KEPT = 65536
_NAMES_SEEN: RecentCache[str, bool] = RecentCache(_NAMES_KEPT)
SENML_VERSION = 10


class SenmlRecord:
    """`name`: the resolved name (bn + n); `record`: the record's own n."""

    __slots__ = ("name", "record", "sum", "time", "unit", "value")

    def __init__(
        self,
        name: str,
        time: float,
        unit: str,
        value: float | None,
        sum_: float | None,
        record: str = "",
    ) -> None:
        self.name, self.time, self.unit, self.value, self.sum = name, time, unit, value, sum_
        self.record = record


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


def _finite(raw: Any, key: str, i: int) -> float:
    """`_number` for a value known to be there, types checked first (JSON
    numbers are exactly int or float; a bool is neither)."""
    kind = type(raw)
    if kind is float:
        if raw - raw != 0.0:  # inf - inf and nan - nan are nan
            raise DecodeError(f"record {i}: {key!r} is not a finite number")
        return float(raw)
    if kind is int:
        try:
            return float(raw)
        except OverflowError:
            raise DecodeError(f"record {i}: {key!r} is not a finite number") from None
    raise DecodeError(f"record {i}: {key!r} must be a number")


def _check_name(name: str, i: int) -> None:
    """Raise for a name SenML does not allow; remember the good ones."""
    if not name:
        raise DecodeError(f"record {i} has no name (n or bn)")
    if not _NAME.fullmatch(name):
        raise DecodeError(f"record {i}: name {name[:64]!r} has characters SenML does not allow")
    _NAMES_SEEN[name] = True


def _string(record: dict[str, Any], key: str, i: int) -> str | None:
    raw = record.get(key)
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise DecodeError(f"record {i}: {key!r} must be a string")
    return raw


class _Base:
    """The base fields in force (RFC 8428 4.1): each applies to its record and
    every later one until a record replaces it."""

    __slots__ = ("name", "sum", "time", "unit", "value")

    def __init__(self) -> None:
        self.name, self.time, self.unit, self.value, self.sum = "", 0.0, "", 0.0, 0.0


def resolve(pack: Any, now: float, problems: list[str]) -> list[SenmlRecord]:
    """Resolve a decoded SenML pack. Raises DecodeError for a pack that must be
    rejected whole; appends per-record problems to `problems`."""
    if not isinstance(pack, list):
        raise DecodeError("SenML pack must be a JSON array of records")
    if not pack:
        raise DecodeError("SenML pack is empty")
    base = _Base()
    out: list[SenmlRecord] = []
    for i, record in enumerate(pack):
        if not isinstance(record, dict):
            raise DecodeError(f"record {i} is not an object")
        common = record.keys() <= _SIMPLE
        if not common:
            _refuse_must_understand(record, i)
        try:
            if common:
                resolved = _common_record(record, i, base, now)
            else:
                _apply_base_fields(record, i, base)
                resolved = _record(record, i, base, now)
        except DecodeError as exc:
            problems.append(str(exc))
            continue
        if resolved is not None:
            out.append(resolved)
    return out


def _common_record(record: dict[str, Any], i: int, base: _Base, now: float) -> SenmlRecord | None:
    """The common record (n, t, v, u at most; base fields from before): the
    same checks in the same order as `_record`, without the rest. None for
    `{}`, which yields nothing, as a record of base fields only."""
    n = record.get("n")
    if n is None:
        n, name = "", base.name
    elif type(n) is str:
        name = base.name + n
    else:
        raise DecodeError(f"record {i}: 'n' must be a string")
    if name not in _NAMES_SEEN:
        _check_name(name, i)
    elif _NAMES_SEEN.warm:
        _NAMES_SEEN.move_to_end(name)
    raw = record.get("t")
    t = base.time if raw is None else base.time + _finite(raw, "t", i)
    time = now + t if t < RELATIVE_LIMIT else t
    u = record.get("u")
    if u is None:
        unit = base.unit
    elif type(u) is str:
        unit = u
    else:
        raise DecodeError(f"record {i}: 'u' must be a string")
    raw = record.get("v")
    if raw is None:
        if not record:
            return None
        raise DecodeError(f"record {i} ({name}) has no value")
    value = _finite(raw, "v", i)
    if base.value:  # bv + v; else v as sent (0.0 + -0.0 would lose its sign)
        value += base.value
    if time < 0 or not math.isfinite(time):
        raise DecodeError(f"record {i}: time {time!r} is out of range")
    return SenmlRecord(name, time, unit, value, None, n)


def _refuse_must_understand(record: dict[str, Any], i: int) -> None:
    """Reject the whole pack for a field ending in `_` this decoder does not
    know (RFC 8428 4.4: such a field must not be ignored)."""
    for key in record:
        if key not in _KNOWN and key.endswith("_"):
            raise DecodeError(
                f"record {i}: must-understand field {key!r} is not supported (RFC 8428 4.4)"
            )


def _apply_base_fields(record: dict[str, Any], i: int, base: _Base) -> None:
    """Replace the base fields this record sets, in order: one that fails
    leaves those before it replaced."""
    if "bver" in record:
        ver = _number(record, "bver", i)
        if ver is None or ver != int(ver) or ver > SENML_VERSION:
            raise DecodeError(f"record {i}: unsupported SenML version {record['bver']!r}")
    if "bn" in record:
        base.name = _string(record, "bn", i) or ""
    if "bt" in record:
        base.time = _number(record, "bt", i) or 0.0
    if "bu" in record:
        base.unit = _string(record, "bu", i) or ""
    if "bv" in record:
        base.value = _number(record, "bv", i) or 0.0
    if "bs" in record:
        base.sum = _number(record, "bs", i) or 0.0


def _record(record: dict[str, Any], i: int, base: _Base, now: float) -> SenmlRecord | None:
    """Any record, resolved against the base fields in force: its name, time,
    unit, value (v, or vb as 1/0) and sum. None for a record that only sets
    base fields."""
    n = _string(record, "n", i) or ""
    name = base.name + n
    if name not in _NAMES_SEEN:
        _check_name(name, i)
    elif _NAMES_SEEN.warm:
        _NAMES_SEEN.move_to_end(name)
    t = base.time + (_number(record, "t", i) or 0.0)
    time = now + t if t < RELATIVE_LIMIT else t
    unit = _string(record, "u", i)
    unit = base.unit if unit is None else unit
    v = _number(record, "v", i)
    value = v + base.value if v is not None and base.value else v  # as `_common_record`
    vb = record.get("vb")
    if vb is not None:
        if type(vb) is not bool:
            raise DecodeError(f"record {i}: 'vb' must be true or false")
        if value is not None:
            raise DecodeError(f"record {i} has more than one value field")
        value = 1.0 if vb else 0.0
    s = _number(record, "s", i)
    total = base.sum + s if s is not None else None
    if "vs" in record or "vd" in record:
        if value is not None:
            raise DecodeError(f"record {i} has more than one value field")
        if total is None:
            kind = "string" if "vs" in record else "data"
            raise DecodeError(f"record {i} ({name}): a {kind} value is not a number")
    if value is None and total is None:
        if set(record) <= _BASE:
            return None
        raise DecodeError(f"record {i} ({name}) has no value")
    if time < 0 or not math.isfinite(time):
        raise DecodeError(f"record {i}: time {time!r} is out of range")
    return SenmlRecord(name, time, unit, value, total, n)


class _Simple(msgspec.Struct, forbid_unknown_fields=True):
    """A record of the common kind: base name, time and unit, name, time,
    unit, value. Any other field (or a wrong type) fails the typed decode and
    the pack takes the general path."""

    bn: str | None = None
    bt: float | None = None
    bu: str | None = None
    n: str | None = None
    t: float | None = None
    u: str | None = None
    v: float | None = None


_SIMPLE_PACK = msgspec.json.Decoder(list[_Simple])


def _simple_readings(
    payload: bytes, now: float, match: RouteMatch, topic: str
) -> list[Reading] | None:
    """The pack's readings, when every record is of the common kind and fine:
    decoded by type (in C) and made into readings in one pass. None sends it
    the general way (`resolve`), which then finds and words any problem
    exactly as it always has."""
    try:
        pack = _SIMPLE_PACK.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    if not pack:
        return None
    quotes = 0  # the quotes of the keys and strings decoded: 2 each
    bn, bt, bu = "", 0.0, ""
    out: list[Reading] = []
    isfinite = math.isfinite
    seen, sensor, tags = _NAMES_SEEN, match.sensor, match.tags
    prefix, suffix = match.metric_prefix, match.metric_suffix
    for r in pack:
        if r.bn is not None:
            bn = r.bn
            quotes += 4
        if r.bt is not None:
            bt = r.bt
            quotes += 2
            if not isfinite(bt):
                return None  # e.g. 1e400: a problem, worded by resolve()
        if r.bu is not None:
            bu = r.bu
            quotes += 4
        name = bn if r.n is None else bn + r.n
        if name not in seen:
            try:
                _check_name(name, 0)
            except DecodeError:
                return None  # a problem, worded by resolve()
        elif seen.warm:
            seen.move_to_end(name)
        v = r.v
        if v is None:
            if r.n is not None or r.t is not None or r.u is not None:
                return None  # no value: a problem, worded by resolve()
            continue  # base fields only
        t = bt if r.t is None else bt + r.t
        time = now + t if t < RELATIVE_LIMIT else t
        if not isfinite(v) or not isfinite(t) or time < 0:
            return None
        # To the microsecond, as `_append`; a time too large is a problem.
        if time >= TS_MAX or (when := round(time * 1e6) * 1000) >= TS_MAX_NS:
            return None
        quotes += 2 + 4 * (r.n is not None) + 2 * (r.t is not None) + 4 * (r.u is not None)
        unit = bu if r.u is None else r.u
        out.append(Reading(sensor, prefix + name + suffix, when, v, topic, tags, unit))
    # Each key once (what parse_json checks), whatever the whitespace: a key
    # repeated, or null, or a string holding an escaped quote, puts quotes in
    # the payload that the decoded records do not account for (none can take
    # one away), and the general path decides.
    if payload.count(b'"') != quotes:
        return None
    return out


def _append(
    records: list[SenmlRecord],
    match: RouteMatch,
    topic: str,
    readings: list[Reading],
    problems: list[str],
) -> None:
    """Resolved records as readings of the route's sensor."""
    prefix, suffix, sensor, tags = (
        match.metric_prefix,
        match.metric_suffix,
        match.sensor,
        match.tags,
    )
    # A template with {record} (the record's name without the base name) is
    # formatted per record; else the metric is prefix + resolved name + suffix.
    by_record = "{record}" in match.metric_template
    for rec in records:
        # resolve() checked the time is finite and >= 0; to the microsecond
        # (1e302 s is finite, but not in microseconds), as `_simple_readings`.
        if rec.time >= TS_MAX or (when := round(rec.time * 1e6) * 1000) >= TS_MAX_NS:
            problems.append(f"{rec.name}: {too_large(rec.time, unit_hint=False)}")
            continue
        if by_record:
            metric = match.metric_template.format_map(
                {**match.values, "field": rec.name, "record": rec.record or rec.name}
            )
        else:
            metric = prefix + rec.name + suffix
        if rec.value is not None:
            readings.append(Reading(sensor, metric, when, rec.value, topic, tags, rec.unit))
        if rec.sum is not None:
            readings.append(Reading(sensor, metric + "_sum", when, rec.sum, topic, tags, rec.unit))


def decode(
    ctx: DecodeContext,
    match: RouteMatch,
    topic: str,
    payload: bytes,
    received_ns: int,
    readings: list[Reading],
    rejected: list[Rejected],
) -> None:
    problems: list[str] = []
    now = received_ns / NS
    before = len(readings)
    # The common pack in one pass; a template with {record} (the record's own
    # name), or any pack the typed path declines, the general way.
    fast = (
        None
        if "{record}" in match.metric_template
        else _simple_readings(payload, now, match, topic)
    )
    if fast is not None:
        readings += fast
    else:
        _append(resolve(parse_json(payload), now, problems), match, topic, readings, problems)
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
    template_fields=frozenset({"field", "record"}),
    metric_from="field",
    default_metric="{field}",
    metric_requires=("field", "record"),
)
