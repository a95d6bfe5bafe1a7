"""vhost-user-blk on blkfront: the device class against a driver written here (real VMs: test_vhost_user_blk_vm.py).

No processes: ``VirtioBlkHandler`` over the sans-IO core -- a
``GuestMemory`` of bytearrays, a split ring laid out by a driver written
from the virtio spec, and a fake block device that completes at once, later,
or from another thread.  Hostile chains (a short header, no writable status
byte, data beyond the disk, a GET_ID buffer too small, a zero-length chain,
unknown types, bad discard ranges) get a status or are handed back; none
raises.
"""

from __future__ import annotations

import errno
import random
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdom.domains.vhost_user.blk import VirtioBlkHandler
from xdom.domains.vhost_user.blk_device import (
    MAX_DWZ_SEGMENTS,
    SEG_MAX,
    SIZE_MAX,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    blk_config,
    blk_features,
)
from xdom.domains.vhost_user.inflight import InflightArea, area_size
from xdom.domains.vhost_user.memory import GuestMemory, MemoryRegion
from xdom.domains.vhost_user.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    RingLayout,
    SplitVirtqueue,
)

# ---------------------------------------------------------------- part 1: the device class, no I/O

MEM_SIZE = 0x800000
DESC, AVAIL, USED = 0x1000, 0x3000, 0x4000
BUF = 0x100000            # each head's buffers: BUF + head * SLOT
SLOT = 0x20000
DATA_OFF, STATUS_OFF = 0x1000, 0x1FFFF


class FakeDisk:
    """A ``BlockDevice`` on a bytearray: completes at once (``mode="sync"``) or when told."""

    can_multi_conn = False

    def __init__(self, size: int = 1 << 20, sector_size: int = 512, *, read_only: bool = False,
                 can_flush: bool = True, can_trim: bool = True, mode: str = "sync", fail: int = 0) -> None:
        self.data = bytearray(random.Random(size).randbytes(size))
        self.size, self.sector_size, self.read_only = size, sector_size, read_only
        self.can_flush, self.can_trim, self.can_write_zeroes = can_flush, can_trim, True
        self.mode = mode
        self.fail = fail
        self.ops: list[tuple[Any, ...]] = []
        self.pending: list[Callable[[], None]] = []
        self.plugs = 0

    def plug(self) -> None:
        self.plugs += 1

    def unplug(self) -> None:
        pass

    def _do(self, fn: Callable[[], None]) -> None:
        if self.mode == "sync":
            fn()
        else:
            self.pending.append(fn)

    def complete_all(self, on_thread: bool = False) -> None:
        pending, self.pending = self.pending, []
        if on_thread:
            t = threading.Thread(target=lambda: [fn() for fn in pending])
            t.start()
            t.join()
        else:
            for fn in pending:
                fn()

    def submit_read(self, offset: int, length: int, done: Callable) -> None:
        self.ops.append(("read", offset, length))

        def finish() -> None:
            if self.fail:
                return done(self.fail, [])
            # in 4 KiB views, as blkfront's granted pages, valid only during the call
            data = bytearray(self.data[offset:offset + length])
            views = [memoryview(data)[i:i + 4096] for i in range(0, length, 4096)]
            done(0, views)
            data[:] = b"\xee" * len(data)           # scribbled over afterwards: a copy must be taken inside
        self._do(finish)

    def submit_write(self, offset: int, data: memoryview, fua: bool, done: Callable) -> None:
        self.ops.append(("write", offset, len(data)))

        def finish() -> None:
            if not self.fail:
                self.data[offset:offset + len(data)] = data
            done(self.fail)
        self._do(finish)

    def submit_flush(self, done: Callable) -> None:
        self.ops.append(("flush",))
        self._do(lambda: done(self.fail))

    def submit_trim(self, offset: int, length: int, done: Callable) -> None:
        self.ops.append(("trim", offset, length))
        self._do(lambda: done(self.fail))

    def submit_write_zeroes(self, offset: int, length: int, may_trim: bool, done: Callable) -> None:
        self.ops.append(("zeroes", offset, length, may_trim))

        def finish() -> None:
            self.data[offset:offset + length] = bytes(length)
            done(self.fail)
        self._do(finish)


