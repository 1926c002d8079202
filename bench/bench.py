"""ingestd benchmark: throughput of consuming a broker backlog, against baselines.

    .venv/bin/python -m bench.bench                  # everything, 3 interleaved rounds
    .venv/bin/python -m bench.bench --quick          # one round, fewer messages

Method. For each run a fresh Mosquitto is started on a free loopback port and a
persistent session is registered for the consumer. The backlog is then
preloaded with `mosquitto_pub -l` (C, one process per sensor topic, over
100k msg/s here) while the consumer is not running, so the publisher never
competes with the consumer for the CPU. Then the consumer is started and timed
from its connection (CONNACK: the backlog starts flowing) to its last reading
(committed, for ingestd and the script; received, for the counting loop).
Scenarios run interleaved, round by round, and the table reports medians: the
machine is noisy.

Each consumer runs as its own process; CPU seconds and peak RSS are read from
/proc (ingestd, before it is stopped) or reported by the consumer itself
(getrusage, the baselines).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.pyspy import Profiler, summarize
from tests.support.brokers import Mosquitto
from tests.support.config import SHIPPED_CONFIG
from tests.support.postgres import Postgres, _children
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
SENSORS = 8
# Device times start at the top of the hour the benchmark starts in: a live
# fleet's readings are current, and into PostgreSQL they go to the partition
# of the day (a fixed date years back would go to the default partition).
# In the hour's first 15 minutes, the hour before: a scenario's times run up
# to 500 s past T0 (SenML packs), and more than processor.max_future_seconds
# (300) ahead of the clock they were quarantined, and the run never ended.
T0 = float((int(time.time()) - 900) // 3600 * 3600)


@dataclass(frozen=True)
class Scenario:
    name: str
    consumer: str  # "ingestd" | "aiomqtt" | "paho_sqlite" | "paho_sqlite_batch" | "mosquitto_sub"
    qos: int
    broker_inflight: int
    env: tuple[tuple[str, str], ...] = ()
    messages: int | None = None  # overrides --messages (the slow script)
    batch: int = 0  # records per message (a JSON array); 0: one object per message
    store: str = "sqlite"  # "sqlite" | "postgres" (a database of its own per run)
    instances: int = 1  # > 1: that many daemons in one shared group
    payload: str = "json"  # "json" | "senml" (batch > 0: a SenML pack of `batch` records)

    @property
    def readings_per_message(self) -> int:
        return 2 * max(self.batch, 1)


@dataclass
class Result:
    scenario: Scenario
    messages: int
    readings: int
    seconds: float
    cpu: float
    rss_mb: float
    lost: int
    broker_cpu: float = 0.0  # the broker's CPU seconds over the run
    db_cpu: float = 0.0  # PostgreSQL's (every server process), 0 for SQLite
    # ingestd's CPU seconds when its connection was seen in its log (start-up:
    # imports, the store opened; the backlog starts flowing then), all instances.
    start_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.readings / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Run:
    results: dict[str, list[Result]] = field(default_factory=dict)


MOSQUITTO_SUB_QOS1 = "mosquitto_sub (C, receive only), QoS 1"


def scenarios() -> list[Scenario]:
    fast = (("INGESTD_MQTT__BROKER_MAX_INFLIGHT", "1000"),)
    return [
        Scenario("aiomqtt loop, QoS 0", "aiomqtt", 0, 1000),
        Scenario("ingestd, QoS 0", "ingestd", 0, 1000),
        Scenario("aiomqtt loop, QoS 1, broker inflight 20", "aiomqtt", 1, 20),
        Scenario("aiomqtt loop, QoS 1, broker inflight 1000", "aiomqtt", 1, 1000),
        Scenario("ingestd, QoS 1 ack after commit, broker inflight 20", "ingestd", 1, 20),
        Scenario("ingestd, QoS 1 ack after commit, broker inflight 1000", "ingestd", 1, 1000, fast),
        Scenario(
            "ingestd, QoS 1 ack on receive, broker inflight 20",
            "ingestd",
            1,
            20,
            (("INGESTD_MQTT__ACK", "on_receive"),),
        ),
        Scenario(
            "ingestd, QoS 1 ack on receive, broker inflight 1000",
            "ingestd",
            1,
            1000,
            (("INGESTD_MQTT__ACK", "on_receive"), *fast),
        ),
        Scenario(
            "hand-written paho + sqlite3 script, QoS 1", "paho_sqlite", 1, 1000, messages=3000
        ),
        Scenario("mosquitto_sub (C, receive only), QoS 0", "mosquitto_sub", 0, 1000),
        Scenario(MOSQUITTO_SUB_QOS1, "mosquitto_sub", 1, 1000),
        Scenario(
            "paho + sqlite3 batch script (commit per 1,000), QoS 0", "paho_sqlite_batch", 0, 1000
        ),
        Scenario(
            "paho + sqlite3 batch script (commit per 1,000), QoS 1", "paho_sqlite_batch", 1, 1000
        ),
        Scenario(
            "ingestd, MQTT 5, QoS 1 ack after commit, broker inflight 1000",
            "ingestd",
            1,
            1000,
            (*fast, ("INGESTD_MQTT__PROTOCOL", "5")),
        ),
        Scenario(
            "ingestd, batch payloads (50 readings/message), QoS 1 ack after commit",
            "ingestd",
            1,
            1000,
            fast,
            messages=20_000,
            batch=25,
        ),
        Scenario(
            "ingestd, SenML packs (50 readings/message), QoS 1 ack after commit",
            "ingestd",
            1,
            1000,
            fast,
            messages=20_000,
            batch=25,
            payload="senml",
        ),
        Scenario(
            "ingestd -> PostgreSQL, QoS 1 ack after commit, broker inflight 1000",
            "ingestd",
            1,
            1000,
            fast,
            store="postgres",
        ),
        Scenario(
            "ingestd -> PostgreSQL, batch payloads (50 readings/message), QoS 1",
            "ingestd",
            1,
            1000,
            fast,
            messages=20_000,
            batch=25,
            store="postgres",
        ),
        Scenario(
            "2 x ingestd (shared group) -> PostgreSQL, QoS 1 ack after commit",
            "ingestd",
            1,
            1000,
            fast,
            store="postgres",
            instances=2,
        ),
    ]


_PG: list[Postgres] = []


def postgres_cluster() -> Postgres:
    """The benchmark's own PostgreSQL cluster (started once)."""
    if not _PG:
        _PG.append(Postgres(durable=True).start())
    return _PG[0]


