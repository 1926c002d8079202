"""On PYTHONPATH for a daemon under test: TEST_SERIES_KEPT sets the stores'
series cache bound (ingestd.store.series.SERIES_KEPT), so that a fleet of a
few hundred series makes it forget, as 262,144 would for a huge one."""

import os

if os.environ.get("TEST_SERIES_KEPT"):
    import ingestd.store.series

    ingestd.store.series.SERIES_KEPT = int(os.environ["TEST_SERIES_KEPT"])
