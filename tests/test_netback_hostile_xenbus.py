"""Hostile xenbus: bad nodes at connection, state flapping, a frontend domain dying mid-flight.

Each test runs the rig of tests/netback_harness.py (two good guests pinging
each other through netback, a hostile frontend from tests/hostile_vif.py, a
sniffer on the switch): netback must do what Linux ``xen-netback`` does,
never crash, keep the good pair's pings coming and answer every slot it
consumes exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_frontend import req
from helpers import wait_until
from hostile_vif import M32, OK, PAGE, WAIT, Ids, frame
from netback_harness import NEEDS_ROOT_AND_PING, Env, broadcasting, hostile_env, served

from xdom.domains.xenbus import XenbusState

pytestmark = [pytest.mark.timeout(60), NEEDS_ROOT_AND_PING]


@pytest.fixture
def env(run_dir: str) -> Iterator[Env]:
    yield from hostile_env(run_dir)


# ---- xenbus ------------------------------------------------------------------------------------

XENBUS_CASES: dict[str, dict] = {
    "tx-ring-ref-not-granted": dict(extra_nodes={"tx-ring-ref": 3000}),
    "rx-ring-ref-out-of-table": dict(extra_nodes={"rx-ring-ref": M32}),
    "ring-ref-not-a-u32": dict(extra_nodes={"tx-ring-ref": 2**40}),
    "ring-ref-garbage": dict(extra_nodes={"rx-ring-ref": "0x10"}),
    "ring-read-only": dict(ring_readonly=True),
    "no-rx-copy": dict(extra_nodes={"request-rx-copy": 0}),
    "event-channel-garbage": dict(extra_nodes={"event-channel": "-1"}),
    "event-channel-huge": dict(extra_nodes={"event-channel": 10**15}),
    "event-channel-not-unbound": dict(extra_nodes={"event-channel": 4000}),
    "split-rx-channel-bad": dict(extra_nodes={"event-channel-tx": "PORT", "event-channel-rx": 9999}),
    "multi-queue-too-many": dict(extra_nodes={"multi-queue-num-queues": 999}),
    "multi-queue-zero": dict(extra_nodes={"multi-queue-num-queues": 0}),
    "multi-queue-without-queue-dirs": dict(extra_nodes={"multi-queue-num-queues": 2}),
}


def test_an_unreadable_queue_count_means_one_queue(env: Env) -> None:
    """As Linux (xenbus_scanf failing: "Fall back to single queue"), not a reason to close."""
    h = env.hostile()
    with env.good_traffic(min_replies=3):
        h.connect(extra_nodes={"multi-queue-num-queues": "two"})
    assert len(env.server.vifs[h.key].queues) == 1
    env.finish(h, Ids())


@pytest.mark.parametrize("case", list(XENBUS_CASES))
def test_bad_xenbus_nodes_close_the_vif(env: Env, case: str) -> None:
    h = env.hostile()
    kw = dict(XENBUS_CASES[case])
    nodes = kw.get("extra_nodes", {})
    if nodes.get("event-channel-tx") == "PORT":
        h.wait_backend(XenbusState.InitWait)
        nodes["event-channel-tx"] = h.host.alloc_unbound(env.rig.be.domid)
    with env.good_traffic(min_replies=3):
        h.connect(expect=XenbusState.Closing, **kw)
    assert env.server.vifs[h.key].conn is None
    env.finish(h, closed_by_backend=True)


def test_state_flapping(env: Env) -> None:
    """Initialised / Initialising over and over: connections come and go, no thread or mapping leaks."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    _, ref = h.grant()
    with env.good_traffic():
        for i in range(15):
            f = frame(b"flap %d" % i, 64)
            h.page(ref)[:64] = f
            h.tx_roundtrip([([req(ref, 0, 0, ids(), 64)], OK)])
            env.sniffer.wait_for([f])
            h.set_state(XenbusState.Initialising)
            h.wait_backend(XenbusState.InitWait)
            assert not served(env.server, h.key)
            assert not h.mapped(), f"grants still mapped while disconnected: {h.mapped()}"
            # the same rings again (they still hold the indices where we left them)
            h.set_state(XenbusState.Initialised)
            h.wait_backend(XenbusState.Connected)
            h.set_state(XenbusState.Connected)
            assert served(env.server, h.key)
    env.finish(h, ids)


def test_frontend_domain_dies_mid_flight(env: Env) -> None:
    """The hostile guest dies with packets and receive buffers on its rings; the toolstack removes its nodes."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    _, ref = h.grant(frame(b"dying", PAGE))
    h.rx_post([(ids(), h.grant()[1]) for _ in range(64)])
    with env.good_traffic(), broadcasting(env.ns1, gap=0.002):
        h.tx_roundtrip([([req(ref, 0, 0, ids(), 64)], OK) for _ in range(16)])
        h.tx_send([req(ref, 0, 0, ids(), 64) for _ in range(64)])
        h.host.close()                       # dies: the hypervisor takes back its grants and ports
        env.dead.append(h.host)
        h.closed = True
        env.rig.xs.rm(h.be_path)             # what libxl does for a destroyed domain
        env.rig.xs.rm(h.path)
        wait_until(lambda: h.key not in env.server.vifs, WAIT, "the vif to be removed")
        wait_until(lambda: not served(env.server, h.key), WAIT, "the loop to let the dead guest's vif go")
    be_dom = env.rig.hv.hv.domains[env.rig.be.domid]
    left = [m for m in be_dom.maptrack.values() if m.granter.domid == h.host.domid]
    assert not left, f"netback still maps {len(left)} grant(s) of the dead guest"
    env.hostiles.remove(h)
    env.finish(None)
