"""netback's sans-IO core (backends/netback/tx.py, rx.py) against Linux xen-netback's rules.

Packets are built the way a frontend lays them out, with netif.py's
``pack_*`` helpers, over fake granted pages (a dict gref -> page); the
backend side's plans are then carried out on those pages and the bytes
compared.  Hostile layouts each get the outcome Linux gives them (drop with
ERROR responses, or fatal), and hypothesis checks the invariants that keep
a hostile frontend from hurting the backend: no exception, one response
per consumed slot, responses only ever carry the id of the request in
their slot, and splitting the slots into batches changes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdom.backends.netback import (
    Checksum,
    OutgoingPacket,
    RxDrop,
    RxPlan,
    RxPlanner,
    RxShortage,
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

PAGE = 4096


# --------------------------------------------------------------------------
# A frontend's side: granted pages and the slots it puts on the TX ring
# --------------------------------------------------------------------------

class Grants:
    """The frontend's granted pages: gref -> 4 KiB page."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}
        self.next_ref = 8

    def grant(self, data: bytes = b"", offset: int = 0) -> int:
        ref = self.next_ref
        self.next_ref += 1
        page = bytearray(os.urandom(PAGE))       # garbage around the data, as in a real page
        page[offset:offset + len(data)] = data
        self.pages[ref] = page
        return ref

    def read(self, gref: int, offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= PAGE
        return bytes(self.pages[gref][offset:offset + length])


def chain_extras(extras: Sequence[n.ExtraInfo]) -> list[n.ExtraInfo]:
    """FLAG_MORE on every extra but the last."""
    return [n.ExtraInfo(e.type, n.XEN_NETIF_EXTRA_FLAG_MORE if i < len(extras) - 1 else 0, e.body)
            for i, e in enumerate(extras)]


def tx_slots(grants: Grants, data: bytes, chunks: Sequence[int] | None = None, *, first_id: int = 0,
             offset: int = 0, flags: int = 0, extras: Sequence[n.ExtraInfo] = (),
             size: int | None = None) -> list[bytes]:
    """The slots netfront would push for ``data``: first request (size = whole packet), extras, fragments.

    ``chunks`` are the bytes per data slot (default: the first slot up to its
    page end, then whole pages).  ``size`` overrides the first request's
    size field (to lie).
    """
    if chunks is None:
        chunks = [min(len(data), PAGE - offset)]
        rest = len(data) - chunks[0]
        while rest > 0:
            chunks.append(min(rest, PAGE))
            rest -= chunks[-1]
    assert sum(chunks) == len(data)
    pieces, pos = [], 0
    for c in chunks:
        pieces.append(data[pos:pos + c])
        pos += c
    more = n.NETTXF_more_data if len(pieces) > 1 else 0
    first = n.TxRequest(grants.grant(pieces[0], offset), offset,
                        flags | more | (n.NETTXF_extra_info if extras else 0), first_id,
                        len(data) if size is None else size)
    slots = [n.pack_tx_request(first)]
    slots += [n.pack_extra_info(e, n.TX_SLOT_SIZE) for e in chain_extras(extras)]
    for i, piece in enumerate(pieces[1:], 1):
        last = i == len(pieces) - 1
        slots.append(n.pack_tx_request(n.TxRequest(grants.grant(piece), 0, 0 if last else n.NETTXF_more_data,
                                                   first_id + i, len(piece))))
    return slots


def req(gref: int, offset: int, flags: int, rid: int, size: int) -> bytes:
    return n.pack_tx_request(n.TxRequest(gref, offset, flags, rid, size))


def extra_slot(info: n.ExtraInfo) -> bytes:
    return n.pack_extra_info(info, n.TX_SLOT_SIZE)


def one(actions: list[TxAction]) -> TxAction:
    assert len(actions) == 1, actions
    return actions[0]


def statuses(action: TxPacket | TxDrop | TxMulticast) -> list[tuple[int, int]]:
    return [(r.id, r.status) for r in action.responses]


OK, ERR, NULL = n.NETIF_RSP_OKAY, n.NETIF_RSP_ERROR, n.NETIF_RSP_NULL


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
# RX: a packet into the frontend's posted pages
# --------------------------------------------------------------------------

def rx_requests(count: int, first_id: int = 0, first_gref: int = 500) -> list[n.RxRequest]:
    return [n.RxRequest((first_id + i) & 0xFFFF, first_gref + i) for i in range(count)]


def deliver(plan: RxPlan, data: bytes, failed: Iterable[int] = ()) -> tuple[dict[int, bytearray], list[bytes]]:
    """Carry out the plan's copies into fresh pages; return the pages and the packed responses."""
    pages: dict[int, bytearray] = {}
    for c in plan.copies:
        assert c.offset >= 0 and c.offset + c.length <= PAGE and c.length > 0
        page = pages.setdefault(c.gref, bytearray(PAGE))
        page[c.offset:c.offset + c.length] = data[c.src_offset:c.src_offset + c.length]
    return pages, plan.packed_responses(set(failed))


def netfront_receive(raw: list[bytes], reqs: Sequence[n.RxRequest], pages: dict[int, bytearray]
                     ) -> tuple[n.RxPacket, bytes]:
    """What netfront does with the responses: pair each slot with its request by position, reassemble."""
    pkt = n.walk_rx_packet(raw)
    assert pkt is not None and pkt.slots == len(raw)
    # data responses sit in the slots that are not extras: slot 0, then after the extras
    data_slots = [0] + list(range(1 + len(pkt.extras), pkt.slots))
    body = b""
    for slot, rsp in zip(data_slots, pkt.responses):
        assert rsp.id == reqs[slot].id
        body += bytes(pages[reqs[slot].gref][rsp.offset:rsp.offset + rsp.status])
    return pkt, body


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
