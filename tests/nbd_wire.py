"""Building and reading NBD messages by hand, for the tests of the sans-IO protocol and the raw client.

``new_conn``/``ready_conn`` make protocol objects (``ready_conn``: through
``NBD_OPT_GO``, output drained); the rest pack what a client sends and split
what the server answers.
"""

from __future__ import annotations

import struct
from typing import Any

from xdom.domains.nbd.events import Ready
from xdom.domains.nbd.protocol import NbdServerConnection
from xdom.domains.nbd.wire import (
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    IHAVEOPT,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    Info,
    Opt,
)

MiB = 1024 * 1024
SIZE = 1 * MiB


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
