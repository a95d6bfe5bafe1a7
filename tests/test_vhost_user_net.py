"""vhost-user-net over netfront: the sans-IO parts against a driver written here (real VMs: test_vhost_user_net_vm.py).

Unit tests (no process, no VM): the device's features and config space;
the virtio-net header both ways (a VM's TX chain -> netif's flags and GSO
extra as ``vnet.from_tap`` makes them; netif's receive flags -> the VM's
header, finished in software where the VM's driver did not take the
offload), checked with the textbook checksums of reference_frames;
mergeable receive buffers (a frame spread over several, ``num_buffers``
set, held chains when the driver posted too few); the control queue; the
port's rings end to end through a fake server; hostile chains (loops,
addresses outside the table, buffers too short, random descriptor tables)
that must never raise out of the port.
"""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_frames import build, check_segments, l4_checksum_ok

from xdom.domains.abi.netif import XEN_NETIF_GSO_TYPE_TCPV4, GsoInfo
from xdom.domains.packet import VirtioGso, VirtioNetHdr
from xdom.domains.vhost_user import net
from xdom.domains.vhost_user.memory import GuestMemory, MemoryRegion
from xdom.domains.vhost_user.net import (
    NET_HDR_SIZE,
    RX_DROP,
    RX_WAIT,
    VIRTIO_NET_ERR,
    VIRTIO_NET_OK,
    ControlState,
    RxRing,
    VhostUserNetPort,
    control_command,
    fill_rx,
    frames_for_guest,
    read_tx_chain,
)
from xdom.domains.vhost_user.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    RingLayout,
    SplitVirtqueue,
)
from xdom.domains.vnet import BackendOffloads, from_tap, to_tap

NEEDS_CSUM, DATA_VALID = 1, 2
F = net
ALL_GUEST = (1 << F.VIRTIO_NET_F_GUEST_CSUM) | (1 << F.VIRTIO_NET_F_GUEST_TSO4) | (1 << F.VIRTIO_NET_F_GUEST_TSO6)
MRG = 1 << F.VIRTIO_NET_F_MRG_RXBUF
MEM_SIZE = 0x400000            # 4 MiB of "VM memory"
RING_BASE = 0x1000             # rings from here, 0x4000 apart; buffers from BUF_BASE
BUF_BASE = 0x100000


# ---- a virtio-net driver, from the spec ------------------------------------------------------------

class VmMemory:
    """The VM's memory as our back end sees it (a GuestMemory over a bytearray) and a bump allocator."""

    def __init__(self) -> None:
        self.mem = GuestMemory()
        self.buf = bytearray(MEM_SIZE)
        slot = self.mem.add(MemoryRegion(guest_phys_addr=0, memory_size=MEM_SIZE, userspace_addr=0x7F0000000000,
                                         mmap_offset=0))
        self.mem.attach(slot, memoryview(self.buf))
        self.next = BUF_BASE

    def alloc(self, data: bytes | int) -> int:
        size = data if isinstance(data, int) else len(data)
        at = self.next
        self.next += (size + 63) & ~63
        assert self.next <= MEM_SIZE
        if not isinstance(data, int):
            self.buf[at:at + size] = data
        return at