class LendingDisk(FakeDisk):
    """A device that lends pages for WRITE payloads (blkfront's ``write_buffer``)."""

    class Lent:
        def __init__(self, length: int) -> None:
            self.buf = bytearray(length)
            self.views = [memoryview(self.buf)[i:i + 4096] for i in range(0, length, 4096)]
            self.length = length
            self.released = False

        def release(self) -> None:
            self.released = True

    def write_buffer(self, offset: int, length: int) -> LendingDisk.Lent:
        return self.Lent(length)

    def submit_write_buffer(self, offset: int, buffer: LendingDisk.Lent, fua: bool, done: Callable) -> None:
        self.submit_write(offset, memoryview(buffer.buf), fua, done)


class Driver:
    """The guest's virtio-blk driver on one split ring, from the virtio 1.x spec."""

    def __init__(self, num: int = 16) -> None:
        self.mem = GuestMemory()
        self.ram = bytearray(MEM_SIZE)
        slot = self.mem.add(MemoryRegion(guest_phys_addr=0, memory_size=MEM_SIZE, userspace_addr=0x7F0000000000,
                                         mmap_offset=0))
        self.mem.attach(slot, memoryview(self.ram))
        self.num = num
        self.avail_idx = 0
        self.used_seen = 0
        self.layout = RingLayout(num=num, desc_gpa=DESC, avail_gpa=AVAIL, used_gpa=USED)

    def queue(self, *, event_idx: bool = True, **kw: Any) -> SplitVirtqueue:
        return SplitVirtqueue(self.mem, self.layout, event_idx=event_idx, indirect_desc=True, **kw)

    def w(self, gpa: int, data: bytes) -> None:
        self.ram[gpa:gpa + len(data)] = data

    def r(self, gpa: int, n: int) -> bytes:
        return bytes(self.ram[gpa:gpa + n])

    def chain(self, head: int, segs: list[tuple[int, int, bool]], indirect: bool = False) -> None:
        """Descriptors for ``segs`` (addr, len, device-writable), direct from ``head`` on, or in a table."""
        table = BUF + head * SLOT + 0x1F000
        for k, (addr, n, wr) in enumerate(segs):
            last = k == len(segs) - 1
            flags = (VIRTQ_DESC_F_WRITE if wr else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            where = (table + 16 * k) if indirect else DESC + 16 * ((head + k) % self.num)
            nxt = (k + 1) if indirect else (head + k + 1) % self.num
            self.w(where, struct.pack("<QIHH", addr, n, flags, 0 if last else nxt))
        if indirect:
            self.w(DESC + 16 * head, struct.pack("<QIHH", table, 16 * len(segs), VIRTQ_DESC_F_INDIRECT, 0))

    def offer(self, *heads: int) -> None:
        for h in heads:
            self.w(AVAIL + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", h))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.w(AVAIL + 2, struct.pack("<H", self.avail_idx))

    def set_used_event(self, v: int) -> None:
        self.w(AVAIL + 4 + 2 * self.num, struct.pack("<H", v))

    @property
    def used_idx(self) -> int:
        return struct.unpack("<H", self.r(USED + 2, 2))[0]

    def take_used(self) -> list[tuple[int, int]]:
        out = []
        while self.used_seen != self.used_idx:
            out.append(struct.unpack("<II", self.r(USED + 4 + 8 * (self.used_seen % self.num), 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def request(self, head: int, kind: int, sector: int = 0, out: bytes = b"", in_len: int = 0, *,
                status: bool = True, split_header: bool = False, indirect: bool = False,
                offer: bool = True) -> int:
        """A virtio-blk request as Linux builds it; returns the status byte's address."""
        base = BUF + head * SLOT
        self.w(base, struct.pack("<IIQ", kind, 0, sector))
        self.w(base + STATUS_OFF, b"\xff")
        segs: list[tuple[int, int, bool]] = [(base, 4, False), (base + 4, 12, False)] if split_header \
            else [(base, 16, False)]
        if out:
            self.w(base + DATA_OFF, out)
            segs.append((base + DATA_OFF, len(out), False))
        if in_len:
            self.w(base + DATA_OFF, b"\xaa" * in_len)
            # scatter the IN buffer over two descriptors, as a bio of two pages would be
            half = in_len // 2
            segs += [(base + DATA_OFF, half, True), (base + DATA_OFF + half, in_len - half, True)] if half \
                else [(base + DATA_OFF, in_len, True)]
        if status:
            segs.append((base + STATUS_OFF, 1, True))
        self.chain(head, segs, indirect=indirect)
        if offer:
            self.offer(head)
        return base + STATUS_OFF

    def status(self, head: int) -> int:
        return self.ram[BUF + head * SLOT + STATUS_OFF]

    def data(self, head: int, n: int) -> bytes:
        return self.r(BUF + head * SLOT + DATA_OFF, n)


class Harness:
    """Driver + queue + handler, with the shell's hooks recorded."""

    def __init__(self, disk: FakeDisk, *, num: int = 64, event_idx: bool = True, serial: str = "xvda",
                 inflight: InflightArea | None = None) -> None:
        self.disk = disk
        self.drv = Driver(num)
        self.q = self.drv.queue(event_idx=event_idx, inflight=inflight.queue(0) if inflight else None)
        self.h = VirtioBlkHandler(disk, serial, drain_timeout=0.2)
        self.notified: list[int] = []
        self.woken = 0
        self.h.notify = lambda index, queue: self.notified.append(index) if queue.should_notify() else None
        self.h.wake = self._wake
        self.h.queue_started(0, self.q, True)

    def _wake(self) -> None:
        self.woken += 1

    def process(self) -> list[tuple[int, int]]:
        self.h.process(0, self.q)
        assert self.q.needs_reset is None, self.q.needs_reset
        return self.drv.take_used()


def test_config_space_and_features_follow_the_disk() -> None:
    rw = FakeDisk(8 << 20, 4096)
    f = blk_features(rw, 2)
    assert f & (1 << VIRTIO_BLK_F_FLUSH) and f & (1 << VIRTIO_BLK_F_DISCARD) and f & (1 << VIRTIO_BLK_F_WRITE_ZEROES)
    assert f & (1 << VIRTIO_BLK_F_MQ) and not f & (1 << VIRTIO_BLK_F_RO)
    cfg = blk_config(rw, 2)
    assert struct.unpack_from("<QII", cfg, 0) == ((8 << 20) // 512, SIZE_MAX, SEG_MAX)
    assert struct.unpack_from("<I", cfg, 20)[0] == 4096 and struct.unpack_from("<H", cfg, 34)[0] == 2
    max_discard, discard_seg, align = struct.unpack_from("<III", cfg, 36)
    assert discard_seg == MAX_DWZ_SEGMENTS and align == 8 and max_discard >= 1 << 20
    assert struct.unpack_from("<II", cfg, 48)[1] == MAX_DWZ_SEGMENTS and cfg[56] == 0    # zeroes never unmap
    ro = FakeDisk(1 << 20, read_only=True, can_flush=False, can_trim=False)
    f = blk_features(ro, 1)
    assert f & (1 << VIRTIO_BLK_F_RO) and not f & ((1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_DISCARD)
                                                     | (1 << VIRTIO_BLK_F_WRITE_ZEROES) | (1 << VIRTIO_BLK_F_MQ))


@pytest.mark.parametrize("lending", [False, True])
def test_write_read_flush_get_id(lending: bool) -> None:
    disk = (LendingDisk if lending else FakeDisk)(1 << 20)
    t = Harness(disk)
    drv = t.drv
    payload = random.Random(1).randbytes(12288)
    drv.request(0, VIRTIO_BLK_T_OUT, 8, out=payload, split_header=True)
    drv.request(4, VIRTIO_BLK_T_IN, 8, in_len=12288, indirect=True)
    drv.request(8, VIRTIO_BLK_T_FLUSH)
    drv.request(12, VIRTIO_BLK_T_GET_ID, in_len=20)
    used = t.process()
    assert used == [(0, 1), (4, 12289), (8, 1), (12, 21)]              # one batch, in completion order
    assert [drv.status(h) for h in (0, 4, 8, 12)] == [VIRTIO_BLK_S_OK] * 4
    assert disk.data[4096:4096 + 12288] == payload and drv.data(4, 12288) == payload
    assert drv.data(12, 20) == b"xvda".ljust(20, b"\0")
    assert disk.ops == [("write", 4096, 12288), ("read", 4096, 12288), ("flush",)]
    assert disk.plugs == 1                      # the batch went to the device plugged


def test_completions_later_are_pushed_in_one_batch_with_one_notification() -> None:
    disk = FakeDisk(mode="later")
    t = Harness(disk)
    for h in (0, 4, 8, 12):
        t.drv.request(h, VIRTIO_BLK_T_IN, h, in_len=512)
    assert t.process() == [] and t.h.in_flight(0) == 4
    t.drv.set_used_event(0)                      # EVENT_IDX: interrupt me once the used index passes 0
    disk.complete_all()
    assert t.drv.take_used() == []               # nothing published until the batch ends
    t.h.flush()
    assert sorted(h for h, _ in t.drv.take_used()) == [0, 4, 8, 12]
    assert t.notified == [0] and t.h.in_flight(0) == 0
    # the driver asks for no interrupt before used index 100: the next batch is not signalled
    t.drv.set_used_event(100)
    t.drv.request(16, VIRTIO_BLK_T_FLUSH)
    t.process()
    disk.complete_all()
    t.h.flush()
    assert t.drv.take_used() == [(16, 1)] and t.notified == [0]


def test_completions_from_another_thread_are_handed_to_the_loop() -> None:
    disk = FakeDisk(mode="later")
    t = Harness(disk)
    payload = disk.data[0:4096]
    t.drv.request(0, VIRTIO_BLK_T_IN, 0, in_len=4096)
    t.drv.request(4, VIRTIO_BLK_T_OUT, 16, out=b"\x01" * 1024)
    t.process()
    disk.complete_all(on_thread=True)            # e.g. blkfront reaping on its xenstore thread after a reconnect
    assert t.drv.take_used() == [] and t.woken == 2 and t.h.pending_handoffs == 2
    t.h.run_handoffs()
    assert sorted(t.drv.take_used()) == [(0, 4097), (4, 1)]
    assert t.drv.data(0, 4096) == payload        # copied while the pages were valid
    assert t.h.stats["handed_off"] == 2


def test_errors_and_unsupported() -> None:
    disk = FakeDisk(1 << 20, can_trim=False, fail=errno.EIO)
    t = Harness(disk)
    t.drv.request(0, VIRTIO_BLK_T_IN, 0, in_len=512)
    t.drv.request(4, VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 0, 8, 0))
    t.drv.request(8, 0x7777)
    t.drv.request(12, VIRTIO_BLK_T_OUT, 0, out=b"x" * 512)
    t.process()
    assert [t.drv.status(h) for h in (0, 4, 8, 12)] == [VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP,
                                                       VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_S_IOERR]
    disk.fail = errno.EOPNOTSUPP
    t.drv.request(16, VIRTIO_BLK_T_FLUSH)
    t.process()
    assert t.drv.status(16) == VIRTIO_BLK_S_UNSUPP


def test_read_only_disk_refuses_writes_and_no_cache_flushes_at_once() -> None:
    disk = FakeDisk(1 << 20, read_only=True, can_flush=False)
    t = Harness(disk)
    t.drv.request(0, VIRTIO_BLK_T_OUT, 0, out=b"x" * 512)
    t.drv.request(4, VIRTIO_BLK_T_WRITE_ZEROES, out=struct.pack("<QII", 0, 8, 0))
    t.drv.request(8, VIRTIO_BLK_T_FLUSH)
    t.drv.request(12, VIRTIO_BLK_T_IN, 0, in_len=512)
    t.process()
    assert [t.drv.status(h) for h in (0, 4, 8, 12)] == [VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_S_OK,
                                                       VIRTIO_BLK_S_OK]
    assert disk.ops == [("read", 0, 512)]


def test_discard_and_write_zeroes_ranges() -> None:
    disk = FakeDisk(1 << 20, 4096)
    t = Harness(disk)
    two = struct.pack("<QII", 8, 16, 0) + struct.pack("<QII", 64, 8, 0)
    t.drv.request(0, VIRTIO_BLK_T_DISCARD, out=two)
    t.drv.request(4, VIRTIO_BLK_T_WRITE_ZEROES, out=struct.pack("<QII", 128, 8, 1))
    t.drv.request(8, VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 8, 16, 1))            # unmap flag on discard
    t.drv.request(12, VIRTIO_BLK_T_WRITE_ZEROES, out=struct.pack("<QII", 2047, 8, 0))     # beyond the disk
    t.drv.request(16, VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 9, 8, 0))             # not 4 KiB aligned
    t.drv.request(20, VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 0, 8, 0) * (MAX_DWZ_SEGMENTS + 1))
    t.drv.request(24, VIRTIO_BLK_T_DISCARD, out=b"\0" * 20)                             # not whole ranges
    t.process()
    assert [t.drv.status(h) for h in range(0, 28, 4)] == [
        VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_IOERR,
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_IOERR]
    assert disk.ops == [("trim", 4096, 8192), ("trim", 32768, 4096), ("zeroes", 65536, 4096, True)]
    assert disk.data[65536:69632] == bytes(4096)


def test_hostile_chains_never_raise() -> None:
    disk = FakeDisk(1 << 20)
    t = Harness(disk)
    drv = t.drv
    base = BUF
    # a short header: 8 bytes, then a status byte -> IOERR
    drv.w(base, b"\0" * 8)
    drv.chain(0, [(base, 8, False), (base + STATUS_OFF, 1, True)])
    drv.offer(0)
    # the status descriptor is not writable (and nothing else is): handed back with nothing written
    drv.request(4, VIRTIO_BLK_T_IN, 0, in_len=0, status=False, offer=False)
    drv.chain(4, [(BUF + 4 * SLOT, 16, False), (BUF + 4 * SLOT + STATUS_OFF, 1, False)])
    drv.offer(4)
    # data beyond the capacity, and straddling its end
    drv.request(8, VIRTIO_BLK_T_IN, 2048, in_len=512)
    drv.request(12, VIRTIO_BLK_T_OUT, 2047, out=b"y" * 1024)
    drv.request(16, VIRTIO_BLK_T_IN, 1 << 60, in_len=512)
    # a GET_ID buffer too small: as much of the id as fits
    drv.request(20, VIRTIO_BLK_T_GET_ID, in_len=3)
    # a zero-length chain: one readable descriptor of length 0
    drv.chain(24, [(BUF + 24 * SLOT, 0, False)])
    drv.offer(24)
    # a read whose length is not whole sectors
    drv.request(28, VIRTIO_BLK_T_IN, 0, in_len=100)
    used = dict(t.process())
    # the used length is the whole writable part, as QEMU reports it, whatever the status
    assert used == {0: 1, 4: 0, 8: 513, 12: 1, 16: 513, 20: 4, 24: 0, 28: 101}
    assert drv.status(0) == VIRTIO_BLK_S_IOERR and drv.r(BUF + 4 * SLOT + STATUS_OFF, 1) == b"\xff"
    assert [drv.status(h) for h in (8, 12, 16, 28)] == [VIRTIO_BLK_S_IOERR] * 4
    assert drv.data(20, 3) == b"xvd" and drv.status(20) == VIRTIO_BLK_S_OK
    assert disk.ops == [] and t.h.stats["malformed"] == 3



def test_a_device_that_raises_fails_that_request_only() -> None:
    """A bug in the device (blkfront reports errors through ``done``, never by raising) costs one IOERR."""
    disk = FakeDisk(mode="later")
    t = Harness(disk)

    def broken(offset: int, length: int, done: Callable) -> None:
        disk.pending.append(lambda: done(0, [bytes(length)]))      # ... and it even answers later
        raise RuntimeError("device bug")
    disk.submit_read = broken                                     # type: ignore[method-assign]
    t.drv.request(0, VIRTIO_BLK_T_IN, 0, in_len=512)
    t.drv.request(4, VIRTIO_BLK_T_FLUSH)
    assert t.process() == [(0, 513)] and t.drv.status(0) == VIRTIO_BLK_S_IOERR
    disk.complete_all()                          # the flush, and the broken read's late answer: ignored
    t.h.flush()
    assert t.drv.take_used() == [(4, 1)] and t.drv.status(4) == VIRTIO_BLK_S_OK
    assert t.h.in_flight(0) == 0 and t.q.needs_reset is None

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.binary(min_size=0, max_size=48), st.integers(0, 600), st.booleans()),
                min_size=1, max_size=8))
