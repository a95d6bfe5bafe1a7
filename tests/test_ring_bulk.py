"""Bulk slot access (read_slots / write_slots / put_responses) does exactly what slot-by-slot access does."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xdom.domains.abi.ring import BackRing, FrontRing, RingOverflow, SharedRing


def _ring(pages: int = 1) -> SharedRing:
    return SharedRing([memoryview(bytearray(4096)) for _ in range(pages)], 12, 4)


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 2**32 - 1), n=st.integers(0, 341), length=st.sampled_from([4, 12]),
       pages=st.sampled_from([1, 2]), seed=st.binary(min_size=1, max_size=8))
def test_read_slots_matches_read_slot(start: int, n: int, length: int, pages: int, seed: bytes) -> None:
    ring = _ring(pages)
    n = min(n, ring.size)
    for p in ring.pages:
        p[:] = (seed * (4096 // len(seed) + 1))[:4096]
        p[0:1] = bytes([len(seed)])        # pages differ a little
    assert ring.read_slots(start, n, length) == [ring.read_slot(start + i, length) for i in range(n)]


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 2**32 - 1), datas=st.lists(st.binary(min_size=0, max_size=12), max_size=300),
       pages=st.sampled_from([1, 2]))
def test_write_slots_matches_write_slot(start: int, datas: list[bytes], pages: int) -> None:
    a, b = _ring(pages), _ring(pages)
    datas = datas[:a.size]
    for r in (a, b):
        for p in r.pages:
            p[:] = b"\xa5" * 4096
    a.write_slots(start, datas)
    for i, d in enumerate(datas):
        b.write_slot(start + i, d)
    assert [bytes(p) for p in a.pages] == [bytes(p) for p in b.pages]


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 2**32 - 1), n=st.integers(0, 341), pages=st.sampled_from([1, 2]),
       seed=st.binary(min_size=12, max_size=12))
def test_whole_slots_written_in_one_run_match_write_slot(start: int, n: int, pages: int, seed: bytes) -> None:
    """Whole slots go in as one joined run (split at the wrap): the same bytes as slot by slot."""
    a, b = _ring(pages), _ring(pages)
    datas = [bytes((x + i) & 0xFF for x in seed) for i in range(min(n, a.size))]
    for r in (a, b):
        for p in r.pages:
            p[:] = b"\xa5" * 4096
    a.write_slots(start, datas)
    for i, d in enumerate(datas):
        b.write_slot(start + i, d)
    assert [bytes(p) for p in a.pages] == [bytes(p) for p in b.pages]


def test_put_responses_checks_the_batch_against_consumed_requests() -> None:
    shared = _ring()
    front, back = FrontRing(shared), BackRing(shared)
    for i in range(3):
        front.put_request(bytes([i]) * 12)
    front.push_requests()
    assert len(back.take_requests()) == 3
    with pytest.raises(RingOverflow):
        back.put_responses([b"\1\0\0\0"] * 4)        # one more than was consumed: nothing written
    assert back.rsp_prod_pvt == 0
    with pytest.raises(ValueError):
        back.put_responses([b"\0" * 5])
    back.put_responses([bytes([i, 0, 0, 0]) for i in range(3)])
    back.push_responses()
    assert front.take_responses() == [bytes([i, 0, 0, 0]) for i in range(3)]
    # the rest of each slot (a request's tail) is untouched
    assert shared.read_slot(0, 12) == b"\0\0\0\0" + b"\0" * 8


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 2**32 - 1), n=st.integers(0, 341), length=st.sampled_from([1, 2, 4]),
       pages=st.sampled_from([1, 2]), seed=st.binary(min_size=1, max_size=16))
def test_equal_short_responses_laid_at_the_stride_match_write_slot(start: int, n: int, length: int, pages: int,
                                                                    seed: bytes) -> None:
    """TX responses (4 bytes in 12-byte slots) go in over a copy of the slots: the rest of each slot,
    and every slot not answered, stay exactly as they were."""
    a, b = _ring(pages), _ring(pages)
    background = (seed * (4096 // len(seed) + 1))[:4096]
    datas = [bytes((x + i) & 0xFF for x in seed[:1] * length) for i in range(min(n, a.size))]
    for r in (a, b):
        for p in r.pages:
            p[:] = background
    a.write_slots(start, datas)
    for i, d in enumerate(datas):
        b.write_slot(start + i, d)
    assert [bytes(p) for p in a.pages] == [bytes(p) for p in b.pages]


@settings(max_examples=100, deadline=None)
@given(start=st.integers(0, 2**32 - 1), n=st.integers(1, 500), seed=st.binary(min_size=8, max_size=8))
def test_a_run_of_whole_responses_matches_put_response(start: int, n: int, seed: bytes) -> None:
    """put_response_run (RX: 8-byte responses filling 8-byte slots) writes what n put_response calls do,
    split at the wrap, and is refused past the requests consumed."""
    def rings() -> tuple[FrontRing, BackRing]:
        shared = SharedRing([memoryview(bytearray(4096))], 8, 8)
        front = FrontRing(shared)
        for r in (front, ):
            r.req_prod_pvt = r.rsp_cons = start & 0xFFFFFFFF
        shared.set(0, start & 0xFFFFFFFF)
        shared.set(8, start & 0xFFFFFFFF)
        back = BackRing(shared)
        return front, back
    (fa, a), (fb, b) = rings(), rings()
    n = min(n, a.size)
    for front in (fa, fb):
        front.put_requests([b"\x11" * 8] * n)
        front.push_requests()
    assert len(a.take_requests()) == n and len(b.take_requests()) == n
    datas = [bytes((x + i) & 0xFF for x in seed) for i in range(n)]
    with pytest.raises(RingOverflow):
        a.put_response_run(b"".join(datas) + seed, n + 1)
    with pytest.raises(ValueError):
        a.put_response_run(b"".join(datas)[:-1], n)
    a.put_response_run(b"".join(datas), n)
    for d in datas:
        b.put_response(d)
    assert bytes(a.shared.pages[0]) == bytes(b.shared.pages[0]) and a.rsp_prod_pvt == b.rsp_prod_pvt
