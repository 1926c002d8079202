"""The batch path's aggregates (`ingestd.rollups.aggregate`, `increases`)
against the same computed a reading at a time, on random batches: several
series, readings in any order, shared times, buckets crossed."""

from __future__ import annotations

import random

import pytest

from ingestd import pending
from ingestd.rollups import NS, Key, Row, aggregate, deltas, fold, increases

WIDTHS = (60, 3600)


def one_at_a_time(records: list[tuple[int, int, int, float]]) -> dict[Key, Row]:
    out: dict[Key, Row] = {}
    for width in WIDTHS:
        for sid, ts, _, v in records:
            fold(out, sid, [ts], [v], width)
    return out


def batch(rng: random.Random, spread_s: float) -> list[tuple[int, int, int, float]]:
    base = 1_700_000_000 * NS + rng.randrange(3600) * NS
    return [
        (
            rng.randrange(1, 6),
            base + int(rng.random() * spread_s * NS) // 1000 * 1000,
            rng.randrange(2),
            round(rng.uniform(-50, 50), rng.randrange(4)),
        )
        for _ in range(rng.randrange(1, 400))
    ]


def test_aggregate_is_the_fold_of_each_reading() -> None:
    rng = random.Random(25)
    for spread in (0.05, 5, 100, 10_000):  # within a bucket; across minutes; hours
        for _ in range(50):
            records = batch(rng, spread)
            # Shared times with other values: first and last follow record order.
            records += [(s, t, q, v + 1) for s, t, q, v in rng.sample(records, len(records) // 5)]
            assert aggregate(records, WIDTHS) == one_at_a_time(records)


def test_aggregate_of_a_wide_batch_is_the_fold_of_each_reading() -> None:
    """A wide fleet's batch: most series have one reading (the path that
    skips grouping), some several, some crossing buckets."""
    rng = random.Random(28)
    base = 1_700_000_000 * NS
    for spread in (0.05, 100, 10_000):
        for _ in range(20):
            records = [
                (rng.randrange(1, 2000), base + int(rng.random() * spread * NS), 0, rng.random())
                for _ in range(rng.randrange(1, 1500))
            ]
            assert aggregate(records, WIDTHS) == one_at_a_time(records)


def test_aggregate_of_nothing() -> None:
    assert aggregate([], WIDTHS) == {}


def test_increases_per_bucket_is_the_sum_of_the_deltas_credited_one_by_one() -> None:
    rng = random.Random(76973)
    for spread in (0.05, 100, 10_000):
        for _ in range(100):
            base = 1_700_000_000 * NS
            stamps = sorted(
                base + int(rng.random() * spread * NS) for _ in range(rng.randrange(20))
            )
            level = 0.0
            window = []
            for i, ts in enumerate(stamps):
                level = rng.choice([level + rng.uniform(0, 5), level, 0.0, level - 1])
                window.append((ts, i, round(level, 2)))
            expected: dict[Key, float] = {}
            for (ts, _, _), d in zip(window, deltas([v for _, _, v in window]), strict=True):
                if d:
                    for w in WIDTHS:
                        key = (w, 7, ts // (w * NS) * w)
                        expected[key] = expected.get(key, 0.0) + d
            assert increases(window, WIDTHS, 7) == expected


@pytest.mark.parametrize("piece", [1, 7, 4096])
def test_a_close_in_pieces_gives_the_rows_of_all_its_readings(
    piece: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A close of pending rows (`Closing`): the rows of all their
    readings at once, in their order, each (series, bucket) in one piece
    only, however the readings were cut into pending rows."""
    monkeypatch.setattr(pending, "PIECE", piece)
    rng = random.Random(60)
    for _ in range(50):
        records = batch(rng, rng.choice((0.05, 100, 10_000)))
        records += [(s, t, q, v + 1) for s, t, q, v in rng.sample(records, len(records) // 5)]
        cuts = sorted(rng.choices(range(len(records) + 1), k=3))
        closing = pending.Closing()
        for a, b in zip([0, *cuts], [*cuts, len(records)], strict=True):
            assert closing.add(pending.pack(records[a:b])) == b - a
        pieces = list(closing.pieces(WIDTHS))
        merged: dict[Key, Row] = {}
        for rows in pieces:
            assert merged.keys().isdisjoint(rows)
            merged.update(rows)
        assert merged == aggregate(records, WIDTHS)
        assert len(pieces) <= max(1, -(-len(records) // piece))
