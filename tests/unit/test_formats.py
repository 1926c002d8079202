"""Payload formats: SenML (RFC 8428 examples), InfluxDB line protocol (the
reference's examples), json options, topic tags, rate limits, and the
never-raise property of every decoder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd import formats
from ingestd.checks import apply_clock, apply_scaling
from ingestd.config import RouteSettings, Scaling, Settings, route_table
from ingestd.events import NS, Reading, Rejected
from ingestd.formats.base import InputLimits
from ingestd.formats.influx import parse, parse_line
from ingestd.routes import RouteTable
from ingestd.tools.explain import explain
from tests.support.decoding import Decoding

NOW = 1_700_000_100.0


def ns(seconds: float) -> int:
    """Float seconds as the decoders take them: to the microsecond."""
    return round(seconds * 1_000_000) * 1000


def table(*routes: dict[str, object], limits: InputLimits | None = None) -> Decoding:
    compiled = [RouteSettings(**r).compile(i) for i, r in enumerate(routes)]
    return Decoding(RouteTable(compiled, limits))


def run(
    t: Decoding, topic: str, payload: bytes | str, now: float = NOW
) -> tuple[list[Reading], list[str]]:
    data = payload.encode() if isinstance(payload, str) else payload
    readings, rejected = t.decode([(topic, data, ns(now))])
    return readings, [r.reason for r in rejected]


SENML = table({"topic": "senml/{sensor}", "format": "senml"})


def rows(readings: list[Reading]) -> list[tuple[str, float, float, str]]:
    return [(r.metric, r.ts_ns / NS, r.value, r.unit) for r in readings]


# -- SenML, RFC 8428 section 5.1 ------------------------------------------------------


def test_senml_single_datapoint() -> None:
    readings, problems = run(
        SENML, "senml/dev1", '[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]'
    )
    assert problems == []
    # No time at all: 0 is relative, so "now" (the receive time).
    assert rows(readings) == [("urn:dev:ow:10e2073a01080063", NOW, 23.1, "Cel")]
    assert readings[0].sensor == "dev1"


def test_senml_multiple_datapoints_with_base_name() -> None:
    readings, _ = run(
        SENML,
        "senml/dev1",
        '[{"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage",'
        '"u":"V","v":120.1},{"n":"current","u":"A","v":1.2}]',
    )
    assert rows(readings) == [
        ("urn:dev:ow:10e2073a01080063:voltage", NOW, 120.1, "V"),
        ("urn:dev:ow:10e2073a01080063:current", NOW, 1.2, "A"),
    ]


@pytest.mark.parametrize(
    "pack",
    [
        # the common kind (the typed fast path) and the general one (a vb record)
        '[{"bn":"dev7:","bt":1700000000,"n":"temp","u":"Cel","v":23.1},{"n":"rh","v":40}]',
        '[{"bn":"dev7:","bt":1700000000,"n":"temp","u":"Cel","v":23.1},{"n":"rh","v":40},'
        '{"n":"door","vb":true}]',
    ],
)
def test_senml_record_names_without_the_base_name(pack: str) -> None:
    """`{record}`: the record's own name (n), without the base name (bn)."""
    t = table({"topic": "senml/{site}/{sensor}", "format": "senml", "metric": "{site}.{record}"})
    readings, problems = run(t, "senml/lyon/dev7", pack)
    assert problems == []
    assert [r.metric for r in readings][:2] == ["lyon.temp", "lyon.rh"]
    assert {r.sensor for r in readings} == {"dev7"}
    both = table({"topic": "senml/{sensor}", "format": "senml", "metric": "{record}@{field}"})
    readings, _ = run(both, "senml/dev7", pack)
    assert readings[0].metric == "temp@dev7:temp"
    # Either name keeps a pack's values apart; a template with neither is refused.
    with pytest.raises(ValueError, match=r"must contain \{field\} \(or \{record\}\)"):
        table({"topic": "senml/{sensor}", "format": "senml", "metric": "{sensor}"})


