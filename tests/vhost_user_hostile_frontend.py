"""A hostile vhost-user front end, a VM's memory and a RAM disk, for tests/test_vhost_user_hostile_*.py.

The front end speaks the protocol over a real unix socket with real
SCM_RIGHTS descriptors (memfds, eventfds, pipes, files), so what is
proved is the whole back end: codec, core *and* the I/O shell
(``server.py``: recvmsg, mmap, epoll, eventfd writes).  The VM's memory is
a memfd this process maps too, so the test writes the virtqueues as the
guest's driver would; it is sealed as QEMU's ``memory-backend-memfd`` seals
it by default (the back end maps no memory that could shrink under it).

Run as a program (``python vhost_user_hostile_frontend.py SOCKET``) it
serves a RAM disk with ``VhostUserBlkExport`` until its stdin closes: the
tests that expect the back end to die from a fault (SIGBUS) run it there.
"""

from __future__ import annotations

import array
import errno
import fcntl
import mmap
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence

if __name__ == "__main__":                       # the checkout's root, for ``import xdom``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xdom.domains.vhost_user import wire
from xdom.domains.vhost_user.blk_export import VhostUserBlkExport
from xdom.domains.vhost_user.memory import MemoryRegion
from xdom.domains.vhost_user.spec import ProtocolFeature as PF
from xdom.domains.vhost_user.spec import Request as R
from xdom.domains.vhost_user.spec import VhostFeature as VF
from xdom.domains.vhost_user.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

GUEST_SIZE = 0x100000
UVA = 0x7F00_0000_0000
NUM = 8
RING_STRIDE = 0x4000            # ring i: desc at 0x1000 + i*stride, avail +0x1000, used +0x2000
BUF = 0x40000                   # request buffers: BUF + ring*0x10000 + head*0x1000
DISK_SECTORS = 2048

T_IN, T_OUT, T_FLUSH = 0, 1, 4
S_OK, S_IOERR = 0, 1

FEATURES = (1 << VF.VERSION_1) | (1 << VF.PROTOCOL_FEATURES) | (1 << VF.RING_INDIRECT_DESC)
PROTO = (1 << PF.MQ) | (1 << PF.REPLY_ACK) | (1 << PF.CONFIG) | (1 << PF.CONFIGURE_MEM_SLOTS)


# --- a block device ------------------------------------------------------------------------

class RamDisk:
    """A ``BlockDevice`` on a bytearray that completes every request at once, on the caller's thread."""

    size = DISK_SECTORS * 512
    sector_size = 512
    read_only = False
    can_trim = False
    can_write_zeroes = True
    can_flush = True
    can_multi_conn = False

    def __init__(self) -> None:
        self.data = bytearray(self.size)
        self.ops: list[tuple[str, int, int]] = []

    def submit_read(self, offset: int, length: int, done: Callable) -> None:
        self.ops.append(("read", offset, length))
        done(0, [memoryview(self.data)[offset:offset + length]])

    def submit_write(self, offset: int, data: memoryview, fua: bool, done: Callable) -> None:
        self.ops.append(("write", offset, len(data)))
        self.data[offset:offset + len(data)] = data
        done(0)

    def submit_flush(self, done: Callable) -> None:
        self.ops.append(("flush", 0, 0))
        done(0)

    def submit_trim(self, offset: int, length: int, done: Callable) -> None:
        done(errno.EOPNOTSUPP)

    def submit_write_zeroes(self, offset: int, length: int, may_trim: bool, done: Callable) -> None:
        self.ops.append(("zeroes", offset, length))
        self.data[offset:offset + length] = bytes(length)
        done(0)


# --- the VM's memory, and its virtio-blk driver ----------------------------------------------------

