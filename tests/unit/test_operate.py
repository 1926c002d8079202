from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from ingestd.app import LIVE_KEYS, _changed_keys
from ingestd.config import Settings
from ingestd.errors import DataCommandError
from ingestd.events import DUPLICATES_ARE
from ingestd.observe.systemd import watchdog_interval
from ingestd.tools.report import parse_time, print_stats

ROUTE = {"topic": "sensors/{sensor}/telemetry"}


def test_watchdog_interval_from_systemd_variables() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "x"}) is None
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(mine) == 2.0
    # Meant for another process (inherited): not ours to answer.
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None


def test_reload_tells_live_settings_from_restart_ones() -> None:
    old = Settings(routes=[ROUTE])
    new = Settings(
        routes=[ROUTE, {"topic": "plant/{sensor}/x"}],
        daemon={"log_level": "debug"},
        mqtt={"port": 1884},
        processor={"limits": {"t": {"max": 1}}},
        batch={"max_readings": 10},
    )
    changed = _changed_keys(old, new)
    assert changed == [
        "batch.max_readings",
        "daemon.log_level",
        "mqtt.port",
        "processor.limits",
        "routes",
    ]
    assert [k for k in changed if not k.startswith(LIVE_KEYS)] == ["mqtt.port"]
    assert _changed_keys(old, Settings(routes=[ROUTE])) == []


def test_parse_time_forms() -> None:
    now = 1_700_000_000.0
    assert parse_time("90s", now) == now - 90
    assert parse_time("1h", now) == now - 3600
    assert parse_time("2d", now) == now - 2 * 86400
    assert parse_time("1w", now) == now - 604800
    assert parse_time("1700000000.5", now) == 1700000000.5
    assert parse_time("2023-11-14T22:13:20Z", now) == 1700000000.0
    assert parse_time("2023-11-14T22:13:20", now) == 1700000000.0  # naive is UTC
    with pytest.raises(DataCommandError, match="cannot read time"):
        parse_time("yesterday", now)
    with pytest.raises(DataCommandError):
        parse_time("nan", now)


def test_device_text_is_escaped_for_logs() -> None:
    from ingestd.printable import printable

    assert printable("a\x1b[31mred\nnext\x7f é") == "a\\x1b[31mred\\x0anext\\x7f é"
    assert printable("plain/topic") == "plain/topic"


def test_library_log_records_and_tracebacks_are_json_lines_in_a_json_log() -> None:
    import io
    import json
    import logging

    import structlog

    from ingestd.observe.log import configure_logging

    out = io.StringIO()
    configure_logging("info", "json", out)
    try:
        raise ConnectionResetError("broker went away")
    except ConnectionResetError as exc:
        # What asyncio logs for a task whose exception nobody retrieved.
        logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=exc)
    logging.getLogger("paho").warning("odd packet %d", 7)
    structlog.get_logger("ingestd").info("ours", n=1)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]  # each one JSON
    assert [(x.get("logger", "-"), x["msg"]) for x in lines] == [
        ("asyncio", "Task exception was never retrieved"),
        ("paho", "odd packet 7"),
        ("-", "ours"),
    ]
    assert "broker went away" in json.dumps(lines[0]["exception"])


def test_store_advice_says_what_to_do(tmp_path: Path) -> None:
    from ingestd.errors import StoreUnavailable
    from ingestd.store.sqlite import SqliteStore

    denied = StoreUnavailable(
        "cannot open database", "/var/lib/ingestd: [Errno 13] Permission denied: '/var/lib/ingestd'"
    )
    advice = SqliteStore(Path("/var/lib/ingestd/ingestd.db")).advice(denied)
    assert advice.startswith("cannot create /var/lib/ingestd: permission denied for user ")
    assert "set store.path to a place" in advice
    assert "(e.g. var/ingestd.db)" in advice
    existing = tmp_path / "x.db"
    existing.write_bytes(b"")
    ro = StoreUnavailable("database read-only", "attempt to write a readonly database")
    assert SqliteStore(existing).advice(ro).startswith(f"cannot write {existing}: read-only")


def _password(settings: object) -> str | None:
    secret = getattr(settings, "password", None)
    return None if secret is None else str(secret.get_secret_value())


def test_password_file_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from ingestd.config import MqttSettings

    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    assert _password(MqttSettings(password_file=secret)) == "hunter2"
    empty = tmp_path / "empty"
    empty.write_text("")
    assert MqttSettings(password_file=empty).password is None
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert _password(MqttSettings(password_file=Path("pw"))) == "hunter2"
    with pytest.raises(ValidationError, match="password and password_file are both set"):
        MqttSettings(password="x", password_file=secret)
    with pytest.raises(ValidationError, match=r"password_file .*nope: no such file"):
        MqttSettings(password_file=Path("nope"))


def test_default_client_id_is_per_host_and_stable() -> None:
    import socket

    from ingestd.config import MqttSettings

    assert MqttSettings().client_id == f"ingestd-{socket.gethostname()}"
    assert MqttSettings().client_id == MqttSettings().client_id
    assert MqttSettings(client_id="site-{hostname}-2").client_id == (
        f"site-{socket.gethostname()}-2"
    )


def test_the_dashboard_uses_the_data_source_chosen_at_import() -> None:
    import json

    from tests.support.config import REPO

    board = json.loads((REPO / "config" / "grafana" / "ingestd-dashboard.json").read_text())
    (needed,) = board["__inputs"]
    variable = next(v for v in board["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == "${" + needed["name"] + "}"
    uids = {t["datasource"]["uid"] for p in board["panels"] for t in p["targets"]}
    assert uids == {"${datasource}"}
    titles = [p["title"] for p in board["panels"]]
    assert not [t for t in titles if "unacknowledged" in t]


def test_stats_says_what_duplicates_are_when_there_are_some() -> None:
    out = io.StringIO()
    print_stats({"readings_committed": 100, "readings_duplicate": 16}, out)
    assert f"readings_duplicate  16 ({DUPLICATES_ARE})\n" in out.getvalue()
    out = io.StringIO()
    print_stats({"readings_committed": 100, "readings_duplicate": 0}, out)
    assert out.getvalue().endswith("readings_duplicate  0\n")
    out = io.StringIO()  # JSON is data: the count alone
    print_stats({"readings_duplicate": 16}, out, as_json=True)
    assert json.loads(out.getvalue()) == {"readings_duplicate": 16}
