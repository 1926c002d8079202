"""A reviewer's attempts to break the shared group's primary (real Mosquitto,
real PostgreSQL, the daemons as subprocesses)."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_primary import (
    COUNTED,
    FAST,
    GROUP,
    HOST,
    PLAIN,
    SPARKPLUG,
    Member,
    counted,
    first_primary,
    fleet_of,
    host_state,
    join,
    plain,
    the_primary,
)
from tests.support.brokers import BrokerFactory
from tests.support.daemon import DaemonFactory
from tests.support.metrics import http_get, metric_value
from tests.support.mqtt import publish
from tests.support.postgres import PgReader
from tests.support.sparkplug_node import EdgeNode
from tests.support.waiting import wait_for


def scrape(m: Member) -> dict[str, float]:
    text = http_get(m.url + "/metrics")[1]
    out: dict[str, float] = {}
    for name in (
        "ingestd_primary",
        "ingestd_readings_unexplained",
        "ingestd_readings_committed_total",
        "ingestd_readings_quarantined_total",
        "ingestd_readings_duplicate_total",
        "ingestd_readings_handed_over_total",
        "ingestd_sequence_gaps_total",
        "ingestd_sparkplug_rebirth_requests_total",
        "ingestd_primary_terms_total",
    ):
        try:
            out[name] = metric_value(text, name)
        except AssertionError:
            out[name] = 0.0
    return out


def check_stored(db: PgReader, node: EdgeNode) -> tuple[int, int, list[Any], list[Any]]:
    rows = db.rows("SELECT sensor, metric, ts_ns, value FROM readings")
    expected = {(name, ts, v) for ts, values in node.sent.items() for name, v in values.items()}
    stored = {(m, ts // 1_000_000, v) for _s, m, ts, v in rows}
    return (
        len(rows),
        len(expected),
        sorted(expected - stored)[:5],
        sorted(stored - expected)[:5],
    )


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_rolling_restart_of_every_member_while_a_node_streams(
    tmp_path: Path,
    brokers: BrokerFactory,
    daemons: DaemonFactory,
    pg_url: str,
    protocol: str,
) -> None:
    """Three members restarted one after another (SIGTERM, start again, ready),
    primary first, while an edge node streams 8,000 NDATA: every value stored
    once, 0 quarantined, 0 gaps, 0 rebirth requests, and the host STATE online
    at the end."""
    broker = brokers(tmp_path / "broker", max_inflight=1000).start()
    db = PgReader(pg_url)
    env = {
        **FAST,
        "INGESTD_STORE__URL": pg_url,
        "INGESTD_MQTT__PROTOCOL": protocol,
        "INGESTD_MQTT__SPARKPLUG_HOST_ID": HOST,
    }
    fleet = fleet_of(daemons, broker.port, SPARKPLUG, tmp_path, 3, **env)
    first_primary(fleet)
    node = EdgeNode(broker.port).connect()
    done = threading.Event()
    total = 8000

    def stream() -> None:
        node.birth(0)
        for i in range(1, total + 1):
            node.data(i)
            if i % 25 == 0:
                time.sleep(0.1)
        done.set()

    snapshots: list[dict[str, float]] = []
    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(stream)
        wait_for(lambda: db.count() >= 4 * 500, 60, what="500 DATA stored")
        for i in range(4):
            # The primary three times, then a standby.
            primary = the_primary(fleet)
            m = primary if i < 3 else next(x for x in fleet if x is not primary)
            assert not done.is_set(), f"the stream ended before restart {i}"
            snap = scrape(m)
            assert snap["ingestd_readings_unexplained"] == 0, (m.name, snap)
            code = m.daemon.stop()
            assert code == 0, m.daemon.logs()[-3000:]
            snapshots.append(scrape_final(m))
            back = join(daemons, broker.port, SPARKPLUG, tmp_path, m.name, **env)
            back.wait_ready()
            fleet[fleet.index(m)] = Member(back, back.metrics_url(), m.name)
            the_primary(fleet)
            time.sleep(1.0)
        sending.result(180)
    expected_n = 4 * (total + 1)
    wait_for(
        lambda: db.count() + db.count("quarantine") >= expected_n,
        90,
        what=f"{expected_n} values handled",
    )
    time.sleep(2)
    n_rows, n_expected, missing, wrong = check_stored(db, node)
    quarantined = db.rows("SELECT topic, reason FROM quarantine LIMIT 5")
    final = [scrape(m) for m in fleet]
    for f in final:
        assert f["ingestd_readings_unexplained"] == 0, final
    primaries = [m.name for m, f in zip(fleet, final, strict=True) if f["ingestd_primary"] == 1]
    state = host_state(broker.port)
    node.close()
    for m in fleet:
        assert m.daemon.stop() == 0
    assert quarantined == [], quarantined
    assert (n_rows, missing, wrong) == (n_expected, [], []), (n_rows, n_expected, missing, wrong)
    assert node.rebirth_requests == 0
    assert len(primaries) == 1, primaries
    assert state is not None, state
    assert state["online"] is True, state
    print("\nsnapshots at stops", json.dumps(snapshots), "\nfinal", json.dumps(final))


def scrape_final(m: Member) -> dict[str, float]:
    """The stopped member's figures from its 'stopped' log line."""
    for line in reversed(m.daemon.logs().splitlines()):
        if '"stopped"' in line:
            entry = json.loads(line)
            return {"committed": entry["committed"], "quarantined": entry["quarantined"]}
    return {}


