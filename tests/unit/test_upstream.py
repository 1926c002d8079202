"""How the broker's $SYS drop counter becomes drops seen: the samples as
Mosquitto sends them (retained at subscribe, or live after it), in order.
The daemon against a real broker: tests/e2e/test_upstream_loss.py."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from ingestd.config import load_settings
from ingestd.observe.upstream import WATCHED, UpstreamWatch
from tests.support.config import SHIPPED_CONFIG

RETAINED, LIVE = True, False


def _watch() -> UpstreamWatch:
    return UpstreamWatch(load_settings(SHIPPED_CONFIG))


def test_uptime_is_subscribed_before_the_count() -> None:
    # The broker sends retained values in filter order: a restart must be
    # known before the count it explains.
    assert WATCHED == ("$SYS/broker/uptime", "$SYS/broker/publish/messages/dropped")
    assert list(_watch().side_topics()) == list(WATCHED)


def test_a_retained_count_at_subscribe_is_the_baseline() -> None:
    w = _watch()
    w.broker_uptime(b"500 seconds", RETAINED)
    w.broker_dropped(b"120", RETAINED)  # before ingestd watched
    assert w.state.drops_seen == 0
    w.broker_dropped(b"150", LIVE)
    assert (w.state.drops_seen, w.state.broker_dropped) == (30, 150)


def test_no_retained_count_at_subscribe_counts_from_zero() -> None:
    # Idle for a minute, Mosquitto holds no retained count: the first value
    # that comes is a change after the subscription, all of it seen.
    w = _watch()
    w.broker_uptime(b"500 seconds", RETAINED)
    w.broker_dropped(b"2924", LIVE)
    w.broker_dropped(b"2930", LIVE)
    assert w.state.drops_seen == 2930


def test_a_reconnect_without_a_retained_count_goes_on_from_the_last() -> None:
    w = _watch()
    w.broker_dropped(b"0", RETAINED)
    w.broker_dropped(b"10", LIVE)
    # Reconnected to the same broker (uptime went on): its count, retained or not.
    w.broker_uptime(b"900 seconds", RETAINED)
    w.broker_dropped(b"25", LIVE)
    assert (w.state.drops_seen, w.state.broker_restarts) == (25, 0)


def test_a_restarted_broker_is_told_by_its_uptime_even_when_its_count_is_higher() -> None:
    w = _watch()
    w.broker_uptime(b"500 seconds", RETAINED)
    w.broker_dropped(b"10", RETAINED)
    w.broker_uptime(b"510 seconds", LIVE)
    w.broker_dropped(b"15", LIVE)  # 5 seen
    # The broker restarts; after the reconnect its new life has dropped 40.
    w.broker_uptime(b"30 seconds", RETAINED)
    w.broker_dropped(b"40", RETAINED)
    w.broker_uptime(b"40 seconds", LIVE)
    w.broker_dropped(b"42", LIVE)
    assert (w.state.drops_seen, w.state.broker_restarts) == (5 + 40 + 2, 1)


def test_a_count_that_went_back_is_a_restart_without_uptime() -> None:
    w = _watch()
    w.broker_dropped(b"100", RETAINED)
    w.broker_dropped(b"7", RETAINED)
    assert w.state.drops_seen == 7


def test_what_is_not_a_number_is_ignored() -> None:
    w = _watch()
    w.broker_uptime(b"soon", RETAINED)
    w.broker_dropped(b"many", LIVE)
    assert (w.state.broker_uptime, w.state.broker_dropped, w.state.drops_seen) == (None, None, 0)


def test_the_start_up_line_says_what_cannot_be_confirmed(monkeypatch: pytest.MonkeyPatch) -> None:
    with capture_logs() as logs:
        _watch().announce()  # the shipped config: Mosquitto's stock window
    assert [(e["log_level"], e["broker_max_inflight"]) for e in logs] == [("warning", 20)]
    assert "stock 20" in logs[0]["event"]
    monkeypatch.setenv("INGESTD_MQTT__BROKER_MAX_INFLIGHT", "1000")
    with capture_logs() as logs:
        _watch().announce()
    assert [(e["log_level"], e["window"]) for e in logs] == [("info", 1000)]
    assert "cannot be confirmed lossless" in logs[0]["event"]
    monkeypatch.setenv("INGESTD_MQTT__WATCH_BROKER_DROPS", "false")
    with capture_logs() as logs:
        _watch().announce()
    assert logs[0]["log_level"] == "warning"
    assert "NOT watched" in logs[0]["broker_drops"]
