from __future__ import annotations

import asyncio
import random

import pytest

from ingestd.backoff import Backoff
from ingestd.bus import EventBus
from ingestd.window import InFlightWindow


class A:
    pass


class B:
    pass


async def test_block_subscriber_applies_backpressure() -> None:
    bus = EventBus()
    stage = bus.subscribe("stage", [A], policy="block", maxsize=2)
    await bus.publish(A())
    await bus.publish(A())
    third = asyncio.ensure_future(bus.publish(A()))
    await asyncio.sleep(0.01)
    assert not third.done(), "a full block queue makes the publisher wait"
    await stage.get()
    await asyncio.wait_for(third, 1)
    assert stage.depth == 2
    assert stage.dropped == 0


async def test_slow_observer_drops_and_counts_but_never_blocks() -> None:
    bus = EventBus()
    stage = bus.subscribe("stage", [A], policy="block", maxsize=100)
    observer = bus.subscribe("observer", [A, B], policy="drop", maxsize=3)
    for _ in range(50):
        await asyncio.wait_for(bus.publish(A()), 0.1)
    assert stage.depth == 50
    assert observer.depth == 3
    assert observer.dropped == 47
    bus.publish_nowait(B())
    assert observer.dropped == 48


async def test_types_are_routed_exactly() -> None:
    class SubA(A):
        pass

    bus = EventBus()
    only_a = bus.subscribe("a", [A], policy="block", maxsize=10)
    await bus.publish(SubA())
    await bus.publish(B())
    assert only_a.depth == 0
    await bus.publish(A())
    assert only_a.depth == 1


async def test_unbounded_queues_are_refused_and_nowait_refuses_stages() -> None:
    bus = EventBus()
    with pytest.raises(ValueError, match="bounded"):
        bus.subscribe("x", [A], policy="block", maxsize=0)
    bus.subscribe("stage", [A], policy="block", maxsize=1)
    with pytest.raises(RuntimeError, match="blocking subscriber"):
        bus.publish_nowait(A())


async def test_window_pauses_when_full_and_resumes_on_settle() -> None:
    calls: list[str] = []
    w = InFlightWindow(3, broker_limit=2)
    w.on_flow(lambda: calls.append("pause"), lambda: calls.append("resume"))
    w.take(1, 1)
    assert not w.saturated
    w.take(1, 1)
    assert w.saturated, "the broker will send no more until we acknowledge"
    w.take(1, 0)
    assert calls == ["pause"]
    w.take(1, 0)  # messages already read from the socket still count
    assert calls == ["pause"]
    assert w.peak == 4
    w.settle(2, 2)
    assert calls == ["pause", "resume"]
    assert not w.saturated
    idle = asyncio.ensure_future(w.wait_idle())
    await asyncio.sleep(0)
    assert not idle.done()
    w.settle(2, 0)
    await asyncio.wait_for(idle, 1)


def test_backoff_grows_with_jitter_and_caps() -> None:
    b = Backoff(0.5, 8.0, random.Random(1))
    delays = [b.next() for _ in range(10)]
    assert 0.25 <= delays[0] <= 0.5
    assert 0.5 <= delays[1] <= 1.0
    assert all(4.0 <= d <= 8.0 for d in delays[5:])
    b.reset()
    assert b.next() <= 0.5
