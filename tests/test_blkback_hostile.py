"""Hostile frontends against blkback (Linux xen-blkback semantics).

Every test runs its own xenstored, an in-process hypervisor with a backend
domain serving a :class:`BlkbackServer`, a *hostile* frontend domain whose
device is driven by hand from this file (handshake, ring, grants, crafted
requests), and a *good* frontend domain whose device is driven by our own
:class:`Blkfront`.

For each abuse the backend must answer BLKIF_RSP_ERROR / BLKIF_RSP_EOPNOTSUPP
with the request's id (nothing else happens: the image is unchanged) or
close that one device (state Closing); it must never crash; the good device
keeps working during and after; responses never carry uninitialised bytes
(the padding of every response slot is zero, even though the request that
occupied the slot had non-zero bytes there); and at the end every grant the
hostile frontend gave is unmapped again, and no ``blkback-*`` thread
survives :meth:`BlkbackServer.close`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import select
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from helpers import wait_until
from xs_fixtures import introduce, start_xenstored

from xdom.backends.blkback.server import BlkbackServer
from xdom.deploy.vbd import VbdConfig, add_vbd
from xdom.domains.abi.blkif import (
    ABIS,
    BLKIF_DISCARD_SECURE,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    PROTOCOL_X86_32,
    PROTOCOL_X86_64,
    X86_32,
    X86_64,
    BlkifABI,
    abi_for,
    pack_discard_request,
    pack_indirect_request,
    pack_request,
    pack_response,
    pack_segments,
    parse_response,
)
from xdom.domains.abi.ring import RING_HEADER_SIZE, FrontRing, SharedRing
from xdom.domains.blkfront.device import Blkfront, FrontendOptions
from xdom.domains.frame_pool import FramePool
from xdom.domains.xenbus import XenbusState, backend_path, frontend_path, read_state
from xdom.domains.xenhost import LocalHypervisor
from xdom.domains.xenstore import XenstoreClient

pytestmark = pytest.mark.timeout(60)

PAGE = 4096
HOSTILE_DEVID = 51712        # xvda of the hostile guest
GOOD_DEVID = 51728           # xvdb of the good guest
HOSTILE_IMAGE = 4 << 20
GOOD_IMAGE = 2 << 20
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


class CrashLog(logging.Handler):
    """Records what only a crash logs: a traceback (log.exception) or a failed watch callback."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or "watch callback failed" in record.getMessage():
            self.records.append(record)

    def summary(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}: {r.exc_info[1]!r}" if r.exc_info else r.getMessage()
                for r in self.records]


def blkback_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("blkback-")]


def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---- the good device ---------------------------------------------------------------------------

