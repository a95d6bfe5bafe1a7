"""netback's sans-IO TX core (backends/netback/tx.py) against Linux xen-netback's rules.

Packets are built the way a frontend lays them out (tests/fake_frontend.py)
over fake granted pages; the backend side's plans are then carried out on
those pages and the bytes compared.  Hostile layouts each get the outcome
Linux gives them (drop with ERROR responses, or fatal), and hypothesis
checks the invariants that keep a hostile frontend from hurting the
backend: no exception, one response per consumed slot, responses only ever
carry the id of the request in their slot, and splitting the slots into
batches changes nothing.
"""

from __future__ import annotations

import os

import pytest
from fake_frontend import (
    ERR,
    NULL,
    OK,
    PAGE,
    Grants,
    chain_extras,
    extra_slot,
    one,
    req,
    statuses,
    tx_slots,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdom.backends.netback import (
    Checksum,
    TxDrop,
    TxFatal,
    TxMulticast,
    TxPacket,
    TxPiece,
    TxProcessor,
)
from xdom.backends.netback.tx import FATAL_SKB_SLOTS_DEFAULT, XEN_NETBK_MCAST_MAX, TxAction
from xdom.domains.abi import netif as n
from xdom.domains.abi.ring import BackRing, FrontRing

# --------------------------------------------------------------------------
# TX: well-formed packets become copy plans
# --------------------------------------------------------------------------

def test_single_slot_packet() -> None:
    g = Grants()
    data = os.urandom(60)
    p = one(TxProcessor().feed(tx_slots(g, data, offset=100, first_id=7)))
    assert isinstance(p, TxPacket)
    assert p.pieces == (TxPiece(8, 100, 60),)
    assert p.length == 60 and p.gso is None and p.hash is None
    assert statuses(p) == [(7, OK)]
    assert p.gather(g.read) == data
    assert p.checksum == Checksum.NONE and not p.csum_fixup


def test_multi_slot_gso_packet_round_trips() -> None:
    g = Grants()
    data = os.urandom(9000)
    slots = tx_slots(g, data, [1000, 4096, 3904], first_id=40, offset=3000,
                     extras=[n.gso_extra(1448, n.XEN_NETIF_GSO_TYPE_TCPV4)], flags=n.NETTXF_csum_blank)
    p = one(TxProcessor().feed(slots, at_req_prod=True))
    assert isinstance(p, TxPacket)
    assert [(x.offset, x.length) for x in p.pieces] == [(3000, 1000), (0, 4096), (0, 3904)]
    assert p.gather(g.read) == data and p.length == 9000
    assert p.gso == n.GsoInfo(1448, n.XEN_NETIF_GSO_TYPE_TCPV4)
    assert p.csum_blank and not p.csum_fixup and p.checksum == Checksum.PARTIAL
    # One response per slot, in slot order; the extra slot answered NULL.
    assert statuses(p) == [(40, OK), (0, NULL), (41, OK), (42, OK)]
    assert [(r.id, r.status) for r in p.error_responses()] == [(40, ERR), (0, NULL), (41, ERR), (42, ERR)]


def test_gso_without_csum_blank_is_fixed_up() -> None:
    """checksum_setup: a GSO skb must be CHECKSUM_PARTIAL; Linux forces it for buggy frontends."""
    g = Grants()
    slots = tx_slots(g, os.urandom(3000), extras=[n.gso_extra(1448, n.XEN_NETIF_GSO_TYPE_TCPV6)],
                     flags=n.NETTXF_data_validated)
    p = one(TxProcessor().feed(slots))
    assert isinstance(p, TxPacket)
    assert p.csum_blank and p.csum_fixup and not p.data_validated


@pytest.mark.parametrize("flags,blank,valid", [
    (0, False, False),
    (n.NETTXF_csum_blank, True, False),
    (n.NETTXF_data_validated, False, True),
    (n.NETTXF_csum_blank | n.NETTXF_data_validated, True, False),     # Linux's else-if
])
def test_checksum_flags(flags: int, blank: bool, valid: bool) -> None:
    p = one(TxProcessor().feed(tx_slots(Grants(), os.urandom(100), flags=flags)))
    assert isinstance(p, TxPacket)
    assert (p.csum_blank, p.data_validated) == (blank, valid)


def test_zero_size_fragment_answered_but_not_copied() -> None:
    g = Grants()
    data = os.urandom(200)
    slots = tx_slots(g, data, [100, 0, 100], first_id=1)
    p = one(TxProcessor().feed(slots))
    assert isinstance(p, TxPacket)
    assert len(p.pieces) == 2 and p.gather(g.read) == data
    assert statuses(p) == [(1, OK), (2, OK), (3, OK)]


def test_hash_extra_recorded_and_bad_hash_type_ignored() -> None:
    g = Grants()
    h = n.hash_extra(n._XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP, 0xDEADBEEF)
    p = one(TxProcessor().feed(tx_slots(g, os.urandom(80), extras=[h])))
    assert isinstance(p, TxPacket) and p.hash is not None and p.hash.value_u32 == 0xDEADBEEF
    bad = n.hash_extra(9, 1)
    p = one(TxProcessor().feed(tx_slots(g, os.urandom(80), extras=[bad])))
    assert isinstance(p, TxPacket) and p.hash is None


def test_xdp_extra_accepted_and_ignored() -> None:
    """Linux's netif.h knows type 5 (XDP), so netback's get_extras takes it; it means nothing on TX."""
    xdp = n.ExtraInfo(5, 0, bytes(6))
    p = one(TxProcessor().feed(tx_slots(Grants(), os.urandom(80), first_id=3, extras=[xdp])))
    assert isinstance(p, TxPacket) and statuses(p) == [(3, OK), (0, NULL)]


def test_longest_accepted_chain() -> None:
    """xenvif_count_requests counts slots after the first: 18 of them (19 in all) still pass."""
    g = Grants()
    data = os.urandom(19 * 70)
    p = one(TxProcessor().feed(tx_slots(g, data, [70] * 19)))
    assert isinstance(p, TxPacket) and p.slots == 19 and p.gather(g.read) == data


# --------------------------------------------------------------------------
# TX: drops (xenvif_tx_err: ERROR for every slot, NULL for extras)
# --------------------------------------------------------------------------

def test_too_many_slots_dropped_below_fatal_limit() -> None:
    g = Grants()
    for frags in (19, FATAL_SKB_SLOTS_DEFAULT):
        proc = TxProcessor()
        slots = tx_slots(g, os.urandom((frags + 1) * 64), [64] * (frags + 1), first_id=100,
                         extras=[n.gso_extra(1448, n.XEN_NETIF_GSO_TYPE_TCPV4)])
        d = one(proc.feed(slots))
        assert isinstance(d, TxDrop) and "too many slots" in d.reason
        assert statuses(d) == [(100, ERR), (0, NULL)] + [(100 + i, ERR) for i in range(1, frags + 1)]
        assert proc.fatal is None and proc.pending == 0


def test_more_slots_than_fatal_limit_is_fatal() -> None:
    proc = TxProcessor()
    slots = tx_slots(Grants(), os.urandom(22 * 64), [64] * 22)
    a = one(proc.feed(slots))
    assert isinstance(a, TxFatal) and "malicious" in a.reason
    assert proc.fatal == a.reason
    assert proc.feed(tx_slots(Grants(), os.urandom(60))) == []       # dead after fatal


def test_fatal_limit_is_configurable_but_never_below_max_slots() -> None:
    assert TxProcessor(max_slots=18, fatal_slots=4).fatal_slots == 18
    proc = TxProcessor(max_slots=2, fatal_slots=3)
    assert isinstance(one(proc.feed(tx_slots(Grants(), os.urandom(300), [100] * 3))), TxPacket)
    assert isinstance(one(proc.feed(tx_slots(Grants(), os.urandom(400), [100] * 4))), TxDrop)
    assert isinstance(one(proc.feed(tx_slots(Grants(), os.urandom(500), [100] * 5))), TxFatal)


@pytest.mark.parametrize("size", [0, 1, 13])
def test_short_packet_dropped(size: int) -> None:
    d = one(TxProcessor().feed(tx_slots(Grants(), os.urandom(size), [size], first_id=5)))
    assert isinstance(d, TxDrop) and d.status == ERR
    assert statuses(d) == [(5, ERR)]


def test_first_slot_smaller_than_the_rest_dropped() -> None:
    """A fragment larger than what the first size leaves: a lying frontend, dropped, every slot answered."""
    g = Grants()
    slots = tx_slots(g, os.urandom(3000), [1000, 1000, 1000], first_id=10, size=1500,
                     extras=[n.gso_extra(1448, n.XEN_NETIF_GSO_TYPE_TCPV4)])
    d = one(TxProcessor().feed(slots))
    assert isinstance(d, TxDrop) and "remaining" in d.reason
    assert statuses(d) == [(10, ERR), (0, NULL), (11, ERR), (12, ERR)]


def test_first_fragment_shorter_than_ethernet_header_dropped() -> None:
    slots = tx_slots(Grants(), os.urandom(1010), [10, 1000], first_id=1)
    d = one(TxProcessor().feed(slots))
    assert isinstance(d, TxDrop) and statuses(d) == [(1, ERR), (2, ERR)]


def test_frame_over_mtu_without_gso_dropped() -> None:
    """is_skb_forwardable: mtu + hard_header_len + VLAN_HLEN; GSO frames pass; the ring saw OKAY."""
    g = Grants()
    proc = TxProcessor(mtu=1500)
    assert isinstance(one(proc.feed(tx_slots(g, os.urandom(1518)))), TxPacket)
    d = one(proc.feed(tx_slots(g, os.urandom(1519), first_id=9)))
    assert isinstance(d, TxDrop) and "MTU" in d.reason
    assert d.status == OK and statuses(d) == [(9, OK)]
    gso = [n.gso_extra(1448, n.XEN_NETIF_GSO_TYPE_TCPV4)]
    assert isinstance(one(proc.feed(tx_slots(g, os.urandom(60000), extras=gso))), TxPacket)
    assert isinstance(one(TxProcessor(mtu=9000).feed(tx_slots(g, os.urandom(9018)))), TxPacket)


def test_processing_continues_after_a_drop() -> None:
    g = Grants()
    good = os.urandom(500)
    slots = tx_slots(g, b"", [0], first_id=1) + tx_slots(g, good, first_id=2)
    d, p = TxProcessor().feed(slots)
    assert isinstance(d, TxDrop) and isinstance(p, TxPacket) and p.gather(g.read) == good


# --------------------------------------------------------------------------
# TX: fatal (xenvif_fatal_tx_err: disconnect, nothing answered)
# --------------------------------------------------------------------------

def test_first_slot_crossing_its_page_is_fatal() -> None:
    a = one(TxProcessor().feed(tx_slots(Grants(), os.urandom(200), [200], offset=4000)))
    assert isinstance(a, TxFatal) and "crosses" in a.reason


def test_fragment_crossing_its_page_is_fatal_even_in_a_dropped_packet() -> None:
    slots = [req(1, 0, n.NETTXF_more_data, 0, 100), req(2, 4095, 0, 1, 2)]
    assert isinstance(one(TxProcessor().feed(slots)), TxFatal)
    # Already dropped for a lying size: Linux still checks every slot's page bounds.
    slots = [req(1, 0, n.NETTXF_more_data, 0, 10), req(2, 0, n.NETTXF_more_data, 1, 50), req(3, 4000, 0, 2, 200)]
    assert isinstance(one(TxProcessor().feed(slots)), TxFatal)


@pytest.mark.parametrize("etype", [0, 6, 7, 255])
def test_unknown_extra_type_is_fatal(etype: int) -> None:
    slots = tx_slots(Grants(), os.urandom(100), extras=[n.ExtraInfo(etype, 0, bytes(6))])
    a = one(TxProcessor().feed(slots))
    assert isinstance(a, TxFatal) and "extra type" in a.reason


def test_unknown_extra_type_later_in_the_chain_is_fatal() -> None:
    extras = [n.gso_extra(1448, n.XEN_NETIF_GSO_TYPE_TCPV4), n.ExtraInfo(9, 0, bytes(6))]
    assert isinstance(one(TxProcessor().feed(tx_slots(Grants(), os.urandom(100), extras=extras))), TxFatal)


@pytest.mark.parametrize("size,gtype", [(0, n.XEN_NETIF_GSO_TYPE_TCPV4), (0, n.XEN_NETIF_GSO_TYPE_NONE),
                                        (1448, n.XEN_NETIF_GSO_TYPE_NONE), (1448, 3), (1448, 200)])
def test_bad_gso_extra_is_fatal(size: int, gtype: int) -> None:
    slots = tx_slots(Grants(), os.urandom(3000), extras=[n.gso_extra(size, gtype)])
    a = one(TxProcessor().feed(slots))
    assert isinstance(a, TxFatal) and "GSO" in a.reason


def test_bad_gso_in_a_dropped_packet_is_only_dropped() -> None:
    """Linux checks sizes (drop) before it looks at the GSO extra (fatal)."""
    slots = tx_slots(Grants(), os.urandom(10), [10], extras=[n.gso_extra(0, 0)])
    assert isinstance(one(TxProcessor().feed(slots)), TxDrop)


def test_packet_cut_short_at_req_prod_is_fatal() -> None:
    g = Grants()
    slots = tx_slots(g, os.urandom(5000), extras=[n.gso_extra(1448, n.XEN_NETIF_GSO_TYPE_TCPV4)])
    for cut in (1, 2):      # inside the extras, inside the fragments
        proc = TxProcessor()
        assert proc.feed(slots[:cut]) == [] and proc.pending == cut
        a = one(proc.feed([], at_req_prod=True))
        assert isinstance(a, TxFatal)
        assert one(TxProcessor().feed(slots[:cut], at_req_prod=True)) == a


def test_extra_chain_longer_than_the_ring_is_fatal() -> None:
    more = n.ExtraInfo(n.XEN_NETIF_EXTRA_TYPE_HASH, n.XEN_NETIF_EXTRA_FLAG_MORE, n.HashInfo(0, 1, bytes(4)))
    slots = [req(1, 0, n.NETTXF_extra_info, 0, 100)] + [extra_slot(more)] * 300
    proc = TxProcessor()
    a = one(proc.feed(slots))
    assert isinstance(a, TxFatal) and "ring" in a.reason
    # Never buffered more than the ring holds while waiting for the chain to end.
    proc = TxProcessor(ring_size=16)
    out: list[TxAction] = []
    for s in slots[:40]:
        out += proc.feed([s])
        assert proc.pending <= 16
    assert isinstance(one(out), TxFatal)


# --------------------------------------------------------------------------
# TX: multicast control
# --------------------------------------------------------------------------

def test_multicast_add_and_del() -> None:
    g = Grants()
    proc = TxProcessor()
    a1, a2 = b"\x01\x00\x5e\x00\x00\x01", b"\x33\x33\x00\x00\x00\x01"
    acts = proc.feed(tx_slots(g, b"", [0], first_id=1, extras=[n.mcast_extra(a1)])
                     + tx_slots(g, b"", [0], first_id=2, extras=[n.mcast_extra(a2)]))
    assert [type(a) for a in acts] == [TxMulticast, TxMulticast]
    assert all(isinstance(a, TxMulticast) and a.accepted and a.add for a in acts)
    assert [statuses(a) for a in acts if isinstance(a, TxMulticast)] == [[(1, OK), (0, NULL)], [(2, OK), (0, NULL)]]
    assert proc.multicast == {a1, a2}
    d = one(proc.feed(tx_slots(g, b"", [0], first_id=3, extras=[n.mcast_extra(a1, add=False)])))
    assert isinstance(d, TxMulticast) and not d.add and statuses(d) == [(3, OK), (0, NULL)]
    assert proc.multicast == {a2}


def test_multicast_filter_full_answers_error() -> None:
    g = Grants()
    proc = TxProcessor()
    slots = []
    for i in range(XEN_NETBK_MCAST_MAX + 1):
        slots += tx_slots(g, b"", [0], first_id=i, extras=[n.mcast_extra(bytes([1, 0, 0x5E, 0, 0, i]))])
    acts = proc.feed(slots)
    assert all(isinstance(a, TxMulticast) for a in acts) and len(acts) == XEN_NETBK_MCAST_MAX + 1
    last = acts[-1]
    assert isinstance(last, TxMulticast) and not last.accepted and statuses(last)[0] == (XEN_NETBK_MCAST_MAX, ERR)
    assert len(proc.multicast) == XEN_NETBK_MCAST_MAX


def test_multicast_request_does_not_consume_its_fragments() -> None:
    """Linux answers the mcast request and goes on: slots after it are the next packet."""
    g = Grants()
    data = os.urandom(100)
    slots = [req(1, 0, n.NETTXF_extra_info | n.NETTXF_more_data, 4, 0), extra_slot(n.mcast_extra(b"\x01" * 6))]
    slots += tx_slots(g, data, first_id=5)
    m, p = TxProcessor().feed(slots)
    assert isinstance(m, TxMulticast) and statuses(m) == [(4, OK), (0, NULL)]
    assert isinstance(p, TxPacket) and p.gather(g.read) == data


# --------------------------------------------------------------------------
# TX: packets split across batches
# --------------------------------------------------------------------------

def test_partial_packets_across_feed_calls() -> None:
    g = Grants()
    datas = [os.urandom(k) for k in (60, 9000, 1500, 70)]
    slots: list[bytes] = []
    gso = [n.gso_extra(1448, n.XEN_NETIF_GSO_TYPE_TCPV4), n.hash_extra(0, 5)]
    for i, d in enumerate(datas):
        slots += tx_slots(g, d, first_id=i * 10, extras=gso if len(d) > 1514 else ())
    whole = TxProcessor().feed(slots, at_req_prod=True)
    proc = TxProcessor()
    pieces: list[TxAction] = []
    for s in slots:
        pieces += proc.feed([s])
    assert pieces == whole and proc.pending == 0
    assert [a.gather(g.read) for a in whole if isinstance(a, TxPacket)] == datas


# --------------------------------------------------------------------------
# TX over a real ring: FrontRing pushes, BackRing takes, TxProcessor decides
# --------------------------------------------------------------------------

def tx_ring_pair() -> tuple[FrontRing, BackRing]:
    shared = n.tx_shared_ring([memoryview(bytearray(PAGE))])
    front = FrontRing(shared)
    return front, BackRing(n.tx_shared_ring([shared.pages[0]]))


def serve_tx(back: BackRing, proc: TxProcessor, limit: int | None = None) -> list[TxAction]:
    """One pass of the backend's loop: take slots, decide, answer in ring order, push."""
    actions = proc.feed(back.take_requests(limit), at_req_prod=limit is None)
    for a in actions:
        if not isinstance(a, TxFatal):
            for r in a.responses:
                back.put_response(n.pack_tx_response(r))
    back.push_responses()
    return actions


@pytest.mark.parametrize("limit", [None, 1, 3, 7])
def test_tx_over_a_ring_pair(limit: int | None) -> None:
    g = Grants()
    front, back = tx_ring_pair()
    proc = TxProcessor()
    sent: list[bytes] = []
    expected_status: dict[int, int] = {}
    delivered: list[bytes] = []
    rid = 0
    # Enough traffic to wrap the 256-slot ring several times.
    for _ in range(120):
        batch: list[bytes] = []
        for k in (60, 5000, 1514, 0):
            data = os.urandom(k)
            extras = [n.gso_extra(1448, n.XEN_NETIF_GSO_TYPE_TCPV4)] if k > 1514 else []
            slots = tx_slots(g, data, first_id=rid, extras=extras)
            nreq = len(slots) - len(extras)
            for i in range(nreq):
                expected_status[rid + i] = ERR if k == 0 else OK
            if k:
                sent.append(data)
            rid = (rid + nreq) & 0xFFFF
            batch += slots
        if front.free_requests() < len(batch):
            break
        for s in batch:
            front.put_request(s)
        front.push_requests()
        while back.unconsumed_requests():
            for a in serve_tx(back, proc, limit):
                assert not isinstance(a, TxFatal)
                if isinstance(a, TxPacket):
                    delivered.append(a.gather(g.read))
        for raw in front.take_responses():
            rsp = n.parse_tx_response(raw)
            if rsp.status != NULL:
                assert expected_status.pop(rsp.id) == rsp.status
    assert delivered == sent and not expected_status and proc.pending == 0
    assert back.rsp_prod_pvt == front.req_prod_pvt and back.rsp_prod_pvt > 256


# --------------------------------------------------------------------------
# TX fuzz: arbitrary slots never hurt the backend
# --------------------------------------------------------------------------

SIZES = st.sampled_from([0, 1, 13, 14, 60, 100, 1514, 1518, 1519, 4000, 4096, 4097, 9000, 65535])
OFFSETS = st.sampled_from([0, 1, 100, 3000, 4000, 4095, 4096, 65535])
REQUEST_SLOTS = st.builds(lambda g, o, f, i, s: req(g, o, f, i, s), st.integers(0, 20), OFFSETS,
                          st.integers(0, 15) | st.sampled_from([n.NETTXF_more_data]), st.integers(0, 0xFFFF),
                          SIZES | st.integers(0, 0xFFFF))
EXTRA_SLOTS = st.builds(
    lambda t, f, size, gtype: extra_slot(n.ExtraInfo(t, f, n.GsoInfo(size, gtype))),
    st.integers(0, 7) | st.sampled_from([1, 1, 2, 3, 4]), st.integers(0, 3),
    st.sampled_from([0, 1, 1448]), st.integers(0, 3))
SLOTS = st.lists(st.one_of(REQUEST_SLOTS, REQUEST_SLOTS, EXTRA_SLOTS, st.binary(min_size=12, max_size=12)),
                 max_size=70)
EXTRAS = st.sampled_from([n.gso_extra(1448, n.XEN_NETIF_GSO_TYPE_TCPV4), n.gso_extra(0, 1), n.gso_extra(9, 7),
                          n.mcast_extra(b"\x01" * 6), n.mcast_extra(b"\x01" * 6, add=False), n.hash_extra(1, 7),
                          n.ExtraInfo(5, 0, bytes(6)), n.ExtraInfo(0, 0, bytes(6)), n.ExtraInfo(8, 0, bytes(6))])


@st.composite
def packet_slots(draw: st.DrawFn) -> list[bytes]:
    """A mostly well-formed packet (netfront's layout) with the odd lie: many slots, bad sizes, bad extras."""
    chunks = draw(st.lists(st.integers(0, PAGE) | st.sampled_from([0, 14, 60, 100]), min_size=1, max_size=24))
    offset = draw(st.sampled_from([0, 0, 0, 10, 2000, 4000]))
    chunks[0] = draw(st.integers(0, PAGE - offset)) if draw(st.booleans()) else min(chunks[0], PAGE - offset)
    extras = draw(st.lists(EXTRAS, max_size=3))
    size = sum(chunks) & 0xFFFF
    if draw(st.integers(0, 9)) == 0:
        size = draw(st.integers(0, 0xFFFF))
    flags = draw(st.integers(0, 3)) | (n.NETTXF_more_data if len(chunks) > 1 else 0)
    rid = draw(st.integers(0, 0xFFFF))
    out = [req(1, offset, flags | (n.NETTXF_extra_info if extras else 0), rid, size)]
    out += [extra_slot(e) for e in chain_extras(extras)]
    for i, c in enumerate(chunks[1:], 1):
        out.append(req(i + 1, 0, n.NETTXF_more_data if i < len(chunks) - 1 else 0, (rid + i) & 0xFFFF, c))
    return out


PACKETS = st.lists(packet_slots() | st.lists(REQUEST_SLOTS | EXTRA_SLOTS, max_size=3), max_size=8).map(
    lambda ps: [s for p in ps for s in p])


def check_tx_accounting(slots: list[bytes], actions: list[TxAction], proc: TxProcessor) -> None:
    pos = 0
    for k, a in enumerate(actions):
        if isinstance(a, TxFatal):
            assert k == len(actions) - 1 and proc.fatal == a.reason and proc.pending == 0
            return
        rs = a.responses
        assert len(rs) == a.slots >= 1
        # first, NULLs for its extras, then the data slots: the ring's slot layout
        kinds = [r.status == NULL for r in rs]
        assert not kinds[0]
        nulls = sum(kinds)
        assert kinds == [False] + [True] * nulls + [False] * (len(rs) - 1 - nulls)
        for i, r in enumerate(rs):
            if r.status == NULL:
                assert r.id == 0
            else:
                # a response only ever names the request in its own slot
                assert r.id == n.parse_tx_request(slots[pos + i]).id
                assert r.status in (OK, ERR)
        if isinstance(a, TxPacket):
            assert all(r.status in (OK, NULL) for r in rs)
            assert all(p.offset + p.length <= PAGE and p.length > 0 for p in a.pieces)
            assert sum(p.length for p in a.pieces) == a.length
            assert 14 <= a.length <= n.XEN_NETIF_MAX_TX_SIZE
            assert a.slots - nulls <= proc.max_slots + 1
            assert a.gso is not None or a.length <= proc.mtu + 18
        pos += a.slots
    assert proc.fatal is None and pos + proc.pending == len(slots)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SLOTS | PACKETS, st.lists(st.integers(0, 70), max_size=6), st.booleans())
