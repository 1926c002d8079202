"""The daemon's heap: glibc's malloc told to hand large blocks back to the
system, and CPython's cyclic garbage collector told to look less often.

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

The collector: by default a young-generation collection runs every 700
container objects allocated (net), and the oldest generation holds all that
start-up imported, scanned whole at each full collection. The daemon makes
a few container objects a reading (its Reading, its row, the decoded JSON)
and frees nearly all of them by reference counting, so the collections
found almost nothing. Start-up's objects are now frozen (never scanned
again) and the young generation collected every 20,000. Against the
defaults, medians of interleaved rounds in one run, 2 cores: bench.bench
QoS 1 after commit, CPU after start-up 1.03 -> 0.95 s a 100,000-message
run; bench.fleet us a message: 20,000 devices 21.4/21.9 -> 20.5/19.2, SenML
175/177 -> 168.5/169, PostgreSQL 20,000 devices 16.7/18.3 -> 16.0/16.1, 200
devices unchanged; bench.huge CPU 7.90/9.37 -> 7.34/8.53 s, peak RSS
144.3/141.4 -> 143.8/140.5 MB. Garbage cycles still go, some 20,000
allocations later.

The switch interval (`GIL_SWITCH_INTERVAL`): a thread asking for the GIL
gets it when the holder blocks, or after this long. The store's thread
(aiosqlite) needs it a moment per statement, to bind values, while the event
loop decodes for tens of milliseconds at a time (a chunk of 250 SenML packs:
~25 ms), so at the default 5 ms it waited there more than it wrote. At 1 ms,
with the batch's rows in statements of 1,024 (`rows.insert`): bench.fleet,
SenML packs as devices send them, 146,561 -> 167,202 readings/s (medians of
3 interleaved rounds, with the batch's BEGIN sent with its insert); 200 and
20,000 devices 51,709 -> 55,438 and 44,221 -> 48,583.
"""

from __future__ import annotations

import ctypes
import gc
import sys

M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)
LARGE = 1024 * 1024  # 1 MiB: a dict table of ~40,000 entries and up
YOUNG = 20_000  # container allocations between young collections (default 700)
OLDER = 20  # young collections per middle one, middle ones per full (default 10)

# (see the module's docstring)
GIL_SWITCH_INTERVAL = 0.001


def tune_heap() -> None:
    """The daemon's settings, once start-up's imports are done: what exists
    now is frozen out of the collector's scans."""
    give_back_large_blocks()
    gc.freeze()
    gc.set_threshold(YOUNG, OLDER, OLDER)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)


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
