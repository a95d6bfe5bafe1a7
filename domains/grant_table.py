"""The granting side of a v1 grant table: entries written without a hypercall.

The table lives in frames shared between this domain and the broker only.
``grant_access`` fills a free entry (domid and frame first, flags last);
``end_access`` revokes it under the entry lock of ``grant_lock`` and refuses
while the broker has the entry pinned (GTF_reading/GTF_writing set), exactly
as Linux's ``gnttab_end_foreign_access_ref`` refuses.

An entry the broker has ever mapped for a grantee carries XDOM_GTF_mapped:
the grantee may have kept the page where no one can see it, so ending such
an entry hands its gfn to ``on_revoked`` (the xenhost swaps in a fresh frame
from the broker, contents copied) before the page is ours again.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from collections.abc import Callable

from .abi.grant_table import (
    ENTRIES_PER_FRAME,
    GNTTAB_NR_RESERVED_ENTRIES,
    GRANT_ENTRY_V1,
    GRANT_ENTRY_V1_SIZE,
    PAGE_SIZE,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_writing,
    XDOM_GTF_mapped,
)
from .hostsys import grant_lock

_FLAGS = struct.Struct("<H")


class GrantTableFull(Exception):
    """Every grant reference is in use."""


class GrantInUse(Exception):
    """The grantee still has the grant mapped; access cannot end yet."""


class GrantTable:
    """Granter-side view of a grant table memfd (this domain's own description).

    ``fd`` must be an open file description of its own (see grant_lock); the
    object takes ownership of it.
    """

    def __init__(self, fd: int, nr_frames: int) -> None:
        self.fd = fd
        self.nr_frames = nr_frames
        self.nr_entries = nr_frames * ENTRIES_PER_FRAME
        self._map = mmap.mmap(fd, nr_frames * PAGE_SIZE)
        self._lock = threading.Lock()
        # Reserved entries (console, xenstore, ...) are only handed out by
        # explicit reference; the free list starts after them.
        self._free = list(range(self.nr_entries - 1, GNTTAB_NR_RESERVED_ENTRIES - 1, -1))
        self.on_revoked: Callable[[int], None] | None = None

    def grant_access(self, domid: int, gfn: int, readonly: bool = False) -> int:
        """Grant ``domid`` access to frame ``gfn``; returns the reference."""
        with self._lock:
            if not self._free:
                raise GrantTableFull(f"all {self.nr_entries} grant references are in use")
            ref = self._free.pop()
        self.grant_access_ref(ref, domid, gfn, readonly)
        return ref

    def grant_access_ref(self, ref: int, domid: int, gfn: int, readonly: bool = False) -> None:
        """Fill entry ``ref`` (for reserved references such as xenstore's 1)."""
        self._check_ref(ref)
        off = ref * GRANT_ENTRY_V1_SIZE
        # domid and frame first, flags last: whoever sees the flags sees the rest.
        struct.pack_into("<HI", self._map, off + 2, domid, gfn)
        _FLAGS.pack_into(self._map, off, GTF_permit_access | (GTF_readonly if readonly else 0))

    def end_access(self, ref: int) -> None:
        """Revoke ``ref``; raises GrantInUse while it is mapped."""
        self._check_ref(ref)
        off = ref * GRANT_ENTRY_V1_SIZE
        grant_lock.lock_entry(self.fd, ref, wait=True)
        try:
            flags, _domid, gfn = GRANT_ENTRY_V1.unpack_from(self._map, off)
            if flags & (GTF_reading | GTF_writing):
                raise GrantInUse(f"grant {ref} is still mapped (flags {flags:#x})")
            _FLAGS.pack_into(self._map, off, 0)
        finally:
            grant_lock.unlock_entry(self.fd, ref)
        if flags & XDOM_GTF_mapped and flags & GTF_permit_access and self.on_revoked is not None:
            self.on_revoked(gfn)

    def try_end_access(self, ref: int) -> bool:
        try:
            self.end_access(ref)
        except GrantInUse:
            return False
        return True

    def release_ref(self, ref: int) -> None:
        """Return an ended, non-reserved reference to the free list."""
        self._check_ref(ref)
        if ref >= GNTTAB_NR_RESERVED_ENTRIES:
            with self._lock:
                self._free.append(ref)

    def end_and_release(self, ref: int) -> None:
        self.end_access(ref)
        self.release_ref(ref)

    def entry(self, ref: int) -> tuple[int, int, int]:
        """(flags, domid, frame) as the table holds them now."""
        self._check_ref(ref)
        return GRANT_ENTRY_V1.unpack_from(self._map, ref * GRANT_ENTRY_V1_SIZE)

    def _check_ref(self, ref: int) -> None:
        if not 0 <= ref < self.nr_entries:
            raise IndexError(f"grant reference {ref} outside 0..{self.nr_entries - 1}")

    def close(self) -> None:
        if self.fd >= 0:
            self._map.close()
            os.close(self.fd)
            self.fd = -1
