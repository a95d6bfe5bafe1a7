"""xenstored killed with SIGKILL and restarted keeps what it committed."""

from __future__ import annotations

import os
import random
import select
import signal
import threading
import time
from collections import Counter
from types import SimpleNamespace

import pytest
from helpers import wait_until
from xs_fixtures import RawConn, Xenstored, start_guest, start_xenstored

from xdom.backends.xenstored.server import XenstoredServer
from xdom.deploy.agent_client import AgentProcess
from xdom.deploy.launcher import XenstoredDomain, start_xenstored_domain
from xdom.domains.abi.hvm_params import HVM_PARAM_STORE_EVTCHN, HVM_PARAM_STORE_PFN
from xdom.domains.abi.xs_ring import ring_read, ring_write
from xdom.domains.abi.xs_wire import (
    RING_REQ_CONS,
    RING_REQ_OFFSET,
    RING_REQ_PROD,
    RING_RSP_CONS,
    RING_RSP_OFFSET,
    RING_RSP_PROD,
    Message,
    MessageReader,
    XenstoreError,
    XsType,
)
from xdom.domains.xenhost import BrokerXenHost
from xdom.domains.xenstore import XenstoreClient


def sigkill(xsd: Xenstored | XenstoredDomain) -> None:
    xsd.proc.send_signal(signal.SIGKILL)
    xsd.proc.wait()


def test_nodes_and_permissions_survive_sigkill(run_dir: str) -> None:
    xsd = start_xenstored(run_dir)
    try:
        with XenstoreClient.unix(xsd.socket_path) as c:
            for i in range(50):
                c.write(f"/keep/n{i}", f"value {i}")
            c.introduce(3, 0, 1)          # without a hypervisor, only introduced domains exist
            c.introduce(4, 0, 1)
            c.set_perms("/keep/n7", ["n3", "r4"])
            c.transaction(lambda tx: [c.write(f"/keep/tx{i}", "t", tx) for i in range(5)])
        xsd.proc.send_signal(signal.SIGKILL)
        xsd.proc.wait()
    finally:
        xsd.stop()
    xsd = start_xenstored(run_dir, xsd.state_dir)
    try:
        with XenstoreClient.unix(xsd.socket_path) as c:
            assert [c.read(f"/keep/n{i}") for i in range(50)] == [f"value {i}".encode() for i in range(50)]
            assert c.get_perms("/keep/n7") == ["n3", "r4"]
            assert c.directory("/keep")[-5:] == [f"tx{i}" for i in range(5)]
    finally:
        xsd.stop()


def test_guest_ring_and_watch_survive_a_xenstored_domain_restart(mgmt, run_dir: str) -> None:
    sock = os.path.join(run_dir, "xs.sock")
    state = os.path.join(run_dir, "xs-state")
    xs = start_xenstored_domain(mgmt, sock, state)
    guest = None
    try:
        dom0 = XenstoreClient.unix(sock)
        guest = start_guest(mgmt, dom0, xs, "g")
        base = f"/local/domain/{guest.domid}"
        guest.call("xs_connect")
        guest.call("xs_write", path="before", value="1")
        guest.call("xs_watch", path=f"{base}/ctl", token="ctl")
        assert guest.call("xs_events", n=1, secs=10)["events"] == [[f"{base}/ctl", "ctl"]]
        dom0.close()

        xs.proc.send_signal(signal.SIGKILL)          # the xenstore domain crashes
        xs.proc.wait()
        wait_until(lambda: mgmt.request("info", domid=xs.domid)["domain"]["state"] == "crashed",
                   what="the broker to see xenstored die")
        creds = mgmt.request("restart", domid=xs.domid)
        xs = start_xenstored_domain(mgmt, sock, state, creds=creds)

        dom0 = XenstoreClient.unix(sock)
        assert dom0.read(f"{base}/before") == b"1"
        guest.call("xs_write", path="after", value="2")          # the same ring, a new xenstored
        assert dom0.read(f"{base}/after") == b"2"
        dom0.write(f"{base}/ctl", "go")
        assert guest.call("xs_events", n=1, secs=10)["events"] == [[f"{base}/ctl", "ctl"]]
        dom0.close()
    finally:
        if guest is not None:
            guest.stop()
        xs.stop()


