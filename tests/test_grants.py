"""Grant table semantics, run against both xenhost variants.

Status codes are Xen's (xen/common/grant_table.c): a bad reference is
GNTST_bad_gntref, an entry that is not GTF_permit_access for the mapper
(ungranted, granted to another domain, write-mapping a read-only grant) is
GNTST_general_error, an unknown granter GNTST_bad_domain, a frame the
granter does not have GNTST_bad_page, an unknown handle GNTST_bad_handle.
"""

from __future__ import annotations

import os

import pytest
from helpers import wait_until

from xdom.domains.abi.grant_table import (
    PAGE_SIZE,
    GNTST_bad_copy_arg,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_bad_page,
    GNTST_eagain,
    GNTST_general_error,
    GNTST_okay,
    GNTST_permission_denied,
    GTF_reading,
    GTF_readonly,
    GTF_writing,
)
from xdom.domains.abi.hypercall_wire import copy_columns, pack_copy_segments
from xdom.domains.grant_table import GrantInUse
from xdom.domains.hostsys import grant_lock
from xdom.domains.xenhost import CopyOp


def test_map_write_read_back(domains) -> None:
    a, b = domains.create("a"), domains.create("b")
    a.memory.frame(5)[:6] = b"granted"[:6]
    ref = a.gnttab.grant_access(b.domid, 5)
    m = b.map_grant(a.domid, ref)
    assert bytes(m.view[:6]) == b"grante"
    m.view[100:104] = b"back"
    assert bytes(a.memory.frame(5)[100:104]) == b"back"
    # exactly one page: the mapping is 4 KiB and nothing of frame 6 shows
    a.memory.frame(6)[:4] = b"next"
    assert len(m.view) == PAGE_SIZE
    assert b"next" not in bytes(m.view)
    b.unmap_grant(m)


def test_flags_track_pins_and_block_end_access(domains) -> None:
    a, b = domains.create("a"), domains.create("b")
    ref = a.gnttab.grant_access(b.domid, 1)
    m1 = b.map_grant(a.domid, ref, readonly=True)
    assert a.gnttab.entry(ref)[0] & (GTF_reading | GTF_writing) == GTF_reading
    m2 = b.map_grant(a.domid, ref)
    assert a.gnttab.entry(ref)[0] & GTF_writing
    with pytest.raises(GrantInUse):
        a.gnttab.end_access(ref)
    b.unmap_grant(m2)
    assert a.gnttab.entry(ref)[0] & (GTF_reading | GTF_writing) == GTF_reading
    with pytest.raises(GrantInUse):
        a.gnttab.end_access(ref)
    b.unmap_grant(m1)
    a.gnttab.end_access(ref)
    assert a.gnttab.entry(ref)[0] == 0
    # once ended, the grant no longer maps
    (res,) = b.map_grants([(a.domid, ref, True)])
    assert res.status == GNTST_general_error


def test_batches(domains) -> None:
    a, b = domains.create("a"), domains.create("b")
    refs = []
    for gfn in range(200):   # more than one hypercall batch
        a.memory.frame(gfn)[:4] = gfn.to_bytes(4, "little")
        refs.append(a.gnttab.grant_access(b.domid, gfn, readonly=gfn % 2 == 0))
    results = b.map_grants([(a.domid, r, gfn % 2 == 0) for gfn, r in enumerate(refs)])
    assert [r.status for r in results] == [GNTST_okay] * 200
    for gfn, r in enumerate(results):
        assert int.from_bytes(r.mapping.view[:4], "little") == gfn
        assert r.mapping.view.readonly == (gfn % 2 == 0)
    assert b.unmap_grants([r.mapping for r in results]) == [GNTST_okay] * 200
    for r in refs:
        a.gnttab.end_access(r)