def test_random_requests_always_complete_every_head(reqs: list[tuple[bytes, int, bool]]) -> None:
    """Any header bytes, any lengths: every head comes back exactly once and the ring stays healthy."""
    disk = FakeDisk(64 << 10)
    t = Harness(disk)
    heads = []
    for k, (raw, in_len, with_status) in enumerate(reqs):
        head = 4 * k
        base = BUF + head * SLOT
        t.drv.w(base, raw)
        segs = [(base, len(raw), False)] if raw else []
        if in_len:
            segs.append((base + DATA_OFF, in_len, True))
        if with_status:
            segs.append((base + STATUS_OFF, 1, True))
        if not segs:
            segs = [(base, 0, False)]
        t.drv.chain(head, segs)
        heads.append(head)
    t.drv.offer(*heads)
    used = t.process()
    assert sorted(h for h, _ in used) == heads
    assert t.q.in_flight == 0


def test_a_disabled_ring_waits_until_enabled() -> None:
    t = Harness(FakeDisk())
    t.h.queue_enabled(0, False)
    t.drv.request(0, VIRTIO_BLK_T_FLUSH)
    assert t.process() == []
    t.h.queue_enabled(0, True)                   # the shell processes the ring again on enable
    assert t.process() == [(0, 1)]


def test_stopping_a_ring_drains_then_abandons() -> None:
    disk = FakeDisk(mode="later")
    t = Harness(disk)
    t.drv.request(0, VIRTIO_BLK_T_IN, 0, in_len=512)
    t.drv.request(4, VIRTIO_BLK_T_IN, 1, in_len=512)
    t.process()
    waits: list[float] = []

    def wait(timeout: float) -> None:            # the shell's poll: one completion per wait
        waits.append(timeout)
        if disk.pending:
            disk.pending.pop(0)()
            t.h.flush()
    t.h.wait = wait
    t.h.queue_stopped(0)
    assert sorted(h for h, _ in t.drv.take_used()) == [0, 4] and len(waits) == 2 and t.notified
    # a device that never answers: the stop gives up after drain_timeout and a late answer is dropped
    t.h.queue_started(0, t.q, True)
    t.drv.request(8, VIRTIO_BLK_T_IN, 0, in_len=512)
    t.process()
    t.h.wait = lambda timeout: time.sleep(timeout / 4)
    t0 = time.monotonic()
    t.h.queue_stopped(0)
    assert time.monotonic() - t0 < 2 and t.h.stats["abandoned"] == 1
    disk.complete_all()
    t.h.flush()
    assert t.drv.take_used() == [] and t.h.stats["dropped"] == 1


