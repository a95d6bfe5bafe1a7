"""Hostile hypercall connections: frame sizes, descriptors, and connections that misbehave as a whole.

Oversized frames, file descriptors nobody asked for, a client that never
reads its replies, piles of connections that never say hello, empty frames,
all of it at once, and a domain that tries to change its grant table or a
mapped frame under the broker; sent by hand (tests/hypercall_client.py)
while two well-behaved domains keep being served.  The broker drops only
the connection at fault and survives.
"""

from __future__ import annotations

import os
import random
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_until  # noqa: E402
from hypercall_client import (
    HELLO_TIMEOUT,
    PENDING_LIMIT,
    BrokerClosed,
    Bystanders,
    Raw,
    pack,
    raw_connections,
    served_bystanders,
    wire_verdict,
)

from xdom.broker.mgmt_client import ManagementClient
from xdom.deploy.launcher import BrokerProcess
from xdom.domains.abi.event_channel import (
    DOMID_SELF,
    EVTCHNSTAT_unbound,
)
from xdom.domains.abi.grant_table import (
    PAGE_SIZE,
    GNTST_okay,
)
from xdom.domains.abi.hypercall_wire import (
    MAX_FDS,
    MAX_MESSAGE,
)
from xdom.domains.xenhost import BrokerXenHost


@pytest.fixture
def bystanders(broker: BrokerProcess, mgmt: ManagementClient) -> Iterator[Bystanders]:
    yield from served_bystanders(broker, mgmt)


@pytest.fixture
def raw(mgmt: ManagementClient) -> Iterator[Raw]:
    yield from raw_connections(mgmt)


# ---- framing: sizes and descriptors ------------------------------------------


def _padded(size: int) -> bytes:
    """A frame of exactly ``size`` bytes: a request with extra (refused) padding fields."""
    for filler in range(8):
        msg: dict[str, Any] = {"op": "domain_info", "domid": DOMID_SELF, "f": "f" * filler}
        i = 0
        while len(pack(msg)) + 4200 < size:
            msg[f"p{i}"] = b"x" * 4000
            i += 1
        for n in range(4097):
            frame = pack({**msg, "last": b"x" * n})
            if len(frame) == size:
                return frame
            if len(frame) > size:
                break
    raise AssertionError(f"cannot pad a frame to {size} bytes")


def test_oversized_frames_are_emsgsize(raw: Raw, bystanders: Bystanders) -> None:
    pre, _ = raw.fresh()
    conn, _ = raw.running()
    exact = _padded(MAX_MESSAGE)
    assert len(exact) == MAX_MESSAGE
    conn.expect(exact, "EINVAL")         # a full-size frame is read whole and judged on its content
    for size in (MAX_MESSAGE + 1, MAX_MESSAGE + 2, 100 * 1024, 160 * 1024):
        frame = _padded(size) if size <= MAX_MESSAGE + 2 else b"\xc1" * size
        for c in (conn, pre):
            c.expect(frame, "EMSGSIZE")
    bystanders.check()


def _pipe_closed(rfd: int, timeout: float = 5.0) -> bool:
    """True once every write end of the pipe is closed (EOF on the read end)."""
    r, _, _ = select.select([rfd], [], [], timeout)
    return bool(r) and os.read(rfd, 1) == b""


def test_fds_where_none_belong_are_einval_and_closed(raw: Raw, bystanders: Bystanders) -> None:
    pre, _ = raw.fresh()
    conn, creds = raw.running()
    valid = pack({"op": "domain_info", "domid": DOMID_SELF})
    for c, payload in ((conn, valid), (pre, valid), (conn, pack({"op": "evtchn_status", "port": 1})),
                       (conn, b"\xc1garbage"), (conn, b"\x00"), (pre, pack({"op": "hello", "token": creds["token"]}))):
        rfd, wfd = os.pipe()
        try:
            c.expect(payload, "EINVAL", fds=[wfd, wfd, wfd])
            os.close(wfd)
            wfd = -1
            assert _pipe_closed(rfd), "the broker kept a descriptor it was sent"
        finally:
            os.close(rfd)
            if wfd >= 0:
                os.close(wfd)
    # A frame with no bytes but descriptors is not EOF: it gets its answer too.
    rfd, wfd = os.pipe()
    try:
        conn.expect(b"", "EINVAL", fds=[wfd])
        os.close(wfd)
        assert _pipe_closed(rfd)
    finally:
        os.close(rfd)
    # Many of them: the broker's descriptor count does not grow.
    before = raw.mgmt.request("stats")["broker_fds"]
    extra = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(8)]
    try:
        for i in range(300):
            conn.send(valid, extra)
            reply = conn.recv()
            assert reply["errno"] == "EINVAL", reply
            if i % 100 == 0:
                bystanders.check()
    finally:
        for fd in extra:
            os.close(fd)
    conn.probe()
    bystanders.check()
    assert raw.mgmt.request("stats")["broker_fds"] <= before


