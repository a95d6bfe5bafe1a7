"""The block-device interface a guest's disk offers its exports, and a file-backed one.

A frontend (blkfront) implements it; the guest-side exports (the NBD server,
the vhost-user-blk back end) drive it.  It sits below both, so that neither
imports the other.

The interface is asynchronous because the real implementation (blkfront) is
a ring: a request is queued, the backend answers later on the event-channel
thread, in any order.  A synchronous interface would force one server thread
per in-flight request; a callback one lets a single reader thread keep many
requests in flight, which is what makes ``fio --iodepth=16`` worth running.

Contract for every ``submit_*`` method (what the server relies on):

* it returns promptly, without waiting for the I/O;
* ``done`` is called exactly once -- possibly before ``submit_*`` returns, on
  the calling thread, or later on any other thread; completions of different
  requests may arrive in any order;
* ``error`` is a host errno, 0 for success (the server maps it to the few
  values the NBD wire allows; EDQUOT/EFBIG become ENOSPC, unknown ones EIO);
* ``submit_read``'s buffers are only valid until ``done`` returns (so a ring
  can recycle its granted pages): the callee may reuse or scribble over them
  afterwards, and the server sends them from inside ``done``.  On success
  they must total exactly ``length`` bytes;
* ``submit_write``'s ``data`` stays valid and unmodified until ``done`` is
  called; the device must not keep it after that;
* ``done`` may block briefly (it writes a reply to a socket, with a bounded
  send timeout); a device should not call it while holding a lock that its
  other completion paths need;
* the server only issues requests that are in range, aligned to
  ``sector_size``, non-empty, and (except trim) at most 32 MiB long; writes,
  trims and write-zeroes never reach a ``read_only`` device, trims only a
  ``can_trim`` one, write-zeroes only a ``can_write_zeroes`` one, flushes
  only a ``can_flush`` one.  Trim may be up to 4 GiB - 1 bytes long.

Optional, for devices where a request or a completion has a fixed cost
worth sharing (a ring's notification, a reply's system call):

* ``plug()`` / ``unplug()`` (both or neither; Linux's ``blk_start_plug``):
  the server calls ``plug()`` before submitting the requests it read in one
  go and ``unplug()`` after them, on the same thread; in between the device
  may hold submitted work back (not tell its backend) until ``unplug()``.
  The server never waits for a completion while plugged.
* :func:`completion_batch`: a device that completes several requests in a
  row on one thread does so inside ``with completion_batch():``; ``done``
  callbacks may then leave work for the end of the batch (the server
  gathers the replies and sends them with one system call).  A read's
  buffers are still only valid until its ``done`` returns, unless the
  device opened the batch with ``completion_batch(keeps_buffers=True)``:
  it then keeps every read buffer it hands to a ``done`` inside the batch
  as it was (not freed, not reused) until the batch has ended, and the
  server may send them from there, without a copy.
* ``completion_fd()``, ``reap_completions()``, ``attach_reaper()``,
  ``detach_reaper()`` (all or none): completions on the server's threads.
  Between ``attach_reaper()`` and ``detach_reaper()`` a caller polls
  ``completion_fd()`` and calls ``reap_completions()`` whenever it is
  readable, which runs the waiting ``done`` callbacks on that thread; the
  device may then leave its completions to its reapers (while it has at
  least one) instead of running them on threads of its own.  The server
  attaches each connection's thread, which then serves a request from the
  socket to the device and back without a hand-off between threads.  A
  reaper never blocks on anything but that poll (the server's sends do not
  block), so completions are never stuck behind it.
* ``write_buffer(offset, length)`` and ``submit_write_buffer(offset,
  buffer, fua, done)`` (both or neither): a WRITE payload received straight
  into the device's own memory, with no copy.  ``write_buffer`` lends an
  object with ``views`` (writable buffers totalling ``length`` bytes) and
  ``release()``, or returns None (the server then uses memory of its own
  and ``submit_write``).  The server fills the views with the payload and
  passes the object to ``submit_write_buffer``, which takes it back
  (``done`` is called as for ``submit_write``; the device frees the memory
  itself, whatever happens), or calls ``release()`` if it never submits it
  (the client went away mid-payload, the server is shutting down).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

from .hostsys.files import punch_hole

__all__ = ["ReadDone", "Done", "BlockDevice", "FileBlockDevice", "CompletionBatch", "completion_batch",
           "current_completion_batch"]

log = logging.getLogger("xdom.blockdev")

#: ``done(error, buffers)`` for reads; ``buffers`` valid only during the call.
ReadDone = Callable[[int, Sequence[memoryview | bytes]], None]
#: ``done(error)`` for everything else.
Done = Callable[[int], None]


@runtime_checkable
class BlockDevice(Protocol):
    """What the NBD server needs from a disk.  See the module docstring for
    the threading and buffer-lifetime contract."""

    #: Export size in bytes; a multiple of ``sector_size``.
    size: int
    #: Logical sector size (512 or 4096): the smallest aligned I/O unit,
    #: advertised to clients as the minimum block size.
    sector_size: int
    read_only: bool
    #: ``submit_trim`` discards (the region may then read back as anything).
    can_trim: bool
    #: ``submit_write_zeroes`` is supported.
    can_write_zeroes: bool
    #: ``submit_flush`` makes completed writes durable (and makes FUA possible).
    can_flush: bool
    #: Flush/FUA on one connection covers writes completed on any other, i.e.
    #: no per-connection cache; lets clients open several connections.
    can_multi_conn: bool

    def submit_read(self, offset: int, length: int, done: ReadDone) -> None: ...

    def submit_write(self, offset: int, data: memoryview, fua: bool, done: Done) -> None: ...

    def submit_flush(self, done: Done) -> None: ...

    def submit_trim(self, offset: int, length: int, done: Done) -> None: ...

    def submit_write_zeroes(self, offset: int, length: int, may_trim: bool, done: Done) -> None: ...


class CompletionBatch:
    """Work ``done`` callbacks left for the end of a run of completions: per key, a list of items and
    the function that finishes them (called once, at the end of the batch, with that list)."""

    __slots__ = ("_work", "keeps_buffers")

    def __init__(self, keeps_buffers: bool = False) -> None:
        self._work: dict[object, tuple[list, Callable[[list], None]]] = {}
        #: Read buffers handed over in this batch stay as they are until it ends (``completion_batch``).
        self.keeps_buffers = keeps_buffers

    def items(self, key: object, finish: Callable[[list], None]) -> list:
        """The list of ``key``'s deferred items in this batch; ``finish(items)`` runs when the batch ends."""
        entry = self._work.get(key)
        if entry is None:
            entry = self._work[key] = ([], finish)
        return entry[0]

    def _finish(self) -> None:
        while self._work:
            work, self._work = self._work, {}
            for items, finish in work.values():
                try:
                    finish(items)
                except Exception:
                    log.exception("finishing a batch of completions failed")


