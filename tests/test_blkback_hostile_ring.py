"""A hostile frontend abusing blkback's shared ring (Linux xen-blkback semantics).

Indices beyond the ring, requests read into the ring page itself, index
wraparound, a request rewritten after it was pushed, floods of random
requests and a frontend that never reads its responses: the backend closes
that one device or answers, never crashes, and the good device keeps
working (the checks every test ends with: blkback_harness.finish).
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from blkback_harness import Env, finish, hostile_env
from helpers import wait_until
from hostile_vbd import _REQ_PROD, _RSP_PROD, ERR, NOTSUPP, OK, PAGE, WAIT, nz_id

from xdom.domains.abi.blkif import (
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    PROTOCOL_X86_32,
    PROTOCOL_X86_64,
)
from xdom.domains.abi.ring import RING_HEADER_SIZE
from xdom.domains.xenbus import XenbusState

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def env(request: pytest.FixtureRequest, run_dir: str) -> Iterator[Env]:
    yield from hostile_env(request, run_dir)


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