def test_mixed_batch_reports_each_status(domains) -> None:
    a, b, c = domains.create("a"), domains.create("b"), domains.create("c")
    good = a.gnttab.grant_access(b.domid, 0)
    to_c = a.gnttab.grant_access(c.domid, 1)
    ro = a.gnttab.grant_access(b.domid, 2, readonly=True)
    beyond = a.gnttab.grant_access(b.domid, a.memory.nr_frames + 10)   # a frame a does not have
    ungranted = good + 100
    results = b.map_grants([
        (a.domid, good, False),
        (a.domid, ungranted, False),
        (a.domid, to_c, False),
        (a.domid, ro, False),                   # write-mapping a read-only grant
        (a.domid, a.gnttab.nr_entries, False),  # past the table
        (a.domid, 2**32 - 1, False),
        (4000, good, False),                    # no such domain
        (a.domid, beyond, False),
        (a.domid, ro, True),
    ])
    assert [r.status for r in results] == [
        GNTST_okay, GNTST_general_error, GNTST_general_error, GNTST_general_error,
        GNTST_bad_gntref, GNTST_bad_gntref, GNTST_bad_domain, GNTST_bad_page, GNTST_okay]
    # failed ops leave no pin behind
    assert a.gnttab.entry(beyond)[0] & (GTF_reading | GTF_writing) == 0
    assert b.unmap_grants([results[0].mapping, results[8].mapping]) == [GNTST_okay, GNTST_okay]


def test_read_only_grant_gives_read_only_view(domains) -> None:
    a, b = domains.create("a"), domains.create("b")
    ref = a.gnttab.grant_access(b.domid, 3, readonly=True)
    assert a.gnttab.entry(ref)[0] & GTF_readonly
    m = b.map_grant(a.domid, ref, readonly=True)
    assert m.view.readonly
    with pytest.raises(TypeError):
        m.view[0] = 1
    b.unmap_grant(m)


def test_handles_are_single_use(domains) -> None:
    a, b = domains.create("a"), domains.create("b")
    ref = a.gnttab.grant_access(b.domid, 0)
    m = b.map_grant(a.domid, ref)
    b.unmap_grant(m)
    assert b.unmap_grants([m]) == [GNTST_bad_handle]
    with pytest.raises(ValueError):      # the view died with the mapping
        bytes(m.view)
    # another domain cannot unmap b's handle either
    c = domains.create("c")
    m2 = b.map_grant(a.domid, ref)
    assert c.unmap_grants([m2]) == [GNTST_bad_handle]
    b.unmap_grant(m2)


def test_guessing_refs_yields_nothing(domains) -> None:
    a, b, c = domains.create("a"), domains.create("b"), domains.create("c")
    for gfn in range(8):
        a.gnttab.grant_access(c.domid, gfn)       # everything goes to c, nothing to b
    guesses = [(a.domid, ref, ro) for ref in range(0, 64) for ro in (True, False)]
    guesses += [(domid, 8, False) for domid in (0, a.domid, b.domid, c.domid, 0x7FF0, 0xFFFF)]
    assert all(r.mapping is None for r in b.map_grants(guesses))


def test_copy_between_grants_and_local_frames(domains) -> None:
    a, b = domains.create("a"), domains.create("b")
    a.memory.frame(0)[:PAGE_SIZE] = bytes(range(256)) * 16
    src = a.gnttab.grant_access(b.domid, 0, readonly=True)
    dst = a.gnttab.grant_access(b.domid, 1)
    b.memory.frame(2)[:5] = b"local"
    statuses = b.copy_grants([
        CopyOp(src, 0, 4, 0, PAGE_SIZE, src_domid=a.domid),          # grant -> own frame 4
        CopyOp(2, 0, dst, 10, 5, dst_domid=a.domid),                 # own frame -> grant
        CopyOp(src, 4000, 5, 0, 200, src_domid=a.domid),             # crosses the page
        CopyOp(src, 0, 5, 0, 8, src_domid=a.domid, dst_domid=a.domid),  # dst "gref" src is ro: not ours to write
        CopyOp(2, 0, 3, 0, 8, src_domid=None, dst_domid=None),       # purely local
        CopyOp(src + 50, 0, 5, 0, 8, src_domid=a.domid),             # ungranted ref
        CopyOp(10**6, 0, 5, 0, 8),                                   # local gfn out of range
    ])
    assert statuses == [GNTST_okay, GNTST_okay, GNTST_bad_copy_arg, GNTST_general_error,
                        GNTST_okay, GNTST_general_error, GNTST_bad_page]
    assert bytes(b.memory.frame(4)) == bytes(range(256)) * 16
    assert bytes(a.memory.frame(1)[10:15]) == b"local"
    assert bytes(b.memory.frame(3)[:5]) == b"local"
    # copies pin only while they run
    a.gnttab.end_access(src)
    a.gnttab.end_access(dst)


