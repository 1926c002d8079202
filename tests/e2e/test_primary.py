"""One primary per shared group: the routes that cannot be read in parts
(Sparkplug, `sequence_field`, the Sparkplug host STATE) are read by the one
member holding a PostgreSQL advisory lock, over a connection of its own
(`mqtt.primary_client_id`, a persistent session, plain subscriptions), while
every member reads the shareable routes through the group. When the primary
dies another member takes the lock and that session, and carries on as a
restarted single ingestd would.

Real Mosquitto, real PostgreSQL, the daemons as subprocesses: members killed
-9 mid-stream and stopped cleanly, an edge node that is reborn with its
aliases swapped while no member is primary, a device counter with a gap of 5
across two changes of primary, a primary that loses its lock while alive,
and what check-config refuses."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.brokers import BrokerFactory
from tests.support.config import REPO, write_config
from tests.support.daemon import DaemonFactory, DaemonProcess
from tests.support.metrics import http_get, metric_value
from tests.support.mqtt import publish
from tests.support.postgres import PgReader
from tests.support.sparkplug_node import METRICS, EdgeNode
from tests.support.waiting import wait_for

GROUP = "ingest"
HOST = "scada"
SPARKPLUG = """
[[routes]]
topic = "spBv1.0/#"
format = "sparkplug"
"""
COUNTED = """
[[routes]]
topic = "counted/{sensor}/telemetry"
format = "json"
sequence_field = "seq"
qos = 1
"""
PLAIN = """
[[routes]]
topic = "sensors/{sensor}/telemetry"
format = "json"
qos = 1
"""
HOMIE = """
[[routes]]
topic = "homie/#"
format = "homie"
"""
FAST = {
    "INGESTD_MQTT__SHARED_GROUP": GROUP,
    "INGESTD_MQTT__BROKER_MAX_INFLIGHT": "1000",
    "INGESTD_MQTT__RECONNECT_MIN_DELAY": "0.1",
    "INGESTD_MQTT__RECONNECT_MAX_DELAY": "1",
}
# The metrics summed over the members (a killed one's as last read).
SUMMED = (
    "ingestd_readings_committed_total",
    "ingestd_readings_quarantined_total",
    "ingestd_sequence_gaps_total",
    "ingestd_sequence_missing_total",
    "ingestd_sparkplug_rebirth_requests_total",
)
# Metrics 1 and 2 swap aliases at the rebirth: Temperature (20 + i/8, >= 20)
# and Pressure (1 + (i % 64)/16, < 5) cannot pass for each other, so a value
# read with the wrong alias table is stored under the wrong name and shows.
SWAPPED = {
    "Line/Temperature": 2,
    "Line/Pressure": 1,
    "Line/Count": METRICS["Line/Count"][0],
    "Line/Running": METRICS["Line/Running"][0],
}
TAKEOVER_S = 10  # "within ~1-3 s": generous, for a loaded CI machine


@dataclass
class Member:
    """One ingestd of the group and its metrics endpoint."""

    daemon: DaemonProcess
    url: str
    name: str

    @property
    def alive(self) -> bool:
        proc = self.daemon.proc
        return proc is not None and proc.poll() is None

    def metric(self, name: str) -> float:
        """A sample's value; 0 for one not exported (a counter never incremented)."""
        try:
            return metric_value(http_get(self.url + "/metrics")[1], name)
        except AssertionError:
            return 0.0

    def metrics(self) -> dict[str, float]:
        return {name: self.metric(name) for name in SUMMED}

    def subscribed_as_primary(self) -> bool:
        """Its primary pipeline has subscribed to the ordered routes. Only the
        first term needs to wait for it: until then the role's session does
        not exist, and the broker keeps nothing for it (as for a lone ingestd
        before its first start). ingestd_primary is 1 a moment before."""
        for line in self.daemon.logs().splitlines():
            if '"subscribed"' in line:
                entry = json.loads(line)
                if entry.get("role") == "primary" and entry.get("msg") == "subscribed":
                    return True
        return False

    def log_count(self, event: str) -> int:
        """Lines of the member's JSON log (every run in its directory) whose
        message begins with `event`."""
        count = 0
        for line in self.daemon.logs().splitlines():
            if line.startswith("{") and event in line:
                count += str(json.loads(line).get("msg", "")).startswith(event)
        return count


