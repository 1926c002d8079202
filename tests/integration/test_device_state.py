"""What a stateful format keeps across restarts (a Sparkplug node's BIRTH and
sequence), written with the chunk it follows and read back at open, on both
engines: each instance's own, the last position, the last description."""

from __future__ import annotations

from collections.abc import Callable

from ingestd.config import RouteSettings
from ingestd.events import NS, SensorStatus
from ingestd.formats.sparkplug_nodes import node_state
from ingestd.formats.sparkplug_pb import BY_NAME, Payload
from ingestd.routes import RouteTable
from ingestd.store.base import Store
from tests.support.decoding import Decoding

NODE = "spBv1.0/plant/{kind}/press-1"
T_MS = 1_799_999_000_000


def table() -> Decoding:
    return Decoding(RouteTable([RouteSettings(topic="spBv1.0/#", format="sparkplug").compile(0)]))


def birth() -> bytes:
    p = Payload(timestamp=T_MS, seq=0)
    p.metrics.add(name="bdSeq", datatype=BY_NAME["UInt64"], long_value=3)
    p.metrics.add(name="Temperature", alias=1, datatype=BY_NAME["Double"], double_value=20.0)
    return bytes(p.SerializeToString())


def data(seq: int, value: float) -> bytes:
    p = Payload(timestamp=T_MS + seq, seq=seq)
    p.metrics.add(alias=1, double_value=value)
    return bytes(p.SerializeToString())


async def test_a_nodes_state_comes_back_at_open_as_last_committed(
    new_store: Callable[[], Store],
) -> None:
    t = table()
    chunks = [
        [(NODE.format(kind="NBIRTH"), birth())],
        [(NODE.format(kind="NDATA"), data(s, float(s))) for s in range(1, 4)],
        [(NODE.format(kind="NDATA"), data(4, 4.0))],
    ]
    store: Store = new_store()
    store.owner = "ingestd-a"
    async with store:
        for i, chunk in enumerate(chunks):
            msgs = [
                (topic, payload, 10**18 + (10 * i + j) * NS)
                for j, (topic, payload) in enumerate(chunk)
            ]
            found, rejected = t.decode(msgs)
            assert rejected == []
            status = t.take_status()
            _position, description = status.devices[("sparkplug", "plant/press-1")]
            # The BIRTH's chunk carries the description; later ones only the position.
            assert (description is not None) == (i == 0)
            async with store.batch() as tx:
                await tx.add_readings(found)
                await tx.set_status(status)
    # Another instance's state is its own.
    other: Store = new_store()
    other.owner = "ingestd-b"
    async with other:
        assert other.devices == {}
    again: Store = new_store()
    again.owner = "ingestd-a"
    async with again:
        [(device, _pos, _desc)] = again.devices["sparkplug"]
        assert device == "plant/press-1"
        fresh = table()
        fresh.state.restore(fresh.table.stateful, again.devices)
    node = node_state(fresh.state, "plant", "press-1")
    assert node is not None
    assert (node.seq, node.count, node.bd_seq, node.scope.born) == (4, 5, 3, True)
    # It goes on: the next DATA by alias, no BIRTH needed.
    found, rejected = fresh.decode([(NODE.format(kind="NDATA"), data(5, 5.0), 10**18)])
    assert rejected == []
    assert [(r.metric, r.value) for r in found] == [("Temperature", 5.0)]


async def test_a_batch_written_again_adds_its_sequence_gaps_once(
    new_store: Callable[[], Store],
) -> None:
    """A batch whose first commit's outcome was unknown (the connection died
    during COMMIT) is written again: its gaps are not added twice (found by
    review: 2 gaps and 14 missing stored for 1 and 7)."""
    async with new_store() as store:
        for status in (
            SensorStatus({"s1": (2, 0, 0)}),
            SensorStatus({"s1": (10, 1, 7)}),
            SensorStatus({"s1": (10, 1, 7)}),  # the same batch again
            SensorStatus({"s1": (14, 1, 3)}),
        ):
            async with store.batch() as tx:
                await tx.set_status(status)
    async with new_store() as store:
        assert store.sequences == {"s1": (14, 2, 10)}