def test_a_senml_record_with_no_name_of_its_own_keeps_the_resolved_one() -> None:
    """A record named by `bn` alone (valid SenML): `{record}` is not empty."""
    t = table({"topic": "senml/{sensor}", "format": "senml", "metric": "{record}"})
    readings, problems = run(t, "senml/dev9", '[{"bn": "dev9:temp", "v": 1}]')
    assert problems == []
    assert [r.metric for r in readings] == ["dev9:temp"]


def test_senml_multiple_measurements_with_base_time_and_unit() -> None:
    pack = (
        '[{"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,"bu":"A","bver":5,'
        '"n":"voltage","u":"V","v":120.1},{"n":"current","t":-5,"v":1.2},'
        '{"n":"current","t":-4,"v":1.3},{"n":"current","t":-3,"v":1.4},'
        '{"n":"current","t":-2,"v":1.5},{"n":"current","t":-1,"v":1.6},'
        '{"n":"current","v":1.7}]'
    )
    readings, problems = run(SENML, "senml/dev1", pack)
    assert problems == []
    bt = 1.276020076001e9
    assert rows(readings) == [("urn:dev:ow:10e2073a0108006:voltage", bt, 120.1, "V")] + [
        ("urn:dev:ow:10e2073a0108006:current", bt + dt, v, "A")
        for dt, v in ((-5, 1.2), (-4, 1.3), (-3, 1.4), (-2, 1.5), (-1, 1.6), (0, 1.7))
    ]


def test_senml_multiple_datapoints_in_several_units_keep_all_seven() -> None:
    # RFC 8428 5.1.4: one base name, humidity in the base unit, then position
    # records told apart only by their unit (lon, lat): seven readings.
    pack = (
        '[{"bn":"urn:dev:ow:10e2073a01080063","bt":1.320067464e+09,"bu":"%RH","v":20},'
        '{"u":"lon","v":24.30621},{"u":"lat","v":60.07965},'
        '{"t":60,"v":20.3},{"u":"lon","t":60,"v":24.30622},{"u":"lat","t":60,"v":60.07965},'
        '{"t":120,"v":20.7}]'
    )
    readings, problems = run(SENML, "senml/dev", pack)
    assert problems == []
    bt = 1.320067464e9
    name = "urn:dev:ow:10e2073a01080063"
    assert rows(readings) == [
        (name, bt, 20.0, "%RH"),
        (name, bt, 24.30621, "lon"),
        (name, bt, 60.07965, "lat"),
        (name, bt + 60, 20.3, "%RH"),
        (name, bt + 60, 24.30622, "lon"),
        (name, bt + 60, 60.07965, "lat"),
        (name, bt + 120, 20.7, "%RH"),
    ]
    # Distinct series (the unit is part of a series), so nothing needs a seq.
    assert {r.seq for r in readings} == {0}


def test_influx_points_without_timestamps_are_all_kept() -> None:
    readings, problems = run(INFLUX, "telegraf/paris", "cpu v=1\ncpu v=2\ncpu v=3")
    assert problems == []
    assert [(r.metric, r.seq, r.value) for r in readings] == [
        ("cpu.v", 0, 1.0),
        ("cpu.v", 1, 2.0),
        ("cpu.v", 2, 3.0),
    ]


def test_influx_nanosecond_timestamps_stay_distinct() -> None:
    readings, _ = run(
        INFLUX, "telegraf/paris", "cpu v=1 1700000000000000100\ncpu v=2 1700000000000000200"
    )
    assert [(r.ts_ns, r.seq) for r in readings] == [
        (1700000000000000100, 0),
        (1700000000000000200, 0),
    ]


