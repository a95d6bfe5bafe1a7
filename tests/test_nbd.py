"""The NBD server: the sans-IO protocol byte for byte, then the real clients.

The protocol tests replay what a client sends, split at arbitrary points and
mixed with garbage, because a guest's NBD socket is reachable by whatever
runs in the guest.  The integration tests use the programs people will point
at the export -- nbdinfo, qemu-img, qemu-io, nbdcopy, fio's libnbd engine --
against a FileBlockDevice, plus a raw socket client for the hostile cases no
well-behaved tool produces (disconnects mid-request, bad magic, floods).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdom.domains.blockdev import BlockDevice, FileBlockDevice, completion_batch, current_completion_batch
from xdom.domains.nbd.events import Disconnect, ProtocolError, Ready, Request, RequestRejected
from xdom.domains.nbd.protocol import NbdServerConnection
from xdom.domains.nbd.server import NbdServer
from xdom.domains.nbd.wire import (
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    MAX_BLOCK_SIZE,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    RECV_SCRATCH_SIZE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Info,
    NbdErr,
    Opt,
    Rep,
    TransmissionFlag,
)

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
SIZE = 1 * MiB

# --- wire helpers -------------------------------------------------------------


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def go_data(name: bytes = b"", infos: tuple[int, ...] = ()) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def req(kind: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, kind, handle, offset, length) + payload


def opt_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies into (option, type, payload)."""
    out = []
    while data:
        magic, o, rtype, ln = struct.unpack_from(">QIII", data)
        assert magic == OPTION_REPLY_MAGIC
        out.append((o, rtype, data[20:20 + ln]))
        data = data[20 + ln:]
    return out


def simple_replies(data: bytes) -> list[tuple[int, int]]:
    """(error, handle) of data-less simple replies."""
    out = []
    assert len(data) % 16 == 0, data
    for i in range(0, len(data), 16):
        magic, err, handle = struct.unpack_from(">IIQ", data, i)
        assert magic == SIMPLE_REPLY_MAGIC
        out.append((err, handle))
    return out


def drain(conn: NbdServerConnection) -> list[Any]:
    evs = []
    while (ev := conn.next_event()) is not None:
        evs.append(ev)
    return evs


def new_conn(**kw: Any) -> NbdServerConnection:
    kw.setdefault("can_trim", True)
    kw.setdefault("can_write_zeroes", True)
    size = kw.pop("size", SIZE)
    return NbdServerConnection(size, **kw)


def ready_conn(**kw: Any) -> NbdServerConnection:
    """A connection that completed NBD_OPT_GO, output drained."""
    conn = new_conn(**kw)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))
    conn.receive_data(opt(Opt.GO, go_data(kw.get("export_name", "").encode(), (Info.BLOCK_SIZE,))))
    evs = drain(conn)
    assert len(evs) == 1 and isinstance(evs[0], Ready)
    conn.data_to_send()
    return conn


def feed_via_buffers(conn: NbdServerConnection, data: bytes, sizes: list[int] | None = None) -> list[Any]:
    """Deliver ``data`` the way the server does (get_buffer/recv_into/commit),
    with each simulated recv() returning at most the next of ``sizes``."""
    evs: list[Any] = []
    pos, k = 0, 0
    while pos < len(data):
        buf = conn.get_buffer()
        limit = sizes[k % len(sizes)] if sizes else len(buf)
        k += 1
        n = max(1, min(len(buf), len(data) - pos, limit))
        buf[:n] = data[pos:pos + n]
        conn.commit(n)
        pos += n
        evs += drain(conn)
    return evs


# --- handshake ----------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    conn = new_conn()
    assert conn.data_to_send() == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("no_zeroes", [False, True])
def test_export_name_reply_honours_no_zeroes(no_zeroes: bool) -> None:
    conn = new_conn(read_only=False)
    conn.data_to_send()
    cflags = FLAG_C_FIXED_NEWSTYLE | (FLAG_C_NO_ZEROES if no_zeroes else 0)
    conn.receive_data(struct.pack(">I", cflags) + opt(Opt.EXPORT_NAME, b""))
    evs = drain(conn)
    tflags = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
              | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES)
    assert evs == [Ready("", int(tflags))]
    expected = struct.pack(">QH", SIZE, tflags) + (b"" if no_zeroes else bytes(124))
    assert conn.data_to_send() == expected
    assert conn.in_transmission


def test_export_name_unknown_export_terminates() -> None:
    conn = new_conn(export_name="disk0")
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE) + opt(Opt.EXPORT_NAME, b"other"))
    evs = drain(conn)
    assert len(evs) == 1 and isinstance(evs[0], ProtocolError)
    assert conn.data_to_send() == b""       # EXPORT_NAME cannot carry an error
    assert conn.closed


def test_unknown_client_flags_drop_the_connection() -> None:
    conn = new_conn()
    conn.receive_data(struct.pack(">I", 0x80))
    assert isinstance(drain(conn)[0], ProtocolError)