class GoodDevice:
    """Our well-behaved Blkfront on its own domain; :meth:`check` writes, reads back and compares."""

    def __init__(self, env: Env, options: FrontendOptions) -> None:
        self.env = env
        self.host = env.hv.create_domain("good", "8M")
        env.hosts.append(self.host)
        self.image = env.make_image("good.img", GOOD_IMAGE)
        introduce(env.xs, env.be.domid, self.host.domid)
        add_vbd(env.xs, VbdConfig(env.be.domid, self.host.domid, GOOD_DEVID, "xvdb", self.image))
        self.front = Blkfront(self.host, env.client(), GOOD_DEVID, options)
        self.front.connect(WAIT)
        self.rng = random.Random(1)
        self.lock = threading.Lock()
        self.rounds = 0
        self.closed = False

    def _sync(self, fn, *args):
        ev = threading.Event()
        res: list = []

        def done(err, data=None):
            res.append((err, b"".join(bytes(d) for d in data) if data is not None else None))
            ev.set()
        fn(*args, done)
        assert ev.wait(WAIT), f"good device: {fn.__name__} did not complete"
        return res[0]

    def check(self) -> None:
        """One write/read-back round through the backend, checked against the image file too."""
        with self.lock:
            length = self.rng.choice([512, 4096, 12288, 65536])
            offset = self.rng.randrange(0, (GOOD_IMAGE - length) // 512) * 512
            data = self.rng.randbytes(length)
            err, _ = self._sync(self.front.submit_write, offset, memoryview(data), False)
            assert err == 0, f"good device: write failed with {err}"
            err, got = self._sync(self.front.submit_read, offset, length)
            assert err == 0 and got == data, "good device: read back differs"
            with open(self.image, "rb") as f:
                f.seek(offset)
                assert f.read(length) == data, "good device: image file differs"
            self.rounds += 1

    def ring_thread_alive(self) -> bool:
        name = f"blkback-vbd{self.host.domid}.{GOOD_DEVID}q0"
        return any(t.name == name and t.is_alive() for t in threading.enumerate())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.front.close()


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


# ---- the rig -----------------------------------------------------------------------------------

class Env:
    def __init__(self, run_dir: str, good_persistent: bool = True) -> None:
        self.run_dir = run_dir
        self.xenstored = start_xenstored(run_dir)
        self.clients: list[XenstoreClient] = []
        self.hosts: list = []
        self.dead: list = []              # domains a test already destroyed
        self.server: BlkbackServer | None = None
        self.good: GoodDevice | None = None
        self.crashes = CrashLog()
        logging.getLogger("xdom").addHandler(self.crashes)
        self.hv = LocalHypervisor()
        try:
            self.be = self.hv.create_domain("blk", "1M")
            self.hosts.append(self.be)
            self.xs = self.client()
            self.server = BlkbackServer(self.be, self.client())
            self.server.start()
            self.good = GoodDevice(self, FrontendOptions(persistent=good_persistent))
            self.good.check()
        except BaseException:
            self._release()
            raise

    def client(self) -> XenstoreClient:
        c = XenstoreClient.unix(self.xenstored.socket_path)
        self.clients.append(c)
        return c

    def make_image(self, name: str, size: int) -> str:
        path = os.path.join(self.run_dir, name)
        with open(path, "wb") as f:
            f.write(random.Random(name).randbytes(size))
        return path

    def hostile(self, **kw) -> Hostile:
        return Hostile(self, **kw)

    @contextmanager
    def good_load(self) -> Iterator[None]:
        """The good device doing I/O on a thread for the duration (at least one round inside)."""
        stop = threading.Event()
        errors: list[BaseException] = []
        started = self.good.rounds

        def run() -> None:
            while not stop.wait(0.001):          # pacing only: leave the GIL to the backend's threads
                try:
                    self.good.check()
                except BaseException as e:      # reported by the main thread
                    errors.append(e)
                    return
        t = threading.Thread(target=run, name="good-load", daemon=True)
        t.start()
        try:
            yield
            wait_until(lambda: self.good.rounds > started or errors, WAIT, "a good round during the abuse")
        finally:
            stop.set()
            t.join(WAIT)
        assert not t.is_alive(), "good device load is stuck"
        assert not errors, f"good device failed during the abuse: {errors[0]!r}"

    def after(self) -> None:
        """What every test checks at its end: the server is sane and the good device still works."""
        assert not self.crashes.records, f"something crashed: {self.crashes.summary()}"
        assert self.good.ring_thread_alive(), "the good device's ring thread died"
        for _ in range(3):
            self.good.check()
        stats = self.server.vbds[(self.good.host.domid, GOOD_DEVID)].stats()
        assert stats["requests"] >= 6 and stats["errors"] == 0, stats
        assert stats["batches"] <= stats["requests"]

    def close(self) -> None:
        try:
            if self.good is not None:
                self.good.close()
            if self.server is not None:
                self.server.close()
            leaked = [t.name for t in blkback_threads()]
            assert not leaked, f"blkback threads left after close: {leaked}"
        finally:
            self._release()

    def _release(self) -> None:
        try:
            if self.good is not None:
                self.good.close()
            if self.server is not None:
                self.server.close()
            for c in self.clients:
                c.close()
            for h in reversed(self.hosts):
                if h not in self.dead:
                    h.close()
            self.hv.close()
            # In-process domains keep their memory mapped (a frame per mapping);
            # give it back, or a worker runs out of vm.max_map_count after a few tests.
            for h in self.hosts:
                h.memory.close()
        finally:
            logging.getLogger("xdom").removeHandler(self.crashes)
            self.xenstored.stop()


@pytest.fixture
def env(request: pytest.FixtureRequest, run_dir: str) -> Iterator[Env]:
    e = Env(run_dir, **getattr(request, "param", {}))
    try:
        yield e
    finally:
        e.close()


def finish(env: Env, h: Hostile, closed_by_backend: bool = False) -> None:
    """End of a test: the hostile device answered (or was closed), the server and good device are fine."""
    if closed_by_backend:
        if read_state(h.xs, h.path) == XenbusState.Connected:
            # The frontend still says Connected, so nothing makes the backend try
            # again: closing the device has unmapped everything, even the ring.
            assert h.backend_state() == XenbusState.Closing
        else:
            # A frontend left in Initialised gets another connection attempt for
            # every event of its state node (the watch's first firing included),
            # as with Linux's frontend_changed(): the device may go Closing more
            # than once.  Once the frontend is Closed, the backend is settled.
            h.close()
        assert env.server.vbds[(h.host.domid, h.devid)].rings == []
        assert not [t for t in blkback_threads() if t.name.startswith(f"blkback-vbd{h.host.domid}.")]
        h.assert_grants_released()
    else:
        assert h.backend_state() == XenbusState.Connected
        h.sentinel()
        stats = env.server.vbds[(h.host.domid, h.devid)].stats()
        assert stats["requests"] == h.sent, (stats, h.sent)
    env.after()
    h.close()


# ---- grants ------------------------------------------------------------------------------------

@pytest.mark.parametrize("persistent", [False, True], ids=["plain", "persistent"])
def test_bad_grant_refs(env: Env, persistent: bool) -> None:
    h = env.hostile()
    h.connect(persistent=persistent)
    nr_entries = h.host.gnttab.nr_entries
    # A page the frontend granted to somebody else, and a reference the *good*
    # frontend granted to the backend (the backend must look in the hostile
    # frontend's own table, never in another domain's).
    _, to_other = h.grant(to=env.good.host.domid)
    with open(h.image, "rb") as f:
        f.seek(2040 * 512)
        _, ro_ref = h.grant(f.read(PAGE), readonly=True)
    ok_gfn, ok_ref = h.grant()
    never = max(h.refs) + 100
    assert h.host.gnttab.entry(never)[0] == 0
    good_gt = env.good.host.gnttab
    (good_gfn,) = FramePool.of(env.good.host).alloc(1)
    spare = []
    while True:         # a reference the good frontend granted the backend, free in the hostile table
        good_ref = good_gt.grant_access(env.be.domid, good_gfn)
        if good_ref not in h.refs and good_ref != never:
            break
        spare.append(good_ref)
    for ref in spare:
        good_gt.end_and_release(ref)
    assert h.host.gnttab.entry(good_ref)[0] == 0
    bad_refs = [never, to_other, good_ref, nr_entries, nr_entries + 1, 2**31, 2**32 - 1, 0, 7]
    with env.good_load():
        for op in (BLKIF_OP_READ, BLKIF_OP_WRITE):
            cases = [(h.rw(op, 0, [(ref, 0, 7)]), ERR) for ref in bad_refs]
            # a bad segment after a good one fails the whole request
            cases.append((h.rw(op, 8, [(ok_ref, 0, 7), (never, 0, 7)]), ERR))
            # a good request in the same batch is served
            cases.append((h.rw(BLKIF_OP_READ, 16, [(ok_ref, 0, 7)]), OK))
            h.expect(cases)
            with open(h.image, "rb") as f:
                f.seek(16 * 512)
                assert bytes(h.host.memory.frame(ok_gfn)) == f.read(PAGE)
        # the backend writes into a READ's pages: a read-only grant must not do
        h.expect([(h.rw(BLKIF_OP_READ, 0, [(ro_ref, 0, 7)]), ERR)])
        # a WRITE only reads the page; with persistent grants Linux maps read-write and refuses
        h.expect([(h.rw(BLKIF_OP_WRITE, 2040, [(ro_ref, 0, 7)]), (OK, ERR) if persistent else OK)])
    assert env.good.host.gnttab.try_end_access(good_ref), "the backend mapped the good frontend's grant"
    h.assert_image_intact()
    finish(env, h)


def test_persistent_grant_cache_overflow(env: Env) -> None:
    """A persistent frontend naming far more grants than the backend keeps: served, and all given back."""
    h = env.hostile(grant_frames=64)
    h.connect(persistent=True)
    (gfn,) = h.pool.alloc(1)
    gt = h.host.gnttab
    raws = []
    for k in range(12):                              # 3072 distinct grants of one frame, > the cache's 2048
        refs = [gt.grant_access(env.be.domid, gfn) for _ in range(256)]
        h.refs += refs
        _, iref = h.grant(pack_segments([(r, 0, 7) for r in refs]))
        raws.append(h.indirect(BLKIF_OP_READ, 8 * k, 256, [iref]))
    with env.good_load():
        for _ in range(2):
            for i in range(0, len(raws), 4):
                batch = [bytearray(r) for r in raws[i:i + 4]]
                for b in batch:                      # fresh ids: the same requests again
                    struct.pack_into("<Q", b, 8, h.new_id())
                got = h.roundtrip([bytes(b) for b in batch])
                assert all(v == (BLKIF_OP_READ, OK) for v in got.values()), got
    finish(env, h)                                   # h.close() checks every one of the 3000+ grants ended


# ---- direct requests: counts and sectors -------------------------------------------------------

@pytest.mark.parametrize("protocol", [PROTOCOL_X86_64, PROTOCOL_X86_32])
def test_bad_segment_counts(env: Env, protocol: str) -> None:
    h = env.hostile()
    h.connect(protocol=protocol)
    _, ref = h.grant()
    seg = (ref, 0, 7)
    nseg_off = 1

    def with_count(op: int, n: int) -> bytes:
        raw = bytearray(h.rw(op, 0, [seg] * 11))
        raw[nseg_off] = n
        return bytes(raw)
    with env.good_load():
        h.expect([(with_count(op, n), ERR) for op in (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER,
                                                      BLKIF_OP_FLUSH_DISKCACHE)
                  for n in (12, 13, 100, 255)])
        h.expect([(h.rw(BLKIF_OP_READ, 0, []), ERR), (h.rw(BLKIF_OP_WRITE, 0, []), ERR),
                  (h.rw(BLKIF_OP_READ, 0, [seg] * 11), OK)])
    h.assert_image_intact()
    finish(env, h)


@pytest.mark.parametrize("protocol", [PROTOCOL_X86_64, PROTOCOL_X86_32])
def test_bad_sector_ranges(env: Env, protocol: str) -> None:
    h = env.hostile()
    h.connect(protocol=protocol)
    _, ref = h.grant()
    _, ref2 = h.grant()
    end = h.sectors
    cases = []
    for op in (BLKIF_OP_READ, BLKIF_OP_WRITE):
        cases += [
            (h.rw(op, 0, [(ref, 5, 4)]), ERR),                       # first_sect > last_sect
            (h.rw(op, 0, [(ref, 7, 0)]), ERR),
            (h.rw(op, 0, [(ref, 0, 8)]), ERR),                       # last_sect past the page
            (h.rw(op, 0, [(ref, 8, 8)]), ERR),
            (h.rw(op, 0, [(ref, 0, 255)]), ERR),
            (h.rw(op, 0, [(ref, 0, 7), (ref2, 3, 2)]), ERR),         # only the second segment is bad
            (h.rw(op, end, [(ref, 0, 0)]), ERR),                     # just past the end
            (h.rw(op, end - 4, [(ref, 0, 7)]), ERR),                 # crossing the end
            (h.rw(op, end - 8, [(ref, 0, 7), (ref2, 0, 0)]), ERR),   # crossing by one sector
            (h.rw(op, 2**64 - 1, [(ref, 0, 0)]), ERR),               # u64 arithmetic must not wrap
            (h.rw(op, 2**64 - 8, [(ref, 0, 7), (ref2, 0, 7)]), ERR),
            (h.rw(op, 2**63, [(ref, 0, 7)]), ERR),
        ]
    cases += [
        (h.discard(end, 1), ERR),
        (h.discard(end - 1, 2), ERR),
        (h.discard(0, end + 1), ERR),
        (h.discard(2**64 - 1, 2), ERR),                              # wraps to 0 in u64 arithmetic
        (h.discard(1, 2**64 - 1), ERR),
        (h.discard(2**63, 2**63), ERR),
    ]
    with env.good_load():
        h.expect(cases)
        # the valid edges are served
        h.expect([(h.rw(BLKIF_OP_READ, end - 8, [(ref, 0, 7)]), OK),
                  (h.rw(BLKIF_OP_READ, end - 1, [(ref, 7, 7)]), OK)])
    h.assert_image_intact()
    finish(env, h)


@pytest.mark.parametrize("protocol", [PROTOCOL_X86_64, PROTOCOL_X86_32])
def test_bad_requests_on_pages_already_mapped_persistently(env: Env, protocol: str) -> None:
    """blkback serves a direct READ/WRITE on persistently mapped pages by a shorter path: once the
    pages are mapped, every bad count, segment and sector range must still be refused."""
    h = env.hostile()
    h.connect(protocol=protocol, persistent=True)
    _, ref = h.grant()
    _, ref2 = h.grant()
    end = h.sectors
    with env.good_load():
        h.expect([(h.rw(BLKIF_OP_READ, 0, [(ref, 0, 7), (ref2, 0, 7)]), OK)])     # both mapped now
        cases = []
        for op in (BLKIF_OP_READ, BLKIF_OP_WRITE):
            for n in (0, 12, 255):
                raw = bytearray(h.rw(op, 0, [(ref, 0, 7)] * 11))
                raw[1] = n
                cases.append((bytes(raw), ERR))
            cases += [
                (h.rw(op, 0, [(ref, 5, 4)]), ERR),
                (h.rw(op, 0, [(ref, 0, 8)]), ERR),
                (h.rw(op, 0, [(ref, 0, 7), (ref2, 3, 2)]), ERR),
                (h.rw(op, 0, [(ref, 0, 7), (0x7FFF, 0, 7)]), ERR),     # one page never granted
                (h.rw(op, end, [(ref, 0, 0)]), ERR),
                (h.rw(op, end - 8, [(ref, 0, 7), (ref2, 0, 0)]), ERR),
                (h.rw(op, 2**64 - 1, [(ref, 0, 0)]), ERR),
                (h.rw(op, 2**64 - 8, [(ref, 0, 7), (ref2, 0, 7)]), ERR),
            ]
        h.expect(cases)
        h.expect([(h.rw(BLKIF_OP_READ, end - 8, [(ref, 0, 7)]), OK),
                  (h.rw(BLKIF_OP_READ, end - 1, [(ref2, 7, 7)]), OK)])
    h.assert_image_intact()
    stats = env.server.vbds[(h.host.domid, h.devid)].stats()
    assert stats["persistent_reuses"] > 0, stats
    finish(env, h)


def test_discard_secure_flag_is_harmless(env: Env) -> None:
    """discard-secure is 0: Linux does a plain discard then (or EOPNOTSUPP); never more."""
    h = env.hostile()
    h.connect()
    with env.good_load():
        h.expect([(h.discard(8, 8, flag=BLKIF_DISCARD_SECURE), (OK, NOTSUPP)),
                  (h.discard(16, 8, flag=0xFF), (OK, NOTSUPP, ERR))])
    assert os.path.getsize(h.image) == h.image_size
    finish(env, h)


# ---- read-only disk ----------------------------------------------------------------------------

@pytest.mark.parametrize("persistent", [False, True], ids=["plain", "persistent"])
def test_writes_to_read_only_disk(env: Env, persistent: bool) -> None:
    h = env.hostile(read_only=True)
    h.connect(persistent=persistent)
    assert int(env.xs.read(f"{h.be_path}/info")) & 4
    gfn, ref = h.grant(b"\xee" * PAGE)
    _, iref = h.grant(pack_segments([(ref, 0, 7)] * 4))
    with env.good_load():
        h.expect([
            (h.rw(BLKIF_OP_WRITE, 0, [(ref, 0, 7)]), ERR),
            (h.rw(BLKIF_OP_WRITE, 8, [(ref, 0, 0)] * 11), ERR),
            (h.rw(BLKIF_OP_WRITE_BARRIER, 0, [(ref, 0, 7)]), ERR),
            (h.rw(BLKIF_OP_WRITE_BARRIER, 0, []), ERR),
            (h.rw(BLKIF_OP_FLUSH_DISKCACHE, 0, [(ref, 0, 7)]), ERR),
            (h.indirect(BLKIF_OP_WRITE, 0, 4, [iref]), ERR),
            (h.discard(0, 8), (ERR, NOTSUPP)),
            (h.rw(BLKIF_OP_FLUSH_DISKCACHE, 0, []), (OK, ERR)),   # Linux: ERROR; a no-op flush is harmless
            (h.rw(BLKIF_OP_READ, 8, [(ref, 0, 7)]), OK),           # reading is fine
        ])
    with open(h.image, "rb") as f:
        f.seek(8 * 512)
        assert bytes(h.host.memory.frame(gfn)) == f.read(PAGE)
    h.assert_image_intact()
    finish(env, h)


# ---- operations --------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [PROTOCOL_X86_64, PROTOCOL_X86_32])
def test_unknown_operations(env: Env, protocol: str) -> None:
    h = env.hostile()
    h.connect(protocol=protocol)
    _, ref = h.grant()
    ops = [4, 7, 8, 9, 100, 127, 128, 200, 254, 255]
    with env.good_load():
        got = h.expect([(h.rw(op, 0, [(ref, 0, 7)]), NOTSUPP) for op in ops]
                       + [(h.rw(op, 0, []), NOTSUPP) for op in ops])
        assert sorted(op for op, _ in got.values()) == sorted(ops * 2)   # the response names the operation
    h.assert_image_intact()
    finish(env, h)


# ---- indirect requests -------------------------------------------------------------------------

@pytest.mark.parametrize("persistent", [False, True], ids=["plain", "persistent"])
def test_indirect_hostile(env: Env, persistent: bool) -> None:
    h = env.hostile()
    h.connect(persistent=persistent)
    data = [h.grant() for _ in range(16)]
    segs = [(ref, 0, 7) for _, ref in data]
    _, iref = h.grant(pack_segments(segs))
    _, iref_ro = h.grant(pack_segments(segs), readonly=True)
    _, garbage = h.grant(random.Random(3).randbytes(PAGE))
    _, bad_sects = h.grant(pack_segments([(data[0][1], 7, 0)] + segs[1:]))
    _, past_page = h.grant(pack_segments(segs[:3] + [(data[3][1], 0, 8)]))
    _, bad_data_ref = h.grant(pack_segments(segs[:5] + [(h.host.gnttab.nr_entries + 5, 0, 7)]))
    _, to_other = h.grant(pack_segments(segs), to=env.good.host.domid)
    never = max(h.refs) + 100
    end = h.sectors
    cases = [
        (h.indirect(BLKIF_OP_READ, 0, 0, [iref]), ERR),
        (h.indirect(BLKIF_OP_WRITE, 0, 0, [iref]), ERR),
        (h.indirect(BLKIF_OP_READ, 0, 257, [iref] * 8), ERR),
        (h.indirect(BLKIF_OP_READ, 0, 512, [iref] * 8), ERR),
        (h.indirect(BLKIF_OP_READ, 0, 65535, [iref] * 8), ERR),
        (h.indirect(BLKIF_OP_WRITE, 0, 4096, [iref] * 8), ERR),
        (h.indirect(BLKIF_OP_READ, 0, 16, [never]), ERR),
        (h.indirect(BLKIF_OP_READ, 0, 16, [h.host.gnttab.nr_entries]), ERR),
        (h.indirect(BLKIF_OP_READ, 0, 16, [2**32 - 1]), ERR),
        (h.indirect(BLKIF_OP_READ, 0, 16, [to_other]), ERR),
        (h.indirect(BLKIF_OP_READ, 0, 256, [garbage]), ERR),
        (h.indirect(BLKIF_OP_WRITE, 0, 256, [garbage]), ERR),
        (h.indirect(BLKIF_OP_WRITE, 0, 16, [bad_sects]), ERR),
        (h.indirect(BLKIF_OP_WRITE, 0, 4, [past_page]), ERR),
        (h.indirect(BLKIF_OP_WRITE, 0, 6, [bad_data_ref]), ERR),
        (h.indirect(BLKIF_OP_READ, end - 8, 16, [iref]), ERR),          # crosses the end
        (h.indirect(BLKIF_OP_READ, 2**64 - 8, 16, [iref]), ERR),
        (h.indirect(BLKIF_OP_READ, 0, 17, [iref]), ERR),        # the 17th descriptor names gref 0
    ]
    for inner in (BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE, 4, BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT,
                  7, 255):
        cases.append((h.indirect(inner, 0, 16, [iref]), ERR))
    with env.good_load():
        h.expect(cases)
        if not persistent:
            # an indirect page only has to be readable
            h.expect([(h.indirect(BLKIF_OP_READ, 64, 16, [iref_ro]), OK)])
        got_ok = h.expect([(h.indirect(BLKIF_OP_READ, 128, 16, [iref]), OK)])
        assert list(got_ok.values())[0][0] == BLKIF_OP_READ
    with open(h.image, "rb") as f:
        f.seek(128 * 512)
        want = f.read(16 * PAGE)
    assert b"".join(bytes(h.host.memory.frame(g)) for g, _ in data) == want
    h.assert_image_intact()
    finish(env, h)


def test_indirect_hostile_on_pages_already_mapped_persistently(env: Env) -> None:
    """blkback serves an indirect READ/WRITE whose pages it already keeps by a shorter path: descriptors
    rewritten in a kept indirect page, and every bad count or range, must still be refused."""
    h = env.hostile()
    h.connect(persistent=True)
    data = [h.grant() for _ in range(16)]
    segs = [(ref, 0, 7) for _, ref in data]
    igfn, iref = h.grant(pack_segments(segs))
    end = h.sectors
    with env.good_load():
        h.expect([(h.indirect(BLKIF_OP_READ, 0, 16, [iref]), OK)])           # everything mapped now
        page = h.host.memory.frame(igfn)
        for bad in ([(data[0][1], 7, 0)] + segs[1:],                          # first_sect > last_sect
                    segs[:3] + [(data[3][1], 0, 8)] + segs[4:],               # past the page
                    segs[:5] + [(h.host.gnttab.nr_entries + 5, 0, 7)] + segs[6:],   # a page never granted
                    segs[:15] + [(max(h.refs) + 100, 0, 7)]):
            page[:] = pack_segments(bad)                                     # the backend sees this at once
            h.expect([(h.indirect(BLKIF_OP_READ, 0, 16, [iref]), ERR),
                      (h.indirect(BLKIF_OP_WRITE, 0, 16, [iref]), ERR)])
        page[:] = pack_segments(segs)
        h.expect([(h.indirect(BLKIF_OP_READ, 0, 0, [iref]), ERR),
                  (h.indirect(BLKIF_OP_READ, 0, 257, [iref] * 8), ERR),
                  (h.indirect(BLKIF_OP_READ, 0, 17, [iref]), ERR),
                  (h.indirect(BLKIF_OP_READ, end - 8, 16, [iref]), ERR),
                  (h.indirect(BLKIF_OP_READ, 2**64 - 8, 16, [iref]), ERR),
                  (h.indirect(BLKIF_OP_WRITE_BARRIER, 0, 16, [iref]), ERR)])
        h.expect([(h.indirect(BLKIF_OP_READ, 128, 16, [iref]), OK)])
    with open(h.image, "rb") as f:
        f.seek(128 * 512)
        want = f.read(16 * PAGE)
    assert b"".join(bytes(h.host.memory.frame(g)) for g, _ in data) == want
    h.assert_image_intact()
    stats = env.server.vbds[(h.host.domid, h.devid)].stats()
    assert stats["indirect_requests"] == 2 and stats["persistent_reuses"] > 0, stats
    finish(env, h)


# ---- 4096-byte logical sectors -----------------------------------------------------------------

def test_4k_sector_disk_refuses_unaligned_io(env: Env) -> None:
    h = env.hostile(logical_sector_size=4096)
    h.connect()
    assert int(env.xs.read(f"{h.be_path}/sector-size")) == 4096
    gfn, ref = h.grant()
    _, ref2 = h.grant()
    _, iref = h.grant(pack_segments([(ref, 0, 7), (ref2, 0, 3)]))
    cases = []
    for op in (BLKIF_OP_READ, BLKIF_OP_WRITE):
        cases += [
            (h.rw(op, 1, [(ref, 0, 7)]), ERR),            # offset not aligned
            (h.rw(op, 4, [(ref, 0, 7)]), ERR),
            (h.rw(op, 8, [(ref, 0, 3)]), ERR),            # length not aligned
            (h.rw(op, 8, [(ref, 0, 0)]), ERR),
            (h.rw(op, 8, [(ref, 0, 7), (ref2, 0, 6)]), ERR),
            (h.rw(op, 3, [(ref, 0, 4)]), ERR),
            (h.indirect(op, 8, 2, [iref]), ERR),
        ]
    with env.good_load():
        h.expect(cases)
        h.expect([(h.rw(BLKIF_OP_READ, 16, [(ref, 0, 7)]), OK)])
    with open(h.image, "rb") as f:
        f.seek(16 * 512)
        assert bytes(h.host.memory.frame(gfn)) == f.read(PAGE)
    h.assert_image_intact()
    finish(env, h)


def test_4k_sector_disk_refuses_sub_sector_segments(env: Env) -> None:
    h = env.hostile(logical_sector_size=4096)
    h.connect()
    _, ref = h.grant()
    _, ref2 = h.grant()
    try:
        h.expect([(h.rw(BLKIF_OP_READ, 8, [(ref, 0, 3), (ref2, 4, 7)]), ERR)])
    finally:
        h.assert_image_intact()
        finish(env, h)


def test_4k_sector_disk_refuses_unaligned_discard(env: Env) -> None:
    h = env.hostile(logical_sector_size=4096)
    h.connect()
    try:
        h.expect([(h.discard(1, 1), ERR)])
    finally:
        finish(env, h)
        h.assert_image_intact()


# ---- the ring itself ---------------------------------------------------------------------------

@pytest.mark.parametrize("jump", [33, 64, 1000, 2**31, 2**32 - 1], ids=lambda j: f"+{j}")
def test_req_prod_overflow_closes_only_that_device(env: Env, jump: int) -> None:
    h = env.hostile()
    h.connect()
    assert h.ring is not None
    gfn, ref = h.grant()
    h.expect([(h.rw(BLKIF_OP_READ, 0, [(ref, 0, 7)]), OK)] * 1)
    with env.good_load():
        shared = h.ring.shared
        shared.set(_REQ_PROD, shared.get(_RSP_PROD) + jump)
        h.host.notify(h.port)
        h.wait_backend(XenbusState.Closing)
    assert h.ring.shared.get(_RSP_PROD) == 1, "the backend answered requests of a broken ring"
    assert (h.host.domid, h.devid) in env.server.vbds
    finish(env, h, closed_by_backend=True)


def test_req_prod_overflow_on_a_busy_ring(env: Env) -> None:
    """The overflow arrives while the ring has requests in flight; then the frontend pokes the dead ring."""
    h = env.hostile()
    h.connect()
    assert h.ring is not None
    _, ref = h.grant()
    with env.good_load():
        for _ in range(5):
            h.expect([(h.rw(BLKIF_OP_READ, 8 * i, [(ref, 0, 7)]), OK) for i in range(32)])
        shared = h.ring.shared
        for i in range(32):
            shared.write_slot(h.ring.req_prod_pvt + i, h.rw(BLKIF_OP_READ, 0, [(ref, 0, 7)]))
        shared.set(_REQ_PROD, h.ring.req_prod_pvt + 33)
        h.host.notify(h.port)
        h.wait_backend(XenbusState.Closing)
        for _ in range(1000):          # nobody listens any more; must not matter
            h.host.notify(h.port)
    finish(env, h, closed_by_backend=True)


def test_read_into_the_ring_page(env: Env) -> None:
    """A READ whose data page is the ring itself: the disk's bytes land on the ring header.

    The sector read holds a header with an impossible req_prod, so the
    backend must see a broken ring and close the device (and not crash on
    its own ring being rewritten under it).
    """
    h = env.hostile()
    h.connect()
    ring_ref = h.refs[0]
    header = struct.pack("<IIII", 0xDEADBEEF, 1, 0, 1)
    _, ref = h.grant(header + bytes(PAGE - len(header)))
    with env.good_load():
        h.expect([(h.rw(BLKIF_OP_WRITE, 100 * 8, [(ref, 0, 7)]), OK)])
        h.send([h.rw(BLKIF_OP_READ, 100 * 8, [(ring_ref, 0, 7)])])
        h.wait_backend(XenbusState.Closing)
    assert os.path.getsize(h.image) == h.image_size
    h.sent -= 1
    finish(env, h, closed_by_backend=True)


def test_index_wraparound(env: Env) -> None:
    """A frontend may start its indices anywhere: serving across the u32 wrap works."""
    h = env.hostile()
    h.connect(ring_header=(2**32 - 40, 2**32 - 40))
    _, ref = h.grant()
    with env.good_load():
        for _ in range(4):
            h.expect([(h.rw(BLKIF_OP_READ, 8 * i, [(ref, 0, 7)]), OK) for i in range(32)])
    assert h.ring is not None and h.ring.rsp_cons == (2**32 - 40 + 128) & 0xFFFFFFFF
    finish(env, h)


@pytest.mark.parametrize("op", [BLKIF_OP_READ, BLKIF_OP_WRITE])
def test_request_rewritten_after_push(env: Env, op: int) -> None:
    """A thread keeps flipping the pushed slots between a valid and an invalid request.

    Only bytes 16.. (sector number and segments) flip, so the response the
    backend writes over bytes 0..15 is not disturbed.  The backend copies a
    slot before validating it: each request is answered exactly once, OKAY or
    ERROR, and nothing outside the valid target range is ever touched.
    """
    h = env.hostile()
    h.connect()
    assert h.ring is not None
    shared = h.ring.shared
    page = shared.pages[0]
    pages = [h.grant(bytes([0x40 + i]) * PAGE) for i in range(8)]
    scratch = 1024                        # sectors [1024, 1024 + 8*8) may be written
    end = h.sectors
    with open(h.image, "rb") as f:
        original = bytearray(f.read())
    stop = threading.Event()
    slots: list[tuple[int, bytes, bytes]] = []
    slots_lock = threading.Lock()

    def flipper() -> None:
        flip = 0
        while not stop.is_set():
            with slots_lock:
                current = list(slots)
            for idx, good, bad in current:
                body = (bad if flip & 1 else good)[16:]
                off = RING_HEADER_SIZE + (idx & shared.mask) * shared.slot_size + 16
                page[off:off + len(body)] = body        # never bytes 0..15: the response lives there
            flip += 1
            if not current:
                time.sleep(0.0005)

    t = threading.Thread(target=flipper, name="flipper", daemon=True)
    t.start()
    answered = {OK: 0, ERR: 0}
    try:
        with env.good_load():
            for rnd in range(40):
                batch = []
                for i, (_, ref) in enumerate(pages):
                    rid = h.new_id()
                    good = h.rw(op, scratch + 8 * i, [(ref, 0, 7)], rid=rid)
                    variants = [
                        h.rw(op, end - 4, [(ref, 0, 7)], rid=rid),            # crosses the end
                        h.rw(op, scratch + 8 * i, [(ref, 6, 1)], rid=rid),     # bad sectors
                        h.rw(op, 0, [(h.host.gnttab.nr_entries + 1, 0, 7)], rid=rid),   # bad gref
                        h.rw(op, 2**64 - 4, [(ref, 0, 7)], rid=rid),
                    ]
                    bad = variants[(rnd + i) % len(variants)]
                    batch.append((h.ring.req_prod_pvt + i, good, bad))
                with slots_lock:
                    slots[:] = batch
                got = h.roundtrip([good for _, good, _ in batch])
                with slots_lock:
                    slots[:] = []
                for _, status in got.values():
                    assert status in (OK, ERR)
                    answered[status] += 1
    finally:
        stop.set()
        t.join(WAIT)
    assert not t.is_alive()
    assert answered[OK] + answered[ERR] == 40 * 8
    with open(h.image, "rb") as f:
        now = f.read()
    assert len(now) == h.image_size, "a write landed past the end of the disk"
    lo, hi = scratch * 512, (scratch + 64) * 512
    assert now[:lo] == original[:lo] and now[hi:] == original[hi:], "a write landed outside the valid range"
    if op == BLKIF_OP_WRITE:
        for i, (gfn, _) in enumerate(pages):
            chunk = now[lo + i * PAGE:lo + (i + 1) * PAGE]
            assert chunk in (original[lo + i * PAGE:lo + (i + 1) * PAGE], bytes(h.host.memory.frame(gfn)))
    finish(env, h)


@pytest.mark.parametrize("protocol,persistent,order", [
    (PROTOCOL_X86_64, False, 0), (PROTOCOL_X86_64, True, 0), (PROTOCOL_X86_32, False, 0),
    (PROTOCOL_X86_64, False, 2), (PROTOCOL_X86_32, True, 1),     # slots straddle ring pages
], ids=lambda v: str(v))
def test_flood_of_random_requests(env: Env, protocol: str, persistent: bool, order: int) -> None:
    """10,000 requests of random bytes, a ring at a time: every one is answered with its id."""
    h = env.hostile()
    h.connect(protocol=protocol, persistent=persistent, order=order)
    assert h.ring is not None
    rng = random.Random(f"flood-{protocol}-{persistent}-{order}")
    size = h.ring.size
    total = 0
    statuses = {OK: 0, ERR: 0, NOTSUPP: 0}
    with env.good_load():
        while total < 10_000:
            raws = []
            for _ in range(min(size, 10_000 - total)):
                raw = bytearray(rng.randbytes(h.abi.request_size))
                struct.pack_into("<Q", raw, 8 if protocol == PROTOCOL_X86_64 else 4, nz_id(rng))
                raws.append(bytes(raw))
            sent = {h.id_of(r): r for r in raws}
            got = h.roundtrip(raws)
            assert set(got) == set(sent)
            for rid, (op, status) in got.items():
                raw = sent[rid]
                statuses[status] += 1
                want_op = raw[1] if raw[0] == BLKIF_OP_INDIRECT else raw[0]
                assert op == want_op, f"response operation {op} for request {raw.hex()}"
                if raw[0] == 4 or raw[0] > BLKIF_OP_INDIRECT:
                    assert status == NOTSUPP, raw.hex()
                elif status == OK:
                    assert raw[0] in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER) and raw[1] == 0, raw.hex()
                else:
                    assert status in (ERR, NOTSUPP), raw.hex()
            total += len(raws)
    assert sum(statuses.values()) == 10_000
    assert h.backend_state() == XenbusState.Connected
    h.assert_image_intact()
    stats = env.server.vbds[(h.host.domid, h.devid)].stats()
    assert stats["errors"] == statuses[ERR] + statuses[NOTSUPP]
    finish(env, h)