def test_inflight_area_clears_a_head_only_once_it_is_used() -> None:
    area = InflightArea(bytearray(area_size(1, 64)), 1, 64)
    disk = FakeDisk(mode="later")
    t = Harness(disk, inflight=area)
    t.drv.request(0, VIRTIO_BLK_T_OUT, 0, out=b"z" * 512)
    t.drv.request(4, VIRTIO_BLK_T_OUT, 1, out=b"z" * 512)
    t.process()
    iq = area.queue(0)
    assert iq.is_in_flight(0) and iq.is_in_flight(4)
    disk.complete_all()                          # finished in the device, not yet published
    assert iq.is_in_flight(0) and iq.is_in_flight(4)
    t.h.flush()
    assert not iq.is_in_flight(0) and not iq.is_in_flight(4) and iq.used_idx == 2
    # a request in flight when the back end dies is served again by the next one, from the area
    t.drv.request(8, VIRTIO_BLK_T_OUT, 2, out=b"w" * 512)
    t.process()
    disk.pending.clear()                         # the guest domain died: its answer is lost
    disk2 = FakeDisk()
    disk2.data[:] = disk.data
    q2 = t.drv.queue(inflight=InflightArea(area._mv, 1, 64).queue(0), last_avail_idx=t.drv.used_idx)
    h2 = VirtioBlkHandler(disk2, "xvda")
    h2.queue_started(0, q2, True)
    h2.process(0, q2)
    assert t.drv.take_used() == [(8, 1)] and disk2.data[1024:1536] == b"w" * 512
    assert h2.stats["resubmitted"] == 1


