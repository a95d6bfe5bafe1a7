"""The request/reply convention of xdom's management APIs, sans-IO: what a request is and how it is answered.

Three servers speak it over ZeroMQ ROUTER sockets: the broker's management
API (``broker/mgmt.py``), the supervisor's control channel
(``deploy/control.py``) and, in front of that, a host's front door
(``deploy/remote.py``).  Their clients are ``broker/mgmt_client.py``'s
``RequestClient`` and the fleet's ``HostClient`` (``deploy/fleet.py``).
The broker's side lives here because the broker may import nothing of the
layers above it, and the supervisor's may import the broker's.

Rules:

* A request is a msgpack map ``{"op": NAME, ...}`` of at most
  :data:`MAX_REQUEST` bytes, decoded with string keys only and no extension
  types; a reply is ``{"ok": true, ...}`` or ``{"ok": false, "errno": NAME,
  "error": text}``.
* Every request gets exactly one reply.  Anything malformed, an unknown
  ``op`` and a handler's :class:`RequestError` are answered with an error;
  a handler raising anything else is logged and answered ``EIO`` (a server
  may first claim the errors it knows as refusals: :meth:`Dispatcher.refusal`).
  Nothing a client sends can stop the server.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Mapping
from typing import Any, Self

import msgpack

__all__ = ["MAX_REQUEST", "Dispatcher", "Handler", "RequestError", "decode", "decode_request", "encode",
           "error_reply", "reply_of"]

MAX_REQUEST = 64 * 1024
Handler = Callable[[dict[str, Any]], dict[str, Any]]


class RequestError(Exception):
    """An error reply: ``errno_name`` (ESRCH, EINVAL, EBUSY, ...) and a message for people."""

    def __init__(self, errno_name: str, message: str) -> None:
        super().__init__(message)
        self.errno_name = errno_name
        self.message = message

    @classmethod
    def of(cls, code: int, message: str) -> Self:
        return cls(errno.errorcode.get(code, str(code)), message)

    def reply(self) -> dict[str, Any]:
        return {"ok": False, "errno": self.errno_name, "error": self.message}


def error_reply(code: int, message: str) -> dict[str, Any]:
    return {"ok": False, "errno": errno.errorcode.get(code, str(code)), "error": message}


def encode(message: dict[str, Any]) -> bytes:
    out: bytes = msgpack.packb(message, use_bin_type=True)
    return out


def decode(payload: bytes) -> object:
    """What a request's bytes hold; RequestError when they are too many (EMSGSIZE) or not msgpack (EBADMSG)."""
    if len(payload) > MAX_REQUEST:
        raise RequestError.of(errno.EMSGSIZE, f"request of {len(payload)} bytes is too large")
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True, max_ext_len=0)
    except Exception as e:
        raise RequestError.of(errno.EBADMSG, f"undecodable request: {e.__class__.__name__}") from None


def decode_request(payload: bytes) -> dict[str, Any]:
    """:func:`decode`, and the request a map (EBADMSG otherwise)."""
    req = decode(payload)
    if not isinstance(req, dict):
        raise RequestError.of(errno.EBADMSG, "a request is a map with an 'op' field")
    return req


def reply_of(data: bytes, error: Callable[[str, str], Exception], peer: str) -> dict[str, Any]:
    """A client's side: the reply in ``data``; ``error(errno_name, message)`` raised for an error reply or for
    something that is not a reply from ``peer``."""
    reply = msgpack.unpackb(data, raw=False)
    if not isinstance(reply, dict):
        raise error("EBADMSG", f"{peer} sent something that is not a reply")
    if not reply.get("ok"):
        raise error(str(reply.get("errno", "EIO")), str(reply.get("error", "")))
    return reply


class Dispatcher:
    """A server's side: decodes requests, dispatches them to ``handlers[op]`` and encodes the replies.

    ``server`` names it in the answer to a bug (``internal broker error``),
    ``what`` in the log line (``management request failed``).
    """

    def __init__(self, handlers: Mapping[str, Handler], server: str, what: str, log: logging.Logger) -> None:
        self.handlers = handlers
        self.server = server
        self.what = what
        self.log = log

    def refusal(self, e: Exception) -> dict[str, Any] | None:
        """The error reply for an exception this server knows as a refusal (None: a bug)."""
        return None

    def handle_bytes(self, payload: bytes) -> bytes:
        return encode(self.handle(payload))

    def handle(self, payload: bytes) -> dict[str, Any]:
        try:
            req = decode_request(payload)
            op = req.get("op")
            handler = self.handlers.get(op) if isinstance(op, str) else None
            if handler is None:
                raise RequestError.of(errno.ENOSYS, f"unknown operation {op!r:.40}; known: {sorted(self.handlers)}")
            return {"ok": True, **handler(req)}
        except RequestError as e:
            return e.reply()
        except Exception as e:
            refused = self.refusal(e)
            if refused is not None:
                return refused
            # a bug: report it rather than leave the caller without an answer, and keep serving
            self.log.exception("%s request failed", self.what)
            return {"ok": False, "errno": "EIO", "error": f"internal {self.server} error: {e.__class__.__name__}"}
