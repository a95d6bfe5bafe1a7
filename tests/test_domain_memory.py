"""A domain's memory is populated as it is used: a chunk of frames the first time one of its gfns is.

The frames here are real memfds (``_make_frames``, what the in-process
variant maps), handed over by a ``populate`` that records what it was asked
for, as the broker's hypercall is; the rest of the region stays an
unreadable reservation.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from xdom.domains.abi.grant_table import PAGE_SIZE
from xdom.domains.abi.hypercall_wire import HypercallError
from xdom.domains.frame_pool import FramePool, OutOfFrames
from xdom.domains.hostsys.memory import DomainMemory, _make_frames


class Populate:
    """A broker's populate_physmap: real frames, each gfn once, and a record of the calls."""

    def __init__(self, budget: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.given: set[int] = set()
        self.budget = budget

    def __call__(self, start: int, count: int) -> list[int]:
        gfns = set(range(start, start + count))
        assert not gfns & self.given, f"gfns {sorted(gfns & self.given)} asked for twice"
        if self.budget is not None and len(self.given) + count > self.budget:
            raise HypercallError(errno.ENOMEM, "no more frames for this domain")
        self.calls.append((start, count))
        self.given |= gfns
        return _make_frames(count)


def mapped(memory: DomainMemory, gfn: int) -> bool:
    """Whether the gfn's page is mapped (read from /proc/self/maps, never by touching it)."""
    addr = memory.base + gfn * PAGE_SIZE
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return "xdom-frame" in line
    return False


class Lazy:
    """A domain's memory of 1000 frames populated on demand, 32 at a time, and its populate calls."""

    def __init__(self) -> None:
        self.populate = Populate()
        self.memory = DomainMemory(1000, self.populate, batch=32)
        self.calls = self.populate.calls


@pytest.fixture
def lazy() -> Iterator[Lazy]:
    it = Lazy()
    yield it
    it.memory.close()


def test_only_the_first_and_last_chunks_are_made_at_start(lazy: Lazy) -> None:
    memory = lazy.memory
    assert lazy.calls == [(0, 32), (992, 8)]
    assert memory.populated == 40
    assert mapped(memory, 0) and mapped(memory, 999) and not mapped(memory, 500)


def test_a_frame_reached_is_populated_with_its_chunk_once(lazy: Lazy) -> None:
    memory = lazy.memory
    memory.frame(500)[:5] = b"hello"                 # chunk 15: gfns 480..511
    assert lazy.calls[-1] == (480, 32)
    assert bytes(memory.frame(500)[:5]) == b"hello" and mapped(memory, 480) and mapped(memory, 511)
    calls = len(lazy.calls)
    memory.frame(481)
    memory.frame_address(511)
    memory.ensure([480, 500, 999, 0])
    assert len(lazy.calls) == calls and memory.populated == 72
    memory.ensure([100, 33, 700, 1000, -1])          # out of range: ignored; the others in gfn order
    assert lazy.calls[-3:] == [(32, 32), (96, 32), (672, 32)]
    with pytest.raises(IndexError):
        memory.frame(1000)


def test_the_frame_pool_populates_what_it_hands_out(lazy: Lazy) -> None:
    memory = lazy.memory
    pool = FramePool(memory.nr_frames, {999}, memory.ensure)
    gfns = pool.alloc(40)
    assert gfns == list(range(40)) and all(mapped(memory, g) for g in gfns)
    assert lazy.calls[-1] == (32, 32)


def test_memory_the_broker_will_not_give_is_out_of_frames_and_loses_no_gfn() -> None:
    mem = DomainMemory(256, Populate(budget=64), batch=32)      # chunks 0 and 7 at start: the budget is spent
    try:
        pool = FramePool(mem.nr_frames, (), mem.ensure)
        assert pool.alloc(32) == list(range(32))
        with pytest.raises(OutOfFrames, match="no more frames"):
            pool.alloc(1)
        assert pool.available() == 256 - 32 and not mapped(mem, 32)
    finally:
        mem.close()


def test_the_in_process_variant_makes_all_its_frames_at_once() -> None:
    mem = DomainMemory(100, batch=32)
    try:
        assert mem.populated == 100 and all(mapped(mem, g) for g in (0, 31, 32, 64, 99))
    finally:
        mem.close()
