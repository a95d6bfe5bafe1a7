"""blkfront: a Xen virtual block device in the guest, driven like Linux ``xen-blkfront``.

Negotiation (``talk_to_blkback``): once the backend is in InitWait, read
its features, pick what both sides do (queues, ring pages, persistent
grants, indirect segments), set up one ring and event channel per queue in
frames of our own memory granted to the backend, publish them, go
Initialised; when the backend is Connected, read the disk's size and go
Connected.

I/O: each operation (as the NBD server hands it over) is cut into blkif
requests of at most 11 segments, or up to ``feature-max-indirect-segments``
with indirect descriptors; data lives in granted frames (a persistent pool
reused for every request when the backend offers ``feature-persistent``,
or frames granted per request otherwise).  Every request in flight is kept
in a shadow (its bytes, its frames and its operation) until its response
arrives.

Backend restart: a backend that comes back (xenstore shows it InitWait
again while we are Connected) gets fresh rings and event channels, and what
was in flight is issued again as Linux's ``blkif_recover`` does: not the old
requests' bytes, which were built for the old backend's features, but the
operations' byte ranges, cut again into requests for what the new backend
offers (fewer or no indirect segments: more, smaller requests; a smaller
ring or fewer queues: the rest waits for room, as new work does).  Writes
take their data from the caller's buffer again, which stays valid until the
operation completes.  The program using the disk sees a stall, not an error.

Responses are checked (ids we did not issue are ignored), so a broken
backend cannot make us complete the wrong operation or touch a frame we
no longer own.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..abi.blkif import (
    ABIS,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_OKAY,
    PROTOCOL_X86_64,
    SEGMENTS_PER_INDIRECT_FRAME,
    VDISK_READONLY,
    abi_for,
    pack_discard_request,
    pack_indirect_request,
    pack_page_segments,
    pack_request,
    request_struct,
)
from ..abi.ring import FrontRing, RingOverflow, SharedRing
from ..abi.xs_wire import XenstoreError, XsType
from ..blockdev import completion_batch
from ..frame_pool import FramePool, OutOfFrames
from ..xenbus import XenbusState, parse_int, read_nodes
from ..xenbus_frontend import XenbusFrontend
from ..xenhost.base import XenHost
from ..xenstore import XenstoreClient

log = logging.getLogger("xdom.blkfront")

PAGE_SIZE = 4096
MAX_INDIRECT_SEGMENTS = 256
ZERO_PAGE = bytes(PAGE_SIZE)
DEFAULT_PERSISTENT_FRAMES = 2048      # 8 MiB of the guest's memory kept granted for I/O (blkback keeps 2048)
DEFERRED_RETRY_MS = 100               # how often frames the backend still maps are tried again
_DIRECT_MAX = BLKIF_MAX_SEGMENTS_PER_REQUEST * 4096    # what one direct request carries
LEND_MAX = 4 << 20                    # WRITE payloads up to this size are received into our pages (write_buffer)
LEND_RESERVE = 64                     # ... if this many frames stay available for other requests
CLOSE_PATIENCE = 5.0                  # seconds close() waits for the backend to let go of our frames


# What talk_to_backend writes for one connection, besides ring-ref* and queue-*/.
_CONNECTION_NODES = frozenset({"ring-page-order", "multi-queue-num-queues", "event-channel"})


class BlkfrontError(Exception):
    """The device could not be connected."""


@dataclass(frozen=True)
class FrontendOptions:
    """What this frontend asks for; the backend's offer caps each."""
    queues: int = 1
    ring_page_order: int = 0
    persistent: bool = True
    indirect: bool = True
    protocol: str = PROTOCOL_X86_64
    max_persistent_frames: int = DEFAULT_PERSISTENT_FRAMES


# Plain classes with __slots__ rather than dataclasses: one _Op and one _Req are built per I/O.

class _Page:
    __slots__ = ("gfn", "ref", "persistent", "view")

    def __init__(self, gfn: int, ref: int, persistent: bool, view: memoryview) -> None:
        self.gfn, self.ref, self.persistent = gfn, ref, persistent
        self.view = view                # the frame's 4 KiB in our memory (kept: a page is used many times)

    def __repr__(self) -> str:
        return f"_Page(gfn={self.gfn}, ref={self.ref}, persistent={self.persistent})"


