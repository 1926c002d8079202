"""SenML's typed path (msgspec decodes the common records in C, readings made
in the same pass) against the general one: for every pack the typed path
accepts, the same readings; every pack it declines is left to the general
path, which words any problem."""

from __future__ import annotations

import json
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
@given(pack=st.lists(st.one_of(record, common), min_size=0, max_size=6))
def test_the_typed_path_agrees_with_the_general_one(pack: list[dict[str, Any]]) -> None:
    payload = json.dumps(pack).encode()
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
