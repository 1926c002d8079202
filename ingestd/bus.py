"""The event bus: typed fan-out to subscribers, each with its own bounded queue.

A subscriber declares a policy:
- `block`: the pipeline's own stages. `publish` waits for room in the queue,
  which is how backpressure travels upstream to the MQTT socket.
- `drop`: observers (logger, metrics). A full queue drops the event and counts
  it; an observer can never slow ingestion down.

Subscriptions match event types exactly (no subclass matching), so a stage
that wants `Decoded` is not handed `Processed`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

Policy = Literal["block", "drop"]


@dataclass(eq=False)
class Subscription:
    name: str
    types: frozenset[type[Any]]
    policy: Policy
    queue: asyncio.Queue[Any]
    dropped: int = 0
    delivered: int = 0

    async def get(self) -> Any:
        return await self.queue.get()

    def get_nowait(self) -> Any:
        return self.queue.get_nowait()

    @property
    def depth(self) -> int:
        return self.queue.qsize()


class EventBus:
    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self._routes: dict[type[Any], tuple[Subscription, ...]] = {}

    def subscribe(
        self, name: str, types: Iterable[type[Any]], *, policy: Policy, maxsize: int
    ) -> Subscription:
        if maxsize < 1:
            raise ValueError("a subscription's queue must be bounded (maxsize >= 1)")
        sub = Subscription(name, frozenset(types), policy, asyncio.Queue(maxsize))
        self._subs.append(sub)
        self._routes.clear()
        return sub

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        return tuple(self._subs)

    def _targets(self, kind: type[Any]) -> tuple[Subscription, ...]:
        try:
            return self._routes[kind]
        except KeyError:
            targets = tuple(s for s in self._subs if kind in s.types)
            self._routes[kind] = targets
            return targets

    async def publish(self, event: Any) -> None:
        """Deliver to every subscriber of this event's type.

        Waits only for `block` subscribers with a full queue.
        """
        for sub in self._targets(type(event)):
            if sub.policy == "drop":
                try:
                    sub.queue.put_nowait(event)
                except asyncio.QueueFull:
                    sub.dropped += 1
                    continue
            else:
                await sub.queue.put(event)
            sub.delivered += 1

    def publish_nowait(self, event: Any) -> None:
        """Deliver to observers only; for events raised outside a coroutine.

        A `block` subscriber of this type is a programming error: it would lose
        the event rather than wait.
        """
        for sub in self._targets(type(event)):
            if sub.policy != "drop":
                raise RuntimeError(
                    f"{type(event).__name__} has a blocking subscriber ({sub.name}); "
                    "use `await publish()`"
                )
            try:
                sub.queue.put_nowait(event)
                sub.delivered += 1
            except asyncio.QueueFull:
                sub.dropped += 1
