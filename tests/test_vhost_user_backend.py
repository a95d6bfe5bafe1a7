"""The back-end state machine driven by a front end written here, through an in-memory shell."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from xdom.domains.vhost_user import actions, wire
from xdom.domains.vhost_user.actions import FdKind
from xdom.domains.vhost_user.backend import DEVICE_STATUS_NEEDS_RESET, VhostUserBackend
from xdom.domains.vhost_user.device import DeviceSpec
from xdom.domains.vhost_user.memory import MemoryRegion
from xdom.domains.vhost_user.spec import ProtocolFeature as PF
from xdom.domains.vhost_user.spec import Request as R
from xdom.domains.vhost_user.spec import VhostFeature as VF
from xdom.domains.vhost_user.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

BLK_F_SEG_MAX, BLK_F_BLK_SIZE, BLK_F_FLUSH = 1 << 2, 1 << 6, 1 << 9
GUEST_SIZE = 0x100000
GPA, UVA = 0x0, 0x7F1234560000
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000


def blk_config(sectors: int = 2048) -> bytearray:
    cfg = bytearray(60)
    struct.pack_into("<Q", cfg, 0, sectors)
    struct.pack_into("<I", cfg, 12, 126)
    struct.pack_into("<I", cfg, 20, 512)
    struct.pack_into("<H", cfg, 34, 1)
    return cfg


def blk_device(queues: int = 1) -> DeviceSpec:
    return DeviceSpec(device_features=BLK_F_SEG_MAX | BLK_F_BLK_SIZE | BLK_F_FLUSH, num_queues=queues,
                      config=blk_config(), max_queue_size=1024, writable_config=((32, 33),))


class Shell:
    """Carries out the core's actions on bytearrays; fds are numbers tracked in ``open``."""

    def __init__(self, core: VhostUserBackend, *, fail_maps: bool = False) -> None:
        self.core = core
        self.fail_maps = fail_maps
        self.open: set[int] = set()
        self.backing: dict[int, bytearray] = {}
        self.next_fd = 100
        self.replies: list[tuple[int, bytes, tuple[int, ...]]] = []
        self.actions: list[actions.Action] = []
        self.regions: dict[int, bytearray] = {}
        self.qfds: dict[tuple[int, FdKind], int] = {}
        self.queues: dict[int, Any] = {}
        self.inflight: tuple[int, bytearray] | None = None
        self.closed: actions.Closed | None = None

    def fd(self, backing: bytearray | None = None) -> int:
        n = self.next_fd
        self.next_fd += 1
        self.open.add(n)
        if backing is not None:
            self.backing[n] = backing
        return n

    def close(self, fd: int) -> None:
        assert fd in self.open, f"fd {fd} closed twice or never opened"
        self.open.remove(fd)

    def send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (), need_reply: bool = False) -> list:
        before = len(self.replies)
        self.core.receive_data(wire.encode_request(request, payload, need_reply=need_reply), fds)
        self.run()
        return self.replies[before:]

    def eof(self) -> None:
        self.core.receive_data(b"")
        self.run()

    def run(self) -> None:
        while (act := self.core.next_action()) is not None:
            self.actions.append(act)
            self.carry_out(act)

    def carry_out(self, act: actions.Action) -> None:
        if isinstance(act, actions.SendReply):
            r = wire.MessageReader(replies=True)
            r.receive_data(act.data)
            ev = r.next_event()
            assert isinstance(ev, wire.Message) and ev.flags == wire.VERSION | wire.FLAG_REPLY
            assert r.next_event() is None
            assert isinstance(ev.payload, wire.Raw)
            for fd in act.fds:
                assert fd in self.open          # lent, still ours
            self.replies.append((int(ev.request), ev.payload.data, act.fds))
        elif isinstance(act, actions.CloseFds):
            for fd in act.fds:
                self.close(fd)
        elif isinstance(act, actions.MapRegion):
            if not self.fail_maps:
                buf = self.backing[act.fd]
                assert len(buf) >= act.region.mapping_length
                self.regions[act.slot] = buf
                self.core.region_mapped(act.slot, memoryview(buf))
            self.close(act.fd)
        elif isinstance(act, actions.UnmapRegion):
            self.regions.pop(act.slot, None)
        elif isinstance(act, actions.SetQueueFd):
            old = self.qfds.pop((act.index, act.kind), None)
            if old is not None:
                self.close(old)
            if act.fd is not None:
                self.qfds[(act.index, act.kind)] = act.fd
        elif isinstance(act, actions.StartQueue):
            self.queues[act.index] = act.queue
        elif isinstance(act, actions.StopQueue):
            self.queues.pop(act.index, None)
        elif isinstance(act, actions.AllocateInflight):
            buf = bytearray(act.size)
            fd = self.fd(buf)
            self.inflight = (fd, buf)
            self.core.inflight_allocated(fd, memoryview(buf))
        elif isinstance(act, actions.MapInflight):
            buf = self.backing[act.fd]
            self.close(act.fd)
            self.inflight = (-1, buf)
            self.core.inflight_mapped(memoryview(buf)[act.offset:act.offset + act.size])
        elif isinstance(act, actions.UnmapInflight):
            if self.inflight is not None and self.inflight[0] >= 0:
                self.close(self.inflight[0])
            self.inflight = None
        elif isinstance(act, actions.Closed):
            self.closed = act

    def assert_released(self) -> None:
        assert self.closed is not None
        assert self.open == set(), f"fds left open: {self.open}"
        assert self.regions == {} and self.qfds == {} and self.queues == {} and self.inflight is None