def test_go_answers_info_requests_then_enters_transmission() -> None:
    conn = new_conn(export_name="disk0", sector_size=4096, can_multi_conn=True)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))
    conn.receive_data(opt(Opt.GO, go_data(b"disk0", (Info.NAME, Info.BLOCK_SIZE, Info.DESCRIPTION, 999))))
    evs = drain(conn)
    assert len(evs) == 1 and isinstance(evs[0], Ready) and evs[0].export_name == "disk0"
    replies = opt_replies(conn.data_to_send())
    assert all(o == Opt.GO for o, _, _ in replies)
    assert replies[-1][1:] == (Rep.ACK, b"")
    infos = {struct.unpack(">H", p[:2])[0]: p[2:] for _, t, p in replies[:-1] if t == Rep.INFO}
    assert len(infos) == len(replies) - 1          # nothing but INFO before the ACK
    size, tflags = struct.unpack(">QH", infos[Info.EXPORT])
    assert size == SIZE and tflags & TransmissionFlag.CAN_MULTI_CONN
    assert infos[Info.NAME] == b"disk0"
    assert struct.unpack(">III", infos[Info.BLOCK_SIZE]) == (4096, 4096, MAX_BLOCK_SIZE)
    assert Info.DESCRIPTION not in infos and 999 not in infos
    # In transmission now: a request is parsed, not taken for an option.
    conn.receive_data(req(Cmd.READ, 7, 0, 4096))
    assert drain(conn) == [Request(Cmd.READ, 7, 0, 4096, 0, None)]


def test_info_does_not_end_negotiation_and_go_follows() -> None:
    conn = new_conn()
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))
    conn.receive_data(opt(Opt.INFO, go_data()))
    assert drain(conn) == []
    replies = opt_replies(conn.data_to_send())
    assert [t for _, t, _ in replies][-1] == Rep.ACK
    # Block sizes go out even when not asked for: 512-byte sectors -> 512 min.
    bs = [p for _, t, p in replies if t == Rep.INFO and p[:2] == struct.pack(">H", Info.BLOCK_SIZE)]
    assert struct.unpack(">III", bs[0][2:]) == (512, 4096, MAX_BLOCK_SIZE)
    assert not conn.in_transmission
    conn.receive_data(opt(Opt.GO, go_data()))
    assert isinstance(drain(conn)[0], Ready)


@pytest.mark.parametrize("data, rep", [
    (go_data(b"nope"), Rep.ERR_UNKNOWN),
    (b"\0\0", Rep.ERR_INVALID),                                   # shorter than 6 bytes
    (struct.pack(">I", 50) + b"x" * 10, Rep.ERR_INVALID),         # name longer than the option
    (go_data(b"", (Info.NAME,)) + b"\0", Rep.ERR_INVALID),        # count does not match length
])
def test_go_errors_keep_negotiating(data: bytes, rep: Rep) -> None:
    conn = new_conn()
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE) + opt(Opt.GO, data))
    assert drain(conn) == []
    replies = opt_replies(conn.data_to_send())
    assert [(o, t) for o, t, _ in replies] == [(Opt.GO, rep)]
    conn.receive_data(opt(Opt.GO, go_data()))       # the client may retry
    assert isinstance(drain(conn)[0], Ready)


def test_list_returns_the_one_export() -> None:
    conn = new_conn(export_name="vda")
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE) + opt(Opt.LIST))
    assert drain(conn) == []
    assert opt_replies(conn.data_to_send()) == [
        (Opt.LIST, Rep.SERVER, struct.pack(">I", 3) + b"vda"),
        (Opt.LIST, Rep.ACK, b""),
    ]
    conn.receive_data(opt(Opt.LIST, b"junk"))
    drain(conn)
    assert [t for _, t, _ in opt_replies(conn.data_to_send())] == [Rep.ERR_INVALID]


@pytest.mark.parametrize("option", [Opt.STRUCTURED_REPLY, Opt.STARTTLS, Opt.SET_META_CONTEXT,
                                    Opt.LIST_META_CONTEXT, Opt.EXTENDED_HEADERS, Opt.PEEK_EXPORT, 0, 12345])
def test_unsupported_options_are_refused_with_err_unsup(option: int) -> None:
    conn = new_conn()
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE) + opt(option, b"\x00\x00\x00\x04base"))
    assert drain(conn) == []
    [(o, t, _msg)] = opt_replies(conn.data_to_send())
    assert (o, t) == (option, Rep.ERR_UNSUP)


def test_huge_unknown_option_is_skipped_without_buffering() -> None:
    conn = new_conn()
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE)
                      + struct.pack(">QII", IHAVEOPT, 4242, 0xFFFFFFFF))
    chunk = bytes(MiB)
    for _ in range(16):
        conn.receive_data(chunk)
        assert drain(conn) == []
        assert conn.buffered == 0
    assert conn.data_to_send() == b""          # answered only once it is all skipped


def test_oversized_go_is_too_big_and_abort_is_acked() -> None:
    conn = new_conn()
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE) + opt(Opt.GO, bytes(64 * 1024)))
    assert drain(conn) == []
    assert [t for _, t, _ in opt_replies(conn.data_to_send())] == [Rep.ERR_TOO_BIG]
    conn.receive_data(opt(Opt.ABORT, b"ignored"))
    assert drain(conn) == [Disconnect("NBD_OPT_ABORT")]
    assert opt_replies(conn.data_to_send()) == [(Opt.ABORT, Rep.ACK, b"")]
    assert conn.closed


