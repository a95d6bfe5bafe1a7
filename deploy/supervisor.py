"""The supervisor: starts a topology's broker and domains in order, keeps them running, stops them in reverse.

Start order: the broker, then the xenstore domain, then driver domains, then
programs and guests, in the topology's order: each domain is launched once
the one before it is ready (or has been ready and died, which its restart
policy then handles), except that consecutive guests without a VM start
side by side, START_TOGETHER at a time.  Readiness is signalled, never
slept on:

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

The supervisor is built in layers, a module each (``deploy/supervision.py``
lists them): shared state, devices, spawning, the lifecycle driver, the
control operations, and this module's public API, set-up, adoption and event
loop.  A domain's lifecycle is a pure transition table
(``deploy/lifecycle.py``).

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

import logging
import os
import shutil
import stat
import time
from collections import deque
from typing import Any

import zmq

from . import adopt, host_state, netns, remote
from .access import AccessError, grant_search
from .bytecode import precompile
from .control import ControlProtocol, ControlServer, endpoint_for
from .control_ops import ControlOps
from .devices import _remove_made_dir
from .isolation import plan_uids
from .lifecycle import Event, State
from .lifecycle_driver import _Death
from .policy import ExitStatus
from .rundir import LayoutError, clear_run_files, make_dirs, remove_run_dir, stop_leftovers, unlink_socket
from .supervised_domain import AlreadyRunning, JournalEntry, StartupError, SupervisedDomain, SupervisorError
from .supervision import (
    _BROKER,
    BROKER_POLL,
    BROKER_STATE,
    READY_TIMEOUT,
    STOP_GRACE,
    TAKEOVER_FAILED,
    _last_line,
    check_host,
    check_switches,
    switch_of,
)
from .topology import DomainKind
from .xenstored_probe import PROBE_TIMEOUT

__all__ = ["READY_TIMEOUT", "STOP_GRACE", "TAKEOVER_FAILED", "AlreadyRunning", "JournalEntry", "State",
           "StartupError", "Supervisor", "SupervisorError", "check_host", "check_switches", "switch_of"]

log = logging.getLogger("xdom.supervisor")


# Guests without a VM started side by side at most (see Supervisor._advance_start): enough to overlap
# each one's waits on the broker, xenstored and its backends, few enough that each still gets the CPU to
# be ready well within the ready timeout (host_limits counts the CPU a start takes).
START_TOGETHER = 4
STOP_TOGETHER = 16      # guests told to stop at once by `xdom down` (their teardowns load backends and broker)


def _starts_alongside(d: SupervisedDomain) -> bool:
    return d.kind == DomainKind.GUEST and d.spec.vm is None


def _stop_batches(domains: list[SupervisedDomain]) -> list[list[SupervisedDomain]]:
    """Reverse start order, with each run of guests that start alongside stopped together
    (STOP_TOGETHER at most); every other domain alone, after what started after it."""
    batches: list[list[SupervisedDomain]] = []
    for d in reversed(domains):
        if batches and _starts_alongside(d) and _starts_alongside(batches[-1][0]) \
                and len(batches[-1]) < STOP_TOGETHER:
            batches[-1].append(d)
        else:
            batches.append([d])
    return batches


class Supervisor(ControlOps):
    """Runs one topology: ``start()``, then ``serve()`` until ``request_stop()``; ``stop()`` always.

    ``progress`` receives one line per step worth telling a person (the
    command line prints them).  Constructing checks the topology and the
    directories and starts nothing: raises TopologyError (a bridge this
    host cannot make) or LayoutError.
    """

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
            self._save_state()      # written down as running before start() returns, not at the loop's next turn
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
            for batch in _stop_batches(self.domains):
                try:
                    self._stop_all_now(batch)
                except Exception:
                    log.exception("stopping %s failed; going on", ", ".join(d.name for d in batch))
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
                        unlink_socket(path)
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
            # Last: remote clients take the door's closing for "everything stopped" (fleet_cli.remote_down).
            if self._front_door is not None:
                self._front_door.close()
                self._front_door = None

    def _setup(self) -> None:
        lay = self.layout
        try:
            lay.check_trust()           # nothing is made, read or connected to in a directory others can write
        except LayoutError as e:
            raise SupervisorError(str(e)) from None
        make_dirs(lay.run_dir, 0o755)
        precompile()                    # before any domain starts: they cannot write bytecode themselves
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

    def _connect_loop(self) -> None:
        """The broker's events and the control socket, in the loop."""
        lay = self.layout
        sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
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
        try:
            self._front_door = remote.start_for(self.topology.host, lay.state_dir, lay.control_socket,
                                                lay.events_endpoint, self.topology.source)
        except remote.RemoteError as e:
            raise SupervisorError(str(e)) from None

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
            self._fire(d, Event.EXITED, death=_Death(status, reason, time.monotonic() - d.started_mono, pid))
        for d in self.domains:          # adopted mid-start: what its dead supervisor had not done yet
            if self._store_up():
                self._fire(d, Event.STORE_UP)       # one waiting for xenstored, which serves by now
            if d.state == State.STARTING and d.pidfd >= 0 and d.connected:
                if self._needs_store(d) and self._store_up() and not d.introduced:
                    self._introduce(d)
                self._maybe_ready(d)

    def _turn(self) -> None:
        """One wait and everything that became due."""
        now = time.monotonic()
        due = [self._next_health]
        due += [d.deadline for d in self.domains if d.deadline is not None]
        due += self.vms.deadlines()
        detach_due = self.detaches.due()
        if detach_due is not None:
            due.append(detach_due)
        if self._probe is not None and self._probe.sent_at is not None:
            due.append(self._probe.sent_at + PROBE_TIMEOUT)
        elif self._probe is not None and (self._introduce_waiting or self._store_silent) \
                and self._probe.not_before > now:
            due.append(self._probe.not_before)      # the probe's pause ends: introductions are asked again
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
        self.detaches.poll(now, self._xs)
        if self._probe is not None:
            self._probe.timers(now)
            if (self._introduce_waiting or self._store_silent) and self._probe.sent_at is None and self._store_up():
                self._probe.ask(now)        # given up, or failed to connect: asked again (at most each turn)

    def _advance_start(self) -> None:
        """Launch the next domains of the start order once the ones before them have been ready.

        Guests without a VM depend on nothing but what starts before them (xenstored, the driver
        domains), so a run of them at the head of the order starts side by side, START_TOGETHER at
        a time: the time a guest spends waiting on the broker, xenstored and its backends overlaps
        with the others' (one at a time, 100 guests took 45-80 s).  Everything else starts alone.
        """
        while self._start_queue:
            batch = self._start_batch()
            for d in batch:
                self._fire(d, Event.START)        # launched if it is pending; nothing otherwise
            done = []
            for d in batch:
                if d.life.ever_ready:
                    why = self.vms.start_problem(d)      # a guest's VM, if it has one, is part of its start
                    if why:
                        self._startup_error = why
                        return
                    if why is None:                       # "": its VM is still starting
                        done.append(d)
                elif d.state in (State.EXITED, State.FAILED, State.DESTROYED):
                    self._startup_error = (f"{d.kind} domain {d.name} did not start: {d.last_exit or d.state}"
                                           f"; see {self.layout.log_path(d.name)}")
                    return
            if not done:
                return
            for d in done:
                self._start_queue.remove(d)

    def _start_batch(self) -> list[SupervisedDomain]:
        """The domains at the head of the start order that may be starting at the same time."""
        head = self._start_queue[0]
        if not _starts_alongside(head):
            return [head]
        batch: list[SupervisedDomain] = []
        for d in self._start_queue:
            if not _starts_alongside(d) or len(batch) == START_TOGETHER:
                break
            batch.append(d)
        return batch

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
        if self._probe is not None:
            self._probe.close()
        for fd in list(self._fd_handlers):
            self._unwatch_fd(fd)
        if self._broker_pidfd >= 0:
            os.close(self._broker_pidfd)
            self._broker_pidfd = -1
        if self._wake is not None:
            self._poller.unregister(self._wake.fileno())
            self._wake.close()
            self._wake = None