def u64(reply: tuple[int, bytes, tuple[int, ...]]) -> int:
    return struct.unpack("=Q", reply[1])[0]


ACKED = (1 << VF.VERSION_1) | (1 << VF.PROTOCOL_FEATURES) | (1 << VF.RING_EVENT_IDX) \
    | (1 << VF.RING_INDIRECT_DESC) | BLK_F_SEG_MAX | BLK_F_BLK_SIZE
PROTO = (1 << PF.MQ) | (1 << PF.REPLY_ACK) | (1 << PF.CONFIG) | (1 << PF.INFLIGHT_SHMFD) | (1 << PF.CONFIGURE_MEM_SLOTS)


def negotiate(sh: Shell, guest: bytearray | None = None, *, proto: int = PROTO) -> bytearray:
    """QEMU's sequence (hw/virtio/vhost-user.c vhost_user_backend_init, vhost_dev_init, vhost_dev_start)."""
    assert u64(sh.send(R.GET_FEATURES)[0]) & ((1 << 64) - 1) == sh.core.offered_features
    assert u64(sh.send(R.GET_PROTOCOL_FEATURES)[0]) & proto == proto
    assert sh.send(R.SET_PROTOCOL_FEATURES, wire.pack_u64(proto)) == []
    assert u64(sh.send(R.GET_QUEUE_NUM)[0]) == sh.core.device.num_queues
    sh.send(R.SET_OWNER)
    sh.send(R.SET_VRING_CALL, wire.pack_vring_file(0), (sh.fd(),))
    cfg = sh.send(R.GET_CONFIG, wire.pack_config(0, 0, bytes(60)))[0]
    assert cfg[1] == wire.pack_config(0, 0, bytes(blk_config()))
    assert u64(sh.send(R.SET_FEATURES, wire.pack_u64(ACKED), need_reply=True)[0]) == 0
    guest = guest if guest is not None else bytearray(GUEST_SIZE)
    region = MemoryRegion(guest_phys_addr=GPA, memory_size=GUEST_SIZE, userspace_addr=UVA, mmap_offset=0)
    assert u64(sh.send(R.SET_MEM_TABLE, wire.pack_memory_table([region]), (sh.fd(guest),), need_reply=True)[0]) == 0
    return guest