def test_bad_option_magic_is_a_protocol_error() -> None:
    conn = new_conn()
    conn.receive_data(struct.pack(">I", 1) + struct.pack(">QII", 0x1234, Opt.GO, 0))
    assert isinstance(drain(conn)[0], ProtocolError)


def test_export_name_longer_than_the_spec_limit_is_fatal() -> None:
    conn = new_conn()
    conn.receive_data(struct.pack(">I", 1) + struct.pack(">QII", IHAVEOPT, Opt.EXPORT_NAME, 5000))
    assert isinstance(drain(conn)[0], ProtocolError)


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


# --- the file-backed device ------------------------------------------------------------


def _wait(submit: Any, *args: Any) -> tuple[Any, ...]:
    box: list[tuple[Any, ...]] = []
    done = threading.Event()

    def cb(*res: Any) -> None:
        res = tuple(bytes(r[0]) if isinstance(r, list) and r else r for r in res)
        box.append(res + (threading.get_ident(),))
        done.set()

    submit(*args, cb)
    assert done.wait(30)
    return box[0]


def test_file_device_completes_on_other_threads_and_validates(tmp_path: Any) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(64 * 1024) + b"tail")          # tail is not a whole sector
    with FileBlockDevice(img, 512, workers=3) as dev:
        assert isinstance(dev, BlockDevice)
        assert dev.size == 64 * 1024 and dev.can_flush and dev.can_write_zeroes
        err, data, tid = _wait(dev.submit_read, 512, 1024)
        assert err == 0 and data == img.read_bytes()[512:1536] and tid != threading.get_ident()
        assert _wait(dev.submit_write, 0, memoryview(b"x" * 512), True)[0] == 0
        assert img.read_bytes()[:512] == b"x" * 512
        assert _wait(dev.submit_read, 64 * 1024 - 512, 1024)[0] == errno.EINVAL
        assert _wait(dev.submit_write_zeroes, 0, 4096, False)[0] == 0
        assert img.read_bytes()[:4096] == bytes(4096)
        assert _wait(dev.submit_flush)[0] == 0
    with FileBlockDevice(img, 4096, read_only=True) as ro:
        assert ro.size == 64 * 1024 and not ro.can_trim and not ro.can_write_zeroes
        assert _wait(ro.submit_write, 0, memoryview(bytes(4096)), False)[0] == errno.EPERM
    box: list[int] = []
    dev.submit_flush(box.append)                          # closed device: ESHUTDOWN, inline
    assert box == [errno.ESHUTDOWN]


# --- integration: real sockets, real clients ------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="nbd-", dir="/tmp")        # short: sun_path is 108 bytes
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def serving(tmp_path: Any, sock_dir: str, content: bytes | None = None, size: int = 8 * MiB,
            sector_size: int = 512, read_only: bool = False, export_name: str = "",
            device: Any = None, **server_kw: Any) -> Iterator[tuple[NbdServer, str, str]]:
    """Serve an image; on exit close everything and check no thread leaked."""
    img = str(tmp_path / "disk.img")
    with open(img, "wb") as f:
        if content is not None:
            f.write(content)
        else:
            f.truncate(size)
    before = set(threading.enumerate())
    dev = FileBlockDevice(img, sector_size, read_only, scribble=True)
    sock = os.path.join(sock_dir, "nbd.sock")
    srv = NbdServer(sock, device(dev) if device else dev, export_name, **server_kw)
    try:
        srv.start()
        yield srv, img, sock
    finally:
        srv.close()
        dev.close()
    assert not os.path.exists(sock)
    leaked = [t for t in threading.enumerate() if t not in before]
    assert not leaked, f"threads left running: {leaked}"


def uri(sock: str, name: str = "") -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def need(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"{t} is not installed")


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    # cwd=/tmp: tools like fio drop state files in their working directory.
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=100, cwd=tempfile.gettempdir())
    if ok:
        assert res.returncode == 0, f"{args[0]} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def nbdinfo_json(sock: str, name: str = "") -> dict[str, Any]:
    out = json.loads(run("nbdinfo", "--json", uri(sock, name)).stdout)
    [export] = out["exports"]
    return export


def test_nbdinfo_reports_size_block_sizes_and_flags(tmp_path: Any, sock_dir: str) -> None:
    need("nbdinfo")
    with serving(tmp_path, sock_dir, size=8 * MiB + 3 * 512) as (_srv, _img, sock):
        e = nbdinfo_json(sock)
        assert e["export-size"] == 8 * MiB + 3 * 512
        assert (e["block_size_minimum"], e["block_size_preferred"], e["block_size_maximum"]) == \
            (512, 4096, 32 * MiB)
        assert e["is_read_only"] is False
        assert e["can_flush"] and e["can_fua"] and e["can_trim"] and e["can_zero"]
        assert e["can_multi_conn"] is True                 # FileBlockDevice shares one page cache
        assert not e["can_df"] and not e["can_fast_zero"] and not e["can_cache"]


def test_nbdinfo_list_and_named_exports(tmp_path: Any, sock_dir: str) -> None:
    need("nbdinfo")
    with serving(tmp_path, sock_dir, export_name="vda") as (_srv, _img, sock):
        listed = json.loads(run("nbdinfo", "--list", "--json", uri(sock)).stdout)
        assert [e["export-name"] for e in listed["exports"]] == ["vda"]
        assert nbdinfo_json(sock, "vda")["export-size"] == 8 * MiB
        res = run("nbdinfo", uri(sock, "nope"), ok=False)      # NBD_REP_ERR_UNKNOWN
        assert res.returncode != 0


