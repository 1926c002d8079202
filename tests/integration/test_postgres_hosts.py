"""store.url naming several hosts, and servers that take no writes: the store
writes to the host that takes writes, and waits out a time when none does.
(A standby promoted mid-stream: tests/e2e/test_failover.py.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from ingestd.errors import StoreUnavailable
from ingestd.events import NS, Reading
from ingestd.store.base import READ_ONLY
from ingestd.store.postgres import PostgresStore
from tests.support.ports import free_port
from tests.support.postgres import PgReader, Postgres

NOW = time.time()


def _readings(sensor: str, n: int, start_ns: int) -> list[Reading]:
    return [Reading(sensor, "t", start_ns + i * NS, float(i)) for i in range(n)]


@pytest.fixture
def own_pg() -> Iterator[Postgres]:
    cluster = Postgres().start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


async def test_a_url_of_two_hosts_writes_to_the_one_that_answers(
    pg_cluster: Postgres, pg_url: str
) -> None:
    nobody = free_port()  # nothing listens there: the first host is down
    db = pg_url.rsplit("/", 1)[1]
    url = (
        f"postgresql://postgres@127.0.0.1:{nobody},127.0.0.1:{pg_cluster.port}/{db}"
        "?target_session_attrs=read-write"
    )
    async with PostgresStore(url) as store:
        async with store.batch() as tx:
            await tx.add_readings(_readings("a", 10, int(NOW) * NS))
        assert store.server is not None
        assert store.server[0] == f"127.0.0.1:{pg_cluster.port}"
        await store.close()
    assert PgReader(pg_url).count() == 10


async def test_a_server_that_takes_no_writes_is_waited_out(own_pg: Postgres) -> None:
    """A write refused as a read-only transaction (SQLSTATE 25006), then every
    host answering but none taking writes (asyncpg's target_session_attrs
    check): both are READ_ONLY, which the writer waits out; once the server
    takes writes again the same store commits."""
    url = own_pg.create_db("ingest")
    t0 = int(NOW) * NS
    store = PostgresStore(url)
    try:
        async with store.batch() as tx:
            await tx.add_readings(_readings("a", 10, t0))
        own_pg.sql("ALTER SYSTEM SET default_transaction_read_only = on")
        own_pg.sql("SELECT pg_reload_conf()")
        await asyncio.sleep(0.5)  # the backends take the reload at their next command
        said = []
        for _ in range(2):  # on the open connection, then on a new one
            with pytest.raises(StoreUnavailable) as caught:
                async with store.batch() as tx:
                    await tx.add_readings(_readings("a", 10, t0 + 10 * NS))
            assert caught.value.condition == READ_ONLY, caught.value
            said.append(str(caught.value))
        assert "read-only transaction" in said[0]
        assert "None of the hosts match" in said[1]
        assert "takes no writes" in store.advice(caught.value)
        own_pg.sql("ALTER SYSTEM RESET default_transaction_read_only")
        own_pg.sql("SELECT pg_reload_conf()")
        async with store.batch() as tx:
            await tx.add_readings(_readings("a", 10, t0 + 10 * NS))
        assert tx.inserted == 10
    finally:
        await store.close()
    assert PgReader(url).count() == 20