def test_copy_batch_around_an_entry_its_granter_holds_locked(domains) -> None:
    """The broker locks a batch's entries over their span in one call; when the granter holds one
    of them (ending access, say) the others are still copied and that one says GNTST_eagain."""
    a, b = domains.create("a"), domains.create("b")
    refs = []
    for gfn in range(3):
        a.memory.frame(gfn)[:4] = b"src%d" % gfn
        refs.append(a.gnttab.grant_access(b.domid, gfn, readonly=True))
    ops = [CopyOp(ref, 0, 4 + i, 0, 4, src_domid=a.domid) for i, ref in enumerate(refs)]
    assert grant_lock.lock_entry(a.gnttab.fd, refs[1], wait=False)
    try:
        assert b.copy_grants(ops) == [GNTST_okay, GNTST_eagain, GNTST_okay]
    finally:
        grant_lock.unlock_entry(a.gnttab.fd, refs[1])
    assert [bytes(b.memory.frame(4 + i)[:4]) for i in range(3)] == [b"src0", bytes(4), b"src2"]
    # the batch left no entry locked: the granter gets every lock at once
    assert grant_lock.lock_entries(a.gnttab.fd, min(refs), max(refs) - min(refs) + 1, wait=False)
    grant_lock.unlock_entries(a.gnttab.fd, min(refs), max(refs) - min(refs) + 1)
    assert b.copy_grants(ops) == [GNTST_okay] * 3
    assert bytes(b.memory.frame(5)[:4]) == b"src1"
    for ref in refs:
        a.gnttab.end_access(ref)


def test_a_full_batch_naming_two_frames_an_op(domains) -> None:
    """128 ops, each from a grant of its own to a frame of the copier's own: 256 frames in one
    batch, every one of them still mapped when its copy runs (the broker keeps a batch's frames)."""
    a, b = domains.create("a", memory="2M"), domains.create("b", memory="2M")
    refs = []
    for gfn in range(128):
        a.memory.frame(gfn)[:4] = gfn.to_bytes(4, "little")
        refs.append(a.gnttab.grant_access(b.domid, gfn, readonly=True))
    ops = [CopyOp(ref, 0, 200 + i, 0, 4, src_domid=a.domid) for i, ref in enumerate(refs)]
    b.memory.ensure(range(200, 328))              # frames b has (memory is populated as it is used)
    assert b.copy_grants(ops) == [GNTST_okay] * 128
    assert [int.from_bytes(b.memory.frame(200 + i)[:4], "little") for i in range(128)] == list(range(128))
    for ref in refs:
        a.gnttab.end_access(ref)


def test_copy_overlapping_within_a_frame_and_one_grant_twice(domains) -> None:
    a, b = domains.create("a"), domains.create("b")
    a.memory.frame(0)[:8] = b"granted!"
    ref = a.gnttab.grant_access(b.domid, 0)
    b.memory.frame(2)[:200] = bytes(range(200))
    statuses = b.copy_grants([
        CopyOp(2, 0, 2, 50, 100),                                  # own frame onto itself, overlapping
        CopyOp(ref, 0, 3, 0, 8, src_domid=a.domid),                # the grant as source ...
        CopyOp(3, 0, ref, 8, 8, dst_domid=a.domid),                # ... and as destination, same batch
    ])
    assert statuses == [GNTST_okay] * 3
    assert bytes(b.memory.frame(2)[:200]) == bytes(range(50)) + bytes(range(100)) + bytes(range(150, 200))
    assert bytes(a.memory.frame(0)[:16]) == b"granted!granted!"
    a.gnttab.end_access(ref)


