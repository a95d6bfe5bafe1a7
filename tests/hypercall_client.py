"""A domain's hypercall connection spoken by hand, for the hostile hypercall tests (tests/test_hostile_hypercall*.py).

:class:`RawConn` is a raw SOCK_SEQPACKET connection to the broker that sends
whatever bytes a test wants and reads the errno of the reply; :class:`Raw`
makes domains and such connections (fresh, introduced, running);
:class:`Bystanders` are two well-behaved domains whose service is checked
before and after each test.  Each test module's ``raw`` and ``bystanders``
fixtures yield from :func:`raw_connections` and :func:`served_bystanders`.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack

from xdom.broker.mgmt_client import ManagementClient
from xdom.deploy.launcher import BrokerProcess
from xdom.domains.abi.event_channel import (
    DOMID_SELF,
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_unbound,
)
from xdom.domains.abi.hypercall_wire import (
    MAX_FDS,
    MAX_MESSAGE,
    HypercallError,
    decode_request,
    pack_copy_segments,
    take_fds,
)
from xdom.domains.hostsys.memory import DomainMemory
from xdom.domains.xenhost import BrokerXenHost


def copy_blob(rows: Sequence[Sequence[int]]) -> bytes:
    """Copy ops written [flags, sdom, sref, soff, ddom, dref, doff, len] (the order the tests read best),
    packed as the broker takes them: Xen's struct gnttab_copy."""
    return pack_copy_segments([(sref, sdom, soff, dref, ddom, doff, length, flags, 0)
                               for flags, sdom, sref, soff, ddom, dref, doff, length in rows])


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
    "copy": {"ops": b""},
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


def served_bystanders(broker: BrokerProcess, mgmt: ManagementClient) -> Iterator[Bystanders]:
    """What each module's ``bystanders`` fixture yields: checked served before and after, the broker alive."""
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



def raw_connections(mgmt: ManagementClient) -> Iterator[Raw]:
    """What each module's ``raw`` fixture yields: a :class:`Raw`, its connections closed at teardown."""
    r = Raw(mgmt)
    try:
        yield r
    finally:
        r.close()


def request_shape(op: str, **override: Any) -> dict[str, Any]:
    return {"op": op, **VALID_SHAPES[op], **override}
