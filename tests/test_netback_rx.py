"""netback's sans-IO RX core (backends/netback/rx.py): a packet planned into the pages a frontend posted.

The plans are carried out on fake pages (tests/fake_frontend.py) and the
responses read back as netfront would: by position, each response in its
request's slot.  A last test takes a packet from one guest's TX ring to
another's RX ring through both planners.
"""

from __future__ import annotations

import os

import pytest
from fake_frontend import (
    ERR,
    PAGE,
    Grants,
    deliver,
    netfront_receive,
    one,
    rx_requests,
    tx_slots,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from xdom.backends.netback import (
    Checksum,
    OutgoingPacket,
    RxDrop,
    RxPlan,
    RxPlanner,
    RxShortage,
    TxPacket,
    TxProcessor,
)
from xdom.backends.netback.rx import RxRun
from xdom.domains.abi import netif as n
from xdom.domains.abi.ring import BackRing, FrontRing

# --------------------------------------------------------------------------
# RX: a packet into the frontend's posted pages
# --------------------------------------------------------------------------

def test_rx_small_packet() -> None:
    data = os.urandom(60)
    reqs = rx_requests(4, first_id=9)
    plan = RxPlanner().plan(OutgoingPacket(60), reqs)
    assert isinstance(plan, RxPlan) and plan.consumed == 1
    assert [tuple(c) for c in plan.copies] == [(0, 500, 0, 60, 0)]
    assert plan.responses == (n.RxResponse(9, 0, 0, 60),)
    pages, raw = deliver(plan, data)
    pkt, body = netfront_receive(raw, reqs, pages)
    assert body == data and pkt.status == 60


def test_rx_multi_page_packet_with_sg() -> None:
    data = os.urandom(10000)
    reqs = rx_requests(5, first_id=0xFFFE)       # ids wrap: they are the frontend's business
    plan = RxPlanner(sg=True).plan(OutgoingPacket(10000, checksum=Checksum.UNNECESSARY), reqs)
    assert isinstance(plan, RxPlan) and plan.consumed == 3
    flags = [r.flags for r in plan.responses if isinstance(r, n.RxResponse)]
    assert flags == [n.NETRXF_more_data | n.NETRXF_data_validated, n.NETRXF_more_data, 0]
    pages, raw = deliver(plan, data)
    pkt, body = netfront_receive(raw, reqs, pages)
    assert body == data and [r.status for r in pkt.responses] == [4096, 4096, 1808]


def test_rx_gso_extra_goes_after_the_first_data_slot() -> None:
    data = os.urandom(9000)
    reqs = rx_requests(6)
    pkt_in = OutgoingPacket(9000, n.GsoInfo(1448, n.XEN_NETIF_GSO_TYPE_TCPV4), Checksum.PARTIAL)
    planner = RxPlanner(gso_tcpv4=True)
    assert planner.slots_needed(pkt_in) == 4
    plan = planner.plan(pkt_in, reqs)
    assert isinstance(plan, RxPlan) and plan.consumed == 4
    assert isinstance(plan.responses[1], n.ExtraInfo)
    first = plan.responses[0]
    assert isinstance(first, n.RxResponse)
    assert first.flags == (n.NETRXF_more_data | n.NETRXF_extra_info | n.NETRXF_csum_blank
                           | n.NETRXF_data_validated)
    assert [c.slot for c in plan.copies] == [0, 2, 3]
    pages, raw = deliver(plan, data)
    pkt, body = netfront_receive(raw, reqs, pages)
    assert body == data
    assert pkt.extras == (n.ExtraInfo(n.XEN_NETIF_EXTRA_TYPE_GSO, 0, n.GsoInfo(1448, n.XEN_NETIF_GSO_TYPE_TCPV4)),)


def test_rx_gso_and_hash_extras_chain() -> None:
    reqs = rx_requests(5)
    h = n.HashInfo(n._XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP, n.XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ, b"\x01\x02\x03\x04")
    pkt_in = OutgoingPacket(3000, n.GsoInfo(1440, n.XEN_NETIF_GSO_TYPE_TCPV6), Checksum.PARTIAL, h)
    plan = RxPlanner(gso_tcpv6=True).plan(pkt_in, reqs)
    assert isinstance(plan, RxPlan) and plan.consumed == 3
    data = os.urandom(3000)
    pages, raw = deliver(plan, data)
    pkt, body = netfront_receive(raw, reqs, pages)
    assert body == data and [e.type for e in pkt.extras] == [n.XEN_NETIF_EXTRA_TYPE_GSO, n.XEN_NETIF_EXTRA_TYPE_HASH]
    assert pkt.extras[0].more and not pkt.extras[1].more and pkt.extras[1].body == h


def test_rx_not_enough_requests_consumes_nothing() -> None:
    planner = RxPlanner(gso_tcpv4=True)
    pkt = OutgoingPacket(9000, n.GsoInfo(1448, n.XEN_NETIF_GSO_TYPE_TCPV4))
    assert planner.plan(pkt, rx_requests(3)) == RxShortage(4, 3)
    assert planner.plan(OutgoingPacket(100), []) == RxShortage(1, 0)
    assert isinstance(planner.plan(pkt, rx_requests(4)), RxPlan)


@pytest.mark.parametrize("planner,pkt,why", [
    (RxPlanner(sg=False), OutgoingPacket(4097), "feature-sg"),
    (RxPlanner(), OutgoingPacket(0), "empty"),
    (RxPlanner(), OutgoingPacket(18 * PAGE + 1), "slots"),
    (RxPlanner(), OutgoingPacket(9000, n.GsoInfo(1448, n.XEN_NETIF_GSO_TYPE_TCPV4)), "negotiate"),
    (RxPlanner(gso_tcpv4=True), OutgoingPacket(9000, n.GsoInfo(1448, n.XEN_NETIF_GSO_TYPE_TCPV6)), "negotiate"),
    (RxPlanner(gso_tcpv4=True), OutgoingPacket(9000, n.GsoInfo(0, n.XEN_NETIF_GSO_TYPE_TCPV4)), "invalid"),
    (RxPlanner(gso_tcpv4=True), OutgoingPacket(9000, n.GsoInfo(1448, 0)), "invalid"),
])
def test_rx_drops(planner: RxPlanner, pkt: OutgoingPacket, why: str) -> None:
    d = planner.plan(pkt, rx_requests(40))
    assert isinstance(d, RxDrop) and why in d.reason


def test_rx_without_sg_one_page_fits() -> None:
    plan = RxPlanner(sg=False).plan(OutgoingPacket(4096), rx_requests(2))
    assert isinstance(plan, RxPlan) and plan.consumed == 1 and plan.responses[0] == n.RxResponse(0, 0, 0, 4096)


def test_rx_failed_copy_reports_error_in_its_slot() -> None:
    reqs = rx_requests(3)
    plan = RxPlanner().plan(OutgoingPacket(6000), reqs)
    assert isinstance(plan, RxPlan)
    _, raw = deliver(plan, os.urandom(6000), failed=[1])
    pkt = n.walk_rx_packet(raw)
    assert pkt is not None and [r.status for r in pkt.responses] == [4096, ERR] and pkt.status == ERR


def test_rx_takes_request_slot_copies_as_bytes() -> None:
    raw_reqs = [n.pack_rx_request(r) for r in rx_requests(2, first_id=3)]
    plan = RxPlanner().plan(OutgoingPacket(5000), raw_reqs)
    assert isinstance(plan, RxPlan) and [c.gref for c in plan.copies] == [500, 501]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 80000), st.booleans(), st.booleans(), st.booleans(),
       st.none() | st.tuples(st.integers(0, 9000), st.integers(0, 3)),
       st.sampled_from(list(Checksum)), st.booleans(), st.integers(0, 25))
