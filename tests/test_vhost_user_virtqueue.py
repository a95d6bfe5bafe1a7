"""Split virtqueues against a driver written here from the virtio spec, hostile tables, inflight."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdom.domains.vhost_user.inflight import InflightArea, area_size, queue_region_size
from xdom.domains.vhost_user.memory import GuestMemory, GuestMemoryError, MemoryRegion, MemoryTableError
from xdom.domains.vhost_user.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_USED_F_NO_NOTIFY,
    DescriptorChain,
    RingLayout,
    Segment,
    SplitVirtqueue,
    vring_need_event,
)

# Guest memory: two adjacent regions (a buffer may cross from one into the other) and one after a gap.
REGIONS = [(0x0, 0x40000), (0x40000, 0x40000), (0x100000, 0x40000)]
DESC, AVAIL, USED = 0x1000, 0x9000, 0xA000          # room for 32768/16... up to 2048 entries
MEM_LIMIT = 0x140000


class Tracking:
    """A MemoryAccess that fails the test if the queue even *tries* to leave the table."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.accesses = 0

    def read(self, gpa: int, length: int) -> bytes:
        self.accesses += 1
        assert self.mem.contains(gpa, length), f"read outside the table at {gpa:#x}+{length:#x}"
        return self.mem.read(gpa, length)

    def write(self, gpa: int, data: bytes) -> None:
        self.accesses += 1
        assert self.mem.contains(gpa, len(data)), f"write outside the table at {gpa:#x}+{len(data):#x}"
        self.mem.write(gpa, data)

    def contains(self, gpa: int, length: int) -> bool:
        return self.mem.contains(gpa, length)


