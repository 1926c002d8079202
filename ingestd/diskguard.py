"""The disk-space guard: writes pause before the disk is full, not at it.

SQLite at ENOSPC rolls the whole transaction back, and the WAL, a checkpoint
or retention need room of their own; the rest of the machine (its logs) does
too. So the store (SQLite) and the local spool (PostgreSQL's) ask the guard
before each batch: while free space on their file's filesystem is below
`store.min_free_bytes`, the batch is refused with StoreUnavailable("disk space
low") and the writer holds it, acknowledging nothing, as for any store outage,
until space returns. `os.statvfs` is asked at most once a second.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# Unset store.min_free_bytes: this share of the filesystem, at most AUTO_MAX:
# room for many batches and a checkpoint, yet a small card is not held back
# by a fixed amount larger than a good part of it.
AUTO_SHARE = 0.05
AUTO_MAX = 100 * 1024 * 1024
CHECK_INTERVAL = 1.0  # seconds between looks at the filesystem (far from the minimum)
# What one reading may take on disk as a batch writes it: the row, its index,
# its rollups' share and the write-ahead log's copies of the pages.
BYTES_PER_READING = 400


class DiskGuard:
    """Free space on the filesystem of `path` (a file, which may not exist yet)."""

    def __init__(
        self, path: Path, min_free_bytes: int | None, interval: float = CHECK_INTERVAL
    ) -> None:
        self.path = Path(path)
        self.min_free_bytes = min_free_bytes  # None: automatic; 0: no guard
        self.interval = interval
        self.free = -1  # bytes free at the last look (-1: not looked yet)
        self.need = 0  # bytes that must stay free, as last worked out
        self._at = -interval
        self._problem: str | None = None

    def problem(self, expect: int = 0) -> str | None:
        """Why writes must wait (free space below the minimum, once `expect`
        bytes more are written), or None. Near the minimum, every call looks."""
        if self.min_free_bytes == 0:
            return None
        now = time.monotonic()
        near = self.free < 4 * (self.need + expect)
        if now - self._at < self.interval and not near:
            return self._problem
        self._at = now
        try:
            st = os.statvfs(self._existing_dir())
        except OSError:
            self._problem = None  # the write itself says what is wrong
            return None
        self.free = st.f_bavail * st.f_frsize
        total = st.f_blocks * st.f_frsize
        self.need = (
            self.min_free_bytes
            if self.min_free_bytes is not None
            else min(AUTO_MAX, int(total * AUTO_SHARE))
        )
        self._problem = (
            f"{_mb(self.free)} free on the filesystem of {self.path}, below "
            f"store.min_free_bytes ({_mb(self.need)}); writes resume when "
            "space is freed there"
            if self.free < self.need
            else None
        )
        if self._problem is None and self.free < self.need + expect:
            return (
                f"{_mb(self.free)} free on the filesystem of {self.path}: the next "
                f"batch (about {_mb(expect)}) would take it below store.min_free_bytes "
                f"({_mb(self.need)}); writes resume when space is freed there"
            )
        return self._problem

    def _existing_dir(self) -> Path:
        d = self.path.parent
        while not d.exists() and d != d.parent:
            d = d.parent
        return d


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB ({n} bytes)"
