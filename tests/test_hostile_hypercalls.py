"""Hostile hypercall frames: every malformed request gets an error reply.

A domain talks to the broker over a SOCK_SEQPACKET socket, one msgpack map
per message.  These tests speak that protocol by hand on a raw socket and
send what no well-behaved xenhost would: garbage, non-maps, unknown ops,
missing, extra and mistyped fields, oversized frames and batches, file
descriptors nobody asked for, replayed tokens.  Each case checks the exact
errno of the reply, that the same connection still answers a valid request
afterwards, and that two well-behaved domains (``Bystanders``) keep being
served throughout.  The broker process must survive all of it.
"""

from __future__ import annotations

import array
import os
import random
import select
import socket
import stat
import time
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import msgpack
import pytest
from helpers import wait_until  # noqa: E402
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdom.broker.mgmt_client import ManagementClient
from xdom.deploy.launcher import BrokerProcess
from xdom.domains.abi.event_channel import (
    DOMID_SELF,
    NR_VIRQS,
    VIRQ_DOM_EXC,
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_unbound,
)
from xdom.domains.abi.grant_table import (
    PAGE_SIZE,
    GNTCOPY_source_gref,
    GNTST_bad_copy_arg,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_bad_page,
    GNTST_general_error,
    GNTST_okay,
    GNTST_permission_denied,
    GTF_reading,
)
from xdom.domains.abi.hypercall_wire import (
    MAX_BATCH,
    MAX_FDS,
    MAX_MESSAGE,
    REQUESTS,
    HypercallError,
    decode_request,
    take_fds,
)
from xdom.domains.hostsys import sysmem
from xdom.domains.hostsys.memory import DomainMemory
from xdom.domains.xenhost import BrokerXenHost

T = TypeVar("T")

# The broker's own limits (broker/server.py); the tests pin them down.
PENDING_LIMIT = 64
HELLO_TIMEOUT = 10.0

# Errnos a request may legitimately be refused with.  EIO means "internal
# broker error": an exception escaped a handler, which is always a bug.
REFUSALS = {"EBADMSG", "ENOSYS", "EINVAL", "E2BIG", "EMSGSIZE", "EPERM", "EALREADY", "EACCES",
            "ESRCH", "EBUSY", "EEXIST", "ENOSPC", "EFAULT", "ENOENT"}

# One well-formed request per op, with valid field types.
VALID_SHAPES: dict[str, dict[str, Any]] = {
    "hello": {"token": "0" * 32},
    "rejoin": {"domid": 1, "key": "0" * 32},
    "populate_physmap": {"start": 0, "count": 1},
    "set_memory": {"base": 0x7F0000000000},
    "shutdown": {"reason": "poweroff"},
    "map": {"ops": []},
    "unmap": {"handles": []},
    "copy": {"ops": []},
    "replace_frames": {"gfns": []},
    "evtchn_alloc_unbound": {"remote_dom": DOMID_SELF},
    "evtchn_bind_interdomain": {"remote_dom": 0, "remote_port": 1},
    "evtchn_bind_virq": {"virq": 0},
    "evtchn_close": {"port": 1},
    "evtchn_status": {"port": 1},
    "evtchn_send": {"port": 1},
    "domain_info": {"domid": DOMID_SELF},
    "get_param": {"index": 1},
    "evtchn_fds": {"port": 1},
}



def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def wire_verdict(data: bytes) -> str | None:
    """What the wire decoder makes of ``data``: an errno name, or None if it is a valid request."""
    try:
        decode_request(data)
    except HypercallError as e:
        return e.name
    return None


class BrokerClosed(Exception):
    """The broker closed the connection."""


