"""A host without its supervisor: adopted by a new one, described by ``xdom ps``, stopped by ``xdom down``.

When a supervisor dies outright, its host runs on: nothing it started has a
parent-death signal, the broker and every domain and VM are in sessions of
their own, and the keeper (``deploy/keeper.py``) still holds the supervisor's
ends of the device channels, the ready pipes of domains still starting and
the uid locks.  What the supervisor knew is in ``RUN_DIR/supervisor-state``
(``deploy/host_state.py``).  From there:

* **Adoption** (:func:`adopt`, from ``Supervisor._setup`` when a new ``xdom
  up`` of the same topology finds a live host in its run directory).  The
  supervisor's tables are rebuilt from the state file, each process
  recognised by pid *and* start time and watched through a pidfd from then
  on; the broker's ``list`` says which domains it runs (and with which pid),
  so a domain the state file calls running is believed only when the broker
  agrees; the device channels and ready pipes come back from the keeper; the
  uids are locked again (the keeper's locks, or new ones).  A broker that died
  meanwhile is replaced by one that takes over from its state, as when it
  dies under a live supervisor.  A process that died while no supervisor ran
  is handled as if it had just died, by its restart policy; so is one that
  dies after adoption.  Neither is our child, so neither has an exit status
  we can read (``waitpid`` is its reaper's): what the broker saw decides,
  as Xen's toolstack decides from the hypervisor's shutdown code -- a
  ``poweroff`` the domain declared is a clean exit, anything else a failure
  -- and ``xdom ps`` says "exit status unknown (adopted)".  Processes of the
  run directory the state file does not name (one started just before the
  supervisor died, before it could write it down) are stopped.

* **ps without a supervisor** (:func:`report`): the state file, each process
  checked by pid and start time, the broker asked with a one-second timeout
  when it runs: "supervisor not running; host adopted by none; N domains
  alive", bounded in time.

* **down without a supervisor** (:func:`stop_orphaned`): under the pid file's
  lock (so no supervisor starts meanwhile), every process the state file
  names is stopped (VMs, then domains in reverse start order, then the
  broker and the keeper: SIGTERM through its pidfd and to its process group,
  a grace period, SIGKILL), anything else of the run directory too, then
  the namespaces (with the TAPs and bridges in them), the export
  directories made outside the run directory, xenstored's store, the run
  directory's files and the run directory.  Nothing is adopted: it works
  when the topology file is gone, changed, or never readable by this user.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import psutil
import zmq

from xdom.broker.mgmt_client import ManagementClient, ManagementError

from . import host_state, netns
from .host_state import AdoptedProcess
from .isolation import LOCK_DIR, UidPlan, _lock
from .keeper import KeeperClient, KeeperError, keeper_argv
from .launcher import BrokerProcess, start_ready
from .lifecycle import Lifecycle, Phase, State
from .policy import ExitStatus
from .rundir import Layout, PidFile, clear_run_files, remove_run_dir, stop_leftovers
from .supervised_domain import SupervisorError

if TYPE_CHECKING:
    from .supervised_domain import SupervisedDomain
    from .supervision import SupervisorBase
    from .supervisor import Supervisor

__all__ = ["REPORT_TIMEOUT", "adopt", "keeper_start", "report", "snapshot", "stop_orphaned"]

log = logging.getLogger("xdom.supervisor")

REPORT_TIMEOUT = 1.0      # seconds `xdom ps` waits for a broker without a supervisor
ORPHAN_GRACE = 3.0        # seconds `xdom down` without a supervisor gives a process after SIGTERM
_ALIVE_STATES = ("starting", "running", "stopping")


# ---- writing it down ---------------------------------------------------------------------------

def snapshot(sup: SupervisorBase) -> dict[str, Any]:
    """The model of ``sup``'s host, as the state file keeps it."""
    plan = sup.uid_plan
    return {
        "version": host_state.VERSION, "boot_id": sup._boot_id, "written": time.time(),
        "topology": os.path.abspath(sup.topology.source), "digest": sup._digest,
        "state_dir": sup.layout.state_dir, "run_dir": sup.layout.run_dir, "phase": sup.phase,
        "supervisor": sup._ident, "keeper": sup._keeper_ident,
        "broker": sup._broker_ident, "broker_deaths": list(sup._broker_deaths),
        "uids": None if plan is None else {"separate": plan.separate, "note": plan.note, "map": plan.uids},
        "uid_mode": str(sup.uid_mode), "log_level": sup.log_level, "stop_grace": sup.stop_grace,
        "ready_timeout": sup.ready_timeout, "dom0_written": sup._dom0_written, "disk_serial": sup._disk_serial,
        "made_exports": dict(sup._made_exports), "undo_attach": [list(u) for u in sup._undo_attach],
        "domains": [_domain_row(d) for d in sup.domains],
        "vms": sup.vms.snapshot(),
    }


