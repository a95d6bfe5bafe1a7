"""Hostile use of the shared rings and their event channel: index jumps, rewrites, unread responses.

Each test runs the rig of tests/netback_harness.py (two good guests pinging
each other through netback, a hostile frontend from tests/hostile_vif.py, a
sniffer on the switch): netback must do what Linux ``xen-netback`` does,
never crash, keep the good pair's pings coming and answer every slot it
consumes exactly once.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator

import pytest
from fake_frontend import req
from helpers import wait_until
from hostile_vif import CSUM, ERR, M32, MORE, OK, PAGE, REQ_PROD, RSP_PROD, SELF_DST, VALID, WAIT, Ids, frame
from netback_harness import NEEDS_ROOT_AND_PING, Env, broadcasting, hostile_env

from xdom.domains.abi.netif import TX_SLOT_SIZE, TxResponse, parse_tx_response
from xdom.domains.abi.ring import RING_HEADER_SIZE
from xdom.domains.xenbus import XenbusState

pytestmark = [pytest.mark.timeout(60), NEEDS_ROOT_AND_PING]


@pytest.fixture
def env(run_dir: str) -> Iterator[Env]:
    yield from hostile_env(run_dir)


# ---- ring indices ------------------------------------------------------------------------------

@pytest.mark.parametrize("ring,jump", [("tx", 257), ("tx", 1000), ("tx", 2**31), ("tx", -1), ("tx", "back"),
                                       ("rx", 257), ("rx", 2**31)],
                         ids=["tx+257", "tx+1000", "tx+2^31", "tx-1", "tx-moved-back", "rx+257", "rx+2^31"])
def test_ring_index_jumps_close_the_vif(env: Env, ring: str, jump: int | str) -> None:
    """req_prod more than a ring ahead of the responses (RING_REQUEST_PROD_OVERFLOW): the vif is closed."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    _, ref = h.grant()
    f = frame(b"before", 80)
    h.page(ref)[:80] = f
    assert h.tx is not None and h.rx is not None
    with env.good_traffic():
        h.tx_roundtrip([([req(ref, 0, 0, ids(), 80)], OK)])
        shared = h.tx.shared if ring == "tx" else h.rx.shared
        rsp = shared.get(RSP_PROD)
        shared.set(REQ_PROD, (rsp - 2 if jump == "back" else rsp + jump) & M32)
        h.host.notify(h.port)
        if ring == "rx":                 # netback looks at the RX ring when a frame comes for the guest
            with broadcasting(env.ns1, gap=0.01):
                h.wait_backend(XenbusState.Closing)
        else:
            h.wait_backend(XenbusState.Closing)
    env.finish(h, closed_by_backend=True)


def test_indices_across_the_u32_wrap(env: Env) -> None:
    """A frontend may start its indices anywhere: both rings serve across the wrap."""
    h = env.hostile()
    start = M32 - 40
    h.connect(tx_start=start, rx_start=start)
    ids = Ids()
    _, ref = h.grant()
    frames = []
    with env.good_traffic():
        for rnd in range(4):
            batch = []
            for i in range(32):
                f = frame(b"wrap %d %d" % (rnd, i), 64)
                h.page(ref)[i * 64:(i + 1) * 64] = f
                frames.append(f)
                batch.append(([req(ref, i * 64, 0, ids(), 64)], OK))
            h.tx_roundtrip(batch)
            env.sniffer.wait_for(frames[-32:])
        rx_refs = [h.grant()[1] for _ in range(64)]
        h.rx_post([(ids(), r) for r in rx_refs])
        with broadcasting(env.ns1, gap=0.002):
            got = h.rx_collect(64)
    assert all(status > 0 for *_, status in got), got
    assert h.tx.rsp_cons == (start + 128) & M32 and h.rx.rsp_cons == (start + 64) & M32
    env.finish(h, ids)


# ---- a frontend that rewrites its requests -------------------------------------------------------