def test_more_fds_than_the_broker_reads_are_emsgsize_and_closed(raw: Raw, bystanders: Bystanders) -> None:
    conn, _ = raw.running()
    before = raw.mgmt.request("stats")["broker_fds"]
    for count in (MAX_FDS + 1, 200, 253):      # 253 is the kernel's SCM_MAX_FD
        rfd, wfd = os.pipe()
        try:
            conn.expect(pack({"op": "domain_info", "domid": DOMID_SELF}), "EMSGSIZE", fds=[wfd] * count)
            os.close(wfd)
            wfd = -1
            assert _pipe_closed(rfd), "a descriptor sent beyond the broker's limit leaked"
        finally:
            os.close(rfd)
            if wfd >= 0:
                os.close(wfd)
    assert raw.mgmt.request("stats")["broker_fds"] <= before
    bystanders.check()


# ---- connections that misbehave as a whole --------------------------------------


def test_client_that_never_reads_replies_is_dropped(raw: Raw, bystanders: Bystanders) -> None:
    flooder, creds = raw.running()
    flooder.sock.setblocking(False)
    request = pack({"op": "domain_info", "domid": DOMID_SELF})
    sent = 0
    dropped = False
    deadline = time.monotonic() + 60
    while not dropped:
        assert time.monotonic() < deadline, f"the broker still serves a flooder after {sent} unread replies"
        try:
            flooder.sock.send(request)
        except BlockingIOError:
            select.select([], [flooder.sock], [], 0.05)
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += 1
        if sent % 500 == 0:
            # Others are served while the flood goes on.
            p = bystanders.peer
            port = p.alloc_unbound(DOMID_SELF)
            assert p.port_status(port)["status"] == EVTCHNSTAT_unbound
            p.close_port(port)
            dropped = raw.mgmt.request("info", domid=creds["domid"])["domain"]["state"] == "crashed"
    wait_until(lambda: raw.mgmt.request("info", domid=creds["domid"])["domain"]["state"] == "crashed",
               what="the flooding domain to be dropped")
    info = raw.mgmt.request("info", domid=creds["domid"])["domain"]
    assert info["shutdown_reason"] == "crash" and info["pid"] == 0
    bystanders.check()
    # A dropped domain can be restarted and reconnect.
    again = raw.mgmt.request("restart", domid=creds["domid"])
    conn = raw.connect(again["hypercall"])
    conn.hello(again["token"])
    conn.set_memory(again["nr_frames"])
    conn.probe()
    bystanders.check()


