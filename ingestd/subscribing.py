"""What the broker's session is subscribed to, and keeping it so.

The subscription plan comes from the routes (`subscriptions`). At each
connection every filter goes in one SUBSCRIBE; filters the persistent session
still holds and no route wants any more (a route removed or moved while
ingestd was down: the broker keeps a session's subscriptions) are
unsubscribed, and the new list is kept in the store with the next chunk. A
reload changes the live subscriptions (new ones first). The broker's drop
count is watched beside them (`ingestd.observe.upstream`).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import aiomqtt
import structlog

from ingestd.chunks import Chunker
from ingestd.config import Settings
from ingestd.mqtt.link import MqttLink
from ingestd.mqtt.topics import filter_covers, subscription_plan
from ingestd.observe.upstream import WATCHED, UpstreamWatch
from ingestd.routes import RouteTable

log = structlog.get_logger("ingestd.source")


def subscriptions(settings: Settings, table: RouteTable) -> list[tuple[str, int]]:
    """(filter, QoS) pairs for the routes, without overlap (routing to the most
    specific route happens on our side): `ingestd.mqtt.topics.subscription_plan`.

    In a shared group, the topics in which devices describe themselves (a
    format's `state_topics`, Homie's `$` topics) are subscribed outside the
    group as well, those the route's own filter covers: every member needs
    every description, and reading one again changes nothing.
    """
    wanted = [(r.subscription, settings.routes[r.index].qos) for r in table.routes]
    group = settings.mqtt.shared_group
    if not group:
        return subscription_plan(wanted)
    own = [
        (topic, settings.routes[r.index].qos)
        for r in table.routes
        if r.fmt.state_topics is not None
        for topic in r.fmt.state_topics(r.subscription)
        if filter_covers(r.subscription, topic)
    ]
    return subscription_plan(wanted, group, own)


class Subscriber:
    def __init__(
        self,
        settings: Settings,
        table: RouteTable,
        chunks: Chunker,
        upstream: UpstreamWatch | None = None,
    ) -> None:
        self.settings = settings
        self.chunks = chunks  # the route table in use, and where the held list goes
        self.upstream = upstream
        self.plan = subscriptions(settings, table)
        # The filters the broker's persistent session may hold for this client
        # id (kept in the store): those no route wants are unsubscribed at the
        # next connection, or a restart with a route removed or moved would
        # go on receiving (and quarantining) its messages.
        self.session_filters: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Future[None] | None = None

    def replan(self, settings: Settings, table: RouteTable, link: MqttLink | None) -> None:
        """A reload's routes: the new plan, and on a live connection (`link`)
        the subscriptions changed to match. New filters are subscribed before
        old ones are unsubscribed, so a route that moves to a wider filter
        misses nothing (for the moment both are subscribed, a message may
        arrive twice: one with a device timestamp is stored once, one without
        gets a second receive time). Without a connection, the next one
        subscribes to the new list (and unsubscribes what is stale)."""
        new = subscriptions(settings, table)
        self.settings = settings
        old = dict(self.plan)
        wanted = dict(new)
        added = [(t, q) for t, q in new if old.get(t) != q]
        removed = [t for t in old if t not in wanted]
        self.plan = new
        log.info(
            "routes reloaded",
            routes=len(table.routes),
            subscribe=[t for t, _ in added],
            unsubscribe=removed,
        )
        if link is not None and (added or removed):
            self._in_background(self._change(link, added, removed))

    def _in_background(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _change(
        self, link: MqttLink, added: list[tuple[str, int]], removed: list[str]
    ) -> None:
        try:
            for topic, qos in added:
                # The SUBACK may queue behind a backlog the pipeline drains.
                await link.subscribe(topic, qos, timeout=math.inf)
            for topic in removed:
                await link.unsubscribe(topic, timeout=math.inf)
        except aiomqtt.MqttError as exc:
            # The connection went; the next one subscribes to the new list.
            log.warning("subscription change interrupted by a disconnect", error=str(exc))
            return
        log.info("subscriptions updated", topics=[t for t, _ in self.plan])
        if self.settings.mqtt.persistent_session:
            self._session_holds({t for t, _ in self.plan})

    async def subscribe(
        self, link: MqttLink, link_lost: asyncio.Future[None], pump: asyncio.Future[None]
    ) -> bool:
        """Subscribe to every filter; False if the pump ended first (a stop).

        All filters in one SUBSCRIBE: Mosquitto answers a SUBSCRIBE that
        arrives while a persistent session's backlog flows only after the
        backlog, so a second one would hold readiness back until the backlog
        is drained (measured: READY at 99.5% of 100,000 queued messages)."""
        filters = list(self.plan)
        if not filters:  # every route is the primary's (a shared group's member)
            log.info("subscribed", topics=[])
            self._watch_drops(link)
            self._forget_stale(link)
            return True
        request = asyncio.ensure_future(link.subscribe(filters, timeout=math.inf))
        waiting: set[asyncio.Future[Any]] = {request, link_lost, pump}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not request.done():
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
            if link_lost.done():
                link_lost.result()
                raise aiomqtt.MqttError("disconnected while subscribing")
            return False
        granted: list[Any] = list(request.result())
        for (topic, qos), code in zip(filters, granted, strict=False):
            value = code.value if hasattr(code, "value") else int(code)
            if value >= 0x80:
                log.error(
                    "subscription refused by the broker: these routes get nothing; "
                    "check the broker's ACLs for this user",
                    topic=topic,
                    qos=qos,
                    reason=str(code),
                    routes=self.routes_under(topic),
                    username=self.settings.mqtt.username,
                )
        log.info("subscribed", topics=[t for t, _ in self.plan])
        self._watch_drops(link)
        self._forget_stale(link)
        return True

    def _forget_stale(self, link: MqttLink) -> None:
        """Unsubscribe what the session still holds and no route wants, in the
        background (Mosquitto answers after a backlog, as for SUBSCRIBE), and
        keep the new list with the next chunk."""
        current = {t for t, _ in self.plan}
        if not self.settings.mqtt.persistent_session or current == self.session_filters:
            return
        stale = sorted(self.session_filters - current)
        self._in_background(self._unsubscribe_stale(link, stale, current))

    async def _unsubscribe_stale(self, link: MqttLink, stale: list[str], current: set[str]) -> None:
        try:
            for topic in stale:
                await link.unsubscribe(topic, timeout=math.inf)
        except aiomqtt.MqttError as exc:
            log.warning("unsubscribing old filters interrupted by a disconnect", error=str(exc))
            return
        if stale:
            log.info(
                "unsubscribed filters the session held and no route uses any more",
                topics=stale,
            )
        self._session_holds(current)

    def _session_holds(self, current: set[str]) -> None:
        self.session_filters = set(current)
        self.chunks.filters_to_store = json.dumps(sorted(current)).encode()

    def _watch_drops(self, link: MqttLink) -> None:
        if self.settings.mqtt.watch_broker_drops and self.upstream is not None:
            # In the background: Mosquitto answers a SUBSCRIBE made while a
            # session's backlog flows only after the backlog (measured: 3 s for
            # 100,000 messages), and readiness must not wait for a watch. Never
            # in a shared group: every instance wants the broker's counter.
            self._watch = asyncio.ensure_future(self._watch_broker(link))

    async def _watch_broker(self, link: MqttLink) -> None:
        try:
            await link.subscribe([(t, 0) for t in WATCHED], timeout=math.inf)
        except aiomqtt.MqttError as exc:
            log.debug("no watch on the broker's drop count", error=str(exc))

    def routes_under(self, subscription: str) -> list[str]:
        """The route topics a subscription filter serves."""
        group = self.settings.mqtt.shared_group
        bare = subscription.removeprefix(f"$share/{group}/") if group else subscription
        return [
            self.settings.routes[r.index].topic
            for r in self.chunks.table.routes
            if filter_covers(bare, r.subscription) or filter_covers(r.subscription, bare)
        ]

    async def connection_ended(self) -> None:
        """The drop-count watch belongs to the connection that made it."""
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None

    def cancel(self) -> None:
        for task in list(self._background):
            task.cancel()
