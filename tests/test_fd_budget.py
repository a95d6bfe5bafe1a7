"""The broker's descriptors do not grow with the memory it hands out.

Eight guests of 32 MiB each (8192 frames apiece, 64 Ki frames in all) grant
pages to one backend, which maps them all.  The broker keeps no per-frame
descriptors (frames are reached through map_files and the fd is closed once
sent), and the backend closes each frame fd after mmap, so both stay far
below the 20000-descriptor hard limit.
"""

from __future__ import annotations

from xdom.domains.abi.grant_table import GNTST_okay

from helpers import RemoteDomain

GUESTS = 8
PAGES_PER_GUEST = 512


def test_eight_32mib_guests_granting_to_one_backend(mgmt, broker) -> None:
    doms: list[RemoteDomain] = []
    try:
        backend = RemoteDomain(mgmt, "backend", memory="1M")
        doms.append(backend)
        before = mgmt.request("stats")["broker_fds"]
        for i in range(GUESTS):
            guest = RemoteDomain(mgmt, f"guest{i}", memory="32M")
            doms.append(guest)
            refs = guest.call("grant_many", domid=backend.domid, first_gfn=1000,
                              count=PAGES_PER_GUEST)["refs"]
            results = backend.call("map", domid=guest.domid, refs=refs)["results"]
            assert [s for s, _ in results] == [GNTST_okay] * PAGES_PER_GUEST
        check = backend.call("check_maps")
        stats = mgmt.request("stats")
        print(f"\nbroker fds: {before} before, {stats['broker_fds']} with {GUESTS} guests x 32 MiB "
              f"and {stats['mappings']} live mappings; backend fds: {check['fds']}")
        assert check["live"] == GUESTS * PAGES_PER_GUEST and check["bad"] == []
        assert stats["mappings"] == GUESTS * PAGES_PER_GUEST
        # a handful of descriptors per domain (connection, pidfd, grant table), none per frame
        assert stats["broker_fds"] - before <= 6 * GUESTS
        assert check["fds"] < 64
    finally:
        for d in reversed(doms):
            d.stop()
