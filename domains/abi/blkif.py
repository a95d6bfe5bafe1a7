"""Xen's block-device protocol (``xen/io/blkif.h``): constants and ring layouts.

Two ABIs exist because the structures were never packed: on x86_64 a
request's ``id`` sits at offset 8, on x86_32 at offset 4 (u64 aligns to 4
there).  A frontend names its ABI in the ``protocol`` node.  When the node is
absent (or empty), Linux xen-blkback assumes ``BLKIF_PROTOCOL_DEFAULT``,
which on x86 is the x86_32 layout, not the backend's native one: the
frontends that predate the node were 32-bit PV guests, and the default
keeps them working.  We behave the same (:data:`PROTOCOL_DEFAULT`); our own
blkfront always writes the node, so it never depends on this.  Both layouts
are checked against the real headers, compiled with ``-m64`` and ``-m32``.

Parsing is deliberately split from validation: :func:`parse_request` only
decodes a copy the caller already took off the ring; whether the numbers
make sense is the backend's job (it knows the disk and the grants).
"""

from __future__ import annotations

import array
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

BLKIF_OP_READ = 0
BLKIF_OP_WRITE = 1
BLKIF_OP_WRITE_BARRIER = 2
BLKIF_OP_FLUSH_DISKCACHE = 3
BLKIF_OP_RESERVED_1 = 4
BLKIF_OP_DISCARD = 5
BLKIF_OP_INDIRECT = 6

BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
BLKIF_DISCARD_SECURE = 1

BLKIF_RSP_EOPNOTSUPP = -2
BLKIF_RSP_ERROR = -1
BLKIF_RSP_OKAY = 0

VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

XEN_BLKIF_SECTOR_SIZE = 512          # ring sector numbers are always 512-byte units
SEGMENT = struct.Struct("<IBBxx")    # struct blkif_request_segment: gref, first_sect, last_sect
SEGMENTS_PER_INDIRECT_FRAME = 4096 // SEGMENT.size

PROTOCOL_X86_64 = "x86_64-abi"
PROTOCOL_X86_32 = "x86_32-abi"
PROTOCOL_NATIVE = PROTOCOL_X86_64
#: What a frontend without a ``protocol`` node gets: Linux's BLKIF_PROTOCOL_DEFAULT on x86
#: (drivers/block/xen-blkback/common.h).
PROTOCOL_DEFAULT = PROTOCOL_X86_32


@dataclass(frozen=True)
class BlkifABI:
    """Byte layouts of one ABI's request and response."""
    name: str
    request: struct.Struct           # operation, nr_segments, handle, id, sector_number (then segments)
    discard: struct.Struct           # operation, flag, handle, id, sector_number, nr_sectors
    indirect: struct.Struct          # operation, indirect_op, nr_segments, id, sector_number, handle, grefs[8]
    response: struct.Struct          # id, operation, status
    request_size: int                # sizeof(struct blkif_request): the ring slot
    segments_offset: int

    @property
    def response_size(self) -> int:
        return self.response.size


X86_64 = BlkifABI(
    name=PROTOCOL_X86_64,
    request=struct.Struct("<BBH4xQQ"),
    discard=struct.Struct("<BBH4xQQQ"),
    indirect=struct.Struct("<BBH4xQQH2x8I"),
    response=struct.Struct("<QBxh4x"),
    request_size=112,
    segments_offset=24,
)

X86_32 = BlkifABI(
    name=PROTOCOL_X86_32,
    request=struct.Struct("<BBHQQ"),
    discard=struct.Struct("<BBHQQQ"),
    indirect=struct.Struct("<BBHQQH2x8I"),
    response=struct.Struct("<QBxh"),
    request_size=108,
    segments_offset=20,
)

ABIS = {abi.name: abi for abi in (X86_64, X86_32)}


def abi_for(protocol: str | None) -> BlkifABI:
    """The ABI a frontend's ``protocol`` node names.

    Absent or empty means :data:`PROTOCOL_DEFAULT` (x86_32), as Linux
    blkback's ``connect_ring`` decides; an unknown name is a ValueError (Linux
    fails the device with ENOSYS).
    """
    if not protocol:
        return ABIS[PROTOCOL_DEFAULT]
    try:
        return ABIS[protocol]
    except KeyError:
        raise ValueError(f"unknown blkif protocol {protocol!r}") from None


class Segment(NamedTuple):
    gref: int
    first_sect: int
    last_sect: int


class Request(NamedTuple):
    """One decoded request, as the frontend wrote it (unvalidated).

    For BLKIF_OP_INDIRECT, ``operation`` is the inner READ/WRITE,
    ``indirect`` is True, ``nr_segments`` is the u16 count and
    ``indirect_grefs`` the pages holding the segment descriptors;
    ``segments`` is empty until the backend reads those pages.
    (A NamedTuple: decoding is on every request's path, and tuples are
    several times cheaper to build than frozen dataclasses.)
    """
    operation: int
    id: int
    sector_number: int
    handle: int
    nr_segments: int = 0
    segments: tuple[Segment, ...] = ()
    indirect: bool = False
    indirect_grefs: tuple[int, ...] = ()
    nr_sectors: int = 0              # discard
    discard_flag: int = 0            # discard


# One struct per segment count: a request's segments decode in one call (flat: gref, first, last, ...).
SEGMENT_RUNS = [struct.Struct("<" + "IBBxx" * n) for n in range(BLKIF_MAX_SEGMENTS_PER_REQUEST + 1)]
_SEGMENT_RUNS = SEGMENT_RUNS


def _segments(raw: bytes, offset: int, count: int) -> tuple[Segment, ...]:
    flat = _SEGMENT_RUNS[count].unpack_from(raw, offset)
    return tuple(Segment(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, 3 * count, 3))


