"""xenstored killed with SIGKILL and restarted keeps what it committed."""

from __future__ import annotations

import os
import signal

import pytest

from xdom.deploy.agent_client import AgentProcess
from xdom.deploy.launcher import XenstoredDomain, start_xenstored_domain
from xdom.domains.xenstore import XenstoreClient
from xdom.domains.xs_wire import XenstoreError

from helpers import wait_until
from xs_fixtures import Xenstored, start_guest, start_xenstored


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
