"""Option haggling: the fixed newstyle handshake's greeting and its answer to every option.

Pure functions of the ``Export`` and what the client sent, returning the
bytes to send; the receive state machine (``protocol``) decides when an
option's data has arrived and whether transmission begins.  What the server
answers:

* ``NBD_OPT_EXPORT_NAME``: size and transmission flags (and the 124 zero
  bytes unless the client asked for ``NBD_FLAG_C_NO_ZEROES``);
* ``NBD_OPT_INFO``/``NBD_OPT_GO``: ``NBD_INFO_EXPORT``, ``NBD_INFO_BLOCK_SIZE``
  always, ``NBD_INFO_NAME`` on request;
* ``NBD_OPT_LIST``: the one export; ``NBD_OPT_ABORT``: an ACK;
* everything else (structured replies, TLS, metadata contexts, extended
  headers): ``NBD_REP_ERR_UNSUP``, which every client must accept and fall
  back from.
"""

from __future__ import annotations

import struct

from .export import Export
from .wire import (
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_STRING,
    NBDMAGIC,
    OPT_REPLY,
    OPTION_REPLY_MAGIC,
    U16,
    U32,
    Info,
    Opt,
    Rep,
)

__all__ = ["GREETING", "client_no_zeroes", "option_reply", "option_error", "unsupported_option",
           "export_name_reply", "info_go_replies", "list_replies"]

#: What the server says first: fixed newstyle, and it can leave out the zeroes.
GREETING = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def client_no_zeroes(flags: int) -> bool | None:
    """Whether the client's handshake flags ask for no zeroes; None if they carry unknown bits
    (the spec: the server MUST drop the connection then).

    A client without C_FIXED_NEWSTYLE gets fixed-newstyle replies anyway (the
    spec lets servers honour it); old clients only ever send EXPORT_NAME,
    which has the same answer in both."""
    if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
        return None
    return bool(flags & FLAG_C_NO_ZEROES)


def option_reply(opt: int, rep: Rep, data: bytes = b"") -> bytes:
    return OPT_REPLY.pack(OPTION_REPLY_MAGIC, opt, rep, len(data)) + data


def option_error(opt: int, rep: Rep, message: str) -> bytes:
    return option_reply(opt, rep, message.encode("utf-8")[:MAX_STRING])


def unsupported_option(opt: int) -> bytes:
    name = Opt(opt).name if opt in Opt._value2member_map_ else str(opt)
    return option_error(opt, Rep.ERR_UNSUP, f"option {name} not supported")


def export_name_reply(export: Export, name: bytes, no_zeroes: bool) -> bytes | None:
    """The answer to ``NBD_OPT_EXPORT_NAME``, which ends haggling; None for an unknown export
    (this option cannot be answered with an error: the connection is dropped)."""
    if name != export.name_bytes:
        return None
    reply = struct.pack(">QH", export.size, export.tflags)
    return reply if no_zeroes else reply + bytes(124)


def info_go_replies(export: Export, opt: int, data: bytes) -> tuple[bytes, bool]:
    """The answer to ``NBD_OPT_INFO``/``NBD_OPT_GO`` with option data ``data``, and whether it
    succeeded (a GO that succeeds ends haggling)."""
    if len(data) < 6:
        return option_error(opt, Rep.ERR_INVALID, "option data too short"), False
    (nlen,) = U32.unpack_from(data, 0)
    if nlen > len(data) - 6:
        return option_error(opt, Rep.ERR_INVALID, "export name length exceeds option data"), False
    name = data[4:4 + nlen]
    rest = data[4 + nlen:]
    (nreq,) = U16.unpack_from(rest, 0)
    if len(rest) != 2 + 2 * nreq:
        return option_error(opt, Rep.ERR_INVALID,
                            "information request count does not match option length"), False
    requests = set(struct.unpack_from(f">{nreq}H", rest, 2))
    if name != export.name_bytes:
        return option_error(opt, Rep.ERR_UNKNOWN, "unknown export"), False
    out = option_reply(opt, Rep.INFO, INFO_EXPORT.pack(Info.EXPORT, export.size, export.tflags))
    if Info.NAME in requests:
        out += option_reply(opt, Rep.INFO, U16.pack(Info.NAME) + export.name_bytes)
    # Sent even when not requested (the spec allows it): a client that did
    # not ask may still use it, and unaligned requests are refused cleanly.
    out += option_reply(opt, Rep.INFO, INFO_BLOCK_SIZE.pack(
        Info.BLOCK_SIZE, export.min_block, export.pref_block, export.max_block))
    return out + option_reply(opt, Rep.ACK), True


def list_replies(export: Export, length: int) -> bytes:
    """The answer to ``NBD_OPT_LIST`` with ``length`` bytes of (skipped) data."""
    if length:
        return option_error(Opt.LIST, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
    return (option_reply(Opt.LIST, Rep.SERVER, U32.pack(len(export.name_bytes)) + export.name_bytes)
            + option_reply(Opt.LIST, Rep.ACK))
