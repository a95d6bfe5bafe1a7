"""One blkif ring (one queue of one vbd), served by one of blkback's loop threads (``ring_loop.py``).

Each pass (:meth:`RingServer.work`, as Linux's ``xen_blkif_schedule`` does
for its ring): take every published request off
the ring (copies); read indirect segment pages; validate each request
(:mod:`.plan`); map the grants the batch needs in one hypercall (or find
them among the persistent grants); ``preadv``/``pwritev`` between the disk
and the mapped pages; unmap; answer the whole batch with one push and, only
if the frontend asked for it (``rsp_event``), one notification.  Then
re-arm ``req_event`` and look again before sleeping (ring.h's final check),
so no request is stranded and no wakeup is wasted.  What may wait (the
general path, a flush) is handed, with the rest of its batch, to a worker
thread while the ring waits, so the loop's other rings are never stalled by
this one's disk; a read the page cache cannot answer now goes alone to a
worker while the ring is served on, and is answered when it is done.

Persistent grants are mapped into a ``GrantWindow`` by reference: a
frontend's pool grants its pages with consecutive references, so the 256
pages of a 1 MiB request are one view and one iovec, not 256 lookups, views
and iovecs (blkback's CPU per MiB written a third lower, measured).

A frontend that breaks the ring (an impossible ``req_prod``) gets this ring
halted and its device closed through ``on_fatal``; every other ring and
device carries on.
"""

from __future__ import annotations

import logging
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import cast

from xdom.domains.abi.blkif import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    SEGMENT,
    SEGMENT_RUNS,
    XEN_BLKIF_SECTOR_SIZE,
    BlkifABI,
    Request,
    parse_indirect_segments,
    parse_request,
)
from xdom.domains.abi.ring import BackRing, RingOverflow, SharedRing
from xdom.domains.hostsys.grant_window import GrantWindow
from xdom.domains.log_budget import worth_logging
from xdom.domains.xenhost.base import GrantMapping, XenHost

from ..kept_mappings import VMAS_PER_PAGE, KeptMappings
from .disk import Disk
from .plan import (
    SECTORS_PER_PAGE,
    DiskGeometry,
    IoPlan,
    Refused,
    check_indirect,
    extent_problem,
    indirect_pages_needed,
    plan,
    sector_problem,
    segment_problem,
)
from .ring_loop import RingBroken, RingLoop, RingLoops

log = logging.getLogger("xdom.blkback")

_SEGMENT_LISTS: dict[int, struct.Struct] = {}     # an indirect request's n descriptors, as one struct
_LITTLE_ENDIAN = sys.byteorder == "little"
_SECTOR = XEN_BLKIF_SECTOR_SIZE
_WHOLE_PAGE = (SECTORS_PER_PAGE - 1) << 8         # first_sect 0, last_sect 7, no padding bits

PUSH_BYTES = 16 * 1024            # within a batch, answers are published once this much data has moved
BATCH_GRANT_BUDGET = 1024         # grants one batch of one ring may map at once
MAX_PERSISTENT_GRANTS = 2048      # per ring; Linux's default is 1056 (32 slots x 11 segments x 3)

#: A fast request, checked: (id, operation, disk offset, buffers, length).
_FastIo = tuple[int, int, int, list[memoryview], int]


