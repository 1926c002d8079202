"""One primary per shared group: the routes only one reader can follow.

A shared subscription hands each message to one member, so a member sees part
of each device's stream. That is enough for readings that stand alone, not
for a Sparkplug node (its DATA is read by the aliases of its BIRTH, in
sequence) nor for a device's `sequence_field` (a gap is judged on the whole
stream), nor for the Sparkplug host STATE (one application's, with its will).
Those are read by one member at a time, the **primary**:

- The members elect it through the PostgreSQL store they share: the one that
  holds a session advisory lock is the primary. A member that dies (kill -9,
  a lost host: TCP keepalives of 5 s x 3) loses its connection and with it
  the lock; the others try for it every `CHECK_INTERVAL` seconds.
- The role has its own MQTT client id (`mqtt.primary_client_id`) and so its
  own persistent session: plain subscriptions to the ordered routes, the
  STATE will. Whoever holds the role connects under that id and takes the
  session over, with what it holds unacknowledged (redelivered) and what was
  queued while nobody held the role. Its device state is kept in the store
  under that id too. For the new primary a takeover is what a restart is for
  a lone ingestd, and the same code runs it (`Pipeline`).
- Each term has an epoch (`primary_role` table). The primary's batches read
  it FOR SHARE before they commit: a deposed primary (lock lost, still
  running) can commit nothing after the next one took over.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from ingestd.backoff import Backoff
from ingestd.config import Settings
from ingestd.errors import NotPrimary, StopTimeout
from ingestd.pipeline import Pipeline
from ingestd.store import open_store

if TYPE_CHECKING:
    from ingestd.events import BatchCommitted
    from ingestd.observe.device_log import DeviceLog
    from ingestd.observe.health import Health

log = structlog.get_logger("ingestd")

CHECK_INTERVAL = 1.0  # a standby tries for the role, the primary checks it holds it
CHECK_TIMEOUT = 5.0  # a check that takes longer: the role is taken as lost
# A primary that has not renewed its term for this long (frozen: SIGSTOP, a
# VM paused, the event loop blocked) is deposed by a standby.
LEASE = 10.0


def split(s: Settings) -> tuple[Settings, Settings | None]:
    """(what every member reads, what the primary reads or None).

    Outside a shared group, or with nothing that needs one reader, a member
    reads everything (a lone ingestd)."""
    group = s.mqtt.shared_group
    ordered = [r for r in s.routes if r.one_reader()] if group else []
    if not group or not (ordered or s.mqtt.sparkplug_host_id):
        return s, None
    shared = [r for r in s.routes if not r.one_reader()]
    member = s.model_copy(
        update={
            "routes": shared,
            "mqtt": s.mqtt.model_copy(update={"sparkplug_host_id": ""}),
        }
    )
    primary = s.model_copy(
        update={
            "routes": ordered,
            "mqtt": s.mqtt.model_copy(
                update={
                    "shared_group": "",
                    "client_id": primary_client_id(s),
                    # The member watches the broker's drops for the process.
                    "watch_broker_drops": False,
                }
            ),
        }
    )
    return member, primary


def primary_client_id(s: Settings) -> str:
    return s.mqtt.primary_client_id or f"ingestd-primary-{s.mqtt.shared_group}"


def _lock_key(group: str) -> str:
    return f"ingestd primary {group}"


_TRY_LOCK = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))"
_NOW = "extract(epoch from clock_timestamp())"
_NEW_TERM = f"""
INSERT INTO primary_role (grp, epoch, client_id, holder, since, renewed)
VALUES ($1, 1, $2, $3, $4, {_NOW})
ON CONFLICT (grp) DO UPDATE SET epoch = primary_role.epoch + 1, client_id = excluded.client_id,
    holder = excluded.holder, since = excluded.since, renewed = excluded.renewed
RETURNING epoch
"""
_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended($1, 0))"
# The holder renews its term every CHECK_INTERVAL; the epoch it finds says
# whether the term is still its own.
_RENEW = f"""
UPDATE primary_role SET renewed = {_NOW} WHERE grp = $1 AND epoch = $2 RETURNING epoch
"""
_EPOCH = "SELECT epoch FROM primary_role WHERE grp = $1"
# A holder that has not renewed its term for $2 seconds (a frozen process:
# its connections alive, nothing answering) loses its lock: the standby that
# sees it terminates the lock's backend (the one holding that advisory lock).
_DEPOSE = f"""
SELECT pg_terminate_backend(l.pid), r.holder, {_NOW} - r.renewed
FROM pg_locks l, primary_role r
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended($3, 0)
  AND r.grp = $1 AND r.renewed < {_NOW} - $2