class DriverRing:
    """One split virtqueue, the driver's side: descriptors, avail, used (no EVENT_IDX: simplest driver)."""

    def __init__(self, vm: VmMemory, index: int, num: int = 64) -> None:
        self.vm, self.num = vm, num
        base = RING_BASE + 0x4000 * index
        self.desc, self.avail, self.used = base, base + 16 * num, base + 0x2000
        self.layout = RingLayout(num=num, desc_gpa=self.desc, avail_gpa=self.avail, used_gpa=self.used)
        self.free = list(range(num))
        self.avail_idx = 0
        self.seen_used = 0

    def queue(self) -> SplitVirtqueue:
        return SplitVirtqueue(self.vm.mem, self.layout, event_idx=False, indirect_desc=True)

    def put_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0, table: int | None = None) -> None:
        self.vm.mem.write((self.desc if table is None else table) + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def add(self, bufs: list[tuple[int, int, bool]]) -> int:
        """A chain of (gpa, length, writable) buffers; returns its head."""
        ids = [self.free.pop(0) for _ in bufs]
        for k, (gpa, length, w) in enumerate(bufs):
            flags = (VIRTQ_DESC_F_WRITE if w else 0) | (VIRTQ_DESC_F_NEXT if k < len(bufs) - 1 else 0)
            self.put_desc(ids[k], gpa, length, flags, ids[k + 1] if k < len(bufs) - 1 else 0)
        self.offer(ids[0])
        return ids[0]

    def offer(self, head: int) -> None:
        self.vm.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.vm.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def take_used(self) -> list[tuple[int, int]]:
        idx = struct.unpack("<H", self.vm.mem.read(self.used + 2, 2))[0]
        out = []
        while self.seen_used != idx:
            out.append(struct.unpack("<II", self.vm.mem.read(self.used + 4 + 8 * (self.seen_used % self.num), 8)))
            self.seen_used = (self.seen_used + 1) & 0xFFFF
        return out

    def send(self, hdr: bytes, frame: bytes, split: tuple[int, ...] = ()) -> int:
        """A TX chain: the 12-byte header and frame, cut at the offsets in ``split``."""
        data = hdr + frame
        cuts = [0, *split, len(data)]
        return self.add([(self.vm.alloc(data[a:b]), b - a, False) for a, b in zip(cuts, cuts[1:])])

    def post(self, size: int, count: int = 1) -> list[tuple[int, int]]:
        """``count`` one-descriptor receive buffers of ``size`` bytes; returns (head, gpa) of each."""
        out = []
        for _ in range(count):
            gpa = self.vm.alloc(size)
            out.append((self.add([(gpa, size, True)]), gpa))
        return out


def vhdr(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0, csum_start: int = 0,
         csum_offset: int = 0, num_buffers: int = 0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


# ---- the device ------------------------------------------------------------------------------------

def test_device_features_and_config_space() -> None:
    one = net.net_device(net.parse_mac("00:16:3e:00:00:2a"), 1)
    assert one.num_queues == 2
    want = {F.VIRTIO_NET_F_CSUM, F.VIRTIO_NET_F_GUEST_CSUM, F.VIRTIO_NET_F_MAC, F.VIRTIO_NET_F_GUEST_TSO4,
            F.VIRTIO_NET_F_GUEST_TSO6, F.VIRTIO_NET_F_HOST_TSO4, F.VIRTIO_NET_F_HOST_TSO6, F.VIRTIO_NET_F_MRG_RXBUF,
            F.VIRTIO_NET_F_STATUS}
    assert one.device_features == sum(1 << b for b in want)
    cfg = one.read_config(0, 12)
    assert cfg == bytes.fromhex("00163e00002a") + struct.pack("<HH", F.VIRTIO_NET_S_LINK_UP, 1) + bytes(2)
    assert one.read_config(0, 64) is not None and len(one.read_config(0, 64) or b"") == 64   # QEMU asks for more
    assert not one.write_config(0, b"\x02" * 6, 0)          # the MAC is read-only to the driver
    four = net.net_device(b"\x02\0\0\0\0\x01", 4)
    assert four.num_queues == 9                             # 4 pairs and the control queue
    assert four.device_features & (1 << F.VIRTIO_NET_F_MQ) and four.device_features & (1 << F.VIRTIO_NET_F_CTRL_VQ)
    assert struct.unpack_from("<H", four.read_config(8, 2) or b"")[0] == 4
    for bad in ("00:16:3e:00:00", "zz:16:3e:00:00:01", "0016.3e00.0001"):
        with pytest.raises(ValueError):
            net.parse_mac(bad)


# ---- header mapping, VM -> netif ------------------------------------------------------------------

def test_tx_chain_header_and_frame_in_any_layout() -> None:
    vm = VmMemory()
    ring = DriverRing(vm, 1)
    q = ring.queue()
    frame = build(payload=bytes(range(200))).frame
    hdr = vhdr(NEEDS_CSUM, 0, 0, 0, 34, 16, num_buffers=7)
    for split in ((), (12,), (5,), (3, 12, 40), (12, 13, 14, 15)):
        ring.send(hdr, frame, split)
        chain = q.pop()
        assert chain is not None
        got = read_tx_chain(q.memory, chain)
        assert not isinstance(got, str)
        assert got == (VirtioNetHdr(NEEDS_CSUM, 0, 0, 0, 34, 16), frame)
        q.push(chain.head, 0)


def test_tx_chain_limits_are_checked_before_copying() -> None:
    vm = VmMemory()
    ring = DriverRing(vm, 1)
    q = ring.queue()
    ring.send(vhdr(), b"\x01" * 13)                         # shorter than an Ethernet header
    ring.add([(BUF_BASE, NET_HDR_SIZE + net.MAX_TX_FRAME + 1, False)])      # longer than any frame
    for _ in range(2):
        chain = q.pop()
        assert chain is not None
        assert isinstance(read_tx_chain(q.memory, chain), str)


def test_vm_offloads_become_netif_flags_where_the_backend_takes_them() -> None:
    vm = VmMemory()
    ring = DriverRing(vm, 1)
    q = ring.queue()
    b = build(payload=bytes(3000))
    full = BackendOffloads(sg=True, gso_tcpv4=True, gso_tcpv6=True, ipv6_csum=True)
    ring.send(vhdr(NEEDS_CSUM | 0, VirtioGso.TCPV4, b.hlen, 1448, b.l4, 16), b.frame, (12,))
    chain = q.pop()
    assert chain is not None
    got = read_tx_chain(q.memory, chain)
    assert not isinstance(got, str)
    # A backend with GSO: one super-frame, csum_blank, GSO extra of the VM's MSS.
    (f,) = from_tap(*got, full)
    assert f.csum_blank and f.data_validated and f.gso == GsoInfo(1448, XEN_NETIF_GSO_TYPE_TCPV4)
    # A backend without: segments, each with its checksum left blank (every netback takes csum_blank).
    segs = from_tap(*got, BackendOffloads())
    assert not isinstance(segs, str) and len(segs) == 3
    check_segments(b, [s.data for s in segs], 1448, partial=True)


# ---- header mapping, netif -> VM ------------------------------------------------------------------

def test_received_offloads_pass_to_a_driver_that_takes_them() -> None:
    b = build(payload=bytes(range(256)) * 20)
    hdr, frame = to_tap(b.frame, True, True, GsoInfo(1400, XEN_NETIF_GSO_TYPE_TCPV4)) or (None, None)
    assert hdr == VirtioNetHdr(NEEDS_CSUM, VirtioGso.TCPV4, b.hlen, 1400, b.l4, 16)
    assert frames_for_guest(hdr, frame, ALL_GUEST) == [(hdr, frame)]
    csum = to_tap(b.frame, True, True, None)
    assert csum is not None and frames_for_guest(*csum, ALL_GUEST) == [csum]
    valid = to_tap(build(csum="full").frame, False, True, None)
    assert valid is not None and valid[0].flags == DATA_VALID and frames_for_guest(*valid, ALL_GUEST) == [valid]


@pytest.mark.parametrize("v6", [False, True])
def test_received_offloads_are_finished_for_a_driver_without_them(v6: bool) -> None:
    b = build(v6=v6, payload=bytes(range(256)) * 20)
    gso_type = 4 if v6 else XEN_NETIF_GSO_TYPE_TCPV4     # XEN_NETIF_GSO_TYPE_TCPV6 is 2
    gso_type = 2 if v6 else gso_type
    got = to_tap(b.frame, True, True, GsoInfo(1400, gso_type))
    assert got is not None
    # GUEST_CSUM but no TSO: segments with blank checksums
    segs = frames_for_guest(*got, 1 << F.VIRTIO_NET_F_GUEST_CSUM)
    assert not isinstance(segs, str)
    check_segments(b, [s for _, s in segs], 1400, partial=True)
    assert all(h.flags == NEEDS_CSUM and h.gso_type == 0 and h.csum_start == b.l4 for h, _ in segs)
    # nothing at all: complete checksums, flags 0 ("the device MUST set flags to zero")
    segs = frames_for_guest(*got, 0)
    assert not isinstance(segs, str)
    check_segments(b, [s for _, s in segs], 1400, partial=False)
    assert all(h == VirtioNetHdr() for h, _ in segs)
    # a blank checksum alone, and data_validated: finished / cleared
    one = build(v6=v6, proto=17, payload=b"dns?" * 30)
    got = to_tap(one.frame, True, False, None)
    assert got is not None
    ((h, f),) = frames_for_guest(*got, 0)
    assert h == VirtioNetHdr() and l4_checksum_ok(f, v6, one.l3, one.l4, 17)
    ((h, _),) = frames_for_guest(VirtioNetHdr(DATA_VALID), build(csum="full").frame, 0)
    assert h.flags == 0


# ---- mergeable receive buffers ---------------------------------------------------------------------

def rx_ring(vm: VmMemory) -> tuple[DriverRing, RxRing]:
    ring = DriverRing(vm, 0, num=64)
    return ring, RxRing(ring.queue(), True)


def test_mergeable_rx_spreads_a_frame_over_buffers_and_counts_them() -> None:
    vm = VmMemory()
    ring, rx = rx_ring(vm)
    posted = ring.post(1536, 8)
    frame = os.urandom(4000)
    hdr10 = VirtioNetHdr(NEEDS_CSUM, VirtioGso.TCPV4, 54, 1448, 34, 16).pack()
    done = fill_rx(rx, hdr10, frame, mergeable=True)
    assert not isinstance(done, str)
    rx.queue.push_batch(done)
    used = ring.take_used()
    # 12 + 4000 bytes: three 1536-byte buffers, the last one partly
    assert used == [(posted[0][0], 1536), (posted[1][0], 1536), (posted[2][0], 4012 - 3072)]
    data = b"".join(bytes(vm.buf[gpa:gpa + n]) for (h, n), (_, gpa) in zip(used, posted))
    assert data[:10] == hdr10 and struct.unpack_from("<H", data, 10)[0] == 3 and data[12:] == frame
    # a small frame takes one buffer, num_buffers 1
    done = fill_rx(rx, VirtioNetHdr().pack(), b"\xaa" * 60, mergeable=True)
    assert not isinstance(done, str) and len(done) == 1 and done[0] == (posted[3][0], 72)
    rx.queue.push_batch(done)
    assert struct.unpack_from("<H", vm.buf, posted[3][1] + 10)[0] == 1


def test_rx_waits_for_buffers_keeping_what_it_fetched() -> None:
    vm = VmMemory()
    ring, rx = rx_ring(vm)
    assert fill_rx(rx, VirtioNetHdr().pack(), bytes(60), mergeable=True) == RX_WAIT       # nothing posted
    ring.post(1024, 2)
    frame = os.urandom(3000)
    assert fill_rx(rx, VirtioNetHdr().pack(), frame, mergeable=True) == RX_WAIT           # 2 KiB of 3012
    assert len(rx.held) == 2 and rx.queue.in_flight == 2
    more = ring.post(1024, 2)
    done = fill_rx(rx, VirtioNetHdr().pack(), frame, mergeable=True)
    assert not isinstance(done, str) and [n for _, n in done] == [1024, 1024, 964]
    assert not rx.held and rx.queue.has_available()      # the fourth stays posted for the next frame
    rx.queue.push_batch(done)
    assert [h for h, _ in ring.take_used()][-1] == more[0][0]


def test_rx_without_mergeable_buffers_needs_one_chain_per_frame() -> None:
    vm = VmMemory()
    ring, rx = rx_ring(vm)
    # Linux's "big packets" mode: a header buffer and page buffers chained
    head = ring.add([(vm.alloc(12), 12, True), (vm.alloc(4096), 4096, True), (vm.alloc(4096), 4096, True)])
    frame = os.urandom(6000)
    done = fill_rx(rx, VirtioNetHdr().pack(), frame, mergeable=False)
    assert done == [(head, 6012)]
    rx.queue.push_batch(done)
    small = ring.post(1518 + 12)[0][0]
    assert fill_rx(rx, VirtioNetHdr().pack(), frame, mergeable=False) == RX_DROP    # too long for it: dropped
    done = fill_rx(rx, VirtioNetHdr().pack(), bytes(100), mergeable=False)          # the chain serves the next
    assert done == [(small, 112)]
    rx.queue.push_batch(done)
    assert [n for _, n in ring.take_used()] == [6012, 112]


# ---- the control queue ------------------------------------------------------------------------------

def test_control_queue_sets_queue_pairs_and_refuses_the_rest() -> None:
    mq = 1 << F.VIRTIO_NET_F_MQ
    s = ControlState(max_pairs=4)
    assert control_command(bytes([4, 0]) + struct.pack("<H", 3), mq, s) == VIRTIO_NET_OK and s.pairs == 3
    for bad in (0, 5, 0x8001):
        assert control_command(bytes([4, 0]) + struct.pack("<H", bad), mq, s) == VIRTIO_NET_ERR and s.pairs == 3
    assert control_command(bytes([4, 0]) + struct.pack("<H", 2), 0, s) == VIRTIO_NET_ERR       # MQ not acked
    assert control_command(bytes([4, 0, 2]), mq, s) == VIRTIO_NET_ERR                          # short data
    for cls, cmd in ((0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (3, 0), (4, 1), (5, 0), (99, 0)):
        assert control_command(bytes([cls, cmd, 1, 0]), mq, s) == VIRTIO_NET_ERR
    assert control_command(b"\x04", mq, s) == VIRTIO_NET_ERR


# ---- the port, end to end through a fake server -------------------------------------------------

class FakeServer:
    """What the port uses of VhostUserServer: acked features and run_queue (process, then 'notify')."""

    def __init__(self, port: VhostUserNetPort, features: int) -> None:
        self.port, self.acked_features = port, features
        self.queues: dict[int, SplitVirtqueue] = {}
        self.notified: list[int] = []

    def start(self, index: int, queue: SplitVirtqueue) -> None:
        self.queues[index] = queue
        self.port.queue_started(index, queue, True)
        self.run_queue(index)

    def run_queue(self, index: int) -> None:
        q = self.queues.get(index)
        if q is not None and q.needs_reset is None:
            before = q.used_idx
            self.port.process(index, q)
            if q.used_idx != before:
                self.notified.append(index)

    def close(self) -> None:
        pass


@pytest.fixture
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VhostUserNetPort]:
    d = tmp_path_factory.mktemp("vun")
    p = VhostUserNetPort(str(d / "n.sock"), "00:16:3e:00:00:01", max_pairs=2)
    try:
        yield p
    finally:
        p.close()


def attach(port: VhostUserNetPort, features: int) -> tuple[VmMemory, FakeServer, dict[int, DriverRing]]:
    vm = VmMemory()
    fake = FakeServer(port, features)
    real = port._server
    port._server = fake                    # type: ignore[assignment]
    port._real_server = real               # type: ignore[attr-defined]
    rings = {i: DriverRing(vm, i) for i in range(4)}
    for i, r in rings.items():
        fake.start(i, r.queue())
    return vm, fake, rings


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_port_moves_frames_both_ways(port: VhostUserNetPort) -> None:
    vm, fake, rings = attach(port, ALL_GUEST | MRG)
    try:
        frames = [build(payload=bytes([i]) * (60 + i)).frame for i in range(10)]
        for f in frames[:6]:
            rings[1].send(vhdr(), f)
        for f in frames[6:]:
            rings[3].send(vhdr(), f, (12,))
        fake.run_queue(1)                         # kicks: only noted, netfront reads when it has room
        fake.run_queue(3)
        assert readable(port.fileno())
        got = port.read_batch(4) + port.read_batch(64)
        assert sorted(f for _, f in got) == sorted(frames) and len(got) == 10
        assert not readable(port.fileno()) and port.read_batch(64) == []
        assert len(rings[1].take_used()) == 6 and len(rings[3].take_used()) == 4 and {1, 3} <= set(fake.notified)
        # received frames: spread over the enabled RX rings by flow, each into the buffers posted there
        for r in (rings[0], rings[2]):
            r.post(2048, 16)
        received = [(VirtioNetHdr().pack(), build(payload=bytes(100), csum="full").frame),
                    (VirtioNetHdr(NEEDS_CSUM, 0, 0, 0, 34, 16).pack(), build(payload=bytes(3000)).frame)]
        port.write_batch(received)
        used = rings[0].take_used() + rings[2].take_used()
        # mergeable buffers of 2 KiB: 112 + 12 bytes in one, 3054 + 12 in two
        assert sorted(n for _, n in used) == [len(received[0][1]) + 12, len(received[1][1]) + 12 - 2048, 2048]
        assert port.stats["rx_frames"] == 2 and port.stats["tx_frames"] == 10
        # a disabled TX ring is emptied without sending anything; a disabled RX ring gets nothing
        port.queue_enabled(1, False)
        rings[1].send(vhdr(), frames[0])
        fake.run_queue(1)
        assert port.read_batch(64) == [] and port.stats["tx_disabled"] == 1
        port.queue_enabled(0, False)
        port.queue_enabled(2, False)
        port.write_batch(received)
        assert port.stats["rx_dropped"] == 2
    finally:
        port._server = port._real_server     # type: ignore[attr-defined]


def test_port_backlog_is_bounded_and_waits_for_buffers(port: VhostUserNetPort) -> None:
    vm, fake, rings = attach(port, ALL_GUEST | MRG)
    try:
        port.queue_enabled(2, False)                      # one RX ring: no flow spreading
        frame = build(payload=bytes(200)).frame
        port.write_batch([(VirtioNetHdr().pack(), frame)] * (net.RX_BACKLOG + 10))
        assert port.stats["rx_no_buffers"] == 10 and port.stats["rx_frames"] == 0
        rings[0].post(4096, 20)
        fake.run_queue(0)                                 # the driver's kick: the backlog goes in
        assert port.stats["rx_frames"] == 20 and len(rings[0].take_used()) == 20
        # a ring that stops gives back what it held, unused
        rings[0].post(64, 3)                              # room for a 12-byte header and 52 bytes each
        port.write_batch([(VirtioNetHdr().pack(), frame)])
        port.queue_stopped(0)
        assert all(n == 0 for _, n in rings[0].take_used())
    finally:
        port._server = port._real_server     # type: ignore[attr-defined]


def test_port_control_queue_steers_rx_over_the_pairs_in_use(port: VhostUserNetPort) -> None:
    vm, fake, rings = attach(port, ALL_GUEST | MRG | (1 << F.VIRTIO_NET_F_MQ))
    try:
        ctrl = DriverRing(vm, 4)
        fake.start(4, ctrl.queue())
        assert port._rx_order == [0]                      # a driver starts with one pair
        req = vm.alloc(bytes([4, 0]) + struct.pack("<H", 2))
        ack = vm.alloc(1)
        vm.buf[ack] = 0xEE
        ctrl.add([(req, 4, False), (ack, 1, True)])
        fake.run_queue(4)
        assert vm.buf[ack] == VIRTIO_NET_OK and ctrl.take_used() == [(0, 1)]
        assert port._rx_order == [0, 2]
    finally:
        port._server = port._real_server     # type: ignore[attr-defined]


# ---- hostile chains ----------------------------------------------------------------------------

def test_hostile_chains_break_one_ring_never_the_port(port: VhostUserNetPort) -> None:
    vm, fake, rings = attach(port, ALL_GUEST | MRG)
    try:
        tx, rx = rings[1], rings[0]
        # a loop on TX: that ring needs a reset; the port goes on with the other TX ring
        tx.put_desc(0, BUF_BASE, 64, VIRTQ_DESC_F_NEXT, 1)
        tx.put_desc(1, BUF_BASE, 64, VIRTQ_DESC_F_NEXT, 0)
        tx.offer(0)
        fake.run_queue(1)
        assert port.read_batch(64) == [] and fake.queues[1].needs_reset
        rings[3].send(vhdr(), build().frame)
        fake.run_queue(3)
        assert len(port.read_batch(64)) == 1
        assert not readable(port.fileno())               # the broken ring is not polled for ever
        # an RX buffer outside guest memory: that ring needs a reset
        rx.add([(MEM_SIZE - 16, 64, True)])
        port.queue_enabled(2, False)
        port.write_batch([(VirtioNetHdr().pack(), build().frame)])
        assert fake.queues[0].needs_reset
        # an RX chain with room for less than a header: given back unused, counted, the next one used
        port.queue_enabled(2, True)
        port.queue_enabled(0, False)
        tiny = rings[2].add([(vm.alloc(8), 8, True)])
        rings[2].post(2048)
        port.write_batch([(VirtioNetHdr().pack(), build().frame)])
        used = rings[2].take_used()
        assert used[0] == (tiny, 0) and used[1][1] > 0 and port.stats["rx_bad_buffers"] == 1
        # an indirect table whose entries point anywhere: refused, not read
        table = vm.alloc(32)
        tx3 = rings[3]
        tx3.put_desc(0, 0xFFFF_FFFF_0000, 100, 0, table=table)
        tx3.put_desc(1, 0, 0, 0, table=table)
        head = tx3.free.pop(0)
        tx3.put_desc(head, table, 32, VIRTQ_DESC_F_INDIRECT)
        tx3.offer(head)
        fake.run_queue(3)
        assert port.read_batch(64) == [] and fake.queues[3].needs_reset
    finally:
        port._server = port._real_server     # type: ignore[attr-defined]


descs = st.lists(st.tuples(st.integers(0, MEM_SIZE + 0x1000), st.integers(0, 0x20000), st.integers(0, 7),
                           st.integers(0, 70)), min_size=1, max_size=64)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=descs, heads=st.lists(st.integers(0, 70), min_size=1, max_size=8), mergeable=st.booleans())
def test_random_descriptor_tables_never_raise_out_of_the_port(port: VhostUserNetPort, table: list[Any],
                                                              heads: list[int], mergeable: bool) -> None:
    vm, fake, rings = attach(port, ALL_GUEST | (MRG if mergeable else 0))
    try:
        for ring in (rings[1], rings[0]):
            for i, (addr, length, flags, nxt) in enumerate(table):
                ring.put_desc(i, addr, length, flags, nxt)
            for h in heads:
                ring.offer(h)
        port.queue_enabled(2, False)
        fake.run_queue(1)
        for _, f in port.read_batch(64):
            assert 14 <= len(f) <= net.MAX_TX_FRAME
        port.write_batch([(VirtioNetHdr().pack(), build(payload=bytes(1500)).frame)] * 4)
        for r in (rings[0], rings[1]):
            for head, _n in r.take_used():
                assert head < r.num
    finally:
        port._server = port._real_server     # type: ignore[attr-defined]