#: The seals QEMU's ``memory-backend-memfd`` puts on the VM's RAM (``seal=on``, its default).
GUEST_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def memfd(name: str, size: int, *, sealing: bool = False, sealed: bool = True) -> int:
    """A memfd of ``size`` bytes, with ``GUEST_SEALS`` if ``sealed``; ``sealing``: more seals may be added."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing or sealed else 0))
    os.ftruncate(fd, size)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, GUEST_SEALS)
    return fd


class Guest:
    """The VM's RAM (a memfd, mapped here too) and the driver's side of its split rings."""

    def __init__(self, size: int = GUEST_SIZE, name: str = "xvu-guest", *, sealed: bool = True) -> None:
        self.size = size
        self.fd = memfd(name, size, sealing=True, sealed=sealed)
        self.mm = mmap.mmap(self.fd, size)
        self.avail_idx: dict[int, int] = {}

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)

    def region(self) -> MemoryRegion:
        return MemoryRegion(guest_phys_addr=0, memory_size=self.size, userspace_addr=UVA, mmap_offset=0)

    @staticmethod
    def desc_gpa(ring: int) -> int:
        return 0x1000 + ring * RING_STRIDE

    def avail_gpa(self, ring: int) -> int:
        return self.desc_gpa(ring) + 0x1000

    def used_gpa(self, ring: int) -> int:
        return self.desc_gpa(ring) + 0x2000

    def desc(self, ring: int, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        struct.pack_into("<QIHH", self.mm, self.desc_gpa(ring) + 16 * i, addr, length, flags, nxt)

    def offer(self, ring: int, head: int) -> None:
        idx = self.avail_idx.get(ring, 0)
        struct.pack_into("<H", self.mm, self.avail_gpa(ring) + 4 + 2 * (idx % NUM), head)
        self.avail_idx[ring] = (idx + 1) & 0xFFFF
        struct.pack_into("<H", self.mm, self.avail_gpa(ring) + 2, self.avail_idx[ring])

    def used_idx(self, ring: int) -> int:
        return int(struct.unpack_from("<H", self.mm, self.used_gpa(ring) + 2)[0])

    def used(self, ring: int, k: int) -> tuple[int, int]:
        return struct.unpack_from("<II", self.mm, self.used_gpa(ring) + 4 + 8 * (k % NUM))

    @staticmethod
    def buf(ring: int, head: int) -> int:
        return BUF + ring * 0x10000 + head * 0x1000

    def blk_request(self, ring: int, head: int, kind: int, sector: int = 0, *, data_len: int = 512) -> int:
        """Header (readable), data (writable for IN, readable for OUT), status (writable) from ``head`` on,
        offered; returns the status byte's address (0xFF until the device writes it)."""
        base = self.buf(ring, head)
        struct.pack_into("<IIQ", self.mm, base, kind, 0, sector)
        status = base + 0xFFF
        self.mm[status] = 0xFF
        segs = [(base, 16, 0)]
        if kind in (T_IN, T_OUT) and data_len:
            segs.append((base + 0x100, data_len, VIRTQ_DESC_F_WRITE if kind == T_IN else 0))
        segs.append((status, 1, VIRTQ_DESC_F_WRITE))
        for k, (addr, n, fl) in enumerate(segs):
            last = k == len(segs) - 1
            self.desc(ring, (head + k) % NUM, addr, n, fl | (0 if last else VIRTQ_DESC_F_NEXT), (head + k + 1) % NUM)
        self.offer(ring, head)
        return status


# --- the front end ------------------------------------------------------------------------

class FrontEnd:
    """A vhost-user front end on a real socket: whatever bytes and descriptors the test wants to send."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.reader = wire.MessageReader(replies=True)
        self.eof = False

    def close(self) -> None:
        self.sock.close()
        for fd in self.reader.take_unclaimed_fds():
            os.close(fd)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *, need_reply: bool = False) -> None:
        self.send_raw(wire.encode_request(request, payload, need_reply=need_reply), fds)

    def reply(self, timeout: float = 3.0) -> wire.Message | None:
        """The next reply, or None if none came within ``timeout`` (or the back end closed)."""
        deadline = time.monotonic() + timeout
        while True:
            ev = self.reader.next_event()
            if isinstance(ev, wire.Message):
                return ev
            if ev is not None or self.eof:
                self.eof = True
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data, anc, _flags, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(8 * 4))
            except TimeoutError:
                return None
            except OSError:
                data, anc = b"", []
            fds: list[int] = []
            for level, typ, raw in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(raw[:len(raw) - len(raw) % 4])
                    fds.extend(a)
            self.reader.receive_data(data, fds)
            if not data:
                self.eof = True

    def call(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *,
             timeout: float = 3.0) -> bytes | None:
        """Send a request that has a reply of its own; its payload, or None."""
        self.send(request, payload, fds)
        ev = self.reply(timeout)
        if ev is None:
            return None
        assert int(ev.request) == int(request), ev
        assert isinstance(ev.payload, wire.Raw)
        for fd in ev.fds:
            os.close(fd)
        return ev.payload.data

    def ack(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *, timeout: float = 3.0) -> int | None:
        """Send with NEED_REPLY: 0 accepted, non-zero refused, None if no answer came (dead or hung back end)."""
        self.send(request, payload, fds, need_reply=True)
        ev = self.reply(timeout)
        if ev is None:
            return None
        assert int(ev.request) == int(request) and isinstance(ev.payload, wire.Raw), ev
        return int(struct.unpack("=Q", ev.payload.data)[0])

    def alive(self, timeout: float = 1.0) -> bool:
        """The back end answers GET_FEATURES."""
        try:
            return self.call(R.GET_FEATURES, timeout=timeout) is not None
        except OSError:
            return False

    def closed_by_peer(self, timeout: float = 2.0) -> bool:
        try:
            return self.reply(timeout) is None and self.eof
        except OSError:
            return True


class RingFds:
    """The front end's ends of one ring's eventfds."""

    def __init__(self) -> None:
        self.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def close(self) -> None:
        for fd in (self.kick, self.call, self.err):
            os.close(fd)

    def do_kick(self) -> None:
        os.eventfd_write(self.kick, 1)

    @staticmethod
    def count(fd: int) -> int:
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0


def negotiate(fe: FrontEnd, guest: Guest | None, *, features: int = FEATURES, proto: int = PROTO) -> None:
    """QEMU's set-up, every step acknowledged (REPLY_ACK), the memory table last."""
    assert fe.call(R.GET_FEATURES) is not None
    offered = struct.unpack("=Q", fe.call(R.GET_PROTOCOL_FEATURES) or bytes(8))[0]
    assert offered & proto == proto, hex(offered)
    fe.send(R.SET_PROTOCOL_FEATURES, wire.pack_u64(proto))
    assert fe.ack(R.SET_OWNER) == 0
    assert fe.ack(R.SET_FEATURES, wire.pack_u64(features)) == 0
    if guest is not None:
        assert fe.ack(R.SET_MEM_TABLE, wire.pack_memory_table([guest.region()]), (guest.fd,)) == 0


