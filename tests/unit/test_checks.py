from __future__ import annotations

import json

import pytest

from ingestd.checks import apply_limits
from ingestd.config import Limit
from ingestd.events import NS, Reading, Rejected

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

    real = mod.apply_limits

    def broken(readings: list[Reading], *args: object) -> list[Reading]:
        if any(x.value == 13 for x in readings):
            raise ZeroDivisionError("a bug")
        return real(readings, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(mod, "apply_limits", broken)
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
