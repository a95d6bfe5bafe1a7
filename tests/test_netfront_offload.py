"""netfront's TAP <-> ring glue (domains/vnet.py): virtio-net headers and the offloads they carry.

from_tap turns what a guest's TAP hands over (a virtio-net header and a
frame) into TX frames for the ring; to_tap turns what the RX ring brings into
a header and a frame for the TAP.  The round trips go from one guest's TAP
through netback (from_tx, fit) to another's TAP.
"""

from __future__ import annotations

import struct

import pytest
from reference_frames import (
    ACK,
    ALL_BE,
    CWR,
    DATA_VALID,
    DSTOPTS,
    HOP,
    LAYOUTS,
    MAC_DST,
    MAC_SRC,
    NEEDS_CSUM,
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
    tso_hdr,
    tx_packet,
    without_field,
)

from xdom.backends.netback.offload import MAX_RING_FRAME, Frame, RxCaps, fit, from_tx
from xdom.backends.netback.tx import Checksum
from xdom.domains.abi.netif import XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6, GsoInfo
from xdom.domains.packet import VIRTIO_NET_HDR_SIZE, VirtioGso, VirtioNetHdr, finish_checksum, parse_headers
from xdom.domains.vnet import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, BackendOffloads, TxFrame, from_tap, to_tap

# ---- netfront: TAP <-> ring -------------------------------------------------------------------------

@pytest.mark.parametrize("sg", [False, True])
@pytest.mark.parametrize("gso4", [False, True])
@pytest.mark.parametrize("gso6", [False, True])
@pytest.mark.parametrize("csum6", [False, True])
def test_tun_flags(sg: bool, gso4: bool, gso6: bool, csum6: bool) -> None:
    flags = BackendOffloads(sg, gso4, gso6, csum6).tun_flags()
    assert flags & TUN_F_CSUM
    assert bool(flags & TUN_F_TSO4) == (sg and gso4)
    assert bool(flags & TUN_F_TSO6) == (sg and gso6 and csum6)
    assert flags & ~(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) == 0


def test_tun_flags_values() -> None:
    assert (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6) == (1, 2, 4)          # linux/if_tun.h
    assert BackendOffloads().tun_flags() == 1
    assert BackendOffloads(True, True, True, True).tun_flags() == 7


def test_virtio_net_hdr_wire_format() -> None:
    assert VIRTIO_NET_HDR_SIZE == 10
    raw = struct.pack("<BBHHHH", 1, 4, 74, 1428, 54, 16)
    hdr = VirtioNetHdr.parse(raw)
    assert hdr == VirtioNetHdr(1, 4, 74, 1428, 54, 16)
    assert hdr.pack() == raw and hdr.needs_csum and not hdr.data_valid
    assert VirtioNetHdr(DATA_VALID).data_valid and not VirtioNetHdr(DATA_VALID).needs_csum
    assert (VirtioGso.NONE, VirtioGso.TCPV4, VirtioGso.UDP, VirtioGso.TCPV6, VirtioGso.ECN) == (0, 1, 3, 4, 0x80)


def needs_csum_hdr(b: Built) -> VirtioNetHdr:
    return VirtioNetHdr(NEEDS_CSUM, 0, 0, 0, b.l4, 16 if b.proto == TCP else 6)


@pytest.mark.parametrize("name", [n for n in sorted(LAYOUTS) if n.startswith("v4")])
def test_from_tap_needs_csum_ipv4(name: str) -> None:
    b = build(payload=bytes(500), **LAYOUTS[name])
    for be in (BackendOffloads(), ALL_BE):
        assert from_tap(needs_csum_hdr(b), b.frame, be) == [TxFrame(b.frame, True, True, None)]


