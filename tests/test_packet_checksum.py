"""The Internet checksum in domains/packet.py: ones_sum, finish_checksum, checksum_setup.

Checked against the textbook loop and the hand-built frames of
tests/reference_frames.py (whose own assumptions are checked last).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_frames import (
    DST4,
    DST6,
    LAYOUTS,
    SRC4,
    SRC6,
    UDP,
    build,
    field_of,
    l4_checksum_ok,
    pseudo_header,
    pseudo_sum_of,
    textbook_sum,
    without_field,
)

from xdom.domains.packet import checksum_setup, finish_checksum, ones_sum, parse_headers

# ---- ones_sum ---------------------------------------------------------------------------------------

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

# ---- finish_checksum --------------------------------------------------------------------------------

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


# ---- the reference itself ---------------------------------------------------------------------------

def test_assumptions_of_the_builder() -> None:
    """The reference builder itself: header checksum and complete checksums verify by construction."""
    for kw in LAYOUTS.values():
        b = build(payload=b"abc", csum="full", **kw)
        assert l4_checksum_ok(b.frame, b.v6, b.l3, b.l4, b.proto)
        if not b.v6:
            assert textbook_sum(b.frame[b.l3:b.l4]) == 0xFFFF