def test_rx_plans_reassemble(length: int, sg: bool, v4: bool, v6: bool, gso: tuple[int, int] | None,
                             csum: Checksum, with_hash: bool, nreq: int) -> None:
    planner = RxPlanner(sg=sg, gso_tcpv4=v4, gso_tcpv6=v6)
    h = n.HashInfo(0, 1, b"abcd") if with_hash else None
    pkt_in = OutgoingPacket(length, n.GsoInfo(gso[0], gso[1]) if gso else None, csum, h)
    reqs = rx_requests(nreq, first_id=0xFFF0)
    d = planner.plan(pkt_in, reqs)
    if isinstance(d, RxDrop):
        assert planner.refusal(pkt_in) == d.reason
        return
    assert planner.refusal(pkt_in) is None
    needed = planner.slots_needed(pkt_in)
    if isinstance(d, RxShortage):
        assert d == RxShortage(needed, nreq) and needed > nreq
        return
    assert isinstance(d, RxPlan) and d.consumed == needed <= nreq and len(d.responses) == needed
    data = os.urandom(length)
    pages, raw = deliver(d, data)
    pkt, body = netfront_receive(raw, reqs, pages)
    assert body == data and pkt.status == length and pkt.slots == needed
    assert len(pkt.extras) == (gso is not None) + with_hash
    assert sg or len(pkt.responses) == 1
    first = pkt.first.flags
    assert bool(first & n.NETRXF_csum_blank) == (csum == Checksum.PARTIAL)
    assert bool(first & n.NETRXF_data_validated) == (csum != Checksum.NONE)


