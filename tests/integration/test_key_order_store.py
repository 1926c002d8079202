"""Rows inserted in order (SQLite: grouped by series; PostgreSQL: in key
order) and series keys sharing their strings, at the store: random batches
against a model, both engines, rows across multi-row statements, odd
series strings, a series cache far smaller than the series (SERIES_KEPT
monkeypatched), and a reopen with the series known."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ingestd.events import NS, Reading
from ingestd.rollups import RollupPlan
from ingestd.store import series
from ingestd.store.base import Store
from ingestd.store.postgres import PostgresStore
from ingestd.store.sqlite import SqliteStore

ODD = [
    ("s", "t", "", ""),
    ("s", "t", '{"site":"lyon"}', ""),
    ("s", "t", '{"site":"Lyon"}', ""),
    ("s", "t", "", "Cel"),
    ("s", "t", "", "cel"),
    ("s ", "t", "", ""),
    ("S", "t", "", ""),
    ("é", "t", "", ""),  # NFC
    ("e\u0301", "t", "", ""),  # NFD: another sensor, not the same
    ("𝔰𝔢𝔫𝔰𝔬𝔯", "температура", '{"地点":"東京"}', "°C"),
    ("x" * 5000, "y" * 3000, '{"k":"' + "z" * 4000 + '"}', "u" * 500),
    ("x" * 4999, "y" * 3000, '{"k":"' + "z" * 4000 + '"}', "u" * 500),
    ("a\tb", "m\nn", '{"a":"\\u0000"}', "%"),
    ("t", "s", "", ""),  # the first two swapped
    ("1", "2", "3", "4"),
    ("1.0", "2", "3", "4"),
    ("0x10", "1e3", "", "NULL"),
]


def model_batches(seed: int, keys: list[tuple[str, str, str, str]]) -> list[list[Reading]]:
    """Batches of messages, as the decoders make them: within a message, the
    readings of one series and time numbered 0, 1, ... (seq) in order."""
    rnd = random.Random(seed)
    out = []
    for size in [1, 255, 256, 257, 511, 512, 513, 1000, 37, 700]:
        batch: list[Reading] = []
        while len(batch) < size:
            seen: dict[tuple[str, str, str, str, int], int] = {}
            for _ in range(min(size - len(batch), rnd.randrange(1, 20))):
                k = rnd.choice(keys)
                ts = (1_700_000_000 + rnd.randrange(0, 200)) * NS
                seq = seen.get((*k, ts), 0)
                seen[(*k, ts)] = seq + 1
                batch.append(
                    Reading(
                        k[0], k[1], ts, float(rnd.randrange(3)), "t", tags=k[2], unit=k[3], seq=seq
                    )
                )
        out.append(batch)
    return out


def plan() -> RollupPlan:
    return RollupPlan((60, 3600), {}, frozenset({"c"}))


@pytest.mark.parametrize("rolled", [False, True])
@pytest.mark.parametrize("kept", [3, 100000])
async def test_random_batches_store_the_first_of_each_key(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    rolled: bool,
    kept: int,
) -> None:
    monkeypatch.setattr(series, "SERIES_KEPT", kept)
    many = [(f"dev-{i}", "c" if i % 3 == 0 else "g", "", "") for i in range(60)]
    keys = ODD + many
    path = tmp_path / "x.db"

    def make() -> Store:
        return SqliteStore(path, rollups=plan() if rolled else None)

    stored: dict[tuple[str, str, str, str, int, int], float] = {}
    for round_ in range(3):  # reopen: the series known from the database
        async with make() as store:
            for batch in model_batches(round_ * 7 + kept, keys):
                want_new = want_dup = want_conf = 0
                for r in batch:
                    k = (r.sensor, r.metric, r.tags, r.unit, r.ts_ns, r.seq)
                    if k not in stored:
                        stored[k] = r.value
                        want_new += 1
                    elif stored[k] == r.value:
                        want_dup += 1
                    else:
                        want_conf += 1
                async with store.batch() as tx:
                    await tx.add_readings(batch)
                assert (tx.inserted, tx.duplicates, len(tx.conflicts)) == (
                    want_new,
                    want_dup,
                    want_conf,
                )
            got = {
                (r.sensor, r.metric, r.tags, r.unit, r.ts_ns, r.seq): r.value
                for r in await _all(store)
            }
            assert got == stored
            if rolled:
                while await store.close_rollups(10**9):
                    pass
    import sqlite3

    with sqlite3.connect(path) as conn:
        n = conn.execute("SELECT count(*) FROM series").fetchone()[0]
        assert n == len(set(keys))
        if rolled:
            rows = conn.execute(
                "SELECT r.series_id, r.bucket, r.n, r.min, r.max, r.sum, r.first_value, "
                "r.last_value FROM rollups r WHERE width = 60 ORDER BY 1, 2"
            ).fetchall()
            samples = conn.execute(
                "SELECT series_id, ts_ns, seq, value FROM samples ORDER BY 1, 2, 3"
            ).fetchall()
    if rolled:
        want: dict[tuple[int, int], list[float]] = {}
        for sid, ts, _seq, v in samples:
            want.setdefault((sid, ts // (60 * NS) * 60), []).append(v)
        for sid, bucket, n, mn, mx, sm, first, last in rows:
            vs = want[(sid, bucket)]
            assert (n, mn, mx, sm, first, last) == (
                len(vs),
                min(vs),
                max(vs),
                sum(vs),
                vs[0],
                vs[-1],
            )


async def _all(store: Store) -> list[Reading]:
    conn = store._conn  # type: ignore[attr-defined]  # noqa: SLF001
    out = []
    async with conn.execute(
        "SELECT sensor, metric, tags, unit, ts_ns, seq, value FROM readings"
    ) as cur:
        for s, m, t, u, ts, seq, v in await cur.fetchall():
            out.append(Reading(s, m, ts, v, "", tags=t, unit=u, seq=seq))
    return out


async def test_postgres_random_batches_and_odd_series(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(series, "SERIES_KEPT", 3)
    keys = [k for k in ODD if "\u0000" not in k[2]] + [(f"dev-{i}", "g", "", "") for i in range(60)]
    stored: dict[tuple[str, str, str, str, int, int], float] = {}
    for round_ in range(2):
        async with (
            PostgresStore(pg_url, rollups=plan()) as a,
            PostgresStore(pg_url, rollups=plan()) as b,
        ):
            for i, batch in enumerate(model_batches(round_, keys)):
                want = [0, 0, 0]
                for r in batch:
                    k = (r.sensor, r.metric, r.tags, r.unit, r.ts_ns, r.seq)
                    if k not in stored:
                        stored[k] = r.value
                        want[0] += 1
                    elif stored[k] == r.value:
                        want[1] += 1
                    else:
                        want[2] += 1
                store = a if i % 2 else b  # two instances, one database
                async with store.batch() as tx:
                    await tx.add_readings(batch)
                assert [tx.inserted, tx.duplicates, len(tx.conflicts)] == want
    import asyncpg

    conn = await asyncpg.connect(pg_url)
    try:
        got = {
            (r["sensor"], r["metric"], r["tags"], r["unit"], r["ts_ns"], r["seq"]): r["value"]
            for r in await conn.fetch(
                "SELECT sensor, metric, tags, unit, ts_ns, seq, value FROM readings"
            )
        }
        n = await conn.fetchval("SELECT count(*) FROM series")
    finally:
        await conn.close()
    assert got == stored
    assert n == len(set(keys))
