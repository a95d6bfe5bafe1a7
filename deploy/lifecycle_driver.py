"""The lifecycle table (``deploy/lifecycle.py``) driven: readiness, deaths, stops, restarts, destroys, health.

The fourth layer of the supervisor (``deploy/supervision.py`` lists them).
Everything that moves a domain through its lifecycle goes through
:meth:`LifecycleDriver._fire`: the event is fed to the pure table, and the
transition's effects are performed here, in order (launch, timers, signals,
announcements, release, destroy).  The handlers of the loop only turn what
they saw into events: a pidfd that became readable is EXITED, a ready pipe
or the broker's report that completes :func:`is_ready` is READY, a timer is
DEADLINE.  An exit nobody asked for is judged by the restart policy
(``deploy/policy.py``) and its decision comes back as an event.

Also here, because they decide deaths: the health limits (a domain over its
topology ``limits`` is killed with a log line saying why) and the broker's
own death (another broker takes over; only a broker that keeps dying ends
the host).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import time
from dataclasses import dataclass

import msgpack
import psutil
import zmq

from xdom.broker.mgmt_client import ManagementError
from xdom.domains.abi.xs_wire import XenstoreError

from . import adopt, host_state
from .confined import parse_ready
from .control import ControlError
from .isolation import is_system_user, kill_leftovers_of
from .launcher import start_broker
from .lifecycle import Effect, Event, Phase, State, died, is_ready
from .log_bound import bound_log
from .policy import Action, ExitStatus, HealthSample
from .process_tree import ProcessTree
from .spawning import Spawning
from .supervised_domain import READY_PIPE_KINDS, SupervisedDomain
from .supervision import _BROKER, BROKER_FLAP_LIMIT, BROKER_FLAP_WINDOW, RESET_RETRY, TAKEOVER_FAILED
from .topology import DomainKind
from .xsnodes import write_dom0_nodes

__all__ = ["LifecycleDriver"]

log = logging.getLogger("xdom.supervisor")


@dataclass(frozen=True, slots=True)
class _Death:
    """An exit (or a launch that got no process, status 127) for the restart policy to judge."""

    status: ExitStatus
    reason: str
    uptime: float
    pid: int | None


class LifecycleDriver(Spawning):
    """Drives each domain's lifecycle (see the module's docstring)."""

    def _deadline(self, d: SupervisedDomain, now: float) -> None:
        """Its timer fired: ready timeout, stop grace, backoff, or a retry of a launch."""
        if d.phase == Phase.STARTING and d.kind == DomainKind.PROGRAM and not d.connected:
            log.warning("program %s (pid %s) has not connected to the broker within %gs: it runs as a plain "
                        "process, not a domain, and stays dumpable (a program calls xdom.domains.xenhost.connect())",
                        d.name, d.pid, self.ready_timeout)
            self._progress(f"{d.name}: program started (pid {d.pid}) but not connected to the broker: "
                           f"not a domain")
            self._fire(d, Event.READY)
        else:
            self._fire(d, Event.DEADLINE)

    # ---- the table, driven --------------------------------------------------------------

    def _fire(self, d: SupervisedDomain, event: Event, why: str = "", *, delay: float = 0.0,
              death: _Death | None = None) -> None:
        """Feed ``event`` to ``d``'s lifecycle and perform the transition's effects, in order.

        ``why`` is said with a release; ``delay`` is a restart's backoff; ``death`` is the exit the
        restart policy judges when the table asks for it.
        """
        before = d.phase
        t = d.life.fire(event)
        if t.phase != before:
            log.debug("domain %s: %s -> %s on %s %s", d.name, before, t.phase, event, why)
            d.changes += 1
        for effect in t.effects:
            self._perform(d, effect, why, delay, death)

    def _perform(self, d: SupervisedDomain, effect: Effect, why: str, delay: float,
                 death: _Death | None) -> None:
        now = time.monotonic()
        if effect == Effect.LAUNCH:
            self._launch_now(d)
        elif effect == Effect.ASK_POLICY:
            self._judge(d, death or _Death(ExitStatus(code=127), why, 0.0, None))
        elif effect == Effect.ARM_BACKOFF:
            d.deadline = now + delay
        elif effect == Effect.ARM_RETRY:
            d.deadline = now + RESET_RETRY
        elif effect == Effect.ARM_NOW:
            d.deadline = now
        elif effect == Effect.CANCEL_TIMER:
            d.deadline = None
        elif effect == Effect.STOP_PROCESS:
            d.deadline = None
            then = {Phase.STOPPING_RESTART: "restart", Phase.STOPPING_DESTROY: "destroy"}.get(d.phase, "")
            if not self.vms.stop_first(d, then, lambda: self._signal_stop(d)):   # a VM powers off first
                self._signal_stop(d)
        elif effect == Effect.KILL:
            self._signal_group(d, signal.SIGKILL)
        elif effect == Effect.KILL_NOT_READY:
            missing = ("it has not connected to the broker" if not d.connected else
                       "xenstore set-up did not succeed" if self._needs_store(d) and not d.introduced else
                       "it did not signal ready")
            self._kill(d, f"not ready within {self.ready_timeout:g}s ({missing})")
        elif effect == Effect.ANNOUNCE_READY:
            self._announce_ready(d)
        elif effect == Effect.RELEASE:
            if d is self.xenstored:
                log.error("the xenstore domain is down for good: domains cannot reach the store")
            self.vms.domain_gone(d, why)
            self._release_down(d)
        elif effect == Effect.DESTROY:
            self._destroy(d)
        elif effect == Effect.REFUSE_BUSY:
            raise ControlError.of(errno.EBUSY, f"domain {d.name} is {d.phase}")

    def _launch_now(self, d: SupervisedDomain) -> None:
        """LAUNCH: the process (spawning.py), then its outcome fed back to the table."""
        event, why = self._launch(d)
        if event != Event.SPAWNED:
            self._fire(d, event, why)
            return
        assert d.proc is not None
        self._watch_fd(d.pidfd, lambda: self._on_process_exit(d))
        if d.ready_fd >= 0:
            self._watch_fd(d.ready_fd, lambda: self._on_ready_pipe(d))
        self._fire(d, Event.SPAWNED, why)
        self._record(d.name, "spawn", f"pid {d.proc.pid} domid {d.domid}")
        self._save_state()          # a supervisor that dies from now on leaves this process written down
        self._replug(d)

    def _on_ready_pipe(self, d: SupervisedDomain) -> None:
        """The domain said ready (or closed its end).  The word is written down (the host state) before
        it is taken: a supervisor killed in between leaves it in the channel, whose other copy the keeper
        holds, for the supervisor that adopts the host; one killed after has it in the state."""
        data = _peek(d.ready_fd)
        if data:
            _failpoint(d.name, "seen")
            d.ready_seen = True
            d.confinement = parse_ready(data)
            if d.kind == DomainKind.XENSTORED:
                d.connected = True      # it connects to the broker before it serves
            self._save_state()
            _failpoint(d.name, "saved")
        self._close_ready(d)
        self._unkeep(f"ready/{d.name}")
        if data:
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

    def _check_connected(self, d: SupervisedDomain) -> None:
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

    def _on_connected(self, d: SupervisedDomain) -> None:
        d.connected = True
        self._record(d.name, "connected")
        if self._needs_store(d) and self._store_up():
            self._introduce(d)
        self._maybe_ready(d)

    def _introduced(self, d: SupervisedDomain) -> None:
        self._maybe_ready(d)

    def _maybe_ready(self, d: SupervisedDomain) -> None:
        if d.phase == Phase.STARTING and is_ready(
                is_store=d.kind == DomainKind.XENSTORED, needs_store=self._needs_store(d),
                has_ready_pipe=d.kind in READY_PIPE_KINDS, connected=d.connected, introduced=d.introduced,
                ready_seen=d.ready_seen):
            self._fire(d, Event.READY)

    def _announce_ready(self, d: SupervisedDomain) -> None:
        """ANNOUNCE_READY: said, and whatever waited for it starts (domains waiting for xenstored, its VM)."""
        d.deadline = None
        took = time.monotonic() - d.started_mono
        self._record(d.name, "ready", f"{took:.2f}s")
        what = f"{d.kind} domain {d.domid}" if d.connected else f"{d.kind} process"
        self._progress(f"{d.name}: {what} ready (pid {d.pid}, {took:.2f}s, log {self.layout.log_path(d.name)})")
        if d is self.xenstored:
            self._on_store_up()
        self.vms.domain_ready(d)            # a guest's VM starts once its guest domain serves its sockets

    def _on_store_up(self) -> None:
        """xenstored serves (first start or restart): domain 0's nodes, then whoever waited for it."""
        self._store_silent = False              # a new xenstored: nothing of it went unanswered yet
        self._store_probe().requests_answered()
        try:
            with self._xs() as xs:
                if not self._dom0_written:
                    write_dom0_nodes(xs)
                    self._dom0_written = True
                assert self.xenstored is not None
                self._write_domain_nodes(xs, self.xenstored)
        except (XenstoreError, OSError, TimeoutError) as e:
            log.warning("xenstore set-up of domain 0 failed: %s", e)
        except Exception:                   # a xenstored's answer must not end the supervisor
            log.exception("xenstore set-up of domain 0 failed")
        self._undo_refused_attaches()
        for d in self.domains:
            if d is not self.xenstored and d.connected and not d.introduced and d.state in (State.STARTING,
                                                                                             State.RUNNING):
                self._introduce(d)
                self._maybe_ready(d)
        for d in self.domains:
            self._fire(d, Event.STORE_UP)

    def _on_process_exit(self, d: SupervisedDomain) -> None:
        was = d.phase
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
        if was.stopping:
            d.last_exit = status.describe() + " (stopped)"
        elif not d.connected and d.kind == DomainKind.PROGRAM and self.mgmt is not None and d.domid is not None:
            # It may have connected and died before the event arrived: a program that connected has started.
            try:
                if self.mgmt.request("info", domid=d.domid)["domain"]["state"] != "created":
                    d.connected = d.life.ever_ready = True
            except (ManagementError, TimeoutError):
                pass
        self._fire(d, Event.EXITED, death=_Death(status, reason, uptime, pid))

    def _judge(self, d: SupervisedDomain, death: _Death) -> None:
        """ASK_POLICY: the restart policy (policy.py) decides about an exit nobody asked for; the table
        does what it decided."""
        now = time.monotonic()
        status, reason = death.status, death.reason
        decision = d.tracker.on_exit(status, now)
        what = (f"{d.kind} domain {d.name} (domid {d.domid}, pid {death.pid}) {status.describe()}"
                f"{f' ({reason})' if reason else ''} after {death.uptime:.1f}s")
        d.last_exit = status.describe() + (f" ({reason})" if reason else "")
        if decision.action == Action.RESTART:
            log.warning("%s; restarting in %.2fs (%s)", what, decision.delay, decision.reason)
            self._progress(f"{d.name}: {d.last_exit}; restarting in {decision.delay:.2f}s")
        elif decision.action == Action.STAY_DOWN:
            log.info("%s; not restarted: %s", what, decision.reason)
            self._progress(f"{d.name}: {d.last_exit}; not restarted ({decision.reason})")
        else:
            log.error("%s; %s", what, decision.reason)
            d.last_exit += f"; {decision.reason}"
            self._progress(f"{d.name}: failed: {decision.reason}")
        self._fire(d, died(decision.action), f"its guest domain {d.last_exit} and stays down",
                   delay=decision.delay)

    def _signal_stop(self, d: SupervisedDomain) -> None:
        if not d.phase.stopping or d.pidfd < 0:
            return
        self._signal_group(d, signal.SIGTERM)
        d.deadline = time.monotonic() + self.stop_grace

    def _destroy(self, d: SupervisedDomain) -> None:
        """DESTROY: out of the broker, its nodes and devices released; it keeps its name for a new start."""
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
        self._progress(f"{d.name}: destroyed")

    def _kill(self, d: SupervisedDomain, why: str) -> None:
        log.warning("killing %s domain %s (pid %s): %s", d.kind, d.name, d.pid, why)
        d.kill_reason = why
        self._signal_group(d, signal.SIGKILL)

    def _reap(self, d: SupervisedDomain) -> int:
        """The process has exited (its pidfd said so): kill what is left of its group, reap, forget its fds."""
        assert d.proc is not None
        # The leader is a zombie until reaped: the group id is safe.  An adopted leader was reaped by its
        # reaper already; its group id is still its group's while any of the group lives (Linux frees a
        # pid only once no process uses it as pid, group or session).
        self._signal_group(d, signal.SIGKILL)
        rc = d.proc.wait()
        if d.uid is not None and self.uid_plan is not None and self.uid_plan.separate and not is_system_user(d.uid):
            # What left the group (a workload's own session) but runs as the domain's uid goes too; the
            # guest's VM outlives a restart of its guest domain.  (Not a uid of this system's users, which a
            # topology may name: their own processes are not the domain's.)
            for pid in kill_leftovers_of(d.uid, spare=self.vms.pids()):
                log.warning("%s: killed pid %d, left running as its uid %d", d.name, pid, d.uid)
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

    def _stop_now(self, d: SupervisedDomain) -> None:
        """Blocking stop for the host's shutdown: a guest's VM first (powered off), then the domain:
        SIGTERM, grace, SIGKILL, reap, destroy in the broker.  The table's STOP, whose STOP_PROCESS this
        performs here and now rather than from the loop."""
        self._stop_all_now([d])

    def _stop_all_now(self, ds: list[SupervisedDomain]) -> None:
        """:meth:`_stop_now` of domains that depend on none of each other (guests), side by side: all
        are told at once and share one grace, so stopping N of them takes the slowest one's time,
        not the sum (100 guests: 11.8 s one after another)."""
        had_process = {id(d): d.phase.has_process for d in ds}
        for d in ds:
            d.life.fire(Event.STOP)
            try:
                self.vms.stop_now(d)
            except Exception:
                log.exception("stopping the VM of %s failed; going on", d.name)
        running = [d for d in ds if d.proc is not None and d.pidfd >= 0]
        for d in running:
            self._signal_group(d, signal.SIGTERM)
        waiting = {d.pidfd for d in running}
        deadline = time.monotonic() + self.stop_grace
        while waiting and (left := deadline - time.monotonic()) > 0:
            waiting -= set(select.select(list(waiting), [], [], left)[0])
        for d in running:
            pid = d.pid
            status = ExitStatus.from_returncode(self._reap(d))
            self._record(d.name, "stopped", status.describe())
            d.last_exit = status.describe() + " (stopped)"
            self._log_to(d, f"pid {pid} {status.describe()} (stopped with the host)")
        for d in ds:
            self._close_ready(d)
            if d.domid is not None and self.mgmt is not None and self.broker is not None \
                    and self.broker.proc.poll() is None:
                try:
                    self.mgmt.request("destroy", domid=d.domid)
                except (ManagementError, TimeoutError):
                    pass
            if had_process[id(d)]:
                d.life.fire(Event.EXITED)

    def _start_broker(self) -> None:
        """A broker for this host (it takes over from RUN_DIR/broker-state when there is one), watched."""
        lay = self.layout
        self.broker = start_broker(lay.run_dir, log_path=lay.log_path(_BROKER))
        self._broker_ident = host_state.identity(self.broker.proc.pid)
        self._broker_pidfd = os.pidfd_open(self.broker.proc.pid)
        self._watch_fd(self._broker_pidfd, self._on_broker_exit)
        self.mgmt = self.broker.client()

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

    def _check_health(self) -> None:
        tree = ProcessTree()
        for d in self.domains:
            for log_name in (d.name, f"{d.name}-vm", f"{d.name}-console"):
                size = bound_log(self.layout.log_path(log_name))
                if size is not None:
                    log.warning("%s: its log %s.log passed %d MiB: cut to its tail", d.name, log_name, size >> 20)
        for d in self.domains:
            if d.state not in (State.STARTING, State.RUNNING) or d.pidfd < 0:
                continue
            sample = self._sample(d, tree)
            if sample is None:
                continue
            d.sample = sample
            why = d.health.check(sample)
            if why is not None and not d.kill_reason:
                self._kill(d, f"over its limits: {why}")

    def _sample(self, d: SupervisedDomain, tree: ProcessTree | None = None) -> HealthSample | None:
        """RSS, descriptors and CPU of the domain process and its descendants (a guest's workload counts)."""
        assert d.proc is not None
        tree = tree or ProcessTree()
        cache: dict[int, psutil.Process] = {}
        rss = fds = 0
        cpu = 0.0
        for pid in (d.proc.pid, *tree.descendants(d.proc.pid)):
            try:
                p = d.ps_cache.get(pid) or psutil.Process(pid)
                with p.oneshot():
                    rss += p.memory_info().rss
                    fds += p.num_fds()
                    cpu += p.cpu_percent(None)
            except psutil.Error:
                if pid == d.proc.pid:
                    return None         # the domain process itself is gone: no sample
                continue
            cache[pid] = p
        d.ps_cache = cache
        return HealthSample(rss, fds, cpu)


def _peek(fd: int) -> bytes:
    """What a ready channel holds, left in it (b"": EOF or nothing).  A pipe (a host adopted from an
    older supervisor) cannot be peeked at: it is read."""
    dup = -1
    try:
        dup = os.dup(fd)
        sock = socket.socket(fileno=dup)
    except OSError:                     # not a socket (or no descriptor to spare): read it
        if dup >= 0:
            os.close(dup)
        try:
            return os.read(fd, 256)
        except OSError:
            return b""
    with sock:
        try:
            return sock.recv(256, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            return b""


FAILPOINT_ENV = "XDOM_SUPERVISOR_DIE_AT_READY"   # tests: "NAME:seen" or "NAME:saved"


def _failpoint(name: str, when: str) -> None:
    """For tests of adoption: the supervisor dies as domain NAME's ready word is seen, or once saved."""
    if os.environ.get(FAILPOINT_ENV) == f"{name}:{when}":
        log.error("failpoint %s=%s:%s: dying", FAILPOINT_ENV, name, when)
        os._exit(70)
