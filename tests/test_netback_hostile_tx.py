"""Hostile TX requests: bad grants, sizes, slot counts, fatal layouts, extra info, GSO, a flood of random slots.

Each test runs the rig of tests/netback_harness.py (two good guests pinging
each other through netback, a hostile frontend from tests/hostile_vif.py, a
sniffer on the switch).  The packet is answered ``NETIF_RSP_ERROR``
(``xenvif_tx_err``) or the vif is closed (``xenvif_fatal_tx_err``), as Linux
decides; netback must never crash, keep the good pair's pings coming and
answer every slot it consumes exactly once.
"""

from __future__ import annotations

import random
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fake_frontend import req
from helpers import wait_until
from hostile_vif import (
    CSUM,
    ERR,
    EVIL_MAC,
    EXTRA,
    M32,
    MAX_FRAME,
    MORE,
    OK,
    PAGE,
    VALID,
    WAIT,
    HostileVif,
    Ids,
    extra,
    frame,
    multiset,
    raw_extra,
    tcp_frame,
)
from netback_harness import NEEDS_ROOT_AND_PING, Env, hostile_env, served

from xdom.backends.netback.tx import TxDrop, TxFatal, TxMulticast, TxPacket, TxProcessor
from xdom.domains.abi.grant_table import GTF_permit_access, GTF_type_mask
from xdom.domains.abi.netif import (
    TX_SLOT_SIZE,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_GSO_TYPE_TCPV4,
    ExtraInfo,
    GsoInfo,
    gso_extra,
    hash_extra,
    mcast_extra,
)
from xdom.domains.frame_pool import FramePool
from xdom.domains.xenbus import XenbusState

pytestmark = [pytest.mark.timeout(60), NEEDS_ROOT_AND_PING]


@pytest.fixture
def env(run_dir: str) -> Iterator[Env]:
    yield from hostile_env(run_dir)


# ---- grants ------------------------------------------------------------------------------------