def join(
    daemons: DaemonFactory, port: int, routes: str, tmp_path: Path, name: str, **env: str
) -> DaemonProcess:
    """A member in a directory of its own (so its own log and client id ingestd-<name>)."""
    return daemons(port, routes, workdir=tmp_path / name, **env).start()


def fleet_of(
    daemons: DaemonFactory, port: int, routes: str, tmp_path: Path, n: int, **env: str
) -> list[Member]:
    """n members started at once (they race for the primary role), each ready."""
    started = [join(daemons, port, routes, tmp_path, f"m{i}", **env) for i in range(n)]
    for d in started:
        d.wait_ready()
    return [Member(d, d.metrics_url(), f"m{i}") for i, d in enumerate(started)]


def the_primary(fleet: list[Member], timeout: float = TAKEOVER_S) -> Member:
    """The one living member whose ingestd_primary is 1 (waits until exactly one is)."""
    found: list[Member] = []

    def exactly_one() -> bool:
        found[:] = [m for m in fleet if m.alive and m.metric("ingestd_primary") == 1]
        return len(found) == 1

    wait_for(exactly_one, timeout, interval=0.1, what="exactly one member to be primary")
    return found[0]


def first_primary(fleet: list[Member]) -> Member:
    """The first primary of the group, once it reads the ordered routes."""
    primary = the_primary(fleet)
    wait_for(primary.subscribed_as_primary, 10, what="the primary's subscriptions")
    return primary


def host_state(port: int) -> dict[str, Any] | None:
    """The retained Sparkplug host STATE of HOST, parsed, if there is one."""
    got: list[bytes] = []
    done = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        got.append(bytes(msg.payload))
        done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{time.monotonic_ns()}")
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.subscribe(f"spBv1.0/STATE/{HOST}", 1)
        done.wait(2)
    finally:
        c.disconnect()
        c.loop_stop()
    if not got:
        return None
    state: dict[str, Any] = json.loads(got[-1])
    return state


def online_after(port: int, after_ms: int) -> Callable[[], bool]:
    def check() -> bool:
        state = host_state(port)
        return state is not None and state["online"] is True and state["timestamp"] > after_ms

    return check


def summed(snapshots: list[dict[str, float]], name: str) -> float:
    return sum(s[name] for s in snapshots)