def start_ring(sh: Shell, num: int = 8, base: int = 0, index: int = 0) -> None:
    assert sh.send(R.SET_VRING_NUM, wire.pack_vring_state(index, num), need_reply=True)[0][1] == wire.pack_u64(0)
    sh.send(R.SET_VRING_BASE, wire.pack_vring_state(index, base))
    sh.send(R.SET_VRING_ADDR, wire.pack_vring_addr(index, 0, UVA + DESC, UVA + USED, UVA + AVAIL))
    sh.send(R.SET_VRING_KICK, wire.pack_vring_file(index), (sh.fd(),))
    sh.send(R.SET_VRING_CALL, wire.pack_vring_file(index), (sh.fd(),))
    sh.send(R.SET_VRING_ENABLE, wire.pack_vring_state(index, 1))


def test_qemu_sequence_end_to_end() -> None:
    sh = Shell(VhostUserBackend(blk_device()))
    guest = negotiate(sh)
    assert any(isinstance(a, actions.FeaturesAcked) and a.features == ACKED for a in sh.actions)
    # vhost-user-blk starts with the inflight area, then the rings.
    size, off, nq, qs = struct.unpack("=QQHHxxxx", sh.send(R.GET_INFLIGHT_FD, wire.pack_inflight(0, 0, 1, 8))[0][1])
    assert (size, off, nq, qs) == (128 + 64, 0, 1, 8)
    inflight_fd = sh.replies[-1][2][0]
    inflight_buf = sh.backing[inflight_fd]
    assert sh.send(R.SET_INFLIGHT_FD, wire.pack_inflight(size, 0, 1, 8), (sh.fd(inflight_buf),)) == []
    start_ring(sh)
    q = sh.queues[0]
    assert sh.core.queue_enabled(0) and sh.core.queue(0) is q
    assert QueueEnabledSeen(sh, 0, True)
    # The guest submits one request: a 16-byte header and a 1-byte status.
    struct.pack_into("<QIHH", guest, DESC, 0x10000, 16, VIRTQ_DESC_F_NEXT, 1)
    struct.pack_into("<QIHH", guest, DESC + 16, 0x10010, 1, VIRTQ_DESC_F_WRITE, 0)
    struct.pack_into("<HHH", guest, AVAIL, 0, 1, 0)
    chain = q.pop()
    assert chain is not None and chain.head == 0 and inflight_buf[16] == 1     # desc[0].inflight
    assert sh.core.memory.read(0x10000, 16) == bytes(16)
    sh.core.memory.write(0x10010, b"\0")
    q.push(0, 1)
    assert struct.unpack_from("<HHII", guest, USED) == (0, 1, 0, 1) and inflight_buf[16] == 0
    # The front end stops the ring: the reply reports where to resume.
    rep = sh.send(R.GET_VRING_BASE, wire.pack_vring_state(0, 0))
    assert rep == [(R.GET_VRING_BASE, wire.pack_vring_state(0, 1), ())]
    assert 0 not in sh.queues and (0, FdKind.KICK) not in sh.qfds and (0, FdKind.CALL) not in sh.qfds
    # ... and starts it again from there.
    start_ring(sh, base=1)
    assert sh.queues[0].last_avail_idx == 1
    sh.eof()
    assert sh.closed == actions.Closed(reason="front end closed the connection", error=False)
    sh.assert_released()


def QueueEnabledSeen(sh: Shell, index: int, enabled: bool) -> bool:
    return any(isinstance(a, actions.QueueEnabled) and (a.index, a.enabled) == (index, enabled) for a in sh.actions)


