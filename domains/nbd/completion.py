"""The completion side of an NBD client connection: replies, from whatever thread the device completes on.

There is no sender thread: a reply is sent by whoever completes the
request -- the device's callbacks, on whatever thread the device uses --
with a non-blocking ``sendmsg(header, *buffers)`` under the connection's
send lock.  This is what lets a read reply go out from the device's own
buffers, which are only valid until the callback returns; what the socket
does not take at once is copied to the connection's output queue, which its
thread sends on ``POLLOUT``.  No completion ever waits for a client.

A device that completes in batches (``completion_batch``) gets the batch's
replies to one connection in one ``sendmsg`` when the batch ends: small read
data is copied into the batch, a large read sends the batch at once from the
device's buffers.

``CompletionSide`` holds the state completions share with the connection's
thread (``connection.Connection`` builds on it): the protocol object and its
lock, the in-flight accounting, the output queue, the descriptor's lifetime.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..blockdev import current_completion_batch
from .events import Request
from .protocol import NbdServerConnection
from .wire import Buffer, Cmd

__all__ = ["CompletionSide", "RequestCompletion"]

log = logging.getLogger("xdom.nbd")

_IOV_MAX = 1024
#: Read data up to this size is copied into a batch of replies (sent when the device's completion batch
#: ends); larger reads go out at once from the device's own buffers, with whatever the batch holds so far.
_COPY_MAX = 64 * 1024
#: Plain ints: socket's flags are an IntFlag, and ``|`` on one builds an enum member per call.
_SEND_FLAGS = int(socket.MSG_NOSIGNAL) | int(socket.MSG_DONTWAIT)
_READ = Cmd.READ


class CompletionSide:
    """What a connection's completions do and share: reply through the protocol, send or queue the
    reply, account for what is in flight, break the connection when a send fails."""

    #: The connection's own thread (set by ``Connection``): other threads poke it, it never pokes itself.
    _thread: threading.Thread

    def __init__(self, sock: socket.socket, name: str, device: Any, proto: NbdServerConnection) -> None:
        self._sock = sock
        self.name = name
        self._dev = device
        self._proto = proto
        # _lock guards the protocol object and the in-flight accounting; _send_lock guards the
        # output queue and orders whole replies on the socket; _fd_lock guards the descriptor's
        # lifetime against shutdown() from other threads.
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._fd_lock = threading.Lock()
        self._fd_closed = False
        self._broken = False
        self._busy = 0
        self._busy_bytes = 0
        # Replies that did not fit in the socket: copies, sent by the connection's thread on POLLOUT.
        self._out: collections.deque[memoryview] = collections.deque()
        self._out_bytes = 0
        self._out_since = 0.0           # when the socket last took anything while _out was not empty
        # Written by other threads when the connection's thread must look again (room freed, a reply
        # queued, stop, kill); only while it sleeps in poll() (_sleeping), to spare the syscall.
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._sleeping = False

    def _poke(self) -> None:
        with self._fd_lock:             # never a write to a descriptor closed (and maybe reused) since
            if self._wake >= 0:
                try:
                    os.eventfd_write(self._wake, 1)
                except OSError:
                    pass

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


class RequestCompletion:
    """Completion callbacks for one request, tolerant of a misbehaving device
    (a second ``done`` is logged and ignored instead of corrupting the stream)."""

    __slots__ = ("_conn", "_req", "_cost", "_once", "_stage")

    def __init__(self, conn: CompletionSide, req: Request, cost: int) -> None:
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
                # The common completion: a small read in a batch, its data sent with the batch's replies:
                # from the device's buffer where it keeps it until then, else from a copy.
                data: Buffer
                view = bufs[0] if batch.keeps_buffers and len(bufs) == 1 else None
                if type(view) is memoryview:
                    data, whole = view, view.nbytes == req.length
                else:
                    data = b"".join(bufs)
                    whole = len(data) == req.length
                if whole:
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