# A database the next run's is made from (bench.fleet's store in use), if
# any; taken by that run (`postgres_database`), so it reaches no other.
TEMPLATE = [""]


def postgres_database() -> tuple[str, str]:
    """(name, URL) of a new database on the benchmark's own PostgreSQL cluster:
    empty, or a copy of TEMPLATE's, copied file by file (PostgreSQL 15's
    default strategy, WAL_LOG, would write the whole copy into the WAL; before
    15 a file copy is the only way). FILE_COPY checkpoints before and after
    the copy, so its pages are on disk before the run, not written during it."""
    pg = postgres_cluster()
    name = f"bench_{time.monotonic_ns()}"
    template, TEMPLATE[0] = TEMPLATE[0], ""
    if not template:
        return name, pg.create_db(name)
    version = int(pg.sql("SHOW server_version_num")[0][0])
    strategy = " STRATEGY FILE_COPY" if version >= 150000 else ""
    pg.sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"{strategy}')
    return name, pg.url(name)


def stop_postgres() -> None:
    """Stop and remove the benchmark's PostgreSQL cluster, if one was started."""
    while _PG:
        _PG.pop().cleanup()


def senml_pack(i: int, records: int) -> str:
    """A SenML pack of `records` records, 2 readings each (temperature and
    humidity), times base + j ms: pack i covers the times JSON array i does."""
    bt = T0 + i * records * 0.001
    out = []
    for j in range(records):
        head = f'"bn": "urn:dev:", "bt": {bt:.3f}, ' if j == 0 else ""
        out.append(f'{{{head}"n": "temperature", "t": {j * 0.001:.3f}, "v": {20 + j % 100 / 10}}}')
        out.append(f'{{"n": "humidity", "t": {j * 0.001:.3f}, "v": {(i + j) % 100}}}')
    return "[" + ", ".join(out) + "]"


