"""Sans-IO NBD server protocol: one connection's state machine, fixed newstyle handshake, simple replies.

The protocol owns every byte of the NBD wire format and nothing else: no
sockets, no threads, no clocks (the h11/wsproto style).  The I/O layer
(``server.py``) feeds it what the client sent, asks it for parsed events, and
writes out what it produces.  Keeping it pure is what lets the tests replay a
hostile client byte by byte, split at any boundary, without a socket.

Its parts: ``wire`` (the constants and layouts of the spec), ``export``
(what the export offers, validated once), ``handshake`` (the greeting and
the answer to every option: ``EXPORT_NAME``, ``INFO``/``GO``, ``LIST``,
``ABORT``; everything else ``NBD_REP_ERR_UNSUP``), ``transmission`` (which
requests are valid -- ``READ``, ``WRITE`` with ``FUA``, ``FLUSH``, ``TRIM``,
``WRITE_ZEROES`` with ``NO_HOLE``, ``DISC`` -- and the simple replies to
them), ``events`` (what ``next_event`` returns); this module is the receive
state machine that ties them together, and the connection's one interface.

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
import operator
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .events import Disconnect, Event, ProtocolError, Ready, Request, RequestRejected
from .export import Export
from .handshake import (
    GREETING,
    client_no_zeroes,
    export_name_reply,
    info_go_replies,
    list_replies,
    option_error,
    option_reply,
    unsupported_option,
)
from .transmission import InFlight, check_request, parse_requests
from .wire import (
    CLIENT_FLAGS,
    IHAVEOPT,
    MAX_BLOCK_SIZE,
    MAX_OPTION_DATA,
    MAX_STRING,
    OPT_HEADER,
    RECV_SCRATCH_SIZE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    Buffer,
    Cmd,
    Opt,
    Rep,
)

__all__ = ["NbdServerConnection"]


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
        self._export = Export(
            size, sector_size=sector_size, export_name=export_name, read_only=read_only, can_flush=can_flush,
            can_trim=can_trim, can_write_zeroes=can_write_zeroes, can_multi_conn=can_multi_conn,
            max_block_size=max_block_size)
        self._out = bytearray(GREETING)
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
        self._in_flight = InFlight()
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
        return self._export.tflags

    @property
    def block_sizes(self) -> tuple[int, int, int]:
        """(minimum, preferred, maximum) as advertised in NBD_INFO_BLOCK_SIZE."""
        return self._export.min_block, self._export.pref_block, self._export.max_block

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
        return self._in_flight.count

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

        ``error`` is a host errno (mapped with ``nbd_error``); a successful
        READ's ``data`` goes out as-is after the header (see ``InFlight.reply``
        for the rules).  Raises ``ValueError`` on a reply the client cannot
        parse: unknown handle or wrong data length.
        """
        return self._in_flight.reply(handle, error, data)

    def reply_many(self, replies: Sequence[tuple[int, int, Buffer | Sequence[Buffer]]]) -> list[Buffer]:
        """``reply`` for each ``(handle, error, data)``, in order: all their buffers, for one send.

        Raises ``ValueError`` as ``reply`` does, at the first bad one (the replies before it are
        done and their buffers lost: the caller can only drop the connection then)."""
        return self._in_flight.reply_many(replies)

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
            b = self._take(CLIENT_FLAGS.size)
            if b is None:
                return self._at_eof_or_wait()
            (flags,) = CLIENT_FLAGS.unpack(b)
            no_zeroes = client_no_zeroes(flags)
            if no_zeroes is None:
                self._fail(f"client sent unknown handshake flags {flags:#x}")
                return True
            self._no_zeroes = no_zeroes
            self._state = _State.OPT_HEADER
            return True
        if st is _State.OPT_HEADER:
            b = self._take(OPT_HEADER.size)
            if b is None:
                return self._at_eof_or_wait()
            magic, opt, length = OPT_HEADER.unpack(b)
            if magic != IHAVEOPT:
                self._fail(f"bad option magic {magic:#x}")
                return True
            self._begin_option(opt, length)
            return True
        if st is _State.REQ_HEADER:
            b = self._take(REQUEST.size)
            if b is None:
                return self._at_eof_or_wait()
            self._begin_request(*REQUEST.unpack(b))
            return True
        raise AssertionError(f"unhandled state {st}")

    def _fast_request(self) -> Request | None:
        """The common transmission request in one step, or None to take the general path."""
        reqs = self._fast_requests(1)
        return reqs[0] if reqs else None

    def _fast_requests(self, limit: int) -> list[Request]:
        """Up to ``limit`` common transmission requests, parsed in one loop
        (``transmission.parse_requests``; what it stops at is left for ``_advance``)."""
        out, pos = parse_requests(self._in, self._inpos, limit, self._export, self._in_flight)
        if out:
            self._inpos = pos
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

    # --- options (what to answer: ``handshake``) -----------------------------

    def _begin_option(self, opt: int, length: int) -> None:
        nxt = _State.OPT_HEADER
        out = self._out
        if opt == Opt.EXPORT_NAME:
            if length > MAX_STRING:
                # EXPORT_NAME cannot be answered with an error.
                self._fail(f"NBD_OPT_EXPORT_NAME with a {length}-byte name")
                return
            self._read_body(length, self._opt_export_name, nxt)
        elif opt in (Opt.GO, Opt.INFO):
            if length > MAX_OPTION_DATA:
                self._discard(length, lambda: out.extend(option_error(opt, Rep.ERR_TOO_BIG, "option data too large")),
                              nxt)
            else:
                self._read_body(length, lambda body: self._opt_info_go(opt, body), nxt)
        elif opt == Opt.LIST:
            self._discard(length, lambda: out.extend(list_replies(self._export, length)), nxt)
        elif opt == Opt.ABORT:
            # The spec: a server SHOULD ignore data sent with ABORT.
            self._discard(length, self._opt_abort, nxt)
        else:
            self._discard(length, lambda: out.extend(unsupported_option(opt)), nxt)

    def _opt_export_name(self, body: bytearray) -> None:
        reply = export_name_reply(self._export, bytes(body), self._no_zeroes)
        if reply is None:
            self._fail(f"NBD_OPT_EXPORT_NAME for unknown export {bytes(body)[:64]!r}")
            return
        self._out += reply
        self._enter_transmission()

    def _opt_info_go(self, opt: int, body: bytearray) -> None:
        replies, ok = info_go_replies(self._export, opt, bytes(body))
        self._out += replies
        if ok and opt == Opt.GO:
            self._enter_transmission()

    def _opt_abort(self) -> None:
        self._out += option_reply(Opt.ABORT, Rep.ACK)
        self._finish(Disconnect("NBD_OPT_ABORT"))

    def _enter_transmission(self) -> None:
        self._transmission = True
        self._state = _State.REQ_HEADER
        self._after = _State.REQ_HEADER
        self._events.append(Ready(self._export.name, self._export.tflags))

    # --- transmission ---------------------------------------------------------

    def _begin_request(self, magic: int, flags: int, kind: int, handle: int, offset: int, length: int) -> None:
        if magic != REQUEST_MAGIC:
            self._fail(f"bad request magic {magic:#x}")
            return
        if kind == Cmd.DISC:
            self._finish(Disconnect("NBD_CMD_DISC"))
            return
        err, reason = check_request(self._export, kind, flags, offset, length)
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
            self._out += SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle)
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

    def _reject(self, handle: int, kind: int, err: int, reason: str) -> None:
        self._out += SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, handle)
        self._events.append(RequestRejected(handle, kind, err, reason))

    def _emit(self, cmd: Cmd, handle: int, offset: int, length: int, flags: int, data: memoryview | None) -> None:
        self._in_flight.add(cmd, handle, length)
        self._events.append(Request(cmd, handle, offset, length, flags, data))


_NBYTES = operator.attrgetter("nbytes")
_FORMAT = operator.attrgetter("format")
_CONTIGUOUS = operator.attrgetter("c_contiguous")
_READONLY = operator.attrgetter("readonly")


def _noop(*_args: object) -> None:
    return None
