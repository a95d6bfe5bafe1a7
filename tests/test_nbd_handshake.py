"""The NBD protocol's option haggling, byte for byte: the greeting, every option, and what ends it.

The protocol object is fed what a client sends (no socket), so each answer
can be checked against the spec exactly.
"""

from __future__ import annotations

import struct

import pytest
from nbd_wire import SIZE, MiB, drain, go_data, new_conn, opt, opt_replies, req

from xdom.domains.nbd.events import Disconnect, ProtocolError, Ready, Request
from xdom.domains.nbd.wire import (
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    MAX_BLOCK_SIZE,
    NBDMAGIC,
    Cmd,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)

pytestmark = pytest.mark.timeout(120)


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
