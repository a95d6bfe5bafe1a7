"""Grant mappings placed side by side in a GrantWindow: one view over neighbouring references.

Run against both xenhost variants: the in-process one places nothing (a
grant's view is the granter's memory), so every span is None there and the
mappings work as without a window.
"""

from __future__ import annotations

import pytest

from xdom.domains.abi.grant_table import PAGE_SIZE, GNTST_okay
from xdom.domains.hostsys.grant_window import GrantWindow


def _protection_at(addr: int) -> str | None:
    """The permissions /proc/self/maps gives the mapping holding ``addr`` (None: nothing is mapped there)."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= addr < end:
                return perms
    return None


def test_neighbouring_references_are_one_span_and_unmapping_keeps_the_reservation(domains) -> None:
    a, b = domains.create("a"), domains.create("b")
    refs = []
    for gfn in range(8):
        a.memory.frame(gfn)[:] = bytes([gfn]) * PAGE_SIZE
        refs.append(a.gnttab.grant_access(b.domid, gfn))
    assert refs == list(range(refs[0], refs[0] + 8))        # a fresh table hands references out in order
    window = GrantWindow(refs[0], readonly=False, pages=64)
    try:
        results = b.map_grants([(a.domid, r, False) for r in refs], window)
        assert [r.status for r in results] == [GNTST_okay] * 8
        span = window.span(refs[0], 8)
        if domains.variant == "local":
            assert span is None and all(r.mapping.window is None for r in results)
        else:
            assert span is not None and len(span) == 8 * PAGE_SIZE
            assert bytes(span) == b"".join(bytes([g]) * PAGE_SIZE for g in range(8))
            span[PAGE_SIZE - 2:PAGE_SIZE + 2] = b"\xaa\xbb\xcc\xdd"      # across two granted frames
            assert bytes(a.memory.frame(0)[-2:]) == b"\xaa\xbb" and bytes(a.memory.frame(1)[:2]) == b"\xcc\xdd"
            assert window.span(refs[0] - 1, 2) is None          # a neighbour not mapped here: no span
            assert window.span(refs[6], 3) is None
            span.release()
        # unmapping one page in the middle: the broker accepts it (the frame is gone from this process),
        # the page goes back to the reservation, and no span crosses it any more
        middle = results[3].mapping
        assert b.unmap_grants([middle]) == [GNTST_okay]
        if domains.variant == "broker":
            addr = window.base + (refs[3] - window.first) * PAGE_SIZE
            assert _protection_at(addr) == "---p"
            assert window.span(refs[0], 8) is None and window.span(refs[4], 4) is not None
            assert not window.close()                           # pages still placed: kept
        assert b.unmap_grants([r.mapping for i, r in enumerate(results) if i != 3]) == [GNTST_okay] * 7
        assert window.close()
        assert _protection_at(window.base) is None
    finally:
        window.close()
    for r in refs:
        a.gnttab.end_access(r)


def test_references_outside_the_window_are_mapped_anywhere(domains) -> None:
    a, b = domains.create("a"), domains.create("b")
    refs = [a.gnttab.grant_access(b.domid, gfn, readonly=True) for gfn in range(4)]
    a.memory.frame(3)[:4] = b"last"
    window = GrantWindow(refs[0], readonly=True, pages=2)       # first = refs[0] - 1: holds refs[0] only
    try:
        results = b.map_grants([(a.domid, r, True) for r in refs], window)
        assert all(r.status == GNTST_okay for r in results)
        assert bytes(results[3].mapping.view[:4]) == b"last"
        assert all(r.mapping.window is None for r in results[1:])
        assert window.span(refs[0], 2) is None
        assert b.unmap_grants([r.mapping for r in results]) == [GNTST_okay] * 4
    finally:
        assert window.close()
    for r in refs:
        a.gnttab.end_access(r)


def test_a_reference_mapped_twice_is_placed_once() -> None:
    window = GrantWindow(100, readonly=False, pages=16)
    try:
        addr = window.address(100)
        assert addr == window.base + (100 - window.first) * PAGE_SIZE
        window.place(100)
        assert window.address(100) is None                      # taken: a second mapping goes elsewhere
        assert window.address(window.first - 1) is None and window.address(window.first + 16) is None
        with pytest.raises(IndexError):
            window.place(window.first + 16)
    finally:
        window.placed[:] = bytes(len(window.placed))
        assert window.close()


def test_a_page_that_may_be_a_hole_is_never_used_nor_unmapped_by_close() -> None:
    """A MAP_FIXED that fails may leave a hole another mapping then takes: such a page (lost, and not
    reserved again) is never placed again, and closing the window unmaps around it."""
    from xdom.domains.hostsys import sysmem
    from xdom.domains.hostsys.grant_window import _LOST
    window = GrantWindow(100, readonly=False, pages=8)
    lost = window.first + 3
    window.lost(lost)                                   # reserved again: usable as before
    assert window.address(lost) is not None
    window.placed[3] = _LOST                             # as when reserving it again failed too
    assert window.address(lost) is None and window.span(window.first, 8) is None
    hole = window.base + 3 * PAGE_SIZE
    assert window.close()
    assert _protection_at(window.base) is None and _protection_at(window.base + 7 * PAGE_SIZE) is None
    assert _protection_at(hole) == "---p"               # left alone: whatever took the hole keeps it
    sysmem.munmap(hole, PAGE_SIZE)


def _vmas_within(start: int, end: int) -> int:
    """How many of this process's VMAs overlap ``[start, end)`` (/proc/self/maps, one line each; a piece
    of the reservation at an edge may have merged with a neighbour outside)."""
    count = 0
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            count += lo < end and hi > start
    return count


def test_what_the_window_says_its_pages_cost_is_what_the_kernel_counts(domains) -> None:
    """``vmas()`` is what netback and blkback charge against ``vm.max_map_count``: it must not count
    fewer VMAs than the process really has, scattered, in runs, or after pages went back."""
    if domains.variant == "local":
        pytest.skip("the in-process variant places nothing in a window")
    a, b = domains.create("a"), domains.create("b")
    for gfn in range(48):
        a.memory.frame(gfn)[:1] = b"x"                            # populated
    refs = [a.gnttab.grant_access(b.domid, gfn) for gfn in range(48)]
    window = GrantWindow(refs[0], readonly=False, pages=64)
    end = window.base + window.pages * PAGE_SIZE

    def check() -> None:                  # vmas() leaves out the reservation's first piece, there before any page
        assert _vmas_within(window.base, end) == window.vmas() + 1

    try:
        check()                                                   # the reservation alone
        layout = refs[0:1] + refs[3:11] + refs[13:40:2]           # one page, a run of 8, 14 every other one
        results = b.map_grants([(a.domid, r, False) for r in layout], window)
        assert all(r.status == GNTST_okay for r in results)
        assert window.vmas() == 23 + 2 + 14                       # each a piece more, but the run: one for all 8
        check()
        assert b.unmap_grants([r.mapping for r in results[1:9:2]]) == [GNTST_okay] * 4   # holes in the run
        assert window.vmas() == 19 + 2 + 14 + 3                   # the first hole joins the free pages before it
        check()
        assert b.unmap_grants([r.mapping for i, r in enumerate(results) if i not in (1, 3, 5, 7)]) \
            == [GNTST_okay] * (len(layout) - 4)
        assert window.vmas() == 0
        check()
    finally:
        assert window.close()
    for r in refs:
        a.gnttab.end_access(r)
