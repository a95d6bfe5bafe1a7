"""From a frontend's request to the I/O that serves it, or the reason it is refused.

Sans-IO: nothing here maps a grant or touches the disk.  The frontend is
hostile, so every field of the (already copied) request is checked against
what Linux xen-blkback accepts (``dispatch_rw_block_io``,
``dispatch_discard_io``): an operation we know, a segment count within the
limit of the form used, sector ranges inside a page and inside the disk,
alignment to the disk's logical sector size, no writes to a read-only disk.
A request that fails gets BLKIF_RSP_ERROR (BLKIF_RSP_EOPNOTSUPP for an
operation we do not offer) and nothing else happens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from xdom.domains.abi.blkif import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    SEGMENTS_PER_INDIRECT_FRAME,
    XEN_BLKIF_SECTOR_SIZE,
    Request,
    Segment,
)

PAGE_SIZE = 4096
SECTORS_PER_PAGE = PAGE_SIZE // XEN_BLKIF_SECTOR_SIZE
MAX_INDIRECT_SEGMENTS = 256          # what we advertise in feature-max-indirect-segments (Linux's default)


@dataclass(frozen=True)
class DiskGeometry:
    """What validation needs to know about the disk and the negotiated features."""
    sectors: int                     # size in 512-byte units
    logical_sector_size: int = 512
    read_only: bool = False
    discard: bool = True
    max_indirect_segments: int = MAX_INDIRECT_SEGMENTS


class Chunk(NamedTuple):
    """One segment's bytes: ``length`` bytes at ``offset`` in granted page ``gref`` (a tuple: 256 per MiB)."""
    gref: int
    offset: int
    length: int


@dataclass(frozen=True)
class IoPlan:
    """What serving a valid request takes.

    ``kind`` is ``"read"``, ``"write"``, ``"flush"``, ``"discard"``; a
    barrier is a write with ``flush_before`` and ``flush_after``, a flush
    with data (Linux allows it) is a write with ``flush_before``.
    """
    kind: str
    disk_offset: int = 0
    chunks: tuple[Chunk, ...] = ()
    length: int = 0
    flush_before: bool = False
    flush_after: bool = False

    @property
    def writes_to_guest(self) -> bool:
        return self.kind == "read"


class Refused(Exception):
    """A request that gets an error response; ``status`` is the BLKIF_RSP_* to send."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def sector_problem(sector: int, lss_sectors: int) -> str | None:
    """Why a request may not start at ``sector`` of a disk of ``lss_sectors``-sector logical sectors, or None.

    This function, :func:`segment_problem` and :func:`extent_problem` are the rules for a request's
    sectors: the planner and blkback's fast path (ring_server.py) both apply them."""
    if sector % lss_sectors:
        return f"sector {sector} not aligned to the {lss_sectors * XEN_BLKIF_SECTOR_SIZE}-byte logical sector"
    return None


def segment_problem(first: int, last: int, lss_sectors: int) -> str | None:
    """Why a segment's sectors ``first..last`` are refused, or None: within one page, in order, and
    whole logical sectors (Linux refuses any segment that is not)."""
    if first > last or last >= SECTORS_PER_PAGE:
        return f"segment sectors {first}..{last} do not fit a page"
    nsec = last - first + 1
    if nsec % lss_sectors:
        return (f"a {nsec * XEN_BLKIF_SECTOR_SIZE}-byte segment on a disk of "
                f"{lss_sectors * XEN_BLKIF_SECTOR_SIZE}-byte logical sectors")
    return None


def extent_problem(sector: int, total_sectors: int, disk_sectors: int) -> str | None:
    """Why ``total_sectors`` from ``sector`` do not fit the disk, or None."""
    if sector + total_sectors > disk_sectors:
        return f"sectors {sector}+{total_sectors} beyond the disk's {disk_sectors}"
    return None


def indirect_pages_needed(nr_segments: int) -> int:
    return (nr_segments + SEGMENTS_PER_INDIRECT_FRAME - 1) // SEGMENTS_PER_INDIRECT_FRAME


def check_indirect(req: Request, geometry: DiskGeometry) -> int:
    """Validate an indirect request's header; returns how many indirect pages to read."""
    if req.operation not in (BLKIF_OP_READ, BLKIF_OP_WRITE):
        raise Refused(BLKIF_RSP_ERROR, f"indirect operation {req.operation} is not READ or WRITE")
    if not 0 < req.nr_segments <= geometry.max_indirect_segments:
        raise Refused(BLKIF_RSP_ERROR, f"indirect request with {req.nr_segments} segments "
                                       f"(limit {geometry.max_indirect_segments})")
    return indirect_pages_needed(req.nr_segments)


