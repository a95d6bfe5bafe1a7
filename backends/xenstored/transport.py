"""Byte transports of xenstored connections: a unix socket, a shared ring.

Both move opaque bytes; framing is ``MessageReader``'s and semantics the
core's.  A ring is guest memory: its indices are read once, checked
(``prod - cons`` may never exceed the ring size) and only then used, as in
Xen's ``domain.c``.  A broken ring is reported through the interface's
``error`` field and ends that one connection.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from xdom.domains.abi.xs_ring import RingIndexError, ring_peek, ring_write
from xdom.domains.abi.xs_wire import (
    HEADER,
    HEADER_SIZE,
    RING_CONNECTION,
    RING_ERROR,
    RING_REQ_CONS,
    RING_REQ_OFFSET,
    RING_REQ_PROD,
    RING_RSP_CONS,
    RING_RSP_OFFSET,
    RING_RSP_PROD,
    RING_SERVER_FEATURES,
    XENSTORE_CONNECTED,
    XENSTORE_ERROR_RINGIDX,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_RECONNECT,
    XENSTORE_RING_SIZE,
    XENSTORE_SERVER_FEATURE_ERROR,
    XENSTORE_SERVER_FEATURE_RECONNECTION,
    Message,
    ProtocolError,
)


class FrameReader:
    """Bytes in, whole messages out; ``xs_wire.MessageReader``'s contract (oversized payloads raise
    ProtocolError; ``pending``/``partial`` give the incomplete message held), without copying the
    bytes of whole messages through a buffer: only an incomplete tail is kept."""

    __slots__ = ("_buf", "_max")

    def __init__(self, max_payload: int = XENSTORE_PAYLOAD_MAX, partial: bytes = b"") -> None:
        self._buf = bytes(partial)
        self._max = max_payload

    def feed(self, data: bytes) -> list[Message]:
        return [Message(*frame) for frame in self.frames(data)]

    def frames(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        """As ``feed``, each message as (type, req_id, tx_id, payload)."""
        if self._buf:
            data = self._buf + data
            self._buf = b""
        out = []
        pos, n, unpack, limit = 0, len(data), HEADER.unpack_from, self._max
        while n - pos >= HEADER_SIZE:
            type_, req_id, tx_id, length = unpack(data, pos)
            if length > limit:
                raise ProtocolError(f"payload of {length} bytes exceeds {limit}")
            start = pos + HEADER_SIZE
            end = start + length
            if end > n:
                break
            out.append((type_, req_id, tx_id, data[start:end]))
            pos = end
        if pos < n:
            self._buf = data[pos:]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)

    @property
    def partial(self) -> bytes:
        return self._buf


class TransportClosed(Exception):
    """The peer went away or broke the transport."""


class SocketTransport:
    """A connected unix stream socket (non-blocking)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self) -> bytes:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as e:
            raise TransportClosed(str(e)) from None
        if not data:
            raise TransportClosed("peer closed")
        return data

    def send(self, data: bytes | memoryview) -> int:
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as e:
            raise TransportClosed(str(e)) from None

    def close(self) -> None:
        self.sock.close()


class RingTransport:
    """``struct xenstore_domain_interface`` in a mapped page; we are the server side.

    Requests are read with a private cursor and the shared ``req_cons`` is
    only advanced by ``commit()``, which the server calls once what it read
    is handled and persisted: a request xenstored took off the ring is
    never lost to a SIGKILL.  ``page`` is a writable memoryview of the
    guest's ring page; ``notify`` raises the event channel to the guest.
    """

    def __init__(self, page: memoryview, notify: Callable[[], None]) -> None:
        self.page = page
        self.notify = notify
        self.cursor = self._get(RING_REQ_CONS)
        self._set(RING_SERVER_FEATURES, XENSTORE_SERVER_FEATURE_RECONNECTION | XENSTORE_SERVER_FEATURE_ERROR)

    def _get(self, off: int) -> int:
        # One aligned load: struct's standard formats read byte by byte and could tear.
        return self.page[off:off + 4].cast("I")[0]

    def _set(self, off: int, value: int) -> None:
        # One aligned store: struct.pack_into zeroes the field first, and the guest may read it then.
        self.page[off:off + 4].cast("I")[0] = value & 0xFFFFFFFF

    def _fail(self, why: str) -> TransportClosed:
        self._set(RING_ERROR, XENSTORE_ERROR_RINGIDX)
        self.notify()
        return TransportClosed(why)

    def reconnect_requested(self) -> bool:
        return self._get(RING_CONNECTION) == XENSTORE_RECONNECT

    def reset(self) -> None:
        """The guest asked to reconnect: empty both rings and say we are back."""
        for off in (RING_REQ_CONS, RING_REQ_PROD, RING_RSP_CONS, RING_RSP_PROD, RING_ERROR):
            self._set(off, 0)
        self.cursor = 0
        self._set(RING_CONNECTION, XENSTORE_CONNECTED)
        self.notify()

    @property
    def rsp_prod(self) -> int:
        return self._get(RING_RSP_PROD)

    def resume_at(self, cons: int) -> None:
        """After a restart: everything before ``cons`` was handled already."""
        committed = self._get(RING_REQ_CONS)
        prod = self._get(RING_REQ_PROD)
        # only move forward, and never past what the guest produced
        if ((cons - committed) & 0xFFFFFFFF) <= ((prod - committed) & 0xFFFFFFFF):
            self.cursor = cons
            self.commit()

    def recv(self) -> bytes:
        committed = self._get(RING_REQ_CONS)
        if ((self.cursor - committed) & 0xFFFFFFFF) > XENSTORE_RING_SIZE:
            raise self._fail("request ring consumer index moved under us")
        try:
            data, self.cursor = ring_peek(self.page, RING_REQ_OFFSET, self.cursor, RING_REQ_PROD)
        except RingIndexError as e:
            raise self._fail(f"request ring: {e}") from None
        if ((self.cursor - committed) & 0xFFFFFFFF) > XENSTORE_RING_SIZE:
            raise self._fail("request ring producer index jumped")
        return data

    def commit(self, notify: bool = True) -> bool:
        """Free what was read for the guest (after it is handled and persisted).  The guest may be
        waiting for room: it is notified, unless ``notify`` is False (the caller does it, with the
        replies).  Returns whether anything was freed."""
        if self._get(RING_REQ_CONS) != self.cursor:
            self._set(RING_REQ_CONS, self.cursor)
            if notify:
                self.notify()
            return True
        return False

    def send(self, data: bytes | memoryview) -> int:
        try:
            n = ring_write(self.page, RING_RSP_OFFSET, RING_RSP_CONS, RING_RSP_PROD, data)
        except RingIndexError as e:
            raise self._fail(f"response ring: {e}") from None
        if n:
            self.notify()
        return n

    def close(self) -> None:
        self.page = memoryview(b"")