def test_refusal_with_reply_ack_goes_on_without_fails_the_connection() -> None:
    sh = Shell(VhostUserBackend(blk_device()))
    negotiate(sh)
    rep = sh.send(R.SET_VRING_NUM, wire.pack_vring_state(0, 3), need_reply=True)
    assert rep == [(R.SET_VRING_NUM, wire.pack_u64(1), ())]
    assert isinstance(sh.actions[-2], actions.Refused) and sh.closed is None
    assert sh.send(R.SET_VRING_NUM, wire.pack_vring_state(0, 3)) == []
    assert sh.closed is not None and sh.closed.error and "power of two" in sh.closed.reason
    sh.assert_released()


@pytest.mark.parametrize("request_id,payload,nfds", [
    (R.SET_LOG_BASE, wire.pack_log_area(4096, 0), 1),
    (R.SET_LOG_FD, b"", 1),
    (R.SET_BACKEND_REQ_FD, b"", 1),
    (R.IOTLB_MSG, bytes(24), 0),
    (R.SET_VRING_ENDIAN, wire.pack_vring_state(0, 0), 0),
    (R.POSTCOPY_ADVISE, b"", 0),
    (R.VRING_KICK, wire.pack_vring_state(0, 0), 0),
    (123, b"abc", 2),
])
def test_unsupported_requests_are_refused_and_their_fds_closed(request_id: int, payload: bytes, nfds: int) -> None:
    sh = Shell(VhostUserBackend(blk_device()))
    negotiate(sh)
    fds = tuple(sh.fd() for _ in range(nfds))
    rep = sh.send(request_id, payload, fds, need_reply=True)
    assert rep == [(request_id, wire.pack_u64(1), ())]
    assert all(fd not in sh.open for fd in fds)
    sh.eof()
    sh.assert_released()


@pytest.mark.parametrize("why,request_id,payload,fds", [
    ("ring index", R.SET_VRING_KICK, wire.pack_vring_file(5), 1),
    ("ring index", R.SET_VRING_NUM, wire.pack_vring_state(1, 8), 0),
    ("ring index", R.GET_VRING_BASE, wire.pack_vring_state(200, 0), 0),
    ("codec", R.SET_FEATURES, b"\1\2", 0),
])
def test_connection_failures_release_everything(why: str, request_id: int, payload: bytes, fds: int) -> None:
    sh = Shell(VhostUserBackend(blk_device()))
    negotiate(sh)
    start_ring(sh)
    sh.send(request_id, payload, tuple(sh.fd() for _ in range(fds)), need_reply=True)
    assert sh.closed is not None and sh.closed.error
    sh.assert_released()
    # Input after the end: fds that still arrive are closed, nothing else happens.
    late = sh.fd()
    sh.send(R.GET_FEATURES, b"", (late,))
    assert late not in sh.open


def test_features_must_be_offered_and_modern() -> None:
    sh = Shell(VhostUserBackend(blk_device()))
    assert u64(sh.send(R.SET_FEATURES, wire.pack_u64(1 << VF.VERSION_1 | 1 << 40), need_reply=True)[0]) == 1
    assert u64(sh.send(R.SET_FEATURES, wire.pack_u64(BLK_F_FLUSH), need_reply=True)[0]) == 1
    assert u64(sh.send(R.SET_PROTOCOL_FEATURES, wire.pack_u64(1 << PF.LOG_SHMFD), need_reply=True)[0]) == 1
    # Without PROTOCOL_FEATURES rings start enabled.
    assert u64(sh.send(R.SET_FEATURES, wire.pack_u64(1 << VF.VERSION_1), need_reply=True)[0]) == 0
    assert sh.core.queue_enabled(0) and QueueEnabledSeen(sh, 0, True)


def test_device_refuses_forbidden_transport_features() -> None:
    with pytest.raises(ValueError):
        VhostUserBackend(DeviceSpec(device_features=1 << VF.LOG_ALL, num_queues=1))
    with pytest.raises(ValueError):
        VhostUserBackend(DeviceSpec(device_features=0, num_queues=0))