def test_frontend_that_never_reads_responses(env: Env) -> None:
    """Responses pile up unread (the ring is full of them); the frontend keeps pushing and notifying."""
    h = env.hostile()
    h.connect()
    assert h.ring is not None
    shared = h.ring.shared
    size = h.ring.size
    _, ref = h.grant()
    prod = 0
    with env.good_load():
        # fill the ring and never look at the answers
        for i in range(size):
            shared.write_slot(prod + i, h.rw(BLKIF_OP_READ, 8 * i, [(ref, 0, 7)]))
        prod += size
        shared.set(_REQ_PROD, prod)
        h.host.notify(h.port)
        wait_until(lambda: shared.get(_RSP_PROD) == prod, WAIT, "the backend to answer a full ring")
        for _ in range(3):
            env.good.check()
        # legal from the backend's view (it answered everything): push over the unread answers
        for _ in range(50):
            wait_until(lambda: shared.get(_RSP_PROD) == prod, WAIT, "the backend to answer")
            for i in range(size):
                shared.write_slot(prod + i, h.rw(BLKIF_OP_READ, 8 * i, [(ref, 0, 7)]))
            prod += size
            shared.set(_REQ_PROD, prod)
            h.host.notify(h.port)
        wait_until(lambda: shared.get(_RSP_PROD) == prod, WAIT, "the backend to catch up")
        # and an event storm without any request
        for _ in range(20_000):
            h.host.notify(h.port)
        for _ in range(3):
            env.good.check()
    assert h.backend_state() == XenbusState.Connected
    h.ring.rsp_cons = h.ring.req_prod_pvt = prod
    h.sent = prod
    finish(env, h)