def _domain_row(d: SupervisedDomain) -> dict[str, Any]:
    return {
        "name": d.name, "kind": str(d.kind), "state": str(d.state), "domid": d.domid, "creds": d.creds,
        "store": list(d.store) if d.store is not None else None, "ident": d.ident, "generation": d.generation,
        "phase": str(d.phase), "ever_ready": d.life.ever_ready, "connected": d.connected, "introduced": d.introduced,
        "ready_seen": d.ready_seen, "started_mono": d.started_mono,
        "deadline": d.deadline, "reset_since": d.reset_since,
        "kill_reason": d.kill_reason, "confinement": d.confinement, "netns": d.netns, "uid": d.uid,
        "switch": str(d.switch) if d.switch is not None else None, "last_exit": d.last_exit, "changes": d.changes,
        "offered": [list(k) for k in sorted(d.offered)], "restarts": list(d.tracker._restarts),
        "disks": host_state.encode_disks(d.spec.disks), "vifs": host_state.encode_vifs(d.spec.vifs),
        "args": d.argv if d.proc is not None and d.pidfd >= 0 else None,
        "devices_kept": d.devices is not None,
    }


# ---- the keeper ----------------------------------------------------------------------------------

def keeper_start(layout: Layout) -> tuple[AdoptedProcess | subprocess.Popen[bytes], KeeperClient]:
    """Start the host's keeper (its own session, no parent-death signal) and connect to it."""
    proc = start_ready(keeper_argv(sys.executable, layout.run_dir), layout.log_path("keeper"), "the keeper", 30.0)
    try:
        client = KeeperClient(os.path.join(layout.run_dir, "keeper.sock"), proc.pid)
    except KeeperError:
        proc.kill()
        proc.wait()
        raise
    return proc, client


# ---- adoption ----------------------------------------------------------------------------------

def host_alive(model: dict[str, Any]) -> bool:
    """Does anything the state file names still run (the broker, the keeper, a domain, a VM)?"""
    idents = [model.get("broker"), model.get("keeper")]
    idents += [r.get("ident") for r in model.get("domains", [])]
    idents += [r.get("ident") for r in (model.get("vms") or {}).values()]
    return any(host_state.alive(i) for i in idents if i)


def adopt(sup: Supervisor, model: dict[str, Any]) -> list[str]:
    """Rebuild ``sup``'s tables from the state file and the live host; returns lines for ``xdom up``.

    Called with the pid file held and nothing of ``sup`` started.  Raises
    SupervisorError when the host cannot be adopted (the broker is gone and
    another cannot take over).
    """
    said: list[str] = []
    lay = sup.layout
    now = time.monotonic()
    dead_before = model.get("supervisor") or {}
    said.append(f"adopting the host in {lay.run_dir}: its supervisor (pid {dead_before.get('pid', '?')}) is gone; "
                f"state written {time.time() - float(model.get('written') or 0):.1f}s ago")

    # The keeper first: it holds the uid locks and the device channels.
    kept: dict[str, int] = {}
    kproc = AdoptedProcess.of(model.get("keeper"))
    if kproc is not None:
        try:
            sup._keeper = KeeperClient(os.path.join(lay.run_dir, "keeper.sock"), kproc.pid)
            kept = sup._keeper.get()
            sup._keeper_proc = kproc
            said.append(f"keeper: pid {kproc.pid}, {len(kept)} descriptors handed back")
        except KeeperError as e:
            log.error("the keeper (pid %d) cannot be used (%s): stopping it, starting another", kproc.pid, e)
            kproc.kill()
            kproc.close()
            kproc = None
    if kproc is None:
        said.append("keeper: gone; a new one started (the device channels it held are lost: a domain whose "
                    "channel is gone gets no new device until it restarts)")
        sup._start_keeper()
    else:
        sup._watch_keeper()
    try:
        _adopt_uids(sup, model, kept)
        _adopt_broker(sup, model, said)
        sup._connect_loop()
        listed = _broker_list(sup)
        for rec in model.get("domains", []):
            d = sup._by_name.get(rec.get("name"))
            if d is None or str(d.kind) != rec.get("kind"):
                continue
            _adopt_domain(sup, d, rec, kept, listed, now, said)
        sup.vms.adopt(model.get("vms") or {}, now, said)
    finally:
        for fd in kept.values():
            os.close(fd)
    sup._dom0_written = bool(model.get("dom0_written"))
    sup._disk_serial = int(model.get("disk_serial") or 0)
    sup._made_exports = {str(k): str(v) for k, v in (model.get("made_exports") or {}).items()}
    sup._undo_attach = [tuple(u) for u in model.get("undo_attach") or []]
    sup._broker_deaths = [float(t) for t in model.get("broker_deaths") or []]
    _stop_strays(sup, said)
    alive = sum(1 for d in sup.domains if d.state in (State.STARTING, State.RUNNING, State.STOPPING) and d.pidfd >= 0)
    said.append(f"adopted: {alive} of {len(sup.domains)} domains alive, same pids and domids")
    if sup.broker is None or sup.mgmt is None:
        raise SupervisorError("no broker after adoption")
    return said


