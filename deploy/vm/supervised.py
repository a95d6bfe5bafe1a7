"""A guest's VM, supervised beside its guest domain: QEMU is a process of the host like any domain.

A guest with a ``[domain.vm]`` table is two processes: its **guest domain**
(``python -m xdom.domains.guest``, which runs blkfront/netfront and serves
them on vhost-user sockets in its export directory) and its **VMM**
(``qemu-system-x86_64``, which connects to those sockets).  The supervisor
runs them in that order and this module does the VMM's half:

* **Start.**  Once the guest domain is ready (its sockets listen), QEMU is
  started under the guest's uid, in the guest's network namespace, through
  ``domain_exec`` (no core file, ``limits.fds`` as ``RLIMIT_NOFILE``; no
  parent-death signal: a VM outlives its supervisor, and the next one adopts
  it), with QEMU's own seccomp sandbox, every device socket a
  ``reconnect=1`` client chardev, the serial console and QMP on unix sockets
  in ``RUN_DIR/vms/GUEST/`` (root's, 0700, an ACL giving the guest's uid
  rwx; the guest domain's Landlock does not reach it), its output in
  ``STATE_DIR/logs/GUEST-vm.log`` and the console's in
  ``STATE_DIR/logs/GUEST-console.log`` (both opened by the supervisor and
  handed over: QEMU's uid cannot open the logs directory).  ``/dev/kvm`` is
  reached through its group, added to QEMU's groups for KVM only.  The VM is
  running once QMP answers ``query-status`` with ``running`` (QEMU connects
  to every vhost-user socket before its main loop serves QMP); the
  supervisor keeps that QMP connection, so it hears ``STOP`` and learns from
  ``query-status`` when KVM stopped the VM on an internal error, which is a
  crash.  The guest's start (``xdom up``) waits for it.
* **Deaths.**  QEMU exiting is the VM crashing (or powering off: ``-no-reboot``
  makes a reboot or a panic exit QEMU too): it is restarted by the guest's
  restart policy, with its own backoff and flap count.  The guest domain
  dying is the guest domain's business: it is restarted by the same policy
  while QEMU waits for its sockets (``reconnect=1``) and carries on; a guest
  domain that stays down takes the VM with it (powered off: its devices are
  gone).  A VM over its ``vm.limits`` is killed and restarted like a domain.
* **Stop.**  Before its guest domain, always: QMP ``system_powerdown`` (the
  project's image powers off at once on the ACPI power button), a grace
  period, then ``quit``, then SIGKILL.  A VM that stays down leaves nothing:
  its console and QMP sockets and their directory go.
* **Adoption.**  A supervisor adopting the host (``deploy/adopt.py``) finds
  each QEMU by pid and start time, watches it through a pidfd and connects
  to its QMP socket again (believed only when ``SO_PEERCRED`` names that
  QEMU).  An adopted QEMU is not the supervisor's child: its exit status is
  unknown, and its exit counts as a clean power-off only when QMP reported
  ``SHUTDOWN`` first.

Nothing here waits in the supervisor's loop except :meth:`VmSupervisor.stop_now`,
which the host's shutdown calls (it is blocking, like the domains' stop).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import psutil

from .. import host_state, netns
from ..access import AccessError, private_dir
from ..control import ControlError
from ..host_state import AdoptedProcess
from ..isolation import DOMAIN_EXEC
from ..policy import Action, ExitStatus, HealthCheck, HealthSample, RestartTracker
from ..rundir import VMS_DIR  # RUN_DIR/vms/GUEST/: a VM's console and QMP sockets, made by its QEMU
from ..topology import DomainSpec, Topology, TopologyError, VmConfig, vif_devids, vif_queues
from ..xlcfg import EXPORT_VHOST_USER, MAX_UNIX_PATH, default_export, default_vif_export
from .qemu import (
    QEMU,
    SANDBOX,
    VhostUserBlk,
    VhostUserNet,
    VmPaths,
    VmSpec,
    after_unplug,
    boot_port,
    hotplug_blk,
    hotplug_net,
    hotplug_port,
    qemu_argv,
    unplug_device_id,
)

if TYPE_CHECKING:
    from ..rundir import Layout
    from .image import VmImage

__all__ = ["VMS_DIR", "VmPlan", "VmState", "VmSupervisor", "check_vms", "plan_vms", "vm_paths"]

log = logging.getLogger("xdom.supervisor")

QMP_RETRY = 0.05            # seconds between tries to reach a starting QEMU's QMP socket
QUIT_GRACE = 2.0            # seconds between QMP quit (or SIGTERM) and SIGKILL
QMP_LINE_LIMIT = 1 << 20    # a QMP message longer than this ends the connection (QEMU is the VM's side)
# A NIC under TCG has no MSI-X (qemu.net_device: QEMU 7.2 crashes otherwise); -global covers any virtio-net-pci
# a user adds in extra_args too.
TCG_NET_ARGS = ("-global", "virtio-net-pci.vectors=0")
HOTPLUG_SLOTS = 4           # empty PCIe root ports a VM keeps for hot-added disks and NICs
PLUG_TIMEOUT = 60.0         # seconds the guest domain has to serve a hot-added device's socket
SOCKET_POLL = 0.05          # seconds between looks for that socket
_FAILED_STATUS = ("internal-error", "guest-panicked", "shutdown")   # a VM stopped in one of these is dead


class VmState(StrEnum):
    PENDING = "pending"        # not started yet: waiting for its guest domain
    STARTING = "starting"      # QEMU started, QMP has not said "running" yet
    RUNNING = "running"
    STOPPING = "stopping"      # powering off (system_powerdown, then quit, then SIGKILL)
    BACKOFF = "backoff"        # crashed; restarted after a delay (or once its guest domain is back)
    EXITED = "exited"          # its restart policy leaves it down
    FAILED = "failed"          # flapping, or could not be started
    STOPPED = "stopped"        # powered off by the toolstack


_ALIVE = (VmState.STARTING, VmState.RUNNING, VmState.STOPPING)


def vm_paths(layout: Layout, guest: str) -> VmPaths:
    """Where ``guest``'s VM keeps its sockets (``RUN_DIR/vms/GUEST/``) and logs (``STATE_DIR/logs``)."""
    folder = os.path.join(layout.vms_dir, guest)
    return VmPaths(console=os.path.join(folder, "console.sock"), qmp=os.path.join(folder, "qmp.sock"),
                   console_log=layout.log_path(f"{guest}-console"), qemu_log=layout.log_path(f"{guest}-vm"))


# ---- what a VM will run: checked before anything starts -------------------------------------------

@dataclass(frozen=True)
class VmPlan:
    """A VM guest's resolved VM: the files it boots, its command line, the accelerator and why."""

    kernel: str
    initrd: str | None
    append: str
    accel: str
    accel_reason: str
    own_image: bool
    qemu: str


def _mem_total_mib() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) >> 10
    except (OSError, ValueError, IndexError):
        pass
    return None


