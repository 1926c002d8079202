"""Online copies of the SQLite database (`ingestd backup`), with SQLite's
backup API: safe while the daemon writes."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

from ingestd.errors import StoreError
from ingestd.store.sqlite.conditions import ro_uri


def backup_file(
    source: Path,
    dest: Path,
    progress: Callable[[int, int], None] | None = None,
    pages_per_step: int = 4096,
) -> None:
    """An online copy of the database with SQLite's backup API.

    Safe while the daemon writes: the backup restarts a step when the source
    changes under it, and the copy is a consistent snapshot. `progress` gets
    (pages remaining, total pages) after each step. Only a complete copy takes
    the name `dest`; an existing `dest` is never overwritten.
    """
    if not source.exists():
        raise StoreError(f"{source}: no database to back up")
    if dest.exists():
        raise StoreError(f"{dest}: already exists; not overwriting it")
    src = sqlite3.connect(ro_uri(source), uri=True, timeout=30)
    partial = dest.with_name(dest.name + ".partial")
    try:
        out = sqlite3.connect(partial)
        try:
            src.backup(
                out,
                pages=pages_per_step,
                progress=(lambda _s, rem, total: progress(rem, total)) if progress else None,
            )
        finally:
            out.close()
        partial.rename(dest)
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise StoreError(f"backup of {source} to {dest} failed: {exc}") from None
    finally:
        src.close()


async def backup(
    source: Path,
    dest: Path,
    progress: Callable[[int, int], None] | None = None,
    pages_per_step: int = 4096,
) -> None:
    """`backup_file` in an executor."""
    await asyncio.get_running_loop().run_in_executor(
        None, backup_file, source, dest, progress, pages_per_step
    )