@pytest.mark.parametrize("name", [n for n in sorted(LAYOUTS) if n.startswith("v6")])
def test_from_tap_needs_csum_ipv6(name: str) -> None:
    b = build(payload=bytes(range(201)), **LAYOUTS[name])
    hdr = needs_csum_hdr(b)
    out = from_tap(hdr, b.frame, BackendOffloads(sg=True, gso_tcpv4=True, gso_tcpv6=True, ipv6_csum=False))
    assert isinstance(out, list) and len(out) == 1
    assert (out[0].csum_blank, out[0].data_validated, out[0].gso) == (False, False, None)
    assert without_field(out[0].data, b) == without_field(b.frame, b)
    assert l4_checksum_ok(out[0].data, True, b.l3, b.l4, b.proto)
    assert from_tap(hdr, b.frame, ALL_BE) == [TxFrame(b.frame, True, True, None)]


def test_from_tap_without_needs_csum() -> None:
    b = build(payload=bytes(10), csum="full")
    arp_like = MAC_DST + MAC_SRC + b"\x08\x06" + bytes(28)
    for frame in (b.frame, arp_like):
        assert from_tap(VirtioNetHdr(), frame, ALL_BE) == [TxFrame(frame, False, False, None)]
        assert from_tap(VirtioNetHdr(DATA_VALID), frame, ALL_BE) == [TxFrame(frame, False, True, None)]


def test_from_tap_needs_csum_refusals() -> None:
    b = build(payload=bytes(10))
    good = needs_csum_hdr(b)
    for start in (0, b.l4 - 1, b.l4 + 1, b.l4 - 20, 14):
        assert isinstance(from_tap(good._replace(csum_start=start), b.frame, ALL_BE), str), start
    arp_like = MAC_DST + MAC_SRC + b"\x08\x06" + bytes(28)
    assert isinstance(from_tap(VirtioNetHdr(NEEDS_CSUM, 0, 0, 0, 14, 16), arp_like, ALL_BE), str)
    frag = build(frag=0x2000, payload=bytes(8))
    assert isinstance(from_tap(needs_csum_hdr(frag), frag.frame, ALL_BE), str)


def test_from_tap_frame_too_long_for_the_ring_without_gso() -> None:
    big = MAC_DST + MAC_SRC + b"\x08\x06" + bytes(MAX_RING_FRAME - 13)
    assert isinstance(from_tap(VirtioNetHdr(), big, ALL_BE), str)
    assert from_tap(VirtioNetHdr(), big[:-1], ALL_BE) == [TxFrame(big[:-1])]


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("ecn", [False, True])
def test_from_tap_tso_to_a_backend_with_gso(v6: bool, ecn: bool) -> None:
    b = build(v6=v6, payload=bytes(30000), tcp_opts=TCP_OPTS)
    want = GsoInfo(1388, XEN_NETIF_GSO_TYPE_TCPV6 if v6 else XEN_NETIF_GSO_TYPE_TCPV4)
    assert from_tap(tso_hdr(b, 1388, ecn), b.frame, ALL_BE) == [TxFrame(b.frame, True, True, want)]


@pytest.mark.parametrize("be", [BackendOffloads(), BackendOffloads(sg=False, gso_tcpv4=True),
                                BackendOffloads(sg=True, gso_tcpv4=False, gso_tcpv6=True, ipv6_csum=True)])
def test_from_tap_tso4_to_a_backend_without_gso(be: BackendOffloads) -> None:
    b = build(payload=bytes((i * 3) & 0xFF for i in range(5000)), flags=ACK | PSH | CWR, vlan=2)
    out = from_tap(tso_hdr(b, 1448), b.frame, be)
    assert len(out) == 4
    assert all(x.csum_blank and x.data_validated and x.gso is None for x in out)
    check_segments(b, [x.data for x in out], 1448, partial=True)


@pytest.mark.parametrize("be", [BackendOffloads(), BackendOffloads(sg=True, gso_tcpv6=True, ipv6_csum=False),
                                BackendOffloads(sg=False, gso_tcpv6=True, ipv6_csum=True)])
def test_from_tap_tso6_to_a_backend_without_gso6(be: BackendOffloads) -> None:
    b = build(v6=True, ext=(HOP,), payload=bytes((i * 5) & 0xFF for i in range(4000)))
    out = from_tap(tso_hdr(b, 1000), b.frame, be)
    partial = be.ipv6_csum
    assert all(x.csum_blank == partial and x.data_validated == partial and x.gso is None for x in out)
    check_segments(b, [x.data for x in out], 1000, partial=partial)