COUNTED_SHARED = COUNTED.replace('sequence_field = "seq"\n', "")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("before", "after"),
    [(COUNTED, COUNTED_SHARED), (COUNTED_SHARED, COUNTED)],
    ids=["ordered-to-shared", "shared-to-ordered"],
)
def test_a_route_that_changes_sides_across_a_restart_is_read_once(
    tmp_path: Path,
    brokers: BrokerFactory,
    daemons: DaemonFactory,
    pg_url: str,
    before: str,
    after: str,
) -> None:
    """Two members with a Sparkplug route (so the group has a primary) and the
    counted route. The operator drops (or adds) `sequence_field` on the counted
    route and restarts both members with the new config. Messages of the counted
    route sent afterwards should be stored once and quarantined never. The
    persistent sessions (the role's, the members') still hold the old
    subscription, and nothing unsubscribes it."""
    broker = brokers(tmp_path / "broker", max_inflight=1000).start()
    db = PgReader(pg_url)
    env = {**FAST, "INGESTD_STORE__URL": pg_url}
    fleet = fleet_of(daemons, broker.port, SPARKPLUG + before + PLAIN, tmp_path, 2, **env)
    first_primary(fleet)
    publish(broker.port, counted(range(1, 11)))
    wait_for(lambda: db.count() + db.count("quarantine") >= 10, 30, what="1..10 handled")
    time.sleep(2)
    per = {COUNTED: 1, COUNTED_SHARED: 2}  # readings a message: t (and seq, unless counted)
    assert (db.count(), db.rows("SELECT topic, reason FROM quarantine LIMIT 3")) == (
        10 * per[before],
        [],
    )
    for m in fleet:
        assert m.daemon.stop() == 0
    fleet = fleet_of(daemons, broker.port, SPARKPLUG + after + PLAIN, tmp_path, 2, **env)
    first_primary(fleet)
    publish(broker.port, counted(range(11, 31)))
    want = 10 * per[before] + 20 * per[after]
    wait_for(lambda: db.count() >= want, 30, what="11..30 stored")
    time.sleep(3)
    stored = db.count()
    quarantined = db.rows("SELECT topic, reason FROM quarantine")
    for m in fleet:
        assert m.daemon.stop() == 0
    assert (stored, len(quarantined)) == (want, 0), quarantined[:3]


