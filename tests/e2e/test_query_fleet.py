"""`ingestd query` over a fleet: sensor globs and tag-only queries, the CLI
run as a user would against each engine (a SQLite file, a PostgreSQL URL)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ingestd.events import NS, Reading
from ingestd.store.base import Store
from ingestd.store.postgres import PostgresStore
from ingestd.store.sqlite import SqliteStore
from tests.support.config import SHIPPED_CONFIG

T0 = 1_700_000_000
SITE3 = '{"site":"3"}'
SITE4 = '{"site":"4"}'
FLEET = [
    # sensor, tags: one reading a second for 5 s each
    ("kitchen-1", SITE3),
    ("kitchen-2", SITE4),
    ("kitchenette", SITE3),
    ("garage", SITE3),
    ("k[1]", ""),
    ("kitchen_9", ""),
]


@pytest.fixture(params=["sqlite", "postgres"])
async def fleet_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database of each engine holding FLEET; what `--db` takes for it."""
    store: Store
    if request.param == "sqlite":
        db = str(tmp_path / "fleet.db")
        store = SqliteStore(Path(db))
    else:
        db = request.getfixturevalue("pg_url")
        store = PostgresStore(db)
    async with store, store.batch() as tx:
        await tx.add_readings(
            [
                Reading(sensor, "t", (T0 + i) * NS, float(i), "", tags)
                for sensor, tags in FLEET
                for i in range(5)
            ]
        )
    return db


def query(db: str, *args: str, check: bool = True) -> Any:
    window = ("--since", str(T0), "--until", str(T0 + 60))
    where = ("--config", str(SHIPPED_CONFIG), "--db", db)
    proc = subprocess.run(
        [sys.executable, "-m", "ingestd", "query", *args, *window, "-f", "json", *where],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    if not check:
        return proc
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def sensors_of(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({r["sensor"] for r in rows})


def test_a_sensor_glob_queries_several_sensors(fleet_db: str) -> None:
    rows = query(fleet_db, "--sensor", "kitchen-*")
    assert sensors_of(rows) == ["kitchen-1", "kitchen-2"]
    # By time, then sensor: the fleet's readings interleaved as they happened.
    assert [(r["sensor"], r["value"]) for r in rows[:4]] == [
        ("kitchen-1", 0.0), ("kitchen-2", 0.0), ("kitchen-1", 1.0), ("kitchen-2", 1.0),
    ]  # fmt: skip
    assert sensors_of(query(fleet_db, "-s", "kitchen?1")) == ["kitchen-1"]
    assert sensors_of(query(fleet_db, "-s", "kitchen*")) == [
        "kitchen-1", "kitchen-2", "kitchen_9", "kitchenette",
    ]  # fmt: skip
    # Only * and ? are wildcards, on both engines: SQL's own (`_`, `%`, `[...]`)
    # are plain characters.
    assert sensors_of(query(fleet_db, "-s", "kitchen_*")) == ["kitchen_9"]
    assert sensors_of(query(fleet_db, "-s", "k[1]*")) == ["k[1]"]
    assert sensors_of(query(fleet_db, "-s", "k[1]")) == ["k[1]"]  # exact, as before
    assert query(fleet_db, "-s", "kitchen") == []  # an id without wildcards is exact


def test_a_tag_alone_selects_the_series_across_sensors(fleet_db: str) -> None:
    rows = query(fleet_db, "--tag", "site=3")
    assert sensors_of(rows) == ["garage", "kitchen-1", "kitchenette"]
    assert len(rows) == 15
    assert {r["tags"] for r in rows} == {SITE3}
    both = query(fleet_db, "--sensor", "kitchen*", "--tag", "site=3", "--limit", "3")
    assert [(r["sensor"], r["value"]) for r in both] == [
        ("kitchen-1", 0.0), ("kitchenette", 0.0), ("kitchen-1", 1.0),
    ]  # fmt: skip
    refused = query(fleet_db, check=False)
    assert refused.returncode == 1
    assert "give --sensor (an id or a glob, 'kitchen-*'; '*' for every sensor)" in refused.stderr
    assert len(query(fleet_db, "-s", "*")) == 5 * len(FLEET)
