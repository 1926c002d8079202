"""The log at steady state: a person can read it, and it cannot fill a disk.

100,000 messages, one in twenty malformed (three kinds, each message's text
different), a store outage and a broker restart: at info level the log holds
the summary lines, the first occurrence of each quarantine reason, and every
state change, and nothing that grows with the message rate.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.support.brokers import Mosquitto
from tests.support.daemon import DaemonFactory
from tests.support.db import DbReader, hold_exclusive_lock
from tests.support.metrics import http_get, metric_value
from tests.support.mqtt import publish
from tests.support.waiting import wait_for

SUMMARY_EVERY = 2.0
# Lines at info and above that are not summaries, whatever the message rate:
# start-up and shutdown (about 10), the state changes provoked below (about 6),
# and the first occurrence of each quarantine reason (3 here).
OTHER_LINES_MAX = 40


def messages(t0: float, start: int, n: int) -> Iterator[tuple[str, bytes]]:
    """Messages start..start+n of one stream: each good reading's sensor and
    time are its own, so two calls with one t0 never send a conflicting value
    for a time already sent (a t0 per call did, in one run in ten)."""
    for i in range(start, start + n):
        if i % 20 == 7:
            yield ("sensors/bad/telemetry", b"{not json %d" % i)
        elif i % 20 == 13:
            yield ("sensors/bad/telemetry", b'{"status": "fault %d"}' % i)
        elif i % 20 == 17:
            yield ("sensors/bad/temperature", b"warm-%d" % i)
        else:
            yield (f"sensors/s{i % 10}/telemetry", b'{"ts": %.4f, "t": %d}' % (t0 + i / 1e4, i))


def test_info_log_stays_bounded_while_every_state_change_shows(
    tmp_path: Path,
    mosquitto: Mosquitto,
    daemons: DaemonFactory,
    record_property: Callable[[str, object], None],
) -> None:
    n = 100_000
    bad = 3 * n // 20
    daemon = daemons(
        mosquitto.port,
        INGESTD_DAEMON__LOG_SUMMARY_INTERVAL=str(SUMMARY_EVERY),
        INGESTD_MQTT__BROKER_MAX_INFLIGHT="1000",
        INGESTD_STORE__BUSY_TIMEOUT_MS="100",
        INGESTD_STORE__RETRY_MAX_DELAY="0.5",
    ).start()
    daemon.wait_ready()
    db = DbReader(tmp_path / "ingestd.db")
    started = time.monotonic()
    t0 = time.time() - 3600
    publish(mosquitto.port, messages(t0, 0, n // 2), inflight=1000)
    # A store outage mid-stream: unavailable, then available again.
    lock = hold_exclusive_lock(tmp_path / "ingestd.db", 3.0)
    publish(mosquitto.port, messages(t0, n // 2, n // 2), inflight=1000)
    lock.join()
    wait_for(
        lambda: db.count() + db.count("quarantine") == n, 120, what="every message stored or held"
    )
    reasons = Counter(r.split(":")[0] for (r,) in db.rows("SELECT reason FROM quarantine"))
    assert (db.count(), db.count("quarantine")) == (n - bad, bad), reasons
    # Every acknowledgement sent and taken before the broker goes away: a
    # message it had not seen acknowledged would come again (at least once)
    # and be counted again.
    base = daemon.metrics_url()
    wait_for(
        lambda: metric_value(http_get(base + "/metrics")[1], "ingestd_inflight_messages") == 0,
        30,
        what="nothing in flight",
    )
    time.sleep(1)
    # The broker goes away and comes back.
    mosquitto.restart()
    wait_for(lambda: daemon.logs().count('"msg": "connected to broker"') >= 2, 30, what="back")
    time.sleep(SUMMARY_EVERY + 0.5)  # a summary after the stream
    assert daemon.stop() == 0
    elapsed = time.monotonic() - started
    assert db.count("quarantine") == bad

    lines = [json.loads(line) for line in daemon.logs().splitlines() if line.startswith("{")]
    loud = [e for e in lines if e["level"] in ("info", "warning", "error")]
    by_msg = Counter(e["msg"] for e in loud)
    summaries = [e for e in loud if e["msg"] == "summary"]
    others = len(loud) - len(summaries)
    # Every state change is there, at once, one line each.
    for change in (
        "ready",
        "store unavailable; holding the batch and retrying",
        "store available again; batch committed",
        "broker connection lost",
        "connected to broker",
        "stopping",
        "stopped",
    ):
        assert by_msg[change] >= 1, (change, by_msg)
    assert by_msg["store unavailable; holding the batch and retrying"] == 1
    # Each quarantine reason once (three shapes), the repeats counted in summaries.
    assert by_msg["quarantined"] == 3, by_msg
    assert sum(e["quarantined"] for e in summaries) == bad
    assert sum(e["readings"] for e in summaries) == n - bad
    assert sum(e["messages"] for e in summaries) == n
    kinds: Counter[str] = Counter()
    for e in summaries:
        kinds.update(e.get("quarantined_by", {}))
    assert sum(kinds.values()) == bad
    # The bound: summaries at their interval, and a fixed number of other lines.
    assert len(summaries) <= elapsed / SUMMARY_EVERY + 2
    assert others <= OTHER_LINES_MAX, by_msg
    assert "batch committed" not in by_msg
    busiest = max(summaries, key=lambda e: e["messages"])
    assert {"commit_ms_p50", "commit_ms_p99", "in_flight_peak", "backlog"} <= set(busiest)
    record_property(
        "log_lines",
        f"{n:,} messages in {elapsed:.1f} s: {len(loud)} lines at info and above "
        f"({len(summaries)} summaries, {others} others)",
    )
