"""Our blkif.h transcription against Xen's real header, bit for bit.

The reference is the C compiler's view of /usr/include/xen/io/blkif.h and
ring.h (tests/blkif_c_peer.py, compiled with ``gcc -m64`` for our X86_64
layout and ``gcc -m32`` for X86_32): every BLKIF_/VDISK_ constant, the size
and offset of every field our code packs or parses, and the ring sizes.
The rings themselves, exchanged with C peers, are test_blkif_rings.py's.
"""

from __future__ import annotations

from typing import Any

import blkif_c_peer
import pytest
from blkif_c_peer import RING_PAGES, c_layout, header_constants, needs_headers

from xdom.domains.abi import blkif
from xdom.domains.abi.blkif import (
    BLKIF_DISCARD_SECURE,
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    SEGMENT,
    SEGMENTS_PER_INDIRECT_FRAME,
    BlkifABI,
    Request,
    Segment,
    pack_discard_request,
    pack_indirect_request,
    pack_request,
    pack_response,
    parse_request,
    parse_response,
)
from xdom.domains.abi.ring import (
    PAGE_SIZE,
    RING_HEADER_SIZE,
    FrontRing,
    SharedRing,
    ring_size,
)

# The C peer's fixtures (pytest finds them by name in this module).
abi_peer = blkif_c_peer.abi_peer
build_dir = blkif_c_peer.build_dir


# ---------------------------------------------------------------------------
# 1. constants and layouts
# ---------------------------------------------------------------------------

@needs_headers
def test_constants_match_header(abi_peer: tuple[BlkifABI, str]) -> None:
    _, exe = abi_peer
    xen = c_layout(exe)
    names = header_constants()
    # Sanity: the regex found what the brief names, so an empty list cannot pass.
    assert {"BLKIF_OP_READ", "BLKIF_OP_INDIRECT", "BLKIF_RSP_EOPNOTSUPP", "BLKIF_MAX_SEGMENTS_PER_REQUEST",
            "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST", "BLKIF_DISCARD_SECURE", "VDISK_READONLY"} <= set(names)
    missing = [n for n in names if not hasattr(blkif, n)]
    assert not missing, f"blkif.h defines constants blkif.py lacks: {missing}"
    assert {n: getattr(blkif, n) for n in names} == {n: xen[n] for n in names}
    assert xen["segs_per_indirect_frame"] == SEGMENTS_PER_INDIRECT_FRAME


def _put(buf: bytearray, off: int, width: int, value: int) -> None:
    buf[off:off + width] = value.to_bytes(width, "little", signed=value < 0)


def c_image(xen: dict[str, int], st_name: str, values: dict[str, Any], size: int) -> bytes:
    """``size`` zero bytes with each field stored where and as wide as the C compiler put it."""
    buf = bytearray(size)
    for name, value in values.items():
        off, width = xen[f"off:{st_name}:{name}"], xen[f"size:{st_name}:{name}"]
        if name == "seg":
            seg_size = xen["sizeof:blkif_request_segment"]
            for i, (gref, first, last) in enumerate(value):
                base = off + i * seg_size
                for sub, v in (("gref", gref), ("first_sect", first), ("last_sect", last)):
                    _put(buf, base + xen[f"off:blkif_request_segment:{sub}"],
                         xen[f"size:blkif_request_segment:{sub}"], v)
        elif name == "indirect_grefs":
            each = width // BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
            for i, v in enumerate(value):
                _put(buf, off + i * each, each, v)
        else:
            _put(buf, off, width, value)
    return bytes(buf)


