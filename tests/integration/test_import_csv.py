"""`ingestd query --format csv` read back by `ingestd import`: the same rows,
seq included, whatever the text holds; a file as other tools write it (a BOM,
blank lines); values the live decoders refuse refused here too."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from ingestd.events import Reading
from ingestd.store.sqlite import SqliteStore
from tests.support.db import DbReader

NS = 1_000_000_000
T = 1_700_000_000
ROWS = (
    "SELECT sensor, metric, ts_ns, seq, value, tags, unit FROM readings ORDER BY 1, 2, 3, 4, 6, 7"
)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingestd", *args], capture_output=True, text=True, check=False
    )


def test_an_export_imports_back_identical(tmp_path: Path) -> None:
    source, copy = tmp_path / "a.db", tmp_path / "b.db"

    async def fill() -> None:
        async with SqliteStore(source) as store, store.batch() as tx:
            await tx.add_readings(
                [
                    Reading("k\r\nx", "m\r", T * NS, 1.5, unit="u\r"),
                    # seq 0 and 2: the reading between was refused by a limit.
                    Reading("lp", "t", T * NS, 20.0, seq=0),
                    Reading("lp", "t", T * NS, 21.0, seq=2),
                    Reading("tagged", "t", T * NS + 1, -3.25, tags='{"site":"a,\\"b\\""}'),
                ]
            )

    asyncio.run(fill())
    out = subprocess.run(  # bytes: a carriage return in the text stays one
        [sys.executable, "-m", "ingestd", "query", "--db", str(source), "--sensor", "*",
         "--since", "0", "-f", "csv"],
        capture_output=True,
        check=True,
    )  # fmt: skip
    exported = tmp_path / "x.csv"
    # As a spreadsheet saves it: a byte-order mark, blank lines at the end.
    exported.write_bytes("\ufeff".encode() + out.stdout + b"\n\n")
    done = cli("import", "--db", str(copy), str(exported))
    assert done.returncode == 0, done.stderr
    assert "4 stored, 0 already stored, 0 quarantined" in done.stderr, done.stderr
    assert DbReader(copy).rows(ROWS) == DbReader(source).rows(ROWS)
    again = cli("import", "--db", str(source), str(exported))  # into its own database
    assert "0 stored, 4 already stored" in again.stderr, again.stderr


def test_values_the_live_decoders_refuse_are_quarantined(tmp_path: Path) -> None:
    f = tmp_path / "odd.csv"
    values = ["nan", "inf", "-Infinity", "1_000", "0x10", "\u0663", " 7 ", "2.5e3"]
    f.write_text(
        "sensor,metric,ts_ns,value\n"
        + "".join(f"s,m,{T * NS + i},{v}\n" for i, v in enumerate(values)),
        encoding="utf-8",
    )
    done = cli("import", "--db", str(tmp_path / "o.db"), str(f))
    assert done.returncode == 0, done.stderr
    assert "2 stored, 0 already stored, 6 quarantined" in done.stderr, done.stderr
    db = DbReader(tmp_path / "o.db")
    assert sorted(v for (v,) in db.rows("SELECT value FROM readings")) == [7.0, 2500.0]
    assert db.count("quarantine WHERE reason LIKE '%not a finite decimal number%'") == 6
