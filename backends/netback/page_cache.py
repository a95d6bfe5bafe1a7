"""The frontend's pages as netback maps them: kept by grant reference, placed side by side.

A vif's buffers stay granted for the life of its connection (xdom's
netfront and Linux's reuse them), so each page is mapped once, in a batch,
and kept (``PageCache``); the broker is off the data path.  The pages go
into a :class:`~xdom.domains.hostsys.grant_window.GrantWindow` by
reference, and a frontend grants a ring's buffers with neighbouring
references, so the pages of a frame are most often one span: a 64 KiB
frame is copied into the guest's buffers in one go (:meth:`PageCache.copy_in`)
and handed to a TAP as one view (:meth:`PageCache.views_past`), where a page
at a time cost a Python step for each of 17 pages.  Which pages a span
covers is decided from the references and the pieces' own offsets and
lengths, all as the frontend gave them; a layout that does not tile is
simply taken a page at a time, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from operator import sub

from xdom.domains.hostsys.grant_window import GrantWindow
from xdom.domains.xenhost.base import GrantMapping, XenHost

from ..kept_mappings import VMAS_PER_PAGE, KeptMappings
from .rx import RxCopy
from .tx import PAGE_SIZE, TxPiece

log = logging.getLogger("xdom.netback")

MAX_CACHED_MAPPINGS = 1024      # per vif and direction: our netfront uses 256 buffers each way


class PageCache:
    """Mappings of the frontend's pages by grant reference, made in batches and kept.

    ``views`` is looked up directly on the data path; :meth:`ensure` maps
    what is missing (one hypercall for the lot) and is only needed when a
    lookup misses.  The pages are placed in a window by reference (made at
    the first map, centred on it), so the pages of neighbouring references
    -- a frame's buffers -- are one :meth:`span`.

    What the kept pages cost in VMAs is charged to ``kept``, the bound all
    of netback's vifs share (``backends/kept_mappings.py``): a frontend
    past its share, or any past the bound, gets its pages mapped for one
    batch only (``transient``), unmapped at the next :meth:`ensure` or
    :meth:`drop_transient`, whichever comes first.
    """

    def __init__(self, host: XenHost, fe: int, readonly: bool, kept: KeptMappings) -> None:
        self.host, self.fe, self.readonly, self.kept = host, fe, readonly, kept
        self.maps: dict[int, GrantMapping] = {}
        self.views: dict[int, memoryview] = {}
        self.refused: set[int] = set()      # grefs a prefetch could not map: not prefetched again
        self.window: GrantWindow | None = None
        self.charged = 0                    # VMAs held in ``kept`` for the pages kept
        self.transient: list[int] = []      # grefs mapped for one batch only: charged nothing, kept by no one
        self.unkept = 0                     # pages mapped for one batch only, ever

    def ensure(self, grefs: set[int], prefetch: Iterable[int] = ()) -> None:
        """Map the missing ``grefs``, and with them whatever of ``prefetch`` is not mapped yet.

        A prefetched gref that fails is remembered and left out of later
        prefetches (mapped again only when a frame needs it), so a frontend
        posting grants that do not map cannot turn each frame into a
        ring-sized batch of failing map operations at the broker.  The
        views of an earlier batch's transient pages must not be held across
        this call: they are unmapped first.
        """
        self.drop_transient()
        missing = [g for g in grefs if g not in self.maps]
        if not missing:
            return
        extra = [g for g in prefetch if g not in self.maps and g not in self.refused and g not in grefs]
        if len(self.maps) + len(missing) + len(extra) > MAX_CACHED_MAPPINGS:
            self.clear()
            missing, extra = list(grefs), []
        worst = VMAS_PER_PAGE * (len(missing) + len(extra))
        keep = self.kept.take(self.fe, worst)
        if not keep and extra:              # the bound or our share: no prefetch
            extra, worst = [], VMAS_PER_PAGE * len(missing)
            keep = self.kept.take(self.fe, worst)
        if not keep and self.maps:          # this cache's own pages make room for this batch's
            self.clear()
            missing = list(grefs)
            worst = VMAS_PER_PAGE * len(missing)
            keep = self.kept.take(self.fe, worst)
        wanted = missing + extra
        if self.window is None:
            self.window = GrantWindow(min(wanted), self.readonly)
        for i, (g, res) in enumerate(zip(wanted, self.host.map_grants([(self.fe, g, self.readonly) for g in wanted],
                                                                      self.window))):
            if res.mapping is not None:
                self.maps[g] = res.mapping
                self.views[g] = res.mapping.view
                self.refused.discard(g)
                if not keep:
                    self.transient.append(g)
                    self.unkept += 1
            elif i >= len(missing):
                self.refused.add(g)
        if keep:
            self._settle(worst)

    def _settle(self, taken: int) -> None:
        """After a batch mapped with ``taken`` VMAs taken for its worst case: keep what the pages cost."""
        placed = self.window.vmas() if self.window is not None else 0
        outside = sum(m.window is None for m in self.maps.values())
        cost = placed + outside
        over = self.charged + taken - cost
        if over >= 0:
            self.kept.give(self.fe, over)
            self.charged = cost
        else:   # cannot be: a page adds at most VMAS_PER_PAGE; never give back what was not taken
            log.warning("d%d: kept pages cost %d VMAs, %d charged", self.fe, cost, self.charged + taken)
            self.charged += taken

    def drop_transient(self) -> None:
        """Unmap the pages mapped for one batch only (once nothing holds their views)."""
        if not self.transient:
            return
        maps = [self.maps.pop(g) for g in self.transient]
        for g in self.transient:
            del self.views[g]
        self.transient = []
        self._unmap(maps)

    def span(self, gref: int, count: int) -> memoryview | None:
        """The pages of ``gref`` and the ``count - 1`` references after it as one view, if all are mapped
        side by side; to use there and then (nothing is mapped or unmapped while it is held)."""
        return self.window.span(gref, count) if self.window is not None else None

    def close_window(self) -> None:
        """After the mappings :meth:`take` handed over are unmapped: give the window's address space back."""
        if self.window is not None and not self.window.close():
            log.warning("a grant window still holds pages after its unmap; its address space is kept")
        self.window = None

    def take(self) -> list[GrantMapping]:
        """Forget every mapping and hand them over, for the caller to unmap (with others, in one call);
        what they were charged is given back."""
        maps = list(self.maps.values())
        self.maps.clear()
        self.views.clear()          # in place: the data path may hold the dict across an ensure
        self.refused.clear()
        self.transient = []
        self.kept.give(self.fe, self.charged)
        self.charged = 0
        return maps

    def clear(self) -> None:
        self._unmap(self.take())

    def _unmap(self, maps: list[GrantMapping]) -> None:
        if maps:
            try:
                self.host.unmap_grants(maps)
            except Exception as e:
                log.warning("unmapping %d pages: %s", len(maps), e)

    # ---- the data path: copies into, and views out of, the pages of a frame ----------------

    def copy_in(self, copies: Sequence[RxCopy], frame: bytes) -> set[int]:
        """Do an RX plan's copies of ``frame``; the slots whose page is not mapped (their copy failed).

        A plan fills whole pages from their start but the last (``RxPlan``):
        copies to neighbouring references are one run of the frame into one
        :meth:`span` of pages, a copy for the lot, where a page at a time
        was a Python step each (17 for a 64 KiB frame).
        """
        failed: set[int] = set()
        views = self.views
        view = memoryview(frame)
        grefs = [c.gref for c in copies]
        start = 0
        for end in [i for i, step in enumerate(map(sub, grefs[1:], grefs), 1) if step != 1] + [len(copies)]:
            first, last = copies[start], copies[end - 1]
            span = self.span(first.gref, end - start) if end - start > 1 else None
            if span is not None:
                length = last.src_offset + last.length - first.src_offset
                span[:length] = view[first.src_offset:first.src_offset + length]
            else:
                for c in copies[start:end]:
                    page = views.get(c.gref)
                    if page is None:
                        failed.add(c.slot)
                        continue
                    page[c.offset:c.offset + c.length] = view[c.src_offset:c.src_offset + c.length]
            start = end
        return failed

    def fill(self, grefs: Sequence[int], frame: bytes) -> None:
        """An :class:`~.rx.RxRun`'s copies: ``frame`` into the pages of ``grefs``, each from its start,
        whole pages but the last, every page mapped (the caller checked).  Neighbouring references
        are one copy into a :meth:`span`; the usual packet is two (a GSO packet's extra slot holds a
        request whose page is skipped)."""
        views = self.views
        view = memoryview(frame)
        n = len(grefs)
        grefs = tuple(grefs)
        first = grefs[0]
        if n == 1 or grefs == tuple(range(first, first + n)):
            cuts = []
        elif grefs[1:] == tuple(range(grefs[1], grefs[1] + n - 1)):
            cuts = [1]
        else:
            cuts = [i for i, step in enumerate(map(sub, grefs[1:], grefs), 1) if step != 1]
        start = 0
        for end in cuts + [n]:
            span = self.span(grefs[start], end - start) if end - start > 1 else None
            at = start * PAGE_SIZE
            if span is not None:
                chunk = view[at:at + (end - start) * PAGE_SIZE]
                span[:len(chunk)] = chunk
            else:
                for k in range(start, end):
                    chunk = view[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]
                    views[grefs[k]][:len(chunk)] = chunk
            start = end

    def views_past(self, pieces: Sequence[TxPiece], length: int, skip: int) -> list[memoryview]:
        """A TX packet's bytes past its first ``skip`` (which the first piece holds), as views of the
        mapped pages, every piece's page mapped: one view when the pieces tile a :meth:`span` (the first
        running to its page's end, the others from their page's start, whole pages but the last), else
        one a piece.  ``length`` is the packet's, the sum of the pieces'."""
        first = pieces[0]
        n = len(pieces)
        if n > 1 and first.offset + first.length == PAGE_SIZE \
                and [p.gref for p in pieces] == list(range(first.gref, first.gref + n)) \
                and not any([p.offset for p in pieces[1:]]) \
                and [p.length for p in pieces[1:-1]].count(PAGE_SIZE) == n - 2:
            span = self.span(first.gref, n)
            if span is not None:
                return [span[first.offset + skip:first.offset + length]]
        views = self.views
        out = [views[first.gref][first.offset + skip:first.offset + first.length]]
        out += [views[p.gref][p.offset:p.offset + p.length] for p in pieces[1:]]
        return out