def _adopt_uids(sup: Supervisor, model: dict[str, Any], kept: dict[str, int]) -> None:
    u = model.get("uids")
    if u is None:
        from .isolation import plan_uids
        sup.uid_plan = plan_uids(sup.topology, sup.uid_mode)
    else:
        uids = {str(k): (int(v) if v is not None else None) for k, v in (u.get("map") or {}).items()}
        plan = UidPlan(bool(u.get("separate")), uids, str(u.get("note") or ""))
        for name, uid in uids.items():
            if uid is None:
                continue
            fd = kept.pop(f"uid/{name}", None)
            if fd is None and os.geteuid() == 0:
                os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
                fd = _lock(LOCK_DIR, uid)
                if fd is None:
                    log.error("uid %d of domain %s is locked by another host now: two hosts share it until one "
                              "stops", uid, name)
            if fd is not None:
                plan._locks.append(fd)
                plan.lock_of[name] = fd
        sup.uid_plan = plan
    for d in sup.domains:
        d.uid = sup.uid_plan.uids.get(d.name)
    sup.vms.separate_uids = sup.uid_plan.separate
    sup._keep_uid_locks()


def _adopt_broker(sup: Supervisor, model: dict[str, Any], said: list[str]) -> None:
    bproc = AdoptedProcess.of(model.get("broker"))
    lay = sup.layout
    if bproc is not None:
        sup.broker = BrokerProcess(bproc, lay.run_dir)
        sup._broker_ident = model.get("broker")
        sup._broker_pidfd = bproc.pidfd()
        sup._watch_fd(sup._broker_pidfd, sup._on_broker_exit)
        sup.mgmt = sup.broker.client()
        try:
            sup.mgmt.request("ping")
        except (ManagementError, TimeoutError) as e:
            raise SupervisorError(f"the broker (pid {bproc.pid}) does not answer: {e}") from None
        said.append(f"broker: pid {bproc.pid}, adopted")
        sup._record("broker", "adopted", f"pid {bproc.pid}")
        return
    # It died while no supervisor ran: a new one takes over from what it wrote down, as in _on_broker_exit.
    try:
        sup._start_broker()
    except (RuntimeError, TimeoutError) as e:
        raise SupervisorError(f"the broker died while no supervisor ran, and another did not start ({e})") from None
    assert sup.broker is not None        # _start_broker set it
    said.append(f"broker: gone; a new one (pid {sup.broker.proc.pid}) took over the running domains")
    sup._record("broker", "restarted", f"pid {sup.broker.proc.pid}: took over (adoption)")


def _broker_list(sup: Supervisor) -> dict[int, dict[str, Any]]:
    assert sup.mgmt is not None
    try:
        return {int(s["domid"]): s for s in sup.mgmt.request("list")["domains"]}
    except (ManagementError, TimeoutError) as e:
        log.warning("the broker did not list its domains: %s", e)
        return {}


def _phase_of(rec: dict[str, Any]) -> Phase:
    """A domain's lifecycle phase as the state file has it (or, written by an earlier xdom, its state with
    the after_stop and waiting_for_store that said the rest)."""
    if rec.get("phase"):
        return Phase(rec["phase"])
    state = State(rec.get("state", "pending"))
    if state == State.STOPPING:
        return {"restart": Phase.STOPPING_RESTART, "destroy": Phase.STOPPING_DESTROY}.get(
            str(rec.get("after_stop") or ""), Phase.STOPPING)
    if state == State.BACKOFF and rec.get("waiting_for_store"):
        return Phase.AWAITING_STORE
    return Phase(state.value)


