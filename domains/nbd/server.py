"""The thin I/O layer: a unix-socket NBD server around the sans-IO protocol.

Threads and why:

* one accept thread, blocked in ``poll()`` on the listening socket and a
  wake-up pipe (closing a socket does not reliably wake ``accept()``): this
  module, with the socket file's lifetime;
* one thread per client, blocked only in ``poll()``: it reads requests with
  ``recv_into()`` into the buffer the protocol asks for (a WRITE payload
  lands directly in its own buffer), turns events into ``device.submit_*``
  calls, and sends what replies could not go out at once (``connection``);
* no sender thread: replies are sent by whoever completes the request --
  the device's callbacks, on whatever thread the device uses -- with a
  non-blocking ``sendmsg(header, *buffers)`` under a per-connection send
  lock (``completion``).  No completion ever waits for a client.
* A device that offers it (``completion_fd`` and friends, see
  ``blockdev.py``; blkfront does) has its completions run by the client's
  thread itself, polled with the socket: a request then goes from the
  socket to the device and its reply back out without a hand-off between
  threads.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading

from xdom.domains.hostsys.unix_sockets import remove_stale_socket, unlink_quietly

from ..blockdev import BlockDevice
from .connection import Connection
from .protocol import NbdServerConnection

__all__ = ["NbdServer"]

log = logging.getLogger("xdom.nbd")

_MiB = 1024 * 1024



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
        self._conns: set[Connection] = set()
        self._next_id = 0
        self._closed = False

    # --- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Bind the socket (mode ``self.mode``), listen, start accepting."""
        with self._lock:
            if self._closed or self._listener is not None:
                raise RuntimeError("NbdServer.start() called twice or after close()")
            remove_stale_socket(self.socket_path)
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
                    unlink_quietly(self.socket_path)
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
                conn = Connection(self, sock, self._next_id)
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
            unlink_quietly(self.socket_path)
