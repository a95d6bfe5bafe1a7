"""Hostile requests against blkback (Linux xen-blkback semantics): grants, segments, sectors, operations.

Bad grant references, segment counts and sector ranges, writes to a
read-only disk, unknown operations, indirect requests and 4096-byte
logical sectors, each sent by a frontend written by hand (hostile_vbd.py)
while a good Blkfront keeps working beside it (blkback_harness.py).

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

import os
import random
import struct
from collections.abc import Iterator

import pytest
from blkback_harness import Env, finish, hostile_env
from hostile_vbd import ERR, NOTSUPP, OK, PAGE

from xdom.domains.abi.blkif import (
    BLKIF_DISCARD_SECURE,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    PROTOCOL_X86_32,
    PROTOCOL_X86_64,
    pack_segments,
)
from xdom.domains.frame_pool import FramePool

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def env(request: pytest.FixtureRequest, run_dir: str) -> Iterator[Env]:
    yield from hostile_env(request, run_dir)


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