def test_config_space_windows_and_writes() -> None:
    sh = Shell(VhostUserBackend(blk_device()))
    negotiate(sh)
    assert sh.send(R.GET_CONFIG, wire.pack_config(20, 0, bytes(4)))[0][1] == wire.pack_config(20, 0, struct.pack("<I", 512))
    # Past the device's bytes: zeros; past the 256-byte space: an empty payload (the spec's error).
    assert sh.send(R.GET_CONFIG, wire.pack_config(60, 0, bytes(8)))[0][1] == wire.pack_config(60, 0, bytes(8))
    assert sh.send(R.GET_CONFIG, wire.pack_config(250, 0, bytes(8)))[0][1] == b""
    # Only the writable byte (wce at 32) accepts a driver write; migration may write anything.
    assert u64(sh.send(R.SET_CONFIG, wire.pack_config(32, 0, b"\1"), need_reply=True)[0]) == 0
    assert u64(sh.send(R.SET_CONFIG, wire.pack_config(0, 0, b"\1"), need_reply=True)[0]) == 1
    assert u64(sh.send(R.SET_CONFIG, wire.pack_config(0, 1, b"\7"), need_reply=True)[0]) == 0
    assert sh.core.device.config[0] == 7 and sh.core.device.config[32] == 1


def test_memory_slots_add_remove_and_checks() -> None:
    sh = Shell(VhostUserBackend(blk_device()))
    negotiate(sh)
    assert u64(sh.send(R.GET_MAX_MEM_SLOTS)[0]) == 32
    hi = MemoryRegion(guest_phys_addr=0x100000000, memory_size=0x10000, userspace_addr=0x7F0000000000, mmap_offset=0x1000)
    assert u64(sh.send(R.ADD_MEM_REG, wire.pack_single_region(hi), (sh.fd(bytearray(0x11000)),), need_reply=True)[0]) == 0
    assert sh.core.memory.contains(0x100000000, 0x10000)
    overlap = MemoryRegion(guest_phys_addr=0x100008000, memory_size=0x10000, userspace_addr=0x7E0000000000, mmap_offset=0)
    fd = sh.fd(bytearray(0x10000))
    assert u64(sh.send(R.ADD_MEM_REG, wire.pack_single_region(overlap), (fd,), need_reply=True)[0]) == 1
    assert fd not in sh.open
    # REM_MEM_REG identifies by GPA, UVA and size; a stray fd is closed unused.
    stray = sh.fd()
    rm = MemoryRegion(guest_phys_addr=hi.guest_phys_addr, memory_size=hi.memory_size,
                      userspace_addr=hi.userspace_addr, mmap_offset=0)
    assert u64(sh.send(R.REM_MEM_REG, wire.pack_single_region(rm), (stray,), need_reply=True)[0]) == 0
    assert stray not in sh.open and not sh.core.memory.contains(0x100000000, 1)
    assert u64(sh.send(R.REM_MEM_REG, wire.pack_single_region(rm), need_reply=True)[0]) == 1
    sh.eof()
    sh.assert_released()


def test_mem_table_overlap_and_map_failure_are_refused() -> None:
    sh = Shell(VhostUserBackend(blk_device()))
    regions = [MemoryRegion(guest_phys_addr=0, memory_size=0x2000, userspace_addr=0x10000, mmap_offset=0),
               MemoryRegion(guest_phys_addr=0x1000, memory_size=0x2000, userspace_addr=0x90000, mmap_offset=0)]
    fds = (sh.fd(bytearray(0x2000)), sh.fd(bytearray(0x2000)))
    assert u64(sh.send(R.SET_MEM_TABLE, wire.pack_memory_table(regions), fds, need_reply=True)[0]) == 1
    assert sh.open == set()
    sh2 = Shell(VhostUserBackend(blk_device()), fail_maps=True)
    fd = sh2.fd(bytearray(0x2000))
    assert u64(sh2.send(R.SET_MEM_TABLE, wire.pack_memory_table(regions[:1]), (fd,), need_reply=True)[0]) == 1
    assert sh2.open == set() and not sh2.core.memory.contains(0, 1)