def _open_silent(path: str, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        s.connect(path)
        socks.append(s)
    return socks


def test_pile_of_connections_that_never_say_hello(raw: Raw, bystanders: Bystanders) -> None:
    creds = raw.create()
    path = creds["hypercall"]
    baseline = raw.mgmt.request("stats")["broker_fds"]
    started = time.monotonic()
    silent = _open_silent(path, PENDING_LIMIT + 36)
    try:
        bystanders.check()
        # The broker holds at most PENDING_LIMIT of them; the rest it closes at once.
        wait_until(lambda: raw.mgmt.request("stats")["broker_fds"] == baseline + PENDING_LIMIT,
                   what="the broker to hold exactly PENDING_LIMIT silent connections")
        # After HELLO_TIMEOUT each one is hung up on.
        for s in silent:
            left = started + HELLO_TIMEOUT + 20 - time.monotonic()
            r, _, _ = select.select([s], [], [], max(left, 0))
            assert r, "a connection that never said hello was kept past the hello timeout"
            try:
                assert s.recv(16) == b""
            except ConnectionResetError:
                pass
        assert time.monotonic() - started >= HELLO_TIMEOUT - 1
        bystanders.check()
        wait_until(lambda: raw.mgmt.request("stats")["broker_fds"] <= baseline,
                   what="the broker to release silent connections")
    finally:
        for s in silent:
            s.close()
    conn = raw.connect(path)
    conn.hello(creds["token"])
    conn.set_memory(creds["nr_frames"])
    conn.probe()
    bystanders.check()


def test_closed_silent_connections_are_released(raw: Raw, bystanders: Bystanders) -> None:
    creds = raw.create()
    baseline = raw.mgmt.request("stats")["broker_fds"]
    for _ in range(3):
        silent = _open_silent(creds["hypercall"], PENDING_LIMIT)
        wait_until(lambda: raw.mgmt.request("stats")["broker_fds"] == baseline + PENDING_LIMIT,
                   what="the broker to accept the connections")
        for s in silent:
            s.close()
        wait_until(lambda: raw.mgmt.request("stats")["broker_fds"] <= baseline,
                   what="the broker to release closed connections")
        bystanders.check()
    conn = raw.connect(creds["hypercall"])
    conn.hello(creds["token"])


def test_silent_connections_do_not_lock_out_new_domains(raw: Raw, bystanders: Bystanders) -> None:
    creds = raw.create()
    baseline = raw.mgmt.request("stats")["broker_fds"]
    silent = _open_silent(creds["hypercall"], PENDING_LIMIT)
    try:
        wait_until(lambda: raw.mgmt.request("stats")["broker_fds"] == baseline + PENDING_LIMIT,
                   what="the broker to accept the connections")
        host = BrokerXenHost(creds["hypercall"], creds["token"])
        host.close()
    finally:
        for s in silent:
            s.close()


def test_empty_frame_hangs_up_only_that_connection(raw: Raw, bystanders: Bystanders) -> None:
    """A zero-length SEQPACKET message reads as EOF: the broker treats it as the domain leaving."""
    conn, creds = raw.running()
    conn.send(b"")
    with pytest.raises(BrokerClosed):
        conn.recv()
    wait_until(lambda: raw.mgmt.request("info", domid=creds["domid"])["domain"]["state"] == "crashed",
               what="the domain to be dead")
    bystanders.check()


def test_broker_survives_everything_at_once(raw: Raw, bystanders: Bystanders, broker: BrokerProcess) -> None:
    rng = random.Random(7)
    conns = [raw.running()[0] for _ in range(4)] + [raw.fresh()[0] for _ in range(4)]
    frames = [b"\xc1", pack([1]), pack({"op": "nope"}), pack({"op": "map", "ops": [[0, 0, 0]] * 200}),
              pack({"op": "evtchn_status", "port": True}), b"\xc1" * (MAX_MESSAGE + 10)]
    # Interleave: write a burst on every connection, then read every answer.
    for _ in range(20):
        plan = [(c, rng.choice(frames)) for c in conns for _ in range(rng.randint(1, 8))]
        for c, f in plan:
            c.send(f)
        for c, f in plan:
            reply = c.recv()
            assert reply["ok"] is False and reply["errno"] == wire_verdict(f), reply
        bystanders.check()
    for c in conns:
        c.probe()
    assert broker.proc.poll() is None


def test_a_domain_cannot_resize_its_grant_table_under_the_broker(raw: Raw, bystanders: Bystanders) -> None:
    """The granter holds a read-write description of its table, which the broker
    has mapped: truncated, the broker's next look at an entry would be a SIGBUS
    that kills the hypervisor.  The table is sealed against it."""
    from xdom.domains.xenhost import BrokerXenHost
    creds = raw.create()
    host = BrokerXenHost(creds["hypercall"], creds["token"])
    try:
        for size in (0, PAGE_SIZE, 1 << 30):
            with pytest.raises(PermissionError):
                os.ftruncate(host.gnttab.fd, size)
        with pytest.raises(PermissionError):
            os.posix_fallocate(host.gnttab.fd, 0, 1 << 30)
        peer = raw.create()
        other = BrokerXenHost(peer["hypercall"], peer["token"])
        try:
            ref = host.gnttab.grant_access(other.domid, 3)
            (res,) = other.map_grants([(host.domid, ref, False)])
            assert res.status == GNTST_okay
            other.unmap_grants([res.mapping])
        finally:
            other.close()
    finally:
        host.close()
    bystanders.check()


def test_ending_a_mapped_grant_replaces_the_frame_and_nothing_else_can(raw: Raw, bystanders: Bystanders) -> None:
    """Revocation by replacement: a granter ending access to an entry the broker
    mapped gets a fresh frame for that gfn (contents kept, same address), so
    whatever the grantee kept out of sight is no longer the granter's page.
    A domain cannot mint frames by asking: only exposed gfns are replaced, once."""
    from xdom.domains.xenhost import BrokerXenHost
    a_creds, x_creds = raw.create(), raw.create()
    a = BrokerXenHost(a_creds["hypercall"], a_creds["token"])
    x = BrokerXenHost(x_creds["hypercall"], x_creds["token"])
    try:
        pid = os.getpid()

        def inode(gfn: int) -> int:
            addr = a.memory.frame_address(gfn)
            return os.stat(f"/proc/{pid}/map_files/{addr:x}-{addr + PAGE_SIZE:x}").st_ino

        a.memory.frame(6)[:5] = b"hello"
        before, untouched = inode(6), inode(7)
        assert a.call("replace_frames", gfns=[6, 7])[0]["gfns"] == []      # never given to anyone
        ref = a.gnttab.grant_access(x.domid, 6)
        (res,) = x.map_grants([(a.domid, ref, False)])
        assert res.status == GNTST_okay
        kept = bytes(res.mapping.view[:5])
        assert x.unmap_grants([res.mapping]) == [GNTST_okay]
        ref7 = a.gnttab.grant_access(x.domid, 7)
        a.gnttab.end_access(ref7)                    # granted, never mapped: nothing to replace
        a.gnttab.end_access(ref)                     # mapped once: replaced on the way
        assert kept == b"hello" and bytes(a.memory.frame(6)[:5]) == b"hello"
        assert inode(6) != before and inode(7) == untouched
        assert a.call("replace_frames", gfns=[6])[0]["gfns"] == []          # once per exposure
        ref = a.gnttab.grant_access(x.domid, 6)      # the new frame is granted as the gfn's own
        (res,) = x.map_grants([(a.domid, ref, True)])
        assert res.status == GNTST_okay and bytes(res.mapping.view[:5]) == b"hello"
        x.unmap_grants([res.mapping])
    finally:
        x.close()
        a.close()
    bystanders.check()
