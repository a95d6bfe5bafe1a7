"""The NBD protocol's transmission phase, byte for byte: requests, their validation, replies, garbage.

The tests replay what a client sends, split at arbitrary points and mixed
with garbage, because a guest's NBD socket is reachable by whatever runs in
the guest: nothing may raise, nothing may buffer more than one message.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbd_wire import SIZE, MiB, drain, feed_via_buffers, new_conn, ready_conn, req, simple_replies

from xdom.domains.nbd.events import Disconnect, ProtocolError, Ready, Request, RequestRejected
from xdom.domains.nbd.protocol import NbdServerConnection
from xdom.domains.nbd.wire import (
    FLAG_C_FIXED_NEWSTYLE,
    IHAVEOPT,
    MAX_BLOCK_SIZE,
    RECV_SCRATCH_SIZE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    NbdErr,
    TransmissionFlag,
)

pytestmark = pytest.mark.timeout(120)


# --- transmission ---------------------------------------------------------------

_sectors = st.integers(0, SIZE // 512 - 8)


@st.composite
def requests(draw: Any) -> tuple[bytes, Request]:
    kind = draw(st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES]))
    handle = draw(st.integers(0, 2**64 - 1))
    if kind is Cmd.FLUSH:
        flags = draw(st.sampled_from([0, CmdFlag.FUA]))
        return req(kind, handle, 0, 0, flags), Request(kind, handle, 0, 0, int(flags))
    offset = draw(_sectors) * 512
    length = draw(st.integers(1, 8)) * 512
    flags = draw(st.sampled_from([0, CmdFlag.FUA]))
    if kind is Cmd.WRITE_ZEROES:
        flags |= draw(st.sampled_from([0, CmdFlag.NO_HOLE]))
    payload = b""
    if kind is Cmd.WRITE:
        payload = draw(st.binary(min_size=length, max_size=length))
    return (req(kind, handle, offset, length, flags, payload),
            Request(kind, handle, offset, length, int(flags), memoryview(payload) if payload else None))


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(requests(), min_size=1, max_size=10), cuts=st.lists(st.integers(0, 2**20), max_size=30),
       via_buffers=st.booleans())
def test_requests_split_at_any_boundary_parse_identically(reqs: list[tuple[bytes, Request]], cuts: list[int],
                                                          via_buffers: bool) -> None:
    stream = b"".join(wire for wire, _ in reqs)
    expected = [ev for _, ev in reqs]
    conn = ready_conn()
    if via_buffers:
        evs = feed_via_buffers(conn, stream, [c % 200 + 1 for c in cuts] or None)
    else:
        points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
        evs = []
        for a, b in zip(points, points[1:]):
            conn.receive_data(stream[a:b])
            evs += drain(conn)
            assert conn.buffered <= 28 + 8 * 512
    assert evs == expected
    assert conn.in_flight == len(expected)
    assert conn.data_to_send() == b""


def test_write_payload_is_received_into_its_own_buffer() -> None:
    conn = ready_conn()
    payload = os.urandom(256 * 1024)
    evs = feed_via_buffers(conn, req(Cmd.WRITE, 1, 4096, len(payload)))
    assert evs == []
    view = conn.get_buffer()
    assert len(view) == len(payload)            # the whole payload, not a scratch chunk
    target = view.obj
    view[:] = payload
    conn.commit(len(payload))
    [ev] = drain(conn)
    assert isinstance(ev, Request) and ev.data is not None
    assert ev.data.obj is target and bytes(ev.data) == payload


class _Lender:
    """``payload_buffer`` for the protocol: lends pieces of odd sizes, records what it lent and got back."""

    def __init__(self, sizes: tuple[int, ...] = (1000, 3096, 4096)) -> None:
        self.sizes = sizes
        self.lent: list[Any] = []
        self.refuse = False
        self.wrong_size = False

    def __call__(self, offset: int, length: int) -> Any:
        if self.refuse:
            return None
        lender = self

        class Loan:
            released = 0

            def __init__(self) -> None:
                self.pieces = []
                left = length + (512 if lender.wrong_size else 0)
                k = 0
                while left:
                    n = min(left, lender.sizes[k % len(lender.sizes)])
                    self.pieces.append(bytearray(n))
                    left -= n
                    k += 1
                self.views = [memoryview(p) for p in self.pieces]

            def release(self) -> None:
                self.released += 1

            def data(self) -> bytes:
                return b"".join(self.pieces)
        loan = Loan()
        self.lent.append(loan)
        return loan


@pytest.mark.parametrize("sizes", [None, [1], [7, 4096, 100], [65536]], ids=["whole", "1", "mixed", "big"])
def test_write_payload_received_into_lent_memory(sizes: list[int] | None) -> None:
    lender = _Lender()
    conn = ready_conn(payload_buffer=lender)
    payload = os.urandom(5 * 8192)
    wire = req(Cmd.WRITE, 1, 4096, len(payload)) + payload + req(Cmd.READ, 2, 0, 512)
    evs: list[Any] = []
    pos, k = 0, 0
    while pos < len(wire):                               # recvmsg_into over get_buffers(), as the server does
        bufs = conn.get_buffers()
        limit = sizes[k % len(sizes)] if sizes else len(wire)
        k += 1
        n = max(1, min(sum(len(b) for b in bufs), len(wire) - pos, limit))
        at = 0
        for b in bufs:
            take = min(len(b), n - at)
            b[:take] = wire[pos + at:pos + at + take]
            at += take
            if at == n:
                break
        conn.commit(n)
        pos += n
        evs += drain(conn)
    assert [type(e) for e in evs] == [Request, Request]
    assert len(lender.lent) == 1 and evs[0].data is lender.lent[0]
    assert lender.lent[0].data() == payload and lender.lent[0].released == 0
    assert conn.buffered == 0
    # Payload bytes that came with the header are copied into the loan, too.
    conn.receive_data(req(Cmd.WRITE, 3, 0, 8192) + payload[:100])
    assert drain(conn) == []
    conn.receive_data(payload[100:8192])
    [ev] = drain(conn)
    assert ev.data is lender.lent[1] and lender.lent[1].data() == payload[:8192]


def test_lent_payload_memory_goes_back_when_the_payload_never_completes() -> None:
    lender = _Lender()
    conn = ready_conn(payload_buffer=lender)
    conn.receive_data(req(Cmd.WRITE, 1, 0, 8192) + b"x" * 10)
    assert drain(conn) == [] and conn.buffered == 8192 - 10
    conn.receive_data(b"")                                       # EOF mid-payload
    assert isinstance(drain(conn)[-1], ProtocolError)
    assert lender.lent[0].released == 1
    conn = ready_conn(payload_buffer=lender)
    conn.receive_data(req(Cmd.WRITE, 1, 0, 8192))
    assert drain(conn) == []
    conn.close()                                                 # the server gives up on the client
    assert lender.lent[1].released == 1
    conn.close()
    assert lender.lent[1].released == 1
    # A lender that refuses, or lends the wrong amount, leaves the payload to the protocol's own buffer.
    for refuse, wrong in ((True, False), (False, True)):
        lender.refuse, lender.wrong_size = refuse, wrong
        conn = ready_conn(payload_buffer=lender)
        before = len(lender.lent)
        evs = feed_via_buffers(conn, req(Cmd.WRITE, 1, 0, 8192) + b"y" * 8192, [28, 4096])
        [ev] = evs
        assert isinstance(ev.data, memoryview) and bytes(ev.data) == b"y" * 8192
        if wrong:
            assert len(lender.lent) == before + 1 and lender.lent[-1].released == 1


def test_pipelined_headers_arrive_together_and_leftover_is_bounded() -> None:
    conn = ready_conn()
    # A small write whose payload arrived in the same recv as its header is
    # copied out of the scratch buffer; nothing else lingers.
    burst = b"".join(req(Cmd.READ, h, h * 512, 512) for h in range(100)) + req(Cmd.WRITE, 500, 0, 512, 0, b"w" * 512)
    assert len(burst) <= RECV_SCRATCH_SIZE
    evs = feed_via_buffers(conn, burst)
    assert len(evs) == 101 and bytes(evs[-1].data) == b"w" * 512
    assert conn.buffered == 0


def reject(conn: NbdServerConnection, wire: bytes) -> tuple[int, list[Any]]:
    conn.receive_data(wire)
    evs = drain(conn)
    [(err, _handle)] = simple_replies(conn.data_to_send())
    return err, evs


@pytest.mark.parametrize("wire, err", [
    (req(Cmd.READ, 1, SIZE - 512, 1024), NbdErr.EINVAL),                       # read past the end
    (req(Cmd.READ, 1, 2**64 - 512, 512), NbdErr.EINVAL),                       # offset overflow
    (req(Cmd.TRIM, 1, SIZE, 512), NbdErr.EINVAL),
    (req(Cmd.WRITE, 1, SIZE, 512, 0, bytes(512)), NbdErr.ENOSPC),              # spec: ENOSPC for writes
    (req(Cmd.WRITE_ZEROES, 1, SIZE - 512, 4096), NbdErr.ENOSPC),
    (req(Cmd.READ, 1, 100, 512), NbdErr.EINVAL),                               # unaligned offset
    (req(Cmd.WRITE, 1, 0, 100, 0, bytes(100)), NbdErr.EINVAL),                 # unaligned length
    (req(Cmd.READ, 1, 0, MAX_BLOCK_SIZE + 512), NbdErr.EINVAL),                # over the max block
    (req(Cmd.WRITE_ZEROES, 1, 0, MAX_BLOCK_SIZE + 512), NbdErr.EINVAL),
    (req(Cmd.WRITE, 1, 0, 512, CmdFlag.NO_HOLE, bytes(512)), NbdErr.EINVAL),   # flag not for WRITE
    (req(Cmd.READ, 1, 0, 512, CmdFlag.DF), NbdErr.EINVAL),                     # DF not negotiated
    (req(Cmd.WRITE_ZEROES, 1, 0, 512, CmdFlag.FAST_ZERO), NbdErr.EINVAL),
    (req(Cmd.READ, 1, 0, 512, 0x8000), NbdErr.EINVAL),                         # unknown flag
    (req(Cmd.CACHE, 1, 0, 512), NbdErr.EINVAL),
    (req(Cmd.BLOCK_STATUS, 1, 0, 512), NbdErr.EINVAL),
    (req(99, 1, 0, 512), NbdErr.EINVAL),
    (req(Cmd.FLUSH, 1, 512, 0), NbdErr.EINVAL),                                # flush fields reserved
])
def test_invalid_requests_get_the_spec_error_and_the_stream_stays_in_sync(wire: bytes, err: int) -> None:
    conn = ready_conn()
    got, evs = reject(conn, wire)
    assert got == err
    assert len(evs) == 1 and isinstance(evs[0], RequestRejected) and evs[0].error == err
    assert conn.in_flight == 0
    conn.receive_data(req(Cmd.READ, 2, 0, 512))          # the next request still parses
    assert drain(conn) == [Request(Cmd.READ, 2, 0, 512, 0, None)]


def test_oversized_write_payload_is_skipped_unbuffered_then_einval() -> None:
    conn = ready_conn()
    length = 2 * MAX_BLOCK_SIZE
    conn.receive_data(req(Cmd.WRITE, 9, 0, length))
    chunk = bytes(MiB)
    for _ in range(length // MiB):
        assert drain(conn) == []
        assert conn.buffered < 1024
        assert conn.data_to_send() == b""
        conn.receive_data(chunk)
    evs = drain(conn)
    assert isinstance(evs[0], RequestRejected)
    assert simple_replies(conn.data_to_send()) == [(NbdErr.EINVAL, 9)]


def test_read_only_export_refuses_writes_with_eperm() -> None:
    conn = ready_conn(read_only=True)
    tf = conn.transmission_flags
    assert tf & TransmissionFlag.READ_ONLY
    assert not tf & (TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES)
    for wire in (req(Cmd.WRITE, 1, 0, 4096, 0, bytes(4096)), req(Cmd.TRIM, 2, 0, 4096),
                 req(Cmd.WRITE_ZEROES, 3, 0, 4096), req(Cmd.WRITE, 4, 0, 4096, CmdFlag.FUA, bytes(4096))):
        assert reject(conn, wire)[0] == NbdErr.EPERM
    conn.receive_data(req(Cmd.READ, 5, 0, 4096))
    assert drain(conn) == [Request(Cmd.READ, 5, 0, 4096, 0, None)]


def test_capabilities_the_device_lacks_are_neither_advertised_nor_accepted() -> None:
    conn = ready_conn(can_flush=False, can_trim=False, can_write_zeroes=False)
    tf = conn.transmission_flags
    assert tf == TransmissionFlag.HAS_FLAGS
    for wire in (req(Cmd.FLUSH, 1), req(Cmd.TRIM, 1, 0, 512), req(Cmd.WRITE_ZEROES, 1, 0, 512),
                 req(Cmd.WRITE, 1, 0, 512, CmdFlag.FUA, bytes(512))):
        assert reject(conn, wire)[0] == NbdErr.EINVAL


def test_zero_length_requests_are_answered_without_the_device() -> None:
    conn = ready_conn()
    conn.receive_data(req(Cmd.READ, 1, SIZE, 0) + req(Cmd.WRITE, 2, 0, 0) + req(Cmd.TRIM, 3, 0, 0)
                      + req(Cmd.WRITE_ZEROES, 4, 0, 0) + req(Cmd.READ, 5, 0, 512))
    assert drain(conn) == [Request(Cmd.READ, 5, 0, 512, 0, None)]
    assert simple_replies(conn.data_to_send()) == [(0, 1), (0, 2), (0, 3), (0, 4)]


def test_bad_request_magic_is_a_protocol_error() -> None:
    conn = ready_conn()
    conn.receive_data(req(Cmd.READ, 1, 0, 512) + struct.pack(">I", 0xDEADBEEF) + bytes(24))
    evs = drain(conn)
    assert isinstance(evs[0], Request) and isinstance(evs[1], ProtocolError)
    assert conn.closed
    conn.receive_data(b"more garbage")             # ignored once closed
    assert drain(conn) == []


def test_disc_ends_the_session_but_in_flight_requests_can_still_reply() -> None:
    conn = ready_conn()
    conn.receive_data(req(Cmd.READ, 1, 0, 512) + req(Cmd.DISC, 2) + req(Cmd.READ, 3, 0, 512))
    assert drain(conn) == [Request(Cmd.READ, 1, 0, 512, 0, None), Disconnect("NBD_CMD_DISC")]
    out = conn.reply(1, 0, [b"a" * 256, memoryview(b"b" * 256)])
    assert out[0] == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 1)
    assert b"".join(out[1:]) == b"a" * 256 + b"b" * 256
    assert conn.in_flight == 0


def test_eof_at_a_boundary_is_a_disconnect_and_mid_request_an_error() -> None:
    conn = ready_conn()
    conn.receive_data(b"")
    assert drain(conn) == [Disconnect("EOF")]
    conn = ready_conn()
    conn.receive_data(req(Cmd.WRITE, 1, 0, 4096, 0, bytes(100)))
    assert drain(conn) == []
    conn.receive_data(b"")
    assert isinstance(drain(conn)[0], ProtocolError)


def test_reply_passes_read_buffers_through_and_maps_errors() -> None:
    conn = ready_conn()
    conn.receive_data(req(Cmd.READ, 1, 0, 1024) + req(Cmd.WRITE, 2, 0, 512, 0, bytes(512))
                      + req(Cmd.READ, 3, 0, 512) + req(Cmd.TRIM, 4, 0, 512) + req(Cmd.FLUSH, 5))
    assert len(drain(conn)) == 5
    a, b = bytearray(512), memoryview(bytearray(512))
    out = conn.reply(1, 0, [a, b])
    assert out[1] is a and out[2] is b                 # no copy, no concatenation
    with pytest.raises(ValueError):
        conn.reply(3, 0, b"short")                      # wrong length would desync the client
    assert conn.reply(3, errno.EIO, b"ignored") == [struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, NbdErr.EIO, 3)]
    assert simple_replies(conn.reply(2, errno.EDQUOT)[0]) == [(NbdErr.ENOSPC, 2)]
    assert simple_replies(conn.reply(4, errno.ENOENT)[0]) == [(NbdErr.EIO, 4)]
    assert simple_replies(conn.reply(5, errno.EROFS)[0]) == [(NbdErr.EPERM, 5)]
    with pytest.raises(ValueError):
        conn.reply(5, 0)                                # not in flight any more
    assert conn.in_flight == 0


def test_constructor_rejects_impossible_geometry() -> None:
    with pytest.raises(ValueError):
        NbdServerConnection(SIZE, sector_size=1000)
    with pytest.raises(ValueError):
        NbdServerConnection(SIZE, sector_size=131072)
    with pytest.raises(ValueError):
        NbdServerConnection(-1)
    with pytest.raises(ValueError):
        NbdServerConnection(SIZE, export_name="x" * 5000)


# --- hostile input ------------------------------------------------------------------

_garbage_piece = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda o, ln, d: struct.pack(">QII", IHAVEOPT, o, ln) + d,
              st.integers(0, 20), st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)), st.binary(max_size=64)),
    st.builds(lambda f, k, h, off, ln, tail: struct.pack(">IHHQQI", REQUEST_MAGIC, f, k, h, off, ln) + tail,
              st.integers(0, 0xFFFF), st.integers(0, 10), st.integers(0, 2**64 - 1),
              st.one_of(st.integers(0, SIZE), st.integers(0, 2**64 - 1)),
              st.one_of(st.integers(0, 8192), st.integers(0, 2**32 - 1)), st.binary(max_size=64)),
)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(_garbage_piece, max_size=12), handshake=st.booleans(), read_only=st.booleans(),
       chunk=st.integers(1, 97), eof=st.booleans())
def test_garbage_never_raises_and_never_buffers_more_than_a_message(
        pieces: list[bytes], handshake: bool, read_only: bool, chunk: int, eof: bool) -> None:
    if handshake:
        conn = ready_conn(read_only=read_only)
    else:
        conn = new_conn(read_only=read_only)
        conn.data_to_send()
        pieces = [struct.pack(">I", FLAG_C_FIXED_NEWSTYLE)] + pieces
    data = b"".join(pieces)
    evs = []
    for i in range(0, len(data), chunk):
        conn.receive_data(data[i:i + chunk])
        evs += drain(conn)
        assert conn.buffered <= 28 + MAX_BLOCK_SIZE
    if eof:
        conn.receive_data(b"")
        evs += drain(conn)
    conn.data_to_send()
    for ev in evs:
        assert isinstance(ev, (Ready, Request, RequestRejected, Disconnect, ProtocolError))
        if isinstance(ev, ProtocolError):
            assert not ev.reason.startswith("internal error"), ev.reason
        if isinstance(ev, Request):
            assert ev.offset + ev.length <= SIZE and ev.length <= MAX_BLOCK_SIZE
            assert not (read_only and ev.kind in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES))
            out = conn.reply(ev.handle, 0, bytes(ev.length) if ev.kind is Cmd.READ else b"")
            assert len(out[0]) == 16
    assert conn.in_flight == 0
    # Once the connection has ended nothing else comes out of it.
    if any(isinstance(ev, (Disconnect, ProtocolError)) for ev in evs):
        assert conn.closed and isinstance(evs[-1], (Disconnect, ProtocolError))