class _Op:
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
        self.read_pages: dict[int, _Req] = {}   # offset in the op -> the answered request that read it
        self.given: list[_Page] | None = None   # a write's data already in these pages (write_buffer)


class _Lent:
    """Pages lent for a WRITE payload to be received into (:meth:`Blkfront.write_buffer`)."""

    __slots__ = ("front", "pages", "views", "length")

    def __init__(self, front: Blkfront, pages: list[_Page], length: int) -> None:
        self.front, self.pages, self.length = front, pages, length
        self.views = [page.view for page in pages]
        last = length - (len(pages) - 1) * PAGE_SIZE
        if last != PAGE_SIZE:
            self.views[-1] = self.views[-1][:last]

    def take(self) -> list[_Page]:
        pages, self.pages, self.views = self.pages, [], []
        return pages

    def release(self) -> None:
        pages = self.take()
        if pages:
            with self.front._lock:
                self.front._put_pages(pages)


class _Req:
    """One blkif request in flight: which part of which operation it carries, and what to free."""

    __slots__ = ("id", "raw", "op", "byte_offset", "length", "pages", "indirect")

    def __init__(self, id: int, raw: bytes, op: _Op, byte_offset: int, length: int,
                 pages: list[_Page], indirect: list[_Page]) -> None:
        self.id = id
        self.raw = raw
        self.op = op
        self.byte_offset = byte_offset          # within the op
        self.length = length                    # bytes of the op it carries
        self.pages = pages                      # data pages (ours to free): all full but the last
        self.indirect = indirect


class _Queue:
    def __init__(self, index: int, ring: FrontRing, gfns: list[int], refs: list[int], port: int) -> None:
        self.index, self.ring, self.gfns, self.refs, self.port = index, ring, gfns, refs, port
        self.requests = self.responses = 0       # counters: how work spread over the queues


