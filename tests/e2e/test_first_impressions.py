"""What a new user sees in the first minute of the quick start: a summary line
within seconds of the first messages (not a whole interval after "ready"), and
a clean Ctrl-C that ends without a warning: with the broker still up, and with
the broker stopped by the same Ctrl-C once every acknowledgement was confirmed."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from tests.support.brokers import Mosquitto
from tests.support.daemon import DaemonFactory, DaemonProcess
from tests.support.db import DbReader
from tests.support.mqtt import publish
from tests.support.waiting import wait_for


def _lines(daemon: DaemonProcess) -> list[dict[str, object]]:
    return [json.loads(line) for line in daemon.logs().splitlines() if line.startswith("{")]


def _quick_start_burst(port: int, n: int = 20) -> None:
    publish(port, ((f"sensors/s{i % 4}/temperature", b"%.1f" % (20 + i / 10)) for i in range(n)))


def test_first_summary_comes_soon_after_the_first_commit(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    # The default interval (60 s): the first summary must not wait for it.
    daemon = daemons(mosquitto.port).start()
    daemon.wait_ready()
    db = DbReader(tmp_path / "ingestd.db")
    _quick_start_burst(mosquitto.port)
    wait_for(lambda: db.count() == 20, 20, what="the readings")
    committed = time.monotonic()
    wait_for(
        lambda: any(e["msg"] == "summary" for e in _lines(daemon)), 15, what="the first summary"
    )
    assert time.monotonic() - committed < 12
    summary = next(e for e in _lines(daemon) if e["msg"] == "summary")
    assert summary["messages"] == 20
    assert summary["readings"] == 20
    # Then the interval as before: no second summary within seconds.
    time.sleep(6)
    assert sum(e["msg"] == "summary" for e in _lines(daemon)) == 1
    assert daemon.stop() == 0


def _assert_quiet_stop(daemon: DaemonProcess, what: str) -> None:
    assert daemon.wait() == 0
    lines = _lines(daemon)
    loud = [e for e in lines if e["level"] in ("warning", "error", "critical")]
    assert loud == [], (what, loud)
    assert any(e["msg"] == "stopped" for e in lines), daemon.logs()


# The quick start's settings (scripts/quickstart.sh): its broker's in-flight window.
QUICK_START = {"INGESTD_MQTT__BROKER_MAX_INFLIGHT": "1000"}


def test_a_clean_stop_logs_no_warning(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        daemon = daemons(mosquitto.port, workdir=tmp_path / sig.name, **QUICK_START).start()
        daemon.wait_ready()
        db = DbReader(tmp_path / sig.name / "ingestd.db")
        _quick_start_burst(mosquitto.port)
        wait_for(lambda: db.count() == 20, 20, what="the readings")  # noqa: B023
        daemon.signal(sig)
        _assert_quiet_stop(daemon, sig.name)


def test_a_broker_gone_during_the_stop_warns_only_of_unconfirmed_acknowledgements(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    """The broker stops answering as the daemon stops (a Ctrl-C stopping both):
    once the daemon had it confirm every acknowledgement, that is no warning;
    with acknowledgements it never confirmed, it is one (they may be redelivered)."""
    assert mosquitto.proc is not None
    for quiet, warned in ((2.5, False), (0.0, True)):
        name = f"quiet-{quiet}"
        daemon = daemons(mosquitto.port, workdir=tmp_path / name, **QUICK_START).start()
        daemon.wait_ready()
        db = DbReader(tmp_path / name / "ingestd.db")
        _quick_start_burst(mosquitto.port)
        wait_for(lambda: db.count() == 20, 20, what="the readings")  # noqa: B023
        time.sleep(quiet)
        mosquitto.proc.send_signal(signal.SIGSTOP)  # the broker no longer answers
        try:
            daemon.signal(signal.SIGINT)
            assert daemon.wait() == 0
        finally:
            mosquitto.proc.send_signal(signal.SIGCONT)
        lines = _lines(daemon)
        loud = [e for e in lines if e["level"] in ("warning", "error", "critical")]
        if warned:
            assert [e["msg"] for e in loud] == [
                "the broker did not confirm the last acknowledgements; it may redeliver "
                "some messages"
            ], loud
            assert int(str(loud[0]["unconfirmed_ack_writes"])) > 0
        else:
            assert loud == [], loud
            assert any(
                "every acknowledgement was already confirmed" in str(e["msg"]) for e in lines
            )


def test_duplicates_are_explained_where_they_first_show(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    """A second quick start shows `duplicates=16`: the first summary line with
    duplicates, and the stopped line, say what they are."""
    daemon = daemons(mosquitto.port, INGESTD_DAEMON__LOG_SUMMARY_INTERVAL="1").start()
    daemon.wait_ready()
    db = DbReader(tmp_path / "ingestd.db")
    burst = [(f"sensors/d{i}/telemetry", b'{"ts": %d, "t": 21.5}' % (1.7e9 + i)) for i in range(16)]
    publish(mosquitto.port, burst)
    wait_for(lambda: db.count() == 16, 20, what="the readings")

    def summaries() -> list[dict[str, object]]:
        return [e for e in _lines(daemon) if e["msg"] == "summary"]

    for round_ in (1, 2):  # the same messages again: a device repeating itself
        publish(mosquitto.port, burst)
        wait_for(
            lambda: sum(e["duplicates"] for e in summaries()) == 16 * round_,  # type: ignore[misc]  # noqa: B023
            20,
            what=f"duplicates counted, round {round_}",
        )
    with_duplicates = [e for e in summaries() if e["duplicates"]]
    explained = [e for e in with_duplicates if "duplicates_are" in e]
    assert explained == with_duplicates[:1], with_duplicates  # once, the first time
    assert str(explained[0]["duplicates_are"]).startswith(
        "readings already stored with the same values, delivered again"
    )
    assert db.count() == 16
    assert daemon.stop() == 0
    stopped = next(e for e in _lines(daemon) if e["msg"] == "stopped")
    assert stopped["duplicates"] == 32
    assert stopped["duplicates_are"] == explained[0]["duplicates_are"]


def test_a_clean_start_has_no_duplicates_note(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    daemon = daemons(mosquitto.port).start()
    daemon.wait_ready()
    assert daemon.stop() == 0
    stopped = next(e for e in _lines(daemon) if e["msg"] == "stopped")
    assert stopped["duplicates"] == 0
    assert "duplicates_are" not in stopped
