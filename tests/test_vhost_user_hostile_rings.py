"""A hostile VM's virtqueues against the sans-IO data paths: corners test_vhost_user_virtqueue/_blk/_net leave open.

No processes, no sockets: ``SplitVirtqueue`` over a ``GuestMemory`` of
bytearrays, reached through an accessor that fails the test if the queue
even tries to touch memory outside the table and that records the largest
single read (a table the VM says is 4 GiB must not be read, nor allocated).
Then the two devices on top: virtio-blk requests whose sectors would wrap a
u64 byte offset, virtio-net's control queue and receive path under a guest
that answers every used entry at once (a vCPU spinning on the used ring).

One was a hole when written: receive buffers too small for a header,
posted again as soon as they were given back, held netfront's data thread
in ``fill_rx`` for good (now a ring's worth given back ends the call).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from vhost_user_hostile_frontend import RamDisk

from xdom.domains.vhost_user import net
from xdom.domains.vhost_user.blk import VirtioBlkHandler
from xdom.domains.vhost_user.blk_device import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
)
from xdom.domains.vhost_user.memory import GuestMemory, MemoryRegion
from xdom.domains.vhost_user.net import RX_WAIT, ControlState, RxRing, fill_rx, serve_control
from xdom.domains.vhost_user.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    RingLayout,
    SplitVirtqueue,
)

# Two regions adjacent in guest memory, a third after a gap.
REGIONS = [(0x0, 0x40000), (0x40000, 0x40000), (0x100000, 0x40000)]
DESC, AVAIL, USED = 0x1000, 0x3000, 0x4000
TABLE = 0x20000                      # indirect tables
DATA = 0x100000                      # buffers
R_, W_, N_, I_ = 0, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT


class Watched:
    """A MemoryAccess over ``GuestMemory`` that fails the test on any access outside the table, records the
    largest single read, and lets the test play a guest that reacts to the device's writes at once."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.largest_read = 0
        self.reads = 0
        self.on_write: Callable[[int, bytes], None] | None = None

    def read(self, gpa: int, length: int) -> bytes:
        assert self.mem.contains(gpa, length), f"read outside guest memory at {gpa:#x}+{length:#x}"
        self.reads += 1
        self.largest_read = max(self.largest_read, length)
        return self.mem.read(gpa, length)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        assert self.mem.contains(gpa, len(data)), f"write outside guest memory at {gpa:#x}+{len(data):#x}"
        self.mem.write(gpa, data)
        if self.on_write is not None:
            self.on_write(gpa, bytes(data))

    def contains(self, gpa: int, length: int) -> bool:
        return self.mem.contains(gpa, length)

    def spans(self, gpa: int, length: int) -> list[tuple[memoryview, int, int]]:
        assert self.mem.contains(gpa, length)
        return self.mem.spans(gpa, length)


