"""blkfront: a Xen virtual block device in the guest, driven like Linux ``xen-blkfront``.

Negotiation (``talk_to_blkback``): once the backend is in InitWait, read
its features, pick what both sides do (queues, ring pages, persistent
grants, indirect segments: :mod:`.negotiate`), set up one ring and event
channel per queue in frames of our own memory granted to the backend,
publish them, go Initialised; when the backend is Connected, read the
disk's size and go Connected.

I/O: each operation (as the NBD server hands it over) is cut into blkif
requests and kept in a shadow until answered (:mod:`.requests`), on pages
granted to the backend (:mod:`.grants`); the responses complete the
operations (:mod:`.completions`).  :class:`Blkfront` is the xenbus device
and the block-device interface the NBD server calls.

Backend restart: a backend that comes back (xenstore shows it InitWait
again while we are Connected) gets fresh rings and event channels, and what
was in flight is issued again as Linux's ``blkif_recover`` does: not the old
requests' bytes, which were built for the old backend's features, but the
operations' byte ranges, cut again into requests for what the new backend
offers (fewer or no indirect segments: more, smaller requests; a smaller
ring or fewer queues: the rest waits for room, as new work does).  Writes
take their data from the caller's buffer again, which stays valid until the
operation completes.  The program using the disk sees a stall, not an error.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence

from ..abi.blkif import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
)
from ..abi.ring import FrontRing, RingOverflow, SharedRing
from ..abi.xs_wire import XenstoreError, XsType
from ..frame_pool import OutOfFrames
from ..grant_table import GrantTableFull
from ..xenbus import XenbusState, read_nodes
from .completions import DEFERRED_RETRY_MS, Completions
from .grants import PAGE_SIZE, Lent
from .negotiate import (
    BACKEND_FEATURES,
    DISK_NODES,
    BlkfrontError,
    FrontendOptions,
    disk_of,
    frontend_nodes,
    negotiate,
    stale_nodes,
)
from .requests import Op, Queue

__all__ = ["Blkfront", "BlkfrontError", "FrontendOptions"]

log = logging.getLogger("xdom.blkfront")

_DIRECT_MAX = BLKIF_MAX_SEGMENTS_PER_REQUEST * 4096    # what one direct request carries
LEND_MAX = 4 << 20                    # WRITE payloads up to this size are received into our pages (write_buffer)
LEND_RESERVE = 64                     # ... if this many frames stay available for other requests
CLOSE_PATIENCE = 5.0                  # seconds close() waits for the backend to let go of our frames


class Blkfront(Completions):
    """One vbd of this guest; implements the NBD server's block-device interface."""

    kind = "vbd"
    driver = "blkfront"
    log = log
    error = BlkfrontError
    step_errors = (OutOfFrames, GrantTableFull, BlkfrontError, RingOverflow)
    can_multi_conn = False

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
        terms = negotiate(self.options, read_nodes(self.xs, self.backend_path, BACKEND_FEATURES))  # one round trip
        self._terms = terms
        self._grants.negotiated(terms.persistent)
        order = terms.ring_page_order
        queues: list[Queue] = []
        gfns: list[int] = []                # the queue being made: its frames, and those granted so far
        refs: list[int] = []
        try:
            for index in range(terms.queues):
                gfns, refs = self.pool.alloc(1 << order), []
                for g in gfns:
                    self.host.memory.frame(g)[:] = bytes(PAGE_SIZE)
                    refs.append(self.host.gnttab.grant_access(self.backend_domid, g))
                port = self.host.alloc_unbound(self.backend_domid)
                shared = SharedRing([self.host.memory.frame(g) for g in gfns], self.abi.request_size,
                                    self.abi.response_size)
                queues.append(Queue(index, FrontRing(shared, init=True), gfns, refs, port))
                gfns, refs = [], []
        except BaseException:
            # (A grant table used up -- GrantTableFull -- is a step error: the device stays short of
            # Connected and nothing it took is kept, the half-made queue's frames and grants included.)
            for q in queues:
                self._release_queue(q)
            for g, ref in zip(gfns, refs):
                self._grants.end_grant(ref, g)
            self.pool.free(gfns[len(refs):])
            raise
        nodes = frontend_nodes(self.options.protocol, terms, [(q.refs, q.port) for q in queues])

        def body(tx: int) -> None:
            batch = [(XsType.XS_RM, f"{self.path}/{key}".encode() + b"\0")
                     for key in stale_nodes(self.xs.directory(self.path, tx), nodes)]
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
        log.info("vbd %d: %d queue(s), %d-page rings, persistent %s, %d segments per request, %s", self.devid,
                 terms.queues, 1 << order, "on" if terms.persistent else "off", terms.max_segments,
                 self.options.protocol)

    def _read_backend(self) -> None:
        disk = disk_of(self.backend_path, read_nodes(self.xs, self.backend_path, DISK_NODES),  # one round trip
                       self._terms)
        self.size, self.sector_size, self.read_only = disk.size, disk.sector_size, disk.read_only
        self.can_trim, self.can_flush = disk.can_trim, disk.can_flush

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
        ops: list[Op] = []
        for req in reqs:
            op = req.op
            op.outstanding -= 1
            if op.given is not None:
                # Issued again as a copy (the pages go back to a pool the new backend may not share).
                op.data = memoryview(b"".join([page.view for page in op.given]))[:op.length]
                self._grants.put(op.given)
                op.given = None
            self._grants.put(req.pages + req.indirect)
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

    def _release_queue(self, q: Queue) -> None:
        try:
            self.host.close_port(q.port)
        except Exception as e:
            log.warning("vbd %d: closing port %d: %s", self.devid, q.port, e)
        for g, ref in zip(q.gfns, q.refs):
            self._grants.end_grant(ref, g)

    # ---- the block-device interface (what the NBD server calls) -----------------------

    def submit_read(self, offset: int, length: int, done: Callable[[int, Sequence[memoryview]], None]) -> None:
        self._submit(Op(BLKIF_OP_READ, offset, length, done))

    def submit_reads(self, reads: Sequence[tuple[int, int, Callable[[int, Sequence[memoryview]], None]]]) -> None:
        """``submit_read`` of each ``(offset, length, done)``, in order, under one taking of the lock.

        What a recv of 16 READs from the NBD client hands over: the checks
        of the device's state are made once, and each read that fits one
        direct request on persistent pages goes on the ring in one step, as
        ``_submit`` would put it (anything else waits in ``pending`` as
        there, behind which every later read waits too, keeping their order).
        """
        refused: list[tuple[Op, int]] = []
        with self._lock:
            state = self.state
            gone = self._closing or state == XenbusState.Closed
            connected = state == XenbusState.Connected
            direct = connected and self._grants.persistent
            size, sector = self.size, self.sector_size
            pending, start_direct = self._pending, self._start_direct
            for offset, length, done in reads:
                op = Op(BLKIF_OP_READ, offset, length, done)
                if gone:
                    refused.append((op, errno.ENODEV))
                elif offset % sector or length % sector or offset + length > size:
                    refused.append((op, errno.EINVAL))
                elif not (direct and not pending and 0 < length <= _DIRECT_MAX and start_direct(op)):
                    pending.append(op)
                    if connected:
                        self._kick_pending()
            if connected and threading.get_ident() not in self._plugged:
                self._push_all()
        for op, err in refused:
            self._complete(op, err)

    def submit_write(self, offset: int, data: memoryview, fua: bool, done: Callable[[int], None]) -> None:
        self._submit(Op(BLKIF_OP_WRITE, offset, len(data), done, data=memoryview(data), then_flush=fua))

    def write_buffer(self, offset: int, length: int) -> Lent | None:
        """Persistent pages to receive a WRITE payload into (no copy later), or None: not connected
        with persistent grants, too large, or the pool too short to leave room for other I/O."""
        if not 0 < length <= LEND_MAX:
            return None
        n = (length + PAGE_SIZE - 1) >> 12
        with self._lock:
            if self.state != XenbusState.Connected or not self._grants.persistent or self._closing:
                return None
            free = self._grants.free
            grow = self.options.max_persistent_frames - self._grants.count
            if len(free) + grow < n + LEND_RESERVE:
                return None
            try:
                pages = self._grants.get(n, readonly=False, busy=bool(self._shadow))
            except OutOfFrames:
                return None
            if pages is None:
                return None
        return Lent(self._lock, self._grants, pages, length)

    def submit_write_buffer(self, offset: int, buffer: Lent, fua: bool, done: Callable[[int], None]) -> None:
        """``submit_write`` of a payload received into pages :meth:`write_buffer` lent (we take them back)."""
        op = Op(BLKIF_OP_WRITE, offset, buffer.length, done, then_flush=fua)
        op.given = buffer.take()
        self._submit(op)

    def submit_flush(self, done: Callable[[int], None]) -> None:
        self._submit(Op(BLKIF_OP_FLUSH_DISKCACHE, 0, 0, done))

    def submit_trim(self, offset: int, length: int, done: Callable[[int], None]) -> None:
        if not self.can_trim:
            done(errno.EOPNOTSUPP)
            return
        self._submit(Op(BLKIF_OP_DISCARD, offset, length, done))

    def submit_write_zeroes(self, offset: int, length: int, may_trim: bool, done: Callable[[int], None]) -> None:
        """Real zeroes, written from one granted zero page that every segment names.

        Never a discard, even when the client allows holes (``may_trim``):
        blkif.h leaves a discarded range's content undefined, and no backend
        feature promises zeroes.  Nor a buffer of ``length`` zeroes: one page
        carries any length, so a 32 MiB request costs 4 KiB (plus indirect
        pages), as Linux's zeroing through ZERO_PAGE does.
        """
        self._submit(Op(BLKIF_OP_WRITE, offset, length, done, zeroes=True))

    def _submit(self, op: Op) -> None:
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
                if not (connected and not self._pending and self._grants.persistent and op.kind <= BLKIF_OP_WRITE
                        and op.length <= _DIRECT_MAX and not op.zeroes and op.length and self._start_direct(op)):
                    self._pending.append(op)
                    if connected:
                        self._kick_pending()
                if connected and threading.get_ident() not in self._plugged:
                    self._push_all()
                return
        self._complete(op, err)

    def plug(self) -> None:
        """Hold back this thread's submissions from the backend until :meth:`unplug` (the requests go on
        the ring, the ring is pushed and the backend notified once for all of them)."""
        self._plugged.add(threading.get_ident())

    def unplug(self) -> None:
        with self._lock:
            self._plugged.discard(threading.get_ident())
            if self.state == XenbusState.Connected:
                self._push_all()

    # ---- shutting down -----------------------------------------------------------------------

    def _shut(self, error: int) -> None:
        """Fail everything in flight or waiting (backend gone for good, or we are closing)."""
        failed = {id(r.op): r.op for r in self._shadow.values()}
        failed.update({id(op): op for op in self._pending})
        for req in self._shadow.values():
            self._grants.put(req.pages + req.indirect)
        self._shadow.clear()
        self._pending.clear()
        self._teardown_rings()
        for op in failed.values():
            for req in op.read_pages.values():
                self._grants.put(req.pages)
            op.read_pages.clear()
            if op.given is not None:
                self._grants.put(op.given)
                op.given = None
            threading.Thread(target=self._complete, args=(op, error), daemon=True).start()

    def close(self, patience: float = CLOSE_PATIENCE) -> None:
        """Disconnect from the backend (Closing, Closed) and give back every frame.

        ``patience``: how long to wait for the backend to unmap our frames
        (so that they can be reused) before saying Closed.  A domain that is
        going away passes 0: its memory goes with it, and waiting only made
        ``xdom down`` of many guests slow (100 ms a guest).
        """
        with self._lock:
            if self._closing:
                return
            self._stop_watching()
            self._shut(errno.ENODEV)
            self._grants.release_all()
            self._closing = True
            os.eventfd_write(self._wake, 1)
        if self._thread.is_alive():
            self._thread.join()
        self._say(XenbusState.Closing)
        # The backend unmaps when it sees Closing; wait for it (bounded) before saying Closed.
        deadline = time.monotonic() + patience
        while True:
            with self._lock:
                self._grants.retry_deferred()
                if not self._grants.deferred or time.monotonic() > deadline:
                    break
            time.sleep(DEFERRED_RETRY_MS / 1000)
        if self._grants.deferred and patience > 0:
            log.warning("vbd %d: %d frame(s) still mapped by backend d%d after %gs; left aside", self.devid,
                        len(self._grants.deferred), self.backend_domid, patience)
        os.close(self._wake)
        self._epoll.close()
        self._say(XenbusState.Closed)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"in_flight": len(self._shadow), "pending": len(self._pending), "reconnects": self.reconnects,
                    "persistent_frames": self._grants.count, "frames_still_mapped": len(self._grants.deferred),
                    "indirect_requests": self.indirect_requests, "reissued": self.reissued,
                    "ignored_responses": self.ignored_responses}

    def queue_stats(self) -> list[dict[str, int]]:
        """Per queue of the current connection: ring pages, requests put on it, responses taken off it."""
        with self._lock:
            return [{"ring_pages": len(q.gfns), "requests": q.requests, "responses": q.responses}
                    for q in self._queues]

