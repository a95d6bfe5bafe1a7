"""The supervisor's control channel: how ``xdom ps/logs/restart/destroy/down`` reach a running supervisor.

A ZeroMQ ROUTER socket at ``ipc://RUN_DIR/supervisor.sock`` carrying msgpack
maps, as the broker's management API does: a request is ``{"op": NAME,
...}``, a reply ``{"ok": true, ...}`` or ``{"ok": false, "errno": NAME,
"error": text}``.

Rules:

* Every request gets exactly one reply, at once: nothing here blocks, so an
  operation that takes time (a restart) is started and the client polls
  ``info`` for its outcome.
* Anything malformed is answered with an error; a handler that raises
  something unexpected is logged and answered ``EIO``.  No request can stop
  the supervisor except ``stop``.
* :class:`ControlProtocol` is sans-IO (bytes in, bytes out): the broker's
  request convention and dispatcher (:mod:`xdom.broker.rpc`), with the
  supervisor's name; :class:`ControlServer` is the socket around it, polled
  by the supervisor's own loop; :class:`ControlClient` is the command line's side.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

import zmq

from xdom.broker.mgmt_client import RequestClient
from xdom.broker.rpc import Dispatcher, Handler, RequestError
from xdom.domains.hostsys.unix_sockets import owner_only

__all__ = ["ControlClient", "ControlError", "ControlProtocol", "ControlServer", "endpoint_for"]

log = logging.getLogger("xdom.supervisor.control")

MESSAGES_PER_TURN = 32


def endpoint_for(socket_path: str) -> str:
    return f"ipc://{socket_path}"


class ControlError(RequestError):
    """An error reply of the supervisor's: ``errno_name`` (ESRCH, EINVAL, EBUSY, ...) and a message for people."""


class ControlProtocol(Dispatcher):
    """Decodes requests, dispatches them to ``handlers[op]`` and encodes replies."""

    def __init__(self, handlers: dict[str, Handler]) -> None:
        super().__init__(handlers, server="supervisor", what="control", log=log)


def string_field(req: dict[str, Any], name: str) -> str:
    value = req.get(name)
    if not isinstance(value, str) or not value:
        raise ControlError.of(errno.EINVAL, f"field {name!r} must be a non-empty string")
    return value


class ControlServer:
    """The ROUTER socket; the supervisor registers :attr:`socket` in its poller and calls :meth:`serve`."""

    def __init__(self, endpoint: str, protocol: ControlProtocol) -> None:
        self.protocol = protocol
        self.socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        with owner_only():                  # whoever may connect may destroy any domain
            self.socket.bind(endpoint)

    def serve(self) -> None:
        """Answer what is waiting (at most a bounded batch, so the loop stays fair)."""
        for _ in range(MESSAGES_PER_TURN):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            reply = self.protocol.handle_bytes(frames[-1])
            try:
                self.socket.send_multipart([*frames[:-1], reply], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def close(self) -> None:
        self.socket.close(0)


class ControlClient(RequestClient):
    """Synchronous requests to a supervisor: ControlError for an error reply, TimeoutError for none."""

    peer = "the supervisor"
    error = ControlError