# ---- xenbus ------------------------------------------------------------------------------------

XENBUS_CASES = {
    "ring-ref-not-granted": dict(extra={"ring-ref": 3000}),
    "ring-ref-out-of-table": dict(extra={"ring-ref": 2**32 - 1}),
    "ring-ref-not-a-u32": dict(extra={"ring-ref": 2**40}),
    "ring-ref-garbage": dict(extra={"ring-ref": "0x10"}),
    "ring-ref-read-only": dict(ring_readonly=True),
    "protocol-unknown": dict(protocol="sparc-abi"),
    "ring-page-order-too-big": dict(extra={"ring-page-order": 5, **{f"ring-ref{i}": 9 for i in range(32)}}),
    "queues-zero": dict(extra={"multi-queue-num-queues": 0}),
    "queues-too-many": dict(extra={"multi-queue-num-queues": 99}),
    "event-channel-garbage": dict(extra={"event-channel": "-1"}),
    "event-channel-missing-in-queue": dict(extra={"multi-queue-num-queues": 2, "queue-0/ring-ref": 8,
                                                  "queue-1/ring-ref": 8}),
    "multi-page-ring-one-ref-not-granted": dict(order=2, extra={"ring-ref3": 5000}),
    # indices a frontend leaves in its ring before connecting: the first look finds them impossible
    "req-prod-past-a-ring-before-connect": dict(ring_header=(1000, 0)),
    "rsp-prod-ahead-before-connect": dict(ring_header=(0, 1000)),
}


