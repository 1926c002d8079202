from __future__ import annotations

import pytest

from ingestd.config import RouteSettings
from ingestd.devices import DeviceState
from ingestd.errors import RouteSpecError
from ingestd.ratelimit import RateLimiter
from ingestd.routes import RouteTable, compile_route
from tests.support.decoding import Decoding


def table(*specs: tuple[str, str, str, str]) -> RouteTable:
    return RouteTable([compile_route(t, s, m, f, index=i) for i, (t, s, m, f) in enumerate(specs)])


def test_named_levels_become_wildcards_and_captures() -> None:
    r = compile_route("sensors/{site}/{device}/{metric}", "{site}.{device}", "{metric}", "value")
    assert r.subscription == "sensors/+/+/+"
    t = RouteTable([r])
    m = t.match("sensors/lab/d7/temperature")
    assert m is not None
    assert (m.sensor, m.metric_prefix) == ("lab.d7", "temperature")
    assert t.match("sensors/lab/d7") is None
    assert t.match("sensors/lab/d7/temperature/extra") is None
    assert t.match("other/lab/d7/temperature") is None


def test_json_metric_template_wraps_the_field() -> None:
    t = table(("plant/{line}/{sensor}", "{sensor}", "{line}_{field}", "json"))
    m = t.match("plant/l2/press")
    assert m is not None
    assert (m.metric_prefix, m.metric_suffix) == ("l2_", "")
    assert m.metric_prefix + "rpm" + m.metric_suffix == "l2_rpm"


def test_most_specific_route_wins_regardless_of_order() -> None:
    t = table(
        ("sensors/#", "any", "x", "value"),
        ("sensors/{sensor}/{metric}", "{sensor}", "{metric}", "value"),
        ("sensors/{sensor}/telemetry", "{sensor}", "{field}", "json"),
    )
    assert [r.pattern for r in t.routes] == [
        "sensors/{sensor}/telemetry",
        "sensors/{sensor}/{metric}",
        "sensors/#",
    ]
    telemetry = t.match("sensors/a/telemetry")
    assert telemetry is not None
    assert telemetry.fmt.name == "json"
    other = t.match("sensors/a/co2")
    assert other is not None
    assert other.route == 1
    deep = t.match("sensors/a/b/c")
    assert deep is not None
    assert deep.route == 0


def test_multi_level_wildcard_matches_its_parent_too() -> None:
    t = table(("a/b/#", "s", "m", "value"))
    assert t.match("a/b") is not None
    assert t.match("a/b/c/d") is not None
    assert t.match("a/c") is None


def test_wildcards_do_not_match_dollar_topics() -> None:
    t = table(("+/x", "s", "m", "value"), ("#", "s", "m", "value"))
    assert t.match("$SYS/x") is None
    assert t.match("$SYS/broker/uptime") is None
    assert t.match("a/x") is not None


def test_subscriptions_are_unique() -> None:
    # (RouteTable.subscriptions(), which only this test called, is gone: the
    # daemon subscribes with source.subscriptions, so that is what is checked.)
    from ingestd.config import Settings, route_table
    from ingestd.subscribing import subscriptions

    settings = Settings(
        routes=[
            {"topic": "a/{sensor}/{metric}", "format": "value"},
            {"topic": "a/+/+", "format": "value", "sensor": "x", "metric": "y"},
        ]
    )
    assert [f for f, _ in subscriptions(settings, route_table(settings))] == ["a/+/+"]


@pytest.mark.parametrize(
    ("pattern", "sensor", "metric", "fmt", "message"),
    [
        ("a/#/b", "s", "m", "value", "'#' must be the last level"),
        ("a/b+", "s", "m", "value", "mixes text"),
        ("a/{x}/{x}", "{x}", "m", "value", "used twice"),
        ("a/{x}", "{y}", "m", "value", "uses {y}"),
        ("a/{x}", "{x}", "{field}", "value", "uses {field}"),
        ("a/{x}", "{x}", "{field}{field}", "json", "only once"),
        ("a/{x}", "{x!r}", "m", "value", "no format specs"),
        ("a/{x}", "", "m", "value", "empty"),
        ("a/{x}", "{x", "m", "value", "sensor template"),
    ],
)
def test_bad_specs_are_rejected(
    pattern: str, sensor: str, metric: str, fmt: str, message: str
) -> None:
    with pytest.raises(RouteSpecError, match=message.replace("{", r"\{").replace("+", r"\+")):
        compile_route(pattern, sensor, metric, fmt)


