"""Persistent sessions (3.1.1 and 5), TLS, forced and timed-out stops, the unit file."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.brokers import BrokerFactory, Mosquitto
from tests.support.config import REPO, SHIPPED_CONFIG
from tests.support.daemon import DaemonFactory
from tests.support.db import DbReader, hold_exclusive_lock
from tests.support.mqtt import publish
from tests.support.waiting import wait_for


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_messages_published_while_it_is_down_are_ingested_on_restart(
    tmp_path: Path, mosquitto: Mosquitto, protocol: str, daemons: DaemonFactory
) -> None:
    env = {"INGESTD_MQTT__PROTOCOL": protocol, "INGESTD_MQTT__MAX_INFLIGHT": "50"}
    db = DbReader(tmp_path / "ingestd.db")
    first = daemons(mosquitto.port, config=SHIPPED_CONFIG, **env).start()
    first.wait_ready()  # the session now exists on the broker
    publish(mosquitto.port, [("sensors/p/telemetry", b'{"ts": 1.7e9, "x": 1}')])
    wait_for(lambda: db.count() == 1, 10, what="first reading")
    assert first.stop() == 0, first.logs()
    first.kill()
    msgs = [
        (f"sensors/d{i % 7}/telemetry", f'{{"ts": {1.7e9 + i}, "x": {i}}}'.encode())
        for i in range(1, 1001)
    ]
    publish(mosquitto.port, msgs)  # nobody is connected: the broker queues them
    second = daemons(mosquitto.port, config=SHIPPED_CONFIG, **env).start()
    second.wait_ready()
    wait_for(lambda: db.count() == 1001, 30, what="the queued messages")
    assert second.stop() == 0, second.logs()
    second.kill()
    assert db.count() == 1001
    assert f'"protocol": "{protocol}"' in second.logs()


def test_a_route_removed_across_a_restart_is_unsubscribed_from_the_session(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    """The broker keeps a persistent session's subscriptions: a route taken
    out of the config while ingestd was down must not go on delivering (each
    message then quarantined as 'no route'). The filters the session holds are
    kept with the data and the ones no route wants are unsubscribed."""
    both = '[[routes]]\ntopic = "a/{sensor}"\nmetric = "v"\nformat = "value"\n'
    both += '[[routes]]\ntopic = "b/{sensor}"\nmetric = "v"\nformat = "value"\n'
    only_a = both.split("[[routes]]")[1]
    db = DbReader(tmp_path / "ingestd.db")
    first = daemons(mosquitto.port, "[[routes]]" + both.split("[[routes]]", 1)[1]).start()
    first.wait_ready()
    publish(mosquitto.port, [("a/s1", b"1"), ("b/s1", b"2")])
    wait_for(lambda: db.count() == 2, 10, what="both routes stored")
    assert first.stop() == 0, first.logs()
    second = daemons(mosquitto.port, "[[routes]]" + only_a).start()
    second.wait_ready()
    wait_for(
        lambda: "no route uses any more" in second.logs(), 10, what="the old filter unsubscribed"
    )
    publish(mosquitto.port, [("a/s2", b"3"), ("b/s2", b"4")])
    wait_for(lambda: db.count() == 3, 10, what="route a stored")
    time.sleep(1)
    assert second.stop() == 0, second.logs()
    assert db.count() == 3
    assert db.count("quarantine") == 0, db.rows("SELECT topic, reason FROM quarantine")


def _make_certs(d: Path) -> tuple[Path, Path, Path]:
    d.mkdir()
    ca_key, ca, key, csr, crt = (
        d / n for n in ("ca.key", "ca.crt", "srv.key", "srv.csr", "srv.crt")
    )

    def run(*a: str) -> None:
        subprocess.run(a, check=True, capture_output=True)

    run(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=ingestd test CA",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
    )
    run(
        "openssl",
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run(
        "openssl",
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(crt),
    )
    return ca, crt, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_with_a_ca_file(
    tmp_path: Path, mosquitto: Mosquitto, brokers: BrokerFactory, daemons: DaemonFactory
) -> None:
    ca, crt, key = _make_certs(tmp_path / "pki")
    from tests.support.ports import free_port

    tls_port = free_port()
    broker = brokers(
        tmp_path / "tls-broker",
        extra=f"listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {crt}\nkeyfile {key}\n",
    ).start()
    db = DbReader(tmp_path / "ingestd.db")
    daemon = daemons(
        tls_port,
        config=SHIPPED_CONFIG,
        INGESTD_MQTT__TLS__ENABLED="true",
        INGESTD_MQTT__TLS__CA_FILE=str(ca),
    ).start()
    daemon.wait_ready()
    # Publish on the plain listener of the same broker; ingestd reads over TLS.
    publish(broker.port, [("sensors/tls/temperature", b"7.5")] * 3)
    wait_for(lambda: db.count() >= 1, 15, what="a reading over TLS")
    assert daemon.stop() == 0, daemon.logs()
    daemon.kill()
    broker.kill()
    assert db.rows("SELECT sensor, value FROM readings LIMIT 1") == [("tls", 7.5)]

    # With a CA the broker's certificate does not chain to (another one), and
    # without a CA (the system's): a configuration problem naming
    # mqtt.tls.ca_file, not "broker unreachable"; retried, never accepted.
    other_ca, _, _ = _make_certs(tmp_path / "other-pki")
    broker.start()
    for name, ca_env in (("other", {"INGESTD_MQTT__TLS__CA_FILE": str(other_ca)}), ("none", {})):
        untrusting = daemons(
            tls_port,
            workdir=tmp_path / name,
            config=SHIPPED_CONFIG,
            INGESTD_MQTT__TLS__ENABLED="true",
            **ca_env,
        ).start()
        wait_for(
            lambda: "failed verification" in untrusting.logs(),  # noqa: B023
            15,
            what="the TLS verification failure",
        )
        lines = [json.loads(x) for x in untrusting.logs().splitlines() if x.startswith("{")]
        failed = [e for e in lines if "failed verification" in str(e["msg"])]
        assert failed[0]["level"] == "error", failed
        assert str(failed[0]["msg"]).startswith("configuration problem:"), failed
        assert "mqtt.tls.ca_file" in str(failed[0]["msg"]), failed
        assert "CERTIFICATE_VERIFY_FAILED" in str(failed[0]["error"]), failed
        assert failed[0]["ca_file"] == ca_env.get("INGESTD_MQTT__TLS__CA_FILE"), failed
        assert not any(e["msg"] == "broker unreachable; retrying with backoff" for e in lines)
        assert untrusting.stop() == 0


def test_stop_timeout_and_second_signal(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    db_path = tmp_path / "ingestd.db"
    daemon = daemons(
        mosquitto.port,
        config=SHIPPED_CONFIG,
        INGESTD_DAEMON__STOP_TIMEOUT="1.5",
        INGESTD_STORE__BUSY_TIMEOUT_MS="50",
    ).start()
    daemon.wait_ready()
    hold_exclusive_lock(db_path, 6)
    publish(mosquitto.port, [("sensors/a/temperature", b"1")])
    time.sleep(0.5)
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    status = daemon.wait(10)
    elapsed = time.monotonic() - started
    daemon.kill()
    assert status == 1, "the drain could not finish within stop_timeout"
    assert 1.4 <= elapsed < 4
    assert "stop timeout exceeded" in daemon.logs()

    time.sleep(6)  # the lock is gone; the unacknowledged message is still on the broker
    again = daemons(
        mosquitto.port, config=SHIPPED_CONFIG, INGESTD_STORE__BUSY_TIMEOUT_MS="50"
    ).start()
    again.wait_ready()
    wait_for(lambda: DbReader(db_path).count() == 1, 10, what="the redelivered reading")
    hold_exclusive_lock(db_path, 6)
    publish(mosquitto.port, [("sensors/a/temperature", b"2")])
    time.sleep(0.5)
    again.signal(signal.SIGTERM)
    time.sleep(0.3)
    again.signal(signal.SIGTERM)
    assert again.wait(5) == 128 + signal.SIGTERM
    again.kill()
    assert "second signal: forcing exit" in again.logs()


HARDENING = (
    "Type=notify",
    "Restart=always",  # README says so: a member that exits leaves its share queued
    "RestartPreventExitStatus=78",
    "DynamicUser=yes",
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    # Both secrets as credentials: DynamicUser= has no ~/.pgpass.
    "LoadCredential=mqtt-password:/etc/ingestd/mqtt-password",
    "LoadCredential=store-password:/etc/ingestd/store-password",
    "Environment=INGESTD_MQTT__PASSWORD_FILE=mqtt-password",
)
UNITS = {
    # file: (name to verify it as, keys of its own)
    "ingestd.service": ("ingestd.service", ("StateDirectory=ingestd",)),
    # A template: verified as an instance (systemd expands %i and %H there).
    "ingestd@.service": (
        "ingestd@a.service",
        (
            "StateDirectory=ingestd/%i",
            "Environment=INGESTD_STORE__PATH=/var/lib/ingestd/%i/ingestd.db",
            "Environment=INGESTD_MQTT__CLIENT_ID=ingestd-%H-%i",
        ),
    ),
}


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian: apt-get install systemd)",
)
@pytest.mark.parametrize("unit_file", list(UNITS))
def test_systemd_unit_verifies_and_stays_hardened(tmp_path: Path, unit_file: str) -> None:
    unit = (REPO / "systemd" / unit_file).read_text()
    name, own = UNITS[unit_file]
    for key in (*HARDENING, *own):
        assert f"\n{key}\n" in unit, key
    # Point ExecStart at this checkout's interpreter so verify can check it.
    exe = shutil.which("ingestd") or str(REPO / ".venv" / "bin" / "ingestd")
    (tmp_path / unit_file).write_text(unit.replace("/opt/ingestd/bin/ingestd", exe))
    if name != unit_file:
        (tmp_path / name).symlink_to(unit_file)
    local = str(tmp_path / name)
    proc = subprocess.run(
        ["systemd-analyze", "verify", local], capture_output=True, text=True, timeout=60
    )
    output = (proc.stdout + proc.stderr).splitlines()
    problems = [line for line in output if unit_file in line or name in line]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert problems == [], problems
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", local],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    overall = next(line for line in proc.stdout.splitlines() if "Overall exposure level" in line)
    exposure = float(overall.split(":")[1].split()[0])
    assert exposure <= 2.0, overall  # 1.7 as shipped ("OK")


@pytest.mark.parametrize(("qos", "ack"), [(1, "after_commit"), (1, "on_receive"), (0, "")])
def test_a_large_backlog_is_taken_within_the_window(
    tmp_path: Path, qos: int, ack: str, brokers: BrokerFactory, daemons: DaemonFactory
) -> None:
    """The backlog arrives before SUBACK; the window must bound it from the first message."""
    broker = brokers(
        tmp_path / "broker", max_inflight=0, extra="queue_qos0_messages true\nmax_queued_bytes 0\n"
    ).start()
    db = DbReader(tmp_path / "ingestd.db")
    env = {"INGESTD_MQTT__MAX_INFLIGHT": "200", "INGESTD_MQTT__BROKER_MAX_INFLIGHT": "0"}
    if ack:
        env["INGESTD_MQTT__ACK"] = ack
    config = tmp_path / "qos.toml"
    config.write_text(
        (REPO / "config" / "ingestd.toml").read_text().replace("qos = 1", f"qos = {qos}")
    )
    daemon = daemons(broker.port, config=config, **env).start()
    daemon.wait_ready()
    assert daemon.stop() == 0
    n = 20_000
    publish(
        broker.port,
        [
            (f"sensors/b{i % 10}/telemetry", b'{"ts": %d, "v": 1}' % (1_700_000_000 + i))
            for i in range(n)
        ],
        qos=qos,
    )
    daemon = daemons(broker.port, config=config, **env).start()
    daemon.wait_ready(60)
    wait_for(lambda: db.count() >= n, 60, interval=0.1, what="the backlog")
    assert daemon.stop() == 0, daemon.logs()
    daemon.kill()
    broker.kill()
    import json

    stopped = [
        json.loads(line) for line in daemon.logs().splitlines() if '"msg": "stopped"' in line
    ][-1]
    assert stopped["received"] == n
    assert stopped["in_flight_peak"] <= 200, stopped
