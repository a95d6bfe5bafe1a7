"""Hostile clients on xenstored's socket: the offender gets errors or is
dropped, everyone else keeps being served, memory stays bounded."""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator

import pytest
from helpers import wait_until
from xs_fixtures import RawConn, Xenstored, start_xenstored

from xdom.domains.abi.xs_wire import HEADER, XENSTORE_PAYLOAD_MAX, XsType


@pytest.fixture
def xsd(run_dir: str) -> Iterator[Xenstored]:
    x = start_xenstored(run_dir)
    try:
        yield x
        assert x.proc.poll() is None, "xenstored died"
    finally:
        x.stop()


@pytest.fixture
def bystander(xsd: Xenstored) -> Iterator[RawConn]:
    c = RawConn(xsd.socket_path)
    assert c.call(XsType.XS_WRITE, b"/by/stander\0alive").payload == b"OK\0"
    try:
        yield c
        assert c.call(XsType.XS_READ, b"/by/stander\0").payload == b"alive"
    finally:
        c.close()


def test_random_bytes_only_hurt_the_sender(xsd: Xenstored, bystander: RawConn) -> None:
    rng = random.Random(7)
    for _ in range(30):
        c = RawConn(xsd.socket_path, timeout=2)
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000)))
        try:
            c.sock.sendall(blob)
            c.sock.shutdown(1)
            while True:           # read whatever comes back until it closes
                if not c.sock.recv(65536):
                    break
        except (OSError, EOFError):
            pass
        finally:
            c.close()
        assert bystander.call(XsType.XS_READ, b"/by/stander\0").payload == b"alive"


def test_oversized_length_drops_the_connection(xsd: Xenstored, bystander: RawConn) -> None:
    c = RawConn(xsd.socket_path)
    c.sock.sendall(HEADER.pack(XsType.XS_WRITE, 1, 0, XENSTORE_PAYLOAD_MAX + 1))
    with pytest.raises((EOFError, ConnectionResetError)):
        c.recv()
    c.close()


def test_truncated_header_waits_then_nothing_breaks(xsd: Xenstored, bystander: RawConn) -> None:
    c = RawConn(xsd.socket_path)
    c.sock.sendall(HEADER.pack(XsType.XS_READ, 1, 0, 10)[:7])
    assert bystander.call(XsType.XS_DIRECTORY, b"/by\0").payload == b"stander\0"
    c.close()


@pytest.mark.parametrize("payload,error", [
    (b"/bad//path\0", b"EINVAL\0"),
    (b"relative/../x\0", b"EINVAL\0"),
    (b"/x" * 2000 + b"\0", b"EINVAL\0"),
    (b"", b"EINVAL\0"),
    (b"/no-nul", None),
])
def test_bad_paths_get_errors(xsd: Xenstored, bystander: RawConn, payload: bytes, error: bytes | None) -> None:
    c = RawConn(xsd.socket_path)
    reply = c.call(XsType.XS_READ, payload)
    assert reply.type == XsType.XS_ERROR
    if error:
        assert reply.payload == error
    c.close()


@pytest.mark.parametrize("type_", [20, 27, 100, 0xFFFF, 2**31])
def test_unknown_types_are_answered(xsd: Xenstored, bystander: RawConn, type_: int) -> None:
    c = RawConn(xsd.socket_path)
    reply = c.call(type_, b"/x\0")
    assert reply.type == XsType.XS_ERROR
    assert reply.payload in (b"ENOSYS\0", b"EINVAL\0")
    c.close()


def test_client_that_never_reads_is_dropped_and_memory_stays_bounded(xsd: Xenstored, bystander: RawConn) -> None:
    bystander.call(XsType.XS_WRITE, b"/big\0" + b"x" * 4000)
    greedy = RawConn(xsd.socket_path)
    greedy.sock.setblocking(False)
    rss_before = xsd.rss()
    req = struct.pack("<IIII", XsType.XS_READ, 1, 0, 5) + b"/big\0"
    sent = 0
    try:
        for _ in range(20000):
            greedy.sock.send(req * 50)
            sent += 50
    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
        pass
    # xenstored stops reading it, or drops it; either way the bystander is served
    assert bystander.call(XsType.XS_READ, b"/by/stander\0").payload == b"alive"
    assert xsd.rss() - rss_before < 64 << 20
    greedy.close()


def test_watch_event_flood_is_bounded(xsd: Xenstored, bystander: RawConn) -> None:
    watcher = RawConn(xsd.socket_path)
    watcher.call(XsType.XS_WATCH, b"/flood\0tok\0")      # and never read the events
    rss_before = xsd.rss()
    for i in range(3000):
        bystander.call(XsType.XS_WRITE, b"/flood/n%d\0" % (i % 50) + b"v" * 1000)
    assert xsd.rss() - rss_before < 64 << 20
    watcher.close()


def test_transaction_touching_thousands_of_nodes(xsd: Xenstored, bystander: RawConn) -> None:
    c = RawConn(xsd.socket_path)
    tx = int(c.call(XsType.XS_TRANSACTION_START, b"\0").payload.rstrip(b"\0"))
    for i in range(3000):
        reply = c.call(XsType.XS_WRITE, b"/tx/n%d\0v" % i, tx)
        assert reply.type in (XsType.XS_WRITE, XsType.XS_ERROR)
    end = c.call(XsType.XS_TRANSACTION_END, b"T\0", tx)
    assert end.type in (XsType.XS_TRANSACTION_END, XsType.XS_ERROR)
    assert bystander.call(XsType.XS_READ, b"/by/stander\0").payload == b"alive"
    c.close()


def test_many_idle_connections(xsd: Xenstored, bystander: RawConn) -> None:
    conns = [RawConn(xsd.socket_path) for _ in range(200)]
    assert bystander.call(XsType.XS_READ, b"/by/stander\0").payload == b"alive"
    for c in conns:
        c.close()
    wait_until(lambda: len(os.listdir(f"/proc/{xsd.proc.pid}/fd")) < 50, what="xenstored to close them")
