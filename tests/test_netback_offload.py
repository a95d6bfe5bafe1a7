"""netback's offload decisions (backends/netback/offload.py): from_tx, fit, RxCaps.

from_tx makes a TX packet's flags and GSO extra a Frame; fit makes it what
the receiving vif negotiated: its MTU, checksum offload and GSO, segmenting
in software (segment_tcp) where it must.
"""

from __future__ import annotations

import pytest
from reference_frames import (
    ACK,
    FIN,
    FRAGMENT,
    LAYOUTS,
    MAC_DST,
    MAC_SRC,
    PSH,
    TCP,
    TCP_OPTS,
    UDP,
    Built,
    build,
    check_segments,
    field_of,
    l4_checksum_ok,
    pseudo_sum_of,
    tx_packet,
    without_field,
)

from xdom.backends.netback.offload import MAX_RING_FRAME, Frame, RxCaps, fit, from_tx
from xdom.backends.netback.tx import Checksum
from xdom.domains.abi.netif import XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6, GsoInfo

# ---- fit --------------------------------------------------------------------------------------------

def sized(total: int, **kw: object) -> Built:
    """A frame of exactly ``total`` bytes."""
    b = build(**kw)
    return build(payload=bytes(i & 0xFF for i in range(total - len(b.frame))), **kw)


@pytest.mark.parametrize("mtu", [576, 1500, 9000])
@pytest.mark.parametrize("state", [Checksum.NONE, Checksum.UNNECESSARY, Checksum.PARTIAL])
def test_fit_non_gso_mtu_limit(mtu: int, state: Checksum) -> None:
    caps = RxCaps(mtu=mtu)
    at = sized(mtu + 18)
    assert fit(Frame(at.frame, None, state), caps) == [Frame(at.frame, None, state)]
    over = sized(mtu + 19)
    assert isinstance(fit(Frame(over.frame, None, state), caps), str)
    over_v6 = sized(mtu + 19, v6=True, vlan=1)
    assert isinstance(fit(Frame(over_v6.frame, None, state), caps), str)


def test_fit_non_gso_mtu_applies_to_non_ip() -> None:
    arp_like = MAC_DST + MAC_SRC + b"\x08\x06" + bytes(1500 + 4)
    assert fit(Frame(arp_like), RxCaps()) == [Frame(arp_like)]
    assert isinstance(fit(Frame(arp_like + b"\0"), RxCaps()), str)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_fit_partial_to_receiver_without_csum_offload(name: str) -> None:
    b = build(payload=bytes(range(200)) + b"odd", **LAYOUTS[name])
    caps = RxCaps(csum_ipv4=False, csum_ipv6=False)
    out = fit(Frame(b.frame, None, Checksum.PARTIAL), caps)
    assert isinstance(out, list) and len(out) == 1
    assert out[0].checksum == Checksum.NONE and out[0].gso is None
    assert without_field(out[0].data, b) == without_field(b.frame, b)
    assert l4_checksum_ok(out[0].data, b.v6, b.l3, b.l4, b.proto)


@pytest.mark.parametrize("v6", [False, True])
def test_fit_partial_per_family(v6: bool) -> None:
    b = build(v6=v6, payload=bytes(99))
    f = Frame(b.frame, None, Checksum.PARTIAL)
    # csum only for the other family: finished; for this family: untouched
    other = fit(f, RxCaps(csum_ipv4=v6, csum_ipv6=not v6))
    assert other[0].checksum == Checksum.NONE and l4_checksum_ok(other[0].data, v6, b.l3, b.l4, TCP)
    assert fit(f, RxCaps(csum_ipv4=not v6, csum_ipv6=v6)) == [f]
    # default caps: IPv4 offload yes, IPv6 no
    default = fit(f, RxCaps())
    assert (default == [f]) == (not v6)