def _append_for(spec: DomainSpec, vm: VmConfig, img: VmImage | None) -> str:
    """The VM's kernel command line.  The project's image gets the vifs' addresses (``xdom.ip=``, in order,
    up to the first vif without one) and the guest's name as host name, then ``append``."""
    if img is None:
        return vm.append if vm.append is not None else "console=ttyS0 panic=-1"
    ips = []
    for _, vif in vif_devids(spec.vifs):
        if vif.ip is None:
            break
        ips.append(str(vif.ip))
    extra = [f"xdom.hostname={spec.name}"] + ([f"xdom.ip={','.join(ips)}"] if ips else [])
    return img.append(*extra, vm.append or "")


def plan_vms(topology: Topology, *, resolve_accel: bool = True) -> tuple[dict[str, VmPlan], list[str]]:
    """Each VM guest's plan, and every reason one cannot work (each naming the topology key).

    Not pure: builds (or finds) the project's image, looks for QEMU and
    ``/dev/kvm``, and for ``accel = "auto"`` boots the cached KVM probe
    (:func:`xdom.deploy.vm.accel.choose_accel`) once per host.
    """
    from .accel import choose_accel, kvm_device_problem
    from .image import ImageError, ensure_image
    plans: dict[str, VmPlan] = {}
    problems: list[str] = []
    guests = [d for d in topology.domains if d.vm is not None]
    if not guests:
        return plans, problems
    src = topology.source

    def problem(d: DomainSpec, key: str, text: str) -> None:
        problems.append(f"{src}: {d.label}.{key}: {text}" if key else f"{src}: {d.label}: {text}")

    qemu = shutil.which(QEMU)
    if qemu is None:
        for d in guests:
            problem(d, "vm", f"{QEMU} is not installed (Debian package qemu-system-x86): nothing can run the VM")
        return plans, problems
    total = _mem_total_mib()
    for d in guests:
        vm = d.vm
        assert vm is not None
        img = None
        kernel, initrd = vm.kernel, vm.initrd
        if vm.own_image:
            try:
                img = ensure_image(fio=vm.fio)
            except ImageError as e:
                problem(d, "vm", f"the project's VM image cannot be made: {e}; or give kernel (and initrd) of "
                                 f"your own")
                continue
            kernel, initrd = str(img.kernel), str(img.initrd)
            if vm.memory_mib < img.min_memory_mib:
                problem(d, "vm.memory", f"{vm.memory_mib} MiB is less than the {img.min_memory_mib} MiB the "
                                        f"project's image{' with fio' if vm.fio else ''} needs (its kernel unpacks "
                                        f"the whole initramfs into RAM, then runs from it)")
        else:
            for key, path in (("kernel", kernel), ("initrd", initrd)):
                if path is None:
                    continue
                try:
                    st = os.stat(path)
                except OSError as e:
                    problem(d, f"vm.{key}", f"{path}: {e.strerror}")
                    continue
                if not stat.S_ISREG(st.st_mode):
                    problem(d, f"vm.{key}", f"{path} is not a file")
        if total is not None and vm.memory_mib > total:
            problem(d, "vm.memory", f"{vm.memory_mib} MiB is more than this host's memory ({total} MiB): the "
                                    f"VM's RAM is one shared memfd that QEMU and the guest domain map whole")
        accel, reason = vm.accel, "asked for in the topology"
        if vm.accel == "kvm":
            why = kvm_device_problem()
            if why is not None:
                problem(d, "vm.accel", f"\"kvm\" cannot work here: {why}; use \"tcg\" or \"auto\"")
        elif vm.accel == "auto" and resolve_accel:
            choice = choose_accel(qemu=qemu)
            accel, reason = choice.accel, f"auto: {choice.reason}"
        assert kernel is not None
        plans[d.name] = VmPlan(kernel, initrd, _append_for(d, vm, img), accel, reason, img is not None, qemu)
    total_vms = sum(d.vm.memory_mib for d in guests if d.vm is not None)
    if total is not None and len(guests) > 1 and total_vms > total:
        problems.append(f"{src}: the VMs' memory adds up to {total_vms} MiB, more than this host's {total} MiB")
    return plans, problems


def check_vms(topology: Topology, run_dir: str) -> dict[str, VmPlan]:
    """:func:`plan_vms` on a resolved topology, plus socket path lengths; raises TopologyError listing all."""
    plans, problems = plan_vms(topology)
    for d in topology.domains:
        if d.vm is None:
            continue
        folder = os.path.join(run_dir, VMS_DIR, d.name)
        longest = os.path.join(folder, "console.sock")
        if len(os.fsencode(longest)) > MAX_UNIX_PATH:
            problems.append(f"{topology.source}: {d.label}.vm: the VM's console socket {longest!r} would be longer "
                            f"than {MAX_UNIX_PATH} bytes, the limit of a unix socket address; choose a shorter "
                            f"--run-dir")
    if problems:
        raise TopologyError(problems + [f"{topology.source}: nothing was started"])
    return plans


# ---- QMP, without waiting --------------------------------------------------------------------------