def test_a_released_domain_stays_gone_across_a_restart(run_dir: str) -> None:
    """Who exists survives SIGKILL: a domain released before it still cannot own a node
    (ENOENT, as Xen's xenstored answers for a domain that does not exist); one introduced
    before it still can."""
    xsd = start_xenstored(run_dir)
    try:
        with XenstoreClient.unix(xsd.socket_path) as c:
            c.write("/p", "v")
            with pytest.raises(XenstoreError) as refused:
                c.set_perms("/p", ["r7", "r1"])
            assert refused.value.name == "ENOENT"
            c.introduce(7, 0, 1)
            c.introduce(8, 0, 1)
            c.set_perms("/p", ["n0", "r7"])
            c.release(7)
        sigkill(xsd)
    finally:
        xsd.stop()
    xsd = start_xenstored(run_dir, xsd.state_dir)
    try:
        with XenstoreClient.unix(xsd.socket_path) as c:
            with pytest.raises(XenstoreError) as refused:
                c.set_perms("/p", ["r7"])
            assert refused.value.name == "ENOENT"
            assert c.get_perms("/p") == ["n0", "r7"]
            c.set_perms("/p", ["n8", "r0"])
            assert c.get_perms("/p") == ["n8", "r0"]
    finally:
        xsd.stop()


def test_a_domain_that_died_while_xenstored_was_down_is_released_on_restart(mgmt, run_dir: str) -> None:
    """C's live update ends with check_domains; ours checks every domain it restored.  A guest
    that dies while no xenstored runs is released when one comes back, so a new domain given
    its domid gets none of the dead one's rights, nor its nodes."""
    sock = os.path.join(run_dir, "xs.sock")
    state = os.path.join(run_dir, "xs-state")
    xs = start_xenstored_domain(mgmt, sock, state)
    guest = again = None
    try:
        with XenstoreClient.unix(sock) as dom0:
            guest = start_guest(mgmt, dom0, xs, "g")
            domid = guest.domid
            dom0.write("/secret", "s")
            dom0.set_perms("/secret", ["n0", f"r{domid}"])
            guest.call("xs_connect")
            assert guest.call("xs_read", path="/secret")["value"] == "s"
            guest.call("xs_write", path="mine", value="old")
        sigkill(xs)
        guest.kill()                                 # dies while no xenstored runs
        wait_until(lambda: mgmt.request("info", domid=domid)["domain"]["state"] in ("shutdown", "crashed"),
                   what="the broker to see the guest die")
        wait_until(lambda: mgmt.request("info", domid=xs.domid)["domain"]["state"] == "crashed",
                   what="the broker to see xenstored die")
        xs = start_xenstored_domain(mgmt, sock, state, creds=mgmt.request("restart", domid=xs.domid))

        with XenstoreClient.unix(sock) as dom0:
            assert not dom0.is_domain_introduced(domid)
            assert not dom0.exists(f"/local/domain/{domid}")          # the nodes it owned went with it
            # the same domid, a new domain
            creds = mgmt.request("restart", domid=domid)
            store = mgmt.request("setup_store", domid=domid, xenstore_domid=xs.domid)
            again = AgentProcess(mgmt, "g", creds=creds)
            home = f"/local/domain/{domid}"
            dom0.write(home, "")
            dom0.set_perms(home, [f"n{domid}"])
            dom0.introduce(domid, store["gfn"], store["port"])
            again.call("xs_connect")
            assert again.call("xs_read", path="/secret")["errno"] == "EACCES"
            dom0.set_perms("/secret", ["n0", f"r{domid}"])          # granted to the new one
            assert again.call("xs_read", path="/secret")["value"] == "s"
    finally:
        for g in (guest, again):
            if g is not None:
                g.stop()
        xs.stop()


# ---- transactions and requests in flight across a restart ------------------------------------------

def restart(xsd: Xenstored, run_dir: str) -> Xenstored:
    sigkill(xsd)
    return start_xenstored(run_dir, xsd.state_dir)


