"""vhost-user-blk on top of blkfront: a VM's virtio-blk disk, served by its guest domain.

This module is the data path: virtio-blk requests taken off the VM's rings,
checked, and served by the block device.  What the VM is told about the
disk (features, config space, the protocol's numbers) is ``blk_device``;
the thread and socket that serve it, ``blk_export``.

::

    VM's virtio-blk driver -> virtqueue in the VM's memory (QEMU's shared memfd)
      -> this module, in the guest domain: one copy between the VM's buffers and ...
      -> blkfront's persistently granted pages -> blkback, which sees only those pages

Rules of this module:

* Trusted: the block device (blkfront, in this very process) and the
  vhost-user core (``backend``, ``virtqueue``, ``memory``), which already
  checked every chain's shape and that each of its buffers lies in the VM's
  memory table.
* Not trusted: what the VM put in its buffers.  A request's 16-byte header
  (and a discard/write-zeroes range list) is *copied* out of guest memory
  before it is looked at, so the VM rewriting it meanwhile changes nothing;
  type, sector, lengths and ranges are checked against the disk before
  anything is submitted.  What breaks a rule gets a status: IOERR for what is
  malformed, misaligned or out of range, UNSUPP for what the device does not
  do; a chain without a writable byte for the status is handed back with
  nothing written.  ``process`` never raises: a VM cannot crash its guest
  domain.
* Bounded: a queue has at most its ring size of requests in flight (a head is
  only reused once we pushed it); a request's data is at most the core's
  ``max_chain_bytes``, and the data of all those in flight at most
  ``max_bytes_in_flight`` plus one request's (chains wait on their rings
  meanwhile); a discard or write-zeroes request names at most
  ``MAX_DWZ_SEGMENTS`` ranges; completions handed over from other threads are
  bounded by the requests in flight; stopping a ring waits at most
  ``drain_timeout`` seconds for them.
* One thread touches guest memory and the queues: the vhost-user loop's.
  blkfront completes on that thread too (the loop polls its
  ``completion_fd`` and runs ``reap_completions``: no hand-off, and read data
  is copied from the granted pages straight into the VM's buffers while the
  ``done`` callback runs).  The few completions that come on another thread
  (blkfront's reconnection after a blkback restart reaps on its xenstore
  thread, errors it reports from a thread of its own) are handed over:
  read data is copied out first (its pages are only valid during ``done``),
  then the loop finishes the request.

Data moves once each way: a read is copied from blkfront's pages into the
chain's writable buffers inside ``done``; a write's readable buffers are
gathered into pages blkfront lends (``write_buffer``: its granted pages, no
copy later), or into one buffer of ours when it lends none.

Completions are pushed to the used ring in batches -- everything one reap
(or one ``process``) finished, per queue, with one used-index update -- and
the call eventfd is signalled once per batch when ``should_notify`` says so
(EVENT_IDX's ``used_event`` or NO_INTERRUPT).  With INFLIGHT_SHMFD the core
marks a head in flight when it is popped and clears it only once its used
element is published (``SplitVirtqueue.push_batch``), so a guest domain that
dies with requests in flight leaves them in QEMU's area for the next one.
"""

from __future__ import annotations

import collections
import errno
import logging
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from ..blockdev import BlockDevice
from .blk_device import (
    MAX_DISCARD_SECTORS,
    MAX_DWZ_SEGMENTS,
    MAX_WRITE_ZEROES_SECTORS,
    SECTOR,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
)
from .memory import GuestMemoryError
from .virtqueue import DescriptorChain, Segment, SplitVirtqueue

__all__ = ["DRAIN_TIMEOUT", "VirtioBlkHandler"]

log = logging.getLogger("xdom.vhost_user.blk")

_OUTHDR = struct.Struct("<IIQ")           # struct virtio_blk_outhdr: type, ioprio, sector
_DWZ = struct.Struct("<QII")              # struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags

#: Seconds a stopping ring (GET_VRING_BASE, the front end going away) waits for its requests in flight.
DRAIN_TIMEOUT = 10.0
#: The data of the READs and WRITEs a device has in flight, all rings together, past which no more chains
#: are taken off the rings until some complete (one is always taken: a request may be as large as the
#: core's ``max_chain_bytes``).  Each costs the guest domain its size in memory -- a WRITE's payload
#: gathered, a READ's pages or copy -- and a VM names as many bytes as it likes with descriptors that
#: all point at one page: without a bound, a ring of 128 requests of 64 MiB each would be 8 GiB.
MAX_BYTES_IN_FLIGHT = 64 << 20


class SpanMemory(Protocol):
    """What the data path needs from guest memory (``memory.GuestMemory``)."""

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None: ...

    def spans(self, gpa: int, length: int) -> list[tuple[memoryview, int, int]]: ...


# --- chains as byte streams ---------------------------------------------------------------

def _pieces(mem: SpanMemory, segs: Sequence[Segment], start: int, length: int) -> list[memoryview]:
    """Views of guest memory covering bytes ``[start, start + length)`` of the stream ``segs`` make.

    Raises ``GuestMemoryError`` if a piece is not mapped (the memory table
    changed under an in-flight request)."""
    out: list[memoryview] = []
    pos = 0
    end = start + length
    for seg in segs:
        seg_end = pos + seg.length
        if seg_end > start and pos < end:
            lo = max(start, pos)
            hi = min(end, seg_end)
            for view, off, n in mem.spans(seg.gpa + (lo - pos), hi - lo):
                out.append(view[off:off + n])
        pos = seg_end
        if pos >= end:
            break
    return out


def _copy(src: Sequence[memoryview | bytes], dst: Sequence[memoryview]) -> int:
    """Copy the concatenation of ``src`` into the concatenation of ``dst``, as far as both go."""
    si = di = so = do = moved = 0
    while si < len(src) and di < len(dst):
        s, d = src[si], dst[di]
        ls, ld = len(s), len(d)
        n = min(ls - so, ld - do)
        if n:
            d[do:do + n] = s[so:so + n]
            moved += n
            so += n
            do += n
        if so >= ls:
            si += 1
            so = 0
        if do >= ld:
            di += 1
            do = 0
    return moved


def _read_stream(mem: SpanMemory, segs: Sequence[Segment], start: int, length: int) -> bytes:
    """A copy of ``length`` bytes of the stream (validated afterwards: the VM may change the original)."""
    return b"".join([bytes(v) for v in _pieces(mem, segs, start, length)])


def _status_of(err: int) -> int:
    if err == 0:
        return VIRTIO_BLK_S_OK
    if err in (errno.EOPNOTSUPP, errno.ENOTSUP):
        return VIRTIO_BLK_S_UNSUPP
    return VIRTIO_BLK_S_IOERR


class _Request:
    """One chain being served: where its status goes and how many block operations it waits for."""

    __slots__ = ("index", "queue", "head", "writable", "wbytes", "pending", "error", "submitted", "cost")

    def __init__(self, index: int, queue: SplitVirtqueue, chain: DescriptorChain) -> None:
        self.index = index
        self.queue = queue
        self.head = chain.head
        self.writable = chain.writable
        self.wbytes = chain.writable_bytes          # >= 1: the last byte is the status
        self.pending = 0
        self.error = 0
        self.submitted = False
        self.cost = 0                               # its data's bytes, counted against the budget in flight


# --- the queue handler (sans-IO: fds and polling belong to the shell) ---------------------------