def test_frontend_without_protocol_node_gets_the_x86_32_layout(env: Env) -> None:
    """No ``protocol`` node: Linux blkback assumes BLKIF_PROTOCOL_DEFAULT, which on x86 is x86_32.

    The requests below are laid out for x86_32 (id at offset 4, 108-byte
    slots, 12-byte responses); a backend that assumed x86_64 would read the
    sector as the id and answer in the wrong slots, and ``expect`` would see
    responses for ids never sent (or none at all).
    """
    h = env.hostile()
    h.connect(protocol=None)
    assert not env.xs.exists(f"{h.path}/protocol")
    assert h.abi is X86_32
    rgfn, rref = h.grant()
    data = bytes(random.Random("no-protocol").randbytes(PAGE))
    _, wref = h.grant(data)
    with env.good_load():
        h.expect([(h.rw(BLKIF_OP_READ, 40, [(rref, 0, 7)]), OK),
                  (h.rw(BLKIF_OP_WRITE, 128, [(wref, 0, 7)]), OK)])
    with open(h.image, "rb") as f:
        f.seek(40 * 512)
        assert bytes(h.host.memory.frame(rgfn)) == f.read(PAGE)
        f.seek(128 * 512)
        assert f.read(PAGE) == data
    h.image_sha = sha(h.image)
    finish(env, h)