@pytest.mark.parametrize("v6", [False, True])
def test_from_tap_tso_longer_than_the_ring_is_segmented(v6: bool) -> None:
    b = build(v6=v6, payload=bytes(MAX_RING_FRAME))
    out = from_tap(tso_hdr(b, 9000), b.frame, ALL_BE)
    assert all(x.gso is None and x.csum_blank for x in out)
    check_segments(b, [x.data for x in out], 9000, partial=True)


def test_from_tap_gso_refusals() -> None:
    udp = build(proto=UDP, payload=bytes(5000))
    assert isinstance(from_tap(VirtioNetHdr(NEEDS_CSUM, VirtioGso.UDP, udp.hlen, 1400, udp.l4, 6), udp.frame,
                               ALL_BE), str)
    tcp4, tcp6 = build(payload=bytes(5000)), build(v6=True, payload=bytes(5000))
    assert isinstance(from_tap(tso_hdr(tcp4, 0), tcp4.frame, ALL_BE), str)
    assert isinstance(from_tap(tso_hdr(tcp4, 1400)._replace(gso_type=VirtioGso.TCPV6), tcp4.frame, ALL_BE), str)
    assert isinstance(from_tap(tso_hdr(tcp6, 1400)._replace(gso_type=VirtioGso.TCPV4), tcp6.frame, ALL_BE), str)
    assert isinstance(from_tap(VirtioNetHdr(NEEDS_CSUM, VirtioGso.TCPV4, udp.hlen, 1400, udp.l4, 16), udp.frame,
                               ALL_BE), str)
    assert isinstance(from_tap(tso_hdr(tcp4, 1400)._replace(gso_type=7), tcp4.frame, ALL_BE), str)
    assert isinstance(from_tap(tso_hdr(tcp4, 1400), tcp4.frame[:40], ALL_BE), str)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("validated", [False, True])
def test_to_tap_csum_blank(name: str, validated: bool) -> None:
    b = build(payload=bytes(77), **LAYOUTS[name])
    out = to_tap(b.frame, True, validated, None)
    assert out == (VirtioNetHdr(NEEDS_CSUM, 0, 0, 0, b.l4, 16 if b.proto == TCP else 6), b.frame)


def test_to_tap_without_csum_blank() -> None:
    b = build(payload=bytes(77), csum="full")
    arp_like = MAC_DST + MAC_SRC + b"\x08\x06" + bytes(28)
    for frame in (b.frame, arp_like):
        assert to_tap(frame, False, True, None) == (VirtioNetHdr(DATA_VALID), frame)
        assert to_tap(frame, False, False, None) == (VirtioNetHdr(), frame)


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("vlan", [None, 3])
def test_to_tap_gso(v6: bool, vlan: int | None) -> None:
    b = build(v6=v6, vlan=vlan, tcp_opts=TCP_OPTS, ext=(HOP, DSTOPTS) if v6 else (), payload=bytes(20000))
    gso = GsoInfo(1234, XEN_NETIF_GSO_TYPE_TCPV6 if v6 else XEN_NETIF_GSO_TYPE_TCPV4)
    hdr, frame = to_tap(b.frame, True, True, gso)
    assert frame == b.frame
    assert hdr == VirtioNetHdr(NEEDS_CSUM, VirtioGso.TCPV6 if v6 else VirtioGso.TCPV4, b.hlen, 1234, b.l4, 16)
    assert hdr.pack() == struct.pack("<BBHHHH", 1, 4 if v6 else 1, b.hlen, 1234, b.l4, 16)


@pytest.mark.parametrize("v6", [False, True])
def test_to_tap_gso_without_csum_blank_gets_the_pseudo_header_sum(v6: bool) -> None:
    b = build(v6=v6, payload=bytes(range(256)) * 30, csum=0x1357)
    gso = GsoInfo(1400, XEN_NETIF_GSO_TYPE_TCPV6 if v6 else XEN_NETIF_GSO_TYPE_TCPV4)
    hdr, frame = to_tap(b.frame, False, False, gso)
    assert hdr.needs_csum and hdr.gso_size == 1400 and hdr.csum_start == b.l4
    assert without_field(frame, b) == without_field(b.frame, b)
    assert field_of(frame, b) == pseudo_sum_of(b.frame, v6, b.l3, b.l4, TCP)
    assert frame == build(v6=v6, payload=bytes(range(256)) * 30).frame


