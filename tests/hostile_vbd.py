"""A blkif frontend written by hand, hostile to blkback: it follows the protocol only as far as a test wants.

Its own domain, handshake, ring, grants and crafted requests (raw bytes, any
id, segment, sector or index), and the checks a test makes of what came
back: the response for each id, zero padding in every response slot, every
grant it gave ended again.  The rig it runs in is blkback_harness.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import struct
import time
from typing import TYPE_CHECKING

from helpers import wait_until
from xs_fixtures import introduce

from xdom.deploy.vbd import VbdConfig, add_vbd
from xdom.domains.abi.blkif import (
    ABIS,
    BLKIF_OP_READ,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    PROTOCOL_X86_64,
    X86_32,
    X86_64,
    BlkifABI,
    abi_for,
    pack_discard_request,
    pack_indirect_request,
    pack_request,
    pack_response,
    parse_response,
)
from xdom.domains.abi.ring import FrontRing, SharedRing
from xdom.domains.frame_pool import FramePool
from xdom.domains.xenbus import XenbusState, backend_path, frontend_path, read_state

if TYPE_CHECKING:
    from blkback_harness import Env  # the rig a Hostile runs in (it imports this module)


PAGE = 4096
HOSTILE_DEVID = 51712        # xvda of the hostile guest
HOSTILE_IMAGE = 4 << 20
WAIT = 30.0                  # generous (loaded CI): every wait is a deadline, never a sleep before an assertion
OK, ERR, NOTSUPP = BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP
_REQ_PROD, _REQ_EVENT, _RSP_PROD, _RSP_EVENT = 0, 4, 8, 12


def padding_offsets(abi: BlkifABI) -> list[int]:
    """The bytes of a response slot that belong to no field (they must be written as zeros)."""
    full = pack_response(abi, 2**64 - 1, 255, -1)
    return [i for i, b in enumerate(full) if b == 0]


def nz_id(rng: random.Random) -> int:
    """A request id with no zero byte: the request's id bytes overlap the response's padding."""
    return int.from_bytes(bytes(rng.randrange(1, 256) for _ in range(8)), "little")


def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---- the hostile device --------------------------------------------------------------------------

class Hostile:
    """A frontend written by hand: it follows the protocol only as far as each test wants."""

    def __init__(self, env: Env, name: str = "evil", read_only: bool = False,
                 logical_sector_size: int | None = None, image_size: int = HOSTILE_IMAGE,
                 grant_frames: int = 32) -> None:
        self.env = env
        self.host = env.hv.create_domain(name, "4M", grant_frames=grant_frames)
        env.hosts.append(self.host)
        self.pool = FramePool.of(self.host)
        self.image = env.make_image(f"{name}.img", image_size)
        self.image_sha = sha(self.image)
        self.image_size = image_size
        self.sectors = image_size // 512
        self.devid = HOSTILE_DEVID
        self.read_only = read_only
        introduce(env.xs, env.be.domid, self.host.domid)
        add_vbd(env.xs, VbdConfig(env.be.domid, self.host.domid, self.devid, "xvda", self.image,
                                  read_only=read_only, logical_sector_size=logical_sector_size))
        self.path = frontend_path(self.host.domid, "vbd", self.devid)
        self.be_path = backend_path(env.be.domid, "vbd", self.host.domid, self.devid)
        self.xs = env.xs
        self.abi: BlkifABI = abi_for(PROTOCOL_X86_64)
        self.refs: list[int] = []          # every grant we gave (checked ended at the end)
        self.port = -1
        self.ring: FrontRing | None = None
        self.rng = random.Random(2)
        self.sent = 0
        self.closed = False

    # xenbus ------------------------------------------------------------------------------
    def backend_state(self) -> XenbusState:
        return read_state(self.xs, self.be_path)

    def wait_backend(self, *states: XenbusState, timeout: float = WAIT) -> XenbusState:
        return wait_until(lambda: self.backend_state() if self.backend_state() in states else None,
                          timeout, f"backend {self.be_path} in {[s.name for s in states]} "
                                   f"(is {self.backend_state().name})")

    def grant(self, data: bytes | None = None, readonly: bool = False, to: int | None = None) -> tuple[int, int]:
        (gfn,) = self.pool.alloc(1)
        frame = self.host.memory.frame(gfn)
        frame[:] = data if data is not None else bytes(PAGE)
        ref = self.host.gnttab.grant_access(self.env.be.domid if to is None else to, gfn, readonly=readonly)
        self.refs.append(ref)
        return gfn, ref

    def connect(self, protocol: str | None = PROTOCOL_X86_64, persistent: bool = False, order: int = 0,
                ring_header: tuple[int, int] | None = None, expect: XenbusState = XenbusState.Connected,
                extra: dict[str, str | int] | None = None, ring_readonly: bool = False,
                timeout: float = WAIT) -> None:
        """The handshake by hand: wait InitWait, grant a zeroed ring, publish, Initialised, wait ``expect``.

        ``protocol=None`` leaves the ``protocol`` node out (a frontend older than the node).
        """
        self.wait_backend(XenbusState.InitWait)
        # No node: Linux's BLKIF_PROTOCOL_DEFAULT on x86 (not our abi_for, which is under test).
        # An unknown protocol closes the device before the ring is used: any layout will do then.
        self.abi = X86_32 if protocol is None else abi_for(protocol) if protocol in ABIS else X86_64
        nodes: dict[str, str | int] = {"feature-persistent": int(persistent)}
        if protocol is not None:
            nodes["protocol"] = protocol
        pages = []
        for i in range(1 << order):
            gfn, ref = self.grant(readonly=ring_readonly)
            pages.append(self.host.memory.frame(gfn))
            nodes["ring-ref" if order == 0 else f"ring-ref{i}"] = ref
        if order:
            nodes["ring-page-order"] = order
        shared = SharedRing(pages, self.abi.request_size, self.abi.response_size)
        shared.init()
        if ring_header is not None:          # start the indices wherever a frontend likes
            shared.set(_REQ_PROD, ring_header[0])
            shared.set(_RSP_PROD, ring_header[1])
        self.ring = FrontRing(shared, init=False)
        self.port = self.host.alloc_unbound(self.env.be.domid)
        nodes["event-channel"] = self.port
        nodes.update(extra or {})
        self.publish(nodes, XenbusState.Initialised)
        self.wait_backend(expect, timeout=timeout)

    def publish(self, nodes: dict[str, str | int], state: XenbusState | None = None) -> None:
        def body(tx: int) -> None:
            for k, v in nodes.items():
                self.xs.write(f"{self.path}/{k}", str(v), tx)
            if state is not None:
                self.xs.write(f"{self.path}/state", str(int(state)), tx)
        self.xs.transaction(body)

    def set_state(self, state: XenbusState) -> None:
        self.xs.write(f"{self.path}/state", str(int(state)))

    # the ring ----------------------------------------------------------------------------
    def send(self, raws: list[bytes]) -> None:
        assert self.ring is not None
        for raw in raws:
            assert len(raw) == self.abi.request_size
            self.ring.put_request(raw)
        self.ring.push_requests()
        self.host.notify(self.port)        # hostile: notify whatever req_event says
        self.sent += len(raws)

    def collect(self, n: int, timeout: float = WAIT) -> list[bytes]:
        """Wait for ``n`` responses: the event channel's fd with a deadline, and the ring looked at anyway."""
        assert self.ring is not None
        out: list[bytes] = []
        deadline = time.monotonic() + timeout
        fd = self.host.evtchn.fileno(self.port)
        while True:
            out += self.ring.take_responses()
            if len(out) >= n:
                return out
            if self.ring.final_check_for_responses():
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{len(out)} of {n} responses within {timeout}s "
                                     f"(backend {self.backend_state().name})")
            select.select([fd], [], [], min(remaining, 0.1))
            self.host.evtchn.consume(self.port)

    def check_response(self, raw: bytes) -> tuple[int, int, int]:
        assert len(raw) == self.abi.response_size
        for off in padding_offsets(self.abi):
            assert raw[off] == 0, f"response padding byte {off} is {raw[off]:#x}: {raw.hex()}"
        return parse_response(self.abi, raw)

    def roundtrip(self, raws: list[bytes], timeout: float = WAIT) -> dict[int, tuple[int, int]]:
        """Send, collect exactly one response per request: {id: (operation, status)}."""
        ids = [self.id_of(raw) for raw in raws]
        assert len(set(ids)) == len(ids)
        self.send(raws)
        got: dict[int, tuple[int, int]] = {}
        for raw in self.collect(len(raws), timeout):
            rid, op, status = self.check_response(raw)
            assert rid in ids, f"response for id {rid:#x} we never sent"
            assert rid not in got, f"two responses for id {rid:#x}"
            got[rid] = (op, status)
        assert self.ring is not None
        assert self.ring.unconsumed_responses() == 0
        return got

    def id_of(self, raw: bytes) -> int:
        off = 8 if self.abi.name == PROTOCOL_X86_64 else 4
        return struct.unpack_from("<Q", raw, off)[0]

    def new_id(self) -> int:
        return nz_id(self.rng)

    # request builders --------------------------------------------------------------------
    def rw(self, op: int, sector: int, segs: list[tuple[int, int, int]], rid: int | None = None) -> bytes:
        return pack_request(self.abi, op, self.new_id() if rid is None else rid, sector, self.devid, segs)

    def indirect(self, op: int, sector: int, nr_segments: int, grefs: list[int]) -> bytes:
        return pack_indirect_request(self.abi, op, self.new_id(), sector, self.devid, nr_segments, grefs)

    def discard(self, sector: int, nr: int, flag: int = 0) -> bytes:
        return pack_discard_request(self.abi, self.new_id(), sector, nr, self.devid, flag)

    def expect(self, cases: list[tuple[bytes, int | tuple[int, ...]]]) -> dict[int, tuple[int, int]]:
        """One batch; each request gets exactly one response with the expected status(es)."""
        got = self.roundtrip([raw for raw, _ in cases])
        for raw, want in cases:
            _, status = got[self.id_of(raw)]
            wants = want if isinstance(want, tuple) else (want,)
            assert status in wants, f"request {raw[:32].hex()}: status {status}, expected {wants}"
        return got

    def sentinel(self) -> None:
        """A valid read after everything else: proves the ring still works and nothing was answered twice."""
        gfn, ref = self.grant()
        sector = self.rng.randrange(0, self.sectors - 8) & ~7
        raw = self.rw(BLKIF_OP_READ, sector, [(ref, 0, 7)])
        got = self.roundtrip([raw])
        assert list(got.values()) == [(BLKIF_OP_READ, OK)]
        with open(self.image, "rb") as f:
            f.seek(sector * 512)
            assert bytes(self.host.memory.frame(gfn)) == f.read(PAGE)

    # teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Closing, Closed; the backend must let go of every grant we gave."""
        if self.closed:
            return
        self.closed = True
        self.set_state(XenbusState.Closing)
        self.set_state(XenbusState.Closed)
        self.wait_backend(XenbusState.Closed)
        self.assert_grants_released()
        if self.port >= 0:
            self.host.close_port(self.port)
            self.port = -1

    def assert_grants_released(self) -> None:
        still = [ref for ref in self.refs if not self.host.gnttab.try_end_access(ref)]
        assert not still, f"backend still maps grants {still} of the hostile frontend"
        for ref in self.refs:
            self.host.gnttab.release_ref(ref)
        self.refs = []

    def assert_image_intact(self) -> None:
        assert os.path.getsize(self.image) == self.image_size, "image size changed"
        assert sha(self.image) == self.image_sha, "image content changed"