def test_tx_fuzz_never_raises_and_answers_every_slot(slots: list[bytes], cuts: list[int], final: bool) -> None:
    whole_proc = TxProcessor()
    whole = whole_proc.feed(slots, at_req_prod=final)
    check_tx_accounting(slots, whole, whole_proc)
    if final:
        assert whole_proc.pending == 0
    # Any split into batches decides exactly the same.
    proc = TxProcessor()
    acts: list[TxAction] = []
    prev = 0
    for c in sorted(cuts) + [len(slots)]:
        c = min(c, len(slots))
        acts += proc.feed(slots[prev:c])
        prev = max(prev, c)
    acts += proc.feed([], at_req_prod=final)
    assert acts == whole
    assert proc.multicast == whole_proc.multicast


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=12, max_size=12), max_size=60))
def test_tx_fuzz_random_bytes(slots: list[bytes]) -> None:
    proc = TxProcessor()
    check_tx_accounting(slots, proc.feed(slots), proc)


def test_short_slot_copy_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        TxProcessor().feed([b"\0" * 11])


# --------------------------------------------------------------------------
# The usual packet, decided in bulk, against the general path
# --------------------------------------------------------------------------

def _usual_or_nearly(rng) -> list[bytes]:
    """Slots for a few packets: mostly what netfront sends (a GSO extra, 4 KiB continuation slots from
    offset 0), each with a fair chance of one thing wrong: sizes that do not add up, a slot crossing
    its page, an empty slot, a chain that does not end, a bad or chained extra, a short first slot."""
    from xdom.domains.abi.netif import EXTRA_GSO, EXTRA_HEAD, TX_REQUEST

    out: list[bytes] = []
    for _ in range(rng.randrange(1, 5)):
        bad = rng.randrange(12) if rng.random() < 0.5 else -1
        frags = rng.choice([1, 2, 15, 16, 17, 18, 19, 21])
        sizes = [PAGE] * frags
        sizes[-1] = rng.randrange(1, PAGE + 1)
        first_len = rng.choice([54, 1448, PAGE - 100])
        first_off = PAGE - first_len if rng.random() < 0.5 else 0
        if bad == 0:
            sizes[rng.randrange(frags)] = 0
        size0 = first_len + sum(sizes)
        if bad == 1:
            size0 = rng.randrange(0x10000)
        if bad == 2:
            first_len, size0 = 10, sum(sizes) + 10
        size0 &= 0xFFFF
        flags = n.NETTXF_more_data | rng.choice([0, n.NETTXF_csum_blank, n.NETTXF_data_validated, 3])
        gso = rng.random() < 0.7
        if gso or bad == 3:
            flags |= n.NETTXF_extra_info
        if bad == 4:
            flags &= ~n.NETTXF_more_data
        out.append(TX_REQUEST.pack(rng.randrange(2**32), first_off, flags, rng.randrange(256), size0))
        if gso or bad == 3:
            etype = rng.choice([2, 3, 4, 0, 9]) if bad == 3 else n.XEN_NETIF_EXTRA_TYPE_GSO
            eflags = n.XEN_NETIF_EXTRA_FLAG_MORE if bad == 5 else 0
            mss = 0 if bad == 6 else 1448
            gtype = rng.choice([0, 3]) if bad == 7 else rng.choice([n.XEN_NETIF_GSO_TYPE_TCPV4,
                                                                      n.XEN_NETIF_GSO_TYPE_TCPV6])
            out.append((EXTRA_HEAD.pack(etype, eflags) + EXTRA_GSO.pack(mss, gtype, 0, 0)).ljust(12, b"\0"))
            if bad == 5:
                out.append((EXTRA_HEAD.pack(n.XEN_NETIF_EXTRA_TYPE_GSO, 0)
                            + EXTRA_GSO.pack(1448, 1, 0, 0)).ljust(12, b"\0"))
        base = rng.randrange(2**32 - 64)
        for i, size in enumerate(sizes):
            more = n.NETTXF_more_data if i < frags - 1 or bad == 8 else 0
            offset = rng.randrange(1, PAGE) if bad == 9 and i == frags // 2 else 0
            out.append(TX_REQUEST.pack(base + i, offset, more, rng.randrange(0x10000), size))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_usual_packets_decided_in_bulk_as_the_general_path_decides(seed: int) -> None:
    """Whatever the slots, trying the bulk path first changes no action, statistic or error; and it
    does decide the usual packets (a test that never took it would prove nothing)."""
    import random

    rng = random.Random(seed)
    taken = 0
    for _ in range(600):
        slots = _usual_or_nearly(rng)
        kw = dict(max_slots=rng.choice([18, 18, 16]), mtu=rng.choice([1500, 65535]),
                  fatal_slots=rng.choice([20, 19]), ring_size=rng.choice([256, 256, 24, 18, 12]))
        bulk, general = TxProcessor(**kw), TxProcessor(**kw)
        general.usual_first = False
        cut, at_req_prod = rng.randrange(len(slots) + 1), rng.random() < 0.7
        usual = bulk._usual
        hits = []
        bulk._usual = lambda: hits.append(usual()) or hits[-1]     # type: ignore[method-assign]
        got = bulk.feed(slots[:cut]) + bulk.feed(slots[cut:], at_req_prod=at_req_prod)
        want = general.feed(slots[:cut]) + general.feed(slots[cut:], at_req_prod=at_req_prod)
        assert got == want
        assert (bulk.stats, bulk.fatal, bulk.pending) == (general.stats, general.fatal, general.pending)
        taken += sum(h is not None for h in hits)
    assert taken > 150