def test_tx_bad_grant_refs_answered_error(env: Env) -> None:
    """Grants never given, given to someone else, revoked, out of the table: ERROR for the packet, vif stays."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    gt = h.host.gnttab
    _, ro = h.grant(readonly=True)
    _, rw = h.grant()
    _, to_other = h.grant(to=env.g1.domid)
    _, revoked = h.grant()
    gt.end_access(revoked)
    bad_frame = gt.grant_access(env.rig.be.domid, h.host.memory.nr_frames + 7, readonly=True)   # no such frame
    h.refs.append(bad_frame)
    never = max(h.refs) + 100
    assert gt.entry(never)[0] == 0
    # a reference the *good* guest granted the backend, unused in the hostile table: netback must
    # look in the hostile guest's own table, never in another domain's
    good_gt = env.g1.gnttab
    (good_gfn,) = FramePool.of(env.g1).alloc(1)
    spare = []
    while True:
        good_ref = good_gt.grant_access(env.rig.be.domid, good_gfn, readonly=True)
        if gt.entry(good_ref)[0] & GTF_type_mask == 0:
            break
        spare.append(good_ref)
    for ref in spare:
        good_gt.end_and_release(ref)
    nr = gt.nr_entries
    for reserved in (0, 7):
        assert gt.entry(reserved)[0] & GTF_type_mask == 0
    bad_refs = [never, to_other, revoked, bad_frame, good_ref, nr, nr + 1, 2**31, M32, 0, 7]

    def put(ref: int, tag: bytes, off: int = 0, length: int = 80) -> bytes:
        f = frame(tag, length)
        if ref in (ro, rw):
            h.page(ref)[off:off + len(f)] = f
        return f
    packets: list[tuple[list[bytes], int]] = []
    delivered, refused = [], []
    for i, ref in enumerate(bad_refs):
        refused.append(put(ref, b"bad %d" % i))
        packets.append(([req(ref, 0, 0, ids(), 80)], ERR))
    # a bad fragment fails the whole packet, and so does a bad first slot with a good fragment
    f = put(rw, b"good-head", 0, 160)
    refused.append(f)
    packets.append(([req(rw, 0, MORE, ids(), 160), req(never, 80, 0, ids(), 80)], ERR))
    packets.append(([req(M32, 0, MORE, ids(), 160), req(rw, 80, 0, ids(), 80)], ERR))
    # good packets in the same batch are served (a read-only grant is all TX needs)
    for ref, off in ((ro, 1000), (rw, 2000), (ro, PAGE - 80)):
        delivered.append(put(ref, b"good %d" % off, off))
        packets.append(([req(ref, off, 0, ids(), 80)], OK))
    before = dict(env.server.vifs[h.key].stats())
    with env.good_traffic():
        h.tx_roundtrip(packets)
        h.tx_roundtrip(packets[::-1])          # the same again (now with some pages cached), other order
        env.sniffer.wait_for(delivered)
    stats = env.server.vifs[h.key].stats()
    assert stats["tx_dropped"] - before["tx_dropped"] == 2 * (len(bad_refs) + 2), stats
    assert stats["tx_packets"] - before["tx_packets"] == 2 * 3, stats
    seen = env.sniffer.drain()
    assert not [f for f in refused if f in seen], "a refused packet was delivered"
    assert good_gt.try_end_access(good_ref), "netback mapped the good guest's grant for the hostile vif"
    env.finish(h, ids)


# ---- sizes and slot counts ---------------------------------------------------------------------

def test_tx_sizes_checked(env: Env) -> None:
    """First slot smaller than an Ethernet header, sizes that do not add up: ERROR; over-MTU: OKAY, dropped."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    _, ref = h.grant()
    pg = h.page(ref)
    delivered, never = [], []
    cases: list[tuple[list[bytes], int]] = []
    for size in (0, 1, 13):
        cases.append(([req(ref, 0, 0, ids(), size)], ERR))
    # the first slot holds what the others leave of the total: 5 bytes is not a header
    cases.append(([req(ref, 0, MORE, ids(), 105), req(ref, 200, 0, ids(), 100)], ERR))
    # a fragment larger than what is left of the total
    cases.append(([req(ref, 0, MORE, ids(), 100), req(ref, 200, 0, ids(), 101)], ERR))
    cases.append(([req(ref, 0, MORE, ids(), 100), req(ref, 200, MORE, ids(), 50), req(ref, 300, 0, ids(), 51)],
                  ERR))
    # exactly an Ethernet header is a frame
    f14 = frame(b"", 14)
    pg[400:414] = f14
    delivered.append(f14)
    cases.append(([req(ref, 400, 0, ids(), 14)], OK))
    # a zero-sized fragment in the middle is answered and contributes nothing
    f3 = frame(b"zero-frag", 150)
    pg[500:600] = f3[:100]
    pg[700:750] = f3[100:]
    delivered.append(f3)
    cases.append(([req(ref, 500, MORE, ids(), 150), req(ref, 3000, MORE, ids(), 0), req(ref, 700, 0, ids(), 50)],
                  OK))
    # the largest frame without GSO (MTU + header + VLAN tag), and one byte more: answered OKAY, not delivered
    for length in (MAX_FRAME, MAX_FRAME + 1, 4000):
        (gfn, r) = h.grant()
        f = frame(b"len %d" % length, length)
        h.page(r)[:length] = f
        (delivered if length <= MAX_FRAME else never).append(f)
        cases.append(([req(r, 0, 0, ids(), length)], OK))
    with env.good_traffic():
        h.tx_roundtrip(cases)
        env.sniffer.wait_for(delivered)
    assert not [f for f in never if f in env.sniffer.drain()], "an over-MTU frame was delivered"
    env.finish(h, ids)


def chain(h: HostileVif, ids: Ids, nfrags: int, tag: bytes, last_more: bool = False) -> tuple[list[bytes], bytes]:
    """A packet of one first slot and ``nfrags`` fragments of 60 bytes each, spread over two pages."""
    _, a = h.grant()
    _, b = h.grant()
    data = frame(tag, 60 * (nfrags + 1))
    slots = []
    for i in range(nfrags + 1):
        ref, off = (a, 64 * i) if i % 2 == 0 else (b, PAGE - 64 * i - 60)
        h.page(ref)[off:off + 60] = data[60 * i:60 * (i + 1)]
        more = MORE if i < nfrags or last_more else 0
        slots.append(req(ref, off, more, ids(), len(data) if i == 0 else 60))
    return slots, data


