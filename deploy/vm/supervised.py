"""A guest's VM, supervised beside its guest domain: QEMU is a process of the host like any domain.

A guest with a ``[domain.vm]`` table is two processes: its **guest domain**
(``python -m xdom.domains.guest``, which runs blkfront/netfront and serves
them on vhost-user sockets in its export directory) and its **VMM**
(``qemu-system-x86_64``, which connects to those sockets).  The supervisor
runs them in that order and this module does the VMM's half (its plan before
anything starts is ``plan.py``, hot-plug into a running VM ``hotplug.py``,
the records both use ``records.py``):

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
import functools
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psutil

from .. import host_state, netns
from ..access import AccessError, private_dir
from ..host_state import AdoptedProcess
from ..isolation import DOMAIN_EXEC
from ..launcher import signal_group
from ..policy import Action, ExitStatus, HealthCheck, HealthSample, RestartTracker
from ..rundir import VMS_DIR, append_marker, log_marker, unlink_socket  # VMS_DIR: RUN_DIR/vms/GUEST/, made by its QEMU
from ..topology import vif_devids, vif_queues
from ..xlcfg import EXPORT_VHOST_USER, default_export, default_vif_export
from .hotplug import HOTPLUG_SLOTS, VmHotplug, _qemu_id, vm_disk, vm_nic
from .plan import VmPlan, check_vms, plan_vms, vm_paths
from .qemu import SANDBOX, VmSpec, hotplug_port, qemu_argv, unplug_device_id
from .records import _ALIVE, PlugState, VmState, _peer_pid, _QmpLink, _Vm

if TYPE_CHECKING:
    from ..rundir import Layout

__all__ = ["VMS_DIR", "VmPlan", "VmState", "VmSupervisor", "check_vms", "plan_vms", "vm_paths"]

log = logging.getLogger("xdom.supervisor")

QMP_RETRY = 0.05            # seconds between tries to reach a starting QEMU's QMP socket
QUIT_GRACE = 2.0            # seconds between QMP quit (or SIGTERM) and SIGKILL
# A NIC under TCG has no MSI-X (qemu.net_device: QEMU 7.2 crashes otherwise); -global covers any virtio-net-pci
# a user adds in extra_args too.
TCG_NET_ARGS = ("-global", "virtio-net-pci.vectors=0")
_FAILED_STATUS = ("internal-error", "guest-panicked", "shutdown")   # a VM stopped in one of these is dead


class VmSupervisor(VmHotplug):
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
            vm.proc = proc
            vm.ident = rec.get("ident")
            vm.pidfd = proc.pidfd()
            self._watch_fd(vm.pidfd, functools.partial(self._on_exit, vm))
            self._connect_qmp(vm, now)
            if vm.state == VmState.STARTING:
                vm.ready_by = now + self.ready_timeout
            elif vm.state == VmState.STOPPING:
                self._escalate_stop(vm, now, first=True)
            self._record(vm.name, "vm-adopted", f"pid {proc.pid}")
            said.append(f"{vm.name}: VM adopted (QEMU pid {proc.pid}"
                        f"{', QMP reconnected' if vm.qmp is not None else ', QMP not reachable yet'})")

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
        blk = [vm_disk(self._disk_socket(d, disk), disk, cfg)
               for disk in d.spec.disks if disk.export_kind == EXPORT_VHOST_USER]
        net = [vm_nic(self._vif_socket(d, devid, vif), devid, vif, cfg)
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
            unlink_socket(path)

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
            log_marker(logfd, f"starting the VM of guest {vm.name} (generation {vm.generation}, accel "
                                 f"{vm.plan.accel}: {vm.plan.accel_reason}; uid {self._uid(vm)}): {' '.join(argv)}")
            log_marker(conlog, f"VM of guest {vm.name} starting (generation {vm.generation})")
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
                data = msg["data"] if isinstance(msg.get("data"), dict) else {}
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
        if vm.proc is not None and vm.pidfd >= 0:
            signal_group(vm.proc.pid, vm.pidfd, sig)

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
            unlink_socket(path)
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
        append_marker(vm.paths.qemu_log, text)


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
