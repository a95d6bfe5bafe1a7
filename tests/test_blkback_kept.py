"""blkback's persistent grants are bounded for the whole process, and per frontend domain.

Each kept page is one of blkback's VMAs (two, scattered across a grant
window), and ``vm.max_map_count`` bounds them all: a frontend with many
devices and queues must not be able to keep so many that blkback can map
nothing for anyone.  Past the bound or its share, a frontend's pages are
mapped per batch instead: its I/O still works, only slower.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from blk_guest import BlkGuest, running_blkback

from xdom.backends.blkback.ring_server import MAX_PERSISTENT_GRANTS
from xdom.backends.blkback.server import BlkbackServer
from xdom.backends.kept_mappings import MAP_RESERVE, VMAS_PER_PAGE, KeptMappings
from xdom.domains.hostsys.memory import max_map_count

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def test_the_bound_and_the_shares() -> None:
    kept = KeptMappings(limit=10, share_divisor=2)
    assert kept.share == 5
    assert [kept.take(1, 1) for _ in range(7)] == [True] * 5 + [False] * 2   # frontend 1: its share
    assert [kept.take(2, 1) for _ in range(7)] == [True] * 5 + [False] * 2   # frontend 2: the rest
    assert kept.total == 10 and not kept.take(3, 1)                          # the bound: nothing for 3
    kept.give(1, 5)
    assert kept.held(1) == 0 and kept.total == 5 and kept.take(3, 1)
    with pytest.raises(ValueError):
        kept.give(2, 6)                                                       # more than it holds
    assert kept.held(2) == 5
    assert not kept.take(3, 5) and kept.held(3) == 1                         # all or nothing
    assert kept.take(3, 4) and kept.held(3) == 5


def test_the_default_bound_fits_this_hosts_vm_max_map_count() -> None:
    """Read from the host's own sysctl: the whole bound kept, at its worst, still leaves the reserve
    -- and on a host with the default 65530, more than one full 4-queue device's worth."""
    kept = KeptMappings()
    assert kept.limit + MAP_RESERVE <= max(max_map_count(), MAP_RESERVE)
    if max_map_count() >= 65530:
        assert kept.limit > 4 * MAX_PERSISTENT_GRANTS * VMAS_PER_PAGE


@pytest.fixture
def server(domains, xenstored) -> Iterator[tuple[BlkbackServer, object]]:
    with running_blkback(domains, xenstored, kept=KeptMappings(limit=96 * VMAS_PER_PAGE, share_divisor=2)) as pair:
        yield pair


def test_frontends_keep_no_more_than_their_share_and_their_io_still_works(server, domains, xenstored,
                                                                          run_dir: str) -> None:
    srv, be = server
    guests = [BlkGuest(domains, xenstored.socket_path, be, run_dir, f"g{i}") for i in range(3)]
    try:
        for g in guests:
            with open(g.image, "rb") as f:
                model = f.read()
            for offset in (0, 3 * MiB, 6 * MiB, MiB + 4096):     # 257 pages a read: far past any share
                assert g.read(offset, MiB) == model[offset:offset + MiB]
        held = [srv.kept.held(g.host.domid) // VMAS_PER_PAGE for g in guests]
        assert held[0] == held[1] == 48, held                    # each its share of pages (96 / 2) ...
        assert held[2] == 0 and srv.kept.total == 96 * VMAS_PER_PAGE, held   # ... the third none: the bound
        for g, pages in zip(guests, held):
            stats = srv.vbds[(g.host.domid, 51712)].stats()
            assert stats["persistent_grants"] == pages, stats
    finally:
        for g in guests:
            g.close()
    assert srv.kept.total == 0                                    # every ring gave its pages back