def plan(req: Request, geometry: DiskGeometry, segments: tuple[Segment, ...] | None = None) -> IoPlan:
    """The I/O for ``req``; ``segments`` are the ones read from indirect pages for an indirect request.

    Raises :class:`Refused`.
    """
    op = req.operation
    if op == BLKIF_OP_DISCARD:
        return _plan_discard(req, geometry)
    if op not in (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
        raise Refused(BLKIF_RSP_EOPNOTSUPP, f"operation {op} not supported")
    if req.indirect:
        if segments is None or len(segments) != req.nr_segments:
            raise Refused(BLKIF_RSP_ERROR, "indirect segments missing")
    else:
        if req.nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise Refused(BLKIF_RSP_ERROR, f"{req.nr_segments} segments in a direct request "
                                           f"(limit {BLKIF_MAX_SEGMENTS_PER_REQUEST})")
        segments = req.segments
    writes_disk = op != BLKIF_OP_READ
    if writes_disk and geometry.read_only and (op != BLKIF_OP_FLUSH_DISKCACHE or segments):
        raise Refused(BLKIF_RSP_ERROR, "write to a read-only disk")
    if not segments:
        if op in (BLKIF_OP_READ, BLKIF_OP_WRITE):
            raise Refused(BLKIF_RSP_ERROR, "READ/WRITE with no segments")
        return IoPlan("flush")
    chunks = []
    total_sectors = 0
    lss_sectors = geometry.logical_sector_size // XEN_BLKIF_SECTOR_SIZE
    why = sector_problem(req.sector_number, lss_sectors)
    if why is not None:
        raise Refused(BLKIF_RSP_ERROR, why)
    for seg in segments:
        why = segment_problem(seg.first_sect, seg.last_sect, lss_sectors)
        if why is not None:
            raise Refused(BLKIF_RSP_ERROR, why)
        nsec = seg.last_sect - seg.first_sect + 1
        chunks.append(Chunk(seg.gref, seg.first_sect * XEN_BLKIF_SECTOR_SIZE, nsec * XEN_BLKIF_SECTOR_SIZE))
        total_sectors += nsec
    why = extent_problem(req.sector_number, total_sectors, geometry.sectors)
    if why is not None:
        raise Refused(BLKIF_RSP_ERROR, why)
    offset = req.sector_number * XEN_BLKIF_SECTOR_SIZE
    length = total_sectors * XEN_BLKIF_SECTOR_SIZE
    lss = geometry.logical_sector_size
    if offset % lss or length % lss:
        raise Refused(BLKIF_RSP_ERROR, f"I/O at {offset}+{length} not aligned to the {lss}-byte logical sector")
    if op == BLKIF_OP_READ:
        return IoPlan("read", offset, tuple(chunks), length)
    return IoPlan("write", offset, tuple(chunks), length,
                  flush_before=op in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER),
                  flush_after=op == BLKIF_OP_WRITE_BARRIER)


def _plan_discard(req: Request, geometry: DiskGeometry) -> IoPlan:
    if not geometry.discard:
        raise Refused(BLKIF_RSP_EOPNOTSUPP, "discard not supported by this disk")
    if geometry.read_only:
        raise Refused(BLKIF_RSP_ERROR, "discard on a read-only disk")
    if req.sector_number + req.nr_sectors > geometry.sectors or req.nr_sectors > geometry.sectors:
        raise Refused(BLKIF_RSP_ERROR, f"discard {req.sector_number}+{req.nr_sectors} beyond the disk")
    lss_sectors = geometry.logical_sector_size // XEN_BLKIF_SECTOR_SIZE
    if req.sector_number % lss_sectors or req.nr_sectors % lss_sectors:
        raise Refused(BLKIF_RSP_ERROR, f"discard {req.sector_number}+{req.nr_sectors} not aligned to the "
                                       f"{geometry.logical_sector_size}-byte logical sector")
    return IoPlan("discard", req.sector_number * XEN_BLKIF_SECTOR_SIZE,
                  length=req.nr_sectors * XEN_BLKIF_SECTOR_SIZE)
