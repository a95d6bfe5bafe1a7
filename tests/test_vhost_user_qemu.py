"""QEMU as the real vhost-user front end of our back end (``domains/vhost_user/server.py``).

Two tests, no guest kernel needed:

* QEMU started paused (``-S``) realizes a vhost-user-blk-pci device against us:
  that is its whole init negotiation (GET_FEATURES ... GET_CONFIG), and it must
  complete with QEMU alive, the device on the PCI bus and nothing on stderr.
* QEMU under ``-qtest``: this test plays the guest's virtio-blk driver through
  the qtest protocol (port and memory reads/writes), so QEMU starts the device
  for real (SET_FEATURES, the memory table, inflight area, ring set-up, kicks,
  calls) and block requests travel guest ring -> our SplitVirtqueue -> a RAM
  disk here -> used ring.

Every process started is killed and waited for in ``finally``; sockets live
in a short private directory (unix socket paths are limited to 108 bytes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import psutil
import pytest

from xdom.domains.vhost_user.device import DeviceSpec
from xdom.domains.vhost_user.server import VhostUserServer
from xdom.domains.vhost_user.spec import Request as R
from xdom.domains.vhost_user.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DescriptorChain,
    SplitVirtqueue,
)

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (Debian: qemu-system-x86)")

SECTORS = 2048
BLK_F_SEG_MAX, BLK_F_BLK_SIZE, BLK_F_FLUSH = 1 << 2, 1 << 6, 1 << 9
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID = 0, 1, 4, 8
DISK_ID = b"xdom-vhost-user-test"
MEMORY = ["-m", "64M", "-object", "memory-backend-memfd,id=mem,size=64M,share=on", "-numa", "node,memdev=mem"]


def blk_device() -> DeviceSpec:
    cfg = bytearray(60)
    struct.pack_into("<Q", cfg, 0, SECTORS)       # capacity
    struct.pack_into("<I", cfg, 12, 126)          # seg_max
    struct.pack_into("<I", cfg, 20, 512)          # blk_size
    struct.pack_into("<H", cfg, 34, 1)            # num_queues
    return DeviceSpec(device_features=BLK_F_SEG_MAX | BLK_F_BLK_SIZE | BLK_F_FLUSH, num_queues=1, config=cfg,
                      max_queue_size=1024)


class RamDisk:
    """Just enough virtio-blk to answer a driver: IN, OUT, FLUSH, GET_ID on a bytearray."""

    def __init__(self) -> None:
        self.data = bytearray(SECTORS * 512)
        self.requests: list[int] = []
        self.started: list[int] = []

    def queue_started(self, index: int, queue: SplitVirtqueue, enabled: bool) -> None:
        self.started.append(index)

    def queue_enabled(self, index: int, enabled: bool) -> None:
        pass

    def queue_stopped(self, index: int) -> None:
        pass

    def process(self, index: int, queue: SplitVirtqueue) -> None:
        done = []
        while (chain := queue.pop()) is not None:
            done.append((chain.head, self._serve(queue, chain)))
        if done:
            queue.push_batch(done)

    def _serve(self, queue: SplitVirtqueue, chain: DescriptorChain) -> int:
        mem = queue.memory
        out = b"".join(mem.read(s.gpa, s.length) for s in chain.readable)
        kind, _, sector = struct.unpack_from("<IIQ", out)
        self.requests.append(kind)
        data_in = chain.writable_bytes - 1
        status, payload = 0, b""
        if kind == VIRTIO_BLK_T_IN:
            payload = bytes(self.data[sector * 512:sector * 512 + data_in])
        elif kind == VIRTIO_BLK_T_OUT:
            self.data[sector * 512:sector * 512 + len(out) - 16] = out[16:]
        elif kind == VIRTIO_BLK_T_GET_ID:
            payload = DISK_ID.ljust(data_in, b"\0")[:data_in]
        elif kind != VIRTIO_BLK_T_FLUSH:
            status = 2                                   # VIRTIO_BLK_S_UNSUPP
        blob = payload + bytes([status])
        pos = 0
        tail = len(blob) - 1
        for s in chain.writable:                         # data, then the status byte last
            if s is chain.writable[-1]:
                mem.write(s.gpa + s.length - 1, blob[tail:])
                n = min(s.length - 1, tail - pos)
            else:
                n = min(s.length, tail - pos)
            mem.write(s.gpa, blob[pos:pos + n])
            pos += n
        return len(payload) + 1


@pytest.fixture
def sockdir(run_dir: str) -> str:
    """A short directory for the sockets (a unix socket's path is at most 107 bytes): conftest's run_dir."""
    return run_dir


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def stop_process(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


class Served:
    """A VhostUserServer on its own thread, for one connection."""

    def __init__(self, path: str, handler: RamDisk | None = None) -> None:
        self.server = VhostUserServer(path, blk_device, handler, max_connections=1)
        self.server.listen()
        self.thread = threading.Thread(target=self.server.serve, name="vhost-user-server", daemon=True)
        self.thread.start()

    def names(self) -> list[str]:
        return [R(r).name if r in R._value2member_map_ else str(r) for r in list(self.server.request_log)]

    def finish(self) -> None:
        self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.server.close()


def qmp(path: str, *commands: str) -> list[dict]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    f = s.makefile("rwb")
    out = []
    try:
        json.loads(f.readline())                                 # greeting
        for cmd in ("qmp_capabilities",) + commands:
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "return" in msg or "error" in msg:
                    out.append(msg)
                    break
    finally:
        f.close()
        s.close()
    return out[1:]


def test_qemu_realizes_vhost_user_blk_against_us(sockdir: str) -> None:
    vu, qmp_path = os.path.join(sockdir, "vu.sock"), os.path.join(sockdir, "qmp.sock")
    served = Served(vu)
    qemu = None
    try:
        qemu = subprocess.Popen([QEMU, "-machine", "q35,accel=tcg", "-nodefaults", "-display", "none", "-S", *MEMORY,
                                 "-chardev", f"socket,id=c0,path={vu}", "-device", "vhost-user-blk-pci,chardev=c0",
                                 "-qmp", f"unix:{qmp_path},server=on,wait=off"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: "GET_CONFIG" in served.names() or qemu.poll() is not None, 30, "QEMU's GET_CONFIG")
        wait_for(lambda: os.path.exists(qmp_path) or qemu.poll() is not None, 30, "QMP")
        assert qemu.poll() is None, qemu.stderr.read().decode()
        status, pci = qmp(qmp_path, "query-status", "query-pci")
        assert status["return"]["status"] == "prelaunch"
        devices = [d for bus in pci["return"] for d in bus["devices"]]
        # A virtio-blk: vendor 0x1af4, device 0x1001 (transitional, as on q35's root bus) or 0x1042 (modern).
        assert any(d["id"]["vendor"] == 0x1AF4 and d["id"]["device"] in (0x1001, 0x1042) for d in devices), \
            [(hex(d["id"]["vendor"]), hex(d["id"]["device"])) for d in devices]
        names = served.names()
        # QEMU 7.2's vhost_user_backend_init, then vhost_dev_init, then the device's config read.
        assert names[:5] == ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
                             "GET_MAX_MEM_SLOTS"], names
        assert names.index("SET_OWNER") < names.index("GET_CONFIG")
        assert "SET_VRING_CALL" in names
        assert not [n for n in served.server.notes if n[0] == "refused"], served.server.notes
        qmp(qmp_path, "quit")
        assert qemu.wait(15) == 0
        assert qemu.stderr.read().decode().strip() == ""
        wait_for(lambda: not served.thread.is_alive(), 10, "the server to see the connection end")
        assert served.server.notes[-1] == ("closed", "front end closed the connection")
    finally:
        if qemu is not None:
            stop_process(qemu)
            qemu.stdout.close()
            qemu.stderr.close()
        served.finish()
    assert qemu is not None and qemu.returncode is not None and not psutil.pid_exists(qemu.pid)  # nothing survives


# --- the test as the guest's virtio-blk driver, through qtest -------------------------------------

class QTest:
    """QEMU's qtest line protocol: port and memory accesses as the guest CPU would make them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rfile = sock.makefile("rb")

    def cmd(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        while True:
            try:
                reply = self.rfile.readline().decode().strip()
            except TimeoutError:
                raise AssertionError(f"QEMU did not answer qtest command {line!r}") from None
            if not reply:
                raise AssertionError(f"qtest connection ended during {line!r}")
            if reply.startswith("IRQ"):
                continue
            if not reply.startswith("OK"):
                raise AssertionError(f"qtest {line!r}: {reply}")
            return reply[2:].strip()

    def outl(self, port: int, v: int) -> None:
        self.cmd(f"outl {port:#x} {v:#x}")

    def inl(self, port: int) -> int:
        return int(self.cmd(f"inl {port:#x}"), 16)

    def read(self, addr: int, size: int) -> bytes:
        return bytes.fromhex(self.cmd(f"read {addr:#x} {size:#x}")[2:])

    def write(self, addr: int, data: bytes) -> None:
        self.cmd(f"write {addr:#x} {len(data):#x} 0x{data.hex()}")

    def r(self, width: int, addr: int) -> int:
        return int(self.cmd(f"read{'bwlq'[[1, 2, 4, 8].index(width)]} {addr:#x}"), 16)

    def w(self, width: int, addr: int, v: int) -> None:
        self.cmd(f"write{'bwlq'[[1, 2, 4, 8].index(width)]} {addr:#x} {v:#x}")

    # PCI configuration mechanism #1
    def cfg_read32(self, dev: int, off: int) -> int:
        self.outl(0xCF8, 0x80000000 | dev << 11 | off & 0xFC)
        return self.inl(0xCFC)

    def cfg_read8(self, dev: int, off: int) -> int:
        return self.cfg_read32(dev, off) >> 8 * (off & 3) & 0xFF

    def cfg_write32(self, dev: int, off: int, v: int) -> None:
        self.outl(0xCF8, 0x80000000 | dev << 11 | off & 0xFC)
        self.outl(0xCFC, v)


# virtio 1.x PCI: struct virtio_pci_common_cfg offsets and device status bits.
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
CC_DFSELECT, CC_DF, CC_GFSELECT, CC_GF, CC_STATUS = 0x00, 0x04, 0x08, 0x0C, 0x14
CC_Q_SELECT, CC_Q_SIZE, CC_Q_ENABLE, CC_Q_NOFF, CC_Q_DESC, CC_Q_AVAIL, CC_Q_USED = 0x16, 0x18, 0x1C, 0x1E, 0x20, 0x28, 0x30
BAR_BASE = 0xE0000000
DESC, AVAIL, USED, BUFS = 0x100000, 0x101000, 0x102000, 0x110000


class VirtioBlkDriver:
    """A minimal virtio-pci modern driver for one virtio-blk queue, from the virtio 1.x spec."""

    def __init__(self, qt: QTest) -> None:
        self.qt = qt
        self.dev = next(d for d in range(32) if qt.cfg_read32(d, 0) & 0xFFFF == 0x1AF4)
        caps = {}
        ptr = self.qt.cfg_read8(self.dev, 0x34)
        for _ in range(48):
            if not ptr:
                break
            if self.qt.cfg_read8(self.dev, ptr) == 0x09:                 # vendor-specific: a virtio cap
                cfg_type, bar = self.qt.cfg_read8(self.dev, ptr + 3), self.qt.cfg_read8(self.dev, ptr + 4)
                offset = self.qt.cfg_read32(self.dev, ptr + 8)
                extra = self.qt.cfg_read32(self.dev, ptr + 16) if cfg_type == 2 else 0
                caps.setdefault(cfg_type, (bar, offset, extra))
            ptr = self.qt.cfg_read8(self.dev, ptr + 1)
        bar = caps[1][0]
        self.qt.cfg_write32(self.dev, 0x10 + 4 * bar, BAR_BASE)
        self.qt.cfg_write32(self.dev, 0x14 + 4 * bar, 0)              # 64-bit BAR: high half
        cmd = self.qt.cfg_read32(self.dev, 0x04)
        self.qt.cfg_write32(self.dev, 0x04, cmd & 0xFFFF | 0x6)       # memory space + bus master
        self.common = BAR_BASE + caps[1][1]
        self.notify = BAR_BASE + caps[2][1]
        self.notify_mult = caps[2][2]
        self.device_cfg = BAR_BASE + caps[4][1]
        self.avail_idx = 0
        self.used_seen = 0

    def start(self, want: int) -> int:
        qt, c = self.qt, self.common
        qt.w(1, c + CC_STATUS, 0)
        qt.w(1, c + CC_STATUS, ACKNOWLEDGE | DRIVER)
        features = 0
        for sel in (0, 1):
            qt.w(4, c + CC_DFSELECT, sel)
            features |= qt.r(4, c + CC_DF) << 32 * sel
        acked = features & want
        for sel in (0, 1):
            qt.w(4, c + CC_GFSELECT, sel)
            qt.w(4, c + CC_GF, acked >> 32 * sel & 0xFFFFFFFF)
        qt.w(1, c + CC_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
        assert qt.r(1, c + CC_STATUS) & FEATURES_OK
        qt.w(2, c + CC_Q_SELECT, 0)
        self.num = qt.r(2, c + CC_Q_SIZE)
        self.notify_off = qt.r(2, c + CC_Q_NOFF)
        for reg, addr in ((CC_Q_DESC, DESC), (CC_Q_AVAIL, AVAIL), (CC_Q_USED, USED)):
            qt.w(8, c + reg, addr)
        qt.w(2, c + CC_Q_ENABLE, 1)
        qt.w(1, c + CC_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        return acked

    def capacity(self) -> int:
        return self.qt.r(8, self.device_cfg)

    def desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0, table: int = DESC) -> None:
        self.qt.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def submit(self, head: int) -> None:
        self.qt.write(AVAIL + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx += 1
        self.qt.w(2, AVAIL + 2, self.avail_idx)
        self.qt.w(2, self.notify + self.notify_off * self.notify_mult, 0)     # kick queue 0

    def wait_used(self, timeout: float = 10) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while self.qt.r(2, USED + 2) == self.used_seen:
            if time.monotonic() > deadline:
                raise AssertionError("the request was never completed")
            time.sleep(0.01)
        elem = struct.unpack("<II", self.qt.read(USED + 4 + 8 * (self.used_seen % self.num), 8))
        self.used_seen += 1
        return elem

    def request(self, head: int, kind: int, sector: int, data: bytes = b"", read_len: int = 0,
                indirect: bool = False) -> tuple[int, bytes, int]:
        """One virtio-blk request: header, then OUT data or IN buffer, then the status byte."""
        hdr, data_at, status_at = BUFS + 0x1000 * head, BUFS + 0x1000 * head + 0x100, BUFS + 0x1000 * head + 0xF00
        self.qt.write(hdr, struct.pack("<IIQ", kind, 0, sector))
        if data:
            self.qt.write(data_at, data)
        self.qt.write(status_at, b"\xff")
        segs = [(hdr, 16, 0)]
        if data:
            segs.append((data_at, len(data), 0))
        if read_len:
            segs.append((data_at, read_len, VIRTQ_DESC_F_WRITE))
        segs.append((status_at, 1, VIRTQ_DESC_F_WRITE))
        table = BUFS + 0x80000 + 0x1000 * head
        for k, (addr, n, f) in enumerate(segs):
            last = k == len(segs) - 1
            nxt = k + 1 if indirect else head + k + 1
            self.desc(k if indirect else head + k, addr, n, f | (0 if last else VIRTQ_DESC_F_NEXT),
                      0 if last else nxt, table=table if indirect else DESC)
        if indirect:
            self.desc(head, table, 16 * len(segs), VIRTQ_DESC_F_INDIRECT)
        self.submit(head)
        used_head, written = self.wait_used()
        assert used_head == head
        return self.qt.read(status_at, 1)[0], self.qt.read(data_at, read_len) if read_len else b"", written


def test_qemu_starts_the_device_and_block_requests_flow(sockdir: str) -> None:
    vu, qtest_path = os.path.join(sockdir, "vu.sock"), os.path.join(sockdir, "qtest.sock")
    disk = RamDisk()
    served = Served(vu, disk)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(qtest_path)
    listener.listen(1)
    listener.settimeout(30)
    qemu = None
    conn = None
    try:
        # Debian's QEMU has no qtest accelerator, so a CPU runs: give it a firmware that halts at
        # the reset vector, or SeaBIOS would drive this virtio-blk device at the same time as we do.
        firmware = os.path.join(sockdir, "halt.bin")
        with open(firmware, "wb") as f:
            f.write(b"\xf4" * 65536)                     # hlt, everywhere (interrupts are off at reset)
        qemu = subprocess.Popen([QEMU, "-machine", "q35,accel=tcg", "-bios", firmware, "-nodefaults", "-display",
                                 "none", *MEMORY,
                                 "-chardev", f"socket,id=c0,path={vu}", "-device", "vhost-user-blk-pci,chardev=c0",
                                 "-qtest", f"unix:{qtest_path}", "-qtest-log", "/dev/null"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            raise AssertionError(f"QEMU did not connect to qtest: {qemu.poll()} "
                                 f"{qemu.stderr.read().decode() if qemu.poll() is not None else ''}") from None
        conn.settimeout(30)
        drv = VirtioBlkDriver(QTest(conn))
        want = (1 << 32) | (1 << 28) | (1 << 29) | BLK_F_SEG_MAX | BLK_F_BLK_SIZE | BLK_F_FLUSH
        acked = drv.start(want)
        assert acked == want, hex(acked)
        assert drv.capacity() == SECTORS
        wait_for(lambda: disk.started == [0], 10, "ring 0 to start")
        names = served.names()
        start = names[names.index("SET_FEATURES"):]
        # QEMU 7.2's vhost_user_blk_start: features, the memory table (slot by slot with
        # CONFIGURE_MEM_SLOTS), the inflight area, then ring 0 from size to kick and call.
        assert "ADD_MEM_REG" in start and "SET_MEM_TABLE" not in start, start
        assert start.index("GET_INFLIGHT_FD") < start.index("SET_INFLIGHT_FD") < start.index("SET_VRING_NUM")
        ring = [n for n in start if n.startswith("SET_VRING")]
        # The guest notifier (call fd) is installed first, then the ring from size to kick.
        assert ring == ["SET_VRING_CALL", "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
                        "SET_VRING_ENABLE"], start
        print("QEMU start sequence:", start)

        status, ident, _ = drv.request(0, VIRTIO_BLK_T_GET_ID, 0, read_len=20)
        assert status == 0 and ident == DISK_ID
        pattern = bytes(range(256)) * 2
        status, _, written = drv.request(3, VIRTIO_BLK_T_OUT, 7, data=pattern)
        assert (status, written) == (0, 1) and disk.data[7 * 512:8 * 512] == pattern
        status, back, written = drv.request(6, VIRTIO_BLK_T_IN, 7, read_len=512, indirect=True)
        assert (status, back, written) == (0, pattern, 513)
        status, _, _ = drv.request(9, VIRTIO_BLK_T_FLUSH, 0)
        assert status == 0
        assert disk.requests == [VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_FLUSH]
        assert not [n for n in served.server.notes if n[0] == "refused"], served.server.notes

        # QEMU shuts down: it stops the ring (GET_VRING_BASE) and hangs up.
        qemu.send_signal(signal.SIGTERM)
        assert qemu.wait(15) == 0
        wait_for(lambda: not served.thread.is_alive(), 10, "the server to see the connection end")
        assert "GET_VRING_BASE" in served.names()
        assert served.server.notes[-1] == ("closed", "front end closed the connection")
        err = qemu.stderr.read().decode()
        assert "vhost" not in err.lower(), err
    finally:
        if conn is not None:
            conn.close()
        listener.close()
        if qemu is not None:
            stop_process(qemu)
            qemu.stderr.close()
        served.finish()
    assert qemu is not None and qemu.returncode is not None and not psutil.pid_exists(qemu.pid)  # nothing survives
