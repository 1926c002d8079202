"""The disk-space guard's arithmetic, on this machine's real filesystem."""

from __future__ import annotations

import os
from pathlib import Path

from ingestd.diskguard import AUTO_MAX, AUTO_SHARE, DiskGuard


def test_unset_is_a_share_of_the_filesystem_at_most_a_cap(tmp_path: Path) -> None:
    guard = DiskGuard(tmp_path / "not" / "yet" / "x.db", None)  # the directory may not exist
    guard.problem()
    st = os.statvfs(tmp_path)
    assert guard.need == min(AUTO_MAX, int(st.f_blocks * st.f_frsize * AUTO_SHARE))
    assert guard.free > 0


def test_below_the_minimum_says_where_and_zero_turns_the_guard_off(tmp_path: Path) -> None:
    low = DiskGuard(tmp_path / "x.db", 1 << 62).problem()
    assert low is not None
    assert f"on the filesystem of {tmp_path / 'x.db'}, below store.min_free_bytes" in low
    assert DiskGuard(tmp_path / "x.db", 0).problem() is None


def test_the_filesystem_is_asked_at_most_once_an_interval(tmp_path: Path) -> None:
    guard = DiskGuard(tmp_path / "x.db", 1, interval=3600)
    assert guard.problem() is None
    guard.min_free_bytes = 1 << 62
    assert guard.problem() is None  # far from the minimum: the last answer, for a while
    guard.interval = 0
    assert guard.problem() is not None
    # Near it, every call looks.
    guard.interval = 3600
    guard.min_free_bytes = 1
    assert guard.problem() is None


def test_a_batch_that_would_take_the_disk_below_the_minimum_waits(tmp_path: Path) -> None:
    guard = DiskGuard(tmp_path / "x.db", 1)
    assert guard.problem() is None
    problem = guard.problem(guard.free)  # as much as is free
    assert problem is not None
    assert "the next batch" in problem
