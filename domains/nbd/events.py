"""What the sans-IO protocol (``protocol.NbdServerConnection``) tells the I/O layer.

``next_event()`` returns one of these: the handshake ended (``Ready``), a
request to execute (``Request``), one the protocol answered itself with an
error (``RequestRejected``), or the end of the session, clean
(``Disconnect``) or not (``ProtocolError``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .wire import Cmd, CmdFlag

# Plain ints: an int & an IntFlag goes through enum machinery (0.35 us), once per request.
_FUA, _NO_HOLE = int(CmdFlag.FUA), int(CmdFlag.NO_HOLE)

__all__ = ["Ready", "Request", "RequestRejected", "Disconnect", "ProtocolError", "Event"]

@dataclass(frozen=True, slots=True)
class Ready:
    """Option haggling finished; the connection is in transmission phase."""
    export_name: str
    transmission_flags: int


class Request(NamedTuple):
    """A valid transmission request the caller must execute and ``reply`` to.

    ``data`` is the WRITE payload (a view of a buffer owned by this request
    alone, so it may be handed to a device and kept until completion), or
    the object ``payload_buffer`` lent for it, filled; it is ``None`` for
    every other command.  Zero-length requests never appear:
    they are answered by the protocol itself.  (A NamedTuple: one is built
    for every request, and a tuple is several times cheaper than a frozen
    dataclass.)
    """
    kind: Cmd
    handle: int
    offset: int
    length: int
    flags: int
    data: memoryview | None = None

    @property
    def fua(self) -> bool:
        return bool(self.flags & _FUA)

    @property
    def no_hole(self) -> bool:
        return bool(self.flags & _NO_HOLE)


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """Informational: a request was answered with an error by the protocol.

    The error reply is already queued in ``data_to_send()``; nothing is in
    flight for it.  Exposed so the I/O layer can log why a client failed.
    """
    handle: int
    kind: int
    error: int
    reason: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client ended the session (``NBD_CMD_DISC``, ``NBD_OPT_ABORT`` or EOF
    at a message boundary).  Requests still in flight should be completed and
    replied to before the socket is closed."""
    reason: str


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The client broke the protocol; the only recovery is a hard disconnect."""
    reason: str


Event = Ready | Request | RequestRejected | Disconnect | ProtocolError
