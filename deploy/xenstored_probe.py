"""Whether xenstored answers, asked without waiting for it.

The supervisor writes a domain's nodes with plain blocking requests
(``devices.py``), each bounded by ``XS_TIMEOUT``.  A xenstore domain that
stops answering (frozen, or compromised) would hold the supervisor's one
loop for that long at every guest that (re)connects -- requests, other
deaths and timers of the whole host waiting (4.6 s measured).  So a
domain's introduction first asks this probe: one ``XS_DIRECTORY /`` sent on
a non-blocking connection that the loop polls, and the introduction runs
once it is answered.  A probe unanswered for ``PROBE_TIMEOUT`` is given
up and asked again at the next health round; the introductions wait
meanwhile (a domain never introduced is killed at its ready deadline, as
it was when xenstored was down).  A xenstored that stops answering between
the probe's answer and the requests after it costs ``XS_TIMEOUT`` once: the
introductions left wait for its next answer (``requests_unanswered``), and
the probe is asked again only after a pause that doubles each time this
happens again (up to ``UNANSWERED_PAUSE_MAX``), so that a xenstored that
answers probes and nothing else holds the loop a few seconds a minute at
most, not one turn in two.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from xdom.domains.abi.xs_wire import Message, MessageReader, ProtocolError, XsType

__all__ = ["PROBE_TIMEOUT", "XenstoredProbe"]

log = logging.getLogger("xdom.supervisor")

#: Seconds a probe may go unanswered before xenstored is taken for one that does not answer.
PROBE_TIMEOUT = 1.0
#: Seconds the probe pauses after requests that followed its answer went unanswered: the first pause,
#: and the longest (each one twice the one before).
UNANSWERED_PAUSE = 1.0
UNANSWERED_PAUSE_MAX = 60.0
_REQ_ID = 0x7870          # any: the connection carries this one request


class XenstoredProbe:
    """One question at a time to xenstored, answered through the supervisor's poller."""

    def __init__(self, connect: Callable[[], socket.socket], watch: Callable[[int, Callable[[], None]], None],
                 unwatch: Callable[[int], None], answered: Callable[[], None]) -> None:
        """``connect``: a connected socket to xenstored, its peer checked (raises OSError); ``watch`` and
        ``unwatch``: the loop's fd handlers; ``answered``: called on the loop when xenstored answered."""
        self._connect, self._watch, self._unwatch, self._answered = connect, watch, unwatch, answered
        self._sock: socket.socket | None = None
        self._reader = MessageReader()
        self.sent_at: float | None = None
        self.silent = False                 # the last probe went unanswered: said once in the log
        self.not_before = 0.0               # no question before then (a pause after requests went unanswered)
        self._pause = 0.0

    def ask(self, now: float) -> None:
        """Send the question unless one is out already, or the probe pauses."""
        if self._sock is not None or now < self.not_before:
            return
        try:
            sock = self._connect()
        except OSError as e:
            if not self.silent:
                log.warning("xenstored probe: %s", e)
            self.silent = True
            return
        try:
            sock.setblocking(False)
            sock.send(Message(XsType.XS_DIRECTORY, _REQ_ID, 0, b"/\0").encode())
        except OSError as e:
            sock.close()
            log.warning("xenstored probe: %s", e)
            return
        self._sock, self._reader, self.sent_at = sock, MessageReader(), now
        self._watch(sock.fileno(), self._readable)

    def requests_unanswered(self, now: float) -> None:
        """Requests sent on the last answer went unanswered: pause before asking again, longer each time."""
        self._pause = min(UNANSWERED_PAUSE_MAX, max(UNANSWERED_PAUSE, 2 * self._pause))
        self.not_before = now + self._pause
        log.warning("xenstored answered the probe but not the requests after it: asked again in %gs", self._pause)

    def requests_answered(self) -> None:
        """The requests sent on the last answer were answered: no pause any more."""
        self._pause = 0.0

    def timers(self, now: float) -> None:
        """Give up a probe out for longer than ``PROBE_TIMEOUT`` (asked again by the next ``ask``)."""
        if self.sent_at is not None and now - self.sent_at > PROBE_TIMEOUT:
            if not self.silent:
                log.warning("xenstored has not answered for %gs: domains wait for it to be introduced", PROBE_TIMEOUT)
            self.silent = True
            self._close()

    def close(self) -> None:
        self._close()

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:                        # xenstored went away: its restart re-introduces everyone
            self._close()
            return
        try:
            done = any(m.req_id == _REQ_ID for m in self._reader.feed(data))
        except ProtocolError:
            done = True                     # an answer all the same, if a malformed one: it answers
        if done:
            self._close()
            if self.silent:
                log.info("xenstored answers again")
            self.silent = False
            self._answered()

    def _close(self) -> None:
        if self._sock is not None:
            self._unwatch(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self.sent_at = None
