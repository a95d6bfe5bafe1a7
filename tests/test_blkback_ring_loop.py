"""blkback's loop threads: many rings on one epoll, served fairly, one broken ring alone closed.

The rings here are stand-ins with an eventfd each (what a ring's event
channel is to the loop) that count how often they are served; the real
RingServer on these loops is what every blkback test drives.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import wait_until

from xdom.backends.blkback.ring_loop import RingBroken, RingLoop, RingLoops

pytestmark = pytest.mark.timeout(60)


class _Ring:
    def __init__(self, name: str, busy: bool = False, breaks: Exception | None = None) -> None:
        self.name = name
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.busy = busy                   # always has more: never lets go of its own accord
        self.breaks = breaks
        self.served = 0
        self.offloaded = None
        self.aside: set = set()
        self.order: list[str] = []         # a log of passes, which rings may share
        self.why: list[str] = []
        self.threads: set[str] = set()

    def fileno(self) -> int:
        return self.fd

    def notify(self) -> None:
        os.eventfd_write(self.fd, 1)

    def work(self) -> bool:
        self.threads.add(threading.current_thread().name)
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        self.served += 1
        self.order.append(self.name)
        if self.breaks is not None:
            raise self.breaks
        return self.busy

    def failed(self, why: str) -> None:
        self.why.append(why)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def loop() -> Iterator[RingLoop]:
    workers = ThreadPoolExecutor(4, thread_name_prefix="blkback-test-io")
    lp = RingLoop("blkback-test-loop", workers)
    try:
        yield lp
    finally:
        lp.stop()
        workers.shutdown(wait=True)


def test_a_ring_is_served_when_notified_and_not_otherwise(loop: RingLoop) -> None:
    ring = _Ring("r")
    try:
        loop.add(ring)
        wait_until(lambda: ring.served == 1, 5, "the first pass (what was queued before it was watched)")
        for n in range(2, 6):
            ring.notify()
            wait_until(lambda: ring.served == n, 5, f"pass {n}")        # noqa: B023
        assert ring.threads == {"blkback-test-loop"}
        loop.remove(ring)
        ring.notify()
        assert not loop.serves(ring) and ring.served == 5
    finally:
        ring.close()


def test_a_ring_that_always_has_more_does_not_starve_the_others(loop: RingLoop) -> None:
    hog, quiet = _Ring("hog", busy=True), _Ring("quiet")
    try:
        loop.add(hog)
        wait_until(lambda: hog.served > 100, 5, "the hog to be served again and again")
        loop.add(quiet)
        wait_until(lambda: quiet.served == 1, 5, "the quiet ring's first pass")
        order = hog.order = quiet.order = []

        def notify_quiet() -> None:        # on the loop thread, between two passes: an exact point in the log
            order.append("notify")
            quiet.notify()
        for n in range(2, 22):
            loop.call(notify_quiet)
            wait_until(lambda: quiet.served == n, 5, "the quiet ring's turn")     # noqa: B023
            after = order[len(order) - 1 - order[::-1].index("notify") + 1:]
            # served in the next pass: the hog had the rest of the pass under way and its turn in that
            # one, not the whole of what it always has
            assert after.index("quiet") <= 2, after[:10]
        loop.remove(hog)
        loop.remove(quiet)
    finally:
        hog.close()
        quiet.close()


@pytest.mark.parametrize("error, why", [(RingBroken("ring overflow: req_prod jumped"), "ring overflow"),
                                        (ValueError("a bug"), "ring failed: ValueError('a bug')")])
def test_a_ring_that_breaks_is_dropped_alone(loop: RingLoop, error: Exception, why: str) -> None:
    bad, good = _Ring("bad", breaks=error), _Ring("good")
    try:
        loop.add(good)
        loop.add(bad)
        wait_until(lambda: bad.why, 5, "the broken ring to be reported")
        assert bad.why[0].startswith(why) and not loop.serves(bad) and loop.serves(good)
        served = bad.served
        bad.notify()
        good.notify()
        wait_until(lambda: good.served >= 2, 5, "the good ring, still served")
        assert bad.served == served and len(bad.why) == 1
        loop.remove(good)
    finally:
        bad.close()
        good.close()


def test_rings_go_to_the_loop_serving_the_fewest_and_stop_ends_every_thread() -> None:
    loops = RingLoops(2)
    rings = [_Ring(f"r{i}") for i in range(5)]
    try:
        chosen = [loops.add(r) for r in rings]
        assert [len(lp.rings) for lp in loops.loops] == [3, 2]
        assert chosen[0] is not chosen[1]                  # a device's queues land on different loops
        for r in rings:
            r.notify()
        wait_until(lambda: all(r.served >= 1 for r in rings), 5, "every ring served")
        for lp, r in zip(chosen, rings):
            lp.remove(r)
        assert not any(loops.serves(r) for r in rings)
    finally:
        loops.stop()
        for r in rings:
            r.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("blkback-loop")]
    with pytest.raises(RuntimeError):
        loops.loops[0].call(lambda: None)


def test_a_batch_served_off_the_loop_pauses_its_ring_only(loop: RingLoop) -> None:
    """offload(): the ring is not served while its worker runs (its notifications wait), the others
    are; a worker that fails gets its ring dropped and reported, like a failure on the loop."""
    gate = threading.Event()
    outcome: list[Exception] = []

    class _Waits(_Ring):
        def work(self) -> bool:
            super().work()
            if self.served == 2:
                def serve() -> None:
                    assert gate.wait(10)
                    if outcome:
                        raise outcome[0]
                loop.offload(self, serve)
            return False

    for error in (None, ValueError("disk on fire")):
        waits, other = _Waits("waits"), _Ring("other")
        gate.clear()
        outcome[:] = [error] if error else []
        try:
            loop.add(waits)
            loop.add(other)
            wait_until(lambda: waits.served == 1 and other.served == 1, 5, "the first passes")   # noqa: B023
            waits.notify()
            wait_until(lambda: waits.offloaded is not None, 5, "the batch to go to a worker")      # noqa: B023
            for n in range(2, 6):
                waits.notify()
                other.notify()
                wait_until(lambda: other.served == n, 5, "the other ring, served meanwhile")      # noqa: B023
            assert waits.served == 2                      # paused: its notifications wait
            gate.set()
            if error is None:
                wait_until(lambda: waits.served == 3, 5, "the paused ring served again")          # noqa: B023
                assert loop.serves(waits) and waits.offloaded is None and not waits.why
                loop.remove(waits)
            else:
                wait_until(lambda: waits.why, 5, "the failure to be reported")                     # noqa: B023
                assert waits.why == ["ring failed: ValueError('disk on fire')"] and not loop.serves(waits)
            loop.remove(other)
        finally:
            gate.set()
            waits.close()
            other.close()


def test_a_read_aside_leaves_its_ring_served_and_is_answered_on_the_loop(loop: RingLoop) -> None:
    """aside(): the ring is served on while the job runs; its answer runs on the loop thread, after a
    worker serving the ring's batch (offload) is done, and never once the ring was removed -- which
    waits for the job, whose buffers are the ring's."""
    read_gate, batch_gate = threading.Event(), threading.Event()
    answers: list[tuple[str, str]] = []

    class _Misses(_Ring):
        def work(self) -> bool:
            super().work()
            if self.served == 2:
                loop.aside(self, lambda: read_gate.wait(10) and "read", lambda r: answers.append(
                    (r, threading.current_thread().name)))
            if self.served == 4:
                loop.offload(self, lambda: batch_gate.wait(10))
            return False

    ring = _Misses("misses")
    try:
        loop.add(ring)
        wait_until(lambda: ring.served == 1, 5, "the first pass")
        ring.notify()
        wait_until(lambda: len(ring.aside) == 1, 5, "the read to go aside")
        ring.notify()
        wait_until(lambda: ring.served == 3, 5, "the ring served while its read waits")
        ring.notify()
        wait_until(lambda: ring.offloaded is not None, 5, "a batch to go to a worker")
        read_gate.set()
        assert not wait_until_quiet(lambda: bool(answers), 0.3), "answered while a worker serves the batch"
        batch_gate.set()
        wait_until(lambda: answers == [("read", "blkback-test-loop")], 5, "the answer, on the loop")
        assert not ring.aside and loop.serves(ring) and not ring.why
        loop.remove(ring)
    finally:
        read_gate.set()
        batch_gate.set()
        ring.close()

    # Removed while its read is pending: remove() waits for the read, and no answer comes after.
    slow = threading.Event()
    finished: list[bool] = []
    answers.clear()

    class _Pending(_Ring):
        def work(self) -> bool:
            super().work()
            if self.served == 2:
                loop.aside(self, lambda: (slow.wait(10), time.sleep(0.2), finished.append(True)),
                           lambda r: answers.append(("late", "")))
            return False

    ring2 = _Pending("pending")
    try:
        loop.add(ring2)
        wait_until(lambda: ring2.served == 1, 5, "the first pass")
        ring2.notify()
        wait_until(lambda: len(ring2.aside) == 1, 5, "the read to go aside")
        slow.set()
        loop.remove(ring2)
        assert finished == [True], "remove() returned before the read was done"
        time.sleep(0.2)
        assert answers == [], "an answer for a removed ring"
    finally:
        slow.set()
        ring2.close()


def wait_until_quiet(pred, seconds: float) -> bool:
    """True as soon as ``pred()`` holds within ``seconds``, else False."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False
