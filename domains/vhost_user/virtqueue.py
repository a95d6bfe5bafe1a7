"""Split virtqueues, device side, over guest memory reached through a bounded accessor.

Rules of this module:

* The guest (and its VMM) write the ring while we read it.  Every index is
  read once into a local, every descriptor is *copied* out of guest memory
  (an indirect table in one copy) and only the copy is validated and used:
  nothing is fetched twice.
* Every walk is bounded.  The avail index may run at most ``num`` ahead of
  us; a head and every ``next`` must be below the size of the table they
  index; a chain describes at most ``num`` buffers (the spec: "A driver MUST
  NOT create a descriptor chain longer than the Queue Size"), and since each
  step of the walk yields a buffer except the one step into an indirect
  table, no chain -- looped or not -- takes more than ``num + 1`` steps.
  A chain's total length is at most ``max_chain_bytes``.
* Memory is only touched through ``MemoryAccess`` (``memory.GuestMemory``),
  which refuses anything outside the memory table: a bad address is a
  rule broken by the guest, never a read or write elsewhere.
* No I/O: notifications are decisions (``should_notify``) the shell acts on.

Format (virtio 1.x, little-endian; ``num`` a power of two up to 32768)::

    desc[num]   : u64 addr, u32 len, u16 flags (NEXT=1, WRITE=2, INDIRECT=4), u16 next
    avail       : u16 flags (NO_INTERRUPT=1), u16 idx, u16 ring[num], u16 used_event
    used        : u16 flags (NO_NOTIFY=1), u16 idx, {u32 id, u32 len} ring[num], u16 avail_event

Chains.  Readable (driver -> device) buffers come first, writable
(device -> driver) ones after; a readable buffer after a writable one is an
error.  A chain may be zero or more direct descriptors followed by one
descriptor with INDIRECT (which must not also have NEXT, and whose WRITE flag
is ignored), whose table -- a multiple of 16 bytes, in guest memory -- holds
the rest; a table entry must not itself be INDIRECT.  A buffer must lie in
guest memory; it may cross from one region into an adjacent one when the
guest addresses are contiguous (``GuestMemory`` splits the access).

Errors: NEEDS_RESET.  A chain or ring that breaks these rules puts the queue
in NEEDS_RESET for good (virtio 1.x 2.1.2: the device "has encountered an
error from which it can't recover"): ``needs_reset`` holds the reason,
``pop`` returns None, ``push`` does nothing and the queue never touches guest
memory again; the bad chain is not completed.  A vhost-user back end cannot
set the device status itself, so the shell reports the state by signalling
the ring's err eventfd (QEMU prints "vhost vring error"), and the back end
reports DEVICE_NEEDS_RESET in GET_STATUS when STATUS was negotiated.  The
driver recovers by resetting the device, which stops this ring
(GET_VRING_BASE) and later starts a fresh queue.  A device's own mistakes
(pushing a head it does not hold, claiming more bytes written than the chain
offered) raise ``ValueError``: they are bugs, not guest behaviour.

Notifications follow Linux ``drivers/vhost/vhost.c`` and QEMU
``hw/virtio/virtio.c``: with EVENT_IDX, notify when ``vring_need_event(
used_event, new, old)`` where ``old`` is the used index at the last
notification; without it, unless the driver set ``VRING_AVAIL_F_NO_INTERRUPT``.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .inflight import InflightQueue
from .memory import GuestMemoryError, MemoryAccess, memory_barrier

__all__ = [
    "VIRTQ_DESC_F_NEXT", "VIRTQ_DESC_F_WRITE", "VIRTQ_DESC_F_INDIRECT", "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_USED_F_NO_NOTIFY", "MAX_QUEUE_SIZE", "DESC_SIZE", "DEFAULT_MAX_CHAIN_BYTES",
    "vring_need_event", "RingLayout", "Segment", "DescriptorChain", "SplitVirtqueue",
]

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
#: The largest split queue virtio allows.
MAX_QUEUE_SIZE = 32768
DESC_SIZE = 16
#: Default cap on a chain's total length (readable + writable): a block
#: request of the largest size Linux issues is a few MiB.
DEFAULT_MAX_CHAIN_BYTES = 64 << 20

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The virtio spec's / Linux's ``vring_need_event``: did ``[old, new)`` pass ``event_idx``?

    All arithmetic is on u16, so it holds across index wrap-around.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


@dataclass(frozen=True, slots=True, kw_only=True)
class RingLayout:
    """Where a split ring lives, in guest physical addresses."""
    num: int
    desc_gpa: int
    avail_gpa: int
    used_gpa: int

    def __post_init__(self) -> None:
        if not 1 <= self.num <= MAX_QUEUE_SIZE or self.num & (self.num - 1):
            raise ValueError(f"queue size {self.num} is not a power of two in 1..{MAX_QUEUE_SIZE}")

    @property
    def desc_size(self) -> int:
        return DESC_SIZE * self.num

    def avail_size(self, event_idx: bool = True) -> int:
        return 4 + 2 * self.num + (2 if event_idx else 0)

    def used_size(self, event_idx: bool = True) -> int:
        return 4 + 8 * self.num + (2 if event_idx else 0)


class Segment(NamedTuple):
    """One buffer of a chain: ``length`` bytes of guest memory at ``gpa``."""
    gpa: int
    length: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DescriptorChain:
    """A validated chain: the head to complete it with, and its buffers in order."""
    head: int
    readable: tuple[Segment, ...]
    writable: tuple[Segment, ...]

    @property
    def readable_bytes(self) -> int:
        return sum(s.length for s in self.readable)

    @property
    def writable_bytes(self) -> int:
        return sum(s.length for s in self.writable)


class _BadRing(Exception):
    """The guest broke a ring rule; the queue needs a reset."""


class SplitVirtqueue:
    """The device side of one split virtqueue.

    ``last_avail_idx`` is where to resume (SET_VRING_BASE); the used index is
    read from the ring itself, as QEMU and libvhost-user do.  With an
    ``inflight`` region the queue first recovers the heads a previous back
    end had in flight and ``pop`` hands those out again before anything new
    (``last_avail_idx`` is then the ring's used index plus their number, as
    libvhost-user computes it).  Not thread-safe: one thread pops and pushes.
    """

    def __init__(self, memory: MemoryAccess, layout: RingLayout, *, event_idx: bool, indirect_desc: bool,
                 last_avail_idx: int = 0, max_chain_bytes: int = DEFAULT_MAX_CHAIN_BYTES,
                 inflight: InflightQueue | None = None, barrier: Callable[[], None] = memory_barrier) -> None:
        if not 0 <= last_avail_idx <= 0xFFFF:
            raise ValueError(f"last_avail_idx {last_avail_idx} is not a u16")
        if max_chain_bytes <= 0:
            raise ValueError("max_chain_bytes must be positive")
        if inflight is not None and inflight.queue_size < layout.num:
            # QEMU sizes the area by its queue-size property; the driver may pick a smaller ring.
            raise ValueError("inflight region tracks fewer entries than the ring has")
        self._mem = memory
        self._layout = layout
        self._num = layout.num
        self._desc = layout.desc_gpa
        self._avail = layout.avail_gpa
        self._used = layout.used_gpa
        self._event_idx = event_idx
        self._indirect = indirect_desc
        self._max_bytes = max_chain_bytes
        self._inflight = inflight
        self._barrier = barrier
        self._last_avail = last_avail_idx
        self._used_idx = 0
        self._signalled_used = 0
        self._signalled_valid = False
        self._kicks_enabled = True
        self._needs_reset: str | None = None
        # head -> writable bytes of the chain handed out and not yet pushed
        self._in_use: dict[int, int] = {}
        self._resubmit: deque[int] = deque()
        try:
            for gpa, size in ((self._desc, layout.desc_size), (self._avail, layout.avail_size(event_idx)),
                              (self._used, layout.used_size(event_idx))):
                if not memory.contains(gpa, size):
                    raise _BadRing(f"ring part at {gpa:#x}+{size:#x} is not in guest memory")
            self._used_idx = self._read_u16(self._used + 2)
            self._signalled_used = self._used_idx
            if inflight is not None:
                # Entries past this ring's size can only be garbage left in the area.
                heads = [h for h in inflight.recover(self._used_idx) if h < self._num]
                self._resubmit.extend(heads)
                if heads:
                    self._last_avail = (self._used_idx + len(heads)) & 0xFFFF
        except (_BadRing, GuestMemoryError) as e:
            self._fail(str(e))

    # --- state ------------------------------------------------------------------

    @property
    def layout(self) -> RingLayout:
        return self._layout

    @property
    def memory(self) -> MemoryAccess:
        """The guest memory the chains' segments point into (bounded by the memory table)."""
        return self._mem

    @property
    def num(self) -> int:
        return self._num

    @property
    def last_avail_idx(self) -> int:
        """The next avail slot to fetch: what GET_VRING_BASE reports."""
        return self._last_avail

    @property
    def used_idx(self) -> int:
        return self._used_idx

    @property
    def in_flight(self) -> int:
        """Chains handed out by ``pop`` and not yet pushed."""
        return len(self._in_use)

    @property
    def pending_resubmissions(self) -> int:
        return len(self._resubmit)

    @property
    def needs_reset(self) -> str | None:
        """None while healthy; the reason once the guest broke the ring."""
        return self._needs_reset

    def _fail(self, reason: str) -> None:
        if self._needs_reset is None:
            self._needs_reset = reason

    def mark_needs_reset(self, reason: str) -> None:
        """Put the queue in NEEDS_RESET from outside (its ring left the memory table)."""
        self._fail(reason)

    # --- guest memory, little-endian --------------------------------------------------

    def _read_u16(self, gpa: int) -> int:
        return int(_U16.unpack(self._mem.read(gpa, 2))[0])

    def _write_u16(self, gpa: int, value: int) -> None:
        self._mem.write(gpa, _U16.pack(value & 0xFFFF))

    # --- the driver's side of the ring -----------------------------------------------

    def _avail_pending(self) -> int:
        avail_idx = self._read_u16(self._avail + 2)
        pending = (avail_idx - self._last_avail) & 0xFFFF
        if pending > self._num:
            raise _BadRing(f"avail index {avail_idx} is {pending} ahead of {self._last_avail}, ring holds {self._num}")
        return pending

    def has_available(self) -> bool:
        """True if ``pop`` has something to return (False once the queue needs a reset)."""
        if self._needs_reset is not None:
            return False
        if self._resubmit:
            return True
        try:
            return self._avail_pending() > 0
        except (_BadRing, GuestMemoryError) as e:
            self._fail(str(e))
            return False

    def pop(self) -> DescriptorChain | None:
        """The next available chain, validated; None if there is none or the queue needs a reset."""
        if self._needs_reset is not None:
            return None
        try:
            if self._resubmit:
                head = self._resubmit.popleft()
                chain = self._read_chain(head)
                self._in_use[head] = chain.writable_bytes
                return chain
            if self._avail_pending() == 0:
                return None
            head = self._read_u16(self._avail + 4 + 2 * (self._last_avail % self._num))
            if head >= self._num:
                raise _BadRing(f"avail ring offers head {head}, queue size is {self._num}")
            if head in self._in_use:
                raise _BadRing(f"avail ring offers head {head} while it is still in use")
            chain = self._read_chain(head)
            self._last_avail = (self._last_avail + 1) & 0xFFFF
            if self._event_idx and self._kicks_enabled:
                self._write_u16(self._used + 4 + 8 * self._num, self._last_avail)
            self._in_use[head] = chain.writable_bytes
            if self._inflight is not None:
                self._inflight.mark_in_flight(head)
            return chain
        except (_BadRing, GuestMemoryError) as e:
            self._fail(str(e))
            return None

    def _read_chain(self, head: int) -> DescriptorChain:
        num = self._num
        mem = self._mem
        readable: list[Segment] = []
        writable: list[Segment] = []
        total = 0
        table: bytes | None = None     # None: walking the ring's own table
        limit = num                    # size of the table being walked
        i = head
        for _ in range(num + 1):
            if table is None:
                raw = mem.read(self._desc + DESC_SIZE * i, DESC_SIZE)
            else:
                raw = table[DESC_SIZE * i:DESC_SIZE * (i + 1)]
            addr, length, flags, nxt = _DESC.unpack(raw)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if table is not None:
                    raise _BadRing(f"chain {head}: indirect descriptor inside an indirect table")
                if not self._indirect:
                    raise _BadRing(f"chain {head}: indirect descriptor but INDIRECT_DESC was not negotiated")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise _BadRing(f"chain {head}: indirect descriptor also has NEXT")
                if length == 0 or length % DESC_SIZE:
                    raise _BadRing(f"chain {head}: indirect table of {length} bytes is not a multiple of {DESC_SIZE}")
                entries = length // DESC_SIZE
                if len(readable) + len(writable) + entries > num:
                    raise _BadRing(f"chain {head}: indirect table of {entries} entries makes the chain longer"
                                   f" than the queue ({num})")
                if not mem.contains(addr, length):
                    raise _BadRing(f"chain {head}: indirect table at {addr:#x}+{length:#x} is outside guest memory")
                table = mem.read(addr, length)
                limit = entries
                i = 0
                continue
            if len(readable) + len(writable) >= num:
                raise _BadRing(f"chain {head} is longer than the queue ({num}) or loops")
            if not mem.contains(addr, length):
                raise _BadRing(f"chain {head}: buffer at {addr:#x}+{length:#x} is outside guest memory")
            total += length
            if total > self._max_bytes:
                raise _BadRing(f"chain {head} describes more than {self._max_bytes} bytes")
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append(Segment(addr, length))
            elif writable:
                raise _BadRing(f"chain {head}: a readable buffer follows a writable one")
            else:
                readable.append(Segment(addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(head=head, readable=tuple(readable), writable=tuple(writable))
            if nxt >= limit:
                raise _BadRing(f"chain {head}: next {nxt} is outside a table of {limit}")
            i = nxt
        raise _BadRing(f"chain {head} is longer than the queue ({num}) or loops")

    # --- completing ---------------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Complete one chain: ``written`` bytes were written into its writable buffers."""
        self.push_batch(((head, written),))

    def push_batch(self, completions: Sequence[tuple[int, int]]) -> None:
        """Complete several chains with one used-index update (entries first, then the index).

        Raises ``ValueError`` for a head not handed out by ``pop`` (or given
        twice) or a length beyond what the chain offered: device bugs.  Does
        nothing once the queue needs a reset.
        """
        if self._needs_reset is not None or not completions:
            return
        seen: set[int] = set()
        for head, written in completions:
            if head not in self._in_use or head in seen:
                raise ValueError(f"head {head} is not in use by the device")
            if not 0 <= written <= self._in_use[head]:
                raise ValueError(f"head {head}: {written} bytes written, the chain offered {self._in_use[head]}")
            seen.add(head)
        heads = [h for h, _ in completions]
        old = self._used_idx
        new = (old + len(completions)) & 0xFFFF
        try:
            for k, (head, written) in enumerate(completions):
                slot = (old + k) % self._num
                self._mem.write(self._used + 4 + 8 * slot, _USED_ELEM.pack(head, written))
            if self._inflight is not None:
                self._inflight.begin_batch(heads)
            # Entries are visible before the index that publishes them (stores are ordered on x86
            # and the writes above are plain stores).
            self._write_u16(self._used + 2, new)
        except GuestMemoryError as e:
            self._fail(str(e))
            return
        if self._inflight is not None:
            self._inflight.end_batch(heads, new)
        for h in heads:
            del self._in_use[h]
        self._used_idx = new
        # As QEMU's virtqueue_flush: once the index we last signalled at is more than half the u16
        # space behind, vring_need_event can no longer compare with it, so the next check notifies.
        since_signal = (new - self._signalled_used) & 0xFFFF
        if since_signal >= 0x8000:
            since_signal -= 0x10000
        if since_signal < ((new - old) & 0xFFFF):
            self._signalled_valid = False

    def should_notify(self) -> bool:
        """Whether to signal the call fd now, for what was pushed since the last notification.

        Call after ``push``/``push_batch``; a True answer is consumed (the
        next call only considers later pushes).
        """
        if self._needs_reset is not None:
            return False
        self._barrier()
        try:
            if not self._event_idx:
                return not (self._read_u16(self._avail) & VRING_AVAIL_F_NO_INTERRUPT)
            used_event = self._read_u16(self._avail + 4 + 2 * self._num)
        except GuestMemoryError as e:
            self._fail(str(e))
            return False
        valid, old = self._signalled_valid, self._signalled_used
        new = self._used_idx
        self._signalled_valid = True
        self._signalled_used = new
        return not valid or vring_need_event(used_event, new, old)

    # --- the device's side of kick suppression ------------------------------------------

    def set_kick_notifications(self, enabled: bool) -> bool:
        """Ask the driver to kick (or not) when it adds buffers.

        With EVENT_IDX this publishes ``avail_event`` (kick me once you pass
        ``last_avail_idx``), else it clears/sets ``VRING_USED_F_NO_NOTIFY``.
        When enabling, returns True if buffers arrived meanwhile: the caller
        must poll again or it may sleep on a kick that will never come.
        """
        self._kicks_enabled = enabled
        if self._needs_reset is not None:
            return False
        try:
            if self._event_idx:
                if enabled:
                    self._write_u16(self._used + 4 + 8 * self._num, self._last_avail)
            else:
                flags = self._read_u16(self._used)
                flags = flags & ~VRING_USED_F_NO_NOTIFY if enabled else flags | VRING_USED_F_NO_NOTIFY
                self._write_u16(self._used, flags)
        except GuestMemoryError as e:
            self._fail(str(e))
            return False
        if not enabled:
            return False
        self._barrier()
        return self.has_available()
