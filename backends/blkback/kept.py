"""The grant mappings blkback keeps (persistent grants), bounded for the whole process.

Each kept page is a mapping, one VMA of blkback's -- two where a frontend
scatters its references across a ring's grant window, splitting the
reservation around each page -- and a process has at most
``vm.max_map_count`` of them.  Bounded only per ring (2048, times up to 4
queues a device, times any number of devices), a few frontends could leave
blkback unable to map a page for anyone.  So, as the broker's fd budget
does for descriptors: the kept mappings of all rings together are bounded,
and no frontend domain may keep more than a share of the bound.  Past
either, a page is mapped for its batch only and unmapped after it, as past
a ring's own cap: slower for that frontend, never an error.
"""

from __future__ import annotations

import threading

from xdom.domains.hostsys.memory import max_map_count

__all__ = ["KeptMappings", "MAP_RESERVE", "SHARE_DIVISOR", "VMAS_PER_PAGE"]

#: VMAs left for everything else: the interpreter, libraries, rings, and the per-batch mappings
#: (up to a thousand a ring while its batch runs).
MAP_RESERVE = 8192
#: The most VMAs one kept page can cost (a mapping in the middle of its window's reservation).
VMAS_PER_PAGE = 2
#: No frontend domain keeps more than 1/SHARE_DIVISOR of the bound.
SHARE_DIVISOR = 4


class KeptMappings:
    """How many mappings blkback's rings keep, in all and per frontend domain (rings run on their own
    threads: one lock)."""

    def __init__(self, limit: int | None = None, share_divisor: int = SHARE_DIVISOR) -> None:
        """``limit``: the bound (default: what ``vm.max_map_count`` leaves past :data:`MAP_RESERVE`)."""
        if limit is None:
            limit = max(0, max_map_count() - MAP_RESERVE) // VMAS_PER_PAGE
        self.limit = limit
        self.share = limit // share_divisor
        self.total = 0
        self._by_frontend: dict[int, int] = {}
        self._lock = threading.Lock()

    def take(self, frontend: int) -> bool:
        """One more page kept for ``frontend``; False (keep nothing) when the bound or its share is reached."""
        with self._lock:
            mine = self._by_frontend.get(frontend, 0)
            if self.total >= self.limit or mine >= self.share:
                return False
            self._by_frontend[frontend] = mine + 1
            self.total += 1
            return True

    def give(self, frontend: int, pages: int) -> None:
        """``pages`` of ``frontend``'s kept mappings are gone."""
        if not pages:
            return
        with self._lock:
            left = self._by_frontend.get(frontend, 0) - pages
            if left < 0:
                raise ValueError(f"frontend d{frontend} gives back {pages} kept mappings, more than it holds")
            if left:
                self._by_frontend[frontend] = left
            else:
                self._by_frontend.pop(frontend, None)
            self.total -= pages

    def held(self, frontend: int) -> int:
        with self._lock:
            return self._by_frontend.get(frontend, 0)
