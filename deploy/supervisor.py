"""The supervisor: starts a topology's broker and domains in order, keeps them running, stops them in reverse.

Start order: the broker, then the xenstore domain, then driver domains, then
programs and guests, in the topology's order, one at a time: each domain is
launched once the one before it is ready (or has been ready and died, which
its restart policy then handles).  Readiness is signalled, never slept on:

* broker: its ready pipe (``launcher.start_broker``);
* xenstored: its ready pipe (connected to the broker, store restored, serving);
* guest: the broker reports it running (a lifecycle event on the broker's PUB
  socket, with a poll of the broker as the fallback events cannot lose), the
  supervisor has introduced it to xenstored, and it says "ready" on its pipe
  (its ring works: ``domains/guest.py``);
* program: the broker reports it running, i.e. the program called
  ``xdom.domains.xenhost.connect()`` itself, and it was introduced to
  xenstored when the topology has one.  A process that never connects is not
  a domain: after ``ready_timeout`` it is left running as a plain process,
  with a warning and ``connected: false`` in ``xdom ps``.

For each domain the supervisor does what libxl does at domain build: the
broker's ``create`` (or ``restart``, which keeps the domid), ``setup_store``
before the process starts, and once it runs, the xenstore nodes of
``/local/domain/<domid>`` (``deploy/xsnodes.py``) and ``XS_INTRODUCE``.

Everything after start-up happens in one loop (``zmq.Poller``): broker events,
the control socket (``deploy/control.py``), a wake pipe for signals, every
domain process's pidfd and readiness pipe, and timers (readiness deadlines,
stop grace periods, restart backoff, the health sample every second).  No
handler waits for a process, so ``xdom ps`` answers during a restart.  Exits
go through the restart policy (``deploy/policy.py``); a domain over its
topology ``limits`` is killed with a log line saying why, and is then handled
like any other death.  A restarted domain keeps its domid; the xenstore
domain restarts on its own state directory, so guests keep their rings.

Stopping runs in reverse start order: SIGTERM to the domain's process group,
``stop_grace`` seconds, SIGKILL to the group, reap, ``destroy`` in the
broker; then the broker; then the keeper; then the run directory's files.
:meth:`stop` is idempotent and runs on every error path, so nothing outlives
it.

The host outlives a supervisor that dies outright (SIGKILL, OOM): nothing
it starts has a parent-death signal, everything runs in a session of its
own, the descriptors it must not lose live on in the host's keeper
(``deploy/keeper.py``) and what it knows is in ``RUN_DIR/supervisor-state``
(``deploy/host_state.py``), rewritten whenever it changes.  A new supervisor
of the same topology adopts the host from there (``deploy/adopt.py``), and
``xdom down`` stops it without one.
"""

from __future__ import annotations

import dataclasses
import errno
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
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Callable, Iterator

import msgpack
import psutil
import zmq

from xdom.domains.confinement import mode as confinement_mode
from xdom.domains.device_channel import offer_fd
from xdom.domains.wakeup import WakePipe
from xdom.broker.mgmt_client import ManagementClient, ManagementError
from xdom.domains.xenstore import UnixTransport, XenstoreClient
from xdom.domains.xs_wire import XenstoreError

from .access import AccessError, grant_search, private_dir
from .confined import SeccompKills, confinement_of, parse_ready
from .control import ControlError, ControlProtocol, ControlServer, endpoint_for, string_field
from . import netns
from .isolation import DOMAIN_EXEC, UidMode, UidPlan, plan_uids
from . import adopt, host_state
from .keeper import KeeperClient, KeeperError
from .host_limits import HostFacts
from .host_limits import problems as host_limit_problems
from .launcher import BrokerProcess, start_broker, start_domain_process
from .policy import Action, ExitStatus, HealthCheck, HealthSample, RestartTracker
from .rundir import Layout, LayoutError, PidFile, clear_run_files, make_dirs, remove_run_dir, stop_leftovers
from .topology import (DEFAULT_BRIDGE, DomainKind, DomainSpec, NetSwitch, Topology, TopologyError, bridge_name_problem,
                       vif_devids, vif_queues)
from .vbd import VbdConfig, add_vbd, remove_vbd
from .bridge import backend_tap_name, ensure_bridge, ensure_port
from .tap import TapError, create_tap, delete_tap, open_tun, tap_exists
from .vif import VifConfig, add_vif, remove_vif
from .topology import export_problem
from .vm.supervised import VmPlan, VmSupervisor, check_vms
from .xlcfg import EXPORT_NBD, EXPORT_VHOST_USER, DiskSpec, VifSpec, XlCfgError, default_vif_export, generate_mac, \
    parse_disk, parse_vif
from .xsnodes import domain_path, write_dom0_nodes, write_domain_nodes

__all__ = ["READY_TIMEOUT", "STOP_GRACE", "AlreadyRunning", "JournalEntry", "State",
           "StartupError", "Supervisor", "SupervisorError", "check_host",
           "check_switches", "switch_of"]

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


class SupervisorError(Exception):
    """The host could not be started or kept running."""


class StartupError(SupervisorError):
    """A domain could not be started; everything started was stopped again."""


class AlreadyRunning(SupervisorError):
    """Another supervisor holds this run directory."""


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


class State(StrEnum):
    PENDING = "pending"        # not launched yet (start-up order)
    STARTING = "starting"      # process launched, not ready yet
    RUNNING = "running"
    STOPPING = "stopping"      # SIGTERM sent, waiting for the exit
    BACKOFF = "backoff"        # dead; to be restarted
    EXITED = "exited"          # dead; its restart policy leaves it down
    FAILED = "failed"          # dead; flapping, or could not be launched
    DESTROYED = "destroyed"    # removed from the broker on request
    STOPPED = "stopped"        # stopped with the host


_ALIVE = (State.STARTING, State.RUNNING, State.STOPPING)


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """What the supervisor did or saw, in order: the record tests and ``xdom ps`` history rely on."""

    time: float
    name: str
    event: str
    detail: str = ""


@dataclass(eq=False)
class _Domain:
    spec: DomainSpec
    uid: int | None
    tracker: RestartTracker
    health: HealthCheck
    state: State = State.PENDING
    domid: int | None = None
    creds: dict[str, Any] | None = None
    store: tuple[int, int] | None = None         # (gfn, port) from setup_store
    proc: subprocess.Popen[bytes] | None = None
    pidfd: int = -1
    ready_fd: int = -1
    ready_seen: bool = False
    devices: socket.socket | None = None          # device channel: a guest's hot-added vifs, a bridged netback's TAPs
    switch: NetSwitch | None = None               # a netback's: bridge or builtin, fixed when the host starts
    offered: set[tuple[int, int]] = field(default_factory=set)  # a bridged netback's: (fe domid, devid) whose TAP
                                                                # this process's channel was given
    connected: bool = False
    introduced: bool = False
    started_once: bool = False
    waiting_for_store: bool = False
    generation: int = 0
    changes: int = 0                              # state changes, so a client sees that something happened
    started_mono: float = 0.0
    deadline: float | None = None
    reset_since: float | None = None
    after_stop: str = ""
    kill_reason: str = ""
    confinement: str = ""                         # as the process reported it with its readiness
    netns: str | None = None                      # its network namespace (as root), made before it starts
    last_exit: str = ""
    sample: HealthSample | None = None
    ps_cache: dict[int, psutil.Process] = field(default_factory=dict)
    ident: dict[str, int] | None = None           # its process by pid and start time, as the state file names it

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> DomainKind:
        return self.spec.kind

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.pidfd >= 0 else None