class Vm:
    """The guest's memory and the driver's side of one split ring."""

    def __init__(self, num: int = 8, *, event_idx: bool = False) -> None:
        self.mem = GuestMemory()
        for gpa, size in REGIONS:
            slot = self.mem.add(MemoryRegion(guest_phys_addr=gpa, memory_size=size, userspace_addr=0x7F00_0000_0000
                                             + 2 * gpa, mmap_offset=0))
            self.mem.attach(slot, memoryview(bytearray(size)))
        self.access = Watched(self.mem)
        self.num = num
        self.avail_idx = 0
        self.event_idx = event_idx
        self.layout = RingLayout(num=num, desc_gpa=DESC, avail_gpa=AVAIL, used_gpa=USED)

    def queue(self) -> SplitVirtqueue:
        return SplitVirtqueue(self.access, self.layout, event_idx=self.event_idx, indirect_desc=True)

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int = DESC) -> None:
        self.mem.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def chain(self, segs: list[tuple[int, int, int]], *, first: int = 0, table: int = DESC) -> None:
        """``segs`` of (addr, len, flags) linked by NEXT from index ``first`` on."""
        for k, (addr, n, fl) in enumerate(segs):
            last = k == len(segs) - 1
            self.desc(first + k, addr, n, fl | (0 if last else N_), first + k + 1, table)

    def offer(self, head: int) -> None:
        self.mem.write(AVAIL + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(AVAIL + 2, struct.pack("<H", self.avail_idx))

    def set_avail_idx(self, idx: int) -> None:
        self.mem.write(AVAIL + 2, struct.pack("<H", idx))

    def used_idx(self) -> int:
        return int(struct.unpack("<H", self.mem.read(USED + 2, 2))[0])

    def used(self, k: int) -> tuple[int, int]:
        return struct.unpack("<II", self.mem.read(USED + 4 + 8 * (k % self.num), 8))


# --- chains and rings ------------------------------------------------------------------------------------

def _prefix_and_table(entries: int) -> Callable[[Vm], None]:
    """Three readable descriptors in the ring, then an indirect table of ``entries``."""
    def setup(vm: Vm) -> None:
        vm.chain([(DATA, 16, R_), (DATA, 16, R_), (DATA, 16, R_), (TABLE, 16 * entries, I_)])
        vm.chain([(DATA + 0x100 * k, 16, R_) for k in range(entries)], table=TABLE)
        vm.offer(0)
    return setup


HOSTILE: dict[str, tuple[Callable[[Vm], None], str]] = {
    "a prefix and an indirect table one longer than the queue together": (_prefix_and_table(6), "longer than"),
    "an indirect table of 4 GiB - 16 bytes": (lambda vm: (vm.desc(0, TABLE, 0xFFFF_FFF0, I_), vm.offer(0)),
                                              "longer than"),
    "an indirect table wrapping 2**64": (lambda vm: (vm.desc(0, (1 << 64) - 16, 32, I_), vm.offer(0)),
                                         "outside guest memory"),
    "an indirect table across the gap between regions": (lambda vm: (vm.desc(0, 0x80000 - 16, 32, I_),
                                                                     vm.offer(0)), "outside guest memory"),
    "a readable table entry after a writable ring descriptor": (
        lambda vm: (vm.chain([(DATA, 16, W_), (TABLE, 16, I_)]), vm.desc(0, DATA, 16, R_, table=TABLE),
                    vm.offer(0)), "follows a writable"),
    "an indirect table entry pointing into the gap": (
        lambda vm: (vm.desc(0, TABLE, 16, I_), vm.desc(0, 0x90000, 16, R_, table=TABLE), vm.offer(0)),
        "outside guest memory"),
    "an indirect table entry of 4 GiB - 1 bytes": (
        lambda vm: (vm.desc(0, TABLE, 16, I_), vm.desc(0, DATA, 0xFFFF_FFFF, W_, table=TABLE), vm.offer(0)),
        "outside guest memory"),
    "a buffer at the last byte of the address space": (lambda vm: (vm.desc(0, (1 << 64) - 1, 1), vm.offer(0)),
                                                       "outside guest memory"),
    "an avail index half the u16 space ahead": (lambda vm: vm.set_avail_idx(0x8000), "ahead"),
    "an avail ring naming head 0xFFFF": (lambda vm: vm.offer(0xFFFF), "head 65535"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_rings_need_a_reset_without_reading_what_they_describe(name: str) -> None:
    setup, words = HOSTILE[name]
    vm = Vm()
    setup(vm)
    q = vm.queue()
    assert q.pop() is None
    assert q.needs_reset is not None and words in q.needs_reset, q.needs_reset
    # Nothing larger than the ring's own table was ever read, nothing completed, and the queue is inert.
    assert vm.access.largest_read <= 16 * vm.num
    assert vm.used_idx() == 0 and q.in_flight == 0
    reads = vm.access.reads
    assert q.pop() is None and not q.has_available() and vm.access.reads == reads


def test_the_same_shapes_within_the_rules_are_served() -> None:
    """The boundaries of the cases above, on the allowed side: the checks are not off by one."""
    vm = Vm()
    _prefix_and_table(5)(vm)                          # 3 + 5 = the queue size
    vm.desc(5, 0x40000 - 16, 32, I_)                  # a table across two *adjacent* regions
    vm.chain([(DATA, 16, W_), (DATA + 16, 16, W_)], table=0x40000 - 16)
    vm.offer(5)
    q = vm.queue()
    first, second = q.pop(), q.pop()
    assert first is not None and len(first.readable) == 8 and first.writable == ()
    assert second is not None and second.readable_bytes == 0 and second.writable_bytes == 32
    vm.set_avail_idx((q.last_avail_idx + vm.num) & 0xFFFF)       # exactly as far ahead as the ring holds
    assert q.needs_reset is None and q.has_available()


# --- virtio-blk: sectors whose byte offset wraps a u64 ------------------------------------------------------

class TrimmingRamDisk(RamDisk):
    can_trim = True


WRAPPING = {
    "sector 2**55: offset 2**64, 0 in u64": (2 ** 55, 512),
    "sector 2**55 - 1, 1 KiB: the end wraps to 512": (2 ** 55 - 1, 1024),
    "sector 2**64 - 1": (2 ** 64 - 1, 512),
    "sector 2**54 + 1 (offset 2**63 + 512: negative as an s64)": (2 ** 54 + 1, 512),
}


@pytest.mark.parametrize("kind", [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES])
@pytest.mark.parametrize("what", list(WRAPPING))
def test_blk_sectors_that_wrap_a_u64_offset_never_reach_the_disk(what: str, kind: int) -> None:
    sector, length = WRAPPING[what]
    vm = Vm(num=8)
    disk = TrimmingRamDisk()
    h = VirtioBlkHandler(disk, "hostile")
    q = vm.queue()
    h.queue_started(0, q, True)
    hdr, data, status = DATA, DATA + 0x1000, DATA + 0x3000
    vm.mem.write(hdr, struct.pack("<IIQ", kind, 0, sector if kind in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT) else 0))
    vm.mem.write(status, b"\xff")
    if kind == VIRTIO_BLK_T_IN:
        segs = [(hdr, 16, R_), (data, length, W_), (status, 1, W_)]
    elif kind == VIRTIO_BLK_T_OUT:
        segs = [(hdr, 16, R_), (data, length, R_), (status, 1, W_)]
    else:
        vm.mem.write(data, struct.pack("<QII", sector, length // 512, 0))
        segs = [(hdr, 16, R_), (data, 16, R_), (status, 1, W_)]
    vm.chain(segs)
    vm.offer(0)
    h.process(0, q)
    assert q.needs_reset is None and vm.used_idx() == 1
    assert vm.mem.read(status, 1)[0] == VIRTIO_BLK_S_IOERR
    assert disk.ops == [], disk.ops
    # ... and a request inside the disk on the same ring is served.
    vm.mem.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 8))
    vm.chain([(hdr, 16, R_), (data, 512, W_), (status, 1, W_)], first=3)
    vm.offer(3)
    h.process(0, q)
    assert vm.used(1)[0] == 3 and vm.mem.read(status, 1)[0] == VIRTIO_BLK_S_OK and disk.ops == [("read", 4096, 512)]


def test_blk_guest_that_never_reads_its_used_ring_costs_nothing() -> None:
    """The guest offers the same heads again and again without ever looking at the used ring: the device
    overwrites its own used entries (the guest's loss), holds nothing and waits for nothing."""
    vm = Vm(num=8)
    disk = RamDisk()
    h = VirtioBlkHandler(disk, "hostile")
    q = vm.queue()
    h.queue_started(0, q, True)
    heads = (0, 3)                                    # chains of three descriptors: 0-2 and 3-5
    for head in heads:
        vm.mem.write(DATA + 0x100 * head, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, head))
        vm.chain([(DATA + 0x100 * head, 16, R_), (DATA + 0x1000 * (head + 1), 512, W_), (DATA + 0x100 * head + 16,
                                                                                        1, W_)], first=head)
    rounds = 100
    for _ in range(rounds):
        for head in heads:
            vm.offer(head)
        h.process(0, q)
    assert vm.used_idx() == len(heads) * rounds and q.needs_reset is None
    assert q.in_flight == 0 and h.in_flight(0) == 0 and all(not d for d in h._done.values())
    assert len(disk.ops) == len(heads) * rounds


# --- virtio-net: the control queue and the receive path ------------------------------------------------------

def test_control_commands_that_are_too_long_or_unanswerable_are_handed_back_unread() -> None:
    vm = Vm(num=8)
    q = vm.queue()
    stats: dict[str, int] = {"ctrl_errors": 0}
    state = ControlState(max_pairs=4)
    acked = 1 << net.VIRTIO_NET_F_MQ
    vm.chain([(0x0, 0x30000, R_), (DATA, 1, W_)], first=0)                   # a 192 KiB "command"
    vm.chain([(DATA + 16, 4, R_)], first=2)                                  # no byte for the ack
    vm.mem.write(DATA + 32, bytes([net.VIRTIO_NET_CTRL_MQ, net.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET]) + b"\x03\x00")
    vm.chain([(DATA + 32, 4, R_), (DATA + 64, 1, W_)], first=3)             # a good one: 3 pairs
    for head in (0, 2, 3):
        vm.offer(head)
    serve_control(q, acked, state, stats)
    assert [vm.used(k) for k in range(3)] == [(0, 0), (2, 0), (3, 1)]
    assert stats["ctrl_errors"] == 2 and state.pairs == 3
    assert vm.mem.read(DATA, 1) == b"\0" and vm.mem.read(DATA + 64, 1)[0] == net.VIRTIO_NET_OK
    assert vm.access.largest_read <= 4096


class RepostingGuest:
    """A guest vCPU spinning on the used ring: every head the device returns is offered again at once.

    Stops the device (BaseException, which no ``except Exception`` catches) once it has been given
    ``limit`` heads back, so a device that never stops taking them does not hang the test."""

    class Enough(BaseException):
        pass

    def __init__(self, vm: Vm, limit: int = 2000) -> None:
        self.vm, self.limit, self.reposts = vm, limit, 0
        vm.access.on_write = self._seen

    def _seen(self, gpa: int, data: bytes) -> None:
        if gpa != USED + 2:
            return
        new = int(struct.unpack("<H", data)[0])
        head = self.vm.used((new - 1) & 0xFFFF)[0]
        self.vm.offer(head)
        self.reposts += 1
        if self.reposts >= self.limit:
            raise self.Enough()


def test_rx_buffers_too_small_for_a_header_reposted_at_once_cannot_hold_the_device() -> None:
    vm = Vm(num=8)
    q = vm.queue()
    ring = RxRing(q, True)
    vm.desc(0, DATA, 8, W_)                           # 8 bytes: less than a virtio-net header
    vm.offer(0)
    guest = RepostingGuest(vm)
    stats = {"rx_bad_buffers": 0}
    try:
        got = fill_rx(ring, bytes(10), bytes(60), True, stats)
    except RepostingGuest.Enough:
        got = None
    # A device bounded by its ring takes at most a ring's worth of bad chains before it waits for a kick.
    assert got == RX_WAIT and guest.reposts <= vm.num, f"{guest.reposts} chains taken back in one call"
