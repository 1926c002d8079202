"""Rollups: per series and time bucket, what the raw readings add up to
(count, min, max, sum, first, last and, for counters, the increase), kept
with the readings' transaction (a counter's rows; a gauge's pending copy,
closed into them later), so a commit is raw + rollups or nothing.

One table, `rollups (width, series_id, bucket, ...)`, `width` the interval in
seconds and `bucket` its start in Unix seconds, aligned from the epoch; a view
per configured interval (`rollup_1m`, `rollup_1h`) joins the series.

How a batch keeps them (`Batch` of each engine): only the readings it
inserted count (a redelivery is never counted twice; a conflict, not stored,
not at all); the rest of the rows (`INSERT ... RETURNING`) were there.

- **Gauges** go to `rollup_pending`, one row per batch holding the batch's
  new readings (`ingestd.pending.pack`), in the batch's transaction: the raw readings and
  their pending copy commit together or not at all. Every `close_seconds`
  (or `close_readings` pending) the daemon *closes* them (`ingestd.closing`): a chunk
  of pending rows aggregated and merged into the stored rows (counts and sums
  added, min and max compared, first and last by time) in one transaction
  that deletes them. A fleet's series each get one row write per close
  instead of one per batch: in a wide fleet a batch holds one reading of each
  of thousands of series, and a row write per series and interval per batch
  cost more than the raw insert (about 3 us a row on SQLite, a page each).
  A dense batch (few series, many readings each: `ingestd.pending.dense`)
  merges its gauges' rows itself instead. Merges commute but for a tie of
  times, which first and last settle by their order (the earlier kept first,
  the later taken last): so a batch holding readings of one series and time
  (seq apart) leaves them pending, and instances close one at a time, oldest
  first.
  The stored rows lag the raw readings by up to a close; `ingestd query
  --every` adds what is pending, exactly; the views show what is closed.
- **Counters** (`[processor.kinds]`): the increase is the sum of the deltas
  between consecutive readings of the series in time order (`deltas`), each
  credited to the later reading's bucket. A batch reads its readings'
  neighbourhood (a few readings either side), and credits each bucket the
  difference its arrival made: late readings re-derive the deltas they sit
  between.

`rebuild` computes every bucket from the raw readings (`ingestd rollups rebuild`).
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, NamedTuple

NS = 1_000_000_000
# Readings either side of a batch's own that a counter's deltas are computed
# over: a reading's delta depends on the one before it and, through the
# glitch rule, the one after; these many leave a margin.
CONTEXT = 3

_INTERVAL = re.compile(r"^([1-9][0-9]*)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str) -> int:
    """'1m' -> 60, '1h' -> 3600 (seconds); ValueError if not N[smhd]."""
    m = _INTERVAL.match(text.strip())
    if not m:
        raise ValueError(f"{text!r}: expected a number and s, m, h or d (1m, 15m, 1h, 1d)")
    return int(m.group(1)) * _UNIT[m.group(2)]


def interval_name(width: int) -> str:
    """60 -> '1m': the largest unit that divides it (a view's suffix)."""
    for unit in ("d", "h", "m"):
        if width % _UNIT[unit] == 0:
            return f"{width // _UNIT[unit]}{unit}"
    return f"{width}s"


@dataclass(frozen=True)
class RollupPlan:
    """What a store keeps: the intervals (seconds, finest first), how long
    each is kept (days, 0: forever), and which metrics are counters."""

    widths: tuple[int, ...] = ()
    keep_days: dict[int, float] = field(default_factory=dict)
    counters: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.widths)

    def cutoffs(self, now: float) -> dict[int, int]:
        """Per width kept for a limited time, the first bucket start to keep."""
        return {
            w: int(now - days * 86400) // w * w
            for w, days in self.keep_days.items()
            if days > 0 and w in self.widths
        }


# One row: count, min, max, sum, first_ns, first, last_ns, last, increase.
Row = list[float]
Key = tuple[int, int, int]  # width, series_id, bucket