def test_fit_partial_that_does_not_parse_is_dropped() -> None:
    arp_like = MAC_DST + MAC_SRC + b"\x08\x06" + bytes(28)
    assert isinstance(fit(Frame(arp_like, None, Checksum.PARTIAL), RxCaps(csum_ipv4=False)), str)
    assert fit(Frame(arp_like, None, Checksum.NONE), RxCaps(csum_ipv4=False)) == [Frame(arp_like)]


def _gso_frame(v6: bool = False, size: int = 20000, mss: int = 1400, **kw: object) -> tuple[Built, Frame]:
    b = build(v6=v6, payload=bytes((i * 13) & 0xFF for i in range(size)), flags=ACK | PSH, **kw)
    gso = GsoInfo(mss, XEN_NETIF_GSO_TYPE_TCPV6 if v6 else XEN_NETIF_GSO_TYPE_TCPV4)
    return b, Frame(b.frame, gso, Checksum.PARTIAL)


@pytest.mark.parametrize("v6", [False, True])
def test_fit_gso_passes_to_a_receiver_that_negotiated_it(v6: bool) -> None:
    _, f = _gso_frame(v6)
    caps = RxCaps.negotiated(sg=True, gso_tcpv4=True, gso_tcpv6=True, no_csum_offload=False,
                             ipv6_csum_offload=True, mtu=1500)
    assert fit(f, caps) == [f]


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("vlan", [None, 42])
@pytest.mark.parametrize("mtu", [1500, 9000, 1280])
@pytest.mark.parametrize("csum", [False, True])
def test_fit_gso_segmented_for_a_receiver_without_it(v6: bool, vlan: int | None, mtu: int, csum: bool) -> None:
    mss = mtu - (60 if v6 else 40) - len(TCP_OPTS)
    b, f = _gso_frame(v6, size=3 * mss + 17, mss=mss, vlan=vlan, tcp_opts=TCP_OPTS)
    caps = RxCaps.negotiated(sg=True, gso_tcpv4=False, gso_tcpv6=False, no_csum_offload=not csum,
                             ipv6_csum_offload=csum, mtu=mtu)
    out = fit(f, caps)
    assert isinstance(out, list) and len(out) == 4
    assert all(x.gso is None and x.checksum == (Checksum.PARTIAL if csum else Checksum.NONE) for x in out)
    assert all(len(x.data) <= mtu + 14 + (4 if vlan is not None else 0) for x in out)
    assert len(out[0].data) == mtu + 14 + (4 if vlan is not None else 0)
    check_segments(b, [x.data for x in out], mss, partial=csum)


@pytest.mark.parametrize("v6", [False, True])
def test_fit_gso_segment_size_over_the_receiver_mtu(v6: bool) -> None:
    caps = RxCaps(mtu=1500)
    largest = 1500 - (60 if v6 else 40)
    _, ok = _gso_frame(v6, mss=largest)
    assert isinstance(fit(ok, caps), list)
    _, too_big = _gso_frame(v6, mss=largest + 1)
    assert isinstance(fit(too_big, caps), str)
    # the same MSS with TCP options in every segment no longer fits
    _, with_opts = _gso_frame(v6, mss=largest, tcp_opts=TCP_OPTS)
    assert isinstance(fit(with_opts, caps), str)
    # also for a receiver that takes GSO: its segments would not fit either
    gso_caps = RxCaps(gso_tcpv4=True, gso_tcpv6=True, csum_ipv6=True, mtu=1500)
    assert isinstance(fit(too_big, gso_caps), str)


@pytest.mark.parametrize("v6", [False, True])
def test_fit_gso_not_tcp(v6: bool) -> None:
    b = build(v6=v6, proto=UDP, payload=bytes(5000))
    gso = GsoInfo(1400, XEN_NETIF_GSO_TYPE_TCPV6 if v6 else XEN_NETIF_GSO_TYPE_TCPV4)
    caps_all = RxCaps(gso_tcpv4=True, gso_tcpv6=True, csum_ipv6=True)
    for caps in (RxCaps(), caps_all):
        assert isinstance(fit(Frame(b.frame, gso, Checksum.PARTIAL), caps), str)
    arp_like = MAC_DST + MAC_SRC + b"\x08\x06" + bytes(5000)
    assert isinstance(fit(Frame(arp_like, gso, Checksum.PARTIAL), caps_all), str)


