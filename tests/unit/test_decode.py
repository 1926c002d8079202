from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.decode import decode_all
from ingestd.devices import DeviceState
from ingestd.errors import DecodeError
from ingestd.events import NS, Reading
from ingestd.formats.base import InputLimits
from ingestd.formats.common import parse_timestamp
from ingestd.formats.value import decode_value
from ingestd.routes import RouteTable, compile_route

TABLE = RouteTable(
    [
        compile_route("sensors/{sensor}/telemetry", "{sensor}", "{field}", "json", 0),
        compile_route("sensors/{sensor}/{metric}", "{sensor}", "{metric}", "value", 1),
    ]
)
NOW = 1_700_000_100.0
NOW_NS = 1_700_000_100 * NS


def decode(topic: str, payload: bytes) -> tuple[list[Reading], list[str]]:
    readings, rejected = decode_all(TABLE, DeviceState(), [(topic, payload, NOW_NS)])
    return readings, [r.reason for r in rejected]


def test_json_object_gives_one_reading_per_numeric_field() -> None:
    readings, rejected = decode(
        "sensors/kitchen/telemetry", b'{"ts": 1700000000.5, "temperature": 21.5, "humidity": 40}'
    )
    assert rejected == []
    assert readings == [
        Reading(
            "kitchen", "temperature", 1700000000 * NS + NS // 2, 21.5, "sensors/kitchen/telemetry"
        ),
        Reading(
            "kitchen", "humidity", 1700000000 * NS + NS // 2, 40.0, "sensors/kitchen/telemetry"
        ),
    ]


def test_json_without_timestamp_uses_receive_time() -> None:
    readings, _ = decode("sensors/k/telemetry", b'{"temperature": 1}')
    assert readings[0].ts_ns == NOW_NS


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1700000000, 1700000000 * NS),
        (1700000000.25, 1700000000 * NS + NS // 4),
        (1700000000.123456, 1700000000 * NS + 123_456_000),  # every microsecond kept
        ("2023-11-14T22:13:20Z", 1700000000 * NS),
        ("2023-11-14T22:13:20.500+00:00", 1700000000 * NS + NS // 2),
        ("2023-11-14T22:13:20.000001Z", 1700000000 * NS + 1000),
        ("2023-11-14T23:13:20+01:00", 1700000000 * NS),
        ("2023-11-14T22:13:20", 1700000000 * NS),  # naive = UTC
    ],
)
def test_timestamps(raw: object, expected: int) -> None:
    assert parse_timestamp(raw) == expected


def test_timestamps_in_finer_units_are_exact() -> None:
    assert parse_timestamp(1700000000123, "ms") == 1700000000123 * 1_000_000
    assert parse_timestamp(1700000000123456, "us") == 1700000000123456 * 1000
    assert parse_timestamp(1700000000123456789, "ns") == 1700000000123456789


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (1700000000000, "a finer unit sent"),
        (-1, "out of range"),
        ("yesterday", "not ISO 8601"),
        (True, "must be a number"),
        ([1], "must be a number"),
    ],
)
def test_bad_timestamps(raw: object, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        parse_timestamp(raw)


def test_plain_value_payloads() -> None:
    assert decode_value(b"21.5") == 21.5
    assert decode_value(b" -3e2\n") == -300.0
    assert decode_value(b"true") == 1.0
    assert decode_value(b"false") == 0.0
    readings, rejected = decode("sensors/kitchen/temperature", b"21.5")
    assert rejected == []
    assert readings == [
        Reading("kitchen", "temperature", NOW_NS, 21.5, "sensors/kitchen/temperature")
    ]


@pytest.mark.parametrize(
    "payload",
    [b"", b"NaN", b"inf", b"-Infinity", b"1_000", b"0x10", b"21.5C", b"\xff", b"1e999", b"[1]"],
)
def test_bad_values_are_rejected(payload: bytes) -> None:
    readings, rejected = decode("sensors/k/temperature", payload)
    assert readings == []
    assert len(rejected) == 1
    assert "number" in rejected[0]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "not an object or an array of objects (got an empty array)"),
        (b"42", "not an object or an array of objects (got number)"),
        (b"[1, 2]", "element 0 is not an object (got number); element 1 is not an object"),
        (b'[{"ts": "x", "a": 1}]', "element 0: timestamp 'x' is not ISO 8601"),
        (b"{}", "no numeric fields"),
        (b'{"ts": 1}', "no numeric fields"),
        (b"NaN", "not valid JSON"),
        (b'{"t": NaN}', "not valid JSON"),
        (b'{"t": 1e999}', "not valid JSON"),
    ],
)
def test_malformed_json_is_rejected_with_reason(payload: bytes, reason: str) -> None:
    readings, rejected = decode("sensors/k/telemetry", payload)
    assert readings == []
    assert len(rejected) == 1
    assert reason in rejected[0]