def add_sums(a: float, b: float) -> float:
    """A stored sum (or increase) and another merged into it: a sum already
    +-Infinity stays so (inf + -inf would be NaN, which SQLite stores as NULL
    and no sum in time order gives); past float8's range, +-Infinity."""
    return a if math.isinf(a) else a + b


def bucket_of(ts_ns: int, width: int) -> int:
    return ts_ns // (width * NS) * width


_STAMP, _VALUE = itemgetter(1), itemgetter(3)


def aggregate(
    records: Sequence[tuple[int, int, int, float]], widths: Sequence[int]
) -> dict[Key, Row]:
    """Rows for (series_id, ts_ns, seq, value) records, per width and bucket.

    A batch holds a few readings of each of its series, nearly always in one
    bucket: each series' readings are grouped, then reduced by C builtins
    (min, max, sum, index) instead of folded one by one, which cost a fifth
    of the daemon's time at 50 readings a message.
    A series spanning buckets is folded a reading at a time (`fold`); both
    give the same rows (in record order: the same sums, first and last)."""
    out: dict[Key, Row] = {}
    pers = [(w, w * NS) for w in widths]
    # A series' one record (the common case in a wide fleet: a batch holds
    # one reading of each of thousands of series), or its list of them.
    by_series: dict[int, Any] = {}
    for r in records:
        sid = r[0]
        own = by_series.get(sid)
        if own is None:
            by_series[sid] = r
        elif type(own) is list:
            own.append(r)
        else:
            by_series[sid] = [own, r]
    for sid, own in by_series.items():
        if type(own) is not list:
            ts, v = own[1], own[3]
            for width, per in pers:
                out[(width, sid, ts // per * width)] = [1, v, v, v, ts, v, ts, v, 0.0]
            continue
        # (zip(*own) allocates an iterator per record: in the daemon, with
        # its collector's work, that line alone cost more than the rest.)
        ts, vs = list(map(_STAMP, own)), list(map(_VALUE, own))
        lo, hi = min(ts), max(ts)
        whole: tuple[float, ...] = ()  # the series' row, for every width it fits in one bucket of
        for width, per in pers:
            if lo // per != hi // per:
                fold(out, sid, ts, vs, width)
                continue
            if not whole:
                n = len(ts)
                first = vs[ts.index(lo)]  # the first reading at the earliest time
                last = vs[n - 1 - ts[::-1].index(hi)]  # the last at the latest
                whole = (n, min(vs), max(vs), sum(vs), lo, first, hi, last, 0.0)
            out[(width, sid, lo // per * width)] = list(whole)
    return out


def fold(
    out: dict[Key, Row], sid: int, stamps: Sequence[int], values: Sequence[float], width: int
) -> None:
    """Add one series' readings (in record order) to `out`'s rows of `width`,
    a reading at a time."""
    per = width * NS
    for ts, v in zip(stamps, values, strict=True):
        key = (width, sid, ts // per * width)
        row = out.get(key)
        if row is None:
            out[key] = [1, v, v, v, ts, v, ts, v, 0.0]
            continue
        row[0] += 1
        row[1] = min(row[1], v)
        row[2] = max(row[2], v)
        row[3] += v
        if ts < row[4]:
            row[4], row[5] = ts, v
        if ts >= row[6]:
            row[6], row[7] = ts, v


def deltas(values: Sequence[float]) -> list[float]:
    """The increase each reading of a counter adds, in time order (the first's
    is 0: it has nothing before it here).

    A reading at or above the level (the last reading that was not a glitch)
    adds the difference. A drop is a reset (the counter restarted from 0: the
    reading adds its whole value, or nothing if it is below 0), unless the
    next reading is back at or above the level: then it was a glitch, adds 0
    and does not move the level (a meter that reads 0 once between 1000 and
    1001 added 1, not 1001). A drop with no reading after it yet counts as a
    reset until one comes.
    """
    out = [0.0] * len(values)
    if not values:
        return out
    level = values[0]
    last = len(values) - 1
    for i in range(1, len(values)):
        v = values[i]
        if v >= level:
            out[i] = v - level
            level = v
        elif i < last and values[i + 1] >= level:
            out[i] = 0.0  # a glitch
        else:
            out[i] = max(v, 0.0)  # a reset: from 0 (a value below it adds nothing)
            level = v
    return out


# A counter's reading in a window: (ts_ns, seq, value), in time order.
Point = tuple[int, int, float]


def _ts(point: Point) -> int:
    return point[0]


def increases(window: Sequence[Point], widths: Sequence[int], sid: int) -> dict[Key, float]:
    """Per bucket, the increase the readings of `window` add, the first
    reading being context only."""
    out: dict[Key, float] = {}
    if not window:
        return out
    steps = deltas([v for _, _, v in window])
    if not any(steps):
        return out
    lo, hi = window[0][0], window[-1][0]
    for width in widths:
        per = width * NS
        if lo // per == hi // per:  # the window in one bucket (in time order)
            out[(width, sid, lo // per * width)] = sum(steps)
            continue
        for (ts, _, _), d in zip(window, steps, strict=True):
            if d:
                key = (width, sid, ts // per * width)
                out[key] = out.get(key, 0.0) + d
    return out


def counter_points(
    records: Iterable[tuple[int, int, int, float]], counters: set[int]
) -> dict[int, list[Point]]:
    """A batch's own readings of each counter series, (ts_ns, seq, value) in
    time order."""
    out: dict[int, list[Point]] = {}
    for sid, ts, seq, v in records:
        if sid in counters:
            own = out.get(sid)
            if own is None:
                out[sid] = [(ts, seq, v)]
            else:
                own.append((ts, seq, v))
    for own in out.values():
        own.sort()
    return out


def window_of(
    own: list[Point], before: list[Point], inside: int, after: list[Point]
) -> list[Point] | None:
    """A series' window around a batch's own readings (in time order), from
    the CONTEXT readings stored before and after them and the number stored
    in their time range; None if that range holds readings of others (then
    the range is read whole)."""
    if inside != len(own):
        return None
    return [*sorted(before), *own, *sorted(after)]


def increase_changes(
    window: Sequence[Point], own: Sequence[Point], widths: Sequence[int], sid: int
) -> dict[Key, float]:
    """What a batch's arrival changed in each bucket's increase: `window` the
    series' readings around the batch's (its own included, in time order),
    `own` the batch's own (in time order). The difference between the deltas
    with and without them, computed from the same first reading."""
    after = increases(window, widths, sid)
    start = bisect_left(window, own[0][0], key=_ts)
    end = bisect_right(window, own[-1][0], key=_ts)
    if end - start == len(own):
        # Nothing else stored in the batch's time range (the common case: a
        # series read in time order): the window without it is what is around.
        without = [*window[:start], *window[end:]]
    else:
        new = {(p[0], p[1]) for p in own}
        without = [p for p in window if (p[0], p[1]) not in new]
    before = increases(without, widths, sid)
    changes = {k: v - before.get(k, 0.0) for k, v in after.items()}
    for k, v in before.items():
        if k not in after:
            changes[k] = -v
    return {k: v for k, v in changes.items() if v}


class Rebuild:
    """Every bucket's row from raw (series_id, ts_ns, value) rows fed in
    (series_id, ts_ns, seq) order, a chunk at a time: a bucket is given back
    once the rows have moved past it. `counters`: the series that are
    counters (a counter's first row adds nothing: feed the readings before
    it first). The rule of `deltas`, a reading at a time."""

    def __init__(self, widths: Sequence[int], counters: set[int]) -> None:
        self.widths = widths
        self.per = [w * NS for w in widths]
        self.counters = counters
        self.sid: int | None = None
        self.open: list[tuple[int, Row] | None] = [None] * len(widths)
        self.level: float | None = None
        self.pending: tuple[int, float] | None = None  # a drop: a glitch or a reset
        self.counter = False
        self.out: list[tuple[Key, Row]] = []

    def _credit(self, ts: int, d: float) -> None:
        for k, w in enumerate(self.widths):
            current = self.open[k]
            if current is not None and current[0] == ts // self.per[k] * w:
                current[1][8] += d

    def _flush(self, k: int) -> None:
        current = self.open[k]
        if current is not None and self.sid is not None:
            row: list[Any] = current[1]
            if not self.counter:
                row[8] = None
            self.out.append(((self.widths[k], self.sid, current[0]), row))
        self.open[k] = None

    def _end_series(self) -> None:
        if self.pending is not None:  # a drop with nothing after it: a reset
            self._credit(self.pending[0], max(self.pending[1], 0.0))
            self.pending = None
        for k in range(len(self.widths)):
            self._flush(k)

    def feed(self, rows: Iterable[tuple[int, int, float]]) -> list[tuple[Key, Row]]:
        for s, ts, v in rows:
            if s != self.sid:
                self._end_series()
                self.sid, self.counter = s, s in self.counters
                self.level = None
            if self.pending is not None:  # decided by this reading
                assert self.level is not None
                if v < self.level:
                    self._credit(self.pending[0], max(self.pending[1], 0.0))  # a reset
                    self.level = self.pending[1]
                self.pending = None
            self._add(ts, v)
            if not self.counter:
                continue
            if self.level is None:
                self.level = v
            elif v >= self.level:
                self._credit(ts, v - self.level)
                self.level = v
            else:
                self.pending = (ts, v)
        out, self.out = self.out, []
        return out

    def _add(self, ts: int, v: float) -> None:
        for k, w in enumerate(self.widths):
            bucket = ts // self.per[k] * w
            current = self.open[k]
            if current is None or current[0] != bucket:
                self._flush(k)
                self.open[k] = (bucket, [1, v, v, v, ts, v, ts, v, 0.0])
                continue
            row = current[1]
            row[0] += 1
            row[1] = min(row[1], v)
            row[2] = max(row[2], v)
            row[3] += v
            row[6], row[7] = ts, v  # in time order: the last so far

    def finish(self) -> list[tuple[Key, Row]]:
        self._end_series()
        out, self.out = self.out, []
        return out


def view(width: int) -> str:
    """The query of view `rollup_<interval>` (the same on every engine)."""
    return (
        "SELECT s.sensor, s.metric, s.tags, s.unit, r.bucket, r.n AS count, r.min, r.max, "
        "r.sum / r.n AS mean, r.sum, r.first_value AS first, r.last_value AS last, r.increase "
        f"FROM rollups AS r JOIN series AS s ON s.id = r.series_id WHERE r.width = {int(width)}"
    )


# Readings stored and no rollup at all: a database from before rollups.
NEEDS_REBUILD = (  # series, not samples: cheap, and reads no page of the big table
    "SELECT EXISTS (SELECT 1 FROM series) AND NOT EXISTS (SELECT 1 FROM rollups) "
    "AND NOT EXISTS (SELECT 1 FROM rollup_pending)"  # a crash before the first close
)


class RollupRow(NamedTuple):
    sensor: str
    metric: str
    tags: str
    unit: str
    bucket: int  # its start, Unix seconds
    n: int  # readings in it (shown as "count")
    min: float
    max: float
    sum: float
    first: float
    last: float
    increase: float | None  # counters only
    first_ns: int
    last_ns: int


# What the readers select of rollups (the same columns on every engine).
ROLLUP_COLUMNS = (
    "s.sensor, s.metric, s.tags, s.unit, r.bucket, r.n, r.min, r.max, r.sum, r.first_value, "
    "r.last_value, r.increase, r.first_ns, r.last_ns"
)
ROLLUP_FROM = "FROM rollups AS r JOIN series AS s ON s.id = r.series_id"
ROLLUP_ORDER = "r.bucket, s.sensor, s.metric, s.tags, s.unit"