def start_ring(fe: FrontEnd, guest: Guest, index: int, *, kick: int | None = None, call: int | None = None,
               check: bool = True) -> RingFds:
    """SET_VRING_NUM/BASE/ADDR, then CALL, ERR, KICK (which starts it) and ENABLE; returns the eventfds.

    With ``check`` the set-up steps must be accepted; the start and the enable are sent without waiting
    long for their answers (a start that kills the back end gets none)."""
    fds = RingFds()
    steps = [(R.SET_VRING_NUM, wire.pack_vring_state(index, NUM), ()),
             (R.SET_VRING_BASE, wire.pack_vring_state(index, 0), ()),
             (R.SET_VRING_ADDR, wire.pack_vring_addr(index, 0, UVA + guest.desc_gpa(index), UVA + guest.used_gpa(index),
                                                     UVA + guest.avail_gpa(index)), ()),
             (R.SET_VRING_CALL, wire.pack_vring_file(index), (fds.call if call is None else call,)),
             (R.SET_VRING_ERR, wire.pack_vring_file(index), (fds.err,))]
    for request, payload, fd in steps:
        got = fe.ack(request, payload, fd, timeout=1.0)
        assert got == 0 or not check, (request, got)
    fe.ack(R.SET_VRING_KICK, wire.pack_vring_file(index), (fds.kick if kick is None else kick,), timeout=1.0)
    fe.ack(R.SET_VRING_ENABLE, wire.pack_vring_state(index, 1), timeout=1.0)
    return fds


def wait_for(pred: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# --- the back end under test, on a thread of this process ---------------------------------------------

class ServedDisk:
    """``VhostUserBlkExport`` (the production vhost-user-blk stack) over a ``RamDisk``, on its own thread."""

    def __init__(self, path: str, num_queues: int = 2) -> None:
        self.path = path
        self.disk = RamDisk()
        self.export = VhostUserBlkExport(path, self.disk, serial="hostile", num_queues=num_queues, drain_timeout=0.5)
        self.export.start()

    @property
    def loop_alive(self) -> bool:
        t = self.export._thread
        return t is not None and t.is_alive()

    def stop(self, timeout: float = 3.0) -> bool:
        """Ask the loop to end; True if it did within ``timeout`` (then everything is released)."""
        self.export.server.stop()
        t = self.export._thread
        if t is not None:
            t.join(timeout)
            if t.is_alive():
                return False
        self.export.close()
        return True


def fd_targets() -> list[str]:
    out = []
    for n in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{n}"))
        except OSError:
            pass
    return out


def mappings(name: str) -> int:
    """How many mappings of a memfd called ``name`` this process has."""
    with open("/proc/self/maps") as f:
        return sum(f"/memfd:{name} " in line for line in f)


def mapped(name: str) -> bool:
    return mappings(name) > 0


# --- the back end as a separate process --------------------------------------------------------------

def _serve_forever(path: str) -> None:
    disk = RamDisk()
    export = VhostUserBlkExport(path, disk, serial="hostile", num_queues=1, drain_timeout=0.5)
    export.start()
    print("ready", flush=True)
    sys.stdin.read()
    export.close()


if __name__ == "__main__":
    _serve_forever(sys.argv[1])
