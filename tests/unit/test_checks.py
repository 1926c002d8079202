from __future__ import annotations

import json

import pytest

from ingestd.checks import apply_clock, apply_limits
from ingestd.config import Limit, Settings
from ingestd.events import NS, Reading, Rejected
from ingestd.tools.explain import explain

RECEIVED = 1_700_000_000.0


def r(metric: str, value: float) -> Reading:
    return Reading("s1", metric, NS, value, "sensors/s1/telemetry")


def test_readings_outside_limits_are_quarantined_with_reason() -> None:
    limits = {"temperature": Limit(min=-40, max=85), "humidity": Limit(max=100)}
    rejected: list[Rejected] = []
    kept = apply_limits(
        [
            r("temperature", 21),
            r("temperature", 90),
            r("temperature", -41),
            r("humidity", 101),
            r("humidity", -5),
            r("co2", 1e9),
        ],
        limits,
        rejected,
        RECEIVED,
    )
    assert [(k.metric, k.value) for k in kept] == [
        ("temperature", 21),
        ("humidity", -5),
        ("co2", 1e9),
    ]
    assert [x.reason for x in rejected] == [
        "temperature=90 is above the limit max=85",
        "temperature=-41 is below the limit min=-40",
        "humidity=101 is above the limit max=100",
    ]
    assert rejected[0].topic == "sensors/s1/telemetry"
    assert json.loads(rejected[0].payload) == {
        "sensor": "s1",
        "metric": "temperature",
        "ts": 1.0,
        "ts_ns": NS,
        "value": 90.0,
    }
    # Stamped when it was judged, like every quarantine record (not the device
    # time), so `quarantine --since 1d` finds it and retention ages it alike.
    assert {x.received_at for x in rejected} == {RECEIVED}


def test_bounds_are_inclusive_and_no_limits_pass_everything() -> None:
    rejected: list[Rejected] = []
    kept = apply_limits([r("t", 0), r("t", 10)], {"t": Limit(min=0, max=10)}, rejected, RECEIVED)
    assert len(kept) == 2
    assert rejected == []
    readings = [r("t", 1e300)]
    assert apply_limits(readings, {}, rejected, RECEIVED) is readings


def test_a_scaled_value_that_is_not_finite_is_quarantined() -> None:
    from ingestd.checks import apply_scaling
    from ingestd.config import Scaling

    rejected: list[Rejected] = []
    kept = apply_scaling(
        [r("p", 1e300), r("p", 2.0)], {"p": Scaling(scale=1e300)}, RECEIVED, rejected
    )
    assert [k.value for k in kept] == [2e300]
    assert [(x.kind, x.reason) for x in rejected] == [
        ("out_of_range", "p=1e+300 scaled by 1e+300 + 0 is not a finite number")
    ]


def test_a_reading_whose_processing_raises_is_quarantined_not_fatal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ingestd import checks as mod
    from ingestd.config import ProcessorSettings

    real = mod.apply_rules

    def broken(readings: list[Reading], *args: object) -> list[Reading]:
        if any(x.value == 13 for x in readings):
            raise ZeroDivisionError("a bug")
        return real(readings, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(mod, "apply_rules", broken)
    rejected: list[Rejected] = []
    now = [Reading("s1", "t", int(RECEIVED) * NS, v, "x") for v in (1, 13, 2)]
    kept = mod.process_guarded(now, ProcessorSettings(), RECEIVED, rejected)
    assert [k.value for k in kept] == [1, 2]
    assert [(x.kind, x.reason) for x in rejected] == [
        (
            "internal",
            "internal error: processing failed (a bug in ingestd): ZeroDivisionError('a bug')",
        )
    ]


@pytest.mark.parametrize(
    ("sent_ns", "hint"),
    [
        # milliseconds read as seconds (a JSON route's "auto" reads numbers as s)
        (1_700_000_000_000 * NS, "in a unit 1,000 times finer than the route reads"),
        (1_700_000_000_000_000 * NS, "in a unit 1,000,000 times finer than the route reads"),
        # seconds read as milliseconds: 1970, too old
        (1_700_000 * NS, "in a unit 1,000 times coarser than the route reads"),
    ],
)  # fmt: skip
def test_a_time_off_by_a_unit_says_so(sent_ns: int, hint: str) -> None:
    rejected: list[Rejected] = []
    reading = Reading("s1", "t", sent_ns, 1.0, "sensors/s1/telemetry")
    assert apply_clock([reading], RECEIVED, 300, 3650 * 86400, rejected) == []
    [why] = [r.reason for r in rejected]
    assert f"; it would be 2023-11-14T22:13:20Z {hint}: check the route's timestamp_unit" in why


def test_a_time_no_unit_explains_gets_no_hint() -> None:
    rejected: list[Rejected] = []
    for ns in (5 * NS, 10**18 * NS, (RECEIVED + 3600) * NS):
        apply_clock([Reading("s1", "t", int(ns), 1.0, "x")], RECEIVED, 300, 3650 * 86400, rejected)
    assert len(rejected) == 3
    assert not any("would be" in r.reason for r in rejected), rejected


def test_explain_shows_the_unit_hint() -> None:
    # Seconds sent to a route that reads milliseconds: 1970-01-20, too old.
    route = {"topic": "sensors/{sensor}/telemetry", "format": "json", "timestamp_unit": "ms"}
    s = Settings(routes=[route])
    text = explain(s, "sensors/k/telemetry", b'{"ts": 1700000000, "t": 21.5}', now=RECEIVED)
    assert "coarser than the route reads: check the route's timestamp_unit" in text, text