def test_ring_setup_checks() -> None:
    sh = Shell(VhostUserBackend(blk_device()))
    negotiate(sh)
    nack = wire.pack_u64(1)
    assert sh.send(R.SET_VRING_NUM, wire.pack_vring_state(0, 2048), need_reply=True)[0][1] == nack   # > device max
    sh.send(R.SET_VRING_NUM, wire.pack_vring_state(0, 8))
    assert sh.send(R.SET_VRING_ADDR, wire.pack_vring_addr(0, 1, UVA + DESC, UVA + USED, UVA + AVAIL),
                   need_reply=True)[0][1] == nack                                                  # logging
    assert sh.send(R.SET_VRING_ADDR, wire.pack_vring_addr(0, 0, UVA + DESC + 8, UVA + USED, UVA + AVAIL),
                   need_reply=True)[0][1] == nack                                                  # misaligned
    assert sh.send(R.SET_VRING_ADDR, wire.pack_vring_addr(0, 0, UVA + GUEST_SIZE - 64, UVA + USED, UVA + AVAIL),
                   need_reply=True)[0][1] == nack                                                  # leaves memory
    assert sh.send(R.SET_VRING_BASE, wire.pack_vring_state(0, 0x10000), need_reply=True)[0][1] == nack
    kick = sh.fd()
    assert sh.send(R.SET_VRING_KICK, wire.pack_vring_file(0), (kick,), need_reply=True)[0][1] == nack  # no address
    assert 0 not in sh.queues and sh.qfds[(0, FdKind.KICK)] == kick
    sh.send(R.SET_VRING_ADDR, wire.pack_vring_addr(0, 0, UVA + DESC, UVA + USED, UVA + AVAIL))
    sh.send(R.SET_VRING_KICK, wire.pack_vring_file(0, no_fd=True))        # polling mode
    assert 0 in sh.queues and (0, FdKind.KICK) not in sh.qfds and kick not in sh.open
    # A running ring cannot be resized or rebased.
    assert sh.send(R.SET_VRING_NUM, wire.pack_vring_state(0, 16), need_reply=True)[0][1] == nack
    assert sh.send(R.SET_VRING_BASE, wire.pack_vring_state(0, 3), need_reply=True)[0][1] == nack
    assert sh.send(R.SET_VRING_ENABLE, wire.pack_vring_state(0, 2), need_reply=True)[0][1] == nack


def test_memory_table_change_under_a_running_ring() -> None:
    sh = Shell(VhostUserBackend(blk_device()))
    guest = negotiate(sh)
    start_ring(sh)
    q = sh.queues[0]
    # Same layout again (QEMU resends the table): the ring goes on.
    region = MemoryRegion(guest_phys_addr=GPA, memory_size=GUEST_SIZE, userspace_addr=UVA, mmap_offset=0)
    sh.send(R.SET_MEM_TABLE, wire.pack_memory_table([region]), (sh.fd(guest),))
    assert q.needs_reset is None
    # The ring's user address now maps elsewhere: it cannot go on.
    moved = MemoryRegion(guest_phys_addr=0x200000, memory_size=GUEST_SIZE, userspace_addr=UVA, mmap_offset=0)
    sh.send(R.SET_MEM_TABLE, wire.pack_memory_table([moved]), (sh.fd(guest),))
    assert q.needs_reset and "moved" in q.needs_reset


def test_status_reports_needs_reset() -> None:
    sh = Shell(VhostUserBackend(blk_device(), offer_status=True))
    guest = negotiate(sh, proto=PROTO | 1 << PF.STATUS)
    sh.send(R.SET_STATUS, wire.pack_u64(0xF))
    start_ring(sh)
    assert u64(sh.send(R.GET_STATUS)[0]) == 0xF
    struct.pack_into("<HHH", guest, AVAIL, 0, 1, 9)             # head 9 in a ring of 8
    assert sh.queues[0].pop() is None
    assert u64(sh.send(R.GET_STATUS)[0]) == 0xF | DEVICE_STATUS_NEEDS_RESET
    # Not offered: refused.
    sh2 = Shell(VhostUserBackend(blk_device()))
    assert u64(sh2.send(R.GET_STATUS, need_reply=True)[0]) == 1


