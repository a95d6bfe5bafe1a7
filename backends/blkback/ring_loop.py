"""blkback's rings served by a few loop threads, each one epoll over many rings.

A thread per ring, as Linux blkback has a kthread per ring, buys nothing
in Python but GIL hand-offs: with 48 guests reading 4 KiB blocks, blkback
spent a quarter of its CPU in futex waits for the GIL (``perf``: the GIL's
mutex and condition variable) and its CPU per I/O tripled against one
guest.  Here a loop thread serves every ring it was given: one
``epoll_wait`` returns all the rings whose frontends notified, and each is
served in turn, one batch (at most a ring's worth of requests) per pass so
a busy frontend cannot starve the others; a ring with more left is served
again in the next pass, after everyone else, without sleeping.

There are a few loops, not one: a read or write releases the GIL while the
kernel copies, so two loops overlap one ring's copy with another ring's
Python (1 MiB requests, or the queues of one multi-queue device, which go
to different loops).  A ring goes to the loop serving the fewest.

Nothing that may wait runs on a loop, or one guest's slow disk would stall
every guest on that loop.  A read the page cache cannot answer at once
(``RWF_NOWAIT``) goes alone to a worker thread (:meth:`RingLoop.aside`) and
the ring is served on meanwhile; its answer is put on the ring by the loop
when the read is done, out of ring order as Linux blkback's bios complete
(blkif answers carry the request's id).  Handed over with the rest of its
batch instead, the ring waited for the disk at queue depth 1: a page cache
missing 0.15% of a 256 MiB image cost a fifth of the 4 KiB reads a second,
while nbdkit's threads read on.  A flush, a discard, or anything that maps
grants at the broker goes, with the rest of its batch, to a worker thread
(:meth:`RingLoop.offload`), and the loop does not serve that ring again
until the worker is done -- those requests are served in ring order, as
Linux's one kthread per ring serves them.  Buffered writes are done on the
loop (ext4 refuses ``RWF_NOWAIT`` for them); they wait only when the kernel
throttles dirty pages.

Other threads (xenbus) add and remove rings through the loop thread
(``backends/loop_thread.py``), waited for, so a loop never serves a ring
that is half built or half released.
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from ..loop_thread import LoopThread

log = logging.getLogger("xdom.blkback")

T = TypeVar("T")

#: Loop threads of a blkback: one per CPU, up to this many (more only contend for the GIL).
MAX_LOOPS = 4
#: Worker threads for what may wait (made as needed): this many rings wait for their disks at once.
MAX_WORKERS = 32


class Ring(Protocol):
    """What a loop serves (:class:`~.ring_server.RingServer`)."""

    name: str
    offloaded: Future[None] | None       # set by the loop: a worker serving the ring's batch, if any
    aside: set[Future[None]]             # the loop's: a worker reading for the ring while it is served on

    def fileno(self) -> int:
        """The descriptor that is readable when the frontend notified (its event channel)."""

    def work(self) -> bool:
        """Serve one batch; True if more requests are already waiting (served again without an event)."""

    def failed(self, why: str) -> None:
        """The ring broke (its frontend, or a bug): the loop no longer serves it; close the device."""


class RingLoop(LoopThread):
    """One thread serving its rings until :meth:`stop`."""

    def __init__(self, name: str, workers: ThreadPoolExecutor) -> None:
        """``workers``: where :meth:`offload` runs what may wait (shared by a blkback's loops)."""
        super().__init__(name)
        self._workers = workers
        self._fds: dict[int, Ring] = {}
        self.rings: list[Ring] = []           # in the order they are served
        self._busy: set[Ring] = set()         # notified, or more left after their last batch
        self._paused: set[Ring] = set()       # a worker serves their batch: not watched meanwhile
        self._served: set[Ring] = set()       # self.rings, to look up
        self._later: dict[Ring, list[Callable[[], None]]] = {}   # aside reads done while paused
        self._aside_queued: dict[Ring, list[tuple[Callable[[], Any], Callable[[Any], None]]]] = {}
        self._start()

    # ---- from other threads -------------------------------------------------------------

    def add(self, ring: Ring) -> None:
        self.call(lambda: self._add(ring))

    def remove(self, ring: Ring) -> None:
        """After this returns the loop never touches ``ring`` again (a ring not in it: nothing), and no
        worker serves it either (one that was is waited for)."""
        reading: list[Future[None]] = []
        if self.alive:
            def take_off() -> None:
                self._remove(ring)
                reading.extend(ring.aside)
            self.call(take_off)
        else:
            reading.extend(ring.aside)
        pending = ring.offloaded
        if pending is not None:
            pending.result()
        for job in reading:                 # their buffers are the ring's mappings: done before they go
            job.exception()

    def serves(self, ring: Ring) -> bool:
        return any(r is ring for r in list(self.rings))

    # ---- on the loop thread -------------------------------------------------------------

    def offload(self, ring: Ring, serve: Callable[[], object]) -> None:
        """From ``ring.work()`` on the loop: run ``serve`` on a worker thread, and leave the ring alone
        (its notifications kept for later) until it returns; then the ring is served again, or, if
        ``serve`` raised, dropped and reported broken."""
        self._epoll.modify(ring.fileno(), 0)
        self._paused.add(ring)

        def run() -> None:
            failure: Exception | None = None
            try:
                serve()
            except Exception as e:
                log.exception("%s: serving a batch off the loop failed", ring.name)
                failure = e
            self.post(lambda: self._resume(ring, failure))
        ring.offloaded = self._workers.submit(run)

    def aside(self, ring: Ring, job: Callable[[], T], done: Callable[[T], None]) -> None:
        """From ``ring.work()`` on the loop: run ``job`` on a worker while the ring is served on, then
        ``done(result)`` on the loop -- not while a worker serves the ring's batch (``offload``; it puts
        answers on the ring itself), and not at all once the ring was removed.

        A ring's jobs run in order on one worker at a time, those queued meanwhile next, in one go:
        more threads at once only fight over the GIL (measured on a cold image: 16 workers served
        4 KiB reads at half the rate of one)."""
        self._aside_queued.setdefault(ring, []).append((job, done))
        if not ring.aside:
            self._start_aside(ring)

    def _start_aside(self, ring: Ring) -> None:
        jobs = self._aside_queued.pop(ring, [])
        if not jobs:
            return

        def answer(done: Callable[[Any], None], result: object, failure: Exception | None) -> None:
            self.post(lambda: self._aside_done(ring, done, result, failure))

        def run() -> None:
            for job, done in jobs:
                try:
                    answer(done, job(), None)
                except Exception as e:
                    answer(done, None, e)
        future = self._workers.submit(run)
        ring.aside.add(future)
        future.add_done_callback(lambda f: self.post(lambda: self._aside_finished(ring, f)))

    def _aside_done(self, ring: Ring, done: Callable[[Any], None], result: object,
                    failure: Exception | None) -> None:
        if ring in self._paused:            # a worker answers on the ring now: after it
            self._later.setdefault(ring, []).append(lambda: self._aside_done(ring, done, result, failure))
            return
        if ring not in self._served:        # removed meanwhile
            return
        try:
            if failure is None:
                done(result)
        except Exception as e:
            failure = e
        if failure is not None:
            log.error("%s: a read served aside failed: %r", ring.name, failure)
            self._remove(ring)
            ring.failed(f"ring failed: {failure!r}")

    def _aside_finished(self, ring: Ring, future: Future[None]) -> None:
        ring.aside.discard(future)
        if ring in self._served:
            self._start_aside(ring)

    def _resume(self, ring: Ring, failure: Exception | None) -> None:
        ring.offloaded = None
        if ring not in self._paused:        # removed meanwhile
            return
        self._paused.discard(ring)
        if failure is not None:
            self._remove(ring)
            ring.failed(f"ring failed: {failure!r}")
            return
        self._epoll.modify(ring.fileno(), select.EPOLLIN)
        self._busy.add(ring)
        for deferred in self._later.pop(ring, ()):
            deferred()

    def _add(self, ring: Ring) -> None:
        fd = ring.fileno()
        self._epoll.register(fd, select.EPOLLIN)
        self._fds[fd] = ring
        self.rings.append(ring)
        self._served.add(ring)
        self._busy.add(ring)                # what the frontend queued before we watched

    def _remove(self, ring: Ring) -> None:
        self._paused.discard(ring)
        self._served.discard(ring)
        self._later.pop(ring, None)
        self._aside_queued.pop(ring, None)
        for fd, owner in list(self._fds.items()):
            if owner is ring:
                del self._fds[fd]
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass
        self.rings = [r for r in self.rings if r is not ring]
        self._busy.discard(ring)

    def _run(self) -> None:
        fds, busy = self._fds, self._busy
        while not self._stopping:
            for fd in self._wait(0 if busy else -1):
                ring = fds.get(fd)
                if ring is not None:
                    busy.add(ring)
            if not self._calls.empty():
                self._run_calls()
            if not busy:
                continue
            for ring in [r for r in self.rings if r in busy]:
                busy.discard(ring)
                try:
                    if ring.work():
                        busy.add(ring)
                except Exception as e:          # one broken ring must not take the others down with it
                    self._remove(ring)
                    ring.failed(str(e) if isinstance(e, RingBroken) else f"ring failed: {e!r}")
                    if not isinstance(e, RingBroken):
                        log.exception("%s: serving the ring failed", ring.name)
        self._run_calls()


class RingBroken(Exception):
    """A frontend broke its ring's protocol (say, an index past the ring): that ring is closed."""


class RingLoops:
    """The loop threads of one blkback; a ring goes to the one serving the fewest."""

    def __init__(self, count: int | None = None) -> None:
        if count is None:
            count = max(1, min(len(os.sched_getaffinity(0)), MAX_LOOPS))
        self.workers = ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="blkback-io")
        self.loops = [RingLoop(f"blkback-loop{i}", self.workers) for i in range(count)]

    def add(self, ring: Ring) -> RingLoop:
        loop = min(self.loops, key=lambda lp: len(lp.rings))
        loop.add(ring)
        return loop

    def serves(self, ring: Ring) -> bool:
        return any(lp.serves(ring) for lp in self.loops)

    def stop(self) -> None:
        for lp in self.loops:
            lp.stop()
        self.workers.shutdown(wait=True)
