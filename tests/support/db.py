"""The daemon's database seen from a test: DbReader (read-only looks into its SQLite
file), another writer holding the lock, and StoreUnderTest, the engine a
parametrized test runs against with its reader."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.postgres import PgReader


class DbReader:
    """Read-only looks into the daemon's SQLite file (a separate connection)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        try:
            yield conn
        finally:
            conn.close()

    def count(self, table: str = "readings") -> int:
        if not self.path.exists():
            return 0
        try:
            with self.connect() as c:
                return int(c.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        except sqlite3.OperationalError:
            return 0

    def rows(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        with self.connect() as c:
            return list(c.execute(sql, args).fetchall())


def hold_exclusive_lock(path: Path, seconds: float) -> threading.Thread:
    """Another writer holding an exclusive lock on the database for `seconds`."""
    locked = threading.Event()

    def run() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        locked.set()
        time.sleep(seconds)
        conn.execute("ROLLBACK")
        conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    locked.wait(5)
    return t


@dataclass
class StoreUnderTest:
    """The engine a parametrized test runs against: what the daemon is told
    (`env`), and a reader of what it stored."""

    name: str
    env: dict[str, str]
    reader: DbReader | PgReader

    def hold_lock(self, seconds: float) -> threading.Thread:
        """Nothing commits for `seconds`: another writer holds the lock."""
        if isinstance(self.reader, PgReader):
            return self.reader.hold_lock(seconds)
        return hold_exclusive_lock(self.reader.path, seconds)