def test_reset_device_releases_rings_and_memory() -> None:
    sh = Shell(VhostUserBackend(blk_device()))
    negotiate(sh, proto=PROTO | 1 << PF.RESET_DEVICE)
    start_ring(sh)
    assert u64(sh.send(R.RESET_DEVICE, need_reply=True)[0]) == 0
    assert sh.queues == {} and sh.qfds == {} and sh.regions == {} and sh.core.acked_features == 0
    assert sh.open == set()


def test_inflight_refused_without_the_feature_and_for_bad_geometry() -> None:
    sh = Shell(VhostUserBackend(blk_device()))
    negotiate(sh, proto=PROTO & ~(1 << PF.INFLIGHT_SHMFD))
    rep = sh.send(R.GET_INFLIGHT_FD, wire.pack_inflight(0, 0, 1, 128))[0]
    assert struct.unpack("=QQHHxxxx", rep[1])[0] == 0 and rep[2] == ()
    sh = Shell(VhostUserBackend(blk_device()))
    negotiate(sh)
    rep = sh.send(R.GET_INFLIGHT_FD, wire.pack_inflight(0, 0, 4, 128))[0]      # more queues than the device
    assert struct.unpack("=QQHHxxxx", rep[1])[0] == 0
    fd = sh.fd(bytearray(100))
    assert u64(sh.send(R.SET_INFLIGHT_FD, wire.pack_inflight(100, 0, 1, 128), (fd,), need_reply=True)[0]) == 1
    assert fd not in sh.open


def test_inflight_survives_a_back_end_restart() -> None:
    sh = Shell(VhostUserBackend(blk_device()))
    guest = negotiate(sh)
    sh.send(R.GET_INFLIGHT_FD, wire.pack_inflight(0, 0, 1, 8))
    area = sh.backing[sh.replies[-1][2][0]]
    sh.send(R.SET_INFLIGHT_FD, wire.pack_inflight(len(area), 0, 1, 8), (sh.fd(area),))
    start_ring(sh)
    for i in range(3):
        struct.pack_into("<QIHH", guest, DESC + 16 * i, 0x10000 + 0x100 * i, 16, VIRTQ_DESC_F_WRITE, 0)
    struct.pack_into("<HHHHH", guest, AVAIL, 0, 3, 2, 0, 1)
    q = sh.queues[0]
    assert [q.pop().head for _ in range(3)] == [2, 0, 1]
    q.push(0, 0)
    sh.eof()                                  # the back end "dies"; the front end keeps the area
    sh2 = Shell(VhostUserBackend(blk_device()))
    negotiate(sh2, guest)
    sh2.send(R.SET_INFLIGHT_FD, wire.pack_inflight(len(area), 0, 1, 8), (sh2.fd(area),))
    start_ring(sh2, base=1)
    q2 = sh2.queues[0]
    assert q2.last_avail_idx == 3 and [q2.pop().head for _ in range(2)] == [2, 1]


# --- the whole state machine under random front ends ----------------------------------------------