class Driver:
    """The driver's side of a split ring, from the virtio 1.x layout."""

    def __init__(self, num: int = 8) -> None:
        self.mem = GuestMemory()
        self.buffers = []
        for gpa, size in REGIONS:
            buf = bytearray(size)
            slot = self.mem.add(MemoryRegion(guest_phys_addr=gpa, memory_size=size,
                                             userspace_addr=0x7F0000000000 + 2 * gpa, mmap_offset=0))
            self.mem.attach(slot, memoryview(buf))
            self.buffers.append(buf)
        self.num = num
        self.avail_idx = 0
        self.layout = RingLayout(num=num, desc_gpa=DESC, avail_gpa=AVAIL, used_gpa=USED)
        self.access = Tracking(self.mem)

    def queue(self, *, event_idx: bool = True, indirect: bool = True, **kw: object) -> SplitVirtqueue:
        return SplitVirtqueue(self.access, self.layout, event_idx=event_idx, indirect_desc=indirect, **kw)

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int = DESC) -> None:
        self.mem.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def offer(self, *heads: int) -> None:
        for h in heads:
            self.mem.write(AVAIL + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", h))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(AVAIL + 2, struct.pack("<H", self.avail_idx))

    def set_avail_idx(self, idx: int) -> None:
        self.mem.write(AVAIL + 2, struct.pack("<H", idx))

    def u16(self, gpa: int) -> int:
        return struct.unpack("<H", self.mem.read(gpa, 2))[0]

    def put_u16(self, gpa: int, v: int) -> None:
        self.mem.write(gpa, struct.pack("<H", v))

    @property
    def used_idx(self) -> int:
        return self.u16(USED + 2)

    def used(self, k: int) -> tuple[int, int]:
        return struct.unpack("<II", self.mem.read(USED + 4 + 8 * (k % self.num), 8))

    @property
    def avail_event(self) -> int:
        return self.u16(USED + 4 + 8 * self.num)


# --- memory table ---------------------------------------------------------------------------

def test_memory_table_checks_regions() -> None:
    m = GuestMemory()
    m.add(MemoryRegion(guest_phys_addr=0, memory_size=0x1000, userspace_addr=0x10000, mmap_offset=0))
    for bad in [
        MemoryRegion(guest_phys_addr=0x800, memory_size=0x1000, userspace_addr=0x90000, mmap_offset=0),  # GPA
        MemoryRegion(guest_phys_addr=0x9000, memory_size=0x1000, userspace_addr=0x10800, mmap_offset=0),  # UVA
        MemoryRegion(guest_phys_addr=0x9000, memory_size=0, userspace_addr=0x90000, mmap_offset=0),
        MemoryRegion(guest_phys_addr=(1 << 64) - 0x800, memory_size=0x1000, userspace_addr=0x90000, mmap_offset=0),
        MemoryRegion(guest_phys_addr=0x9000, memory_size=1 << 41, userspace_addr=0x90000, mmap_offset=0),
    ]:
        with pytest.raises(MemoryTableError):
            m.add(bad)
    assert m.uva_to_gpa(0x10800, 0x800) == 0x800
    with pytest.raises(GuestMemoryError):
        m.uva_to_gpa(0x10800, 0x801)
    # Not mapped yet: in the table, yet unreachable.
    assert not m.contains(0, 1)
    m.attach(0, memoryview(bytearray(0x1000)))
    assert m.contains(0, 0x1000) and not m.contains(0, 0x1001) and not m.contains(0xFFF, 2)


def test_memory_access_crosses_adjacent_regions_but_not_gaps() -> None:
    d = Driver()
    d.mem.write(0x3FFFE, b"abcd")
    assert d.buffers[0][-2:] == b"ab" and d.buffers[1][:2] == b"cd"
    assert d.mem.read(0x3FFFE, 4) == b"abcd"
    out = bytearray(4)
    d.mem.read_into(0x3FFFE, memoryview(out))
    assert out == b"abcd"
    with pytest.raises(GuestMemoryError):
        d.mem.read(0x7FFFF, 2)
    with pytest.raises(GuestMemoryError):
        d.mem.write(0x7FFFF, b"xy")
    assert d.buffers[1][-1] == 0              # all or nothing
    with pytest.raises(GuestMemoryError):
        d.mem.read(-1, 1)


def test_mmap_offset_selects_the_tail_of_the_mapping() -> None:
    m = GuestMemory()
    slot = m.add(MemoryRegion(guest_phys_addr=0x1000, memory_size=0x10, userspace_addr=0, mmap_offset=0x20))
    backing = bytearray(range(0x30))
    with pytest.raises(ValueError):
        m.attach(slot, memoryview(backing)[:0x2F])
    m.attach(slot, memoryview(backing))
    assert m.read(0x1000, 2) == bytes([0x20, 0x21])


# --- chains ---------------------------------------------------------------------------------

def test_direct_chain_readable_then_writable() -> None:
    d = Driver()
    d.desc(0, 0x20000, 16, VIRTQ_DESC_F_NEXT, 5)
    d.desc(5, 0x3FFF0, 0x20, VIRTQ_DESC_F_NEXT, 2)          # crosses into the adjacent region
    d.desc(2, 0x100000, 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 3)
    d.desc(3, 0x100200, 1, VIRTQ_DESC_F_WRITE)
    q = d.queue()
    assert q.pop() is None
    d.offer(0)
    chain = q.pop()
    assert chain == DescriptorChain(head=0, readable=(Segment(0x20000, 16), Segment(0x3FFF0, 0x20)),
                                    writable=(Segment(0x100000, 512), Segment(0x100200, 1)))
    assert (chain.readable_bytes, chain.writable_bytes) == (48, 513)
    assert q.last_avail_idx == 1 and q.in_flight == 1
    assert d.avail_event == 1                     # EVENT_IDX: "kick me when you pass 1"
    q.push(0, 513)
    assert d.used_idx == 1 and d.used(0) == (0, 513) and q.in_flight == 0


def test_indirect_only_and_mixed_chains() -> None:
    d = Driver()
    table = 0x30000
    d.desc(0, 0x21000, 8, VIRTQ_DESC_F_NEXT, 1, table=table)
    d.desc(1, 0x22000, 100, VIRTQ_DESC_F_WRITE, table=table)
    d.desc(4, table, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE)     # WRITE on the pointer is ignored
    # "zero or more normal chained descriptors followed by a single descriptor with INDIRECT"
    d.desc(6, 0x20000, 4, VIRTQ_DESC_F_NEXT, 7)
    d.desc(7, table, 32, VIRTQ_DESC_F_INDIRECT)
    d.offer(4, 6)
    q = d.queue()
    assert q.pop() == DescriptorChain(head=4, readable=(Segment(0x21000, 8),), writable=(Segment(0x22000, 100),))
    assert q.pop() == DescriptorChain(head=6, readable=(Segment(0x20000, 4), Segment(0x21000, 8)),
                                      writable=(Segment(0x22000, 100),))
    q.push_batch([(6, 100), (4, 0)])
    assert d.used_idx == 2 and [d.used(0), d.used(1)] == [(6, 100), (4, 0)]


def test_indirect_table_may_hold_num_entries() -> None:
    d = Driver(num=4)
    table = 0x30000
    for i in range(4):
        d.desc(i, 0x20000 + 16 * i, 16, VIRTQ_DESC_F_NEXT if i < 3 else 0, i + 1, table=table)
    d.desc(0, table, 64, VIRTQ_DESC_F_INDIRECT)
    d.offer(0)
    chain = d.queue().pop()
    assert chain is not None and len(chain.readable) == 4


def bad_ring(setup, *, num: int = 8, indirect: bool = True, event_idx: bool = True) -> str:
    d = Driver(num=num)
    setup(d)
    q = d.queue(indirect=indirect, event_idx=event_idx)
    assert q.pop() is None
    assert q.needs_reset is not None
    # Once broken, the queue is inert: no pops, no pushes, no memory traffic.
    before = d.access.accesses
    assert q.pop() is None and not q.has_available() and not q.should_notify()
    assert d.access.accesses == before
    return q.needs_reset


T = 0x30000
BAD_RINGS = {
    "head out of range": (lambda d: d.offer(8), "head 8"),
    "avail index runs ahead": (lambda d: d.set_avail_idx(9), "ahead"),
    "loop in the ring": (lambda d: (d.desc(0, 0x20000, 1, VIRTQ_DESC_F_NEXT, 1),
                                    d.desc(1, 0x20000, 1, VIRTQ_DESC_F_NEXT, 0), d.offer(0)), "loops"),
    "self loop": (lambda d: (d.desc(3, 0x20000, 1, VIRTQ_DESC_F_NEXT, 3), d.offer(3)), "loops"),
    "next out of range": (lambda d: (d.desc(0, 0x20000, 1, VIRTQ_DESC_F_NEXT, 8), d.offer(0)), "next 8"),
    "readable after writable": (lambda d: (d.desc(0, 0x20000, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1),
                                           d.desc(1, 0x20000, 1), d.offer(0)), "follows a writable"),
    "buffer in the gap": (lambda d: (d.desc(0, 0x80000, 16), d.offer(0)), "outside guest memory"),
    "buffer past the end": (lambda d: (d.desc(0, 0x13FFF0, 17), d.offer(0)), "outside guest memory"),
    "buffer wraps 2**64": (lambda d: (d.desc(0, (1 << 64) - 8, 16), d.offer(0)), "outside guest memory"),
    "nested indirect": (lambda d: (d.desc(0, T, 16, VIRTQ_DESC_F_INDIRECT, table=T),
                                   d.desc(0, T, 16, VIRTQ_DESC_F_INDIRECT), d.offer(0)), "inside an indirect"),
    "indirect with next": (lambda d: (d.desc(0, T, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1),
                                      d.offer(0)), "also has NEXT"),
    "indirect table not a multiple of 16": (lambda d: (d.desc(0, T, 24, VIRTQ_DESC_F_INDIRECT), d.offer(0)),
                                            "multiple of 16"),
    "empty indirect table": (lambda d: (d.desc(0, T, 0, VIRTQ_DESC_F_INDIRECT), d.offer(0)), "multiple of 16"),
    "indirect table too long": (lambda d: (d.desc(0, T, 16 * 9, VIRTQ_DESC_F_INDIRECT), d.offer(0)),
                                "longer than the queue"),
    "indirect table outside memory": (lambda d: (d.desc(0, 0x90000, 32, VIRTQ_DESC_F_INDIRECT), d.offer(0)),
                                      "outside guest memory"),
    "loop in an indirect table": (lambda d: (d.desc(0, 0x20000, 1, VIRTQ_DESC_F_NEXT, 1, table=T),
                                             d.desc(1, 0x20000, 1, VIRTQ_DESC_F_NEXT, 0, table=T),
                                             d.desc(0, T, 32, VIRTQ_DESC_F_INDIRECT), d.offer(0)), "loops"),
    "next past an indirect table": (lambda d: (d.desc(0, 0x20000, 1, VIRTQ_DESC_F_NEXT, 2, table=T),
                                               d.desc(0, T, 32, VIRTQ_DESC_F_INDIRECT), d.offer(0)),
                                    "table of 2"),
    "same head offered twice": (lambda d: (d.desc(0, 0x20000, 1), d.offer(0, 0)), None),
}


@pytest.mark.parametrize("name", list(BAD_RINGS))
def test_bad_rings_need_a_reset(name: str) -> None:
    setup, words = BAD_RINGS[name]
    if name == "same head offered twice":
        d = Driver()
        setup(d)
        q = d.queue()
        assert q.pop() is not None
        assert q.pop() is None and "still in use" in (q.needs_reset or "")
        return
    reason = bad_ring(setup)
    assert words in reason, reason


def test_indirect_refused_unless_negotiated() -> None:
    reason = bad_ring(lambda d: (d.desc(0, T, 16, VIRTQ_DESC_F_INDIRECT), d.offer(0)), indirect=False)
    assert "not negotiated" in reason


def test_chain_byte_limit() -> None:
    d = Driver()
    d.desc(0, 0x0, 0x30000, VIRTQ_DESC_F_NEXT, 1)
    d.desc(1, 0x100000, 0x30000, VIRTQ_DESC_F_WRITE)
    d.offer(0)
    q = d.queue(max_chain_bytes=0x50000)
    assert q.pop() is None and "more than" in (q.needs_reset or "")


def test_ring_outside_memory_needs_reset_at_once() -> None:
    d = Driver()
    q = SplitVirtqueue(d.access, RingLayout(num=8, desc_gpa=0x3FFF0 + 0x80000, avail_gpa=AVAIL, used_gpa=USED),
                       event_idx=True, indirect_desc=True)
    assert q.needs_reset and q.pop() is None


def test_device_bugs_raise() -> None:
    d = Driver()
    d.desc(0, 0x100000, 10, VIRTQ_DESC_F_WRITE)
    d.offer(0)
    q = d.queue()
    q.pop()
    with pytest.raises(ValueError):
        q.push(1, 0)                     # never popped
    with pytest.raises(ValueError):
        q.push(0, 11)                    # more than offered
    with pytest.raises(ValueError):
        q.push_batch([(0, 1), (0, 1)])   # twice
    q.push(0, 10)
    with pytest.raises(ValueError):
        q.push(0, 10)


def test_resume_from_a_base_and_the_rings_used_index() -> None:
    d = Driver()
    for i in range(8):
        d.desc(i, 0x20000, 1)
    d.avail_idx = 0xFFFE
    d.offer(1, 2, 3)                           # wraps the 16-bit index
    d.put_u16(USED + 2, 0xFFFE)
    q = d.queue(last_avail_idx=0xFFFE)
    heads = [c.head for c in iter(q.pop, None)]
    assert heads == [1, 2, 3] and q.last_avail_idx == 1
    q.push_batch([(h, 0) for h in heads])
    assert q.used_idx == 1 and d.used_idx == 1 and d.used(0xFFFE) == (1, 0) and d.used(0) == (3, 0)


# --- notifications ------------------------------------------------------------------------------

@pytest.mark.parametrize("event,new,old,expected", [
    (0, 1, 0, True), (1, 1, 0, False), (4, 6, 4, True), (5, 6, 4, True), (6, 6, 4, False),
    (0xFFFF, 0, 0xFFFE, True), (0xFFFE, 0, 0xFFFF, False), (3, 3, 3, False),
])
def test_vring_need_event(event: int, new: int, old: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected


def test_notification_without_event_idx_honours_no_interrupt() -> None:
    d = Driver()
    for i in range(3):
        d.desc(i, 0x100000, 4, VIRTQ_DESC_F_WRITE)
    d.offer(0, 1)
    q = d.queue(event_idx=False)
    q.push(q.pop().head, 0)
    assert q.should_notify()
    d.put_u16(AVAIL, VRING_AVAIL_F_NO_INTERRUPT)
    q.push(q.pop().head, 0)
    assert not q.should_notify()


def test_notification_with_event_idx() -> None:
    d = Driver()
    for i in range(8):
        d.desc(i, 0x100000, 4, VIRTQ_DESC_F_WRITE)
    d.offer(*range(8))
    q = d.queue()
    used_event = AVAIL + 4 + 2 * 8
    d.put_u16(used_event, 2)                  # "interrupt me when used idx passes 2"
    decisions = []
    for _ in range(5):
        q.push(q.pop().head, 0)
        decisions.append(q.should_notify())
    # The first check always notifies (nothing signalled yet); then only the push that makes the
    # used index go from 2 to 3 crosses used_event.
    assert decisions == [True, False, True, False, False]


def test_kick_suppression() -> None:
    d = Driver()
    d.desc(0, 0x100000, 4, VIRTQ_DESC_F_WRITE)
    q = d.queue(event_idx=False)
    assert q.set_kick_notifications(False) is False
    assert d.u16(USED) & VRING_USED_F_NO_NOTIFY
    d.offer(0)
    assert q.set_kick_notifications(True) is True      # a buffer arrived meanwhile: poll again
    assert not d.u16(USED) & VRING_USED_F_NO_NOTIFY
    q2 = Driver().queue(event_idx=True)
    assert q2.set_kick_notifications(True) is False


# --- properties ------------------------------------------------------------------------------------

descs = st.tuples(
    st.one_of(st.integers(0, MEM_LIMIT + 0x1000), st.sampled_from([0x3FFF0, 0x7FFF8, 0xFFFF0, (1 << 64) - 16]),
              st.integers(0, (1 << 64) - 1)),
    st.one_of(st.integers(0, 0x200), st.sampled_from([16, 32, 48, 0x40000, (1 << 32) - 1])),
    st.integers(0, 0xFFFF).map(lambda f: f & 7 if f & 0x100 else f),
    st.integers(0, 20),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([1, 2, 4, 8, 16]), st.lists(descs, min_size=16, max_size=16),
       st.lists(descs, min_size=8, max_size=8), st.lists(st.integers(0, 18), max_size=20),
       st.integers(0, 0xFFFF), st.booleans(), st.booleans())
def test_random_descriptor_tables_are_safe(num: int, ring: list, table: list, heads: list[int],
                                           avail_idx: int, event_idx: bool, indirect: bool) -> None:
    d = Driver(num=num)
    for i, (addr, length, flags, nxt) in enumerate(ring[:num]):
        d.desc(i, addr, length, flags, nxt)
    for i, (addr, length, flags, nxt) in enumerate(table):
        d.desc(i, addr, length, flags, nxt, table=T)    # a table some INDIRECT entries may point at
    for k, h in enumerate(heads[:num]):
        d.put_u16(AVAIL + 4 + 2 * k, h)
    d.set_avail_idx(avail_idx)
    q = d.queue(event_idx=event_idx, indirect=indirect)
    chains = []
    for _ in range(num + 2):
        c = q.pop()
        if c is None:
            break
        chains.append(c)
        assert len(c.readable) + len(c.writable) <= num
        for seg in c.readable + c.writable:
            assert d.mem.contains(seg.gpa, seg.length)
    # Bounded work: a pop reads the index, a head, at most num + 1 descriptors and one table.
    assert d.access.accesses <= (num + 2) * (num + 8) + 8
    if chains and q.needs_reset is None:
        q.push_batch([(c.head, c.writable_bytes) for c in chains])
        assert q.used_idx == len(chains)


@dataclass
class _Planned:
    kind: str
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]


@st.composite
def chain_plans(draw: st.DrawFn, num: int) -> list[_Planned]:
    plans = []
    budget = num
    while budget > 0 and draw(st.booleans()):
        kind = draw(st.sampled_from(["direct", "indirect", "mixed"]))
        nr = draw(st.integers(0, 2 if kind == "mixed" else 3))     # a mixed chain counts its readable twice
        nw = draw(st.integers(0 if nr else 1, 3))
        if kind == "direct" and nr + nw > budget:
            break
        if kind == "mixed" and nr + 1 > budget:
            break
        segs = draw(st.lists(st.tuples(st.integers(0, 0x7F000), st.integers(0, 0x1000)) |
                             st.tuples(st.integers(0x100000, 0x13F000), st.integers(0, 0x1000)),
                             min_size=nr + nw, max_size=nr + nw))
        plans.append(_Planned(kind, segs[:nr], segs[nr:]))
        budget -= {"direct": nr + nw, "indirect": 1, "mixed": nr + 1}[kind]
    return plans


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([8, 16, 32]), st.data())
def test_well_formed_chains_parse_exactly(num: int, data: st.DataObject) -> None:
    d = Driver(num=num)
    plans = data.draw(chain_plans(num))
    free = data.draw(st.permutations(list(range(num))))
    table_at = 0x30000
    heads = []
    expected = []
    for p in plans:
        segs = [(a, n, 0) for a, n in p.readable] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in p.writable]
        if p.kind == "direct":
            idx = [free.pop() for _ in segs]
            for k, (a, n, f) in enumerate(segs):
                last = k == len(segs) - 1
                d.desc(idx[k], a, n, f | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else idx[k + 1])
            head = idx[0]
            exp_r, exp_w = p.readable, p.writable
        else:
            # The walk starts at the table's entry 0; the rest sit in a shuffled order, chained by next.
            order = [0] + data.draw(st.permutations(list(range(1, len(segs)))))
            for k, (a, n, f) in enumerate(segs):
                last = k == len(segs) - 1
                d.desc(order[k], a, n, f | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else order[k + 1],
                       table=table_at)
            prefix = p.readable if p.kind == "mixed" else []
            ring_idx = [free.pop() for _ in range(len(prefix) + 1)]
            for k, (a, n) in enumerate(prefix):
                d.desc(ring_idx[k], a, n, VIRTQ_DESC_F_NEXT, ring_idx[k + 1])
            d.desc(ring_idx[-1], table_at, 16 * len(segs), VIRTQ_DESC_F_INDIRECT)
            table_at += 0x1000
            head = ring_idx[0]
            exp_r, exp_w = prefix + p.readable, p.writable
        heads.append(head)
        expected.append(DescriptorChain(head=head, readable=tuple(Segment(a, n) for a, n in exp_r),
                                        writable=tuple(Segment(a, n) for a, n in exp_w)))
    d.offer(*heads)
    q = d.queue()
    got = [c for c in iter(q.pop, None)]
    assert q.needs_reset is None, q.needs_reset
    assert got == expected
    done = [(c.head, c.writable_bytes) for c in got]
    q.push_batch(done)
    assert [d.used(k) for k in range(len(done))] == done and d.used_idx == len(done)