_batches = threading.local()


class completion_batch:
    """``with completion_batch(): ...`` around a run of ``done`` calls on this thread (see the module
    docstring); nested uses join the outermost batch, which finishes the work when it ends.

    ``keeps_buffers=True`` (the device keeps its read buffers until the batch ends) always opens a
    batch of its own, finished at its own end: joined to an outer one, the work would be finished
    after the buffers it may send from are gone."""

    __slots__ = ("_batch", "_outer", "_keeps")

    def __init__(self, keeps_buffers: bool = False) -> None:
        self._keeps = keeps_buffers
        self._outer: CompletionBatch | None = None

    def __enter__(self) -> CompletionBatch | None:
        outer = getattr(_batches, "current", None)
        if outer is not None and not self._keeps:
            self._batch = None
            return None
        self._outer = outer
        self._batch = _batches.current = CompletionBatch(self._keeps)
        return self._batch

    def __exit__(self, *exc: object) -> None:
        batch = self._batch
        if batch is not None:
            try:
                batch._finish()
            finally:
                _batches.current = self._outer
                self._outer = None


def current_completion_batch() -> CompletionBatch | None:
    """The batch of completions this thread is in, if any."""
    return getattr(_batches, "current", None)


# fallocate(2) with mode flags: xdom.domains.hostsys.files
_punch = punch_hole


_ZEROES = bytes(1024 * 1024)
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)


