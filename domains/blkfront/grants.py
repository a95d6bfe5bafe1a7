"""The frames of the guest's memory that blkfront grants its backend for I/O.

Two ways, chosen by the connection (``feature-persistent``): a pool of
frames granted once and reused for every request, as Linux's blkfront
keeps (up to ``max_persistent_frames``), or frames granted for one request
and ended with it.  A frame whose grant cannot end yet (the backend still
maps it) is never reused, nor lost: it waits in ``deferred`` and is tried
again, as Linux's ``gnttab_end_foreign_access`` does.  Every write-zeroes
segment names the one zero page.

No lock here: the device calls under its own.
"""

from __future__ import annotations

import threading
from operator import attrgetter, sub

from ..frame_pool import FramePool, OutOfFrames
from ..xenhost.base import XenHost

PAGE_SIZE = 4096
ZERO_PAGE = bytes(PAGE_SIZE)
#: Pages handed out, per page on the free list, between two sorts of that list (:meth:`GrantedPages.get`).
SORT_EVERY = 4
_GFN = attrgetter("gfn")


class Page:
    """One granted frame (a plain class with __slots__: pages are handed around for every I/O)."""

    __slots__ = ("gfn", "ref", "persistent", "view")

    def __init__(self, gfn: int, ref: int, persistent: bool, view: memoryview) -> None:
        self.gfn, self.ref, self.persistent = gfn, ref, persistent
        self.view = view                # the frame's 4 KiB in our memory (kept: a page is used many times)

    def __repr__(self) -> str:
        return f"Page(gfn={self.gfn}, ref={self.ref}, persistent={self.persistent})"


