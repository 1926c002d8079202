"""Memory with many distinct device ids: peak RSS of the real daemon.

    .venv/bin/python -m bench.daemon_ids --ids 1000000
    .venv/bin/python -m bench.daemon_ids --ids 1000000 --sequence  # sequence_field, expect_within
    .venv/bin/python -m bench.daemon_ids --model 100000            # bytes per entry, in process

A private Mosquitto on a free loopback port (max_inflight_messages 1000, no
queue limits, so nothing is dropped), `python -m ingestd` as a subprocess with
its SQLite database in a temporary directory, and a route
`sensors/{sensor}/telemetry` (JSON). Every id is new and sends ONE QoS 1
message of two readings (`{"ts": ..., "t": 21.5, "h": 40}`; with
`--sequence` also `"seq": 1`, on a route with `sequence_field = "seq"` and
`expect_within = 3600`). The ids go in stages up to each checkpoint,
published by `--publishers` paho clients in threads (each with a window of
`--inflight` messages); after each stage the daemon's committed counter
(/metrics) must reach two readings per id, and its peak RSS (VmHWM) and
current RSS (VmRSS) are read from /proc. At the end the readings are counted
in the database, and the daemon is restarted on it: what it holds idle
then is what it loads from the database at start-up (series ids, stored
sequence counters) on top of a fresh process.

`--model N` measures instead, in this process (tracemalloc, and RSS growth),
the per-entry cost of what the daemon keeps per id without a bound: the
store's `series_ids` (one entry per series: here two per id) as a running
daemon adds them and as `open` loads them, the route table's `sensor_seen`
(per route and sensor, with `expect_within`) and the store's `sequences`
(loaded at start-up from `sensor_status`), built as the daemon builds them.

Measured (2 cores, CPython 3.11.7, Mosquitto 2.0.11), 1,000,000 ids: peak
RSS 52 MB at start, 133 at 100,000 ids, 193 at 250,000, 301 at 500,000, 510
at 1,000,000 (215 s; 2,000,000 readings stored), and 658 MB after a restart
on that database, idle. With `--sequence`: 670 MB at 1,000,000 ids, 903
after a restart. The growth is the store's `series_ids`, ~190 bytes a series
(~300 as loaded at start-up), plus `sensor_seen`, ~160 bytes a sensor.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.support.brokers import Mosquitto
from tests.support.daemon import DaemonProcess, daemon_for
from tests.support.mqtt import publish
from tests.support.waiting import wait_for

# Device times: the top of the hour an hour ago, plus up to a second (recent,
# never in the future; every id is its own series, so the times may repeat).
T0 = float(int(time.time()) // 3600 * 3600 - 3600)
ROUTE = """
[[routes]]
topic = "sensors/{sensor}/telemetry"
format = "json"
qos = 1
"""
SEQUENCE_ROUTE = ROUTE + 'sequence_field = "seq"\nexpect_within = 3600\n'


def proc_kb(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon of a live process, in kB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon"):
            out[key] = int(value.split()[0])
    return out


def committed(url: str) -> int:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("ingestd_readings_committed_total "):
                return int(float(line.split()[1]))
    return 0


def messages(first: int, last: int, sequence: bool) -> Iterator[tuple[str, bytes]]:
    seq = '"seq": 1, ' if sequence else ""
    for i in range(first, last):
        ts = T0 + (i % 1000) * 0.001
        yield f"sensors/d{i:07d}/telemetry", f'{{{seq}"ts": {ts:.3f}, "t": 21.5, "h": 40}}'.encode()


def publish_parallel(
    port: int, first: int, last: int, publishers: int, a: argparse.Namespace
) -> None:
    """Ids [first, last) split among `publishers` paho clients, one thread each."""
    step = -(-(last - first) // publishers)
    errors: list[BaseException] = []

    def run(k: int, lo: int, hi: int) -> None:
        try:
            publish(
                port, messages(lo, hi, a.sequence), inflight=a.inflight, client_id=f"pub{k}-{lo}"
            )
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(k, lo, min(lo + step, last)))
        for k, lo in enumerate(range(first, last, step))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def row(label: str, ids: int, kb: dict[str, int], seconds: float, readings: int) -> str:
    return (
        f"{label:>10} {ids:>10,} {kb['VmHWM'] / 1024:>12.1f} {kb['VmRSS'] / 1024:>11.1f} "
        f"{seconds:>8.1f} {readings:>10,}"
    )


def measure(a: argparse.Namespace) -> int:
    checkpoints = sorted({c for c in a.checkpoints if 0 < c < a.ids} | {a.ids})
    work = Path(tempfile.mkdtemp(prefix="ingestd-ids-"))
    broker = Mosquitto(
        work / "broker",
        max_inflight=1000,
        extra="max_queued_bytes 0\nautosave_interval 3600\n",
    ).start()
    daemon: DaemonProcess | None = None
    try:
        daemon = daemon_for(
            work / "daemon",
            broker.port,
            SEQUENCE_ROUTE if a.sequence else ROUTE,
            INGESTD_MQTT__BROKER_MAX_INFLIGHT="1000",
        ).start()
        daemon.wait_ready(30)
        url = daemon.metrics_url()
        proc, logs = daemon.proc, daemon.logs
        assert proc is not None
        pid = proc.pid
        route = "sequence_field + expect_within" if a.sequence else "json"
        print(f"route: {route}; {a.publishers} publishers, in-flight {a.inflight} each")
        head = f"{'ids':>10} {'peak RSS MB':>12} {'RSS MB':>11} {'seconds':>8} {'readings':>10}"
        print(f"{'':>10} {head}")
        print(row("start", 0, proc_kb(pid), 0.0, committed(url)), flush=True)
        started = time.monotonic()
        deadline = started + a.timeout
        done = 0
        for upto in checkpoints:
            publish_parallel(broker.port, done, upto, a.publishers, a)
            want = 2 * upto

            def caught_up(want: int = want) -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"ingestd exited:\n{logs()[-3000:]}")
                return committed(url) >= want

            wait_for(caught_up, max(1.0, deadline - time.monotonic()), 0.1, f"{want:,} readings")
            done = upto
            print(
                row("", upto, proc_kb(pid), time.monotonic() - started, committed(url)), flush=True
            )
        db = work / "daemon" / "ingestd.db"
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            stored = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
            series = conn.execute("SELECT count(*) FROM series").fetchone()[0]
        print(f"stored: {stored:,} readings ({2 * a.ids:,} sent), {series:,} series")
        if a.restart:
            daemon.stop()
            daemon.start()
            daemon.wait_ready(120)
            time.sleep(2)
            assert daemon.proc is not None
            print(row("restarted", a.ids, proc_kb(daemon.proc.pid), 0.0, 0) + "  (idle)")
        return 0 if stored == 2 * a.ids else 1
    finally:
        if daemon is not None:
            daemon.stop()
        broker.kill()
        shutil.rmtree(work, ignore_errors=True)


def rss_kb() -> int:
    return proc_kb(int(Path("/proc/self").resolve().name))["VmRSS"]


def per_entry(n: int, build: Callable[[int], object]) -> tuple[float, float]:
    """(bytes per entry kept, peak bytes per entry while building), tracemalloc."""
    gc.collect()
    tracemalloc.start()
    kept = build(n)
    size, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del kept
    return size / n, peak / n


def series_ids(n: int) -> dict[tuple[str, str, str, str], int]:
    """As SqliteStore keeps them: (sensor, metric, tags, unit) -> id, two series
    per sensor sharing its id string (one topic, two readings), ids from SQLite,
    added batch by batch (`series_ids.update(new_series)`)."""
    out: dict[tuple[str, str, str, str], int] = {}
    ids = itertools.count(1)
    for first in range(0, n // 2, 2500):  # 5,000 readings a batch
        new = {}
        for i in range(first, min(first + 2500, n // 2)):
            sensor = f"sensors/d{i:07d}/telemetry".split("/")[1]
            new[(sensor, "t", "", "")] = int(str(next(ids)))
            new[(sensor, "h", "", "")] = int(str(next(ids)))
        out.update(new)
    return out


def sensor_seen(n: int) -> dict[tuple[int, str], int]:
    """As RouteTable keeps it: (route index, sensor) -> monotonic ns."""
    now = time.monotonic_ns()
    return {(0, f"sensors/d{i:07d}/telemetry".split("/")[1]): now + i for i in range(n)}


def prepared(path: Path, n: int) -> Path:
    """A database with `n` series (two per sensor) and `n` sensors' counters,
    in the tables the store loads at start-up."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE series (id INTEGER PRIMARY KEY, sensor, metric, tags, unit)")
    conn.execute("CREATE TABLE sensor_status (sensor, last_seq, seq_gaps, seq_missing)")
    conn.executemany(
        "INSERT INTO series (sensor, metric, tags, unit) VALUES (?, ?, '', '')",
        ((f"d{i // 2:07d}", "th"[i % 2]) for i in range(n)),
    )
    conn.executemany(
        "INSERT INTO sensor_status VALUES (?, 1, 0, 0)", ((f"d{i:07d}",) for i in range(n))
    )
    conn.commit()
    conn.close()
    return path