LOCK_HOLDER_PID = """
SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid
WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()
"""


@pytest.mark.slow
@pytest.mark.parametrize("cut_lock", [False, True], ids=["frozen", "frozen-and-cut"])
def test_a_frozen_primary(
    tmp_path: Path,
    brokers: BrokerFactory,
    daemons: DaemonFactory,
    pg_url: str,
    cut_lock: bool,
) -> None:
    """The primary SIGSTOPped for 20 s (its TCP connections alive) while a node
    streams, then SIGCONTed. With cut_lock, its lock's backend is terminated 3 s
    into the freeze (as a DBA, or a server-side timeout, would): another member
    takes over and the frozen one, woken, must commit nothing and come back as
    a standby. Every value stored once, 0 quarantined, 0 gaps."""
    broker = brokers(tmp_path / "broker", max_inflight=1000).start()
    db = PgReader(pg_url)
    env = {
        **FAST,
        "INGESTD_STORE__URL": pg_url,
        "INGESTD_MQTT__SPARKPLUG_HOST_ID": HOST,
    }
    fleet = fleet_of(daemons, broker.port, SPARKPLUG, tmp_path, 3, **env)
    first = first_primary(fleet)
    node = EdgeNode(broker.port).connect()
    total = 6000

    def stream() -> None:
        node.birth(0)
        for i in range(1, total + 1):
            node.data(i)
            if i % 25 == 0:
                time.sleep(0.1)

    notes: dict[str, object] = {}
    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(stream)
        wait_for(lambda: db.count() >= 4 * 500, 60, what="500 DATA stored")
        assert first.daemon.proc is not None
        first.daemon.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            if cut_lock:
                time.sleep(3)
                notes["terminated"] = db.rows(
                    "SELECT pg_terminate_backend(pid) FROM (" + LOCK_HOLDER_PID + ") x"
                )
                rest = [m for m in fleet if m is not first]
                second = the_primary(rest, timeout=15)
                notes["takeover_s"] = round(time.monotonic() - t0, 1)
                notes["second"] = second.name
            else:
                # Not renewing its term: deposed by a standby after the lease.
                rest = [m for m in fleet if m is not first]
                second = the_primary(rest, timeout=19)
                notes["takeover_s"] = round(time.monotonic() - t0, 1)
                notes["second"] = second.name
                notes["stored_during_freeze"] = db.count()
            while time.monotonic() - t0 < 20:
                time.sleep(0.2)
            notes["stored_before_cont"] = db.count()
        finally:
            first.daemon.proc.send_signal(signal.SIGCONT)
        sending.result(180)
    expected_n = 4 * (total + 1)
    wait_for(
        lambda: db.count() + db.count("quarantine") >= expected_n,
        90,
        what=f"{expected_n} values handled",
    )
    time.sleep(3)
    n_rows, n_expected, missing, wrong = check_stored(db, node)
    quarantined = db.rows("SELECT topic, reason FROM quarantine LIMIT 5")
    final = {m.name: scrape(m) for m in fleet}
    node.close()
    codes = {m.name: m.daemon.stop() for m in fleet}
    print("\n", json.dumps(notes), "\n", json.dumps(final, indent=1))
    assert codes == {m.name: 0 for m in fleet}, codes
    assert quarantined == [], quarantined
    assert (n_rows, missing, wrong) == (n_expected, [], []), (n_rows, n_expected, missing, wrong)
    assert node.rebirth_requests == 0
    for name, f in final.items():
        assert f["ingestd_readings_unexplained"] == 0, (name, f)
    assert sum(f["ingestd_primary"] for f in final.values()) == 1, final
    assert sum(f["ingestd_sequence_gaps_total"] for f in final.values()) == 0, final