def test_bad_fields_are_quarantined_and_good_ones_kept() -> None:
    readings, rejected = decode(
        "sensors/k/telemetry",
        b'{"temperature": 20, "status": "ok", "nested": {"a": 1, "b": [1]}, "n": null, "": 3}',
    )
    assert [r.metric for r in readings] == ["temperature", "nested.a"]
    assert len(rejected) == 1
    assert "'status' is not a finite number (got string)" in rejected[0]
    assert "'nested.b' is not a finite number (got array)" in rejected[0]
    assert "'n' is not a finite number (got null)" in rejected[0]
    assert "a field with an empty name" in rejected[0]


def test_huge_integers_are_not_finite_numbers() -> None:
    readings, rejected = decode("sensors/k/telemetry", b'{"x": ' + b"9" * 400 + b', "y": 2}')
    assert [(r.metric, r.value) for r in readings] == [("y", 2.0)]
    assert rejected == ["field 'x' is not a finite number (got number)"]


def test_unrouted_topic_and_empty_levels() -> None:
    assert decode("elsewhere/x", b"1")[1] == ["no route matches this topic"]
    assert decode("sensors//temperature", b"1")[1] == ["topic gives an empty sensor id"]
    assert decode("sensors/k/", b"1")[1] == ["topic gives an empty metric name"]


@settings(max_examples=1500, deadline=None)
@given(
    topic=st.sampled_from(["sensors/a/telemetry", "sensors/a/t", "x/y", "sensors//x"]),
    payload=st.binary(max_size=256),
)
def test_any_bytes_give_readings_or_a_reason_never_an_exception(topic: str, payload: bytes) -> None:
    readings, rejected = decode_all(TABLE, DeviceState(), [(topic, payload, NOW_NS)])
    assert readings or rejected
    for r in readings:
        assert math.isfinite(r.value)
        assert 0 <= r.ts_ns < 2**63
    for rej in rejected:
        assert rej.reason
        assert rej.payload == payload


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=1000, deadline=None)
@given(doc=st.dictionaries(st.text(max_size=10), json_values, max_size=8))
def test_any_json_object_decodes_or_is_rejected(doc: dict[str, object]) -> None:
    import json

    payload = json.dumps(doc).encode()
    readings, rejected = decode_all(
        TABLE, DeviceState(), [("sensors/a/telemetry", payload, NOW_NS)]
    )
    assert readings or rejected
    assert all(math.isfinite(r.value) for r in readings)


def test_json_array_of_objects_gives_every_record() -> None:
    payload = b'[{"ts": 1700000000, "t": 1, "h": 2}, {"ts": 1700000001, "t": 3}, {"t": 4}]'
    readings, rejected = decode("sensors/k/telemetry", payload)
    assert rejected == []
    assert [(r.metric, r.ts_ns / NS, r.value) for r in readings] == [
        ("t", 1700000000.0, 1.0),
        ("h", 1700000000.0, 2.0),
        ("t", 1700000001.0, 3.0),
        ("t", NOW, 4.0),
    ]


def test_bad_array_elements_are_quarantined_and_the_rest_kept() -> None:
    payload = (
        b'[{"ts": 1700000000, "t": 1}, 5, {"ts": "never", "t": 2}, {"t": "x", "u": 3},'
        b' {"ts": 1700000002}]'
    )
    readings, rejected = decode("sensors/k/telemetry", payload)
    assert [(r.metric, r.value) for r in readings] == [("t", 1.0), ("u", 3.0)]
    assert rejected == [
        "element 1 is not an object (got number); "
        "element 2: timestamp 'never' is not ISO 8601; "
        "element 3: field 't' is not a finite number (got string); "
        "element 4: JSON object has no numeric fields"
    ]