def series_ids_loaded(path: Path) -> Callable[[int], object]:
    """As SqliteStore.open loads them: every row fetched, then the dict."""

    def build(n: int) -> dict[tuple[str, str, str, str], int]:
        conn = sqlite3.connect(path)
        rows = list(conn.execute("SELECT sensor, metric, tags, unit, id FROM series").fetchall())
        out = {(s, m, t, u): i for s, m, t, u, i in rows}
        conn.close()
        assert len(out) == n
        return out

    return build


def sequences_loaded(path: Path) -> Callable[[int], object]:
    """As SqliteStore.open loads them: sensor -> (last_seq, gaps, missing)."""

    def build(n: int) -> dict[str, tuple[int, int, int]]:
        conn = sqlite3.connect(path)
        cur = conn.execute("SELECT sensor, last_seq, seq_gaps, seq_missing FROM sensor_status")
        out = {r[0]: (r[1], r[2], r[3]) for r in cur.fetchall()}
        conn.close()
        assert len(out) == n
        return out

    return build


def model(n: int) -> int:
    work = Path(tempfile.mkdtemp(prefix="ingestd-ids-model-"))
    try:
        db = prepared(work / "loaded.db", n)
        builders = {
            "store series_ids (running)": series_ids,
            "table sensor_seen": sensor_seen,
            "store series_ids (start-up)": series_ids_loaded(db),
            "store sequences (start-up)": sequences_loaded(db),
        }
        # RSS first, untraced, every structure kept meanwhile (freed memory would
        # be reused by the next); then tracemalloc, one at a time.
        rss: dict[str, float] = {}
        held = []
        for name, build in builders.items():
            gc.collect()
            before = rss_kb()
            held.append(build(n))
            rss[name] = (rss_kb() - before) * 1024 / n
        del held
        print(f"per entry, {n:,} entries (CPython {sys.version.split()[0]}):")
        print(f"{'':>28} {'bytes kept':>11} {'peak':>8} {'RSS':>8}")
        for name, build in builders.items():
            kept, peak = per_entry(n, build)
            print(f"{name:>28} {kept:>11.0f} {peak:>8.0f} {rss[name]:>8.0f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ids", type=int, default=1_000_000)
    p.add_argument(
        "--checkpoints",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[100_000, 250_000, 500_000],
        help="comma-separated id counts to report at (and --ids)",
    )
    p.add_argument("--sequence", action="store_true", help="sequence_field and expect_within")
    p.add_argument("--publishers", type=int, default=4)
    p.add_argument("--inflight", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=1200, help="seconds for the whole load")
    p.add_argument("--no-restart", dest="restart", action="store_false")
    p.add_argument("--model", type=int, default=0, metavar="N", help="per-entry costs only")
    a = p.parse_args()
    return model(a.model) if a.model else measure(a)


if __name__ == "__main__":
    raise SystemExit(main())