class Supervisor:
    """Runs one topology: ``start()``, then ``serve()`` until ``request_stop()``; ``stop()`` always.

    ``progress`` receives one line per step worth telling a person (the
    command line prints them).  Constructing checks the topology and the
    directories and starts nothing: raises TopologyError (a bridge this
    host cannot make) or LayoutError.
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
        self.domains = [_Domain(s, None, RestartTracker.for_spec(s), HealthCheck(s.limits)) for s in topology.domains]
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
        self._poller = zmq.Poller()
        self._fd_handlers: dict[int, Callable[[], None]] = {}
        self._wake: WakePipe | None = WakePipe()
        self._poller.register(self._wake.fileno(), zmq.POLLIN)
        self._broker_pidfd = -1
        self._broker_deaths: list[float] = []
        self._stop_requested = False
        self._stopped = False
        self._fatal = ""
        self._start_queue: deque[_Domain] = deque()
        self._startup_error = ""
        self._dom0_written = False
        self._next_health = 0.0
        self._next_broker_poll = 0.0
        self._made_exports: dict[str, str] = {}     # export directories outside the run directory we made: guest
        self._seccomp_kills = SeccompKills()      # the kernel log from now on: which syscall a filter refused
        self._disk_serial = 0                     # images handed to blkbacks, numbered
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
        self._adopted_dead: list[_Domain] = []    # adopted domains found dead: handled when the loop starts
        self.adopted = False
        # The guests' VMs (QEMU beside their guest domains): vm/supervised.py, called at the hooks below.
        self.vms = VmSupervisor(self.domains, plans, self.layout, watch_fd=self._watch_fd,
                                unwatch_fd=self._unwatch_fd, record=self._record, progress=self._progress,
                                ready_timeout=ready_timeout, stop_grace=stop_grace)

    # ---- public API ----------------------------------------------------------

    def start(self) -> bool:
        """Start everything in order; True once all is up, False if a stop was requested meanwhile.

        Raises StartupError (a domain could not be started), AlreadyRunning,
        IsolationError or SupervisorError; whatever happens, what was started
        is stopped again before this raises or returns False.
        """
        try:
            self._setup()
            self.phase = "starting"
            self._start_queue = deque(self.domains)
            while not self._stop_requested:
                self._advance_start()
                if self._startup_error:
                    raise StartupError(self._startup_error)
                if not self._start_queue:
                    break
                self._turn()
            if self._fatal:
                raise SupervisorError(self._fatal)
            if self._stop_requested:
                self.stop()
                return False
            self.phase = "running"
            self._record("supervisor", "up")
            return True
        except BaseException:
            self.stop()
            raise

    def serve(self) -> None:
        """Supervise until :meth:`request_stop` (or the broker dies: SupervisorError); then stop everything."""
        try:
            while not self._stop_requested:
                self._turn()
        finally:
            self.stop()
        if self._fatal:
            raise SupervisorError(self._fatal)

    def request_stop(self) -> None:
        """Ask the loop to stop: safe from a signal handler or another thread."""
        self._stop_requested = True
        if self._wake is not None:
            self._wake.wake()

    def stop(self) -> None:
        """Stop every domain in reverse start order, then the broker; remove the run files.  Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_requested = True
        self.phase = "stopping"
        owner = self._pidfile.held        # never touch the files of another supervisor's run directory
        try:
            self._save_state()            # a supervisor killed now leaves a host `xdom down` finishes stopping
            for d in reversed(self.domains):
                try:
                    self._stop_now(d)
                except Exception:
                    log.exception("stopping domain %s failed; going on", d.name)
                self._save_state()
            if self.mgmt is not None:
                self.mgmt.close()
                self.mgmt = None
            if self.broker is not None:
                status = self.broker.stop()
                self._record(_BROKER, "stopped", ExitStatus.from_returncode(status).describe())
                self.broker = None
                self._broker_ident = None
                self._save_state()
        finally:
            if owner:
                for d in self.domains:
                    for path in self._export_sockets(d):
                        _unlink_socket(path)
                    if d.netns is not None:
                        self._delete_netns(d.netns)
                self.vms.close()
            self._close_loop()
            self._stop_keeper()
            if owner:
                clear_run_files(self.layout)
                for folder in self._made_exports:
                    _remove_made_dir(folder)
                # xenstored's store names domids and rings of this broker: meaningless once it is gone
                shutil.rmtree(self.layout.xenstored_state, ignore_errors=True)
            if self.uid_plan is not None:
                self.uid_plan.release()
            self._pidfile.release()
            if owner:
                remove_run_dir(self.layout)
            self.phase = "stopped"

    def status(self) -> list[dict[str, Any]]:
        """One row per domain, as ``xdom ps --json`` prints it (call from the loop's thread)."""
        broker: dict[int, dict[str, Any]] = {}
        if self.mgmt is not None:
            try:
                broker = {s["domid"]: s for s in self.mgmt.request("list")["domains"]}
            except (ManagementError, TimeoutError) as e:
                log.warning("the broker did not list its domains: %s", e)
        for d in self.domains:
            if d.sample is None and d.state in (State.STARTING, State.RUNNING) and d.pidfd >= 0:
                d.sample = self._sample(d)
        return [self._row(d, broker.get(d.domid) if d.domid is not None else None) for d in self.domains]

    # ---- set-up --------------------------------------------------------------

    def _setup(self) -> None:
        lay = self.layout
        try:
            lay.check_trust()           # nothing is made, read or connected to in a directory others can write
        except LayoutError as e:
            raise SupervisorError(str(e)) from None
        make_dirs(lay.run_dir, 0o755)
        try:
            self._pidfile.acquire()
        except LayoutError as e:
            raise AlreadyRunning(str(e)) from None
        saved = self._saved_host()
        self._seccomp_kills.open()
        if saved is not None:
            self._adopt(saved)
            return
        self._sweep_leftovers()
        self.uid_plan = plan_uids(self.topology, self.uid_mode)
        for d in self.domains:
            d.uid = self.uid_plan.uids.get(d.name)
        self.vms.separate_uids = self.uid_plan.separate
        if self._progress_cb is not None:       # said once: where `xdom up` shows progress, else in the log
            self._progress(f"uids: {self.uid_plan.note}")
        else:
            (log.info if self.uid_plan.separate else log.warning)("%s", self.uid_plan.note)
        why_not = netns.unavailable_reason()
        if why_not is None:
            for d in self.domains:
                d.netns = netns.netns_name(d.name, self.layout.run_dir)
            self._progress("network: each domain in its own namespace (ip netns list: xdom-NAME-...)")
        else:
            log.warning("every domain shares the host's network namespace: %s", why_not)
            self._progress(f"network: every domain shares the host's namespace ({why_not})")
        self._prepare_dirs()
        self._start_keeper()
        # A new host: whatever a broker of an earlier run wrote down describes domains long gone.
        shutil.rmtree(os.path.join(lay.run_dir, BROKER_STATE), ignore_errors=True)
        try:
            self._start_broker()
        except (RuntimeError, TimeoutError) as e:
            raise SupervisorError(f"the broker did not start ({e}): {_last_line(lay.log_path(_BROKER))}") from None
        assert self.broker is not None
        self._record(_BROKER, "ready", f"pid {self.broker.proc.pid}")
        self._progress(f"broker: ready (pid {self.broker.proc.pid}, log {lay.log_path(_BROKER)})")
        self._connect_loop()
        self._save_state()

    def _start_broker(self) -> None:
        """A broker for this host (it takes over from RUN_DIR/broker-state when there is one), watched."""
        lay = self.layout
        self.broker = start_broker(lay.run_dir, log_path=lay.log_path(_BROKER))
        self._broker_ident = host_state.identity(self.broker.proc.pid)
        self._broker_pidfd = os.pidfd_open(self.broker.proc.pid)
        self._watch_fd(self._broker_pidfd, self._on_broker_exit)
        self.mgmt = self.broker.client()

    def _connect_loop(self) -> None:
        """The broker's events and the control socket, in the loop."""
        lay = self.layout
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"domain")
        sub.connect(lay.events_endpoint)
        self._sub = sub
        self._poller.register(sub, zmq.POLLIN)
        self._control = ControlServer(endpoint_for(lay.control_socket), ControlProtocol({
            "ping": self._op_ping, "ps": self._op_ps, "info": self._op_info, "restart": self._op_restart,
            "destroy": self._op_destroy, "stop": self._op_stop, "block-attach": self._op_block_attach,
            "block-detach": self._op_block_detach, "network-attach": self._op_network_attach,
            "network-detach": self._op_network_detach}))
        self._poller.register(self._control.socket, zmq.POLLIN)

    # ---- adoption (adopt.py), the state file (host_state.py), the keeper (keeper.py) ------------------

    def _saved_host(self) -> dict[str, Any] | None:
        """The state file of a host still running in this run directory, to adopt; None to start afresh.

        Raises AlreadyRunning (the pid file released, nothing touched) when
        the live host was started from another topology.
        """
        lay = self.layout
        try:
            model = host_state.load(lay.run_dir)
        except host_state.StateError as e:
            log.warning("%s: not adopted; whatever of this run directory still runs is stopped", e)
            return None
        if model is None:
            return None
        if not adopt.host_alive(model):
            log.info("the host a supervisor of %s left has stopped: starting afresh", lay.run_dir)
            self._clear_dead_host(model)
            return None
        if model.get("digest") != self._digest or model.get("state_dir") != lay.state_dir:
            self._pidfile.release()
            raise AlreadyRunning(
                f"a host started from {model.get('topology')} (state {model.get('state_dir')}) still runs in "
                f"{lay.run_dir}, without its supervisor, and it is not this topology's (its domains differ): "
                f"xdom up {model.get('topology')} adopts it, xdom down --run-dir {lay.run_dir} stops it")
        if model.get("phase") in ("stopping", "stopped"):
            # Its supervisor died while stopping it: finish that, then start afresh.
            self._pidfile.release()
            done, _ = adopt.stop_orphaned(lay.run_dir)
            log.warning("finished stopping the host its supervisor was stopping when it died: %s", "; ".join(done))
            make_dirs(lay.run_dir, 0o755)
            try:
                self._pidfile.acquire()
            except LayoutError as e:
                raise AlreadyRunning(str(e)) from None
            return None
        return model

    def _clear_dead_host(self, model: dict[str, Any]) -> None:
        """What a host that stopped while no supervisor ran left: its namespaces, its export directories."""
        for rec in model.get("domains", []):
            if rec.get("netns") and netns.unavailable_reason() is None and netns.exists(rec["netns"]):
                self._delete_netns(rec["netns"])
        for folder in model.get("made_exports") or {}:
            _remove_made_dir(str(folder))

    def _adopt(self, model: dict[str, Any]) -> None:
        self.adopted = True
        for line in adopt.adopt(self, model):
            self._progress(line)
        self._record("supervisor", "adopted", f"from pid {(model.get('supervisor') or {}).get('pid')}")
        self._save_state()
        dead, self._adopted_dead = self._adopted_dead, []
        for d in dead:
            pid = ((d.ident or {}) if d.ident else {}).get("pid")
            status = adopt.status_after_adopted_death(self.mgmt, d.domid, pid, settle=0.0)
            reason = "it ended while no supervisor ran"
            self._record(d.name, "exit", f"{status.describe()} ({reason})")
            self._log_to(d, f"{status.describe()} ({reason})")
            self._after_death(d, status, reason, uptime=time.monotonic() - d.started_mono)
        for d in self.domains:          # adopted mid-start: what its dead supervisor had not done yet
            if d.state == State.STARTING and d.pidfd >= 0 and d.connected:
                if self._needs_store(d) and self._store_up() and not d.introduced:
                    self._introduce(d)
                self._maybe_ready(d)

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

    def _forget_kept(self, d: _Domain) -> None:
        self._unkeep(f"dev/{d.name}", f"ready/{d.name}")

    def _keep_uid_locks(self) -> None:
        if self.uid_plan is not None:
            for name, fd in self.uid_plan.lock_of.items():
                self._keep(f"uid/{name}", fd)

    def _prepare_dirs(self) -> None:
        """Logs are the supervisor's (domains get an fd); xenstored's store and socket directories are its own.

        The store is made fresh: one left by an earlier run names domids and
        rings of a broker that is gone.
        """
        lay = self.layout
        make_dirs(lay.state_dir, 0o755)
        make_dirs(lay.logs_dir, 0o750)
        if self.uid_plan is not None and self.uid_plan.separate:
            # Domains under other uids must reach the hypercall socket and their own directories (search only).
            for d in (lay.state_dir, lay.run_dir):
                os.chmod(d, stat.S_IMODE(os.stat(d).st_mode) | 0o011)
            # ... through whatever ancestors others cannot search (a mkdtemp directory, a home).
            for uid in sorted({u for u in self.uid_plan.uids.values() if u is not None}):
                for d in (lay.state_dir, lay.run_dir):
                    try:
                        grant_search(d, uid)
                    except AccessError as e:
                        raise SupervisorError(f"{e}: domains under their own uids could not reach {d}; make "
                                              f"its ancestors searchable by others or run with --uids shared") \
                            from None
        xs_uid = self.xenstored.uid if self.xenstored is not None else None
        # What an earlier host left in directories domains could write goes (rmtree follows no symlink):
        # the guests' export directories are made afresh for this host's uids, each when its guest starts.
        for path in (lay.xenstored_state, lay.xenstored_run, lay.exports_dir, lay.vms_dir):
            shutil.rmtree(path, ignore_errors=True)
        for path in (lay.xenstored_state, lay.xenstored_run):
            os.mkdir(path, 0o700)
            if xs_uid is not None:
                os.chown(path, xs_uid, xs_uid)
        os.mkdir(lay.exports_dir, 0o755)
        os.chmod(lay.exports_dir, 0o755)
        if os.path.lexists(lay.xenstored_link):
            os.unlink(lay.xenstored_link)
        if self.xenstored is not None:
            os.symlink(os.path.relpath(lay.xenstored_socket, lay.run_dir), lay.xenstored_link)

    def _sweep_leftovers(self) -> None:
        """Stop what a supervisor of this run directory that died outright left behind (we hold the pid file)."""
        for what in stop_leftovers(self.layout.run_dir):
            log.warning("stopped %s, left over from an earlier supervisor of %s", what, self.layout.run_dir)
        if netns.unavailable_reason() is None:
            for name in netns.of_host(self.layout.run_dir):
                log.warning("removing network namespace %s, left over from an earlier supervisor", name)
                self._delete_netns(name)

    # ---- the loop ------------------------------------------------------------

    def _watch_fd(self, fd: int, handler: Callable[[], None]) -> None:
        self._fd_handlers[fd] = handler
        self._poller.register(fd, zmq.POLLIN)

    def _unwatch_fd(self, fd: int) -> None:
        if self._fd_handlers.pop(fd, None) is not None:
            self._poller.unregister(fd)

    def _turn(self) -> None:
        """One wait and everything that became due."""
        now = time.monotonic()
        due = [self._next_health]
        due += [d.deadline for d in self.domains if d.deadline is not None]
        due += self.vms.deadlines()
        if self._awaiting_connect():
            due.append(self._next_broker_poll)
        timeout = max(0.0, min(min(due) - now, 1.0))
        for sock, _ in self._poller.poll(int(timeout * 1000) + (1 if timeout > 0 else 0)):
            if self._wake is not None and sock == self._wake.fileno():
                self._wake.drain()
            elif sock is self._sub:
                self._on_broker_events()
            elif self._control is not None and sock is self._control.socket:
                self._control.serve()
            elif isinstance(sock, int) and sock in self._fd_handlers:
                self._fd_handlers[sock]()
        self._timers(time.monotonic())
        self._save_state()

    def _awaiting_connect(self) -> bool:
        return any(d.state == State.STARTING and not d.connected and d.pidfd >= 0 for d in self.domains)

    def _timers(self, now: float) -> None:
        for d in self.domains:
            if d.deadline is not None and now >= d.deadline:
                d.deadline = None
                self._deadline(d, now)
        if now >= self._next_broker_poll and self._awaiting_connect():
            self._next_broker_poll = now + BROKER_POLL
            self._poll_broker()
        if now >= self._next_health:
            self._next_health = now + self.health_interval
            if any(d.state == State.RUNNING and not d.connected and d.pidfd >= 0 for d in self.domains):
                self._poll_broker()     # a program that connects late: slower than while starting
            self._check_health()
            self.vms.check_health()
        self.vms.timers(now)

    def _deadline(self, d: _Domain, now: float) -> None:
        if d.state == State.STARTING:
            if d.kind == DomainKind.PROGRAM and not d.connected:
                log.warning("program %s (pid %s) has not connected to the broker within %gs: it runs as a plain "
                            "process, not a domain, and stays dumpable (a program calls xdom.domains.xenhost.connect())",
                            d.name, d.pid, self.ready_timeout)
                self._progress(f"{d.name}: program started (pid {d.pid}) but not connected to the broker: "
                               f"not a domain")
                self._mark_running(d)
            else:
                missing = ("it has not connected to the broker" if not d.connected else
                           "xenstore set-up did not succeed" if self._needs_store(d) and not d.introduced else
                           "it did not signal ready")
                self._kill(d, f"not ready within {self.ready_timeout:g}s ({missing})")
        elif d.state == State.STOPPING:
            self._signal_group(d, signal.SIGKILL)
        elif d.state == State.BACKOFF:
            self._launch(d)

    def _advance_start(self) -> None:
        """Launch the next domain of the start order once the one before it has been ready."""
        while self._start_queue:
            head = self._start_queue[0]
            if head.state == State.PENDING:
                self._launch(head)
            if head.started_once:
                why = self.vms.start_problem(head)      # a guest's VM, if it has one, is part of its start
                if why:
                    self._startup_error = why
                if why is None:
                    self._start_queue.popleft()
                    continue
                return
            if head.state in (State.EXITED, State.FAILED, State.DESTROYED):
                self._startup_error = (f"{head.kind} domain {head.name} did not start: {head.last_exit or head.state}"
                                       f"; see {self.layout.log_path(head.name)}")
            return

    # ---- launching -----------------------------------------------------------

    def _needs_store(self, d: _Domain) -> bool:
        return self.xenstored is not None and d is not self.xenstored

    def _store_up(self) -> bool:
        return self.xenstored is not None and self.xenstored.state == State.RUNNING

    def _launch(self, d: _Domain) -> None:
        """Create (or restart, keeping the domid) the domain in the broker and start its process."""
        now = time.monotonic()
        assert self.mgmt is not None
        if self._needs_store(d) and not self._store_up():
            if self.xenstored is not None and self.xenstored.state in (State.EXITED, State.FAILED,
                                                                       State.DESTROYED):
                d.last_exit = f"its xenstore domain {self.xenstored.name} is {self.xenstored.state}"
                log.error("%s domain %s cannot start: %s", d.kind, d.name, d.last_exit)
                self._set_state(d, State.FAILED, d.last_exit)
                self.vms.domain_gone(d, d.last_exit)
                self._release_down(d)
                return
            d.waiting_for_store = True          # launched when xenstored is running again
            self._set_state(d, State.BACKOFF, "waiting for xenstored")
            return
        d.waiting_for_store = False
        try:
            creds = self._credentials(d)
            if creds is None:                   # the broker has not seen the old process die yet
                d.reset_since = d.reset_since or now
                if now - d.reset_since > RESET_PATIENCE:
                    d.last_exit = f"the broker still reports domain {d.domid} alive after {RESET_PATIENCE:g}s"
                    log.error("%s domain %s cannot restart: %s", d.kind, d.name, d.last_exit)
                    self._set_state(d, State.FAILED, d.last_exit)
                    self.vms.domain_gone(d, d.last_exit)
                    self._release_down(d)
                    return
                self._set_state(d, State.BACKOFF, "waiting for the broker")
                d.deadline = now + RESET_RETRY
                return
            d.reset_since = None
            d.creds, d.domid = creds, int(creds["domid"])
            d.store = None
            if self._needs_store(d):
                assert self.xenstored is not None and self.xenstored.domid is not None
                st = self.mgmt.request("setup_store", domid=d.domid, xenstore_domid=self.xenstored.domid)
                d.store = (int(st["gfn"]), int(st["port"]))
        except (ManagementError, TimeoutError) as e:
            self._launch_failed(d, f"the broker refused: {e}")
            return
        self._spawn(d, creds)

    def _credentials(self, d: _Domain) -> dict[str, Any] | None:
        assert self.mgmt is not None
        if d.domid is not None:
            try:
                return self.mgmt.request("restart", domid=d.domid, uid=self._runs_as(d))
            except ManagementError as e:
                if e.errno_name == "ESRCH":           # destroyed behind our back: a new domain
                    d.domid = d.creds = None
                elif e.errno_name == "EBUSY":
                    info = self.mgmt.request("info", domid=d.domid)["domain"]
                    # "created" with its token unused: the last process never said hello.
                    return d.creds if info["state"] == "created" else None
                else:
                    raise
        return self.mgmt.request("create", name=d.name, memory=d.spec.memory_arg,
                                 privileged=d.kind == DomainKind.XENSTORED, uid=self._runs_as(d))

    @staticmethod
    def _runs_as(d: _Domain) -> int:
        """The uid d's process runs under: the broker accepts its hello from that uid only."""
        return d.uid if d.uid is not None else os.geteuid()

    def _argv(self, d: _Domain, ready_w: int, tun_fds: dict[int, int] | None = None,
              device_fd: int = -1) -> tuple[list[str], str]:
        """The domain's command line (wrapped by domain_exec) and its working directory."""
        py = sys.executable
        if d.kind == DomainKind.XENSTORED:
            argv = [py, "-m", "xdom.deploy.cli", "--log-level", self.log_level, "xenstored",
                    "--unix-socket", self.layout.xenstored_socket, "--state-dir", self.layout.xenstored_state,
                    "--ready-fd", str(ready_w)]
            cwd = "/"
        elif d.kind == DomainKind.GUEST:
            # A disk is an NBD export for host programs, or a vhost-user-blk device for a VM.
            disks = [(f"--vhost-user-disk={disk.devid}:" if disk.export_kind == EXPORT_VHOST_USER else
                      f"--disk={disk.devid}:") + self._export_path(d, disk) for disk in d.spec.disks]
            # Each TAP vif comes with a /dev/net/tun descriptor we opened in its namespace: a
            # domain under its own uid cannot open the device (mode 0600 here), but may
            # attach to a TAP it owns.
            disks += [f"--vif={devid}:{_ifname(devid)}" + (f":{tun_fds[devid]}" if tun_fds and devid in tun_fds
                                                             else "") for devid, _ in _tap_vifs(d.spec)]
            # A VM's vif is a vhost-user-net device on a socket of the guest domain's.
            disks += [f"--vhost-user-vif={devid}:{self._vif_export(d, devid, vif)}:{vif_queues(vif, d.spec.vm)}"
                      for devid, vif in _vifs(d.spec) if vif.export_kind == EXPORT_VHOST_USER]
            if device_fd >= 0:
                disks.append(f"--device-fd={device_fd}")
            disks.append(f"--export-dir={self.layout.export_dir(d.name)}")    # where hot-attached disks' exports go
            argv = [py, "-m", "xdom.domains.guest", "--ready-fd", str(ready_w), *disks, "--",
                    *(d.spec.workload or ())]
            cwd = "/"
        elif d.kind == DomainKind.BLKBACK:
            # Images come open over its device channel: blkback opens nothing by path.
            argv = [py, "-m", "xdom.backends.blkback", "--ready-fd", str(ready_w), "--device-fd", str(device_fd)]
            cwd = "/"
        elif d.kind == DomainKind.NETBACK:
            argv = [py, "-m", "xdom.backends.netback", "--ready-fd", str(ready_w)]
            if d.switch == NetSwitch.BRIDGE:
                argv += ["--bridge", "--device-fd", str(device_fd)]
            cwd = "/"
        else:
            argv = list(d.spec.command or ())
            cwd = os.path.dirname(os.path.abspath(self.topology.source)) if os.path.exists(self.topology.source) \
                else "/"
        wrap = [py, "-I", "-S", DOMAIN_EXEC]        # no parent-death signal: the host outlives its supervisor
        if d.spec.limits.fds is not None:
            wrap += ["--nofile", str(d.spec.limits.fds)]
        return [*wrap, "--", *argv], cwd

    def _spawn(self, d: _Domain, creds: dict[str, Any]) -> None:
        try:
            self._prepare_exports(d)
        except (AccessError, OSError) as e:
            self._launch_failed(d, f"cannot prepare its disk exports: {e}")
            return
        tun_fds: dict[int, int] = {}
        if d.kind == DomainKind.GUEST and d.domid is not None:
            for b in self.domains:          # its vifs' TAPs are offered again when its nodes are written
                b.offered = {k for k in b.offered if k[0] != d.domid}
        try:
            self._prepare_vifs(d)
            if d.netns is not None:
                for devid, _ in _tap_vifs(d.spec):
                    tun_fds[devid] = open_tun(d.netns)
        except (netns.NetnsError, TapError, OSError) as e:
            for fd in tun_fds.values():
                os.close(fd)
            self._launch_failed(d, f"cannot make its network interfaces: {e}")
            return
        try:
            self._spawn_process(d, creds, tun_fds)
        finally:
            # Ours to close at once: a copy left open would keep the TAP attached after the guest dies.
            for fd in tun_fds.values():
                os.close(fd)

    def _spawn_process(self, d: _Domain, creds: dict[str, Any], tun_fds: dict[int, int]) -> None:
        ready_r = ready_w = -1
        if d.kind in _READY_PIPE_KINDS:
            ready_r, ready_w = os.pipe()
        devices = theirs = None
        if d.kind in (DomainKind.GUEST, DomainKind.BLKBACK) or d.switch == NetSwitch.BRIDGE:
            devices, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            devices.setblocking(False)
        argv, cwd = self._argv(d, ready_w, tun_fds, theirs.fileno() if theirs is not None else -1)
        d.generation += 1
        logfd = os.open(self.layout.log_path(d.name), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            _log_marker(logfd, f"starting {d.kind} domain {d.name} (domid {d.domid}, generation {d.generation}"
                               f"{f', uid {d.uid}' if d.uid is not None else ''}): {' '.join(argv)}")
            env = dict(os.environ, XDOM_LOG_LEVEL=self.log_level)
            # xdom's own Python comes first, so a program's "python3 -m ..." finds xdom
            env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
            with self._in_netns(d):
                d.proc = start_domain_process(creds, argv, env=env, uid=d.uid, stdin=subprocess.DEVNULL,
                                              stdout=logfd, stderr=subprocess.STDOUT,
                                              pass_fds=((ready_w,) if ready_w >= 0 else ()) + tuple(tun_fds.values())
                                              + ((theirs.fileno(),) if theirs is not None else ()),
                                              cwd=cwd)
        except (OSError, subprocess.SubprocessError, netns.NetnsError) as e:
            for fd in (ready_r, ready_w):
                if fd >= 0:
                    os.close(fd)
            if devices is not None:
                devices.close()
            self._launch_failed(d, f"cannot start its process: {e}")
            return
        finally:
            os.close(logfd)
            if theirs is not None:
                theirs.close()
        d.devices = devices
        d.offered.clear()           # a new channel: the new process has been given nothing yet
        if ready_w >= 0:
            os.close(ready_w)
        d.ident = host_state.identity(d.proc.pid)
        if devices is not None:
            self._keep(f"dev/{d.name}", devices.fileno())
        if ready_r >= 0:
            self._keep(f"ready/{d.name}", ready_r)
        d.pidfd = os.pidfd_open(d.proc.pid)
        self._watch_fd(d.pidfd, lambda: self._on_process_exit(d))
        d.ready_fd, d.ready_seen = ready_r, False
        if ready_r >= 0:
            self._watch_fd(ready_r, lambda: self._on_ready_pipe(d))
        d.connected = d.introduced = False
        d.kill_reason = ""
        d.confinement = ""
        d.sample = None
        d.ps_cache.clear()
        d.health.reset()
        d.started_mono = time.monotonic()
        d.deadline = d.started_mono + self.ready_timeout
        self._set_state(d, State.STARTING, f"pid {d.proc.pid}, domid {d.domid}, generation {d.generation}")
        self._record(d.name, "spawn", f"pid {d.proc.pid} domid {d.domid}")
        self._save_state()          # a supervisor that dies from now on leaves this process written down
        if d.switch == NetSwitch.BRIDGE:
            # Its TAPs persist in its namespace, but this process has a new channel: every vif it
            # serves gets its TAP (made again if need be) before the vif's nodes are written anew.
            for be, fe, devid, vif in self._served_vifs(d):
                try:
                    self._plug(be, fe, devid, vif)
                except (TapError, netns.NetnsError, OSError) as e:
                    self._plug_failed(fe, devid, be, e)

    @contextmanager
    def _in_netns(self, d: _Domain) -> Iterator[None]:
        """The domain's process is forked inside its namespace (made on first start, kept across restarts)."""
        if d.netns is None:
            yield
            return
        netns.create(d.netns)
        with netns.entered(d.netns):
            yield

    def _delete_netns(self, name: str) -> None:
        try:
            netns.delete(name)
        except netns.NetnsError as e:
            log.warning("%s", e)

    def _launch_failed(self, d: _Domain, why: str) -> None:
        """A launch that never got a process: a failure for the restart policy, like status 127."""
        log.error("domain %s: %s", d.name, why)
        self._after_death(d, ExitStatus(code=127), why, uptime=0.0)

    # ---- readiness -----------------------------------------------------------

    def _on_ready_pipe(self, d: _Domain) -> None:
        try:
            data = os.read(d.ready_fd, 256)
        except OSError:
            data = b""
        self._close_ready(d)
        self._unkeep(f"ready/{d.name}")
        if data:
            d.ready_seen = True
            d.confinement = parse_ready(data)
            if d.kind == DomainKind.XENSTORED:
                d.connected = True      # it connects to the broker before it serves
            self._maybe_ready(d)
        # EOF: the process is going; its pidfd says how.

    def _on_broker_events(self) -> None:
        assert self._sub is not None
        while True:
            try:
                _topic, body = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                ev = msgpack.unpackb(body, raw=False)
                kind, domid = ev["event"], ev["domid"]
            except Exception:
                continue
            d = next((x for x in self.domains if x.domid == domid), None)
            if d is None:
                continue
            self._record(d.name, f"broker:{kind}", str(ev.get("reason") or ""))
            if kind == "running" and not d.connected and d.pidfd >= 0:
                self._check_connected(d)

    def _check_connected(self, d: _Domain) -> None:
        """The broker says the domain runs: is it this incarnation (same pid)?"""
        assert self.mgmt is not None
        try:
            info = self.mgmt.request("info", domid=d.domid)["domain"]
        except (ManagementError, TimeoutError):
            return
        if info["state"] in ("running", "paused") and info["pid"] == d.pid:
            self._on_connected(d)

    def _poll_broker(self) -> None:
        """The fallback for a lost event: ask the broker about every domain still waiting to connect."""
        assert self.mgmt is not None
        try:
            listed = {s["domid"]: s for s in self.mgmt.request("list")["domains"]}
        except (ManagementError, TimeoutError):
            return
        for d in self.domains:
            if d.state in (State.STARTING, State.RUNNING) and not d.connected and d.pidfd >= 0:
                s = listed.get(d.domid)
                if s is not None and s["state"] in ("running", "paused") and s["pid"] == d.pid:
                    self._on_connected(d)

    def _on_connected(self, d: _Domain) -> None:
        d.connected = True
        self._record(d.name, "connected")
        if self._needs_store(d) and self._store_up():
            self._introduce(d)
        self._maybe_ready(d)

    def _maybe_ready(self, d: _Domain) -> None:
        if d.state != State.STARTING:
            return
        if d.kind == DomainKind.XENSTORED:
            ready = d.ready_seen
        else:
            ready = d.connected and (d.introduced or not self._needs_store(d))
            if d.kind in _READY_PIPE_KINDS:
                ready = ready and d.ready_seen
        if ready:
            self._mark_running(d)

    def _mark_running(self, d: _Domain) -> None:
        d.deadline = None
        d.started_once = True
        self._set_state(d, State.RUNNING)
        took = time.monotonic() - d.started_mono
        self._record(d.name, "ready", f"{took:.2f}s")
        what = f"{d.kind} domain {d.domid}" if d.connected else f"{d.kind} process"
        self._progress(f"{d.name}: {what} ready (pid {d.pid}, {took:.2f}s, log {self.layout.log_path(d.name)})")
        if d is self.xenstored:
            self._on_store_up()
        self.vms.domain_ready(d)            # a guest's VM starts once its guest domain serves its sockets

    # ---- xenstore ------------------------------------------------------------

    @contextmanager
    def _xs(self) -> Iterator[XenstoreClient]:
        transport = UnixTransport(self.layout.xenstored_socket)
        try:
            self._check_xenstored_peer(transport.sock)
        except BaseException:
            transport.close()
            raise
        client = XenstoreClient(transport, timeout=XS_TIMEOUT)
        try:
            yield client
        finally:
            client.close()

    def _check_xenstored_peer(self, sock: socket.socket) -> None:
        """Raise OSError (EPERM) unless the process at the other end is the xenstore domain's.

        The socket lives in a directory xenstored's uid owns, so whatever is
        there is only believed when ``SO_PEERCRED`` names xenstored's process
        and uid (dom0's requests must never reach a guest that put a socket
        of its own there).
        """
        xs = self.xenstored
        assert xs is not None
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
        want_uid = self._runs_as(xs)
        if uid != want_uid or (xs.pid is not None and pid != xs.pid):
            raise OSError(errno.EPERM, f"{self.layout.xenstored_socket} is served by pid {pid} (uid {uid}), not by "
                                       f"xenstore domain {xs.name} (pid {xs.pid}, uid {want_uid}): not believed")

    def _on_store_up(self) -> None:
        """xenstored serves (first start or restart): domain 0's nodes, then whoever waited for it."""
        try:
            with self._xs() as xs:
                if not self._dom0_written:
                    write_dom0_nodes(xs)
                    self._dom0_written = True
                assert self.xenstored is not None
                self._write_domain_nodes(xs, self.xenstored)
        except (XenstoreError, OSError, TimeoutError) as e:
            log.warning("xenstore set-up of domain 0 failed: %s", e)
        self._undo_refused_attaches()
        for d in self.domains:
            if d is not self.xenstored and d.connected and not d.introduced and d.state in (State.STARTING,
                                                                                             State.RUNNING):
                self._introduce(d)
                self._maybe_ready(d)
        for d in self.domains:
            if d.state == State.BACKOFF and d.waiting_for_store:
                d.deadline = time.monotonic()

    def _write_domain_nodes(self, xs: XenstoreClient, d: _Domain) -> None:
        assert d.domid is not None
        write_domain_nodes(xs, d.domid, d.name, d.spec.memory_bytes >> 10)

    def _introduce(self, d: _Domain) -> None:
        """The domain's nodes, then XS_INTRODUCE (libxl's order).

        A restarted domain keeps its domid, and xenstored removed the nodes it
        owned when it died and takes the domid for gone until it is introduced
        again: setting permissions for it fails with ENOENT until then.  So a
        restart introduces first and writes the nodes right after; the guest
        runtime waits for its ``control/shutdown`` node before writing there.
        """
        if d.store is None or d.domid is None:
            return
        try:
            with self._xs() as xs:
                try:
                    self._write_domain_nodes(xs, d)
                    written = True
                except XenstoreError as e:
                    if e.name != "ENOENT":
                        raise
                    written = False
                # Once only: an earlier try whose reply died with xenstored may have introduced it,
                # and XS_INTRODUCE of an introduced domain resets its connection (C's
                # domain_conn_reset drops its watches).  A domain restarted under its domid is not
                # introduced any more: xenstored released the old one when it died.
                if not xs.is_domain_introduced(d.domid):
                    xs.introduce(d.domid, *d.store)
                if not written:
                    self._write_domain_nodes(xs, d)
                self._write_devices(xs, d)
                self._write_vifs(xs, d)
        except (XenstoreError, OSError, TimeoutError) as e:
            log.warning("domain %s: xenstore set-up failed (%s); retried when xenstored restarts, bounded by "
                        "its readiness deadline", d.name, e)
            return
        d.introduced = True
        self._record(d.name, "introduced", f"gfn {d.store[0]} port {d.store[1]}")

    def _export_path(self, d: _Domain, disk: DiskSpec) -> str:
        return disk.export_path or self.layout.default_export(d.name, disk.vdev)

    def _vif_export(self, d: _Domain, devid: int, vif: VifSpec) -> str:
        """The vhost-user socket of a VM's vif."""
        return vif.export_path or default_vif_export(self.layout.run_dir, d.name, devid)

    def _export_sockets(self, d: _Domain) -> list[str]:
        """Every socket ``d`` serves its devices on: its disks' NBD or vhost-user exports, its vhost-user vifs."""
        return [self._export_path(d, disk) for disk in d.spec.disks] + [
            self._vif_export(d, devid, vif) for devid, vif in _vifs(d.spec) if vif.export_kind == EXPORT_VHOST_USER]

    def _vbds_of(self, d: _Domain) -> list[tuple[_Domain, _Domain, DiskSpec]]:
        """(backend, frontend, disk) for every disk ``d`` serves or uses whose two domains have domids."""
        out = []
        for fe in self.domains:
            for disk in fe.spec.disks:
                be = self._by_name.get(disk.backend or "")
                if be is None or (d is not fe and d is not be) or fe.domid is None or be.domid is None:
                    continue
                out.append((be, fe, disk))
        return out

    def _write_devices(self, xs: XenstoreClient, d: _Domain, only: DiskSpec | None = None) -> None:
        """libxl's device nodes for ``d``'s disks, or those it serves (again, after a restart)."""
        for be, fe, disk in self._vbds_of(d):
            if disk.target is None or (only is not None and disk is not only):
                continue
            assert be.domid is not None and fe.domid is not None
            add_vbd(xs, VbdConfig(be.domid, fe.domid, disk.devid, disk.vdev, disk.target, disk.readonly,
                                  export=self._export_path(fe, disk), export_kind=disk.export_kind or EXPORT_NBD,
                                  disk_fd=self._offer_disk(be, fe, disk)))
            self._record(fe.name, "vbd", f"{disk.vdev} on {be.name} -> {self._export_path(fe, disk)}")

    def _offer_disk(self, be: _Domain, fe: _Domain, disk: DiskSpec) -> int | None:
        """Open the image (as a Xen hotplug script does) and hand it to blkback before its nodes are written.

        Returns the offer's serial for the vbd's ``xdom-disk-fd`` node, or
        None when blkback is not running (its next start gets one) or the
        image cannot be opened (blkback then reports the device failed).
        """
        if be.devices is None or disk.target is None:
            return None
        assert fe.domid is not None
        try:
            fd = os.open(disk.target, (os.O_RDONLY if disk.readonly else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            log.error("%s: cannot open %s for %s: %s", be.name, disk.target, fe.name, e.strerror)
            return None
        try:
            self._disk_serial += 1
            offer_fd(be.devices, "disk", (fe.domid, disk.devid, self._disk_serial), fd)
        except OSError as e:
            log.error("%s: cannot hand it %s: %s", be.name, disk.target, e)
            return None
        finally:
            os.close(fd)
        return self._disk_serial

    def _write_vifs(self, xs: XenstoreClient, d: _Domain, only: int | None = None) -> None:
        """libxl's vif nodes for ``d``'s vifs, or those it serves (again, after a restart).

        A vif of a bridged netback is plugged first (its TAP made and offered
        to netback, which looks for it once it sees the nodes).  One that
        cannot be plugged gets no nodes and an error in the log; with
        ``only`` (a hot-attach) the error is raised instead.
        """
        for be, fe, devid, vif in self._served_vifs(d):
            if only is not None and (d is not fe or devid != only):
                continue
            assert vif.mac is not None and be.domid is not None and fe.domid is not None
            if be.switch == NetSwitch.BRIDGE:
                try:
                    self._plug(be, fe, devid, vif)
                except (TapError, netns.NetnsError, OSError) as e:
                    if only is not None:
                        raise
                    self._plug_failed(fe, devid, be, e)
                    continue
            rate = vif.rate
            vhost_user = vif.export_kind == EXPORT_VHOST_USER        # served to a VM: its socket and queue pairs
            add_vif(xs, VifConfig(be.domid, fe.domid, devid, vif.mac, _bridge_of(be, vif), vif.mtu or 1500,
                                  rate.bytes_per_interval if rate else None, rate.interval_us if rate else None,
                                  _ifname(devid), export=self._vif_export(fe, devid, vif) if vhost_user else None,
                                  queues=vif_queues(vif, fe.spec.vm)))
            self._record(fe.name, "vif", f"{_ifname(devid)} {vif.mac} on {be.name}")

    def _served_vifs(self, d: _Domain) -> list[tuple[_Domain, _Domain, int, VifSpec]]:
        """(backend, frontend, devid, vif) for every vif ``d`` uses or serves whose two domains have domids."""
        out = []
        for fe in self.domains:
            for devid, vif in _vifs(fe.spec):
                be = self._by_name.get(vif.backend or "")
                if be is None or (d is not fe and d is not be) or fe.domid is None or be.domid is None:
                    continue
                out.append((be, fe, devid, vif))
        return out

    def _plug(self, be: _Domain, fe: _Domain, devid: int, vif: VifSpec) -> None:
        """A vif of a bridged netback: its bridge and TAP in netback's namespace, then the TAP's fd offered.

        What the vif-bridge hotplug script does in a Xen driver domain, plus
        the descriptor: netback (no CAP_NET_ADMIN) attaches to a TAP its uid
        owns through a ``/dev/net/tun`` fd opened in its namespace.  Done once
        per netback process and vif (``be.offered``); a netback not running
        now gets the fd right after its next spawn.  Raises TapError,
        NetnsError or OSError.
        """
        assert fe.domid is not None and be.netns is not None
        key = (fe.domid, devid)
        if key in be.offered:
            return
        tap = backend_tap_name(fe.domid, devid)
        bridge = _bridge_of(be, vif)
        assert bridge is not None
        if not netns.exists(be.netns):  # kept across its restarts; made again after a destroy
            netns.create(be.netns)
        if ensure_bridge(be.netns, bridge):
            log.info("made bridge %s in %s's namespace %s", bridge, be.name, be.netns)
        owner = be.uid if be.uid is not None else os.geteuid()
        if ensure_port(be.netns, tap, owner, vif.mtu or 1500, bridge):
            log.info("made %s (vif %d of %s) in %s's namespace, a port of %s", tap, devid, fe.name, be.name, bridge)
        if be.devices is None:
            return
        fd = open_tun(be.netns)
        try:
            offer_fd(be.devices, "tap", key, fd)
        finally:
            os.close(fd)
        be.offered.add(key)
        self._record(be.name, "tap", f"{tap} offered ({fe.name} vif {devid} on {bridge})")

    def _plug_failed(self, fe: _Domain, devid: int, be: _Domain, e: Exception) -> None:
        log.error("vif %d of %s is not connected to %s's bridge: %s", devid, fe.name, be.name, e)
        self._progress(f"{fe.name}: vif {devid} not connected: {e}")

    def _forget_vif(self, d: _Domain, devid: int, vif: VifSpec) -> None:
        """A vif detached (or whose attach failed): out of the guest's spec, both its TAPs gone."""
        d.spec = dataclasses.replace(d.spec, vifs=tuple(v for v in d.spec.vifs if v is not vif))
        self._unplug(d, devid, vif)
        if d.netns is not None:
            try:
                delete_tap(d.netns, _ifname(devid))
            except TapError as e:
                log.warning("%s", e)

    def _unplug(self, fe: _Domain, devid: int, vif: VifSpec) -> None:
        """A vif going away (detached, or its guest destroyed): its TAP in a bridged netback's namespace goes."""
        be = self._by_name.get(vif.backend or "")
        if be is None or be.switch != NetSwitch.BRIDGE or be.netns is None or fe.domid is None:
            return
        be.offered.discard((fe.domid, devid))
        try:
            delete_tap(be.netns, backend_tap_name(fe.domid, devid))
        except TapError as e:
            log.warning("%s", e)

    def _prepare_vifs(self, d: _Domain) -> None:
        """The guest's TAP devices, made by us in its namespace (owned by its uid) before it starts."""
        vifs = _tap_vifs(d.spec)
        if not vifs:
            return
        if d.netns is None:
            raise netns.NetnsError("a guest with vifs needs its own network namespace, which needs root and "
                                   "iproute2 (ip)")
        netns.create(d.netns)
        owner = d.uid if d.uid is not None else os.geteuid()
        for devid, vif in vifs:
            if tap_exists(d.netns, _ifname(devid)):
                continue            # a restarted guest finds its interface as it left it
            assert vif.mac is not None
            create_tap(d.netns, _ifname(devid), owner, vif.mac, vif.mtu or 1500, str(vif.ip) if vif.ip else None)

    def _prepare_exports(self, d: _Domain, disks: tuple[DiskSpec, ...] | None = None) -> None:
        """Each export socket's directory is the guest's own, writable by its uid only; stale sockets go away.

        Before the guest starts (all its disks), or for a disk being
        hot-attached.  ``RUN_DIR/exports/GUEST`` and a directory an absolute
        ``export=`` names that does not exist yet are made here (root's, mode
        0700, an ACL entry giving the guest's uid rwx: :func:`private_dir`);
        the latter is removed when the host stops.  An existing directory
        that is not the guest's (owned by its uid) is refused (AccessError):
        giving its uid write access would let the guest replace whatever is
        in it.
        """
        separate = d.uid is not None and self.uid_plan is not None and self.uid_plan.separate
        uid = d.uid if separate else None
        for path in self._export_sockets(d) if disks is None else [self._export_path(d, disk) for disk in disks]:
            folder = os.path.dirname(path)
            own = folder == self.layout.export_dir(d.name)
            if own or self._made_exports.get(folder) == d.name:
                if not os.path.lexists(folder):
                    os.mkdir(folder, 0o700)
                private_dir(folder, uid)
            elif not os.path.lexists(folder):
                make_dirs(os.path.dirname(folder), 0o755)
                os.mkdir(folder, 0o700)
                self._made_exports[folder] = d.name
                private_dir(folder, uid)
                if uid is not None:
                    grant_search(os.path.dirname(folder), uid)
            elif separate:
                st = os.lstat(folder)
                if not stat.S_ISDIR(st.st_mode) or st.st_uid != d.uid:
                    raise AccessError(
                        f"the export directory {folder} already exists and is not {d.name}'s own (owner uid "
                        f"{st.st_uid}, {d.name} runs as uid {d.uid}): giving {d.name} write access to it would let "
                        f"it replace anything in it; name a directory that does not exist yet (xdom makes it "
                        f"{d.name}'s and removes it at xdom down), or give export= a plain socket name "
                        f"({self.layout.export_dir(d.name)}/)")
            _unlink_socket(path)
        if disks is None and d.kind == DomainKind.GUEST and not os.path.lexists(self.layout.export_dir(d.name)):
            # Where hot-attached devices' sockets go: it must exist before the guest confines itself (Landlock).
            os.mkdir(self.layout.export_dir(d.name), 0o700)
            private_dir(self.layout.export_dir(d.name), uid)

    def _remove_domain_nodes(self, domid: int) -> None:
        if not self._store_up():
            return
        try:
            with self._xs() as xs:
                xs.rm(domain_path(domid))
        except (XenstoreError, OSError, TimeoutError) as e:
            log.warning("removing /local/domain/%d failed: %s", domid, e)

    # ---- deaths, restarts, stops ---------------------------------------------

    def _on_process_exit(self, d: _Domain) -> None:
        was = d.state
        uptime = time.monotonic() - d.started_mono
        pid = d.pid
        rc = self._reap(d)
        status = ExitStatus.from_returncode(rc)
        if status.unknown:          # adopted: not our child; what the broker saw decides
            status = adopt.status_after_adopted_death(self.mgmt, d.domid, pid)
        reason, d.kill_reason = d.kill_reason, ""
        if status.signal == signal.SIGSYS and not reason:
            reason = self._seccomp_kills.describe(pid)
        self._record(d.name, "exit", status.describe() + (f" ({reason})" if reason else ""))
        self._log_to(d, f"pid {pid} {status.describe()}{f' ({reason})' if reason else ''} after {uptime:.1f}s")
        if was == State.STOPPING:
            self._after_stop(d, status)
            return
        if not d.connected and d.kind == DomainKind.PROGRAM and self.mgmt is not None and d.domid is not None:
            # It may have connected and died before the event arrived: a program that connected has started.
            try:
                if self.mgmt.request("info", domid=d.domid)["domain"]["state"] != "created":
                    d.connected = d.started_once = True
            except (ManagementError, TimeoutError):
                pass
        self._after_death(d, status, reason, uptime, pid)

    def _after_death(self, d: _Domain, status: ExitStatus, reason: str, uptime: float,
                     pid: int | None = None) -> None:
        now = time.monotonic()
        decision = d.tracker.on_exit(status, now)
        what = (f"{d.kind} domain {d.name} (domid {d.domid}, pid {pid}) {status.describe()}"
                f"{f' ({reason})' if reason else ''} after {uptime:.1f}s")
        d.last_exit = status.describe() + (f" ({reason})" if reason else "")
        if decision.action == Action.RESTART:
            log.warning("%s; restarting in %.2fs (%s)", what, decision.delay, decision.reason)
            self._set_state(d, State.BACKOFF, f"restart in {decision.delay:.2f}s")
            d.deadline = now + decision.delay
            self._progress(f"{d.name}: {d.last_exit}; restarting in {decision.delay:.2f}s")
        elif decision.action == Action.STAY_DOWN:
            log.info("%s; not restarted: %s", what, decision.reason)
            self._set_state(d, State.EXITED, decision.reason)
            self._progress(f"{d.name}: {d.last_exit}; not restarted ({decision.reason})")
        else:
            log.error("%s; %s", what, decision.reason)
            d.last_exit += f"; {decision.reason}"
            self._set_state(d, State.FAILED, decision.reason)
            self._progress(f"{d.name}: failed: {decision.reason}")
        if d is self.xenstored and d.state != State.BACKOFF:
            log.error("the xenstore domain is down for good: domains cannot reach the store")
        if d.state != State.BACKOFF:
            self.vms.domain_gone(d, f"its guest domain {d.last_exit} and stays down")
            self._release_down(d)

    def _after_stop(self, d: _Domain, status: ExitStatus) -> None:
        then, d.after_stop = d.after_stop, ""
        d.last_exit = status.describe() + " (stopped)"
        if then == "restart":
            self._launch(d)
        elif then == "destroy":
            self._finish_destroy(d)
        else:
            self._set_state(d, State.STOPPED)

    def _begin_stop(self, d: _Domain, then: str) -> None:
        d.after_stop = then
        self._set_state(d, State.STOPPING, then)
        d.deadline = None
        if not self.vms.stop_first(d, then, lambda: self._signal_stop(d)):   # a VM powers off first
            self._signal_stop(d)

    def _signal_stop(self, d: _Domain) -> None:
        if d.state != State.STOPPING or d.pidfd < 0:
            return
        self._signal_group(d, signal.SIGTERM)
        d.deadline = time.monotonic() + self.stop_grace

    def _finish_destroy(self, d: _Domain) -> None:
        if d.domid is not None and self.mgmt is not None:
            try:
                self.mgmt.request("destroy", domid=d.domid)
            except ManagementError as e:
                if e.errno_name != "ESRCH":
                    log.warning("destroying domain %s in the broker: %s", d.name, e)
            except TimeoutError as e:
                log.warning("destroying domain %s in the broker: %s", d.name, e)
            if d.kind != DomainKind.GUEST:
                self._remove_domain_nodes(d.domid)      # a guest's go with its devices (_release_down)
        self.vms.domain_gone(d, "destroyed")
        self._release_down(d)
        self._record(d.name, "destroyed", f"domid {d.domid}")
        d.domid = d.creds = d.store = None
        d.connected = d.introduced = False
        self._set_state(d, State.DESTROYED)
        self._progress(f"{d.name}: destroyed")

    def _release_down(self, d: _Domain) -> None:
        """A domain that stays down (its policy, a failure, a destroy) keeps only what restarting it needs:
        its domid in the broker, its logs, and (xenstored) its store.  Its sockets and export directories,
        its device nodes, its TAPs (its own and a bridged netback's for its vifs) and its namespace go;
        starting it again makes them again."""
        if d is self.xenstored or not self._pidfile.held:
            return
        gone = []
        if d.kind == DomainKind.GUEST:
            if d.domid is not None:
                self._release_vbds(d)
                self._release_vifs(d)
                self._remove_domain_nodes(d.domid)
            for path in self._export_sockets(d):
                if os.path.lexists(path):
                    _unlink_socket(path)
                    gone.append(path)
            own = self.layout.export_dir(d.name)
            if os.path.isdir(own):
                shutil.rmtree(own, ignore_errors=True)
            for folder, guest in self._made_exports.items():
                if guest == d.name:
                    _remove_made_dir(folder)      # kept in _made_exports: made again, ours, at its next start
        if d.netns is not None and netns.exists(d.netns):
            self._delete_netns(d.netns)           # its TAPs (a bridged netback's bridge) go with it
            gone.append(f"namespace {d.netns}")
        d.offered.clear()
        if gone:
            self._record(d.name, "released", ", ".join(gone))

    def _release_vbds(self, d: _Domain) -> None:
        """A guest that stays down: its disks' backend nodes go (blkback closes the images), as libxl's."""
        for be, fe, _disk in self._vbds_of(d):
            if fe is not d or be.domid is None or not self._store_up():
                continue
            try:
                with self._xs() as xs:
                    xs.rm(f"/local/domain/{be.domid}/backend/vbd/{d.domid}")
            except XenstoreError as e:
                if e.name != "ENOENT":
                    log.warning("removing %s's disks from %s's backend nodes: %s", d.name, be.name, e)
            except (OSError, TimeoutError) as e:
                log.warning("removing %s's disks from %s's backend nodes: %s", d.name, be.name, e)

    def _release_vifs(self, d: _Domain) -> None:
        """A destroyed guest's vifs, as libxl's forced device removal: backend nodes gone (netback drops the
        vif), then the vif's TAP in a bridged netback's namespace."""
        if d.domid is None:
            return
        backends = {vif.backend for _, vif in _vifs(d.spec)}
        for be in (self._by_name.get(name or "") for name in sorted(backends, key=str)):
            if be is None or be.domid is None or not self._store_up():
                continue
            try:
                with self._xs() as xs:
                    xs.rm(f"/local/domain/{be.domid}/backend/vif/{d.domid}")
            except (XenstoreError, OSError, TimeoutError) as e:
                log.warning("removing %s's vifs from %s's backend nodes: %s", d.name, be.name, e)
        for devid, vif in _vifs(d.spec):
            self._unplug(d, devid, vif)

    def _kill(self, d: _Domain, why: str) -> None:
        log.warning("killing %s domain %s (pid %s): %s", d.kind, d.name, d.pid, why)
        d.kill_reason = why
        self._signal_group(d, signal.SIGKILL)

    def _signal_group(self, d: _Domain, sig: int) -> None:
        if d.proc is None or d.pidfd < 0:
            return
        try:
            os.killpg(d.proc.pid, sig)     # its own session: the group is the domain and its children
        except ProcessLookupError:
            pass
        except PermissionError:
            try:
                signal.pidfd_send_signal(d.pidfd, sig)
            except ProcessLookupError:
                pass

    def _reap(self, d: _Domain) -> int:
        """The process has exited (its pidfd said so): kill what is left of its group, reap, forget its fds."""
        assert d.proc is not None
        # The leader is a zombie until reaped: the group id is safe.  An adopted leader was reaped by its
        # reaper already; its group id is still its group's while any of the group lives (Linux frees a
        # pid only once no process uses it as pid, group or session).
        self._signal_group(d, signal.SIGKILL)
        rc = d.proc.wait()
        self._unwatch_fd(d.pidfd)
        os.close(d.pidfd)
        d.pidfd = -1
        d.ident = None
        self._forget_kept(d)
        self._close_ready(d)
        if d.devices is not None:
            d.devices.close()
            d.devices = None
        d.offered.clear()
        d.deadline = None
        d.sample = None
        return rc

    def _close_ready(self, d: _Domain) -> None:
        if d.ready_fd >= 0:
            self._unwatch_fd(d.ready_fd)
            os.close(d.ready_fd)
            d.ready_fd = -1

    def _stop_now(self, d: _Domain) -> None:
        """Blocking stop for the host's shutdown: a guest's VM first (powered off), then the domain:
        SIGTERM, grace, SIGKILL, reap, destroy in the broker."""
        try:
            self.vms.stop_now(d)
        except Exception:
            log.exception("stopping the VM of %s failed; going on", d.name)
        if d.proc is not None and d.pidfd >= 0:
            self._signal_group(d, signal.SIGTERM)
            select.select([d.pidfd], [], [], self.stop_grace)
            pid = d.pid
            status = ExitStatus.from_returncode(self._reap(d))
            self._record(d.name, "stopped", status.describe())
            d.last_exit = status.describe() + " (stopped)"
            self._log_to(d, f"pid {pid} {status.describe()} (stopped with the host)")
        self._close_ready(d)
        if d.domid is not None and self.mgmt is not None and self.broker is not None \
                and self.broker.proc.poll() is None:
            try:
                self.mgmt.request("destroy", domid=d.domid)
            except (ManagementError, TimeoutError):
                pass
        if d.state not in (State.PENDING, State.DESTROYED):
            d.state = State.STOPPED

    def _on_broker_exit(self) -> None:
        """The broker died: start another, which takes over the running domains from its
        predecessor's state (broker.takeover); they see a slow hypercall.  Only when it
        cannot start, or dies again and again, is the host lost."""
        assert self.broker is not None
        rc = self.broker.proc.wait()
        self._unwatch_fd(self._broker_pidfd)
        os.close(self._broker_pidfd)
        self._broker_pidfd = -1
        self._broker_ident = None
        how = ExitStatus.from_returncode(rc).describe()
        self._record(_BROKER, "exit", how)
        now = time.monotonic()
        self._broker_deaths = [t for t in self._broker_deaths if now - t < BROKER_FLAP_WINDOW] + [now]
        why = ""
        if self._stop_requested:
            why = "while the host stops"
        elif len(self._broker_deaths) > BROKER_FLAP_LIMIT:
            why = f"for the {len(self._broker_deaths)}th time in {BROKER_FLAP_WINDOW:g}s"
        else:
            log.error("the broker (the hypervisor) %s; starting another to take over the running domains", how)
            if self.mgmt is not None:
                self.mgmt.close()
                self.mgmt = None
            try:
                self._start_broker()
            except (RuntimeError, TimeoutError) as e:
                why = f"and another did not start ({e})"
            else:
                assert self.broker is not None
                self._record(_BROKER, "restarted", f"pid {self.broker.proc.pid}: took over")
                self._name_takeover_failures()
                self._save_state()
                self._progress(f"broker: {how}; a new one (pid {self.broker.proc.pid}) took over")
                return
        self._fatal = (f"the broker (the hypervisor) {how} {why}: every domain is "
                       f"gone; see {self.layout.log_path(_BROKER)}")
        log.error("%s; stopping", self._fatal)
        self.request_stop()

    def _name_takeover_failures(self) -> None:
        """A domain still starting when the broker died cannot be taken over (broker.takeover):
        its process dies or is killed, and its restart says why instead of a bare exit status."""
        assert self.mgmt is not None
        try:
            listed = {s["domid"]: s for s in self.mgmt.request("list")["domains"]}
        except (ManagementError, TimeoutError) as e:
            log.warning("cannot ask the new broker what it took over: %s", e)
            return
        for d in self.domains:
            s = listed.get(d.domid)
            if s is not None and s["state"] == "crashed" and s["shutdown_reason"] == "broker restart" \
                    and d.state in (State.STARTING, State.RUNNING) and not d.kill_reason:
                d.kill_reason = TAKEOVER_FAILED
                log.warning("%s domain %s: %s", d.kind, d.name, TAKEOVER_FAILED)

    # ---- health --------------------------------------------------------------

    def _check_health(self) -> None:
        for d in self.domains:
            if d.state not in (State.STARTING, State.RUNNING) or d.pidfd < 0:
                continue
            sample = self._sample(d)
            if sample is None:
                continue
            d.sample = sample
            why = d.health.check(sample)
            if why is not None and not d.kill_reason:
                self._kill(d, f"over its limits: {why}")

    def _sample(self, d: _Domain) -> HealthSample | None:
        """RSS, descriptors and CPU of the domain process and its descendants (a guest's workload counts)."""
        assert d.proc is not None
        try:
            leader = d.ps_cache.get(d.proc.pid) or psutil.Process(d.proc.pid)
            procs = [leader, *leader.children(recursive=True)]
        except psutil.Error:
            return None
        cache: dict[int, psutil.Process] = {}
        rss = fds = 0
        cpu = 0.0
        for p in procs:
            p = d.ps_cache.get(p.pid, p)
            try:
                with p.oneshot():
                    rss += p.memory_info().rss
                    fds += p.num_fds()
                    cpu += p.cpu_percent(None)
            except psutil.Error:
                continue
            cache[p.pid] = p
        d.ps_cache = cache
        return HealthSample(rss, fds, cpu)

    # ---- control operations ----------------------------------------------------

    def _domain_named(self, req: dict[str, Any]) -> _Domain:
        name = string_field(req, "name")
        d = self._by_name.get(name)
        if d is None:
            raise ControlError.of(errno.ESRCH, f"no domain named {name!r:.70} in this host "
                                               f"(domains: {', '.join(self._by_name)})")
        return d

    def _op_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "phase": self.phase, "topology": os.path.abspath(self.topology.source),
                "state_dir": self.layout.state_dir, "run_dir": self.layout.run_dir,
                "broker_pid": self.broker.proc.pid if self.broker else None, "adopted": self.adopted,
                "keeper_pid": self._keeper_proc.pid if self._keeper_proc is not None else None,
                "uids": "separate" if self.uid_plan and self.uid_plan.separate else "shared",
                "xenstored_socket": self.layout.xenstored_link if self.xenstored else None}

    def _op_ps(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"domains": self.status(), **self._op_ping(req)}

    def _op_info(self, req: dict[str, Any]) -> dict[str, Any]:
        d = self._domain_named(req)
        rows = self.status()
        return {"domain": rows[self.domains.index(d)]}

    def _op_restart(self, req: dict[str, Any]) -> dict[str, Any]:
        d = self._domain_named(req)
        if self.phase != "running":
            raise ControlError.of(errno.EBUSY, f"the host is {self.phase}; try again once it is running")
        generation = d.generation
        d.tracker.reset()
        self.vms.restart_requested(d)
        if d.state == State.STOPPING:
            if d.after_stop == "destroy":
                raise ControlError.of(errno.EBUSY, f"domain {d.name} is being destroyed")
            d.after_stop = "restart"
        elif d.state in (State.STARTING, State.RUNNING):
            log.info("restarting domain %s on request", d.name)
            self._begin_stop(d, "restart")
        else:
            log.info("starting domain %s (%s) on request", d.name, d.state)
            d.waiting_for_store = False
            self._set_state(d, State.BACKOFF, "restart requested")
            d.deadline = time.monotonic()
        return {"generation": generation}

    def _op_destroy(self, req: dict[str, Any]) -> dict[str, Any]:
        d = self._domain_named(req)
        if self.phase != "running":
            raise ControlError.of(errno.EBUSY, f"the host is {self.phase}; try again once it is running")
        if d is self.xenstored:
            raise ControlError.of(errno.EBUSY, f"{d.name} is the xenstore domain, which every other domain "
                                               f"needs; stop the whole host with xdom down")
        if d.state == State.DESTROYED:
            return {}
        log.info("destroying domain %s on request", d.name)
        if d.state == State.STOPPING:
            d.after_stop = "destroy"
        elif d.pidfd >= 0:
            self._begin_stop(d, "destroy")
        else:
            d.deadline = None
            self._finish_destroy(d)
        return {}

    def _guest_for_devices(self, req: dict[str, Any]) -> _Domain:
        d = self._domain_named(req)
        if self.phase != "running":
            raise ControlError.of(errno.EBUSY, f"the host is {self.phase}; try again once it is running")
        if d.kind != DomainKind.GUEST:
            raise ControlError.of(errno.EINVAL, f"{d.name} is a {d.kind} domain; disks attach to guests")
        if d.state != State.RUNNING or d.domid is None:
            raise ControlError.of(errno.EBUSY, f"{d.name} is {d.state}; disks attach to a running guest")
        if (why := self.vms.devices_problem(d)) is not None:      # a VM's: hot-plugged over QMP (vm/supervised.py)
            raise ControlError.of(errno.EBUSY, why)
        return d

    def _op_block_attach(self, req: dict[str, Any]) -> dict[str, Any]:
        """``xl block-attach``: add a disk to a running guest; it stays in the guest's spec across restarts."""
        d = self._guest_for_devices(req)
        spec = string_field(req, "disk")
        try:
            disk = parse_disk(spec)
        except XlCfgError as e:
            raise ControlError.of(errno.EINVAL, str(e)) from None
        if disk.backend is None:
            backends = [b.name for b in self.domains if b.kind == DomainKind.BLKBACK]
            if len(backends) != 1:
                raise ControlError.of(errno.EINVAL, "say backend=NAME: this host has "
                                                    f"{len(backends)} blkback domains")
            disk = dataclasses.replace(disk, backend=backends[0])
        be = self._by_name.get(disk.backend or "")
        if be is None or be.kind != DomainKind.BLKBACK:
            raise ControlError.of(errno.EINVAL, f"backend {disk.backend!r} is not a blkback domain of this host")
        if be.state != State.RUNNING:
            raise ControlError.of(errno.EBUSY, f"backend {be.name} is {be.state}")
        if any(x.devid == disk.devid for x in d.spec.disks):
            raise ControlError.of(errno.EEXIST, f"{d.name} already has a disk at {disk.vdev}")
        if disk.target is None:
            raise ControlError.of(errno.EINVAL, "an empty drive has nothing to attach")
        target = disk.target if os.path.isabs(disk.target) else os.path.join(self.layout.state_dir, disk.target)
        export = disk.export_path
        if export is not None and not os.path.isabs(export):
            name = os.path.normpath(export)
            if os.sep in name or name == "..":
                raise ControlError.of(errno.EINVAL, f"export socket {export!r}: a relative export is a socket name "
                                                    f"in {d.name}'s own directory {self.layout.export_dir(d.name)}/, "
                                                    f"without '/'")
            export = os.path.join(self.layout.export_dir(d.name), name)
        if export is not None:
            export = os.path.normpath(export)
            why = export_problem(d.name, export, self.layout.run_dir, self.layout.state_dir,
                                 [(g.name, self._export_path(g, x)) for g in self.domains for x in g.spec.disks],
                                 [x.target for g in self.domains for x in g.spec.disks if x.target is not None]
                                 + [target])
            if why is not None:
                raise ControlError.of(errno.EINVAL, why)
        kind = disk.export_kind or (EXPORT_VHOST_USER if d.spec.vm is not None else EXPORT_NBD)
        if d.spec.vm is not None and kind != EXPORT_VHOST_USER:
            raise ControlError.of(errno.EINVAL, f"export={kind}: {d.name} runs a VM, which reaches its disks over "
                                                f"vhost-user only; leave export= out or write export=vhost-user:NAME")
        disk = dataclasses.replace(disk, target=os.path.normpath(target), export_path=export, export_kind=kind)
        try:
            st = os.stat(disk.target)
        except OSError as e:
            raise ControlError.of(errno.ENOENT, f"{disk.target}: {e.strerror}") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ControlError.of(errno.EINVAL, f"{disk.target} is neither a file nor a block device")
        path = self._export_path(d, disk)
        if any(self._export_path(g, x) == path for g in self.domains for x in g.spec.disks):
            raise ControlError.of(errno.EEXIST, f"export socket {path} is already in use")
        # A running guest's Landlock domain lets it bind sockets only where its command line said.
        dirs = {a.partition("=")[2] if a.startswith("--export-dir=") else os.path.dirname(a.partition(":")[2])
                for a in (d.proc.args if d.proc is not None else ()) if a.startswith(_EXPORT_ARGS)}
        if os.path.dirname(path) not in dirs and confinement_mode() != "off":
            raise ControlError.of(errno.EACCES, f"{d.name} is confined to export sockets in {', '.join(sorted(dirs))}"
                                                f"; put {disk.vdev} in its topology to export it elsewhere")
        plug = self.vms.plug_disk(d, disk, path)         # a VM's disk: into the VM once served (vm/supervised.py)
        d.spec = dataclasses.replace(d.spec, disks=(*d.spec.disks, disk))
        try:
            self._prepare_exports(d, (disk,))
            with self._xs() as xs:
                self._write_devices(xs, d, only=disk)
        except (XenstoreError, OSError, TimeoutError, AccessError) as e:
            self.vms.forget_plug(d, plug.get("device", ""))
            d.spec = dataclasses.replace(d.spec, disks=tuple(x for x in d.spec.disks if x is not disk))
            if not isinstance(e, (XenstoreError, AccessError)):      # xenstored may have committed them
                self._refused_attach("vbd", d, disk.devid, be, self._export_path(d, disk))
            raise ControlError.of(errno.EIO, f"attaching {disk.vdev} to {d.name}: {e}") from None
        log.info("attached %s (%s) to %s on %s", disk.vdev, disk.target, d.name, be.name)
        return {"vdev": disk.vdev, "devid": disk.devid, "export": path, "backend": be.name, "export_kind": kind,
                **({"vm": plug} if plug else {})}

    def _op_block_detach(self, req: dict[str, Any]) -> dict[str, Any]:
        """``xl block-detach``: the backend closes, the guest lets go, then the nodes go."""
        d = self._guest_for_devices(req)
        which = string_field(req, "vdev")
        disk = next((x for x in d.spec.disks if x.vdev == which or str(x.devid) == which), None)
        if disk is None:
            raise ControlError.of(errno.ENODEV, f"{d.name} has no disk {which!r:.40} "
                                                f"(disks: {', '.join(x.vdev for x in d.spec.disks) or 'none'})")
        be = self._by_name.get(disk.backend or "")

        def teardown() -> bool:
            closed = False
            if be is not None and be.domid is not None and d.domid is not None:
                with self._xs() as xs:
                    closed = remove_vbd(xs, be.domid, d.domid, disk.devid, timeout=DETACH_TIMEOUT)
            d.spec = dataclasses.replace(d.spec, disks=tuple(x for x in d.spec.disks if x is not disk))
            _unlink_socket(self._export_path(d, disk))
            log.info("detached %s from %s%s", disk.vdev, d.name, "" if closed else " (the backend did not confirm)")
            return closed
        # A VM's disk leaves the VM first (device_del, answered when its kernel let go): the rest follows then.
        pending = self.vms.unplug_disk(d, disk, lambda: _logged(teardown, f"detaching {disk.vdev} from {d.name}"))
        if pending is not None:
            return {"vdev": disk.vdev, "clean": None, "vm": pending}
        try:
            return {"vdev": disk.vdev, "clean": teardown()}
        except (XenstoreError, OSError, TimeoutError) as e:
            raise ControlError.of(errno.EIO, f"detaching {disk.vdev} from {d.name}: {e}") from None

    def _op_network_attach(self, req: dict[str, Any]) -> dict[str, Any]:
        """``xl network-attach``: a new vif on a running guest: its TAP in the guest's namespace, then the nodes."""
        d = self._guest_for_devices(req)
        try:
            vif = parse_vif(string_field(req, "vif"))
        except XlCfgError as e:
            raise ControlError.of(errno.EINVAL, str(e)) from None
        if vif.backend is None:
            backends = [b.name for b in self.domains if b.kind == DomainKind.NETBACK]
            if len(backends) != 1:
                raise ControlError.of(errno.EINVAL, f"say backend=NAME: this host has {len(backends)} netback domains")
            vif = dataclasses.replace(vif, backend=backends[0])
        be = self._by_name.get(vif.backend or "")
        if be is None or be.kind != DomainKind.NETBACK:
            raise ControlError.of(errno.EINVAL, f"backend {vif.backend!r} is not a netback domain of this host")
        if be.state != State.RUNNING:
            raise ControlError.of(errno.EBUSY, f"backend {be.name} is {be.state}")
        if vif.bridge is not None and (why := bridge_name_problem(vif.bridge)) is not None:
            raise ControlError.of(errno.EINVAL, why)
        used = {devid for devid, _ in _vifs(d.spec)}
        devid = max(used, default=-1) + 1
        if vif.mac is None:
            taken = {v.mac for g in self.domains for v in g.spec.vifs}
            attempt = 0
            while (mac := generate_mac(d.name, devid, attempt)) in taken:
                attempt += 1
            vif = dataclasses.replace(vif, mac=mac)
        elif any(v.mac == vif.mac for g in self.domains for v in g.spec.vifs):
            raise ControlError.of(errno.EEXIST, f"MAC {vif.mac} is already in use on this host")
        vif = dataclasses.replace(vif, extra={**vif.extra, "devid": str(devid)})
        vif, export = self._vhost_user_vif(d, devid, vif)     # a VM's NIC, or a vif served to a VMM: its socket
        plug = self.vms.plug_nic(d, devid, vif, export) if export is not None else {}   # into the VM once served
        d.spec = dataclasses.replace(d.spec, vifs=(*d.spec.vifs, vif))
        try:
            self._prepare_vifs(d)
            if export is None:
                self._offer_tun(d, devid)
            with self._xs() as xs:
                self._write_vifs(xs, d, only=devid)
        except (netns.NetnsError, TapError, XenstoreError, OSError, TimeoutError) as e:
            self.vms.forget_plug(d, plug.get("device", ""))
            self._forget_vif(d, devid, vif)
            if isinstance(e, (ConnectionError, TimeoutError)):         # xenstored may have committed them
                self._refused_attach("vif", d, devid, be)
            raise ControlError.of(errno.EIO, f"attaching a vif to {d.name}: {e}") from None
        log.info("attached vif %d (%s) to %s on %s", devid, vif.mac, d.name, be.name)
        return {"devid": devid, "ifname": _ifname(devid) if export is None else None, "mac": vif.mac,
                "backend": be.name, "ip": str(vif.ip) if vif.ip else None, "netns": d.netns,
                "bridge": _bridge_of(be, vif), "backend_tap": _backend_tap(be, d, devid), "export": export,
                **({"queues": vif_queues(vif, d.spec.vm)} if export is not None else {}),
                **({"vm": plug} if plug else {})}

    def _vhost_user_vif(self, d: _Domain, devid: int, vif: VifSpec) -> tuple[VifSpec, str | None]:
        """A vif being attached to ``d``: a VM's is vhost-user-net on a socket in the guest's export
        directory (or where its ``export=`` says, within the directories its Landlock rules allow); its
        socket, or None for a TAP vif."""
        kind = vif.export_kind or (EXPORT_VHOST_USER if d.spec.vm is not None else None)
        if kind is None:
            if vif.queues is not None:
                raise ControlError.of(errno.EINVAL, f"queues={vif.queues}: queues are a vhost-user NIC's queue pairs; "
                                                    f"this vif is a TAP device, which has one")
            return vif, None
        export = vif.export_path
        if export is not None and not os.path.isabs(export):
            name = os.path.normpath(export)
            if os.sep in name or name == "..":
                raise ControlError.of(errno.EINVAL, f"export socket {export!r}: a relative export is a socket name "
                                                    f"in {d.name}'s own directory {self.layout.export_dir(d.name)}/")
            export = os.path.join(self.layout.export_dir(d.name), name)
        vif = dataclasses.replace(vif, export_kind=kind, export_path=os.path.normpath(export) if export else None)
        path = self._vif_export(d, devid, vif)
        if path in self._export_sockets_of_host():
            raise ControlError.of(errno.EEXIST, f"export socket {path} is already in use")
        dirs = {a.partition("=")[2] if a.startswith("--export-dir=") else os.path.dirname(a.partition(":")[2])
                for a in (d.proc.args if d.proc is not None else ()) if a.startswith(_EXPORT_ARGS)}
        if os.path.dirname(path) not in dirs and confinement_mode() != "off":
            raise ControlError.of(errno.EACCES, f"{d.name} is confined to export sockets in {', '.join(sorted(dirs))}"
                                                f"; leave export= out (its socket then goes in "
                                                f"{self.layout.export_dir(d.name)}/)")
        _unlink_socket(path)            # a stale one would look served
        return vif, path

    def _export_sockets_of_host(self) -> set[str]:
        return {p for g in self.domains for p in self._export_sockets(g)}

    def _refused_attach(self, kind: str, d: _Domain, devid: int, be: _Domain, export: str | None = None) -> None:
        """An attach refused because xenstored stopped answering (killed, restarting): its transaction
        may have committed before the reply was lost.  The device's nodes go once xenstored serves again
        (now, if it still does), so a refusal leaves nothing behind."""
        if d.domid is None or be.domid is None:
            return
        self._undo_attach.append((kind, d.name, devid, f"/local/domain/{be.domid}/backend/{kind}/{d.domid}/{devid}",
                                  export))
        if self._store_up():
            self._undo_refused_attaches()

    def _undo_refused_attaches(self) -> None:
        pending, self._undo_attach = self._undo_attach, []
        for kind, name, devid, be_path, export in pending:
            d = self._by_name.get(name)
            if d is None or d.domid is None:
                continue
            if any(x.devid == devid for x in d.spec.disks) if kind == "vbd" else \
                    any(i == devid for i, _ in _vifs(d.spec)):
                continue                        # attached again since: its nodes are wanted
            try:
                with self._xs() as xs:
                    for path in (be_path, f"/local/domain/{d.domid}/device/{kind}/{devid}"):
                        try:
                            xs.rm(path)
                        except XenstoreError as e:
                            if e.name != "ENOENT":      # its parent is not there either: nothing to remove
                                raise
                if export is not None:
                    _unlink_socket(export)
                log.info("removed what may be left of %s %d of %s, whose attach was refused", kind, devid, name)
            except (XenstoreError, OSError, TimeoutError) as e:
                log.warning("removing the nodes of %s %d of %s, whose attach was refused: %s; retried when "
                            "xenstored restarts", kind, devid, name, e)
                self._undo_attach.append((kind, name, devid, be_path, export))

    def _offer_tun(self, d: _Domain, devid: int) -> None:
        """Hand the running guest a /dev/net/tun descriptor for its new TAP, before the vif's nodes appear."""
        if d.netns is None or d.devices is None:
            return              # not running: it gets one on its command line when it starts
        fd = open_tun(d.netns)
        try:
            offer_fd(d.devices, "vif", devid, fd)
        finally:
            os.close(fd)

    def _op_network_detach(self, req: dict[str, Any]) -> dict[str, Any]:
        """``xl network-detach``: by devid or MAC; the backend closes, the guest lets go, nodes and TAP go."""
        d = self._guest_for_devices(req)
        which = string_field(req, "vif").lower()
        found = next(((devid, v) for devid, v in _vifs(d.spec) if str(devid) == which or v.mac == which), None)
        if found is None:
            raise ControlError.of(errno.ENODEV, f"{d.name} has no vif {which!r:.40} (vifs: "
                                                f"{', '.join(f'{i} {v.mac}' for i, v in _vifs(d.spec)) or 'none'})")
        devid, vif = found
        be = self._by_name.get(vif.backend or "")

        def teardown() -> bool:
            closed = False
            if be is not None and be.domid is not None and d.domid is not None:
                with self._xs() as xs:
                    closed = remove_vif(xs, be.domid, d.domid, devid, timeout=DETACH_TIMEOUT)
            self._forget_vif(d, devid, vif)
            if vif.export_kind == EXPORT_VHOST_USER:
                _unlink_socket(self._vif_export(d, devid, vif))
            log.info("detached vif %d from %s%s", devid, d.name, "" if closed else " (the backend did not confirm)")
            return closed
        # A VM's NIC leaves the VM first (device_del, answered when its kernel let go): the rest follows then.
        pending = self.vms.unplug_nic(d, devid, lambda: _logged(teardown, f"detaching vif {devid} from {d.name}"))
        if pending is not None:
            return {"devid": devid, "clean": None, "vm": pending}
        try:
            return {"devid": devid, "clean": teardown()}
        except (XenstoreError, OSError, TimeoutError) as e:
            raise ControlError.of(errno.EIO, f"detaching vif {devid} from {d.name}: {e}") from None

    def _op_stop(self, req: dict[str, Any]) -> dict[str, Any]:
        log.info("stop requested over the control channel")
        self.request_stop()
        return {"pid": os.getpid()}

    def _row(self, d: _Domain, b: dict[str, Any] | None) -> dict[str, Any]:
        b = b or {}
        alive = d.state in _ALIVE and d.pidfd >= 0
        s = d.sample
        row: dict[str, Any] = {
            "name": d.name, "domid": d.domid, "kind": str(d.kind), "state": str(d.state),
            "domain_state": b.get("state"), "pid": d.pid, "uid": d.uid if d.uid is not None else os.geteuid(),
            "connected": d.connected, "restarts": max(0, d.generation - 1), "generation": d.generation,
            "restart_policy": str(d.spec.restart), "state_changes": d.changes,
            "uptime": round(time.monotonic() - d.started_mono, 3) if alive else 0.0,
            "rss": s.rss if s and alive else None, "fds": s.fds if s and alive else None,
            "cpu_percent": round(s.cpu_percent, 1) if s and alive else None,
            "memory_kib": d.spec.memory_bytes >> 10,
            "mappings_held": b.get("mappings_held"), "grants_mapped_by_others": b.get("grants_mapped_by_others"),
            "grant_frames": b.get("grant_frames"), "event_channels": b.get("event_channels"),
            "last_exit": d.last_exit or None, "log": self.layout.log_path(d.name),
            "netns": d.netns, "confinement": confinement_of(d.pid if alive else None, d.confinement),
            "devices": [
                {"type": "vbd", "vdev": disk.vdev, "devid": disk.devid, "backend": disk.backend,
                 "target": disk.target, "mode": disk.mode, "export": self._export_path(d, disk),
                 "export_kind": disk.export_kind}
                for disk in d.spec.disks] + [
                {"type": "vif", "devid": devid, "ifname": _ifname(devid) if vif.export_kind is None else None,
                 "mac": vif.mac, "backend": vif.backend, "ip": str(vif.ip) if vif.ip else None,
                 "mtu": vif.mtu or 1500, "export_kind": vif.export_kind or "tap",
                 "export": self._vif_export(d, devid, vif) if vif.export_kind == EXPORT_VHOST_USER else None}
                for devid, vif in _vifs(d.spec)],
        }
        if d.kind == DomainKind.GUEST:
            row["vm"] = self.vms.row(d)
        if d.kind == DomainKind.NETBACK:
            # The vifs it serves; bridged, each with its bridge and its TAP in this domain's namespace.
            row["switch"] = str(d.switch)
            row["vifs"] = [
                {"frontend": fe.name, "frontend_domid": fe.domid, "devid": devid, "mac": vif.mac,
                 "bridge": _bridge_of(d, vif), "tap": _backend_tap(d, fe, devid)}
                for fe in self.domains for devid, vif in _vifs(fe.spec) if vif.backend == d.name]
        return row

    # ---- bookkeeping -----------------------------------------------------------

    def _set_state(self, d: _Domain, state: State, detail: str = "") -> None:
        if d.state != state:
            log.debug("domain %s: %s -> %s %s", d.name, d.state, state, detail)
        d.state = state
        d.changes += 1

    def _log_to(self, d: _Domain, text: str) -> None:
        """A line of the supervisor's own in the domain's log, so the log tells the whole story."""
        try:
            fd = os.open(self.layout.log_path(d.name), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError:
            return
        try:
            _log_marker(fd, text)
        finally:
            os.close(fd)

    def _record(self, name: str, event: str, detail: str = "") -> None:
        self.journal.append(JournalEntry(time.monotonic(), name, event, detail))

    def _progress(self, line: str) -> None:
        if self._progress_cb is not None:
            try:
                self._progress_cb(line)
            except Exception:
                log.exception("progress callback failed")

    def _close_loop(self) -> None:
        self._seccomp_kills.close()
        if self._control is not None:
            self._poller.unregister(self._control.socket)
            self._control.close()
            self._control = None
        if self._sub is not None:
            self._poller.unregister(self._sub)
            self._sub.close(0)
            self._sub = None
        for fd in list(self._fd_handlers):
            self._unwatch_fd(fd)
        if self._broker_pidfd >= 0:
            os.close(self._broker_pidfd)
            self._broker_pidfd = -1
        if self._wake is not None:
            self._poller.unregister(self._wake.fileno())
            self._wake.close()
            self._wake = None


def _logged(step: Callable[[], Any], what: str) -> None:
    """A step that runs later, with no one to answer: its failure goes to the log."""
    try:
        step()
    except (XenstoreError, OSError, TimeoutError) as e:
        log.error("%s: %s", what, e)


def _vifs(spec: DomainSpec) -> list[tuple[int, VifSpec]]:
    """(devid, vif): libxl numbers a domain's vifs 0, 1, ... unless xl's devid= says otherwise."""
    return vif_devids(spec.vifs)


def _tap_vifs(spec: DomainSpec) -> list[tuple[int, VifSpec]]:
    """The vifs that are TAP devices in the guest's namespace (not a VM's vhost-user NICs)."""
    return [(devid, vif) for devid, vif in vif_devids(spec.vifs) if vif.export_kind is None]


def _backend_tap(be: _Domain | None, fe: _Domain, devid: int) -> str | None:
    """The name of the vif's TAP in a bridged netback's namespace, or None (builtin switch, no domid yet)."""
    if be is None or be.switch != NetSwitch.BRIDGE or fe.domid is None:
        return None
    try:
        return backend_tap_name(fe.domid, devid)
    except TapError:
        return None


def _bridge_of(be: _Domain, vif: VifSpec) -> str | None:
    """The bridge a vif joins: its ``bridge=``, else xdombr0 when its netback bridges; the builtin switch has none."""
    if be.switch == NetSwitch.BRIDGE:
        return vif.bridge or DEFAULT_BRIDGE
    return vif.bridge


def _ifname(devid: int) -> str:
    """The guest-side interface of vif ``devid``: eth0, eth1, ... as a Linux guest names them."""
    return f"eth{devid}"


DETACH_TIMEOUT = 5.0      # seconds block-detach waits for the backend to report Closed
# A guest's arguments naming where it may bind export sockets (its Landlock rules allow those directories).
_EXPORT_ARGS = ("--export-dir=", "--disk=", "--vhost-user-disk=", "--vhost-user-vif=")
_READY_PIPE_KINDS = (DomainKind.XENSTORED, DomainKind.GUEST, DomainKind.BLKBACK, DomainKind.NETBACK)


def _remove_made_dir(path: str) -> None:
    """An export directory this supervisor made outside the run directory goes, with what its guest left in it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
        shutil.rmtree(path, ignore_errors=True)     # follows no symlink


def _unlink_socket(path: str) -> None:
    """Remove a unix socket left at ``path`` (never a file of another kind)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def _last_line(path: str) -> str:
    """The last line of a log, for an error message that says why without sending people hunting."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return (lines[-1] if lines else "(nothing logged)") + f" (see {path})"


def _log_marker(fd: int, text: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(fd, f"--- xdom {stamp}: {text}\n".encode())


