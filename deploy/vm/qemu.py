"""QEMU command lines for xdom VMs, and the QEMU process that runs one.

A VM's disks and NICs are vhost-user devices its guest domain serves, so
the command line always has what vhost-user needs, whatever devices the VM
has now (a disk may be hot-attached later):

* guest RAM is one shared memfd (``-object memory-backend-memfd,...,share=on``
  as the machine's ``memory-backend``): the back end maps the regions QEMU
  passes in SET_MEM_TABLE, which only works for shared, fd-backed memory;
* each device's socket is a client chardev with ``reconnect=N``, so QEMU
  waits for a restarted guest domain instead of failing the device;
* the serial console is a unix socket QEMU serves (``server=on,wait=off``)
  with everything the VM prints also appended to a log file, and QMP is a
  second unix socket, for the supervisor.

``-nodefaults -display none -no-reboot``: no devices but the ones named
here, no window, and a guest reboot (or panic, the image boots with
``panic=-1``) ends QEMU, so the supervisor sees it and applies the
restart policy.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import IO

QEMU = "qemu-system-x86_64"
ACCELS = ("kvm", "tcg", "auto")


@dataclasses.dataclass
class VhostUserBlk:
    """A vhost-user-blk disk: the guest domain listens on ``socket``."""

    socket: str
    num_queues: int = 1
    id: str | None = None


@dataclasses.dataclass
class VhostUserNet:
    """A vhost-user-net NIC with ``queues`` queue pairs and the vif's MAC."""

    socket: str
    mac: str
    queues: int = 1
    id: str | None = None


@dataclasses.dataclass
class VmSpec:
    """What a ``[domain.vm]`` table says: the VM itself, not where its sockets live."""

    kernel: str
    initrd: str | None = None
    append: str = ""
    cpus: int = 1
    memory: str | int = "256M"           # QEMU's -m syntax; an int is MiB
    accel: str = "auto"                  # "kvm" | "tcg" | "auto" (see accel.py)
    vhost_user_blk: list[VhostUserBlk] = dataclasses.field(default_factory=list)
    vhost_user_net: list[VhostUserNet] = dataclasses.field(default_factory=list)
    extra_args: list[str] = dataclasses.field(default_factory=list)
    name: str = "vm"
    reconnect: int = 1                   # seconds between QEMU's attempts to reach a device socket
    sandbox: bool = False                # QEMU's own seccomp filter (-sandbox on, no spawning, no new privileges)
    hotplug_slots: int = 0               # empty PCIe root ports for devices added later (each device then on its own)


@dataclasses.dataclass
class VmPaths:
    """Where one VM's control files live (unix socket paths: keep them short)."""

    console: str
    qmp: str
    console_log: str
    qemu_log: str

    @classmethod
    def in_dir(cls, run_dir: str, name: str = "vm") -> VmPaths:
        j = os.path.join
        return cls(console=j(run_dir, f"{name}.con"), qmp=j(run_dir, f"{name}.qmp"),
                   console_log=j(run_dir, f"{name}.console.log"), qemu_log=j(run_dir, f"{name}.qemu.log"))


_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def memory_mib(memory: str | int) -> int:
    """``256M``, ``1G``, ``512`` (MiB, as QEMU reads a bare -m number) -> MiB."""
    if isinstance(memory, int):
        return memory
    m = re.fullmatch(r"\s*(\d+)\s*([MmGg]?)(i?[Bb])?\s*", memory)
    if not m:
        raise ValueError(f"memory {memory!r}: want e.g. 256M or 1G")
    n = int(m.group(1))
    return n * 1024 if m.group(2).lower() == "g" else n


def _opt(value: str) -> str:
    """A value inside a QEMU option list: commas are doubled, as QEMU's parser wants."""
    return value.replace(",", ",,")


# QEMU's -sandbox: its own seccomp filter, with everything a VM with vhost-user devices does not need denied.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
CONSOLE_LOG_FDSET = 1


