"""How a vhost-user back end answers its front end: replies, acks, refusals and failing the connection.

The back end (``backend``) decides what each request does to its state;
this module holds the rules every request is answered by, in one place:

* A request is handled only once the actions decided before it were
  carried out (one step queue, in order).  A reply that depends on the
  shell's work is a *step* computed lazily, when its turn comes: after the
  shell mapped a region, stopped a ring, allocated an area.
* A request we cannot honour is *refused*: with NEED_REPLY set the front
  end gets a non-zero REPLY_ACK and the connection goes on; without it the
  front end would carry on believing we complied, so the connection fails
  instead (the spec: a back end "may also close the connection" on such
  errors).  A request without a reply of its own gets a zero REPLY_ACK
  when the front end asked for one.
* Failing the connection keeps the actions already decided (they carry fds
  and match the core's state), drops the deferred replies, and then
  releases everything the shell holds for us (``_teardown``); so does a
  clean close.  ``next_action`` never raises: an internal error fails the
  connection like a protocol error.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from . import wire
from .actions import Action, Closed, CloseFds, Refused, SendReply
from .spec import Request

__all__ = ["ConnectionFailed", "Step", "Conversation"]

#: What the step queue holds: an action ready to go, or one computed when its turn comes
#: (None: nothing to do after all).
Step = Action | Callable[[], Action | None]

_ACK_OK = 0
_ACK_FAIL = 1


class ConnectionFailed(Exception):
    """Raised by a handler (or a deferred step) to end the connection with this reason."""


class Conversation:
    """The request/answer discipline of one front-end connection; ``backend`` fills in the requests.

    A subclass supplies ``_handle`` (one well-formed message) and ``_teardown``
    (the actions releasing every ring, fd and mapping the shell holds for it).
    """

    def __init__(self) -> None:
        self._reader = wire.MessageReader()
        self._steps: deque[Step] = deque()
        self._closed = False

    # --- the shell's interface ----------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def receive_data(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Feed what ``recvmsg`` returned (``b""`` at EOF); the fds become the core's to route."""
        self._reader.receive_data(data, fds)

    def next_action(self) -> Action | None:
        """The next thing for the shell to do, or None when more input is needed.

        Never raises: an internal error fails the connection like a protocol error.
        """
        while True:
            if self._steps:
                step = self._steps.popleft()
                try:
                    act = step() if callable(step) else step
                except ConnectionFailed as e:
                    self._fail(str(e))
                    continue
                except Exception as exc:       # a bug must not take the shell down
                    self._fail(f"internal error: {exc!r}")
                    continue
                if act is not None:
                    return act
                continue
            if self._closed:
                stray = self._reader.take_unclaimed_fds()
                return CloseFds(fds=tuple(stray)) if stray else None
            ev = self._reader.next_event()
            if ev is None:
                return None
            try:
                self._dispatch(ev)
            except ConnectionFailed as e:
                self._fail(str(e))
            except Exception as exc:
                self._fail(f"internal error: {exc!r}")

    def close(self, reason: str = "closed by the back end") -> None:
        """End the connection from our side: release everything (actions follow)."""
        if not self._closed:
            self._steps.extend(self._teardown())
            self._steps.append(Closed(reason=reason, error=False))
            self._closed = True
            self._reader.close()

    # --- what a subclass supplies -----------------------------------------------------

    def _handle(self, msg: wire.Message) -> None:
        raise NotImplementedError

    def _teardown(self) -> list[Step]:
        raise NotImplementedError

    # --- dispatch and failure -----------------------------------------------------------

    def _dispatch(self, ev: wire.Event) -> None:
        if isinstance(ev, wire.ProtocolError):
            if ev.fds:
                self._steps.append(CloseFds(fds=ev.fds))
            raise ConnectionFailed(f"protocol error: {ev.reason}")
        if isinstance(ev, wire.EndOfStream):
            if ev.fds:
                self._steps.append(CloseFds(fds=ev.fds))
            self.close("front end closed the connection")
            return
        self._handle(ev)

    def _fail(self, reason: str) -> None:
        """End the connection because of an error.  Actions already decided stay queued (they carry
        fds and match the core's state); deferred replies are dropped; then everything is released."""
        if self._closed:
            return
        self._steps = deque(s for s in self._steps if not callable(s))
        self._steps.extend(self._teardown())
        self._steps.append(Closed(reason=reason, error=True))
        self._closed = True
        self._reader.close()

    def _drop_fds(self, msg: wire.Message) -> None:
        if msg.fds:
            self._steps.append(CloseFds(fds=msg.fds))

    # --- replies and refusals ---------------------------------------------------------

    def _reply(self, msg: wire.Message, payload: bytes, fds: tuple[int, ...] = ()) -> SendReply:
        return SendReply(data=wire.encode_reply(msg.request, payload), fds=fds)

    def _ack(self, msg: wire.Message, ok: bool = True, reason: str = "") -> None:
        """Finish a request that has no reply of its own (REPLY_ACK if asked, else a refusal fails)."""
        if not ok:
            self._refuse(msg, reason)
        elif msg.need_reply:
            self._steps.append(self._reply(msg, wire.pack_u64(_ACK_OK)))

    def _ack_later(self, msg: wire.Message, check: Callable[[], str | None]) -> None:
        """Like ``_ack`` but decided when the shell has carried out the steps queued before."""
        def step() -> Action | None:
            reason = check()
            if reason is None:
                return self._reply(msg, wire.pack_u64(_ACK_OK)) if msg.need_reply else None
            if not msg.need_reply:
                raise ConnectionFailed(f"{request_name(msg)} refused: {reason}")
            self._steps.appendleft(self._reply(msg, wire.pack_u64(_ACK_FAIL)))
            return Refused(request=int(msg.request), reason=reason)
        self._steps.append(step)

    def _refuse(self, msg: wire.Message, reason: str) -> None:
        if not msg.need_reply:
            raise ConnectionFailed(f"{request_name(msg)} refused: {reason}")
        self._steps.append(Refused(request=int(msg.request), reason=reason))
        self._steps.append(self._reply(msg, wire.pack_u64(_ACK_FAIL)))


def request_name(msg: wire.Message) -> str:
    return msg.request.name if isinstance(msg.request, Request) else f"request {msg.request}"