def test_senml_resolved_data() -> None:
    readings, _ = run(
        SENML,
        "senml/d",
        '[{"n":"urn:dev:ow:10e2073a01080063:voltage",'
        '"t":1.276020076e+09,"u":"V","v":120.1},{"n":"urn:dev:ow:10e2073a01080063:'
        'current","t":1.276020076e+09,"u":"A","v":1.2}]',
    )
    assert [(m, t, v) for m, t, v, _ in rows(readings)] == [
        ("urn:dev:ow:10e2073a01080063:voltage", 1.276020076e9, 120.1),
        ("urn:dev:ow:10e2073a01080063:current", 1.276020076e9, 1.2),
    ]


def test_senml_multiple_data_types_keep_numbers_and_report_the_rest() -> None:
    pack = (
        '[{"bn":"urn:dev:ow:10e2073a01080063:","n":"temp","u":"Cel","v":23.1},'
        '{"n":"label","vs":"Machine Room"},{"n":"open","vb":false},'
        '{"n":"nfc-reader","vd":"aGkgCg"}]'
    )
    readings, problems = run(SENML, "senml/d", pack)
    assert [(m, v) for m, _, v, _ in rows(readings)] == [
        ("urn:dev:ow:10e2073a01080063:temp", 23.1),
        ("urn:dev:ow:10e2073a01080063:open", 0.0),
    ]
    assert len(problems) == 1
    assert "record 1 (urn:dev:ow:10e2073a01080063:label): a string value" in problems[0]
    assert "record 3 (urn:dev:ow:10e2073a01080063:nfc-reader): a data value" in problems[0]


def test_senml_base_value_sum_relative_time_and_must_understand() -> None:
    readings, _ = run(SENML, "senml/d", '[{"bn":"m","bv":100,"bs":1000,"v":1,"s":5,"t":-10}]')
    assert rows(readings) == [("m", NOW - 10, 101.0, ""), ("m_sum", NOW - 10, 1005.0, "")]
    _, problems = run(SENML, "senml/d", '[{"n":"x","v":1,"foo_":1}]')
    assert "must-understand field 'foo_'" in problems[0]
    _, problems = run(SENML, "senml/d", '[{"n":"x","v":1,"bver":11}]')
    assert "unsupported SenML version" in problems[0]
    _, problems = run(SENML, "senml/d", '{"n":"x","v":1}')
    assert problems == ["SenML pack must be a JSON array of records"]
    _, problems = run(SENML, "senml/d", '[{"n":"bad name!","v":1}]')
    assert "characters SenML does not allow" in problems[0]


# -- InfluxDB line protocol ----------------------------------------------------------

INFLUX = table({"topic": "telegraf/{host}", "format": "influx", "sensor": "{host}"})


def test_influx_reference_examples() -> None:
    point, problems = parse_line("weather,location=us-midwest temperature=82 1465839830100400200")
    assert problems == []
    assert point.measurement == "weather"
    assert point.tags == (("location", "us-midwest"),)
    assert point.fields == (("temperature", 82.0),)
    assert point.timestamp == 1465839830100400200

    point, _ = parse_line(
        'my\\ Measurement,tag\\ key\\ with\\ spaces=tag\\,value\\,with"commas" '
        'field_key\\\\\\\\="string, \\" escaped",n=1i,u=7u,b=t,f=FALSE'
    )
    assert point.measurement == "my Measurement"
    assert point.tags == (("tag key with spaces", 'tag,value,with"commas"'),)
    assert point.fields == (("n", 1.0), ("u", 7.0), ("b", 1.0), ("f", 0.0))
    assert point.timestamp is None

    points, problems = parse(
        "# a comment\ncpu,host=a value=1 10\n\ncpu,host=b value=2 20\n"
        "bad\ncpu v=-1u\ncpu v=1 1 extra"
    )
    assert [(p.tags, p.fields[0][1]) for p in points] == [
        ((("host", "a"),), 1.0),
        ((("host", "b"),), 2.0),
    ]
    assert problems == [
        "line 5: line has no field set (expected 'measurement field=value')",
        "line 6: unsigned field value '-1u' is negative",
        "line 7: unexpected text after the timestamp (unescaped space?)",
    ]