def qemu_argv(spec: VmSpec, paths: VmPaths, accel: str, qemu: str = QEMU,
              console_log_fd: int | None = None) -> list[str]:
    """The whole QEMU command line for ``spec`` with ``accel`` already resolved ("kvm" or "tcg").

    With ``console_log_fd`` (a descriptor open for appending, which QEMU
    inherits) the console is logged there instead of to
    ``paths.console_log``: QEMU reaches it as an fd set (``-add-fd``), so
    a QEMU running under a guest's uid logs into a file it could not open.
    """
    if accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be resolved to kvm or tcg here, not {accel!r}")
    mib = memory_mib(spec.memory)
    argv = [qemu, "-name", _opt(spec.name),
            "-machine", f"q35,accel={accel},memory-backend=mem",
            "-object", f"memory-backend-memfd,id=mem,size={mib}M,share=on",
            "-m", f"{mib}M", "-smp", str(spec.cpus)]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    argv += ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-msg", "timestamp=on"]
    if spec.sandbox:
        argv += ["-sandbox", SANDBOX]
    argv += ["-kernel", spec.kernel]
    if spec.initrd:
        argv += ["-initrd", spec.initrd]
    if spec.append:
        argv += ["-append", spec.append]
    if console_log_fd is not None:
        argv += ["-add-fd", f"fd={console_log_fd},set={CONSOLE_LOG_FDSET},opaque=console-log"]
        logfile = f"/dev/fdset/{CONSOLE_LOG_FDSET}"
    else:
        logfile = paths.console_log
    argv += ["-chardev", f"socket,id=con,path={_opt(paths.console)},server=on,wait=off,"
                         f"logfile={_opt(logfile)},logappend=on",
             "-serial", "chardev:con",
             "-chardev", f"socket,id=qmp,path={_opt(paths.qmp)},server=on,wait=off",
             "-mon", "chardev=qmp,mode=control"]
    ports = spec.hotplug_slots > 0
    if ports and len(spec.vhost_user_blk) + len(spec.vhost_user_net) + spec.hotplug_slots > MAX_ROOT_PORTS:
        raise ValueError(f"more than {MAX_ROOT_PORTS} PCIe root ports (devices plus hot-plug slots)")
    chassis = 0

    def port_for(dev_id: str) -> str | None:
        nonlocal chassis
        if not ports:
            return None
        chassis += 1
        argv.extend(["-device", root_port(boot_port(dev_id), chassis)])
        return boot_port(dev_id)
    for i, d in enumerate(spec.vhost_user_blk):
        did = d.id or f"blk{i}"
        if d.num_queues < 1:
            raise ValueError(f"{did}: num_queues must be >= 1")
        bus = port_for(did)
        argv += ["-chardev", socket_chardev(f"{did}-sock", d.socket, spec.reconnect),
                 "-device", device_arg(blk_device(d, did, bus))]
    for i, n in enumerate(spec.vhost_user_net):
        nid = n.id or f"net{i}"
        check_net(n, nid)
        bus = port_for(nid)
        argv += ["-chardev", socket_chardev(f"{nid}-sock", n.socket, spec.reconnect),
                 "-netdev", f"vhost-user,id={nid},chardev={nid}-sock,queues={n.queues}",
                 "-device", device_arg(net_device(n, nid, accel, bus))]
    for k in range(spec.hotplug_slots):
        chassis += 1
        argv += ["-device", root_port(hotplug_port(k), chassis)]
    return argv + list(spec.extra_args)


# ---- vhost-user devices: the same properties on the command line and over QMP (hot-plug) -----------
#
# With ``VmSpec.hotplug_slots`` each vhost-user device sits on a PCIe root port of its own (``port-ID``),
# so it can be removed while the VM runs (a device on q35's root bus cannot), and that many empty root
# ports (``hpN``) wait for devices added later.  The VM's kernel takes them with ACPI PCI hot-plug
# (QEMU 7.2's default on q35's root ports): a device_add is seen in well under a second, and a device_del
# is granted by the VM's kernel once its driver let go (QEMU then sends DEVICE_DELETED).

