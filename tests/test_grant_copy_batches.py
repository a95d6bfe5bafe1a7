"""Grant copy batches: the uniform path (a batch checked as a whole) answers exactly as op by op.

``grant_copy`` first tries a batch as a whole (every op naming its sides
alike, every op bound to succeed) and otherwise goes op by op.  Adding one op
that can never be uniform (a copy past the end of a page, GNTST_bad_copy_arg,
which moves nothing) forces the op-by-op path on the same batch, so each
batch is run both ways from the same memory, through the public hypercall,
on both hypervisor variants: the statuses and every byte must agree.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xdom.broker import frames as frames_module
from xdom.broker.frames import CopyFrames, FrameAllocator, ProcFrames
from xdom.domains.abi.grant_table import GNTTAB_COPY, PAGE_SIZE, GNTST_bad_copy_arg, GNTST_okay
from xdom.domains.abi.hypercall_wire import MAX_BATCH, copy_columns, pack_copy_segments
from xdom.domains.hostsys.memory import DomainMemory
from xdom.domains.xenhost import CopyOp

FRAMES = 24          # of each domain that the batches name


_U64, _U16, _S16 = st.integers(0, 2**64 - 1), st.integers(0, 2**16 - 1), st.integers(-2**15, 2**15 - 1)
_SEGMENT = st.tuples(_U64, _U16, _U16, _U64, _U16, _U16, _U16, _U16, _S16)


@settings(max_examples=60, deadline=None)
@given(st.lists(_SEGMENT, max_size=MAX_BATCH))
def test_a_batch_unpacks_into_one_column_per_field(segments: list[tuple[int, ...]]) -> None:
    """copy_columns reads the struct gnttab_copy array the caller packed: column i holds field i of
    every segment, in order, whatever the values (the broker judges a batch column by column)."""
    blob = pack_copy_segments(segments)
    assert len(blob) == GNTTAB_COPY.size * len(segments)
    columns = copy_columns(blob)
    assert len(columns) == 9
    assert list(zip(*columns)) == segments
    assert all(len(column) == len(segments) for column in columns)


def _snapshot(hosts) -> list[bytes]:
    return [bytes(h.memory.frame(gfn)) for h in hosts for gfn in range(FRAMES)]


def _restore(hosts, snap: list[bytes]) -> None:
    it = iter(snap)
    for h in hosts:
        for gfn in range(FRAMES):
            h.memory.frame(gfn)[:] = next(it)


def _random_batch(rng: random.Random, a, refs: dict[str, list[int]], copier_gfns: int) -> list[CopyOp]:
    """A batch whose ops all name their sides alike (mostly: a uniform candidate), some set to fail."""
    src_grant, dst_grant = rng.choice([(True, False), (False, True), (True, True), (False, False)])
    whole = rng.random() < 0.5
    ops = []
    for _ in range(rng.randint(1, 40)):
        def side(grant: bool, writing: bool) -> tuple[int, int | None]:
            if not grant:
                return (rng.randrange(copier_gfns) if rng.random() < 0.97 else 10**6), None
            pool = rng.choices(["rw", "ro", "other", "none"], weights=[90, 0 if writing else 6, 2, 2])[0]
            if writing and rng.random() < 0.03:
                pool = "ro"                         # read-only as destination: general error
            return rng.choice(refs[pool]), a.domid
        s, s_dom = side(src_grant, writing=False)
        d, d_dom = side(dst_grant, writing=True)
        if whole and rng.random() < 0.97:
            soff, doff, length = 0, 0, PAGE_SIZE
        else:
            length = rng.randint(1, PAGE_SIZE)
            soff, doff = rng.randint(0, PAGE_SIZE - length), rng.randint(0, PAGE_SIZE - length)
            if rng.random() < 0.03:
                soff = PAGE_SIZE - length + 1       # past the page: bad copy argument
        ops.append(CopyOp(s, soff, d, doff, length, src_domid=s_dom, dst_domid=d_dom))
    return ops


def test_uniform_batches_answer_as_op_by_op(domains) -> None:
    a, b, c = domains.create("a"), domains.create("b"), domains.create("c")
    hosts = (a, b)
    rng = random.Random(1234)
    for h in hosts:
        for gfn in range(FRAMES):
            h.memory.frame(gfn)[:] = rng.randbytes(PAGE_SIZE)
    refs = {"rw": [a.gnttab.grant_access(b.domid, gfn) for gfn in range(0, 12)],
            "ro": [a.gnttab.grant_access(b.domid, gfn, readonly=True) for gfn in range(12, 18)],
            "other": [a.gnttab.grant_access(c.domid, gfn) for gfn in range(18, 20)]}
    refs["none"] = [max(refs["other"]) + 1 + i for i in range(4)]      # never granted
    forced = CopyOp(0, PAGE_SIZE, 1, 0, 1)              # never uniform, moves nothing
    uniform_seen = 0
    for _ in range(150):
        ops = _random_batch(rng, a, refs, FRAMES)
        before = _snapshot(hosts)
        statuses = b.copy_grants(ops)
        after = _snapshot(hosts)
        _restore(hosts, before)
        *by_op, last = b.copy_grants(ops + [forced])
        assert last == GNTST_bad_copy_arg
        assert statuses == by_op, ops
        assert _snapshot(hosts) == after, ops
        uniform_seen += not any(statuses)
    assert uniform_seen > 30            # the batches exercised the uniform path, not only its refusal


def test_the_frames_of_a_batch_outlive_a_smaller_cache() -> None:
    """CopyFrames drops kept frames only between batches (trim): a batch naming more frames
    than it keeps still copies through every one of them; a frame replaced is never reached again."""
    alloc = FrameAllocator(8)
    memory = DomainMemory(8, populate=alloc.populate, batch=8)
    frames = ProcFrames(os.getpid(), memory.base, alloc.inodes)
    copier = CopyFrames(cache_size=2)
    try:
        views = copier.views(frames, list(range(8)))
        for gfn, view in enumerate(views):
            assert view is not None
            view[:4] = b"gfn%d" % gfn
        assert [bytes(memory.frame(gfn)[:4]) for gfn in range(8)] == [b"gfn%d" % g for g in range(8)]
        assert copier.all_views(frames, [0, 7]) is not None
        copier.trim()
        assert sum(map(len, copier._kept.values())) == 2
        # kept or not, the same frames
        again = copier.all_views(frames, list(range(8)))
        assert again is not None and [bytes(v[:4]) for v in again] == [b"gfn%d" % g for g in range(8)]
        copier.trim()
        # gfn 3 gets a new frame (a revocation by replacement): the old one is no longer its frame
        for fd in alloc.remake(3, 1):
            os.close(fd)
        kept, replaced = copier.views(frames, [2, 3])
        assert kept is not None and bytes(kept[:4]) == b"gfn2" and replaced is None
        assert copier.all_views(frames, [2, 3]) is None
        copier.forget(frames)
        assert copier._kept == {}
    finally:
        copier.close()
        memory.close()


@pytest.mark.parametrize("rows_up_to", [None, 3])
def test_a_run_of_kept_frames_is_checked_frame_by_frame(monkeypatch, rows_up_to: int | None) -> None:
    """A batch naming neighbouring gfns is checked with two slices of inodes (_DomainKept.run_views):
    one frame replaced in the middle of a kept run, gfns kept only in part, or a run reaching past the
    domain's last frame must each be refused as the gfn-by-gfn look would, never a stale or short answer.
    With the rows cut short (ROWS_UP_TO), frames above them answer the same through the dicts."""
    if rows_up_to is not None:
        monkeypatch.setattr(frames_module, "ROWS_UP_TO", rows_up_to)
    alloc = FrameAllocator(8)
    memory = DomainMemory(8, populate=alloc.populate, batch=8)
    frames = ProcFrames(os.getpid(), memory.base, alloc.inodes)
    copier = CopyFrames(cache_size=16)
    try:
        for gfn, view in enumerate(copier.views(frames, list(range(8)))):
            assert view is not None
            view[:4] = b"gfn%d" % gfn
        kept = copier.all_views(frames, range(8))
        assert kept is not None and [bytes(v[:4]) for v in kept] == [b"gfn%d" % g for g in range(8)]
        shuffled = copier.all_views(frames, [0, 2, 1, 3])               # first and last a run apart, not a run
        assert shuffled is not None and [bytes(v[:4]) for v in shuffled] == [b"gfn0", b"gfn2", b"gfn1", b"gfn3"]
        assert copier.all_views(frames, (6, 7, 8, 9)) is None          # past the last frame: no short list
        assert copier.all_views(frames, [7, 8]) is None
        for fd in alloc.remake(4, 1):                                  # gfn 4 gets a new frame
            os.close(fd)
        assert copier.all_views(frames, [6, 4, 1]) is None             # scattered gfns: looked up one by one
        for fd in alloc.remake(5, 1):                                  # (a refusal drops the stale frame: another)
            os.close(fd)
        assert copier.all_views(frames, range(2, 7)) is None
        views = copier.views(frames, list(range(8)))
        assert views[4] is None is views[5] and [bytes(v[:4]) for g, v in enumerate(views) if g not in (4, 5)] == \
            [b"gfn%d" % g for g in range(8) if g not in (4, 5)]
        copier.forget(frames)
        assert copier._kept == {}
        # kept in part: the run answers through frames reached afresh, each its own
        assert copier.all_views(frames, [3]) is not None
        part = copier.all_views(frames, range(2, 4))
        assert part is not None and [bytes(v[:4]) for v in part] == [b"gfn2", b"gfn3"]
    finally:
        copier.close()
        memory.close()


@pytest.mark.parametrize("length", [1, PAGE_SIZE])
def test_a_uniform_batch_copies_onto_itself_in_order(domains, length: int) -> None:
    """Ops of one uniform batch run in order: an op reads what an earlier one of the batch wrote."""
    a, b = domains.create("a"), domains.create("b")
    for gfn in range(3):
        a.memory.frame(gfn)[:] = bytes(PAGE_SIZE)
    a.memory.frame(0)[:length] = b"x" * length
    refs = [a.gnttab.grant_access(b.domid, gfn) for gfn in range(3)]
    statuses = b.copy_grants([CopyOp(refs[0], 0, refs[1], 0, length, src_domid=a.domid, dst_domid=a.domid),
                              CopyOp(refs[1], 0, refs[2], 0, length, src_domid=a.domid, dst_domid=a.domid)])
    assert statuses == [GNTST_okay, GNTST_okay]
    assert bytes(a.memory.frame(2)[:length]) == b"x" * length


@pytest.mark.parametrize("odd_one", ["ro", "other", "none"])
@pytest.mark.parametrize("direction", ["into grants", "out of grants"])
def test_one_odd_entry_in_a_run_of_neighbouring_grants(domains, odd_one: str, direction: str) -> None:
    """A backend's batch names neighbouring refs, which the broker judges as one run read out of the
    table: one entry among them that is read-only (as a destination), granted to someone else or
    not granted at all gets its own status, the rest are copied, and the odd one's frame is untouched."""
    a, b, c = domains.create("a"), domains.create("b"), domains.create("c")
    n, odd = 8, 5
    for gfn in range(n):
        a.memory.frame(gfn)[:] = bytes([0xA0 + gfn]) * PAGE_SIZE
        b.memory.frame(gfn)[:] = bytes([0xB0 + gfn]) * PAGE_SIZE
    refs = []
    for gfn in range(n):
        if gfn != odd or odd_one == "ro":
            refs.append(a.gnttab.grant_access(b.domid, gfn, readonly=gfn == odd and direction == "into grants"))
        elif odd_one == "other":
            refs.append(a.gnttab.grant_access(c.domid, gfn))
        else:
            refs.append(a.gnttab.grant_access(b.domid, gfn))
            a.gnttab.end_access(refs[-1])
    assert refs == list(range(refs[0], refs[0] + n))        # neighbours: one run
    if direction == "into grants":
        ops = [CopyOp(gfn, 0, ref, 0, PAGE_SIZE, dst_domid=a.domid) for gfn, ref in enumerate(refs)]
    else:
        ops = [CopyOp(ref, 0, gfn, 0, PAGE_SIZE, src_domid=a.domid) for gfn, ref in enumerate(refs)]
    statuses = b.copy_grants(ops)
    if odd_one == "ro" and direction == "out of grants":
        assert statuses == [GNTST_okay] * n                 # reading through a read-only grant is fine
    else:
        assert statuses[odd] != GNTST_okay and statuses[:odd] + statuses[odd + 1:] == [GNTST_okay] * (n - 1)
    for gfn in range(n):
        moved = statuses[gfn] == GNTST_okay
        if direction == "into grants":
            assert bytes(a.memory.frame(gfn)) == bytes([(0xB0 if moved else 0xA0) + gfn]) * PAGE_SIZE
        else:
            assert bytes(b.memory.frame(gfn)) == bytes([(0xA0 if moved else 0xB0) + gfn]) * PAGE_SIZE
