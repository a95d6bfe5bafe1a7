"""blkfront's completions: the backend's responses taken off the rings and handed to the user.

Responses are checked: an id we did not issue is ignored, so a broken
backend cannot make us complete the wrong operation or touch a frame we no
longer own.  An operation completes when its last request is answered; a
read's data is handed over straight from our granted pages, which are
freed after its ``done`` returns; a FUA write becomes a flush once written.

Who reaps (:mod:`xdom.domains.blockdev`'s contract): the device's own
thread, waiting on every queue's event channel, or, while the NBD server
has attached reapers, the server's connection threads, which poll
:meth:`Completions.completion_fd` and call
:meth:`Completions.reap_completions`, so that a request's whole round trip
runs on one thread.  Callbacks never run under the device's lock (they may
submit more).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading

from ..abi.blkif import BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_OKAY
from ..abi.ring import RingOverflow
from ..blockdev import completion_batch
from ..frame_pool import FramePool
from ..log_budget import worth_logging
from ..xenbus import XenbusState
from ..xenhost.base import XenHost
from ..xenstore import XenstoreClient
from .grants import PAGE_SIZE, Page
from .negotiate import DEFAULT_OPTIONS, FrontendOptions
from .requests import Op, Req, RequestRings

log = logging.getLogger("xdom.blkfront")

DEFERRED_RETRY_MS = 100               # how often frames the backend still maps are tried again


class Completions(RequestRings):
    """The reaping of responses, on the device's thread or its attached reapers'."""

    def __init__(self, host: XenHost, xs: XenstoreClient, devid: int,
                 options: FrontendOptions = DEFAULT_OPTIONS, pool: FramePool | None = None) -> None:
        super().__init__(host, xs, devid, options, pool)
        self._generation = 0                      # bumped when the rings change: the poll set is made again
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll = select.epoll()              # every queue's event channel (completion_fd)
        self._reapers = 0
        self._thread = threading.Thread(target=self._completion_loop, name=f"blkfront-{devid}", daemon=True)

    # ---- on the device's thread --------------------------------------------------------

    def _completion_loop(self) -> None:
        generation: tuple[int, bool] | None = None
        poller = select.poll()
        grants = self._grants
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
            ready = [fd for fd, _ in poller.poll(DEFERRED_RETRY_MS if grants.deferred else None)]
            with self._lock:
                if self._closing:
                    return
                if grants.deferred:
                    grants.retry_deferred()
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

    # ---- on the caller's thread ------------------------------------------------------------
    # (the NBD server's connection thread, which then does all of a request's work in the guest:
    # no hand-off between threads, no contention for the GIL)

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

    # ---- taking responses ------------------------------------------------------------------

    def _reap(self) -> None:
        finished: list[Op] = []
        usual: list[Req] = []                     # the usual read: one request carried all of it
        release: list[Page] = []                  # freed under the lock taken after the callbacks
        release_front: list[Page] = []            # indirect pages (GrantedPages.get)
        with self._lock:
            if self.state != XenbusState.Connected:
                return
            unpack, shadow = self.abi.response.unpack_from, self._shadow
            broken = ""
            for q in self._queues:
                while not broken:
                    try:
                        raws = q.ring.take_responses()
                    except RingOverflow as e:
                        broken = f"ring {q.index}: {e}"
                        break
                    for raw in raws:
                        rid, _, status = unpack(raw)
                        req = shadow.pop(rid, None)
                        if req is None:
                            self.ignored_responses += 1
                            n = self.ignored_responses
                            if worth_logging(n):          # a backend must not flood our log
                                log.warning("vbd %d: response for unknown request id %d ignored (%d so far)",
                                            self.devid, rid, n)
                            continue
                        q.responses += 1
                        op = req.op
                        if (status == BLKIF_RSP_OKAY and op.outstanding == 1 and op.kind == BLKIF_OP_READ and not op.error
                                and not op.read_pages and op.next_byte >= op.length and not op.redo
                                and not req.indirect):
                            op.outstanding = 0            # done: what the general steps below conclude
                            usual.append(req)
                            continue
                        op.outstanding -= 1
                        if status != BLKIF_RSP_OKAY and not op.error:
                            op.error = errno.EOPNOTSUPP if status == -2 else errno.EIO
                        if req.indirect:
                            release_front += req.indirect
                        if op.kind == BLKIF_OP_READ:
                            op.read_pages[req.byte_offset] = req      # its pages hold the data until done
                            if op.next_byte < op.length or op.redo:
                                # Parts of this read wait for pages: holding these could starve them
                                # for good (a read larger than the pool), so the data is copied out.
                                req.copy = b"".join(self._grants.views(req.pages, req.length))
                                release += req.pages
                                req.pages = []
                        else:
                            release += req.pages
                        if op.outstanding == 0 and op.next_byte >= op.length and not op.redo:
                            finished.append(op)
                    try:
                        if not q.ring.final_check_for_responses():
                            break
                    except RingOverflow as e:
                        broken = f"ring {q.index}: {e}"
            if broken:
                # Linux's blkfront then fails the device's I/O (BLKIF_STATE_ERROR).  What was in flight
                # fails now; new I/O waits for the backend to come back (a restart: new rings).
                log.error("vbd %d: backend d%d broke %s: failing %d request(s) in flight", self.devid,
                          self.backend_domid, broken, len(shadow))
                self._shut(errno.EIO)
        # One batch: the NBD server sends the replies of all these operations together when it ends,
        # from the read pages themselves (freed below, after it: keeps_buffers).
        with completion_batch(keeps_buffers=True):
            for req in usual:
                self._read_done(req, release)
            for op in finished:
                answered = op.read_pages
                if op.kind == BLKIF_OP_READ and len(answered) == 1 and not op.error:
                    # One request's pages, whole but maybe the last, answered among other responses.
                    self._read_done(answered.popitem()[1], release)
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
            if release_front:
                self._grants.put(release_front, front=True)
            if release:
                self._grants.put(release)
            if self._pending and self.state == XenbusState.Connected:
                self._kick_pending()
                self._push_all()

    def _shut(self, error: int) -> None:
        """Fail everything in flight or waiting, and let the rings go (the device's: :mod:`.device`)."""
        raise NotImplementedError

    # ---- handing results to the user -------------------------------------------------------

    def _read_done(self, req: Req, release: list[Page]) -> None:
        """Complete the read ``req`` carried whole, from its pages (``release``: freed after the batch)."""
        views = self._read_views(req)
        try:
            req.op.done(0, views)
        except Exception:
            log.exception("vbd %d: completion callback failed", self.devid)
        views.clear()
        release += req.pages

    def _read_views(self, req: Req) -> list[memoryview]:
        """What an answered read request carries: its pages (one view for a run of frames), or the
        copy taken when its pages had to serve other parts of its read."""
        if req.copy is not None:
            return [memoryview(req.copy)]
        if req.length == PAGE_SIZE:
            return [req.pages[0].view]          # the usual 4 KiB read
        return self._grants.views(req.pages, req.length)

    def _complete_later(self, op: Op, error: int = 0) -> None:
        """Complete without calling back under our lock (the callback may submit more)."""
        threading.Thread(target=self._complete, args=(op, error), daemon=True).start()

    def _complete(self, op: Op, error: int, release: list[Page] | None = None) -> None:
        """Hand the result to the user; read data is sent straight from our frames, which are freed after
        (at once, or added to ``release`` for the caller to free)."""
        try:
            if op.kind == BLKIF_OP_READ:
                views = []
                answered = op.read_pages
                if not error:
                    for off in (sorted(answered) if len(answered) > 1 else answered):
                        views += self._read_views(answered[off])
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
                            self._grants.put(pages)
            else:
                if op.given is not None:          # a lent payload's pages: ours again
                    self._free_given(op, release)
                op.done(error)
        except Exception:
            log.exception("vbd %d: completion callback failed", self.devid)

    def _free_given(self, op: Op, release: list[Page] | None = None) -> None:
        pages, op.given = op.given, None
        if pages:
            if release is not None:
                release += pages
            else:
                with self._lock:
                    self._grants.put(pages)