class Blkfront(XenbusFrontend):
    """One vbd of this guest; implements the NBD server's block-device interface."""

    kind = "vbd"
    driver = "blkfront"
    log = log
    error = BlkfrontError
    step_errors = (OutOfFrames, BlkfrontError, RingOverflow)
    can_multi_conn = False

    def __init__(self, host: XenHost, xs: XenstoreClient, devid: int,
                 options: FrontendOptions = FrontendOptions(), pool: FramePool | None = None) -> None:
        self.host, self.xs, self.devid, self.options = host, xs, devid, options
        self.pool = pool or FramePool.of(host)
        if options.protocol not in ABIS:
            # We always write ``protocol`` and never lean on the backend's default
            # for a missing node (x86_32 in Linux, whatever our own layout is).
            raise ValueError(f"blkif protocol {options.protocol!r}: one of {sorted(ABIS)}")
        self.abi = abi_for(options.protocol)
        self._direct_structs = [request_struct(self.abi, n) for n in range(BLKIF_MAX_SEGMENTS_PER_REQUEST + 1)]
        super().__init__(xs, host.domid, devid)
        self.size = 0
        self.sector_size = 512
        self.read_only = False
        self.can_trim = False
        self.can_flush = True
        self.can_write_zeroes = True
        self.reconnects = 0
        self.indirect_requests = 0                # counters of what the connections really used
        self.reissued = 0                         # requests in flight when a backend went, issued again
        self._queues: list[_Queue] = []
        self._generation = 0
        self._ids = itertools.count(1)
        self._shadow: dict[int, _Req] = {}
        self._pending: collections.deque[_Op] = collections.deque()
        self._free_persistent: list[_Page] = []
        self._persistent = False                  # what the current connection negotiated
        self._zero: _Page | None = None
        self._persistent_count = 0
        self._deferred: list[tuple[int, int]] = []     # (ref, gfn) still mapped by the backend
        self._next_queue = 0
        self._plugged: set[int] = set()           # threads between plug() and unplug()
        self._features: dict[str, int] = {}
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll = select.epoll()
        self._reapers = 0
        self._thread = threading.Thread(target=self._completion_loop, name=f"blkfront-{devid}", daemon=True)
        self._memory = host.memory.buffer         # the domain's frames, frame g at [g * PAGE_SIZE, ...)

    # ---- connection ------------------------------------------------------------------

    # The xenbus life is XenbusFrontend's (domains/xenbus_frontend.py); these are its blkfront parts.

    def _backend_came_back(self) -> None:
        log.warning("vbd %d: backend d%d came back: reconnecting, %d request(s) to issue again",
                    self.devid, self.backend_domid, len(self._shadow))
        self.reconnects += 1
        self._reap()                  # answers the old backend gave before it went
        self._teardown_rings()

    def _backend_closing(self) -> None:
        self._shut(errno.ENODEV)

    def _talk_to_backend(self, state: XenbusState) -> None:
        be = self.backend_path
        got = read_nodes(self.xs, be, [
            "multi-queue-max-queues", "max-ring-page-order", "feature-persistent", "feature-max-indirect-segments",
            "feature-flush-cache", "feature-barrier", "feature-discard"])          # one round trip
        f = {k: parse_int(v, 0) or 0 for k, v in got.items()}
        self._features = f
        nq = max(1, min(self.options.queues, f["multi-queue-max-queues"] or 1))
        order = max(0, min(self.options.ring_page_order, f["max-ring-page-order"]))
        persistent = self.options.persistent and bool(f["feature-persistent"])
        self._persistent = persistent
        if not persistent and self._free_persistent:
            # Kept granted for a backend that had the feature (the one before a restart): give them back.
            free, self._free_persistent = self._free_persistent, []
            self._persistent_count -= len(free)
            for page in free:
                self._end_grant(page.ref, page.gfn)
        self._max_segments = (min(MAX_INDIRECT_SEGMENTS, f["feature-max-indirect-segments"])
                              if self.options.indirect and f["feature-max-indirect-segments"] > 0
                              else BLKIF_MAX_SEGMENTS_PER_REQUEST)
        self._indirect = self._max_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST
        queues: list[_Queue] = []
        try:
            for index in range(nq):
                gfns = self.pool.alloc(1 << order)
                refs = []
                for g in gfns:
                    self.host.memory.frame(g)[:] = bytes(PAGE_SIZE)
                    refs.append(self.host.gnttab.grant_access(self.backend_domid, g))
                port = self.host.alloc_unbound(self.backend_domid)
                shared = SharedRing([self.host.memory.frame(g) for g in gfns], self.abi.request_size,
                                    self.abi.response_size)
                queues.append(_Queue(index, FrontRing(shared, init=True), gfns, refs, port))
        except BaseException:
            for q in queues:
                self._release_queue(q)
            raise
        nodes: dict[str, str | int] = {"protocol": self.options.protocol, "feature-persistent": int(persistent)}
        if order:
            nodes["ring-page-order"] = order
        if nq > 1:
            nodes["multi-queue-num-queues"] = nq
        for q in queues:
            prefix = f"queue-{q.index}/" if nq > 1 else ""
            if order:
                for i, ref in enumerate(q.refs):
                    nodes[f"{prefix}ring-ref{i}"] = ref
            else:
                nodes[f"{prefix}ring-ref"] = q.refs[0]
            nodes[f"{prefix}event-channel"] = q.port

        def body(tx: int) -> None:
            # Nodes of an earlier connection (a backend that offered more) would contradict this one:
            # a stale ring-page-order or multi-queue-num-queues makes the new backend refuse us.
            batch = [(XsType.XS_RM, f"{self.path}/{key}".encode() + b"\0")
                     for key in self.xs.directory(self.path, tx)
                     if key not in nodes and (key in _CONNECTION_NODES or key.startswith(("ring-ref", "queue-")))]
            batch += [(XsType.XS_WRITE, f"{self.path}/{key}".encode() + b"\0" + str(value).encode())
                      for key, value in {**nodes, "state": int(state)}.items()]
            for r in self.xs.requests(batch, tx):      # one round trip for them all
                if isinstance(r, XenstoreError):
                    raise r
        self._queues = queues
        for q in queues:
            self._epoll.register(self.host.evtchn.fileno(q.port), select.EPOLLIN)
        self._generation += 1
        os.eventfd_write(self._wake, 1)
        self.xs.transaction(body)
        log.info("vbd %d: %d queue(s), %d-page rings, persistent %s, %d segments per request, %s", self.devid, nq,
                 1 << order, "on" if persistent else "off", self._max_segments, self.options.protocol)

    def _read_backend(self) -> None:
        be = self.backend_path
        got = read_nodes(self.xs, be, ["sectors", "sector-size", "mode", "info"])       # one round trip
        sectors = parse_int(got["sectors"])
        if sectors is None:
            raise BlkfrontError(f"{be}/sectors missing")
        lss = parse_int(got["sector-size"], 512) or 512
        if lss not in (512, 4096):
            raise BlkfrontError(f"{be}/sector-size {lss}: 512 or 4096 expected")
        mode = (got["mode"] or b"w").decode(errors="replace")
        info = parse_int(got["info"], 0) or 0
        self.size, self.sector_size = sectors * 512, lss
        self.read_only = bool(info & VDISK_READONLY) or mode == "r"
        self.can_trim = bool(self._features.get("feature-discard")) and not self.read_only
        # Flush (and FUA, which is a write then a flush) only where the backend has a cache to flush.
        self.can_flush = bool(self._features.get("feature-flush-cache") or self._features.get("feature-barrier"))

    def _on_connected(self) -> None:
        recovered = self._recover()
        self._kick_pending()
        self._push_all()
        log.info("vbd %d: connected, %d bytes, %d-byte sectors%s%s", self.devid, self.size, self.sector_size,
                 ", read-only" if self.read_only else "",
                 f", {recovered} request(s) in flight to issue again" if recovered else "")

    def _recover(self) -> int:
        """Turn what the old backend never answered back into work to do (Linux's ``blkif_recover``).

        Each request in the shadow gives back its frames and becomes a byte
        range of its operation to issue again (a flush or discard is issued
        again whole); the operations go to the front of the pending queue in
        the order they were issued, and :meth:`_kick_pending` cuts them into
        requests for the new connection's features and ring room.
        """
        reqs = sorted(self._shadow.values(), key=lambda r: r.id)
        self._shadow.clear()
        ops: list[_Op] = []
        for req in reqs:
            op = req.op
            op.outstanding -= 1
            if op.given is not None:
                # Issued again as a copy (the pages go back to a pool the new backend may not share).
                op.data = memoryview(b"".join([page.view for page in op.given]))[:op.length]
                self._put_pages(op.given)
                op.given = None
            self._put_pages(req.pages + req.indirect)
            if op.kind in (BLKIF_OP_READ, BLKIF_OP_WRITE):
                op.redo.append((req.byte_offset, req.byte_offset + req.length))
            else:
                op.next_byte = 0
            if not any(o is op for o in ops):
                ops.append(op)
        for op in ops:
            op.redo.sort()
        # An operation still being cut into requests is at the head of the queue already.
        waiting = [op for op in ops if not any(o is op for o in self._pending)]
        self._pending.extendleft(reversed(waiting))
        self.reissued += len(reqs)
        return len(reqs)

    def _teardown_rings(self) -> None:
        queues, self._queues = self._queues, []
        for q in queues:
            try:
                self._epoll.unregister(self.host.evtchn.fileno(q.port))
            except (OSError, KeyError):
                pass
        self._generation += 1
        os.eventfd_write(self._wake, 1)
        for q in queues:
            self._release_queue(q)

    def _release_queue(self, q: _Queue) -> None:
        try:
            self.host.close_port(q.port)
        except Exception as e:
            log.warning("vbd %d: closing port %d: %s", self.devid, q.port, e)
        for g, ref in zip(q.gfns, q.refs):
            self._end_grant(ref, g)

    def _end_grant(self, ref: int, gfn: int) -> None:
        """End the backend's access to a frame and free it, or retry later while it is still mapped.

        Linux's ``gnttab_end_foreign_access`` defers the same way: a frame the
        backend still maps is never reused, but it is not lost either.
        """
        if self.host.gnttab.try_end_access(ref):
            self.host.gnttab.release_ref(ref)
            self.pool.free([gfn])
        else:
            self._deferred.append((ref, gfn))

    def _retry_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for ref, gfn in deferred:
            self._end_grant(ref, gfn)

    # ---- the block-device interface (what the NBD server calls) -----------------------

    def submit_read(self, offset: int, length: int, done: Callable[[int, Sequence[memoryview]], None]) -> None:
        self._submit(_Op(BLKIF_OP_READ, offset, length, done))

    def submit_write(self, offset: int, data: memoryview, fua: bool, done: Callable[[int], None]) -> None:
        self._submit(_Op(BLKIF_OP_WRITE, offset, len(data), done, data=memoryview(data), then_flush=fua))

    def write_buffer(self, offset: int, length: int) -> _Lent | None:
        """Persistent pages to receive a WRITE payload into (no copy later), or None: not connected
        with persistent grants, too large, or the pool too short to leave room for other I/O."""
        if not 0 < length <= LEND_MAX:
            return None
        n = (length + PAGE_SIZE - 1) >> 12
        with self._lock:
            if self.state != XenbusState.Connected or not self._persistent or self._closing:
                return None
            free = self._free_persistent
            grow = self.options.max_persistent_frames - self._persistent_count
            if len(free) + grow < n + LEND_RESERVE:
                return None
            try:
                pages = self._get_pages(n, readonly=False)
            except OutOfFrames:
                return None
            if pages is None:
                return None
        return _Lent(self, pages, length)

    def submit_write_buffer(self, offset: int, buffer: _Lent, fua: bool, done: Callable[[int], None]) -> None:
        """``submit_write`` of a payload received into pages :meth:`write_buffer` lent (we take them back)."""
        op = _Op(BLKIF_OP_WRITE, offset, buffer.length, done, then_flush=fua)
        op.given = buffer.take()
        self._submit(op)

    def submit_flush(self, done: Callable[[int], None]) -> None:
        self._submit(_Op(BLKIF_OP_FLUSH_DISKCACHE, 0, 0, done))

    def submit_trim(self, offset: int, length: int, done: Callable[[int], None]) -> None:
        if not self.can_trim:
            done(errno.EOPNOTSUPP)
            return
        self._submit(_Op(BLKIF_OP_DISCARD, offset, length, done))

    def submit_write_zeroes(self, offset: int, length: int, may_trim: bool, done: Callable[[int], None]) -> None:
        """Real zeroes, written from one granted zero page that every segment names.

        Never a discard, even when the client allows holes (``may_trim``):
        blkif.h leaves a discarded range's content undefined, and no backend
        feature promises zeroes.  Nor a buffer of ``length`` zeroes: one page
        carries any length, so a 32 MiB request costs 4 KiB (plus indirect
        pages), as Linux's zeroing through ZERO_PAGE does.
        """
        self._submit(_Op(BLKIF_OP_WRITE, offset, length, done, zeroes=True))

    def _submit(self, op: _Op) -> None:
        with self._lock:
            if self._closing or self.state == XenbusState.Closed:
                err = errno.ENODEV
            elif op.length and (op.offset % self.sector_size or op.length % self.sector_size
                                or op.offset + op.length > self.size):
                err = errno.EINVAL
            elif self.read_only and op.kind in (BLKIF_OP_WRITE, BLKIF_OP_DISCARD):
                err = errno.EPERM
            else:
                connected = self.state == XenbusState.Connected
                if not (connected and not self._pending and self._persistent and op.kind <= BLKIF_OP_WRITE
                        and op.length <= _DIRECT_MAX and not op.zeroes and op.length and self._start_direct(op)):
                    self._pending.append(op)
                    if connected:
                        self._kick_pending()
                if connected and threading.get_ident() not in self._plugged:
                    self._push_all()
                return
        self._complete(op, err)

    def _start_direct(self, op: _Op) -> bool:
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
            free = self._free_persistent
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
        self._shadow[rid] = _Req(rid, raw, op, 0, length, pages if given is None else [], [])
        q.ring.put_request(raw)
        q.requests += 1
        return True

    # Completions on the caller's thread (the NBD server's connection thread, which then does all
    # of a request's work in the guest: no hand-off between threads, no contention for the GIL).

    def completion_fd(self) -> int:
        """Readable when a backend has answered (an epoll set of every queue's event channel)."""
        return self._epoll.fileno()

    def attach_reaper(self) -> None:
        """The caller polls :meth:`completion_fd` and calls :meth:`reap_completions` from now on,
        until :meth:`detach_reaper`; meanwhile our own thread leaves completions alone."""
        with self._lock:
            self._reapers += 1
            if self._reapers == 1:
                os.eventfd_write(self._wake, 1)

    def detach_reaper(self) -> None:
        with self._lock:
            self._reapers -= 1
            if self._reapers == 0 and not self._closing:
                os.eventfd_write(self._wake, 1)     # our thread watches the event channels again

    def reap_completions(self) -> None:
        """Take the backend's answers and run their callbacks (in one completion batch) on this thread."""
        with self._lock:
            if self._closing:
                return
            for q in self._queues:
                self.host.evtchn.consume(q.port)
        self._reap()

    def plug(self) -> None:
        """Hold back this thread's submissions from the backend until :meth:`unplug` (the requests go on
        the ring, the ring is pushed and the backend notified once for all of them)."""
        self._plugged.add(threading.get_ident())

    def unplug(self) -> None:
        with self._lock:
            self._plugged.discard(threading.get_ident())
            if self.state == XenbusState.Connected:
                self._push_all()

    # ---- turning operations into requests ----------------------------------------------

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

    def _queue_with_room(self) -> _Queue | None:
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

    def _start_some(self, op: _Op) -> bool:
        """Issue requests for ``op`` until it is all issued (True) or resources run out (False)."""
        if op.kind in (BLKIF_OP_READ, BLKIF_OP_WRITE) and op.length == 0:
            op.next_byte = 1                      # nothing to move: done at once
            self._complete_later(op)
            return True
        if op.kind in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_DISCARD):
            if op.next_byte or op.outstanding:
                return True
            if op.kind == BLKIF_OP_FLUSH_DISKCACHE and not (self._features.get("feature-flush-cache")
                                                             or self._features.get("feature-barrier")):
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
                flush_op = BLKIF_OP_FLUSH_DISKCACHE if self._features.get("feature-flush-cache") \
                    else BLKIF_OP_WRITE_BARRIER
                raw = pack_request(self.abi, flush_op, rid, 0, self.devid, [])
            op.next_byte = max(op.length, 1)
            op.outstanding += 1
            self._put(_Req(rid, raw, op, 0, 0, [], []), q)
            return True
        per_request = self._max_segments * PAGE_SIZE
        while op.redo or op.next_byte < op.length:
            start, end = op.redo[0] if op.redo else (op.next_byte, op.length)
            q = self._queue_with_room()
            if q is None:
                return False
            chunk = min(per_request, end - start)
            npages = (chunk + PAGE_SIZE - 1) // PAGE_SIZE
            nindirect = (npages + SEGMENTS_PER_INDIRECT_FRAME - 1) // SEGMENTS_PER_INDIRECT_FRAME \
                if npages > BLKIF_MAX_SEGMENTS_PER_REQUEST else 0
            if op.zeroes:
                indirect_pages = self._get_pages(nindirect, readonly=True) if nindirect else []
                if indirect_pages is None:
                    return False
                data_pages = [self._zero_page()] * npages
            elif op.given is not None:
                # The data is in these pages already (write_buffer); they are freed with the op.
                indirect_pages = self._get_pages(nindirect, readonly=True) if nindirect else []
                if indirect_pages is None:
                    return False
                data_pages = op.given[start >> 12:(start >> 12) + npages]
            else:
                pages = self._get_pages(npages + nindirect, readonly=op.kind == BLKIF_OP_WRITE)
                if pages is None:
                    return False
                if nindirect:
                    data_pages, indirect_pages = pages[:npages], pages[npages:]
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
            req = _Req(rid, raw, op, start, chunk, [] if op.zeroes or op.given is not None else data_pages,
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

    def _zero_page(self) -> _Page:
        """The frame of zeroes behind every write-zeroes segment, granted once (read-write: a persistent
        backend maps all it is given read-write, as Linux's does) and zeroed again for each request, so a
        backend that scribbles on it spoils at most what it could spoil anyway: the data it writes."""
        if self._zero is None:
            (gfn,) = self.pool.alloc(1)
            self._zero = _Page(gfn, self.host.gnttab.grant_access(self.backend_domid, gfn), False,
                               self._frame(gfn))
        self._zero.view[:] = ZERO_PAGE
        return self._zero

    def _put(self, req: _Req, q: _Queue) -> None:
        self._shadow[req.id] = req
        q.ring.put_request(req.raw)       # room was checked (_queue_with_room) under the same lock
        q.requests += 1

    def _push_all(self) -> None:
        for q in self._queues:
            if q.ring.push_requests():
                self.host.notify(q.port)

    def _get_pages(self, n: int, readonly: bool) -> list[_Page] | None:
        if self._persistent:
            while len(self._free_persistent) < n and self._persistent_count < self.options.max_persistent_frames:
                try:
                    (g,) = self.pool.alloc(1)
                except OutOfFrames:
                    break
                ref = self.host.gnttab.grant_access(self.backend_domid, g)
                self._free_persistent.append(_Page(g, ref, True, self._frame(g)))
                self._persistent_count += 1
            if len(self._free_persistent) < n:
                if self._persistent_count < n and not self._shadow:
                    raise OutOfFrames(f"a request needs {n} frames and only {self._persistent_count} can be had")
                return None
            free = self._free_persistent
            out = free[-n:]
            del free[-n:]
            return out
        try:
            gfns = self.pool.alloc(n)
        except OutOfFrames:
            if not self._shadow:
                raise
            return None
        return [_Page(g, self.host.gnttab.grant_access(self.backend_domid, g, readonly=readonly), False,
                      self._frame(g)) for g in gfns]

    def _frame(self, gfn: int) -> memoryview:
        return self._memory[gfn * PAGE_SIZE:(gfn + 1) * PAGE_SIZE]

    def _put_pages(self, pages: list[_Page]) -> None:
        if self._persistent and all([p.persistent for p in pages]):
            self._free_persistent += pages            # the usual case: all back to the pool
            return
        for p in pages:
            if p.persistent and self._persistent:
                self._free_persistent.append(p)
            else:
                if p.persistent:              # kept for a backend that had the feature; this one has not
                    self._persistent_count -= 1
                self._end_grant(p.ref, p.gfn)

    # ---- completions -----------------------------------------------------------------------

    def _completion_loop(self) -> None:
        generation: tuple[int, bool] | None = None
        poller = select.poll()
        while True:
            with self._lock:
                if self._closing:
                    return
                if generation != (self._generation, self._reapers > 0):
                    generation = (self._generation, self._reapers > 0)
                    poller = select.poll()
                    poller.register(self._wake, select.POLLIN)
                    if not self._reapers:
                        ports = {self.host.evtchn.fileno(q.port): q for q in self._queues}
                        for fd in ports:
                            poller.register(fd, select.POLLIN)
            ready = [fd for fd, _ in poller.poll(DEFERRED_RETRY_MS if self._deferred else None)]
            with self._lock:
                if self._closing:
                    return
                if self._deferred:
                    self._retry_deferred()
                if self._wake in ready:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                if generation != (self._generation, self._reapers > 0) or self._reapers:
                    continue
                for q in self._queues:
                    self.host.evtchn.consume(q.port)
            self._reap()

    def _reap(self) -> None:
        finished: list[_Op] = []
        release: list[_Page] = []                 # freed under the lock taken after the callbacks
        with self._lock:
            if self.state != XenbusState.Connected:
                return
            unpack, shadow = self.abi.response.unpack_from, self._shadow
            for q in self._queues:
                while True:
                    try:
                        raws = q.ring.take_responses()
                    except RingOverflow as e:
                        log.error("vbd %d: backend broke ring %d: %s", self.devid, q.index, e)
                        raws = []
                    for raw in raws:
                        rid, _, status = unpack(raw)
                        req = shadow.pop(rid, None)
                        if req is None:
                            log.warning("vbd %d: response for unknown request id %d ignored", self.devid, rid)
                            continue
                        q.responses += 1
                        op = req.op
                        op.outstanding -= 1
                        if status != BLKIF_RSP_OKAY and not op.error:
                            op.error = errno.EOPNOTSUPP if status == -2 else errno.EIO
                        if op.kind == BLKIF_OP_READ:
                            op.read_pages[req.byte_offset] = req      # its pages hold the data until done
                            if req.indirect:
                                release += req.indirect
                        else:
                            release += req.pages
                            if req.indirect:
                                release += req.indirect
                        if op.outstanding == 0 and op.next_byte >= op.length and not op.redo:
                            finished.append(op)
                    if not q.ring.final_check_for_responses():
                        break
        # One batch: the NBD server sends the replies of all these operations together when it ends.
        with completion_batch():
            for op in finished:
                answered = op.read_pages
                if op.kind == BLKIF_OP_READ and len(answered) == 1 and not op.error:
                    # The usual read: one request's pages, whole but maybe the last.
                    _, req = answered.popitem()
                    pages = req.pages
                    views = [page.view for page in pages]
                    last = req.length - (len(pages) - 1) * PAGE_SIZE
                    if last != PAGE_SIZE:
                        views[-1] = views[-1][:last]
                    try:
                        op.done(0, views)
                    except Exception:
                        log.exception("vbd %d: completion callback failed", self.devid)
                    views.clear()
                    release += pages
                    continue
                if op.kind == BLKIF_OP_WRITE and op.then_flush and not op.error:
                    op.then_flush = False
                    if op.given is not None:
                        self._free_given(op, release)
                    op.kind, op.next_byte, op.length = BLKIF_OP_FLUSH_DISKCACHE, 0, 0
                    with self._lock:
                        self._pending.appendleft(op)
                    continue
                self._complete(op, op.error, release)
        with self._lock:
            if release:
                self._put_pages(release)
            if self._pending and self.state == XenbusState.Connected:
                self._kick_pending()
                self._push_all()

    def _complete_later(self, op: _Op, error: int = 0) -> None:
        """Complete without calling back under our lock (the callback may submit more)."""
        threading.Thread(target=self._complete, args=(op, error), daemon=True).start()

    def _complete(self, op: _Op, error: int, release: list[_Page] | None = None) -> None:
        """Hand the result to the user; read data is sent straight from our frames, which are freed after
        (at once, or added to ``release`` for the caller to free)."""
        try:
            if op.kind == BLKIF_OP_READ:
                views = []
                answered = op.read_pages
                if not error:
                    for off in (sorted(answered) if len(answered) > 1 else answered):
                        req = answered[off]
                        views += [page.view for page in req.pages]
                        last = req.length - (len(req.pages) - 1) * PAGE_SIZE
                        if last != PAGE_SIZE:
                            views[-1] = views[-1][:last]
                try:
                    op.done(error, views)
                finally:
                    views.clear()
                    pages = [p for req in answered.values() for p in req.pages]
                    answered.clear()
                    if release is not None:
                        release += pages
                    else:
                        with self._lock:
                            self._put_pages(pages)
            else:
                if op.given is not None:          # a lent payload's pages: ours again
                    self._free_given(op, release)
                op.done(error)
        except Exception:
            log.exception("vbd %d: completion callback failed", self.devid)

    def _free_given(self, op: _Op, release: list[_Page] | None = None) -> None:
        pages, op.given = op.given, None
        if pages:
            if release is not None:
                release += pages
            else:
                with self._lock:
                    self._put_pages(pages)

    # ---- shutting down -----------------------------------------------------------------------

    def _shut(self, error: int) -> None:
        """Fail everything in flight or waiting (backend gone for good, or we are closing)."""
        failed = {id(r.op): r.op for r in self._shadow.values()}
        failed.update({id(op): op for op in self._pending})
        for req in self._shadow.values():
            self._put_pages(req.pages + req.indirect)
        self._shadow.clear()
        self._pending.clear()
        self._teardown_rings()
        for op in failed.values():
            for req in op.read_pages.values():
                self._put_pages(req.pages)
            op.read_pages.clear()
            if op.given is not None:
                self._put_pages(op.given)
                op.given = None
            threading.Thread(target=self._complete, args=(op, error), daemon=True).start()

    def close(self) -> None:
        """Disconnect from the backend (Closing, Closed) and give back every frame."""
        with self._lock:
            if self._closing:
                return
            self._stop_watching()
            self._shut(errno.ENODEV)
            persistent, self._free_persistent = self._free_persistent, []
            for p in persistent:
                self._end_grant(p.ref, p.gfn)
            if self._zero is not None:
                self._end_grant(self._zero.ref, self._zero.gfn)
                self._zero = None
            self._closing = True
            os.eventfd_write(self._wake, 1)
        if self._thread.is_alive():
            self._thread.join()
        self._say(XenbusState.Closing)
        # The backend unmaps when it sees Closing; wait for it (bounded) before saying Closed.
        deadline = time.monotonic() + CLOSE_PATIENCE
        while True:
            with self._lock:
                self._retry_deferred()
                if not self._deferred or time.monotonic() > deadline:
                    break
            time.sleep(DEFERRED_RETRY_MS / 1000)
        if self._deferred:
            log.warning("vbd %d: %d frame(s) still mapped by backend d%d after %gs; left aside", self.devid,
                        len(self._deferred), self.backend_domid, CLOSE_PATIENCE)
        os.close(self._wake)
        self._epoll.close()
        self._say(XenbusState.Closed)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"in_flight": len(self._shadow), "pending": len(self._pending), "reconnects": self.reconnects,
                    "persistent_frames": self._persistent_count, "frames_still_mapped": len(self._deferred),
                    "indirect_requests": self.indirect_requests, "reissued": self.reissued}

    def queue_stats(self) -> list[dict[str, int]]:
        """Per queue of the current connection: ring pages, requests put on it, responses taken off it."""
        with self._lock:
            return [{"ring_pages": len(q.gfns), "requests": q.requests, "responses": q.responses}
                    for q in self._queues]
