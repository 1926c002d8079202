"""The local spool asks the disk-space guard too: below store.min_free_bytes
a batch is refused as the disk refusing it, and the writer holds it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingestd.errors import StoreUnavailable
from ingestd.events import NS, Reading, SensorStatus
from ingestd.spool import Spool, SpooledBatch


async def test_a_spool_below_the_minimum_free_refuses_batches(tmp_path: Path) -> None:
    batch = SpooledBatch([Reading("s", "t", NS, 1.0, "t")], [], SensorStatus())
    spool = Spool(tmp_path / "spool.db", 1 << 20, min_free_bytes=1 << 62)
    await spool.open()
    try:
        with pytest.raises(StoreUnavailable, match=r"below store\.min_free_bytes") as info:
            await spool.put(batch)
        assert info.value.condition == "disk space low"
        spool.disk.min_free_bytes = 0  # space back (or no guard): taken
        assert await spool.put(batch)
    finally:
        await spool.close()