def _adopt_domain(sup: Supervisor, d: SupervisedDomain, rec: dict[str, Any], kept: dict[str, int],
                  listed: dict[int, dict[str, Any]], now: float, said: list[str]) -> None:
    from .topology import NetSwitch
    d.spec = dataclasses.replace(d.spec, disks=host_state.decode_disks(rec.get("disks")),
                                 vifs=host_state.decode_vifs(rec.get("vifs")))
    d.life = Lifecycle(_phase_of(rec), bool(rec.get("ever_ready", rec.get("started_once"))))
    d.domid = rec.get("domid")
    d.creds = rec.get("creds")
    d.store = tuple(rec["store"]) if rec.get("store") else None
    d.generation = int(rec.get("generation") or 0)
    d.connected = bool(rec.get("connected"))
    d.introduced = bool(rec.get("introduced"))
    d.ready_seen = bool(rec.get("ready_seen"))
    d.started_mono = float(rec.get("started_mono") or now)
    d.reset_since = rec.get("reset_since")
    d.kill_reason = str(rec.get("kill_reason") or "")
    d.confinement = str(rec.get("confinement") or "")
    d.netns = rec.get("netns")
    if rec.get("switch"):
        d.switch = NetSwitch(rec["switch"])
    d.last_exit = str(rec.get("last_exit") or "")
    d.changes = int(rec.get("changes") or 0) + 1
    d.offered = {tuple(k) for k in rec.get("offered") or []}
    d.tracker._restarts.clear()
    d.tracker._restarts.extend(float(t) for t in rec.get("restarts") or [])
    devices = kept.pop(f"dev/{d.name}", None)
    ready = kept.pop(f"ready/{d.name}", None)
    if d.state not in (State.STARTING, State.RUNNING, State.STOPPING):
        for fd in (devices, ready):
            if fd is not None:
                os.close(fd)
        if d.state == State.BACKOFF:
            d.deadline = max(now, float(rec.get("deadline") or now))
        sup._forget_kept(d)
        return
    proc = AdoptedProcess.of(rec.get("ident"))
    b = listed.get(d.domid) if d.domid is not None else None
    if proc is not None and b is not None and b.get("state") in ("running", "paused") and b.get("pid") != proc.pid:
        # the broker runs another process as this domain: not the one we knew (started, unrecorded, as ours died)
        log.warning("domain %s: the broker runs pid %s as domid %s, not pid %d as recorded: the recorded process "
                    "is not believed", d.name, b.get("pid"), d.domid, proc.pid)
        proc.close()
        proc = None
    if proc is None:
        for fd in (devices, ready):
            if fd is not None:
                os.close(fd)
        sup._forget_kept(d)
        d.proc, d.pidfd, d.ident = None, -1, None
        sup._adopted_dead.append(d)      # handled once the loop runs: its restart policy decides
        return
    d.proc = proc
    d.ident = rec.get("ident")
    d.pidfd = proc.pidfd()
    sup._watch_fd(d.pidfd, lambda: sup._on_process_exit(d))
    if devices is not None:
        d.devices = socket.socket(fileno=devices)
        d.devices.setblocking(False)
    elif rec.get("devices_kept"):
        log.warning("domain %s: its device channel was lost with the keeper: it gets no new device until it "
                    "restarts", d.name)
    if ready is not None and d.state == State.STARTING and not d.ready_seen:
        d.ready_fd = ready
        sup._watch_fd(ready, lambda: sup._on_ready_pipe(d))
    elif ready is not None:
        os.close(ready)
    if d.state == State.STARTING:
        if b is not None and b.get("state") in ("running", "paused") and b.get("pid") == proc.pid:
            d.connected = True
        d.deadline = now + sup.ready_timeout
    elif d.state == State.STOPPING:
        sup._signal_group(d, signal.SIGTERM)
        d.deadline = now + sup.stop_grace
    else:
        d.deadline = None
    sup._record(d.name, "adopted", f"pid {proc.pid} domid {d.domid} generation {d.generation}")


