"""Sans-IO NBD server protocol: fixed newstyle handshake and simple replies.

This module owns every byte of the NBD wire format and nothing else: no
sockets, no threads, no clocks (the h11/wsproto style).  The I/O layer
(``server.py``) feeds it what the client sent, asks it for parsed events, and
writes out what it produces.  Keeping it pure is what lets the tests replay a
hostile client byte by byte, split at any boundary, without a socket.

Wire format: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md

What a server built on it offers:

* handshake: fixed newstyle with ``NBD_FLAG_NO_ZEROES``; options
  ``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_INFO``/``NBD_OPT_GO`` (``NBD_INFO_EXPORT``,
  ``NBD_INFO_BLOCK_SIZE`` always, ``NBD_INFO_NAME`` on request),
  ``NBD_OPT_LIST`` and ``NBD_OPT_ABORT``.  Everything else -- structured
  replies, TLS, metadata contexts, extended headers -- is answered
  ``NBD_REP_ERR_UNSUP``, which every client must accept and fall back from.
* transmission: ``READ``, ``WRITE`` (with ``FUA``), ``FLUSH``, ``TRIM`` and
  ``WRITE_ZEROES`` (with ``NO_HOLE``), ``DISC``; simple replies only.

Receiving.  Two equivalent ways to feed bytes in:

* ``receive_data(data)`` -- copy semantics, convenient for tests;
* ``get_buffer()`` then ``commit(nbytes)`` -- the caller ``recv_into()``\\ s the
  returned view.  While a WRITE payload (or option data) is being received
  the view *is* the request's own buffer, so a large payload lands in one
  ``bytearray`` with no concatenation; at most one scratch buffer's worth
  (``RECV_SCRATCH_SIZE``) that arrived together with the header is copied.

A WRITE payload that has not arrived with its header may instead go
straight into memory the caller lends: ``payload_buffer(offset, length)``
(a constructor argument) returns an object with ``views`` (writable buffers
totalling ``length`` bytes) and ``release()``, or None.  ``get_buffers()``
then offers those views for one ``recvmsg_into``, the Request carries the
object as its ``data``, and if the payload never completes (EOF, a protocol
error, ``close()``) the object is ``release()``\\ d.

Either way the object holds at most one partially received message: a
request header, one WRITE payload (<= the maximum block size) or one option
(<= ``MAX_OPTION_DATA``).  Anything larger is skipped without being buffered
and answered with an error.  Garbage from the peer never raises; it ends in a
``ProtocolError`` event, after which the connection must be dropped.

Replying.  ``reply(handle, errno, data)`` returns the list of buffers (16-byte
header, then the READ data buffers untouched) so the caller can hand them to
``sendmsg`` without concatenating.  Replies the protocol can decide alone
(invalid requests, zero-length no-ops, the whole handshake) are queued in
``data_to_send()``.

Threading: the object is not thread-safe; the caller serialises every call
(the server does so with one lock per connection).  ``reply`` is cheap and
never touches the receive side, so that lock is held only briefly.
"""

from __future__ import annotations

import enum
import errno as _errno
import operator
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "NBDMAGIC", "IHAVEOPT", "OPTION_REPLY_MAGIC", "REQUEST_MAGIC", "SIMPLE_REPLY_MAGIC",
    "FLAG_FIXED_NEWSTYLE", "FLAG_NO_ZEROES", "FLAG_C_FIXED_NEWSTYLE", "FLAG_C_NO_ZEROES",
    "TransmissionFlag", "Opt", "Rep", "Info", "Cmd", "CmdFlag", "NbdErr",
    "MAX_BLOCK_SIZE", "MAX_STRING", "MAX_OPTION_DATA", "RECV_SCRATCH_SIZE",
    "Ready", "Request", "RequestRejected", "Disconnect", "ProtocolError", "Event",
    "NbdServerConnection", "nbd_error",
]

# --- magic numbers ----------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943           # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054           # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# --- handshake flags ----------------------------------------------------------

FLAG_FIXED_NEWSTYLE = 1 << 0            # server -> client (16 bits)
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0          # client -> server (32 bits)
FLAG_C_NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class NbdErr(enum.IntEnum):
    """The only error values the wire may carry; they are not host errnos."""
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# --- limits -----------------------------------------------------------------

