"""A reserved run of address space where one granter's pages are mapped side by side, by reference.

A backend maps a frontend's buffers one grant at a time, and each mapping
lands wherever the kernel puts it: a 64 KiB frame in 17 granted pages is 17
views, so netback copies it (or hands it to ``writev``) page by page, a
Python step per page.  A frontend grants the pages of a ring's buffers with
consecutive references (Linux's and ours take references in order from a
fresh table), so mapping reference ``r`` at ``base + (r - first) * 4 KiB``
puts such a frame's pages side by side, and one view spans them all
(:meth:`GrantWindow.span`).

The window is reserved whole (``PROT_NONE``, no memory behind it), so no
other mapping of the process can land between its pages; a page unmapped
goes back to that reservation (:meth:`unplace`), never to a hole.  A span is
only ever made over pages that are all mapped here (``placed``), so it can
never touch the reservation; the caller uses it there and then, and maps or
unmaps nothing of the window while it holds one.  References outside the
window are mapped anywhere, as before: the window is a placement, not a
limit, and what a backend can reach is still exactly what was granted.
"""

from __future__ import annotations

from . import sysmem

PAGE_SIZE = 4096
_PLACED, _LOST = 1, 2        # a page's state in ``placed``: a mapping sits there / perhaps a hole, never used
WINDOW_PAGES = 2048          # 8 MiB of address space (none of memory): a frontend's rings' worth and more
_IN_USE = bytes.maketrans(bytes([_LOST]), bytes([_PLACED]))     # ``placed`` as free (0) or not (1)


class GrantWindow:
    """Addresses for mappings of one granter's references ``first .. first + pages - 1``."""

    def __init__(self, center: int, readonly: bool, pages: int = WINDOW_PAGES) -> None:
        """Centred on reference ``center`` (the first one mapped), so a ring's references on either side fit."""
        self.first = max(0, center - pages // 2)
        self.pages = pages
        self.base = sysmem.mmap(0, pages * PAGE_SIZE, sysmem.PROT_NONE,
                                sysmem.MAP_PRIVATE | sysmem.MAP_ANONYMOUS | sysmem.MAP_NORESERVE)
        self.placed = bytearray(pages)              # per page: free (0), _PLACED or _LOST
        self._buffer = sysmem.view(self.base, pages * PAGE_SIZE, readonly=readonly)
        self.closed = False

    def address(self, ref: int) -> int | None:
        """Where to map ``ref``: its page of the window, if it is in the window and free, else None."""
        i = ref - self.first
        if self.closed or not 0 <= i < self.pages or self.placed[i]:
            return None
        return self.base + i * PAGE_SIZE

    def place(self, ref: int) -> None:
        """``ref`` is now mapped at :meth:`address`."""
        self.placed[ref - self.first] = _PLACED

    def unplace(self, ref: int) -> None:
        """Unmap ``ref``'s page back into the reservation (one call: the page is never a hole)."""
        i = ref - self.first
        try:
            self._reserve(i)
        except OSError:
            self.placed[i] = _LOST
            raise
        self.placed[i] = 0

    def lost(self, ref: int) -> None:
        """Mapping ``ref`` at its :meth:`address` failed, which may have left a hole there: the page is
        reserved again if it can be, and never used again (nor unmapped by :meth:`close`) if not."""
        i = ref - self.first
        try:
            self._reserve(i)
        except OSError:
            self.placed[i] = _LOST

    def _reserve(self, i: int) -> None:
        sysmem.mmap(self.base + i * PAGE_SIZE, PAGE_SIZE, sysmem.PROT_NONE,
                    sysmem.MAP_PRIVATE | sysmem.MAP_ANONYMOUS | sysmem.MAP_NORESERVE | sysmem.MAP_FIXED)

    def span(self, ref: int, count: int) -> memoryview | None:
        """One view of the ``count`` pages of ``ref`` onwards if every one is mapped here, else None."""
        i = ref - self.first
        if i < 0 or i + count > self.pages or self.placed.count(_PLACED, i, i + count) != count:
            return None
        return self._buffer[i * PAGE_SIZE:(i + count) * PAGE_SIZE]

    def vmas(self) -> int:
        """The VMAs the window's pages add to the process: one a mapping, and one more for each piece
        past the first they cut the reservation into (scattered references cost up to two a page; a
        run of neighbouring ones, one a page and one for the run).  What a backend's bound on its kept
        mappings charges (``backends/kept_mappings.py``)."""
        if self.closed:
            return 0
        used = self.placed.translate(_IN_USE)
        free_runs = used.count(b"\x01\x00") + (used[0] == 0)
        return self.placed.count(_PLACED) + max(0, free_runs - 1)

    def close(self) -> bool:
        """Give the address space back, once nothing is mapped in it; False (kept) while something is."""
        if self.closed:
            return True
        if self.placed.count(_PLACED):
            return False
        try:
            self._buffer.release()
        except BufferError:         # a span still held somewhere: the pages stay reserved
            return False
        # A lost page may be a hole some other mapping of the process has taken since: never unmap it.
        start = 0
        for end in [i for i, state in enumerate(self.placed) if state == _LOST] + [self.pages]:
            if end > start:
                sysmem.munmap(self.base + start * PAGE_SIZE, (end - start) * PAGE_SIZE)
            start = end + 1
        self.closed = True
        return True
