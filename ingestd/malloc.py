"""glibc's malloc, told to hand large blocks back to the system.

By default glibc raises its mmap threshold each time a large mmapped block
is freed (up to 32 MB): a table freed once makes the next of its size come
from the heap, where freeing it seldom gives the memory back. A daemon whose
caches grow and resize multi-megabyte dict tables (the series ids,
`ingestd.store.series`; the route matches) then keeps tables it no longer
has. bench.huge, 500,000 series, peak RSS at first sight / after a restart,
two runs each: 152.7-153.9 / 148.4-148.9 MB with glibc's default,
147.3-148.1 / 147.3-147.4 with the threshold fixed at 128 KiB, 148.1-149.0
/ 147.3-147.7 at 1 MiB, which is kept: fewer blocks are mmapped one by one
on the hot path (fixing the threshold also stops the dynamic adjustment).
The narrow fleet did not move (bench.fleet, 200 devices, at 128 KiB: 49,257
and 49,713 readings/s against 46,658 and 46,628 without; 35.1 against 36.7
us a message).
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)
LARGE = 1024 * 1024  # 1 MiB: a dict table of ~40,000 entries and up


def give_back_large_blocks() -> bool:
    """Fix the threshold (glibc only; elsewhere nothing); whether it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc, or no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE))
