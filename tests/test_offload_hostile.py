"""Hostile inputs to the offload glue: it returns a frame list, a reason or None, and never raises.

from_tap, to_tap, from_tx and fit get mangled, truncated and oversized
frames (tests/reference_frames.py builds the valid ones they start from),
and the 64 KiB limits of the IP length field and the ring's size field.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_frames import (
    ALL_BE,
    DST4,
    LAYOUTS,
    SRC4,
    TCP,
    VALID_FRAMES,
    build,
    check_segments,
    field_of,
    textbook_sum,
    tso_hdr,
    tx_packet,
)

from xdom.backends.netback.offload import MAX_RING_FRAME, Frame, RxCaps, fit, from_tx
from xdom.backends.netback.tx import Checksum
from xdom.domains.abi.netif import XEN_NETIF_GSO_TYPE_TCPV4, GsoInfo
from xdom.domains.packet import VirtioNetHdr, parse_headers, segment_tcp
from xdom.domains.vnet import BackendOffloads, from_tap, to_tap

# ---- hostile inputs: the glue returns a frame list, a reason or None, and never raises -------------

_BIG_FRAMES = [build(payload=bytes(65792 - 54)).frame, build(v6=True, payload=bytes(65792 - 74)).frame,
               build(payload=bytes(70000)).frame, build(v6=True, payload=bytes(1 << 17)).frame]
_FUZZ_FRAMES = VALID_FRAMES + [build(payload=bytes(3000), **kw).frame for kw in LAYOUTS.values()]


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