def parse_request(abi: BlkifABI, raw: bytes) -> Request:
    """Decode one ring slot copy.  Never raises on any bytes of the right length."""
    op = raw[0]
    if op == BLKIF_OP_INDIRECT:
        _, inner, nseg, rid, sector, handle, *grefs = abi.indirect.unpack_from(raw)
        return Request(inner, rid, sector, handle, nseg, (), True, tuple(grefs))
    if op == BLKIF_OP_DISCARD:
        _, flag, handle, rid, sector, nr = abi.discard.unpack_from(raw)
        return Request(op, rid, sector, handle, 0, (), False, (), nr, flag)
    _, nseg, handle, rid, sector = abi.request.unpack_from(raw)
    return Request(op, rid, sector, handle, nseg,
                   _segments(raw, abi.segments_offset, min(nseg, BLKIF_MAX_SEGMENTS_PER_REQUEST)))


def parse_indirect_segments(page: bytes, count: int) -> list[Segment]:
    """Segment descriptors from a copy of an indirect page."""
    return [Segment(*seg) for seg in SEGMENT.iter_unpack(page[:count * SEGMENT.size])]


_REQUEST_RUNS: dict[tuple[str, int], struct.Struct] = {}


def request_struct(abi: BlkifABI, nseg: int) -> struct.Struct:
    """A direct request with ``nseg`` segments, zero-padded to the slot size, as one struct (built once):
    ``pack(operation, nseg, handle, id, sector, gref, first_sect, last_sect, ...)``."""
    st = _REQUEST_RUNS.get((abi.name, nseg))
    if st is None:
        fmt = abi.request.format + "x" * (abi.segments_offset - abi.request.size) + "IBBxx" * nseg
        pad = abi.request_size - struct.calcsize(fmt)
        st = _REQUEST_RUNS[(abi.name, nseg)] = struct.Struct(fmt + "x" * pad)
        assert st.size == abi.request_size
    return st


def pack_request(abi: BlkifABI, operation: int, id: int, sector: int, handle: int,
                 segments: list[tuple[int, int, int]]) -> bytes:
    """A direct READ/WRITE/FLUSH/BARRIER request, zero-padded to the slot size."""
    n = len(segments)
    if n > BLKIF_MAX_SEGMENTS_PER_REQUEST:
        raise ValueError("too many segments for a direct request")
    if n == 1:
        return request_struct(abi, 1).pack(operation, 1, handle, id, sector, *segments[0])
    return request_struct(abi, n).pack(operation, n, handle, id, sector, *[v for seg in segments for v in seg])


def pack_indirect_request(abi: BlkifABI, operation: int, id: int, sector: int, handle: int,
                          nr_segments: int, indirect_grefs: list[int]) -> bytes:
    if len(indirect_grefs) > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST:
        raise ValueError("too many indirect pages")
    grefs = list(indirect_grefs) + [0] * (BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST - len(indirect_grefs))
    buf = bytearray(abi.request_size)
    abi.indirect.pack_into(buf, 0, BLKIF_OP_INDIRECT, operation, nr_segments, id, sector, handle, *grefs)
    return bytes(buf)


def pack_discard_request(abi: BlkifABI, id: int, sector: int, nr_sectors: int, handle: int,
                         flag: int = 0) -> bytes:
    buf = bytearray(abi.request_size)
    abi.discard.pack_into(buf, 0, BLKIF_OP_DISCARD, flag, handle, id, sector, nr_sectors)
    return bytes(buf)


_SEGMENT_PAGES: dict[int, struct.Struct] = {}


def pack_segments(segments: list[tuple[int, int, int]]) -> bytes:
    """An indirect page's content (a whole page, zero-padded)."""
    n = len(segments)
    st = _SEGMENT_PAGES.get(n)
    if st is None:
        if n > SEGMENTS_PER_INDIRECT_FRAME:
            raise ValueError("too many segments for an indirect page")
        st = _SEGMENT_PAGES[n] = struct.Struct("<" + "IBBxx" * n + "x" * (4096 - n * SEGMENT.size))
    return st.pack(*[v for seg in segments for v in seg])


_WHOLE_PAGE = 7 << 8                 # first_sect 0, last_sect 7, as the u32 after a segment's gref (little-endian)


def pack_page_segments(grefs: Sequence[int], last_bytes: int = 4096) -> bytes:
    """:func:`pack_segments` for segments that each cover a whole page, but the last, which covers
    the first ``last_bytes`` (whole 512-byte sectors) of its page: a 1 MiB request's indirect page
    is built without a tuple per segment."""
    n = len(grefs)
    if n > SEGMENTS_PER_INDIRECT_FRAME:
        raise ValueError("too many segments for an indirect page")
    if sys.byteorder != "little" or not n:
        segs = [(g, 0, 7) for g in grefs]
        if segs:
            segs[-1] = (grefs[-1], 0, last_bytes // 512 - 1)
        return pack_segments(segs)
    page = bytearray(4096)
    words = memoryview(page).cast("I")          # per segment: gref, then first/last/padding
    words[0:2 * n:2] = array.array("I", grefs)
    words[1:2 * n:2] = array.array("I", [_WHOLE_PAGE]) * n
    if last_bytes != 4096:
        words[2 * n - 1] = (last_bytes // 512 - 1) << 8
    words.release()
    return bytes(page)


def pack_response(abi: BlkifABI, id: int, operation: int, status: int) -> bytes:
    """A response with its padding zeroed: nothing uninitialised leaves the backend."""
    return abi.response.pack(id, operation, status)


def parse_response(abi: BlkifABI, raw: bytes) -> tuple[int, int, int]:
    """(id, operation, status)."""
    return abi.response.unpack_from(raw)
