"""The VM's memory as a vhost-user back end sees it: a table of regions and a bounded accessor.

Rules of this module:

* Nothing here is trusted.  Region descriptions come from the front end
  (the VMM) and every address handed to ``GuestMemory`` comes from the
  guest's rings.  A region is checked when it enters the table (non-empty,
  bounded, no 64-bit wrap-around, no overlap with another region in either
  address space); an access is checked against the table before a byte
  moves, and an access that is not wholly inside mapped regions raises
  ``GuestMemoryError`` -- nothing is read or written in that case.
* Everything is bounded: at most ``MAX_REGIONS`` regions, each at most
  ``MAX_REGION_SIZE`` bytes; a single read at most ``MAX_ACCESS_SIZE``.
* No I/O.  The I/O shell mmaps a region's fd (``MemoryRegion.mapping_length``
  bytes from file offset 0, as libvhost-user does, because ``mmap_offset``
  need not be page aligned) and hands the view in with ``attach``; until
  then the region is in the table but unreachable.

Two address spaces, as the vhost-user spec defines them: *guest physical
addresses* (GPAs; what descriptors carry) and *user addresses* (UVAs; the
front end's own virtual addresses, which SET_VRING_ADDR carries).  Each region
maps a range of both onto the same bytes of its fd.

Concurrency: the guest writes its memory while we read it.  ``read`` returns a
copy (``bytes``), so a caller validates what it copied, never the live memory
(the XSA-155 double-fetch lesson).  The object itself is not thread-safe, and a
region must only be detached (then unmapped) when no other thread is inside
``read``/``write``: a view over unmapped memory faults the whole process.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "MAX_REGIONS", "MAX_REGION_SIZE", "MAX_MMAP_OFFSET", "MAX_ACCESS_SIZE", "U64_LIMIT",
    "MemoryRegion", "GuestMemoryError", "MemoryTableError", "MemoryAccess", "GuestMemory",
    "memory_barrier",
]

#: Most regions one table holds: what GET_MAX_MEM_SLOTS announces when
#: CONFIGURE_MEM_SLOTS is negotiated.  Each region costs the shell one mapping.
MAX_REGIONS = 32
#: Largest region accepted (1 TiB): far above any VM xdom runs, far below a
#: size whose arithmetic could surprise anyone.
MAX_REGION_SIZE = 1 << 40
#: Largest single ``read``: callers copy descriptor tables and request headers,
#: not bulk data; bulk data goes region-piece by region-piece (``spans``).
MAX_ACCESS_SIZE = 64 << 20
#: Largest offset of a region inside its fd: the shell maps offset+size bytes.
MAX_MMAP_OFFSET = 1 << 40
U64_LIMIT = 1 << 64


class GuestMemoryError(Exception):
    """An access touched memory outside the mapped regions of the table."""


class MemoryTableError(ValueError):
    """A region cannot enter the table (bad bounds, overlap, table full)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryRegion:
    """One region as the front end described it (``VhostUserMemoryRegion``).

    ``mmap_offset`` is where the region starts inside the fd; the shell maps
    ``mapping_length`` bytes from offset 0 and the region is the tail of that.
    """
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    @property
    def mapping_length(self) -> int:
        return self.mmap_offset + self.memory_size

    @property
    def gpa_end(self) -> int:
        return self.guest_phys_addr + self.memory_size

    @property
    def uva_end(self) -> int:
        return self.userspace_addr + self.memory_size

    def check(self) -> None:
        """Raise ``MemoryTableError`` unless the region can be mapped and addressed safely."""
        for name in ("guest_phys_addr", "memory_size", "userspace_addr", "mmap_offset"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v < U64_LIMIT:
                raise MemoryTableError(f"region {name} {v!r} is not a u64")
        if not 0 < self.memory_size <= MAX_REGION_SIZE:
            raise MemoryTableError(f"region size {self.memory_size:#x} not in 1..{MAX_REGION_SIZE:#x}")
        if self.gpa_end > U64_LIMIT or self.uva_end > U64_LIMIT:
            raise MemoryTableError("region wraps around the 64-bit address space")
        if self.mmap_offset > MAX_MMAP_OFFSET:
            raise MemoryTableError(f"region mmap offset {self.mmap_offset:#x} exceeds {MAX_MMAP_OFFSET:#x}")

    def same_range(self, other: MemoryRegion) -> bool:
        """REM_MEM_REG identifies a region by GPA, UVA and size; the mmap offset is ignored."""
        return (self.guest_phys_addr == other.guest_phys_addr and self.userspace_addr == other.userspace_addr
                and self.memory_size == other.memory_size)


class MemoryAccess(Protocol):
    """What virtqueue code needs from guest memory (``GuestMemory`` implements it)."""

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None: ...

    def contains(self, gpa: int, length: int) -> bool: ...


_barrier_lock = threading.Lock()


def memory_barrier() -> None:
    """A full memory barrier between our stores and later loads of shared memory.

    The split ring needs one where the device publishes ``used.idx`` and then
    reads ``used_event`` (or ``avail.flags``) to decide whether to notify: on
    x86 a store may be reordered after a later load, and the driver runs the
    mirror-image sequence, so without a barrier both sides can miss each
    other's update and a notification is lost.  Python has no fence
    instruction; acquiring and releasing a lock executes a locked
    read-modify-write, which is a full barrier on x86 (and the lock
    implementation's acquire/release pair orders memory on every platform).
    """
    with _barrier_lock:
        pass


class _Slot:
    __slots__ = ("region", "view")

    def __init__(self, region: MemoryRegion) -> None:
        self.region = region
        self.view: memoryview | None = None


class GuestMemory:
    """The memory table plus the views the shell mapped: bounded reads and writes by GPA.

    Regions are numbered by *slot*, a handle that stays valid until the region
    is removed and is never reused for another region (so a late action about
    an old slot cannot hit a new one).
    """

    def __init__(self, max_regions: int = MAX_REGIONS) -> None:
        if not 1 <= max_regions <= MAX_REGIONS:
            raise ValueError(f"max_regions must be in 1..{MAX_REGIONS}")
        self._max = max_regions
        self._slots: dict[int, _Slot] = {}
        self._next_slot = 0
        # Sorted (gpa, slot) of mapped-or-not regions, for bisect lookups.
        self._by_gpa: list[tuple[int, int]] = []

    # --- the table --------------------------------------------------------------

    @property
    def max_regions(self) -> int:
        return self._max

    def __len__(self) -> int:
        return len(self._slots)

    def regions(self) -> dict[int, MemoryRegion]:
        """slot -> region, for every region in the table."""
        return {s: e.region for s, e in self._slots.items()}

    def is_mapped(self, slot: int) -> bool:
        e = self._slots.get(slot)
        return e is not None and e.view is not None

    def check_new(self, region: MemoryRegion) -> None:
        """Raise ``MemoryTableError`` if ``region`` could not be added now."""
        region.check()
        if len(self._slots) >= self._max:
            raise MemoryTableError(f"memory table full ({self._max} regions)")
        for e in self._slots.values():
            r = e.region
            if region.guest_phys_addr < r.gpa_end and r.guest_phys_addr < region.gpa_end:
                raise MemoryTableError(f"region at GPA {region.guest_phys_addr:#x} overlaps one at"
                                       f" {r.guest_phys_addr:#x}")
            if region.userspace_addr < r.uva_end and r.userspace_addr < region.uva_end:
                raise MemoryTableError(f"region at UVA {region.userspace_addr:#x} overlaps one at"
                                       f" {r.userspace_addr:#x}")

    def add(self, region: MemoryRegion) -> int:
        """Enter ``region`` in the table (unmapped) and return its slot."""
        self.check_new(region)
        slot = self._next_slot
        self._next_slot += 1
        self._slots[slot] = _Slot(region)
        bisect.insort(self._by_gpa, (region.guest_phys_addr, slot))
        return slot

    def remove(self, slot: int) -> MemoryRegion:
        """Forget a region (its view is dropped; the shell then unmaps it)."""
        e = self._slots.pop(slot)
        self._by_gpa.remove((e.region.guest_phys_addr, slot))
        e.view = None
        return e.region

    def find(self, region: MemoryRegion) -> int | None:
        """The slot of the region with the same GPA, UVA and size, if any."""
        for s, e in self._slots.items():
            if e.region.same_range(region):
                return s
        return None

    def attach(self, slot: int, mapping: memoryview) -> None:
        """Make a region reachable through the shell's mapping of ``mapping_length`` bytes."""
        e = self._slots[slot]
        mv = memoryview(mapping).cast("B") if mapping.format != "B" else mapping
        if mv.readonly:
            raise ValueError("guest memory must be mapped writable")
        if mv.nbytes < e.region.mapping_length:
            raise ValueError(f"mapping of {mv.nbytes} bytes is shorter than the region's {e.region.mapping_length}")
        e.view = mv[e.region.mmap_offset:e.region.mapping_length]

    def detach(self, slot: int) -> None:
        e = self._slots.get(slot)
        if e is not None:
            e.view = None

    # --- translation ------------------------------------------------------------

    def _slot_at_gpa(self, gpa: int) -> _Slot | None:
        i = bisect.bisect_right(self._by_gpa, (gpa, 1 << 62)) - 1
        if i < 0:
            return None
        e = self._slots[self._by_gpa[i][1]]
        return e if gpa < e.region.gpa_end else None

    def uva_to_gpa(self, uva: int, length: int) -> int:
        """Translate a front-end user address range that must lie in one region.

        Raises ``GuestMemoryError`` if no single region holds ``[uva, uva+length)``.
        """
        if not (0 <= uva < U64_LIMIT and 0 <= length <= MAX_REGION_SIZE):
            raise GuestMemoryError(f"user address {uva:#x}+{length:#x} out of range")
        for e in self._slots.values():
            r = e.region
            if r.userspace_addr <= uva and uva + length <= r.uva_end:
                return r.guest_phys_addr + (uva - r.userspace_addr)
        raise GuestMemoryError(f"user address range {uva:#x}+{length:#x} is not inside one region")

    def spans(self, gpa: int, length: int) -> list[tuple[memoryview, int, int]]:
        """The pieces ``(region view, offset, length)`` that cover ``[gpa, gpa+length)``.

        Contiguous guest ranges may cross from one region into the next one;
        a gap or an unmapped region anywhere raises ``GuestMemoryError``.
        """
        if not (isinstance(gpa, int) and isinstance(length, int)) or gpa < 0 or length < 0 \
                or gpa + length > U64_LIMIT:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} out of range")
        out: list[tuple[memoryview, int, int]] = []
        # At most one piece per region: the loop is bounded by the table size.
        for _ in range(len(self._slots) + 1):
            if length == 0:
                return out
            e = self._slot_at_gpa(gpa)
            if e is None or e.view is None:
                raise GuestMemoryError(f"guest address {gpa:#x} is not in mapped guest memory")
            off = gpa - e.region.guest_phys_addr
            n = min(length, e.region.memory_size - off)
            out.append((e.view, off, n))
            gpa += n
            length -= n
        if length:
            raise GuestMemoryError("guest range crosses more regions than the table holds")
        return out

    def contains(self, gpa: int, length: int) -> bool:
        """True if every byte of ``[gpa, gpa+length)`` is in mapped guest memory."""
        try:
            self.spans(gpa, length)
        except GuestMemoryError:
            return False
        return True

    # --- access -----------------------------------------------------------------

    def read(self, gpa: int, length: int) -> bytes:
        """A copy of ``length`` bytes at ``gpa`` (at most ``MAX_ACCESS_SIZE``)."""
        if not 0 <= length <= MAX_ACCESS_SIZE:
            raise GuestMemoryError(f"read of {length} bytes exceeds {MAX_ACCESS_SIZE}")
        e = self._slot_at_gpa(gpa) if length else None
        if e is not None and e.view is not None:
            off = gpa - e.region.guest_phys_addr
            if off + length <= e.region.memory_size:   # the common case: one region
                return bytes(e.view[off:off + length])
        return b"".join(bytes(v[o:o + n]) for v, o, n in self.spans(gpa, length))

    def read_into(self, gpa: int, dest: memoryview) -> None:
        """Copy guest bytes into ``dest`` without an intermediate ``bytes`` (no size cap)."""
        dest = memoryview(dest).cast("B")
        pos = 0
        for v, o, n in self.spans(gpa, dest.nbytes):
            dest[pos:pos + n] = v[o:o + n]
            pos += n

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``gpa``; all or nothing with respect to the table check."""
        src = memoryview(data).cast("B")
        pos = 0
        for v, o, n in self.spans(gpa, src.nbytes):
            v[o:o + n] = src[pos:pos + n]
            pos += n
