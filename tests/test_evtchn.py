"""Event channel semantics, run against both xenhost variants."""

from __future__ import annotations

import errno

import pytest
from helpers import wait_until

from xdom.domains.abi.event_channel import (
    DOMID_SELF,
    VIRQ_DOM_EXC,
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_unbound,
    EVTCHNSTAT_virq,
)
from xdom.domains.abi.hypercall_wire import HypercallError


def _bound_pair(domains):
    a, b = domains.create("a"), domains.create("b")
    pa = a.alloc_unbound(b.domid)
    assert a.port_status(pa) == {"status": EVTCHNSTAT_unbound, "remote_dom": b.domid, "remote_port": 0, "virq": -1}
    pb = b.bind_interdomain(a.domid, pa)
    assert b.evtchn.wait(0) == [pb]       # Xen marks the binder's port pending once
    return a, b, pa, pb


def test_bind_and_notify_both_ways(domains) -> None:
    a, b, pa, pb = _bound_pair(domains)
    assert a.port_status(pa)["status"] == EVTCHNSTAT_interdomain
    assert b.port_status(pb) == {"status": EVTCHNSTAT_interdomain, "remote_dom": a.domid,
                                 "remote_port": pa, "virq": -1}
    assert a.evtchn.wait(0) == []
    for _ in range(3):
        a.notify(pa)
        a.notify(pa)                      # coalesces, like a pending bit
        assert b.evtchn.wait(1) == [pb]
        assert b.evtchn.wait(0) == []
        b.notify(pb)
        assert a.evtchn.wait(1) == [pa]


def test_bind_rules(domains) -> None:
    a, b = domains.create("a"), domains.create("b")
    c = domains.create("c")
    pa = a.alloc_unbound(b.domid)
    with pytest.raises(HypercallError) as e:
        c.bind_interdomain(a.domid, pa)           # offered to b, not c
    assert e.value.errno == errno.EINVAL
    with pytest.raises(HypercallError) as e:
        b.bind_interdomain(a.domid, pa + 7)       # no such port
    assert e.value.errno == errno.EINVAL
    with pytest.raises(HypercallError) as e:
        b.bind_interdomain(999, 1)                # no such domain
    assert e.value.errno == errno.ESRCH
    with pytest.raises(HypercallError) as e:
        a.alloc_unbound(999)
    assert e.value.errno == errno.ESRCH
    b.bind_interdomain(a.domid, pa)
    with pytest.raises(HypercallError):
        b.bind_interdomain(a.domid, pa)           # already bound
    with pytest.raises(HypercallError) as e:
        a.close_port(pa + 50)
    assert e.value.errno == errno.EINVAL
    # a loopback channel to oneself
    p1 = a.alloc_unbound(DOMID_SELF)
    p2 = a.bind_interdomain(DOMID_SELF, p1)
    a.evtchn.wait(0)
    a.notify(p1)
    assert a.evtchn.wait(1) == [p2]


def test_closing_one_end_is_harmless(domains) -> None:
    a, b, pa, pb = _bound_pair(domains)
    b.close_port(pb)
    # a's port is unbound again, remote still b (Xen's semantics)
    assert a.port_status(pa) == {"status": EVTCHNSTAT_unbound, "remote_dom": b.domid, "remote_port": 0, "virq": -1}
    for _ in range(1000):
        a.notify(pa)                       # nobody listens; nothing breaks
    # b can bind again to the same port, and notifications flow as before
    pb2 = b.bind_interdomain(a.domid, pa)
    b.evtchn.wait(0)
    a.notify(pa)
    assert b.evtchn.wait(1) == [pb2]
    b.notify(pb2)
    assert pa in a.evtchn.wait(1)


def test_peer_death_unbinds(domains) -> None:
    a, b, pa, pb = _bound_pair(domains)
    b.close()
    domains.hosts.remove(b)
    wait_until(lambda: a.port_status(pa)["status"] == EVTCHNSTAT_unbound, what="a's port to become unbound")
    a.notify(pa)


def test_virq_dom_exc_needs_privilege_and_fires_on_death(domains) -> None:
    watcher = domains.create("xs", privileged=True)
    plain = domains.create("plain")
    with pytest.raises(HypercallError) as e:
        plain.bind_virq(VIRQ_DOM_EXC)
    assert e.value.errno == errno.EPERM
    port = watcher.bind_virq(VIRQ_DOM_EXC)
    assert watcher.port_status(port)["status"] == EVTCHNSTAT_virq
    assert watcher.port_status(port)["virq"] == VIRQ_DOM_EXC
    with pytest.raises(HypercallError) as e:
        watcher.bind_virq(VIRQ_DOM_EXC)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(HypercallError):
        watcher.bind_virq(10_000)
    victim = domains.create("victim")
    assert watcher.evtchn.wait(0) == []
    victim.close()
    domains.hosts.remove(victim)
    assert watcher.evtchn.wait(10) == [port]
    assert domains.domain_state(victim.domid) == "crashed"


def test_port_numbers_are_reused_after_close(domains) -> None:
    a, b = domains.create("a"), domains.create("b")
    ports = [a.alloc_unbound(b.domid) for _ in range(10)]
    assert ports == list(range(1, 11))
    a.close_port(ports[3])
    assert a.alloc_unbound(b.domid) == ports[3]
