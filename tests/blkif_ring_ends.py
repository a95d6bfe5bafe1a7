"""The two ends of a blkif ring, in C (the reference peer) and in Python, behind one interface.

A frontend puts requests given as specs, pushes, and collects responses; a
backend takes requests (the slot's raw bytes and the decoded request),
responds and pushes; both report the notify/work booleans ring.h's macros
return.  :func:`ring_pair` sets up any pairing over one ring file, which
Python maps one page per mmap (so a multi-page SharedRing really is a list of
separate buffers).  Used by test_blkif_rings.py.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import subprocess
from collections.abc import Iterator
from typing import Any

from blkif_c_peer import MASK32

from xdom.domains.abi.blkif import (
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_INDIRECT,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
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
    BackRing,
    FrontRing,
    RingOverflow,
    SharedRing,
    ring_size,
)

# ---------------------------------------------------------------------------
# The two ends, in C and in Python, behind one interface
# ---------------------------------------------------------------------------
# A request "spec" is what a frontend is asked to write:
#   ("rw", op, id, sector, handle, ((gref, first, last), ...))
#   ("discard", id, sector, nr_sectors, handle, flag)
#   ("indirect", op, id, sector, handle, nr_segments, (gref, ...))

Spec = tuple
Taken = tuple[str, Request]          # (hex of the slot copy, decoded request)


def spec_words(spec: Spec) -> list[Any]:
    if spec[0] == "rw":
        return [*spec[:5], len(spec[5]), *(v for seg in spec[5] for v in seg)]
    if spec[0] == "indirect":
        return [*spec[:6], len(spec[6]), *spec[6]]
    return list(spec)


def spec_bytes(abi: BlkifABI, spec: Spec) -> bytes:
    """Our packing of a spec."""
    kind, *a = spec
    if kind == "rw":
        return pack_request(abi, a[0], a[1], a[2], a[3], list(a[4]))
    if kind == "discard":
        return pack_discard_request(abi, a[0], a[1], a[2], a[3], a[4])
    return pack_indirect_request(abi, a[0], a[1], a[2], a[3], a[4], list(a[5]))


def spec_request(spec: Spec) -> Request:
    """What a backend must decode from a spec."""
    kind, *a = spec
    if kind == "rw":
        return Request(a[0], a[1], a[2], a[3], nr_segments=len(a[4]), segments=tuple(Segment(*s) for s in a[4]))
    if kind == "discard":
        return Request(BLKIF_OP_DISCARD, a[0], a[1], a[3], nr_sectors=a[2], discard_flag=a[4])
    grefs = tuple(a[5]) + (0,) * (BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST - len(a[5]))
    return Request(a[0], a[1], a[2], a[3], nr_segments=a[4], indirect=True, indirect_grefs=grefs)


def c_request(words: list[str]) -> Request:
    """A request as the C peer decoded it (see dump_request)."""
    kind, *rest = words
    v = [int(w) for w in rest]
    if kind == "rw":
        segs = tuple(Segment(*v[i:i + 3]) for i in range(5, len(v), 3))
        return Request(v[0], v[1], v[2], v[3], nr_segments=v[4], segments=segs)
    if kind == "discard":
        return Request(BLKIF_OP_DISCARD, v[0], v[1], v[3], nr_sectors=v[2], discard_flag=v[4])
    return Request(v[0], v[1], v[2], v[3], nr_segments=v[4], indirect=True, indirect_grefs=tuple(v[5:]))


def response_for(req: Request) -> tuple[int, int, int]:
    """The response a backend sends for ``req``: (id, operation as on the ring, status)."""
    op = BLKIF_OP_INDIRECT if req.indirect else req.operation
    return req.id, op, (BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP)[req.id % 3]


class RingFile:
    """The shared ring pages: a file, mapped by Python one page per mmap."""

    def __init__(self, path: str, npages: int) -> None:
        self.path, self.npages = path, npages
        with open(path, "wb") as f:
            f.write(bytes(npages * PAGE_SIZE))
        self.fd = os.open(path, os.O_RDWR)
        self.maps = [mmap.mmap(self.fd, PAGE_SIZE, offset=i * PAGE_SIZE) for i in range(npages)]
        self.pages = [memoryview(m) for m in self.maps]

    def header(self) -> tuple[int, int, int, int]:
        """(req_prod, req_event, rsp_prod, rsp_event), read independently of either end."""
        return struct.unpack_from("<4I", self.pages[0])

    def set_header(self, *values: int) -> None:
        struct.pack_into("<4I", self.pages[0], 0, *(v & MASK32 for v in values))

    def close(self) -> None:
        for view in self.pages:
            view.release()
        for m in self.maps:
            m.close()
        os.close(self.fd)


class CPeer:
    """The C peer process mapping the ring file; one command, one reply."""

    def __init__(self, exe: str, ring: RingFile) -> None:
        self.proc = subprocess.Popen([exe, ring.path, str(ring.npages)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def line(self) -> list[str]:
        out = self.proc.stdout.readline()
        if not out:
            raise AssertionError(f"C peer died (exit status {self.proc.wait(5)})")
        words = out.split()
        assert words[0] != "error", out
        return words

    def ask(self, *words: Any) -> list[str]:
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        return self.line()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            self.proc.stdout.close()


class CFront:
    def __init__(self, peer: CPeer, start: int) -> None:
        self.peer = peer
        peer.ask("init")                                       # SHARED_RING_INIT
        if start:
            peer.ask("set_idx", start, (start + 1) & MASK32, start, (start + 1) & MASK32)
        self.size = int(peer.ask("front_attach", start)[1])    # FRONT_RING_INIT / FRONT_RING_ATTACH

    def put(self, spec: Spec) -> None:
        self.peer.ask("put", *spec_words(spec))

    def push(self) -> bool:
        return self.peer.ask("push_req") == ["notify", "1"]

    def free(self) -> int:
        return int(self.peer.ask("free")[1])

    def responses(self) -> list[tuple[int, int, int]]:
        words = self.peer.ask("take_rsp")
        assert words[0] == "rsps", words
        v = [int(w) for w in words[2:]]
        return [tuple(v[i:i + 3]) for i in range(0, len(v), 3)]

    def final(self) -> bool:
        return self.peer.ask("final_rsp") == ["work", "1"]


class CBack:
    def __init__(self, peer: CPeer, start: int) -> None:
        self.peer = peer
        self.size = int(peer.ask("back_attach", start)[1])     # BACK_RING_INIT / BACK_RING_ATTACH

    def take(self, limit: int | None = None) -> list[Taken]:
        words = self.peer.ask("take_req", MASK32 if limit is None else limit)
        if words == ["overflow"]:
            raise RingOverflow("C: RING_REQUEST_PROD_OVERFLOW")
        assert words[0] == "reqs", words
        return [(w[0], c_request(w[1:])) for w in (self.peer.line() for _ in range(int(words[1])))]

    def respond(self, id: int, op: int, status: int) -> None:
        self.peer.ask("rsp", id, op, status)

    def push(self) -> bool:
        return self.peer.ask("push_rsp") == ["notify", "1"]

    def final(self) -> bool:
        return self.peer.ask("final_req") == ["work", "1"]


class PyFront:
    def __init__(self, abi: BlkifABI, ring: RingFile, start: int) -> None:
        self.abi = abi
        shared = SharedRing(ring.pages, abi.request_size, abi.response_size)
        if start == 0:
            self.ring = FrontRing(shared, init=True)
        else:
            shared.init()
            ring.set_header(start, start + 1, start, start + 1)
            self.ring = FrontRing(shared, init=False)
        self.size = self.ring.size

    def put(self, spec: Spec) -> None:
        self.ring.put_request(spec_bytes(self.abi, spec))

    def push(self) -> bool:
        return self.ring.push_requests()

    def free(self) -> int:
        return self.ring.free_requests()

    def responses(self) -> list[tuple[int, int, int]]:
        return [parse_response(self.abi, raw) for raw in self.ring.take_responses()]

    def final(self) -> bool:
        return self.ring.final_check_for_responses()


class PyBack:
    def __init__(self, abi: BlkifABI, ring: RingFile) -> None:
        self.abi = abi
        self.ring = BackRing(SharedRing(ring.pages, abi.request_size, abi.response_size))
        self.size = self.ring.size

    def take(self, limit: int | None = None) -> list[Taken]:
        return [(raw.hex(), parse_request(self.abi, raw)) for raw in self.ring.take_requests(limit)]

    def respond(self, id: int, op: int, status: int) -> None:
        self.ring.put_response(pack_response(self.abi, id, op, status))

    def push(self) -> bool:
        return self.ring.push_responses()

    def final(self) -> bool:
        return self.ring.final_check_for_requests()


@contextlib.contextmanager
def ring_pair(exe: str, abi: BlkifABI, npages: int, start: int, front_kind: str, back_kind: str,
              path: str) -> Iterator[tuple[Any, Any, RingFile]]:
    """A frontend and a backend ("c" or "py") over one fresh ring file starting at index ``start``."""
    ring = RingFile(path, npages)
    peers: list[CPeer] = []
    try:
        def peer() -> CPeer:
            peers.append(CPeer(exe, ring))
            return peers[-1]
        front = CFront(peer(), start) if front_kind == "c" else PyFront(abi, ring, start)
        back = CBack(peer(), start) if back_kind == "c" else PyBack(abi, ring)
        assert front.size == back.size == ring_size(npages, abi.request_size, abi.response_size)
        yield front, back, ring
    finally:
        for p in peers:
            p.close()
        front = back = None
        ring.close()

