"""The order a batch's rows go to the store in: SQLite's grouped by series
(a stable sort by series id, `rows.statements`), PostgreSQL's in key order
(`key_order`, three stable sorts on one int each). Both keep readings of one
key in the order they came, which decides which of them is stored."""

from __future__ import annotations

import re
from itertools import chain
from operator import itemgetter

from hypothesis import given
from hypothesis import strategies as st

from ingestd.store.postgres.batch import key_order
from ingestd.store.sqlite import rows as sqlite_rows

# Few distinct series, times and seqs, so that ties of every kind are common;
# the value tells readings of one key apart.
RECORDS = st.lists(
    st.tuples(
        st.integers(0, 5),
        st.integers(-3, 3).map(lambda t: 1_700_000_000_000_000_000 + t),
        st.integers(0, 2),
        st.floats(allow_nan=False),
    ),
    max_size=3000,
)


@given(RECORDS)
def test_key_order_is_a_stable_sort_by_key(records: list[tuple[int, int, int, float]]) -> None:
    assert key_order(records) == sorted(records, key=itemgetter(0, 1, 2))


@given(RECORDS)
def test_statements_take_the_rows_grouped_by_series_in_arrival_order(
    records: list[tuple[int, int, int, float]],
) -> None:
    work = sqlite_rows.statements(records)
    sent: list[float] = []
    for sql, groups in work:
        rows = len(re.findall(r"\(\?, \?, \?, \?\)", sql))
        assert rows in (sqlite_rows.ROWS_PER_INSERT, 128, 16, 1)
        for params in groups:
            assert len(params) == 4 * rows
            sent += params
    # Every row once, each series' rows together and in the order they came.
    expected = sorted(records, key=itemgetter(0))
    assert sent == list(chain.from_iterable(expected))
    # As few statements as the sizes allow: each size's whole statements, largest first.
    sizes = [len(re.findall(r"\(\?", sql)) for sql, _ in work]
    assert sizes == sorted(sizes, reverse=True)
    left = len(records)
    for sql, groups in work:
        size = len(re.findall(r"\(\?", sql))
        assert len(groups) == left // size
        left -= len(groups) * size
    assert left == 0
