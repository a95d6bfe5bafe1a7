"""netfront's queue set-up when the grant table runs out part-way: nothing leaks, nothing is freed while granted."""

from __future__ import annotations

import pytest

from xdom.domains.frame_pool import FramePool
from xdom.domains.netfront.device import _Queue
from xdom.domains.xenhost import LocalHypervisor
from xdom.domains.grant_table import GrantTableFull


def test_a_queue_that_cannot_grant_all_its_pages_gives_back_what_it_took() -> None:
    hv = LocalHypervisor()
    guest = hv.create_domain("g", "8M", grant_frames=1)        # 512 entries: fewer than a queue's 514 pages
    backend = hv.create_domain("b", "1M")
    try:
        pool = FramePool.of(guest)
        free_before = pool.available()
        deferred: list[tuple[int, int]] = []
        with pytest.raises(GrantTableFull):
            _Queue(guest, pool, backend.domid, 0, split=True, deferred=deferred)
        granted = len(deferred)
        assert 0 < granted < 514
        # what was granted waits in deferred (to be ended), the rest is back in the pool, nothing twice
        assert pool.available() == free_before - granted
        gfns = [g for _, g in deferred]
        assert len(set(gfns)) == granted and not set(gfns) & set(pool._free)
        for ref, _ in deferred:                     # the backend never mapped them: they end at once
            assert guest.gnttab.try_end_access(ref)
    finally:
        guest.close()
        backend.close()
        hv.close()
