"""What a blkfront and its backend agree on, from the xenstore nodes both publish (no I/O here).

Linux's ``talk_to_blkback`` and ``blkfront_connect`` in one pure module:
the frontend's wishes (:class:`FrontendOptions`) capped by the backend's
offer (its ``feature-*`` and ``max-*`` nodes, read in one round trip by the
device) give a :class:`Negotiated` connection; the nodes the frontend
publishes for it come from :func:`frontend_nodes`, and those an earlier
connection left that would contradict it from :func:`stale_nodes`; the
Connected backend's disk nodes give a :class:`Disk`.  Every node is the
backend's to write, so none is trusted: a malformed number reads as absent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..abi.blkif import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_WRITE_BARRIER,
    PROTOCOL_X86_64,
    VDISK_READONLY,
)
from ..xenbus import parse_int

MAX_INDIRECT_SEGMENTS = 256
DEFAULT_PERSISTENT_FRAMES = 2048      # 8 MiB of the guest's memory kept granted for I/O (blkback keeps 2048)

# The backend's offer, read when it is in InitWait.
BACKEND_FEATURES = ["multi-queue-max-queues", "max-ring-page-order", "feature-persistent",
                    "feature-max-indirect-segments", "feature-flush-cache", "feature-barrier", "feature-discard"]
# The disk, read when it is Connected.
DISK_NODES = ["sectors", "sector-size", "mode", "info"]

# What the frontend writes for one connection, besides ring-ref* and queue-*/.
_CONNECTION_NODES = frozenset({"ring-page-order", "multi-queue-num-queues", "event-channel"})


class BlkfrontError(Exception):
    """The device could not be connected."""


@dataclass(frozen=True)
class FrontendOptions:
    """What this frontend asks for; the backend's offer caps each."""
    queues: int = 1
    ring_page_order: int = 0
    persistent: bool = True
    indirect: bool = True
    protocol: str = PROTOCOL_X86_64
    max_persistent_frames: int = DEFAULT_PERSISTENT_FRAMES


DEFAULT_OPTIONS = FrontendOptions()


@dataclass(frozen=True)
class Negotiated:
    """One connection's terms: what both sides do."""
    queues: int
    ring_page_order: int
    persistent: bool
    max_segments: int                 # per request: 11, or more with indirect descriptors
    flush_op: int | None              # FLUSH_DISKCACHE, else WRITE_BARRIER; None: no cache to flush
    discard: bool


NOT_CONNECTED = Negotiated(1, 0, False, BLKIF_MAX_SEGMENTS_PER_REQUEST, None, False)


def negotiate(options: FrontendOptions, offer: dict[str, bytes | None]) -> Negotiated:
    """The backend's ``offer`` (:data:`BACKEND_FEATURES` as read) against our ``options``."""
    f = {k: parse_int(v, 0) or 0 for k, v in offer.items()}
    max_segments = (min(MAX_INDIRECT_SEGMENTS, f["feature-max-indirect-segments"])
                    if options.indirect and f["feature-max-indirect-segments"] > 0
                    else BLKIF_MAX_SEGMENTS_PER_REQUEST)
    flush_op = BLKIF_OP_FLUSH_DISKCACHE if f["feature-flush-cache"] else \
        BLKIF_OP_WRITE_BARRIER if f["feature-barrier"] else None
    return Negotiated(queues=max(1, min(options.queues, f["multi-queue-max-queues"] or 1)),
                      ring_page_order=max(0, min(options.ring_page_order, f["max-ring-page-order"])),
                      persistent=options.persistent and bool(f["feature-persistent"]),
                      max_segments=max_segments, flush_op=flush_op, discard=bool(f["feature-discard"]))


def frontend_nodes(protocol: str, terms: Negotiated,
                   rings: Sequence[tuple[Sequence[int], int]]) -> dict[str, str | int]:
    """The nodes to publish (``state`` aside) for ``rings``: each queue's grant refs and event channel."""
    nq, order = terms.queues, terms.ring_page_order
    nodes: dict[str, str | int] = {"protocol": protocol, "feature-persistent": int(terms.persistent)}
    if order:
        nodes["ring-page-order"] = order
    if nq > 1:
        nodes["multi-queue-num-queues"] = nq
    for index, (refs, port) in enumerate(rings):
        prefix = f"queue-{index}/" if nq > 1 else ""
        if order:
            for i, ref in enumerate(refs):
                nodes[f"{prefix}ring-ref{i}"] = ref
        else:
            nodes[f"{prefix}ring-ref"] = refs[0]
        nodes[f"{prefix}event-channel"] = port
    return nodes


def stale_nodes(existing: Iterable[str], nodes: dict[str, str | int]) -> list[str]:
    """The nodes of an earlier connection (a backend that offered more) that would contradict ``nodes``:
    a stale ring-page-order or multi-queue-num-queues makes the new backend refuse us."""
    return [key for key in existing
            if key not in nodes and (key in _CONNECTION_NODES or key.startswith(("ring-ref", "queue-")))]


@dataclass(frozen=True)
class Disk:
    """The Connected backend's disk, as the block-device interface shows it."""
    size: int                         # bytes
    sector_size: int
    read_only: bool
    can_trim: bool
    can_flush: bool


def disk_of(be: str, got: dict[str, bytes | None], terms: Negotiated) -> Disk:
    """The disk nodes (:data:`DISK_NODES` as read under the backend's path ``be``), checked."""
    sectors = parse_int(got["sectors"])
    if sectors is None:
        raise BlkfrontError(f"{be}/sectors missing")
    if sectors >= 1 << 64:
        # blkif's sector_number is a uint64 (Linux reads the node into a sector_t): a disk larger than
        # that has sectors no request can name, and a read of one would fail to be built.
        raise BlkfrontError(f"{be}/sectors {sectors}: more than a uint64 sector number addresses")
    lss = parse_int(got["sector-size"], 512) or 512
    if lss not in (512, 4096):
        raise BlkfrontError(f"{be}/sector-size {lss}: 512 or 4096 expected")
    mode = (got["mode"] or b"w").decode(errors="replace")
    info = parse_int(got["info"], 0) or 0
    read_only = bool(info & VDISK_READONLY) or mode == "r"
    # Flush (and FUA, which is a write then a flush) only where the backend has a cache to flush.
    return Disk(size=sectors * 512, sector_size=lss, read_only=read_only,
                can_trim=terms.discard and not read_only, can_flush=terms.flush_op is not None)