@pytest.mark.parametrize("case", list(XENBUS_CASES))
def test_bad_xenbus_nodes_close_the_device(env: Env, case: str) -> None:
    h = env.hostile()
    kw = dict(XENBUS_CASES[case])
    with env.good_load():
        h.connect(expect=XenbusState.Closing, **kw)
    finish(env, h, closed_by_backend=True)


@pytest.mark.parametrize("port", ["not-ours", "huge"])
def test_bad_event_channel_closes_the_device(env: Env, port: str) -> None:
    h = env.hostile()
    if port == "not-ours":
        value = h.host.alloc_unbound(env.good.host.domid)     # a port meant for another domain
    else:
        value = 10**15
    try:
        h.connect(expect=XenbusState.Closing, extra={"event-channel": value}, timeout=5.0)
    except AssertionError:
        # Even so: once the frontend closes, no grant stays mapped, and the good device works
        # (env.after() fails too while the crash is logged).
        h.close()
        env.after()
        raise
    finish(env, h, closed_by_backend=True)


def test_second_queue_broken_releases_the_first(env: Env) -> None:
    """Queue 0 is fine, queue 1's ring is not granted: the device closes and queue 0's ring is unmapped."""
    h = env.hostile()
    h.wait_backend(XenbusState.InitWait)
    gfn, ref = h.grant()
    port = h.host.alloc_unbound(env.be.domid)
    h.port = port
    with env.good_load():
        h.publish({"protocol": PROTOCOL_X86_64, "multi-queue-num-queues": 2,
                   "queue-0/ring-ref": ref, "queue-0/event-channel": port,
                   "queue-1/ring-ref": 4000, "queue-1/event-channel": port}, XenbusState.Initialised)
        h.wait_backend(XenbusState.Closing)
    finish(env, h, closed_by_backend=True)


