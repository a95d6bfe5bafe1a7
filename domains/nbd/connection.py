"""One NBD client's connection: its thread, reading and submitting requests, and how it ends.

The thread waits in ``poll()`` only -- on the socket, a wake-up eventfd the
completion side writes, and the device's completion descriptor where the
device lets this thread reap its completions -- so it can send queued replies
and run completions while a client is slow to read.  The replies themselves
are the completion side's business (``completion.CompletionSide``, the base
class).

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

import errno
import logging
import math
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .completion import CompletionSide, RequestCompletion
from .events import Disconnect, ProtocolError, Ready, Request, RequestRejected
from .protocol import NbdServerConnection
from .wire import Cmd

if TYPE_CHECKING:
    from .server import NbdServer

__all__ = ["Connection"]

log = logging.getLogger("xdom.nbd")

#: Socket send buffer asked for: whole large read replies fit without being queued (the kernel caps
#: it at net.core.wmem_max).
_SNDBUF = 4 * 1024 * 1024
#: At most this many pieces of a lent WRITE payload per recvmsg_into (each costs a buffer acquisition,
#: and a socket rarely holds more than 256 KiB at once).
_RECV_IOVECS = 64
_READ, _WRITE = Cmd.READ, Cmd.WRITE
_POLL_INPUT = select.POLLIN | select.POLLHUP | select.POLLERR
#: A device with all of these runs its completions on the connection's thread (see blockdev.py).
_REAPER_METHODS = ("completion_fd", "reap_completions", "attach_reaper", "detach_reaper")


def _nothing() -> None:
    pass


class Connection(CompletionSide):
    """One client: its thread (reading, and sending what could not go at once) on top of the state
    completions share (``CompletionSide``)."""

    def __init__(self, server: NbdServer, sock: socket.socket, cid: int) -> None:
        self._server = server
        dev = server.device
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
        lend = getattr(dev, "write_buffer", None)
        self._lends = callable(lend) and callable(getattr(dev, "submit_write_buffer", None))
        super().__init__(sock, f"nbd-conn-{cid}", dev,
                         NbdServerConnection.for_device(dev, server.export_name, lend if self._lends else None))
        self._stopping = False
        self._max_requests = server.max_requests_in_flight
        self._max_bytes = server.max_bytes_in_flight
        # A device that can hold back submissions (blkfront: the ring's notification) is plugged
        # while the requests of one recv() are submitted; only the connection's thread touches _plugged.
        plug, unplug = getattr(dev, "plug", None), getattr(dev, "unplug", None)
        self._plug = plug if callable(plug) and callable(unplug) else None
        self._unplug: Callable[[], None] = unplug if plug is not None and callable(unplug) else _nothing
        self._plugged = False
        # A device that takes a run of READs in one call (one taking of its lock): given each recv()'s.
        reads = getattr(dev, "submit_reads", None)
        self._submit_reads: Callable[[list], None] | None = reads if callable(reads) else None
        # A device whose completions this thread may run (see blockdev.py): polled with the socket.
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
        """Act on what one recv() produced; True/False: the session ends (hard or not).

        The common request, a READ within the limits, is admitted at once (what ``_submit`` does,
        without its other cases); a run of them goes to the device in one call where it takes one
        (``submit_reads``), handed over before any other event is acted on, so that the device sees
        every request in the order the client sent it."""
        reads: list[tuple[int, int, Callable]] = []
        for ev in events:
            if type(ev) is Request:
                if self._plug is not None and not self._plugged:
                    self._plug()
                    self._plugged = True
                length = ev.length
                if (ev.kind is _READ and self._busy < self._max_requests and not self._stopping
                        and self._busy_bytes + self._out_bytes + length <= self._max_bytes and not self._broken):
                    with self._lock:
                        self._busy += 1
                        self._busy_bytes += length
                    reads.append((ev.offset, length, RequestCompletion(self, ev, length).read_done))
                    continue
                if reads:
                    self._hand_reads(reads)
                    reads = []
                self._submit(ev)
                continue
            if reads:
                self._hand_reads(reads)
                reads = []
            if isinstance(ev, Ready):
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
        if reads:
            self._hand_reads(reads)
        return None

    def _hand_reads(self, reads: list[tuple[int, int, Callable]]) -> None:
        """Submit admitted READs ``(offset, length, read_done)``; a device that fails the call fails
        (EIO) those it did not take (each ``done`` runs at most once: ``RequestCompletion``)."""
        many = self._submit_reads
        if many is not None and len(reads) > 1:
            try:
                many(reads)
                return
            except Exception:
                log.exception("%s: device rejected %d READs", self.name, len(reads))
                for *_, done in reads:
                    done(errno.EIO, ())
                return
        submit = self._dev.submit_read
        for offset, length, done in reads:
            try:
                submit(offset, length, done)
            except Exception:
                log.exception("%s: device rejected READ", self.name)
                done(errno.EIO, ())

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
        op = RequestCompletion(self, req, cost)
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
