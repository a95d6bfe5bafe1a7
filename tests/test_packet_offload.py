"""Network offloads, sans-IO: header parsing, checksums, software TSO, and the netback/netfront glue.

Frames are built here by hand with ``struct`` and every checksum is verified
with a textbook 16-bit one's-complement loop (:func:`textbook_sum`), never
with the module's own ``ones_sum``: a bug shared by producer and checker
cannot hide.  Layout offsets come from the builder, not from
``parse_headers``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdom.backends.netback.offload import MAX_RING_FRAME, Frame, RxCaps, fit, from_tx
from xdom.backends.netback.tx import Checksum, TxPacket
from xdom.domains.abi.netif import XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6, GsoInfo
from xdom.domains.packet import (
    VIRTIO_NET_HDR_SIZE,
    L4Headers,
    VirtioGso,
    VirtioNetHdr,
    checksum_setup,
    finish_checksum,
    ones_sum,
    parse_headers,
    segment_tcp,
)
from xdom.domains.vnet import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    BackendOffloads,
    TxFrame,
    from_tap,
    to_tap,
)

TCP, UDP = 6, 17
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
NEEDS_CSUM, DATA_VALID = 1, 2

SRC4, DST4 = bytes([10, 1, 2, 3]), bytes([192, 168, 254, 77])
SRC6 = bytes.fromhex("fd00000000000000a1b2c3d4e5f60718")
DST6 = bytes.fromhex("2001db80ffff0000fedcba9876543210")
MAC_DST, MAC_SRC = bytes.fromhex("02aabbccdd01"), bytes.fromhex("02aabbccdd02")
HOP, ROUTING, DSTOPTS, FRAGMENT = 0, 43, 60, 44


# ---- an independent reference: textbook checksum and hand-built frames ----------------------------

def textbook_sum(data: bytes) -> int:
    """RFC 1071: add 16-bit big-endian words with end-around carry; odd tail padded with a zero byte."""
    s = 0
    for i in range(0, len(data) - 1, 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    if len(data) % 2:
        s += data[-1] << 8
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo_header(v6: bool, src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if v6:
        return src + dst + struct.pack("!I3xB", length, proto)
    return src + dst + struct.pack("!xBH", proto, length)


@dataclass(frozen=True)
class Built:
    """A hand-built frame and where its parts are (known by construction, not by parsing)."""
    frame: bytes
    v6: bool
    proto: int
    l3: int
    l4: int
    l4_len: int
    vlan: bool

    @property
    def hlen(self) -> int:
        return self.l4 + self.l4_len

    @property
    def payload(self) -> bytes:
        return self.frame[self.hlen:]

    @property
    def field(self) -> int:
        """Where the L4 checksum is."""
        return self.l4 + (16 if self.proto == TCP else 6)

    def expected(self) -> L4Headers:
        return L4Headers(self.l3, self.v6, self.l4, self.proto, self.l4_len)


def build(*, v6: bool = False, proto: int = TCP, payload: bytes = b"", vlan: int | None = None,
          tpid: int = 0x8100, ip_opts: bytes = b"", tcp_opts: bytes = b"", ext: tuple[int, ...] = (),
          seq: int = 1_000_000, ack: int = 77, flags: int = ACK, ip_id: int = 0x1234, frag: int = 0x4000,
          csum: str | int = "partial", doff: int | None = None, ihl: int | None = None) -> Built:
    """An Ethernet frame carrying TCP or UDP over IPv4/IPv6.

    ``csum``: "partial" puts the folded pseudo-header sum in the L4 checksum
    field (Linux's CHECKSUM_PARTIAL), "full" a complete checksum, an int
    that value.
    """
    assert len(ip_opts) % 4 == 0 and len(tcp_opts) % 4 == 0
    eth = MAC_DST + MAC_SRC
    if vlan is not None:
        eth += struct.pack("!HH", tpid, vlan)
    eth += struct.pack("!H", 0x86DD if v6 else 0x0800)
    l3 = len(eth)
    if proto == TCP:
        l4_len = 20 + len(tcp_opts)
        l4_hdr = struct.pack("!HHIIBBHHH", 40000, 443, seq, ack, (doff if doff is not None else l4_len // 4) << 4,
                             flags, 65000, 0, 0) + tcp_opts
    else:
        l4_len = 8
        l4_hdr = struct.pack("!HHHH", 5353, 53, min(8 + len(payload), 0xFFFF), 0)
    l4_seg = bytearray(l4_hdr + payload)
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    # past 64 KiB (a GSO super-frame) the 16-bit length fields saturate; segmentation rewrites them
    pseudo = pseudo_header(v6, src, dst, proto, len(l4_seg) if v6 else min(len(l4_seg), 0xFFFF))
    pos = 16 if proto == TCP else 6
    if csum == "partial":
        value = textbook_sum(pseudo)
    elif csum == "full":
        value = ~textbook_sum(pseudo + bytes(l4_seg)) & 0xFFFF
        if proto == UDP and value == 0:
            value = 0xFFFF
    else:
        value = csum
    l4_seg[pos:pos + 2] = struct.pack("!H", value)
    if v6:
        exts = b""
        chain = list(ext) + [proto]
        for i, _kind in enumerate(ext):
            units = i % 3                       # 8, 16 or 24 bytes
            exts += bytes([chain[i + 1], units]) + bytes(range(i, i + 6 + units * 8))
        ip = struct.pack("!IHBB16s16s", (6 << 28) | (0x2E << 20) | 0xBEEF, min(len(exts) + len(l4_seg), 0xFFFF),
                         chain[0], 64, src, dst) + exts
    else:
        hl = ihl if ihl is not None else (20 + len(ip_opts)) // 4
        hdr = bytearray(struct.pack("!BBHHHBBH4s4s", (4 << 4) | hl, 0, min(20 + len(ip_opts) + len(l4_seg), 0xFFFF), ip_id,
                                    frag, 64, proto, 0, src, dst) + ip_opts)
        hdr[10:12] = struct.pack("!H", ~textbook_sum(bytes(hdr)) & 0xFFFF)
        ip = bytes(hdr)
    frame = eth + ip + bytes(l4_seg)
    return Built(frame, v6, proto, l3, l3 + len(ip), l4_len, vlan is not None)


def l4_checksum_ok(frame: bytes, v6: bool, l3: int, l4: int, proto: int) -> bool:
    """The complete L4 checksum of ``frame`` verifies (pseudo-header length: everything from ``l4``)."""
    src, dst = (frame[l3 + 8:l3 + 24], frame[l3 + 24:l3 + 40]) if v6 else (frame[l3 + 12:l3 + 16],
                                                                          frame[l3 + 16:l3 + 20])
    return textbook_sum(pseudo_header(v6, src, dst, proto, len(frame) - l4) + frame[l4:]) == 0xFFFF


def pseudo_sum_of(frame: bytes, v6: bool, l3: int, l4: int, proto: int) -> int:
    src, dst = (frame[l3 + 8:l3 + 24], frame[l3 + 24:l3 + 40]) if v6 else (frame[l3 + 12:l3 + 16],
                                                                          frame[l3 + 16:l3 + 20])
    return textbook_sum(pseudo_header(v6, src, dst, proto, len(frame) - l4))


def field_of(frame: bytes, b: Built) -> int:
    return struct.unpack_from("!H", frame, b.field)[0]


def without_field(frame: bytes, b: Built) -> bytes:
    return frame[:b.field] + frame[b.field + 2:]


def check_segments(b: Built, segs: list[bytes], mss: int, *, partial: bool) -> None:
    """Everything Linux's tcp_gso_segment promises about the segments of ``b``."""
    payload = b.payload
    count = max(1, -(-len(payload) // mss))
    assert len(segs) == count
    orig = b.frame
    l3, l4, hlen = b.l3, b.l4, b.hlen
    seq0 = struct.unpack_from("!I", orig, l4 + 4)[0]
    flags0 = orig[l4 + 13]
    id0 = struct.unpack_from("!H", orig, l3 + 4)[0]
    for i, seg in enumerate(segs):
        chunk = seg[hlen:]
        assert chunk == payload[i * mss:(i + 1) * mss]
        assert len(chunk) == mss or i == count - 1
        # Untouched header bytes: Ethernet (and VLAN), addresses, ports, ack, window, urgent pointer, options.
        assert seg[:l3] == orig[:l3]
        if b.v6:
            assert seg[l3:l3 + 4] == orig[l3:l3 + 4] and seg[l3 + 6:l4] == orig[l3 + 6:l4]
            assert struct.unpack_from("!H", seg, l3 + 4)[0] == len(seg) - l3 - 40
        else:
            assert seg[l3:l3 + 2] == orig[l3:l3 + 2] and seg[l3 + 6:l3 + 10] == orig[l3 + 6:l3 + 10]
            assert seg[l3 + 12:l4] == orig[l3 + 12:l4]
            assert struct.unpack_from("!H", seg, l3 + 2)[0] == len(seg) - l3
            assert struct.unpack_from("!H", seg, l3 + 4)[0] == (id0 + i) & 0xFFFF
            assert textbook_sum(seg[l3:l4]) == 0xFFFF
        assert seg[l4:l4 + 4] == orig[l4:l4 + 4]
        assert struct.unpack_from("!I", seg, l4 + 4)[0] == (seq0 + i * mss) & 0xFFFFFFFF
        assert seg[l4 + 8:l4 + 13] == orig[l4 + 8:l4 + 13]
        want = flags0
        if i != count - 1:
            want &= ~(FIN | PSH)
        if i != 0:
            want &= ~CWR
        assert seg[l4 + 13] == want
        assert seg[l4 + 14:l4 + 16] == orig[l4 + 14:l4 + 16]
        assert seg[l4 + 18:hlen] == orig[l4 + 18:hlen]
        if partial:
            assert field_of(seg, b) == pseudo_sum_of(seg, b.v6, l3, l4, TCP)
        else:
            assert l4_checksum_ok(seg, b.v6, l3, l4, TCP)
    assert b"".join(s[hlen:] for s in segs) == payload


def tx_packet(data: bytes, *, gso: GsoInfo | None = None, csum_blank: bool = False, data_validated: bool = False,
              csum_fixup: bool = False) -> TxPacket:
    return TxPacket(pieces=(), length=len(data), gso=gso, csum_blank=csum_blank, data_validated=data_validated,
                    csum_fixup=csum_fixup, hash=None, responses=())


TCP_OPTS = bytes([2, 4, 0x05, 0xB4, 1, 1, 8, 10]) + bytes(range(1, 9)) + bytes([1, 1, 4, 2])   # MSS, TS, SACKOK
IP_OPTS = bytes([0x94, 4, 0, 0, 1, 1, 1, 0])                                                   # router alert, NOPs

LAYOUTS = {
    "v4-tcp": dict(),
    "v4-udp": dict(proto=UDP),
    "v4-vlan-tcp": dict(vlan=0x0123),
    "v4-qinq-outer-udp": dict(vlan=7, tpid=0x88A8, proto=UDP),
    "v4-ipopts-tcpopts": dict(ip_opts=IP_OPTS, tcp_opts=TCP_OPTS),
    "v6-tcp": dict(v6=True),
    "v6-udp": dict(v6=True, proto=UDP),
    "v6-vlan-tcpopts": dict(v6=True, vlan=0x0FFF, tcp_opts=TCP_OPTS),
    "v6-ext-tcp": dict(v6=True, ext=(HOP, ROUTING, DSTOPTS)),
    "v6-ext-vlan-udp": dict(v6=True, ext=(HOP, DSTOPTS), vlan=5, proto=UDP),
}


# ---- 1. ones_sum ------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_ones_sum_matches_textbook(data: bytes) -> None:
    assert ones_sum(data) == textbook_sum(data)
    assert ones_sum(memoryview(data)) == textbook_sum(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 0xFFFF), max_size=80), st.booleans())
def test_ones_sum_wrapping_to_ffff(words: list[int], odd_tail: bool) -> None:
    """Nonzero data whose sum is 0 mod 0xFFFF gives 0xFFFF (never 0), as a running adder would."""
    partial = textbook_sum(struct.pack(f"!{len(words)}H", *words))
    last = 0xFFFF - partial if partial else 0xFFFF
    words = words + [last]
    data = struct.pack(f"!{len(words)}H", *words)
    if odd_tail:
        data += b"\0"                  # a zero pad byte changes nothing
    assert textbook_sum(data) == 0xFFFF
    assert ones_sum(data) == 0xFFFF


@pytest.mark.parametrize("n", [0, 1, 2, 3, 64, 1501])
def test_ones_sum_of_zeros_is_zero(n: int) -> None:
    assert ones_sum(bytes(n)) == 0 == textbook_sum(bytes(n))


@pytest.mark.parametrize("data, want", [
    (b"\x01", 0x0100), (b"\x00\x01\x02", 0x0201), (b"\xff\xff", 0xFFFF), (b"\xff\xff" * 7, 0xFFFF),
    (b"\x80\x00\x80\x00", 0x0001), (b"\x00\x01\xff\xfe", 0xFFFF), (b"\xff", 0xFF00),
])
def test_ones_sum_known_values(data: bytes, want: int) -> None:
    assert textbook_sum(data) == want
    assert ones_sum(data) == want


# ---- 2. parse_headers -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_parse_headers_offsets(name: str) -> None:
    for payload in (b"", b"x", bytes(range(256)) * 3):
        b = build(payload=payload, **LAYOUTS[name])
        h = parse_headers(b.frame)
        assert h == b.expected()
        assert h.csum_offset == (16 if b.proto == TCP else 6)
        assert h.header_len == b.hlen
        assert parse_headers(memoryview(b.frame)) == h
        assert parse_headers(bytearray(b.frame)) == h


def test_parse_headers_offsets_spelled_out() -> None:
    """A few layouts with the numbers written down, not derived."""
    assert parse_headers(build().frame) == L4Headers(14, False, 34, TCP, 20)
    assert parse_headers(build(vlan=1, proto=UDP).frame) == L4Headers(18, False, 38, UDP, 8)
    assert parse_headers(build(ip_opts=IP_OPTS, tcp_opts=TCP_OPTS).frame) == L4Headers(14, False, 42, TCP, 40)
    assert parse_headers(build(v6=True).frame) == L4Headers(14, True, 54, TCP, 20)
    # hop-by-hop 8 bytes, routing 16, dest-options 24
    assert parse_headers(build(v6=True, ext=(HOP, ROUTING, DSTOPTS)).frame) == L4Headers(14, True, 102, TCP, 20)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_parse_headers_truncated_at_every_cut(name: str) -> None:
    b = build(**LAYOUTS[name])
    assert len(b.frame) == b.hlen
    for cut in range(len(b.frame)):
        assert parse_headers(b.frame[:cut]) is None, cut


@pytest.mark.parametrize("frag", [0x2000, 0x0001, 0x1FFF, 0x2001, 0x6000 | 5, 0x0100])
def test_parse_headers_ipv4_fragments(frag: int) -> None:
    assert parse_headers(build(frag=frag, payload=b"abcd").frame) is None
    assert parse_headers(build(frag=frag, proto=UDP).frame) is None


@pytest.mark.parametrize("frag", [0, 0x4000, 0x8000])
def test_parse_headers_ipv4_dont_fragment_or_reserved_is_not_a_fragment(frag: int) -> None:
    assert parse_headers(build(frag=frag).frame) is not None


@pytest.mark.parametrize("ihl", [0, 1, 2, 3, 4, 6, 15])
def test_parse_headers_bad_ihl(ihl: int) -> None:
    # ihl < 5 is malformed; 6 and 15 claim options the frame does not carry before TCP (which is too short then)
    b = build(ihl=ihl)
    assert parse_headers(b.frame) is None


def test_parse_headers_ihl_longer_than_the_frame() -> None:
    b = build(ihl=15)                          # 60-byte IP header claimed; 20 + 20 present
    assert parse_headers(b.frame[:14 + 40]) is None


def test_parse_headers_ipv4_wrong_version_and_short_total_length() -> None:
    frame = bytearray(build().frame)
    frame[14] = (6 << 4) | 5
    assert parse_headers(bytes(frame)) is None
    frame = bytearray(build().frame)
    frame[16:18] = b"\x00\x10"                # tot_len 16 < ihl 20
    assert parse_headers(bytes(frame)) is None
    frame = bytearray(build(v6=True).frame)
    frame[14] = 0x45
    assert parse_headers(bytes(frame)) is None


@pytest.mark.parametrize("doff", [0, 1, 2, 3, 4])
def test_parse_headers_tcp_doff_below_five(doff: int) -> None:
    assert parse_headers(build(doff=doff, payload=bytes(64)).frame) is None
    assert parse_headers(build(doff=doff, v6=True, payload=bytes(64)).frame) is None


def test_parse_headers_tcp_doff_past_the_frame() -> None:
    b = build(tcp_opts=TCP_OPTS)
    assert parse_headers(b.frame) is not None
    assert parse_headers(b.frame[:-1]) is None
    assert parse_headers(build(doff=15, payload=bytes(39)).frame) is None
    assert parse_headers(build(doff=15, payload=bytes(40)).frame) == L4Headers(14, False, 34, TCP, 60)


@pytest.mark.parametrize("ethertype", [0x0806, 0x88CC, 0x8847, 0x0000, 0xFFFF, 0x0801, 0x86DE])
def test_parse_headers_non_ip_ethertypes(ethertype: int) -> None:
    frame = bytearray(build(payload=bytes(100)).frame)
    frame[12:14] = struct.pack("!H", ethertype)
    assert parse_headers(bytes(frame)) is None
    frame = bytearray(build(vlan=3, payload=bytes(100)).frame)
    frame[16:18] = struct.pack("!H", ethertype)
    assert parse_headers(bytes(frame)) is None


def test_parse_headers_two_vlan_tags_are_not_parsed() -> None:
    inner = build(vlan=3, payload=bytes(40)).frame
    frame = inner[:12] + struct.pack("!HH", 0x88A8, 9) + inner[12:]
    assert parse_headers(frame) is None


@pytest.mark.parametrize("l4proto", [1, 58, 132, 0x3B, 255])
def test_parse_headers_other_l4_protocols(l4proto: int) -> None:
    frame = bytearray(build(payload=bytes(40)).frame)
    frame[14 + 9] = l4proto
    assert parse_headers(bytes(frame)) is None
    frame = bytearray(build(v6=True, payload=bytes(40)).frame)
    frame[14 + 6] = l4proto
    assert parse_headers(bytes(frame)) is None


@pytest.mark.parametrize("ext", [(FRAGMENT,), (HOP, FRAGMENT), (HOP, ROUTING, FRAGMENT)])
def test_parse_headers_ipv6_fragment_header(ext: tuple[int, ...]) -> None:
    # any fragment header, first fragment or not, means no checksum offload
    b = build(v6=True, ext=ext, payload=bytes(64))
    assert parse_headers(b.frame) is None


def test_parse_headers_ipv6_extension_chain_bound() -> None:
    within = build(v6=True, ext=(HOP,) + (DSTOPTS, ROUTING) * 3 + (DSTOPTS,))       # 8 headers
    assert parse_headers(within.frame) == within.expected()
    for n in (9, 10, 40):
        long_chain = build(v6=True, ext=(DSTOPTS,) * n, payload=bytes(16))
        assert parse_headers(long_chain.frame) is None, n


def test_parse_headers_ipv6_extension_running_past_the_frame() -> None:
    b = build(v6=True, ext=(HOP, DSTOPTS))
    frame = bytearray(b.frame)
    frame[54 + 1] = 200                      # hop-by-hop claims (200 + 1) * 8 bytes
    assert parse_headers(bytes(frame)) is None


_VALID_FRAMES = [build(payload=b"0123456789", **kw).frame for kw in LAYOUTS.values()]


@st.composite
def mangled_frames(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.sampled_from(_VALID_FRAMES)))
    for _ in range(draw(st.integers(0, 4))):
        frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
    return bytes(frame[:draw(st.integers(0, len(frame)))]) + draw(st.binary(max_size=8))


