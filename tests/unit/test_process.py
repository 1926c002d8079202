from __future__ import annotations

import json

from ingestd.config import Limit
from ingestd.events import Reading, Rejected
from ingestd.process import apply_limits


def r(metric: str, value: float) -> Reading:
    return Reading("s1", metric, 1.0, value, "sensors/s1/telemetry")


def test_readings_outside_limits_are_quarantined_with_reason() -> None:
    limits = {"temperature": Limit(min=-40, max=85), "humidity": Limit(max=100)}
    rejected: list[Rejected] = []
    kept = apply_limits(
        [r("temperature", 21), r("temperature", 90), r("temperature", -41),
         r("humidity", 101), r("humidity", -5), r("co2", 1e9)],
        limits, rejected,
    )
    assert [(k.metric, k.value) for k in kept] == [("temperature", 21), ("humidity", -5),
                                                   ("co2", 1e9)]
    assert [x.reason for x in rejected] == [
        "temperature=90 is above the limit max=85",
        "temperature=-41 is below the limit min=-40",
        "humidity=101 is above the limit max=100",
    ]
    assert rejected[0].topic == "sensors/s1/telemetry"
    assert json.loads(rejected[0].payload) == {"sensor": "s1", "metric": "temperature",
                                               "ts": 1.0, "value": 90.0}


def test_bounds_are_inclusive_and_no_limits_pass_everything() -> None:
    rejected: list[Rejected] = []
    kept = apply_limits([r("t", 0), r("t", 10)], {"t": Limit(min=0, max=10)}, rejected)
    assert len(kept) == 2
    assert rejected == []
    readings = [r("t", 1e300)]
    assert apply_limits(readings, {}, rejected) is readings