class RingServer:
    """Serves one ring until :meth:`stop`; the pages and port come from the frontend's xenstore nodes."""

    def __init__(self, host: XenHost, frontend_domid: int, ring_refs: Sequence[int], remote_port: int,
                 abi: BlkifABI, disk: Disk, geometry: DiskGeometry, persistent: bool, name: str,
                 on_fatal: Callable[[RingServer, str], None], kept: KeptMappings) -> None:
        self.host = host
        self.fe = frontend_domid
        self.abi = abi
        self.disk = disk
        self.geometry = geometry
        self.persistent = persistent
        self.name = name
        self.on_fatal = on_fatal
        # Cheap counters, read by tests and ``Vbd.stats``: they show which negotiated
        # features this ring really used, not only that data survived (Linux exposes
        # similar ones under the vbd's sysfs ``statistics`` and ``persistent_gnt_c``).
        self.stats = {
            "requests": 0, "errors": 0, "batches": 0, "notifies": 0,
            "ring_pages": 0,              # pages of this ring mapped
            "indirect_requests": 0,       # BLKIF_OP_INDIRECT requests served
            "flush_requests": 0,          # FLUSH_DISKCACHE and WRITE_BARRIER served (Linux's st_f_req)
            "discard_requests": 0,        # DISCARD served (Linux's st_ds_req)
            "grants_mapped": 0,           # data and indirect pages mapped (persistent or per batch)
            "persistent_grants": 0,       # mappings held in the persistent cache now
            "persistent_reuses": 0,       # pages found there instead of being mapped again
            "run_views": 0,               # requests whose pages were one view of the window (one iovec)
            "offloaded": 0,               # batches (or their rest) served by a worker, off the loop
            "read_aside": 0,              # reads the page cache missed, served by a worker meanwhile
        }
        self._persistent: dict[int, GrantMapping] = {}
        self._kept = kept                 # the bound all rings' persistent grants share (kept_mappings.py)
        # Where persistent pages are mapped, by reference: a frontend's pool grants its pages with
        # consecutive references, so a large request's run of pages is one view (one iovec).
        self._window: GrantWindow | None = None
        self._req_unpack = abi.request.unpack_from
        self._ind_unpack = abi.indirect.unpack_from
        self._rsp_pack = abi.response.pack
        self._seg_offset = abi.segments_offset
        self._lss_sectors = geometry.logical_sector_size // XEN_BLKIF_SECTOR_SIZE
        self._loop: RingLoop | None = None
        self.offloaded: Future[None] | None = None     # a worker serving a batch (ring_loop.py)
        self.aside: set[Future[None]] = set()           # a worker reading for it meanwhile (ring_loop.py)
        self._ring_maps: list[GrantMapping] = []
        self.port = -1
        try:
            results = host.map_grants([(frontend_domid, ref, False) for ref in ring_refs])
            self._ring_maps = [r.mapping for r in results if r.mapping is not None]
            if len(self._ring_maps) != len(ring_refs):
                bad = [ref for ref, r in zip(ring_refs, results) if r.mapping is None]
                raise Refused(BLKIF_RSP_ERROR, f"cannot map ring page(s) {bad}")
            self.ring = BackRing(SharedRing([m.view for m in self._ring_maps], abi.request_size,
                                            abi.response_size))
            self.stats["ring_pages"] = len(self._ring_maps)
            self.port = host.bind_interdomain(frontend_domid, remote_port)
        except BaseException:
            self._release()
            raise

    def start(self, loops: RingLoops) -> None:
        """Served from now on by one of ``loops`` (the one serving the fewest rings)."""
        self._loop = loops.add(self)

    def stop(self) -> None:
        """Stop serving and give back everything the ring holds (from any thread; the loop's own only
        outside :meth:`work`)."""
        if self._loop is not None:
            self._loop.remove(self)
            self._loop = None
        self._release()

    def _release(self) -> None:
        maps = list(self._persistent.values()) + self._ring_maps
        self._kept.give(self.fe, len(self._persistent) * VMAS_PER_PAGE)
        self._persistent.clear()
        self.stats["persistent_grants"] = 0
        self._ring_maps = []
        if maps:
            try:
                self.host.unmap_grants(maps)
            except Exception as e:       # the broker may be gone at shutdown
                log.warning("%s: unmapping %d grants: %s", self.name, len(maps), e)
        if self._window is not None and not self._window.close():
            log.warning("%s: a grant window still holds pages after the unmap; its address space is kept", self.name)
        self._window = None
        if self.port >= 0:
            try:
                self.host.close_port(self.port)
            except Exception as e:
                log.warning("%s: closing port %d: %s", self.name, self.port, e)
            self.port = -1

    # ---- what the loop calls (ring_loop.py) -------------------------------------

    def fileno(self) -> int:
        return self.host.evtchn.fileno(self.port)

    def work(self) -> bool:
        """Serve the requests on the ring now (at most a ring's worth: one batch); True if more came
        meanwhile.  The notification is consumed first, so one that comes after the last check
        wakes the loop again (its epoll is level-triggered) and nothing is left unserved."""
        self.host.evtchn.consume(self.port)
        try:
            raws = self.ring.take_requests()
            if raws:
                self.stats["batches"] += 1
                rest = self._serve_batch(raws, on_loop=True)
                if rest is not None:
                    self.stats["offloaded"] += 1
                    assert self._loop is not None
                    self._loop.offload(self, lambda: self._serve_batch(rest, on_loop=False))
                    return False
            return self.ring.final_check_for_requests()
        except RingOverflow as e:
            log.error("%s: frontend d%d broke the ring (%s): halting this ring", self.name, self.fe, e)
            raise RingBroken(f"ring overflow: {e}") from None

    def failed(self, why: str) -> None:
        self.on_fatal(self, why)

    def _respond(self, responses: list[bytes]) -> None:
        """Put responses on the ring, publish them and notify the frontend if it asked (rsp_event)."""
        self.ring.put_responses(responses)
        if self.ring.push_responses():
            self.stats["notifies"] += 1
            self.host.notify(self.port)

    def _serve_batch(self, raws: list[bytes], on_loop: bool) -> list[bytes] | None:
        """Serve a batch of request copies in ring order and answer them, in the same order.

        The common request -- a direct or indirect READ or WRITE whose every page is already
        mapped among the persistent grants -- is checked and served on the spot (:meth:`_fast`);
        runs of any other are served by the general path, batched as before (one grant map per
        part).  Answers are published once per batch, or sooner once :data:`PUSH_BYTES` have
        moved: the frontend can then pass on the first answers (a large read, or the first few
        small ones) while the next are served, instead of waiting for the whole batch.  A push
        only notifies if the frontend asked (rsp_event), so one that is busy costs nothing.

        ``on_loop``: called on a loop thread that serves other rings too, where nothing may wait
        (ring_loop.py): a fast read the page cache cannot answer now is read by a worker meanwhile
        and answered when done (:meth:`_read_aside`); the batch is served up to its first request
        the general path serves (grant maps at the broker, flushes, discards), and that request
        and the rest are returned, for a worker thread to serve while the ring waits.  None: all
        served.
        """
        out: list[bytes] = []
        slow: list[bytes] = []
        fast = self._fast if self._persistent else None
        moved = 0
        for i, raw in enumerate(raws):
            io = fast(raw) if fast is not None else None
            if io is None:
                if on_loop:
                    if out:
                        self._respond(out)
                    return raws[i:]
                slow.append(raw)
                continue
            if slow:
                out += self._serve_general(slow)
                slow = []
            rsp = self._fast_execute(*io, on_loop=on_loop)
            if rsp is None:
                self._read_aside(io)
                continue
            out.append(rsp)
            moved += io[4]
            if moved >= PUSH_BYTES:
                self._respond(out)
                out, moved = [], 0
        if slow:
            out += self._serve_general(slow)
        if out:
            self._respond(out)
        return None

    def _serve_general(self, raws: list[bytes]) -> list[bytes]:
        pack = self.abi.response.pack
        return [pack(rid, op, status) for chunk in self._chunks([parse_request(self.abi, raw) for raw in raws])
                for rid, op, status in self._serve(chunk)]

    def _fast(self, raw: bytes) -> _FastIo | None:
        """A direct READ/WRITE that :func:`plan` would accept, all of whose pages are persistent
        mappings: (id, operation, disk offset, buffers, length); None for anything else (the general
        path then serves it, or refuses it, exactly as before)."""
        op = raw[0]
        if op > BLKIF_OP_WRITE:
            return self._fast_indirect(raw) if op == BLKIF_OP_INDIRECT else None
        _, nseg, _handle, rid, sector = self._req_unpack(raw)
        if not 0 < nseg <= BLKIF_MAX_SEGMENTS_PER_REQUEST or (op == BLKIF_OP_WRITE and self.geometry.read_only):
            return None
        flat = SEGMENT_RUNS[nseg].unpack_from(raw, self._seg_offset)
        persistent = self._persistent
        lss = self._lss_sectors
        bufs = []
        total = 0
        for i in range(0, 3 * nseg, 3):
            m = persistent.get(flat[i])
            first, last = flat[i + 1], flat[i + 2]
            if m is None or segment_problem(first, last, lss) is not None:
                return None
            bufs.append(m.view[first * _SECTOR:(last + 1) * _SECTOR])
            total += last - first + 1
        if sector_problem(sector, lss) is not None or extent_problem(sector, total, self.geometry.sectors) is not None:
            return None
        self.stats["persistent_reuses"] += nseg
        return rid, op, sector * _SECTOR, bufs, total * _SECTOR

    def _fast_indirect(self, raw: bytes) -> _FastIo | None:
        """:meth:`_fast` for an indirect READ/WRITE whose indirect and data pages are all persistent
        mappings; the segment descriptors are copied out of the indirect pages before they are read."""
        _, op, nseg, rid, sector, _handle, *grefs = self._ind_unpack(raw)
        geometry = self.geometry
        if (op > BLKIF_OP_WRITE or not 0 < nseg <= geometry.max_indirect_segments
                or (op == BLKIF_OP_WRITE and geometry.read_only)):
            return None
        persistent = self._persistent
        npages = indirect_pages_needed(nseg)
        if npages == 1:
            m = persistent.get(grefs[0])
            if m is None:
                return None
            descriptors = bytes(m.view[:nseg * SEGMENT.size])
        else:
            pages = [persistent.get(g) for g in grefs[:npages]]
            if None in pages:
                return None
            descriptors = b"".join([m.view for m in cast("list[GrantMapping]", pages)])[:nseg * SEGMENT.size]
        if _LITTLE_ENDIAN:
            # struct blkif_request_segment as two u32: gref, then first_sect | last_sect << 8 | padding
            words = memoryview(descriptors).cast("I")
            grefs, spans = words[0::2].tolist(), words[1::2].tolist()
            words.release()
        else:
            st = _SEGMENT_LISTS.get(nseg)
            if st is None:
                st = _SEGMENT_LISTS[nseg] = struct.Struct("<" + "IBBxx" * nseg)
            flat = st.unpack(descriptors)
            grefs, spans = list(flat[0::3]), [f | last << 8 for f, last in zip(flat[1::3], flat[2::3])]
        lss = self._lss_sectors
        whole = spans.count(_WHOLE_PAGE) == nseg
        g0 = grefs[0]
        run = None
        if whole and self._window is not None and grefs[-1] - g0 == nseg - 1 \
                and grefs == list(range(g0, g0 + nseg)):
            # The usual large request: whole pages of consecutive references, each mapped in the window
            # (span() checks every one is): one view of them all.
            run = self._window.span(g0, nseg)
        if run is not None:
            bufs = [run]
            total = nseg * SECTORS_PER_PAGE
            self.stats["run_views"] += 1
        elif None in (got := [persistent.get(g) for g in grefs]):
            return None
        elif whole:
            bufs = [m.view for m in cast("list[GrantMapping]", got)]      # whole pages
            total = nseg * SECTORS_PER_PAGE
        else:
            maps = cast("list[GrantMapping]", got)
            bufs = []
            total = 0
            for m, span in zip(maps, spans):
                first, last = span & 0xFF, (span >> 8) & 0xFF
                if segment_problem(first, last, lss) is not None:
                    return None
                bufs.append(m.view[first * _SECTOR:(last + 1) * _SECTOR])
                total += last - first + 1
        if sector_problem(sector, lss) is not None or extent_problem(sector, total, geometry.sectors) is not None:
            return None
        self.stats["persistent_reuses"] += nseg + npages
        self.stats["indirect_requests"] += 1
        return rid, op, sector * _SECTOR, bufs, total * _SECTOR

    def _fast_execute(self, rid: int, op: int, offset: int, bufs: list[memoryview], length: int,
                      on_loop: bool = False) -> bytes | None:
        """The answer to a fast request, served; ``on_loop``: None, and nothing counted, if it is a
        read the page cache cannot answer at once (a worker then serves it)."""
        try:
            if op == BLKIF_OP_READ:
                if on_loop:
                    if not self.disk.read_cached(bufs, offset, length):
                        return None
                else:
                    self.disk.readv(bufs, offset, length)
            else:
                self.disk.writev(bufs, offset, length)
            status = BLKIF_RSP_OKAY
        except OSError as e:
            log.warning("%s: %s at %d+%d: %s", self.name, "read" if op == BLKIF_OP_READ else "write", offset,
                        length, e)
            self.stats["errors"] += 1
            status = BLKIF_RSP_ERROR
        self.stats["requests"] += 1
        bufs.clear()
        return self._rsp_pack(rid, op, status)

    def _read_aside(self, io: _FastIo) -> None:
        """A fast read the page cache missed: a worker reads it while the ring is served on, and the
        loop answers it then (``ring_loop.RingLoop.aside``).  Its pages are persistent mappings, kept
        until the ring stops, which waits for the read."""
        assert self._loop is not None
        self.stats["read_aside"] += 1
        rid, op, offset, bufs, length = io
        disk = self.disk

        def read() -> OSError | None:
            try:
                disk.readv(bufs, offset, length)
                return None
            except OSError as e:
                return e
            finally:
                bufs.clear()

        def answer(failure: OSError | None) -> None:
            self.stats["requests"] += 1
            if failure is not None:
                log.warning("%s: read at %d+%d: %s", self.name, offset, length, failure)
                self.stats["errors"] += 1
            self._respond([self._rsp_pack(rid, op, BLKIF_RSP_OKAY if failure is None else BLKIF_RSP_ERROR)])
        self._loop.aside(self, read, answer)

    @staticmethod
    def _chunks(reqs: list[Request]) -> Iterator[list[Request]]:
        """Cut a batch so that each part maps at most :data:`BATCH_GRANT_BUDGET` grants at once.

        The backend domain's maptrack is shared by every device it serves: a
        frontend filling a big ring with 256-segment indirect requests must
        not be able to take it all (Linux bounds this with its per-ring pool
        of pending requests).  Parts are served in ring order, so responses
        stay in request order.
        """
        part: list[Request] = []
        budget = BATCH_GRANT_BUDGET
        for req in reqs:
            cost = max(1, req.nr_segments + len(req.indirect_grefs))
            if part and cost > budget:
                yield part
                part, budget = [], BATCH_GRANT_BUDGET
            part.append(req)
            budget -= cost
        if part:
            yield part

    # ---- one batch ------------------------------------------------------------

    def _serve(self, reqs: list[Request]) -> list[tuple[int, int, int]]:
        self.stats["requests"] += len(reqs)
        replies: list[tuple[int, int, int] | None] = [None] * len(reqs)
        plans: list[IoPlan | None] = [None] * len(reqs)
        segments = self._indirect_segments(reqs, replies)
        for i, req in enumerate(reqs):
            if replies[i] is not None:
                continue
            try:
                plans[i] = plan(req, self.geometry, segments.get(i))
            except Refused as e:
                self._refuse(replies, i, req, e)
        views = self._map_data(reqs, plans, replies)
        temp = views.pop(None, [])        # mappings to give back after this batch
        try:
            for i, (req, p) in enumerate(zip(reqs, plans)):
                if replies[i] is not None or p is None:
                    continue
                try:
                    self._execute(p, views[i])
                    replies[i] = (req.id, req.operation, BLKIF_RSP_OKAY)
                    if req.indirect:
                        self.stats["indirect_requests"] += 1
                    elif req.operation in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
                        self.stats["flush_requests"] += 1
                    elif req.operation == BLKIF_OP_DISCARD:
                        self.stats["discard_requests"] += 1
                except OSError as e:
                    log.warning("%s: %s at %d+%d: %s", self.name, p.kind, p.disk_offset, p.length, e)
                    self._refuse(replies, i, req, Refused(BLKIF_RSP_ERROR, str(e)))
        finally:
            views.clear()
            if temp:
                self.host.unmap_grants(temp)
        return [r for r in replies if r is not None]

    def _refuse(self, replies: list, i: int, req: Request, e: Refused) -> None:
        self.stats["errors"] += 1
        n = self.stats["errors"]
        # A hostile frontend must not flood the log: the first few, then every thousandth.
        if worth_logging(n):
            log.warning("%s: request %#x refused (%d so far): %s", self.name, req.id, n, e)
        replies[i] = (req.id, req.operation, e.status)

    def _execute(self, p: IoPlan, bufs: list[memoryview]) -> None:
        if p.kind == "read":
            self.disk.readv(bufs, p.disk_offset)
        elif p.kind == "write":
            if p.flush_before:
                self.disk.flush()
            self.disk.writev(bufs, p.disk_offset)
            if p.flush_after:
                self.disk.flush()
        elif p.kind == "flush":
            self.disk.flush()
        elif p.kind == "discard":
            self.disk.discard(p.disk_offset, p.length)

    def _indirect_segments(self, reqs: list[Request], replies: list) -> dict[int, tuple]:
        """Read the segment descriptors of every indirect request (copied out, then parsed)."""
        wanted: dict[int, tuple[int, ...]] = {}
        for i, req in enumerate(reqs):
            if not req.indirect:
                continue
            try:
                npages = check_indirect(req, self.geometry)
            except Refused as e:
                self._refuse(replies, i, req, e)
                continue
            wanted[i] = req.indirect_grefs[:npages]
        if not wanted:
            return {}
        pages, temp = self._pages({g for grefs in wanted.values() for g in grefs}, readonly=True)
        out: dict[int, tuple] = {}
        try:
            for i, grefs in wanted.items():
                if any(g not in pages for g in grefs):
                    self._refuse(replies, i, reqs[i], Refused(BLKIF_RSP_ERROR, "indirect page not granted"))
                    continue
                n = reqs[i].nr_segments
                raw = b"".join(bytes(pages[g]) for g in grefs)[:n * SEGMENT.size]
                out[i] = tuple(parse_indirect_segments(raw, n))
        finally:
            pages.clear()
            if temp:
                self.host.unmap_grants(temp)
        return out

    def _map_data(self, reqs: list[Request], plans: list[IoPlan | None],
                  replies: list) -> dict:
        """Buffers for every planned request: {index: [views...], None: [temporary mappings]}."""
        need_rw = {c.gref for p in plans if p is not None and p.writes_to_guest for c in p.chunks}
        need_ro = {c.gref for p in plans if p is not None and not p.writes_to_guest for c in p.chunks}
        rw_pages, temp_rw = self._pages(need_rw, readonly=False)
        ro_pages, temp_ro = self._pages(need_ro - set(rw_pages), readonly=True)
        ro_pages.update(rw_pages)
        out: dict = {None: temp_rw + temp_ro}
        for i, p in enumerate(plans):
            if p is None or replies[i] is not None:
                continue
            pages = rw_pages if p.writes_to_guest else ro_pages
            if any(c.gref not in pages for c in p.chunks):
                self._refuse(replies, i, reqs[i], Refused(BLKIF_RSP_ERROR, "grant could not be mapped"))
                continue
            out[i] = [pages[c.gref][c.offset:c.offset + c.length] for c in p.chunks]
        return out

    def _pages(self, grefs: set[int], readonly: bool) -> tuple[dict[int, memoryview], list[GrantMapping]]:
        """Views of the frontend's pages; the list holds mappings to unmap after the batch.

        With persistent grants the frontend grants its pages read-write and
        keeps reusing them, so a page is mapped once (read-write) and kept;
        past the cache's limit, and without the feature, pages are mapped
        for this batch only.
        """
        pages: dict[int, memoryview] = {}
        to_map = []
        for g in grefs:
            m = self._persistent.get(g)
            if m is not None:
                pages[g] = m.view
            else:
                to_map.append(g)
        reused = len(pages)
        self.stats["persistent_reuses"] += reused
        temp: list[GrantMapping] = []
        if not to_map:
            return pages, temp
        keep = self.persistent
        if keep and self._window is None:
            # Room for as many references as we keep on either side of the first one mapped (a pool's
            # references grow from its first; an indirect page mapped first may sit at either end).
            # Address space only (16 MiB of it), no memory.
            self._window = GrantWindow(min(to_map), readonly=False, pages=2 * MAX_PERSISTENT_GRANTS)
        results = self.host.map_grants([(self.fe, g, readonly and not keep) for g in to_map],
                                       self._window if keep else None)
        for g, res in zip(to_map, results):
            m = res.mapping
            if m is None:
                log.debug("%s: map d%d ref %d: status %d", self.name, self.fe, g, res.status)
                continue
            pages[g] = m.view
            if keep and len(self._persistent) < MAX_PERSISTENT_GRANTS and self._kept.take(self.fe, VMAS_PER_PAGE):
                self._persistent[g] = m
            else:
                temp.append(m)
        self.stats["grants_mapped"] += len(pages) - reused
        self.stats["persistent_grants"] = len(self._persistent)
        return pages, temp