def _check_parse_result(frame: bytes) -> None:
    h = parse_headers(frame)
    if h is None:
        return
    assert h.l3_offset in (14, 18)
    assert h.proto in (TCP, UDP)
    assert h.l4_len == 8 if h.proto == UDP else 20 <= h.l4_len <= 60 and h.l4_len % 4 == 0
    assert h.l3_offset + (40 if h.ipv6 else 20) <= h.l4_offset
    assert h.l4_offset + h.l4_len <= len(frame)
    assert (frame[h.l3_offset] >> 4) == (6 if h.ipv6 else 4)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=160))
def test_parse_headers_never_raises_on_arbitrary_bytes(frame: bytes) -> None:
    _check_parse_result(frame)


@settings(max_examples=400, deadline=None)
@given(mangled_frames())
def test_parse_headers_never_raises_on_mangled_frames(frame: bytes) -> None:
    _check_parse_result(frame)
    _check_parse_result(memoryview(frame))


# ---- 3. finish_checksum -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("size", [0, 1, 2, 7, 1000, 1459])
def test_finish_checksum_verifies(name: str, size: int) -> None:
    b = build(payload=bytes((i * 37 + 11) & 0xFF for i in range(size)), **LAYOUTS[name])
    out = finish_checksum(b.frame, parse_headers(b.frame))
    assert len(out) == len(b.frame)
    assert without_field(out, b) == without_field(b.frame, b)
    assert l4_checksum_ok(out, b.v6, b.l3, b.l4, b.proto)
    full = build(payload=b.payload, csum="full", **LAYOUTS[name])
    assert out == full.frame


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(LAYOUTS)), st.binary(max_size=1500))
def test_finish_checksum_verifies_random(name: str, payload: bytes) -> None:
    b = build(payload=payload, **LAYOUTS[name])
    out = finish_checksum(b.frame, parse_headers(b.frame))
    assert without_field(out, b) == without_field(b.frame, b)
    assert l4_checksum_ok(out, b.v6, b.l3, b.l4, b.proto)


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("vlan", [None, 9])
def test_finish_checksum_udp_zero_becomes_ffff(v6: bool, vlan: int | None) -> None:
    # Choose the last payload word so that the one's-complement sum is 0xFFFF: the checksum computes to 0.
    base = build(v6=v6, vlan=vlan, proto=UDP, payload=bytes(range(30)) + b"\0\0", csum=0)
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    s = textbook_sum(pseudo_header(v6, src, dst, UDP, len(base.frame) - base.l4) + base.frame[base.l4:])
    last = 0xFFFF - s if s != 0xFFFF else 0
    b = build(v6=v6, vlan=vlan, proto=UDP, payload=bytes(range(30)) + struct.pack("!H", last))
    assert (~textbook_sum(pseudo_header(v6, src, dst, UDP, len(b.frame) - b.l4) +
                          without_field(b.frame, b)[b.l4:]) & 0xFFFF) == 0
    out = finish_checksum(b.frame, parse_headers(b.frame))
    assert field_of(out, b) == 0xFFFF
    assert l4_checksum_ok(out, b.v6, b.l3, b.l4, UDP)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_checksum_setup(name: str) -> None:
    b = build(payload=bytes(range(100)), csum=0xBEEF, **LAYOUTS[name])
    assert checksum_setup(b.frame) == (b.frame, b.expected())
    frame, h = checksum_setup(b.frame, recompute_pseudo=True)
    assert h == b.expected()
    assert without_field(frame, b) == without_field(b.frame, b)
    assert field_of(frame, b) == pseudo_sum_of(b.frame, b.v6, b.l3, b.l4, b.proto)
    assert frame == build(payload=bytes(range(100)), **LAYOUTS[name]).frame
    assert checksum_setup(b.frame[:b.hlen - 1]) is None
    assert checksum_setup(b.frame[:b.hlen - 1], recompute_pseudo=True) is None


