"""The rollups' pending readings (`ingestd.rollups`): a batch's gauge readings
as one `rollup_pending` row's bytes, and what readers add of them to the
stored rows (`ingestd query --every`: the rows as they will be once closed).
"""

from __future__ import annotations

import heapq
import itertools
import sys
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from operator import attrgetter, itemgetter
from random import Random
from typing import Any

from ingestd.rollups import NS, Key, RollupRow, Row, add_sums, aggregate

PENDING = "SELECT records FROM rollup_pending ORDER BY id"
_SERIES, _SEQ = itemgetter(0), itemgetter(2)


# A batch whose gauges make at most one rollup row per DENSE readings (few
# series, many readings each: JSON arrays, a narrow fleet's backlog) merges
# its rows itself, as cheap as it gets; a sparser one leaves its readings
# pending (a row a series and interval per batch cost more than the readings).
DENSE = 4


def dense(records: Sequence[tuple[int, int, int, float]], widths: int) -> bool:
    """Few enough rows for `records` to merge them in the batch?

    Not if one has a `seq` above 0: it shares its series and time with a
    reading of the same message, perhaps one stored earlier and still
    pending, and a row's first and last settle a tie of times by the order
    of merges (the earlier kept first, the later taken last), which is the
    readings' order only if they go the same way: pending, closed in order."""
    if any(map(_SEQ, records)):
        return False
    return len(set(map(_SERIES, records))) * widths * DENSE <= len(records)


def drained(pending: int, closed: int) -> int:
    """This process's pending count after a close: none closed means none
    was left to take (another instance or a tool may have closed what this
    one wrote), so the count starts again at 0."""
    return 0 if closed == 0 else max(0, pending - closed)


def pack(records: Sequence[tuple[int, int, int, float]]) -> bytes:
    """Records (series_id, ts_ns, seq, value) as one pending row's bytes:
    the four columns as arrays, little-endian (8 bytes each)."""
    cols: list[array[Any]] = [
        array("q", [r[0] for r in records]),
        array("q", [r[1] for r in records]),
        array("q", [r[2] for r in records]),
        array("d", [r[3] for r in records]),
    ]
    if sys.byteorder == "big":  # pragma: no cover - every platform ingestd runs on is little
        for c in cols:
            c.byteswap()
    return b"".join(c.tobytes() for c in cols)


def unpack(data: bytes) -> list[tuple[int, int, int, float]]:
    """`pack`'s records again."""
    return list(zip(*columns(data), strict=True))


def columns(data: bytes) -> list[array[Any]]:
    """`pack`'s four columns again."""
    n = len(data) // 32
    out = []
    for k, code in enumerate("qqqd"):
        c = array(code)
        c.frombytes(data[k * 8 * n : (k + 1) * 8 * n])
        if sys.byteorder == "big":  # pragma: no cover
            c.byteswap()
        out.append(c)
    return out


def merged(g: RollupRow, r: RollupRow) -> RollupRow:
    """Two rows of one series and bucket as one (`g` the earlier: it keeps
    first on a tie of times, `r` last, as the stored merge does)."""
    return g._replace(
        n=g.n + r.n,
        min=min(g.min, r.min),
        max=max(g.max, r.max),
        sum=add_sums(g.sum, r.sum),
        first=g.first if g.first_ns <= r.first_ns else r.first,
        first_ns=min(g.first_ns, r.first_ns),
        last=r.last if r.last_ns >= g.last_ns else g.last,
        last_ns=max(g.last_ns, r.last_ns),
        increase=None if g.increase is None else add_sums(g.increase, r.increase or 0.0),
    )


SeriesKey = tuple[str, str, str, str]  # sensor, metric, tags, unit


