"""`ingestd query --every`: history from the rollups (`ingestd.rollups`),
in the same output formats as the raw readings."""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence

from ingestd.errors import DataCommandError
from ingestd.events import NS
from ingestd.pending import merged
from ingestd.rollups import RollupRow, interval_name, parse_interval
from ingestd.store.base import Reader
from ingestd.tools.report import Table, iso_ns, tag_pairs


def from_args(
    reader: Reader, args: argparse.Namespace, widths: Sequence[int], since: float, until: float
) -> Table:
    """`query --every` with the command line's options."""
    return rollup_query(
        reader, args.sensor, args.metric, since, until, args.every, widths, args.limit, args.tag
    )


def rollup_query(
    reader: Reader,
    sensor: str | None,
    metric: str | None,
    since: float,
    until: float,
    every: str,
    widths: Sequence[int],
    limit: int | None = None,
    tags: Sequence[str] = (),
) -> Table:
    """`query --every`: one row per series and bucket of `every`, from the
    rollups of that interval, or summed from a finer one that divides it."""
    try:
        width = parse_interval(every)
    except ValueError as exc:
        raise DataCommandError(f"--every {exc}") from None
    pairs = tag_pairs(sensor, tags)
    finer = [w for w in widths if width % w == 0]
    if not finer:
        names = ", ".join(interval_name(w) for w in widths) or "none ([rollups] is off)"
        raise DataCommandError(
            f"--every {every}: no rollup interval divides it (kept: {names}); "
            "add it to [rollups] intervals and run 'ingestd rollups rebuild'"
        )
    base = max(finer)
    start = int(since) // width * width
    rows = reader.rollup_rows(
        sensor, metric, base, start, math.ceil(until), None if base != width else limit, pairs
    )
    if base != width:
        rows = _coarser(rows, width)
        if limit:
            rows = itertools.islice(rows, limit)
    return Table(
        (
            "sensor",
            "metric",
            "time",
            "bucket",
            "count",
            "min",
            "max",
            "mean",
            "sum",
            "first",
            "last",
            "increase",
            "tags",
            "unit",
        ),
        (
            (
                r.sensor,
                r.metric,
                iso_ns(r.bucket * NS),
                r.bucket,
                r.n,
                r.min,
                r.max,
                r.sum / r.n,
                r.sum,
                r.first,
                r.last,
                r.increase,
                r.tags,
                r.unit,
            )
            for r in rows
        ),
    )


def _coarser(rows: Iterable[RollupRow], width: int) -> Iterator[RollupRow]:
    """Finer rollup rows (by bucket) summed into buckets of `width`."""
    groups: dict[tuple[str, str, str, str], RollupRow] = {}
    current: int | None = None
    for r in rows:
        bucket = r.bucket // width * width
        if bucket != current:
            yield from groups.values()
            groups, current = {}, bucket
        key = (r.sensor, r.metric, r.tags, r.unit)
        g = groups.get(key)
        groups[key] = r._replace(bucket=bucket) if g is None else merged(g, r)
    yield from groups.values()
