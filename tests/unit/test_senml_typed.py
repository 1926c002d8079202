"""SenML's typed path (msgspec decodes the common records in C) against the
general one: for every pack the typed path accepts, the same records; every
pack it declines is left to the general path, which words any problem."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.formats.common import parse_json
from ingestd.formats.senml import _resolve_simple, resolve

NOW = 1_700_000_000.0

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 2**28, 0.5]),
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


@settings(max_examples=2000, deadline=None)
@given(pack=st.lists(record, min_size=0, max_size=6))
def test_the_typed_path_agrees_with_the_general_one(pack: list[dict[str, Any]]) -> None:
    payload = json.dumps(pack).encode()
    typed = _resolve_simple(payload, NOW)
    if typed is None:
        return  # declined: the general path decides, as before
    problems: list[str] = []
    general = resolve(parse_json(payload), NOW, problems)
    assert problems == []
    assert [(r.name, r.time, r.unit, r.value, r.sum) for r in typed] == [
        (r.name, r.time, r.unit, r.value, r.sum) for r in general
    ]


def test_the_typed_path_takes_the_common_pack_and_declines_the_rest() -> None:
    common = [
        {"bn": "urn:dev:", "bt": NOW, "bu": "Cel", "n": "t", "v": 21.5},
        {"n": "t", "t": 1, "v": 22},
    ]
    assert _resolve_simple(json.dumps(common).encode(), NOW) is not None
    for odd in (
        [{"n": "t", "v": True}],  # a bool value
        [{"n": "t", "v": 1, "x_": 1}],  # must-understand
        [{"n": "t", "v": 1, "s": 2}],  # a sum
        [{"n": "t", "v": None}],  # a null
        [{"n": "t"}],  # no value
        [{"n": "a b", "v": 1}],  # a name SenML does not allow
    ):
        assert _resolve_simple(json.dumps(odd).encode(), NOW) is None, odd
    assert _resolve_simple(b'[{"n": "t", "v": 1, "v": 2}]', NOW) is None  # a repeated key
    for huge in (b'[{"n": "t", "v": 1e400}]', b'[{"n": "t", "v": 1}, {"bt": 1e400}]'):
        assert _resolve_simple(huge, NOW) is None, huge
