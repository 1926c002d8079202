"""The operator's commands, run as a user would, against a populated database."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ingestd.events import NS, Reading, Rejected
from ingestd.store.sqlite import SqliteStore
from tests.support.brokers import Mosquitto
from tests.support.config import SHIPPED_CONFIG
from tests.support.daemon import DaemonFactory
from tests.support.mqtt import publish
from tests.support.ports import free_port
from tests.support.waiting import wait_for

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
T0_NS = 1_700_000_000 * NS


def ingestd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "ingestd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
async def db(tmp_path: Path) -> Path:
    path = tmp_path / "data.db"
    async with SqliteStore(path) as store, store.batch() as tx:
        await tx.add_readings(
            [
                Reading("kitchen", "temperature", T0_NS + i * 60 * NS, 20 + i / 100)
                for i in range(1440)
            ]
            + [Reading("kitchen", "humidity", T0_NS + i * 60 * NS, 40.0) for i in range(1440)]
            + [Reading("garage", "temperature", T0_NS + i * 600 * NS, 5.5) for i in range(144)]
            + [
                Reading("meter", "power", T0_NS + i * NS, float(i), "", f'{{"phase":"{p}"}}', "W")
                for i in range(10)
                for p in ("L1", "L2")
            ]
        )
        await tx.add_rejected(
            [
                Rejected(
                    "sensors/x/telemetry",
                    b"{oops\x00\x1b[31m",
                    "payload is not valid JSON",
                    T0 + 10,
                ),
                Rejected("sensors/y/t", b"999", "t=999 is above the limit max=100", T0 + 20),
            ]
        )
    return path


def cli(db: Path, *args: str) -> list[str]:
    return [*args, "--config", str(SHIPPED_CONFIG), "--db", str(db)]


def test_sensors_lists_every_series_with_its_last_value(db: Path) -> None:
    out = ingestd(*cli(db, "sensors", "--format", "json")).stdout
    rows = json.loads(out)
    assert [(r["sensor"], r["metric"], r["tags"]) for r in rows] == [
        ("garage", "temperature", ""),
        ("kitchen", "humidity", ""),
        ("kitchen", "temperature", ""),
        ("meter", "power", '{"phase":"L1"}'),
        ("meter", "power", '{"phase":"L2"}'),
    ]
    assert rows[3]["unit"] == "W"
    kitchen_t = rows[2]
    assert kitchen_t["last_value"] == pytest.approx(20 + 1439 / 100)
    assert kitchen_t["last_seen"] == "2023-11-15T22:12:20.000Z"
    table = ingestd(*cli(db, "sensors", "--sensor", "gar*")).stdout.splitlines()
    assert table[0].split() == [
        "sensor",
        "metric",
        "tags",
        "unit",
        "last_value",
        "last_seen",
        "stale",
        "seq_gaps",
        "seq_missing",
        "state",
    ]
    assert len(table) == 2
    assert table[1].startswith("garage")


def test_query_a_time_range_as_csv_and_json(db: Path) -> None:
    since, until = "2023-11-15T00:00:00Z", "2023-11-15T01:00:00Z"
    out = ingestd(
        *cli(
            db,
            "query",
            "--sensor",
            "kitchen",
            "--metric",
            "temperature",
            "--since",
            since,
            "--until",
            until,
            "--format",
            "csv",
        )
    ).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 60  # one a minute, the end excluded
    assert rows[0]["time"] == "2023-11-15T00:00:20.000Z"
    assert float(rows[0]["ts"]) == T0 + 107 * 60
    assert float(rows[0]["value"]) == pytest.approx(20 + 107 / 100)
    assert all(r["metric"] == "temperature" for r in rows)

    both = json.loads(
        ingestd(
            *cli(db, "query", "-s", "kitchen", "--since", since, "--until", until, "-f", "json")
        ).stdout
    )
    assert len(both) == 120
    assert {r["metric"] for r in both} == {"temperature", "humidity"}
    assert [r["ts"] for r in both] == sorted(r["ts"] for r in both)

    # Durations are relative to now: these readings are from 2023.
    assert (
        json.loads(
            ingestd(*cli(db, "query", "-s", "kitchen", "--since", "1h", "-f", "json")).stdout
        )
        == []
    )
    progress = ingestd(
        *cli(
            db,
            "query",
            "-s",
            "kitchen",
            "--since",
            str(T0),
            "--until",
            str(T0 + 86400),
            "-f",
            "csv",
            "--progress",
        )
    )
    assert len(progress.stdout.splitlines()) == 1 + 2 * 1440
    assert "2,880 rows exported" in progress.stderr


def test_quarantine_shows_reasons_with_device_bytes_escaped(db: Path) -> None:
    out = ingestd(*cli(db, "quarantine", "--since", str(T0), "-f", "json")).stdout
    rows = json.loads(out)
    assert [r["reason"] for r in rows] == [
        "t=999 is above the limit max=100",
        "payload is not valid JSON",
    ]
    # JSON is data: the payload exactly, its control characters as \\u escapes
    # in the ASCII output (no raw escape reaches a terminal); the table escapes.
    assert rows[1]["payload"] == "{oops\x00\x1b[31m"
    assert "\x1b" not in out
    table = ingestd(*cli(db, "quarantine", "--since", str(T0))).stdout
    assert "\x1b" not in table
    assert "{oops\\x00\\x1b[31m" in table


async def test_quarantine_json_and_csv_hold_the_whole_payload_that_parses(tmp_path: Path) -> None:
    # A JSON payload past the table's 120-byte preview, with non-ASCII text,
    # escaped quotes and backslashes: JSON and CSV output give it back whole,
    # so both the document and the payload in it parse.
    doc = {"sensor": "k", "note": "\u00e9t\u00e9 " * 40 + 'a "quote" and a \\ \u202e', "v": 1}
    payloads = [json.dumps(doc, ensure_ascii=False).encode(), b"\xff\xfe not utf-8"]
    path = tmp_path / "data.db"
    async with SqliteStore(path) as store, store.batch() as tx:
        await tx.add_rejected([Rejected("s/k", p, "bad", T0 + i) for i, p in enumerate(payloads)])
    out = ingestd(*cli(path, "quarantine", "--since", str(T0), "-f", "json")).stdout
    rows = json.loads(out)
    assert json.loads(rows[1]["payload"]) == doc
    assert rows[0]["payload"] == "\\xff\\xfe not utf-8"
    for line in out.splitlines()[1:-1]:  # one object a line, each one parses
        json.loads(line.rstrip(","))
    text = ingestd(*cli(path, "quarantine", "--since", str(T0), "-f", "csv")).stdout
    got = list(csv.DictReader(io.StringIO(text)))
    assert json.loads(got[1]["payload"]) == doc
    # The table still shows a one-line preview of the start.
    table = ingestd(*cli(path, "quarantine", "--since", str(T0))).stdout
    assert len(table.splitlines()) == 3
    assert "..." in table.splitlines()[2]


def test_db_takes_a_sqlite_path_or_a_postgresql_url_checked_as_store_url(db: Path) -> None:
    # A relative path is a file, as before; a URL is checked as store.url is.
    rel = ingestd("stats", "--json", "--config", str(SHIPPED_CONFIG), "--db", str(db))
    assert json.loads(rel.stdout)["readings"] > 0
    for url, says in (
        ("mysql://h/db", "expected postgresql://"),
        ("postgresql://u:secret@h/db", "the URL carries a password"),
    ):
        bad = ingestd("sensors", "--config", str(SHIPPED_CONFIG), "--db", url, check=False)
        assert bad.returncode == 64, bad.stderr
        assert bad.stderr.startswith("ingestd: --db: "), bad.stderr
        assert says in bad.stderr
        assert "secret" not in bad.stderr


async def test_a_format_character_in_a_sensor_id_cannot_reorder_the_table(
    tmp_path: Path,
) -> None:
    # U+202E (RIGHT-TO-LEFT OVERRIDE) shows the rest of a line reversed; U+2066
    # opens an isolate; U+200B is invisible. In a table, escaped; in JSON and
    # CSV, the exact id (JSON as a \u escape, CSV as the character itself).
    evil = "lab\u202eerutarepmet\u2066\u200b"
    path = tmp_path / "data.db"
    async with SqliteStore(path) as store, store.batch() as tx:
        await tx.add_readings(
            [Reading(evil, "temperature\x1b[2J", T0_NS, 21.5), Reading("plain", "t", T0_NS, 1.0)]
        )
    table = ingestd(*cli(path, "sensors")).stdout
    for ch in ("\u202e", "\u2066", "\u200b", "\x1b"):
        assert ch not in table
    rows = table.splitlines()
    assert rows[1].startswith("lab\\u202eerutarepmet\\u2066\\u200b  temperature\\x1b[2J  ")
    assert rows[2].startswith("plain")
    # The columns still line up: the escaped id is as wide as it is shown.
    assert rows[1].index("21.5") == rows[2].index("1 ") == rows[0].index("last_value")

    as_json = ingestd(*cli(path, "sensors", "-f", "json")).stdout
    assert as_json.isascii()
    assert json.loads(as_json)[0]["sensor"] == evil
    as_csv = ingestd(*cli(path, "sensors", "-f", "csv")).stdout
    assert next(csv.DictReader(io.StringIO(as_csv)))["sensor"] == evil
    query = ingestd(*cli(path, "query", "-s", evil, "--since", str(T0 - 1), "--until", str(T0 + 1)))
    assert "\u202e" not in query.stdout
    assert "lab\\u202eerutarepmet" in query.stdout


def test_bad_arguments_and_missing_database_are_clear_errors(db: Path, tmp_path: Path) -> None:
    bad = ingestd(*cli(db, "query", "-s", "kitchen", "--since", "yesterday"), check=False)
    assert bad.returncode == 1
    assert "cannot read time 'yesterday'" in bad.stderr
    missing = ingestd(*cli(tmp_path / "none.db", "sensors"), check=False)
    assert missing.returncode == 1
    assert "no database here" in missing.stderr


def test_stats_and_backup_from_the_database(db: Path, tmp_path: Path) -> None:
    # By default, the database's totals.
    out = ingestd(*cli(db, "stats", "--json")).stdout
    stats = json.loads(out)
    assert stats["source"] == "database"
    assert stats["readings"] == 1440 * 2 + 144 + 20
    assert stats["sensors"] == 3
    assert stats["quarantined"] == 2
    copy = tmp_path / "backup.db"
    result = ingestd(*cli(db, "backup", str(copy)))
    assert "backed up" in result.stderr
    assert "backup 100%" in result.stderr
    again = ingestd(*cli(copy, "stats", "--json")).stdout
    assert json.loads(again)["readings"] == stats["readings"]


def test_stats_from_the_running_daemon(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    # 100 readings another instance stored before this one started.
    live_db = tmp_path / "live.db"

    async def other_instance() -> None:
        async with SqliteStore(live_db) as store, store.batch() as tx:
            await tx.add_readings([Reading("b", "x", T0_NS + i * NS, 1.0) for i in range(100)])

    asyncio.run(other_instance())
    daemon = daemons(
        mosquitto.port, config=SHIPPED_CONFIG, INGESTD_STORE__PATH=str(live_db)
    ).start()
    daemon.wait_ready()
    publish(
        mosquitto.port,
        [("sensors/a/telemetry", b'{"temperature": 1, "humidity": 2}') for _ in range(10)],
    )
    url = daemon.metrics_url()

    def stats(*args: str) -> dict[str, object]:
        return dict(json.loads(ingestd(*cli(live_db, "stats", "--json", *args)).stdout))

    # --url implies --instance: this instance's live figures.
    wait_for(lambda: stats("--url", url).get("readings_committed") == 20, 20, what="live stats")
    live = stats("--instance", "--url", url)
    assert live["source"] == "daemon"
    assert live["messages_received"] == 10
    assert live["broker_connected"] == 1
    assert live["ready"] == 1
    # By default the whole database: this instance's 20 and the other's 100.
    whole = stats()
    assert (whole["source"], whole["readings"], whole["sensors"]) == ("database", 120, 2)
    assert daemon.stop() == 0
    # No daemon there: said, not replaced by the database's totals.
    gone = ingestd(*cli(live_db, "stats", "--instance", "--url", url), check=False)
    assert gone.returncode == 1
    assert f"no daemon answers at {url}/metrics" in gone.stderr
    assert gone.stdout == ""
    off = tmp_path / "off.toml"
    off.write_text("[metrics]\nenabled = false\n")
    disabled = ingestd(
        "stats", "--instance", "--config", str(off), "--db", str(live_db), check=False
    )
    assert disabled.returncode == 1
    assert "disables [metrics]: give the daemon's address with --url" in disabled.stderr


def test_query_by_tag(db: Path) -> None:
    out = ingestd(
        *cli(
            db,
            "query",
            "-s",
            "meter",
            "--since",
            str(T0),
            "--until",
            str(T0 + 60),
            "--tag",
            "phase=L2",
            "-f",
            "json",
        )
    ).stdout
    rows = json.loads(out)
    assert len(rows) == 10
    assert {(r["tags"], r["unit"]) for r in rows} == {('{"phase":"L2"}', "W")}
    # A tag key is a bound JSON path, never SQL text.
    none = ingestd(
        *cli(
            db,
            "query",
            "-s",
            "meter",
            "--since",
            str(T0),
            "--tag",
            "x') OR 1=1 --=L2",
            "-f",
            "json",
        )
    ).stdout
    assert json.loads(none) == []


def test_an_older_schema_is_named_not_misread(tmp_path: Path) -> None:
    from ingestd.store.sqlite import MIGRATIONS, SCHEMA_VERSION  # MIGRATIONS[0]: ingestd 0.1

    old = tmp_path / "v1.db"
    with sqlite3.connect(old) as c:
        c.executescript(MIGRATIONS[0] + "\nPRAGMA user_version = 1;")
    result = ingestd(*cli(old, "sensors"), check=False)
    assert result.returncode == 1
    assert (
        f"schema version 1, this ingestd reads {SCHEMA_VERSION}: start the daemon once"
        in result.stderr
    )


def test_data_commands_need_no_config_file(db: Path) -> None:
    # The daemon needs [[routes]]; looking at a database does not.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ingestd",
            "query",
            "--db",
            str(db),
            "-s",
            "garage",
            "--since",
            str(T0),
            "--until",
            str(T0 + 1200),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == [
        "sensor", "metric", "time", "ts", "value", "tags", "unit", "ts_ns", "seq"
    ]  # fmt: skip
    assert lines[1].split()[:5] == [
        "garage",
        "temperature",
        "2023-11-14T22:13:20.000Z",
        "1700000000",
        "5.5",
    ]
    assert len(lines) == 3


def test_stats_with_db_reads_that_file_even_while_a_daemon_answers(
    tmp_path: Path, mosquitto: Mosquitto, db: Path, daemons: DaemonFactory
) -> None:
    daemon = daemons(
        mosquitto.port, config=SHIPPED_CONFIG, INGESTD_STORE__PATH=str(tmp_path / "live.db")
    ).start()
    daemon.wait_ready()
    port = daemon.metrics_url().rsplit(":", 1)[1]
    config = tmp_path / "c.toml"
    config.write_text(f"[metrics]\nport = {port}\n")
    out = ingestd("stats", "--json", "--config", str(config), "--db", str(db)).stdout
    assert daemon.stop() == 0
    daemon.kill()
    stats = json.loads(out)
    assert (stats["source"], stats["path"], stats["readings"]) == (
        "database",
        str(db),
        1440 * 2 + 144 + 20,
    )


@pytest.mark.parametrize("name", ["a#b.db", "what?.db", "x%41y.db", "sp ace.db"])
def test_paths_with_uri_characters_work_for_every_command(
    db: Path, tmp_path: Path, name: str
) -> None:
    odd = tmp_path / "dir #?%" / name
    odd.parent.mkdir()
    odd.write_bytes(db.read_bytes())
    stats = json.loads(ingestd(*cli(odd, "stats", "--json")).stdout)
    assert stats["readings"] == 1440 * 2 + 144 + 20
    copy = tmp_path / "dir #?%" / f"copy {name}"
    ingestd(*cli(odd, "backup", str(copy)))
    again = json.loads(ingestd(*cli(copy, "stats", "--json")).stdout)
    assert again["readings"] == stats["readings"]
    # No stray file cut at the '#' or '?' (SQLite's own -wal/-shm aside).
    files = {p.name for p in odd.parent.iterdir() if not p.name.endswith(("-wal", "-shm"))}
    assert files == {name, f"copy {name}"}


def test_limit_zero_means_all_for_query_and_quarantine(db: Path) -> None:
    rows = json.loads(
        ingestd(*cli(db, "quarantine", "--since", str(T0), "--limit", "0", "-f", "json")).stdout
    )
    assert len(rows) == 2
    rows = json.loads(
        ingestd(
            *cli(
                db,
                "query",
                "-s",
                "garage",
                "--since",
                str(T0),
                "--until",
                str(T0 + 86400),
                "--limit",
                "0",
                "-f",
                "json",
            )
        ).stdout
    )
    assert len(rows) == 144


async def test_query_shows_times_a_microsecond_apart_as_different(tmp_path: Path) -> None:
    path = tmp_path / "fine.db"
    t = 1_700_000_000_123_456_000
    async with SqliteStore(path) as store, store.batch() as tx:
        await tx.add_readings([Reading("fine", "v", t, 1.0), Reading("fine", "v", t + 1000, 2.0)])
    lines = ingestd(
        "query", "--db", str(path), "-s", "fine", "--since", str(T0), "--until", str(T0 + 1)
    ).stdout.splitlines()
    assert [line.split()[2:4] for line in lines[1:]] == [
        ["2023-11-14T22:13:20.123456Z", "1700000000.123456"],
        ["2023-11-14T22:13:20.123457Z", "1700000000.123457"],
    ]
    rows = json.loads(
        ingestd(
            "query",
            "--db",
            str(path),
            "-s",
            "fine",
            "--since",
            str(T0),
            "--until",
            str(T0 + 1),
            "-f",
            "json",
        ).stdout
    )
    assert [(r["ts"], r["ts_ns"]) for r in rows] == [
        (1700000000.123456, t),
        (1700000000.123457, t + 1000),
    ]


def test_cli_details_a_new_user_trips_over(db: Path) -> None:
    stats = json.loads(ingestd(*cli(db, "stats", "--format", "json")).stdout)
    assert stats["source"] == "database"
    # A wrong option shows the command's own usage.
    bad = ingestd(*cli(db, "stats", "--nope"), check=False)
    assert bad.returncode == 2
    assert bad.stderr.startswith("usage: ingestd stats ")
    assert "unrecognized arguments: --nope" in bad.stderr
    # explain says --topic is required, in its usage too.
    explain = ingestd("explain", "--config", str(SHIPPED_CONFIG), check=False)
    assert explain.returncode == 2
    assert "the following arguments are required: --topic/-t" in explain.stderr
    assert "[--topic" not in explain.stderr
    # A future --since is named as such.
    future = ingestd(*cli(db, "query", "-s", "kitchen", "--since", "2999-01-01"), check=False)
    assert future.returncode == 1
    assert "--since '2999-01-01' is in the future" in future.stderr
    # Every option says what it is for.
    for command in (
        "query",
        "sensors",
        "quarantine",
        "stats",
        "simulate",
        "explain",
        "forget-session",
    ):
        lines = [*ingestd(command, "--help").stdout.splitlines(), ""]
        bare = []
        for line, after in itertools.pairwise(lines):
            if not line.startswith("  -"):
                continue
            inline = "  " in line.strip()  # help on the option's own line
            below = after.startswith(" " * 10) and not after.lstrip().startswith("-")
            if not (inline or below):
                bare.append(line.strip())
        assert bare == [], (command, bare)


def test_check_config_names_the_file_from_the_environment() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ingestd", "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "INGESTD_CONFIG": str(SHIPPED_CONFIG)},
    )
    assert proc.returncode == 0, proc.stderr
    assert f"configuration OK ({SHIPPED_CONFIG})" in proc.stderr


def _session(port: int, client_id: str, v5: bool) -> tuple[bool, list[bytes]]:
    """Connect as `client_id` asking to resume its session (subscribing to
    trial/# at QoS 1), take what the broker delivers within a second, leave
    the session (one hour) behind: whether a session was present, and what
    it held."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    got: list[bytes] = []
    present: list[bool] = []
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        clean_session=None if v5 else False,
    )

    def on_connect(
        c: paho.Client, _u: object, flags: paho.ConnectFlags, _rc: object, _p: object
    ) -> None:
        present.append(flags.session_present)
        c.subscribe("trial/#", qos=1)

    client.on_connect = on_connect
    client.on_message = lambda c, u, m: got.append(bytes(m.payload))
    props = None
    if v5:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
    if v5:
        client.connect("127.0.0.1", port, clean_start=False, properties=props)
    else:
        client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        wait_for(lambda: bool(present), 10, what="CONNACK")
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    return present[0], got


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_forget_session_removes_the_client_ids_persistent_session(
    tmp_path: Path, mosquitto: Mosquitto, protocol: str
) -> None:
    # Two trial sessions; messages queue for both while they are away.
    v5 = protocol == "5"
    for client_id in ("trial-kept", "trial-gone"):
        assert _session(mosquitto.port, client_id, v5) == (False, [])
    publish(mosquitto.port, [("trial/a", b"1"), ("trial/a", b"2")])

    config = tmp_path / "forget.toml"
    config.write_text(
        f'[mqtt]\nport = {mosquitto.port}\nclient_id = "trial-gone"\nprotocol = "{protocol}"\n'
    )
    done = ingestd("forget-session", "--config", str(config))
    assert "removed the broker's session of client id 'trial-gone'" in done.stdout
    assert f"127.0.0.1:{mosquitto.port}" in done.stdout
    publish(mosquitto.port, [("trial/a", b"3")])

    # Nothing was queued for the forgotten id, before or after; the other kept all.
    assert _session(mosquitto.port, "trial-gone", v5) == (False, [])
    assert _session(mosquitto.port, "trial-kept", v5) == (True, [b"1", b"2", b"3"])


def test_forget_session_says_when_the_broker_cannot_be_reached(tmp_path: Path) -> None:
    config = tmp_path / "forget.toml"
    config.write_text(f'[mqtt]\nport = {free_port()}\nclient_id = "trial"\n')
    failed = ingestd("forget-session", "--config", str(config), check=False)
    assert failed.returncode == 1
    assert "cannot remove the session of client id 'trial'" in failed.stderr
