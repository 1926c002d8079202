"""The sparkplug format (Sparkplug B 3.0): BIRTH declares, DATA resolves aliases
by it, the sequence is followed, and what cannot be resolved is quarantined
with a rebirth request, never guessed."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.config import RouteSettings
from ingestd.events import NS, Reading
from ingestd.formats.sparkplug import REBIRTH
from ingestd.formats.sparkplug_nodes import load_state, node_state, save_state
from ingestd.formats.sparkplug_pb import BY_NAME, Payload
from ingestd.routes import RouteTable
from tests.support.decoding import Decoding

NOW_NS = 1_800_000_000 * NS
T_MS = 1_799_999_000_000
NODE = "spBv1.0/plant/{kind}/press-1"
DEV = "spBv1.0/plant/{kind}/press-1/spindle"


def table(**route: object) -> Decoding:
    route_ = RouteSettings(topic="spBv1.0/#", format="sparkplug", **route)
    return Decoding(RouteTable([route_.compile(0)]))


def run(t: Decoding, *messages: tuple[str, bytes]) -> tuple[list[Reading], list[str]]:
    deliveries = [(topic, payload, NOW_NS + i) for i, (topic, payload) in enumerate(messages)]
    readings, rejected = t.decode(deliveries)
    return readings, [r.reason for r in rejected]


def metric(p: Any, name: str = "", alias: int | None = None, **kw: Any) -> Any:
    m = p.metrics.add(**kw)
    if name:
        m.name = name
    if alias is not None:
        m.alias = alias
    return m


def birth(seq: int = 0, bd_seq: int = 1) -> bytes:
    p = Payload(timestamp=T_MS, seq=seq)
    metric(p, "bdSeq", datatype=BY_NAME["UInt64"], long_value=bd_seq)
    t = metric(p, "Temperature", 1, datatype=BY_NAME["Double"], double_value=20.5)
    t.properties.keys.append("engUnit")
    t.properties.values.add(type=BY_NAME["String"], string_value="°C")
    metric(p, "Count", 2, datatype=BY_NAME["Int32"], int_value=(-3) & 0xFFFFFFFF)
    metric(p, "Running", 3, datatype=BY_NAME["Boolean"], boolean_value=True)
    metric(p, "Label", 4, datatype=BY_NAME["String"], string_value="press")
    metric(p, "Node Control/Rebirth", 5, datatype=BY_NAME["Boolean"], boolean_value=False)
    return bytes(p.SerializeToString())


def data(seq: int, *values: tuple[int, float], ts_ms: int = T_MS + 1000) -> bytes:
    p = Payload(timestamp=ts_ms, seq=seq)
    for alias, v in values:
        metric(p, alias=alias, double_value=v)  # no name, no datatype: the BIRTH's
    return bytes(p.SerializeToString())


def test_birth_then_data_by_alias_with_units_types_and_times() -> None:
    t = table()
    readings, problems = run(t, (NODE.format(kind="NBIRTH"), birth()))
    assert problems == []
    got = {r.metric: (r.value, r.unit, r.sensor, r.ts_ns) for r in readings}
    ts = T_MS * 1_000_000
    assert got == {
        "Temperature": (20.5, "°C", "plant/press-1", ts),
        "Count": (-3.0, "", "plant/press-1", ts),
        "Running": (1.0, "", "plant/press-1", ts),
    }  # Label (a string), the control metric and bdSeq: not readings
    assert t.state.counts.skipped == {"string": 1}
    readings, problems = run(t, (NODE.format(kind="NDATA"), data(1, (1, 21.25))))
    assert problems == []
    assert [(r.metric, r.value, r.unit, r.ts_ns) for r in readings] == [
        ("Temperature", 21.25, "°C", (T_MS + 1000) * 1_000_000)
    ]
    state = node_state(t.state, "plant", "press-1")
    assert state is not None
    assert state.seq == 1
    assert state.bd_seq == 1
    assert t.take_status().states == {"plant/press-1": "online"}


def test_a_sequence_gap_quarantines_and_asks_for_one_rebirth_until_reborn() -> None:
    t = table()
    run(t, (NODE.format(kind="NBIRTH"), birth()))
    _, problems = run(
        t,
        (NODE.format(kind="NDATA"), data(1, (1, 1.0))),
        (NODE.format(kind="NDATA"), data(3, (1, 3.0))),  # 2 never came
        (NODE.format(kind="NDATA"), data(4, (1, 4.0))),
    )
    assert problems[0].startswith("Sparkplug node plant/press-1: sequence gap: expected 2, got 3")
    assert problems[0].endswith("rebirth requested")
    assert "waiting for its rebirth" in problems[1]  # asked once, not per message
    assert t.state.counts.rebirth_requests == 1
    [(topic, payload)] = t.state.commands
    assert topic == "spBv1.0/plant/NCMD/press-1"
    [m] = Payload.FromString(payload).metrics
    assert (m.name, m.boolean_value) == (REBIRTH, True)
    readings, problems = run(
        t,
        (NODE.format(kind="NBIRTH"), birth(bd_seq=2)),
        (NODE.format(kind="NDATA"), data(1, (1, 5.0))),
    )
    assert problems == []
    assert [r.value for r in readings if r.metric == "Temperature"] == [20.5, 5.0]


def test_data_from_a_node_never_seen_born_is_not_guessed() -> None:
    t = table()
    readings, problems = run(t, (NODE.format(kind="NDATA"), data(17, (1, 1.0))))
    assert readings == []
    assert "has not seen its birth" in problems[0]
    assert "rebirth requested" in problems[0]
    assert t.state.commands
    assert t.state.counts.rebirth_requests == 1


def test_an_alias_the_birth_did_not_declare_is_quarantined() -> None:
    t = table()
    run(t, (NODE.format(kind="NBIRTH"), birth()))
    readings, problems = run(t, (NODE.format(kind="NDATA"), data(1, (1, 1.0), (99, 2.0))))
    assert readings == []  # nothing from the message, not even the resolvable alias
    assert "alias 99 was not declared by the BIRTH" in problems[0]


def test_devices_have_their_own_birth_and_death_and_share_the_nodes_sequence() -> None:
    t = table()
    run(t, (NODE.format(kind="NBIRTH"), birth()))
    p = Payload(timestamp=T_MS, seq=1)
    metric(p, "RPM", 10, datatype=BY_NAME["Float"], float_value=1500.0)
    readings, problems = run(
        t,
        (DEV.format(kind="DBIRTH"), p.SerializeToString()),
        (DEV.format(kind="DDATA"), data(2, (10, 1510.0))),
        (NODE.format(kind="NDATA"), data(3, (1, 22.0))),
    )
    assert problems == []
    assert [(r.sensor, r.metric, r.value) for r in readings] == [
        ("plant/press-1/spindle", "RPM", 1500.0),
        ("plant/press-1/spindle", "RPM", 1510.0),
        ("plant/press-1", "Temperature", 22.0),
    ]
    t.take_status()
    run(t, (DEV.format(kind="DDEATH"), Payload(timestamp=T_MS, seq=4).SerializeToString()))
    assert t.take_status().states == {"plant/press-1/spindle": "offline"}
    _, problems = run(t, (DEV.format(kind="DDATA"), data(5, (10, 1.0))))
    assert "whose BIRTH ingestd has not seen" in problems[0]


def test_ndeath_with_the_births_bdseq_marks_node_and_devices_offline() -> None:
    t = table()
    run(t, (NODE.format(kind="NBIRTH"), birth(bd_seq=5)))
    p = Payload(timestamp=T_MS, seq=1)
    metric(p, "RPM", 10, datatype=BY_NAME["Float"], float_value=1.0)
    run(t, (DEV.format(kind="DBIRTH"), p.SerializeToString()))
    t.take_status()
    stale = Payload(timestamp=T_MS)
    metric(stale, "bdSeq", datatype=BY_NAME["UInt64"], long_value=4)
    run(t, (NODE.format(kind="NDEATH"), stale.SerializeToString()))
    assert t.take_status().states == {}, "an earlier session's will does not end this one"
    death = Payload(timestamp=T_MS)
    metric(death, "bdSeq", datatype=BY_NAME["UInt64"], long_value=5)
    run(t, (NODE.format(kind="NDEATH"), death.SerializeToString()))
    assert t.take_status().states == {
        "plant/press-1": "offline",
        "plant/press-1/spindle": "offline",
    }


def test_redelivered_data_is_read_again_not_a_gap() -> None:
    t = table()
    run(t, (NODE.format(kind="NBIRTH"), birth()))
    first = data(1, (1, 1.0))
    readings, problems = run(
        t, (NODE.format(kind="NDATA"), first), (NODE.format(kind="NDATA"), first)
    )
    assert problems == []
    assert len(readings) == 2
    assert readings[0] == readings[1]
    assert t.state.counts.rebirth_requests == 0


def test_the_sequence_wraps_at_255() -> None:
    t = table()
    run(t, (NODE.format(kind="NBIRTH"), birth()))
    msgs = [(NODE.format(kind="NDATA"), data(s % 256, (1, float(s)))) for s in range(1, 600)]
    readings, problems = run(t, *msgs)
    assert problems == []
    assert len(readings) == 599


def test_historical_stored_transient_and_null_and_nan_counted() -> None:
    t = table()
    run(t, (NODE.format(kind="NBIRTH"), birth()))
    p = Payload(timestamp=T_MS + 5, seq=1)
    metric(p, alias=1, double_value=1.0, is_historical=True, timestamp=T_MS - 60_000)
    metric(p, alias=1, double_value=2.0, is_transient=True)
    metric(p, alias=1, is_null=True)
    metric(p, alias=1, double_value=math.nan)
    readings, problems = run(t, (NODE.format(kind="NDATA"), p.SerializeToString()))
    assert problems == []
    assert [(r.value, r.ts_ns) for r in readings] == [(1.0, (T_MS - 60_000) * 1_000_000)]
    assert t.state.counts.skipped == {"string": 1, "transient": 1, "null": 1, "not_finite": 1}


def test_commands_and_host_state_are_not_data() -> None:
    t = table()
    readings, problems = run(
        t,
        ("spBv1.0/plant/NCMD/press-1", b"\x00"),
        ("spBv1.0/STATE/ingestd-1", b'{"online": true, "timestamp": 1}'),
    )
    assert readings == []
    assert problems == []


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=300), kind=st.sampled_from(["NBIRTH", "NDATA", "NDEATH"]))
def test_garbage_payloads_are_quarantined_or_ignored(payload: bytes, kind: str) -> None:
    t = table()
    run(t, (NODE.format(kind="NBIRTH"), birth()))
    readings, problems = run(t, (NODE.format(kind=kind), payload))
    assert all(isinstance(p, str) and p for p in problems)
    assert all(math.isfinite(r.value) and 0 <= r.ts_ns < 2**63 for r in readings)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), max_size=20))
def test_every_double_sent_by_alias_comes_back_exactly(values: list[float]) -> None:
    t = table()
    run(t, (NODE.format(kind="NBIRTH"), birth()))
    msgs = [(NODE.format(kind="NDATA"), data(i + 1, (1, v))) for i, v in enumerate(values)]
    readings, problems = run(t, *msgs)
    assert problems == []
    assert [r.value for r in readings] == values


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["Int8", "Int16", "Int32", "Int64", "UInt8", "UInt32", "UInt64"]),
    value=st.integers(min_value=-(2**31), max_value=2**32 - 1),
)
def test_integers_are_read_by_their_declared_type(kind: str, value: int) -> None:
    signed = kind.startswith("Int")
    bits = {"8": 8, "16": 16, "32": 32, "64": 64}[kind.removeprefix("U").removeprefix("Int")]
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    value = max(lo, min(hi, value))
    p = Payload(timestamp=T_MS, seq=0)
    if bits == 64:
        metric(p, "x", 1, datatype=BY_NAME[kind], long_value=value & (2**64 - 1))
    else:
        metric(p, "x", 1, datatype=BY_NAME[kind], int_value=value & (2**32 - 1))
    readings, problems = run(table(), (NODE.format(kind="NBIRTH"), p.SerializeToString()))
    assert problems == []
    assert [r.value for r in readings] == [float(value)]


def test_explain_shows_the_alias_state_it_resolves_data_with() -> None:
    from ingestd.config import Settings
    from ingestd.tools.explain import explain

    settings = Settings(routes=[RouteSettings(topic="spBv1.0/#", format="sparkplug")])
    topic = NODE.format(kind="NDATA")
    now = T_MS / 1000 + 10
    alone = explain(settings, topic, data(1, (1, 21.75)), now=now)
    assert "state:   node plant/press-1: no BIRTH seen" in alone
    assert "readings: none" in alone
    assert "would send: spBv1.0/plant/NCMD/press-1" in alone
    after = explain(
        settings, topic, data(1, (1, 21.75)), now, after=[(NODE.format(kind="NBIRTH"), birth())]
    )
    assert "after:   spBv1.0/plant/NBIRTH/press-1" in after
    assert "alias 1 = 'Temperature' (Double) [°C]" in after
    assert "plant/press-1 Temperature = 21.75 °C at" in after
    assert "would send" not in after


def test_a_birth_that_cannot_be_read_leaves_the_node_unborn() -> None:
    """A BIRTH with a metric name that is not UTF-8 is quarantined, and the
    node's earlier alias table is not used for the DATA that follows."""
    t = table()
    run(t, (NODE.format(kind="NBIRTH"), birth()))
    bad_birth = bytes(Payload(timestamp=T_MS, seq=0).SerializeToString())
    # A metric by hand: name (field 1) b"\xff\xfe", alias 1, datatype Double, 0.0.
    metric_bytes = b"\x0a\x02\xff\xfe" + b"\x10\x01" + b"\x20\x0a" + b"\x69" + b"\x00" * 8
    bad_birth += b"\x12" + bytes([len(metric_bytes)]) + metric_bytes
    readings, problems = run(t, (NODE.format(kind="NBIRTH"), bad_birth))
    assert readings == []
    assert problems == ["a metric name is not valid UTF-8"]
    readings, problems = run(t, (NODE.format(kind="NDATA"), data(1, (1, 5.0))))
    assert readings == []
    assert "has not seen its birth" in problems[0]