def pending_rows(
    records: Iterable[tuple[int, int, int, float]],
    width: int,
    since: int,
    until: int,
    series: dict[int, SeriesKey],
) -> list[RollupRow]:
    """Pending readings (`unpack`ed) of `series` with buckets of `width` in
    [since, until), as one-reading rows, by bucket and time."""
    per = width * NS
    out = [
        RollupRow(*series[sid], ts // per * width, 1, v, v, v, v, v, None, ts, ts)
        for sid, ts, _, v in records
        if sid in series and since * NS <= ts // per * per < until * NS
    ]
    out.sort(key=lambda r: (r.bucket, r.first_ns))
    return out


def pending_of(
    blobs: Iterable[Sequence[Any]],
    width: int,
    since: int,
    until: int,
    lookup: Callable[[list[int]], Iterable[Sequence[Any]]],
) -> list[RollupRow]:
    """A reader's pending rows (`pending_rows`) from the `PENDING` rows it
    read; `lookup(ids)`: (id, sensor, metric, tags, unit) of those of the ids
    its filter keeps."""
    records = [r for (blob,) in blobs for r in unpack(blob)]
    ids = sorted({r[0] for r in records})
    if not ids:
        return []
    series = {int(i): (a, b, c, d) for i, a, b, c, d in lookup(ids)}
    return pending_rows(records, width, since, until, series)


def with_pending(
    stored: Iterable[RollupRow], pending: list[RollupRow], limit: int | None
) -> Iterable[RollupRow]:
    """Stored rows (by bucket) with the pending readings' merged in: what
    they will be once closed. Within a bucket, by series."""
    if not pending:
        return stored
    rows = _merge_by_bucket(heapq.merge(stored, pending, key=_BUCKET))
    return itertools.islice(rows, limit) if limit else rows


_BUCKET = attrgetter("bucket")


def _merge_by_bucket(rows: Iterable[RollupRow]) -> Iterator[RollupRow]:
    groups: dict[SeriesKey, RollupRow] = {}
    current: int | None = None
    for r in rows:
        if r.bucket != current:
            yield from (groups[k] for k in sorted(groups))
            groups, current = {}, r.bucket
        key = (r.sensor, r.metric, r.tags, r.unit)
        g = groups.get(key)
        groups[key] = r if g is None else merged(g, r)
    yield from (groups[k] for k in sorted(groups))


# Readings a piece of a close aggregates at once, about (a piece holds whole
# series): the rows in memory at a time are a piece's, whatever the close's
# size. Measured in bench.fleet, against 4,096: peak RSS 1-1.5 MB lower (narrow
# fleet) and 2-8 MB (wide), the same speed.
PIECE = 1024


class Closing:
    """A close's pending readings, added a pending row at a time (its bytes
    dropped as it is copied in), then `pieces`."""

    def __init__(self) -> None:
        self.columns: list[array[Any]] = [array("q"), array("q"), array("q"), array("d")]

    def add(self, blob: bytes) -> int:
        """A pending row's readings added; how many."""
        for column, part in zip(self.columns, columns(blob), strict=True):
            column.extend(part)
        return len(blob) // 32

    def pieces(self, widths: Sequence[int]) -> Iterator[dict[Key, Row]]:
        """The close's rows, a range of series at a time: every series'
        readings aggregated in one piece, in the order they were pending (the
        order of their merges, which settles a tie of times), so each (series,
        bucket) is one row however many pending rows hold it. A wide fleet's
        close of N readings is then a row per series and bucket, not one per
        pending row it spans. Memory: the readings as arrays (40 bytes each)
        and a piece's rows, not the close's."""
        sids, stamps, seqs, values = self.columns
        n = len(sids)
        parts = -(-n // PIECE)
        # Ranges of series ids holding about PIECE readings each, from a sample
        # (ids are not spread evenly: a long-lived store's active ones cluster).
        sample = sorted(sids[i] for i in Random(n).sample(range(n), min(n, parts * 16)))
        bounds = sorted({sample[len(sample) * k // parts] for k in range(1, parts)})
        pieces = [array("q") for _ in range(len(bounds) + 1)]
        for i, sid in enumerate(sids):
            pieces[bisect_right(bounds, sid)].append(i)
        for piece in pieces:
            if piece:
                records = [(sids[i], stamps[i], seqs[i], values[i]) for i in piece]
                yield aggregate(records, widths)
