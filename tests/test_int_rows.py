"""int_rows: the batch check of hypercall entries, done in C, must judge exactly as int_tuple does entry by entry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xdom.domains.abi.hypercall_wire import HypercallError, int_rows, int_tuple

values = st.one_of(st.integers(-3, 2**32 + 3), st.booleans(), st.floats(allow_nan=False), st.none(), st.text(max_size=2))
entries = st.one_of(st.lists(values, min_size=0, max_size=4), st.tuples(values, values, values), st.integers())


def _per_entry(rows: list[object]) -> list[tuple[int, ...]] | str:
    try:
        return [int_tuple(r, 3, "t") for r in rows]
    except HypercallError as e:
        return e.message


def _batch(rows: list[object]) -> list[tuple[int, ...]] | str:
    try:
        return int_rows(rows, 3, "t")
    except HypercallError as e:
        return e.message


@given(st.lists(entries, max_size=6))
def test_int_rows_judges_as_int_tuple_does(rows: list[object]) -> None:
    assert _batch(rows) == _per_entry(rows)


def test_int_rows_shapes_a_good_batch() -> None:
    assert int_rows([[1, 2, 3], [4, 5, 2**32 - 1]], 3, "t") == [(1, 2, 3), (4, 5, 2**32 - 1)]
    assert int_rows([], 3, "t") == []


@pytest.mark.parametrize("bad", [[True, 2, 3], [1, 2, -1], [1, 2, 2**32], [1, 2], [1, 2, 3, 4], [1.0, 2, 3]])
def test_int_rows_refuses_what_int_tuple_refuses(bad: list[object]) -> None:
    with pytest.raises(HypercallError):
        int_rows([[1, 2, 3], bad], 3, "t")
