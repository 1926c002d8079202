"""SenML's typed path (msgspec decodes the common records in C, readings made
in the same pass) against the general one: for every pack the typed path
accepts, the same readings; every pack it declines is left to the general
path, which words any problem."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.config import Settings, route_table
from ingestd.decode import decode_all
from ingestd.devices import DeviceState
from ingestd.events import Reading
from ingestd.formats.common import parse_json
from ingestd.formats.senml import _append, _simple_readings, resolve

NOW = 1_700_000_000.0
TOPIC = "site/kitchen/senml"
MATCH = route_table(
    Settings(routes=[{"topic": "site/{sensor}/senml", "format": "senml", "metric": "x.{field}.y"}])
).match(TOPIC)
assert MATCH is not None


def _typed(payload: bytes, now: float = NOW) -> list[Reading] | None:
    assert MATCH is not None
    return _simple_readings(payload, now, MATCH, TOPIC)


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 1.8e302, 2**28, 0.5, 8_999_999_999.9999995, 9e9]),
    st.text(max_size=5),
)
names = st.one_of(st.none(), st.sampled_from(["", "t", "urn:dev:", "a b", "x/y", "ü"]), values)
record = st.fixed_dictionaries(
    {},
    optional={
        "bn": names,
        "bt": values,
        "bu": names,
        "n": names,
        "t": values,
        "u": names,
        "v": values,
        "vb": st.booleans(),
        "s": values,
    },
)

# Records of the common kind (what the typed path takes), with times near the
# edges: relative and absolute, past what is stored, to the half microsecond.
times = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6),
    st.floats(min_value=1e9, max_value=9.1e9),
    st.integers(min_value=0, max_value=2**30),
    st.sampled_from([1.8e302, 9e9, 8_999_999_999.9999995, 1_700_000_000.0000005]),
)
common = st.fixed_dictionaries(
    {"v": st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-5, 5))},
    optional={
        "bn": st.sampled_from(["", "urn:dev:", "d1:"]),
        "bt": times,
        "bu": st.sampled_from(["", "Cel"]),
        "n": st.sampled_from(["t", "h", "a/b"]),
        "t": times,
        "u": st.sampled_from(["", "%RH"]),
    },
)


@settings(max_examples=2000, deadline=None)
@given(
    pack=st.lists(st.one_of(record, common), min_size=0, max_size=6),
    colon=st.sampled_from([":", ": ", " :", "\n\t: "]),
)
def test_the_typed_path_agrees_with_the_general_one(pack: list[dict[str, Any]], colon: str) -> None:
    payload = json.dumps(pack, separators=(", ", colon)).encode()
    typed = _typed(payload)
    if typed is None:
        return  # declined: the general path decides, as before
    assert MATCH is not None
    problems: list[str] = []
    general: list[Reading] = []
    _append(resolve(parse_json(payload), NOW, problems), MATCH, TOPIC, general, problems)
    assert problems == []
    assert typed == general


def test_the_typed_path_takes_the_common_pack_and_declines_the_rest() -> None:
    common = [
        {"bn": "urn:dev:", "bt": NOW, "bu": "Cel", "n": "t", "v": 21.5},
        {"n": "t", "t": 1, "v": 22},
    ]
    typed = _typed(json.dumps(common).encode())
    assert typed == [
        Reading("kitchen", "x.urn:dev:t.y", int(NOW * 1e9), 21.5, TOPIC, "", "Cel"),
        Reading("kitchen", "x.urn:dev:t.y", int(NOW * 1e9) + 10**9, 22.0, TOPIC, "", "Cel"),
    ]
    for odd in (
        [{"n": "t", "v": True}],  # a bool value
        [{"n": "t", "v": 1, "x_": 1}],  # must-understand
        [{"n": "t", "v": 1, "s": 2}],  # a sum
        [{"n": "t", "v": None}],  # a null
        [{"n": "t"}],  # no value
        [{"n": "a b", "v": 1}],  # a name SenML does not allow
    ):
        assert _typed(json.dumps(odd).encode()) is None, odd
    assert _typed(b'[{"n": "t", "v": 1, "v": 2}]') is None  # a repeated key
    for huge in (b'[{"n": "t", "v": 1e400}]', b'[{"n": "t", "v": 1}, {"bt": 1e400}]'):
        assert _typed(huge) is None, huge
    # A time past what is stored (year 2255): the general path words the problem.
    assert _typed(b'[{"n": "t", "bt": 9.1e9, "v": 1}]') is None


def test_a_time_past_what_is_stored_is_the_devices_problem_however_large() -> None:
    """1.8e302 s is a finite time (resolve() takes it) but no integer of
    microseconds: the record is quarantined as too large, not as a bug of ours,
    and the pack's other records are kept."""
    table = route_table(Settings(routes=[{"topic": "site/{sensor}/senml", "format": "senml"}]))
    for bt in ("1.8e302", "9e9"):
        payload = f'[{{"n": "far", "bt": {bt}, "v": 1}}, {{"n": "near", "bt": 1e9, "v": 2}}]'
        readings, rejected = decode_all(table, DeviceState(), [(TOPIC, payload.encode(), 0)])
        assert [(r.metric, r.value) for r in readings] == [("near", 2.0)]
        assert [r.kind for r in rejected] == ["decode"], rejected
        assert "too large for a Unix time" in rejected[0].reason


