"""The I/O shell around ``VhostUserBackend``: a unix socket, SCM_RIGHTS, mmap, eventfds.

Rules of this module:

* All protocol decisions live in ``backend``; this file only carries out its
  actions.  It owns every fd: the listening and connection sockets, each
  region fd until mapped (then closed: a mapping costs no descriptor, see
  ``domains/sysmem``), each ring's kick/call/err eventfd, the inflight memfd.
* Carrying out an action is idempotent where the core may repeat one on a
  failure path: stopping a stopped ring, unmapping an unknown slot and
  clearing an absent fd are no-ops.
* Bounded: one front end at a time (vhost-user is one-to-one; a second
  connection waits in the listen backlog until the first ends), at most
  ``RECV_SIZE`` bytes and ``wire.MAX_FDS_PER_MESSAGE`` fds per ``recvmsg``,
  ancillary data truncated by the kernel is a protocol error.
* Nothing the front end passes or does stops the loop (it may serve other
  devices' work too: netfront's data thread runs vhost-user-net's).  Memory
  fds are mapped only if they cannot fault (``frontend_fds``: sealed against
  shrinking, long enough, not hugetlbfs); ring fds are made non-blocking; a
  kick fd must be an eventfd in counter mode; a kick fd epoll refuses, or
  one that hangs up, and a call fd that cannot be written, cost
  their ring (stopped, or marked NEEDS_RESET), never the loop; a reply waits
  at most ``SEND_TIMEOUT`` for a front end that does not read, then the
  connection is dropped.  Such faults are logged by ``log_budget``'s rule.
* One thread runs the loop: the device's ``process`` callback runs on it, and
  regions are only unmapped between callbacks, so no view outlives its
  mapping while in use.  ``stop()`` may be called from any thread.  The loop
  is ``serve()``, or someone else's: a thread that has its own (netfront's
  data thread, for vhost-user-net) polls ``fileno()`` and calls
  ``run_once(0)`` when it is readable, and ``run_queue(index)`` to have a
  ring processed (and its call fd signalled) outside a kick.

The device side: ``QueueHandler.process(index, queue)`` is called when ring
``index`` is kicked (and once when it starts, since kicks sent before the
start are lost); it pops chains, does the work and pushes completions.  After
it returns the shell signals the call eventfd if ``queue.should_notify()``,
and the err eventfd once if the queue fell into NEEDS_RESET.  A ring is also
processed when it is enabled.  A device that completes later (a block
device's ring) gets its completions onto the loop thread with
``add_reader(fd, callback)`` (its completion fd, or an eventfd its other
threads signal) and, after pushing them, calls ``notify_used(index, queue)``.
"""

from __future__ import annotations

import array
import logging
import math
import os
import select
import selectors
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Protocol

from ..hostsys import sysmem
from ..log_budget import worth_logging
from . import actions, frontend_fds
from .actions import FdKind
from .backend import VhostUserBackend
from .device import VhostUserDevice
from .virtqueue import SplitVirtqueue
from .wire import MAX_FDS_PER_MESSAGE

__all__ = ["RECV_SIZE", "POLL_INTERVAL", "REQUEST_LOG_SIZE", "SEND_TIMEOUT", "QueueHandler", "VhostUserServer"]

log = logging.getLogger(__name__)

#: Bytes read per recvmsg: many small vhost-user messages at once.
RECV_SIZE = 64 * 1024
#: How many requests and notes the server remembers.
REQUEST_LOG_SIZE = 1024
#: How often a ring without a kick fd (the front end asked for polling) is processed, seconds.
POLL_INTERVAL = 0.05
#: How long one reply may wait for room in the socket, seconds.  QEMU waits for the replies it asked for, so
#: only a front end that sends requests and does not read their replies fills the socket: the loop (every
#: ring, ``stop()``) must not wait on it for longer than this.
SEND_TIMEOUT = 2.0
_FD_SIZE = array.array("i").itemsize


class QueueHandler(Protocol):
    """The device's data path, called on the loop thread."""

    def queue_started(self, index: int, queue: SplitVirtqueue, enabled: bool) -> None: ...

    def queue_enabled(self, index: int, enabled: bool) -> None: ...

    def process(self, index: int, queue: SplitVirtqueue) -> None:
        """Pop, serve and push.  Called for disabled rings too: the spec wants them processed
        "without side effects" (a net device drops TX and supplies no RX), which only the device
        can do; ``queue_enabled`` says which state a ring is in."""
        ...

    def queue_stopped(self, index: int) -> None: ...