def _stop_strays(sup: Supervisor, said: list[str]) -> None:
    """Processes of this run directory that the state file does not name: started just before the dead
    supervisor could write them down.  Ours (and their children) are spared."""
    spared = set()
    for p in sup._our_pids():
        spared.add(p)
        try:
            spared.update(c.pid for c in psutil.Process(p).children(recursive=True))
        except psutil.Error:
            pass
    for what in stop_leftovers(sup.layout.run_dir, spared, width=200):
        log.warning("stopped %s: a process of %s its supervisor never wrote down", what, sup.layout.run_dir)
        said.append(f"stopped a process its supervisor never wrote down ({what[:80]})")


# ---- a host without a supervisor: ps and down -----------------------------------------------------

def report(run_dir: str) -> dict[str, Any] | None:
    """What ``xdom ps`` says of a host whose supervisor is gone, or None when there is no state file.

    Bounded: /proc reads and, if the broker runs, one ``list`` with a
    :data:`REPORT_TIMEOUT` second timeout.  Raises StateError.
    """
    model = host_state.load(run_dir)
    if model is None:
        return None
    broker_alive = host_state.alive(model.get("broker"))
    listed: dict[int, dict[str, Any]] = {}
    if broker_alive:
        client = ManagementClient(Layout("/", run_dir).mgmt_endpoint, REPORT_TIMEOUT)
        try:
            listed = {int(s["domid"]): s for s in client.request("list")["domains"]}
        except (ManagementError, TimeoutError, zmq.ZMQError):
            pass
        finally:
            client.close()
    vms = model.get("vms") or {}
    rows = []
    for rec in model.get("domains", []):
        ident = rec.get("ident")
        live = host_state.alive(ident) if rec.get("state") in _ALIVE_STATES else False
        b = listed.get(rec.get("domid")) if rec.get("domid") is not None else None
        state = rec.get("state") if live or rec.get("state") not in _ALIVE_STATES else "dead"
        row = {"name": rec.get("name"), "kind": rec.get("kind"), "domid": rec.get("domid"), "state": state,
               "recorded_state": rec.get("state"), "alive": live, "pid": ident.get("pid") if live and ident else None,
               "domain_state": b.get("state") if b else None, "generation": rec.get("generation"),
               "restarts": max(0, int(rec.get("generation") or 0) - 1), "netns": rec.get("netns"),
               "last_exit": rec.get("last_exit") or None, "supervised": False}
        vm = vms.get(rec.get("name"))
        if vm is not None:
            vlive = host_state.alive(vm.get("ident")) if vm.get("state") in _ALIVE_STATES else False
            row["vm"] = {"state": vm.get("state") if vlive or vm.get("state") not in _ALIVE_STATES else "dead",
                         "alive": vlive, "pid": (vm.get("ident") or {}).get("pid") if vlive else None}
        rows.append(row)
    sup = model.get("supervisor") or {}
    return {"supervisor": None, "dead_supervisor_pid": sup.get("pid"), "adopted_by": None,
            "written": model.get("written"), "topology": model.get("topology"), "run_dir": run_dir,
            "state_dir": model.get("state_dir"), "phase": model.get("phase"),
            "broker_pid": (model.get("broker") or {}).get("pid") if broker_alive else None,
            "broker_alive": broker_alive, "keeper_alive": host_state.alive(model.get("keeper")),
            "domains_alive": sum(1 for r in rows if r["alive"]), "domains": rows}


