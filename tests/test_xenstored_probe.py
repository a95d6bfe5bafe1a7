"""The supervisor's question to xenstored (deploy/xenstored_probe.py): answered through a poller, never waited on.

A real xenstored answers it; a socket whose server never reads (what a frozen xenstored is to a client)
gets it given up after PROBE_TIMEOUT, without anything blocking, and asked again after.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable

from xs_fixtures import Xenstored

from xdom.deploy.xenstored_probe import PROBE_TIMEOUT, UNANSWERED_PAUSE, UNANSWERED_PAUSE_MAX, XenstoredProbe


class _Loop:
    """The supervisor's fd handlers, as a poll loop the test turns."""

    def __init__(self) -> None:
        self.handlers: dict[int, Callable[[], None]] = {}

    def watch(self, fd: int, handler: Callable[[], None]) -> None:
        self.handlers[fd] = handler

    def unwatch(self, fd: int) -> None:
        self.handlers.pop(fd, None)

    def turn(self, timeout: float) -> None:
        ready, _, _ = select.select(list(self.handlers), [], [], timeout)
        for fd in ready:
            self.handlers[fd]()


def _connector(path: str) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.connect(path)
        return s
    return connect


def test_a_xenstored_that_answers_is_told_through_the_loop(xenstored: Xenstored) -> None:
    loop, answers = _Loop(), []
    probe = XenstoredProbe(_connector(xenstored.socket_path), loop.watch, loop.unwatch, lambda: answers.append(1))
    probe.ask(time.monotonic())
    probe.ask(time.monotonic())                       # one question at a time
    assert len(loop.handlers) == 1 and answers == []
    deadline = time.monotonic() + 5
    while not answers and time.monotonic() < deadline:
        loop.turn(0.1)
    assert answers == [1] and loop.handlers == {} and probe.sent_at is None and not probe.silent


def test_a_xenstored_that_never_answers_costs_no_wait(run_dir: str) -> None:
    path = os.path.join(run_dir, "frozen.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)                                  # accepts into the backlog, never reads: frozen
    try:
        loop, answers = _Loop(), []
        probe = XenstoredProbe(_connector(path), loop.watch, loop.unwatch, lambda: answers.append(1))
        t0 = time.monotonic()
        probe.ask(t0)
        assert time.monotonic() - t0 < 0.5           # sending did not wait for the server
        loop.turn(0.2)
        probe.timers(t0 + PROBE_TIMEOUT / 2)
        assert probe.sent_at == t0 and not probe.silent
        probe.timers(t0 + PROBE_TIMEOUT + 0.01)
        assert probe.sent_at is None and probe.silent and loop.handlers == {} and answers == []
        probe.ask(time.monotonic())                   # asked again at the next round
        assert probe.sent_at is not None
        probe.close()
        assert loop.handlers == {}
    finally:
        server.close()


def test_requests_unanswered_after_an_answer_pause_the_probe_longer_each_time(xenstored: Xenstored) -> None:
    """A xenstored that answers the probe but not what follows: each time, the next question waits
    twice as long (up to a bound); requests answered again end the pauses."""
    loop, answers = _Loop(), []
    probe = XenstoredProbe(_connector(xenstored.socket_path), loop.watch, loop.unwatch, lambda: answers.append(1))
    now = time.monotonic()
    pauses = []
    for _ in range(10):
        probe.requests_unanswered(now)
        pauses.append(probe.not_before - now)
        probe.ask(probe.not_before - 0.01)            # still pausing: nothing sent
        assert probe.sent_at is None and loop.handlers == {}
    assert pauses[0] == UNANSWERED_PAUSE and pauses[1] == 2 * UNANSWERED_PAUSE
    assert pauses == sorted(pauses) and pauses[-1] == UNANSWERED_PAUSE_MAX
    probe.ask(probe.not_before)                        # the pause is over: asked, and answered
    deadline = time.monotonic() + 5
    while not answers and time.monotonic() < deadline:
        loop.turn(0.1)
    assert answers == [1]
    probe.requests_answered()
    probe.requests_unanswered(now)
    assert probe.not_before - now == UNANSWERED_PAUSE  # back to the first pause
