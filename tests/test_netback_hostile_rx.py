"""Hostile receive sides: no buffers posted, buffers netback cannot write, a ring page posted as a buffer.

Each test runs the rig of tests/netback_harness.py (two good guests pinging
each other through netback, a hostile frontend from tests/hostile_vif.py, a
sniffer on the switch): netback must do what Linux ``xen-netback`` does,
never crash, keep the good pair's pings coming and answer every slot it
consumes exactly once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from helpers import wait_until
from hostile_vif import ERR, M32, MAX_FRAME, PAGE, RSP_PROD, WAIT, Ids
from netback_harness import GOOD_MACS, GOOD_RTT_MS, NEEDS_ROOT_AND_PING, Env, broadcasting, hostile_env, served

from xdom.backends.netback.switch import PORT_QUEUE
from xdom.domains.abi.netif import NETRXF_csum_blank, NETRXF_data_validated, NETRXF_more_data
from xdom.domains.xenbus import XenbusState

pytestmark = [pytest.mark.timeout(60), NEEDS_ROOT_AND_PING]


@pytest.fixture
def env(run_dir: str) -> Iterator[Env]:
    yield from hostile_env(run_dir)


# ---- the receive side --------------------------------------------------------------------------

def test_lazy_frontend_never_posts_rx_buffers(env: Env) -> None:
    """Broadcasts flooded to a vif without receive buffers: its queue stays bounded, the good pair is not slowed."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    port = env.server.vifs[h.key].port
    assert h.rx is not None
    with env.good_traffic(min_replies=20, max_rtt_ms=GOOD_RTT_MS):
        with broadcasting(env.ns1, gap=0.0002):
            wait_until(lambda: port.dropped > 0, WAIT, "the lazy vif's port to drop frames")
            first = port.dropped
            wait_until(lambda: port.dropped > first + 200, WAIT, "the lazy vif's port to keep dropping")
            assert len(port.queue) <= PORT_QUEUE
        assert h.rx.shared.get(RSP_PROD) == 0, "responses without requests"
        assert served(env.server, h.key)
    assert len(port.queue) <= PORT_QUEUE
    # once the guest posts buffers it gets what is queued (oldest first), each in its request's slot
    refs = [h.grant()[1] for _ in range(32)]
    h.rx_post([(ids(), r) for r in refs])
    got = h.rx_collect(32)
    for rid, gref, _, flags, status in got:
        assert 14 <= status <= MAX_FRAME and not flags & NETRXF_more_data, (rid, flags, status)
        f = bytes(h.page(gref)[:status])
        assert f[6:12] in GOOD_MACS, f[:16].hex()
    env.finish(h, ids)


def test_rx_requests_with_bad_grant_refs(env: Env) -> None:
    """Frames for receive buffers netback cannot write: NETIF_RSP_ERROR in that slot, good slots filled."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    gt = h.host.gnttab
    _, ro = h.grant(readonly=True)                 # netback writes received frames: read-only will not do
    _, to_other = h.grant(to=env.g1.domid)
    _, revoked = h.grant()
    gt.end_access(revoked)
    bad_frame = gt.grant_access(env.rig.be.domid, h.host.memory.nr_frames + 7)
    h.refs.append(bad_frame)
    never = max(h.refs) + 100
    nr = gt.nr_entries
    bad = [ro, to_other, revoked, bad_frame, never, nr, nr + 1, 2**31, M32, 0, 7]
    good = [h.grant(b"\xee" * PAGE)[1] for _ in range(len(bad))]
    posted = []
    for b, g in zip(bad, good):
        posted += [(ids(), b), (ids(), g)]
    # Counted before the buffers are posted: a frame already on its way (a guest's own neighbour
    # discovery) may fill the first of them at once, and its error must not land in ``before``.
    before = env.server.vifs[h.key].stats()
    h.rx_post(posted)
    with env.good_traffic(), broadcasting(env.ns1, gap=0.002):
        got = h.rx_collect(len(posted))
    errors = 0
    for (rid, gref), (rid2, gref2, _, flags, status) in zip(posted, got):
        assert (rid, gref) == (rid2, gref2)
        if gref in bad:
            assert status == ERR, f"buffer with gref {gref:#x}: status {status}"
            errors += 1
        else:
            assert 14 <= status <= MAX_FRAME, status
            f = bytes(h.page(gref)[:status])
            assert f[6:12] in GOOD_MACS, f[:16].hex()
            assert bytes(h.page(gref)[status:]) == b"\xee" * (PAGE - status), "netback wrote past the frame"
        if status != ERR:     # checksum flags are fine (the guests' UDP leaves its checksum blank); nothing else
            assert flags & ~(NETRXF_csum_blank | NETRXF_data_validated) == 0, f"flags {flags:#x} for a one-slot frame"
    # the counter is netback's thread's, bumped as it answers: the last error response can be seen first
    dropped = before.get("rx_dropped", 0) + errors
    wait_until(lambda: env.server.vifs[h.key].stats()["rx_dropped"] >= dropped, what="rx_dropped counted")
    stats = env.server.vifs[h.key].stats()
    assert stats["rx_dropped"] - before.get("rx_dropped", 0) == errors, stats
    assert bytes(h.page(ro)) == bytes(PAGE), "netback wrote into a read-only grant"
    # a hostile stream of random receive requests: never a crash
    rng = random.Random(7)
    assert h.rx is not None
    small = [r for r in range(0, 64) if r not in h.ring_refs]       # ring pages as buffers: their own test
    posted = [(rng.getrandbits(16), rng.choice([rng.getrandbits(32), rng.choice(small), *good]))
              for _ in range(200)]
    h.rx_post(posted)
    with env.good_traffic(), broadcasting(env.ns1, gap=0.001):
        got = h.rx_collect(200)
    assert all(status == ERR or status > 0 for *_, status in got)
    env.finish(h, ids)


@pytest.mark.parametrize("which", ["rx-ring", "tx-ring"])
def test_rx_buffer_is_a_ring_page(env: Env, which: str) -> None:
    """The guest posts its own ring page as a receive buffer: netback scribbles on it, never crashes.

    The frame lands on the ring's indices; netback then either carries on or
    finds an impossible index and closes the vif.  Either is fine for a
    frontend that broke its own ring; a crash is not.
    """
    h = env.hostile()
    h.connect()
    ids = Ids()
    ring_ref = h.ring_refs[1 if which == "rx-ring" else 0]
    h.rx_post([(ids(), ring_ref)] + [(ids(), h.grant()[1]) for _ in range(7)])
    vif = env.server.vifs[h.key]
    # The first frame delivered lands on the ring page (the first buffer posted).  Netback reads the
    # RX ring's req_prod again before it delivers the next, so for the RX ring the outcome is only
    # settled after a second delivery or a close; deciding on the first raced the close.
    settled = 2 if which == "rx-ring" else 1
    with env.good_traffic(), broadcasting(env.ns1, gap=0.002):
        wait_until(lambda: vif.stats().get("rx_packets", 0) + vif.stats().get("rx_dropped", 0) >= settled
                   or h.backend_state() == XenbusState.Closing, WAIT, "a frame for the hostile guest")
        if which == "tx-ring":        # the TX ring's indices are garbage now: the next look at it closes
            h.host.notify(h.port)
            h.wait_backend(XenbusState.Closing)
    h.tx_page = h.rx_page = None            # a header may carry a frame now
    if h.backend_state() == XenbusState.Closing:
        env.finish(h, closed_by_backend=True)
    else:
        env.finish(h)