# --- inflight ------------------------------------------------------------------------------------

def test_inflight_layout_and_stride() -> None:
    assert queue_region_size(128) == 2112                # = libvhost-user's ALIGN_UP(16*128+2, 64)
    assert queue_region_size(256) == 16 * 256 + 64
    assert area_size(2, 128) == 4224
    buf = bytearray(area_size(2, 128))
    area = InflightArea(buf, 2, 128)
    q1 = area.queue(1)
    assert q1.recover(5) == [] and q1.version == 1 and q1.used_idx == 5
    q1.mark_in_flight(7)
    off = 2112 + 16 + 16 * 7
    assert buf[off] == 1 and struct.unpack_from("=Q", buf, off + 8)[0] == 0
    assert struct.unpack_from("=QHHHH", buf, 2112) == (0, 1, 128, 0, 5)


def test_inflight_recovery_resubmits_in_fetch_order() -> None:
    d = Driver(num=8)
    for i in range(8):
        d.desc(i, 0x100000 + 0x100 * i, 0x10, VIRTQ_DESC_F_WRITE)
    buf = bytearray(area_size(1, 8))
    area = InflightArea(buf, 1, 8)
    q = d.queue(inflight=area.queue(0))
    d.offer(5, 2, 7, 1)
    chains = [q.pop() for _ in range(4)]
    q.push(2, 0)                                  # completed out of order
    assert d.used_idx == 1
    # The back end dies.  A new one finds 5, 7, 1 in flight and resubmits them, oldest first.
    area2 = InflightArea(buf, 1, 8)
    q2 = d.queue(inflight=area2.queue(0), last_avail_idx=0)
    assert q2.last_avail_idx == 4 and q2.pending_resubmissions == 3
    assert [q2.pop().head for _ in range(3)] == [5, 7, 1]
    assert q2.pop() is None
    d.offer(3)
    assert q2.pop() == DescriptorChain(head=3, readable=(), writable=(Segment(0x100300, 0x10),))
    q2.push_batch([(7, 1), (5, 2)])
    assert not area2.queue(0).is_in_flight(7) and area2.queue(0).is_in_flight(1)
    assert chains[0].head == 5


def test_inflight_last_batch_published_but_not_cleared() -> None:
    buf = bytearray(area_size(1, 8))
    iq = InflightArea(buf, 1, 8).queue(0)
    iq.recover(0)
    for h in (3, 4, 6):
        iq.mark_in_flight(h)
    iq.begin_batch([3, 4])          # ... and the used index reached 2, then the back end died
    again = InflightArea(buf, 1, 8).queue(0)
    assert again.recover(2) == [6]
    assert again.used_idx == 2


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=area_size(2, 8), max_size=area_size(2, 8)), st.integers(0, 0xFFFF))
def test_inflight_recovery_from_garbage_is_bounded(garbage: bytes, used: int) -> None:
    area = InflightArea(bytearray(garbage), 2, 8)
    for i in range(2):
        heads = area.queue(i).recover(used)
        assert len(heads) == len(set(heads)) and all(0 <= h < 8 for h in heads)