def _msg_strategy() -> st.SearchStrategy:
    idx = st.integers(0, 2)
    region = st.builds(lambda g, s, u, o: MemoryRegion(guest_phys_addr=g, memory_size=s, userspace_addr=u,
                                                       mmap_offset=o),
                       st.sampled_from([0, 0x1000, 0x80000]), st.sampled_from([0x1000, 0x10000, GUEST_SIZE]),
                       st.sampled_from([UVA, UVA + 0x1000, 0x10000]), st.sampled_from([0, 0x1000]))
    return st.one_of(
        st.tuples(st.sampled_from([R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.SET_OWNER,
                                   R.RESET_OWNER, R.GET_MAX_MEM_SLOTS, R.RESET_DEVICE, R.GET_STATUS]),
                  st.just(b""), st.just(0)),
        st.tuples(st.just(R.SET_FEATURES), st.sampled_from([ACKED, 1 << VF.VERSION_1, 1 << 50]).map(wire.pack_u64),
                  st.just(0)),
        st.tuples(st.just(R.SET_PROTOCOL_FEATURES), st.sampled_from([PROTO, 0, 1 << PF.LOG_SHMFD]).map(wire.pack_u64),
                  st.just(0)),
        st.tuples(st.sampled_from([R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE]),
                  st.builds(wire.pack_vring_state, idx, st.sampled_from([0, 1, 3, 8, 16, 0x10000])), st.just(0)),
        st.tuples(st.just(R.SET_VRING_ADDR),
                  st.builds(lambda i, d: wire.pack_vring_addr(i, 0, UVA + d, UVA + USED, UVA + AVAIL), idx,
                            st.sampled_from([DESC, DESC + 8, GUEST_SIZE])), st.just(0)),
        st.tuples(st.sampled_from([R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR]), idx.map(wire.pack_vring_file),
                  st.just(1)),
        st.tuples(st.just(R.SET_MEM_TABLE), st.lists(region, max_size=3).map(wire.pack_memory_table), st.just(-1)),
        st.tuples(st.sampled_from([R.ADD_MEM_REG, R.REM_MEM_REG]), region.map(wire.pack_single_region),
                  st.sampled_from([0, 1])),
        st.tuples(st.sampled_from([R.GET_INFLIGHT_FD, R.SET_INFLIGHT_FD]),
                  st.builds(wire.pack_inflight, st.sampled_from([0, 192, 4096]), st.just(0), st.integers(0, 2),
                            st.sampled_from([8, 3])), st.sampled_from([0, 1])),
        st.tuples(st.sampled_from([R.GET_CONFIG, R.SET_CONFIG]),
                  st.builds(wire.pack_config, st.sampled_from([0, 32, 250]), st.integers(0, 2),
                            st.sampled_from([b"", b"\1", bytes(60)])), st.just(0)),
        st.tuples(st.sampled_from([R.SET_LOG_BASE, R.IOTLB_MSG, 77]), st.binary(max_size=24), st.integers(0, 2)),
        st.tuples(st.just(-1), st.binary(min_size=1, max_size=30), st.integers(0, 2)),     # raw garbage
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_msg_strategy(), st.booleans()), max_size=25), st.booleans(), st.booleans())
def test_random_front_ends_never_break_the_core_and_every_fd_comes_back(msgs: list, offer_status: bool,
                                                                        prelude: bool) -> None:
    sh = Shell(VhostUserBackend(blk_device(queues=2), offer_status=offer_status))
    guest = bytearray(GUEST_SIZE + 0x1000)
    if prelude:                     # from a running ring, as QEMU leaves it
        negotiate(sh, guest)
        start_ring(sh)
    for (request_id, payload, nfds), need_reply in msgs:
        if request_id == R.SET_MEM_TABLE:
            nfds = struct.unpack_from("=I", payload)[0]
        fds = tuple(sh.fd(guest) for _ in range(nfds))
        if request_id == -1:
            sh.core.receive_data(payload, fds)
            sh.run()
        else:
            sh.send(request_id, payload, fds, need_reply=need_reply)
        for q in sh.queues.values():        # the rings see some traffic too
            c = q.pop()
            if c is not None:
                q.push(c.head, 0)
        if sh.closed is not None:
            break
    event("a ring started" if any(isinstance(a, actions.StartQueue) for a in sh.actions) else "no ring started")
    event("connection failed" if sh.closed is not None else "connection alive until EOF")
    sh.eof()
    sh.assert_released()
    assert sh.core.next_action() is None