class RawConn:
    """A hand-driven hypercall connection; closes every fd the broker sends."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.memory: DomainMemory | None = None
        self.domid: int | None = None
        self.last_fds = 0

    def send(self, payload: bytes, fds: Sequence[int] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([payload], anc)

    def recv(self, keep: list[int] | None = None) -> dict[str, Any]:
        try:
            data, anc, flags, _ = self.sock.recvmsg(MAX_MESSAGE + 1, socket.CMSG_SPACE(MAX_FDS * 4))
        except ConnectionResetError:
            raise BrokerClosed() from None
        fds = take_fds(anc)
        if keep is not None:
            keep.extend(fds)
        else:
            for fd in fds:
                os.close(fd)
        self.last_fds = len(fds)
        if not data:
            raise BrokerClosed()
        assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC), "reply truncated"
        reply = msgpack.unpackb(data, raw=False)
        assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
        return reply

    def request(self, msg: dict[str, Any] | bytes, fds: Sequence[int] = ()) -> dict[str, Any]:
        self.send(msg if isinstance(msg, bytes) else pack(msg), fds)
        return self.recv()

    def expect(self, msg: dict[str, Any] | bytes, errno_name: str, fds: Sequence[int] = ()) -> dict[str, Any]:
        """Send ``msg``; its reply must be the error ``errno_name``; the connection must live on."""
        reply = self.request(msg, fds)
        assert reply["ok"] is False, f"{msg!r:.200} was accepted: {reply}"
        assert reply["errno"] == errno_name, f"{msg!r:.200}: {reply}"
        assert isinstance(reply.get("error"), str)
        self.probe()
        return reply

    def ok(self, msg: dict[str, Any]) -> dict[str, Any]:
        reply = self.request(msg)
        assert reply["ok"] is True, f"{msg!r:.200}: {reply}"
        return reply

    def hello(self, token: str) -> dict[str, Any]:
        reply = self.request({"op": "hello", "token": token})
        assert reply["ok"] is True, reply
        assert self.last_fds == 1      # the grant table memfd, closed by recv()
        self.domid = reply["domid"]
        return reply

    def populate(self, start: int, count: int) -> list[int]:
        fds: list[int] = []
        self.send(pack({"op": "populate_physmap", "start": start, "count": count}))
        reply = self.recv(fds)
        assert reply["ok"] is True, reply
        return fds

    def set_memory(self, nr_frames: int) -> None:
        self.memory = DomainMemory(nr_frames, self.populate)
        self.ok({"op": "set_memory", "base": self.memory.base})

    def probe(self) -> None:
        """A valid request still gets its proper answer."""
        reply = self.request({"op": "domain_info", "domid": DOMID_SELF})
        if self.domid is None or self.memory is None:
            assert reply == {"ok": False, "errno": "EPERM", "error": reply["error"]}, reply
        else:
            assert reply["ok"] is True and reply["domid"] == self.domid, reply

    def close(self) -> None:
        self.sock.close()
        if self.memory is not None:
            self.memory.close()
            self.memory = None


class Bystanders:
    """Two well-behaved domains in this process; ``check`` exercises the broker for them."""

    def __init__(self, broker: BrokerProcess, mgmt: ManagementClient) -> None:
        self.broker = broker
        self.mgmt = mgmt
        self.hosts: list[BrokerXenHost] = []
        self.peer = self._host("bystander")
        self.granter = self._host("granter")
        self.rounds = 0

    def _host(self, name: str) -> BrokerXenHost:
        creds = self.mgmt.request("create", name=name, memory="1M")
        host = BrokerXenHost(creds["hypercall"], creds["token"])
        self.hosts.append(host)
        return host

    def check(self) -> None:
        peer, granter = self.peer, self.granter
        assert self.broker.proc.poll() is None, "the broker died"
        self.rounds += 1
        # Event channels: allocate, inspect, bind from the other side, notify, close.
        port = peer.alloc_unbound(granter.domid)
        status = peer.port_status(port)
        assert (status["status"], status["remote_dom"]) == (EVTCHNSTAT_unbound, granter.domid)
        gport = granter.bind_interdomain(peer.domid, port)
        assert peer.port_status(port)["status"] == EVTCHNSTAT_interdomain
        granter.notify(gport)
        assert peer.evtchn.wait(5, [port]) == [port]
        granter.close_port(gport)
        peer.close_port(port)
        # Grants: map a frame another domain granted, read it, unmap, revoke.
        stamp = b"round%04d" % (self.rounds % 10000)
        granter.memory.frame(3)[:len(stamp)] = stamp
        ref = granter.gnttab.grant_access(peer.domid, 3, readonly=True)
        m = peer.map_grant(granter.domid, ref, readonly=True)
        assert bytes(m.view[:len(stamp)]) == stamp
        peer.unmap_grant(m)
        granter.gnttab.end_and_release(ref)
        for h in (peer, granter):
            assert self.mgmt.request("info", domid=h.domid)["domain"]["state"] == "running"

    def close(self) -> None:
        for h in reversed(self.hosts):
            h.close()


@pytest.fixture
def bystanders(broker: BrokerProcess, mgmt: ManagementClient) -> Iterator[Bystanders]:
    b = Bystanders(broker, mgmt)
    try:
        b.check()
        yield b
        b.check()
        assert broker.proc.poll() is None, "the broker died"
    finally:
        b.close()


class Raw:
    """Opens raw connections for new domains and closes them at teardown."""

    def __init__(self, mgmt: ManagementClient) -> None:
        self.mgmt = mgmt
        self.conns: list[RawConn] = []
        self.count = 0

    def create(self, name: str | None = None, memory: str = "1M") -> dict[str, Any]:
        self.count += 1
        return self.mgmt.request("create", name=name or f"raw{self.count}", memory=memory)

    def connect(self, path: str) -> RawConn:
        c = RawConn(path)
        self.conns.append(c)
        return c

    def fresh(self) -> tuple[RawConn, dict[str, Any]]:
        """A connection that has not said hello, and the credentials it could use."""
        creds = self.create()
        return self.connect(creds["hypercall"]), creds

    def introduced(self) -> tuple[RawConn, dict[str, Any]]:
        """A connection that said hello but registered no memory."""
        conn, creds = self.fresh()
        conn.hello(creds["token"])
        return conn, creds

    def running(self) -> tuple[RawConn, dict[str, Any]]:
        """A fully working domain connection, driven by hand."""
        conn, creds = self.introduced()
        conn.set_memory(creds["nr_frames"])
        assert self.mgmt.request("info", domid=creds["domid"])["domain"]["state"] == "running"
        return conn, creds

    def close(self) -> None:
        for c in reversed(self.conns):
            c.close()


@pytest.fixture
def raw(mgmt: ManagementClient) -> Iterator[Raw]:
    r = Raw(mgmt)
    try:
        yield r
    finally:
        r.close()


def request_shape(op: str, **override: Any) -> dict[str, Any]:
    return {"op": op, **VALID_SHAPES[op], **override}


# ---- authentication ----------------------------------------------------------


def test_every_op_before_hello_is_eperm(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.fresh()
    for op in REQUESTS:
        if op not in ("hello", "rejoin"):
            conn.expect(request_shape(op), "EPERM")
    # rejoin is for a running domain whose broker died: this broker has none waiting
    conn.expect(request_shape("rejoin"), "ESRCH")
    bystanders.check()
    # The connection can still introduce itself afterwards.
    conn.hello(creds["token"])
    conn.set_memory(creds["nr_frames"])
    conn.probe()


def test_ops_before_set_memory_are_eperm(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.introduced()
    for op in REQUESTS:
        if op not in ("hello", "rejoin", "populate_physmap", "set_memory", "shutdown"):
            conn.expect(request_shape(op), "EPERM")
    conn.expect({"op": "hello", "token": creds["token"]}, "EALREADY")
    conn.expect(request_shape("rejoin"), "EALREADY")
    bystanders.check()
    conn.set_memory(creds["nr_frames"])
    conn.probe()


def test_second_hello_is_ealready(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.running()
    conn.expect({"op": "hello", "token": creds["token"]}, "EALREADY")
    other = raw.create()
    # Even a valid, unused token of another domain: one connection, one domain.
    conn.expect({"op": "hello", "token": other["token"]}, "EALREADY")
    assert raw.mgmt.request("info", domid=other["domid"])["domain"]["state"] == "created"
    c2 = raw.connect(other["hypercall"])
    c2.hello(other["token"])         # the token was not consumed by the refused hello
    bystanders.check()


def test_wrong_and_used_tokens_are_eacces(raw: Raw, bystanders: Bystanders) -> None:
    victim, creds = raw.running()
    conn = raw.connect(creds["hypercall"])
    for token in ["", "0" * 32, creds["token"][:-1], creds["token"] + "0", creds["token"].upper(),
                  "x" * 4096, creds["token"]]:   # the last one is the used token
        conn.expect({"op": "hello", "token": token}, "EACCES")
    # A destroyed domain's unused token is dead too.
    gone = raw.create()
    raw.mgmt.request("destroy", domid=gone["domid"])
    conn.expect({"op": "hello", "token": gone["token"]}, "EACCES")
    # A refused hello does not poison the connection: a right token still works.
    fresh = raw.create()
    conn.hello(fresh["token"])
    conn.set_memory(fresh["nr_frames"])
    conn.probe()
    victim.probe()
    assert raw.mgmt.request("info", domid=creds["domid"])["domain"]["pid"] == os.getpid()
    bystanders.check()


def test_empty_token_cannot_claim_domain_mid_handshake(raw: Raw, bystanders: Bystanders) -> None:
    victim, creds = raw.introduced()        # said hello, has not registered memory yet
    intruder = raw.connect(creds["hypercall"])
    intruder.expect({"op": "hello", "token": ""}, "EACCES")


def test_domain_that_hangs_up_after_hello_can_be_restarted(raw: Raw, bystanders: Bystanders) -> None:
    # What BrokerXenHost does when DomainMemory() fails (e.g. vm.max_map_count) after hello.
    conn, creds = raw.introduced()
    conn.close()
    wait_until(lambda: raw.mgmt.request("info", domid=creds["domid"])["domain"]["state"] != "created",
               timeout=3, what="the broker to notice the domain is gone")
    again = raw.mgmt.request("restart", domid=creds["domid"])
    c2 = raw.connect(again["hypercall"])
    c2.hello(again["token"])


def test_non_ascii_token_is_eacces(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.fresh()
    conn.expect({"op": "hello", "token": "\u00e9" * 32}, "EACCES")


# ---- undecodable and misshapen frames -------------------------------------


def test_random_garbage_bytes(raw: Raw, bystanders: Bystanders) -> None:
    rng = random.Random(0x5eed)
    pre, _ = raw.fresh()
    conn, _ = raw.running()
    for i in range(300):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 2048)))
        if i % 3 == 0:
            data = b"\xc1" + data       # 0xc1 is never used by msgpack: surely undecodable
        expected = wire_verdict(data)
        assert expected is not None
        for c in (pre, conn):
            reply = c.expect(data, expected)
            assert reply["errno"] != "EIO"
        if i % 100 == 0:
            bystanders.check()
    # What the decoder can never make sense of is EBADMSG.
    for data in (b"\xc1", b"\x81", b"\x92\x01", b"\xdf\xff\xff\xff\xff", b"\xc7\x01\x05x", b"\xff" * 64):
        conn.expect(data, "EBADMSG")
        pre.expect(data, "EBADMSG")


HYPOTHESIS = settings(max_examples=200, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow])


def expect_verdict(conn: RawConn, data: bytes) -> None:
    """The broker answers ``data`` as the wire decoder judges it; a valid request gets a proper answer."""
    expected = wire_verdict(data)
    if expected is None:     # well-shaped: the hypervisor decides, but never with an internal error
        reply = conn.request(data)
        assert reply["ok"] or reply["errno"] in REFUSALS, f"{data!r:.200}: {reply}"
        conn.probe()
    else:
        conn.expect(data, expected)


def test_hypothesis_garbage_bytes(raw: Raw, bystanders: Bystanders) -> None:
    # Empty frames are left out: on SOCK_SEQPACKET a zero-length message reads
    # exactly like EOF, and the broker treats it as the domain hanging up
    # (see test_empty_frame_hangs_up_only_that_connection).
    conns = (raw.fresh()[0], raw.running()[0])

    @HYPOTHESIS
    @given(data=st.binary(min_size=1, max_size=4096))
    def check(data: bytes) -> None:
        for c in conns:
            expect_verdict(c, data)

    check()
    bystanders.check()


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**63, max_value=2**64 - 1)
    | st.floats(allow_nan=True) | st.text(max_size=24) | st.binary(max_size=24),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=12) | st.sampled_from(["op", "port", "ops", "token"]),
                      children, max_size=6),
    max_leaves=24)


def test_hypothesis_arbitrary_msgpack(raw: Raw, bystanders: Bystanders) -> None:
    conn = raw.running()[0]

    @HYPOTHESIS
    @given(obj=msgpack_values)
    def check(obj: Any) -> None:
        expect_verdict(conn, pack(obj))

    check()
    bystanders.check()


wire_ints = st.one_of(
    st.integers(min_value=-2**63, max_value=2**64 - 1),
    st.integers(min_value=-2, max_value=70000),
    st.sampled_from([0, 1, 2, DOMID_SELF, DOMID_SELF + 1, 2**31, 2**32 - 1, 2**32, -1, 2**63]))
field_values = st.one_of(
    wire_ints, st.booleans(), st.none(), st.floats(), st.text(max_size=8), st.binary(max_size=8),
    st.lists(wire_ints, max_size=9),
    st.lists(st.lists(wire_ints | st.booleans(), min_size=0, max_size=9), max_size=8))
fuzzed_ops = sorted(set(REQUESTS) - {"shutdown"})


@st.composite
def shaped_requests(draw: st.DrawFn) -> dict[str, Any]:
    """Requests naming a real op, with fields of any type and value, now and then one too many or few."""
    op = draw(st.sampled_from(fuzzed_ops))
    msg: dict[str, Any] = {"op": op}
    for name in REQUESTS[op]:
        if draw(st.integers(0, 19)):
            msg[name] = draw(field_values)
    if not draw(st.integers(0, 9)):
        msg[draw(st.sampled_from(["domid", "caller", "x", "ops", "port"]))] = draw(field_values)
    return msg


def test_hypothesis_fields_of_any_type_and_value(raw: Raw, bystanders: Bystanders) -> None:
    conn = raw.running()[0]

    @HYPOTHESIS
    @given(msg=shaped_requests())
    def check(msg: dict[str, Any]) -> None:
        expect_verdict(conn, pack(msg))

    check()
    bystanders.check()


def test_not_a_map_is_ebadmsg(raw: Raw, bystanders: Bystanders) -> None:
    pre, _ = raw.fresh()
    conn, _ = raw.running()
    for obj in [None, True, 0, -1, 2**64 - 1, 1.5, "evtchn_status", b"\x00\x01", [], ["op", "domain_info"],
                [{"op": "domain_info", "domid": DOMID_SELF}]]:
        conn.expect(pack(obj), "EBADMSG")
        pre.expect(pack(obj), "EBADMSG")
    # Two maps in one frame are not one request.
    conn.expect(pack({"op": "domain_info", "domid": DOMID_SELF}) * 2, "EBADMSG")
    # Map keys must be strings.
    conn.expect(b"\x82\x01\x02\xa2op\xa4ping", "EBADMSG")
    # Nesting beyond the decoder's limits.
    conn.expect(b"\x91" * 2000 + b"\xc0", "EBADMSG")
    conn.expect(pack({"op": "domain_info", "domid": DOMID_SELF, **{f"k{i}": i for i in range(70)}}), "EBADMSG")
    bystanders.check()


def test_unknown_op_is_enosys(raw: Raw, bystanders: Bystanders) -> None:
    pre, _ = raw.fresh()
    conn, _ = raw.running()
    for msg in [{}, {"domid": 0}, {"op": ""}, {"op": "reboot_host"}, {"op": "HELLO", "token": "x"},
                {"op": "map "}, {"op": "_hello"}, {"op": "__init__"}, {"op": "handlers"},
                {"op": 1}, {"op": None}, {"op": True}, {"op": ["map"]}, {"op": {"op": "map"}},
                {"op": b"domain_info", "domid": DOMID_SELF}, {"op": "x" * 4000}]:
        conn.expect(msg, "ENOSYS")
        pre.expect(msg, "ENOSYS")      # decoding comes before authentication
    bystanders.check()


def test_missing_extra_and_mistyped_fields_are_einval(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.running()
    cases: list[dict[str, Any]] = []
    for op, shape in VALID_SHAPES.items():
        for name in shape:                                  # each field missing
            cases.append({"op": op, **{k: v for k, v in shape.items() if k != name}})
        # No field ever names the caller, and unknown fields are refused.
        for extra in ({"domid": creds["domid"]} if op not in ("domain_info", "rejoin") else {"caller": 0}, {"z": None}):
            cases.append({"op": op, **shape, **extra})
        for name, value in shape.items():                   # each field mistyped
            for wrong in (None, 1.0, "1", b"1", [1], {"a": 1}, 0 if not isinstance(value, int) else "0"):
                if type(wrong) is type(value):
                    continue
                cases.append({"op": op, **shape, name: wrong})
    cases += [{"op": "map", "ops": {"0": [0, 0, 0]}}, {"op": "map", "ops": "ops"},
              {"op": "unmap", "handles": 5}, {"op": "copy", "ops": None},
              {"op": "evtchn_bind_interdomain"}, {"op": "hello"}]
    assert len(cases) > 100
    for msg in cases:
        conn.expect(msg, "EINVAL")
    bystanders.check()
    # Before hello the shape is checked first, too.
    pre, _ = raw.fresh()
    for msg in cases[::7]:
        pre.expect(msg, "EINVAL")


def test_booleans_where_ints_belong_are_einval(raw: Raw, bystanders: Bystanders) -> None:
    conn, _ = raw.running()
    for op, shape in VALID_SHAPES.items():
        for name, value in shape.items():
            if type(value) is int:
                for b in (True, False):
                    conn.expect({"op": op, **shape, name: b}, "EINVAL")
    bystanders.check()


# ---- batches and their entries -------------------------------------------------


def test_batches_over_the_limit_are_e2big(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.running()
    me = creds["domid"]
    for n in (MAX_BATCH + 1, 2 * MAX_BATCH, 1000):
        conn.expect({"op": "map", "ops": [[bystanders.granter.domid, 8, 1]] * n}, "E2BIG")
        conn.expect({"op": "unmap", "handles": [1] * n}, "E2BIG")
        conn.expect({"op": "copy", "ops": [[0, me, 0, 0, me, 1, 0, 8]] * n}, "E2BIG")
    # The limit itself is fine (nothing is granted, so each entry fails on its own).
    reply = conn.ok({"op": "map", "ops": [[bystanders.granter.domid, 8, 1]] * MAX_BATCH})
    assert reply["results"] == [[GNTST_general_error, 0]] * MAX_BATCH and conn.last_fds == 0
    reply = conn.ok({"op": "unmap", "handles": list(range(1, MAX_BATCH + 1))})
    assert reply["results"] == [GNTST_bad_handle] * MAX_BATCH
    reply = conn.ok({"op": "copy", "ops": [[0, me, 0, 0, me, 1, 0, 8]] * MAX_BATCH})
    assert reply["results"] == [GNTST_okay] * MAX_BATCH
    # Beyond the decoder's array limit the frame is refused before it is built.
    conn.expect({"op": "unmap", "handles": [1] * (MAX_BATCH * 8 + 1)}, "EBADMSG")
    assert raw.mgmt.request("stats")["mappings"] == 0
    bystanders.check()


def test_out_of_range_batch_entries_are_einval(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.running()
    me, g = creds["domid"], bystanders.granter
    ref = g.gnttab.grant_access(me, 5, readonly=True)
    good = [g.domid, ref, 1]
    bad_map_entries: list[Any] = [
        [g.domid, 2**32, 1], [g.domid, -1, 1], [-1, ref, 1], [2**32, ref, 1], [g.domid, ref, 2**63],
        [g.domid, ref, -1], [g.domid, ref], [g.domid, ref, 1, 0], [], 5, None, "entry",
        {"domid": g.domid}, [str(g.domid), ref, 1], [g.domid, float(ref), 1], [g.domid, ref, None],
        [[g.domid], ref, 1],
    ]
    for entry in bad_map_entries:
        # One bad entry refuses the whole batch: the good entry before it is not mapped.
        conn.expect({"op": "map", "ops": [good, entry]}, "EINVAL")
        assert conn.last_fds == 0
    assert raw.mgmt.request("info", domid=me)["domain"]["mappings_held"] == 0
    assert not g.gnttab.entry(ref)[0] & GTF_reading
    for handle in (-1, 2**32, 2**64 - 1, "1", 1.0, None, [1]):
        conn.expect({"op": "unmap", "handles": [1, handle]}, "EINVAL")
    copy_ok = [0, me, 0, 0, me, 1, 0, 8]
    for i in range(8):
        for value in (-1, 2**32, "0", None):
            entry = list(copy_ok)
            entry[i] = value
            conn.expect({"op": "copy", "ops": [copy_ok, entry]}, "EINVAL")
    for entry in (copy_ok[:7], copy_ok + [0], [], 0):
        conn.expect({"op": "copy", "ops": [entry]}, "EINVAL")
    # The good entry on its own still maps, exactly once.
    reply = conn.ok({"op": "map", "ops": [good]})
    assert reply["results"][0][0] == GNTST_okay and conn.last_fds == 1
    assert g.gnttab.entry(ref)[0] & GTF_reading
    assert conn.ok({"op": "unmap", "handles": [reply["results"][0][1]]})["results"] == [GNTST_okay]
    g.gnttab.end_and_release(ref)
    bystanders.check()


def test_in_range_nonsense_gets_grant_status_codes(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.running()
    me, g, p = creds["domid"], bystanders.granter, bystanders.peer
    reply = conn.ok({"op": "map", "ops": [[g.domid, 2**32 - 1, 1], [0x7FEF, 0, 1], [g.domid, 9, 0],
                                          [me, 9, 1], [DOMID_SELF, 0, 0]]})
    assert [s for s, _ in reply["results"]] == [GNTST_bad_gntref, GNTST_bad_domain, GNTST_general_error,
                                               GNTST_general_error, GNTST_bad_domain]
    assert conn.last_fds == 0
    assert conn.ok({"op": "unmap", "handles": [0, 1, 2**32 - 1]})["results"] == [GNTST_bad_handle] * 3
    reply = conn.ok({"op": "copy", "ops": [
        [0, me, 0, 0, me, 1, 0, PAGE_SIZE + 1],            # too long
        [0, me, 0, PAGE_SIZE, me, 1, 0, 1],                # offset past the page
        [0, me, 2**32 - 1, 0, me, 0, 0, 8],                # own gfn out of range
        [0, p.domid, 0, 0, me, 0, 0, 8],                   # someone else's gfn: never
        [0, me, 0, 0, g.domid, 0, 0, 8],
        [GNTCOPY_source_gref, 0x7FEF, 0, 0, me, 0, 0, 8],  # no such granter
        [GNTCOPY_source_gref, g.domid, 2**32 - 1, 0, me, 0, 0, 8],
        [0, me, 0, 0, me, 1, 0, 0],                        # empty copy: fine
    ]})
    assert reply["results"] == [GNTST_bad_copy_arg, GNTST_bad_copy_arg, GNTST_bad_page,
                                GNTST_permission_denied, GNTST_permission_denied, GNTST_bad_domain,
                                GNTST_bad_gntref, GNTST_okay]
    assert raw.mgmt.request("stats")["mappings"] == 0
    bystanders.check()


def test_event_channel_arguments_out_of_range(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.running()
    p = bystanders.peer
    for remote in (-1, DOMID_SELF + 1, 2**32, 2**64 - 1, -2**63):
        conn.expect({"op": "evtchn_alloc_unbound", "remote_dom": remote}, "EINVAL")
        conn.expect({"op": "evtchn_bind_interdomain", "remote_dom": remote, "remote_port": 1}, "EINVAL")
    conn.expect({"op": "evtchn_alloc_unbound", "remote_dom": 0x7FEF}, "ESRCH")
    conn.expect({"op": "evtchn_bind_interdomain", "remote_dom": 0x7FEF, "remote_port": 1}, "ESRCH")
    # The bystander's port is bound to its granter, not to us.
    port = p.alloc_unbound(bystanders.granter.domid)
    conn.expect({"op": "evtchn_bind_interdomain", "remote_dom": p.domid, "remote_port": port}, "EINVAL")
    p.close_port(port)
    for port in (-1, 0, 2**32, 2**64 - 1, -2**63, 4096):
        conn.expect({"op": "evtchn_bind_interdomain", "remote_dom": p.domid, "remote_port": port}, "EINVAL")
        for op in ("evtchn_close", "evtchn_status", "evtchn_send"):
            conn.expect({"op": op, "port": port}, "EINVAL")
    for virq in (-1, NR_VIRQS, 2**63):
        conn.expect({"op": "evtchn_bind_virq", "virq": virq}, "EINVAL")
    conn.expect({"op": "evtchn_bind_virq", "virq": VIRQ_DOM_EXC}, "EPERM")    # global, unprivileged
    conn.expect({"op": "domain_info", "domid": p.domid}, "EPERM")
    conn.expect({"op": "domain_info", "domid": -1}, "EPERM")
    conn.expect({"op": "set_memory", "base": conn.memory.base}, "EALREADY")  # type: ignore[union-attr]
    conn.expect({"op": "shutdown", "reason": "explode"}, "EINVAL")
    conn.expect({"op": "shutdown", "reason": ""}, "EINVAL")
    assert p.port_status(p.alloc_unbound(DOMID_SELF))["status"] == EVTCHNSTAT_unbound
    bystanders.check()


def test_set_memory_with_bad_bases(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.introduced()
    nr = creds["nr_frames"]
    conn.expect({"op": "set_memory", "base": 0x7F0000000000}, "EINVAL")   # nothing populated yet
    own = DomainMemory(nr, conn.populate)                                  # the broker's frames, mapped
    for base in (0, -PAGE_SIZE, 1, PAGE_SIZE + 1, 1 << 47, 2**64 - PAGE_SIZE):
        conn.expect({"op": "set_memory", "base": base}, "EINVAL")
    conn.expect({"op": "set_memory", "base": PAGE_SIZE}, "EFAULT")          # nothing mapped there
    anon = sysmem.mmap(0, nr * PAGE_SIZE, sysmem.PROT_READ | sysmem.PROT_WRITE,
                       sysmem.MAP_PRIVATE | sysmem.MAP_ANONYMOUS)
    homemade = DomainMemory(nr)                                            # frame-like memfds, not the broker's
    try:
        conn.expect({"op": "set_memory", "base": anon}, "EFAULT")            # not frame memfds
        conn.expect({"op": "set_memory", "base": homemade.base}, "EFAULT")   # memfds, but not its frames
    finally:
        sysmem.munmap(anon, nr * PAGE_SIZE)
        homemade.close()
    assert raw.mgmt.request("info", domid=creds["domid"])["domain"]["state"] == "created"
    conn.memory = own
    conn.ok({"op": "set_memory", "base": own.base})
    conn.probe()
    bystanders.check()


def test_populate_physmap_hands_out_each_frame_once_sealed_and_root_owned(raw: Raw, bystanders: Bystanders) -> None:
    """The broker makes a domain's frames: in order, each once, in batches it bounds,
    and each sealed against truncation (a holder of a frame's fd cannot make
    another mapper fault) and closed to other uids (mode 0600, root's)."""
    conn, creds = raw.introduced()
    nr = creds["nr_frames"]
    conn.expect({"op": "populate_physmap", "start": 1, "count": 1}, "EINVAL")     # out of order
    conn.expect({"op": "populate_physmap", "start": 0, "count": 0}, "EINVAL")
    conn.expect({"op": "populate_physmap", "start": 0, "count": MAX_FDS + 1}, "E2BIG")
    conn.expect({"op": "populate_physmap", "start": -1, "count": 1}, "EINVAL")
    fds = conn.populate(0, 2)
    try:
        assert len(fds) == 2
        inodes = set()
        for fd in fds:
            st = os.fstat(fd)
            assert (st.st_size, st.st_uid, stat.S_IMODE(st.st_mode)) == (PAGE_SIZE, 0, 0o600)
            inodes.add(st.st_ino)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 2 * PAGE_SIZE)
        assert len(inodes) == 2
    finally:
        for fd in fds:
            os.close(fd)
    conn.expect({"op": "populate_physmap", "start": 0, "count": 1}, "EINVAL")     # given already
    for start in range(2, nr, MAX_FDS):
        for fd in conn.populate(start, min(MAX_FDS, nr - start)):
            os.close(fd)
    conn.expect({"op": "populate_physmap", "start": nr, "count": 1}, "EINVAL")    # beyond its memory
    bystanders.check()


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
