"""vhost-user-blk on blkfront with real VMs under TCG (the device class alone: test_vhost_user_blk.py).

A broker, xenstored and blkback as domain
processes, and a guest domain process (``python -m xdom.domains.guest
--vhost-user-disk DEVID:SOCKET``) serving blkfront as vhost-user-blk to a
QEMU VM booted from the project's image.  The VM writes with ``dd
oflag=direct`` and reads back; the host checks the image file; flush,
discard, the serial, two queues, a read-only disk.  Then the restarts: blkback
SIGKILLed under the VM's write loop, and the guest domain itself SIGKILLed
with a write in flight and started again while QEMU reconnects: stalls, never
an error in the VM.  Each VM test boots one VM (1-2 vCPUs, TCG); the module
takes under a minute on an idle 2-CPU machine.  Every process a test starts
is stopped by that test.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import wait_until
from test_blk_processes import BlkHost

from xdom.deploy.launcher import start_domain_process, stop_process
from xdom.deploy.vbd import VbdConfig, add_vbd
from xdom.deploy.vm.image import ImageError, VmImage, ensure_image
from xdom.deploy.vm.machine import RunningVm, boot_vm
from xdom.deploy.vm.qemu import VhostUserBlk, VmPaths, VmSpec
from xdom.domains.xenbus import backend_path

WAIT = 60.0
BLOCK = 64 << 10                          # the VM's write loop writes 64 KiB per dd


class VmDisk:
    def __init__(self, devid: int, vdev: str, image: str, sock: str, *, read_only: bool = False,
                 num_queues: int = 1) -> None:
        self.devid, self.vdev, self.image, self.sock = devid, vdev, image, sock
        self.read_only, self.num_queues = read_only, num_queues


class VmDiskHost(BlkHost):
    """BlkHost's broker, xenstored and blkback, plus a guest domain *process* serving vhost-user-blk.

    The toolstack's steps for the guest are done by hand, in the supervisor's
    order: create (or restart) the domain, start ``python -m
    xdom.domains.guest --vhost-user-disk ...`` with its credentials,
    introduce it, write its nodes and its vbds' nodes, wait for "ready".
    """

    def __init__(self, run_dir: str, disks: list[VmDisk]) -> None:
        self.disks = disks
        self.guest: subprocess.Popen[bytes] | None = None
        self.g_domid: int | None = None
        os.makedirs(os.path.join(run_dir, "exports"), mode=0o700, exist_ok=True)
        super().__init__(run_dir)
        try:
            self.start_guest()
        except BaseException:
            self.close()
            raise

    @property
    def guest_log(self) -> str:
        return os.path.join(self.run_dir, "g1.log")

    def guest_log_tail(self) -> str:
        with open(self.guest_log, errors="replace") as f:
            return f.read()[-4000:]

    def start_guest(self) -> None:
        if self.g_domid is None:
            creds = self.mgmt.request("create", name="g1", memory="48M")
            self.g_domid = int(creds["domid"])
        else:
            creds = self.mgmt.request("restart", domid=self.g_domid)
        store = self.mgmt.request("setup_store", domid=self.g_domid, xenstore_domid=self.xenstored.domid)
        rfd, wfd = os.pipe()
        argv = [sys.executable, "-m", "xdom.domains.guest", "--ready-fd", str(wfd),
                *(f"--vhost-user-disk={d.devid}:{d.sock}" for d in self.disks)]
        with open(self.guest_log, "ab") as log:
            self.guest = start_domain_process(creds, argv, pass_fds=(wfd,), stdout=log, stderr=subprocess.STDOUT)
        os.close(wfd)
        try:
            wait_until(lambda: self.guest.poll() is not None or self.domain_state(self.g_domid) == "running",
                       WAIT, "the guest process to connect to the broker")
            assert self.guest.poll() is None, self.guest_log_tail()
            self._introduce(self.g_domid, "g1", 48 * 1024, store)
            for d in self.disks:
                add_vbd(self.xs, VbdConfig(self.be_domid, self.g_domid, d.devid, d.vdev, d.image, d.read_only))
            ready, _, _ = select.select([rfd], [], [], WAIT)
            assert ready and os.read(rfd, 64), f"the guest did not get ready: {self.guest_log_tail()}"
        finally:
            os.close(rfd)

    def kill_guest(self) -> None:
        assert self.guest is not None and self.g_domid is not None
        self.guest.send_signal(signal.SIGKILL)
        self.guest.wait()
        wait_until(lambda: self.domain_state(self.g_domid) not in ("running", "paused"), WAIT,
                   "the broker to see the guest die")

    def kill_blkback(self) -> None:
        assert self.blkback is not None and self.g_domid is not None
        self.blkback.send_signal(signal.SIGKILL)
        self.blkback.wait()
        wait_until(lambda: self.domain_state(self.be_domid) not in ("running", "paused"), WAIT,
                   "the broker to see blkback die")
        wait_until(lambda: not self.xs.exists(backend_path(self.be_domid, "vbd", self.g_domid, self.disks[0].devid)),
                   WAIT, "xenstored to release the dead blkback's nodes")

    def restart_blkback_for_guest(self) -> None:
        """What the supervisor does for a dead driver domain: same domid, a new process, its devices again."""
        assert self.g_domid is not None
        self.be_creds = self.mgmt.request("restart", domid=self.be_domid)
        self.start_blkback()
        for d in self.disks:
            add_vbd(self.xs, VbdConfig(self.be_domid, self.g_domid, d.devid, d.vdev, d.image, d.read_only))

    def close(self) -> None:
        if self.guest is not None:
            stop_process(self.guest)
        super().close()


@pytest.fixture(scope="session")
def vm_image() -> VmImage:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 missing (apt-get install qemu-system-x86)")
    try:
        return ensure_image()
    except ImageError as e:
        pytest.skip(f"no VM image: {e}")


def boot(img: VmImage, run_dir: str, disks: list[VmDisk], cpus: int = 1) -> RunningVm:
    """A VM with ``disks``; Linux uses min(vCPUs, num-queues) queues, so a multi-queue disk needs cpus > 1."""
    spec = VmSpec(kernel=str(img.kernel), initrd=str(img.initrd), append=img.append(), accel="tcg", cpus=cpus,
                  vhost_user_blk=[VhostUserBlk(d.sock, num_queues=d.num_queues) for d in disks])
    return boot_vm(spec, VmPaths.in_dir(run_dir), ready_timeout=90)


def make_image(path: str, size: int) -> bytes:
    data = random.Random(path).randbytes(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


def file_sha(path: str, offset: int, length: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).hexdigest()


# The kernel's words for a failed request; a stall prints none of them.
IO_ERRORS = "I/O error|blk_update_request|Buffer I/O|critical medium|virtio_blk.*(error|fail)|hung_task"


def dmesg_errors(vm: RunningVm) -> str:
    _, out = vm.run(f"dmesg | grep -iE '{IO_ERRORS}' || true")
    return out.strip()


WRITE_LOOP = r"""
dd if=/dev/urandom of=/tmp/src bs=64k count={n} 2>/dev/null
sha256sum /tmp/src | cut -d' ' -f1 > /tmp/src.sha
rm -f /tmp/result /tmp/progress
(
  i=0
  while [ $i -lt {n} ]; do
    if ! dd if=/tmp/src of=/dev/vda bs=64k skip=$i seek=$((i + {base})) count=1 oflag=direct conv=notrunc \
         2>/tmp/dd.err; then
      echo "FAIL $i $(cat /tmp/dd.err)" > /tmp/result; exit 1
    fi
    i=$((i + 1)); echo $i > /tmp/progress
  done
  echo DONE > /tmp/result
) </dev/null >/dev/null 2>&1 &
cat /tmp/src.sha
"""


def start_write_loop(vm: RunningVm, blocks: int, base: int) -> str:
    """A loop in the VM writing ``blocks`` blocks of random data, one O_DIRECT dd each, in the background."""
    return vm.check(WRITE_LOOP.format(n=blocks, base=base), 60).strip()


def progress(vm: RunningVm) -> int:
    out = vm.check("cat /tmp/progress 2>/dev/null || echo 0").strip()
    return int(out or 0)


def wait_loop_done(vm: RunningVm, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = vm.check("cat /tmp/result 2>/dev/null || true").strip()
        if out:
            return out
        time.sleep(0.5)
    raise AssertionError(f"the VM's write loop did not end within {timeout}s (progress {progress(vm)})")


def test_a_vm_disk_served_by_the_guest_domain_through_blkback(vm_image: VmImage, run_dir: str) -> None:
    """Read-write with two queues and a read-only disk, in one VM: data, flush, discard, serial, refusals."""
    a, b = os.path.join(run_dir, "a.img"), os.path.join(run_dir, "b.img")
    make_image(a, 16 << 20)
    make_image(b, 4 << 20)
    disks = [VmDisk(51712, "xvda", a, os.path.join(run_dir, "exports", "xvda.sock"), num_queues=2),
             VmDisk(51728, "xvdb", b, os.path.join(run_dir, "exports", "xvdb.sock"), read_only=True)]
    h = VmDiskHost(run_dir, disks)
    try:
        with boot(vm_image, run_dir, disks, cpus=2) as vm:
            info = vm.check("for f in vda/size vda/serial vda/queue/write_cache vda/ro vdb/size vdb/ro; do "
                            "cat /sys/block/$f; echo; done; ls /sys/block/vda/mq | wc -l")
            lines = info.split()
            assert lines[0] == str((16 << 20) // 512) and lines[1] == "xvda", info
            assert " ".join(lines[2:4]) == "write back", info          # FLUSH offered: blkback's file has a cache
            assert lines[4:8] == ["0", str((4 << 20) // 512), "1", "2"], info     # vdb read-only; vda: 2 queues
            # a pattern written with O_DIRECT and fsync (a FLUSH), read back through the disk and on the host
            digest = vm.check("dd if=/dev/urandom of=/tmp/p bs=64k count=16 2>/dev/null && "
                              "dd if=/tmp/p of=/dev/vda bs=64k seek=16 oflag=direct conv=fsync,notrunc 2>/dev/null && "
                              "sha256sum /tmp/p | cut -d' ' -f1").strip()
            back = vm.check("dd if=/dev/vda bs=64k skip=16 count=16 iflag=direct 2>/dev/null | sha256sum").split()[0]
            assert back == digest
            assert file_sha(a, 16 * BLOCK, 16 * BLOCK) == digest
            # many requests at once on both queues: parallel readers, every block checked against the host
            vm.check("for k in 0 1 2 3; do dd if=/dev/vda of=/tmp/r$k bs=4k skip=$((k * 256)) count=256 "
                     "iflag=direct 2>/dev/null & done; wait")
            sums = vm.check("for k in 0 1 2 3; do sha256sum /tmp/r$k | cut -d' ' -f1; done").split()
            assert sums == [file_sha(a, k << 20, 1 << 20) for k in range(4)]
            # discard: blkback punches a hole, which reads back as zeroes on the host
            vm.check("blkdiscard -o 4194304 -l 1048576 /dev/vda")
            assert file_sha(a, 4 << 20, 1 << 20) == hashlib.sha256(bytes(1 << 20)).hexdigest()
            # the read-only disk reads, and refuses writes
            assert vm.check("dd if=/dev/vdb bs=64k count=64 iflag=direct 2>/dev/null | sha256sum").split()[0] \
                == file_sha(b, 0, 4 << 20)
            st, out = vm.run("dd if=/dev/zero of=/dev/vdb bs=4k count=1 oflag=direct")
            assert st != 0 and re.search("Operation not permitted|Read-only|Permission denied|I/O error", out), out
            assert dmesg_errors(vm) == ""
    finally:
        h.close()
    log = open(h.guest_log, errors="replace").read()
    assert "Traceback" not in log, log[-3000:]


def test_blkback_killed_under_a_vm_writing_is_a_stall(vm_image: VmImage, run_dir: str) -> None:
    """SIGKILL of blkback in the middle of the VM's write loop, blkback restarted as the supervisor would:
    the VM's program sees no error, its kernel logs none, and every block reads back (in the VM and on the host)."""
    a = os.path.join(run_dir, "a.img")
    make_image(a, 16 << 20)
    disks = [VmDisk(51712, "xvda", a, os.path.join(run_dir, "exports", "xvda.sock"))]
    h = VmDiskHost(run_dir, disks)
    blocks, base = 96, 32                     # 6 MiB written at 2 MiB, one 64 KiB O_DIRECT dd at a time
    try:
        with boot(vm_image, run_dir, disks) as vm:
            digest = start_write_loop(vm, blocks, base)
            wait_until(lambda: progress(vm) >= blocks // 4, WAIT, "the VM's write loop to get going")
            h.kill_blkback()
            stalled_at = progress(vm)
            h.restart_blkback_for_guest()
            assert wait_loop_done(vm, 120) == "DONE"
            assert stalled_at < blocks, "the loop ended before blkback was killed: nothing was tested"
            back = vm.check(f"dd if=/dev/vda bs=64k skip={base} count={blocks} iflag=direct 2>/dev/null "
                            "| sha256sum").split()[0]
            assert back == digest
            assert dmesg_errors(vm) == ""
        assert file_sha(a, base * BLOCK, blocks * BLOCK) == digest
    finally:
        h.close()
    log = open(h.guest_log, errors="replace").read()
    # blkfront saw the new blkback and issued again what the old one had not answered
    assert "came back: reconnecting" in log and "Traceback" not in log, log[-3000:]


def test_the_guest_domain_restarted_under_a_vm_writing_is_a_stall(vm_image: VmImage, run_dir: str) -> None:
    """Issue 12's last step: the guest domain itself SIGKILLed with a VM's write in flight and started
    again (same domid, same arguments) while QEMU waits (``reconnect=1``).  blkback is paused first, so
    the write the VM sent is in the dying guest domain's hands (popped, marked in QEMU's INFLIGHT_SHMFD
    area, waiting in blkfront).  The new process reconnects blkfront to blkback and serves the socket
    again; QEMU sends its set-up again with the same area; the new process finds the write there and
    serves it again.  The VM sees a stall: no error, every block where it belongs."""
    a = os.path.join(run_dir, "a.img")
    make_image(a, 16 << 20)
    disks = [VmDisk(51712, "xvda", a, os.path.join(run_dir, "exports", "xvda.sock"))]
    h = VmDiskHost(run_dir, disks)
    blocks, base = 96, 32
    try:
        with boot(vm_image, run_dir, disks) as vm:
            digest = start_write_loop(vm, blocks, base)
            wait_until(lambda: progress(vm) >= blocks // 4, WAIT, "the VM's write loop to get going")
            h.pause_blkback()
            seen: list[int] = []

            def stuck() -> bool:            # the loop no longer moves: its write waits in the guest domain
                seen.append(progress(vm))
                time.sleep(0.3)
                return len(seen) > 2 and seen[-1] == seen[-2] == seen[-3]
            wait_until(stuck, WAIT, "the VM's write loop to stall behind the paused blkback")
            h.kill_guest()
            h.mgmt.request("unpause", domid=h.be_domid)
            h.start_guest()
            assert wait_loop_done(vm, 120) == "DONE"
            assert seen[-1] < blocks
            back = vm.check(f"dd if=/dev/vda bs=64k skip={base} count={blocks} iflag=direct 2>/dev/null "
                            "| sha256sum").split()[0]
            assert back == digest
            assert dmesg_errors(vm) == ""
        assert file_sha(a, base * BLOCK, blocks * BLOCK) == digest
    finally:
        h.close()
    log = open(h.guest_log, errors="replace").read()
    assert "Traceback" not in log, log[-3000:]
    # the second guest domain process served the dead one's request again, from QEMU's area
    assert log.count("guest g1 is domain") == 2 and "the previous back end had in flight, served again" in log, log