"""


class RoleLost(Exception):
    """The lock or the term is gone: another member may hold the role now."""


class Primacy:
    """Tries for the primary role and, while it holds it, runs its pipeline."""

    def __init__(
        self,
        settings: Settings,
        health: Health,
        stop: asyncio.Event,
        *,
        on_commit: Callable[[BatchCommitted], None] | None = None,
        stop_timeout: Callable[[], float],
        device_log: DeviceLog | None = None,
    ) -> None:
        self.settings = settings  # the primary's (split()[1])
        self.role = settings.mqtt.client_id  # the role's client id names its lock and term
        self.health = health
        self.stop = stop
        self.on_commit = on_commit
        self.stop_timeout = stop_timeout
        self.device_log = device_log
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.pipeline: Pipeline | None = None
        self.epoch = 0
        self._conn: Any = None
        self._using = asyncio.Lock()  # one query at a time on the lock connection
        self._unreachable = False  # said once per outage
        self._cannot_depose = False  # said once

    def reconfigure(self, settings: Settings) -> None:
        """A reload: the primary's routes and settings (`split(new)[1]`)."""
        self.settings = settings
        if self.pipeline is not None:
            self.pipeline.reconfigure(settings)

    async def run(self) -> None:
        # This task's lines, and those of the pipeline it starts, say whose they are.
        structlog.contextvars.bind_contextvars(role="primary")
        backoff = Backoff(CHECK_INTERVAL, 5.0)  # the role is not left empty for long
        while not self.stop.is_set():
            try:
                await self._candidate()
                continue
            except RoleLost:
                backoff.reset()  # said when it was lost; try again after a pause
            except Exception as exc:  # OSError, StoreUnavailable, asyncpg's: the server
                # Once per outage (the store's own lines say more); then quiet.
                (log.debug if self._unreachable else log.warning)(
                    "cannot try for the primary role; retrying",
                    client_id=self.role,
                    error=str(exc) or repr(exc),
                )
                self._unreachable = True
            await self._drop_connection()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff.next()):
                    await self.stop.wait()
        await self._drop_connection()

    async def _candidate(self) -> None:
        """Try for the lock every CHECK_INTERVAL; hold a term while it is ours."""
        if self._conn is None or self._conn.is_closed():
            self._conn = await self._connect()
            if self._unreachable:
                log.info("trying for the primary role again", client_id=self.role)
                self._unreachable = False
        while not self.stop.is_set():
            if await self._query(_TRY_LOCK, _lock_key(self.role)):
                try:
                    await self._term()
                finally:
                    await self._release()
                continue
            await self._depose_if_frozen()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CHECK_INTERVAL):
                    await self.stop.wait()

    async def _depose_if_frozen(self) -> None:
        """Another member holds the lock: if it has stopped renewing its term
        (LEASE), terminate its lock's connection so the role passes on. Its
        fence then refuses its commits, and its MQTT connection is taken over
        by the next primary's."""
        try:
            async with self._using, asyncio.timeout(CHECK_TIMEOUT):
                rows = await self._conn.fetch(_DEPOSE, self.role, LEASE, _lock_key(self.role))
        except Exception as exc:
            if getattr(exc, "sqlstate", "") != "42501":
                raise  # the connection or the server: tried again from the start
            if not self._cannot_depose:
                log.warning(
                    "cannot depose a frozen primary: its database role may not "
                    "terminate the lock holder's connection (grant pg_signal_backend, "
                    "or run every member as the same role)",
                    client_id=self.role,
                    error=str(exc),
                )
                self._cannot_depose = True
            return
        for terminated, holder, silent in rows:
            log.warning(
                "the primary stopped renewing its term; its lock's connection "
                "terminated so another member takes the role",
                client_id=self.role,
                holder=holder,
                silent_seconds=round(float(silent), 1),
                terminated=terminated,
            )

    async def _connect(self) -> Any:
        # The PostgreSQL extra. Of store.url's hosts, the one that takes writes
        # (a promoted standby after a failover): the role's term is written there.
        from ingestd.store.postgres.connect import connect_writable  # noqa: PLC0415

        s = self.settings.store
        return await connect_writable(
            s.url,
            password=s.password(),
            server_settings={
                "application_name": "ingestd primary lock",
                # The server notices a member that vanished with its host
                # (no FIN): the lock is released within about 15 s.
                "tcp_keepalives_idle": "5",
                "tcp_keepalives_interval": "2",
                "tcp_keepalives_count": "5",
                "statement_timeout": "10000",
            },
        )

    async def _query(self, sql: str, *args: object) -> Any:
        async with self._using:
            async with asyncio.timeout(CHECK_TIMEOUT):
                return await self._conn.fetchval(sql, *args)

    async def _term(self) -> None:
        """Hold the role: a new epoch, the store and pipeline of the role, until
        a stop (drained) or the role is lost (abandoned: the broker redelivers)."""
        ps = self.settings
        self.epoch = await self._query(
            _NEW_TERM, self.role, ps.mqtt.client_id, self.holder, time.time()
        )
        store = open_store(ps.store, ps.rollup_plan())
        store.owner = ps.mqtt.client_id
        store.fence = (self.role, self.epoch)  # type: ignore[attr-defined]
        log.info(
            "primary role taken",
            client_id=ps.mqtt.client_id,
            term=self.epoch,
            routes=[r.topic for r in ps.routes],
        )
        started = time.monotonic()
        pipeline: Pipeline | None = None
        term_stop = asyncio.Event()
        lost: RoleLost | None = None
        # Renewed from the start: opening the store (series and device state
        # read back) may take a while, and a standby deposes a silent holder.
        watch = asyncio.create_task(self._watch(), name="primary watch")
        stopping = asyncio.create_task(self.stop.wait())
        run: asyncio.Task[None] | None = None
        try:
            opening = asyncio.ensure_future(store.open())
            await asyncio.wait({opening, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not opening.done():
                opening.cancel()
                await asyncio.gather(opening, return_exceptions=True)
                lost = _ended(watch)
            else:
                opening.result()  # StoreUnavailable: the term ends, tried again
                pipeline = Pipeline.build(
                    ps,
                    store,
                    role="primary",
                    on_commit=self.on_commit,
                    maintain=False,
                    device_log=self.device_log,
                )
                pipeline.source.before_connect = self._check
                self.pipeline = pipeline
                self.health.primary = pipeline
                run = asyncio.create_task(
                    pipeline.run(term_stop, lambda: None, self.stop_timeout), name="primary"
                )
                await asyncio.wait({run, watch, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if stopping.done() and not run.done():
                    term_stop.set()  # drain: commit and acknowledge what was read
                    await asyncio.wait({run, watch}, return_when=asyncio.FIRST_COMPLETED)
                if watch.done() and not run.done():
                    lost = _ended(watch)
                    run.cancel()
                await asyncio.gather(run, return_exceptions=True)
                if not run.cancelled() and run.exception() is not None:
                    lost = lost or _why(run.exception())
        finally:
            tasks = [t for t in (run, watch, stopping) if t is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.pipeline = None
            self.health.primary = None
            if pipeline is not None:
                self.health.retire(pipeline)
            await store.close()
        if lost is not None:
            log.warning(
                "primary role lost; the broker redelivers what this member had not "
                "committed to the next primary",
                client_id=ps.mqtt.client_id,
                term=self.epoch,
                reason=str(lost),
                held_seconds=round(time.monotonic() - started, 1),
            )
            raise lost
        log.info("primary role released", client_id=ps.mqtt.client_id, term=self.epoch)

    async def _watch(self) -> None:
        """Raise RoleLost once the lock connection or the term is gone."""
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            await self._check()

    async def _check(self) -> None:
        """The role is still ours (the source asks before each connection)."""
        try:
            epoch = await self._query(_RENEW, self.role, self.epoch)
        except Exception as exc:
            raise RoleLost(f"the lock's connection failed: {exc!r}") from exc
        if epoch != self.epoch:
            now = await self._query(_EPOCH, self.role)
            raise RoleLost(f"another member holds the role now (term {now})")

    async def _release(self) -> None:
        if self._conn is None or self._conn.is_closed():
            return
        try:
            await self._query(_UNLOCK, _lock_key(self.role))
        except Exception:
            await self._drop_connection()

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()


def _ended(watch: asyncio.Task[None]) -> RoleLost:
    """Why the watch over the role ended (it only ends when the role is lost)."""
    err = watch.exception()
    return err if isinstance(err, RoleLost) else RoleLost(f"its check: {err!r}")


def _why(exc: BaseException | None) -> RoleLost | None:
    """The pipeline ended with an error: the role is lost if a commit was fenced
    out; anything else ends the term the same way (another member may do better)."""
    if exc is None:
        return None
    found: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for inner in e.exceptions:
                walk(inner)
        else:
            found.append(e)

    walk(exc)
    for e in found:
        if isinstance(e, NotPrimary):
            return RoleLost(str(e))
        if isinstance(e, RoleLost):
            return e
    if any(isinstance(e, StopTimeout) for e in found):
        return None  # a drain cut short at a stop: what is in flight is redelivered
    log.error("the primary's pipeline failed", error=repr(found[0]), exc_info=found[0])
    return RoleLost(f"its pipeline failed: {found[0]!r}")
