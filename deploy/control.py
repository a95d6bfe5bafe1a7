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
* :class:`ControlProtocol` is sans-IO (bytes in, bytes out);
  :class:`ControlServer` is the socket around it, polled by the supervisor's
  own loop; :class:`ControlClient` is the command line's side.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from xdom.broker.mgmt_client import RequestClient

__all__ = ["MAX_REQUEST", "ControlClient", "ControlError", "ControlProtocol", "ControlServer", "endpoint_for"]

log = logging.getLogger("xdom.supervisor.control")

MAX_REQUEST = 64 * 1024
MESSAGES_PER_TURN = 32
Handler = Callable[[dict[str, Any]], dict[str, Any]]


def endpoint_for(socket_path: str) -> str:
    return f"ipc://{socket_path}"


class ControlError(Exception):
    """An error reply: ``errno_name`` (ESRCH, EINVAL, EBUSY, ...) and a message for people."""

    def __init__(self, errno_name: str, message: str) -> None:
        super().__init__(message)
        self.errno_name = errno_name
        self.message = message

    @classmethod
    def of(cls, code: int, message: str) -> ControlError:
        return cls(errno.errorcode.get(code, str(code)), message)


class ControlProtocol:
    """Decodes requests, dispatches them to ``handlers[op]`` and encodes replies."""

    def __init__(self, handlers: dict[str, Handler]) -> None:
        self.handlers = handlers

    def handle_bytes(self, payload: bytes) -> bytes:
        return msgpack.packb(self.handle(payload), use_bin_type=True)

    def handle(self, payload: bytes) -> dict[str, Any]:
        try:
            if len(payload) > MAX_REQUEST:
                raise ControlError.of(errno.EMSGSIZE, f"request of {len(payload)} bytes is too large")
            try:
                req = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_ext_len=0)
            except Exception as e:
                raise ControlError.of(errno.EBADMSG, f"undecodable request: {e.__class__.__name__}") from None
            if not isinstance(req, dict):
                raise ControlError.of(errno.EBADMSG, "a request is a map with an 'op' field")
            op = req.get("op")
            handler = self.handlers.get(op) if isinstance(op, str) else None
            if handler is None:
                raise ControlError.of(errno.ENOSYS, f"unknown operation {op!r:.40}; known: {sorted(self.handlers)}")
            return {"ok": True, **handler(req)}
        except ControlError as e:
            return {"ok": False, "errno": e.errno_name, "error": e.message}
        except Exception as e:   # a bug: report it, keep supervising
            log.exception("control request failed")
            return {"ok": False, "errno": "EIO", "error": f"internal supervisor error: {e.__class__.__name__}"}


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