def test_tx_slot_limits_drop_then_fatal(env: Env) -> None:
    """18 fragments pass, 19 or 20 are dropped (ERROR), 21 is a malicious frontend (fatal_skb_slots): closed."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    ok18, data18 = chain(h, ids, 18, b"18 frags")
    drop19, data19 = chain(h, ids, 19, b"19 frags")
    drop20, data20 = chain(h, ids, 20, b"20 frags")
    with env.good_traffic():
        h.tx_roundtrip([(ok18, OK), (drop19, ERR), (drop20, ERR)])
        env.sniffer.wait_for([data18])
        assert data19 not in env.sniffer.drain() and data20 not in env.sniffer.drain()
        fatal, _ = chain(h, ids, 21, b"21 frags")
        h.tx_send(fatal)
        h.wait_backend(XenbusState.Closing)
    env.finish(h, closed_by_backend=True)


# ---- fatal errors ------------------------------------------------------------------------------

def _fatal_cases() -> dict[str, object]:
    def first_crosses(r: int, i: Ids) -> list[bytes]:
        return [req(r, 4000, 0, i(), 200)]

    def offset_at_page_end(r: int, i: Ids) -> list[bytes]:
        return [req(r, 4096, 0, i(), 60)]

    def offset_u16_max(r: int, i: Ids) -> list[bytes]:
        return [req(r, 0xFFFF, 0, i(), 60)]

    def frag_crosses(r: int, i: Ids) -> list[bytes]:
        return [req(r, 0, MORE, i(), 160), req(r, 4090, 0, i(), 100)]

    def frag_crosses_in_dropped_packet(r: int, i: Ids) -> list[bytes]:
        # the second slot is larger than what is left (dropped), the third still crosses its page
        return [req(r, 0, MORE, i(), 50), req(r, 0, MORE, i(), 100), req(r, 4095, 0, i(), 2)]

    def unterminated(r: int, i: Ids) -> list[bytes]:
        return [req(r, 0, MORE, i(), 200), req(r, 200, MORE, i(), 50)]

    def extra_missing(r: int, i: Ids) -> list[bytes]:
        return [req(r, 0, EXTRA, i(), 60)]

    def extra_chain_unterminated(r: int, i: Ids) -> list[bytes]:
        return [req(r, 0, EXTRA, i(), 60), extra(gso_extra(1448, XEN_NETIF_GSO_TYPE_TCPV4,
                                                           flags=XEN_NETIF_EXTRA_FLAG_MORE))]

    def extra_type(t: int, later: bool = False):
        def build(r: int, i: Ids) -> list[bytes]:
            slots = [req(r, 0, EXTRA, i(), 60)]
            if later:
                slots.append(extra(hash_extra(1, 0x1234, flags=XEN_NETIF_EXTRA_FLAG_MORE)))
            return slots + [raw_extra(t)]
        return build

    def gso(size: int, gtype: int):
        def build(r: int, i: Ids) -> list[bytes]:
            return [req(r, 0, EXTRA, i(), 60), extra(ExtraInfo(XEN_NETIF_EXTRA_TYPE_GSO, 0, GsoInfo(size, gtype)))]
        return build
    return {
        "first-slot-crosses-page": first_crosses,
        "offset-at-page-end": offset_at_page_end,
        "offset-u16-max": offset_u16_max,
        "fragment-crosses-page": frag_crosses,
        "fragment-crosses-page-in-dropped-packet": frag_crosses_in_dropped_packet,
        "more-data-past-req-prod": unterminated,
        "extra-info-past-req-prod": extra_missing,
        "extra-chain-past-req-prod": extra_chain_unterminated,
        "extra-type-none": extra_type(0),
        "extra-type-6": extra_type(6),
        "extra-type-255": extra_type(255),
        "extra-type-unknown-later-in-chain": extra_type(9, later=True),
        "gso-size-0": gso(0, XEN_NETIF_GSO_TYPE_TCPV4),
        "gso-type-none": gso(1448, 0),
        "gso-type-unknown": gso(1448, 7),
    }


FATAL_CASES = _fatal_cases()


@pytest.mark.parametrize("case", list(FATAL_CASES))
def test_tx_fatal_errors_close_the_vif(env: Env, case: str) -> None:
    """What Linux's xenvif_fatal_tx_err punishes closes this vif (backend Closing), and only this one."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    gfn, ref = h.grant(frame(b"fatal", PAGE))
    with env.good_traffic():
        f = frame(b"before " + case.encode(), 90)
        h.page(ref)[1000:1090] = f
        h.tx_roundtrip([([req(ref, 1000, 0, ids(), 90)], OK)])     # the vif worked before
        env.sniffer.wait_for([f])
        h.tx_send(FATAL_CASES[case](ref, ids))
        h.wait_backend(XenbusState.Closing)
    env.finish(h, closed_by_backend=True)


