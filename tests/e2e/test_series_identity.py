"""Series keys share their strings (series.series_key): through real daemons, each
reading's value names the series it was published to, so a reading filed
under another series shows. Odd strings (scripts, combining marks, emoji,
long names, near-duplicates), topic-level tags, on SQLite and on two
PostgreSQL instances in one shared group, with a restart (series known)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.support.brokers import BrokerFactory
from tests.support.config import REPO
from tests.support.daemon import DaemonFactory
from tests.support.metrics import http_get, metric_value
from tests.support.mqtt import publish
from tests.support.waiting import wait_for

SERIES_KEPT_SITE = Path(__file__).parents[1] / "support" / "series_kept"
ROUTES = """
[[routes]]
topic = "plant/{site}/{sensor}/json"
format = "json"
qos = 1
"""

SITES = ["lyon", "Lyon", "Zürich", "Zu\u0308rich", "東京", "🏭", "s" * 200, "s" * 199, "a b", "x.y"]
SENSORS = [
    "p1",
    "P1",
    "p1 ",
    "é",
    "e\u0301",
    "дат",
    "𝔰",
    "d" * 300,
    "d" * 299,
    "ﬁ",
    "fi",
    "1e3",
    "0x10",
]
FIELDS = ["t", "T", "température", "tempe\u0301rature", "湿度", "f" * 120, "v"]


def series_list() -> list[tuple[str, str, str]]:
    return [(site, sensor, field) for site in SITES for sensor in SENSORS for field in FIELDS]


def messages(rounds: int, t0: int) -> list[tuple[str, bytes]]:
    out = []
    every = series_list()
    for r in range(rounds):
        for site in SITES:
            for sensor in SENSORS:
                obj: dict[str, float] = {"ts": t0 + r}
                for field in FIELDS:
                    obj[field] = every.index((site, sensor, field)) * 1000 + r
                out.append(
                    (f"plant/{site}/{sensor}/json", json.dumps(obj, ensure_ascii=False).encode())
                )
    return out


def check(rows: list[tuple[str, str, str, float]]) -> list[str]:
    every = series_list()
    bad = []
    for sensor, metric, tags, value in rows:
        site = json.loads(tags)["site"]
        want = every[int(value) // 1000]
        if (site, sensor, metric) != want:
            bad.append(f"{(site, sensor, metric)!r} holds a value of {want!r}")
    return bad


@pytest.mark.parametrize(
    ("engine", "kept"), [("sqlite", ""), ("postgres", ""), ("sqlite", "40"), ("postgres", "40")]
)
def test_no_reading_lands_in_another_series(
    tmp_path: Path,
    brokers: BrokerFactory,
    daemons: DaemonFactory,
    engine: str,
    kept: str,
    request: pytest.FixtureRequest,
) -> None:
    # kept: a series cache of 40 in the daemons, forgetting as a huge fleet's
    # does. With two PostgreSQL batches in flight, one batch's commit made the
    # cache forget keys the other had found there, and the daemon exited.
    broker = brokers(tmp_path / "broker", max_inflight=1000).start()
    env = {"INGESTD_MQTT__BROKER_MAX_INFLIGHT": "1000"}
    if kept:
        env |= {"PYTHONPATH": f"{SERIES_KEPT_SITE}:{REPO}", "TEST_SERIES_KEPT": kept}
    # 20 rounds with a small cache: more batches meet its forgetting (a loaded
    # machine failed 4 runs in 5 before the fix; a quiet one, none in 3:
    # tests/integration/test_series_cache.py forces the interleaving).
    rounds = 20 if kept else 5
    n_instances = 1
    if engine == "postgres":
        url = request.getfixturevalue("pg_url")
        env |= {
            "INGESTD_STORE__URL": url,
            "INGESTD_MQTT__SHARED_GROUP": "g",
            "INGESTD_MQTT__PROTOCOL": "5",
        }
        n_instances = 2
    t0 = int(time.time()) - 3600
    total_series = len(series_list())
    for phase in range(2):  # the second: a restart, every series known
        ds = [
            daemons(broker.port, ROUTES, workdir=tmp_path / f"d{i}", **env).start()
            for i in range(n_instances)
        ]
        for d in ds:
            d.wait_ready()
        msgs = messages(rounds, t0 + phase * 100)
        publish(broker.port, msgs)
        want = total_series * rounds * (phase + 1)

        def count() -> int:
            if engine == "sqlite":
                import sqlite3

                with sqlite3.connect(tmp_path / "d0" / "ingestd.db") as c:
                    return int(c.execute("SELECT count(*) FROM readings").fetchone()[0])
            from tests.support.postgres import PgReader

            return PgReader(url).count()

        wait_for(lambda n=want: count() >= n, 60, what=f"{want} readings")  # type: ignore[misc]
        texts = [http_get(d.metrics_url() + "/metrics")[1] for d in ds]
        for d in ds:
            assert d.stop() == 0
        assert (
            sum(metric_value(t, "ingestd_readings_decoded_total") for t in texts)
            == total_series * rounds
        )
        assert count() == want
    if engine == "sqlite":
        import sqlite3

        with sqlite3.connect(tmp_path / "d0" / "ingestd.db") as c:
            rows = c.execute("SELECT sensor, metric, tags, value FROM readings").fetchall()
            nseries = c.execute("SELECT count(*) FROM series").fetchone()[0]
    else:
        from tests.support.postgres import PgReader

        rows = PgReader(url).rows("SELECT sensor, metric, tags, value FROM readings")
        nseries = PgReader(url).rows("SELECT count(*) FROM series")[0][0]
    bad = check(rows)
    assert not bad, f"{len(bad)} misfiled: {bad[:5]}"
    assert nseries == total_series
