"""The broker dies (SIGKILL) under running domains and a new one takes over.

Domains keep their memory, mappings and event channels through it (they
hold the descriptors); their next hypercall waits for the new broker,
rejoins it and carries on.  A domain that died while no broker was there is
released by the new one as if it had been seen dying; a hypercall the dead
broker carried out but never answered is answered, not done twice.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from helpers import RemoteDomain, wait_until

from xdom.broker.mgmt_client import ManagementClient
from xdom.deploy.launcher import BrokerProcess, start_broker
from xdom.domains.abi.event_channel import VIRQ_DOM_EXC, EVTCHNSTAT_interdomain, EVTCHNSTAT_unbound
from xdom.domains.abi.grant_table import GNTST_okay


class Host:
    """A broker on a run directory (and its state), restartable, with domains to stop at the end."""

    def __init__(self, run_dir: str) -> None:
        self.dir = os.path.join(run_dir, "broker")
        self.broker: BrokerProcess = start_broker(self.dir)
        self.mgmt: ManagementClient = self.broker.client()
        self.domains: list[RemoteDomain] = []

    def spawn(self, name: str, privileged: bool = False) -> RemoteDomain:
        d = RemoteDomain(self.mgmt, name, privileged=privileged)
        self.domains.append(d)
        return d

    def kill_broker(self) -> None:
        self.mgmt.close()
        self.broker.proc.send_signal(signal.SIGKILL)
        self.broker.proc.wait()

    def start_broker(self) -> None:
        self.broker = start_broker(self.dir)
        self.mgmt = self.broker.client()

    def info(self, domid: int) -> dict:
        return self.mgmt.request("info", domid=domid)["domain"]

    def close(self) -> None:
        for d in reversed(self.domains):
            d.stop()
        self.mgmt.close()
        self.broker.stop()


@pytest.fixture
def host(run_dir: str) -> Iterator[Host]:
    h = Host(run_dir)
    try:
        yield h
    finally:
        h.close()


def test_domains_run_on_through_a_broker_restart(host: Host) -> None:
    xs = host.spawn("xs", privileged=True)
    virq = xs.call("bind_virq", virq=VIRQ_DOM_EXC)["port"]
    a, x, v = host.spawn("a"), host.spawn("x"), host.spawn("v")
    ref = a.call("grant", domid=x.domid, gfn=10, data="before")["ref"]
    (status, handle), = x.call("map", domid=a.domid, refs=[ref])["results"]
    assert status == GNTST_okay
    pa = a.call("alloc_unbound", remote=x.domid)["port"]
    px = x.call("bind", remote=a.domid, port=pa)["port"]
    vref = a.call("grant", domid=v.domid, gfn=20, ro=True, data="for v")["ref"]
    (vstatus, _), = v.call("map", domid=a.domid, refs=[vref], ro=True)["results"]
    assert vstatus == GNTST_okay
    pv = a.call("alloc_unbound", remote=v.domid)["port"]
    v.call("bind", remote=a.domid, port=pv)
    before = {d.domid: host.info(d.domid) for d in (xs, a, x, v)}

    host.kill_broker()
    # No broker: the data path does not need one.
    x.call("write_map", handle=handle, data="during")
    assert a.call("read", gfn=10, len=6)["data"] == "during"
    x.call("notify", port=px)
    assert pa in a.call("wait", secs=10)["ports"]
    a.call("notify", port=pa)
    assert px in x.call("wait", secs=10)["ports"]
    v.kill()                                          # dies with no broker to see it

    host.start_broker()
    # v's death is noticed by the new broker: its mapping released, its channel unbound, xenstored told.
    assert virq in xs.call("wait", secs=20)["ports"]
    assert host.info(v.domid)["state"] == "crashed"
    assert a.call("end", ref=vref)["ok"] is True
    # The others carry on, their domids, channels and mappings intact.
    for d in (xs, a, x):
        info = host.info(d.domid)
        assert (info["name"], info["state"], info["pid"]) == (before[d.domid]["name"], "running", d.pid)
    assert a.call("port_status", port=pa)["status"] == EVTCHNSTAT_interdomain
    assert a.call("port_status", port=pv)["status"] == EVTCHNSTAT_unbound
    assert x.call("broker_restarts")["restarts"] == 0    # no hypercall yet: it never noticed
    assert a.call("end", ref=ref)["ok"] is False      # still mapped by x: the pin survived
    ref2 = a.call("grant", domid=x.domid, gfn=11, data="after")["ref"]
    (status2, handle2), = x.call("map", domid=a.domid, refs=[ref2])["results"]
    assert status2 == GNTST_okay and x.call("peek", handle=handle2, len=5)["data"] == "after"
    assert x.call("broker_restarts")["restarts"] == 1
    assert x.call("peek", handle=handle, len=6)["data"] == "during"
    assert x.call("unmap", handles=[handle, handle2])["results"] == [GNTST_okay, GNTST_okay]
    assert a.call("end", ref=ref)["ok"] is True
    x.call("notify", port=px)
    assert pa in a.call("wait", secs=10)["ports"]
    # A new domain gets a new domid, never one in use.
    late = host.spawn("late")
    assert late.domid not in {d.domid for d in (xs, a, x, v)}
    host.kill_broker()                                # and again: the new broker wrote its own state
    host.start_broker()
    ref3 = a.call("grant", domid=late.domid, gfn=12, data="twice")["ref"]
    (status3, handle3), = late.call("map", domid=a.domid, refs=[ref3])["results"]
    assert status3 == GNTST_okay and late.call("peek", handle=handle3, len=5)["data"] == "twice"
    assert late.call("broker_restarts")["restarts"] == 1


def test_a_call_carried_out_but_never_answered_is_answered_once(host: Host,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    a, x = host.spawn("a"), host.spawn("x")
    ref = a.call("grant", domid=x.domid, gfn=10, data="mapped once")["ref"]
    host.kill_broker()
    monkeypatch.setenv("XDOM_BROKER_DIE_BEFORE_REPLY", "map")
    host.start_broker()
    monkeypatch.delenv("XDOM_BROKER_DIE_BEFORE_REPLY")
    x.send("map", domid=a.domid, refs=[ref])          # the broker maps, writes it down, dies
    wait_until(lambda: host.broker.proc.poll() is not None, 20, "the broker to die at its failpoint")
    host.start_broker()
    (status, handle), = x.read(60)["results"]
    assert status == GNTST_okay and x.call("peek", handle=handle, len=11)["data"] == "mapped once"
    assert host.info(x.domid)["mappings_held"] == 1                 # one mapping, not two
    assert x.call("unmap", handles=[handle])["results"] == [GNTST_okay]
    assert a.call("end", ref=ref)["ok"] is True


def test_what_cannot_be_taken_over_fails_that_domain_alone(host: Host) -> None:
    a = host.spawn("a")
    starting = host.mgmt.request("create", name="starting", memory="1M", uid=os.geteuid())
    host.kill_broker()
    host.start_broker()
    # A domain that had not started: its store and channels lived in the dead broker.
    info = host.info(starting["domid"])
    assert info["state"] == "crashed" and info["shutdown_reason"] == "broker restart"
    host.mgmt.request("restart", domid=starting["domid"])              # the toolstack starts it again
    ref = a.call("grant", domid=a.domid, gfn=3, data="fine")["ref"]
    (status, handle), = a.call("map", domid=a.domid, refs=[ref])["results"]
    assert status == GNTST_okay


@pytest.mark.parametrize("op", ["unmap", "evtchn_alloc_unbound", "evtchn_bind_interdomain"])
def test_other_calls_answered_once_across_a_takeover(host: Host, monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    a, x = host.spawn("a"), host.spawn("x")
    ref = a.call("grant", domid=x.domid, gfn=10, data="x")["ref"]
    (status, handle), = x.call("map", domid=a.domid, refs=[ref])["results"]
    port = a.call("alloc_unbound", remote=x.domid)["port"] if op == "evtchn_bind_interdomain" else 0
    host.kill_broker()
    monkeypatch.setenv("XDOM_BROKER_DIE_BEFORE_REPLY", op)
    host.start_broker()
    monkeypatch.delenv("XDOM_BROKER_DIE_BEFORE_REPLY")
    caller = a if op == "evtchn_alloc_unbound" else x
    if op == "unmap":
        x.send("unmap", handles=[handle])
    elif op == "evtchn_alloc_unbound":
        a.send("alloc_unbound", remote=x.domid)
    else:
        x.send("bind", remote=a.domid, port=port)
    wait_until(lambda: host.broker.proc.poll() is not None, 20, "the broker to die at its failpoint")
    host.start_broker()
    reply = caller.read(60)
    if op == "unmap":
        assert reply["results"] == [GNTST_okay]                      # not GNTST_bad_handle
        assert a.call("end", ref=ref)["ok"] is True
    else:
        # One channel, not two; and its descriptors reached the caller: events flow.
        if op == "evtchn_alloc_unbound":
            assert "port" in reply, reply
            port = reply["port"]
            xp = x.call("bind", remote=a.domid, port=port)["port"]
        else:
            xp = reply["port"]
        assert host.info(a.domid)["event_channels"] == 1 and host.info(x.domid)["event_channels"] == 1
        x.call("notify", port=xp)
        assert port in a.call("wait", secs=10)["ports"]
        a.call("notify", port=port)
        assert xp in x.call("wait", secs=10)["ports"]


def test_only_the_domain_s_own_process_rejoins_with_its_own_key(host: Host) -> None:
    """A new broker takes a domain back only from the process that said hello (pid and start
    time) and with the key it was given then: a colluder holding the key, or the domain's
    process with a guessed key, or any process naming a domid that does not wait, is refused."""
    import socket as socket_mod

    from xdom.domains.abi.hypercall_wire import MAX_MESSAGE, decode_reply, encode_request

    a, x = host.spawn("a"), host.spawn("x")
    key = a.call("leak_rejoin_key")["key"]
    assert len(key) == 32
    host.kill_broker()
    host.start_broker()

    def rejoin(domid: int, k: str) -> str:
        s = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_SEQPACKET)
        try:
            s.connect(os.path.join(host.dir, "hypercall.sock"))
            s.sendmsg([encode_request("rejoin", domid=domid, key=k)])
            data = s.recv(MAX_MESSAGE)
            try:
                decode_reply(data)
            except Exception as e:
                return getattr(e, "name", repr(e))
            return "OK"
        finally:
            s.close()

    assert rejoin(a.domid, key) == "EACCES"             # the right key from the wrong process
    assert rejoin(a.domid, "0" * 32) == "EACCES"
    assert rejoin(999, key) == "ESRCH"
    # the colluder's tries cost the real domain nothing: it rejoins on its next call
    ref = a.call("grant", domid=x.domid, gfn=5, data="still a")["ref"]
    (status, handle), = x.call("map", domid=a.domid, refs=[ref])["results"]
    assert status == GNTST_okay and x.call("peek", handle=handle, len=7)["data"] == "still a"
    a.call("alloc_unbound", remote=x.domid)             # a's first hypercall since: it rejoins
    assert a.call("broker_restarts")["restarts"] == 1
    assert rejoin(a.domid, key) == "ESRCH"              # rejoined: no longer waiting


def test_memory_is_populated_as_used_and_survives_a_takeover_or_a_lost_reply(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """A domain gets frames for the gfns it uses, as it comes to use them.  A gfn with no frame
    grants nothing; a frame made after ``set_memory`` is journaled, so the next broker knows it as
    the domain's own; one whose reply died with the broker that made it is made again, once, when
    the domain asks again (the first reached no one)."""
    a, x = host.spawn("a"), host.spawn("x")
    nr = host.info(a.domid)["memory_kib"] // 4
    first = a.call("populated")["frames"]
    assert 0 < first < nr and host.info(a.domid)["populated_kib"] == first * 4    # not all made at start
    ref = a.call("grant_only", domid=x.domid, gfn=nr - 40)["ref"]
    (status, _), = x.call("map", domid=a.domid, refs=[ref])["results"]
    assert status != GNTST_okay                                   # no frame there: nothing to map
    assert a.call("end", ref=ref)["ok"] is True
    ref = a.call("grant", domid=x.domid, gfn=nr - 40, data="populated late")["ref"]
    assert a.call("populated")["frames"] > first
    assert host.info(a.domid)["populated_kib"] == a.call("populated")["frames"] * 4
    host.kill_broker()
    host.start_broker()
    (status, handle), = x.call("map", domid=a.domid, refs=[ref])["results"]
    assert status == GNTST_okay and x.call("peek", handle=handle, len=14)["data"] == "populated late"
    assert x.call("unmap", handles=[handle])["results"] == [GNTST_okay]
    assert a.call("end", ref=ref)["ok"] is True

    host.kill_broker()
    monkeypatch.setenv("XDOM_BROKER_DIE_BEFORE_REPLY", "populate_physmap")
    host.start_broker()
    monkeypatch.delenv("XDOM_BROKER_DIE_BEFORE_REPLY")
    a.send("grant", domid=x.domid, gfn=nr - 80, data="made again")     # its frames are made, then the broker dies
    wait_until(lambda: host.broker.proc.poll() is not None, 20, "the broker to die at its failpoint")
    host.start_broker()
    ref = a.read(60)["ref"]
    (status, handle), = x.call("map", domid=a.domid, refs=[ref])["results"]
    assert status == GNTST_okay and x.call("peek", handle=handle, len=10)["data"] == "made again"
    assert x.call("unmap", handles=[handle])["results"] == [GNTST_okay]
    assert a.call("end", ref=ref)["ok"] is True