def _stop_together(idents: list[tuple[str, dict[str, Any] | None]], grace: float, group: bool = True) -> list[str]:
    """Stop these processes together: SIGTERM (through each pidfd, and to its process group: a guest's
    workload too), up to ``grace`` seconds for all, SIGKILL for the rest; what they were."""
    live: list[tuple[str, int, int]] = []
    for what, ident in idents:
        fd = host_state.open_pidfd(ident)
        if fd is not None:
            assert ident is not None
            pid = int(ident["pid"])
            live.append((f"{what}, pid {pid}: {' '.join(host_state._cmdline(pid))[:160]}", pid, fd))

    def signal_all(sig: int, procs: list[tuple[str, int, int]]) -> None:
        for _, pid, fd in procs:
            try:
                signal.pidfd_send_signal(fd, sig)
            except ProcessLookupError:
                continue
            if group:
                try:
                    os.killpg(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    try:
        signal_all(signal.SIGTERM, live)
        deadline = time.monotonic() + grace
        left = list(live)
        while left and time.monotonic() < deadline:
            ready, _, _ = select.select([fd for _, _, fd in left], [], [], deadline - time.monotonic())
            left = [p for p in left if p[2] not in ready]
        if left:
            signal_all(signal.SIGKILL, left)
            for _, _, fd in left:
                select.select([fd], [], [], 10.0)
        if group:
            for _, pid, _ in live:
                try:
                    os.killpg(pid, signal.SIGKILL)      # whatever of its group outlived it
                except (ProcessLookupError, PermissionError):
                    pass
    finally:
        for _, _, fd in live:
            os.close(fd)
    return [what for what, _, _ in live]


def stop_orphaned(run_dir: str) -> tuple[list[str], bool]:
    """``xdom down`` without a supervisor; returns (what was stopped or removed, whether a state file was there).

    Raises LayoutError when a supervisor holds the run directory meanwhile
    (the caller asks it instead).
    """
    lay = Layout("/", run_dir)
    pidfile = PidFile(lay.pid_file)
    pidfile.acquire()
    done: list[str] = []
    try:
        try:
            model = host_state.load(run_dir)
        except host_state.StateError as e:
            log.warning("%s: stopping what the run directory shows instead", e)
            model = None
        if model is not None:
            grace = min(float(model.get("stop_grace") or ORPHAN_GRACE), ORPHAN_GRACE)
            # The VMs first, then every domain together, then the broker, then the keeper.
            done += _stop_together([(f"VM of {name}", vm.get("ident")) for name, vm in (model.get("vms") or {}).items()
                                    if isinstance(vm, dict)], grace)
            # Without a broker a domain cannot say its poweroff (it would wait for a broker to rejoin): short.
            broker_alive = host_state.alive(model.get("broker"))
            done += _stop_together([(f"{r.get('kind')} domain {r.get('name')}", r.get("ident"))
                                    for r in model.get("domains", [])], grace if broker_alive else 0.5)
            done += _stop_together([("broker", model.get("broker"))], grace)
            done += _stop_together([("keeper", model.get("keeper"))], grace, group=False)
        me = psutil.Process()
        done += stop_leftovers(run_dir, {me.pid, *(q.pid for q in me.parents())}, width=160)
        names = set(netns.of_host(run_dir))
        if model is not None:
            names.update(r["netns"] for r in model.get("domains", []) if r.get("netns"))
        for name in sorted(names):
            try:
                if netns.exists(name):
                    netns.delete(name)
                    done.append(f"network namespace {name}")
            except netns.NetnsError as e:
                log.warning("%s", e)
        if model is not None:
            for folder in (model.get("made_exports") or {}):
                try:
                    st = os.lstat(folder)
                except FileNotFoundError:
                    continue
                if os.path.isdir(folder) and st.st_uid == os.geteuid():
                    shutil.rmtree(folder, ignore_errors=True)
                    done.append(f"export directory {folder}")
            state_dir = model.get("state_dir")
            if state_dir:
                shutil.rmtree(Layout(state_dir, run_dir).xenstored_state, ignore_errors=True)
        leftover_files = os.path.isdir(run_dir) and any(n != "supervisor.pid" for n in os.listdir(run_dir))
        clear_run_files(lay)
        host_state.remove(run_dir)
        if leftover_files and not done:
            done.append(f"the files a dead supervisor left in {run_dir}")
    finally:
        pidfile.release()
    remove_run_dir(lay)
    return done, model is not None


def status_after_adopted_death(mgmt: ManagementClient | None, domid: int | None, pid: int | None,
                               settle: float = 0.3) -> ExitStatus:
    """An adopted domain process ended: what the broker saw decides clean or not (we cannot ``waitpid`` it).

    The broker notices the death on its own pidfd, perhaps a moment after
    us: it is asked again for up to ``settle`` seconds while it still shows
    the dead pid running.
    """
    if mgmt is None or domid is None:
        return ExitStatus(unknown="adopted")
    deadline = time.monotonic() + settle
    while True:
        try:
            info = mgmt.request("info", domid=domid)["domain"]
        except (ManagementError, TimeoutError):
            return ExitStatus(unknown="adopted")
        if info.get("state") in ("running", "paused") and info.get("pid") == pid and time.monotonic() < deadline:
            time.sleep(0.02)        # bounded: the broker is about to see it too
            continue
        reason = str(info.get("shutdown_reason") or "")
        if info.get("state") == "shutdown" and reason in ("poweroff", "reboot"):
            return ExitStatus(unknown=f"adopted; the broker saw it {reason}", seen_clean=True)
        if reason:
            return ExitStatus(unknown=f"adopted; the broker saw it {reason}")
        return ExitStatus(unknown="adopted")
