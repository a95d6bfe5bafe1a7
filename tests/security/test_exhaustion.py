"""Attack 4: a domain spends the broker's resources until the hypervisor cannot serve anyone.

Descriptors are the broker's scarcest resource: each unbound event channel
costs it two eventfds it must keep.  A domain that allocates ports in a
loop (closing the eventfds it is sent, so that it never runs out itself)
used to take the broker to EMFILE: under a 1024-descriptor limit one
domain got ~500 ports, after which the broker could not create a domain or
even answer the toolstack.  Mappings (maptrack) and connections that never
say hello are bounded the same way.

The broker runs here under ``RLIMIT_NOFILE`` 1024 (soft and hard, as
``prlimit --nofile=1024:1024``), so the flood reaches any limit quickly.

Secure outcome: the flood is refused with a clear errno (a quota: ENOSPC,
EDQUOT, ENOMEM...; never EIO, the broker's "internal error") well before the
broker runs out; then the toolstack still creates a domain that works, and
other domains still allocate ports and map grants.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from xdom.broker.mgmt_client import ManagementError
from xdom.domains.abi.event_channel import DOMID_SELF, NR_VIRQS
from xdom.domains.abi.grant_table import GNTST_no_space, GNTST_okay

from .rig import UidPool, World, start_broker_with_fd_limit

NOFILE = 1024
MAX_PORTS = 4096                 # per domain (broker/evtchn.py): more than any quota may allow
MAX_MAPTRACK = 65536             # per domain (broker/hypervisor.py)
QUOTA_ERRNOS = {"ENOSPC", "EDQUOT", "EMFILE", "ENFILE", "ENOMEM", "ENOBUFS", "EAGAIN"}


@pytest.fixture
def tight(run_dir: str, uids: UidPool) -> Iterator[World]:
    """A World whose broker may hold at most NOFILE descriptors."""
    b = start_broker_with_fd_limit(os.path.join(run_dir, "broker"), NOFILE)
    c = b.client()
    w = World(b, c, uids)
    try:
        yield w
    finally:
        w.close()
        c.close()
        b.stop()


def test_event_channel_flood_is_refused_by_a_quota(tight: World) -> None:
    victim = tight.spawn("victim")
    x = tight.spawn("attacker")
    res = x.call("flood_ports", remote=DOMID_SELF, limit=MAX_PORTS, reply_within=120)
    assert res["errno"] in QUOTA_ERRNOS, (
        f"a domain allocated {res['ports']} event channels and was then answered {res['errno']} "
        f"({res.get('message')}), not refused by a quota")
    # Virqs cost the broker a descriptor each: bounded by the same quota, refused as cleanly.
    virqs = {v: x.hypercall("evtchn_bind_virq", virq=v)["errno"] for v in range(NR_VIRQS)}
    assert set(virqs.values()) <= QUOTA_ERRNOS | {"EPERM", None}, virqs      # never EIO
    flood = f"after one domain's flood ({res['ports']} ports, then {res['errno']}: {res.get('message')})"
    fds = tight.mgmt.request("stats")["broker_fds"]
    assert fds < NOFILE, f"{flood} the broker holds {fds} of its {NOFILE} descriptors"
    # Others still get ports, and the toolstack still creates domains that work.
    got = victim.hypercall("evtchn_alloc_unbound", remote_dom=DOMID_SELF)
    assert got["errno"] is None, f"{flood} another domain cannot allocate a port: {got}"
    try:
        late = tight.spawn("late")
    except ManagementError as e:
        pytest.fail(f"{flood} the toolstack cannot create a domain: {e}")
    tight.assert_serving(victim, late)
    assert x.hypercall("evtchn_alloc_unbound", remote_dom=DOMID_SELF)["errno"] in QUOTA_ERRNOS


def test_colluding_floods_leave_the_broker_answering(tight: World) -> None:
    """Three domains flood together: each is refused cleanly; the broker and what runs keep working."""
    victim = tight.spawn("victim")
    peer = tight.spawn("peer")
    port = victim.call("alloc_unbound", remote=peer.domid)["port"]
    pport = peer.call("bind", remote=victim.domid, port=port)["port"]
    ref = victim.call("grant", domid=peer.domid, gfn=9, ro=True, data="before the flood")["ref"]
    attackers = [tight.spawn(f"attacker{i}") for i in range(3)]
    for x in attackers:
        res = x.call("flood_ports", remote=DOMID_SELF, limit=MAX_PORTS, reply_within=120)
        assert res["errno"] in QUOTA_ERRNOS, f"{x.name}: {res['ports']} ports, then {res}"
    assert tight.broker.proc.poll() is None, "the broker died"
    tight.mgmt.request("list")
    # What was set up before the flood keeps working: events both ways, the grant.
    assert peer.hypercall("evtchn_send", port=pport)["errno"] is None
    assert port in victim.call("wait", secs=10)["ports"]
    assert victim.hypercall("evtchn_send", port=port)["errno"] is None
    assert pport in peer.call("wait", secs=10)["ports"]
    (status, handle), = peer.call("map", domid=victim.domid, refs=[ref], ro=True)["results"]
    assert status == GNTST_okay
    assert peer.call("peek", handle=handle, len=16)["data"] == "before the flood"
    peer.call("unmap", handles=[handle])
    # The attackers give their ports back (they die): everything works again.
    for x in attackers:
        x.kill()
    tight.assert_serving(victim, peer)


def test_maptrack_flood_is_refused_and_costs_the_broker_no_descriptors(world: World) -> None:
    x = world.spawn("attacker")
    victim = world.spawn("victim")
    before = world.mgmt.request("stats")["broker_fds"]
    ref = x.call("grant_only", domid=x.domid, gfn=12, ro=True)["ref"]
    res = x.call("flood_maps", domid=x.domid, ref=ref, limit=MAX_MAPTRACK + 256, reply_within=300)
    assert res.get("status") == GNTST_no_space and res["maps"] <= MAX_MAPTRACK, res
    assert world.mgmt.request("info", domid=x.domid)["domain"]["mappings_held"] == res["maps"]
    assert world.mgmt.request("stats")["broker_fds"] <= before + 2
    world.assert_serving(victim)


def test_connection_flood_from_a_domain_uid(tight: World) -> None:
    """Connections that never say hello: the broker keeps a bounded number of them."""
    victim = tight.spawn("victim")
    x = tight.spawn("attacker")
    res = x.call("flood_connections", count=2 * NOFILE, reply_within=120)
    assert res["opened"] >= NOFILE // 2, res        # the kernel lets us connect; the broker drops the excess
    fds = tight.mgmt.request("stats")["broker_fds"]
    assert fds < NOFILE // 2, f"the broker holds {fds} descriptors with {res['opened']} silent connections open"
    late = tight.spawn("late")
    tight.assert_serving(victim, late)