def _general(payload: bytes) -> tuple[list[tuple[str, float, str]], list[str]]:
    table = route_table(Settings(routes=[{"topic": "site/{sensor}/senml", "format": "senml"}]))
    readings, rejected = decode_all(table, DeviceState(), [(TOPIC, payload, int(NOW * 1e9))])
    return [(r.metric, r.value, r.unit) for r in readings], [r.reason for r in rejected]


def test_a_null_or_a_repeated_key_counts_with_whitespace_before_its_colon() -> None:
    """Whitespace before a key's colon must not hide a null or a repeated
    field from the check: each pack means what it means written compactly."""
    for spaced in (
        b'[{"bn": "dev:", "n": "a", "v": 1}, {"v" :null}]',
        b'[{"bn": "dev:", "n": "a", "v": 1}, {"bn" :null, "n": "b", "v": 2}]',
        b'[{"bn": "d:", "bt": 1600000000, "n": "a", "v": 1}, {"bt"\n:null, "n": "b", "v": 2}]',
        b'[{"n" :"a", "v": 1, "v" :2, "u": null}]',
    ):
        compact = spaced.replace(b'"\n:', b'":').replace(b'" :', b'":')
        assert _general(spaced) == _general(compact), spaced
    assert _general(b'[{"n" :"a", "v": 1, "v" :2, "u": null}]') == (
        [],
        ["field 'v' appears more than once in an object (which value is meant is ambiguous)"],
    )
    assert _general(b'[{"bn": "dev:", "n": "a", "v": 1}, {"bn" :null, "n": "b", "v": 2}]')[0] == [
        ("dev:a", 1.0, ""),
        ("b", 2.0, ""),
    ]


def test_a_name_ending_in_a_newline_is_not_a_senml_name() -> None:
    readings, reasons = _general(b'[{"n": "temp\\n", "v": 1}, {"n": "ok", "v": 2}]')
    assert readings == [("ok", 2.0, "")]
    assert reasons == ["record 0: name 'temp\\n' has characters SenML does not allow"]


def test_a_negative_zero_keeps_its_sign_on_either_path() -> None:
    typed = _typed(b'[{"n": "t", "v": -0.0}]')
    assert typed is not None
    assert math.copysign(1, typed[0].value) == -1
    for routed in ("{field}", "{record}"):  # {record} takes the general path
        table = route_table(
            Settings(routes=[{"topic": "site/{sensor}/senml", "format": "senml", "metric": routed}])
        )
        # The common record, and one with a sum (each its own way of resolving).
        for pack in (b'[{"n": "t", "v": -0.0}]', b'[{"n": "t", "v": -0.0, "s": 1}]'):
            readings, _ = decode_all(table, DeviceState(), [(TOPIC, pack, 0)])
            assert math.copysign(1, readings[0].value) == -1, (routed, pack)
