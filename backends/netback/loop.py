"""netback's data path: one thread, one epoll, every vif.

Python runs one thread at a time, so a thread per vif buys no parallelism;
it buys a GIL hand-off and an eventfd wake-up each time a frame goes from
one vif's thread to another's, and on this host a wake-up across CPUs
costs tens of microseconds.  Here one loop owns every connected vif's
event channels (and, in bridge mode, its TAP): a frame a guest transmits
is switched and written into the receiving guest's ring in the same pass,
and each ring is pushed, and its frontend notified, once per pass rather
than once per frame, as Linux netback batches per NAPI poll.

Fairness: a pass takes at most one ring's worth of requests from each vif
with work, then moves on; a vif with more left is served again in the next
pass, after everyone else (``budget`` exhausted: the loop polls without
sleeping).  A vif whose rate limit ran out is skipped until its credit
returns (a deadline, the loop's poll timeout).

Other threads (xenbus watches) hand work to the loop with :meth:`call`: a
callable run on the loop thread, waited for; that is how connections are
added and removed, so the loop never sees a half-built or half-released
connection.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

log = logging.getLogger("xdom.netback")

T = TypeVar("T")


class Served(Protocol):
    """What the loop drives: a connection's data path (see :class:`~.vif._Connection`)."""

    name: str

    def fds(self) -> dict[int, str]:
        """The descriptors to watch, each with what its readiness means ("tx", "rx", "both", "tap")."""

    def on_ready(self, what: str) -> None:
        """A watched descriptor fired (the loop thread calls this; it must not block)."""

    def work(self, now: float) -> bool:
        """Move what can be moved; True if more is left that needs no new event."""

    def deadline(self) -> float | None:
        """When (monotonic) the connection wants :meth:`work` called without an event (rate credit)."""


class NetbackLoop:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._calls: queue.SimpleQueue[tuple[Callable[[], object], threading.Event, list[object]]] = \
            queue.SimpleQueue()
        self._fds: dict[int, tuple[Served, str]] = {}
        self._served: list[Served] = []
        self._busy: set[Served] = set()       # have work left or an event not yet handled
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="netback-loop", daemon=True)
        self._thread.start()

    # ---- from other threads --------------------------------------------------------

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the loop thread and return its result (or raise its exception)."""
        if threading.current_thread() is self._thread:
            return fn()
        if not self._thread.is_alive():
            raise RuntimeError("the netback loop has stopped")
        done = threading.Event()
        box: list[object] = []
        self._calls.put((fn, done, box))
        os.eventfd_write(self._wake, 1)
        while not done.wait(1.0):
            if not self._thread.is_alive():
                raise RuntimeError("the netback loop stopped")
        if box and isinstance(box[0], BaseException):
            raise box[0]
        return box[0] if box else None     # type: ignore[return-value]

    def add(self, conn: Served) -> None:
        self.call(lambda: self._add(conn))

    def remove(self, conn: Served) -> None:
        """After this returns the loop never touches ``conn`` again."""
        self.call(lambda: self._remove(conn))

    def stop(self) -> None:
        """Stop the thread; the connections still in it are the caller's to release.  Idempotent."""
        if self._thread.is_alive():
            self._stopping = True
            os.eventfd_write(self._wake, 1)
            self._thread.join()
        if self._wake >= 0:
            self._epoll.close()
            os.close(self._wake)
            self._wake = -1

    def kick(self, conn: Served) -> None:
        """``conn`` has work (a frame was queued for it): served in the next pass."""
        if threading.current_thread() is self._thread:
            self._busy.add(conn)
        else:
            self._calls.put((lambda: self._busy.add(conn) if conn in self._served else None,
                             threading.Event(), []))
            os.eventfd_write(self._wake, 1)

    def serves(self, conn: Served) -> bool:
        """Whether ``conn`` is in the loop (for tests and diagnostics)."""
        return any(s is conn for s in list(self._served))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- on the loop thread ------------------------------------------------------------

    def _add(self, conn: Served) -> None:
        fds = conn.fds()
        for fd, what in fds.items():
            self._epoll.register(fd, select.EPOLLIN)
            self._fds[fd] = (conn, what)
        self._served.append(conn)
        self._busy.add(conn)            # anything the frontend queued before we watched

    def _remove(self, conn: Served) -> None:
        for fd, (owner, _) in list(self._fds.items()):
            if owner is conn:
                del self._fds[fd]
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass
        self._served = [s for s in self._served if s is not conn]
        self._busy.discard(conn)

    def _run_calls(self) -> None:
        while True:
            try:
                fn, done, box = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                box.append(fn())
            except BaseException as e:
                box.append(e)
            done.set()

    def _timeout(self, now: float) -> float:
        if self._busy:
            return 0.0
        deadlines = [d for d in (s.deadline() for s in self._served) if d is not None]
        return max(0.0, min(deadlines) - now) if deadlines else -1.0

    def _run(self) -> None:
        while not self._stopping:
            try:
                events = self._epoll.poll(self._timeout(time.monotonic()))
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == self._wake:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                    continue
                entry = self._fds.get(fd)
                if entry is not None:
                    conn, what = entry
                    conn.on_ready(what)
                    self._busy.add(conn)
            self._run_calls()
            now = time.monotonic()
            for conn in [s for s in self._served if s in self._busy or self._due(s, now)]:
                self._busy.discard(conn)
                try:
                    more = conn.work(now)
                except Exception:                  # a bug must not take every vif down with it
                    log.exception("%s: data path failed", conn.name)
                    more = False
                if more:
                    self._busy.add(conn)
        self._run_calls()

    @staticmethod
    def _due(conn: Served, now: float) -> bool:
        d = conn.deadline()
        return d is not None and d <= now