def test_tx_extra_info_that_is_fine(env: Env) -> None:
    """XDP, hash (valid or unknown hash type), multicast add/del and a small GSO packet: all answered, vif stays."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    _, ref = h.grant()
    pg = h.page(ref)
    delivered = []
    cases: list[tuple[list[bytes], int]] = []

    def pkt(tag: bytes, off: int, extras: list[bytes]) -> None:
        # GSO needs TCP (Linux's checksum_setup drops anything else after answering OKAY)
        f = tcp_frame(tag, 100) if tag.startswith(b"gso") else frame(tag, 100)
        pg[off:off + 100] = f
        delivered.append(f)
        cases.append(([req(ref, off, EXTRA if extras else 0, ids(), 100), *extras], OK))
    pkt(b"xdp", 0, [raw_extra(5)])
    pkt(b"hash", 200, [extra(hash_extra(1, 0xdeadbeef))])
    pkt(b"hash-type-unknown", 400, [extra(hash_extra(17, 0x1))])
    pkt(b"gso", 600, [extra(gso_extra(1448, XEN_NETIF_GSO_TYPE_TCPV4))])
    pkt(b"gso+hash+xdp", 800, [extra(gso_extra(1448, XEN_NETIF_GSO_TYPE_TCPV4, flags=XEN_NETIF_EXTRA_FLAG_MORE)),
                               extra(hash_extra(0, 7, flags=XEN_NETIF_EXTRA_FLAG_MORE)), raw_extra(5)])
    pkt(b"gso-twice", 1000, [extra(gso_extra(9, XEN_NETIF_GSO_TYPE_TCPV4, flags=XEN_NETIF_EXTRA_FLAG_MORE)),
                             extra(gso_extra(1448, XEN_NETIF_GSO_TYPE_TCPV4))])
    # multicast control: the request and its extra are answered on their own, nothing is sent
    cases.append(([req(ref, 0, EXTRA, ids(), 0), extra(mcast_extra(b"\x01\x00\x5e\x00\x00\x01"))], OK))
    cases.append(([req(ref, 0, EXTRA, ids(), 0), extra(mcast_extra(b"\x01\x00\x5e\x00\x00\x01", add=False))], OK))
    with env.good_traffic():
        h.tx_roundtrip(cases)
        env.sniffer.wait_for(delivered)
        # a full multicast filter answers ERROR, the vif stays
        adds = [([req(ref, 0, EXTRA, ids(), 0), extra(mcast_extra(bytes([1, 0, 0x5e, 0, 1, i])))], OK)
                for i in range(64)]
        h.tx_roundtrip(adds)
        h.tx_roundtrip([([req(ref, 0, EXTRA, ids(), 0), extra(mcast_extra(b"\x01\x00\x5e\x00\x02\x00"))], ERR)])
    env.finish(h, ids)


CAPTURE = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
s.bind(("eth0", 0))
print("ready", flush=True)
while True:
    print(len(s.recv(1 << 17)), flush=True)
"""