@needs_headers
def test_struct_layouts_match_header(abi_peer: tuple[BlkifABI, str]) -> None:
    abi, exe = abi_peer
    xen = c_layout(exe)
    # Sizes our code relies on.
    assert abi.request_size == xen["sizeof:blkif_request"]
    assert abi.response_size == abi.response.size == xen["sizeof:blkif_response"]
    assert abi.discard.size == xen["sizeof:blkif_request_discard"]
    assert abi.segments_offset == xen["off:blkif_request:seg"]
    assert SEGMENT.size == xen["sizeof:blkif_request_segment"]
    assert xen["size:blkif_request:seg"] == BLKIF_MAX_SEGMENTS_PER_REQUEST * SEGMENT.size
    # blkif_request_indirect has trailing padding (8 bytes of explicit "pad" on i386, 4 of
    # alignment on x86_64) that our Struct leaves out; it must still cover every field and fit a slot.
    end_of_grefs = xen["off:blkif_request_indirect:indirect_grefs"] + xen["size:blkif_request_indirect:indirect_grefs"]
    assert abi.indirect.size == end_of_grefs <= xen["sizeof:blkif_request_indirect"] <= abi.request_size
    assert xen["sizeof:blkif_request_discard"] <= abi.request_size
    # The shared ring page.
    assert xen["off:blkif_sring:ring"] == RING_HEADER_SIZE
    assert xen["sizeof:blkif_sring_entry"] == xen["size:blkif_sring:ring"] == max(abi.request_size, abi.response_size)
    buf = bytearray(PAGE_SIZE)
    shared = SharedRing([memoryview(buf)], abi.request_size, abi.response_size)
    front = FrontRing(shared)
    for _ in range(3):
        front.put_request(bytes(abi.request_size))
    front.push_requests()
    header = {f: int.from_bytes(buf[xen[f"off:blkif_sring:{f}"]:][:xen[f"size:blkif_sring:{f}"]], "little")
              for f in ("req_prod", "req_event", "rsp_prod", "rsp_event")}
    assert header == {"req_prod": 3, "req_event": 1, "rsp_prod": 0, "rsp_event": 1}

    # Every field: what we pack sits where C reads it, and what C writes is what we parse.
    segs = [(0xA1A2A3A4, 1, 7), (0xB1B2B3B4, 0, 3), (0xFFFFFFFF, 7, 7)]
    direct = {"operation": BLKIF_OP_WRITE, "nr_segments": len(segs), "handle": 0xBEEF,
              "id": 0x0102030405060708, "sector_number": 0xF1F2F3F4F5F6F7F8, "seg": segs}
    image = c_image(xen, "blkif_request", direct, abi.request_size)
    assert pack_request(abi, BLKIF_OP_WRITE, 0x0102030405060708, 0xF1F2F3F4F5F6F7F8, 0xBEEF, segs) == image
    assert parse_request(abi, image) == Request(BLKIF_OP_WRITE, 0x0102030405060708, 0xF1F2F3F4F5F6F7F8, 0xBEEF,
                                                nr_segments=3, segments=tuple(Segment(*s) for s in segs))
    full = [(0x10000000 + i, i % 8, 7) for i in range(BLKIF_MAX_SEGMENTS_PER_REQUEST)]
    image = c_image(xen, "blkif_request", {**direct, "nr_segments": len(full), "seg": full}, abi.request_size)
    assert pack_request(abi, BLKIF_OP_WRITE, 0x0102030405060708, 0xF1F2F3F4F5F6F7F8, 0xBEEF, full) == image
    assert parse_request(abi, image).segments == tuple(Segment(*s) for s in full)

    discard = {"operation": BLKIF_OP_DISCARD, "flag": BLKIF_DISCARD_SECURE, "handle": 0xCAFE,
               "id": 0x1112131415161718, "sector_number": 0x2122232425262728, "nr_sectors": 0x3132333435363738}
    image = c_image(xen, "blkif_request_discard", discard, abi.request_size)
    assert pack_discard_request(abi, 0x1112131415161718, 0x2122232425262728, 0x3132333435363738, 0xCAFE,
                                BLKIF_DISCARD_SECURE) == image
    assert parse_request(abi, image) == Request(BLKIF_OP_DISCARD, 0x1112131415161718, 0x2122232425262728, 0xCAFE,
                                                nr_sectors=0x3132333435363738, discard_flag=BLKIF_DISCARD_SECURE)

    grefs = [0x40414243 + i for i in range(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)]
    indirect = {"operation": BLKIF_OP_INDIRECT, "indirect_op": BLKIF_OP_READ, "nr_segments": 0xABCD,
                "id": 0x5152535455565758, "sector_number": 0x6162636465666768, "handle": 0xD00D,
                "indirect_grefs": grefs}
    image = c_image(xen, "blkif_request_indirect", indirect, abi.request_size)
    assert pack_indirect_request(abi, BLKIF_OP_READ, 0x5152535455565758, 0x6162636465666768, 0xD00D,
                                 0xABCD, grefs) == image
    assert parse_request(abi, image) == Request(BLKIF_OP_READ, 0x5152535455565758, 0x6162636465666768, 0xD00D,
                                                nr_segments=0xABCD, indirect=True, indirect_grefs=tuple(grefs))

    for status in (BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP, 0x7FFF, -0x8000):
        values = {"id": 0x8182838485868788, "operation": BLKIF_OP_INDIRECT, "status": status}
        image = c_image(xen, "blkif_response", values, abi.response_size)
        assert pack_response(abi, 0x8182838485868788, BLKIF_OP_INDIRECT, status) == image
        assert parse_response(abi, image) == (0x8182838485868788, BLKIF_OP_INDIRECT, status)


@needs_headers
def test_ring_sizes_match_header(abi_peer: tuple[BlkifABI, str]) -> None:
    abi, exe = abi_peer
    xen = c_layout(exe)
    for n in RING_PAGES:
        expected = xen[f"ring_size:{n}"]
        assert ring_size(n, abi.request_size, abi.response_size) == expected, n
        separate = [memoryview(bytearray(PAGE_SIZE)) for _ in range(n)]
        assert SharedRing(separate, abi.request_size, abi.response_size).size == expected, n
        assert SharedRing([memoryview(bytearray(n * PAGE_SIZE))], abi.request_size, abi.response_size).size == expected


def test_a_missing_protocol_node_means_x86_32() -> None:
    """Linux blkback's BLKIF_PROTOCOL_DEFAULT on x86 (xen-blkback/common.h) is the x86_32 layout.

    xenbus_scanf("%63s") of an empty node fails too, so an empty value is
    "absent" as well; a name Linux does not know fails the device.
    """
    assert blkif.abi_for(None) is blkif.X86_32
    assert blkif.abi_for("") is blkif.X86_32
    assert blkif.abi_for(blkif.PROTOCOL_X86_64) is blkif.X86_64
    assert blkif.abi_for(blkif.PROTOCOL_X86_32) is blkif.X86_32
    with pytest.raises(ValueError):
        blkif.abi_for("x86_64-abi ")