def test_4096_byte_sectors_advertise_min_block_4096_and_qemu_obeys(tmp_path: Any, sock_dir: str) -> None:
    need("nbdinfo", "qemu-io")
    content = os.urandom(4 * MiB)
    with serving(tmp_path, sock_dir, content=content, sector_size=4096) as (_srv, img, sock):
        e = nbdinfo_json(sock)
        assert (e["block_size_minimum"], e["block_size_preferred"]) == (4096, 4096)
        # A 512-byte write is legal for qemu only as read-modify-write of 4 KiB.
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 512 512", uri(sock))
        with open(img, "rb") as f:
            got = f.read()
        assert got == content[:512] + b"\x5a" * 512 + content[1024:]


def test_qemu_img_convert_out_of_the_export_is_byte_identical(tmp_path: Any, sock_dir: str) -> None:
    need("qemu-img")
    content = os.urandom(8 * MiB + 5 * 512)
    with serving(tmp_path, sock_dir, content=content) as (_srv, _img, sock):
        out = tmp_path / "out.raw"
        run("qemu-img", "convert", "-O", "raw", uri(sock), str(out))
        assert out.read_bytes() == content


def test_nbdcopy_into_the_export_then_compare(tmp_path: Any, sock_dir: str) -> None:
    need("nbdcopy")
    src = tmp_path / "src.raw"
    data = os.urandom(16 * MiB)
    src.write_bytes(data)
    with serving(tmp_path, sock_dir, size=16 * MiB) as (_srv, img, sock):
        run("nbdcopy", "--flush", str(src), uri(sock))     # multi-conn: several connections at once
        with open(img, "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()


def test_fio_randwrite_with_crc32c_verify_at_iodepth_16(tmp_path: Any, sock_dir: str) -> None:
    need("fio")
    engines = run("fio", "--enghelp").stdout
    if "nbd" not in engines.split():
        pytest.skip("this fio has no nbd ioengine")
    with serving(tmp_path, sock_dir, size=16 * MiB) as (_srv, _img, sock):
        res = run("fio", "--name=nbdverify", "--ioengine=nbd", f"--uri={uri(sock)}",
                  "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M",
                  "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--runtime=60",
                  "--output-format=json")
        out = json.loads(res.stdout[res.stdout.index("{"):])
        [job] = out["jobs"]
        assert job["error"] == 0
        assert job["write"]["io_bytes"] == 16 * MiB
        assert job["read"]["io_bytes"] == 16 * MiB         # the verify pass read it all back


def test_trim_punches_a_hole_and_no_hole_zeroing_does_not(tmp_path: Any, sock_dir: str) -> None:
    need("qemu-io")
    content = os.urandom(12 * MiB)
    with serving(tmp_path, sock_dir, content=content) as (srv, img, sock):
        if not srv.device.can_trim:
            pytest.skip(f"the filesystem under {tmp_path} cannot punch holes")
        region = 4 * MiB // 512                     # st_blocks counts 512-byte units
        full = os.stat(img).st_blocks
        run("qemu-io", "-f", "raw", "-c", "discard 0 4M", uri(sock))                # NBD_CMD_TRIM
        after_trim = os.stat(img).st_blocks
        assert after_trim <= full - region
        run("qemu-io", "-f", "raw", "-c", "write -z -u 4M 4M", uri(sock))         # WRITE_ZEROES, may trim
        after_unmap = os.stat(img).st_blocks
        assert after_unmap <= after_trim - region
        run("qemu-io", "-f", "raw", "-c", "write -z 0 4M", uri(sock))             # WRITE_ZEROES + NO_HOLE
        assert os.stat(img).st_blocks >= after_unmap + region   # real zeroes: allocated again
        with open(img, "rb") as f:
            got = f.read()
        assert got[:8 * MiB] == bytes(8 * MiB) and got[8 * MiB:] == content[8 * MiB:]


def test_read_only_export_refuses_writes_from_real_clients(tmp_path: Any, sock_dir: str) -> None:
    need("nbdinfo", "qemu-img", "nbdcopy")
    content = os.urandom(4 * MiB)
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(4 * MiB))
    with serving(tmp_path, sock_dir, content=content, read_only=True) as (_srv, img, sock):
        e = nbdinfo_json(sock)
        assert e["is_read_only"] is True and not e["can_trim"] and not e["can_zero"]
        assert run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri(sock), ok=False).returncode
        assert run("nbdcopy", str(src), uri(sock), ok=False).returncode
        out = tmp_path / "out.raw"
        run("qemu-img", "convert", "-O", "raw", uri(sock), str(out))              # reading still works
        assert out.read_bytes() == content
        with open(img, "rb") as f:
            assert f.read() == content


# --- integration: a raw client for what well-behaved tools never do ------------------------------


