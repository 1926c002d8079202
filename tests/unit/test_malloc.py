"""The daemon fixes glibc's mmap threshold (ingestd.malloc): on glibc the call
takes; anywhere else it is a no-op that says so."""

from __future__ import annotations

import platform

from ingestd.malloc import give_back_large_blocks


def test_the_threshold_is_set_on_glibc_and_skipped_elsewhere() -> None:
    glibc = platform.libc_ver()[0] == "glibc"
    assert give_back_large_blocks() is glibc
    assert give_back_large_blocks() is glibc  # again: harmless