def test_invalid_utf8_and_deep_nesting_are_reasons_not_crashes() -> None:
    # msgspec raises UnicodeDecodeError and RecursionError for these, outside
    # its own DecodeError: either would have stopped the daemon, and the
    # broker's redelivery would have stopped it again on every restart.
    assert decode("sensors/k/telemetry", b'{"t": 1, "s": "\xff"}') == (
        [],
        ["payload is not valid UTF-8"],
    )
    assert decode("sensors/k/telemetry", b"[" * 5000 + b"]" * 5000) == (
        [],
        ["JSON is nested too deeply"],
    )


# -- readings that share a time are distinct readings (never "duplicates") ---------------


def test_an_array_without_timestamps_keeps_every_reading() -> None:
    readings, rejected = decode("sensors/k/telemetry", b'[{"t": 1}, {"t": 2}, {"t": 3}]')
    assert rejected == []
    assert [(r.ts_ns, r.seq, r.value) for r in readings] == [
        (NOW_NS, 0, 1.0),
        (NOW_NS, 1, 2.0),
        (NOW_NS, 2, 3.0),
    ]


def test_a_repeated_timestamp_in_an_array_keeps_both_in_order() -> None:
    readings, _ = decode(
        "sensors/k/telemetry", b'[{"ts": 1700000000, "t": 5}, {"ts": 1700000000, "t": 6}]'
    )
    assert [(r.seq, r.value) for r in readings] == [(0, 5.0), (1, 6.0)]


def test_fields_that_flatten_to_one_name_are_both_kept() -> None:
    readings, rejected = decode("sensors/k/telemetry", b'{"a.b": 1, "a": {"b": 2}}')
    assert rejected == []
    assert [(r.metric, r.seq, r.value) for r in readings] == [("a.b", 0, 1.0), ("a.b", 1, 2.0)]


def test_the_numbering_is_the_same_for_a_redelivery() -> None:
    payload = b'[{"t": 1}, {"t": 2}, {"h": 3}]'
    first, _ = decode("sensors/k/telemetry", payload)
    again, _ = decode("sensors/k/telemetry", payload)
    assert first == again


def test_a_byte_order_mark_is_ignored() -> None:
    readings, rejected = decode("sensors/k/telemetry", b'\xef\xbb\xbf{"t": 1}')
    assert (rejected, [r.value for r in readings]) == ([], [1.0])


@pytest.mark.parametrize(
    "payload",
    [
        b'{"t": 1, "t": 2}',
        b'[{"h": 1}, {"x": {"t": 1, "t": 2}}]',
        b'{"ts": "2023-11-14T22:13:20Z", "t": 1, "t": 2}',
        # Whitespace before a colon is JSON too; such a key is counted as well.
        b'{"t":1,"t" :2}',
        b'{"t" :1,"t":2}',
        b'{"t":1,\n "t"\n\t: 2}',
    ],
)
def test_a_field_named_twice_is_quarantined_with_the_reason(payload: bytes) -> None:
    readings, rejected = decode("sensors/k/telemetry", payload)
    assert readings == []
    assert rejected == [
        "field 't' appears more than once in an object (which value is meant is ambiguous)"
    ]


def test_colons_inside_strings_are_not_taken_for_repeated_fields() -> None:
    readings, rejected = decode(
        "sensors/k/telemetry", b'{"ts": "2023-11-14T22:13:20Z", "note": "a:b", "t": 1}'
    )
    assert [r.value for r in readings] == [1.0]
    assert rejected == ["field 'note' is not a finite number (got string)"]


def test_a_large_payload_is_cut_before_routing_whatever_its_topic() -> None:
    small = RouteTable(TABLE.routes, InputLimits(max_payload_bytes=100))
    big = b"x" * 5000
    for topic in ("sensors//telemetry", "nowhere/at/all", "sensors/a/telemetry"):
        _, rejected = decode_all(small, DeviceState(), [(topic, big, NOW_NS)])
        assert [(r.kind, len(r.payload)) for r in rejected] == [("too_large", 1024)]
