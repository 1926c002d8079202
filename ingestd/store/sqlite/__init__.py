"""The SQLite backend: one file, WAL mode; the embedded default."""

from __future__ import annotations

from ingestd.store.sqlite.backup import backup
from ingestd.store.sqlite.queries import SqliteReader
from ingestd.store.sqlite.schema import MIGRATIONS, SCHEMA_VERSION
from ingestd.store.sqlite.store import SqliteStore

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SqliteReader", "SqliteStore", "backup"]