#: Largest READ/WRITE/WRITE_ZEROES we accept: the size every client is told it
#: may rely on (2**25), and what we advertise as the maximum block size.
MAX_BLOCK_SIZE = 32 * 1024 * 1024
#: The spec's hard limit on any string (export names, messages).
MAX_STRING = 4096
#: Largest option payload we buffer (GO/INFO: name + info requests).  Longer
#: known options are skipped unbuffered and answered NBD_REP_ERR_TOO_BIG.
MAX_OPTION_DATA = 16 * 1024
#: Size of the scratch buffer ``get_buffer`` offers between payloads: big
#: enough to pick up many pipelined request headers per recv.
RECV_SCRATCH_SIZE = 16 * 1024

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_CLIENT_FLAGS = _U32
_OPT_HEADER = struct.Struct(">QII")          # magic, option, length
_OPT_REPLY = struct.Struct(">QIII")          # magic, option, type, length
_REQUEST = struct.Struct(">IHHQQI")          # magic, flags, type, handle, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")        # magic, error, handle
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")

# Host errno -> wire error.  The spec asks EDQUOT/EFBIG to be reported as
# ENOSPC; EROFS/EACCES are permission failures to a client.  Anything without
# a wire equivalent becomes EIO, the one error every client treats as "the
# device failed".
_ERRNO_TO_NBD = {
    _errno.EPERM: NbdErr.EPERM,
    _errno.EACCES: NbdErr.EPERM,
    _errno.EROFS: NbdErr.EPERM,
    _errno.EIO: NbdErr.EIO,
    _errno.ENOMEM: NbdErr.ENOMEM,
    _errno.EINVAL: NbdErr.EINVAL,
    _errno.ENOSPC: NbdErr.ENOSPC,
    _errno.EDQUOT: NbdErr.ENOSPC,
    _errno.EFBIG: NbdErr.ENOSPC,
    _errno.EOVERFLOW: NbdErr.EOVERFLOW,
    _errno.ENOTSUP: NbdErr.ENOTSUP,
    _errno.EOPNOTSUPP: NbdErr.ENOTSUP,
    _errno.ESHUTDOWN: NbdErr.ESHUTDOWN,
}


_ERRNO_TO_WIRE = {k: int(v) for k, v in _ERRNO_TO_NBD.items()}
_WIRE_EIO = int(NbdErr.EIO)


def nbd_error(err: int) -> int:
    """Map a host errno (0 = success) to the value the NBD wire allows."""
    if err == 0:
        return 0
    return _ERRNO_TO_WIRE.get(err, _WIRE_EIO)


def _nbytes(b: Buffer) -> int:
    return len(b) if type(b) is bytes or type(b) is bytearray else memoryview(b).nbytes


# --- events -----------------------------------------------------------------

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
        return bool(self.flags & CmdFlag.FUA)

    @property
    def no_hole(self) -> bool:
        return bool(self.flags & CmdFlag.NO_HOLE)


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

Buffer = bytes | bytearray | memoryview