class GrantedPages:
    """The backend's view of our memory: what is granted, free, or still mapped."""

    def __init__(self, host: XenHost, pool: FramePool, backend_domid: int, max_persistent: int) -> None:
        self.host, self.pool, self.backend_domid = host, pool, backend_domid
        self.max_persistent = max_persistent
        self.persistent = False                   # what the current connection negotiated
        self.free: list[Page] = []                # persistent pages not in use
        self.count = 0                            # persistent pages granted, free or not
        self.deferred: list[tuple[int, int]] = []     # (ref, gfn) still mapped by the backend
        self._zero: Page | None = None
        self._memory = host.memory.buffer         # the domain's frames, frame g at [g * PAGE_SIZE, ...)
        self.sorts = 0                            # times the free list was put back in frame order
        self._handed_out = 1 << 62                # pages handed out since the last sort (none yet: any time)

    def frame(self, gfn: int) -> memoryview:
        return self._memory[gfn * PAGE_SIZE:(gfn + 1) * PAGE_SIZE]

    def negotiated(self, persistent: bool) -> None:
        """A connection's terms: with or without persistent grants."""
        self.persistent = persistent
        if not persistent and self.free:
            # Kept granted for a backend that had the feature (the one before a restart): give them back.
            free, self.free = self.free, []
            self.count -= len(free)
            for page in free:
                self.end_grant(page.ref, page.gfn)

    def get(self, n: int, readonly: bool, busy: bool, front: int = 0) -> list[Page] | None:
        """``n`` pages, or None to wait for some (``busy``: requests in flight will give some back).
        OutOfFrames if they can never be had.

        The first ``front`` of them (a request's indirect pages) come from the other end of the
        free list from the rest, and go back there (``put(..., front=True)``): the data pages of
        large requests are then taken and handed back as whole runs, which stay runs of
        consecutive frames (:meth:`views`) in a workload of one size.

        Small I/O of scattered completion order (4 KiB random reads) shuffles the free list, and a
        shuffled list stays shuffled: every later 1 MiB request would be 256 views, each costing
        the NBD server Python to receive or send.  So a large request that finds the end of the
        list not one run sorts the list by frame and moves its highest whole run to the end first
        (:meth:`_run_to_end`) -- an O(F log F) pass over F free pages, allowed once per
        :data:`SORT_EVERY` x F pages handed out, so a workload that keeps shuffling pays at most a
        few comparisons a page.  A pool that must grow grows by the whole request, so its pages
        are all new ones, one run."""
        if self.persistent:
            # Topping up the free pages left would mix old and new, and the mixture comes back as it went.
            for _ in range(min(n, self.max_persistent - self.count) if len(self.free) < n else 0):
                try:
                    (g,) = self.pool.alloc(1)
                except OutOfFrames:
                    break
                ref = self.host.gnttab.grant_access(self.backend_domid, g)
                self.free.append(Page(g, ref, True, self.frame(g)))
                self.count += 1
            if len(self.free) < n:
                if self.count < n and not busy:
                    raise OutOfFrames(f"a request needs {n} frames and only {self.count} can be had")
                return None
            free = self.free
            data = n - front
            if data > 1 and free[-1].gfn - free[-data].gfn != data - 1 \
                    and self._handed_out >= SORT_EVERY * len(free):
                free.sort(key=_GFN)
                self._run_to_end(data, front)
                self.sorts += 1
                self._handed_out = 0
            self._handed_out += n
            if front:
                out = free[:front] + free[len(free) - n + front:]
                del free[len(free) - n + front:]
                del free[:front]
                return out
            out = free[-n:]
            del free[-n:]
            return out
        try:
            gfns = self.pool.alloc(n)
        except OutOfFrames:
            if not busy:
                raise
            return None
        return [Page(g, self.host.gnttab.grant_access(self.backend_domid, g, readonly=readonly), False,
                     self.frame(g)) for g in gfns]

    def _run_to_end(self, n: int, front: int) -> None:
        """Move the highest run of ``n`` consecutive frames of the sorted free list to its end (past its
        first ``front``, kept for indirect pages).  Pages in flight leave holes in the list: the last
        ``n`` may straddle one, and a request that took them would hand back a broken run for good."""
        free = self.free
        gfns = list(map(_GFN, free))
        # widths[i]: how far the gfns of free[i .. i + n - 1] spread; n - 1 only for a run (sorted, distinct)
        widths = list(map(sub, gfns[n - 1:], gfns))
        try:
            i = len(widths) - 1 - widths[::-1].index(n - 1)
        except ValueError:
            return                                          # no run of n free now: the last n, as before
        if i >= front and i != len(free) - n:
            free += free[i:i + n]
            del free[i:i + n]

    def views(self, pages: list[Page], length: int) -> list[memoryview]:
        """The first ``length`` bytes of ``pages`` (whole but maybe the last), in as few views as it can.

        Pages of consecutive frames are one view of our memory: a 1 MiB payload is then received
        (``recvmsg_into``), sent (``sendmsg``) and checked as one buffer, not 256, which is most of
        what a large request costs the NBD server in Python.  The pool hands persistent pages out
        and takes them back in runs (:meth:`get`, :meth:`put`), so runs stay whole in a workload of
        one size; otherwise one view a page, as before.
        """
        n = len(pages)
        if not (n - 1) * PAGE_SIZE < length <= n * PAGE_SIZE:
            # One view of a run must end inside its last page, never in the frame after it.
            raise ValueError(f"{length} bytes do not end in the last of {n} pages")
        first = pages[0].gfn
        if n > 1 and pages[-1].gfn - first == n - 1 and [p.gfn for p in pages] == list(range(first, first + n)):
            return [self._memory[first * PAGE_SIZE:first * PAGE_SIZE + length]]
        views = [page.view for page in pages]
        last = length - (n - 1) * PAGE_SIZE
        if last != PAGE_SIZE:
            views[-1] = views[-1][:last]
        return views

    def put(self, pages: list[Page], front: bool = False) -> None:
        if self.persistent and all([p.persistent for p in pages]):
            if front:
                self.free[:0] = pages     # indirect pages: see get()
            else:
                self.free += pages        # the usual case: all back to the pool
            return
        for p in pages:
            if p.persistent and self.persistent:
                self.free.append(p)
            else:
                if p.persistent:              # kept for a backend that had the feature; this one has not
                    self.count -= 1
                self.end_grant(p.ref, p.gfn)

    def zero_page(self) -> Page:
        """The frame of zeroes behind every write-zeroes segment, granted once (read-write: a persistent
        backend maps all it is given read-write, as Linux's does) and zeroed again for each request, so a
        backend that scribbles on it spoils at most what it could spoil anyway: the data it writes."""
        if self._zero is None:
            (gfn,) = self.pool.alloc(1)
            self._zero = Page(gfn, self.host.gnttab.grant_access(self.backend_domid, gfn), False,
                              self.frame(gfn))
        self._zero.view[:] = ZERO_PAGE
        return self._zero

    def end_grant(self, ref: int, gfn: int) -> None:
        """End the backend's access to a frame and free it, or retry later while it is still mapped.

        Linux's ``gnttab_end_foreign_access`` defers the same way: a frame the
        backend still maps is never reused, but it is not lost either.
        """
        if self.host.gnttab.try_end_access(ref):
            self.host.gnttab.release_ref(ref)
            self.pool.free([gfn])
        else:
            self.deferred.append((ref, gfn))

    def retry_deferred(self) -> None:
        deferred, self.deferred = self.deferred, []
        for ref, gfn in deferred:
            self.end_grant(ref, gfn)

    def release_all(self) -> None:
        """Closing: end the grants of the free persistent pages and of the zero page."""
        persistent, self.free = self.free, []
        for p in persistent:
            self.end_grant(p.ref, p.gfn)
        if self._zero is not None:
            self.end_grant(self._zero.ref, self._zero.gfn)
            self._zero = None


class Lent:
    """Pages lent for a WRITE payload to be received into (``Blkfront.write_buffer``)."""

    __slots__ = ("lock", "grants", "pages", "views", "length")

    def __init__(self, lock: threading.RLock, grants: GrantedPages, pages: list[Page], length: int) -> None:
        self.lock, self.grants, self.pages, self.length = lock, grants, pages, length
        self.views = grants.views(pages, length)

    def take(self) -> list[Page]:
        pages, self.pages, self.views = self.pages, [], []
        return pages

    def release(self) -> None:
        pages = self.take()
        if pages:
            with self.lock:
                self.grants.put(pages)