def test_influx_readings_metric_names_tags_and_time() -> None:
    payload = (
        "cpu,host=ignored,core=0 usage_user=12.5,usage_system=3 1700000000000000000\n"
        'disk,path=/ used_percent=40.1,label="root"'
    )
    readings, problems = run(INFLUX, "telegraf/web1", payload)
    assert [(r.sensor, r.metric, r.ts_ns / NS, r.value, json.loads(r.tags)) for r in readings] == [
        ("web1", "cpu.usage_user", 1.7e9, 12.5, {"core": "0", "host": "ignored"}),
        ("web1", "cpu.usage_system", 1.7e9, 3.0, {"core": "0", "host": "ignored"}),
        ("web1", "disk.used_percent", NOW, 40.1, {"path": "/"}),
    ]
    assert problems == ["line 2: field 'label' of 'disk' is a string, not a number"]
    by_tag = table(
        {
            "topic": "telegraf/{site}",
            "format": "influx",
            "sensor": "{site}",
            "sensor_tag": "host",
            "timestamp_unit": "ms",
            "metric": "{field}",
        }
    )
    readings, _ = run(by_tag, "telegraf/paris", "cpu,host=web2 idle=99 1700000000000")
    assert [(r.sensor, r.metric, r.ts_ns / NS, r.tags) for r in readings] == [
        ("web2", "idle", 1.7e9, "")
    ]
    _, problems = run(INFLUX, "telegraf/x", b"cpu v=1 \xff")
    assert problems == ["payload is not valid UTF-8"]


# -- json options and topic tags -----------------------------------------------------


def test_json_nested_flattening_filters_units_and_depth() -> None:
    t = table(
        {
            "topic": "site/{site}/{sensor}",
            "format": "json",
            "exclude_fields": ["status"],
            "timestamp_field": "time",
            "timestamp_unit": "ms",
        },
        limits=InputLimits(max_json_depth=3),
    )
    payload = json.dumps(
        {
            "time": 1700000000500,
            "status": "ok",
            "env": {"temperature": 21.5, "air": {"co2": 400}},
            "a": {"b": {"c": {"d": 1}}},
        }
    )
    readings, problems = run(t, "site/paris/dev1", payload)
    assert [(r.metric, r.ts_ns / NS, r.value) for r in readings] == [
        ("env.temperature", 1700000000.5, 21.5),
        ("env.air.co2", 1700000000.5, 400.0),
    ]
    assert all(r.tags == '{"site":"paris"}' and r.sensor == "dev1" for r in readings)
    assert problems == ["field 'a.b.c' is nested deeper than 3 levels"]

    only = table({"topic": "s/{sensor}", "fields": ["env_t"], "flatten_separator": "_"})
    readings, problems = run(only, "s/d", '{"env": {"t": 1, "h": 2}, "x": "text"}')
    assert [r.metric for r in readings] == ["env_t"]
    assert problems == []


def test_input_limits_size_depth_utf8() -> None:
    t = table({"topic": "s/{sensor}"}, limits=InputLimits(max_payload_bytes=100))
    _, problems = run(t, "s/d", b'{"x": 1, "pad": "' + b"a" * 200 + b'"}')
    assert problems[0].startswith("payload is 219 bytes, over the limit of 100")
    deep = table({"topic": "s/{sensor}"})
    _, problems = run(deep, "s/d", b"[" * 5000 + b"]" * 5000)
    assert problems == ["JSON is nested too deeply"]
    _, problems = run(deep, "s/d", b'{"x": 1, "s": "\xff"}')
    assert problems == ["payload is not valid UTF-8"]
    _, problems = run(deep, "s/d", b'{"x": NaN}')
    assert problems[0].startswith("payload is not valid JSON")


# -- processing: scaling and clocks ---------------------------------------------------