def test_state_flapping(env: Env) -> None:
    """Initialised / Initialising over and over: rings come and go, no thread or grant leaks."""
    h = env.hostile()
    h.connect()
    with env.good_load():
        for _ in range(30):
            h.set_state(XenbusState.Initialising)
            h.wait_backend(XenbusState.InitWait)
            h.set_state(XenbusState.Initialised)
            h.wait_backend(XenbusState.Connected)
            alive = [t for t in blkback_threads() if t.name.startswith(f"blkback-vbd{h.host.domid}.")]
            assert len(alive) == 1, alive
    finish(env, h)


# ---- a frontend that goes away badly ---------------------------------------------------------------

def test_frontend_domain_dies_mid_flight(env: Env) -> None:
    """The hostile guest dies with requests on the ring; the toolstack then removes its nodes."""
    h = env.hostile()
    h.connect(persistent=True)
    assert h.ring is not None
    pages = [h.grant() for _ in range(32)]
    with env.good_load():
        h.expect([(h.rw(BLKIF_OP_READ, 8 * i, [(ref, 0, 7)]), OK) for i, (_, ref) in enumerate(pages)])
        h.send([h.rw(BLKIF_OP_WRITE, 64 + 8 * i, [(ref, 0, 7)]) for i, (_, ref) in enumerate(pages)])
        h.host.close()                       # dies: the hypervisor takes back its grants and ports
        env.dead.append(h.host)
        env.xs.rm(h.be_path)                 # what libxl does for a destroyed domain
        env.xs.rm(h.path)
        wait_until(lambda: (h.host.domid, h.devid) not in env.server.vbds, WAIT, "the vbd to be removed")
        wait_until(lambda: not [t for t in blkback_threads() if t.name.startswith(f"blkback-vbd{h.host.domid}.")],
                   WAIT, "the dead guest's ring thread to stop")
    be_dom = env.hv.hv.domains[env.be.domid]
    left = [m for m in be_dom.maptrack.values() if m.granter.domid == h.host.domid]
    assert not left, f"the backend still maps {len(left)} grant(s) of the dead guest"
    assert os.path.getsize(h.image) == h.image_size
    env.after()