def test_a_transaction_open_on_a_socket_ends_with_eagain_after_a_restart(run_dir: str) -> None:
    """The old socket died with xenstored; its client connects again and names its transaction:
    EAGAIN (retry), not ENOENT.  An id never given out is still ENOENT, as in C."""
    xsd = start_xenstored(run_dir)
    try:
        c = RawConn(xsd.socket_path)
        assert c.call(XsType.XS_READ, b"/\0", tx=5).error_name == "ENOENT"              # (C) bogus
        tx = int(c.call(XsType.XS_TRANSACTION_START, b"\0").payload.rstrip(b"\0"))
        assert c.call(XsType.XS_WRITE, b"/in-tx\0v", tx=tx).type == XsType.XS_WRITE
        c.close()
        xsd = restart(xsd, run_dir)
        c = RawConn(xsd.socket_path)
        assert c.call(XsType.XS_WRITE, b"/in-tx\0w", tx=tx).error_name == "EAGAIN"
        assert c.call(XsType.XS_TRANSACTION_END, b"T\0", tx=tx).error_name == "EAGAIN"
        assert c.call(XsType.XS_READ, b"/in-tx\0").error_name == "ENOENT"             # never committed
        assert c.call(XsType.XS_READ, b"/\0", tx=1 << 20).error_name == "ENOENT"      # never given out
        again = int(c.call(XsType.XS_TRANSACTION_START, b"\0").payload.rstrip(b"\0"))
        assert again != tx
        assert c.call(XsType.XS_WRITE, b"/in-tx\0x", tx=again).type == XsType.XS_WRITE
        assert c.call(XsType.XS_TRANSACTION_END, b"T\0", tx=again).type == XsType.XS_TRANSACTION_END
        c.close()
        xsd = restart(xsd, run_dir)          # a second restart still knows the first one's ids
        c = RawConn(xsd.socket_path)
        assert c.call(XsType.XS_READ, b"/in-tx\0", tx=tx).error_name == "EAGAIN"
        assert c.call(XsType.XS_READ, b"/in-tx\0").payload == b"x"
        c.close()
    finally:
        xsd.stop()


