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

LIMIT = 400          # VMAs; in process each mapping is charged one (nothing is placed in a window)


@pytest.fixture
def rig(run_dir: str) -> Iterator[NetRig]:
    r = NetRig(run_dir, guests=3, kept=KeptMappings(limit=LIMIT, share_divisor=2))
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
    stats = [rig.server.vifs[(g.domid, 0)].stats() for g in rig.guests]
    held = [kept.held(g.domid) for g in rig.guests]

    assert all(h <= kept.share for h in held) and kept.total == sum(held) <= LIMIT, held
    assert [s["kept_vmas"] for s in stats] == held, stats          # what each vif's caches were charged
    assert sum(s["pages_unkept"] for s in stats) > 0, stats        # someone was past the bound ...
    assert all(s["tx_packets"] > 0 and s["rx_packets"] > 0 for s in stats), stats   # ... and still moved
    for front in rig.fronts:
        front.close()
    rig.fronts = []
    wait_until(lambda: kept.total == 0, 10, "every vif giving its pages back as it closes")