def dup_run(
    t: Decoding, *messages: tuple[str, bytes], read: bool = True
) -> tuple[list[Reading], list[str]]:
    """`run`, every message flagged DUP by the broker (sent again after a
    reconnect); `read`: messages this process read already (the source tells
    by packet id and content), else ones it never read."""
    deliveries = [(topic, payload, NOW_NS + i) for i, (topic, payload) in enumerate(messages)]
    readings, rejected = t.decode(deliveries, read_before=range(len(deliveries)) if read else ())
    return readings, [r.reason for r in rejected]


@given(st.integers(2, 255))
@settings(max_examples=60, deadline=None)
def test_any_forward_jump_is_a_gap_however_far(jump: int) -> None:
    t = table()
    run(t, (NODE.format(kind="NBIRTH"), birth()))
    run(t, *[(NODE.format(kind="NDATA"), data(s, (1, 1.0))) for s in range(1, 11)])
    seq = (10 + jump) % 256
    readings, problems = run(t, (NODE.format(kind="NDATA"), data(seq, (1, 2.0))))
    assert readings == []
    assert problems[0].startswith(
        f"Sparkplug node plant/press-1: sequence gap: expected 11, got {seq} "
        f"({jump - 1} message(s) missing)"
    )
    assert t.state.counts.rebirth_requests == 1
    # The node is unborn until its rebirth: nothing after the gap is guessed.
    _, problems = run(t, (NODE.format(kind="NDATA"), data((seq + 1) % 256, (1, 3.0))))
    assert "waiting for its rebirth" in problems[0]