class _Connection:
    """Per-connection resources the shell holds on the core's behalf."""

    def __init__(self, sock: socket.socket, core: VhostUserBackend) -> None:
        self.sock = sock
        self.core = core
        self.regions: dict[int, tuple[int, int]] = {}            # slot -> (addr, length)
        self.fds: dict[tuple[int, FdKind], int] = {}            # (ring, kind) -> eventfd
        self.queues: dict[int, SplitVirtqueue] = {}
        self.err_reported: set[int] = set()
        self.inflight: tuple[int, int, int] | None = None       # (fd or -1, addr, length)
        #: Started rings whose kick fd was dropped (hung up, or not pollable): not processed until a new one.
        self.parked: set[int] = set()
        #: Why the connection is being given up (a reply could not be sent): nothing more is sent on it.
        self.dead: str | None = None


class VhostUserServer:
    """Serve a vhost-user device on a unix socket path, one front end after another.

    ``device_factory`` makes the device class for each new connection (a
    reconnecting front end renegotiates from scratch); ``handler`` receives
    the rings.  ``backend_options`` go to ``VhostUserBackend``.
    """

    def __init__(self, path: str, device_factory: Callable[[], VhostUserDevice],
                 handler: QueueHandler | None = None, *, backend_options: dict[str, Any] | None = None,
                 max_connections: int | None = None, mode: int | None = None) -> None:
        self.path = path
        self._mode = mode                   # the socket's permissions, set before listen() (None: umask)
        self._device_factory = device_factory
        self._handler = handler
        self._options = dict(backend_options or {})
        self._max_connections = max_connections
        self._listener: socket.socket | None = None
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop = threading.Event()
        self._conn: _Connection | None = None
        self._served = 0
        #: The last ``REQUEST_LOG_SIZE`` requests of every connection, in arrival order (diagnostics, tests).
        self.request_log: deque[int] = deque(maxlen=REQUEST_LOG_SIZE)
        #: The last ("refused"|"closed", text) notes from the core.
        self.notes: deque[tuple[str, str]] = deque(maxlen=REQUEST_LOG_SIZE)
        #: Set once a connection has been accepted.
        self.connected = threading.Event()
        self._faults: Counter[str] = Counter()       # the front end's faults by kind, for log_budget

    # --- life cycle -----------------------------------------------------------------

    def listen(self) -> None:
        """Bind and listen (before the front end is started: QEMU connects as a client)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(self.path)
            if self._mode is not None:
                os.chmod(self.path, self._mode)     # nobody can connect before listen(): no window
            s.listen(1)
        except BaseException:
            s.close()
            raise
        self._listener = s
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._sel.register(s, selectors.EVENT_READ, ("listen", None))

    def stop(self) -> None:
        """Ask the loop to end (thread-safe)."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def close(self) -> None:
        """Release everything (call after ``serve`` returned)."""
        self._stop.set()                    # a reply still owed at teardown waits for no one
        if self._conn is not None:
            self._end_connection("server closed")
        if self._listener is not None:
            self._unwatch(self._listener)
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self._sel.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def serve(self) -> None:
        """Run the loop until ``stop()`` (or ``max_connections`` connections have ended)."""
        if self._listener is None:
            self.listen()
        while not self._stop.is_set():
            self.run_once(self.poll_interval())

    @property
    def acked_features(self) -> int:
        """The virtio features the current front end acknowledged (0 without a connection)."""
        return self._conn.core.acked_features if self._conn is not None else 0

    def fileno(self) -> int:
        """The loop's epoll fd: readable when ``run_once`` has something to do (for an outside loop)."""
        return self._sel.fileno()

    def poll_interval(self) -> float | None:
        """How long the loop may sleep: ``POLL_INTERVAL`` while a ring has no kick fd, else None."""
        return POLL_INTERVAL if self._polled_queues() else None

    def run_once(self, timeout: float | None = 0) -> None:
        """One turn of the loop: wait up to ``timeout`` for events, handle them, run polled rings."""
        for key, _mask in self._sel.select(timeout):
            kind, arg = key.data
            if kind == "wake":
                try:
                    os.read(self._wake_r, 64)
                except BlockingIOError:
                    pass
            elif kind == "listen":
                self._accept()
            elif kind == "conn":
                self._receive()
            elif kind == "kick":
                self._kicked(arg)
            elif kind == "reader":
                try:
                    arg()
                except Exception:
                    log.exception("vhost-user: a reader callback failed")
            if self._stop.is_set():
                break
        for index in self._polled_queues():
            self._run_queue(index)

    # --- connections ------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self._conn is not None:        # cannot happen with the listener unregistered; be safe
            sock.close()
            return
        sock.setblocking(False)             # a reply never waits longer than SEND_TIMEOUT (see _send)
        core = VhostUserBackend(self._device_factory(), **self._options)
        self._conn = _Connection(sock, core)
        self._sel.unregister(self._listener)
        self._sel.register(sock, selectors.EVENT_READ, ("conn", None))
        self.connected.set()

    def _end_connection(self, reason: str) -> None:
        conn = self._conn
        if conn is None:
            return
        if not conn.core.closed:
            conn.core.close(reason)
        self._drain(conn)
        self._conn = None
        self._sel.unregister(conn.sock)
        conn.sock.close()
        # The core released everything through actions; anything left is a shell bug: do not leak it.
        for index in list(conn.queues):
            self._stop_queue(conn, index)
        for key in list(conn.fds):
            self._set_fd(conn, key[0], key[1], None)
        for slot in list(conn.regions):
            self._unmap_region(conn, slot)
        self._unmap_inflight(conn)
        self._served += 1
        if self._max_connections is not None and self._served >= self._max_connections:
            self._stop.set()
        elif self._listener is not None and not self._stop.is_set():
            self._sel.register(self._listener, selectors.EVENT_READ, ("listen", None))

    def _receive(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            data, anc, flags, _ = conn.sock.recvmsg(RECV_SIZE, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _FD_SIZE),
                                                    socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("vhost-user: recvmsg failed: %s", e)
            data, anc, flags = b"", [], 0
        fds: list[int] = []
        for level, typ, payload in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[:len(payload) - len(payload) % _FD_SIZE])
                fds.extend(arr)
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            log.warning("vhost-user: front end sent more fds than a message may carry")
            self._end_connection("ancillary data truncated")
            return
        conn.core.receive_data(data, fds)
        if self._drain(conn) or not data or conn.dead is not None:
            self._end_connection(conn.dead or "front end closed the connection")

    def _drain(self, conn: _Connection) -> bool:
        """Carry out every action the core has, in order; True once the core closed."""
        core = conn.core
        closed = False
        while (act := core.next_action()) is not None:
            self._carry_out(conn, act)
            if isinstance(act, actions.Closed):
                closed = True
                self.notes.append(("closed", act.reason))
                if act.error:
                    log.warning("vhost-user: connection failed: %s", act.reason)
        self.request_log.extend(core.log)
        core.log.clear()
        return closed

    # --- actions --------------------------------------------------------------------

    def _carry_out(self, conn: _Connection, act: actions.Action) -> None:
        if isinstance(act, actions.SendReply):
            self._send(conn, act.data, act.fds)
        elif isinstance(act, actions.CloseFds):
            for fd in act.fds:
                _close(fd)
        elif isinstance(act, actions.MapRegion):
            try:
                self._map_region(conn, act)
            finally:
                _close(act.fd)
        elif isinstance(act, actions.UnmapRegion):
            self._unmap_region(conn, act.slot)
        elif isinstance(act, actions.SetQueueFd):
            self._set_fd(conn, act.index, act.kind, act.fd)
        elif isinstance(act, actions.StartQueue):
            conn.queues[act.index] = act.queue
            conn.err_reported.discard(act.index)
            self._watch_kick(conn, act.index)
            if self._handler is not None:
                self._handler.queue_started(act.index, act.queue, act.enabled)
            self._run_queue(act.index)
        elif isinstance(act, actions.StopQueue):
            self._stop_queue(conn, act.index)
        elif isinstance(act, actions.QueueEnabled):
            if self._handler is not None:
                self._handler.queue_enabled(act.index, act.enabled)
            if act.enabled:
                self._run_queue(act.index)      # chains that waited while it was disabled get no new kick
        elif isinstance(act, actions.AllocateInflight):
            self._allocate_inflight(conn, act.size)
        elif isinstance(act, actions.MapInflight):
            self._map_inflight(conn, act)
        elif isinstance(act, actions.UnmapInflight):
            self._unmap_inflight(conn)
        elif isinstance(act, actions.Refused):
            self.notes.append(("refused", act.reason))
            log.info("vhost-user: refused request %d: %s", act.request, act.reason)
        # FeaturesAcked and Closed need nothing here.

    def _fault(self, kind: str, message: str, *args: object) -> None:
        """Log a fault of the front end's (or the guest's) by ``log_budget``'s rule, counted per ``kind``:
        the peer decides how often it happens, a line each time would let it fill the log."""
        self._faults[kind] += 1
        n = self._faults[kind]
        if worth_logging(n):
            log.warning("vhost-user: " + message + " (%s fault %d)", *args, kind, n)

    def _send(self, conn: _Connection, data: bytes, fds: tuple[int, ...]) -> None:
        """Write one reply on the non-blocking socket, waiting for room at most ``SEND_TIMEOUT``.

        A front end that does not read its replies would otherwise hold the loop (every ring, and
        ``stop()``) for as long as it keeps the socket open.  A send that fails or times out (or is cut
        short by ``stop()``) gives the connection up: a reply sent in part leaves the stream unusable
        anyway.  Nothing more is sent or logged on it; ``_receive`` ends it after this turn."""
        if conn.dead is not None:
            return
        view = memoryview(data)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        deadline: float | None = None
        while view:
            try:
                n = conn.sock.sendmsg([view], anc)
            except BlockingIOError:
                if deadline is None:
                    deadline = time.monotonic() + SEND_TIMEOUT
                why = self._wait_writable(conn.sock, deadline)
                if why is not None:
                    conn.dead = why
                    self._fault("reply", "dropping the front end: %s", why)
                    return
                continue
            except OSError as e:
                conn.dead = f"send failed: {e}"
                self._fault("reply", "dropping the front end: %s", conn.dead)
                return
            view = view[n:]
            anc = []                     # the fds went with the first bytes

    def _wait_writable(self, sock: socket.socket, deadline: float) -> str | None:
        """Wait until ``sock`` takes more bytes (None), ``deadline`` passes or ``stop()`` is called (why not)."""
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        poller.register(self._wake_r, select.POLLIN)         # stop() writes it
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return f"it has not read its replies for {SEND_TIMEOUT:g} s"
            ready = poller.poll(math.ceil(left * 1000))
            if any(fd != self._wake_r for fd, _ in ready):
                return None                                  # writable, or hung up: sendmsg says which
            if ready:
                try:
                    os.read(self._wake_r, 64)
                except OSError:
                    pass
        return "the server is stopping and it does not read its replies"

    def _map_region(self, conn: _Connection, act: actions.MapRegion) -> None:
        """Map the region's fd shared, if nothing the front end does to it later can make that fault.

        No MAP_NORESERVE: it changes nothing for a memfd's shared mapping but skips the reservation of a
        hugetlbfs one, whose first access then is a SIGBUS if the pool has no page left."""
        length = act.region.mapping_length
        bad = frontend_fds.memory_fd_problem(act.fd, length)
        if bad is not None:
            self._fault("memory", "refused to map region slot %d: its fd is %s", act.slot, bad)
            return
        try:
            addr = sysmem.mmap(0, length, sysmem.PROT_READ | sysmem.PROT_WRITE, sysmem.MAP_SHARED, act.fd, 0)
        except OSError as e:
            self._fault("memory", "cannot map region slot %d: %s", act.slot, e)
            return
        conn.regions[act.slot] = (addr, length)
        conn.core.region_mapped(act.slot, sysmem.view(addr, length))

    def _unmap_region(self, conn: _Connection, slot: int) -> None:
        got = conn.regions.pop(slot, None)
        if got is not None:
            sysmem.munmap(*got)

    def _set_fd(self, conn: _Connection, index: int, kind: FdKind, fd: int | None) -> None:
        old = conn.fds.pop((index, kind), None)
        if old is not None:
            if kind is FdKind.KICK:
                self._unwatch(old)
            _close(old)
        if kind is FdKind.KICK:
            conn.parked.discard(index)          # a new kick fd (or none: polling) revives a parked ring
        if fd is None:
            return
        frontend_fds.set_nonblocking(fd)
        if kind is FdKind.KICK:
            bad = frontend_fds.kick_fd_problem(fd)
            if bad is not None:
                _close(fd)
                conn.parked.add(index)
                self._fault("kick", "ring %d refused its kick fd, not processed until a new one: it is %s",
                            index, bad)
                return
        conn.fds[(index, kind)] = fd
        if kind is FdKind.KICK and index in conn.queues:
            self._watch_kick(conn, index)
            self._run_queue(index)              # the check consumed the kicks pending

    def _watch_kick(self, conn: _Connection, index: int) -> None:
        """Have the loop watch ring ``index``'s kick fd.  One epoll cannot watch (a regular file: EPERM)
        is dropped and the ring marked NEEDS_RESET: the front end gave it no way to be kicked."""
        fd = conn.fds.get((index, FdKind.KICK))
        if fd is not None:
            self._unwatch(fd)
            try:
                self._sel.register(fd, selectors.EVENT_READ, ("kick", index))
            except (OSError, ValueError, KeyError) as e:
                self._drop_kick(conn, index)
                self._break_ring(conn, index, f"its kick fd cannot be polled: {e}")

    def _drop_kick(self, conn: _Connection, index: int) -> None:
        """Close ring ``index``'s kick fd and park the ring: not processed (nor polled) until a new one."""
        fd = conn.fds.pop((index, FdKind.KICK), None)
        if fd is not None:
            self._unwatch(fd)
            _close(fd)
        conn.parked.add(index)

    def _break_ring(self, conn: _Connection, index: int, reason: str,
                    queue: SplitVirtqueue | None = None) -> None:
        """Put ring ``index`` (``queue``, if it is no longer among the started ones) in NEEDS_RESET and
        say so once; it stays inert until the front end restarts it."""
        queue = queue if queue is not None else conn.queues.get(index)
        if queue is not None:
            queue.mark_needs_reset(reason)
            self._report_reset(conn, index, queue)

    def _unwatch(self, fd: int | socket.socket) -> None:
        try:
            self._sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _stop_queue(self, conn: _Connection, index: int) -> None:
        conn.parked.discard(index)
        if conn.queues.pop(index, None) is None:
            return
        fd = conn.fds.get((index, FdKind.KICK))
        if fd is not None:
            self._unwatch(fd)
        if self._handler is not None:
            self._handler.queue_stopped(index)

    def _allocate_inflight(self, conn: _Connection, size: int) -> None:
        """A new inflight area.  The front end gets its fd: sealed (``frontend_fds.INFLIGHT_SEALS``), it
        cannot truncate the area under our mapping."""
        self._unmap_inflight(conn)
        try:
            fd = frontend_fds.sealed_memfd("xdom-vhost-inflight", size)
        except OSError as e:
            log.warning("vhost-user: cannot create the inflight area: %s", e)
            return
        try:
            addr = sysmem.mmap(0, size, sysmem.PROT_READ | sysmem.PROT_WRITE, sysmem.MAP_SHARED, fd, 0)
        except OSError as e:
            os.close(fd)
            log.warning("vhost-user: cannot map the inflight area: %s", e)
            return
        conn.inflight = (fd, addr, size)
        conn.core.inflight_allocated(fd, sysmem.view(addr, size))

    def _map_inflight(self, conn: _Connection, act: actions.MapInflight) -> None:
        """Map the front end's inflight area, under the same rule as a memory region (``_map_region``)."""
        self._unmap_inflight(conn)
        try:
            bad = frontend_fds.memory_fd_problem(act.fd, act.offset + act.size)
            if bad is not None:
                self._fault("memory", "refused to map the inflight area: its fd is %s", bad)
                return
            addr = sysmem.mmap(0, act.size, sysmem.PROT_READ | sysmem.PROT_WRITE, sysmem.MAP_SHARED,
                               act.fd, act.offset)
        except OSError as e:
            self._fault("memory", "cannot map the inflight area: %s", e)
            return
        finally:
            _close(act.fd)
        conn.inflight = (-1, addr, act.size)
        conn.core.inflight_mapped(sysmem.view(addr, act.size))

    def _unmap_inflight(self, conn: _Connection) -> None:
        if conn.inflight is not None:
            fd, addr, size = conn.inflight
            conn.inflight = None
            sysmem.munmap(addr, size)
            if fd >= 0:
                _close(fd)

    # --- rings --------------------------------------------------------------------

    def _polled_queues(self) -> list[int]:
        conn = self._conn
        if conn is None:
            return []
        return [i for i in conn.queues if (i, FdKind.KICK) not in conn.fds and i not in conn.parked]

    def _kicked(self, index: int) -> None:
        """Ring ``index``'s kick fd is readable: consume the kick and process the ring.

        Nothing makes the front end pass an eventfd: a pipe whose writer closed (or a socket whose peer
        did) reads 0 bytes and stays readable for ever, and an fd whose read fails stays so too.  Either
        would have the loop process the ring in a busy loop; the fd is dropped and the ring parked until
        the front end sends a new kick fd."""
        conn = self._conn
        if conn is None or index in conn.parked:
            return
        fd = conn.fds.get((index, FdKind.KICK))
        if fd is not None:
            why = None
            try:
                if os.read(fd, 8) == b"":
                    why = "it hung up"
            except BlockingIOError:
                pass                                # woken for nothing: process the ring anyway
            except OSError as e:
                why = f"reading it failed: {e}"
            if why is not None:
                self._drop_kick(conn, index)
                self._fault("kick", "ring %d stopped until it gets a new kick fd: %s", index, why)
                return
        self._run_queue(index)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop thread whenever ``fd`` is readable (a device's completion fd, an
        eventfd its other threads hand completions over with).  Call before ``serve`` or on the loop."""
        self._sel.register(fd, selectors.EVENT_READ, ("reader", callback))

    def remove_reader(self, fd: int) -> None:
        self._unwatch(fd)

    def notify_used(self, index: int, queue: SplitVirtqueue) -> None:
        """After the device pushed to ``queue`` outside ``process`` (completions that came later): signal
        ring ``index``'s call fd if the queue says so.  Loop thread only; also while the ring is stopping."""
        conn = self._conn
        if conn is None or queue.needs_reset is not None or not queue.should_notify():
            return
        self._signal(conn, index, FdKind.CALL, queue)

    def run_queue(self, index: int) -> None:
        """Have ring ``index`` processed now (if started), then signal its call fd as after a kick."""
        self._run_queue(index)

    def _run_queue(self, index: int) -> None:
        conn = self._conn
        if conn is None:
            return
        queue = conn.queues.get(index)
        if queue is None:
            return
        before = queue.used_idx
        if self._handler is not None and queue.needs_reset is None:
            self._handler.process(index, queue)
        if queue.used_idx != before and queue.should_notify():
            self._signal(conn, index, FdKind.CALL, queue)
        self._report_reset(conn, index, queue)

    def _report_reset(self, conn: _Connection, index: int, queue: SplitVirtqueue) -> None:
        """Once ring ``index`` needs a reset: log it and signal its err fd, once per start."""
        if queue.needs_reset is not None and index not in conn.err_reported:
            conn.err_reported.add(index)
            self._fault("ring", "ring %d needs a reset: %s", index, queue.needs_reset)
            self._signal(conn, index, FdKind.ERR, queue)

    def _signal(self, conn: _Connection, index: int, kind: FdKind, queue: SplitVirtqueue) -> None:
        """Signal ring ``index``'s call or err fd, if it has one, without blocking and without failing.

        The fd is non-blocking (``_set_fd``), so a full one (an eventfd at its limit, a pipe nobody reads)
        is EAGAIN: its reader has a signal pending already and wakes anyway, nothing is lost.  Any other
        error (a read-only fd: EBADF) means the front end gave a descriptor that cannot be signalled: it
        is closed, and a ring without a working call fd is broken (``queue`` NEEDS_RESET)."""
        fd = conn.fds.get((index, kind))
        if fd is None:
            return
        try:
            os.eventfd_write(fd, 1)
        except BlockingIOError:
            pass
        except OSError as e:
            self._fault("signal", "ring %d: cannot signal its %s fd: %s", index, kind.value, e)
            self._set_fd(conn, index, kind, None)
            if kind is FdKind.CALL:
                self._break_ring(conn, index, f"its call fd cannot be signalled: {e}", queue)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