class VirtioBlkHandler:
    """The data path of a vhost-user-blk device over a block device (blkfront, or any ``BlockDevice``).

    Implements ``server.QueueHandler``.  The shell fills in three hooks:
    ``notify(index, queue)`` signals a ring's call fd if the queue wants it
    (after a push outside ``process``); ``wake()`` tells the loop that
    completions were handed over (it then calls ``run_handoffs``);
    ``wait(timeout)`` blocks up to ``timeout`` seconds for completions and runs
    them (used while a stopping ring drains).  Without them (unit tests) the
    caller runs ``run_handoffs``/``flush`` itself.
    """

    def __init__(self, dev: BlockDevice, serial: str | bytes = b"", *, drain_timeout: float = DRAIN_TIMEOUT,
                 max_bytes_in_flight: int = MAX_BYTES_IN_FLIGHT) -> None:
        self.dev = dev
        self.max_bytes_in_flight = max_bytes_in_flight
        self._bytes = 0                               # data of the READs and WRITEs in flight, all rings
        self._ring_bytes: dict[int, int] = {}         # the same per ring (what a stopping ring abandons)
        self._throttled: set[int] = set()             # rings left unread while the budget is spent
        raw = serial.encode(errors="replace") if isinstance(serial, str) else bytes(serial)
        self.serial = raw[:VIRTIO_BLK_ID_BYTES]
        self.drain_timeout = drain_timeout
        self.notify: Callable[[int, SplitVirtqueue], None] | None = None
        self.wake: Callable[[], None] | None = None
        self.wait: Callable[[float], None] | None = None
        self._queues: dict[int, SplitVirtqueue] = {}
        self._enabled: dict[int, bool] = {}
        self._in_flight: dict[int, int] = {}
        self._done: dict[int, list[tuple[int, int]]] = {}
        self._handoff: collections.deque[Callable[[], None]] = collections.deque()
        self._loop_ident: int | None = None
        lend = getattr(dev, "write_buffer", None)
        self._lends = callable(lend) and callable(getattr(dev, "submit_write_buffer", None))
        plug, unplug = getattr(dev, "plug", None), getattr(dev, "unplug", None)
        self._plug = plug if callable(plug) and callable(unplug) else None
        self._unplug = unplug
        #: Counters for tests and logs: requests by type, statuses, malformed chains, hand-offs, abandoned.
        self.stats: collections.Counter[str] = collections.Counter()

    # --- QueueHandler ---------------------------------------------------------------

    def adopt_thread(self) -> None:
        """The calling thread is now the loop thread (the shell's, or whoever runs after it ended)."""
        self._loop_ident = threading.get_ident()

    def queue_started(self, index: int, queue: SplitVirtqueue, enabled: bool) -> None:
        self._loop_ident = threading.get_ident()
        self._queues[index] = queue
        self._enabled[index] = enabled
        self._in_flight[index] = 0
        self._ring_bytes[index] = 0
        self._done[index] = []
        if queue.pending_resubmissions:
            log.info("ring %d: %d request(s) the previous back end had in flight, served again", index,
                     queue.pending_resubmissions)
            self.stats["resubmitted"] += queue.pending_resubmissions

    def queue_enabled(self, index: int, enabled: bool) -> None:
        # A disabled ring's chains wait (a block request cannot be served "without side effects");
        # the shell processes the ring again when it is enabled.
        self._enabled[index] = enabled

    def queue_stopped(self, index: int) -> None:
        """The ring stops (GET_VRING_BASE, a reset, the front end gone): finish what is in flight first,
        bounded, so the index the front end gets back covers it; what does not finish in time is
        abandoned (its completion is dropped; with INFLIGHT_SHMFD the area still says it is in flight)."""
        queue = self._queues.get(index)
        if queue is None:
            return
        try:
            if self._in_flight.get(index) and self.wait is not None:
                deadline = time.monotonic() + self.drain_timeout
                while self._in_flight.get(index, 0) > 0:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.wait(left)
            self._push(index, notify=True)
        except Exception:
            log.exception("ring %d: draining failed", index)
        left = self._in_flight.get(index, 0)
        if left:
            log.warning("ring %d stopped with %d request(s) still in flight: abandoned", index, left)
            self.stats["abandoned"] += left
        self._bytes -= self._ring_bytes.pop(index, 0)
        self._throttled.discard(index)
        for d in (self._queues, self._enabled, self._in_flight, self._done):
            d.pop(index, None)

    def process(self, index: int, queue: SplitVirtqueue) -> None:
        """Serve every available chain of ring ``index``; push what finished at once (the shell signals)."""
        self._loop_ident = threading.get_ident()
        if self._queues.get(index) is not queue:
            self.queue_started(index, queue, self._enabled.get(index, True))
        if not self._enabled.get(index, False):
            return
        plugged = False
        try:
            if self._plug is not None:
                self._plug()
                plugged = True
            while True:
                if self._bytes >= self.max_bytes_in_flight:
                    self._throttled.add(index)        # served again as completions free the budget
                    self.stats["throttled"] += 1
                    break
                chain = queue.pop()
                if chain is None:
                    # Re-arm the kick and look once more: a chain added meanwhile would get no kick.
                    if queue.needs_reset is not None or not queue.set_kick_notifications(True):
                        break
                    continue
                self.stats["requests"] += 1
                try:
                    self._serve(index, queue, chain)
                except Exception:          # a bug, not the guest: fail the request, keep the domain
                    log.exception("ring %d: serving chain %d failed", index, chain.head)
                    self._fail_unsubmitted(index, queue, chain)
        finally:
            if plugged and self._unplug is not None:
                try:
                    self._unplug()
                except Exception:
                    log.exception("unplug failed")
        self._push(index, notify=False)

    # --- completions --------------------------------------------------------------------

    def flush(self) -> None:
        """Push every finished request to its used ring, one batch per ring, and signal (shell: after a reap).
        Rings left unread while the budget in flight was spent are served again first, as far as it goes."""
        while self._throttled and self._bytes < self.max_bytes_in_flight:
            index = self._throttled.pop()
            queue = self._queues.get(index)
            if queue is not None:
                self.process(index, queue)
        for index in list(self._done):
            self._push(index, notify=True)

    def run_handoffs(self) -> None:
        """Finish the completions other threads handed over (on the loop thread), then push them."""
        self._loop_ident = threading.get_ident()
        for _ in range(len(self._handoff)):
            try:
                fn = self._handoff.popleft()
            except IndexError:
                break
            self.stats["handed_off"] += 1
            try:
                fn()
            except Exception:
                log.exception("a handed-over completion failed")
        self.flush()

    @property
    def pending_handoffs(self) -> int:
        return len(self._handoff)

    def in_flight(self, index: int) -> int:
        """Requests of ring ``index`` submitted to the device and not yet finished."""
        return self._in_flight.get(index, 0)

    def _push(self, index: int, notify: bool) -> None:
        done = self._done.get(index)
        queue = self._queues.get(index)
        if not done or queue is None:
            return
        self._done[index] = []
        try:
            queue.push_batch(done)
        except ValueError:
            log.exception("ring %d: pushing %d completions failed", index, len(done))
            return
        if notify and self.notify is not None:
            self.notify(index, queue)

    def _on_loop(self) -> bool:
        return threading.get_ident() == self._loop_ident

    def _hand_off(self, fn: Callable[[], None]) -> None:
        """From another thread: leave ``fn`` for the loop (deque appends are atomic) and wake it."""
        self._handoff.append(fn)
        if self.wake is not None:
            self.wake()

    def _current(self, req: _Request) -> bool:
        """Is the request's ring still the one running?  (A stopped or restarted ring drops it.)"""
        if self._queues.get(req.index) is req.queue:
            return True
        self.stats["dropped"] += 1
        return False

    def _complete(self, req: _Request, status: int) -> None:
        """Write the status byte and queue the used element (loop thread)."""
        if req.submitted:
            if not self._current(req):
                return
            self._in_flight[req.index] -= 1
            if req.cost:
                self._bytes -= req.cost
                self._ring_bytes[req.index] -= req.cost
        self.stats[f"status{status}"] += 1
        try:
            mem: SpanMemory = req.queue.memory          # type: ignore[assignment]
            views = _pieces(mem, req.writable, req.wbytes - 1, 1)
            views[0][0] = status
        except (GuestMemoryError, IndexError):
            # The memory table changed under the request: nothing to report into; give the chain back.
            self._done[req.index].append((req.head, 0))
            return
        self._done[req.index].append((req.head, req.wbytes))

    def _fail_unsubmitted(self, index: int, queue: SplitVirtqueue, chain: DescriptorChain) -> None:
        req = _Request(index, queue, chain)
        if req.wbytes:
            self._complete(req, VIRTIO_BLK_S_IOERR)
        else:
            self._done[index].append((chain.head, 0))

    def _sub_done(self, req: _Request, err: int) -> None:
        """One block operation of ``req`` ended (loop thread)."""
        if req.pending <= 0:
            return
        if err and not req.error:
            req.error = err
        req.pending -= 1
        if req.pending == 0:
            self._complete(req, _status_of(req.error))

    def _done_cb(self, req: _Request) -> Callable[[int], None]:
        def done(err: int) -> None:
            if self._on_loop():
                self._sub_done(req, err)
            else:
                self._hand_off(lambda: self._sub_done(req, err))
        return done

    def _read_cb(self, req: _Request, length: int) -> Callable[[int, Sequence[memoryview | bytes]], None]:
        def done(err: int, bufs: Sequence[memoryview | bytes]) -> None:
            if self._on_loop():
                self._read_finished(req, length, err, bufs)
            else:
                # The buffers are blkfront's pages, valid only until we return: copy them out.
                data = [bytes(b) for b in bufs] if not err else []
                self._hand_off(lambda: self._read_finished(req, length, err, data))
        return done

    def _read_finished(self, req: _Request, length: int, err: int, bufs: Sequence[memoryview | bytes]) -> None:
        if req.pending <= 0 or not self._current(req):     # (failed already: its chain is the VM's again)
            return
        if not err:
            try:
                mem: SpanMemory = req.queue.memory      # type: ignore[assignment]
                moved = _copy(bufs, _pieces(mem, req.writable, 0, length))
                if moved != length:
                    err = errno.EIO
            except GuestMemoryError:
                err = errno.EFAULT
        self._sub_done(req, err)

    # --- requests -----------------------------------------------------------------------

    def _serve(self, index: int, queue: SplitVirtqueue, chain: DescriptorChain) -> None:
        if chain.writable_bytes == 0:
            # Nowhere to put a status: hand the chain back with nothing written (QEMU would break the device).
            self.stats["malformed"] += 1
            self._done[index].append((chain.head, 0))
            return
        req = _Request(index, queue, chain)
        mem: SpanMemory = queue.memory                  # type: ignore[assignment]
        rbytes = chain.readable_bytes
        if rbytes < _OUTHDR.size:
            self.stats["malformed"] += 1
            return self._complete(req, VIRTIO_BLK_S_IOERR)
        kind, _ioprio, sector = _OUTHDR.unpack(_read_stream(mem, chain.readable, 0, _OUTHDR.size))
        self.stats[f"type{kind}"] += 1
        dev = self.dev
        if kind == VIRTIO_BLK_T_IN:
            length = req.wbytes - 1
            if not length:
                return self._complete(req, VIRTIO_BLK_S_OK)
            if not self._in_range(sector, length):
                return self._complete(req, VIRTIO_BLK_S_IOERR)
            self._submit(req, 1, lambda: dev.submit_read(sector * SECTOR, length, self._read_cb(req, length)),
                         cost=length)
        elif kind == VIRTIO_BLK_T_OUT:
            length = rbytes - _OUTHDR.size
            if dev.read_only or not self._in_range(sector, length):
                return self._complete(req, VIRTIO_BLK_S_IOERR)
            if not length:
                return self._complete(req, VIRTIO_BLK_S_OK)
            self._write(req, mem, chain.readable, sector * SECTOR, length)
        elif kind == VIRTIO_BLK_T_FLUSH:
            if not dev.can_flush:                   # no cache behind us: written is durable
                return self._complete(req, VIRTIO_BLK_S_OK)
            self._submit(req, 1, lambda: dev.submit_flush(self._done_cb(req)))
        elif kind == VIRTIO_BLK_T_GET_ID:
            # As QEMU: as much of the 20-byte id as the buffer takes, NUL-padded.
            room = min(req.wbytes - 1, VIRTIO_BLK_ID_BYTES)
            if room:
                _copy([self.serial.ljust(room, b"\0")[:room]], _pieces(mem, req.writable, 0, room))
            self._complete(req, VIRTIO_BLK_S_OK)
        elif kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            self._discard_or_zeroes(req, mem, chain, kind)
        else:
            self._complete(req, VIRTIO_BLK_S_UNSUPP)

    def _in_range(self, sector: int, length: int) -> bool:
        """Inside the disk and aligned to its logical sector (blkif moves whole sectors)."""
        ss = self.dev.sector_size
        offset = sector * SECTOR
        return offset + length <= self.dev.size and offset % ss == 0 and length % ss == 0

    def _submit(self, req: _Request, operations: int, submit: Callable[[], None], cost: int = 0) -> None:
        """Hand ``req`` to the device; ``cost``: its data's bytes, counted against the budget in flight
        (``max_bytes_in_flight``) until it completes."""
        req.pending = operations
        req.submitted = True
        self._in_flight[req.index] += 1
        if cost:
            req.cost = cost
            self._bytes += cost
            self._ring_bytes[req.index] += cost
        try:
            submit()
        except Exception:
            # A device bug (blkfront reports errors through ``done``): fail the request once, now, and
            # make whatever the device still calls back with count for nothing.
            log.exception("ring %d: submitting chain %d failed", req.index, req.head)
            if req.pending > 0:
                req.pending = -(1 << 30)
                self._complete(req, VIRTIO_BLK_S_IOERR)

    def _write(self, req: _Request, mem: SpanMemory, readable: Sequence[Segment], offset: int, length: int) -> None:
        dev = self.dev
        lent = dev.write_buffer(offset, length) if self._lends else None    # type: ignore[attr-defined]
        if lent is not None:
            try:
                moved = _copy(_pieces(mem, readable, _OUTHDR.size, length), lent.views)
            except BaseException:
                lent.release()
                raise
            if moved != length:
                lent.release()
                return self._complete(req, VIRTIO_BLK_S_IOERR)
            self._submit(req, 1, lambda: dev.submit_write_buffer(offset, lent, False,  # type: ignore[attr-defined]
                                                                 self._done_cb(req)), cost=length)
            return
        buf = bytearray(length)
        _copy(_pieces(mem, readable, _OUTHDR.size, length), [memoryview(buf)])
        self._submit(req, 1, lambda: dev.submit_write(offset, memoryview(buf), False, self._done_cb(req)), cost=length)

    def _discard_or_zeroes(self, req: _Request, mem: SpanMemory, chain: DescriptorChain, kind: int) -> None:
        dev = self.dev
        discard = kind == VIRTIO_BLK_T_DISCARD
        if dev.read_only or not (dev.can_trim if discard else dev.can_write_zeroes):
            return self._complete(req, VIRTIO_BLK_S_UNSUPP)
        payload = chain.readable_bytes - _OUTHDR.size
        if payload <= 0 or payload % _DWZ.size or payload // _DWZ.size > MAX_DWZ_SEGMENTS:
            self.stats["malformed"] += 1
            return self._complete(req, VIRTIO_BLK_S_IOERR)
        raw = _read_stream(mem, chain.readable, _OUTHDR.size, payload)      # copied, then checked
        ranges: list[tuple[int, int, int]] = []
        limit = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        for sector, num, flags in _DWZ.iter_unpack(raw):
            if flags & ~(0 if discard else VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP):
                return self._complete(req, VIRTIO_BLK_S_UNSUPP)
            if num > limit or not self._in_range(sector, num * SECTOR):
                return self._complete(req, VIRTIO_BLK_S_IOERR)
            if num:
                ranges.append((sector * SECTOR, num * SECTOR, flags))
        if not ranges:
            return self._complete(req, VIRTIO_BLK_S_OK)

        def submit_all() -> None:
            for offset, length, flags in ranges:
                if discard:
                    dev.submit_trim(offset, length, self._done_cb(req))
                else:
                    dev.submit_write_zeroes(offset, length, bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
                                            self._done_cb(req))
        self._submit(req, len(ranges), submit_all)
