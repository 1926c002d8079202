"""Replay's reading of quarantine records: every reason the processor and the
store give one refused reading is recognised, and the reading comes back whole."""

from __future__ import annotations

from ingestd.checks import apply_clock, apply_limits, apply_scaling
from ingestd.config import Limit, ProcessorSettings, Scaling
from ingestd.events import NS, Reading, Rejected
from ingestd.routes import RouteTable
from ingestd.store import base
from ingestd.store.base import QuarantineRecord
from ingestd.store.sqlite.store import Batch
from ingestd.tools.replay import Selection, reading_of

R = Reading("s1", "temperature", 5 * NS, 90.0, "sensors/s1/t", '{"site":"a"}', "C", 2)


def _record(rej: Rejected) -> QuarantineRecord:
    return QuarantineRecord(1, rej.received_at, rej.topic, rej.reason, rej.payload)


def test_each_reading_reason_gives_the_reading_back() -> None:
    rejected: list[Rejected] = []
    apply_limits([R], {"temperature": Limit(max=50)}, rejected, 10.0)
    apply_scaling([R], {"temperature": Scaling(scale=1e308, offset=0)}, 10.0, rejected)
    apply_clock([R], -100.0, 60, 0, rejected)
    apply_clock([R], 10.0, 60, 1, rejected)
    tx = Batch.__new__(Batch)
    base.Batch.__init__(tx, 10.0)
    rejected.append(tx.conflict(R, 1.5))
    assert len(rejected) == 5
    table, processor = RouteTable([]), ProcessorSettings()
    for rej in rejected:
        assert reading_of(_record(rej), table, processor) == R, rej.reason


def test_a_message_is_not_taken_for_a_reading() -> None:
    payload = b'{"sensor": "s", "metric": "m", "ts_ns": 1, "value": 2}'
    rec = QuarantineRecord(1, 0.0, "t", "payload is not valid JSON", payload)
    assert reading_of(rec, RouteTable([]), ProcessorSettings()) is None


def test_topic_filters_match_as_the_broker_does() -> None:
    sel = Selection(0, 1, topic="sensors/+/telemetry")
    assert sel.wants("sensors/a/telemetry")
    assert not sel.wants("sensors/a/b/telemetry")
    assert Selection(0, 1, topic="sensors/#").wants("sensors/a/b")
    assert not Selection(0, 1, topic="#").wants("$SYS/x")
    assert Selection(0, 1).wants("anything")