class _QmpLink:
    """The supervisor's QMP connection to one QEMU: non-blocking, fed from the loop when readable."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self._serial = 0
        self._replies: dict[str, Callable[[dict[str, Any]], None]] = {}

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, command: str, _reply: Callable[[dict[str, Any]], None] | None = None, **arguments: Any) -> bool:
        """Send ``command``; ``_reply`` (if given) gets QEMU's answer to it, ``return`` or ``error``."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        if _reply is not None:
            self._serial += 1
            msg["id"] = f"xdom-{self._serial}"
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError:
            return False            # QEMU is going; its pidfd says so
        if _reply is not None:
            self._replies[msg["id"]] = _reply
        return True

    def reply_to(self, msg: dict[str, Any]) -> Callable[[dict[str, Any]], None] | None:
        """The callback waiting for ``msg`` (an answer to a command sent with one), taken out."""
        rid = msg.get("id")
        return self._replies.pop(rid, None) if isinstance(rid, str) else None

    def read(self) -> list[dict[str, Any]] | None:
        """The messages that arrived; None at EOF (or when QEMU floods the connection)."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return []
        except OSError:
            return None
        if not data:
            return None
        self._buf += data
        out = []
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict):
                out.append(msg)
        if len(self._buf) > QMP_LINE_LIMIT:
            return None
        return out

    def close(self) -> None:
        self.sock.close()


def _peer_pid(sock: socket.socket) -> int:
    pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    return int(pid)


# ---- the VMs of a host -----------------------------------------------------------------------------

class PlugState(StrEnum):
    WAITING = "waiting"          # for the guest domain to serve the device's socket
    ADDING = "adding"            # QMP commands under way (chardev-add, netdev_add, device_add)
    PRESENT = "present"          # in the VM
    REMOVING = "removing"        # device_del sent; the VM's kernel lets go, then QEMU says DEVICE_DELETED
    FAILED = "failed"


@dataclass(eq=False)
class _Plug:
    """A device being hot-added to or removed from a running VM (or whose last such step failed)."""

    kind: str                        # "blk" or "net"
    dev_id: str                      # QEMU's id: the disk's (xvdb), the NIC's netdev (vif1)
    socket: str
    bus: str                         # its PCIe root port
    state: PlugState
    commands: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    poll_at: float | None = None     # WAITING: the next look for the socket
    give_up: float = 0.0             # WAITING: then it failed
    error: str = ""
    done: Callable[[], None] | None = None     # REMOVING: the toolstack's teardown, once the VM let go

    def row(self) -> dict[str, Any]:
        return {"state": str(self.state), "error": self.error or None, "bus": self.bus}


@dataclass(eq=False)
class _Vm:
    guest: Any                       # the supervisor's _Domain of the guest
    plan: VmPlan
    tracker: RestartTracker
    health: HealthCheck
    paths: VmPaths
    state: VmState = VmState.PENDING
    proc: subprocess.Popen[bytes] | None = None
    pidfd: int = -1
    qmp: _QmpLink | None = None
    status: str = ""                 # what QMP's query-status said last
    generation: int = 0
    started_once: bool = False
    started_mono: float = 0.0
    ready_by: float | None = None
    deadline: float | None = None    # the next thing to do: try QMP again, escalate a stop, restart
    stage: str = ""                  # of a stop: "powerdown", "quit", "kill"
    then: str = ""                   # after a stop: "restart" (start again with the guest domain), "" (stay down)
    resume: Callable[[], None] | None = None
    kill_reason: str = ""
    last_exit: str = ""
    changes: int = 0
    sample: HealthSample | None = None
    ps_cache: dict[int, psutil.Process] = field(default_factory=dict)
    plugs: dict[str, _Plug] = field(default_factory=dict)         # by QEMU id: hot-plug steps of this QEMU
    free_ports: list[str] = field(default_factory=list)           # empty root ports of this QEMU
    ident: dict[str, int] | None = None       # QEMU by pid and start time, as the state file names it

    @property
    def name(self) -> str:
        return str(self.guest.name)

    @property
    def config(self) -> VmConfig:
        vm = self.guest.spec.vm
        assert vm is not None
        return vm

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.pidfd >= 0 else None


class VmSupervisor:
    """The VMs of one supervised host.  The supervisor calls in at a handful of points (see lifecycle_driver.py:
    ``domain_ready``, ``domain_gone``, ``stop_first``, ``stop_now``, ``timers``, ``check_health``, ``row``)."""

    def __init__(self, domains: list[Any], plans: dict[str, VmPlan], layout: Layout, *,
                 watch_fd: Callable[[int, Callable[[], None]], None], unwatch_fd: Callable[[int], None],
                 record: Callable[[str, str, str], None], progress: Callable[[str], None],
                 ready_timeout: float, stop_grace: float, log_level: str = "info") -> None:
        self.layout = layout
        self._watch_fd, self._unwatch_fd = watch_fd, unwatch_fd
        self._record, self._progress = record, progress
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self.separate_uids = False              # set once the host's uids are planned
        self.vms: dict[str, _Vm] = {}
        for d in domains:
            if d.spec.vm is not None:
                self.vms[d.name] = _Vm(d, plans[d.name], RestartTracker.for_spec(d.spec),
                                       HealthCheck(d.spec.vm.limits), vm_paths(layout, d.name))

    def __bool__(self) -> bool:
        return bool(self.vms)

    # ---- the state file and adoption (deploy/host_state.py, deploy/adopt.py) ---------------------------

    def snapshot(self) -> dict[str, Any]:
        return {name: {"state": str(vm.state), "ident": vm.ident, "generation": vm.generation,
                       "started_once": vm.started_once, "started_mono": vm.started_mono, "last_exit": vm.last_exit,
                       "changes": vm.changes, "status": vm.status, "restarts": list(vm.tracker._restarts),
                       "then": vm.then, "deadline": vm.deadline}
                for name, vm in self.vms.items()}

    def pids(self) -> list[int]:
        return [vm.proc.pid for vm in self.vms.values() if vm.proc is not None and vm.pidfd >= 0]

    def adopt(self, model: dict[str, Any], now: float, said: list[str]) -> None:
        """Each VM as the state file has it; a QEMU still running is watched again and its QMP reconnected.

        Hot-plug bookkeeping is not carried over: an adopted QEMU keeps the
        devices it has, but has no free slot for another until it restarts.
        """
        for name, rec in model.items():
            vm = self.vms.get(name)
            if vm is None or not isinstance(rec, dict):
                continue
            vm.state = VmState(rec.get("state", "pending"))
            vm.generation = int(rec.get("generation") or 0)
            vm.started_once = bool(rec.get("started_once"))
            vm.started_mono = float(rec.get("started_mono") or now)
            vm.last_exit = str(rec.get("last_exit") or "")
            vm.changes = int(rec.get("changes") or 0) + 1
            vm.status = str(rec.get("status") or "")
            vm.then = str(rec.get("then") or "")
            vm.tracker._restarts.clear()
            vm.tracker._restarts.extend(float(t) for t in rec.get("restarts") or [])
            if vm.state not in _ALIVE:
                if vm.state == VmState.BACKOFF:
                    vm.deadline = max(now, float(rec.get("deadline") or now))
                continue
            proc = AdoptedProcess.of(rec.get("ident"))
            if proc is None:
                status = ExitStatus(unknown="adopted; it ended while no supervisor ran",
                                    seen_clean=vm.status == "shutdown")
                self._record(vm.name, "vm-exit", status.describe())
                self._after_death(vm, status, "", now - vm.started_mono)
                continue
            vm.proc = proc       # type: ignore[assignment]
            vm.ident = rec.get("ident")
            vm.pidfd = proc.pidfd()
            self._watch_fd(vm.pidfd, lambda vm=vm: self._on_exit(vm))
            self._connect_qmp(vm, now)
            if vm.state == VmState.STARTING:
                vm.ready_by = now + self.ready_timeout
            elif vm.state == VmState.STOPPING:
                self._escalate_stop(vm, now, first=True)
            self._record(vm.name, "vm-adopted", f"pid {proc.pid}")
            said.append(f"{vm.name}: VM adopted (QEMU pid {proc.pid}"
                        f"{', QMP reconnected' if vm.qmp is not None else ', QMP not reachable yet'})")

    def _of(self, d: Any) -> _Vm | None:
        return self.vms.get(d.name) if d.spec.vm is not None else None

    # ---- hooks the supervisor calls ----------------------------------------------------------------

    def domain_ready(self, d: Any) -> None:
        """The guest domain is ready (its vhost-user sockets listen): start its VM if it is due."""
        vm = self._of(d)
        if vm is None:
            return
        if vm.state in (VmState.PENDING, VmState.STOPPED) or (vm.state == VmState.BACKOFF and vm.deadline is None):
            self._launch(vm)

    def domain_gone(self, d: Any, why: str) -> None:
        """The guest domain is down for good (its policy, a destroy): the VM goes too, its devices are gone."""
        vm = self._of(d)
        if vm is None:
            return
        if vm.state in (VmState.STARTING, VmState.RUNNING):
            log.warning("%s: powering its VM off: %s", vm.name, why)
            self._progress(f"{vm.name}: VM powered off ({why})")
            self._begin_stop(vm, "", None)
        elif vm.state in (VmState.BACKOFF, VmState.PENDING):
            vm.deadline = None
            self._set_state(vm, VmState.STOPPED)
            self._release(vm)

    def restart_requested(self, d: Any) -> None:
        """``xdom restart GUEST``: the VM starts again with its guest domain, whatever its policy said before."""
        vm = self._of(d)
        if vm is None:
            return
        vm.tracker.reset()
        if vm.state in (VmState.EXITED, VmState.FAILED, VmState.STOPPED, VmState.BACKOFF):
            vm.deadline = None
            self._set_state(vm, VmState.PENDING)

    def stop_first(self, d: Any, then: str, resume: Callable[[], None]) -> bool:
        """Before the guest domain stops (restart, destroy): power its VM off; True when ``resume`` will be
        called once it is down (the guest domain's stop goes on then)."""
        vm = self._of(d)
        if vm is None:
            return False
        after = "restart" if then == "restart" else ""
        if vm.state in (VmState.STARTING, VmState.RUNNING):
            self._begin_stop(vm, after, resume)
            return True
        if vm.state == VmState.STOPPING:
            vm.then, vm.resume = after, resume
            return True
        vm.deadline = None
        if vm.state in (VmState.BACKOFF, VmState.PENDING):
            self._set_state(vm, VmState.PENDING if after else VmState.STOPPED)
        return False

    def start_problem(self, d: Any) -> str | None:
        """For the host's start: None once ``d``'s VM (if any) has been running, "" while it is on its way,
        else why it did not start."""
        vm = self._of(d)
        if vm is None or vm.started_once:
            return None
        if vm.state in (VmState.EXITED, VmState.FAILED, VmState.STOPPED):
            return (f"the VM of guest {vm.name} did not start: {vm.last_exit or vm.state}; see "
                    f"{vm.paths.qemu_log}")
        return ""

    # ---- hot-plug: xdom block-attach/-detach, network-attach/-detach on a VM guest --------------------
    #
    # Attach: the toolstack writes the device's nodes as for any guest; the guest domain connects
    # blkfront/netfront and serves the device on a new vhost-user socket; once that socket is there the
    # device is added to the running VM over QMP (a chardev with reconnect, the netdev for a NIC, then
    # device_add on a free root port).  Detach: device_del; once the VM's kernel let go (DEVICE_DELETED)
    # the netdev and the chardev go, then the toolstack's xenbus teardown (``done``).  Nothing here waits:
    # the client follows a device's ``plug`` state in ``xdom ps``.  A VM not running now gets the device
    # on its command line when it starts (every device of the guest's spec is).

    def devices_problem(self, d: Any) -> str | None:
        """Why ``d``'s devices cannot change now (its VM is starting or stopping), None when they can."""
        vm = self._of(d)
        if vm is not None and vm.state in (VmState.STARTING, VmState.STOPPING):
            return f"the VM of {vm.name} is {vm.state}; add or remove its devices once it runs (or is down)"
        return None

    def plug_disk(self, d: Any, disk: Any, sock: str) -> dict[str, Any]:
        """A disk is being attached to ``d`` (its nodes are written next): into its VM once served on
        ``sock``.  Returns the reply's ``vm`` part; raises ControlError (nothing done) when it cannot be."""
        vm = self._of(d)
        if vm is None:
            return {}
        dev = VhostUserBlk(sock, num_queues=vm.config.cpus, id=_qemu_id(disk.vdev))
        return self._plug(vm, "blk", _qemu_id(disk.vdev), sock,
                          lambda bus: hotplug_blk(dev, _qemu_id(disk.vdev), bus, 1))

    def plug_nic(self, d: Any, devid: int, vif: Any, sock: str) -> dict[str, Any]:
        """:meth:`plug_disk` for a vif: a virtio-net NIC on vhost-user-net."""
        vm = self._of(d)
        if vm is None:
            return {}
        nic = VhostUserNet(sock, vif.mac, queues=vif_queues(vif, vm.config), id=f"vif{devid}")
        accel = vm.plan.accel
        return self._plug(vm, "net", f"vif{devid}", sock,
                          lambda bus: hotplug_net(nic, f"vif{devid}", accel, bus, 1))

    def forget_plug(self, d: Any, dev_id: str) -> None:
        """The attach did not happen after all (its nodes could not be written): its slot is free again."""
        vm = self._of(d)
        plug = vm.plugs.get(dev_id) if vm is not None else None
        if vm is not None and plug is not None and plug.state == PlugState.WAITING:
            del vm.plugs[dev_id]
            vm.free_ports.insert(0, plug.bus)

    def unplug_disk(self, d: Any, disk: Any, done: Callable[[], None]) -> dict[str, Any] | None:
        return self.unplug(d, _qemu_id(disk.vdev), done)

    def unplug_nic(self, d: Any, devid: int, done: Callable[[], None]) -> dict[str, Any] | None:
        return self.unplug(d, f"vif{devid}", done)

    def unplug(self, d: Any, dev_id: str, done: Callable[[], None]) -> dict[str, Any] | None:
        """A device of ``d`` is being detached: out of its VM first.  None when its VM is not running
        (nothing to do there: the caller tears it down now); else the reply's ``vm`` part, and ``done`` is
        called once the VM let go of it.  Raises ControlError when it cannot be removed now."""
        vm = self._of(d)
        if vm is None or vm.state != VmState.RUNNING:
            return None
        if vm.qmp is None:
            raise ControlError.of(errno.EAGAIN, f"the VM of {vm.name} runs but its QMP socket is not connected yet: "
                                                f"{dev_id} cannot be taken out of it now; try again")
        plug = vm.plugs.get(dev_id)
        if plug is not None and plug.state in (PlugState.WAITING, PlugState.ADDING):
            raise ControlError.of(errno.EBUSY, f"{dev_id} is still being added to the VM of {vm.name}; detach it "
                                               f"once it is there (xdom ps shows its plug state)")
        if plug is not None and plug.state == PlugState.REMOVING:
            plug.done = done
            return {"device": dev_id, "plug": plug.row()}
        kind = "net" if dev_id.startswith("vif") else "blk"
        if plug is None or plug.state == PlugState.FAILED:
            plug = _Plug(kind, dev_id, "", plug.bus if plug is not None else boot_port(dev_id), PlugState.REMOVING)
        plug.state, plug.error, plug.done = PlugState.REMOVING, "", done
        vm.plugs[dev_id] = plug
        self._record(vm.name, "vm-unplug", dev_id)
        vm.qmp.send("device_del", lambda msg: self._unplug_answered(vm, plug, msg), id=unplug_device_id(kind, dev_id))
        return {"device": dev_id, "plug": plug.row()}

    def _plug(self, vm: _Vm, kind: str, dev_id: str, sock: str,
              commands: Callable[[str], list[tuple[str, dict[str, Any]]]]) -> dict[str, Any]:
        if vm.state != VmState.RUNNING:
            return {"device": dev_id, "plug": None, "at_start": True}
        if vm.qmp is None:
            raise ControlError.of(errno.EAGAIN, f"the VM of {vm.name} runs but its QMP socket is not connected yet: "
                                                f"{dev_id} cannot be added to it now; try again")
        old = vm.plugs.get(dev_id)
        if old is not None and old.state != PlugState.FAILED:
            raise ControlError.of(errno.EBUSY, f"{dev_id} is {old.state} in the VM of {vm.name}")
        if not vm.free_ports:
            raise ControlError.of(errno.ENOSPC, f"the VM of {vm.name} has no free PCIe slot for {dev_id}: it keeps "
                                                f"{HOTPLUG_SLOTS} for hot-added devices and each device removed frees "
                                                f"one (its next start gives every device a slot of its own)")
        bus = old.bus if old is not None else vm.free_ports.pop(0)
        now = time.monotonic()
        plug = _Plug(kind, dev_id, sock, bus, PlugState.WAITING, commands(bus), poll_at=now + SOCKET_POLL,
                     give_up=now + PLUG_TIMEOUT)
        vm.plugs[dev_id] = plug
        self._record(vm.name, "vm-plug", f"{dev_id} on {bus} once {sock} is served")
        return {"device": dev_id, "plug": plug.row()}

    def _plug_poll(self, vm: _Vm, plug: _Plug, now: float) -> None:
        """WAITING: the socket is there (the guest domain's blkfront/netfront connected): add the device."""
        plug.poll_at = None
        try:
            served = stat.S_ISSOCK(os.stat(plug.socket).st_mode)
        except OSError:
            served = False
        if not served:
            if now < plug.give_up:
                plug.poll_at = now + SOCKET_POLL
            else:
                self._plug_failed(vm, plug, f"the guest domain did not serve {plug.socket} within "
                                            f"{PLUG_TIMEOUT:g}s (see its log: xdom logs {vm.name})")
            return
        plug.state = PlugState.ADDING
        self._plug_next(vm, plug, [])

    def _plug_next(self, vm: _Vm, plug: _Plug, sent: list[tuple[str, dict[str, Any]]]) -> None:
        """Send the next add command; each is sent once the one before succeeded."""
        if plug.state != PlugState.ADDING or vm.plugs.get(plug.dev_id) is not plug:
            return
        if len(sent) == len(plug.commands):
            plug.state = PlugState.PRESENT
            self._record(vm.name, "vm-plugged", f"{plug.dev_id} on {plug.bus}")
            log.info("the VM of %s: %s added (%s)", vm.name, plug.dev_id, plug.socket)
            return
        command, args = plug.commands[len(sent)]

        def answered(msg: dict[str, Any]) -> None:
            if "error" in msg:
                self._plug_failed(vm, plug, f"QMP {command}: {_qmp_error(msg)}")
                for undo, undo_args in _undo(sent):
                    if vm.qmp is not None:
                        vm.qmp.send(undo, lambda _msg: None, **undo_args)
            else:
                self._plug_next(vm, plug, sent + [(command, args)])
        if vm.qmp is None or not vm.qmp.send(command, answered, **args):
            self._plug_failed(vm, plug, "QEMU's QMP connection is gone")

    def _plug_failed(self, vm: _Vm, plug: _Plug, why: str) -> None:
        plug.state, plug.error, plug.poll_at = PlugState.FAILED, why, None
        log.error("the VM of %s: cannot add %s: %s", vm.name, plug.dev_id, why)
        self._record(vm.name, "vm-plug-failed", f"{plug.dev_id}: {why}"[:200])

    def _unplug_answered(self, vm: _Vm, plug: _Plug, msg: dict[str, Any]) -> None:
        if "error" not in msg or plug.state != PlugState.REMOVING:
            return                   # accepted: DEVICE_DELETED follows once the VM's kernel let go
        why = _qmp_error(msg)
        if "not found" in why.lower():
            self._unplugged(vm, plug)            # already gone (QEMU restarted without it, say)
            return
        plug.state, plug.error = PlugState.FAILED, f"QMP device_del: {why}"
        plug.done = None
        log.error("the VM of %s: cannot remove %s: %s", vm.name, plug.dev_id, why)
        self._record(vm.name, "vm-unplug-failed", f"{plug.dev_id}: {why}"[:200])

    def _unplugged(self, vm: _Vm, plug: _Plug) -> None:
        """The VM let go of the device: its netdev and chardev go, its slot is free, the teardown goes on."""
        if vm.plugs.get(plug.dev_id) is not plug:
            return
        del vm.plugs[plug.dev_id]
        if vm.qmp is not None:
            for command, args in after_unplug(plug.kind, plug.dev_id):
                vm.qmp.send(command, lambda _msg: None, **args)
        if plug.bus not in vm.free_ports:
            vm.free_ports.append(plug.bus)
        self._record(vm.name, "vm-unplugged", plug.dev_id)
        log.info("the VM of %s: %s removed", vm.name, plug.dev_id)
        done, plug.done = plug.done, None
        if done is not None:
            done()

    def _plugs_at_exit(self, vm: _Vm, teardown: bool) -> None:
        """QEMU is gone, and its devices with it: a removal under way is complete (``teardown``: its
        toolstack half goes on now), anything being added is on the next QEMU's command line."""
        plugs, vm.plugs = list(vm.plugs.values()), {}
        vm.free_ports = []
        for plug in plugs:
            done, plug.done = plug.done, None
            if plug.state == PlugState.REMOVING and done is not None and teardown:
                done()

    def deadlines(self) -> list[float]:
        return [vm.deadline for vm in self.vms.values() if vm.deadline is not None] + \
               [vm.ready_by for vm in self.vms.values() if vm.ready_by is not None] + \
               [p.poll_at for vm in self.vms.values() for p in vm.plugs.values() if p.poll_at is not None]

    def timers(self, now: float) -> None:
        for vm in self.vms.values():
            for plug in list(vm.plugs.values()):
                if plug.poll_at is not None and now >= plug.poll_at:
                    self._plug_poll(vm, plug, now)
            if vm.ready_by is not None and now >= vm.ready_by and vm.state == VmState.STARTING:
                vm.ready_by = None
                self._kill(vm, f"QMP did not report the VM running within {self.ready_timeout:g}s "
                               f"(QMP status {vm.status or 'unknown'})")
            if vm.deadline is None or now < vm.deadline:
                continue
            vm.deadline = None
            if vm.state == VmState.STARTING and vm.qmp is None:
                self._connect_qmp(vm, now)
            elif vm.state == VmState.STOPPING:
                self._escalate_stop(vm, now)
            elif vm.state == VmState.BACKOFF:
                if vm.guest.state == "running":
                    self._launch(vm)
                # else: started by domain_ready once its guest domain is back

    def check_health(self) -> None:
        for vm in self.vms.values():
            if vm.state not in (VmState.STARTING, VmState.RUNNING) or vm.pidfd < 0:
                continue
            sample = self._sample(vm)
            if sample is None:
                continue
            vm.sample = sample
            why = vm.health.check(sample)
            if why is not None and not vm.kill_reason:
                self._kill(vm, f"over its vm.limits: {why}")

    def stop_now(self, d: Any) -> None:
        """Blocking power-off for the host's shutdown: system_powerdown, grace, quit, SIGKILL, reap."""
        vm = self._of(d)
        if vm is None:
            return
        vm.deadline = vm.ready_by = None
        if vm.proc is not None and vm.pidfd >= 0:
            t0 = time.monotonic()
            how = "killed"
            if vm.qmp is not None and vm.qmp.send("system_powerdown"):
                if select.select([vm.pidfd], [], [], self.stop_grace)[0]:
                    how = "powered off"
            if how != "powered off":
                if vm.qmp is not None and vm.qmp.send("quit"):
                    how = "quit"
                else:
                    self._signal(vm, signal.SIGTERM)
                    how = "terminated"
                if not select.select([vm.pidfd], [], [], QUIT_GRACE)[0]:
                    self._signal(vm, signal.SIGKILL)
                    how = "killed"
            status = ExitStatus.from_returncode(self._reap(vm))
            self._plugs_at_exit(vm, teardown=False)
            took = time.monotonic() - t0
            self._record(vm.name, "vm-stopped", f"{how} in {took:.2f}s: {status.describe()}")
            self._log_to(vm, f"QEMU pid {vm.proc.pid} {how} with the host in {took:.2f}s ({status.describe()})")
            vm.last_exit = f"{status.describe()} ({how} with the host)"
        self._close_qmp(vm)
        if vm.state != VmState.PENDING or vm.generation:
            self._set_state(vm, VmState.STOPPED)

    def close(self) -> None:
        """The host is gone: close what is left (stop_now ran for every VM), remove the VMs' sockets."""
        for vm in self.vms.values():
            self._close_qmp(vm)
            if vm.pidfd >= 0:
                self._unwatch_fd(vm.pidfd)
                os.close(vm.pidfd)
                vm.pidfd = -1
            self._release(vm)

    def row(self, d: Any) -> dict[str, Any] | None:
        """``xdom ps --json``'s ``vm`` object of a guest, None for a guest without a VM."""
        vm = self._of(d)
        if vm is None:
            return None
        alive = vm.state in _ALIVE and vm.pidfd >= 0
        if vm.sample is None and alive:
            vm.sample = self._sample(vm)
        s = vm.sample
        cfg = vm.config
        return {
            "state": str(vm.state), "pid": vm.pid, "accel": vm.plan.accel, "accel_reason": vm.plan.accel_reason,
            "qmp_status": vm.status or None, "restarts": max(0, vm.generation - 1), "generation": vm.generation,
            "state_changes": vm.changes, "uptime": round(time.monotonic() - vm.started_mono, 3) if alive else 0.0,
            "rss": s.rss if s and alive else None, "fds": s.fds if s and alive else None,
            "cpu_percent": round(s.cpu_percent, 1) if s and alive else None,
            "memory_mib": cfg.memory_mib, "cpus": cfg.cpus, "kernel": vm.plan.kernel, "initrd": vm.plan.initrd,
            "append": vm.plan.append, "own_image": vm.plan.own_image, "uid": self._uid(vm),
            "netns": vm.guest.netns, "sandbox": SANDBOX, "seccomp": _seccomp_filtered(vm.pid) if alive else None,
            "console": vm.paths.console, "qmp": vm.paths.qmp, "log": vm.paths.qemu_log,
            "console_log": vm.paths.console_log, "last_exit": vm.last_exit or None,
            "disks": [{"vdev": disk.vdev, "id": _qemu_id(disk.vdev), "socket": self._disk_socket(d, disk),
                       "plug": self._plug_state(vm, _qemu_id(disk.vdev))}
                      for disk in d.spec.disks if disk.export_kind == EXPORT_VHOST_USER],
            "nics": [{"devid": devid, "id": f"vif{devid}", "mac": vif.mac, "socket": self._vif_socket(d, devid, vif),
                      "queues": vif_queues(vif, cfg), "plug": self._plug_state(vm, f"vif{devid}")}
                     for devid, vif in vif_devids(d.spec.vifs) if vif.export_kind == EXPORT_VHOST_USER],
            "free_slots": len(vm.free_ports) if vm.state in _ALIVE else None,
        }

    @staticmethod
    def _plug_state(vm: _Vm, dev_id: str) -> dict[str, Any]:
        """A device's hot-plug state: its step under way (or failed), else present while QEMU runs."""
        plug = vm.plugs.get(dev_id)
        if plug is not None:
            return plug.row()
        alive = vm.state in _ALIVE
        return {"state": "present" if alive else "at-start", "error": None, "bus": boot_port(dev_id) if alive else None}

    # ---- starting ----------------------------------------------------------------------------------

    def _uid(self, vm: _Vm) -> int:
        uid = vm.guest.uid
        return uid if uid is not None else os.geteuid()

    def _disk_socket(self, d: Any, disk: Any) -> str:
        return disk.export_path or default_export(self.layout.run_dir, d.name, disk.vdev)

    def _vif_socket(self, d: Any, devid: int, vif: Any) -> str:
        return vif.export_path or default_vif_export(self.layout.run_dir, d.name, devid)

    def _spec(self, vm: _Vm) -> VmSpec:
        d = vm.guest
        cfg = vm.config
        blk = [VhostUserBlk(self._disk_socket(d, disk), num_queues=cfg.cpus, id=_qemu_id(disk.vdev))
               for disk in d.spec.disks if disk.export_kind == EXPORT_VHOST_USER]
        net = [VhostUserNet(self._vif_socket(d, devid, vif), vif.mac, queues=vif_queues(vif, cfg), id=f"vif{devid}")
               for devid, vif in vif_devids(d.spec.vifs) if vif.export_kind == EXPORT_VHOST_USER]
        extra = list(cfg.extra_args)
        if vm.plan.accel == "tcg":
            extra = [*TCG_NET_ARGS, *extra]
        return VmSpec(kernel=vm.plan.kernel, initrd=vm.plan.initrd, append=vm.plan.append, cpus=cfg.cpus,
                      memory=f"{cfg.memory_mib}M", accel=vm.plan.accel, vhost_user_blk=blk, vhost_user_net=net,
                      extra_args=extra, name=d.name, reconnect=1, sandbox=True, hotplug_slots=HOTPLUG_SLOTS)

    def _prepare_dir(self, vm: _Vm) -> None:
        """``RUN_DIR/vms/GUEST``: root's, 0700, an ACL giving the guest's uid rwx (its QEMU makes sockets there)."""
        top = self.layout.vms_dir
        if not os.path.isdir(top):
            os.mkdir(top, 0o755)
            os.chmod(top, 0o755)
        folder = os.path.dirname(vm.paths.console)
        if not os.path.lexists(folder):
            os.mkdir(folder, 0o700)
        private_dir(folder, vm.guest.uid if self.separate_uids else None)
        for path in (vm.paths.console, vm.paths.qmp):
            _unlink_socket(path)

    def _launch(self, vm: _Vm) -> None:
        now = time.monotonic()
        d = vm.guest
        try:
            self._prepare_dir(vm)
        except (AccessError, OSError) as e:
            self._launch_failed(vm, f"cannot prepare its socket directory: {e}")
            return
        logfd = conlog = -1
        try:
            logfd = os.open(vm.paths.qemu_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            conlog = os.open(vm.paths.console_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            argv = qemu_argv(self._spec(vm), vm.paths, vm.plan.accel, vm.plan.qemu, console_log_fd=conlog)
            wrap = [sys.executable, "-I", "-S", DOMAIN_EXEC]    # no parent-death signal: the VM outlives us
            if vm.config.limits.fds is not None:
                wrap += ["--nofile", str(vm.config.limits.fds)]
            vm.generation += 1
            _write_marker(logfd, f"starting the VM of guest {vm.name} (generation {vm.generation}, accel "
                                 f"{vm.plan.accel}: {vm.plan.accel_reason}; uid {self._uid(vm)}): {' '.join(argv)}")
            _write_marker(conlog, f"VM of guest {vm.name} starting (generation {vm.generation})")
            popen: dict[str, Any] = {}
            if d.uid is not None:
                popen.update(user=d.uid, group=d.uid, extra_groups=self._groups(vm))
            netns_name = d.netns if d.netns is not None and netns.exists(d.netns) else None
            if netns_name is not None:
                with netns.entered(netns_name):
                    vm.proc = self._popen([*wrap, "--", *argv], logfd, conlog, popen)
            else:
                vm.proc = self._popen([*wrap, "--", *argv], logfd, conlog, popen)
        except (OSError, subprocess.SubprocessError, netns.NetnsError, ValueError) as e:
            self._launch_failed(vm, f"cannot start QEMU: {e}")
            return
        finally:
            for fd in (logfd, conlog):
                if fd >= 0:
                    os.close(fd)
        vm.ident = host_state.identity(vm.proc.pid)
        vm.pidfd = os.pidfd_open(vm.proc.pid)
        self._watch_fd(vm.pidfd, lambda: self._on_exit(vm))
        vm.kill_reason = ""
        vm.status = ""
        vm.sample = None
        vm.ps_cache.clear()
        vm.plugs.clear()
        vm.free_ports = [hotplug_port(k) for k in range(HOTPLUG_SLOTS)]
        vm.health.reset()
        vm.started_mono = now
        vm.ready_by = now + self.ready_timeout
        vm.deadline = now + QMP_RETRY
        self._set_state(vm, VmState.STARTING)
        self._record(vm.name, "vm-spawn", f"pid {vm.proc.pid} accel {vm.plan.accel}")

    @staticmethod
    def _popen(argv: list[str], logfd: int, conlog: int, popen: dict[str, Any]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logfd, stderr=subprocess.STDOUT,
                                pass_fds=(conlog,), start_new_session=True, cwd="/", **popen)

    def _groups(self, vm: _Vm) -> list[int]:
        """QEMU's supplementary groups: /dev/kvm's group for KVM (its only privilege), else none."""
        if vm.plan.accel != "kvm":
            return []
        try:
            st = os.stat("/dev/kvm")
        except OSError:
            return []
        return [st.st_gid] if st.st_mode & 0o060 == 0o060 else []

    def _launch_failed(self, vm: _Vm, why: str) -> None:
        log.error("the VM of %s: %s", vm.name, why)
        self._after_death(vm, ExitStatus(code=127), why, 0.0)

    def _connect_qmp(self, vm: _Vm, now: float) -> None:
        assert vm.proc is not None
        if vm.qmp is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.connect(vm.paths.qmp)
            peer = _peer_pid(sock)
            if peer != vm.proc.pid:
                raise OSError(errno.EPERM, f"{vm.paths.qmp} is served by pid {peer}, not by QEMU (pid "
                                           f"{vm.proc.pid}): not believed")
        except OSError as e:
            sock.close()
            if e.errno == errno.EPERM:
                log.warning("the VM of %s: %s", vm.name, e)
            vm.deadline = now + QMP_RETRY
            return
        vm.qmp = _QmpLink(sock)
        self._watch_fd(vm.qmp.fileno(), lambda: self._on_qmp(vm))
        vm.qmp.send("qmp_capabilities")
        vm.qmp.send("query-status")

    def _on_qmp(self, vm: _Vm) -> None:
        link = vm.qmp
        if link is None:
            return
        msgs = link.read()
        if msgs is None:
            self._close_qmp(vm)          # QEMU is exiting (its pidfd follows) or flooded us
            return
        for msg in msgs:
            ret = msg.get("return")
            answer = link.reply_to(msg)
            if answer is not None:
                answer(msg)
            elif isinstance(ret, dict) and isinstance(ret.get("status"), str):
                self._on_status(vm, ret["status"])
            elif isinstance(msg.get("event"), str):
                event = msg["event"]
                data = msg.get("data") if isinstance(msg.get("data"), dict) else {}
                self._record(vm.name, f"vm:{event}", json.dumps(data)[:200] if data else "")
                if event in ("STOP", "RESUME"):
                    link.send("query-status")
                elif event == "DEVICE_DELETED" and isinstance(data.get("device"), str):
                    for plug in list(vm.plugs.values()):
                        if plug.state == PlugState.REMOVING and unplug_device_id(plug.kind, plug.dev_id) == \
                                data["device"]:
                            self._unplugged(vm, plug)
                elif event == "SHUTDOWN":
                    vm.status = "shutdown"
            elif "error" in msg:
                log.warning("the VM of %s: QMP: %s", vm.name, str(msg["error"])[:200])

    def _on_status(self, vm: _Vm, status: str) -> None:
        vm.status = status
        if status == "running" and vm.state == VmState.STARTING:
            vm.ready_by = None
            vm.started_once = True
            self._set_state(vm, VmState.RUNNING)
            took = time.monotonic() - vm.started_mono
            self._record(vm.name, "vm-running", f"{took:.2f}s")
            self._progress(f"{vm.name}: VM running (QEMU pid {vm.pid}, accel {vm.plan.accel}: "
                           f"{vm.plan.accel_reason}; {took:.2f}s; console: xdom console {vm.name})")
        elif status in _FAILED_STATUS and status != "shutdown" and vm.state in (VmState.STARTING, VmState.RUNNING):
            self._kill(vm, f"the VM stopped: QMP status {status} (see {vm.paths.qemu_log})")

    def _close_qmp(self, vm: _Vm) -> None:
        if vm.qmp is not None:
            self._unwatch_fd(vm.qmp.fileno())
            vm.qmp.close()
            vm.qmp = None

    # ---- stopping, deaths --------------------------------------------------------------------------

    def _begin_stop(self, vm: _Vm, then: str, resume: Callable[[], None] | None) -> None:
        vm.then, vm.resume = then, resume
        vm.ready_by = None
        self._set_state(vm, VmState.STOPPING)
        if vm.qmp is not None and vm.qmp.send("system_powerdown"):
            vm.stage = "powerdown"
            vm.deadline = time.monotonic() + self.stop_grace
        else:
            self._escalate_stop(vm, time.monotonic(), first=True)

    def _escalate_stop(self, vm: _Vm, now: float, first: bool = False) -> None:
        if first or vm.stage == "powerdown":
            if not (vm.qmp is not None and vm.qmp.send("quit")):
                self._signal(vm, signal.SIGTERM)
            vm.stage = "quit"
            vm.deadline = now + QUIT_GRACE
        else:
            vm.stage = "kill"
            self._signal(vm, signal.SIGKILL)

    def _kill(self, vm: _Vm, why: str) -> None:
        log.warning("killing the VM of %s (QEMU pid %s): %s", vm.name, vm.pid, why)
        vm.kill_reason = why
        self._signal(vm, signal.SIGKILL)

    def _signal(self, vm: _Vm, sig: int) -> None:
        if vm.proc is None or vm.pidfd < 0:
            return
        try:
            os.killpg(vm.proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            try:
                signal.pidfd_send_signal(vm.pidfd, sig)
            except ProcessLookupError:
                pass

    def _reap(self, vm: _Vm) -> int:
        assert vm.proc is not None
        self._signal(vm, signal.SIGKILL)       # QEMU's group: nothing of it outlives it
        rc = vm.proc.wait()
        self._unwatch_fd(vm.pidfd)
        os.close(vm.pidfd)
        vm.pidfd = -1
        vm.ident = None
        self._close_qmp(vm)
        vm.deadline = vm.ready_by = None
        vm.sample = None
        return rc

    def _on_exit(self, vm: _Vm) -> None:
        was = vm.state
        uptime = time.monotonic() - vm.started_mono
        pid = vm.pid
        status = ExitStatus.from_returncode(self._reap(vm))
        if status.unknown:          # an adopted QEMU: not our child; QMP's SHUTDOWN says it powered off
            status = ExitStatus(unknown="adopted" + ("; QMP reported its shutdown" if vm.status == "shutdown" else ""),
                                seen_clean=vm.status == "shutdown")
        self._plugs_at_exit(vm, teardown=True)
        reason, vm.kill_reason = vm.kill_reason, ""
        if not reason and not status.clean and status.signal is None and not status.unknown:
            reason = _last_line(vm.paths.qemu_log)     # QEMU says why it gave up
        elif not reason and status.clean and vm.status == "shutdown":
            reason = "the VM powered off"
        detail = status.describe() + (f" ({reason})" if reason else "")
        self._record(vm.name, "vm-exit", detail)
        self._log_to(vm, f"QEMU pid {pid} {detail} after {uptime:.1f}s")
        if was == VmState.STOPPING:
            vm.last_exit = f"{status.describe()} (powered off by the toolstack)"
            self._set_state(vm, VmState.PENDING if vm.then == "restart" else VmState.STOPPED)
            if vm.state == VmState.STOPPED:
                self._release(vm)
            resume, vm.resume = vm.resume, None
            if resume is not None:
                resume()
            return
        self._after_death(vm, status, reason, uptime, pid)

    def _after_death(self, vm: _Vm, status: ExitStatus, reason: str, uptime: float,
                     pid: int | None = None) -> None:
        now = time.monotonic()
        decision = vm.tracker.on_exit(status, now)
        vm.last_exit = status.describe() + (f" ({reason})" if reason else "")
        what = f"the VM of {vm.name} (QEMU pid {pid}) {vm.last_exit} after {uptime:.1f}s"
        if decision.action == Action.RESTART:
            log.warning("%s; restarting in %.2fs (%s)", what, decision.delay, decision.reason)
            self._set_state(vm, VmState.BACKOFF)
            vm.deadline = now + decision.delay
            self._progress(f"{vm.name}: VM {vm.last_exit}; restarting in {decision.delay:.2f}s")
        elif decision.action == Action.STAY_DOWN:
            log.info("%s; not restarted: %s", what, decision.reason)
            self._set_state(vm, VmState.EXITED)
            self._progress(f"{vm.name}: VM {vm.last_exit}; not restarted ({decision.reason})")
            self._release(vm)
        else:
            log.error("%s; %s", what, decision.reason)
            vm.last_exit += f"; {decision.reason}"
            self._set_state(vm, VmState.FAILED)
            self._progress(f"{vm.name}: VM failed: {decision.reason}")
            self._release(vm)

    def _release(self, vm: _Vm) -> None:
        """A VM that stays down: its console and QMP sockets, and their directory, go (made again at its start)."""
        for path in (vm.paths.console, vm.paths.qmp):
            _unlink_socket(path)
        try:
            os.rmdir(os.path.dirname(vm.paths.console))
        except OSError:
            pass

    # ---- bookkeeping -------------------------------------------------------------------------------

    def _sample(self, vm: _Vm) -> HealthSample | None:
        assert vm.proc is not None
        try:
            leader = vm.ps_cache.get(vm.proc.pid) or psutil.Process(vm.proc.pid)
            with leader.oneshot():
                sample = HealthSample(leader.memory_info().rss, leader.num_fds(), leader.cpu_percent(None))
        except psutil.Error:
            return None
        vm.ps_cache = {vm.proc.pid: leader}
        return sample

    def _set_state(self, vm: _Vm, state: VmState) -> None:
        if vm.state != state:
            log.debug("the VM of %s: %s -> %s", vm.name, vm.state, state)
        vm.state = state
        vm.changes += 1

    def _log_to(self, vm: _Vm, text: str) -> None:
        try:
            fd = os.open(vm.paths.qemu_log, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError:
            return
        try:
            _write_marker(fd, text)
        finally:
            os.close(fd)


def _seccomp_filtered(pid: int | None) -> bool | None:
    """Whether the kernel shows a seccomp filter on ``pid`` (QEMU's -sandbox), None if it cannot tell."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Seccomp:"):
                    return line.split()[1] == "2"
    except (OSError, IndexError):
        pass
    return None


def _qmp_error(msg: dict[str, Any]) -> str:
    err = msg.get("error")
    if isinstance(err, dict):
        return str(err.get("desc") or err.get("class") or err)[:300]
    return str(err)[:300]


def _undo(sent: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """What takes back the add commands that succeeded before one failed, last first."""
    out: list[tuple[str, dict[str, Any]]] = []
    for command, args in reversed(sent):
        if command == "chardev-add":
            out.append(("chardev-remove", {"id": args["id"]}))
        elif command == "netdev_add":
            out.append(("netdev_del", {"id": args["id"]}))
    return out


def _qemu_id(vdev: str) -> str:
    """A QEMU device id from a vdev (xvda, hdc, d1p2: already letters and digits, starting with a letter)."""
    return "".join(ch for ch in vdev if ch.isalnum()) or "disk"


def _write_marker(fd: int, text: str) -> None:
    os.write(fd, f"--- xdom {time.strftime('%Y-%m-%d %H:%M:%S')}: {text}\n".encode())


def _unlink_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def _last_line(path: str) -> str:
    """The last line QEMU printed (not one of ours), without its timestamp."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        line = line.strip()
        if line and not line.startswith("--- xdom "):
            # -msg timestamp=on: "2026-12-05T10:00:00.000000Z qemu-system-x86_64: ..."
            head, _, rest = line.partition(" ")
            return (rest if head[:4].isdigit() and "T" in head else line)[:300]
    return ""

