"""The data dashboard (config/grafana/ingestd-data-postgres.json): every query
it sends runs on a real PostgreSQL store, with Grafana's macros and variables
expanded as Grafana would, and returns the rows the panels plot."""

from __future__ import annotations

import asyncio
import json
import re
import time

from ingestd.events import Reading
from ingestd.rollups import RollupPlan
from ingestd.store.postgres import PostgresStore
from tests.support.config import REPO
from tests.support.postgres import PgReader

BOARD = REPO / "config" / "grafana" / "ingestd-data-postgres.json"
NS = 1_000_000_000


def expand(sql: str, lo: int, hi: int) -> str:
    """Grafana's $__unixEpochFilter and the dashboard's variables, expanded."""
    sql = re.sub(r"\$__unixEpochFilter\((\w+)\)", rf"\1 >= {lo} AND \1 <= {hi}", sql)
    sql = sql.replace("$__unixEpochFrom()", str(lo)).replace("$__unixEpochTo()", str(hi))
    return sql.replace("$sensor", "'d1'").replace("$metric", "'temp', 'energy'")


def test_every_query_of_the_data_dashboard_runs_and_plots(pg_url: str) -> None:
    start = int(time.time()) // 3600 * 3600 - 7200
    plan = RollupPlan((60, 3600), {60: 90.0}, frozenset({"energy"}))

    async def seed() -> None:
        async with PostgresStore(pg_url, rollups=plan) as store, store.batch() as tx:
            await tx.add_readings(
                [Reading("d1", "temp", (start + 30 * i) * NS, 20.0 + i % 5) for i in range(240)]
                + [Reading("d1", "energy", (start + 60 * i) * NS, 100.0 + i) for i in range(120)]
            )

    asyncio.run(seed())
    board = json.loads(BOARD.read_text())
    db = PgReader(pg_url)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert db.rows(variables["sensor"]["query"]) == [("d1",)]
    assert sorted(db.rows(expand(variables["metric"]["query"], 0, 0))) == [("energy",), ("temp",)]
    for panel in board["panels"]:
        for target in panel["targets"]:
            rows = db.rows(expand(target["rawSql"], start, start + 7200))
            assert rows, (panel["title"], target["refId"])
            assert all(len(r) == 3 for r in rows), panel["title"]  # time, metric, value
    hourly_increase = db.rows(
        expand(
            next(p for p in board["panels"] if "increase" in p["title"])["targets"][0]["rawSql"],
            start,
            start + 7200,
        )
    )
    assert [r[2] for r in hourly_increase] == [59.0, 60.0]
