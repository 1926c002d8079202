"""Limits and scaling scoped per sensor glob and route, and the report of keys
that matched no reading."""

from __future__ import annotations

from typing import Any

from structlog.testing import capture_logs

from ingestd.checks import process
from ingestd.config import Settings
from ingestd.events import NS, Reading, Rejected
from ingestd.metric_rules import KeyUsage, MetricRules
from ingestd.tools.explain import explain

NOW = 1_700_000_000.0
ROUTES: list[dict[str, Any]] = [
    {
        "topic": "freezers/{sensor}/{metric}",
        "format": "value",
        "limits": {"temperature": {"min": -40, "max": -10}},
        "scaling": {"temperature": {"scale": 0.1, "unit": "°C"}},
    },
    {"topic": "sensors/{sensor}/{metric}", "format": "value"},
]


def settings(**processor: Any) -> Settings:
    base: dict[str, Any] = {"limits": {"temperature": {"min": -60, "max": 100}}}
    return Settings(routes=ROUTES, processor={**base, **processor})


def rules_of(s: Settings) -> MetricRules:
    return MetricRules(s.processor, s.routes)


def reading(topic: str, value: float, metric: str = "temperature") -> Reading:
    return Reading(topic.split("/")[1], metric, int(NOW * NS), value, topic)


def run(s: Settings, *readings: Reading) -> tuple[list[Reading], list[Rejected]]:
    rejected: list[Rejected] = []
    kept = process(list(readings), s.processor, NOW, rejected, rules_of(s))
    return kept, rejected


def test_a_routes_limit_and_scaling_win_over_the_global_ones_for_its_readings() -> None:
    kept, rejected = run(
        settings(),
        reading("freezers/f1/temperature", -200),  # -20.0 scaled: in the route's limit
        reading("freezers/f1/temperature", 50),  # 5.0: the global accepts, the route does not
        reading("sensors/k1/temperature", 50),  # the global limit only, unscaled
        reading("sensors/k1/temperature", -70),  # below the global min
    )
    assert [(r.sensor, r.value, r.unit) for r in kept] == [("f1", -20.0, "°C"), ("k1", 50, "")]
    assert [x.reason for x in rejected] == [
        "temperature=5 is above the limit max=-10 "
        "(routes[freezers/{sensor}/{metric}].limits.temperature)",
        "temperature=-70 is below the limit min=-60",
    ]


def test_a_sensor_rule_wins_over_route_and_global_each_aspect_on_its_own() -> None:
    s = settings(
        rules=[
            {"sensor": "f[12]", "metric": "temperature", "max": -30},
            {"sensor": "f*", "metric": "temperature", "max": 0, "offset": 1},  # shadowed limit
        ]
    )
    rules = rules_of(s)
    a = rules.resolve("freezers/f1/temperature", "f1", "temperature")
    assert (a.hi, a.limit_key) == (-30, "processor.rules[0] (sensor 'f[12]', metric 'temperature')")
    # The limit from the first rule; the scaling from the second, the first setting none.
    assert a.scaling is not None
    assert (a.scaling.scale, a.scaling.offset) == (1.0, 1.0)
    b = rules.resolve("freezers/f3/temperature", "f3", "temperature")
    assert (b.hi, b.scaling_key) == (0, "processor.rules[1] (sensor 'f*', metric 'temperature')")
    c = rules.resolve("sensors/k1/temperature", "k1", "temperature")
    assert (c.lo, c.hi, c.scaling) == (-60, 100, None)
    # An open bound in the rule is open, whatever the global limit says.
    kept, _ = run(s, reading("freezers/f1/temperature", -5000))
    assert [r.value for r in kept] == [-4999.0]  # the rule's offset, not the route's scale


def test_resolution_is_cached_per_series_and_bounded() -> None:
    s = settings(rules=[{"sensor": "f*", "metric": "temperature", "max": 0}])
    rules = MetricRules(s.processor, s.routes, kept=2)
    rejected: list[Rejected] = []
    for i in range(5):
        process([reading(f"sensors/f{i}/temperature", 1.0)], s.processor, NOW, rejected, rules)
    assert len(rules.cache) == 2
    assert len(rejected) == 5
    # Nothing scoped: per metric.
    plain = MetricRules(settings().processor)
    assert not plain.scoped
    assert plain.active


