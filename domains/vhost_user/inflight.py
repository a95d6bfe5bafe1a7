"""The INFLIGHT_SHMFD area for split virtqueues: which requests a back end had in flight.

Rules of this module:

* The area is a shared memory buffer created by the back end
  (GET_INFLIGHT_FD), kept by the front end across back-end restarts and handed
  back (SET_INFLIGHT_FD).  The guest cannot reach it, but a restarted back end
  must not trust what a crashed one (or the front end) left there: every
  index read from it is bounded by the queue size we were told, every walk
  is bounded by that size, and a region smaller than its queues is refused.
* Layout, per ``docs/interop/vhost-user.rst`` ("Inflight I/O tracking"):
  one region per queue, each ``QueueRegionSplit``::

      u64 features      (0)
      u16 version       (1; 0 means "never initialised": a fresh area or a VM reset)
      u16 desc_num      (the queue size)
      u16 last_batch_head
      u16 used_idx      (the used ring's idx as of the last completed batch)
      DescStateSplit desc[desc_num], 16 bytes each:
          u8 inflight, u8 padding[5], u16 next, u64 counter

  in the machine's byte order.  Regions follow each other every
  ``queue_region_size(queue_size)`` bytes: the header and the array rounded up
  to 64 bytes (``INFLIGHT_ALIGNMENT``).  For the power-of-two queue sizes
  virtio allows this is the same stride libvhost-user (``ALIGN_UP(16 * n + 2,
  64)``) and DPDK (``ALIGN_UP(16 * n + 16, 64)``) compute, so an area
  written by either can be read back here.
* No I/O: the buffer is any writable memoryview (the shell's mapping of the
  memfd, or a bytearray in tests).

How a back end uses it (the spec's procedure): ``mark_in_flight(head)`` when a
chain is popped; ``begin_batch(heads)`` before publishing a batch of used
entries and ``end_batch(heads, used_idx)`` after the used index is written;
on (re)start, ``recover(used_idx_in_ring)`` returns the heads to resubmit in
the order they were first fetched.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

__all__ = [
    "INFLIGHT_ALIGNMENT", "INFLIGHT_VERSION", "QUEUE_HEADER_SIZE", "DESC_STATE_SIZE", "MAX_INFLIGHT_SIZE",
    "queue_region_size", "area_size", "InflightQueue", "InflightArea",
]

INFLIGHT_ALIGNMENT = 64
INFLIGHT_VERSION = 1
_HEADER = struct.Struct("=QHHHH")       # features, version, desc_num, last_batch_head, used_idx
_DESC = struct.Struct("=B5xHQ")         # inflight, padding[5], next, counter
QUEUE_HEADER_SIZE = _HEADER.size
DESC_STATE_SIZE = _DESC.size
#: Largest area we create or accept: 64 queues of 32768 entries is 32 MiB.
MAX_INFLIGHT_SIZE = 64 << 20

_OFF_VERSION = 8
_OFF_DESC_NUM = 10
_OFF_LAST_BATCH_HEAD = 12
_OFF_USED_IDX = 14
_U16 = struct.Struct("=H")
_U64 = struct.Struct("=Q")


def queue_region_size(queue_size: int) -> int:
    """Bytes one queue's region takes, alignment included."""
    raw = QUEUE_HEADER_SIZE + DESC_STATE_SIZE * queue_size
    return (raw + INFLIGHT_ALIGNMENT - 1) // INFLIGHT_ALIGNMENT * INFLIGHT_ALIGNMENT


def area_size(num_queues: int, queue_size: int) -> int:
    return num_queues * queue_region_size(queue_size)


