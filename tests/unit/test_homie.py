"""The homie format (Homie 5): descriptions, values by datatype, states, and
values that cannot be read (before their description, unknown, malformed)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.config import RouteSettings
from ingestd.events import NS, Reading
from ingestd.formats.homie import device_state
from ingestd.routes import RouteTable
from tests.support.decoding import Decoding

NOW_NS = 1_800_000_000 * NS

DESCRIPTION = {
    "homie": "5.0",
    "version": 7,
    "name": "Boiler room",
    "nodes": {
        "env": {
            "properties": {
                "temperature": {"datatype": "float", "unit": "°C"},
                "humidity": {"datatype": "integer", "unit": "%"},
                "alarm": {"datatype": "boolean"},
                "label": {"datatype": "string"},
            }
        }
    },
}


def table(**route: object) -> Decoding:
    spec: dict[str, object] = {"topic": "homie/5/#", "format": "homie", **route}
    return Decoding(RouteTable([RouteSettings(**spec).compile(0)]))


def run(
    t: Decoding, *messages: tuple[str, bytes], retained: bool = False
) -> tuple[list[Reading], list[str]]:
    deliveries = [(topic, payload, NOW_NS + i) for i, (topic, payload) in enumerate(messages)]
    if retained:
        readings, rejected = t.decode([], deliveries)
    else:
        readings, rejected = t.decode(deliveries)
    return readings, [r.reason for r in rejected]


def describe(t: Decoding, device: str = "boiler", doc: object = DESCRIPTION) -> None:
    _, problems = run(t, (f"homie/5/{device}/$description", json.dumps(doc).encode()))
    assert problems == []


def test_values_are_read_by_their_declared_datatype_with_their_unit() -> None:
    t = table()
    describe(t)
    readings, problems = run(
        t,
        ("homie/5/boiler/env/temperature", b"21.5"),
        ("homie/5/boiler/env/humidity", b"40"),
        ("homie/5/boiler/env/alarm", b"true"),
        ("homie/5/boiler/env/label", b"basement"),
    )
    assert problems == []
    assert [(r.sensor, r.metric, r.value, r.unit) for r in readings] == [
        ("boiler", "env.temperature", 21.5, "°C"),
        ("boiler", "env.humidity", 40.0, "%"),
        ("boiler", "env.alarm", 1.0, ""),
    ]
    assert t.state.counts.non_numeric == 1  # the string: counted, not stored
    assert readings[0].ts_ns == NOW_NS  # values carry no time: the receive time


def test_a_value_before_its_description_is_quarantined_not_guessed() -> None:
    t = table()
    readings, problems = run(t, ("homie/5/boiler/env/temperature", b"21.5"))
    assert readings == []
    assert problems == [
        "device 'boiler' has not sent its $description: a value is not stored without its "
        "datatype (the route must cover homie/5/+/$description too)"
    ]
    describe(t)
    readings, problems = run(t, ("homie/5/boiler/env/pressure", b"1013"))
    assert problems == [
        "property env/pressure is not in device 'boiler''s $description (version 7)"
    ]


def test_a_new_description_applies_to_later_values() -> None:
    t = table()
    describe(t)
    changed = json.loads(json.dumps(DESCRIPTION))
    changed["version"] = 8
    changed["nodes"]["env"]["properties"]["temperature"] = {"datatype": "float", "unit": "K"}
    describe(t, doc=changed)
    readings, _ = run(t, ("homie/5/boiler/env/temperature", b"294.65"))
    assert [(r.value, r.unit) for r in readings] == [(294.65, "K")]
    # An empty retained $description deletes the device: its values wait again.
    run(t, ("homie/5/boiler/$description", b""))
    _, problems = run(t, ("homie/5/boiler/env/temperature", b"1"))
    assert "has not sent its $description" in problems[0]


def test_state_is_followed_and_bad_values_name_the_problem() -> None:
    t = table()
    describe(t)
    for state in ("init", "ready", "sleeping", "lost"):
        assert run(t, ("homie/5/boiler/$state", state.encode())) == ([], [])
        device = device_state(t.state, "boiler")
        assert device is not None
        assert device.state == state
        assert t.take_status().states == {"boiler": state}  # to the store with the chunk
    assert run(t, ("homie/5/boiler/$state", b"lost")) == ([], [])
    assert not t.take_status()  # no change, nothing to store
    _, problems = run(
        t,
        ("homie/5/boiler/$state", b"asleep"),
        ("homie/5/boiler/env/temperature", b"warm"),
        ("homie/5/boiler/env/humidity", b"40.5"),
        ("homie/5/boiler/env/alarm", b"1"),
        ("homie/5/boiler/env/temperature", b"nan"),
    )
    assert problems == [
        "$state 'asleep' is not one of disconnected, init, lost, ready, sleeping (Homie 5)",
        "float property: 'warm' is not a float",
        "integer property: '40.5' is not a integer",
        "boolean property: '1' is not true or false",
        "float property: 'nan' is not a finite number",
    ]
    # Commands and the device's other attributes are not readings.
    assert run(
        t,
        ("homie/5/boiler/env/temperature/set", b"30"),
        ("homie/5/boiler/env/temperature/$target", b"30"),
        ("homie/5/boiler/$log/info", b"hello"),
    ) == ([], [])


def test_retained_values_are_not_stored_again_but_descriptions_are_read() -> None:
    """At every subscribe the broker re-sends the retained description and
    values: the description is read, the values (no time of their own) are not
    stored again and are counted."""
    t = table()
    readings, problems = run(
        t,
        ("homie/5/boiler/$description", json.dumps(DESCRIPTION).encode()),
        ("homie/5/boiler/env/temperature", b"21.5"),
        retained=True,
    )
    assert (readings, problems) == ([], [])
    assert (t.state.counts.retained_ignored, t.state.counts.decoded) == (1, 0)
    assert run(t, ("homie/5/boiler/env/temperature", b"22"))[0][0].value == 22.0


def test_templates_and_a_broken_description() -> None:
    t = table(sensor="site1.{device}", metric="{property}")
    describe(t)
    readings, _ = run(t, ("homie/5/boiler/env/temperature", b"1"))
    assert (readings[0].sensor, readings[0].metric) == ("site1.boiler", "temperature")
    _, problems = run(
        t,
        ("homie/5/x/$description", b"[]"),
        ("homie/5/x/$description", b'{"nodes": {"n": {"properties": {"p": {"datatype": "f"}}}}}'),
    )
    assert problems[0] == "$description is not a JSON object (got array)"
    assert problems[1].startswith("$description: property n/p has datatype 'f'")


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(
        ["homie/5/d/$description", "homie/5/d/$state", "homie/5/d/env/temperature", "homie/5/d"]
    ),
    st.binary(max_size=200),
)
def test_nothing_a_device_sends_raises(topic: str, payload: bytes) -> None:
    t = table()
    describe(t, "d")
    readings, rejected = t.decode([(topic, payload, NOW_NS)])
    assert all(r.kind != "internal" for r in rejected)
    assert len(readings) <= 1


# -- Homie 4 ---------------------------------------------------------------------


def test_homie4_properties_described_by_their_own_topics() -> None:
    """Homie 4: $datatype and $unit per property topic; values read by them;
    a value before its $datatype is quarantined; "alert" is a v4 state."""
    t = table(topic="homie/#")
    readings, problems = run(
        t,
        ("homie/boiler/env/temperature/$unit", "°C".encode()),
        ("homie/boiler/env/temperature/$datatype", b"float"),
        ("homie/boiler/env/on/$datatype", b"boolean"),
        ("homie/boiler/env/mode/$datatype", b"enum"),
        ("homie/boiler/$nodes", b"env"),
        ("homie/boiler/env/$properties", b"temperature,on,mode"),
        retained=True,
    )
    assert (readings, problems) == ([], [])
    readings, problems = run(
        t,
        ("homie/boiler/$state", b"alert"),
        ("homie/boiler/env/temperature", b"21.5"),
        ("homie/boiler/env/on", b"true"),
        ("homie/boiler/env/mode", b"eco"),
        ("homie/boiler/env/pressure", b"1.2"),
    )
    assert [(r.sensor, r.metric, r.value, r.unit) for r in readings] == [
        ("boiler", "env.temperature", 21.5, "°C"),
        ("boiler", "env.on", 1.0, ""),
    ]
    assert problems == [
        "property env/pressure of device 'boiler' has no $datatype (Homie 4): a value is not "
        "stored without it (the route must cover its $datatype topic too)"
    ]
    assert t.take_status().states == {"boiler": "alert"}
    # Homie 5 devices on the same route are read as before.
    describe(t)
    readings, problems = run(t, ("homie/5/boiler/env/temperature", b"20"))
    assert problems == []
    assert [(r.metric, r.value) for r in readings] == [("env.temperature", 20.0)]


def test_homie4_rejects_an_unknown_datatype_and_a_v5_only_state() -> None:
    t = table(topic="homie/#")
    _, problems = run(
        t,
        ("homie/d/n/p/$datatype", b"json"),
        ("homie/5/d/$state", b"alert"),
    )
    assert problems[0].startswith("property n/p has $datatype 'json' (Homie 4 knows")
    assert problems[1].startswith("$state 'alert' is not one of")


def test_explain_shows_what_it_knows_of_a_homie4_device() -> None:
    from ingestd.config import Settings
    from ingestd.tools.explain import explain

    settings = Settings(routes=[RouteSettings(topic="homie/#", format="homie")])
    topic = "homie/boiler/env/temperature"
    alone = explain(settings, topic, b"21.5")
    assert "state:   device 'boiler': no $datatype seen" in alone
    assert "has no $datatype (Homie 4)" in alone
    after = explain(
        settings,
        topic,
        b"21.5",
        after=[
            ("homie/boiler/env/temperature/$datatype", b"float"),
            ("homie/boiler/env/temperature/$unit", "°C".encode()),
        ],
    )
    assert "env/temperature: float [°C]" in after
    assert "boiler env.temperature = 21.5 °C" in after


def test_a_flood_of_junk_states_and_values_keeps_every_description() -> None:
    """70,000 ids that only send $state (more than any cache holds) and values
    from ids never described: the 10 described devices keep their descriptions
    and their values are still read."""
    t = table()
    devices = [f"dev{i}" for i in range(10)]
    for device in devices:
        describe(t, device)
    for start in range(0, 70_000, 1000):
        junk = [(f"homie/5/junk{i}/$state", b"ready") for i in range(start, start + 1000)]
        assert run(t, *junk) == ([], [])
    _, problems = run(t, *((f"homie/5/nobody{i}/env/temperature", b"1") for i in range(1000)))
    assert len(problems) == 1000  # quarantined, and nothing kept for them
    readings, problems = run(t, *((f"homie/5/{d}/env/temperature", b"21.5") for d in devices))
    assert problems == []
    assert [(r.sensor, r.metric, r.value) for r in readings] == [
        (d, "env.temperature", 21.5) for d in devices
    ]
    assert len(t.state.format_state["homie"]) == 10
    assert len(t.state.format_state["homie_states"]) == 65536  # bounded, by recency


def test_a_state_sent_before_the_description_stays_with_the_device() -> None:
    t = table()
    assert run(t, ("homie/5/boiler/$state", b"init")) == ([], [])
    assert device_state(t.state, "boiler") is None  # a $state alone is no description
    describe(t)
    device = device_state(t.state, "boiler")
    assert device is not None
    assert device.state == "init"
    assert "boiler" not in t.state.format_state["homie_states"]
    assert run(t, ("homie/5/boiler/$state", b"init")) == ([], [])
    assert t.take_status().states == {"boiler": "init"}  # once, not again


def test_a_retained_description_is_read_before_the_values_that_arrived_after_it() -> None:
    """A member joining a shared group gets the retained description at its
    subscribe, in the same chunk as the first values that follow it: read in
    arrival order, not the retained ones last."""
    t = table()
    chunk = [
        ("homie/5/boiler/$description", json.dumps(DESCRIPTION).encode(), NOW_NS),
        ("homie/5/boiler/env/temperature", b"21.5", NOW_NS + 1),
    ]
    readings, rejected = t.decode(chunk, retained_at={0})
    assert rejected == []
    assert [(r.metric, r.value) for r in readings] == [("env.temperature", 21.5)]


def test_a_busy_described_device_keeps_its_description_through_a_flood_of_new_devices() -> None:
    """Found by review: 70,000 other devices describe themselves (new devices,
    or junk), the boiler, described first, sends a value after every 10 of
    them. Its last 447 values were quarantined (evicted once, never back);
    now its uses keep its place."""
    t = table(topic="homie/#")
    describe(t)
    quarantined = stored = 0
    for chunk in range(7000):
        msgs = [
            (f"homie/5/d{chunk * 10 + k}/$description", json.dumps(DESCRIPTION).encode())
            for k in range(10)
        ]
        msgs.append(("homie/5/boiler/env/temperature", b"21.5"))
        readings, problems = run(t, *msgs)
        stored += sum(r.sensor == "boiler" for r in readings)
        quarantined += sum("boiler" in p for p in problems)
    assert (stored, quarantined) == (7000, 0)