@pytest.mark.parametrize("v6", [False, True])
def test_fit_gso_longer_than_the_ring_is_segmented_even_for_a_gso_receiver(v6: bool) -> None:
    b, f = _gso_frame(v6, size=MAX_RING_FRAME - 50, mss=1400)
    assert len(b.frame) > MAX_RING_FRAME
    caps = RxCaps.negotiated(sg=True, gso_tcpv4=True, gso_tcpv6=True, no_csum_offload=False,
                             ipv6_csum_offload=True, mtu=1500)
    out = fit(f, caps)
    assert len(out) == -(-len(b.payload) // 1400)
    assert all(x.gso is None and x.checksum == Checksum.PARTIAL for x in out)
    check_segments(b, [x.data for x in out], 1400, partial=True)
    # exactly the ring's limit still passes whole
    b2 = build(v6=v6, payload=bytes(MAX_RING_FRAME - b.hlen))
    assert len(b2.frame) == MAX_RING_FRAME
    f2 = Frame(b2.frame, f.gso, Checksum.PARTIAL)
    assert fit(f2, caps) == [f2]


def test_fit_ipv6_gso_to_a_receiver_without_ipv6_csum() -> None:
    caps = RxCaps.negotiated(sg=True, gso_tcpv4=True, gso_tcpv6=True, no_csum_offload=False,
                             ipv6_csum_offload=False, mtu=1500)
    assert not caps.gso_tcpv6 and not caps.takes_gso(XEN_NETIF_GSO_TYPE_TCPV6)
    assert caps.gso_tcpv4
    b, f = _gso_frame(True, size=5000, mss=1440)
    out = fit(f, caps)
    assert len(out) == 4
    assert all(x.gso is None and x.checksum == Checksum.NONE for x in out)
    check_segments(b, [x.data for x in out], 1440, partial=False)


@pytest.mark.parametrize("sg", [False, True])
@pytest.mark.parametrize("gso4", [False, True])
@pytest.mark.parametrize("gso6", [False, True])
@pytest.mark.parametrize("no_csum", [False, True])
@pytest.mark.parametrize("csum6", [False, True])
def test_rxcaps_negotiated_truth_table(sg: bool, gso4: bool, gso6: bool, no_csum: bool, csum6: bool) -> None:
    caps = RxCaps.negotiated(sg, gso4, gso6, no_csum, csum6, 1400)
    assert caps == RxCaps(sg=sg, gso_tcpv4=sg and gso4 and not no_csum, gso_tcpv6=sg and gso6 and csum6,
                          csum_ipv4=not no_csum, csum_ipv6=csum6, mtu=1400)
    assert caps.takes_gso(XEN_NETIF_GSO_TYPE_TCPV4) == (sg and gso4 and not no_csum)
    assert caps.takes_gso(XEN_NETIF_GSO_TYPE_TCPV6) == (sg and gso6 and csum6)
    assert not caps.takes_gso(0) and not caps.takes_gso(3)


def test_fit_gso_without_payload_to_a_receiver_without_csum() -> None:
    """A header-only GSO frame reaches a receiver without checksum offload with its checksum complete."""
    b = build(flags=ACK | FIN)
    out = fit(Frame(b.frame, GsoInfo(1000, XEN_NETIF_GSO_TYPE_TCPV4), Checksum.PARTIAL), RxCaps(csum_ipv4=False))
    assert len(out) == 1 and out[0].checksum == Checksum.NONE
    assert l4_checksum_ok(out[0].data, False, b.l3, b.l4, TCP)


# ---- from_tx ----------------------------------------------------------------------------------------

def test_from_tx_csum_blank_on_a_frame_that_cannot_carry_it() -> None:
    arp_like = MAC_DST + MAC_SRC + b"\x08\x06" + bytes(28)
    assert isinstance(from_tx(tx_packet(arp_like, csum_blank=True), arp_like), str)
    frag = build(frag=0x2000, payload=bytes(8)).frame
    assert isinstance(from_tx(tx_packet(frag, csum_blank=True), frag), str)
    v6frag = build(v6=True, ext=(FRAGMENT,), payload=bytes(8)).frame
    assert isinstance(from_tx(tx_packet(v6frag, csum_blank=True), v6frag), str)


def test_from_tx_without_offload_passes_anything() -> None:
    arp_like = MAC_DST + MAC_SRC + b"\x08\x06" + bytes(28)
    assert from_tx(tx_packet(arp_like), arp_like) == Frame(arp_like, None, Checksum.NONE)
    assert from_tx(tx_packet(arp_like, data_validated=True), arp_like) == Frame(arp_like, None, Checksum.UNNECESSARY)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_from_tx_csum_blank(name: str) -> None:
    b = build(payload=bytes(300), **LAYOUTS[name])
    assert from_tx(tx_packet(b.frame, csum_blank=True), b.frame) == Frame(b.frame, None, Checksum.PARTIAL)


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("vlan", [None, 8])
def test_from_tx_csum_fixup_rewrites_the_pseudo_header_sum(v6: bool, vlan: int | None) -> None:
    b = build(v6=v6, vlan=vlan, payload=bytes(range(256)) * 20 + b"x", csum=0xDEAD, tcp_opts=TCP_OPTS)
    gso = GsoInfo(1400, XEN_NETIF_GSO_TYPE_TCPV6 if v6 else XEN_NETIF_GSO_TYPE_TCPV4)
    out = from_tx(tx_packet(b.frame, gso=gso, csum_blank=True, csum_fixup=True), b.frame)
    assert isinstance(out, Frame) and out.gso == gso and out.checksum == Checksum.PARTIAL
    assert without_field(out.data, b) == without_field(b.frame, b)
    assert field_of(out.data, b) == pseudo_sum_of(b.frame, v6, b.l3, b.l4, TCP)
    # without the fix-up the field is left as the frontend wrote it
    same = from_tx(tx_packet(b.frame, gso=gso, csum_blank=True), b.frame)
    assert same.data == b.frame
    # the repaired frame segments into correct checksums
    segs = fit(out, RxCaps(csum_ipv4=False, csum_ipv6=False))
    check_segments(b, [s.data for s in segs], 1400, partial=False)


@pytest.mark.parametrize("v6, gso_type", [(False, XEN_NETIF_GSO_TYPE_TCPV6), (True, XEN_NETIF_GSO_TYPE_TCPV4)])
def test_from_tx_gso_of_the_wrong_family(v6: bool, gso_type: int) -> None:
    b = build(v6=v6, payload=bytes(4000))
    pkt = tx_packet(b.frame, gso=GsoInfo(1400, gso_type), csum_blank=True)
    assert isinstance(from_tx(pkt, b.frame), str)
    pkt = tx_packet(b.frame, gso=GsoInfo(1400, gso_type), csum_blank=True, csum_fixup=True)
    assert isinstance(from_tx(pkt, b.frame), str)


@pytest.mark.parametrize("v6", [False, True])
def test_from_tx_gso_on_udp(v6: bool) -> None:
    b = build(v6=v6, proto=UDP, payload=bytes(4000))
    gso = GsoInfo(1400, XEN_NETIF_GSO_TYPE_TCPV6 if v6 else XEN_NETIF_GSO_TYPE_TCPV4)
    assert isinstance(from_tx(tx_packet(b.frame, gso=gso, csum_blank=True), b.frame), str)
