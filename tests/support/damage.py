"""Damage done to a SQLite file (not in use: checkpointed first) the way disks
and careless copies do it: a header overwritten, a page of a table turned to
garbage."""

from __future__ import annotations

import sqlite3
from pathlib import Path

JUNK = b"\xff" * 64


def settle(path: Path) -> None:
    """Everything in the file itself: the WAL checkpointed and emptied."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def overwrite_header(path: Path) -> bytes:
    """The first 16 bytes (SQLite's magic string) overwritten; the file's
    bytes as they were, to compare with what is set aside."""
    settle(path)
    before = path.read_bytes()
    with path.open("r+b") as fh:
        fh.write(b"not a database!!")
    return before


def page_of(path: Path, table: str, kind: str) -> int:
    """A page of `table`: "root", or "leaf" (one from the middle of its leaves)."""
    conn = sqlite3.connect(path)
    try:
        if kind == "root":
            (page,) = conn.execute(
                "SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)
            ).fetchone()
            return int(page)
        leaves = [
            int(p)
            for (p,) in conn.execute(
                "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno",
                (table,),
            )
        ]
    finally:
        conn.close()
    assert len(leaves) > 2, f"{table} has too few pages to pick one from the middle"
    return leaves[len(leaves) // 2]


def corrupt_page(path: Path, table: str, kind: str = "leaf") -> int:
    """Garbage over the start of a page of `table` (its b-tree page header);
    the page's number."""
    settle(path)
    page = page_of(path, table, kind)
    conn = sqlite3.connect(path)
    try:
        (size,) = conn.execute("PRAGMA page_size").fetchone()
    finally:
        conn.close()
    with path.open("r+b") as fh:
        fh.seek((page - 1) * int(size))
        fh.write(JUNK)
    return page