@settings(max_examples=400, deadline=None)
@given(st.integers(-1, 80000) | st.sampled_from([1, 4096, 4097, 65535, 65536]), st.booleans(), st.booleans(),
       st.booleans(), st.sampled_from([18, 3, 70]),
       st.none() | st.tuples(st.sampled_from([0, 1448, 65535]), st.integers(0, 3)),
       st.sampled_from(list(Checksum)), st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1)),
                                                 max_size=80))
def test_rx_run_is_the_plan_packed(length: int, sg: bool, v4: bool, v6: bool, max_slots: int,
                                   gso: tuple[int, int] | None, csum: Checksum, reqs: list[tuple[int, int]]) -> None:
    """plan_run (what the data path uses) decides what plan decides, in the form the ring takes."""
    planner = RxPlanner(sg=sg, gso_tcpv4=v4, gso_tcpv6=v6, max_data_slots=max_slots)
    info = n.GsoInfo(gso[0], gso[1]) if gso else None
    plan = planner.plan(OutgoingPacket(length, info, csum), reqs)
    run = planner.plan_run(length, info, csum, reqs)
    if not isinstance(plan, RxPlan):
        assert run == plan
        return
    assert isinstance(run, RxRun)
    assert run.consumed == plan.consumed
    assert run.responses == b"".join(plan.packed_responses())
    assert run.grefs == tuple(c.gref for c in plan.copies)
    assert [(c.offset, c.src_offset) for c in plan.copies] == [(0, k * 4096) for k in range(len(plan.copies))]


# --------------------------------------------------------------------------
# TX -> RX: a packet from one guest delivered to another
# --------------------------------------------------------------------------

def test_guest_to_guest_through_both_planners() -> None:
    g = Grants()
    data = os.urandom(20000)
    slots = tx_slots(g, data, first_id=1, extras=[n.gso_extra(1448, n.XEN_NETIF_GSO_TYPE_TCPV4)],
                     flags=n.NETTXF_csum_blank)
    p = one(TxProcessor().feed(slots, at_req_prod=True))
    assert isinstance(p, TxPacket)
    frame = p.gather(g.read)
    out = OutgoingPacket(p.length, p.gso, p.checksum)
    # Ring pair for the receiving guest's RX ring.
    shared = n.rx_shared_ring([memoryview(bytearray(PAGE))])
    front = FrontRing(shared)
    back = BackRing(n.rx_shared_ring([shared.pages[0]]))
    posted = rx_requests(8, first_id=100, first_gref=900)
    for r in posted:
        front.put_request(n.pack_rx_request(r))
    front.push_requests()
    taken = back.take_requests()
    plan = RxPlanner(gso_tcpv4=True).plan(out, taken)
    assert isinstance(plan, RxPlan)
    pages, raw = deliver(plan, frame)
    for rsp in raw:
        back.put_response(rsp)
    back.push_responses()
    got = front.take_responses()
    pkt, body = netfront_receive(got, posted, pages)
    assert body == data
    assert pkt.extras[0].body == n.GsoInfo(1448, n.XEN_NETIF_GSO_TYPE_TCPV4)
    assert pkt.first.flags & n.NETRXF_csum_blank
