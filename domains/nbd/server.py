"""The thin I/O layer: a unix-socket NBD server around the sans-IO protocol.

Threads and why:

* one accept thread, blocked in ``poll()`` on the listening socket and a
  wake-up pipe (closing a socket does not reliably wake ``accept()``);
* one thread per client, blocked only in ``poll()``: it reads requests with
  ``recv_into()`` into the buffer the protocol asks for (a WRITE payload
  lands directly in its own buffer), turns events into ``device.submit_*``
  calls, and sends what replies could not go out at once;
* no sender thread: replies are sent by whoever completes the request --
  the device's callbacks, on whatever thread the device uses -- with a
  non-blocking ``sendmsg(header, *buffers)`` under a per-connection send
  lock.  This is what lets a read reply go out from the device's own
  buffers, which are only valid until the callback returns; what the socket
  does not take at once is copied to the connection's output queue, which
  its thread sends on ``POLLOUT``.  No completion ever waits for a client.
* A device that offers it (``completion_fd`` and friends, see
  ``device.py``; blkfront does) has its completions run by the client's
  thread itself, polled with the socket: a request then goes from the
  socket to the device and its reply back out without a hand-off between
  threads.  A device that completes in batches (``completion_batch``) gets
  the batch's replies to one connection in one ``sendmsg`` when the batch
  ends: small read data is copied into the batch, a large read sends the
  batch at once from the device's buffers.

The requests one ``recv`` brought are submitted with the device plugged
(``plug``/``unplug``, where it has them), so a ring is pushed and its
backend notified once for all of them, not once per request.

Requests are pipelined: the reader keeps submitting while earlier requests
are in flight, up to ``max_requests_in_flight`` / ``max_bytes_in_flight``
(replies waiting in the output queue count against the bytes), beyond which
it stops reading (TCP-style back-pressure rather than unbounded memory).
Replies go out in completion order, matched by handle.

A client that stops reading its replies would otherwise hold their memory
forever; after ``send_timeout`` seconds without the socket taking any of
them, that client is disconnected hard.

Ending a connection: on ``NBD_CMD_DISC``/EOF/``NBD_OPT_ABORT`` the reader
stops reading, waits (up to ``drain_timeout``) for in-flight requests to be
replied to and the replies sent, then closes.  On a protocol violation or a
failed send it shuts the socket down first (hard disconnect) and still waits
for the device to finish with the request buffers before closing the
descriptor.  The descriptor is only closed under the send lock, so a late
completion can never write into a recycled file descriptor.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import math
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..blockdev import BlockDevice, current_completion_batch
from .events import Disconnect, ProtocolError, Ready, Request, RequestRejected
from .protocol import NbdServerConnection
from .wire import Buffer, Cmd

__all__ = ["NbdServer"]

log = logging.getLogger("xdom.nbd")

_IOV_MAX = 1024
_MiB = 1024 * 1024
#: Read data up to this size is copied into a batch of replies (sent when the device's completion batch
#: ends); larger reads go out at once from the device's own buffers, with whatever the batch holds so far.
_COPY_MAX = 64 * 1024
#: Socket send buffer asked for: whole large read replies fit without being queued (the kernel caps
#: it at net.core.wmem_max).
_SNDBUF = 4 * _MiB
#: Plain ints: socket's flags are an IntFlag, and ``|`` on one builds an enum member per call.
#: At most this many pieces of a lent WRITE payload per recvmsg_into (each costs a buffer acquisition,
#: and a socket rarely holds more than 256 KiB at once).
_RECV_IOVECS = 64
_SEND_FLAGS = int(socket.MSG_NOSIGNAL) | int(socket.MSG_DONTWAIT)
_READ, _WRITE = Cmd.READ, Cmd.WRITE
_POLL_INPUT = select.POLLIN | select.POLLHUP | select.POLLERR
#: A device with all of these runs its completions on the connection's thread (see device.py).
_REAPER_METHODS = ("completion_fd", "reap_completions", "attach_reaper", "detach_reaper")


def _nothing() -> None:
    pass


class NbdServer:
    """Export ``device`` as NBD export ``export_name`` on a unix socket.

    ``start()`` binds and starts accepting; ``close()`` stops accepting,
    finishes and closes every client connection, unlinks the socket and joins
    every thread the server started.  Usable as a context manager.  Neither
    method is meant to be called concurrently with itself.

    Keyword limits exist because the socket is reachable by untrusted code:
    ``mode`` is applied to the socket file before ``listen()``;
    ``max_connections`` bounds threads (extra clients are closed at once);
    ``max_requests_in_flight``/``max_bytes_in_flight`` bound per-connection
    memory by pausing the reader; ``send_timeout`` (0 = never) bounds how long
    replies wait for a client that stops reading;
    ``drain_timeout`` bounds how long closing waits for a device that does
    not complete.  ``device`` is not closed by ``close()``: its owner does.
    """

    def __init__(
        self,
        socket_path: str,
        device: BlockDevice,
        export_name: str = "",
        *,
        mode: int = 0o600,
        max_connections: int = 64,
        max_requests_in_flight: int = 64,
        max_bytes_in_flight: int = 64 * _MiB,
        send_timeout: float = 60.0,
        drain_timeout: float = 60.0,
    ) -> None:
        # Validates the export parameters now rather than per connection.
        NbdServerConnection.for_device(device, export_name)
        if max_connections < 1 or max_requests_in_flight < 1 or max_bytes_in_flight < 1:
            raise ValueError("limits must be positive")
        self.socket_path = socket_path
        self.device = device
        self.export_name = export_name
        self.mode = mode
        self.max_connections = max_connections
        self.max_requests_in_flight = max_requests_in_flight
        self.max_bytes_in_flight = max_bytes_in_flight
        self.send_timeout = send_timeout
        self.drain_timeout = drain_timeout
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sock_id: tuple[int, int] | None = None
        self._wake_r = self._wake_w = -1
        self._accept_thread: threading.Thread | None = None
        self._conns: set[_Connection] = set()
        self._next_id = 0
        self._closed = False

    # --- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Bind the socket (mode ``self.mode``), listen, start accepting."""
        with self._lock:
            if self._closed or self._listener is not None:
                raise RuntimeError("NbdServer.start() called twice or after close()")
            _remove_stale_socket(self.socket_path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            bound = False
            try:
                sock.bind(self.socket_path)
                bound = True
                # Nobody can connect before listen(), so fixing the mode after
                # bind() leaves no window (and avoids the process-wide umask).
                os.chmod(self.socket_path, self.mode)
                st = os.stat(self.socket_path)
                self._sock_id = (st.st_dev, st.st_ino)
                sock.listen(min(self.max_connections, socket.SOMAXCONN))
                sock.setblocking(False)
                self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            except BaseException:
                sock.close()
                if bound:
                    _unlink_quietly(self.socket_path)
                raise
            self._listener = sock
            self._accept_thread = threading.Thread(target=self._accept_loop, name="nbd-accept", daemon=True)
            self._accept_thread.start()
        log.info("NBD export %r (%d bytes) listening on %s", self.export_name, self.device.size, self.socket_path)

    def close(self) -> None:
        """Stop accepting, drain and close all clients, unlink, join threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            listener = self._listener
        if self._accept_thread is not None:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
            self._accept_thread.join()
        if listener is not None:
            listener.close()
            self._unlink_own_socket()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        conns = list(self._conns)
        for c in conns:
            c.stop()
        for c in conns:
            c.join(self.drain_timeout + 10.0)
            if c.alive:
                log.warning("%s did not finish in time; forcing it closed", c.name)
                c.kill()
                c.join()
        self._conns.clear()
        log.info("NBD server on %s closed", self.socket_path)

    def __enter__(self) -> NbdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def active_connections(self) -> int:
        return sum(1 for c in list(self._conns) if c.alive)

    # --- accepting --------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        backoff_ms: int | None = None
        while True:
            ready = poller.poll(backoff_ms)
            backoff_ms = None
            if self._closed or any(fd == self._wake_r for fd, _ in ready):
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                # EMFILE and friends: the pending connection stays queued and
                # poll() would spin, so wait a little before retrying.
                log.error("accept on %s failed: %s", self.socket_path, e)
                backoff_ms = 100 if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM) else None
                continue
            self._reap()
            if len(self._conns) >= self.max_connections:
                log.warning("refusing NBD client on %s: %d connections already", self.socket_path,
                            len(self._conns))
                sock.close()
                continue
            self._next_id += 1
            try:
                conn = _Connection(self, sock, self._next_id)
            except Exception:
                log.exception("could not set up NBD connection")
                sock.close()
                continue
            self._conns.add(conn)
            conn.start()

    def _reap(self) -> None:
        for c in [c for c in self._conns if not c.alive]:
            c.join()
            self._conns.discard(c)

    def _unlink_own_socket(self) -> None:
        # Only remove the path if it is still the socket we bound: someone may
        # have replaced it (e.g. a new server after a restart).
        try:
            st = os.stat(self.socket_path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._sock_id:
            _unlink_quietly(self.socket_path)


class _Connection:
    """One client: its thread (reading, and sending what could not go at once) plus the state
    completions share."""

    def __init__(self, server: NbdServer, sock: socket.socket, cid: int) -> None:
        self._server = server
        self._dev = server.device
        self._sock = sock
        self.name = f"nbd-conn-{cid}"
        # Non-blocking: the connection's thread waits in poll(), never in recv() or send(), so it can
        # reap a device's completions and send queued replies while a client is slow to read.
        sock.setblocking(False)
        try:
            # Room for whole large read replies in the kernel, so they rarely need queueing (capped
            # by net.core.wmem_max; what is refused is simply not had).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        except OSError:
            pass
        try:
            pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            self.peer = f"pid={pid} uid={uid}"
        except OSError:
            self.peer = "unknown peer"
        dev = self._dev
        lend = getattr(dev, "write_buffer", None)
        self._lends = callable(lend) and callable(getattr(dev, "submit_write_buffer", None))
        self._proto = NbdServerConnection.for_device(dev, server.export_name, lend if self._lends else None)
        # _lock guards the protocol object and the in-flight accounting; _send_lock guards the
        # output queue and orders whole replies on the socket; _fd_lock guards the descriptor's
        # lifetime against shutdown() from other threads.
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._fd_lock = threading.Lock()
        self._fd_closed = False
        self._broken = False
        self._stopping = False
        self._busy = 0
        self._busy_bytes = 0
        self._max_requests = server.max_requests_in_flight
        self._max_bytes = server.max_bytes_in_flight
        # Replies that did not fit in the socket: copies, sent by the connection's thread on POLLOUT.
        self._out: collections.deque[memoryview] = collections.deque()
        self._out_bytes = 0
        self._out_since = 0.0           # when the socket last took anything while _out was not empty
        # Written by other threads when the connection's thread must look again (room freed, a reply
        # queued, stop, kill); only while it sleeps in poll() (_sleeping), to spare the syscall.
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._sleeping = False
        # A device that can hold back submissions (blkfront: the ring's notification) is plugged
        # while the requests of one recv() are submitted; only the connection's thread touches _plugged.
        plug, unplug = getattr(dev, "plug", None), getattr(dev, "unplug", None)
        self._plug = plug if callable(plug) and callable(unplug) else None
        self._unplug: Callable[[], None] = unplug if plug is not None and callable(unplug) else _nothing
        self._plugged = False
        # A device whose completions this thread may run (see device.py): polled with the socket.
        self._reaps = all(callable(getattr(dev, a, None)) for a in _REAPER_METHODS)
        self._reaper: Any = dev         # only when _reaps: it has the _REAPER_METHODS
        self._dev_fd = -1
        self._poller = select.poll()
        self._sock_fd = sock.fileno()
        self._sock_mask = 0
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    # --- control from the server --------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def stop(self) -> None:
        """Graceful: stop reading, let in-flight requests answer, then close."""
        with self._lock:
            self._stopping = True
        # Wakes the thread with EOF on the socket while replies can still be sent.
        self._shutdown(socket.SHUT_RD)
        self._poke()

    def kill(self) -> None:
        self._break()

    def _poke(self) -> None:
        with self._fd_lock:             # never a write to a descriptor closed (and maybe reused) since
            if self._wake >= 0:
                try:
                    os.eventfd_write(self._wake, 1)
                except OSError:
                    pass

    # --- the connection's thread ------------------------------------------------------

    def _run(self) -> None:
        hard = True
        self._poller.register(self._wake, select.POLLIN)
        if self._reaps:
            try:
                self._dev_fd = self._reaper.completion_fd()
                self._reaper.attach_reaper()
                self._poller.register(self._dev_fd, select.POLLIN)
            except Exception:
                log.exception("%s: device refused to share its completions; they stay on its threads", self.name)
                self._reaps = False
                self._dev_fd = -1
        try:
            log.debug("%s: client connected (%s)", self.name, self.peer)
            hard = self._serve()
        except Exception:
            log.exception("%s: connection failed", self.name)
        finally:
            try:
                self._finish(hard)
            finally:
                if self._reaps:
                    self._reaper.detach_reaper()
                with self._fd_lock:
                    os.close(self._wake)
                    self._wake = -1

    def _serve(self) -> bool:
        """Read and dispatch until the session ends; True = hard disconnect."""
        proto = self._proto
        with self._lock:
            greeting = proto.data_to_send()
        if not self._send([greeting]):
            return True
        while True:
            if self._stopping:
                return False
            if self._broken:
                return True
            if self._over_limits(0):
                end = self._pump(read=False, wait=lambda: self._over_limits(0))
            else:
                end = self._pump(read=True)
            if end is not None:
                return end

    def _over_limits(self, cost: int) -> bool:
        """Would admitting a request of ``cost`` bytes exceed the limits?  (One is always admitted.)"""
        return bool((self._busy or self._out_bytes)
                    and (self._busy >= self._max_requests
                         or self._busy_bytes + self._out_bytes + cost > self._max_bytes))

    def _pump(self, read: bool, until: float | None = None, wait: Callable[[], bool] | None = None) -> bool | None:
        """Wait once for something to do and do it: reap the device's completions, send queued
        replies, and if ``read``, read and dispatch requests.  ``wait`` (the caller's reason to
        wait) is checked again once other threads will poke us, so a change made just before
        cannot be slept through.  Returns True/False when the session ends, else None."""
        self._sleeping = True
        try:
            out = bool(self._out) and not self._broken
            mask = (select.POLLIN if read else 0) | (select.POLLOUT if out else 0)
            if mask != self._sock_mask:
                # Not registered at all while there is nothing to do on it: a hung-up socket would
                # otherwise report POLLHUP at once, forever.
                if not mask:
                    self._poller.unregister(self._sock_fd)
                elif self._sock_mask:
                    self._poller.modify(self._sock_fd, mask)
                else:
                    self._poller.register(self._sock_fd, mask)
                self._sock_mask = mask
            timeout: float | None = None
            if out and self._server.send_timeout > 0:
                timeout = self._out_since + self._server.send_timeout - time.monotonic()
            if until is not None:
                left = until - time.monotonic()
                timeout = left if timeout is None else min(timeout, left)
            if wait is not None and not wait():
                timeout = 0
            ready = self._poller.poll(None if timeout is None else max(0, math.ceil(timeout * 1000)))
        finally:
            self._sleeping = False
        sock_events = 0
        for fd, ev in ready:
            if fd == self._sock_fd:
                sock_events = ev
            elif fd == self._wake:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
            elif fd == self._dev_fd:
                if ev & select.POLLNVAL:        # the device closed under us: its own threads finish
                    self._poller.unregister(fd)
                    self._dev_fd = -1
                else:
                    self._reaper.reap_completions()
        if out and sock_events:
            self._flush()
        if read and sock_events & _POLL_INPUT:
            return self._read()
        if self._out and not self._broken and self._server.send_timeout > 0 \
                and time.monotonic() - self._out_since > self._server.send_timeout:
            log.warning("%s: client read no reply for %gs: disconnecting", self.name, self._server.send_timeout)
            self._break()
            return True
        return None

    def _read(self) -> bool | None:
        proto = self._proto
        with self._lock:
            bufs = proto.get_buffers(_RECV_IOVECS)
        try:
            # Several views while a WRITE payload goes straight into the device's pages.
            n = self._sock.recv_into(bufs[0]) if len(bufs) == 1 else self._sock.recvmsg_into(bufs)[0]
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            log.debug("%s: recv failed: %s", self.name, e)
            n = 0
        del bufs
        with self._lock:
            proto.commit(n)
            events = proto.next_events()
            out = proto.data_to_send()
        if out and not self._send([out]):
            return True
        try:
            return self._dispatch(events)
        finally:
            if self._plugged:
                self._plugged = False
                self._unplug()

    def _dispatch(self, events: list) -> bool | None:
        """Act on what one recv() produced; True/False: the session ends (hard or not)."""
        for ev in events:
            if type(ev) is Request:
                if self._plug is not None and not self._plugged:
                    self._plug()
                    self._plugged = True
                length = ev.length
                if (ev.kind is _READ and self._busy < self._max_requests and not self._stopping
                        and self._busy_bytes + self._out_bytes + length <= self._max_bytes and not self._broken):
                    # The common request, admitted at once (what _submit does, without its other cases).
                    with self._lock:
                        self._busy += 1
                        self._busy_bytes += length
                    op = _Op(self, ev, length)
                    try:
                        self._dev.submit_read(ev.offset, length, op.read_done)
                    except Exception:
                        log.exception("%s: device rejected READ", self.name)
                        op.done(errno.EIO)
                    continue
                self._submit(ev)
            elif isinstance(ev, Ready):
                log.info("%s: %s entered transmission on export %r (flags %#x)",
                         self.name, self.peer, ev.export_name, ev.transmission_flags)
            elif isinstance(ev, RequestRejected):
                log.debug("%s: rejected request %#x (%s): %s", self.name, ev.handle, ev.kind, ev.reason)
            elif isinstance(ev, Disconnect):
                log.debug("%s: client disconnected (%s)", self.name, ev.reason)
                return False
            elif isinstance(ev, ProtocolError):
                if self._stopping:
                    return False
                log.warning("%s: protocol error from %s: %s", self.name, self.peer, ev.reason)
                return True
        return None

    def _submit(self, req: Request) -> None:
        kind = req.kind
        cost = req.length if kind is _READ or kind is _WRITE else 0
        if (self._busy >= self._max_requests or self._busy_bytes + self._out_bytes + cost > self._max_bytes) \
                and self._over_limits(cost):
            # Back-pressure: stop reading (TCP-style) until completions make room; what is held
            # back must reach the device first, or nothing would complete.
            if self._plugged:
                self._plugged = False
                self._unplug()
            def waiting() -> bool:
                return self._over_limits(cost) and not self._stopping and not self._broken
            while waiting():
                self._pump(read=False, wait=waiting)
        if self._stopping or self._broken:
            # The spec: requests arriving during shutdown get ESHUTDOWN.
            if kind is _WRITE and req.data is not None and type(req.data) is not memoryview:
                req.data.release()               # the device's lent pages, never submitted
            self._complete(req, errno.ESHUTDOWN, (), None)
            return
        with self._lock:
            self._busy += 1
            self._busy_bytes += cost
        op = _Op(self, req, cost)
        dev = self._dev
        try:
            if kind is _READ:
                dev.submit_read(req.offset, req.length, op.read_done)
            elif kind is _WRITE:
                assert req.data is not None
                if type(req.data) is memoryview:
                    dev.submit_write(req.offset, req.data, req.fua, op.done)
                else:                            # received into the device's own buffer: it takes it back
                    dev.submit_write_buffer(req.offset, req.data, req.fua, op.done)
            elif req.kind is Cmd.FLUSH:
                dev.submit_flush(op.done)
            elif req.kind is Cmd.TRIM:
                dev.submit_trim(req.offset, req.length, op.done_then_flush_if_fua)
            elif req.kind is Cmd.WRITE_ZEROES:
                dev.submit_write_zeroes(req.offset, req.length, not req.no_hole, op.done_then_flush_if_fua)
            else:
                raise AssertionError(f"protocol emitted unexpected command {req.kind!r}")
        except Exception:
            log.exception("%s: device rejected %s", self.name, req.kind.name)
            op.done(errno.EIO)

    def _finish(self, hard: bool) -> None:
        if hard:
            self._break()
        else:
            self._shutdown(socket.SHUT_RD)
        # In-flight requests still use their buffers and will still reply: wait for them (and, unless
        # broken, for their replies to leave), reaping the device's completions meanwhile.
        deadline = time.monotonic() + self._server.drain_timeout

        def waiting() -> bool:
            return bool(self._busy or (self._out and not self._broken))
        while waiting():
            if time.monotonic() >= deadline:
                log.warning("%s: %d requests still in flight; closing anyway", self.name, self._busy)
                break
            self._pump(read=False, until=deadline, wait=waiting)
        self._shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._proto.close()                  # a payload half received gives its lent pages back
        with self._send_lock, self._fd_lock:
            self._fd_closed = True
            self._out.clear()
            self._out_bytes = 0
            self._sock.close()
        log.debug("%s: closed", self.name)

    # --- completion side (any thread) -------------------------------------------------

    def _complete(self, req: Request, err: int, bufs: Sequence[Buffer], cost: int | None) -> None:
        """Reply to ``req``; ``cost`` is its in-flight accounting (None: not counted).

        Inside a device's completion batch the reply joins the batch's others and they go out
        together when it ends (read data copied; a large read sends the batch at once, from the
        device's buffers, which are only valid until we return)."""
        batch = current_completion_batch() if cost is not None else None
        if batch is not None:
            send_now = False
            data: bytes | Sequence[Buffer]
            if req.kind is _READ and not err:
                length = req.length
                if length <= _COPY_MAX:
                    data = b"".join(bufs)        # copies: the buffers are only valid until we return
                    if len(data) != length:
                        log.error("%s: device returned %d bytes for a %d-byte read", self.name, len(data), length)
                        err, data = errno.EIO, b""
                else:
                    total = sum([b.nbytes if type(b) is memoryview else memoryview(b).nbytes for b in bufs])
                    if total != length:
                        log.error("%s: device returned %d bytes for a %d-byte read", self.name, total, length)
                        err, data = errno.EIO, b""
                    else:
                        data, send_now = bufs, True
            else:
                data = b""
            items = batch.items(self, self._reply_all)
            items.append((req.handle, err, data, cost))
            if send_now:
                self._reply_all(items)
            return
        try:
            if req.kind is Cmd.READ and err == 0:
                total = sum(memoryview(b).nbytes for b in bufs)
                if total != req.length:
                    log.error("%s: device returned %d bytes for a %d-byte read", self.name, total, req.length)
                    err, bufs = errno.EIO, ()
            with self._lock:
                out = self._proto.reply(req.handle, err, bufs)
            self._send(out)
        except Exception:
            log.exception("%s: could not reply to request %#x", self.name, req.handle)
            self._break()
        finally:
            if cost is not None:
                self._done_with([cost])

    def _reply_all(self, items: list) -> None:
        """Reply to every ``(handle, errno, data, cost)`` of ``items`` with one send; empties it."""
        if not items:
            return
        done = items[:]
        items.clear()
        try:
            with self._lock:
                out = self._proto.reply_many([item[:3] for item in done])
            self._send(out)
        except Exception:
            log.exception("%s: could not reply to %d request(s)", self.name, len(done))
            self._break()
        finally:
            self._done_with([item[3] for item in done])

    def _done_with(self, costs: list[int]) -> None:
        with self._lock:
            for cost in costs:
                self._busy -= 1
                self._busy_bytes -= cost
        if self._sleeping and threading.current_thread() is not self._thread:
            self._poke()

    def _send(self, bufs: Sequence[Buffer]) -> bool:
        """Send whole replies now, or what does not fit as a copy for the connection's thread to send
        (the caller's buffers are only valid until we return).  False: the connection is broken."""
        queued = False
        with self._send_lock:
            if self._fd_closed or self._broken:
                return False
            try:
                if self._out:
                    self._queue(bufs, 0)
                    queued = True
                else:
                    sent, total = _sendmsg_some(self._sock, bufs)
                    if sent < total:
                        self._queue(bufs, sent)
                        self._out_since = time.monotonic()
                        queued = True
            except OSError as e:
                log.debug("%s: send failed: %s", self.name, e)
            else:
                if queued and self._sleeping and threading.current_thread() is not self._thread:
                    self._poke()
                return True
        self._break()
        return False

    def _queue(self, bufs: Sequence[Buffer], skip: int) -> None:
        """Copy ``bufs`` but their first ``skip`` bytes to the output queue (under _send_lock)."""
        data = b"".join(bufs)[skip:] if skip else b"".join(bufs)
        if data:
            self._out.append(memoryview(data))
            self._out_bytes += len(data)

    def _flush(self) -> None:
        """Send what is queued, as far as the socket takes it (the connection's thread, on POLLOUT)."""
        with self._send_lock:
            if self._fd_closed or self._broken:
                return
            try:
                while self._out:
                    n = self._sock.sendmsg(list(itertools.islice(self._out, _IOV_MAX)), (), _SEND_FLAGS)
                    if n:
                        self._out_since = time.monotonic()
                    self._out_bytes -= n
                    while n:
                        head = self._out[0]
                        if n >= len(head):
                            n -= len(head)
                            self._out.popleft()
                        else:
                            self._out[0] = head[n:]
                            n = 0
                return
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.debug("%s: send failed: %s", self.name, e)
        self._break()

    def _break(self) -> None:
        """Hard disconnect: wakes the connection's thread."""
        with self._lock:
            self._broken = True
        self._shutdown(socket.SHUT_RDWR)
        if threading.current_thread() is not self._thread:
            self._poke()

    def _shutdown(self, how: int) -> None:
        with self._fd_lock:
            if not self._fd_closed:
                try:
                    self._sock.shutdown(how)
                except OSError:
                    pass


class _Op:
    """Completion callbacks for one request, tolerant of a misbehaving device
    (a second ``done`` is logged and ignored instead of corrupting the stream)."""

    __slots__ = ("_conn", "_req", "_cost", "_once", "_stage")

    def __init__(self, conn: _Connection, req: Request, cost: int) -> None:
        self._conn = conn
        self._req = req
        self._cost = cost
        # One token each: list.pop() is atomic, so exactly one caller gets it (cheaper than a Lock).
        self._once = [True]
        self._stage = [True]

    def _claim(self, token: list) -> bool:
        try:
            return token.pop()
        except IndexError:
            log.error("%s: device completed request %#x more than once", self._conn.name, self._req.handle)
            return False

    def read_done(self, err: int, bufs: Sequence[Buffer]) -> None:
        try:
            self._once.pop()
        except IndexError:
            log.error("%s: device completed request %#x more than once", self._conn.name, self._req.handle)
            return
        req = self._req
        if not err and req.length <= _COPY_MAX:
            batch = current_completion_batch()
            if batch is not None:
                # The common completion: a small read in a batch, its data copied into the batch's reply.
                data = b"".join(bufs)
                if len(data) == req.length:
                    conn = self._conn
                    batch.items(conn, conn._reply_all).append((req.handle, 0, data, self._cost))
                    return
        self._conn._complete(req, err, bufs, self._cost)

    def done(self, err: int) -> None:
        if self._claim(self._once):
            self._conn._complete(self._req, err, (), self._cost)

    def done_then_flush_if_fua(self, err: int) -> None:
        # TRIM/WRITE_ZEROES have no FUA in the device interface: honour the
        # flag by flushing before the reply, as the spec requires.
        if not self._claim(self._stage):
            return
        if err == 0 and self._req.fua:
            try:
                self._conn._dev.submit_flush(self.done)
                return
            except Exception:
                log.exception("%s: device rejected a flush", self._conn.name)
                err = errno.EIO
        self.done(err)


def _sendmsg_some(sock: socket.socket, bufs: Sequence[Buffer]) -> tuple[int, int]:
    """One non-blocking sendmsg() of as much of ``bufs`` as the socket takes: (bytes sent, total)."""
    total = sum([len(b) if type(b) is bytes else memoryview(b).nbytes for b in bufs])
    if len(bufs) > _IOV_MAX:
        bufs = bufs[:_IOV_MAX]
    try:
        return sock.sendmsg(bufs, (), _SEND_FLAGS), total
    except (BlockingIOError, InterruptedError):
        return 0, total


def _remove_stale_socket(path: str) -> None:
    """Unlink ``path`` if it is a socket nobody listens on; refuse otherwise."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "path exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        _unlink_quietly(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise FileExistsError(errno.EEXIST, "another server is listening on this socket", path)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
