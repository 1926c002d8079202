"""What a new user meets first: credentials, refusals and a store that cannot
be opened, each ending in a message that says what to do."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.brokers import Mosquitto
from tests.support.daemon import DaemonFactory, DaemonProcess
from tests.support.metrics import http_get, metric_value
from tests.support.waiting import wait_for

SECRET = "s3cret-Pa55-word"
AS_USER = {"INGESTD_MQTT__USERNAME": "ingestd"}


@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    passwd = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwd), "ingestd", SECRET],
        check=True,
        capture_output=True,
    )
    passwd.chmod(0o644)
    broker = Mosquitto(tmp_path / "broker", extra=f"password_file {passwd}\n")
    broker.conf.write_text(
        broker.conf.read_text().replace("allow_anonymous true", "allow_anonymous false")
    )
    broker.start()
    yield broker
    broker.kill()


def _no_secret_anywhere(daemon: DaemonProcess) -> None:
    assert daemon.proc is not None
    for what in ("cmdline", "environ"):
        raw = Path(f"/proc/{daemon.proc.pid}/{what}").read_bytes()
        assert SECRET.encode() not in raw, what
    assert SECRET not in daemon.logs()


def test_password_from_a_file_connects_and_appears_nowhere(
    tmp_path: Path, auth_broker: Mosquitto, daemons: DaemonFactory
) -> None:
    secret_file = tmp_path / "mqtt-password"
    secret_file.write_text(SECRET + "\n")
    daemon = daemons(
        auth_broker.port, None, **AS_USER, INGESTD_MQTT__PASSWORD_FILE=str(secret_file)
    ).start()
    daemon.wait_ready()
    _no_secret_anywhere(daemon)
    assert daemon.stop() == 0
    daemon.kill()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ingestd",
            "check-config",
            "--config",
            str(tmp_path / "ingestd.toml"),
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "INGESTD_MQTT__PASSWORD_FILE": str(secret_file)},
    )
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stdout + out.stderr
    assert json.loads(out.stdout)["mqtt"]["password"] == "**********"


def test_password_from_systemd_credentials_directory(
    tmp_path: Path, auth_broker: Mosquitto, daemons: DaemonFactory
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt-password").write_text(SECRET)
    daemon = daemons(
        auth_broker.port,
        None,
        **AS_USER,
        CREDENTIALS_DIRECTORY=str(creds),
        INGESTD_MQTT__PASSWORD_FILE="mqtt-password",
    ).start()
    daemon.wait_ready()
    _no_secret_anywhere(daemon)
    assert daemon.stop() == 0


def test_a_wrong_password_says_not_authorized(
    tmp_path: Path, auth_broker: Mosquitto, daemons: DaemonFactory
) -> None:
    daemon = daemons(auth_broker.port, None, **AS_USER, INGESTD_MQTT__PASSWORD="wrong").start()
    wait_for(lambda: "broker refused the connection" in daemon.logs(), 15, what="the refusal")
    assert daemon.stop() == 0
    daemon.kill()
    line = next(
        json.loads(x) for x in daemon.logs().splitlines() if "broker refused the connection" in x
    )
    assert "not authorized" in line["msg"]
    assert "check mqtt.username / mqtt.password" in line["msg"]
    assert "broker unreachable" not in daemon.logs()


def test_a_store_that_cannot_be_created_says_why_and_what_to_do(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a directory should be")
    daemon = daemons(
        mosquitto.port,
        INGESTD_STORE__PATH=str(blocked / "sub" / "x.db"),
        INGESTD_STORE__RETRY_MAX_DELAY="0.2",
    ).start()
    base = daemon.metrics_url()
    wait_for(lambda: "cannot open the store" in daemon.logs(), 10, what="the reason")
    status, body = http_get(base + "/readyz")
    text = http_get(base + "/metrics")[1]
    assert daemon.stop() == 0
    daemon.kill()
    assert status == 503
    ready = json.loads(body)
    assert {k: ready[k] for k in ("ready", "broker", "store", "pipeline")} == {
        "ready": False,
        "broker": False,
        "store": False,
        "pipeline": False,
    }
    assert ready["detail"].startswith("store not open: ")
    assert metric_value(text, "ingestd_store_available") == 0
    assert metric_value(text, "ingestd_broker_connected") == 0