class FileBlockDevice:
    """A ``BlockDevice`` over a regular file (or a host block device).

    I/O runs on a small thread pool so that, like a real ring, completions
    arrive on threads other than the submitter's and out of order -- the
    server's concurrency is exercised for real.  ``scribble=True`` overwrites
    every read buffer after ``done`` returns, so a consumer that keeps a read
    buffer past its completion gets visibly corrupt data in tests.

    The size is the file size rounded down to a whole sector: a client could
    not address a partial last sector anyway.
    """

    def __init__(self, path: str | os.PathLike[str], sector_size: int = 512, read_only: bool = False,
                 *, workers: int = 4, scribble: bool = False) -> None:
        if sector_size < 512 or sector_size > 65536 or sector_size & (sector_size - 1):
            raise ValueError(f"sector size {sector_size} must be a power of 2 in [512, 65536]")
        if workers < 1:
            raise ValueError("need at least one worker")
        self.path = os.fspath(path)
        self.sector_size = sector_size
        self.read_only = read_only
        self._scribble = scribble
        self._fd = os.open(self.path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        try:
            st = os.fstat(self._fd)
            if stat.S_ISREG(st.st_mode):
                raw = st.st_size
            elif stat.S_ISBLK(st.st_mode):
                raw = os.lseek(self._fd, 0, os.SEEK_END)
            else:
                raise ValueError(f"{self.path} is neither a regular file nor a block device")
            self.size = raw - raw % sector_size
            self.can_trim = not read_only and self._probe_punch(stat.S_ISREG(st.st_mode), raw)
        except BaseException:
            os.close(self._fd)
            raise
        self.can_write_zeroes = not read_only
        self.can_flush = True
        # No cache of our own: every connection shares the kernel page cache
        # of one file, and fdatasync flushes all of it, so flush/FUA on one
        # connection covers writes completed on any other.
        self.can_multi_conn = True
        self._closed = False
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbd-file")

    def _probe_punch(self, regular: bool, raw_size: int) -> bool:
        if not regular:
            # Probing a block device would discard real data; the kernel
            # implements PUNCH_HOLE for block devices (as a zeroing discard),
            # and a trim that turns out unsupported is reported as done.
            return True
        # Punching past EOF with KEEP_SIZE changes nothing but still tells us
        # whether the filesystem implements it.
        try:
            _punch(self._fd, raw_size + self.sector_size, self.sector_size)
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                return False
            raise
        return True

    # --- lifecycle --------------------------------------------------------------

    def close(self) -> None:
        """Wait for queued I/O (its completions still run), then close the file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True)
        os.close(self._fd)

    def __enter__(self) -> FileBlockDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- BlockDevice ------------------------------------------------------------

    def submit_read(self, offset: int, length: int, done: ReadDone) -> None:
        def task() -> None:
            buf = bytearray()
            try:
                self._check_range(offset, length)
                buf = bytearray(length)
                self._pread_into(memoryview(buf), offset)
                err = 0
            except OSError as e:
                err = e.errno or errno.EIO
            except Exception:
                log.exception("FileBlockDevice read failed")
                err = errno.EIO
            _call(done, err, [memoryview(buf)] if err == 0 else [])
            if self._scribble and len(buf):
                ctypes.memset((ctypes.c_char * len(buf)).from_buffer(buf), 0xA5, len(buf))

        self._submit(task, lambda: done(errno.ESHUTDOWN, []))

    def submit_write(self, offset: int, data: memoryview, fua: bool, done: Done) -> None:
        def op() -> None:
            self._check_writable()
            view = memoryview(data).cast("B")
            self._check_range(offset, len(view))
            pos = 0
            while pos < len(view):
                pos += os.pwrite(self._fd, view[pos:], offset + pos)
            if fua:
                os.fdatasync(self._fd)

        self._submit_op(op, done)

    def submit_flush(self, done: Done) -> None:
        self._submit_op(lambda: os.fdatasync(self._fd), done)

    def submit_trim(self, offset: int, length: int, done: Done) -> None:
        def op() -> None:
            self._check_writable()
            self._check_range(offset, length)
            try:
                _punch(self._fd, offset, length)
            except OSError as e:
                # Trim is advisory: not discarding is a valid implementation.
                if e.errno not in _UNSUPPORTED:
                    raise

        self._submit_op(op, done)

    def submit_write_zeroes(self, offset: int, length: int, may_trim: bool, done: Done) -> None:
        def op() -> None:
            self._check_writable()
            self._check_range(offset, length)
            if may_trim:
                try:
                    _punch(self._fd, offset, length)   # reads back as zeroes
                    return
                except OSError as e:
                    if e.errno not in _UNSUPPORTED:
                        raise
            # NO_HOLE (or no hole punching): really write zeroes, so the range
            # stays allocated and later writes cannot fail for lack of space.
            pos = 0
            while pos < length:
                n = min(len(_ZEROES), length - pos)
                pos += os.pwrite(self._fd, memoryview(_ZEROES)[:n], offset + pos)

        self._submit_op(op, done)

    # --- helpers ----------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        # The server validates too; this keeps the device safe on its own.
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, "I/O beyond the end of the device")

    def _check_writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EPERM, "device is read-only")

    def _pread_into(self, view: memoryview, offset: int) -> None:
        pos = 0
        while pos < len(view):
            n = os.preadv(self._fd, [view[pos:]], offset + pos)
            if n == 0:
                raise OSError(errno.EIO, "short read: file shrank under the device")
            pos += n

    def _submit_op(self, op: Callable[[], None], done: Done) -> None:
        def task() -> None:
            try:
                op()
                err = 0
            except OSError as e:
                err = e.errno or errno.EIO
            except Exception:
                log.exception("FileBlockDevice operation failed")
                err = errno.EIO
            _call(done, err)

        self._submit(task, lambda: done(errno.ESHUTDOWN))

    def _submit(self, task: Callable[[], None], on_closed: Callable[[], None]) -> None:
        try:
            self._pool.submit(task)
        except RuntimeError:      # pool shut down: the device is closed
            on_closed()


def _call(done: Callable[..., None], *args: object) -> None:
    try:
        done(*args)
    except Exception:
        log.exception("NBD device completion callback raised")