def test_match_cache_is_bounded() -> None:
    t = table(("d/{sensor}/{metric}", "{sensor}", "{metric}", "value"))
    for i in range(70_000):
        t.match(f"d/s{i}/m")
    assert t.cached_topics <= 65536


@pytest.mark.parametrize(
    ("outer", "inner", "covers"),
    [
        ("a/+/+", "a/+/t", True),
        ("a/+/t", "a/+/+", False),
        ("a/#", "a/b/c", True),
        ("a/#", "a", True),
        ("#", "x/+/#", True),
        ("a/+", "a/#", False),
        ("a/+", "a/b/c", False),
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("+/+", "a", False),
        # MQTT 4.7.2: a leading wildcard never matches a topic starting with '$'.
        ("#", "$SYS/broker/load/#", False),
        ("+/#", "$SYS/#", False),
        ("$SYS/#", "$SYS/broker/x", True),
    ],
)
def test_filter_covers(outer: str, inner: str, covers: bool) -> None:
    from ingestd.mqtt.topics import filter_covers

    assert filter_covers(outer, inner) is covers


def test_overlapping_route_filters_are_subscribed_once() -> None:
    from ingestd.config import load_settings, route_table
    from ingestd.subscribing import subscriptions
    from tests.support.config import SHIPPED_CONFIG

    settings = load_settings(SHIPPED_CONFIG)
    assert subscriptions(settings, route_table(settings)) == [("sensors/+/+", 1), ("spBv1.0/#", 1)]


def test_a_dollar_route_is_subscribed_next_to_a_catch_all() -> None:
    from ingestd.config import Settings, route_table
    from ingestd.subscribing import subscriptions

    settings = Settings(
        routes=[
            {"topic": "#", "format": "value", "metric": "v", "sensor": "all"},
            {"topic": "$SYS/broker/{metric}", "format": "value", "sensor": "broker"},
        ]
    )
    assert sorted(t for t, _ in subscriptions(settings, route_table(settings))) == [
        "#",
        "$SYS/broker/+",
    ]


def test_a_refused_subscription_is_reported_with_the_routes_it_serves() -> None:
    # (Mosquitto 2.0.11 grants every SUBSCRIBE and filters per message, so a
    # real refusal cannot be provoked there; the names come from here.)
    from ingestd.bus import EventBus
    from ingestd.config import Settings, route_table
    from ingestd.source import MqttSource
    from ingestd.window import InFlightWindow

    settings = Settings(
        routes=[
            {"topic": "sensors/{sensor}/telemetry"},
            {"topic": "sensors/{sensor}/{metric}", "format": "value"},
            {"topic": "plant/{sensor}/x"},
        ],
        mqtt={"shared_group": "g"},
    )
    source = MqttSource(settings, route_table(settings), EventBus(), InFlightWindow(10))
    assert sorted(source.subscriber.routes_under("$share/g/sensors/+/+")) == [
        "sensors/{sensor}/telemetry",
        "sensors/{sensor}/{metric}",
    ]
    assert source.subscriber.routes_under("$share/g/plant/+/x") == ["plant/{sensor}/x"]


def test_in_a_shared_group_homie_descriptions_are_subscribed_outside_it() -> None:
    """Every member needs every description: the `$` topics a homie route
    covers are subscribed outside the group too, the values only in it."""
    from ingestd.config import Settings, route_table
    from ingestd.subscribing import subscriptions

    def plan(topic: str, group: str = "g") -> list[tuple[str, int]]:
        settings = Settings(
            routes=[{"topic": topic, "format": "homie"}, {"topic": "sensors/{sensor}/telemetry"}],
            mqtt={"shared_group": group},
        )
        return subscriptions(settings, route_table(settings))

    assert sorted(plan("homie/#")) == [
        ("$share/g/homie/#", 1),
        ("$share/g/sensors/+/telemetry", 1),
        ("homie/+/$state", 1),
        ("homie/+/+/+/$datatype", 1),
        ("homie/+/+/+/$unit", 1),
        ("homie/5/+/$description", 1),
        ("homie/5/+/$state", 1),
    ]
    # Under a prefix, and only what the route's own filter covers (Homie 5 here).
    assert [t for t, _ in plan("site/+/homie/5/#") if not t.startswith("$share")] == [
        "site/+/homie/5/+/$description",
        "site/+/homie/5/+/$state",
    ]
    # Without a group, one subscription per filter as before.
    assert sorted(t for t, _ in plan("homie/#", group="")) == ["homie/#", "sensors/+/telemetry"]