class InflightQueue:
    """One queue's ``QueueRegionSplit`` inside the shared area."""

    def __init__(self, region: memoryview, queue_size: int) -> None:
        if not 1 <= queue_size <= 32768:
            raise ValueError(f"queue size {queue_size} out of range")
        if region.nbytes < queue_region_size(queue_size):
            raise ValueError("inflight region shorter than its queue needs")
        self._mv = region
        self._n = queue_size
        #: Value given to the next head fetched: it orders resubmission.
        self.counter = 0

    @property
    def queue_size(self) -> int:
        return self._n

    def _u16(self, off: int) -> int:
        return int(_U16.unpack_from(self._mv, off)[0])

    def _set_u16(self, off: int, v: int) -> None:
        _U16.pack_into(self._mv, off, v & 0xFFFF)

    def _desc_off(self, head: int) -> int:
        return QUEUE_HEADER_SIZE + DESC_STATE_SIZE * head

    @property
    def version(self) -> int:
        return self._u16(_OFF_VERSION)

    @property
    def used_idx(self) -> int:
        return self._u16(_OFF_USED_IDX)

    @property
    def last_batch_head(self) -> int:
        return self._u16(_OFF_LAST_BATCH_HEAD)

    def is_in_flight(self, head: int) -> bool:
        self._check_head(head)
        return self._mv[self._desc_off(head)] != 0

    def desc_counter(self, head: int) -> int:
        self._check_head(head)
        return int(_U64.unpack_from(self._mv, self._desc_off(head) + 8)[0])

    def _check_head(self, head: int) -> None:
        if not 0 <= head < self._n:
            raise ValueError(f"head {head} outside a queue of {self._n}")

    def initialize(self, used_idx: int = 0) -> None:
        """Start a fresh region: nothing in flight, the used index as the ring has it."""
        _HEADER.pack_into(self._mv, 0, 0, INFLIGHT_VERSION, self._n, 0, used_idx & 0xFFFF)
        self._mv[QUEUE_HEADER_SIZE:QUEUE_HEADER_SIZE + DESC_STATE_SIZE * self._n] = \
            bytes(DESC_STATE_SIZE * self._n)
        self.counter = 0

    def mark_in_flight(self, head: int) -> None:
        """A chain with this head was fetched from the avail ring.

        The counter is written before the flag, so a crash between the two
        leaves the entry not in flight rather than in flight with a stale order.
        """
        self._check_head(head)
        off = self._desc_off(head)
        _U64.pack_into(self._mv, off + 8, self.counter)
        self.counter = (self.counter + 1) & ((1 << 64) - 1)
        self._mv[off] = 1

    def begin_batch(self, heads: Sequence[int]) -> None:
        """Link the heads about to be published as used into the last-batch list."""
        last = self.last_batch_head
        for head in heads:
            self._check_head(head)
            off = self._desc_off(head)
            _U16.pack_into(self._mv, off + 6, last)
            last = head
        self._set_u16(_OFF_LAST_BATCH_HEAD, last)

    def end_batch(self, heads: Sequence[int], used_idx: int) -> None:
        """The used index now covers ``heads``: they are no longer in flight."""
        for head in heads:
            self._check_head(head)
            self._mv[self._desc_off(head)] = 0
        self._set_u16(_OFF_USED_IDX, used_idx)

    def recover(self, ring_used_idx: int) -> list[int]:
        """After a (re)connect: the heads to resubmit, oldest first.

        A region never initialised (version 0) is initialised and has nothing
        to resubmit.  If the used ring is ahead of ``used_idx`` the last batch
        was published but not yet cleared here: its entries (walked from
        ``last_batch_head``, at most that many steps) are not in flight.
        """
        ring_used_idx &= 0xFFFF
        if self.version == 0:
            self.initialize(ring_used_idx)
            return []
        # The area may come from another back end: make desc_num ours.
        self._set_u16(_OFF_DESC_NUM, self._n)
        if self.used_idx != ring_used_idx:
            batch = (ring_used_idx - self.used_idx) & 0xFFFF
            head = self.last_batch_head
            for _ in range(min(batch, self._n)):
                if head >= self._n:
                    break
                off = self._desc_off(head)
                self._mv[off] = 0
                head = self._u16(off + 6)
            self._set_u16(_OFF_USED_IDX, ring_used_idx)
        found: list[tuple[int, int]] = []
        for head in range(self._n):
            off = self._desc_off(head)
            if self._mv[off]:
                self._mv[off] = 1
                found.append((int(_U64.unpack_from(self._mv, off + 8)[0]), head))
        found.sort()
        self.counter = (found[-1][0] + 1) & ((1 << 64) - 1) if found else 0
        return [head for _, head in found]


class InflightArea:
    """The whole shared area: ``num_queues`` regions of ``queue_region_size(queue_size)`` bytes."""

    def __init__(self, buffer: memoryview | bytearray, num_queues: int, queue_size: int) -> None:
        mv = memoryview(buffer).cast("B")
        if mv.readonly:
            raise ValueError("inflight area must be writable")
        if not 1 <= num_queues <= 64 or not 1 <= queue_size <= 32768 or queue_size & (queue_size - 1):
            raise ValueError(f"bad inflight geometry: {num_queues} queues of {queue_size}")
        need = area_size(num_queues, queue_size)
        if need > MAX_INFLIGHT_SIZE or mv.nbytes < need:
            raise ValueError(f"inflight area of {mv.nbytes} bytes, {num_queues} queues of {queue_size} need {need}")
        self._mv = mv
        self.num_queues = num_queues
        self.queue_size = queue_size
        stride = queue_region_size(queue_size)
        self._queues = [InflightQueue(mv[i * stride:(i + 1) * stride], queue_size) for i in range(num_queues)]

    def queue(self, index: int) -> InflightQueue:
        return self._queues[index]

    def release(self) -> None:
        """Drop every view into the buffer (before the shell unmaps it)."""
        for q in self._queues:
            q._mv = memoryview(b"")
        self._queues = []
        self._mv = memoryview(b"")