def test_a_reconnecting_client_rides_out_restarts(run_dir: str) -> None:
    """XenstoreClient.unix(reconnect=True) under a stream of writes and transactions while
    xenstored is killed at random moments (seeded): every call returns once, without error,
    and the store holds what each one wrote; its watch keeps firing."""
    seed = int(os.environ.get("XDOM_FAULT_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    xsd = start_xenstored(run_dir)
    errors: list[BaseException] = []
    done = threading.Event()
    count = [0]
    events: list[str] = []

    def worker(c: XenstoreClient) -> None:
        try:
            i = 0
            while not done.is_set() or i < 20:
                c.write(f"/w/plain{i}", str(i))

                def body(tx: int, i: int = i) -> None:
                    old = c.read("/w/counter", tx) if c.exists("/w/counter", tx) else b"-1"
                    # i: the commit happened but its reply died with xenstored, and the old
                    # connection's id was answered EAGAIN on the new one (at least once, on a socket)
                    assert int(old) in (i - 1, i), (old, i)
                    c.write("/w/counter", str(i), tx)
                    c.write(f"/w/tx{i}", str(i), tx)
                c.transaction(body)
                i += 1
                count[0] = i
        except BaseException as e:
            errors.append(e)

    try:
        c = XenstoreClient.unix(xsd.socket_path, reconnect=True)
        try:
            c.watch("/w/counter", "t", lambda p, t: events.append(p))
            t = threading.Thread(target=worker, args=(c,))
            t.start()
            try:
                for _ in range(3):
                    target = count[0] + rng.randrange(1, 15)
                    wait_until(lambda: count[0] >= target or errors, what="progress")
                    time.sleep(rng.uniform(0, 0.01))
                    xsd = restart(xsd, run_dir)
            finally:
                done.set()
                t.join(60)
            assert not t.is_alive()
            assert not errors, f"seed {seed}: {errors[0]!r}"
            n = count[0]
            assert c.read("/w/counter") == str(n - 1).encode(), f"seed {seed}"
            assert all(c.read(f"/w/tx{i}") == str(i).encode() and c.read(f"/w/plain{i}") == str(i).encode()
                       for i in range(n)), f"seed {seed}"
            events.clear()
            c.write("/w/counter", "end")
            wait_until(lambda: "/w/counter" in events, what="the watch, registered again, to fire")
        finally:
            c.close()
    finally:
        xsd.stop()


def _seed() -> int:
    return int(os.environ.get("XDOM_FAULT_SEED", random.randrange(1 << 30)))


class RingDomain:
    """A domain in this process whose xenstore ring the test drives byte by byte."""

    def __init__(self, mgmt, xs: XenstoredDomain, sock: str, name: str = "g") -> None:
        creds = mgmt.request("create", name=name, memory="1M")
        store = mgmt.request("setup_store", domid=creds["domid"], xenstore_domid=xs.domid)
        self.host = BrokerXenHost(creds["hypercall"], creds["token"])
        self.domid = self.host.domid
        self.home = f"/local/domain/{self.domid}"
        with XenstoreClient.unix(sock) as dom0:
            dom0.write(self.home, "")
            dom0.set_perms(self.home, [f"n{self.domid}"])
            dom0.introduce(self.domid, store["gfn"], store["port"])
        self.page = self.host.memory.frame(self.host.get_param(HVM_PARAM_STORE_PFN))
        self.port = self.host.adopt_port(self.host.get_param(HVM_PARAM_STORE_EVTCHN))

    def send(self, data: bytes) -> int:
        n = ring_write(self.page, RING_REQ_OFFSET, RING_REQ_CONS, RING_REQ_PROD, data)
        if n:
            self.host.notify(self.port)
        return n

    def recv(self, timeout: float) -> bytes:
        data = ring_read(self.page, RING_RSP_OFFSET, RING_RSP_CONS, RING_RSP_PROD)
        if data:
            self.host.notify(self.port)
            return data
        select.select([self.host.evtchn.fileno(self.port)], [], [], timeout)
        self.host.evtchn.consume(self.port)
        return b""


def restart_domain(mgmt, xs: XenstoredDomain, sock: str, state: str) -> XenstoredDomain:
    sigkill(xs)
    wait_until(lambda: mgmt.request("info", domid=xs.domid)["domain"]["state"] == "crashed",
               what="the broker to see xenstored die")
    return start_xenstored_domain(mgmt, sock, state, creds=mgmt.request("restart", domid=xs.domid))


KEYS = 200          # nodes the ring stream writes over and over (a domain's node quota is 1000)


def test_every_request_on_a_ring_is_answered_once_across_restarts(mgmt, run_dir: str) -> None:
    """A stream of pipelined requests on a domain's ring while xenstored is killed (SIGKILL) at
    random points (seeded; XDOM_FAULT_SEED replays one): each request id gets exactly one reply,
    of its own type, and every write is there afterwards."""
    seed = _seed()
    rng = random.Random(seed)
    total = int(os.environ.get("XDOM_FAULT_REQUESTS", 600))
    kills = sorted(rng.sample(range(10, total), int(os.environ.get("XDOM_FAULT_ROUNDS", 3))))
    sock, state = os.path.join(run_dir, "xs.sock"), os.path.join(run_dir, "xs-state")
    xs = start_xenstored_domain(mgmt, sock, state)
    g = None
    try:
        g = RingDomain(mgmt, xs, sock)
        requests: dict[int, Message] = {}
        replies: Counter[int] = Counter()
        wrong: list[str] = []
        out = bytearray()
        reader = MessageReader()
        deadline = time.monotonic() + 120
        while sum(replies.values()) < total or out:
            assert time.monotonic() < deadline, f"seed {seed}: {total - len(replies)} requests unanswered"
            while len(requests) < total and len(requests) - len(replies) < 24:
                rid = len(requests) + 1
                i = rid // 2
                msg = (Message(XsType.XS_WRITE, rid, 0, f"{g.home}/k{i % KEYS}\0{i}".encode()) if rid % 2 else
                       Message(XsType.XS_READ, rid, 0, f"{g.home}/k{(i - 1) % KEYS}\0".encode()) if i > 1 else
                       Message(XsType.XS_DIRECTORY, rid, 0, f"{g.home}\0".encode()))
                requests[rid] = msg
                out += msg.encode()
            if out:
                del out[:g.send(out)]
            if kills and len(requests) >= kills[0]:
                kills.pop(0)
                time.sleep(rng.uniform(0, 0.004))
                xs = restart_domain(mgmt, xs, sock, state)
            for reply in reader.feed(g.recv(0.05)):
                assert reply.type != XsType.XS_WATCH_EVENT
                replies[reply.req_id] += 1
                asked = requests.get(reply.req_id)
                if asked is None or reply.type != asked.type or asked.type == XsType.XS_READ and reply.payload != str(reply.req_id // 2 - 1).encode():
                    wrong.append(f"{reply!r} for {asked!r}")
        assert not wrong, f"seed {seed}: {wrong[:5]}"
        assert set(replies) == set(requests), f"seed {seed}"
        assert all(n == 1 for n in replies.values()), f"seed {seed}: {[r for r, n in replies.items() if n != 1]}"
        with XenstoreClient.unix(sock) as dom0:
            last = (total - 1) // 2                          # the last write's i
            assert all(dom0.read(f"{g.home}/k{i % KEYS}") == str(i).encode()
                       for i in range(max(0, last - KEYS + 1), last + 1)), f"seed {seed}"
    finally:
        if g is not None:
            g.host.close()
        xs.stop()


def test_a_transaction_open_on_a_ring_across_a_restart_is_retried(mgmt, run_dir: str) -> None:
    """What blkback saw: a transaction open on its ring when xenstored died.  The restored
    xenstored answers EAGAIN for it (the ring's requests and the commit), and the client's
    transaction() runs the body again; an id the ring was never given is still ENOENT."""
    sock, state = os.path.join(run_dir, "xs.sock"), os.path.join(run_dir, "xs-state")
    xs = start_xenstored_domain(mgmt, sock, state)
    g = c = None
    try:
        g = RingDomain(mgmt, xs, sock)
        c = XenstoreClient.ring(g.host)
        tx = c.transaction_start()
        c.write("state", "1", tx)
        xs = restart_domain(mgmt, xs, sock, state)
        with pytest.raises(XenstoreError) as aborted:
            c.write("state", "2", tx)
        assert aborted.value.name == "EAGAIN"
        with pytest.raises(XenstoreError) as aborted:
            c.transaction_end(tx)
        assert aborted.value.name == "EAGAIN"
        with pytest.raises(XenstoreError) as bogus:
            c.read("state", 1 << 20)
        assert bogus.value.name == "ENOENT"                                  # (C)
        attempts = []

        def body(t: int) -> bool:
            attempts.append(t)
            present = c.exists("state", t)                                # blkback's switch_state
            c.write("state", "4", t)
            if len(attempts) == 1:
                nonlocal xs
                xs = restart_domain(mgmt, xs, sock, state)              # dies inside the body
            return present
        assert c.transaction(body) is False
        assert len(attempts) == 2 and attempts[1] != attempts[0]
        assert c.read("state") == b"4"
    finally:
        if c is not None:
            c.close()
        if g is not None:
            g.host.close()
        xs.stop()


def test_a_domain_restarted_while_xenstored_was_down_is_a_new_domain(mgmt, run_dir: str) -> None:
    """The guest dies and is restarted under its domid (running again) while no xenstored runs:
    the restored xenstored finds another incarnation than the one it saved, releases the old
    domain (its nodes, its grants) before mapping any ring, and the new one starts afresh."""
    sock, state = os.path.join(run_dir, "xs.sock"), os.path.join(run_dir, "xs-state")
    xs = start_xenstored_domain(mgmt, sock, state)
    guest = again = None
    try:
        with XenstoreClient.unix(sock) as dom0:
            guest = start_guest(mgmt, dom0, xs, "g")
            domid, home = guest.domid, f"/local/domain/{guest.domid}"
            dom0.write("/secret", "s")
            dom0.set_perms("/secret", ["n0", f"r{domid}"])
            guest.call("xs_connect")
            guest.call("xs_write", path="mine", value="old")
        sigkill(xs)
        guest.kill()
        wait_until(lambda: mgmt.request("info", domid=domid)["domain"]["state"] == "crashed",
                   what="the broker to see the guest die")
        creds = mgmt.request("restart", domid=domid)
        store = mgmt.request("setup_store", domid=domid, xenstore_domid=xs.domid)
        again = AgentProcess(mgmt, "g", creds=creds)                     # running before xenstored is back
        assert mgmt.request("info", domid=domid)["domain"]["state"] == "running"
        wait_until(lambda: mgmt.request("info", domid=xs.domid)["domain"]["state"] == "crashed",
                   what="the broker to see xenstored die")
        xs = start_xenstored_domain(mgmt, sock, state, creds=mgmt.request("restart", domid=xs.domid))
        with XenstoreClient.unix(sock) as dom0:
            assert not dom0.is_domain_introduced(domid)
            assert not dom0.exists(f"{home}/mine")
            dom0.write(home, "")
            dom0.set_perms(home, [f"n{domid}"])
            dom0.introduce(domid, store["gfn"], store["port"])
            again.call("xs_connect")
            assert again.call("xs_read", path="/secret")["errno"] == "EACCES"
            assert again.call("xs_read", path="mine")["errno"] == "ENOENT"
            again.call("xs_write", path="mine", value="new")
            assert dom0.read(f"{home}/mine") == b"new"
    finally:
        for g in (guest, again):
            if g is not None:
                g.stop()
        xs.stop()


class _ServerThread:
    """An in-process xenstored turned by a thread, so a test can stop it between two turns."""

    def __init__(self, server: XenstoredServer) -> None:
        self.server = server
        self._run = True
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while self._run:
            self.server.run_once(0.02)

    def pause(self) -> None:
        self._run = False
        self._thread.join()


def test_a_reply_persisted_but_not_written_before_a_crash_is_written_after_it(
        mgmt, run_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """xenstored persists a turn's replies before it writes them to the rings (so a reply a
    guest saw is on disk).  Killed between the two, the restarted xenstored owes the guest
    that reply; the guest, waiting for it, sends nothing more to prompt it.  It must be
    written at once, not when some later event happens to touch that ring."""
    sock, state = os.path.join(run_dir, "xs.sock"), os.path.join(run_dir, "xs-state")
    os.makedirs(state)
    creds = mgmt.request("create", name="xs", memory="2M", privileged=True)
    xh = BrokerXenHost(creds["hypercall"], creds["token"])
    first = _ServerThread(XenstoredServer(sock, state, xenhost=xh))
    g = second = None
    try:
        g = RingDomain(mgmt, SimpleNamespace(domid=xh.domid), sock)       # type: ignore[arg-type]
        first.pause()
        real_flush = XenstoredServer._flush
        monkeypatch.setattr(XenstoredServer, "_flush",             # the ring write the crash cut off
                            lambda self, conn: False if conn.is_ring else real_flush(self, conn))
        assert g.send(Message(XsType.XS_GET_DOMAIN_PATH, 7, 0, b"%d\0" % g.domid).encode())
        wait_until(lambda: (first.server.run_once(0.02), first.server.rings[g.domid].committed)[1] != 0,
                   what="the request read and its reply persisted")
        assert not g.recv(0.05)
        monkeypatch.undo()
        first.server.close()              # (closing persists nothing: what a SIGKILL leaves)
        xh.close_port(first.server.virq_port)     # (a domain restart would reset it)
        second = _ServerThread(XenstoredServer(sock, state, xenhost=xh))
        reader, replies = MessageReader(), []
        wait_until(lambda: replies.extend(reader.feed(g.recv(0.05))) or replies, timeout=5.0,
                   what="the owed reply")
        assert [(m.type, m.req_id, m.payload) for m in replies] == \
            [(XsType.XS_GET_DOMAIN_PATH, 7, f"/local/domain/{g.domid}\0".encode())]
    finally:
        if second is not None:
            second.pause()
            second.server.close()
        if g is not None:
            g.host.close()
        xh.close()
