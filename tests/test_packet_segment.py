"""segment_tcp (domains/packet.py): software TSO with everything Linux's tcp_gso_segment promises.

Each segment's headers, sequence numbers, flags and checksums are checked by
tests/reference_frames.py's check_segments.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_frames import (
    ACK,
    CWR,
    DSTOPTS,
    ECE,
    FIN,
    HOP,
    IP_OPTS,
    PSH,
    ROUTING,
    TCP_OPTS,
    UDP,
    URG,
    Built,
    build,
    check_segments,
)

from xdom.domains.packet import parse_headers, segment_tcp

# ---- segment_tcp ------------------------------------------------------------------------------------

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