def test_tx_request_rewritten_after_push(env: Env) -> None:
    """A thread keeps flipping pushed slots between variants; every slot is answered exactly once.

    Only bytes 4..11 flip (offset, flags, id kept, size); the response lives
    in bytes 0..3.  Every variant, and every byte-mix of variants, is
    non-fatal: sizes stay below 3072 and offsets below 128, so a slot never
    crosses its page; ``more_data`` flips only on the first slot of a
    two-slot packet (either it is one packet or two).  Netback copies a slot
    once and decides on the copy, so no slot can be answered twice or not at
    all, whatever it reads.
    """
    h = env.hostile()
    h.connect()
    ids = Ids()
    assert h.tx is not None
    shared = h.tx.shared
    pg = h.tx_page
    assert pg is not None
    data = [h.grant(frame(b"flip %d" % i, PAGE, dst=SELF_DST), readonly=True)[1] for i in range(4)]
    stop = threading.Event()
    live: list[tuple[int, list[bytes]]] = []
    lock = threading.Lock()

    def flipper() -> None:
        n = 0
        while not stop.is_set():
            with lock:
                current = list(live)
            for idx, variants in current:
                body = variants[n % len(variants)][4:]
                off = RING_HEADER_SIZE + (idx & shared.mask) * shared.slot_size + 4
                pg[off:off + 8] = body
            n += 1
            # every thread of the rig shares this interpreter: a flipper that never lets go of the GIL
            # would slow the good pair down by itself
            stop.wait(0.0005 if not current else 0.00002)

    t = threading.Thread(target=flipper, name="flipper", daemon=True)
    t.start()
    answered = {OK: 0, ERR: 0}
    try:
        with env.good_traffic():
            for rnd in range(60):
                batch: list[tuple[int, list[bytes]]] = []
                sent_ids = []
                for k in range(12):
                    ref = data[(rnd + k) % len(data)]
                    rid = ids()
                    sent_ids.append(rid)
                    if k % 3 == 2:           # a two-slot packet whose first slot loses/gets more_data
                        rid2 = ids()
                        sent_ids.append(rid2)
                        firsts = [req(ref, 0, MORE, rid, 160), req(ref, 0, 0, rid, 160), req(ref, 64, MORE | CSUM, rid,
                                                                                                  2000)]
                        seconds = [req(ref, 100, 0, rid2, 60), req(ref, 100, VALID, rid2, 7), req(ref, 0, 0, rid2, 0)]
                        batch.append((h.tx.req_prod_pvt, firsts))
                        h.tx_put(firsts[0], [v[4:] for v in firsts])
                        batch.append((h.tx.req_prod_pvt, seconds))
                        h.tx_put(seconds[0], [v[4:] for v in seconds])
                    else:
                        variants = [req(ref, 0, 0, rid, 60), req(ref, 0, 0, rid, 5), req(ref, 100, CSUM, rid, 3000),
                                    req(ref, 64, VALID, rid, 0), req(ref, 127, 0, rid, 1400)]
                        batch.append((h.tx.req_prod_pvt, variants))
                        h.tx_put(variants[0], [v[4:] for v in variants])
                with lock:
                    live[:] = batch
                # tx_put recorded only the first variant's tails: allow any byte-mix of the variants
                for idx, variants in batch:
                    tails = {v[4:] for v in variants}
                    mixes = {bytes(c) for c in _byte_mixes(list(tails))}
                    h.tx_written[idx & shared.mask] = mixes
                h.tx_push()
                got = h.tx_collect(len(batch))
                with lock:
                    live[:] = []
                assert sorted(r.id for r in got) == sorted(sent_ids), "a slot was answered twice or not at all"
                for r in got:
                    assert r.status in (OK, ERR), r
                    answered[r.status] += 1
    finally:
        stop.set()
        t.join(WAIT)
    assert not t.is_alive()
    assert sum(answered.values()) == 60 * 16
    env.finish(h, ids)


def _byte_mixes(tails: list[bytes]) -> list[bytes]:
    """Every slot tail a reader could see if writes of the variants interleaved byte by byte."""
    options = [sorted({t[i] for t in tails}) for i in range(len(tails[0]))]
    out = [b""]
    for opts in options:
        out = [o + bytes([b]) for o in out for b in opts]
    return out


def test_frontend_that_never_reads_responses(env: Env) -> None:
    """Responses pile up unread; the frontend pushes over them (legal for the backend) and storms events."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    assert h.tx is not None
    shared = h.tx.shared
    size = h.tx.size
    _, ref = h.grant(frame(b"unread", PAGE, dst=SELF_DST), readonly=True)
    prod = 0
    with env.good_traffic():
        for rnd in range(20):
            wait_until(lambda: shared.get(RSP_PROD) == prod, WAIT, "netback to answer the ring")
            raws = [req(ref, 0, 0, ids(), 64 + rnd) for _ in range(size)]
            for i, raw in enumerate(raws):
                shared.write_slot(prod + i, raw)
            prod += size
            shared.set(REQ_PROD, prod)
            h.host.notify(h.port)
        wait_until(lambda: shared.get(RSP_PROD) == prod, WAIT, "netback to catch up")
        for _ in range(20_000):                  # and an event storm without any request
            h.host.notify(h.port)
        env.ping_both_ways()
    # the last ring's worth: each slot holds its response over the request's untouched tail
    for i, raw in enumerate(raws):
        full = shared.read_slot(prod - size + i, TX_SLOT_SIZE)
        assert full[4:] == raw[4:], f"slot {i}: {full.hex()} (request {raw.hex()})"
        assert parse_tx_response(full) == TxResponse(struct.unpack_from("<H", raw, 8)[0], OK)
    assert h.backend_state() == XenbusState.Connected
    h.tx.rsp_cons = h.tx.req_prod_pvt = prod
    assert env.server.vifs[h.key].stats()["tx_packets"] == 20 * size
    env.finish(h, ids)


def test_frontend_closes_its_event_channel(env: Env) -> None:
    """The frontend closes its port while connected, with buffers posted and frames coming: nothing breaks."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    _, ref = h.grant(frame(b"portless", PAGE), readonly=True)
    h.rx_post([(ids(), h.grant()[1]) for _ in range(16)])
    with env.good_traffic():
        h.tx_roundtrip([([req(ref, 0, 0, ids(), 64)], OK)])
        h.host.close_port(h.port)
        h.port = -1
        assert h.tx is not None and h.rx is not None
        h.tx.put_request(req(ref, 0, 0, ids(), 64))
        h.tx.push_requests()                     # no way to notify any more
        with broadcasting(env.ns1, gap=0.002):  # netback fills the buffers and notifies a closed port
            vif = env.server.vifs[h.key]
            wait_until(lambda: vif.stats().get("rx_packets", 0) >= 16, WAIT, "frames for the portless guest")
        assert h.rx.unconsumed_responses() == 16
        h.close()
    env.finish(None)
