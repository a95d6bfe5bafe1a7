"""blkfront hands large I/O over as runs of consecutive frames, one buffer each.

A 1 MiB read answered in 256 page views costs the NBD server a 257-iovec
``sendmsg`` and a Python pass over every view; a 1 MiB WRITE payload lent as
256 views costs as much to receive.  ``GrantedPages.views`` makes one view of
pages whose frames are consecutive, and the pool keeps large requests' data
pages in whole runs by taking indirect pages from the other end of its free
list.  These tests check the views are the right bytes (through the pages'
own views and the disk image), that runs do form in a workload of one size,
and that nothing else changes: pages not consecutive stay one view each.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import pytest
from test_blk_matrix import Rig, rig  # noqa: F401  (rig: the fixture)

from xdom.domains.blkfront.device import FrontendOptions
from xdom.domains.blkfront.grants import PAGE_SIZE, GrantedPages, Page
from xdom.domains.frame_pool import FramePool
from xdom.domains.xenhost import LocalHypervisor

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def pages_of(pool: GrantedPages, gfns: Sequence[int]) -> list[Page]:
    return [Page(g, 1000 + g, True, pool.frame(g)) for g in gfns]


@pytest.fixture
def granted() -> GrantedPages:
    hv = LocalHypervisor()
    dom = hv.create_domain("guest", "1M")
    yield GrantedPages(dom, FramePool(dom.memory.nr_frames), 0, 64)
    dom.close()
    hv.close()
    dom.memory.close()


def test_views_of_consecutive_frames_are_one_buffer_of_the_same_bytes(granted: GrantedPages) -> None:
    pages = pages_of(granted, range(10, 14))
    for i, p in enumerate(pages):
        p.view[:] = bytes([i + 1]) * PAGE_SIZE
    (one,) = granted.views(pages, 3 * PAGE_SIZE + 512)
    assert one.nbytes == 3 * PAGE_SIZE + 512
    assert bytes(one) == b"".join(bytes(p.view) for p in pages)[:3 * PAGE_SIZE + 512]
    one[PAGE_SIZE:PAGE_SIZE + 5] = b"hello"          # the same memory, not a copy
    assert bytes(pages[1].view[:5]) == b"hello"


@pytest.mark.parametrize("length", [0, 3 * PAGE_SIZE, 4 * PAGE_SIZE + 1])
def test_a_length_that_does_not_end_in_the_last_page_is_refused(granted: GrantedPages, length: int) -> None:
    with pytest.raises(ValueError):
        granted.views(pages_of(granted, range(10, 14)), length)


@pytest.mark.parametrize("gfns", [(10, 12, 13), (13, 12, 11), (10, 11, 11), (20, 21, 22, 40)],
                         ids=["gap", "descending", "repeat", "tail-gap"])
def test_pages_not_in_one_run_stay_a_view_each(granted: GrantedPages, gfns: tuple[int, ...]) -> None:
    pages = pages_of(granted, gfns)
    views = granted.views(pages, (len(gfns) - 1) * PAGE_SIZE + 1024)
    assert len(views) == len(gfns)
    assert [v.nbytes for v in views] == [PAGE_SIZE] * (len(gfns) - 1) + [1024]
    for v, p in zip(views, pages):
        assert v.obj is p.view.obj and bytes(v) == bytes(p.view[:v.nbytes])


def test_indirect_pages_come_from_the_other_end_and_go_back_there(granted: GrantedPages) -> None:
    granted.negotiated(True)
    data = granted.get(9, readonly=False, busy=False, front=1)   # the pool grows to 9 pages
    assert data is not None
    indirect, run = data[:1], data[1:]
    granted.put(indirect, front=True)
    granted.put(run)
    again = granted.get(9, readonly=False, busy=False, front=1)
    assert again is not None
    assert again[:1] == indirect and again[1:] == run
    assert len(granted.views(again[1:], 8 * PAGE_SIZE)) == 1


def test_a_free_list_shuffled_by_small_io_is_sorted_for_the_next_large_request(granted: GrantedPages) -> None:
    granted.negotiated(True)
    everything = granted.get(40, readonly=False, busy=False)      # the pool grows to 40 pages
    assert everything is not None
    granted.put(everything)
    # 4 KiB I/O completing in scattered order: the free list comes back shuffled.
    singles = [granted.get(1, readonly=False, busy=True) for _ in range(40)]
    order = [p for got in singles for p in got or ()]
    assert len(order) == 40
    by_gfn = sorted(order, key=lambda p: p.gfn)
    in_flight = by_gfn[30:34]           # held by another request meanwhile: a hole in the sorted list
    for i in (7, 3, 30, 1, 22, 15, 38, 0, 11, 26, 5, 33, 19, 9, 36, 2, 28, 13, 24, 17,
              39, 6, 31, 10, 20, 4, 35, 14, 27, 8, 37, 12, 23, 18, 32, 16, 29, 21, 34, 25):
        if order[i] not in in_flight:
            granted.put([order[i]])
    data = granted.get(9, readonly=False, busy=False, front=1)
    assert data is not None and granted.sorts == 1
    assert len(granted.views(data[1:], 8 * PAGE_SIZE)) == 1         # one run again, below the hole
    granted.put(in_flight)
    granted.put(data[:1], front=True)
    granted.put(data[1:])
    # Shuffled again at once: no second sort until 4 pages per free page have been handed out.
    free = granted.free
    free[-1], free[-2] = free[-2], free[-1]
    data = granted.get(8, readonly=False, busy=False)
    assert data is not None and granted.sorts == 1 and len(granted.views(data, 8 * PAGE_SIZE)) == 8
    granted.put(data)                                                # back as it was: still no run
    for _ in range(4 * len(granted.free)):
        single = granted.get(1, readonly=False, busy=True)            # small I/O never sorts
        assert single is not None and granted.sorts == 1
        granted.put(single)
    data = granted.get(8, readonly=False, busy=False)
    assert data is not None and granted.sorts == 2 and len(granted.views(data, 8 * PAGE_SIZE)) == 1


def _run_concurrently(submit: list, timeout: float = 60.0) -> list:
    left = threading.Semaphore(0)
    out: list = [None] * len(submit)

    def completer(i: int):
        def done(error: int, views: Sequence[memoryview] = ()) -> None:
            out[i] = (error, len(views), b"".join(bytes(v) for v in views))
            left.release()
        return done
    for i, call in enumerate(submit):
        call(completer(i))
    for _ in submit:
        assert left.acquire(timeout=timeout), "operations never completed"
    return out


def test_large_reads_and_lent_write_payloads_become_one_view_each(rig: Rig) -> None:  # noqa: F811
    path = rig.image(size=16 * MiB)
    front = rig.attach(path, options=FrontendOptions(persistent=True, indirect=True))
    model = bytearray(open(path, "rb").read())
    counts = []
    for rnd in range(4):
        # Four 1 MiB reads in flight at once, then four 1 MiB writes into lent pages, as fio's QD4.
        offsets = [((rnd * 4 + i) % 16) * MiB for i in range(4)]
        got = _run_concurrently([lambda d, o=o: front.submit_read(o, MiB, d) for o in offsets])
        for o, (err, nviews, data) in zip(offsets, got):
            assert err == 0 and data == bytes(model[o:o + MiB])
            counts.append(nviews)
        writes = []
        for o in offsets:
            lent = front.write_buffer(o, MiB)
            assert lent is not None
            payload = os.urandom(MiB)
            at = 0
            for v in lent.views:
                v[:] = payload[at:at + v.nbytes]
                at += v.nbytes
            assert at == MiB
            counts.append(len(lent.views))
            model[o:o + MiB] = payload
            writes.append(lambda d, o=o, lent=lent: front.submit_write_buffer(o, lent, False, d))
        assert all(err == 0 for err, _, _ in _run_concurrently(writes))
    # The first requests take pages as the pool grows (runs already); after them, every one is a run.
    assert counts[8:] == [1] * len(counts[8:]), counts
    err, _, data = _run_concurrently([lambda d: front.submit_read(0, 16 * MiB, d)])[0]
    assert err == 0 and data == bytes(model)
    with open(path, "rb") as f:
        assert f.read() == bytes(model)


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "grant-per-request"])
def test_a_read_larger_than_the_pages_that_can_be_had_completes(rig: Rig, persistent: bool) -> None:  # noqa: F811
    """A read needing more pages than the pool can ever hold at once: its first parts' data is copied
    out so their pages serve the rest (it hung for good, holding every page, and the device with it)."""
    path = rig.image(size=24 * MiB)
    # 512 persistent pages (two 1 MiB requests); without persistent grants, the guest's 16 MiB is less than the read.
    front = rig.attach(path, options=FrontendOptions(persistent=persistent, indirect=True, max_persistent_frames=512))
    model = open(path, "rb").read()
    length = 24 * MiB if not persistent else 3 * MiB
    (err, _, data), (err2, _, small) = _run_concurrently([lambda d: front.submit_read(512, length - 4096, d),
                                                           lambda d: front.submit_read(0, 4096, d)])
    assert err == 0 and data == model[512:512 + length - 4096]
    assert err2 == 0 and small == model[:4096]
    if persistent:
        assert front._grants.count <= 512 and len(front._grants.free) == front._grants.count
