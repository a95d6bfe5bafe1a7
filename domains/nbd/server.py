"""The thin I/O layer: a unix-socket NBD server around the sans-IO protocol.

Threads and why:

* one accept thread, blocked in ``poll()`` on the listening socket and a
  wake-up pipe (closing a socket does not reliably wake ``accept()``);
* one reader thread per client: ``recv_into()`` the buffer the protocol asks
  for (a WRITE payload lands directly in its own buffer), turn events into
  ``device.submit_*`` calls, send the replies the protocol makes on its own;
* no sender thread: the device's completion callbacks -- on whatever thread
  the device uses -- send their reply themselves with ``sendmsg(header,
  *buffers)``, serialised by a per-connection send lock.  This is what lets a
  read reply go out from the device's own buffers, which are only valid until
  the callback returns.  A device that completes in batches
  (``completion_batch``) gets the batch's replies to one connection in one
  ``sendmsg`` when the batch ends: small read data is copied into the batch,
  a large read sends the batch at once from the device's buffers.

The requests one ``recv`` brought are submitted with the device plugged
(``plug``/``unplug``, where it has them), so a ring is pushed and its
backend notified once for all of them, not once per request.

Requests are pipelined: the reader keeps submitting while earlier requests
are in flight, up to ``max_requests_in_flight`` / ``max_bytes_in_flight``,
beyond which it stops reading (TCP-style back-pressure rather than unbounded
memory).  Replies go out in completion order, matched by handle.

A client that stops reading its replies would otherwise block a device
completion thread forever; the socket's send timeout (``SO_SNDTIMEO``) turns
that into a hard disconnect of that client after ``send_timeout`` seconds.

Ending a connection: on ``NBD_CMD_DISC``/EOF/``NBD_OPT_ABORT`` the reader
stops reading, waits (up to ``drain_timeout``) for in-flight requests to be
replied to, then closes.  On a protocol violation or a failed send it shuts
the socket down first (hard disconnect) and still waits for the device to
finish with the request buffers before closing the descriptor.  The
descriptor is only closed under the send lock, so a late completion can never
write into a recycled file descriptor.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from typing import Sequence, Union

from .device import BlockDevice, current_completion_batch
from .protocol import (
    Cmd,
    Disconnect,
    NbdServerConnection,
    ProtocolError,
    Ready,
    Request,
    RequestRejected,
)

__all__ = ["NbdServer"]

log = logging.getLogger("xdom.nbd")

_IOV_MAX = 1024
_MiB = 1024 * 1024
#: Read data up to this size is copied into a batch of replies (sent when the device's completion batch
#: ends); larger reads go out at once from the device's own buffers, with whatever the batch holds so far.
_COPY_MAX = 64 * 1024

Buffer = Union[bytes, bytearray, memoryview]


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
    a device completion thread can be held by a client that stops reading;
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

    def __enter__(self) -> "NbdServer":
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
    """One client: its reader thread plus the state completions share."""

    def __init__(self, server: NbdServer, sock: socket.socket, cid: int) -> None:
        self._server = server
        self._dev = server.device
        self._sock = sock
        self.name = f"nbd-conn-{cid}"
        sock.setblocking(True)
        sec = max(0.0, server.send_timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("@ll", int(sec), int((sec - int(sec)) * 1e6)))
        try:
            pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            self.peer = f"pid={pid} uid={uid}"
        except OSError:
            self.peer = "unknown peer"
        self._proto = NbdServerConnection.for_device(server.device, server.export_name)
        # _lock guards the protocol object and the in-flight accounting;
        # _send_lock serialises whole replies on the socket; _fd_lock guards
        # the descriptor's lifetime against shutdown() from other threads.
        self._lock = threading.Condition(threading.Lock())
        self._send_lock = threading.Lock()
        self._fd_lock = threading.Lock()
        self._fd_closed = False
        self._broken = False
        self._stopping = False
        self._busy = 0
        self._busy_bytes = 0
        # A device that can hold back submissions (blkfront: the ring's notification) is plugged
        # while the requests of one recv() are submitted; only the reader thread touches _plugged.
        plug, unplug = getattr(self._dev, "plug", None), getattr(self._dev, "unplug", None)
        self._plug = plug if callable(plug) and callable(unplug) else None
        self._unplug = unplug
        self._plugged = False
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
            self._lock.notify_all()
        # Wakes the reader's recv() with EOF while replies can still be sent.
        self._shutdown(socket.SHUT_RD)

    def kill(self) -> None:
        self._break()

    # --- reader thread ----------------------------------------------------------------

    def _run(self) -> None:
        hard = True
        try:
            log.debug("%s: client connected (%s)", self.name, self.peer)
            hard = self._serve()
        except Exception:
            log.exception("%s: reader failed", self.name)
        finally:
            self._finish(hard)

    def _serve(self) -> bool:
        """Read and dispatch until the session ends; True = hard disconnect."""
        proto = self._proto
        with self._lock:
            greeting = proto.data_to_send()
        if not self._send([greeting]):
            return True
        while True:
            with self._lock:
                if self._stopping:
                    return False
                buf = proto.get_buffer()
            try:
                n = self._sock.recv_into(buf)
            except OSError as e:
                log.debug("%s: recv failed: %s", self.name, e)
                n = 0
            del buf
            with self._lock:
                proto.commit(n)
                events = []
                while (ev := proto.next_event()) is not None:
                    events.append(ev)
                out = proto.data_to_send()
            if out and not self._send([out]):
                return True
            try:
                end = self._dispatch(events)
            finally:
                if self._plugged:
                    self._plugged = False
                    self._unplug()
            if end is not None:
                return end
            if self._broken:
                return True

    def _dispatch(self, events: list) -> bool | None:
        """Act on what one recv() produced; True/False: the session ends (hard or not)."""
        for ev in events:
            if type(ev) is Request:
                if self._plug is not None and not self._plugged:
                    self._plug()
                    self._plugged = True
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
        srv = self._server
        cost = req.length if req.kind is Cmd.READ or req.kind is Cmd.WRITE else 0
        if self._plugged and (self._busy >= srv.max_requests_in_flight
                              or self._busy_bytes + cost > srv.max_bytes_in_flight):
            # About to wait for completions: what is held back must reach the device first.  (Only
            # completions change _busy meanwhile, and they lower it: this check errs towards unplugging.)
            self._plugged = False
            self._unplug()
        with self._lock:
            # Back-pressure: while over the limits, stop reading (one request
            # is always admitted, so a single maximal request still runs).
            while (self._busy and not self._stopping and not self._broken
                   and (self._busy >= srv.max_requests_in_flight
                        or self._busy_bytes + cost > srv.max_bytes_in_flight)):
                self._lock.wait()
            refused = self._stopping or self._broken
            if not refused:
                self._busy += 1
                self._busy_bytes += cost
        if refused:
            # The spec: requests arriving during shutdown get ESHUTDOWN.
            self._complete(req, errno.ESHUTDOWN, (), None)
            return
        op = _Op(self, req, cost)
        dev = self._dev
        try:
            if req.kind is Cmd.READ:
                dev.submit_read(req.offset, req.length, op.read_done)
            elif req.kind is Cmd.WRITE:
                assert req.data is not None
                dev.submit_write(req.offset, req.data, req.fua, op.done)
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
        deadline = time.monotonic() + self._server.drain_timeout
        with self._lock:
            while self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("%s: %d requests still in flight; closing anyway", self.name, self._busy)
                    break
                self._lock.wait(remaining)
        self._shutdown(socket.SHUT_RDWR)
        with self._send_lock, self._fd_lock:
            self._fd_closed = True
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
            if req.kind is Cmd.READ and err == 0:
                total = 0
                for b in bufs:
                    total += len(b) if type(b) is bytes else memoryview(b).nbytes
                if total != req.length:
                    log.error("%s: device returned %d bytes for a %d-byte read", self.name, total, req.length)
                    err, bufs = errno.EIO, ()
                elif total <= _COPY_MAX:
                    bufs = (b"".join(bufs),)
                else:
                    send_now = True
            items = batch.items(self, self._reply_all)
            items.append((req, err, bufs, cost))
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
                with self._lock:
                    self._busy -= 1
                    self._busy_bytes -= cost
                    self._lock.notify_all()

    def _reply_all(self, items: list) -> None:
        """Reply to every ``(request, errno, buffers, cost)`` of ``items`` with one send; empties it."""
        if not items:
            return
        done, items[:] = items[:], []
        try:
            out: list[Buffer] = []
            with self._lock:
                for req, err, bufs, _ in done:
                    out += self._proto.reply(req.handle, err, bufs)
            self._send(out)
        except Exception:
            log.exception("%s: could not reply to %d request(s)", self.name, len(done))
            self._break()
        finally:
            with self._lock:
                for item in done:
                    self._busy -= 1
                    self._busy_bytes -= item[3]
                self._lock.notify_all()

    def _send(self, bufs: Sequence[Buffer]) -> bool:
        with self._send_lock:
            if self._fd_closed or self._broken:
                return False
            try:
                _sendmsg_all(self._sock, bufs)
                return True
            except OSError as e:
                log.debug("%s: send failed: %s", self.name, e)
        self._break()
        return False

    def _break(self) -> None:
        """Hard disconnect: wakes the reader and any blocked sender."""
        with self._lock:
            self._broken = True
            self._lock.notify_all()
        self._shutdown(socket.SHUT_RDWR)

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
        if self._claim(self._once):
            self._conn._complete(self._req, err, bufs, self._cost)

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


def _sendmsg_all(sock: socket.socket, bufs: Sequence[Buffer]) -> None:
    """sendmsg() every buffer, resuming after partial sends, no concatenation."""
    sent = 0
    if len(bufs) <= _IOV_MAX:
        # The common case: everything in one call, straight from the caller's buffers.
        total = 0
        for b in bufs:
            total += len(b) if type(b) is bytes else memoryview(b).nbytes
        sent = sock.sendmsg(bufs, (), socket.MSG_NOSIGNAL)
        if sent == total:
            return
    views = [v for v in (memoryview(b).cast("B") for b in bufs) if v.nbytes]
    while sent and views:
        if sent >= len(views[0]):
            sent -= len(views.pop(0))
        else:
            views[0] = views[0][sent:]
            sent = 0
    i = 0
    while i < len(views):
        n = sock.sendmsg(views[i:i + _IOV_MAX], (), socket.MSG_NOSIGNAL)
        while n > 0:
            v = views[i]
            if n >= len(v):
                n -= len(v)
                i += 1
            else:
                views[i] = v[n:]
                n = 0


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
