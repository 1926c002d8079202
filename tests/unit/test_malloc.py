"""The daemon fixes glibc's mmap threshold (ingestd.malloc): on glibc the call
takes; anywhere else it is a no-op that says so. And it tunes the collector."""

from __future__ import annotations

import platform
import subprocess
import sys

from ingestd.malloc import OLDER, YOUNG, give_back_large_blocks


def test_the_threshold_is_set_on_glibc_and_skipped_elsewhere() -> None:
    glibc = platform.libc_ver()[0] == "glibc"
    assert give_back_large_blocks() is glibc
    assert give_back_large_blocks() is glibc  # again: harmless


def test_the_collector_looks_less_often_and_skips_start_ups_objects() -> None:
    # In a process of its own: the settings are process-wide.
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import gc; from ingestd.malloc import tune_heap; tune_heap(); "
            "print(gc.get_threshold(), gc.get_freeze_count() > 1000)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == f"({YOUNG}, {OLDER}, {OLDER}) True"
