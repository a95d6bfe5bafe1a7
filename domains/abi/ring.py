"""Xen's shared I/O ring (``xen/io/ring.h``), sans-IO.

A shared ring is a 64-byte header (``req_prod``, ``req_event``,
``rsp_prod``, ``rsp_event``, then padding) followed by a power-of-two
number of slots, each as large as the bigger of the request and response
structures.  Indices are free-running u32 counters; a slot is
``index & (size - 1)``.  Front and back each keep private counters
(``req_prod_pvt``/``rsp_cons`` and ``rsp_prod_pvt``/``req_cons``) and
publish with ``*_PUSH_*_AND_CHECK_NOTIFY``, which tells whether the peer
asked to be woken (``*_event``): that is how notification suppression
saves a cross-CPU wakeup per request.

The ring may span several pages that are *not* contiguous in our address
space (a backend maps each granted ring page separately), so the ring works
over a list of page buffers and splits a slot that straddles two pages.

Nothing here trusts the peer: every index read from shared memory is read
once, checked against what is possible (``RING_REQUEST_PROD_OVERFLOW``),
and slots are copied out before anyone looks at them (RING_COPY_REQUEST,
the XSA-155 lesson).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Literal

PAGE_SIZE = 4096
RING_HEADER_SIZE = 64          # offsetof(struct X_sring, ring)

# Indices are read and written through a memoryview cast to "I": element
# access copies the four bytes with one aligned load or store, which x86
# performs atomically.  ``struct.pack_into`` must not be used on shared
# indices: it zeroes the destination before packing, so a peer can read 0.
_REQ_PROD, _REQ_EVENT, _RSP_PROD, _RSP_EVENT = 0, 4, 8, 12
_MASK32 = 0xFFFFFFFF

# A full barrier between a store and a later load (the ``mb()`` in ring.h's
# final checks).  x86 may let a load pass an earlier store; a lock-prefixed
# instruction orders them, and acquiring a mutex executes one.
_barrier_lock = threading.Lock()


def mb() -> None:
    """Full memory barrier (x86: any locked instruction)."""
    _barrier_lock.acquire()
    _barrier_lock.release()


def round_down_pow2(n: int) -> int:
    """``__RD32``: the largest power of two not above ``n`` (0 for 0)."""
    return 1 << (n.bit_length() - 1) if n > 0 else 0


def ring_size(nr_pages: int, req_size: int, rsp_size: int) -> int:
    """``__CONST_RING_SIZE`` for a ring of ``nr_pages`` pages."""
    slot = max(req_size, rsp_size)
    return round_down_pow2((nr_pages * PAGE_SIZE - RING_HEADER_SIZE) // slot)


class RingOverflow(Exception):
    """The peer published an index that cannot be right; the ring is unusable."""


#: memoryview formats by item size: a run of equal-length responses is laid at a slot's stride as items
_STRIDE_FORMATS: dict[int, Literal["B", "H", "I", "Q"]] = {1: "B", 2: "H", 4: "I", 8: "Q"}


class SharedRing:
    """The shared pages: slot access that copies in and out, and the four indices."""

    def __init__(self, pages: Sequence[memoryview], req_size: int, rsp_size: int) -> None:
        if not pages:
            raise ValueError("a ring needs at least one page")
        self.pages = [p.cast("B") if p.format != "B" else p for p in pages]
        self.page_len = len(self.pages[0])
        if any(len(p) != self.page_len for p in self.pages) or self.page_len % PAGE_SIZE:
            raise ValueError("ring pages must be whole pages of one size")
        self.req_size = req_size
        self.rsp_size = rsp_size
        self.slot_size = max(req_size, rsp_size)
        total = self.page_len * len(self.pages)
        self.size = round_down_pow2((total - RING_HEADER_SIZE) // self.slot_size)
        if self.size == 0:
            raise ValueError("ring pages too small for one slot")
        self.mask = self.size - 1
        self._head = self.pages[0]
        self._single = len(self.pages) == 1

    # indices (all in the first page) ------------------------------------
    # A short-lived cast per access: a view kept on the page would pin the
    # mapping (an mmap cannot close, a grant view cannot be released under it).
    def get(self, off: int) -> int:
        return self._head[off:off + 4].cast("I")[0]

    def set(self, off: int, value: int) -> None:
        self._head[off:off + 4].cast("I")[0] = value & _MASK32

    def init(self) -> None:
        """``SHARED_RING_INIT``: zero the header, event thresholds at 1."""
        self._head[:RING_HEADER_SIZE] = bytes(RING_HEADER_SIZE)
        self.set(_REQ_EVENT, 1)
        self.set(_RSP_EVENT, 1)

    # slots ----------------------------------------------------------------
    def read_slot(self, idx: int, length: int) -> bytes:
        off = RING_HEADER_SIZE + (idx & self.mask) * self.slot_size
        if self._single:
            return bytes(self._head[off:off + length])
        out = bytearray()
        while length:
            page, in_page = divmod(off, self.page_len)
            chunk = min(length, self.page_len - in_page)
            out += self.pages[page][in_page:in_page + chunk]
            off += chunk
            length -= chunk
        return bytes(out)

    def read_slots(self, idx: int, n: int, length: int) -> list[bytes]:
        """``n`` consecutive slots from ``idx``, ``length`` bytes each: each byte copied once, in one go.

        On a one-page ring the slots are contiguous but for the wrap, so
        this is one or two copies of the region and slices of that copy
        (the peer's later writes cannot reach what we validate).
        """
        if not self._single or n <= 1:
            return [self.read_slot(idx + i, length) for i in range(n)]
        slot = self.slot_size
        raw = self.read_run(idx, n)
        if length == slot:
            return [raw[i:i + slot] for i in range(0, n * slot, slot)]
        return [raw[i:i + length] for i in range(0, n * slot, slot)]

    def read_run(self, idx: int, n: int) -> bytes:
        """``n`` whole consecutive slots from ``idx``, end to end in one copy (two at the wrap)."""
        slot = self.slot_size
        if not self._single:
            return b"".join([self.read_slot(idx + i, slot) for i in range(n)])
        first = idx & self.mask
        head = self._head
        run = min(n, self.size - first)
        start = RING_HEADER_SIZE + first * slot
        raw = bytes(head[start:start + run * slot])
        if run < n:
            raw += bytes(head[RING_HEADER_SIZE:RING_HEADER_SIZE + (n - run) * slot])
        return raw

    def write_slots(self, idx: int, datas: Sequence[bytes]) -> None:
        """Each of ``datas`` into consecutive slots from ``idx``: only its own bytes, the rest of a slot
        stays as it was (a response shorter than its slot leaves the request's tail alone)."""
        if not self._single:
            for i, data in enumerate(datas):
                self.write_slot(idx + i, data)
            return
        head, mask, slot = self._head, self.mask, self.slot_size
        lengths = set(map(len, datas))
        length = lengths.pop() if len(lengths) == 1 else 0
        if len(datas) > 1 and length == slot:
            self.write_run(idx, b"".join(datas))       # whole slots (an RX response, a request)
            return
        if len(datas) > 2 and length in _STRIDE_FORMATS and not slot % length:
            # equal responses shorter than a slot (TX's 4 bytes in 12): laid over a copy of the slots
            # at the slot's stride, the copy written back (the slots are ours until the peer consumes)
            self._overlay(idx, datas, length)
            return
        for i, data in enumerate(datas):
            off = RING_HEADER_SIZE + ((idx + i) & mask) * slot
            head[off:off + len(data)] = data

    def _overlay(self, idx: int, datas: Sequence[bytes], length: int) -> None:
        head, slot, n = self._head, self.slot_size, len(datas)
        fmt = _STRIDE_FORMATS[length]
        first = idx & self.mask
        run = min(n, self.size - first)
        items = memoryview(b"".join(datas)).cast(fmt)
        per = slot // length            # items of ``length`` bytes per slot
        for at, start, count in ((first, 0, run), (0, run, n - run)):
            if not count:
                continue
            off = RING_HEADER_SIZE + at * slot
            region = bytearray(head[off:off + count * slot])
            memoryview(region).cast(fmt)[0::per] = items[start:start + count]
            head[off:off + count * slot] = region

    def write_run(self, idx: int, blob: bytes) -> None:
        """Whole slots from ``idx``, packed end to end in ``blob`` (a multiple of the slot size): one or
        two copies (split at the wrap) on a one-page ring."""
        slot = self.slot_size
        if not self._single:
            self.write_slots(idx, [blob[i:i + slot] for i in range(0, len(blob), slot)])
            return
        first = idx & self.mask
        run = min(len(blob), (self.size - first) * slot)
        start = RING_HEADER_SIZE + first * slot
        head = self._head
        head[start:start + run] = blob[:run]
        if run < len(blob):
            head[RING_HEADER_SIZE:RING_HEADER_SIZE + len(blob) - run] = blob[run:]

    def write_slot(self, idx: int, data: bytes) -> None:
        off = RING_HEADER_SIZE + (idx & self.mask) * self.slot_size
        if self._single:
            self._head[off:off + len(data)] = data
            return
        view = memoryview(data)
        while view:
            page, in_page = divmod(off, self.page_len)
            chunk = min(len(view), self.page_len - in_page)
            self.pages[page][in_page:in_page + chunk] = view[:chunk]
            off += chunk
            view = view[chunk:]


class FrontRing:
    """The frontend's end: produces requests, consumes responses."""

    def __init__(self, shared: SharedRing, init: bool = True) -> None:
        self.shared = shared
        self.size = shared.size
        if init:
            shared.init()
        self.req_prod_pvt = shared.get(_REQ_PROD) if not init else 0
        self.rsp_cons = shared.get(_RSP_PROD) if not init else 0

    def free_requests(self) -> int:
        return self.size - ((self.req_prod_pvt - self.rsp_cons) & _MASK32)

    def full(self) -> bool:
        return self.free_requests() == 0

    def put_request(self, data: bytes) -> None:
        shared = self.shared
        if len(data) > shared.req_size:
            raise ValueError("request larger than a slot")
        prod = self.req_prod_pvt
        if ((prod - self.rsp_cons) & _MASK32) >= self.size:
            raise RingOverflow("ring full")
        if shared._single:
            off = RING_HEADER_SIZE + (prod & shared.mask) * shared.slot_size
            shared._head[off:off + len(data)] = data
        else:
            shared.write_slot(prod, data)
        self.req_prod_pvt = (prod + 1) & _MASK32

    def put_requests(self, datas: Sequence[bytes]) -> None:
        """:meth:`put_request` for each of ``datas``, checked once for the batch."""
        n = len(datas)
        if n and max(map(len, datas)) > self.shared.req_size:
            raise ValueError("request larger than a slot")
        if self.free_requests() < n:
            raise RingOverflow("ring full")
        self.shared.write_slots(self.req_prod_pvt, datas)
        self.req_prod_pvt = (self.req_prod_pvt + n) & _MASK32

    def push_requests(self) -> bool:
        """``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY``: publish; True if the backend wants an event."""
        old = self.shared.get(_REQ_PROD)
        new = self.req_prod_pvt
        self.shared.set(_REQ_PROD, new)      # x86 stores stay in order: slots are visible first
        mb()
        event = self.shared.get(_REQ_EVENT)
        return ((new - event) & _MASK32) < ((new - old) & _MASK32)

    def unconsumed_responses(self) -> int:
        avail = (self.shared.get(_RSP_PROD) - self.rsp_cons) & _MASK32
        in_flight = (self.req_prod_pvt - self.rsp_cons) & _MASK32
        if avail > in_flight:
            raise RingOverflow(f"backend produced {avail} responses for {in_flight} requests")
        return avail

    def take_responses(self) -> list[bytes]:
        """Copy out every published response and consume it."""
        n = self.unconsumed_responses()
        out = self.shared.read_slots(self.rsp_cons, n, self.shared.rsp_size) if n else []
        self.rsp_cons = (self.rsp_cons + n) & _MASK32
        return out

    def take_response_run(self) -> bytes:
        """:meth:`take_responses` as one copy of their slots, end to end (whole slots: a response
        shorter than its slot comes with the rest of the slot)."""
        n = self.unconsumed_responses()
        out = self.shared.read_run(self.rsp_cons, n) if n else b""
        self.rsp_cons = (self.rsp_cons + n) & _MASK32
        return out

    def ignore_responses(self) -> None:
        """Ask the backend for no event on its next responses: rsp_event half the index space away.

        For a frontend that reaps responses on its own schedule and needs
        an event only when it is waiting for one (netfront's transmit
        completions: Linux reaps them on each transmit too).  The backend's
        ``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`` never crosses that
        threshold with at most a ring of requests outstanding;
        :meth:`final_check_for_responses` asks again.
        """
        self.shared.set(_RSP_EVENT, self.rsp_cons + 0x80000000)

    def final_check_for_responses(self) -> bool:
        """``RING_FINAL_CHECK_FOR_RESPONSES``: re-arm rsp_event; True if more arrived meanwhile."""
        if self.unconsumed_responses():
            return True
        self.shared.set(_RSP_EVENT, self.rsp_cons + 1)
        mb()
        return bool(self.unconsumed_responses())


class BackRing:
    """The backend's end: consumes requests, produces responses.

    ``take_requests`` raises :class:`RingOverflow` when the frontend's
    ``req_prod`` runs more than a ring ahead of our responses
    (``RING_REQUEST_PROD_OVERFLOW``): Linux disconnects the device then,
    and so should the caller.
    """

    def __init__(self, shared: SharedRing) -> None:
        self.shared = shared
        self.size = shared.size
        # Attaching to a ring a previous backend may have used: carry on from
        # what it answered (responses pushed are requests consumed).
        self.rsp_prod_pvt = shared.get(_RSP_PROD)
        self.req_cons = self.rsp_prod_pvt

    def unconsumed_requests(self) -> int:
        prod = self.shared.get(_REQ_PROD)
        if ((prod - self.rsp_prod_pvt) & _MASK32) > self.size:
            raise RingOverflow(f"req_prod {prod} is more than {self.size} ahead of rsp_prod {self.rsp_prod_pvt}")
        reqs = (prod - self.req_cons) & _MASK32
        room = self.size - ((self.req_cons - self.rsp_prod_pvt) & _MASK32)
        return min(reqs, room)

    def take_requests(self, limit: int | None = None) -> list[bytes]:
        """Copy out up to ``limit`` requests (the copies are what the caller validates)."""
        n = self.unconsumed_requests()
        if limit is not None:
            n = min(n, limit)
        out = self.shared.read_slots(self.req_cons, n, self.shared.req_size) if n else []
        self.req_cons = (self.req_cons + n) & _MASK32
        return out

    def put_responses(self, datas: Sequence[bytes]) -> None:
        """:meth:`put_response` for each of ``datas``, checked once for the batch."""
        n = len(datas)
        if not n:
            return
        if max(map(len, datas)) > self.shared.rsp_size:
            raise ValueError("response larger than a slot")
        if ((self.req_cons - self.rsp_prod_pvt) & _MASK32) < n:
            raise RingOverflow("response without a consumed request")
        self.shared.write_slots(self.rsp_prod_pvt, datas)
        self.rsp_prod_pvt = (self.rsp_prod_pvt + n) & _MASK32

    def put_response_run(self, blob: bytes, n: int) -> None:
        """``n`` responses that each fill a whole slot, packed end to end in ``blob``."""
        if len(blob) != n * self.shared.slot_size or self.shared.rsp_size != self.shared.slot_size:
            raise ValueError("a run of responses is whole slots, each a whole response")
        if ((self.req_cons - self.rsp_prod_pvt) & _MASK32) < n:
            raise RingOverflow("response without a consumed request")
        self.shared.write_run(self.rsp_prod_pvt, blob)
        self.rsp_prod_pvt = (self.rsp_prod_pvt + n) & _MASK32

    def put_response(self, data: bytes) -> None:
        if len(data) > self.shared.rsp_size:
            raise ValueError("response larger than a slot")
        if ((self.req_cons - self.rsp_prod_pvt) & _MASK32) == 0:
            raise RingOverflow("response without a consumed request")
        self.shared.write_slot(self.rsp_prod_pvt, data)
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & _MASK32

    def push_responses(self) -> bool:
        """``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``: publish; True if the frontend wants an event."""
        old = self.shared.get(_RSP_PROD)
        new = self.rsp_prod_pvt
        self.shared.set(_RSP_PROD, new)
        mb()
        event = self.shared.get(_RSP_EVENT)
        return ((new - event) & _MASK32) < ((new - old) & _MASK32)

    def final_check_for_requests(self) -> bool:
        """``RING_FINAL_CHECK_FOR_REQUESTS``: re-arm req_event; True if more arrived meanwhile."""
        if self.unconsumed_requests():
            return True
        self.shared.set(_REQ_EVENT, self.req_cons + 1)
        mb()
        return bool(self.unconsumed_requests())