@given(st.integers(1, 600))
@settings(max_examples=60, deadline=None)
def test_redeliveries_after_a_reconnect_never_unbirth_the_node(unacked: int) -> None:
    """However many of a node's messages were not acknowledged at a reconnect
    (ingestd's window is 1,000), the broker's DUP redeliveries of messages
    this process read are skipped (their readings are in the pipeline), and
    the node goes on where it was."""
    t = table()
    run(t, (NODE.format(kind="NBIRTH"), birth()))
    first = [(NODE.format(kind="NDATA"), data(s % 256, (1, float(s)))) for s in range(1, 1001)]
    _, problems = run(t, *first)
    assert problems == []
    again, problems = dup_run(t, *first[-unacked:])
    assert (again, problems) == ([], [])
    assert t.state.counts.skipped["redelivered"] == unacked
    after, problems = run(t, (NODE.format(kind="NDATA"), data(1001 % 256, (1, 1001.0))))
    assert problems == []
    assert [r.value for r in after] == [1001.0]
    assert t.state.counts.rebirth_requests == 0


def rebirth_swapped(seq: int = 0, ts_ms: int = T_MS + 60_000) -> bytes:
    """A new NBIRTH (bdSeq 2) that gives aliases 1 and 2 to other metrics than
    the first BIRTH did."""
    p = Payload(timestamp=ts_ms, seq=seq)
    metric(p, "bdSeq", datatype=BY_NAME["UInt64"], long_value=2)
    metric(p, "Humidity", 1, datatype=BY_NAME["Double"], double_value=40.0)
    metric(p, "Temperature", 2, datatype=BY_NAME["Double"], double_value=21.0)
    return bytes(p.SerializeToString())