def boot_port(dev_id: str) -> str:
    """The root port of a device present at boot."""
    return f"port-{dev_id}"


def hotplug_port(k: int) -> str:
    """The ``k``-th empty root port kept for hot-plugged devices."""
    return f"hp{k}"


def root_port(bus: str, chassis: int) -> str:
    """A ``pcie-root-port`` (each needs a chassis number of its own, 1..255)."""
    return f"pcie-root-port,id={bus},chassis={chassis},slot=0"


def socket_chardev(chardev_id: str, path: str, reconnect: int) -> str:
    """A client socket chardev that keeps trying ``path`` every ``reconnect`` seconds (a restarting back end)."""
    return f"socket,id={chardev_id},path={_opt(path)},reconnect={reconnect}"


def check_net(n: VhostUserNet, nid: str) -> None:
    if not _MAC.match(n.mac):
        raise ValueError(f"{nid}: bad MAC {n.mac!r}")
    if not 1 <= n.queues <= MAX_NET_QUEUES:
        raise ValueError(f"{nid}: queues must be between 1 and {MAX_NET_QUEUES}")


MAX_NET_QUEUES = 16      # the guest domain's most queue pairs (netfront's most netif queues)
MAX_ROOT_PORTS = 32      # each takes a PCI bus number and bridge windows; far more than a VM here needs


Device = tuple[str, dict[str, object]]        # (driver, properties): one -device value or one device_add


def blk_device(d: VhostUserBlk, did: str, bus: str | None = None) -> Device:
    """A vhost-user-blk disk's ``vhost-user-blk-pci``."""
    props: dict[str, object] = {"id": did, "chardev": f"{did}-sock", "num-queues": d.num_queues}
    if bus is not None:
        props["bus"] = bus
    return "vhost-user-blk-pci", props


def net_device(n: VhostUserNet, nid: str, accel: str, bus: str | None = None) -> Device:
    """A vhost-user NIC's ``virtio-net-pci``.

    Under TCG the NIC has no MSI-X (``vectors=0``, INTx): QEMU 7.2 under TCG
    dereferences a missing irqfd table (SIGSEGV) when a vhost-user-net
    device's MSI-X vectors are unmasked (virtio_pci_vector_unmask ->
    kvm_virtio_pci_irqfd_use), whatever its queue count.  Under KVM a
    multi-queue NIC gets a vector per queue plus config and control queue,
    as QEMU's docs advise.
    """
    props: dict[str, object] = {"id": f"{nid}-dev", "netdev": nid, "mac": n.mac}
    if n.queues > 1:
        props["mq"] = True
    if accel == "tcg":
        props["vectors"] = 0
    elif n.queues > 1:
        props["vectors"] = 2 * n.queues + 2
    if bus is not None:
        props["bus"] = bus
    return "virtio-net-pci", props


def device_arg(dev: Device) -> str:
    """A ``-device`` value."""
    driver, props = dev
    return ",".join([driver, *(f"{k}={_flag(v)}" for k, v in props.items())])


def _flag(v: object) -> str:
    return "on" if v is True else "off" if v is False else _opt(str(v))


def device_add_args(dev: Device) -> dict[str, object]:
    """QMP ``device_add`` arguments (typed values: QEMU reads JSON device properties by their types)."""
    driver, props = dev
    return {"driver": driver, **props}


def chardev_add_args(chardev_id: str, path: str, reconnect: int) -> dict[str, object]:
    """QMP ``chardev-add`` for :func:`socket_chardev`."""
    return {"id": chardev_id, "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": path}}, "server": False, "reconnect": reconnect}}}


def hotplug_blk(d: VhostUserBlk, did: str, bus: str, reconnect: int) -> list[tuple[str, dict[str, object]]]:
    """The QMP commands that add a vhost-user-blk disk to a running VM, in order."""
    return [("chardev-add", chardev_add_args(f"{did}-sock", d.socket, reconnect)),
            ("device_add", device_add_args(blk_device(d, did, bus)))]