def test_frontend_closes_its_event_channel(env: Env) -> None:
    """The frontend closes its port while connected, then pushes and closes the device: nothing breaks."""
    h = env.hostile()
    h.connect()
    _, ref = h.grant()
    with env.good_load():
        h.expect([(h.rw(BLKIF_OP_READ, 0, [(ref, 0, 7)]), OK)])
        h.host.close_port(h.port)
        h.port = -1
        assert h.ring is not None
        h.ring.put_request(h.rw(BLKIF_OP_READ, 8, [(ref, 0, 7)]))
        h.ring.push_requests()               # no way to notify any more
        h.close()
    env.after()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("env", [{"good_persistent": False}], indirect=True, ids=["good-not-persistent"])
def test_maptrack_exhaustion_does_not_hurt_other_devices(env: Env) -> None:
    h = env.hostile(grant_frames=256)                   # 131072 grant references, as xl's max_grant_frames allows
    h.connect(order=4)
    assert h.ring is not None and h.ring.size == 512
    (gfn,) = h.pool.alloc(1)
    gt = h.host.gnttab
    raws = []
    for _ in range(500):
        refs = [gt.grant_access(env.be.domid, gfn) for _ in range(256)]     # one frame, granted many times
        h.refs += refs
        _, iref = h.grant(pack_segments([(r, 0, 7) for r in refs]))
        raws.append(h.indirect(BLKIF_OP_READ, 0, 256, [iref]))
    with env.good_load():
        for _ in range(2):
            got = h.roundtrip(raws, timeout=90)
            assert all(status in (OK, ERR) for _, status in got.values())
    finish(env, h)