def record(i: int) -> str:
    return (
        f'{{"ts": {T0 + i * 0.001:.3f}, "temperature": {20 + (i % 100) / 10}, '
        f'"humidity": {i % 100}}}'
    )


def preload(
    broker: Mosquitto,
    messages: int,
    qos: int,
    workdir: Path,
    batch: int = 0,
    payload: str = "json",
) -> None:
    per = messages // SENSORS
    procs = []
    for s in range(SENSORS):
        lines = workdir / f"load-{s}.txt"
        with lines.open("w") as fh:
            for i in range(per):
                if batch and payload == "senml":
                    fh.write(senml_pack(i, batch) + "\n")
                elif batch:
                    fh.write("[" + ", ".join(record(i * batch + j) for j in range(batch)) + "]\n")
                else:
                    fh.write(record(i) + "\n")
        procs.append(
            subprocess.Popen(
                [
                    "mosquitto_pub",
                    "-p",
                    str(broker.port),
                    "-q",
                    str(qos),
                    "-M",
                    "1000",
                    "-t",
                    f"sensors/dev{s}/telemetry",
                    "-l",
                ],
                stdin=lines.open("rb"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
    for p in procs:
        _, err = p.communicate(timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"mosquitto_pub failed: {err.decode()}")


def register_session(port: int, client_id: str, qos: int, group: str = "") -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    c.connect("127.0.0.1", port)
    c.loop_start()
    info = c.subscribe(f"$share/{group}/sensors/+/+" if group else "sensors/+/+", qos)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and info[0] != 0:
        time.sleep(0.01)
    time.sleep(0.2)
    c.disconnect()
    c.loop_stop()


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """CPU seconds used so far by each of these processes still alive."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def server_pids(broker: Mosquitto, sc: Scenario) -> tuple[list[int], list[int]]:
    """(the broker, PostgreSQL's postmaster and its children)."""
    db: list[int] = []
    if sc.store == "postgres" and _PG:
        pid_file = _PG[0].data / "postmaster.pid"
        postmaster = int(pid_file.read_text().split("\n", 1)[0])
        db = [postmaster, *_children(postmaster)]
    return ([broker.proc.pid] if broker.proc else []), db


def used_since(before: dict[int, float], pids: list[int]) -> float:
    """CPU seconds these processes used since `before` (new ones: all of theirs)."""
    return sum(c - before.get(pid, 0.0) for pid, c in cpu_seconds(pids).items())


def proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds, peak RSS in MB) of a live process."""
    cpu = cpu_seconds([pid])[pid]
    hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return cpu, hwm / 1024


def run_ingestd(
    sc: Scenario, broker: Mosquitto, messages: int, work: Path, profile: Path | None = None
) -> Result:
    ids = [f"bench-ingestd-{i}" for i in range(sc.instances)]
    group = "bench" if sc.instances > 1 else ""
    for client_id in ids:
        register_session(broker.port, client_id, sc.qos, group)
    preload(broker, messages, sc.qos, work, sc.batch, sc.payload)
    expected = messages * sc.readings_per_message
    config = work / "ingestd.toml"
    text = SHIPPED_CONFIG.read_text().replace("qos = 1", f"qos = {sc.qos}")
    if sc.payload == "senml":
        json_route = (
            'format = "json"\nsensor = "{sensor}"\nmetric = "{field}"\ntimestamp_field = "ts"'
        )
        assert json_route in text, "the shipped telemetry route changed"
        text = text.replace(json_route, 'format = "senml"\nsensor = "{sensor}"\nmetric = "{field}"')
    config.write_text(text)
    base = {
        **{k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")},
        "INGESTD_MQTT__PORT": str(broker.port),
        "INGESTD_STORE__PATH": str(work / "ingestd.db"),
        "INGESTD_DAEMON__LOG_FORMAT": "json",
        "INGESTD_METRICS__PORT": "0",
        **dict(sc.env),
    }
    database = ""
    if sc.store == "postgres":
        database, base["INGESTD_STORE__URL"] = postgres_database()
    if group:
        base["INGESTD_MQTT__SHARED_GROUP"] = group
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []

    def own_spool(client_id: str) -> dict[str, str]:
        """A spool each (two instances refuse to share one), for PostgreSQL."""
        if sc.store != "postgres" or len(ids) == 1:
            return {}
        return {"INGESTD_STORE__SPOOL__PATH": str(work / f"{client_id}-spool.db")}

    for client_id in ids:
        log = work / f"{client_id}.log"
        logs.append(log)
        with log.open("wb") as fh:
            procs.append(
                subprocess.Popen(
                    [PY, "-m", "ingestd", "--config", str(config)],
                    env={**base, "INGESTD_MQTT__CLIENT_ID": client_id, **own_spool(client_id)},
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                )
            )
    profiler = Profiler(procs[0].pid, profile) if profile else None
    broker_pids, db_pids = server_pids(broker, sc)
    servers_before = cpu_seconds(broker_pids + db_pids)
    connected: list[float] = []
    urls: list[str] = []
    done_at: list[float] = []
    committed_total = [0]
    start_cpu: dict[int, float] = {}

    scraped_at = [0.0]

    def committed() -> bool:
        # Per-batch lines are debug (the log is quiet at info): the daemons'
        # committed counters say when the backlog is in. A scrape of /metrics
        # costs the daemon ~1.8 ms of CPU (and the GIL): every 20 ms that was
        # a tenth of a core taken from what is measured. So every 200 ms
        # until 90% is in, then every 20 ms (when the end is timed).
        for log, proc in zip(logs, procs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"ingestd exited early:\n{log.read_text()[-3000:]}")
            # Each instance's start-up: its CPU when its own connection shows
            # (another's, already draining the backlog, may have shown earlier).
            if proc.pid not in start_cpu and '"connected to broker"' in log.read_text():
                start_cpu.update(cpu_seconds([proc.pid]))
        if len(urls) < len(procs) or len(connected) < len(procs):
            urls.clear()
            connected.clear()
            for log in logs:
                for line in log.read_text().splitlines():
                    if '"metrics listening"' in line:
                        urls.append(json.loads(line)["url"])
                    elif '"connected to broker"' in line:
                        e = json.loads(line)
                        at = dt.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00"))
                        connected.append(at.timestamp())
            if len(urls) < len(procs):
                return False
        now = time.monotonic()
        if committed_total[0] < 0.9 * expected and now - scraped_at[0] < 0.2:
            return False
        scraped_at[0] = now
        total = sum(_committed(url) for url in urls)
        committed_total[0] = total
        if total >= expected:
            done_at.append(time.time())
            return True
        return False

    try:
        wait_for(committed, 600, interval=0.02, what="the backlog to be committed")
        # Then stopped at once, and timed to its exit: what a daemon writes
        # after the commit (the rollups it closes at a stop) counts too.
        peaks = [proc_stats(p.pid)[1] for p in procs]
        # The server's backends for this run, counted whole, before the stop
        # ends them (their CPU goes with them; what the stop's close costs
        # the server is not counted).
        db_cpu = used_since(servers_before, server_pids(broker, sc)[1])
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            wait_for(lambda p=proc: _exited(p.pid), 120, interval=0.005, what="ingestd to exit")
        done_at.append(time.time())
        stats = [(cpu_seconds([p.pid])[p.pid], peak) for p, peak in zip(procs, peaks, strict=True)]
        broker_cpu = used_since(servers_before, broker_pids)
    finally:
        if profiler:
            profiler.stop()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(30)
        if database:
            # Gone before the next run: the server's autovacuum of this run's
            # tables would otherwise land in a later run (measured: the server's
            # CPU per run crept from 1.10 to 1.79 s over four runs).
            _PG[0].sql(f'DROP DATABASE "{database}" WITH (FORCE)')
    total = committed_total[0]
    # From the first connection (the backlog starts flowing) to the exit after
    # a stop sent as soon as it was all committed (polled every 20 ms); every
    # consumer is timed from its connection. CPU: all instances'; RSS: the
    # largest instance's.
    return Result(
        sc,
        messages,
        total,
        max(done_at[-1] - min(connected), 1e-9),
        sum(c for c, _ in stats),
        max(r for _, r in stats),
        lost=expected - total,
        broker_cpu=broker_cpu,
        db_cpu=db_cpu,
        start_cpu=sum(start_cpu.values()),
    )


def _exited(pid: int) -> bool:
    """Exited and not yet reaped (its CPU times still readable)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def _committed(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("ingestd_readings_committed_total "):
                return int(float(line.split()[1]))
    return 0


def run_baseline(sc: Scenario, broker: Mosquitto, messages: int, work: Path) -> Result:
    client_id = f"bench-{sc.consumer}"
    register_session(broker.port, client_id, sc.qos)
    preload(broker, messages, sc.qos, work)
    args = [
        PY,
        "-m",
        f"bench.consumers.{sc.consumer}_count"
        if sc.consumer == "aiomqtt"
        else f"bench.consumers.{sc.consumer}",
        "--port",
        str(broker.port),
        "--expect",
        str(messages),
        "--qos",
        str(sc.qos),
        "--client-id",
        client_id,
    ]
    if sc.consumer.startswith("paho_sqlite"):
        args += ["--db", str(work / "script.db")]
    broker_pids = server_pids(broker, sc)[0]
    before = cpu_seconds(broker_pids)
    proc = subprocess.run(args, capture_output=True, cwd=REPO, timeout=600, check=False)
    broker_cpu = used_since(before, broker_pids)
    if proc.returncode != 0:
        raise RuntimeError(f"{sc.consumer} failed: {proc.stderr.decode()[-2000:]}")
    r = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    readings = r["count"] * sc.readings_per_message
    # The consumer reports its own getrusage(): CPU seconds and peak RSS.
    return Result(
        sc,
        messages,
        readings,
        max(r["last"] - r["first"], 1e-9),
        r["cpu"],
        r["rss_kb"] / 1024,
        lost=messages - r["count"],
        broker_cpu=broker_cpu,
    )


def run_latency(
    broker: Mosquitto, rate: float, seconds: float, work: Path, env_extra: dict[str, str]
) -> dict[str, float]:
    """Publish live at `rate` messages/s; the publish-to-commit latency of every reading.

    Each record carries its publish time; the database is polled every 10 ms
    through the per-series index, so a reading's commit time is known to
    within one poll.
    """
    client_id = "bench-latency"
    count = int(rate * seconds)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")},
        "INGESTD_MQTT__PORT": str(broker.port),
        "INGESTD_MQTT__CLIENT_ID": client_id,
        "INGESTD_STORE__PATH": str(work / "latency.db"),
        "INGESTD_DAEMON__LOG_FORMAT": "json",
        **env_extra,
    }
    log = work / "latency.log"
    with log.open("wb") as fh:
        daemon = subprocess.Popen(
            [PY, "-m", "ingestd", "--config", str(SHIPPED_CONFIG)],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    pubs: list[subprocess.Popen[bytes]] = []
    latencies: list[float] = []
    try:
        wait_for(lambda: '"msg": "ready"' in log.read_text(), 30, what="ingestd ready")
        per = rate / SENSORS
        for s in range(SENSORS):
            gen = subprocess.Popen(
                [PY, "-m", "bench.paced", "--rate", str(per), "--count", str(count // SENSORS)],
                stdout=subprocess.PIPE,
                cwd=REPO,
            )
            assert gen.stdout is not None
            pubs.append(gen)
            pubs.append(
                subprocess.Popen(
                    [
                        "mosquitto_pub",
                        "-p",
                        str(broker.port),
                        "-q",
                        "1",
                        "-M",
                        "1000",
                        "-t",
                        f"sensors/live{s}/telemetry",
                        "-l",
                    ],
                    stdin=gen.stdout,
                )
            )
            gen.stdout.close()
        expected = (count // SENSORS) * SENSORS * 2
        db = sqlite3.connect(f"file:{work / 'latency.db'}?mode=ro", uri=True)
        seen: dict[int, int] = {}
        deadline = time.monotonic() + seconds * 3 + 30
        while len(latencies) < expected and time.monotonic() < deadline:
            time.sleep(0.01)
            now = time.time()
            for (sid,) in db.execute("SELECT id FROM series").fetchall():
                rows = db.execute(
                    "SELECT ts_ns FROM samples WHERE series_id = ? AND ts_ns > ?",
                    (sid, seen.get(sid, 0)),
                ).fetchall()
                if rows:
                    latencies.extend(now - ns / 1e9 for (ns,) in rows)
                    seen[sid] = max(ns for (ns,) in rows)
        db.close()
        cpu, rss = proc_stats(daemon.pid)
    finally:
        for p in pubs:
            if p.poll() is None:
                p.kill()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    return {
        "readings": len(latencies),
        "expected": expected,
        "p50": q[49] * 1000,
        "p99": q[98] * 1000,
        "max": latencies[-1] * 1000,
        "rate": rate * 2,
        "cpu": cpu,
        "rss": rss,
    }


def run_one(sc: Scenario, messages: int, profile: Path | None = None) -> Result:
    work = Path(tempfile.mkdtemp(prefix="ingestd-bench-"))
    broker = Mosquitto(
        work / "broker",
        max_inflight=sc.broker_inflight,
        extra="queue_qos0_messages true\nmax_queued_bytes 0\nautosave_interval 3600\n",
    ).start()
    try:
        n = sc.messages or messages
        if sc.consumer == "ingestd":
            return run_ingestd(sc, broker, n, work, profile)
        return run_baseline(sc, broker, n, work)
    finally:
        broker.kill()
        shutil.rmtree(work, ignore_errors=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def report(run: Run, rounds: int, messages: int, command: str, elapsed: float) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpu = platform.processor() or platform.machine()
    mosq = subprocess.run(
        ["mosquitto", "-h"], capture_output=True, text=True, check=False
    ).stdout.split("\n")[0]
    lines = [
        f"Measured {now} on {os.cpu_count()} cores ({cpu}), {platform.python_implementation()} "
        f"{platform.python_version()}, {mosq.strip()}, broker and consumer on one machine.",
        f"Command: `{command}` ({rounds} interleaved round(s), {messages:,} messages per run "
        f"unless noted, {elapsed:.0f} s in all).",
        "",
        "| scenario | messages | readings/s (median) | min-max | CPU s | of it start-up "
        "| broker CPU s | DB CPU s | peak RSS MB | lost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, results in run.results.items():
        rates = [r.rate for r in results]
        lines.append(
            f"| {name} | {results[0].messages:,} | {median(rates):,.0f} | "
            f"{min(rates):,.0f}-{max(rates):,.0f} | {median([r.cpu for r in results]):.2f} | "
            f"{_or_dash(median([r.start_cpu for r in results]))} | "
            f"{median([r.broker_cpu for r in results]):.2f} | "
            f"{_or_dash(median([r.db_cpu for r in results]))} | "
            f"{median([r.rss_mb for r in results]):.1f} | {max(r.lost for r in results)} |"
        )
    per = {
        name: median([(r.cpu - r.start_cpu) / r.messages * 1e6 for r in results])
        for name, results in run.results.items()
        if results
    }
    ours, ref = "ingestd, QoS 1 ack after commit, broker inflight 1000", MOSQUITTO_SUB_QOS1
    if ours in per and ref in per:
        lines += [
            "",
            f"CPU per QoS 1 message (after ingestd's start-up): ingestd {per[ours]:.1f} us, "
            f"mosquitto_sub {per[ref]:.1f} us ({per[ours] / per[ref]:.2f}x).",
        ]
    return "\n".join(lines) + "\n"


def _or_dash(seconds: float) -> str:
    return f"{seconds:.2f}" if seconds else "-"


def latency_report(rate: float, seconds: float, rounds: int) -> str:
    runs = []
    for rnd in range(rounds):
        work = Path(tempfile.mkdtemp(prefix="ingestd-latency-"))
        broker = Mosquitto(work / "broker", max_inflight=1000).start()
        try:
            r = run_latency(
                broker, rate, seconds, work, {"INGESTD_MQTT__BROKER_MAX_INFLIGHT": "1000"}
            )
        finally:
            broker.kill()
            shutil.rmtree(work, ignore_errors=True)
        runs.append(r)
        print(
            f"latency round {rnd + 1}: p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms, "
            f"max {r['max']:.0f} ms, {r['readings']}/{r['expected']} readings",
            file=sys.stderr,
            flush=True,
        )
    return (
        f"\nLatency, live QoS 1 publishing at {rate:,.0f} messages/s ({2 * rate:,.0f} "
        f"readings/s) for {seconds:.0f} s, {rounds} run(s), default batch settings "
        "(max_delay_ms 200); publish time from the payload, commit time by polling the "
        "database every 10 ms:\n\n"
        "| run | readings | p50 ms | p99 ms | max ms | CPU s | peak RSS MB |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        + "".join(
            f"| {i + 1} | {r['readings']:,}/{r['expected']:,} | {r['p50']:.0f} | "
            f"{r['p99']:.0f} | {r['max']:.0f} | {r['cpu']:.2f} | {r['rss']:.1f} |\n"
            for i, r in enumerate(runs)
        )
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 round of 20,000 messages")
    p.add_argument(
        "--only",
        default="",
        help="run scenarios whose name contains this (or one of these, '|'-separated)",
    )
    p.add_argument("--out", type=Path, default=None, help="write the table to this file")
    p.add_argument(
        "--latency-rate",
        type=float,
        default=0.0,
        help="also run the latency test, publishing this many messages/s",
    )
    p.add_argument("--latency-seconds", type=float, default=10.0)
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="sample the daemon with py-spy; write and summarize profiles in DIR",
    )
    a = p.parse_args()
    if a.quick:
        a.rounds, a.messages = 1, 20_000
    if shutil.which("mosquitto_pub") is None:
        print("bench: mosquitto_pub not found (apt-get install mosquitto-clients)", file=sys.stderr)
        return 1
    wanted = [w.strip().lower() for w in a.only.split("|")]
    chosen = [s for s in scenarios() if any(w in s.name.lower() for w in wanted)]
    run = Run({s.name: [] for s in chosen})
    try:  # the PostgreSQL cluster it started goes with it, whatever fails
        started = time.monotonic()
        if a.profile:
            a.profile.mkdir(parents=True, exist_ok=True)
        for rnd in range(a.rounds):
            for sc in chosen:
                prof = None
                if a.profile and sc.consumer == "ingestd":
                    slug = re.sub(r"[^a-z0-9]+", "-", sc.name.lower()).strip("-")
                    prof = a.profile / f"{slug}-{rnd + 1}.txt"
                r = run_one(sc, a.messages, prof)
                run.results[sc.name].append(r)
                print(
                    f"round {rnd + 1}: {sc.name}: {r.rate:,.0f} readings/s, cpu {r.cpu:.2f}s, "
                    f"rss {r.rss_mb:.1f} MB, lost {r.lost}",
                    file=sys.stderr,
                    flush=True,
                )
                if prof and prof.exists():
                    print(summarize(prof), file=sys.stderr, flush=True)
        command = "python -m bench.bench " + " ".join(sys.argv[1:])
        table = report(run, a.rounds, a.messages, command.strip(), time.monotonic() - started)
        if a.latency_rate:
            table += latency_report(a.latency_rate, a.latency_seconds, a.rounds)
        print(table)
        if a.out:
            a.out.write_text(table)
    finally:
        stop_postgres()
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    raise SystemExit(main())
