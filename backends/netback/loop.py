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

Other threads (xenbus watches) hand work to the loop with ``call`` (a
:class:`~xdom.backends.loop_thread.LoopThread`): a callable run on the loop
thread, waited for; that is how connections are added and removed, so the
loop never sees a half-built or half-released connection.
"""

from __future__ import annotations

import logging
import select
import time
from typing import Protocol

from ..loop_thread import LoopThread

log = logging.getLogger("xdom.netback")


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


class NetbackLoop(LoopThread):
    def __init__(self) -> None:
        super().__init__("netback-loop")
        self._fds: dict[int, tuple[Served, str]] = {}
        self._served: list[Served] = []
        self._busy: set[Served] = set()       # have work left or an event not yet handled
        self._start()

    # ---- from other threads --------------------------------------------------------

    def add(self, conn: Served) -> None:
        self.call(lambda: self._add(conn))

    def remove(self, conn: Served) -> None:
        """After this returns the loop never touches ``conn`` again."""
        self.call(lambda: self._remove(conn))

    def kick(self, conn: Served) -> None:
        """``conn`` has work (a frame was queued for it): served in the next pass."""
        if self._on_loop():
            self._busy.add(conn)
        else:
            self.post(lambda: self._busy.add(conn) if conn in self._served else None)

    def serves(self, conn: Served) -> bool:
        """Whether ``conn`` is in the loop (for tests and diagnostics)."""
        return any(s is conn for s in list(self._served))

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

    def _timeout(self, now: float) -> float:
        if self._busy:
            return 0.0
        deadlines = [d for d in (s.deadline() for s in self._served) if d is not None]
        return max(0.0, min(deadlines) - now) if deadlines else -1.0

    def _run(self) -> None:
        while not self._stopping:
            for fd in self._wait(self._timeout(time.monotonic())):
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
