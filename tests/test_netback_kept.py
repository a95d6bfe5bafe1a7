"""netback's kept pages are bounded for the whole process, and per frontend domain.

A vif keeps its frontend's buffers mapped (up to 1024 pages each way, two
VMAs a page at worst in a grant window), and ``vm.max_map_count`` bounds all
of netback's mappings: a guest with many vifs and queues -- or a few
guests -- must not be able to leave netback unable to map a page for the
others.  Past the bound or its share a frontend's pages are mapped for one
batch and unmapped after it: its traffic still flows, byte for byte.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from helpers import wait_until
from test_net_local import NetRig, in_ns, stream

from xdom.backends.kept_mappings import KeptMappings

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(params=[(400, 2), (40, 2)], ids=["room-for-some", "room-for-no-frame"])
def rig(request: pytest.FixtureRequest, run_dir: str) -> Iterator[NetRig]:
    """Bounds in VMAs (in process each mapping is charged one: nothing is placed in a window).  400 with a
    share of 200: each guest wants some 512 pages kept, so some keep part and map the rest per batch;
    40 with a share of 20: no 64 KiB frame (17 pages, 34 VMAs at worst) can be kept at all."""
    limit, divisor = request.param
    r = NetRig(run_dir, guests=3, kept=KeptMappings(limit=limit, share_divisor=divisor))
    try:
        yield r
    finally:
        r.close()


def test_guests_past_the_bound_still_move_every_byte_and_keep_no_more_than_their_share(rig: NetRig) -> None:
    kept = rig.server.kept
    ns = [rig.plug(i) for i in (1, 2, 3)]
    for src, dst in ((0, 1), (1, 2), (2, 0)):          # every vif both ways, so each wants ~512 pages kept
        stream(ns[src], ns[dst], f"10.99.0.{dst + 1}", os.urandom(8 << 20))
    res = in_ns(ns[2], "ping", "-c", "3", "-i", "0.1", "-w", "15", "10.99.0.1")
    assert res.returncode == 0 and " 3 received" in res.stdout, res.stdout + res.stderr

    def snapshot() -> tuple[list[dict[str, int]], list[int]]:     # on the loop thread: no frame moves meanwhile
        return [rig.server.vifs[(g.domid, 0)].stats() for g in rig.guests], [kept.held(g.domid) for g in rig.guests]
    stats, held = rig.server.loop.call(snapshot)
    assert all(h <= kept.share for h in held) and kept.total == sum(held) <= kept.limit, held
    assert [s["kept_vmas"] for s in stats] == held, stats          # what each vif's caches were charged
    assert all(s["tx_packets"] > 0 and s["rx_packets"] > 0 for s in stats), stats   # every vif moved frames
    if kept.share < 2 * 17:                                        # no 64 KiB frame fits a share:
        assert all(s["pages_unkept"] > 0 for s in stats), stats    # every vif mapped for one batch only
    for front in rig.fronts:
        front.close()
    rig.fronts = []
    wait_until(lambda: kept.total == 0, 10, "every vif giving its pages back as it closes")