@pytest.mark.parametrize("lending", [False, True])
def test_the_data_in_flight_is_bounded_and_the_rest_waits_on_the_ring(lending: bool) -> None:
    """A VM may post a ring of large requests (descriptors may all name one page): each costs the guest
    domain its size in memory until it completes, so past the budget the rest stay on the ring and are
    served, in order, as completions free it; one request is always taken, however large."""
    disk = (LendingDisk if lending else FakeDisk)(mode="later")
    t = Harness(disk)
    t.h.max_bytes_in_flight = 8192
    heads = list(range(0, 40, 4))
    for h in heads[:5]:
        t.drv.request(h, VIRTIO_BLK_T_IN, h, in_len=4096)
    for h in heads[5:]:
        t.drv.request(h, VIRTIO_BLK_T_OUT, h, out=bytes([h]) * 4096)
    done: list[tuple[int, int]] = []
    assert t.process() == [] and t.h.in_flight(0) == 2          # 8 KiB taken; the others wait
    while len(done) < len(heads):
        assert 0 < t.h.in_flight(0) <= 2
        disk.complete_all()
        t.h.flush()                                             # completions, then what they made room for
        done += t.drv.take_used()
    assert [h for h, _ in done] == heads and all(t.drv.status(h) == VIRTIO_BLK_S_OK for h in heads)
    assert [op[1] // 512 for op in disk.ops] == heads           # served in ring order
    assert t.h.stats["throttled"] >= 4 and t.h._bytes == 0
    big = 40
    t.drv.request(big, VIRTIO_BLK_T_IN, 0, in_len=0x1E000)      # 120 KiB, more than the budget: taken alone
    t.process()
    assert t.h.in_flight(0) == 1
    disk.complete_all()
    t.h.flush()
    assert t.drv.take_used()[0][0] == big and t.h._bytes == 0
