"""The grant mappings a backend keeps, bounded for the whole process in VMAs, and per frontend domain.

blkback keeps its frontends' persistent grants and netback the pages of
their rings' buffers, each mapping one VMA of the backend's -- and a page
placed in a grant window may split the window's reservation, one more.  A
process has at most ``vm.max_map_count`` VMAs.  Bounded only per ring or
per vif, a few frontends with many devices and queues could leave the
backend unable to map a page for anyone (every later map failing with
ENOMEM).  So, as the broker's fd budget does for descriptors: the kept
mappings of all rings together are bounded in VMAs, and no frontend domain
may hold more than a share of the bound.  Past either, a page is mapped
for its batch only and unmapped after it: slower for that frontend, never
an error.
"""

from __future__ import annotations

import threading

from xdom.domains.hostsys.memory import max_map_count

__all__ = ["KeptMappings", "MAP_RESERVE", "SHARE_DIVISOR", "VMAS_PER_PAGE"]

#: VMAs left for everything else: the interpreter, libraries, rings, and the mappings made for one
#: batch only (up to a thousand a ring while its batch runs).
MAP_RESERVE = 8192
#: The most VMAs one kept page can cost (a mapping in the middle of its window's reservation).
VMAS_PER_PAGE = 2
#: No frontend domain holds more than 1/SHARE_DIVISOR of the bound.
SHARE_DIVISOR = 4


class KeptMappings:
    """How many VMAs the kept mappings cost, in all and per frontend domain (blkback's rings run on
    their own threads: one lock)."""

    def __init__(self, limit: int | None = None, share_divisor: int = SHARE_DIVISOR) -> None:
        """``limit``: the bound in VMAs (default: what ``vm.max_map_count`` leaves past :data:`MAP_RESERVE`)."""
        if limit is None:
            limit = max(0, max_map_count() - MAP_RESERVE)
        self.limit = limit
        self.share = limit // share_divisor
        self.total = 0
        self._by_frontend: dict[int, int] = {}
        self._lock = threading.Lock()

    def take(self, frontend: int, vmas: int = VMAS_PER_PAGE) -> bool:
        """``vmas`` more for ``frontend`` (by default a page's worst case); False, and nothing taken, when
        that would pass the bound or the frontend's share."""
        with self._lock:
            mine = self._by_frontend.get(frontend, 0)
            if self.total + vmas > self.limit or mine + vmas > self.share:
                return False
            self._by_frontend[frontend] = mine + vmas
            self.total += vmas
            return True

    def give(self, frontend: int, vmas: int) -> None:
        """``vmas`` of what ``frontend`` held are gone."""
        if not vmas:
            return
        with self._lock:
            left = self._by_frontend.get(frontend, 0) - vmas
            if left < 0:
                raise ValueError(f"frontend d{frontend} gives back {vmas} VMAs, more than it holds")
            if left:
                self._by_frontend[frontend] = left
            else:
                self._by_frontend.pop(frontend, None)
            self.total -= vmas

    def held(self, frontend: int) -> int:
        """The VMAs ``frontend``'s kept mappings cost now."""
        with self._lock:
            return self._by_frontend.get(frontend, 0)