# ---- 4. segment_tcp ---------------------------------------------------------------------------------

@st.composite
def tso_cases(draw: st.DrawFn) -> tuple[Built, int]:
    mss = draw(st.one_of(st.integers(1, 16), st.integers(17, 1500)))
    if draw(st.booleans()):
        size = mss * draw(st.integers(1, min(40, max(1, 4000 // mss))))           # an exact multiple
    else:
        size = draw(st.integers(1, min(4000, mss * 40)))
    payload = draw(st.binary(min_size=size, max_size=size)) if draw(st.booleans()) else \
        bytes((i * 7 + size) & 0xFF for i in range(size))
    b = build(v6=draw(st.booleans()), vlan=draw(st.sampled_from([None, 100])),
              tcp_opts=draw(st.sampled_from([b"", TCP_OPTS, bytes([1, 1, 1, 0])])),
              ip_opts=draw(st.sampled_from([b"", IP_OPTS])),
              ext=draw(st.sampled_from([(), (HOP,), (HOP, ROUTING, DSTOPTS)])),
              seq=draw(st.one_of(st.integers(0, 0xFFFFFFFF), st.just(0xFFFFFFFF - 100))),
              ip_id=draw(st.one_of(st.integers(0, 0xFFFF), st.just(0xFFFE))),
              flags=draw(st.sampled_from([ACK, ACK | PSH, ACK | FIN | PSH | CWR, ACK | CWR | ECE, ACK | URG | FIN])),
              payload=payload)
    return b, mss


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tso_cases(), st.booleans())
def test_segment_tcp(case: tuple[Built, int], partial: bool) -> None:
    b, mss = case
    segs = segment_tcp(b.frame, mss, parse_headers(b.frame), partial=partial)
    check_segments(b, segs, mss, partial=partial)


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("size, mss", [(1, 1), (1, 1460), (1460, 1460), (2920, 1460), (2921, 1460),
                                       (4380, 1460), (10, 1), (1000, 999)])
def test_segment_tcp_sizes(v6: bool, partial: bool, size: int, mss: int) -> None:
    b = build(v6=v6, tcp_opts=TCP_OPTS, flags=ACK | PSH | FIN | CWR, payload=bytes(i & 0xFF for i in range(size)))
    segs = segment_tcp(b.frame, mss, parse_headers(b.frame), partial=partial)
    assert len(segs) == -(-size // mss)
    check_segments(b, segs, mss, partial=partial)
    # options are repeated verbatim in every segment
    for s in segs:
        assert s[b.l4 + 20:b.hlen] == TCP_OPTS


def test_segment_tcp_flags_spelled_out() -> None:
    b = build(flags=ACK | PSH | FIN | CWR | ECE, payload=bytes(30))
    segs = segment_tcp(b.frame, 10, parse_headers(b.frame), partial=True)
    assert [s[b.l4 + 13] for s in segs] == [ACK | CWR | ECE, ACK | ECE, ACK | PSH | FIN | ECE]


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("partial", [False, True])
def test_segment_tcp_without_payload(v6: bool, partial: bool) -> None:
    """A header-only GSO frame is one segment, its checksum in the state asked for (complete when not partial)."""
    b = build(v6=v6, flags=ACK | FIN)
    segs = segment_tcp(b.frame, 1000, parse_headers(b.frame), partial=partial)
    check_segments(b, segs, 1000, partial=partial)


@pytest.mark.parametrize("mss", [0, -1, -1460])
def test_segment_tcp_refuses_nonpositive_mss(mss: int) -> None:
    b = build(payload=bytes(100))
    assert segment_tcp(b.frame, mss, parse_headers(b.frame), partial=True) is None


@pytest.mark.parametrize("v6", [False, True])
def test_segment_tcp_refuses_udp(v6: bool) -> None:
    b = build(v6=v6, proto=UDP, payload=bytes(3000))
    assert segment_tcp(b.frame, 1000, parse_headers(b.frame), partial=False) is None


# ---- 5. fit -----------------------------------------------------------------------------------------

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


# ---- 6. from_tx -------------------------------------------------------------------------------------

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


# ---- 7. netfront: TAP <-> ring ----------------------------------------------------------------------

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


ALL_BE = BackendOffloads(sg=True, gso_tcpv4=True, gso_tcpv6=True, ipv6_csum=True)


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


def tso_hdr(b: Built, mss: int, ecn: bool = False) -> VirtioNetHdr:
    kind = (VirtioGso.TCPV6 if b.v6 else VirtioGso.TCPV4) | (VirtioGso.ECN if ecn else 0)
    return VirtioNetHdr(NEEDS_CSUM, kind, b.hlen, mss, b.l4, 16)


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


def test_assumptions_of_the_builder() -> None:
    """The reference builder itself: header checksum and complete checksums verify by construction."""
    for kw in LAYOUTS.values():
        b = build(payload=b"abc", csum="full", **kw)
        assert l4_checksum_ok(b.frame, b.v6, b.l3, b.l4, b.proto)
        if not b.v6:
            assert textbook_sum(b.frame[b.l3:b.l4]) == 0xFFFF


# ---- hostile inputs: the glue returns a frame list, a reason or None, and never raises -------------

_BIG_FRAMES = [build(payload=bytes(65792 - 54)).frame, build(v6=True, payload=bytes(65792 - 74)).frame,
               build(payload=bytes(70000)).frame, build(v6=True, payload=bytes(1 << 17)).frame]
_FUZZ_FRAMES = _VALID_FRAMES + [build(payload=bytes(3000), **kw).frame for kw in LAYOUTS.values()]


class Blob(bytes):
    """Frame bytes that a failing example reports by length and headers, not as 64 KiB of escapes."""

    def __repr__(self) -> str:
        return f"Blob({len(self)} bytes: {bytes(self[:80]).hex()}...)"

    def _repr_pretty_(self, p: object, cycle: bool) -> None:
        p.text(repr(self))


@st.composite
def hostile_frames(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return Blob(draw(st.sampled_from(_BIG_FRAMES)))
    frame = bytearray(draw(st.sampled_from(_FUZZ_FRAMES)))
    for _ in range(draw(st.integers(0, 3))):
        frame[draw(st.integers(0, min(len(frame), 120) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        frame = frame[:draw(st.integers(0, len(frame)))]
    return Blob(frame)


_u16 = st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 1, 14, 34, 54, 1400, 0xFFFF]))
_gso = st.one_of(st.none(), st.builds(GsoInfo, _u16, st.integers(0, 255)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_frames(), st.builds(VirtioNetHdr, st.integers(0, 255), st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84]),
                                   _u16, _u16, _u16, _u16),
       st.builds(BackendOffloads, st.booleans(), st.booleans(), st.booleans(), st.booleans()))
def test_from_tap_never_raises(frame: bytes, hdr: VirtioNetHdr, be: BackendOffloads) -> None:
    out = from_tap(hdr, frame, be)
    assert isinstance(out, (str, list))
    if isinstance(out, list):
        assert out and all(len(f.data) <= MAX_RING_FRAME for f in out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_frames(), st.booleans(), st.booleans(), _gso)
def test_to_tap_never_raises(frame: bytes, csum_blank: bool, validated: bool, gso: GsoInfo | None) -> None:
    out = to_tap(frame, csum_blank, validated, gso)
    assert out is None or (isinstance(out[0], VirtioNetHdr) and len(out[1]) == len(frame))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_frames(), _gso, st.booleans(), st.booleans(), st.booleans(),
       st.builds(RxCaps.negotiated, st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.booleans(),
                 st.sampled_from([68, 576, 1500, 9000, 65535])))
def test_from_tx_and_fit_never_raise(frame: bytes, gso: GsoInfo | None, blank: bool, validated: bool, fixup: bool,
                                     caps: RxCaps) -> None:
    frame = frame[:MAX_RING_FRAME]            # the ring's 16-bit size field bounds what a frontend sends
    blank_flag = blank or gso is not None   # as TxProcessor: GSO forces csum_blank (with the fix-up)
    pkt = tx_packet(frame, gso=gso, csum_blank=blank_flag, data_validated=validated and not blank_flag,
                    csum_fixup=fixup or (gso is not None and not blank))
    got = from_tx(pkt, frame)
    assert isinstance(got, (str, Frame))
    if isinstance(got, Frame):
        out = fit(got, caps)
        assert isinstance(out, (str, list))
    for state in Checksum:
        out = fit(Frame(frame, gso, state), caps)
        assert isinstance(out, (str, list))


@pytest.mark.parametrize("v6", [False, True])
def test_segment_tcp_refuses_segments_too_long_for_the_ip_length_field(v6: bool) -> None:
    l3_len = 40 + 20 if v6 else 20 + 20                 # IP (v6: its payload length excludes the fixed header)
    limit = 0xFFFF - (20 if v6 else l3_len)             # the largest MSS whose segments' length field holds
    b = build(v6=v6, payload=bytes((i * 7) & 0xFF for i in range(limit + 300)))
    h = parse_headers(b.frame)
    assert segment_tcp(b.frame, limit + 1, h, partial=True) is None
    assert segment_tcp(b.frame, 0xFFFF, h, partial=False) is None
    segs = segment_tcp(b.frame, limit, h, partial=False)
    check_segments(b, segs, limit, partial=False)
    assert struct.unpack_from("!H", segs[0], b.l3 + (4 if v6 else 2))[0] == 0xFFFF


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("vlan", [None, 1])
@pytest.mark.parametrize("mss", [0xFFFF, 65500, 65495, 65475])
def test_from_tap_huge_mss_from_the_tap(v6: bool, vlan: int | None, mss: int) -> None:
    """A TAP read holds up to 64 KiB + 256 bytes: its segments must still fit the ring, or the frame is refused."""
    b = build(v6=v6, vlan=vlan, payload=bytes(65792 - len(build(v6=v6, vlan=vlan).frame)))
    assert len(b.frame) == 65792
    out = from_tap(tso_hdr(b, mss), b.frame, ALL_BE)
    if isinstance(out, list):
        assert all(len(x.data) <= MAX_RING_FRAME for x in out)
        check_segments(b, [x.data for x in out], mss, partial=True)
    if b.hlen + mss <= MAX_RING_FRAME:
        assert isinstance(out, list)


def test_to_tap_gso_without_csum_blank_longer_than_64k() -> None:
    """A backend may chain more than 64 KiB of slots: the pseudo-header sum takes a 32-bit length, as Linux's."""
    b = build(payload=bytes(70000), csum=0)
    got = to_tap(b.frame, False, False, GsoInfo(1400, XEN_NETIF_GSO_TYPE_TCPV4))
    assert got is not None
    length = len(b.frame) - b.l4
    want = textbook_sum(SRC4 + DST4 + struct.pack("!HHH", TCP, length >> 16, length & 0xFFFF))
    assert field_of(got[1], b) == want
