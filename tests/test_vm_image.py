"""The VM image the project builds, booted under TCG, with QEMU's own devices and a reference vhost-user-blk.

These are the foundations the vhost-user work stands on: if a VM with
QEMU's own virtio-blk cannot read back what it wrote, or one on
qemu-storage-daemon's vhost-user-blk cannot, a failure with xdom's back
end says nothing about xdom.  Each VM has one vCPU and is stopped by its
test; boots take ~3 s on an idle machine (more when the suite runs
alongside: TCG is CPU-bound), so the module stays near a minute.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import os
import pty
import re
import select
import shutil
import socket
import stat
import termios
import threading
import time
from collections.abc import Iterator

import pytest

from xdom.deploy.vm import accel as accel_mod
from xdom.deploy.vm.console import Console, ConsoleError, attach
from xdom.deploy.vm.cpio import CpioWriter, read_entries
from xdom.deploy.vm.image import ImageError, VmImage, ensure_image, resolve_modules
from xdom.deploy.vm.machine import RunningVm, boot_vm
from xdom.deploy.vm.qemu import (
    QemuProcess,
    VhostUserBlk,
    VhostUserNet,
    VmPaths,
    VmSpec,
    after_unplug,
    hotplug_blk,
    hotplug_net,
    own_virtio_blk,
    own_virtio_net,
    qemu_argv,
    unplug_device_id,
)
from xdom.deploy.vm.qmp import Qmp
from xdom.deploy.vm.reference import StorageDaemon

pytestmark = pytest.mark.timeout(180)

_built: dict[str, float] = {}


@pytest.fixture(scope="session")
def vm_image() -> VmImage:
    """The image, built once per run (and cached across runs); skipped where it cannot be made."""
    t0 = time.monotonic()
    try:
        img = ensure_image()
    except ImageError as e:
        pytest.skip(f"no VM image: {e}")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 missing (apt-get install qemu-system-x86)")
    _built["seconds"] = time.monotonic() - t0
    return img


def _boot(img: VmImage, run_dir: str, *append: str, **spec_kw: object) -> RunningVm:
    spec = VmSpec(kernel=str(img.kernel), initrd=str(img.initrd), append=img.append(*append), accel="tcg",
                  **spec_kw)  # type: ignore[arg-type]
    return boot_vm(spec, VmPaths.in_dir(run_dir), ready_timeout=90)


# ---------------------------------------------------------------- no VM

def test_cpio_writer_round_trips_and_is_what_the_kernel_expects() -> None:
    import io
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.file("/usr/bin/tool", b"abc", 0o755)              # parents emitted first, never implied
    w.symlink("bin/sh", "../bin/busybox")
    w.device("dev/console", "c", 5, 1)
    w.directory("usr")                                 # already there: no second entry
    w.close()
    data = buf.getvalue()
    assert len(data) % 4 == 0
    entries = read_entries(data)
    assert [e[0] for e in entries] == ["usr", "usr/bin", "usr/bin/tool", "bin", "bin/sh", "dev", "dev/console"]
    modes = {n: m for n, m, _ in entries}
    assert stat.S_ISDIR(modes["usr"]) and stat.S_ISLNK(modes["bin/sh"]) and stat.S_ISCHR(modes["dev/console"])
    assert dict((n, b) for n, _, b in entries)["usr/bin/tool"] == b"abc"
    # reproducible: the same entries give the same bytes
    buf2 = io.BytesIO()
    w2 = CpioWriter(buf2)
    w2.file("usr/bin/tool", b"abc", 0o755)
    w2.symlink("bin/sh", "../bin/busybox")
    w2.device("dev/console", "c", 5, 1)
    w2.close()
    assert buf2.getvalue() == data
    with pytest.raises(ValueError):
        CpioWriter(io.BytesIO()).file("../etc/passwd", b"")


def test_image_contents_and_cache(vm_image: VmImage) -> None:
    t0 = time.monotonic()
    again = ensure_image()
    took = time.monotonic() - t0
    assert again.cached and again.directory == vm_image.directory
    assert took < 2.0, f"a cached image took {took:.2f}s to find"
    print(f"\nimage: first call this run {_built.get('seconds', 0):.2f}s (cold build recorded as "
          f"{vm_image.build_seconds:.2f}s), cached call {took * 1000:.0f} ms, "
          f"initrd {vm_image.manifest['initrd_bytes'] / 1e6:.1f} MB")
    with open(vm_image.initrd, "rb") as f:
        entries = {n: (m, b) for n, m, b in read_entries(gzip.decompress(f.read()))}
    assert entries["init"][0] & 0o111 and b"XDOM-VM-READY" in entries["init"][1]
    assert stat.S_ISCHR(entries["dev/console"][0])
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"../bin/busybox"
    loaded = entries["etc/xdom/modules"][1].decode().split()
    assert loaded == list(vm_image.modules)
    for m in ("virtio_blk.ko", "virtio_net.ko", "virtio_pci.ko"):
        assert m in loaded or m[:-3] in vm_image.builtin
    for m in loaded:
        assert f"lib/modules/{m}" in entries


def test_modules_come_after_their_dependencies(vm_image: VmImage) -> None:
    order, _ = resolve_modules(vm_image.kernel_release)
    names = [p.rsplit("/", 1)[-1] for p in order]
    dep = {}
    with open(f"/lib/modules/{vm_image.kernel_release}/modules.dep") as f:
        for line in f:
            path, rest = line.split(":", 1)
            dep[path] = rest.split()
    for i, path in enumerate(order):
        for d in dep[path]:
            assert d in order[:i], f"{names[i]} before its dependency {d}"


def test_qemu_argv_for_vhost_user_devices() -> None:
    spec = VmSpec(kernel="/k", initrd="/i", append="console=ttyS0", cpus=2, memory="1G", name="vm1",
                  vhost_user_blk=[VhostUserBlk("/run/x/blk0.sock", num_queues=2)],
                  vhost_user_net=[VhostUserNet("/run/x/net0.sock", "52:54:00:00:00:01", queues=2),
                                  VhostUserNet("/run/x/net1.sock", "52:54:00:00:00:02")],
                  extra_args=["-S"])
    argv = qemu_argv(spec, VmPaths.in_dir("/run/x", "vm1"), "tcg")
    joined = " ".join(argv)
    assert "-machine q35,accel=tcg,memory-backend=mem" in joined
    assert "-object memory-backend-memfd,id=mem,size=1024M,share=on" in joined
    assert "-m 1024M" in joined and "-smp 2" in joined and "-cpu" not in argv
    assert "-chardev socket,id=blk0-sock,path=/run/x/blk0.sock,reconnect=1" in joined
    assert "-device vhost-user-blk-pci,id=blk0,chardev=blk0-sock,num-queues=2" in joined
    assert "-netdev vhost-user,id=net0,chardev=net0-sock,queues=2" in joined
    # under TCG no NIC has MSI-X, multi-queue or not (QEMU 7.2 crashes on a vhost-user-net MSI-X unmask)
    assert "-device virtio-net-pci,id=net0-dev,netdev=net0,mac=52:54:00:00:00:01,mq=on,vectors=0" in joined
    assert "-device virtio-net-pci,id=net1-dev,netdev=net1,mac=52:54:00:00:00:02,vectors=0" in joined
    assert "server=on,wait=off" in joined and "-mon chardev=qmp,mode=control" in joined
    assert argv[-1] == "-S" and "-no-reboot" in argv and "-nodefaults" in argv
    assert "pcie-root-port" not in joined                   # no hot-plug slots asked for: devices on the root bus
    kvm = qemu_argv(spec, VmPaths.in_dir("/r"), "kvm")
    assert "q35,accel=kvm,memory-backend=mem" in kvm and kvm[kvm.index("-cpu") + 1] == "host"
    # under KVM a multi-queue NIC has a vector per queue, plus config and control queue
    assert "virtio-net-pci,id=net0-dev,netdev=net0,mac=52:54:00:00:00:01,mq=on,vectors=6" in kvm
    assert "virtio-net-pci,id=net1-dev,netdev=net1,mac=52:54:00:00:00:02" in kvm
    # with hot-plug slots each device sits on a root port of its own (so it can be removed) and empty ones wait
    hp = qemu_argv(dataclasses.replace(spec, hotplug_slots=2), VmPaths.in_dir("/r"), "tcg")
    devices = [hp[i + 1] for i, a in enumerate(hp) if a == "-device"]
    assert devices == ["pcie-root-port,id=port-blk0,chassis=1,slot=0",
                       "vhost-user-blk-pci,id=blk0,chardev=blk0-sock,num-queues=2,bus=port-blk0",
                       "pcie-root-port,id=port-net0,chassis=2,slot=0",
                       "virtio-net-pci,id=net0-dev,netdev=net0,mac=52:54:00:00:00:01,mq=on,vectors=0,bus=port-net0",
                       "pcie-root-port,id=port-net1,chassis=3,slot=0",
                       "virtio-net-pci,id=net1-dev,netdev=net1,mac=52:54:00:00:00:02,vectors=0,bus=port-net1",
                       "pcie-root-port,id=hp0,chassis=4,slot=0", "pcie-root-port,id=hp1,chassis=5,slot=0"]
    with pytest.raises(ValueError):
        qemu_argv(spec, VmPaths.in_dir("/r"), "auto")
    with pytest.raises(ValueError):
        qemu_argv(VmSpec(kernel="/k", vhost_user_net=[VhostUserNet("/s", "nonsense")]), VmPaths.in_dir("/r"), "tcg")
    # commas in paths are doubled, as QEMU's option parser wants
    assert "path=/a,,b/blk" in " ".join(qemu_argv(VmSpec(kernel="/k", vhost_user_blk=[VhostUserBlk("/a,b/blk")]),
                                                  VmPaths.in_dir("/r"), "tcg"))


def test_qmp_commands_for_hot_plug_match_the_command_line() -> None:
    blk = hotplug_blk(VhostUserBlk("/r/x,b.sock", num_queues=2), "xvdb", "hp0", 1)
    assert blk == [("chardev-add", {"id": "xvdb-sock", "backend": {"type": "socket", "data": {
                       "addr": {"type": "unix", "data": {"path": "/r/x,b.sock"}}, "server": False, "reconnect": 1}}}),
                   ("device_add", {"driver": "vhost-user-blk-pci", "id": "xvdb", "chardev": "xvdb-sock",
                                   "num-queues": 2, "bus": "hp0"})]
    net = hotplug_net(VhostUserNet("/r/v.sock", "00:16:3e:00:00:01", queues=2), "vif1", "tcg", "hp1", 1)
    assert [c for c, _ in net] == ["chardev-add", "netdev_add", "device_add"]
    assert net[1][1] == {"type": "vhost-user", "id": "vif1", "chardev": "vif1-sock", "queues": 2}
    assert net[2][1] == {"driver": "virtio-net-pci", "id": "vif1-dev", "netdev": "vif1", "mac": "00:16:3e:00:00:01",
                         "mq": True, "vectors": 0, "bus": "hp1"}
    assert hotplug_net(VhostUserNet("/r/v.sock", "00:16:3e:00:00:01"), "vif1", "kvm", "hp1", 1)[2][1] == {
        "driver": "virtio-net-pci", "id": "vif1-dev", "netdev": "vif1", "mac": "00:16:3e:00:00:01", "bus": "hp1"}
    assert unplug_device_id("blk", "xvdb") == "xvdb" and unplug_device_id("net", "vif1") == "vif1-dev"
    assert after_unplug("net", "vif1") == [("netdev_del", {"id": "vif1"}), ("chardev-remove", {"id": "vif1-sock"})]
    assert after_unplug("blk", "xvdb") == [("chardev-remove", {"id": "xvdb-sock"})]
    with pytest.raises(ValueError):
        hotplug_net(VhostUserNet("/r/v.sock", "00:16:3e:00:00:01", queues=17), "vif1", "tcg", "hp1", 1)


def test_auto_accel_cheap_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDOM_VM_ACCEL", "tcg")
    c = accel_mod.choose_accel()
    assert c.accel == "tcg" and "XDOM_VM_ACCEL" in c.reason
    assert "no /nonexistent-kvm" in (accel_mod.kvm_device_problem("/nonexistent-kvm") or "")


# ------------------------------------------------------------------ VMs

def test_boot_under_tcg_and_run_commands(vm_image: VmImage, run_dir: str) -> None:
    with _boot(vm_image, run_dir) as vm:
        print(f"\nboot under {vm.accel}: {vm.boot_seconds:.2f}s to the first answer on the console")
        assert vm.console.ready_release in (None, vm_image.kernel_release)
        status, out = vm.run("uname -r")
        assert (status, out.strip()) == (0, vm_image.kernel_release)
        status, out = vm.run("cat /proc/cpuinfo | head")
        assert status == 0 and out.startswith("processor") and "QEMU" in out and len(out.splitlines()) == 10
        # exit status, stderr with stdout, binary output, a script longer than one console line
        assert vm.run("echo out; echo err >&2; exit 7") == (7, "out\nerr\n")
        st, raw = vm.console.run_bytes("printf '\\000\\377XDOM-END x 0\\n'")
        assert (st, raw) == (0, b"\x00\xffXDOM-END x 0\n")
        long = "echo " + "y" * 5000 + " | wc -c"
        assert vm.run(long) == (0, "5001\n")
        # the guest's view of what we asked for
        assert vm.check("grep -c ^processor /proc/cpuinfo").strip() == "1"
        assert vm.check("lsmod | cut -d' ' -f1").split()  # modules loaded
        assert not vm.console.warnings, vm.console.warnings
        with Qmp(vm.paths.qmp) as m:
            assert m.status() == "running"
        with pytest.raises(ConsoleError):
            vm.run("sleep 5", timeout=0.5)
        assert vm.run("echo after-timeout") == (0, "after-timeout\n")   # the late answer is skipped
        # a person: `xdom console` on a terminal, a line typed, Ctrl-] to leave
        vm.console.close()                     # QEMU serves one console client at a time
        _attach_and_type(vm.paths.console)
        vm.console = Console(vm.paths.console)
        vm.console.wait_ready(30)
        vm.console.poweroff()
        deadline = time.monotonic() + 30
        while vm.qemu.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert vm.qemu.poll() == 0, "QEMU did not exit on the VM's poweroff"
    with open(vm.paths.console_log, errors="replace") as f:
        assert "XDOM-VM-READY" in f.read()


def _attach_and_type(console_path: str) -> None:
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    result: dict[str, int] = {}
    th = threading.Thread(target=lambda: result.setdefault("rc", attach(console_path, "vm", slave, slave)),
                          daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 10
        while termios.tcgetattr(slave)[3] & termios.ICANON:       # raw mode set: keys go through as typed
            assert time.monotonic() < deadline and th.is_alive(), "attach did not put the terminal in raw mode"
            time.sleep(0.01)
        os.write(master, b"echo $((6*7))\n")
        seen = b""
        while not re.search(rb"(^|\n)42\r?\n", seen):
            assert time.monotonic() < deadline + 20, f"no answer through attach: {seen!r}"
            r, _, _ = select.select([master], [], [], 1)
            if r:
                seen += os.read(master, 4096)
        assert b"Connected to vm; escape character is ^]" in seen
        os.write(master, b"\x1d")                                   # Ctrl-]
        th.join(10)
        assert not th.is_alive() and result["rc"] == 0
        assert termios.tcgetattr(slave) == before, "attach left the terminal raw"
    finally:
        th.join(1)
        os.close(master)
        os.close(slave)


def test_attach_keeps_keys_typed_before_raw_mode(tmp_path: pytest.TempPathFactory) -> None:
    """Keys typed before raw mode is set reach the VM: attach does not flush them (a line typed at once after
    the banner used to be echoed by the still-cooked terminal, then thrown away, and the session hung)."""
    path = os.path.join(str(tmp_path), "console.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    master, slave = pty.openpty()
    os.write(master, b"typed-ahead\r")                    # before attach: in the cooked terminal's queue
    result: dict[str, int] = {}
    th = threading.Thread(target=lambda: result.setdefault("rc", attach(path, "vm", slave, slave)), daemon=True)
    th.start()
    try:
        conn, _ = srv.accept()
        conn.settimeout(10)
        got = b""
        while b"typed-ahead" not in got:
            chunk = conn.recv(4096)
            assert chunk, got
            got += chunk
        seen = b""
        while b"escape character is ^]" not in seen:
            assert select.select([master], [], [], 10)[0], seen
            seen += os.read(master, 4096)
        os.write(master, b"\x1d")
        th.join(10)
        assert result["rc"] == 0
        conn.close()
    finally:
        th.join(1)
        srv.close()
        os.close(master)
        os.close(slave)


def test_one_shot_command_from_the_kernel_command_line(vm_image: VmImage, run_dir: str) -> None:
    """What the accel probe relies on: xdom.cmd runs, reports, and xdom.poweroff=1 ends QEMU."""
    paths = VmPaths.in_dir(run_dir)
    cmd = base64.b64encode(b"echo one-shot; exit 3").decode()
    spec = VmSpec(kernel=str(vm_image.kernel), initrd=str(vm_image.initrd),
                  append=vm_image.append(f"xdom.cmd={cmd}", "xdom.poweroff=1"), accel="tcg")
    q = QemuProcess(qemu_argv(spec, paths, "tcg"), paths, "tcg")
    try:
        q.proc.wait(90)
    finally:
        q.stop()
    assert q.proc.returncode == 0, q.log_text()
    with open(paths.console_log) as f:
        log = f.read()
    assert "XDOM-END cmdline 3" in log
    out = b"".join(base64.b64decode(line.split()[2]) for line in log.splitlines()
                   if line.startswith("XDOM-OUT cmdline "))
    assert out == b"one-shot\n"


def _write_read_back(vm: RunningVm, offset_blocks: int = 16, count: int = 16) -> str:
    """Write 1 MiB of random data to /dev/vda with O_DIRECT, drop caches, read it back; its sha256."""
    out = vm.check(
        "head -c 1048576 /dev/urandom > /tmp/x && sha256sum /tmp/x | cut -d' ' -f1 && "
        f"dd if=/tmp/x of=/dev/vda bs=65536 seek={offset_blocks} oflag=direct conv=fsync 2>/dev/null && "
        "echo 3 > /proc/sys/vm/drop_caches && "
        f"dd if=/dev/vda bs=65536 skip={offset_blocks} count={count} iflag=direct 2>/dev/null "
        "| sha256sum | cut -d' ' -f1", timeout=120)
    written, read = out.split()
    assert written == read, "the VM read back other data than it wrote"
    return written


def _file_sha(path: str, offset: int, length: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).hexdigest()


@pytest.fixture(scope="session")
def fio_image(vm_image: VmImage) -> VmImage:
    try:
        return ensure_image(fio=True)
    except ImageError as e:
        pytest.skip(f"no fio image: {e}")


def test_qemu_virtio_blk_on_a_raw_file_with_fio(fio_image: VmImage, run_dir: str) -> None:
    """The image's block drivers with QEMU's own virtio-blk, and the fio layer (its libraries all resolve)."""
    disk = os.path.join(run_dir, "disk.raw")
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    with _boot(fio_image, run_dir, memory=fio_image.min_memory_mib,
               extra_args=own_virtio_blk(disk, cache="writeback")) as vm:
        assert vm.check("cat /sys/block/vda/size").strip() == str((64 << 20) // 512)
        digest = _write_read_back(vm)
        # fio writes 4 MiB at 32 MiB with checksums in every block, then reads and verifies them
        st, out = vm.run("fio --name=v --filename=/dev/vda --offset=32M --size=4M --bs=4k --rw=randwrite "
                         "--ioengine=libaio --iodepth=8 --direct=1 --verify=crc32c --do_verify=1 "
                         "--output-format=terse", timeout=120)
        assert st == 0, out
        fields = out.strip().splitlines()[-1].split(";")
        assert fields[1].startswith("fio-") and fields[4] == "0", out           # terse: version, ..., error
    assert _file_sha(disk, 16 * 65536, 1 << 20) == digest


def test_qemu_virtio_net_user_mode(vm_image: VmImage, run_dir: str) -> None:
    """The image's network drivers: ping QEMU's user-mode gateway, then TCP both ways with the host.

    ``-netdev user`` needs no network outside this machine: slirp answers
    the gateway's pings itself and turns the VM's connections to 10.0.2.2
    into connections to 127.0.0.1.
    """
    payload = os.urandom(512 * 1024)
    got: dict[str, str] = {}
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(2)
    srv.settimeout(60)
    port = srv.getsockname()[1]

    def serve() -> None:
        try:
            c, _ = srv.accept()          # first: we send the payload to the VM
            with c:
                c.sendall(payload)
            c, _ = srv.accept()          # then: the VM sends it back to us
            with c:
                buf = b""
                while len(buf) < len(payload):
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                got["back"] = hashlib.sha256(buf).hexdigest()
        except OSError as e:
            got["error"] = repr(e)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with _boot(vm_image, run_dir, "xdom.ip=10.0.2.15/24", "xdom.gw=10.0.2.2",
                   extra_args=own_virtio_net("user", "52:54:00:12:34:56")) as vm:
            assert vm.check("cat /sys/class/net/eth0/address").strip() == "52:54:00:12:34:56"
            assert "10.0.2.15/24" in vm.check("ip -o -4 addr show eth0")
            st, out = vm.run("ping -c 2 -W 5 10.0.2.2", timeout=30)
            assert st == 0 and "2 packets received" in out, out
            digest = vm.check(f"nc 10.0.2.2 {port} > /tmp/p && sha256sum /tmp/p | cut -d' ' -f1", 60).strip()
            assert digest == hashlib.sha256(payload).hexdigest()
            vm.check(f"nc 10.0.2.2 {port} < /tmp/p", 60)
            t.join(30)
            assert got.get("back") == digest, got
    finally:
        srv.close()
        t.join(5)


@pytest.fixture
def storage_daemon_disk(run_dir: str) -> Iterator[tuple[str, StorageDaemon]]:
    if shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon missing (Debian package qemu-system-common, which qemu-system-x86 pulls in)")
    disk = os.path.join(run_dir, "qsd.raw")
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    with StorageDaemon(disk, os.path.join(run_dir, "qsd.sock"), os.path.join(run_dir, "qsd.log")) as qsd:
        yield disk, qsd


def test_vhost_user_blk_with_qemu_storage_daemon(vm_image: VmImage, run_dir: str,
                                                 storage_daemon_disk: tuple[str, StorageDaemon]) -> None:
    """The reference vhost-user-blk back end: what xdom's own will be compared with."""
    disk, qsd = storage_daemon_disk
    with _boot(vm_image, run_dir, vhost_user_blk=[VhostUserBlk(qsd.socket)]) as vm:
        assert vm.check("cat /sys/block/vda/size").strip() == str((64 << 20) // 512)
        assert vm.check("cat /sys/block/vda/queue/logical_block_size").strip() == "512"
        digest = _write_read_back(vm, offset_blocks=100)
    assert _file_sha(disk, 100 * 65536, 1 << 20) == digest