def test_to_tap_refusals() -> None:
    arp_like = MAC_DST + MAC_SRC + b"\x08\x06" + bytes(28)
    assert to_tap(arp_like, True, True, None) is None
    assert to_tap(build(frag=0x2000, payload=bytes(8)).frame, True, False, None) is None
    g4, g6 = GsoInfo(1400, XEN_NETIF_GSO_TYPE_TCPV4), GsoInfo(1400, XEN_NETIF_GSO_TYPE_TCPV6)
    assert to_tap(arp_like, True, True, g4) is None
    assert to_tap(arp_like, False, False, g4) is None
    tcp4, tcp6, udp = build(payload=bytes(3000)), build(v6=True, payload=bytes(3000)), build(proto=UDP)
    assert to_tap(tcp4.frame, True, True, g6) is None
    assert to_tap(tcp6.frame, True, True, g4) is None
    assert to_tap(udp.frame, True, True, g4) is None
    assert to_tap(tcp4.frame, True, True, GsoInfo(0, XEN_NETIF_GSO_TYPE_TCPV4)) is None
    assert to_tap(tcp4.frame, True, True, GsoInfo(1400, 0)) is None


# ---- round trip: guest TAP -> netfront -> netback -> another frontend -------------------------------

@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("rx_csum", [False, True])
def test_round_trip_tso_to_a_receiver_without_gso(v6: bool, rx_csum: bool) -> None:
    payload = bytes((i * 11 + 3) & 0xFF for i in range(40000))
    b = build(v6=v6, payload=payload, tcp_opts=TCP_OPTS, flags=ACK | PSH, seq=0xFFFF0000)
    sent = from_tap(tso_hdr(b, 1420), b.frame, ALL_BE)
    assert len(sent) == 1 and sent[0].gso is not None
    tx = sent[0]
    pkt = tx_packet(tx.data, gso=tx.gso, csum_blank=tx.csum_blank, data_validated=False)
    frame = from_tx(pkt, tx.data)
    assert isinstance(frame, Frame)
    caps = RxCaps.negotiated(sg=True, gso_tcpv4=False, gso_tcpv6=False, no_csum_offload=not rx_csum,
                             ipv6_csum_offload=rx_csum, mtu=1500)
    out = fit(frame, caps)
    assert isinstance(out, list) and len(out) == -(-len(payload) // 1420)
    assert b"".join(x.data[b.hlen:] for x in out) == payload
    assert all(len(x.data) <= 1514 for x in out)
    check_segments(b, [x.data for x in out], 1420, partial=rx_csum)
    # the receiving netfront hands each segment to its TAP
    for x in out:
        got = to_tap(x.data, x.checksum == Checksum.PARTIAL, False, None)
        assert got is not None
        hdr, data = got
        assert data == x.data and hdr.needs_csum == rx_csum
        if rx_csum:
            assert (hdr.csum_start, hdr.csum_offset) == (b.l4, 16)
            assert l4_checksum_ok(finish_checksum(data, parse_headers(data)), v6, b.l3, b.l4, TCP)


def test_round_trip_gso_receiver_gets_the_super_frame_back_on_its_tap() -> None:
    b = build(payload=bytes(range(256)) * 40, flags=ACK | PSH)
    [tx] = from_tap(tso_hdr(b, 1448), b.frame, ALL_BE)
    frame = from_tx(tx_packet(tx.data, gso=tx.gso, csum_blank=True, data_validated=True), tx.data)
    caps = RxCaps.negotiated(sg=True, gso_tcpv4=True, gso_tcpv6=True, no_csum_offload=False,
                             ipv6_csum_offload=True, mtu=1500)
    [rx] = fit(frame, caps)
    hdr, data = to_tap(rx.data, rx.checksum == Checksum.PARTIAL, False, rx.gso)
    assert data == b.frame
    assert hdr == tso_hdr(b, 1448)