def test_unmatched_keys_are_reported_once_after_the_window_with_close_names() -> None:
    s = settings(
        limits={"temprature": {"max": 1}, "humidity": {"max": 100}},
        scaling={"pressure": {"scale": 0.01}},
        rules=[{"sensor": "frezer-*", "metric": "humidity", "min": 0}],
        report_unmatched_after=60,
    )
    rules = rules_of(s)
    usage = rules.usage

    def chunk(at: float) -> None:
        readings = [
            reading("sensors/freezer-1/temperature", 1.0),
            reading("sensors/freezer-1/humidity", 50, "humidity"),
            reading("sensors/k1/pressure", 100_000, "pressure"),
        ]
        process(readings, s.processor, at, [], rules)
        usage.watch(at, len(readings))

    with capture_logs() as logs:
        usage.watch(NOW, 0)  # idle: nothing starts the window
        chunk(NOW + 1000)
        chunk(NOW + 1059)  # 59 s of traffic: not yet
        assert logs == []
        assert usage.watching
        chunk(NOW + 1061)
        assert not usage.watching  # once
    by_key = {line["key"]: line for line in logs}
    assert sorted(by_key) == [
        "processor.limits.temprature",
        "processor.rules[0] (sensor 'frezer-*', metric 'humidity')",
        # No freezers/ topic in this traffic.
        "routes[freezers/{sensor}/{metric}].limits.temperature",
        "routes[freezers/{sensor}/{metric}].scaling.temperature",
    ]
    assert by_key["processor.limits.temprature"]["did_you_mean"] == ["temperature"]
    assert by_key["processor.limits.temprature"]["log_level"] == "warning"
    assert by_key["processor.rules[0] (sensor 'frezer-*', metric 'humidity')"]["did_you_mean"] == [
        "freezer-1"
    ]
    assert usage.unmatched_reported == sorted(by_key)
    # A key that matches later leaves the metric's list.
    process([reading("sensors/x/temprature", 0.5, "temprature")], s.processor, NOW, [], rules)
    assert usage.unmatched_reported == sorted(by_key)[1:]


def test_a_route_key_for_a_metric_seen_only_on_other_routes_is_unmatched() -> None:
    s = settings(report_unmatched_after=1)
    rules = rules_of(s)
    for at in (NOW, NOW + 2):
        process([reading("sensors/k1/temperature", 1.0)], s.processor, at, [], rules)
        rules.usage.watch(at, 1)
    # The global key matched; the freezer route's two keys did not.
    assert rules.usage.unmatched_reported == [
        "routes[freezers/{sensor}/{metric}].limits.temperature",
        "routes[freezers/{sensor}/{metric}].scaling.temperature",
    ]


def test_no_keys_or_zero_window_report_nothing() -> None:
    assert not MetricRules(Settings().processor).usage.watching
    s = settings(report_unmatched_after=0)
    assert not rules_of(s).usage.watching


def test_explain_shows_what_applies_and_where_from() -> None:
    text = explain(settings(), "freezers/f1/temperature", b"-200", now=NOW)
    assert "  f1 temperature = -20 °C at receive time" in text
    assert (
        "    limit [-40, -10] from routes[freezers/{sensor}/{metric}].limits.temperature; "
        "scaling *0.1 +0 °C from routes[freezers/{sensor}/{metric}].scaling.temperature"
    ) in text
    text = explain(settings(), "sensors/k1/humidity", b"3", now=NOW)
    assert "    no limit, no scaling" in text
    text = explain(settings(), "freezers/f1/temperature", b"50", now=NOW)
    assert "quarantined (out_of_range): temperature=5 is above the limit max=-10 (routes[" in text


def test_a_reload_keeps_what_unchanged_keys_matched() -> None:
    keys = {
        "processor.limits.temperature": ("temperature", ""),
        "processor.limits.temprature": ("temprature", ""),
    }
    old = KeyUsage(keys, after=10)
    old.saw("s1", "temperature", ["processor.limits.temperature"])
    old.watch(0.0, 1)
    old.watch(11.0, 1)
    assert old.unmatched_reported == ["processor.limits.temprature"]
    new = KeyUsage(dict(keys), after=10)
    new.carry(old)  # a reload that changed something else
    assert new.unmatched == {"processor.limits.temprature"}
    assert new.unmatched_reported == ["processor.limits.temprature"]  # still shown
    assert not new.watching  # and not said again
    added = KeyUsage({**keys, "processor.limits.rh": ("rh", "")}, after=10)
    added.carry(old)
    assert added.watching
    assert added.first_at is None