class _State(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPT_HEADER = "option-header"
    REQ_HEADER = "request-header"
    BODY = "body"              # option data or WRITE payload, into self._body
    DISCARD = "discard"        # skipping bytes we will not buffer
    DONE = "done"              # terminal: input is ignored


_TARGET_SCRATCH = 1
_TARGET_BODY = 2
_TARGET_DISCARD = 3
_TARGET_PAYLOAD = 4


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class NbdServerConnection:
    """Server side of one NBD connection, as a pure state machine.

    The greeting is queued at construction: call ``data_to_send()`` first.
    """

    def __init__(
        self,
        size: int,
        *,
        sector_size: int = 512,
        export_name: str = "",
        read_only: bool = False,
        can_flush: bool = True,
        can_trim: bool = False,
        can_write_zeroes: bool = False,
        can_multi_conn: bool = False,
        max_block_size: int = MAX_BLOCK_SIZE,
        payload_buffer: Callable[[int, int], Any] | None = None,
    ) -> None:
        if not 0 <= size < 1 << 63:
            raise ValueError(f"export size {size} out of range")
        # The spec caps the minimum block size at 64 KiB and wants powers of 2.
        if not (_is_pow2(sector_size) and sector_size <= 65536):
            raise ValueError(f"sector size {sector_size} must be a power of 2 <= 65536")
        if max_block_size % sector_size or not sector_size <= max_block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"max block size {max_block_size} must be a multiple of the sector size"
                             f" and at most {MAX_BLOCK_SIZE}")
        name = export_name.encode("utf-8")
        if len(name) > MAX_STRING or b"\0" in name:
            raise ValueError("export name must be at most 4096 bytes of NUL-free UTF-8")
        self._size = size
        self._export_name = export_name
        self._name_bytes = name
        self._read_only = read_only
        self._can_flush = can_flush
        self._can_trim = can_trim and not read_only
        self._can_write_zeroes = can_write_zeroes and not read_only
        self._min_block = sector_size
        self._pref_block = max(4096, sector_size)
        self._max_block = max_block_size

        tf = TransmissionFlag.HAS_FLAGS
        if read_only:
            tf |= TransmissionFlag.READ_ONLY
        if can_flush:
            # FUA is implemented as "write, then flush" where the device has no
            # native FUA, so it is only honest to offer it with a flush.
            tf |= TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
        if self._can_trim:
            tf |= TransmissionFlag.SEND_TRIM
        if self._can_write_zeroes:
            tf |= TransmissionFlag.SEND_WRITE_ZEROES
        if can_multi_conn:
            tf |= TransmissionFlag.CAN_MULTI_CONN
        self._tflags = int(tf)
        # What the fast path of ``next_event`` checks a READ/WRITE header against (the general path,
        # ``_begin_request``, handles everything else, errors included).
        self._rw_flags = int(CmdFlag.FUA) if tf & TransmissionFlag.SEND_FUA else 0
        self._align_mask = sector_size - 1

        self._out = bytearray(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        self._in = bytearray()
        self._inpos = 0
        self._scratch = bytearray(RECV_SCRATCH_SIZE)
        self._rx_target = 0
        self._eof = False
        self._state = _State.CLIENT_FLAGS
        self._no_zeroes = False
        self._events: deque[Event] = deque()
        # Current BODY / DISCARD continuation.
        self._body = bytearray()
        self._body_fill = 0
        self._discard_left = 0
        # A WRITE payload received into memory the caller lends (``payload_buffer``): the lender's
        # object, the views still to fill (from _pidx on) and how many bytes they take.
        self._payload_buffer = payload_buffer
        self._payload: Any = None
        self._pviews: list[memoryview] = []
        self._pidx = 0
        self._pleft = 0
        self._then: Callable[..., None] = _noop
        self._after: _State = _State.DONE
        # handle -> FIFO (a list: almost always one entry) of (kind, length) for requests handed out, not replied.
        self._pending: dict[int, list[tuple[Cmd, int]]] = {}
        self._in_flight = 0
        self._transmission = False

    @classmethod
    def for_device(cls, device: Any, export_name: str = "",
                   payload_buffer: Callable[[int, int], Any] | None = None) -> NbdServerConnection:
        """Build from anything with the ``BlockDevice`` attributes."""
        return cls(
            int(device.size),
            sector_size=int(device.sector_size),
            export_name=export_name,
            read_only=bool(device.read_only),
            can_flush=bool(device.can_flush),
            can_trim=bool(device.can_trim),
            can_write_zeroes=bool(device.can_write_zeroes),
            can_multi_conn=bool(device.can_multi_conn),
            payload_buffer=payload_buffer,
        )

    # --- introspection --------------------------------------------------------

    @property
    def transmission_flags(self) -> int:
        return self._tflags

    @property
    def block_sizes(self) -> tuple[int, int, int]:
        """(minimum, preferred, maximum) as advertised in NBD_INFO_BLOCK_SIZE."""
        return self._min_block, self._pref_block, self._max_block

    @property
    def in_transmission(self) -> bool:
        """True once option haggling has ended successfully."""
        return self._transmission

    @property
    def closed(self) -> bool:
        """True once a Disconnect or ProtocolError has been produced."""
        return self._state is _State.DONE

    @property
    def in_flight(self) -> int:
        """Requests handed out as ``Request`` events and not yet replied to."""
        return self._in_flight

    @property
    def buffered(self) -> int:
        """Bytes held for the peer's input: unparsed bytes plus the buffer of
        the message being received.  Once ``next_event()`` has returned
        ``None`` this is at most one header plus one payload, whatever the
        client sends -- the bound the I/O layer's memory use rests on."""
        return len(self._in) - self._inpos + len(self._body) + self._pleft

    # --- receiving ------------------------------------------------------------

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes from the client; ``b""`` means the client closed (EOF)."""
        if self._state is _State.DONE:
            return
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("receive_data after EOF")
        self._in += data

    def get_buffer(self) -> memoryview:
        """A writable view to ``recv_into``; report the count with ``commit``.

        Only valid once ``next_event()`` has returned ``None`` (all buffered
        input consumed) -- otherwise bytes would land out of order, so a
        scratch buffer is returned instead, which is always safe.
        """
        # Never hand out an empty view: recv_into() would return 0, which
        # reads as EOF.
        if self._inpos == len(self._in) and not self._eof:
            if self._pleft and self._state is _State.BODY:
                self._rx_target = _TARGET_PAYLOAD
                return self._pviews[self._pidx]
            if self._state is _State.BODY and self._body_fill < len(self._body):
                self._rx_target = _TARGET_BODY
                return memoryview(self._body)[self._body_fill:]
            if self._state is _State.DISCARD and self._discard_left:
                self._rx_target = _TARGET_DISCARD
                return memoryview(self._scratch)[:min(self._discard_left, len(self._scratch))]
        self._rx_target = _TARGET_SCRATCH
        return memoryview(self._scratch)

    def get_buffers(self, limit: int = 1024) -> list[memoryview]:
        """``get_buffer()``, or several views (at most ``limit``) to ``recvmsg_into`` at once
        while a payload is received into lent memory of several pieces; ``commit`` the total."""
        if self._pleft and self._state is _State.BODY and self._inpos == len(self._in) and not self._eof:
            self._rx_target = _TARGET_PAYLOAD
            return self._pviews[self._pidx:self._pidx + limit]
        return [self.get_buffer()]

    def commit(self, nbytes: int) -> None:
        """Account for ``nbytes`` received into the last ``get_buffer()`` view (or
        ``get_buffers()`` views); 0 means EOF, as from ``recv``."""
        target, self._rx_target = self._rx_target, 0
        if not target:
            raise RuntimeError("commit without get_buffer")
        if nbytes < 0:
            raise ValueError("negative byte count")
        if nbytes == 0:
            self._eof = True
            return
        if self._state is _State.DONE:
            return
        if target == _TARGET_BODY:
            if nbytes > len(self._body) - self._body_fill:
                raise ValueError("commit beyond the buffer")
            self._body_fill += nbytes
        elif target == _TARGET_PAYLOAD:
            if nbytes > self._pleft:
                raise ValueError("commit beyond the buffer")
            self._payload_filled(nbytes)
        elif target == _TARGET_DISCARD:
            if nbytes > self._discard_left:
                raise ValueError("commit beyond the buffer")
            self._discard_left -= nbytes
        else:
            if nbytes > len(self._scratch):
                raise ValueError("commit beyond the buffer")
            self._in += memoryview(self._scratch)[:nbytes]

    def next_event(self) -> Event | None:
        """The next event, or ``None`` when more input is needed (or the
        connection is closed and everything has been reported)."""
        if not self._events and self._state is _State.REQ_HEADER:
            req = self._fast_request()
            if req is not None:
                return req
        while not self._events:
            try:
                progressed = self._advance()
            except Exception as exc:  # a bug here must not kill the I/O layer
                self._fail(f"internal error: {exc!r}")
                break
            if not progressed:
                return None
        return self._events.popleft()

    def next_events(self) -> list[Event]:
        """Every event the input buffered so far makes: ``next_event()`` until it returns None, in one
        call (the common READ/WRITE requests are parsed in one loop)."""
        out: list[Event] = []
        while True:
            if not self._events and self._state is _State.REQ_HEADER:
                out += self._fast_requests(1 << 30)
            ev = self.next_event()
            if ev is None:
                return out
            out.append(ev)

    # --- sending --------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes the protocol produced on its own (handshake, rejections)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def reply(self, handle: int, error: int, data: Buffer | Sequence[Buffer] = b"") -> list[Buffer]:
        """Complete an in-flight request; returns the buffers to send, in order.

        ``error`` is a host errno (mapped with ``nbd_error``).  For a
        successful READ, ``data`` (one buffer or a sequence of them) must
        total exactly the requested length; it is returned as-is after the
        header so it can go to ``sendmsg`` without a copy.  Other commands
        take no data.  Raises ``ValueError`` on a reply the client cannot
        parse: unknown handle or wrong data length.  Requests sharing a
        handle (which clients should not do) are completed in FIFO order.
        """
        queue = self._pending.get(handle)
        if not queue:
            raise ValueError(f"no request with handle {handle:#x} is in flight")
        kind, length = queue[0]
        err = _ERRNO_TO_WIRE.get(error, _WIRE_EIO) if error else 0
        if isinstance(data, (bytes, bytearray, memoryview)):
            data_list: Sequence[Buffer] = (data,)
        else:
            data_list = data
        bufs: list[Buffer] = [_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, handle)]
        if err == 0 and kind is Cmd.READ:
            sizes = [b.nbytes if type(b) is memoryview else _nbytes(b) for b in data_list]
            total = sum(sizes)
            if 0 in sizes:
                bufs += [b for b, n in zip(data_list, sizes) if n]
            else:
                bufs += data_list
            if total != length:
                raise ValueError(f"READ reply carries {total} bytes, {length} requested")
        elif kind is not Cmd.READ and any(_nbytes(b) for b in data_list):
            raise ValueError(f"{kind.name} replies carry no data")
        if len(queue) == 1:
            del self._pending[handle]
        else:
            queue.pop(0)
        self._in_flight -= 1
        return bufs

    def reply_many(self, replies: Sequence[tuple[int, int, Buffer | Sequence[Buffer]]]) -> list[Buffer]:
        """``reply`` for each ``(handle, error, data)``, in order: all their buffers, for one send.

        Raises ``ValueError`` as ``reply`` does, at the first bad one (the replies before it are
        done and their buffers lost: the caller can only drop the connection then)."""
        out: list[Buffer] = []
        pending = self._pending
        pack = _SIMPLE_REPLY.pack
        for handle, error, data in replies:
            queue = pending.get(handle)
            if queue and len(queue) == 1 and not error:
                kind, length = queue[0]
                if kind is _CMD_READ:
                    # The common success: one READ buffer of exactly the length asked for.
                    if type(data) is bytes and len(data) == length:
                        del pending[handle]
                        self._in_flight -= 1
                        out.append(pack(SIMPLE_REPLY_MAGIC, 0, handle))
                        out.append(data)
                        continue
                elif not data:
                    del pending[handle]
                    self._in_flight -= 1
                    out.append(pack(SIMPLE_REPLY_MAGIC, 0, handle))
                    continue
            out += self.reply(handle, error, data)
        return out

    # --- state machine --------------------------------------------------------

    def _avail(self) -> int:
        return len(self._in) - self._inpos

    def _take(self, n: int) -> bytes | None:
        if self._avail() < n:
            return None
        b = bytes(self._in[self._inpos:self._inpos + n])
        self._inpos += n
        self._compact()
        return b

    def _compact(self) -> None:
        # Amortised: only shift when the consumed prefix dominates the buffer.
        if self._inpos == len(self._in):
            self._in.clear()
            self._inpos = 0
        elif self._inpos >= 4096 and self._inpos * 2 >= len(self._in):
            del self._in[:self._inpos]
            self._inpos = 0

    def _advance(self) -> bool:
        """Make one step of progress; False if stuck waiting for input."""
        st = self._state
        if st is _State.DONE:
            return False
        if st is _State.BODY and self._payload is not None:
            n = min(self._pleft, self._avail())
            if n:
                src = memoryview(self._in)[self._inpos:self._inpos + n]
                at, idx = 0, self._pidx
                while at < n:
                    v = self._pviews[idx]
                    k = min(len(v), n - at)
                    v[:k] = src[at:at + k]
                    at += k
                    idx += 1
                src.release()
                self._inpos += n
                self._payload_filled(n)
                self._compact()
            if self._pleft:
                return self._at_eof_or_wait()
            payload, then = self._payload, self._then
            self._payload, self._pviews, self._then = None, [], _noop
            self._state = self._after
            then(payload)
            return True
        if st is _State.BODY:
            want = len(self._body) - self._body_fill
            n = min(want, self._avail())
            if n:
                self._body[self._body_fill:self._body_fill + n] = memoryview(self._in)[self._inpos:self._inpos + n]
                self._body_fill += n
                self._inpos += n
                self._compact()
            if self._body_fill < len(self._body):
                return self._at_eof_or_wait()
            body, then = self._body, self._then
            self._body, self._body_fill, self._then = bytearray(), 0, _noop
            self._state = self._after
            then(body)
            return True
        if st is _State.DISCARD:
            n = min(self._discard_left, self._avail())
            if n:
                self._inpos += n
                self._discard_left -= n
                self._compact()
            if self._discard_left:
                return self._at_eof_or_wait()
            then = self._then
            self._then = _noop
            self._state = self._after
            then()
            return True
        if st is _State.CLIENT_FLAGS:
            b = self._take(_CLIENT_FLAGS.size)
            if b is None:
                return self._at_eof_or_wait()
            (flags,) = _CLIENT_FLAGS.unpack(b)
            if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                # The spec: the server MUST drop the connection on unknown flags.
                self._fail(f"client sent unknown handshake flags {flags:#x}")
                return True
            # A client without C_FIXED_NEWSTYLE gets fixed-newstyle replies
            # anyway (the spec lets servers honour it); old clients only
            # ever send EXPORT_NAME, which has the same answer in both.
            self._no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
            self._state = _State.OPT_HEADER
            return True
        if st is _State.OPT_HEADER:
            b = self._take(_OPT_HEADER.size)
            if b is None:
                return self._at_eof_or_wait()
            magic, opt, length = _OPT_HEADER.unpack(b)
            if magic != IHAVEOPT:
                self._fail(f"bad option magic {magic:#x}")
                return True
            self._begin_option(opt, length)
            return True
        if st is _State.REQ_HEADER:
            b = self._take(_REQUEST.size)
            if b is None:
                return self._at_eof_or_wait()
            self._begin_request(*_REQUEST.unpack(b))
            return True
        raise AssertionError(f"unhandled state {st}")

    def _fast_request(self) -> Request | None:
        """The common transmission request in one step, or None to take the general path."""
        reqs = self._fast_requests(1)
        return reqs[0] if reqs else None

    def _fast_requests(self, limit: int) -> list[Request]:
        """Up to ``limit`` common transmission requests, parsed in one loop.

        A valid READ, or a valid WRITE whose payload has arrived with it, is
        parsed straight out of the input buffer; the loop stops at anything
        else (other commands, anything ``_validate`` would refuse, a payload
        still to come), which is left untouched for ``_advance``, so
        behaviour is the same.
        """
        inp, pos = self._in, self._inpos
        avail = len(inp)
        out: list[Request] = []
        rw_flags, max_block, align, size = ~self._rw_flags, self._max_block, self._align_mask, self._size
        pending = self._pending
        unpack = _REQUEST.unpack_from
        while avail - pos >= 28 and len(out) < limit:
            magic, flags, kind, handle, offset, length = unpack(inp, pos)
            if (magic != REQUEST_MAGIC or kind > 1 or flags & rw_flags or not length
                    or length > max_block or (offset | length) & align or offset + length > size):
                break
            if kind == 0:
                cmd, data = _CMD_READ, None
                pos += 28
            else:
                end = pos + 28 + length
                if self._read_only or avail < end:
                    break
                cmd, data = _CMD_WRITE, memoryview(inp[pos + 28:end])     # a copy: the request's own buffer
                pos = end
            queue = pending.get(handle)
            if queue is None:
                pending[handle] = [(cmd, length)]
            else:
                queue.append((cmd, length))
            out.append(_new_tuple(Request, (cmd, handle, offset, length, flags, data)))
        if out:
            self._inpos = pos
            self._in_flight += len(out)
            self._compact()
        return out

    def _at_eof_or_wait(self) -> bool:
        if not self._eof:
            return False
        at_boundary = (self._state in (_State.CLIENT_FLAGS, _State.OPT_HEADER, _State.REQ_HEADER)
                       and self._avail() == 0)
        if at_boundary:
            self._finish(Disconnect("EOF"))
        else:
            self._fail(f"client closed the connection in the middle of a message ({self._state.value})")
        return True

    def _fail(self, reason: str) -> None:
        self._finish(ProtocolError(reason))

    def _finish(self, ev: Event) -> None:
        self._events.append(ev)
        self._state = _State.DONE
        self._in.clear()
        self._inpos = 0
        self._body = bytearray()
        self._drop_payload()
        self._then = _noop

    def close(self) -> None:
        """The caller is done with this connection: memory lent for a payload still being received
        goes back to its lender (``release()``).  Nothing is reported."""
        if self._state is not _State.DONE:
            self._state = _State.DONE
            self._in.clear()
            self._inpos = 0
            self._body = bytearray()
            self._then = _noop
        self._drop_payload()

    def _drop_payload(self) -> None:
        payload, self._payload, self._pviews, self._pleft = self._payload, None, [], 0
        if payload is not None:
            try:
                payload.release()
            except Exception:          # the lender's problem; the protocol carries on
                pass

    def _read_payload(self, payload: Any, length: int, then: Callable[[Any], None], after: _State) -> bool:
        """Receive the next ``length`` bytes into the views a ``payload_buffer`` lent; False (and the
        loan given back) if they are not exactly ``length`` bytes of writable memory."""
        try:
            views = list(payload.views)
            try:
                ok = sum(map(_NBYTES, views)) == length          # memoryviews: the usual, checked in C
            except AttributeError:
                views = [memoryview(v) for v in views]
                ok = sum(map(_NBYTES, views)) == length
            if ok and (set(map(_FORMAT, views)) != {"B"} or not all(map(_CONTIGUOUS, views))):
                views = [memoryview(v).cast("B") for v in views]
            ok = ok and not any(map(_READONLY, views))
        except Exception:
            ok = False
        if not ok:
            try:
                payload.release()
            except Exception:
                pass
            return False
        self._payload, self._pviews, self._pidx, self._pleft = payload, list(filter(len, views)), 0, length
        self._then = then
        self._after = after
        self._state = _State.BODY
        return True

    def _payload_filled(self, n: int) -> None:
        """``n`` more bytes of the lent payload views are filled."""
        self._pleft -= n
        views, idx = self._pviews, self._pidx
        while n:
            v = views[idx]
            if n >= len(v):
                n -= len(v)
                idx += 1
            else:
                views[idx] = v[n:]
                n = 0
        self._pidx = idx

    def _read_body(self, length: int, then: Callable[[bytearray], None], after: _State) -> None:
        self._body = bytearray(length)
        self._body_fill = 0
        self._then = then
        self._after = after
        self._state = _State.BODY

    def _discard(self, length: int, then: Callable[[], None], after: _State) -> None:
        self._discard_left = length
        self._then = then
        self._after = after
        self._state = _State.DISCARD

    # --- options --------------------------------------------------------------

    def _opt_reply(self, opt: int, rep: Rep, data: bytes = b"") -> None:
        self._out += _OPT_REPLY.pack(OPTION_REPLY_MAGIC, opt, rep, len(data))
        self._out += data

    def _opt_error(self, opt: int, rep: Rep, message: str) -> None:
        self._opt_reply(opt, rep, message.encode("utf-8")[:MAX_STRING])

    def _begin_option(self, opt: int, length: int) -> None:
        nxt = _State.OPT_HEADER
        if opt == Opt.EXPORT_NAME:
            if length > MAX_STRING:
                # EXPORT_NAME cannot be answered with an error.
                self._fail(f"NBD_OPT_EXPORT_NAME with a {length}-byte name")
                return
            self._read_body(length, self._opt_export_name, nxt)
        elif opt in (Opt.GO, Opt.INFO):
            if length > MAX_OPTION_DATA:
                self._discard(length, lambda: self._opt_error(opt, Rep.ERR_TOO_BIG, "option data too large"), nxt)
            else:
                self._read_body(length, lambda body: self._opt_info_go(opt, body), nxt)
        elif opt == Opt.LIST:
            self._discard(length, lambda: self._opt_list(length), nxt)
        elif opt == Opt.ABORT:
            # The spec: a server SHOULD ignore data sent with ABORT.
            self._discard(length, self._opt_abort, nxt)
        else:
            name = Opt(opt).name if opt in Opt._value2member_map_ else str(opt)
            self._discard(length, lambda: self._opt_error(opt, Rep.ERR_UNSUP, f"option {name} not supported"), nxt)

    def _opt_export_name(self, body: bytearray) -> None:
        if bytes(body) != self._name_bytes:
            self._fail(f"NBD_OPT_EXPORT_NAME for unknown export {bytes(body)[:64]!r}")
            return
        self._out += struct.pack(">QH", self._size, self._tflags)
        if not self._no_zeroes:
            self._out += bytes(124)
        self._enter_transmission()

    def _opt_info_go(self, opt: int, body: bytearray) -> None:
        data = bytes(body)
        if len(data) < 6:
            self._opt_error(opt, Rep.ERR_INVALID, "option data too short")
            return
        (nlen,) = _U32.unpack_from(data, 0)
        if nlen > len(data) - 6:
            self._opt_error(opt, Rep.ERR_INVALID, "export name length exceeds option data")
            return
        name = data[4:4 + nlen]
        rest = data[4 + nlen:]
        (nreq,) = _U16.unpack_from(rest, 0)
        if len(rest) != 2 + 2 * nreq:
            self._opt_error(opt, Rep.ERR_INVALID, "information request count does not match option length")
            return
        requests = set(struct.unpack_from(f">{nreq}H", rest, 2))
        if name != self._name_bytes:
            self._opt_error(opt, Rep.ERR_UNKNOWN, "unknown export")
            return
        self._opt_reply(opt, Rep.INFO, _INFO_EXPORT.pack(Info.EXPORT, self._size, self._tflags))
        if Info.NAME in requests:
            self._opt_reply(opt, Rep.INFO, _U16.pack(Info.NAME) + self._name_bytes)
        # Sent even when not requested (the spec allows it): a client that did
        # not ask may still use it, and unaligned requests are refused cleanly.
        self._opt_reply(opt, Rep.INFO, _INFO_BLOCK_SIZE.pack(
            Info.BLOCK_SIZE, self._min_block, self._pref_block, self._max_block))
        self._opt_reply(opt, Rep.ACK)
        if opt == Opt.GO:
            self._enter_transmission()

    def _opt_list(self, length: int) -> None:
        if length:
            self._opt_error(Opt.LIST, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
            return
        self._opt_reply(Opt.LIST, Rep.SERVER, _U32.pack(len(self._name_bytes)) + self._name_bytes)
        self._opt_reply(Opt.LIST, Rep.ACK)

    def _opt_abort(self) -> None:
        self._opt_reply(Opt.ABORT, Rep.ACK)
        self._finish(Disconnect("NBD_OPT_ABORT"))

    def _enter_transmission(self) -> None:
        self._transmission = True
        self._state = _State.REQ_HEADER
        self._after = _State.REQ_HEADER
        self._events.append(Ready(self._export_name, self._tflags))

    # --- transmission ---------------------------------------------------------

    def _begin_request(self, magic: int, flags: int, kind: int, handle: int, offset: int, length: int) -> None:
        if magic != REQUEST_MAGIC:
            self._fail(f"bad request magic {magic:#x}")
            return
        if kind == Cmd.DISC:
            self._finish(Disconnect("NBD_CMD_DISC"))
            return
        err, reason = self._validate(kind, flags, offset, length)
        nxt = _State.REQ_HEADER
        if err:
            if kind == Cmd.WRITE:
                # The payload follows regardless of our opinion of the header:
                # skip it (unbuffered, even if oversized) so the stream stays in
                # sync and the client gets a clean error instead of a hang-up.
                self._discard(length, lambda: self._reject(handle, kind, err, reason), nxt)
            else:
                self._reject(handle, kind, err, reason)
            return
        cmd = Cmd(kind)
        if length == 0 and cmd is not Cmd.FLUSH:
            # A zero-length READ/WRITE/TRIM/WRITE_ZEROES is a valid no-op; many
            # devices (e.g. a blkif ring) cannot express it, so answer here.
            self._out += _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle)
            return
        if cmd is Cmd.WRITE:
            if self._payload_buffer is not None and self._avail() < length:
                # Received straight into memory the device lends (its own I/O pages), if it will.
                try:
                    payload = self._payload_buffer(offset, length)
                except Exception:
                    payload = None
                if payload is not None and self._read_payload(
                        payload, length, lambda p: self._emit(cmd, handle, offset, length, flags, p), nxt):
                    return
            self._read_body(length, lambda body: self._emit(cmd, handle, offset, length, flags, memoryview(body)), nxt)
        else:
            self._emit(cmd, handle, offset, length, flags, None)

    def _validate(self, kind: int, flags: int, offset: int, length: int) -> tuple[int, str]:
        if kind not in (Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES):
            return NbdErr.EINVAL, f"unsupported command {kind}"
        # Plain ints on purpose: ~ of an IntFlag only covers the known bits,
        # which would let unknown flag bits through.
        allowed = 0
        if self._tflags & TransmissionFlag.SEND_FUA:
            allowed |= int(CmdFlag.FUA)
        if kind == Cmd.WRITE_ZEROES:
            allowed |= int(CmdFlag.NO_HOLE)
        if flags & ~allowed:
            return NbdErr.EINVAL, f"command flags {flags:#x} not valid for {Cmd(kind).name}"
        writes = kind in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
        if writes and self._read_only:
            return NbdErr.EPERM, "export is read-only"
        if kind == Cmd.FLUSH:
            if not self._can_flush:
                return NbdErr.EINVAL, "flush not supported"
            if offset or length:
                return NbdErr.EINVAL, "flush with nonzero offset/length"
            return 0, ""
        if kind == Cmd.TRIM and not self._can_trim:
            return NbdErr.EINVAL, "trim not supported"
        if kind == Cmd.WRITE_ZEROES and not self._can_write_zeroes:
            return NbdErr.EINVAL, "write zeroes not supported"
        # TRIM is the one command the spec does not bound by the maximum
        # block size (its length is not a payload).
        if kind != Cmd.TRIM and length > self._max_block:
            return NbdErr.EINVAL, f"length {length} exceeds the maximum block size {self._max_block}"
        if offset % self._min_block or length % self._min_block:
            return NbdErr.EINVAL, f"request not aligned to {self._min_block} bytes"
        if offset + length > self._size:
            # The spec: ENOSPC for writes past the end, EINVAL for reads/trims.
            err = NbdErr.ENOSPC if kind in (Cmd.WRITE, Cmd.WRITE_ZEROES) else NbdErr.EINVAL
            return err, f"request [{offset}, +{length}) beyond the export size {self._size}"
        return 0, ""

    def _reject(self, handle: int, kind: int, err: int, reason: str) -> None:
        self._out += _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, handle)
        self._events.append(RequestRejected(handle, kind, err, reason))

    def _emit(self, cmd: Cmd, handle: int, offset: int, length: int, flags: int, data: memoryview | None) -> None:
        queue = self._pending.get(handle)
        if queue is None:
            self._pending[handle] = [(cmd, length)]
        else:
            queue.append((cmd, length))
        self._in_flight += 1
        self._events.append(Request(cmd, handle, offset, length, flags, data))


_CMD_READ, _CMD_WRITE = Cmd.READ, Cmd.WRITE
#: ``Request(...)`` without the NamedTuple's Python-level __new__ (one per request on the fast path).
_new_tuple = tuple.__new__
_NBYTES = operator.attrgetter("nbytes")
_FORMAT = operator.attrgetter("format")
_CONTIGUOUS = operator.attrgetter("c_contiguous")
_READONLY = operator.attrgetter("readonly")


def _noop(*_args: object) -> None:
    return None
