"""CopyFrames against a model: whatever a domain's frames went through, a copy reaches a gfn's own frame or nothing.

CopyFrames answers a batch's frames three ways -- slices of per-domain rows
for a run of neighbouring gfns, one itemgetter for scattered ones, and frame
by frame for the rest -- and keeps, trims and forgets mappings between
batches.  A random sequence of batches, replaced frames (the revocation a
``replace_frames`` does), trims and forgets is checked after every step
against what it must answer: a gfn outside the domain, or whose frame was
replaced since the domain mapped it, gets no frame; any other gets the
frame made for it (told by a marker written once into each).  Run with the
rows as they are and cut short, so that runs cross their end.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xdom.broker import frames as frames_module
from xdom.broker.frames import CopyFrames, FrameAllocator, ProcFrames
from xdom.domains.hostsys.memory import DomainMemory

FRAMES = 12
_GFN = st.one_of(st.integers(0, FRAMES - 1), st.sampled_from([-1, FRAMES, 10**6, 2**64 - 1]))
_RUN = st.tuples(st.integers(-2, FRAMES), st.integers(0, FRAMES + 2)).map(lambda r: list(range(r[0], r[0] + r[1])))
_GFNS = st.one_of(
    _RUN,
    _RUN.flatmap(st.permutations),                                   # a run's gfns out of order
    _RUN.filter(lambda r: len(r) > 2).flatmap(                       # ... but for its first and last
        lambda r: st.permutations(r[1:-1]).map(lambda middle: [r[0], *middle, r[-1]])),
    st.lists(st.integers(0, FRAMES - 1), min_size=2, max_size=8),     # scattered, all in the domain
    st.lists(_GFN, max_size=FRAMES + 2),
)
_STEP = st.one_of(
    st.tuples(st.just("views"), _GFNS),
    st.tuples(st.just("views"), st.just(list(range(FRAMES)))),       # every frame: most are kept after
    st.tuples(st.just("all_views"), _GFNS),
    st.tuples(st.just("replace"), st.integers(0, FRAMES - 1)),
    st.tuples(st.just("trim"), st.none()),
    st.tuples(st.just("forget"), st.none()),
)


def _marker(gfn: int) -> bytes:
    return b"frame %02d" % gfn


@pytest.mark.parametrize("rows_up_to", [frames_module.ROWS_UP_TO, 5])
@settings(max_examples=200, deadline=None)
@given(steps=st.lists(_STEP, max_size=25), cache_size=st.integers(1, 2 * FRAMES))
def test_copy_frames_answer_each_gfn_its_own_frame_or_nothing(rows_up_to: int, steps, cache_size: int) -> None:
    saved = frames_module.ROWS_UP_TO
    frames_module.ROWS_UP_TO = rows_up_to
    alloc = FrameAllocator(FRAMES)
    memory = DomainMemory(FRAMES, populate=alloc.populate, batch=FRAMES)
    frames = ProcFrames(os.getpid(), memory.base, alloc.inodes)
    copier = CopyFrames(cache_size=cache_size)
    replaced: set[int] = set()
    try:
        for gfn in range(FRAMES):
            memory.frame(gfn)[:len(_marker(gfn))] = _marker(gfn)

        def expected(gfn: int) -> bytes | None:
            return _marker(gfn) if 0 <= gfn < FRAMES and gfn not in replaced else None

        def seen(view: memoryview | None, gfn: int) -> bytes | None:
            return None if view is None else bytes(view[:len(_marker(0))])

        for what, arg in steps:
            if what == "views":
                got = copier.views(frames, arg)
                assert [seen(v, g) for v, g in zip(got, arg)] == [expected(g) for g in arg], (what, arg)
                assert len(got) == len(arg)
            elif what == "all_views":
                got = copier.all_views(frames, arg)
                want = [expected(g) for g in arg]
                if None in want:
                    assert got is None, (what, arg)
                else:
                    assert got is not None and [seen(v, g) for v, g in zip(got, arg)] == want, (what, arg)
                    assert len(got) == len(arg)
            elif what == "replace":
                for fd in alloc.remake(arg, 1):      # the domain still maps the old frame at that gfn
                    os.close(fd)
                replaced.add(arg)
            elif what == "trim":
                copier.trim()
                assert sum(map(len, copier._kept.values())) <= cache_size
            else:
                copier.forget(frames)
                assert copier._kept == {}
            copier.trim()                               # grant_copy trims after every batch
    finally:
        frames_module.ROWS_UP_TO = saved
        copier.close()
        memory.close()