@pytest.mark.parametrize(
    "birth_ms",
    [T_MS + 60_000, T_MS + 2, T_MS - 3_600_000],
    ids=["later", "same millisecond", "clock went back an hour"],
)
def test_a_redelivery_from_before_a_rebirth_is_never_read_with_the_new_aliases(
    birth_ms: int,
) -> None:
    """Whatever the clocks say: a message read before the rebirth, sent again,
    is not read again (with the new aliases or any)."""
    t = table()
    run(t, (NODE.format(kind="NBIRTH"), birth()))
    old = [(NODE.format(kind="NDATA"), data(s, (1, 30.0 + s), ts_ms=T_MS + s)) for s in (1, 2)]
    new = [
        (NODE.format(kind="NBIRTH"), rebirth_swapped(ts_ms=birth_ms)),
        (NODE.format(kind="NDATA"), data(1, (1, 41.0), (2, 22.0), ts_ms=birth_ms + 1)),
    ]
    first, problems = run(t, *old, *new)
    assert problems == []
    # The broker sends all four again after a reconnect, in their order.
    again, problems = dup_run(t, *old, *new)
    assert (again, problems) == ([], [])
    assert t.state.counts.skipped["redelivered"] == 4
    assert ("Humidity", 31.0) not in [(r.metric, r.value) for r in first]
    assert t.state.counts.rebirth_requests == 0
    state = node_state(t.state, "plant", "press-1")
    assert state is not None
    assert (state.seq, state.bd_seq) == (1, 2)
    # And the next new DATA is read with the new BIRTH's aliases.
    after, problems = run(t, (NODE.format(kind="NDATA"), data(2, (1, 44.0), (2, 24.0))))
    assert problems == []
    assert [(r.metric, r.value) for r in after] == [("Humidity", 44.0), ("Temperature", 24.0)]