def test_scaling_and_device_clock_checks() -> None:
    r = [
        Reading("d", "p", ns(NOW), 101325.0),
        Reading("d", "t", ns(NOW + 301), 1.0),
        Reading("d", "t", ns(NOW - 11 * 86400), 2.0),
        Reading("d", "t", ns(NOW - 9 * 86400), 3.0),
    ]
    rejected: list[Rejected] = []
    scaled = apply_scaling(r, {"p": Scaling(scale=0.01, unit="hPa")}, NOW, rejected)
    assert scaled[0].value == pytest.approx(1013.25)
    assert scaled[0].unit == "hPa"
    kept = apply_clock(scaled, NOW, 300, 10 * 86400, rejected)
    assert [k.value for k in kept] == [pytest.approx(1013.25), 3.0]
    assert [x.kind for x in rejected] == ["clock", "clock"]
    assert "301 s in the future" in rejected[0].reason
    assert "11.0 days old" in rejected[1].reason


# -- rate limits -------------------------------------------------------------------------


def test_token_bucket_per_device() -> None:
    t = table(
        {"topic": "s/{sensor}", "format": "value", "metric": "v", "rate_limit": 10, "rate_burst": 5}
    )
    kept = [len(run(t, "s/loud", "1", now=NOW)[0]) for _ in range(8)]
    assert sum(kept) == 5
    assert t.state.counts.rate_dropped == 3
    assert len(run(t, "s/quiet", "1", now=NOW)[0]) == 1  # its own bucket
    assert len(run(t, "s/loud", "1", now=NOW + 0.2)[0]) == 1  # 2 tokens back after 0.2 s
    q = table(
        {"topic": "s/{sensor}", "rate_limit": 1, "rate_burst": 2, "rate_policy": "quarantine"}
    )
    readings, problems = run(q, "s/d", '{"a": 1, "b": 2, "c": 3}')
    assert [r.metric for r in readings] == ["a", "b"]
    assert problems == ["rate limit: 1 reading(s) over 1/s (burst 2) from d"]


def test_rate_limit_runs_on_the_device_clock_so_a_backlog_passes() -> None:
    # A device at exactly its limit (1/s), its 15 messages delivered at once
    # after an outage: produced at its pace, so all pass (by receive time: 1).
    t = table({"topic": "s/{sensor}", "rate_limit": 1, "rate_burst": 1})
    kept = [
        len(run(t, "s/d", f'{{"ts": {1_700_000_000 + i}, "v": 1}}', now=NOW)[0]) for i in range(15)
    ]
    assert kept == [1] * 15
    # Ten in 0.9 s of its own clock: the burst of one, then 0.9 tokens: one passes.
    fast = [
        len(run(t, "s/e", f'{{"ts": {1_700_000_100 + i / 10}, "v": 1}}', now=NOW)[0])
        for i in range(10)
    ]
    assert fast == [1] + [0] * 9


def test_explain_shows_route_tags_and_readings() -> None:
    s = Settings(
        routes=[{"topic": "plant/{site}/{sensor}/data", "format": "json"}],
        processor={"limits": {"t": {"max": 50}}},
    )
    text = explain(
        s, "plant/lyon/p1/data", b'{"ts": 1700000000, "t": 21.5, "u": 99, "x": "a"}', now=NOW
    )
    assert "route:   #1 'plant/{site}/{sensor}/data' (format json, qos 1)" in text
    assert "sensor:  'p1'" in text
    assert 'tags:    {"site":"lyon"}' in text
    assert "p1 t = 21.5 at 2023-11-14T22:13:20.000Z" in text
    assert "quarantined (decode): field 'x' is not a finite number (got string)" in text
    assert "none matches" in explain(s, "other/topic", None)


# -- every decoder, any bytes ------------------------------------------------------------