def hotplug_net(n: VhostUserNet, nid: str, accel: str, bus: str, reconnect: int) -> list[tuple[str, dict[str, object]]]:
    """The QMP commands that add a vhost-user-net NIC to a running VM, in order."""
    check_net(n, nid)
    return [("chardev-add", chardev_add_args(f"{nid}-sock", n.socket, reconnect)),
            ("netdev_add", {"type": "vhost-user", "id": nid, "chardev": f"{nid}-sock", "queues": n.queues}),
            ("device_add", device_add_args(net_device(n, nid, accel, bus)))]


def unplug_device_id(kind: str, dev_id: str) -> str:
    """The id device_del takes (and DEVICE_DELETED names): a disk's own id, a NIC's ``ID-dev``."""
    return dev_id if kind == "blk" else f"{dev_id}-dev"


def after_unplug(kind: str, dev_id: str) -> list[tuple[str, dict[str, object]]]:
    """What goes once the VM let go of the device (DEVICE_DELETED): its netdev, then its chardev."""
    cmds: list[tuple[str, dict[str, object]]] = []
    if kind == "net":
        cmds.append(("netdev_del", {"id": dev_id}))
    cmds.append(("chardev-remove", {"id": f"{dev_id}-sock"}))
    return cmds


# QEMU's own devices, for comparing against (tests, benchmarks): not what xdom serves.

def own_virtio_blk(path: str, id: str = "d0", fmt: str = "raw", readonly: bool = False,
                   cache: str = "none") -> list[str]:
    """Extra args for QEMU's own virtio-blk on an image file (``cache=none``: O_DIRECT, like a real disk)."""
    ro = ",read-only=on" if readonly else ""
    return ["-blockdev", f"driver=file,node-name={id}-file,filename={_opt(path)},"
                         f"cache.direct={'on' if cache == 'none' else 'off'}{ro}",
            "-blockdev", f"driver={fmt},node-name={id},file={id}-file{ro}",
            "-device", f"virtio-blk-pci,drive={id},id={id}-dev"]


def own_virtio_net(netdev: str, mac: str, id: str = "n0") -> list[str]:
    """Extra args for QEMU's own virtio-net on a netdev such as ``user`` or ``socket,listen=...``."""
    return ["-netdev", f"{netdev},id={id}", "-device", f"virtio-net-pci,netdev={id},mac={mac}"]


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM to a QEMU program, then SIGKILL after ``timeout``; its exit status, reaped."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class QemuProcess:
    """One running QEMU: its argv, its files, and a stop that always reaps it.

    QEMU's stdout and stderr go to ``paths.qemu_log`` (accelerator errors
    such as "KVM internal error" are printed there).  QEMU ends its own
    process group so a signal to the supervisor's group does not reach it.
    """

    def __init__(self, argv: Sequence[str], paths: VmPaths, accel: str, accel_reason: str = "") -> None:
        self.argv = list(argv)
        self.paths = paths
        self.accel = accel
        self.accel_reason = accel_reason
        for p in (paths.console, paths.qmp):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        self._log: IO[bytes] = open(paths.qemu_log, "ab")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def log_text(self) -> str:
        """What QEMU itself printed so far."""
        try:
            with open(self.paths.qemu_log, "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_socket(self, path: str, timeout: float = 10.0) -> None:
        """Wait until QEMU has created ``path`` (it does before the guest runs); fail if QEMU exits."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {self.proc.returncode}: {self.log_text().strip()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"QEMU did not create {path} within {timeout}s")
            time.sleep(0.01)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM (QEMU exits cleanly on it), then SIGKILL after ``timeout``; returns the exit status."""
        rc = terminate(self.proc, timeout)
        self._log.close()
        return rc

    def __enter__(self) -> QemuProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