def test_a_redelivered_old_nbirth_never_replaces_the_current_birth() -> None:
    """Both NBIRTHs sent again after a reconnect, the node's clock back an hour
    at the second (found by review: an older BIRTH was taken for a newer one,
    and the node's new DATA read with the old aliases until its next rebirth)."""
    t = table()
    node = NODE.format(kind="NDATA")
    run(t, (NODE.format(kind="NBIRTH"), birth()))
    old = [(node, data(s, (1, 30.0 + s), ts_ms=T_MS + s)) for s in (1, 2, 3)]
    back = T_MS - 3_600_000
    new = [(NODE.format(kind="NBIRTH"), rebirth_swapped(ts_ms=back))] + [
        (node, data(s, (1, 40.0 + s), (2, 20.0 + s), ts_ms=back + 1000 * s)) for s in (1, 2, 3)
    ]
    run(t, *old, *new)
    dup_run(t, (NODE.format(kind="NBIRTH"), birth()), *old, *new)
    state = node_state(t.state, "plant", "press-1")
    assert state is not None
    assert state.bd_seq == 2
    fresh, _ = run(t, (node, data(4, (1, 44.0), (2, 24.0), ts_ms=back + 4000)))
    assert [(r.metric, r.value) for r in fresh] == [("Humidity", 44.0), ("Temperature", 24.0)]