@pytest.mark.slow
def test_a_lost_term_closes_the_roles_mqtt_connection(
    tmp_path: Path,
    brokers: BrokerFactory,
    daemons: DaemonFactory,
    pg_url: str,
) -> None:
    """One member; its lock's backend terminated: the term is lost and (after
    a pause) taken again by the same member. The lost term's MQTT connection
    under the role's client id should be closed by the member when the term
    ends: the broker should not have to close it as "old connection" when the
    next term connects, and no asyncio "Task exception was never retrieved"
    error should be logged."""
    broker = brokers(tmp_path / "broker", max_inflight=1000).start()
    db = PgReader(pg_url)
    env = {**FAST, "INGESTD_STORE__URL": pg_url}
    fleet = fleet_of(daemons, broker.port, COUNTED + PLAIN, tmp_path, 1, **env)
    only = first_primary(fleet)
    publish(broker.port, counted(range(1, 11)))
    wait_for(lambda: db.count() == 10, 30, what="1..10 stored")
    assert db.rows("SELECT pg_terminate_backend(pid) FROM (" + LOCK_HOLDER_PID + ") x") == [(True,)]
    wait_for(lambda: only.log_count("primary role taken") == 2, 20, what="the role taken again")
    publish(broker.port, counted(range(11, 21)))
    wait_for(lambda: db.count() == 20, 30, what="11..20 stored")
    time.sleep(1)
    assert only.daemon.stop() == 0
    role = f"ingestd-primary-{GROUP}"
    kicked = [
        line
        for line in broker.log.read_text().splitlines()
        if f"Client {role} already connected, closing old connection" in line
    ]
    never_retrieved = only.log_count("Task exception was never retrieved")
    assert (kicked, never_retrieved) == ([], 0)


@pytest.mark.slow
def test_a_flood_of_junk_node_ids_at_the_primary(
    tmp_path: Path,
    brokers: BrokerFactory,
    daemons: DaemonFactory,
    pg_url: str,
) -> None:
    """2,000 NDATA from node ids that never sent a BIRTH: each quarantined once,
    rebirth requests bounded, log lines bounded, accounting exact on both."""
    from ingestd.formats.sparkplug_pb import Payload

    broker = brokers(tmp_path / "broker", max_inflight=1000).start()
    db = PgReader(pg_url)
    env = {**FAST, "INGESTD_STORE__URL": pg_url, "INGESTD_MQTT__SPARKPLUG_HOST_ID": HOST}
    fleet = fleet_of(daemons, broker.port, SPARKPLUG + PLAIN, tmp_path, 2, **env)
    primary = first_primary(fleet)
    p = Payload(timestamp=int(time.time() * 1000), seq=1)
    p.metrics.add(alias=1, double_value=1.0)
    junk = [(f"spBv1.0/junk/NDATA/n{i}", p.SerializeToString()) for i in range(2000)]
    t0 = time.monotonic()
    publish(broker.port, junk + plain(200))
    wait_for(lambda: db.count("quarantine") >= 2000 and db.count() >= 200, 60, what="all handled")
    time.sleep(2)
    figures = {m.name: scrape(m) for m in fleet}
    text = http_get(primary.url + "/metrics")[1]
    suppressed = metric_value(text, "ingestd_sparkplug_rebirths_suppressed_total")
    lines = {m.name: len(m.daemon.logs().splitlines()) for m in fleet}
    ready = {m.name: http_get(m.url + "/readyz") for m in fleet}
    elapsed = time.monotonic() - t0
    for m in fleet:
        assert m.daemon.stop() == 0
    print("\n", json.dumps(figures), suppressed, lines, ready, round(elapsed, 1))
    assert db.count("quarantine") == 2000
    assert db.count() == 200
    assert all(f["ingestd_readings_unexplained"] == 0 for f in figures.values())
    requests = figures[primary.name]["ingestd_sparkplug_rebirth_requests_total"]
    assert requests + suppressed == 2000, (requests, suppressed)
    assert requests <= 10 * (elapsed + 1) + 10, requests
    assert max(lines.values()) < 200, lines
    assert all(code == 200 for code, _ in ready.values()), ready