@contextmanager
def capture(ns: str) -> Iterator[list[int]]:
    """The lengths of the frames of our ethertype that the guest in ``ns`` receives on eth0."""
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", CAPTURE], stdout=subprocess.PIPE,
                         text=True)
    lengths: list[int] = []

    def read() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            lengths.append(int(line) if line.strip().isdigit() else -1)
    t = threading.Thread(target=read, name="capture-reader", daemon=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        t.start()
        yield lengths
    finally:
        p.kill()
        p.wait()
        t.join(10)


def test_gso_packets_never_reach_others_over_mtu(env: Env) -> None:
    """A GSO packet is one frame on the TX ring; no other guest may be handed a frame longer than the MTU allows.

    Linux segments a GSO skb for a vif that did not negotiate GSO, and
    drops one whose headers do not segment (these are not even TCP:
    ``checksum_setup`` fails) after answering OKAY.  A receiver must never
    get more than MTU + 18 bytes.  Without the GSO extra the same frame is
    answered OKAY and dropped (test_tx_sizes_checked).
    """
    h = env.hostile()
    h.connect()
    ids = Ids()
    pages = [h.grant()[1] for _ in range(3)]
    f = frame(b"gso super-frame", 9000)
    slots = []
    for i, ref in enumerate(pages):
        chunk = f[i * PAGE:(i + 1) * PAGE]
        h.page(ref)[:len(chunk)] = chunk
        flags = (EXTRA if i == 0 else 0) | (MORE if i < 2 else 0)
        slots.append(req(ref, 0, flags, ids(), len(f) if i == 0 else len(chunk)))
        if i == 0:
            slots.append(extra(gso_extra(1448, XEN_NETIF_GSO_TYPE_TCPV4)))
    with capture(env.ns1) as g1_got:
        h.tx_roundtrip([(slots, OK)])
        env.sentinel(h, ids)                  # 200 bytes, after the GSO packet on the same path
        wait_until(lambda: 200 in g1_got, WAIT, "the sentinel frame in g1")
    env.sniffer.drain()
    assert max(g1_got) <= MAX_FRAME, f"g1 (MTU 1500) received frames of {sorted(set(g1_got))} bytes"
    assert env.sniffer.longest <= MAX_FRAME, f"the switch handed other vifs a {env.sniffer.longest}-byte frame"
    env.finish(h, ids)


# ---- a flood of random slots ------------------------------------------------------------------------

def random_slot(rng: random.Random, refs: list[int], after_extra: bool) -> bytes:
    """One slot a fuzzer likes: sometimes plausible, often absurd, sometimes plain random bytes."""
    if rng.random() < 0.2:
        return rng.randbytes(TX_SLOT_SIZE)
    if after_extra:
        etype = rng.choice([0, 1, 1, 1, 2, 3, 4, 4, 5, 6, 200])
        flags = XEN_NETIF_EXTRA_FLAG_MORE if rng.random() < 0.2 else 0
        if etype == XEN_NETIF_EXTRA_TYPE_GSO:
            body = struct.pack("<HBBH", rng.choice([0, 1, 536, 1448, 65535]), rng.choice([0, 1, 1, 2, 3]), 0, 0)
        else:
            body = rng.randbytes(6)
        return extra(ExtraInfo(etype, flags, body))
    gref = rng.choice(refs) if rng.random() < 0.7 else rng.choice([0, 5, 10**4, 2**16 - 1, rng.getrandbits(32)])
    offset = rng.choice([0, rng.randrange(0, 4096), rng.choice([4095, 4096, 65535])])
    size = rng.choice([rng.randrange(0, 100), rng.randrange(14, 1600), rng.randrange(0, 4096), 65535])
    flags = (MORE if rng.random() < 0.3 else 0) | (EXTRA if rng.random() < 0.1 else 0)
    flags |= rng.choice([0, CSUM, VALID, rng.getrandbits(16)])
    return req(gref, offset, flags, rng.getrandbits(16), size)


def random_packet(rng: random.Random, refs: list[int]) -> list[bytes]:
    """A packet that is well-formed more often than not, but not always: sizes lie, grefs are bad, chains long."""
    def gref() -> int:
        return rng.choice(refs) if rng.random() < 0.9 else rng.choice([0, 5, 10**4, rng.getrandbits(32)])

    def piece(limit: int) -> tuple[int, int]:
        size = rng.choice([0, rng.randrange(1, 64), rng.randrange(1, limit + 1)])
        return rng.randrange(0, PAGE - size + 1), size
    nfrags = rng.choice([0, 0, 0, 1, 2, 3, rng.randrange(0, 19), rng.choice([18, 19, 20])])
    frags = [piece(rng.choice([100, 1500, PAGE])) for _ in range(nfrags)]
    first_off, first_len = piece(rng.choice([60, 1500, PAGE]))
    first_off -= first_off % 6
    total = first_len + sum(sz for _, sz in frags)
    if rng.random() < 0.1:
        total = rng.randrange(0, total + 1)            # a lie: smaller than the fragments (dropped)
    csum = rng.choice([0, 0, CSUM, VALID, CSUM | VALID])
    extras = []
    for _ in range(rng.choice([0, 0, 0, 0, 1, 1, 2])):
        kind = rng.choice(["gso", "hash", "xdp", "mcast"])
        if kind == "gso":
            extras.append(gso_extra(rng.choice([1, 536, 1448, 9000]), rng.choice([1, 2])))
        elif kind == "hash":
            extras.append(hash_extra(rng.randrange(0, 8), rng.getrandbits(32)))
        elif kind == "xdp":
            extras.append(ExtraInfo(5, 0, rng.randbytes(6)))
        else:
            extras.append(mcast_extra(bytes([1, 0, 0x5E, 0, 0, rng.randrange(0, 80)]), add=rng.random() < 0.7))
    extras = [ExtraInfo(e.type, XEN_NETIF_EXTRA_FLAG_MORE if i < len(extras) - 1 else 0, e.body)
              for i, e in enumerate(extras)]
    first_flags = csum | (MORE if frags else 0) | (EXTRA if extras else 0)
    slots = [req(gref(), first_off, first_flags, rng.getrandbits(16), total)]
    slots += [extra(e) for e in extras]
    for i, (off, sz) in enumerate(frags):
        slots.append(req(gref(), off, MORE if i < len(frags) - 1 else 0, rng.getrandbits(16), sz))
    return slots


def predicted(h: HostileVif, proc: TxProcessor, slots: list[bytes]) -> list[tuple[int, int]] | None:
    """What Linux's rules (TxProcessor, unit-tested on its own) say the slots are answered; None: fatal."""
    gt = h.host.gnttab

    def mappable(ref: int) -> bool:
        if not 0 <= ref < gt.nr_entries:
            return False
        flags, domid, gfn = gt.entry(ref)
        return bool(flags & GTF_permit_access) and domid == h.be_domid and gfn < h.host.memory.nr_frames
    want: list[tuple[int, int]] = []
    for action in proc.feed(slots, at_req_prod=True):
        if isinstance(action, TxFatal):
            return None
        if isinstance(action, TxPacket):
            if all(mappable(p.gref) for p in action.pieces):
                want += [(r.id, r.status) for r in action.responses]
            else:
                want += [(r.id, r.status) for r in action.error_responses()]
        else:
            assert isinstance(action, (TxDrop, TxMulticast))
            want += [(r.id, r.status) for r in action.responses]
    return want


def test_flood_of_random_slots(env: Env) -> None:
    """Thousands of random slots, reconnecting each time the vif is closed: netback never crashes.

    Batches of random packets (mostly well-formed, often dropped), some
    with one packet or slot of random bytes in them, go to the ring a ring's
    worth at a time.  Each batch is checked against Linux's rules as
    TxProcessor (unit-tested on its own) states them: a batch with a fatal
    packet closes the vif, and the toolstack gives the guest its device
    again; any other batch is answered slot for slot.
    """
    h = env.hostile()
    h.connect()
    rng = random.Random(0x5EED)
    pattern = (EVIL_MAC * (PAGE // 6 + 1))[:PAGE]         # any first piece at a multiple of 6 is sent to itself
    refs = [h.grant(pattern, readonly=rng.random() < 0.5)[1] for _ in range(8)]
    proc = TxProcessor()
    total = fatal = answered = 0
    deadline = time.monotonic() + 25
    with env.good_traffic():
        while (total < 12_000 or fatal < 5) and time.monotonic() < deadline:
            assert h.tx is not None
            slots: list[bytes] = []
            limit = rng.choice([1, 8, 64, 256])
            while True:
                p = random_packet(rng, refs)
                if len(slots) + len(p) > limit:
                    break
                slots += p
            if rng.random() < 0.3 or not slots:      # and something absurd, anywhere in the batch
                junk, after_extra = [], False
                for _ in range(rng.choice([1, 1, 2, 5])):
                    raw = random_slot(rng, refs, after_extra)
                    junk.append(raw)
                    after_extra = bool(raw[1] & XEN_NETIF_EXTRA_FLAG_MORE) if after_extra else \
                        bool(struct.unpack_from("<H", raw, 6)[0] & EXTRA)
                at = rng.randrange(0, len(slots) + 1)
                slots[at:at] = junk
                slots = slots[:256]
            want = predicted(h, proc, slots)
            h.tx_send(slots)
            total += len(slots)
            if want is None:
                fatal += 1
                h.wait_backend(XenbusState.Closing)
                wait_until(lambda: not served(env.server, h.key), WAIT, "the loop to let the closed vif go")
                assert not env.dead_good_threads(), env.dead_good_threads()
                h.recreate()
                h.connect()
                proc = TxProcessor()
                continue
            got = [(r.id, r.status) for r in h.tx_collect(len(want))]
            assert multiset(got) == multiset(want), f"batch of {len(slots)}: got {got}, Linux's rules say {want}"
            answered += len(got)
    assert fatal >= 5 and answered >= 3000, (total, fatal, answered)
    env.finish(h)