ALL = table(
    {"topic": "j/{sensor}"},
    {"topic": "s/{sensor}", "format": "senml"},
    {"topic": "i/{sensor}", "format": "influx"},
    {"topic": "v/{sensor}", "format": "value", "metric": "v"},
    limits=InputLimits(max_payload_bytes=4096),
)
SEEDS = [
    b'{"ts": 1700000000, "t": 1.5, "env": {"h": 2}}',
    b'[{"t": 1}, {"t": 2}]',
    b'[{"bn":"a:","bt":1.7e9,"n":"t","v":1},{"n":"h","vb":true}]',
    b"cpu,host=a v=1,w=2i 1700000000000000000\nm f=t",
    b"21.5",
    b"true",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    base = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(base)))
        if op == 0 and base:
            del base[min(pos, len(base) - 1)]
        elif op == 1:
            base[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == 2:
            base[pos:pos] = draw(
                st.sampled_from(
                    [
                        b"NaN",
                        b"1e999",
                        b"9" * 400,
                        b"\xff",
                        b"[[[[",
                        b'"',
                        b"\\",
                        b"\n",
                        b'"_": 1',
                        b"-",
                        b"{}",
                        b"{",
                        b"}",
                        b'"bver":99',
                        b'"x_":1',
                    ]
                )
            )
        else:
            del base[pos:]
    return bytes(base)


@settings(max_examples=3000, deadline=None)
@given(
    prefix=st.sampled_from(["j", "s", "i", "v"]),
    payload=st.one_of(st.binary(max_size=512), mutated()),
)
def test_every_decoder_returns_readings_or_a_reason_for_any_bytes(
    prefix: str, payload: bytes
) -> None:
    readings, rejected = ALL.decode([(f"{prefix}/dev", payload, ns(NOW))])
    assert readings or rejected
    assert len(rejected) <= 1
    assert all(r.reason and r.kind for r in rejected)
    assert not any(r.reason.startswith("decoder error") for r in rejected), rejected
    assert all(math.isfinite(r.value) and 0 <= r.ts_ns < 2**63 for r in readings)
    assert all(r.metric and r.sensor == "dev" for r in readings)


def test_route_table_from_settings_carries_the_input_limits() -> None:
    s = Settings(routes=[{"topic": "a/{sensor}"}], input={"max_payload_bytes": 10})
    assert route_table(s).limits.max_payload_bytes == 10


# -- the registry ----------------------------------------------------------------


def test_every_format_and_its_keys_are_documented() -> None:
    """A format is a module on the registry; config/ingestd.toml documents its
    name and every route key it takes."""
    doc = (Path(__file__).parents[2] / "config" / "ingestd.toml").read_text()
    assert formats.names() == ["json", "senml", "influx", "value", "homie", "sparkplug"]
    for name in formats.names():
        fmt = formats.get(name)
        assert f'"{name}"' in doc
        for key in fmt.option_names():
            assert f"#   {key} " in doc, (name, key)
        # The default metric template uses only what the format offers, and
        # compiles on a topic that names a sensor.
        RouteSettings(topic="t/{sensor}/{metric}", format=name).compile()
    with pytest.raises(KeyError, match="unknown format 'xml' \\(known: json, senml"):
        formats.get("xml")


def test_check_config_shows_every_key_of_the_route_format() -> None:
    dumped = RouteSettings(topic="a/{sensor}", format="influx").model_dump(mode="json")
    assert (dumped["timestamp_unit"], dumped["sensor_tag"]) == ("auto", "")
    assert "flatten_separator" not in dumped


def test_explain_escapes_the_device_text_it_shows() -> None:
    s = Settings(routes=[{"topic": "plant/{sensor}/data", "format": "json"}])
    text = explain(s, "plant/p\u202e1/data", '{"t\u2066": 21.5, "x\\u001b": "a"}'.encode(), now=NOW)
    assert not any(c in text for c in "\u202e\u2066\x1b")
    assert "topic:   plant/p\\u202e1/data" in text
    assert "sensor:  'p\\u202e1'" in text  # escaped once, not repr()'d and escaped again
    assert "p\\u202e1 t\\u2066 = 21.5" in text
    # The decoder's reason already quotes the name with repr(): its backslash is
    # then shown doubled, as every backslash in device text is.
    assert "field 'x\\\\x1b' is not a finite number" in text
