"""xenstored as a domain: guests talk to it over their ring page only.

The toolstack sets up each guest's store (reserved grant 1 + an event
channel, through the broker), starts the guest, and introduces it; the
guest's client then reaches xenstored through the ring alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from helpers import wait_until
from xs_fixtures import start_guest

from xdom.deploy.launcher import XenstoredDomain, start_xenstored_domain
from xdom.domains.xenstore import XenstoreClient


@pytest.fixture
def xenstored(mgmt, run_dir: str) -> Iterator[XenstoredDomain]:
    xs = start_xenstored_domain(mgmt, os.path.join(run_dir, "xs.sock"), os.path.join(run_dir, "xs-state"))
    try:
        yield xs
    finally:
        xs.stop()


@pytest.fixture
def dom0(xenstored: XenstoredDomain) -> Iterator[XenstoreClient]:
    c = XenstoreClient.unix(xenstored.socket_path)
    try:
        yield c
    finally:
        c.close()


def test_guest_reads_and_writes_over_its_ring(mgmt, xenstored, dom0) -> None:
    g = start_guest(mgmt, dom0, xenstored, "g1")
    try:
        assert g.call("xs_connect")["domain_path"] == f"/local/domain/{g.domid}"
        g.call("xs_write", path="data/hello", value="from the ring")         # relative path
        assert dom0.read(f"/local/domain/{g.domid}/data/hello") == b"from the ring"
        dom0.write(f"/local/domain/{g.domid}/data/reply", "from dom0")
        assert g.call("xs_read", path="data/reply")["value"] == "from dom0"
        assert g.call("xs_read", path="/tool/xenstored")["errno"] in ("EACCES", "ENOENT")  # not its node
        assert dom0.is_domain_introduced(g.domid)
    finally:
        g.stop()


def test_one_guest_watches_anothers_writes(mgmt, xenstored, dom0) -> None:
    a = start_guest(mgmt, dom0, xenstored, "a")
    b = start_guest(mgmt, dom0, xenstored, "b")
    try:
        shared = "/shared"
        dom0.write(shared, "")
        dom0.set_perms(shared, ["n0", f"b{a.domid}", f"b{b.domid}"])
        for d in (a, b):
            d.call("xs_connect")
        a.call("xs_watch", path=shared, token="tok")
        assert a.call("xs_events", n=1, secs=10)["events"] == [[shared, "tok"]]     # the first event
        b.call("xs_write", path=f"{shared}/from-b", value="1")
        assert a.call("xs_events", n=1, secs=10)["events"] == [[f"{shared}/from-b", "tok"]]
    finally:
        a.stop()
        b.stop()


def test_release_domain_fires_when_a_guest_dies(mgmt, xenstored, dom0) -> None:
    import queue
    events: queue.Queue[str] = queue.Queue()
    dom0.watch("@releaseDomain", "rel", lambda p, t: events.put(p))
    assert events.get(timeout=10) == "@releaseDomain"          # the first event
    g = start_guest(mgmt, dom0, xenstored, "doomed")
    try:
        g.call("xs_connect")
        g.kill()
        assert events.get(timeout=10) == "@releaseDomain"
        wait_until(lambda: not dom0.is_domain_introduced(g.domid), what="xenstored to release the domain")
    finally:
        g.stop()


def test_a_guest_that_breaks_its_ring_is_cut_off_alone(mgmt, xenstored, dom0) -> None:
    from helpers import RemoteDomain

    from xdom.domains.abi.xs_wire import XENSTORE_ERROR_RINGIDX
    good = start_guest(mgmt, dom0, xenstored, "good")
    creds = mgmt.request("create", name="bad", memory="1M")
    store = mgmt.request("setup_store", domid=creds["domid"], xenstore_domid=xenstored.domid)
    bad = RemoteDomain(mgmt, "bad", creds=creds)
    try:
        dom0.write(f"/local/domain/{bad.domid}", "")
        dom0.introduce(bad.domid, store["gfn"], store["port"])
        good.call("xs_connect")
        assert bad.call("xs_break_ring")["ring_error"] == XENSTORE_ERROR_RINGIDX
        good.call("xs_write", path="still", value="served")
        assert dom0.read(f"/local/domain/{good.domid}/still") == b"served"
        assert xenstored.proc.poll() is None
    finally:
        good.stop()
        bad.stop()


def test_a_domain_named_before_its_introduction_is_forgotten_when_it_dies(mgmt, xenstored, dom0) -> None:
    """The toolstack may name a domain the broker created before introducing it (libxl's
    order): the hypervisor vouches for it.  If it dies first, xenstored forgets it on
    VIRQ_DOM_EXC (C's check_domains walks every domain it knows, introduced or not), so the
    next domain given its domid does not inherit what was granted to the dead one."""
    from xdom.deploy.agent_client import AgentProcess
    from xdom.domains.abi.xs_wire import XenstoreError, XsType

    def known(domid: int) -> bool:
        try:
            dom0.request(XsType.XS_CONTROL, f"quota\0{domid}\0".encode())
            return True
        except XenstoreError as e:
            assert e.name == "ENOENT"
            return False

    early = AgentProcess(mgmt, "early")                  # running, never introduced
    again = None
    try:
        domid = early.domid
        dom0.write("/secret", "s")
        dom0.set_perms("/secret", ["n0", f"r{domid}"])
        dom0.write("/given", "g")
        dom0.set_perms("/given", [f"n{domid}"])
        assert known(domid)
        with pytest.raises(XenstoreError) as refused:      # a domid the broker never handed out
            dom0.set_perms("/given", ["n7000"])
        assert refused.value.name == "ENOENT"
        early.kill()
        wait_until(lambda: not known(domid), what="xenstored to forget the dead domain")
        assert not dom0.exists("/given")                 # what it owned went with it

        creds = mgmt.request("restart", domid=domid)     # the same domid, a new domain
        store = mgmt.request("setup_store", domid=domid, xenstore_domid=xenstored.domid)
        again = AgentProcess(mgmt, "early", creds=creds)
        home = f"/local/domain/{domid}"
        dom0.write(home, "")
        dom0.set_perms(home, [f"n{domid}"])
        dom0.introduce(domid, store["gfn"], store["port"])
        again.call("xs_connect")
        assert again.call("xs_read", path="/secret")["errno"] == "EACCES"
        assert again.call("xs_read", path=f"{home}")["value"] == ""
    finally:
        early.stop()
        if again is not None:
            again.stop()


def _known(dom0: XenstoreClient, domid: int) -> bool:
    """Whether xenstored has a record of ``domid`` (CONTROL quota answers ENOENT otherwise, as C)."""
    from xdom.domains.abi.xs_wire import XenstoreError, XsType
    try:
        dom0.request(XsType.XS_CONTROL, f"quota\0{domid}\0".encode())
        return True
    except XenstoreError as e:
        assert e.name == "ENOENT"
        return False


def test_a_domain_restarted_before_xenstored_handles_its_death_is_a_new_domain(mgmt, xenstored, dom0) -> None:
    """The race of a domid restarted and running again before xenstored looked (here xenstored
    is stopped with SIGSTOP meanwhile): the broker's incarnation tells the two apart, so the
    old domain is released (@releaseDomain fires, its nodes go) and the new one inherits
    nothing, not even when the toolstack's next request arrives together with VIRQ_DOM_EXC."""
    import queue
    import signal

    from xs_fixtures import RawConn

    from xdom.deploy.agent_client import AgentProcess
    from xdom.domains.abi.xs_wire import XsType

    events: queue.Queue[str] = queue.Queue()
    dom0.watch("@releaseDomain", "rel", lambda p, t: events.put(p))
    assert events.get(timeout=10) == "@releaseDomain"          # the first event
    g = start_guest(mgmt, dom0, xenstored, "g")
    again = None
    try:
        domid, home = g.domid, f"/local/domain/{g.domid}"
        dom0.write("/secret", "s")
        dom0.set_perms("/secret", ["n0", f"r{domid}"])
        g.call("xs_connect")
        g.call("xs_write", path="mine", value="old")
        dom0.write("/for-new", "n")
        toolstack = RawConn(xenstored.socket_path)
        xenstored.proc.send_signal(signal.SIGSTOP)
        try:
            g.kill()
            wait_until(lambda: mgmt.request("info", domid=domid)["domain"]["state"] == "crashed",
                       what="the broker to see the guest die")
            creds = mgmt.request("restart", domid=domid)         # the same domid, a new domain, running
            store = mgmt.request("setup_store", domid=domid, xenstore_domid=xenstored.domid)
            again = AgentProcess(mgmt, "g", creds=creds)
            assert mgmt.request("info", domid=domid)["domain"]["state"] == "running"
            # the toolstack's grant for the new domain, sent while xenstored still sleeps: it
            # arrives with VIRQ_DOM_EXC, and must not be taken for a grant to the dead domain
            toolstack.send(XsType.XS_SET_PERMS, f"/for-new\0n0\0r{domid}\0".encode())
        finally:
            xenstored.proc.send_signal(signal.SIGCONT)
        assert toolstack.recv().type == XsType.XS_SET_PERMS
        assert events.get(timeout=10) == "@releaseDomain"
        assert not dom0.is_domain_introduced(domid)
        assert not dom0.exists(f"{home}/mine")                    # the old domain's nodes went with it
        dom0.write(home, "")
        dom0.set_perms(home, [f"n{domid}"])
        dom0.introduce(domid, store["gfn"], store["port"])
        again.call("xs_connect")
        assert again.call("xs_read", path="/secret")["errno"] == "EACCES"     # granted to the old one
        assert again.call("xs_read", path="mine")["errno"] == "ENOENT"
        assert again.call("xs_read", path="/for-new")["value"] == "n"
        toolstack.close()
    finally:
        g.stop()
        if again is not None:
            again.stop()


def test_a_domain_destroyed_before_it_ever_ran_is_forgotten(mgmt, xenstored, dom0) -> None:
    """The broker raises VIRQ_DOM_EXC for a domain destroyed without ever running (as Xen does):
    the record a permission made for it goes, so the next domain with its domid is a stranger."""
    creds = mgmt.request("create", name="never", memory="1M")
    domid = creds["domid"]
    dom0.write("/for-never", "x")
    dom0.set_perms("/for-never", ["n0", f"r{domid}"])
    assert _known(dom0, domid)
    mgmt.request("destroy", domid=domid)
    wait_until(lambda: not _known(dom0, domid), what="xenstored to forget the destroyed domain")
