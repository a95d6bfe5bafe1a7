"""The broker's descriptors do not grow with the memory it hands out.

Eight guests of 32 MiB each (8192 frames apiece, 64 Ki frames in all) grant
pages to one backend, which maps them all.  The broker keeps no per-frame
descriptors (frames are reached through map_files; only a bounded cache of
those lately mapped is kept, ``FrameFds``), and the backend closes each frame
fd after mmap, so both stay far below the 20000-descriptor hard limit.
"""

from __future__ import annotations

from helpers import RemoteDomain

from xdom.broker.fd_budget import FRAME_FDS
from xdom.domains.abi.grant_table import GNTST_okay

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
        # a handful of descriptors per domain (connection, pidfd, grant table) and the bounded cache of
        # frame descriptors lately mapped: none per frame or per mapping
        assert stats["broker_fds"] - before <= 6 * GUESTS + FRAME_FDS < GUESTS * PAGES_PER_GUEST
        assert check["fds"] < 64
    finally:
        for d in reversed(doms):
            d.stop()


# ---- event-channel descriptors: per-domain quota and the broker's budget ------

import pytest  # noqa: E402

from xdom.broker.hypervisor import DOMAIN_FDS, Hypervisor  # noqa: E402
from xdom.domains.abi.event_channel import DOMID_SELF, VIRQ_DOM_EXC  # noqa: E402
from xdom.domains.abi.hypercall_wire import HypercallError  # noqa: E402


def _errno_of(fn, *args) -> str:
    with pytest.raises(HypercallError) as e:
        fn(*args)
    return e.value.name


def test_a_domain_cannot_keep_more_channel_descriptors_than_its_quota() -> None:
    hv = Hypervisor()
    try:
        greedy = hv.create_domain("greedy", 16, evtchn_fd_quota=20)
        other = hv.create_domain("other", 16)
        ports = [hv.evtchn_alloc_unbound(greedy, DOMID_SELF).port for _ in range(10)]
        assert greedy.evtchn_fds == 20
        assert _errno_of(hv.evtchn_alloc_unbound, greedy, DOMID_SELF) == "ENOSPC"
        assert greedy.evtchn_fds == 20 and len(greedy.ports.ports) == 10     # nothing half-made
        assert hv.evtchn_alloc_unbound(other, DOMID_SELF).port == 1          # others are not affected
        hv.evtchn_close(greedy, ports[0])
        assert greedy.evtchn_fds == 18
        hv.evtchn_alloc_unbound(greedy, DOMID_SELF)
        assert greedy.evtchn_fds == 20
    finally:
        hv.close()


def test_the_pair_stays_charged_to_its_allocator_until_the_last_end_closes() -> None:
    hv = Hypervisor()
    try:
        front = hv.create_domain("front", 16)
        back = hv.create_domain("back", 16)
        p = hv.evtchn_alloc_unbound(front, back.domid)
        b = hv.evtchn_bind_interdomain(back, front.domid, p.port)
        assert (front.evtchn_fds, back.evtchn_fds) == (2, 0)
        hv.evtchn_close(front, p.port)           # the backend still holds the channel's fds
        assert front.evtchn_fds == 2 and hv.budget.used == 2 * DOMAIN_FDS + 2
        hv.evtchn_close(back, b.port)
        assert front.evtchn_fds == 0 and hv.budget.used == 2 * DOMAIN_FDS
    finally:
        hv.close()


def test_the_broker_budget_refuses_before_its_descriptors_run_out() -> None:
    # A budget of 160 over the reserve: each domain may keep at most 160/8 = 20, so
    # one greedy domain is stopped by its share; eight together fill the budget.
    hv = Hypervisor(fd_limit=hv_limit(160))
    try:
        doms = [hv.create_domain(f"d{i}", 16, privileged=True) for i in range(9)]   # 36 of 160
        assert hv.evtchn_fd_quota(doms[0]) == 20
        for _ in range(10):
            hv.evtchn_alloc_unbound(doms[0], DOMID_SELF)
        assert _errno_of(hv.evtchn_alloc_unbound, doms[0], DOMID_SELF) == "ENOSPC"   # its share
        for d in doms[1:6]:
            for _ in range(10):
                hv.evtchn_alloc_unbound(d, DOMID_SELF)
        hv.evtchn_alloc_unbound(doms[6], DOMID_SELF)
        hv.evtchn_alloc_unbound(doms[6], DOMID_SELF)
        assert hv.budget.used == 160                 # 36 for nine domains, 124 for channels
        assert _errno_of(hv.evtchn_alloc_unbound, doms[7], DOMID_SELF) == "ENOMEM"   # the budget
        assert _errno_of(hv.evtchn_bind_virq, doms[7], VIRQ_DOM_EXC) == "ENOMEM"
        with pytest.raises(HypercallError) as e:
            hv.create_domain("late", 16)
        assert e.value.name == "ENOMEM" and "budget" in e.value.message
        hv.domain_died(doms[0], "crash")             # its channels go, and with them the charges
        hv.evtchn_bind_virq(doms[7], VIRQ_DOM_EXC)
        hv.create_domain("late", 16)
    finally:
        hv.close()
    assert hv.budget.used == 0


def hv_limit(room: int) -> int:
    from xdom.broker.fd_budget import RESERVE
    return RESERVE + room
