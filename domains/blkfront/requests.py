"""blkfront's bookkeeping of I/O, and the cutting of operations into blkif requests on the rings.

An operation (:class:`Op`, as the NBD server hands it over) is cut into
blkif requests (:class:`Req`) of at most 11 segments, or up to the
connection's ``max_segments`` with indirect descriptors; data lives in
granted pages (:mod:`.grants`).  Every request in flight is kept in the
shadow (its bytes, its pages and its operation) until its response
arrives; an operation waits in ``pending`` until rings, ids and pages allow
all of it to be issued.  A READ or WRITE that fits one direct request on
persistent pages, with nothing queued before it, takes a shorter path
(:meth:`RequestRings._start_direct`).

:class:`RequestRings` holds the device's state and does the issuing; the
completions (:mod:`.completions`) and the xenbus connection and the
block-device interface (:mod:`.device`) build on it.  Everything here runs
under the device's lock.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
from collections.abc import Callable

from ..abi.blkif import (
    ABIS,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    SEGMENTS_PER_INDIRECT_FRAME,
    abi_for,
    pack_discard_request,
    pack_indirect_request,
    pack_page_segments,
    pack_request,
    request_struct,
)
from ..abi.ring import FrontRing
from ..frame_pool import FramePool, OutOfFrames
from ..xenbus_frontend import XenbusFrontend
from ..xenhost.base import XenHost
from ..xenstore import XenstoreClient
from .grants import PAGE_SIZE, GrantedPages, Page
from .negotiate import DEFAULT_OPTIONS, NOT_CONNECTED, FrontendOptions, Negotiated

log = logging.getLogger("xdom.blkfront")


# Plain classes with __slots__ rather than dataclasses: one Op and one Req are built per I/O.

class Op:
    """One operation from the block-device user; may become several blkif requests."""

    __slots__ = ("kind", "offset", "length", "done", "data", "then_flush", "zeroes", "next_byte", "outstanding",
                 "redo", "error", "read_pages", "given")

    def __init__(self, kind: int, offset: int, length: int, done: Callable, data: memoryview | None = None,
                 then_flush: bool = False, zeroes: bool = False) -> None:
        self.kind = kind                        # BLKIF_OP_*
        self.offset = offset
        self.length = length
        self.done = done
        self.data = data                        # writes
        self.then_flush = then_flush            # FUA
        self.zeroes = zeroes                    # a write of zeroes: every segment is the one zero page
        self.next_byte = 0                      # how much has been turned into requests
        self.outstanding = 0
        self.redo: list[tuple[int, int]] = []   # byte ranges to issue again (a backend restart)
        self.error = 0
        self.read_pages: dict[int, Req] = {}    # offset in the op -> the answered request that read it
        self.given: list[Page] | None = None    # a write's data already in these pages (write_buffer)


class Req:
    """One blkif request in flight: which part of which operation it carries, and what to free."""

    __slots__ = ("id", "raw", "op", "byte_offset", "length", "pages", "indirect", "copy")

    def __init__(self, id: int, raw: bytes, op: Op, byte_offset: int, length: int,
                 pages: list[Page], indirect: list[Page]) -> None:
        self.id = id
        self.raw = raw
        self.op = op
        self.byte_offset = byte_offset          # within the op
        self.length = length                    # bytes of the op it carries
        self.pages = pages                      # data pages (ours to free): all full but the last
        self.indirect = indirect
        self.copy: bytes | None = None          # a read's data, once copied out of its pages (Completions)


class Queue:
    """One ring and its event channel (a connection has one per negotiated queue)."""

    def __init__(self, index: int, ring: FrontRing, gfns: list[int], refs: list[int], port: int) -> None:
        self.index, self.ring, self.gfns, self.refs, self.port = index, ring, gfns, refs, port
        self.requests = self.responses = 0       # counters: how work spread over the queues


class RequestRings(XenbusFrontend):
    """A vbd's state, and the issuing of its operations as requests on the current connection's rings."""

    def __init__(self, host: XenHost, xs: XenstoreClient, devid: int,
                 options: FrontendOptions = DEFAULT_OPTIONS, pool: FramePool | None = None) -> None:
        self.host, self.xs, self.devid, self.options = host, xs, devid, options
        self.pool = pool or FramePool.of(host)
        if options.protocol not in ABIS:
            # We always write ``protocol`` and never lean on the backend's default
            # for a missing node (x86_32 in Linux, whatever our own layout is).
            raise ValueError(f"blkif protocol {options.protocol!r}: one of {sorted(ABIS)}")
        self.abi = abi_for(options.protocol)
        self._direct_structs = [request_struct(self.abi, n) for n in range(BLKIF_MAX_SEGMENTS_PER_REQUEST + 1)]
        super().__init__(xs, host.domid, devid)
        # The disk, as the block-device interface shows it (set when Connected).
        self.size = 0
        self.sector_size = 512
        self.read_only = False
        self.can_trim = False
        self.can_flush = True
        self.can_write_zeroes = True
        self.reconnects = 0
        self.indirect_requests = 0                # counters of what the connections really used
        self.reissued = 0                         # requests in flight when a backend went, issued again
        self.ignored_responses = 0                # for ids not in flight: a broken or hostile backend's
        self._queues: list[Queue] = []
        self._terms: Negotiated = NOT_CONNECTED   # what the current connection negotiated
        self._ids = itertools.count(1)
        self._shadow: dict[int, Req] = {}
        self._pending: collections.deque[Op] = collections.deque()
        self._grants = GrantedPages(host, self.pool, self.backend_domid, options.max_persistent_frames)
        self._next_queue = 0
        self._plugged: set[int] = set()           # threads between plug() and unplug()

    def _complete_later(self, op: Op, error: int = 0) -> None:
        """Complete without calling back under our lock (the callback may submit more): see completions."""
        raise NotImplementedError

    def _kick_pending(self) -> None:
        """Start as much pending work as rings, ids and frames allow (under the lock, Connected)."""
        while self._pending:
            op = self._pending[0]
            try:
                if not self._start_some(op):
                    return
            except OutOfFrames as e:
                log.error("vbd %d: %s", self.devid, e)
                self._pending.popleft()
                op.error = errno.ENOMEM
                op.next_byte = op.length = max(op.length, 1)
                op.redo.clear()
                if not op.outstanding:
                    self._complete_later(op, errno.ENOMEM)
                continue
            if op.next_byte >= op.length and not op.redo:
                self._pending.popleft()

    def _queue_with_room(self) -> Queue | None:
        queues = self._queues
        if len(queues) == 1:
            q = queues[0]
            return None if q.ring.full() else q
        n = len(queues)
        for i in range(n):
            q = self._queues[(self._next_queue + i) % n]
            if not q.ring.full():
                self._next_queue = (q.index + 1) % n
                return q
        return None

    def _start_direct(self, op: Op) -> bool:
        """:meth:`_start_some` for the common operation, in one step: a READ or WRITE that fits one
        direct request, on persistent pages, with nothing queued before it.  False: nothing was
        done (no room or pages now), the general path takes it."""
        queues = self._queues
        q = queues[0] if len(queues) == 1 else self._queue_with_room()
        if q is None or q.ring.full():
            return False
        length = op.length
        n = (length + PAGE_SIZE - 1) >> 12
        given = op.given
        if given is not None:
            pages = given                 # the data is in them already; they are freed with the op
        else:
            free = self._grants.free
            if len(free) < n:
                return False
            pages = free[-n:]
            del free[-n:]
        last = length - (n - 1) * PAGE_SIZE
        if n == 1:
            flat: list[int] | tuple[int, ...] = (pages[0].ref, 0, (last >> 9) - 1)
        else:
            flat = [v for page in pages for v in (page.ref, 0, 7)]
            flat[-1] = (last >> 9) - 1
        if op.data is not None:
            data = op.data
            at = 0
            for page in pages[:-1]:
                page.view[:] = data[at:at + PAGE_SIZE]
                at += PAGE_SIZE
            pages[-1].view[:last] = data[at:length]
        rid = next(self._ids)
        raw = self._direct_structs[n].pack(op.kind, n, self.devid, rid, op.offset >> 9, *flat)
        op.next_byte = length
        op.outstanding = 1
        self._shadow[rid] = Req(rid, raw, op, 0, length, pages if given is None else [], [])
        q.ring.put_request(raw)
        q.requests += 1
        return True

    def _start_some(self, op: Op) -> bool:
        """Issue requests for ``op`` until it is all issued (True) or resources run out (False)."""
        if op.kind in (BLKIF_OP_READ, BLKIF_OP_WRITE) and op.length == 0:
            op.next_byte = 1                      # nothing to move: done at once
            self._complete_later(op)
            return True
        if op.kind in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_DISCARD):
            if op.next_byte or op.outstanding:
                return True
            flush_op = self._terms.flush_op
            if op.kind == BLKIF_OP_FLUSH_DISKCACHE and flush_op is None:
                op.next_byte = 1                  # the backend has no cache to flush
                self._complete_later(op)
                return True
            if op.kind == BLKIF_OP_DISCARD and not self.can_trim:
                op.next_byte = 1                  # a backend that came back without discard
                self._complete_later(op, errno.EOPNOTSUPP)
                return True
            q = self._queue_with_room()
            if q is None:
                return False
            rid = next(self._ids)
            if op.kind == BLKIF_OP_DISCARD:
                raw = pack_discard_request(self.abi, rid, op.offset // 512, op.length // 512, self.devid)
            else:
                assert flush_op is not None       # no cache to flush: completed above
                raw = pack_request(self.abi, flush_op, rid, 0, self.devid, [])
            op.next_byte = max(op.length, 1)
            op.outstanding += 1
            self._put(Req(rid, raw, op, 0, 0, [], []), q)
            return True
        grants = self._grants
        per_request = self._terms.max_segments * PAGE_SIZE
        while op.redo or op.next_byte < op.length:
            start, end = op.redo[0] if op.redo else (op.next_byte, op.length)
            q = self._queue_with_room()
            if q is None:
                return False
            chunk = min(per_request, end - start)
            npages = (chunk + PAGE_SIZE - 1) // PAGE_SIZE
            nindirect = (npages + SEGMENTS_PER_INDIRECT_FRAME - 1) // SEGMENTS_PER_INDIRECT_FRAME \
                if npages > BLKIF_MAX_SEGMENTS_PER_REQUEST else 0
            busy = bool(self._shadow)
            if op.zeroes:
                indirect_pages = grants.get(nindirect, readonly=True, busy=busy, front=nindirect) if nindirect else []
                if indirect_pages is None:
                    return False
                data_pages = [grants.zero_page()] * npages
            elif op.given is not None:
                # The data is in these pages already (write_buffer); they are freed with the op.
                indirect_pages = grants.get(nindirect, readonly=True, busy=busy, front=nindirect) if nindirect else []
                if indirect_pages is None:
                    return False
                data_pages = op.given[start >> 12:(start >> 12) + npages]
            else:
                pages = grants.get(npages + nindirect, readonly=op.kind == BLKIF_OP_WRITE, busy=busy,
                                   front=nindirect)
                if pages is None:
                    return False
                if nindirect:
                    indirect_pages, data_pages = pages[:nindirect], pages[nindirect:]
                else:
                    data_pages, indirect_pages = pages, []
            # Every page is whole but maybe the last (a chunk is whole 512-byte sectors).
            last = chunk - (npages - 1) * PAGE_SIZE
            if op.data is not None:
                data = op.data
                at = start
                for page in data_pages[:-1]:
                    page.view[:] = data[at:at + PAGE_SIZE]
                    at += PAGE_SIZE
                data_pages[-1].view[:last] = data[at:at + last]
            rid = next(self._ids)
            sector = (op.offset + start) >> 9
            if nindirect:
                refs = [page.ref for page in data_pages]
                per = SEGMENTS_PER_INDIRECT_FRAME
                for k, ipage in enumerate(indirect_pages):
                    part = refs[k * per:(k + 1) * per]
                    ipage.view[:] = pack_page_segments(part, last if k == nindirect - 1 else PAGE_SIZE)
                raw = pack_indirect_request(self.abi, op.kind, rid, sector, self.devid, npages,
                                            [p.ref for p in indirect_pages])
                self.indirect_requests += 1
            else:
                segs = [(page.ref, 0, 7) for page in data_pages]
                if last != PAGE_SIZE:
                    segs[-1] = (data_pages[-1].ref, 0, last // 512 - 1)
                raw = request_struct(self.abi, npages).pack(op.kind, npages, self.devid, rid, sector,
                                                            *[v for seg in segs for v in seg])
            req = Req(rid, raw, op, start, chunk, [] if op.zeroes or op.given is not None else data_pages,
                      indirect_pages)
            if op.redo:
                if start + chunk < end:
                    op.redo[0] = (start + chunk, end)
                else:
                    op.redo.pop(0)
            else:
                op.next_byte += chunk
            op.outstanding += 1
            self._put(req, q)
        return True

    def _put(self, req: Req, q: Queue) -> None:
        self._shadow[req.id] = req
        q.ring.put_request(req.raw)       # room was checked (_queue_with_room) under the same lock
        q.requests += 1

    def _push_all(self) -> None:
        for q in self._queues:
            if q.ring.push_requests():
                self.host.notify(q.port)