class RawClient:
    """Just enough of an NBD client to misbehave on purpose."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)                  # a hang fails the test instead of blocking it
        self.sock.connect(path)
        self.pending: dict[int, tuple[int, int]] = {}

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"server closed after {len(buf)}/{n} bytes")
            buf += chunk
        return bytes(buf)

    def handshake(self, name: bytes = b"") -> tuple[int, int]:
        magic, ihave, hflags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, ihave) == (NBDMAGIC, IHAVEOPT) and hflags & FLAG_FIXED_NEWSTYLE
        self.sock.sendall(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))
        self.sock.sendall(opt(Opt.GO, go_data(name, (Info.BLOCK_SIZE,))))
        infos = {}
        while True:
            magic, _o, rtype, ln = struct.unpack(">QIII", self.recv_exact(20))
            payload = self.recv_exact(ln)
            if rtype == Rep.ACK:
                break
            assert rtype == Rep.INFO, rtype
            infos[struct.unpack(">H", payload[:2])[0]] = payload[2:]
        return struct.unpack(">QH", infos[Info.EXPORT])

    def send(self, kind: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0,
             payload: bytes = b"") -> None:
        self.pending[handle] = (kind, length)
        self.sock.sendall(req(kind, handle, offset, length, flags, payload))

    def reply(self) -> tuple[int, int, bytes]:
        magic, err, handle = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC
        kind, length = self.pending.pop(handle)
        data = self.recv_exact(length) if kind == Cmd.READ and err == 0 else b""
        return handle, err, data

    def close(self) -> None:
        self.sock.close()


def test_pipelined_requests_are_matched_by_handle(tmp_path: Any, sock_dir: str) -> None:
    content = os.urandom(8 * MiB)
    with serving(tmp_path, sock_dir, content=content) as (_srv, img, sock):
        c = RawClient(sock)
        assert c.handshake()[0] == 8 * MiB
        expected = {}
        for h in range(64):
            off = (h * 7919 % 128) * 65536
            if h % 3 == 0:
                data = os.urandom(65536)
                c.send(Cmd.WRITE, 1000 + h, 4 * MiB + h * 65536 % (4 * MiB), 65536, CmdFlag.FUA * (h % 2), data)
                expected[1000 + h] = b""
            else:
                c.send(Cmd.READ, h, off % (4 * MiB), 65536)
                expected[h] = content[off % (4 * MiB):off % (4 * MiB) + 65536]
        c.send(Cmd.FLUSH, 5000)
        expected[5000] = b""
        got = {}
        while c.pending:
            h, err, data = c.reply()
            assert err == 0
            got[h] = data
        assert got == expected
        c.send(Cmd.DISC, 0)
        assert c.sock.recv(1) == b""                  # server closes after DISC
        c.close()


def test_several_clients_at_once(tmp_path: Any, sock_dir: str) -> None:
    need("nbdinfo")
    with serving(tmp_path, sock_dir, size=8 * MiB) as (_srv, img, sock):
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                c = RawClient(sock)
                c.handshake()
                base = i * MiB
                blobs = {h: os.urandom(4096) for h in range(32)}
                for h, b in blobs.items():
                    c.send(Cmd.WRITE, h, base + h * 4096, 4096, 0, b)
                while c.pending:
                    assert c.reply()[1] == 0
                for h in blobs:
                    c.send(Cmd.READ, h, base + h * 4096, 4096)
                while c.pending:
                    h, err, data = c.reply()
                    assert err == 0 and data == blobs[h]
                c.send(Cmd.DISC, 0)
                c.close()
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        nbdinfo_json(sock)                              # a real client in the middle of it
        for t in threads:
            t.join()
        assert not errors, errors


def test_client_vanishing_mid_request_does_not_hurt_the_server(tmp_path: Any, sock_dir: str) -> None:
    need("nbdinfo")
    with serving(tmp_path, sock_dir, size=8 * MiB) as (srv, _img, sock):
        # Half a write payload, then gone.
        c = RawClient(sock)
        c.handshake()
        c.sock.sendall(req(Cmd.WRITE, 1, 0, MiB) + bytes(MiB // 2))
        c.close()
        # Many large reads in flight, replies never read, then gone.
        c = RawClient(sock)
        c.handshake()
        for h in range(32):
            c.send(Cmd.READ, h, (h % 8) * MiB, MiB)
        c.close()
        # Gone in the middle of the handshake.
        c = RawClient(sock)
        c.recv_exact(18)
        c.sock.sendall(struct.pack(">I", 1) + opt(Opt.GO)[:10])
        c.close()
        assert nbdinfo_json(sock)["export-size"] == 8 * MiB
    # serving() checked that every connection thread ended.


def test_protocol_violation_gets_a_hard_disconnect(tmp_path: Any, sock_dir: str) -> None:
    with serving(tmp_path, sock_dir) as (_srv, _img, sock):
        c = RawClient(sock)
        c.handshake()
        c.send(Cmd.READ, 1, 0, 4096)
        c.sock.sendall(struct.pack(">I", 0x12345678) + bytes(24))
        # The server may or may not get the read's reply out first; it must
        # then close the connection.
        with pytest.raises((EOFError, ConnectionResetError)):
            while True:
                c.reply()
        c.close()


def test_oversized_write_is_refused_and_the_connection_survives(tmp_path: Any, sock_dir: str) -> None:
    with serving(tmp_path, sock_dir) as (_srv, _img, sock):
        c = RawClient(sock)
        c.handshake()
        length = MAX_BLOCK_SIZE + 4096
        c.pending[7] = (Cmd.WRITE, length)
        c.sock.sendall(req(Cmd.WRITE, 7, 0, length))
        chunk = bytes(MiB)
        for _ in range(length // MiB):
            c.sock.sendall(chunk)
        c.sock.sendall(bytes(length % MiB))
        assert c.reply() == (7, NbdErr.EINVAL, b"")
        c.send(Cmd.READ, 8, 0, 4096)
        assert c.reply() == (8, 0, bytes(4096))
        c.close()


def test_close_finishes_connected_clients(tmp_path: Any, sock_dir: str) -> None:
    with serving(tmp_path, sock_dir) as (srv, _img, sock):
        idle = RawClient(sock)
        idle.handshake()
        busy = RawClient(sock)
        busy.handshake()
        busy.send(Cmd.READ, 1, 0, 4096)
        assert busy.reply()[1] == 0
        srv.close()
        assert idle.sock.recv(1) == b""
        assert busy.sock.recv(1) == b""
        idle.close()
        busy.close()


class _FaultyDevice:
    """Wraps a device to misbehave: short reads, exceptions, double and
    synchronous completions -- what a buggy frontend might do."""

    def __init__(self, inner: FileBlockDevice) -> None:
        self._inner = inner
        for a in ("size", "sector_size", "read_only", "can_trim", "can_write_zeroes", "can_flush",
                  "can_multi_conn"):
            setattr(self, a, getattr(inner, a))

    def submit_read(self, offset: int, length: int, done: Any) -> None:
        if offset == 0:
            done(0, [b"short"])                          # wrong length, inline
        elif offset == 4096:
            raise RuntimeError("device exploded")
        else:
            self._inner.submit_read(offset, length, done)

    def submit_write(self, offset: int, data: memoryview, fua: bool, done: Any) -> None:
        done(0)                                          # twice: the second must be ignored
        done(errno.EIO)

    def submit_flush(self, done: Any) -> None:
        done(errno.EDQUOT)

    def submit_trim(self, offset: int, length: int, done: Any) -> None:
        self._inner.submit_trim(offset, length, done)

    def submit_write_zeroes(self, offset: int, length: int, may_trim: bool, done: Any) -> None:
        self._inner.submit_write_zeroes(offset, length, may_trim, done)


def test_misbehaving_device_yields_errors_not_a_broken_stream(tmp_path: Any, sock_dir: str) -> None:
    with serving(tmp_path, sock_dir, device=_FaultyDevice) as (_srv, _img, sock):
        c = RawClient(sock)
        c.handshake()
        c.send(Cmd.READ, 1, 0, 4096)
        assert c.reply() == (1, NbdErr.EIO, b"")
        c.send(Cmd.READ, 2, 4096, 4096)
        assert c.reply() == (2, NbdErr.EIO, b"")
        c.send(Cmd.WRITE, 3, 0, 512, 0, bytes(512))
        assert c.reply() == (3, 0, b"")
        c.send(Cmd.FLUSH, 4)
        assert c.reply() == (4, NbdErr.ENOSPC, b"")
        c.send(Cmd.TRIM, 5, 0, 4096, CmdFlag.FUA)       # trim, then a flush for FUA
        assert c.reply() == (5, NbdErr.ENOSPC, b"")
        c.send(Cmd.READ, 6, 8192, 4096)
        assert c.reply() == (6, 0, bytes(4096))
        c.close()


class _RingLikeDevice:
    """Shaped like blkfront: ``plug()``/``unplug()`` hold submissions back (nothing runs until unplug),
    and what is pushed completes in one batch inside ``completion_batch()``, on a thread of its own or,
    while a reaper is attached, on the reaper's thread (``completion_fd``/``reap_completions``); a read's
    buffer is scribbled over as soon as its ``done`` returns."""

    def __init__(self, inner: FileBlockDevice) -> None:
        for a in ("size", "sector_size", "read_only", "can_trim", "can_write_zeroes", "can_flush",
                  "can_multi_conn"):
            setattr(self, a, getattr(inner, a))
        self._fd = os.open(inner.path, os.O_RDWR)
        self._lock = threading.Lock()
        self._plugged: set[int] = set()
        self._held: list[Any] = []
        self.threads: list[threading.Thread] = []
        self.plugs = self.batches = 0
        self.in_batch: list[bool] = []
        self.threads_used: set[str] = set()

    def _run(self, ops: list[Any]) -> None:
        self.batches += 1
        with completion_batch():
            for op in ops:
                op()

    def plug(self) -> None:
        with self._lock:
            assert threading.get_ident() not in self._plugged, "plugged twice"
            self._plugged.add(threading.get_ident())
            self.plugs += 1

    def unplug(self) -> None:
        with self._lock:
            self._plugged.remove(threading.get_ident())
        self._push()

    def _push(self) -> None:
        with self._lock:
            ops, self._held = self._held, []
        if ops:
            t = threading.Thread(target=self._run, args=(ops,))
            self.threads.append(t)
            t.start()

    def _submit(self, op: Any) -> None:
        with self._lock:
            self._held.append(op)
            plugged = threading.get_ident() in self._plugged
        if not plugged:
            self._push()

    def submit_read(self, offset: int, length: int, done: Any) -> None:
        def op() -> None:
            buf = bytearray(os.pread(self._fd, length, offset))
            self.in_batch.append(current_completion_batch() is not None)
            self.threads_used.add(threading.current_thread().name)
            done(0, [memoryview(buf)[:length // 2], memoryview(buf)[length // 2:]])
            buf[:] = b"\xa5" * length
        self._submit(op)

    def submit_write(self, offset: int, data: memoryview, fua: bool, done: Any) -> None:
        def op() -> None:
            os.pwrite(self._fd, data, offset)
            done(0)
        self._submit(op)

    def submit_flush(self, done: Any) -> None:
        self._submit(lambda: done(0))

    def submit_trim(self, offset: int, length: int, done: Any) -> None:
        self._submit(lambda: done(0))

    def submit_write_zeroes(self, offset: int, length: int, may_trim: bool, done: Any) -> None:
        self._submit(lambda: done(0))

    def close(self) -> None:
        for t in self.threads:
            t.join()
        os.close(self._fd)


class _ReapedRingDevice(_RingLikeDevice):
    """The same, but what is pushed is left for a reaper while one is attached: it is "answered"
    (queued, the completion descriptor made readable) and runs in ``reap_completions``."""

    def __init__(self, inner: FileBlockDevice) -> None:
        super().__init__(inner)
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._answered: list[Any] = []
        self.reapers = 0

    def completion_fd(self) -> int:
        return self._efd

    def attach_reaper(self) -> None:
        with self._lock:
            self.reapers += 1

    def detach_reaper(self) -> None:
        with self._lock:
            self.reapers -= 1
            answered, self._answered = self._answered, []
        if answered:
            self._run(answered)                         # nobody reaps any more: complete them here

    def reap_completions(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        with self._lock:
            answered, self._answered = self._answered, []
        if answered:
            self._run(answered)

    def _push(self) -> None:
        with self._lock:
            if not self.reapers:
                reap = False
            else:
                reap = True
                ops, self._held = self._held, []
                self._answered += ops
        if reap:
            os.eventfd_write(self._efd, 1)
        else:
            super()._push()

    def close(self) -> None:
        super().close()
        os.close(self._efd)


@pytest.mark.parametrize("reaped", [False, True], ids=["device-threads", "reaped-by-connection"])
def test_plugged_submissions_and_batched_replies(tmp_path: Any, sock_dir: str, reaped: bool) -> None:
    """Replies gathered in a completion batch (small reads copied, large ones sent from the device's
    buffers before ``done`` returns) all arrive, matched by handle, with the right data; the server
    unplugs before it waits for room (else nothing held back would ever complete); a device that
    lets the connection's thread reap has its completions run there."""
    content = os.urandom(8 * MiB)
    devices: list[_RingLikeDevice] = []

    def wrap(inner: FileBlockDevice) -> _RingLikeDevice:
        devices.append((_ReapedRingDevice if reaped else _RingLikeDevice)(inner))
        return devices[0]
    with serving(tmp_path, sock_dir, content=content, device=wrap, max_requests_in_flight=5) as (srv, _i, sock):
        c = RawClient(sock)
        c.handshake()
        expected = {}
        wire = b""
        for h in range(60):
            length = (4096, 512, 256 * 1024, 65536 + 512)[h % 4]
            off = (h * 7919 % 64) * 65536
            if h % 5 == 4:
                data = os.urandom(4096)
                c.pending[h] = (Cmd.WRITE, 4096)
                wire += req(Cmd.WRITE, h, 6 * MiB + h * 4096, 4096, 0, data)
                content = content[:6 * MiB + h * 4096] + data + content[6 * MiB + (h + 1) * 4096:]
                expected[h] = b""
            else:
                c.pending[h] = (Cmd.READ, length)
                wire += req(Cmd.READ, h, off, length)
                expected[h] = content[off:off + length]
        c.pending[99] = (Cmd.FLUSH, 0)
        wire += req(Cmd.FLUSH, 99)
        expected[99] = b""
        c.sock.sendall(wire)                             # many requests per recv(): plugged submissions
        got = {}
        while c.pending:
            h, err, data = c.reply()
            assert err == 0, h
            got[h] = data
        assert got == expected
        for h in range(8):                               # what was written reads back
            c.send(Cmd.READ, h, 6 * MiB + (h * 5 + 4) * 4096, 4096)
        while c.pending:
            h, err, data = c.reply()
            assert err == 0 and data == content[6 * MiB + (h * 5 + 4) * 4096:][:4096]
        c.send(Cmd.DISC, 0)
        assert c.sock.recv(1) == b""
        c.close()
        dev = devices[0]
        assert dev.plugs and dev.batches and all(dev.in_batch)
        if reaped:
            assert {n.split("-")[1] for n in dev.threads_used} == {"conn"}, dev.threads_used
            for _ in range(600):
                if srv.active_connections == 0:
                    break
                threading.Event().wait(0.05)             # the client saw EOF: the thread ends soon after
            assert dev.reapers == 0                      # detached when the connection ended
        dev.close()