def test_copy_reaches_the_frame_that_replaced_a_revoked_one(domains) -> None:
    """The broker keeps the frames it copied through; once the granter has replaced a frame a
    grantee was given (that grantee may have kept the old page), copies go to the new frame only."""
    if domains.variant == "local":
        pytest.skip("the in-process variant does not replace frames")
    a, b = domains.create("a"), domains.create("b")
    gfn = 3
    ref = a.gnttab.grant_access(b.domid, gfn)
    b.memory.frame(0)[:5] = b"first"
    assert b.copy_grants([CopyOp(0, 0, ref, 0, 5, dst_domid=a.domid)]) == [GNTST_okay]
    (m,) = b.map_grants([(a.domid, ref, False)])     # b is given the frame itself: a renews it on revoke
    assert m.ok
    assert b.unmap_grants([m.mapping]) == [GNTST_okay]
    # the old frame, as a grantee that hid it would still hold it (opened only now: the broker
    # refuses an unmap while the grantee's process holds the frame, and this is that process)
    start = a.memory.frame_address(gfn)
    old_frame = os.open(f"/proc/self/map_files/{start:x}-{start + PAGE_SIZE:x}", os.O_RDONLY)
    try:
        a.gnttab.end_access(ref)
        ref = a.gnttab.grant_access(b.domid, gfn)
        b.memory.frame(0)[:5] = b"later"
        assert b.copy_grants([CopyOp(0, 0, ref, 0, 5, dst_domid=a.domid)]) == [GNTST_okay]
        assert bytes(a.memory.frame(gfn)[:5]) == b"later"
        assert os.pread(old_frame, 5, 0) == b"first"      # what b could have kept never sees it
        a.gnttab.end_access(ref)
    finally:
        os.close(old_frame)


def test_map_again_is_given_the_frame_and_the_mode_of_now(domains) -> None:
    """The broker keeps the descriptors of frames it lately sent: a read-only map of a frame first
    mapped writable is still read-only, and after the granter replaced the frame (ending access to a
    frame a grantee was given) a map reaches the new frame, never the one the cache held."""
    a, b = domains.create("a"), domains.create("b")
    gfn = 3
    ref = a.gnttab.grant_access(b.domid, gfn)
    m = b.map_grant(a.domid, ref)
    m.view[:5] = b"first"
    b.unmap_grant(m)
    m = b.map_grant(a.domid, ref, readonly=True)
    assert m.view.readonly and bytes(m.view[:5]) == b"first"
    with pytest.raises(TypeError):
        m.view[0] = 1
    b.unmap_grant(m)
    a.gnttab.end_access(ref)
    a.memory.frame(gfn)[:5] = b"later"
    ref = a.gnttab.grant_access(b.domid, gfn)
    for readonly in (False, True):
        m = b.map_grant(a.domid, ref, readonly=readonly)
        assert bytes(m.view[:5]) == b"later"
        b.unmap_grant(m)
    a.gnttab.end_access(ref)


def test_copy_cannot_name_another_domains_frames(domains) -> None:
    a, b = domains.create("a"), domains.create("b")
    a.memory.frame(0)[:6] = b"secret"
    op = CopyOp(0, 0, 0, 0, 6)
    segment = list(op)
    segment[1] = a.domid   # claim a's gfn 0 as a local source (source.domid)
    # through the public API the only way is a CopyOp whose src is "local":
    # the hypervisor checks the domid of a non-gref side is the caller's.
    if domains.variant == "local":
        statuses = domains.local.hv.grant_copy(domains.local.hv.domain(b.domid),
                                               copy_columns(pack_copy_segments([tuple(segment)])))
    else:
        reply, _ = b.call("copy", ops=pack_copy_segments([tuple(segment)]))
        statuses = reply["results"]
    assert statuses == [GNTST_permission_denied]
    assert bytes(b.memory.frame(0)[:6]) != b"secret"


def test_dying_grantee_releases_its_mappings(domains) -> None:
    a, b = domains.create("a"), domains.create("b")
    refs = [a.gnttab.grant_access(b.domid, gfn) for gfn in range(4)]
    maps = b.map_grants([(a.domid, r, False) for r in refs])
    assert all(r.ok for r in maps)
    assert not a.gnttab.try_end_access(refs[0])
    b.close()
    domains.hosts.remove(b)
    wait_until(lambda: domains.domain_state(b.domid) == "crashed", what="the broker to see b die")
    for r in refs:
        a.gnttab.end_access(r)


def test_grant_table_exhaustion(domains) -> None:
    from xdom.domains.grant_table import GrantTableFull
    a = domains.create("a")
    refs = []
    with pytest.raises(GrantTableFull):
        while True:
            refs.append(a.gnttab.grant_access(0, 0))
    assert len(refs) == a.gnttab.nr_entries - 8      # the reserved references stay reserved
    a.gnttab.end_and_release(refs[0])
    assert a.gnttab.grant_access(0, 0) == refs[0]
