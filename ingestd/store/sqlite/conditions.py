"""SQLite's errors as the store's conditions, and its read-only URIs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ingestd.errors import StoreUnavailable
from ingestd.store import base

# Primary result codes that mean "the store cannot write now, try again later".
_TRANSIENT = {
    sqlite3.SQLITE_BUSY: base.LOCKED,
    sqlite3.SQLITE_LOCKED: base.LOCKED,
    sqlite3.SQLITE_FULL: base.DISK_FULL,
    sqlite3.SQLITE_IOERR: base.IO_ERROR,
    sqlite3.SQLITE_READONLY: base.READ_ONLY,
    sqlite3.SQLITE_CANTOPEN: base.CANNOT_OPEN,
    sqlite3.SQLITE_PROTOCOL: base.PROTOCOL,
    sqlite3.SQLITE_NOMEM: base.NO_MEMORY,
}


def ro_uri(path: Path) -> str:
    """A read-only SQLite URI for `path`: percent-encoded, so `#`, `?` and `%` in
    a file name stay part of the name."""
    return Path(path).resolve().as_uri() + "?mode=ro"


def classify(exc: sqlite3.Error) -> StoreUnavailable | None:
    """A StoreUnavailable for transient conditions, None for real errors."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        # Errors raised before reaching SQLite (e.g. opening a missing directory).
        text = str(exc).lower()
        if "unable to open" in text:
            return StoreUnavailable(base.CANNOT_OPEN, str(exc))
        return None
    condition = _TRANSIENT.get(code & 0xFF)
    return StoreUnavailable(condition, str(exc)) if condition else None
