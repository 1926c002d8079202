"""Spooled batches PostgreSQL already holds (a forwarding commit whose outcome
was lost with the connection, or a kill -9 before the spool let them go) are
removed from the spool and counted as what they were: readings committed,
readings the processor moved to quarantine, and quarantine records."""

from __future__ import annotations

from pathlib import Path

from ingestd.events import NS, Reading, Rejected, SensorStatus
from ingestd.forward import Forwarder, _contents
from ingestd.spool import Spool, SpooledBatch
from ingestd.store.postgres import PostgresStore
from ingestd.window import InFlightWindow
from tests.integration.test_store import writer_on
from tests.support.postgres import PgReader


def _batch(n: int) -> SpooledBatch:
    readings = [Reading(f"s{n}", "t", NS * (n * 100 + i), float(i), "t") for i in range(10)]
    junk = [Rejected("t", b"junk %d" % n, "not JSON", 1000.0 + n)]
    return SpooledBatch(readings, junk, SensorStatus(), moved=3)


async def test_batches_the_store_already_holds_are_counted_as_what_they_were(
    tmp_path: Path, pg_url: str
) -> None:
    store = PostgresStore(pg_url)
    await store.open()
    spool = Spool(tmp_path / "spool.db", 1 << 30)
    await spool.open()
    try:
        _, writer = writer_on(store, InFlightWindow(100))  # type: ignore[arg-type]
        # Steps of 10 readings: the held batches are read one at a time.
        forwarder = Forwarder(
            store, spool, writer, retry_min_delay=0.05, retry_max_delay=0.1, max_readings=10
        )
        for n in range(2):
            assert await spool.put(_batch(n))
        writer.spooled = 2 * (10 + 3)  # as the writer counts what it spooled
        # Committed with the spool's mark, and the outcome lost: still spooled.
        taken = await spool.take(1 << 20)
        readings, rejected, _ = _contents(taken)
        await forwarder._commit(taken, readings, rejected)  # noqa: SLF001
        assert len(spool) == 2
        assert await forwarder._step() == 26  # noqa: SLF001  # the mark read: held
        assert len(spool) == 0
        assert (writer.spooled, writer.forwarded) == (0, 26)
        assert (writer.committed, writer.quarantined_readings) == (20, 6)
        assert (writer.quarantined, writer.quarantined_by_kind) == (2, {"decode": 2})
        db = PgReader(pg_url)
        assert (db.count(), db.count("quarantine")) == (20, 2)
    finally:
        await spool.close()
        await store.close()
