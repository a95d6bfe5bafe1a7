"""parse_headers (domains/packet.py): where a frame's L3 and L4 headers are, or None.

Offsets are compared with the ones tests/reference_frames.py built the frames
with; truncated, fragmented, mangled and arbitrary frames give None, never
an exception.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_frames import DSTOPTS, FRAGMENT, HOP, IP_OPTS, LAYOUTS, ROUTING, TCP, TCP_OPTS, UDP, VALID_FRAMES, build

from xdom.domains.packet import L4Headers, parse_headers

# ---- parse_headers ----------------------------------------------------------------------------------

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


@st.composite
def mangled_frames(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.sampled_from(VALID_FRAMES)))
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