def test_a_dup_message_this_process_never_read_follows_on_or_is_a_gap() -> None:
    """DUP says "sent before", not "read before": one ingestd never read
    (lost in a socket at the disconnect) is the next, or after a real gap
    (the ones between lost upstream) a gap, however long the node has run."""
    t = table()
    run(t, (NODE.format(kind="NBIRTH"), birth()))
    run(t, *[(NODE.format(kind="NDATA"), data(s % 256, (1, 1.0))) for s in range(1, 301)])
    readings, problems = dup_run(
        t, (NODE.format(kind="NDATA"), data(301 % 256, (1, 2.0))), read=False
    )
    assert problems == []
    assert [r.value for r in readings] == [2.0]
    _, problems = dup_run(t, (NODE.format(kind="NDATA"), data(305 % 256, (1, 3.0))), read=False)
    assert "sequence gap: expected 46, got 49 (3 message(s) missing)" in problems[0]


def restarted(t: Decoding) -> Decoding:
    """A new table with `t`'s Sparkplug state as the store would give it back
    after a restart (saved chunk by chunk: the last position and description)."""
    saved: dict[str, tuple[bytes, bytes]] = {}
    for device, (position, description) in save_state(t.state).items():
        saved[device] = (position, description or saved[device][1])
    fresh = table()
    load_state(fresh.state, [(d, p, desc) for d, (p, desc) in saved.items()])
    return fresh


def test_after_a_restart_the_node_goes_on_from_its_last_commit() -> None:
    """After a restart the node's state is the one of the last commit: the
    redeliveries committed before (the source knows them by the packet ids
    and CRCs the store kept) are skipped, the rest follow on, a real gap is
    one, whatever the payload times say."""
    t = table()
    run(t, (NODE.format(kind="NBIRTH"), birth()))
    sent = [
        (NODE.format(kind="NDATA"), data(s, (1, float(s)), ts_ms=T_MS - 10 * s))
        for s in range(1, 11)
    ]
    run(t, *sent[:8])  # committed before the kill
    fresh = restarted(t)
    committed, problems = dup_run(fresh, *sent[5:8])  # 6-8: committed, unacknowledged
    assert (committed, problems) == ([], [])
    again, problems = dup_run(fresh, *sent[8:], read=False)  # 9-10: never committed
    assert problems == []
    assert [r.value for r in again] == [9.0, 10.0]
    assert fresh.state.counts.skipped["redelivered"] == 3
    _, problems = dup_run(
        fresh, (NODE.format(kind="NDATA"), data(15, (1, 15.0), ts_ms=T_MS - 150)), read=False
    )
    assert "sequence gap: expected 11, got 15" in problems[0]


