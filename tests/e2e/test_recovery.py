"""Recovering from mistakes, as an operator does it beside the running daemon:
`ingestd quarantine replay` after a limit set too tight, and `ingestd import`
of exports and device logs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from ingestd.events import NS, Reading
from ingestd.store.sqlite import SqliteStore
from tests.support.brokers import Mosquitto
from tests.support.config import write_config
from tests.support.daemon import DaemonFactory
from tests.support.db import DbReader, StoreUnderTest
from tests.support.mqtt import publish
from tests.support.waiting import wait_for

T0 = 1_700_000_000
ROUTES = """
[[routes]]
topic = "sensors/{sensor}/telemetry"
format = "json"

[[routes]]
topic = "lp/{sensor}"
format = "influx"

[[routes]]
topic = "senml/{sensor}"
format = "senml"
"""


def ingestd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it (the daemon's INGESTD_* settings in `env`)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    proc = subprocess.run(
        [sys.executable, "-m", "ingestd", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def _limits(config: Path, most: float) -> Path:
    return write_config(
        config, routes=ROUTES + f"\n[processor.limits]\ntemperature = {{ max = {most} }}\n"
    )


def test_replay_after_a_limit_set_too_tight(
    mosquitto: Mosquitto, daemons: DaemonFactory, store: StoreUnderTest, tmp_path: Path
) -> None:
    config = _limits(tmp_path / "ingestd.toml", 50)
    daemon = daemons(mosquitto.port, config=config).start()
    daemon.wait_ready()
    env = {**daemon.env}
    db = store.reader

    def message(i: int, temperature: float) -> tuple[str, bytes]:
        doc = {"ts": T0 + i, "temperature": temperature, "humidity": 40}
        return (f"sensors/d{i % 5}/telemetry", json.dumps(doc).encode())

    # 100 good readings refused by a limit too tight, 50 that stay refused
    # (for a new reason), one message no config reads.
    publish(mosquitto.port, [message(i, 60.5) for i in range(100)])
    publish(mosquitto.port, [message(1000 + i, 90.0) for i in range(50)])
    publish(mosquitto.port, [("sensors/bad/telemetry", b'{"temperature": oops')])
    wait_for(lambda: db.count("quarantine") == 151, 30, what="151 quarantine records")
    assert db.count("readings") == 150  # humidity only

    _limits(config, 80)
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: '"configuration reloaded"' in daemon.logs(), 20, what="the reload")

    dry = ingestd("quarantine", "replay", "-c", str(config), "--dry-run", env=env)
    assert dry.stdout.count("would store 1 reading(s)") == 100
    assert dry.stdout.count("refused: temperature=90 is above the limit max=80") == 50
    assert "still refused: payload is not valid JSON" in dry.stdout
    assert "100 would be accepted (100 reading(s)), 50 refused for a new reason, 1 still" in (
        dry.stderr
    )
    assert db.count("quarantine") == 151
    assert db.count("readings") == 150

    # Replayed while the daemon goes on storing a live stream.
    live = threading.Thread(
        target=publish, args=(mosquitto.port, [message(5000 + i, 20.0) for i in range(2000)])
    )
    live.start()
    done = ingestd("quarantine", "replay", "-c", str(config), env=env)
    live.join(60)
    assert (
        "151 record(s) matched: 100 accepted (100 reading(s) stored, 0 already stored), "
        "50 refused for a new reason, 1 still refused as before; 150 record(s) removed, "
        "50 written"
    ) in done.stderr
    wait_for(lambda: db.count("readings") == 150 + 100 + 4000, 30, what="every reading")
    assert db.count("readings WHERE metric = 'temperature' AND value = 60.5") == 100
    reasons = db.rows("SELECT reason, count(*) FROM quarantine GROUP BY reason ORDER BY 2")
    assert [n for _, n in reasons] == [1, 50]
    assert "max=80" in reasons[1][0]

    # Twice: nothing stored twice, nothing rewritten.
    again = ingestd("quarantine", "replay", "-c", str(config), env=env)
    assert "51 record(s) matched: 0 accepted" in again.stderr
    assert "0 record(s) removed, 0 written" in again.stderr
    assert db.count("readings") == 4250
    assert db.count("quarantine") == 51
    assert daemon.stop() == 0


def _populated(path: Path) -> None:
    """A database with tags, units, repeated times (seq) and awkward text."""

    async def fill() -> None:
        async with SqliteStore(path) as store, store.batch() as tx:
            await tx.add_readings(
                [Reading("k", "temperature", (T0 + i) * NS + 123, 20 + i / 7) for i in range(500)]
                + [
                    Reading("k", "power", T0 * NS, float(n), "", f'{{"phase":"{p}"}}', "W", n)
                    for p in ("L1", "L2")
                    for n in range(3)
                ]
                + [Reading("k", 'odd,"name"\n2', T0 * NS, 1e-300, "", "", "°C")]
            )

    asyncio.run(fill())


def test_import_round_trips_an_export_and_is_idempotent(tmp_path: Path) -> None:
    _populated(tmp_path / "a.db")
    export = ingestd(
        "query", "--db", str(tmp_path / "a.db"), "-s", "k", "--since", "0", "-f", "csv"
    )
    (tmp_path / "k.csv").write_text(export.stdout, newline="")
    first = ingestd("import", "--db", str(tmp_path / "b.db"), str(tmp_path / "k.csv"))
    assert "507 reading(s) read from k.csv" in first.stderr
    assert "507 stored, 0 already stored, 0 quarantined" in first.stderr
    back = ingestd("query", "--db", str(tmp_path / "b.db"), "-s", "k", "--since", "0", "-f", "csv")
    assert back.stdout == export.stdout
    a = DbReader(tmp_path / "a.db").rows("SELECT * FROM readings ORDER BY 1, 2, 3, 5, 6, 8")
    b = DbReader(tmp_path / "b.db").rows("SELECT * FROM readings ORDER BY 1, 2, 3, 5, 6, 8")
    assert a == b
    again = ingestd("import", "--db", str(tmp_path / "b.db"), str(tmp_path / "k.csv"))
    assert "0 stored, 507 already stored, 0 quarantined" in again.stderr


def test_import_device_logs_quarantines_bad_lines_by_number(tmp_path: Path) -> None:
    config = write_config(tmp_path / "ingestd.toml", routes=ROUTES, store={"path": "x.db"})
    db = tmp_path / "x.db"
    lp = tmp_path / "dev7.lp"
    lines = [
        f"env,room=a temperature={20 + i / 10},humidity=40i {(T0 + i) * NS}" for i in range(99)
    ]
    lines.insert(41, "env,room=a temperature=oops 1700000000000000000")
    lp.write_text("# a device's log\n" + "\n".join(lines) + "\n")
    senml = tmp_path / "dev8.senml"
    senml.write_text(
        json.dumps([{"bn": "dev8:", "bt": T0, "n": "temp", "u": "Cel", "v": 23.1}])
        + "\n"
        + json.dumps([{"bn": "dev8:", "n": "temp", "u": "Cel", "t": T0 + 60, "v": 23.4}])
        + "\n[{nope\n"
    )
    env = {"INGESTD_STORE__PATH": str(db)}
    done = ingestd("import", "-c", str(config), "--topic", "lp/dev7", str(lp), env=env)
    assert "198 reading(s) read from dev7.lp" in done.stderr
    assert "198 stored, 0 already stored, 1 quarantined" in done.stderr
    ingestd("import", "-c", str(config), "--topic", "senml/dev8", str(senml), env=env)
    reader = DbReader(db)
    assert reader.count("readings WHERE sensor = 'dev7'") == 198
    assert reader.count("readings WHERE sensor = 'dev8'") == 2
    assert reader.rows("SELECT unit FROM readings WHERE sensor = 'dev8'") == [("Cel",), ("Cel",)]
    reasons = [r for (r,) in reader.rows("SELECT reason FROM quarantine ORDER BY id")]
    assert reasons[0].startswith(f"{lp} line 43: ")
    assert "oops" in reasons[0]
    assert reasons[1].startswith(f"{senml} line 3: ")
    assert len(reasons) == 2


def test_import_while_the_daemon_writes(
    mosquitto: Mosquitto, daemons: DaemonFactory, tmp_path: Path
) -> None:
    daemon = daemons(mosquitto.port, routes=ROUTES).start()
    daemon.wait_ready()
    rows = ["sensor,metric,time,ts,value,tags,unit,ts_ns"] + [
        f"old{i % 10},temperature,,,{i / 4},,,{(T0 - 86400 * 30 + i) * NS}" for i in range(200_000)
    ]
    data = tmp_path / "old.csv"
    data.write_text("\n".join(rows) + "\n")
    live = [
        (f"sensors/live{i % 10}/telemetry", json.dumps({"ts": T0 + i, "t": i}).encode())
        for i in range(20_000)
    ]
    sender = threading.Thread(target=publish, args=(mosquitto.port, live))
    sender.start()
    done = ingestd("import", str(data), env=daemon.env)
    sender.join(120)
    assert "200,000 stored, 0 already stored, 0 quarantined" in done.stderr
    db = DbReader(tmp_path / "ingestd.db")
    wait_for(lambda: db.count("readings") == 220_000, 60, what="every reading")
    assert daemon.stop() == 0
    assert db.count("quarantine") == 0


def test_import_into_postgresql_round_trips(tmp_path: Path, pg_url: str) -> None:
    _populated(tmp_path / "a.db")
    export = ingestd(
        "query", "--db", str(tmp_path / "a.db"), "-s", "k", "--since", "0", "-f", "csv"
    )
    (tmp_path / "k.csv").write_text(export.stdout, newline="")
    first = ingestd("import", "--db", pg_url, str(tmp_path / "k.csv"))
    assert "507 stored, 0 already stored, 0 quarantined" in first.stderr
    again = ingestd("import", "--db", pg_url, str(tmp_path / "k.csv"))
    assert "0 stored, 507 already stored, 0 quarantined" in again.stderr
    back = ingestd("query", "--db", pg_url, "-s", "k", "--since", "0", "-f", "csv")
    # The same rows; query's ORDER BY (ts_ns, metric, seq) leaves series that
    # differ only in tags in the engine's order.
    assert sorted(back.stdout.splitlines()) == sorted(export.stdout.splitlines())
    assert len(back.stdout) == len(export.stdout)
