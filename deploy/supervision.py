"""The supervisor's shared state and bookkeeping: the base its parts build on.

The supervisor (``deploy/supervisor.py``) is one object, built in layers,
each a module of its own and each using only the layers below it:

1. this module: the state every part reads (the topology, the domains, the
   broker's client, the loop's poller and watched descriptors), the journal
   and progress lines, the keeper of descriptors and the state file
   (adoption), and the checks that refuse a host before anything starts;
2. ``deploy/devices.py``: xenstore set-up, device nodes, TAPs, bridges,
   export directories, network namespaces (plug, attach, detach, release);
3. ``deploy/spawning.py``: credentials from the broker, command lines, the
   launch of a domain's process; a launch's outcome is a lifecycle event;
4. ``deploy/lifecycle_driver.py``: the lifecycle table
   (``deploy/lifecycle.py``) driven: readiness, deaths, stops, restarts,
   destroys, health limits, the broker's death;
5. ``deploy/control_ops.py``: the control socket's operations (``xdom ps``,
   ``restart``, ``destroy``, ``block-attach`` ...);
6. ``deploy/supervisor.py``: the public API, set-up and adoption, the event
   loop.

Layers are classes that inherit in that order, so ``self`` is the whole
supervisor and a type checker sees every name a layer uses below it.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from xdom.broker.mgmt_client import ManagementClient
from xdom.domains.hostsys.wakeup import WakePipe

from . import adopt, host_state, netns, remote
from .confined import SeccompKills
from .control import ControlServer
from .detaching import Detaches
from .host_limits import HostFacts
from .host_limits import problems as host_limit_problems
from .isolation import UidMode, UidPlan
from .keeper import KeeperClient, KeeperError
from .launcher import BrokerProcess, signal_group
from .lifecycle import State
from .policy import ExitStatus, HealthCheck, RestartTracker
from .rundir import Layout, PidFile, append_marker
from .supervised_domain import JournalEntry, SupervisedDomain
from .topology import DomainKind, DomainSpec, NetSwitch, Topology, TopologyError
from .vm.supervised import VmPlan, VmSupervisor, check_vms
from .xenstored_probe import XenstoredProbe

__all__ = ["READY_TIMEOUT", "STOP_GRACE", "SupervisorBase", "check_host", "check_switches", "switch_of"]

log = logging.getLogger("xdom.supervisor")

READY_TIMEOUT = 20.0        # seconds from launch to ready
STOP_GRACE = 5.0            # seconds between SIGTERM and SIGKILL
HEALTH_INTERVAL = 1.0       # seconds between health samples
BROKER_POLL = 0.25          # seconds between broker polls while a domain waits to connect
RESET_RETRY = 0.05          # seconds between tries of a restart the broker refuses as "still alive"
RESET_PATIENCE = 5.0        # seconds before such a restart is given up
JOURNAL_LIMIT = 10000       # entries kept (a long-lived host restarts things)
XS_TIMEOUT = 5.0            # seconds for one xenstore request from the supervisor
_BROKER = "broker"
BROKER_STATE = "broker-state"   # RUN_DIR/broker-state: what a broker writes down for the one that takes over
BROKER_FLAP_LIMIT = 3           # broker deaths within BROKER_FLAP_WINDOW before the host is given up
BROKER_FLAP_WINDOW = 60.0
TAKEOVER_FAILED = "still starting when the broker died: the new broker could not take it over"




def switch_of(spec: DomainSpec, unavailable: str | None) -> NetSwitch:
    """A netback's switch on this host: its ``switch`` key, else bridge where the host can make one.

    ``unavailable`` is :func:`netns.unavailable_reason` (None: root, iproute2, namespaces).
    """
    return spec.switch if spec.switch is not None else NetSwitch.default(unavailable)


def check_switches(topology: Topology, unavailable: str | None) -> None:
    """A netback whose topology asks for ``switch = "bridge"`` on a host that cannot make bridges is refused.

    ``unavailable`` is why this host cannot make network namespaces, bridges
    and TAPs (:func:`netns.unavailable_reason`), or None when it can.
    """
    if unavailable is None:
        return
    bad = [d for d in topology.domains if d.kind == DomainKind.NETBACK and d.switch == NetSwitch.BRIDGE]
    if bad:
        raise TopologyError(
            [f"{topology.source}: {d.label}.switch: \"bridge\" needs a Linux bridge and TAP devices in netback's own "
             f"network namespace, which this host cannot make ({unavailable}); run as root with iproute2, or "
             f"set switch = \"builtin\" (netback's own learning switch)" for d in bad]
            + [f"{topology.source}: nothing was started"])


def check_host(topology: Topology, state_dir: str, run_dir: str, ready_timeout: float = READY_TIMEOUT,
               uids: UidMode | str = UidMode.AUTO, facts: HostFacts | None = None) -> dict[str, VmPlan]:
    """Everything that can be refused before anything starts: switches, directories (socket path lengths),
    this host's limits (``host_limits.py``: memory against vm.max_map_count and the host's RAM, starting
    within the ready timeout, uids, the broker's descriptors), disk images, and what the VMs need (QEMU,
    their image, memory, the accelerator: ``vm/supervised.py``).

    Returns each VM guest's plan.  Raises TopologyError or LayoutError.
    """
    check_switches(topology, netns.unavailable_reason())
    Layout(os.path.abspath(state_dir), os.path.abspath(run_dir)).check()
    resolved = topology.resolved(os.path.abspath(state_dir), os.path.abspath(run_dir))
    if facts is None:
        facts = HostFacts.measure(separate_uids=os.geteuid() == 0 and UidMode(uids) != UidMode.SHARED)
    missing = host_limit_problems(resolved, facts, ready_timeout)
    for d in resolved.domains:
        for disk in d.disks:
            if disk.target is None:
                continue
            try:
                mode = os.stat(disk.target).st_mode
            except OSError as e:
                missing.append(f"{topology.source}: {d.label}: disk {disk.vdev}: {disk.target}: {e.strerror}")
                continue
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                missing.append(f"{topology.source}: {d.label}: disk {disk.vdev}: {disk.target} is neither a file "
                               f"nor a block device")
    if missing:
        raise TopologyError(missing + [f"{topology.source}: nothing was started"])
    return check_vms(resolved, os.path.abspath(run_dir))



class SupervisorBase:
    """The state and bookkeeping of one host's supervisor (see this module's docstring for its parts).

    Constructing checks the topology and the directories and starts nothing:
    raises TopologyError (a bridge this host cannot make) or LayoutError.
    """

    def __init__(self, topology: Topology, state_dir: str, run_dir: str, *, uids: UidMode | str = UidMode.AUTO,
                 ready_timeout: float = READY_TIMEOUT, stop_grace: float = STOP_GRACE,
                 health_interval: float = HEALTH_INTERVAL, progress: Callable[[str], None] | None = None,
                 log_level: str = "info") -> None:
        plans = check_host(topology, state_dir, run_dir, ready_timeout, uids)
        topology = topology.resolved(os.path.abspath(state_dir), os.path.abspath(run_dir))
        self.topology = topology
        self.layout = Layout(os.path.abspath(state_dir), os.path.abspath(run_dir))
        self.uid_mode = UidMode(uids)
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self.health_interval = health_interval
        self.log_level = log_level
        self._progress_cb = progress
        self.domains = [SupervisedDomain(s, None, RestartTracker.for_spec(s), HealthCheck(s.limits))
                        for s in topology.domains]
        unavailable = netns.unavailable_reason()
        for d in self.domains:
            if d.kind == DomainKind.NETBACK:
                d.switch = switch_of(d.spec, unavailable)
        self._by_name = {d.name: d for d in self.domains}
        self.xenstored = next((d for d in self.domains if d.kind == DomainKind.XENSTORED), None)
        self.journal: deque[JournalEntry] = deque(maxlen=JOURNAL_LIMIT)
        self.phase = "new"
        self.broker: BrokerProcess | None = None
        self.mgmt: ManagementClient | None = None
        self.uid_plan: UidPlan | None = None
        self._pidfile = PidFile(self.layout.pid_file)
        self._sub: zmq.Socket[bytes] | None = None
        self._control: ControlServer | None = None
        self._front_door: remote.FrontDoor | None = None     # [host] listen: remote clients (remote.py)
        self._poller = zmq.Poller()
        self._fd_handlers: dict[int, Callable[[], None]] = {}
        self._wake: WakePipe | None = WakePipe()
        self._poller.register(self._wake.fileno(), zmq.POLLIN)
        self._broker_pidfd = -1
        self._broker_deaths: list[float] = []
        self._stop_requested = False
        self._stopped = False
        self._fatal = ""
        self._start_queue: deque[SupervisedDomain] = deque()
        self._startup_error = ""
        self._dom0_written = False
        self._next_health = 0.0
        self._next_broker_poll = 0.0
        self._made_exports: dict[str, str] = {}     # export directories outside the run directory we made: guest
        self._seccomp_kills = SeccompKills()      # the kernel log from now on: which syscall a filter refused
        self._disk_serial = 0                     # images handed to blkbacks, numbered
        self.detaches = Detaches()                # devices being detached, followed from the loop
        self._probe: XenstoredProbe | None = None # does xenstored answer (asked before introductions)
        self._introduce_waiting: set[str] = set() # domains to introduce once it does
        self._introduce_stalled_at: str | None = None   # the domain the last unfinished round ended at
        self._store_silent = False                # a request went unanswered since its last answer
        # Devices whose attach was refused after xenstored stopped answering mid-way: their
        # nodes may have been committed, so they are removed once it serves again.
        self._undo_attach: list[tuple[str, str, int, str, str | None]] = []   # kind, guest, devid, backend, export
        # Adoption (adopt.py): what this supervisor writes down, and the host's keeper of descriptors.
        self._boot_id = host_state.boot_id()
        self._digest = host_state.topology_digest(topology)
        self._ident = host_state.identity(os.getpid())
        self._broker_ident: dict[str, int] | None = None
        self._keeper: KeeperClient | None = None
        self._keeper_proc: Any = None
        self._keeper_ident: dict[str, int] | None = None
        self._keeper_pidfd = -1
        self._state_written = b""
        self._adopted_dead: list[SupervisedDomain] = []    # adopted domains found dead: handled when the loop starts
        self.adopted = False
        # The guests' VMs (QEMU beside their guest domains): vm/supervised.py, called at the hooks below.
        self.vms = VmSupervisor(self.domains, plans, self.layout, watch_fd=self._watch_fd,
                                unwatch_fd=self._unwatch_fd, record=self._record, progress=self._progress,
                                ready_timeout=ready_timeout, stop_grace=stop_grace)

    def request_stop(self) -> None:
        """Ask the loop to stop: safe from a signal handler or another thread."""
        self._stop_requested = True
        if self._wake is not None:
            self._wake.wake()

    def _log_to(self, d: SupervisedDomain, text: str) -> None:
        """A line of the supervisor's own in the domain's log, so the log tells the whole story."""
        append_marker(self.layout.log_path(d.name), text)

    def _record(self, name: str, event: str, detail: str = "") -> None:
        self.journal.append(JournalEntry(time.monotonic(), name, event, detail))

    def _progress(self, line: str) -> None:
        if self._progress_cb is not None:
            try:
                self._progress_cb(line)
            except Exception:
                log.exception("progress callback failed")

    def _watch_fd(self, fd: int, handler: Callable[[], None]) -> None:
        self._fd_handlers[fd] = handler
        self._poller.register(fd, zmq.POLLIN)

    def _unwatch_fd(self, fd: int) -> None:
        if self._fd_handlers.pop(fd, None) is not None:
            self._poller.unregister(fd)

    def _needs_store(self, d: SupervisedDomain) -> bool:
        return self.xenstored is not None and d is not self.xenstored

    def _store_up(self) -> bool:
        return self.xenstored is not None and self.xenstored.state == State.RUNNING

    @staticmethod
    def _runs_as(d: SupervisedDomain) -> int:
        """The uid d's process runs under: the broker accepts its hello from that uid only."""
        return d.uid if d.uid is not None else os.geteuid()

    def _delete_netns(self, name: str) -> None:
        try:
            netns.delete(name)
        except netns.NetnsError as e:
            log.warning("%s", e)

    def _signal_group(self, d: SupervisedDomain, sig: int) -> None:
        if d.proc is not None and d.pidfd >= 0:
            signal_group(d.proc.pid, d.pidfd, sig)      # the domain and its children

    def _close_ready(self, d: SupervisedDomain) -> None:
        if d.ready_fd >= 0:
            self._unwatch_fd(d.ready_fd)
            os.close(d.ready_fd)
            d.ready_fd = -1

    def _our_pids(self) -> list[int]:
        """Every process this supervisor watches: the broker, the keeper, the domains, the VMs."""
        pids = [p.pid for p in (self.broker.proc if self.broker else None, self._keeper_proc) if p is not None]
        pids += [d.proc.pid for d in self.domains if d.proc is not None and d.pidfd >= 0]
        pids += self.vms.pids()
        return pids

    def _save_state(self) -> None:
        """Write RUN_DIR/supervisor-state if anything in it changed (host_state.py)."""
        if not self._pidfile.held or self.phase == "stopped":
            return
        model = adopt.snapshot(self)
        written = model.pop("written")
        data = msgpack.packb(model, use_bin_type=True)
        if data == self._state_written:
            return
        model["written"] = written
        try:
            host_state.save(self.layout.run_dir, model)
        except OSError as e:
            log.warning("cannot write %s: %s", self.layout.state_file, e)
            return
        self._state_written = data

    def _start_keeper(self) -> None:
        """The host's keeper (keeper.py), given every descriptor this supervisor must not lose with its life."""
        try:
            proc, client = adopt.keeper_start(self.layout)
        except (RuntimeError, TimeoutError, KeeperError, OSError) as e:
            log.error("the keeper did not start (%s): a supervisor that dies now takes the device channels and "
                      "uid locks of its domains along", e)
            return
        self._keeper_proc, self._keeper = proc, client
        self._keeper_ident = host_state.identity(proc.pid)
        self._watch_keeper()
        self._keep_uid_locks()
        for d in self.domains:
            if d.devices is not None:
                self._keep(f"dev/{d.name}", d.devices.fileno())
            if d.ready_fd >= 0:
                self._keep(f"ready/{d.name}", d.ready_fd)
        self._save_state()

    def _watch_keeper(self) -> None:
        proc = self._keeper_proc
        assert proc is not None
        if self._keeper_ident is None:
            self._keeper_ident = host_state.identity(proc.pid)
        self._keeper_pidfd = proc.pidfd() if getattr(proc, "adopted", False) else os.pidfd_open(proc.pid)
        self._watch_fd(self._keeper_pidfd, self._on_keeper_exit)

    def _on_keeper_exit(self) -> None:
        proc = self._keeper_proc
        self._unwatch_fd(self._keeper_pidfd)
        os.close(self._keeper_pidfd)
        self._keeper_pidfd = -1
        how = ExitStatus.from_returncode(proc.wait()).describe() if proc is not None else "ended"
        if self._keeper is not None:
            self._keeper.close()
        self._keeper = self._keeper_proc = self._keeper_ident = None
        self._record("keeper", "exit", how)
        if self._stop_requested:
            return
        log.error("the keeper %s; starting another and giving it what it held", how)
        self._start_keeper()

    def _stop_keeper(self) -> None:
        if self._keeper_pidfd >= 0:
            self._unwatch_fd(self._keeper_pidfd)
            os.close(self._keeper_pidfd)
            self._keeper_pidfd = -1
        if self._keeper is not None:
            try:
                self._keeper.exit()
            except KeeperError as e:
                log.warning("%s", e)
            self._keeper.close()
            self._keeper = None
        proc, self._keeper_proc = self._keeper_proc, None
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if getattr(proc, "adopted", False):
                proc.close()
        self._keeper_ident = None

    def _keep(self, name: str, fd: int) -> None:
        if self._keeper is None:
            return
        try:
            self._keeper.put(name, fd)
        except KeeperError as e:
            log.warning("the keeper did not take %s: %s", name, e)

    def _unkeep(self, *names: str) -> None:
        if self._keeper is None:
            return
        try:
            self._keeper.drop(*names)
        except KeeperError as e:
            log.warning("the keeper did not drop %s: %s", ", ".join(names), e)

    def _forget_kept(self, d: SupervisedDomain) -> None:
        self._unkeep(f"dev/{d.name}", f"ready/{d.name}")

    def _keep_uid_locks(self) -> None:
        if self.uid_plan is not None:
            for name, fd in self.uid_plan.lock_of.items():
                self._keep(f"uid/{name}", fd)



def _last_line(path: str) -> str:
    """The last line of a log, for an error message that says why without sending people hunting."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return (lines[-1] if lines else "(nothing logged)") + f" (see {path})"