@pytest.mark.parametrize("reaped", [False, True], ids=["device-threads", "reaped-by-connection"])
def test_client_that_sends_everything_before_reading_any_reply(tmp_path: Any, sock_dir: str,
                                                               reaped: bool) -> None:
    """Megabytes of writes and of read replies at once, from a client that reads nothing until it has
    sent everything: replies the socket cannot take wait in the output queue, so reading goes on
    and neither side waits for the other."""
    content = os.urandom(32 * MiB)
    devices: list[_RingLikeDevice] = []

    def wrap(inner: FileBlockDevice) -> _RingLikeDevice:
        devices.append((_ReapedRingDevice if reaped else _RingLikeDevice)(inner))
        return devices[0]
    with serving(tmp_path, sock_dir, content=content, device=wrap) as (_srv, _img, sock):
        c = RawClient(sock)
        c.handshake()
        expected = {}
        for h in range(48):                               # 24 MiB each way: more than socket buffers hold
            if h % 2:
                c.send(Cmd.WRITE, h, 16 * MiB + h // 2 * MiB // 2, MiB // 2, 0, os.urandom(MiB // 2))
                expected[h] = b""
            else:
                c.send(Cmd.READ, h, h // 2 * MiB // 2, MiB)
                expected[h] = content[h // 2 * MiB // 2:h // 2 * MiB // 2 + MiB]
        got = {}
        while c.pending:
            h, err, data = c.reply()
            assert err == 0
            got[h] = data
        assert got == expected
        c.close()
        devices[0].close()


class _LendingDevice(_ReapedRingDevice):
    """Also lends memory for WRITE payloads (pieces of 4 KiB, like pages) and takes it back."""

    def __init__(self, inner: FileBlockDevice) -> None:
        super().__init__(inner)
        self.loans: list[Any] = []

    def write_buffer(self, offset: int, length: int) -> Any:
        if length > 2 * MiB:
            return None                                  # the server then uses its own memory
        dev = self

        class Loan:
            def __init__(self) -> None:
                self.pages = [bytearray(min(4096, length - at)) for at in range(0, length, 4096)]
                self.views = [memoryview(p) for p in self.pages]
                self.released = self.submitted = 0

            def release(self) -> None:
                self.released += 1
        loan = Loan()
        with self._lock:
            dev.loans.append(loan)
        return loan

    def submit_write_buffer(self, offset: int, buffer: Any, fua: bool, done: Any) -> None:
        buffer.submitted += 1

        def op() -> None:
            os.pwrite(self._fd, b"".join(buffer.pages), offset)
            done(0)
        self._submit(op)


def test_write_payloads_received_into_the_devices_memory(tmp_path: Any, sock_dir: str) -> None:
    content = os.urandom(8 * MiB)
    devices: list[_LendingDevice] = []

    def wrap(inner: FileBlockDevice) -> _LendingDevice:
        devices.append(_LendingDevice(inner))
        return devices[0]
    with serving(tmp_path, sock_dir, content=content, device=wrap) as (srv, img, sock):
        c = RawClient(sock)
        c.handshake()
        model = bytearray(content)
        for h, length in enumerate((512, 4096, 65536 + 512, MiB, 3 * MiB, 4096)):
            data = os.urandom(length)
            off = (h * 1237 % 4) * MiB
            c.send(Cmd.WRITE, h, off, length, 0, data)
            model[off:off + length] = data
        while c.pending:
            assert c.reply()[1] == 0
        c.send(Cmd.READ, 99, 0, 8 * MiB)
        assert c.reply() == (99, 0, bytes(model))
        # A client gone half way through a payload: the memory lent for it goes back.
        c.sock.sendall(req(Cmd.WRITE, 100, 0, MiB) + bytes(MiB // 3))
        c.close()
        for _ in range(600):
            if srv.active_connections == 0:
                break
            threading.Event().wait(0.05)
        dev = devices[0]
        loans = dev.loans
        assert all(loan.released + loan.submitted == 1 for loan in loans), \
            [(loan.released, loan.submitted) for loan in loans]
        assert loans[-1].released == 1 and sum(loan.submitted for loan in loans) >= 2
        dev.close()
    with open(img, "rb") as f:
        assert f.read() == bytes(model)


def test_client_that_stops_reading_is_disconnected_after_the_send_timeout(tmp_path: Any, sock_dir: str) -> None:
    with serving(tmp_path, sock_dir, send_timeout=0.5) as (srv, _img, sock):
        c = RawClient(sock)
        c.handshake()
        for h in range(40):                               # 40 MiB of replies nobody reads
            c.send(Cmd.READ, h, (h % 8) * MiB, MiB)
        for _ in range(600):
            if srv.active_connections == 0:
                break
            threading.Event().wait(0.05)                 # waiting for the server to give up on it
        assert srv.active_connections == 0
        c.close()


def test_socket_mode_stale_sockets_and_refusals(tmp_path: Any, sock_dir: str) -> None:
    path = os.path.join(sock_dir, "nbd.sock")
    # A socket file left behind by a dead server is replaced.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    with serving(tmp_path, sock_dir) as (srv, _img, sock):
        assert sock == path
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        # ... but a live one is not, nor is a path that is not a socket.
        other = NbdServer(sock, srv.device)
        with pytest.raises(FileExistsError):
            other.start()
        other.close()
    plain = os.path.join(sock_dir, "plain")
    open(plain, "w").close()
    with pytest.raises(FileExistsError):
        NbdServer(plain, _DummyDevice()).start()
    with serving(tmp_path, sock_dir, mode=0o660) as (_srv, _img, sock):
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660


class _DummyDevice:
    size = 4096
    sector_size = 512
    read_only = True
    can_trim = can_write_zeroes = can_multi_conn = False
    can_flush = True