@pytest.mark.slow
@pytest.mark.parametrize(("members", "protocol"), [(2, "3.1.1"), (3, "5")])
def test_sparkplug_node_across_a_kill_of_the_primary_and_a_rebirth_with_swapped_aliases(
    tmp_path: Path,
    brokers: BrokerFactory,
    daemons: DaemonFactory,
    pg_url: str,
    members: int,
    protocol: str,
    record_property: Callable[[str, object], None],
) -> None:
    """NBIRTH + 10,000 NDATA by alias at QoS 1; the primary killed -9
    mid-stream; the node reborn with aliases 1 and 2 swapped after the kill,
    before or while another member takes over (its NBIRTH waits in the
    primary's session behind DATA read with the old table). Every value is
    stored once under its own name, nothing quarantined, no gap, no rebirth
    asked, another member primary, and the host STATE online again, newer."""
    broker = brokers(tmp_path / "broker", max_inflight=1000).start()
    db = PgReader(pg_url)
    env = {
        **FAST,
        "INGESTD_STORE__URL": pg_url,
        "INGESTD_MQTT__PROTOCOL": protocol,
        "INGESTD_MQTT__SPARKPLUG_HOST_ID": HOST,
    }
    fleet = fleet_of(daemons, broker.port, SPARKPLUG, tmp_path, members, **env)
    first = first_primary(fleet)
    time.sleep(1.5)  # the standbys check every second: none of them takes it too
    assert the_primary(fleet) is first
    wait_for(lambda: host_state(broker.port) is not None, 10, what="the host STATE")
    before = host_state(broker.port)
    assert before is not None
    assert before["online"] is True, before

    node = EdgeNode(broker.port).connect()
    killed = threading.Event()

    def stream() -> None:
        node.birth(0)
        for i in range(1, 10_001):
            if i == 5000:
                assert killed.wait(60), "the primary was not killed"
                node.birth(i, aliases=SWAPPED)
            node.data(i)
            if i % 100 == 0:
                time.sleep(0.01)  # a stream, not a burst: the kill lands within it

    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(stream)
        wait_for(lambda: db.count() >= 4 * 1000, 60, what="1,000 DATA stored")
        at_kill = first.metrics()
        unacked = first.metric("ingestd_inflight_unacked_messages")
        stored_at_kill = db.count()
        first.daemon.kill()
        t_kill = time.monotonic()
        killed.set()
        rest = [m for m in fleet if m is not first]
        second = the_primary(rest)
        takeover = time.monotonic() - t_kill
        sending.result(120)

    expected = {(name, ts, v) for ts, values in node.sent.items() for name, v in values.items()}
    wait_for(
        lambda: db.count() + db.count("quarantine") >= len(expected),
        90,
        what=f"all {len(expected):,} values handled",
    )
    time.sleep(1.5)  # nothing more arrives: each value stored once
    rows = db.rows("SELECT sensor, metric, ts_ns, value FROM readings")
    quarantined = db.rows("SELECT topic, reason FROM quarantine LIMIT 3")
    assert quarantined == [], quarantined
    assert {s for s, _m, _t, _v in rows} == {"plant/press-1"}
    stored = {(m, ts // 1_000_000, v) for _s, m, ts, v in rows}
    assert len(rows) == len(stored), "a value stored twice"
    wrong = sorted(stored - expected)[:5]
    missing = sorted(expected - stored)[:5]
    assert stored == expected, f"not sent: {wrong}; not stored: {missing}"
    # Per name: each kept its own values across the swap.
    by_name: dict[str, list[float]] = {}
    for _s, m, _t, v in rows:
        by_name.setdefault(m, []).append(v)
    assert set(by_name) == set(METRICS)
    assert min(by_name["Line/Temperature"]) >= 20
    assert max(by_name["Line/Pressure"]) < 5
    assert node.births == 2, "one rebirth (the node's own), none asked for"
    assert node.rebirth_requests == 0

    # Another member is primary, and says so; the others are standbys.
    assert second.log_count("primary role taken") == 1
    assert first.log_count("primary role taken") == 1
    for m in rest:
        if m is not second:
            assert m.metric("ingestd_primary") == 0
            assert m.log_count("primary role taken") == 0
    # The primary's node state lives in the store under the primary's client id.
    owners = db.rows("SELECT DISTINCT owner FROM device_state WHERE format = 'sparkplug'")
    assert owners == [(f"ingestd-primary-{GROUP}",)]
    # The host STATE: online again, from the new primary, newer than before.
    wait_for(online_after(broker.port, before["timestamp"]), 10, what="the STATE online, newer")

    snapshots = [at_kill, *(m.metrics() for m in rest)]
    assert summed(snapshots, "ingestd_sequence_gaps_total") == 0
    assert summed(snapshots, "ingestd_sparkplug_rebirth_requests_total") == 0
    assert summed(snapshots, "ingestd_readings_quarantined_total") == 0
    # The survivors' counters include the new primary's work.
    assert second.metric("ingestd_readings_committed_total") > 0

    # A clean stop: standbys first, then the primary, which releases the role
    # and leaves the STATE offline, as a single ingestd does when it stops.
    node.close()
    for m in rest:
        if m is not second:
            assert m.daemon.stop() == 0, m.daemon.logs()[-2000:]
    assert second.daemon.stop() == 0, second.daemon.logs()[-2000:]
    assert second.log_count("primary role released") == 1
    after = host_state(broker.port)
    assert after is not None
    assert after["online"] is False, after
    record_property(
        "primary_takeover",
        f"{members} members: killed at {stored_at_kill:,} readings stored, {unacked:.0f} "
        f"messages unacknowledged, another primary after {takeover:.1f} s",
    )
    print(
        f"\n{members} members: kill at {stored_at_kill:,} readings ({unacked:.0f} unacknowledged),"
        f" takeover {takeover:.2f} s"
    )


def counted(numbers: range | list[int], sensor: str = "dev") -> list[tuple[str, bytes]]:
    return [
        (
            f"counted/{sensor}/telemetry",
            b'{"ts": %d, "seq": %d, "t": %d}' % (1_700_000_000 + n, n, n),
        )
        for n in numbers
    ]


def plain(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [
        (f"sensors/p{i % 10}/telemetry", b'{"ts": %d, "x": %d}' % (1_700_000_000 + i, i))
        for i in range(start, start + n)
    ]


@pytest.mark.slow
def test_a_counted_device_across_two_changes_of_primary_with_a_plain_route_shared(
    tmp_path: Path,
    brokers: BrokerFactory,
    daemons: DaemonFactory,
    pg_url: str,
) -> None:
    """Three members; a JSON route with sequence_field and a plain JSON route.
    The plain route spreads over all three. The counted device sends 1..60
    to a first primary (killed -9 right after), 61..100 to the second (then
    stopped cleanly), and 106..200 to the third: its stored counters show one
    gap of 5, and ingestd_sequence_gaps_total over every member is 1."""
    broker = brokers(tmp_path / "broker", max_inflight=1000).start()
    db = PgReader(pg_url)
    primary_id = "ingestd-counted"
    env = {
        **FAST,
        "INGESTD_STORE__URL": pg_url,
        "INGESTD_MQTT__PRIMARY_CLIENT_ID": primary_id,
    }
    routes = COUNTED + PLAIN
    fleet = fleet_of(daemons, broker.port, routes, tmp_path, 3, **env)
    a = first_primary(fleet)

    # 1..50 and 300 plain messages, interleaved.
    batch = plain(300)
    for n in range(1, 51):
        batch.insert(n * 6 - 1, counted([n])[0])
    publish(broker.port, batch)
    wait_for(lambda: db.count() == 350, 30, what="350 readings")
    committed = {m.name: m.metric("ingestd_readings_committed_total") for m in fleet}
    assert sum(committed.values()) == 350, committed
    # Each member read a share of the plain route; the primary, the counted one too.
    shares = {m.name: committed[m.name] - (50 if m is a else 0) for m in fleet}
    assert all(share > 0 for share in shares.values()), shares

    # 51..60, and the primary killed -9 with them in flight or just committed.
    publish(broker.port, counted(range(51, 61)))
    at_kill = a.metrics()
    a.daemon.kill()
    rest = [m for m in fleet if m is not a]
    b = the_primary(rest)
    assert b.log_count("primary role taken") == 1
    # The killed member comes back as a standby: the role stays where it is.
    back = join(daemons, broker.port, routes, tmp_path, a.name, **env)
    back.wait_ready()
    a2 = Member(back, back.metrics_url(), a.name)
    fleet = [a2, *rest]
    publish(broker.port, counted(range(61, 101)))
    wait_for(lambda: db.count() == 400, 30, what="seq 1..100 stored")
    assert the_primary(fleet) is b
    assert a2.metric("ingestd_primary") == 0

    # The second primary stopped cleanly: it releases the role, a third takes it.
    at_stop = b.metrics()
    assert b.daemon.stop() == 0, b.daemon.logs()[-2000:]
    assert b.log_count("primary role released") == 1
    rest = [m for m in fleet if m is not b]
    c = the_primary(rest)
    publish(broker.port, counted(range(106, 201)))  # 101..105 never sent
    wait_for(lambda: db.count() == 495, 30, what="seq 106..200 stored")
    time.sleep(1.0)
    assert db.count() == 495
    assert db.count("quarantine") == 0

    status = db.rows(
        "SELECT last_seq, seq_gaps, seq_missing FROM sensor_status WHERE sensor = 'dev'"
    )
    assert status == [(200, 1, 5)]
    snapshots = [at_kill, at_stop, *(m.metrics() for m in rest)]
    assert summed(snapshots, "ingestd_sequence_gaps_total") == 1
    assert summed(snapshots, "ingestd_sequence_missing_total") == 5
    assert c.metric("ingestd_sequence_gaps_total") == 1, "counted by the member that saw it"
    # Every term's primary connected with the configured client id, to a
    # persistent session (Mosquitto logs "c0").
    connects = re.findall(rf" as {primary_id} \(p\d, c(\d),", broker.log.read_text())
    assert connects.count("0") >= 3, connects
    assert "1" not in connects, connects
    for m in rest:
        assert m.daemon.stop() == 0, m.daemon.logs()[-2000:]


class SamplesLock:
    """Another session's exclusive lock on `samples`, held until released:
    nothing commits meanwhile (readings are read, counted and held)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._held = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._hold()), daemon=True)

    async def _hold(self) -> None:
        conn = await asyncpg.connect(self.url, timeout=10)
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE samples IN EXCLUSIVE MODE")
                self._held.set()
                while not self._release.is_set():
                    await asyncio.sleep(0.05)
        finally:
            await conn.close()

    def __enter__(self) -> SamplesLock:
        self._thread.start()
        assert self._held.wait(10), "could not lock the samples table"
        return self

    def __exit__(self, *_exc: object) -> None:
        self._release.set()
        self._thread.join(10)


# The primary's connection that holds the role's advisory lock.
LOCK_HOLDER = """
SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid
WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()
"""


@pytest.mark.slow
def test_a_primary_that_loses_its_lock_alive_hands_over_what_it_had_not_committed(
    tmp_path: Path,
    brokers: BrokerFactory,
    daemons: DaemonFactory,
    pg_url: str,
) -> None:
    """The primary's lock connection is terminated (as a network cut or a
    DBA would) while it holds read, uncommitted messages of a counted device
    with a gap of 5 in them (another session locks the samples). It says the
    role is lost, stops reading the ordered routes, and the next primary (it
    or the other member) reads them again from the role's session: each
    reading stored once, the gap stored once, and counted once in
    ingestd_sequence_gaps_total over the members (the lost term's count of
    what it never committed is handed over, as its readings are)."""
    broker = brokers(tmp_path / "broker", max_inflight=1000).start()
    db = PgReader(pg_url)
    env = {**FAST, "INGESTD_STORE__URL": pg_url}
    fleet = fleet_of(daemons, broker.port, COUNTED + PLAIN, tmp_path, 2, **env)
    first = first_primary(fleet)
    publish(broker.port, counted(range(1, 51)))
    wait_for(lambda: db.count() == 50, 30, what="seq 1..50 stored")
    with SamplesLock(pg_url):
        publish(broker.port, counted([*range(51, 61), *range(66, 81)]))  # 61..65 lost
        wait_for(
            lambda: first.metric("ingestd_readings_in_flight") == 25,
            10,
            what="51..80 read by the primary, held by the lock",
        )
        # Found, not yet counted: a gap counts once its messages are committed.
        assert first.metric("ingestd_sequence_gaps_total") == 0
        assert db.rows(LOCK_HOLDER) == [(True,)]
        wait_for(lambda: first.log_count("primary role lost") == 1, 10, what="the role said lost")
        assert first.metric("ingestd_primary_terms_total") == 1
        assert first.metric("ingestd_readings_handed_over_total") == 25
        second = the_primary(fleet)  # either member: the lock is free for both
    wait_for(lambda: db.count() == 75, 30, what="seq 51..80 stored")
    time.sleep(1.0)
    assert db.count() == 75
    assert db.count("quarantine") == 0
    ts = db.rows("SELECT ts_ns FROM readings ORDER BY ts_ns")
    assert [t // 1_000_000_000 - 1_700_000_000 for (t,) in ts] == [
        *range(1, 61),
        *range(66, 81),
    ]
    status = db.rows(
        "SELECT last_seq, seq_gaps, seq_missing FROM sensor_status WHERE sensor = 'dev'"
    )
    assert status == [(80, 1, 5)]
    assert second.log_count("primary role taken") >= 1
    gaps = {m.name: m.metric("ingestd_sequence_gaps_total") for m in fleet}
    missing = {m.name: m.metric("ingestd_sequence_missing_total") for m in fleet}
    for m in fleet:
        assert m.metric("ingestd_readings_unexplained") == 0
        assert m.daemon.stop() == 0, m.daemon.logs()[-2000:]
    assert sum(gaps.values()) == 1, gaps
    assert sum(missing.values()) == 5, missing


def check_config(tmp_path: Path, routes: str, **env: str) -> subprocess.CompletedProcess[str]:
    config = write_config(tmp_path / "ingestd.toml", routes=routes)
    return subprocess.run(
        [sys.executable, "-m", "ingestd", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"INGESTD_MQTT__SHARED_GROUP": GROUP, "PATH": "/usr/bin:/bin", **env},
    )


def route(topic: str, fmt: str = "json", **templates: str) -> str:
    extra = "".join(f'{key} = "{value}"\n' for key, value in templates.items())
    return f'[[routes]]\ntopic = "{topic}"\nformat = "{fmt}"\n{extra}'


# check-config never connects: any PostgreSQL URL will do.
PG = {"INGESTD_STORE__URL": "postgresql://ingestd@127.0.0.1:1/telemetry"}


def test_check_config_refuses_ordered_routes_in_a_group_without_postgresql(
    tmp_path: Path,
) -> None:
    sequenced = COUNTED.replace("counted/", "s/")
    out = check_config(tmp_path, SPARKPLUG + sequenced + HOMIE + PLAIN)
    assert out.returncode == 78, out.stderr
    assert "routes[0]" in out.stderr
    assert "routes[1]" in out.stderr
    assert "routes[2]" not in out.stderr
    assert "routes[3]" not in out.stderr
    assert "PostgreSQL" in out.stderr
    host = check_config(tmp_path, HOMIE, INGESTD_MQTT__SPARKPLUG_HOST_ID=HOST)
    assert host.returncode == 78, host.stderr
    assert "mqtt.sparkplug_host_id" in host.stderr
    assert "PostgreSQL" in host.stderr
    # The same with a PostgreSQL store: one member at a time reads them.
    ok = check_config(
        tmp_path, SPARKPLUG + sequenced + HOMIE + PLAIN, INGESTD_MQTT__SPARKPLUG_HOST_ID=HOST, **PG
    )
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize(
    ("ordered", "shareable"),
    [
        (SPARKPLUG, route("{ns}/+/NDATA/{sensor}", "value", metric="v")),
        (SPARKPLUG, route("{sensor}/#")),
        (COUNTED, route("counted/{sensor}/#")),
        # Neither filter contains the other; counted/boiler/telemetry matches both.
        (COUNTED, route("+/boiler/{metric}", "value", sensor="boiler")),
    ],
    ids=["sparkplug-wildcards", "everything", "counted-prefix", "counted-crossing"],
)
def test_check_config_refuses_a_shared_route_overlapping_an_ordered_one(
    tmp_path: Path, ordered: str, shareable: str
) -> None:
    """A message matching both would reach the primary plainly and one member
    through the group: read twice, and the ordered route's device state
    would not be the only reader of it."""
    out = check_config(tmp_path, ordered + shareable, **PG)
    assert out.returncode == 78, (out.returncode, out.stderr)
    assert "routes[1]" in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("ordered", "shareable"),
    [
        (SPARKPLUG, PLAIN),
        (COUNTED, PLAIN),
        (COUNTED, route("counted/{sensor}/status")),
        (COUNTED + SPARKPLUG, HOMIE + PLAIN),
    ],
    ids=["sparkplug", "counted", "counted-sibling", "all"],
)
def test_check_config_accepts_shared_routes_apart_from_the_ordered_ones(
    tmp_path: Path, ordered: str, shareable: str
) -> None:
    out = check_config(tmp_path, ordered + shareable, **PG)
    assert out.returncode == 0, out.stderr
