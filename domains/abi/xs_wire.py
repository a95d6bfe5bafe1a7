"""xen/include/public/io/xs_wire.h: the xenstore wire protocol, sans-IO.

A message is a 16-byte header (type, req_id, tx_id, len; little-endian
u32s) followed by ``len`` bytes of payload, at most XENSTORE_PAYLOAD_MAX.
Errors travel as XS_ERROR with the errno's *name* ("ENOENT\\0"); success
with no data is "OK\\0".  The same framing runs over a unix socket and over
the two 1024-byte rings of ``struct xenstore_domain_interface``.

``MessageReader`` turns a byte stream into messages and refuses oversized
ones; it never touches a socket.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

HEADER: Final = struct.Struct("<IIII")
HEADER_SIZE: Final = HEADER.size    # 16
XENSTORE_PAYLOAD_MAX: Final = 4096
XENSTORE_ABS_PATH_MAX: Final = 3072
XENSTORE_REL_PATH_MAX: Final = 2048

# struct xenstore_domain_interface
XENSTORE_RING_SIZE: Final = 1024
RING_REQ_OFFSET: Final = 0
RING_RSP_OFFSET: Final = 1024
RING_REQ_CONS: Final = 2048
RING_REQ_PROD: Final = 2052
RING_RSP_CONS: Final = 2056
RING_RSP_PROD: Final = 2060
RING_SERVER_FEATURES: Final = 2064
RING_CONNECTION: Final = 2068
RING_ERROR: Final = 2072
XENSTORE_SERVER_FEATURE_RECONNECTION: Final = 1
XENSTORE_SERVER_FEATURE_ERROR: Final = 2
XENSTORE_CONNECTED: Final = 0
XENSTORE_RECONNECT: Final = 1
XENSTORE_ERROR_NONE: Final = 0
XENSTORE_ERROR_COMM: Final = 1
XENSTORE_ERROR_RINGIDX: Final = 2
XENSTORE_ERROR_PROTO: Final = 3


class XsType(enum.IntEnum):
    XS_CONTROL = 0
    XS_DIRECTORY = 1
    XS_READ = 2
    XS_GET_PERMS = 3
    XS_WATCH = 4
    XS_UNWATCH = 5
    XS_TRANSACTION_START = 6
    XS_TRANSACTION_END = 7
    XS_INTRODUCE = 8
    XS_RELEASE = 9
    XS_GET_DOMAIN_PATH = 10
    XS_WRITE = 11
    XS_MKDIR = 12
    XS_RM = 13
    XS_SET_PERMS = 14
    XS_WATCH_EVENT = 15
    XS_ERROR = 16
    XS_IS_DOMAIN_INTRODUCED = 17
    XS_RESUME = 18
    XS_SET_TARGET = 19
    # 20 was XS_RESTRICT, removed
    XS_RESET_WATCHES = 21
    XS_DIRECTORY_PART = 22
    # Xen 4.18+ (not in 4.17's header)
    XS_GET_FEATURE = 23
    XS_SET_FEATURE = 24
    XS_GET_QUOTA = 25
    XS_SET_QUOTA = 26


XS_DEBUG: Final = XsType.XS_CONTROL
XS_INVALID: Final = 0xFFFF
XS_WATCH_PATH: Final = 0
XS_WATCH_TOKEN: Final = 1

# xsd_errors[], in Xen's order (new ones are appended there, never inserted)
XSD_ERRORS: Final = ("EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
                     "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM")


class XenstoreError(Exception):
    """A request failed; ``name`` is one of XSD_ERRORS and goes on the wire."""

    def __init__(self, name: str, message: str = "") -> None:
        if name not in XSD_ERRORS:
            raise ValueError(f"{name} is not a xenstore error")
        super().__init__(f"{name}: {message}" if message else name)
        self.name = name


class ProtocolError(Exception):
    """The byte stream cannot be framed (oversized payload): end the connection."""


@dataclass(frozen=True, slots=True)
class Message:
    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        return HEADER.pack(self.type, self.req_id, self.tx_id, len(self.payload)) + self.payload

    def reply(self, payload: bytes) -> Message:
        return Message(self.type, self.req_id, self.tx_id, payload)

    def error(self, name: str) -> Message:
        return Message(XsType.XS_ERROR, self.req_id, self.tx_id, name.encode() + b"\0")

    @property
    def error_name(self) -> str | None:
        if self.type != XsType.XS_ERROR:
            return None
        return self.payload.rstrip(b"\0").decode(errors="replace")


def watch_event(path: bytes, token: bytes) -> Message:
    return Message(XsType.XS_WATCH_EVENT, 0, 0, path + b"\0" + token + b"\0")


class MessageReader:
    """Bytes in, whole messages out.  Oversized payloads raise ProtocolError."""

    def __init__(self, max_payload: int = XENSTORE_PAYLOAD_MAX, partial: bytes = b"") -> None:
        self._buf = bytearray(partial)
        self._max = max_payload

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out = []
        while len(self._buf) >= HEADER_SIZE:
            type_, req_id, tx_id, length = HEADER.unpack_from(self._buf)
            if length > self._max:
                raise ProtocolError(f"payload of {length} bytes exceeds {self._max}")
            if len(self._buf) < HEADER_SIZE + length:
                break
            payload = bytes(self._buf[HEADER_SIZE:HEADER_SIZE + length])
            del self._buf[:HEADER_SIZE + length]
            out.append(Message(type_, req_id, tx_id, payload))
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held."""
        return len(self._buf)

    @property
    def partial(self) -> bytes:
        """The incomplete message held (to persist a connection)."""
        return bytes(self._buf)


def split_strings(payload: bytes) -> list[bytes]:
    """Payload fields: NUL-separated strings; a trailing NUL ends the last one."""
    if payload.endswith(b"\0"):
        payload = payload[:-1]
    return payload.split(b"\0") if payload else [b""]
