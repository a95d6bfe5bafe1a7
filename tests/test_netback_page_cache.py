"""netback's copies into and views out of a frontend's pages placed side by side (PageCache).

The pages here are anonymous pages placed in a real GrantWindow exactly where
granted pages would go, some outside it and some not mapped at all, so the
span paths run on real memory.  Whatever the references and layout (a
frontend chooses both), the bytes that land and the bytes handed on must be
those of a page-at-a-time copy, and a missing page must fail only its slot.
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from xdom.backends.kept_mappings import KeptMappings
from xdom.backends.netback.page_cache import PageCache
from xdom.backends.netback.rx import RxCopy
from xdom.backends.netback.tx import PAGE_SIZE, TxPiece
from xdom.domains.hostsys import sysmem
from xdom.domains.hostsys.grant_window import GrantWindow

FIRST = 1000                      # the window holds references FIRST .. FIRST + 63
REFS = range(FIRST - 4, FIRST + 68)


class _Pages:
    """A PageCache over anonymous pages: ``placed`` references in the window, ``loose`` mapped anywhere."""

    def __init__(self, placed: set[int], loose: set[int], readonly: bool = False) -> None:
        self.cache = PageCache(None, 0, readonly, KeptMappings(0))   # type: ignore[arg-type]  # never maps: no host
        self.window = self.cache.window = GrantWindow(FIRST + 32, readonly, pages=64)
        self.loose: list[int] = []
        for ref in sorted(placed | loose):
            at = self.window.address(ref) if ref in placed else None
            flags = sysmem.MAP_PRIVATE | sysmem.MAP_ANONYMOUS
            addr = sysmem.mmap(at or 0, PAGE_SIZE, sysmem.PROT_READ | sysmem.PROT_WRITE,
                               flags | (sysmem.MAP_FIXED if at else 0))
            if at:
                self.window.place(ref)
            else:
                self.loose.append(addr)
            self.cache.views[ref] = sysmem.view(addr, PAGE_SIZE)
            self.cache.views[ref][:] = bytes([ref & 0xFF]) * PAGE_SIZE

    def close(self) -> None:
        for view in self.cache.views.values():
            view.release()
        for ref in range(FIRST, FIRST + 64):
            if self.window.placed[ref - FIRST]:
                self.window.unplace(ref)
        for addr in self.loose:
            sysmem.munmap(addr, PAGE_SIZE)
        assert self.window.close()


WINDOW = set(range(FIRST, FIRST + 64))


def _placed() -> st.SearchStrategy[set[int]]:
    """The references mapped in the window: mostly all of them (spans form), or all but a few, or any."""
    return st.one_of(st.just(WINDOW), st.just(WINDOW),
                     st.sets(st.sampled_from(sorted(WINDOW)), max_size=3).map(WINDOW.difference),
                     st.sets(st.sampled_from(sorted(WINDOW))))


def _mapped() -> st.SearchStrategy[tuple[set[int], set[int]]]:
    """(placed, loose): references mapped in the window and outside it; the rest are not mapped."""
    return st.tuples(_placed(), st.sets(st.sampled_from(REFS))).map(lambda pl: (pl[0], pl[1] - pl[0]))


def _refs_with_runs() -> st.SearchStrategy[list[int]]:
    """A frame's references: one run of neighbours in the window (the usual case), or runs, repeats,
    gaps and strays in any order, in the window or across its edges."""
    run = st.tuples(st.sampled_from(REFS), st.integers(1, 17)).map(lambda t: list(range(t[0], t[0] + t[1])))
    mixed = st.lists(st.one_of(run, st.lists(st.sampled_from(REFS), min_size=1, max_size=3)),
                     min_size=1, max_size=4).map(lambda parts: [r for part in parts for r in part][:18])
    usual = st.tuples(st.integers(FIRST, FIRST + 46), st.integers(1, 18)).map(lambda t: list(range(t[0], t[0] + t[1])))
    return st.one_of(usual, mixed)


@settings(max_examples=300, deadline=None)
@given(mapped=_mapped(), grefs=_refs_with_runs(), tail=st.integers(1, PAGE_SIZE), seed=st.binary(min_size=1))
def test_copy_in_lands_what_a_page_at_a_time_would(mapped, grefs, tail, seed) -> None:
    placed, loose = mapped
    pages = _Pages(placed, loose)
    try:
        n = len(grefs)
        length = (n - 1) * PAGE_SIZE + tail
        frame = (seed * (length // len(seed) + 1))[:length]
        copies = [RxCopy(k, g, 0, PAGE_SIZE if k < n - 1 else tail, k * PAGE_SIZE) for k, g in enumerate(grefs)]
        model = {g: bytearray(bytes(v)) for g, v in pages.cache.views.items()}
        want_failed = set()
        for c in copies:
            if c.gref in model:
                model[c.gref][c.offset:c.offset + c.length] = frame[c.src_offset:c.src_offset + c.length]
            else:
                want_failed.add(c.slot)
        assert pages.cache.copy_in(copies, frame) == want_failed
        assert {g: bytes(v) for g, v in pages.cache.views.items()} == {g: bytes(m) for g, m in model.items()}
    finally:
        pages.close()


@settings(max_examples=300, deadline=None)
@given(placed=_placed(), grefs=_refs_with_runs(), tail=st.integers(1, PAGE_SIZE), seed=st.binary(min_size=1))
@example(placed=WINDOW, grefs=[1003, 1010, 1012, 1011, 1013], tail=5, seed=b"abc")   # ends of a run, not one
@example(placed=WINDOW, grefs=[1010, 1012, 1011, 1013], tail=PAGE_SIZE, seed=b"xyz")
def test_fill_lands_what_a_page_at_a_time_would(placed, grefs, tail, seed) -> None:
    """fill (an RxRun's copies, every page mapped: in the window or outside it) writes exactly the
    bytes a copy a page at a time writes, whatever order and repeats the references come in."""
    pages = _Pages(placed, set(REFS) - placed)
    grefs = [g for g in grefs if g in REFS] or [FIRST]       # runs may go past the last mapped reference
    try:
        n = len(grefs)
        length = (n - 1) * PAGE_SIZE + tail
        frame = (seed * (length // len(seed) + 1))[:length]
        model = {g: bytearray(bytes(v)) for g, v in pages.cache.views.items()}
        for k, g in enumerate(grefs):
            chunk = frame[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]
            model[g][:len(chunk)] = chunk
        pages.cache.fill(tuple(grefs), frame)
        assert {g: bytes(v) for g, v in pages.cache.views.items()} == {g: bytes(m) for g, m in model.items()}
    finally:
        pages.close()


@st.composite
def _pieces(draw) -> list[TxPiece]:
    """TX pieces as TxProcessor passes them (within a page, never empty): tiled as netfront lays a frame
    out, tiled but for one piece moved or cut (the boundaries of a span), or anyhow."""
    grefs = draw(_refs_with_runs())
    n = len(grefs)
    first_offset = draw(st.integers(0, PAGE_SIZE - 300)) if n > 1 else 0
    tail = draw(st.integers(300 if n == 1 else 1, PAGE_SIZE))
    out = [TxPiece(g, 0, PAGE_SIZE) for g in grefs]
    out[0] = TxPiece(grefs[0], first_offset, PAGE_SIZE - first_offset if n > 1 else tail)
    if n > 1:
        out[-1] = TxPiece(grefs[-1], 0, tail)
    mode = draw(st.sampled_from(["tiled", "one off", "anyhow"]))
    if mode != "tiled":
        for k in range(n) if mode == "anyhow" else [draw(st.integers(0, n - 1))]:
            offset = draw(st.integers(0, PAGE_SIZE - 1))
            out[k] = TxPiece(grefs[k], offset, draw(st.integers(1, PAGE_SIZE - offset)))
    if out[0].length <= 256:                # _send_parts is only used past the head copy
        out[0] = TxPiece(grefs[0], 0, PAGE_SIZE)
    return out


@settings(max_examples=300, deadline=None)
@given(placed=_placed(), pieces=_pieces())
def test_views_past_the_head_are_the_pieces_bytes(placed, pieces) -> None:
    every = {p.gref for p in pieces}
    pages = _Pages(placed & every, every - placed, readonly=True)
    try:
        for i, g in enumerate(sorted(every)):      # distinct bytes in every page
            pages.cache.views[g][:] = bytes((i * 7 + j) & 0xFF for j in range(256)) * 16
        views = pages.cache.views
        whole = b"".join(bytes(views[p.gref][p.offset:p.offset + p.length]) for p in pieces)
        for skip in (256, 0):               # past the head (_send_parts), and all of it (_gather)
            got = pages.cache.views_past(pieces, sum(p.length for p in pieces), skip)
            assert b"".join(bytes(v) for v in got) == whole[skip:]
            for v in got:
                v.release()
    finally:
        pages.close()


def test_a_tiled_frame_is_one_view_and_one_copy() -> None:
    """The layout xdom's netfront uses, all pages placed: one view out, one span in."""
    refs = list(range(FIRST + 10, FIRST + 27))
    pages = _Pages(set(refs), set())
    try:
        pieces = [TxPiece(r, 0, PAGE_SIZE if i < 16 else 100) for i, r in enumerate(refs)]
        (one,) = pages.cache.views_past(pieces, 16 * PAGE_SIZE + 100, 256)
        assert len(one) == 16 * PAGE_SIZE + 100 - 256
        one.release()
        frame = bytes(range(256)) * (17 * 16)
        copies = [RxCopy(i, r, 0, PAGE_SIZE, i * PAGE_SIZE) for i, r in enumerate(refs)]
        assert pages.cache.copy_in(copies, frame) == set()
        assert b"".join(bytes(pages.cache.views[r]) for r in refs) == frame
    finally:
        pages.close()