def test_a_node_state_row_that_cannot_be_read_waits_for_a_rebirth() -> None:
    """Found by review: a row of the wrong shape stopped the daemon at every
    start. It is logged and the node waits for its rebirth."""
    t = table()
    run(t, (NODE.format(kind="NBIRTH"), birth()))
    [(device, (position, description))] = save_state(t.state).items()
    assert description is not None
    wrong = msgspec.msgpack.encode([[True, True, []], [], {}])  # devices a list
    fresh = table()
    load_state(fresh.state, [(device, position, wrong), ("plant/other", b"\xc1", b"\xc1")])
    assert node_state(fresh.state, "plant", "press-1") is None
    _, problems = run(fresh, (NODE.format(kind="NDATA"), data(1, (1, 1.0))))
    assert "has not seen its birth" in problems[0]


def test_a_device_redelivery_from_before_its_dbirth_is_skipped() -> None:
    t = table()
    run(t, (NODE.format(kind="NBIRTH"), birth()))

    def dbirth(seq: int, ts_ms: int, name: str) -> bytes:
        p = Payload(timestamp=ts_ms, seq=seq)
        metric(p, name, 10, datatype=BY_NAME["Double"], double_value=1.0)
        return bytes(p.SerializeToString())

    msgs = [
        (DEV.format(kind="DBIRTH"), dbirth(1, T_MS + 10, "RPM")),
        (DEV.format(kind="DDATA"), data(2, (10, 1500.0), ts_ms=T_MS + 20)),
        (DEV.format(kind="DBIRTH"), dbirth(3, T_MS + 30, "Torque")),
        (DEV.format(kind="DDATA"), data(4, (10, 7.5), ts_ms=T_MS + 40)),
    ]
    first, problems = run(t, *msgs)
    assert problems == []
    assert [(r.metric, r.value) for r in first] == [
        ("RPM", 1.0),
        ("RPM", 1500.0),
        ("Torque", 1.0),
        ("Torque", 7.5),
    ]
    again, problems = dup_run(t, *msgs)
    assert (again, problems) == ([], [])
    assert t.state.counts.skipped["redelivered"] == 4


def test_junk_from_many_node_ids_buys_bounded_rebirth_requests_and_log_lines() -> None:
    t = table()
    junk = [(f"spBv1.0/junk/NDATA/n{i}", data(1, (1, 1.0))) for i in range(2000)]
    _, problems = run(t, *junk)
    assert len(problems) == 2000  # every one quarantined with its reason
    # One second's worth (10) at most, the rest counted; decoding took well under 1 s.
    assert 10 <= t.state.counts.rebirth_requests <= 20
    assert len(t.state.commands) == t.state.counts.rebirth_requests
    assert t.state.counts.rebirths_suppressed == 2000 - t.state.counts.rebirth_requests
    assert t.state.device_log.suppressed >= t.state.counts.rebirth_requests - 20


def test_a_flood_of_junk_node_ids_keeps_every_born_node() -> None:
    """70,000 node ids that never sent an NBIRTH (more than the 65,536 kept)
    cost the born nodes nothing: their DATA is still resolved by alias."""
    t = table()
    born = [f"spBv1.0/plant/{{kind}}/press-{i}" for i in range(3)]
    run(t, *[(b.format(kind="NBIRTH"), birth()) for b in born])
    junk = data(1, (1, 1.0))
    run(t, *[(f"spBv1.0/junk/NDATA/n{i}", junk) for i in range(70_000)])
    readings, problems = run(t, *[(b.format(kind="NDATA"), data(1, (1, 7.0))) for b in born])
    assert problems == []
    assert [(r.sensor, r.metric, r.value) for r in readings] == [
        (f"plant/press-{i}", "Temperature", 7.0) for i in range(3)
    ]