def test_match_cache_keeps_the_topics_in_use_through_a_flood() -> None:
    t = RouteTable(
        [compile_route("d/{sensor}/{metric}", "{sensor}", "{metric}", "value")], kept=100
    )
    for i in range(99):
        t.match(f"d/early{i}/m")
    hot = t.match("d/hot/m")  # the cache is full: from now on a use counts
    for i in range(10_000):
        t.match(f"d/s{i}/m")
        if i % 50 == 0:
            assert t.match("d/hot/m") is hot  # a hit: still the cached match
    assert t.cached_topics == 100
    assert t.match("d/hot/m") is hot


def _seq_table(kept: int) -> Decoding:
    spec = {"topic": "s/{sensor}", "format": "json", "sequence_field": "seq"}
    return Decoding(RouteTable([RouteSettings(**spec).compile(0)]), DeviceState(kept))


def _seq(t: Decoding, sensor: str, *numbers: int) -> None:
    msgs = [(f"s/{sensor}", b'{"seq": %d, "v": 1}' % n, 10**18 + n) for n in numbers]
    readings, rejected = t.decode(msgs)
    assert rejected == []
    assert len(readings) == len(numbers)


def test_sequence_status_carries_the_gaps_found_since_the_last_one() -> None:
    t = _seq_table(kept=2)
    _seq(t, "a", 1, 2, 5)  # a gap of 2 missing
    assert t.take_status().sequences == {"a": (5, 1, 2)}
    assert t.take_status().sequences == {}
    _seq(t, "a", 6, 9)  # another: 2 more missing
    assert t.take_status().sequences == {"a": (9, 1, 2)}  # this one only: the store adds up
    # Forgotten (two other sensors since), then seen again: no gap judged, and
    # no counts to overwrite the stored ones.
    _seq(t, "b", 1)
    _seq(t, "c", 1)
    assert "a" not in t.state.sequences
    _seq(t, "a", 20)
    assert t.take_status().sequences == {"b": (1, 0, 0), "c": (1, 0, 0), "a": (20, 0, 0)}


def test_a_state_evicted_before_its_status_is_taken_still_reports_its_gaps() -> None:
    t = _seq_table(kept=1)
    _seq(t, "a", 1, 4)
    _seq(t, "b", 1)  # evicts "a" from the cache, not from the pending status
    assert t.take_status().sequences == {"a": (4, 1, 2), "b": (1, 0, 0)}


def test_rate_limit_buckets_are_forgotten_one_at_a_time() -> None:
    rate = RateLimiter(kept=3)
    assert rate.allow(0, "hot", 1.0, 2.0, 2, 0.0) == 2  # spends its burst
    for i in range(100):
        rate.allow(0, f"s{i}", 1.0, 2.0, 1, 0.0)
        assert rate.allow(0, "hot", 1.0, 2.0, 1, 0.0) == 0  # still empty: never reset
    assert len(rate.buckets) == 3


def test_sensors_followed_for_expect_within_are_bounded_by_recency() -> None:
    """A flood of new ids on a route with expect_within costs at most the
    bound; the sensors heard most recently are the ones kept."""
    spec = {"topic": "d/{sensor}", "format": "value", "metric": "v", "expect_within": 60}
    t = Decoding(RouteTable([RouteSettings(**spec).compile(0)]), DeviceState(kept=100))
    t.decode([(f"d/s{i}", b"1", 10**18 + i) for i in range(10_000)])
    assert len(t.state.sensor_seen) == 100
    assert (0, "s9999") in t.state.sensor_seen
    assert (0, "s0") not in t.state.sensor_seen
