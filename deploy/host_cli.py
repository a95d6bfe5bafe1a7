"""``xdom up`` and ``xdom down``: a host's supervisor started, in the foreground or as a daemon, and stopped.

``up`` runs a :class:`~xdom.deploy.supervisor.Supervisor` in the foreground
(Ctrl-C or SIGTERM stops everything cleanly) or, with ``--detach``, as a
daemon that the command waits for until everything is up: the daemon reports
its progress on a pipe, then keeps its log in ``supervisor.log``.  ``down``
asks the supervisor to stop and waits until it is gone; a host whose
supervisor was killed is stopped from what that supervisor wrote down
(``deploy/adopt.py``).  The supervisor and the topology parser are imported
when these commands run, not when the ``xdom`` parser is built.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .control import ControlClient, ControlError, endpoint_for
from .rundir import Layout, make_dirs, running_pid
from .supervisor_client import (
    EXIT_ERROR,
    EXIT_NOTHING,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    control_socket,
    dirs_for,
    load,
    resolve_run_dir,
    say,
)

if TYPE_CHECKING:
    from .topology import Topology

__all__ = ["cmd_down", "cmd_up"]

log = logging.getLogger("xdom.cli")


def cmd_up(args: argparse.Namespace) -> int:
    from . import remote
    from .rundir import LayoutError
    from .supervisor import check_host
    from .topology import TopologyError
    topo = load(args.topology)
    state_dir, run_dir = dirs_for(topo, args.state_dir, args.run_dir)
    try:
        topo = topo.resolved(state_dir, run_dir)
        check_host(topo, state_dir, run_dir, args.ready_timeout, args.uids)
        listener = remote.listener_config(topo.host, state_dir)
        if listener is not None:        # no tcp listener without a server key and an allow-list
            remote.check_listener(listener)
    except (TopologyError, LayoutError, remote.RemoteError) as e:
        raise CommandError(EXIT_USAGE, str(e)) from None
    other = running_pid(run_dir)
    if other is not None:
        raise CommandError(EXIT_ERROR, f"a supervisor (pid {other}) already runs in {run_dir}; stop it with "
                                       f"xdom down --run-dir {run_dir}")
    if args.detach:
        return _up_detached(args, state_dir, run_dir)
    return _up(args, topo, state_dir, run_dir, notify_fd=args.notify_fd)


def _up(args: argparse.Namespace, topo: Topology, state_dir: str, run_dir: str, notify_fd: int | None) -> int:
    """Run the supervisor in this process.  With ``notify_fd`` (a detached daemon), report to the parent."""
    from .isolation import IsolationError
    from .supervisor import AlreadyRunning, StartupError, Supervisor, SupervisorError
    notify: Callable[[dict[str, Any]], None]
    if notify_fd is not None:
        pipe = os.fdopen(notify_fd, "w", buffering=1)

        def notify(msg: dict[str, Any]) -> None:
            if "progress" in msg:       # the daemon's log (supervisor.log) keeps what the parent shows
                log.info("%s", msg["progress"])
            if pipe.closed:             # after start-up the parent is gone
                return
            try:
                pipe.write(json.dumps(msg) + "\n")
            except OSError:
                pass            # the parent is gone: keep going, the log has it all
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    else:
        def notify(msg: dict[str, Any]) -> None:
            if "progress" in msg:
                say(f"  {msg['progress']}")

    sup = Supervisor(topo, state_dir, run_dir, uids=args.uids, ready_timeout=args.ready_timeout,
                     progress=lambda line: notify({"progress": line}), log_level=args.log_level)

    def on_signal(signum: int, frame: Any) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        sup.request_stop()
    for sig in (signal.SIGINT, signal.SIGTERM) + (() if notify_fd is not None else (signal.SIGHUP,)):
        signal.signal(sig, on_signal)

    if notify_fd is None:
        say(f"xdom: starting {topo.source} (state {state_dir}, run {run_dir})")
    try:
        up = sup.start()
    except (AlreadyRunning, StartupError, SupervisorError) as e:
        notify({"error": str(e), "code": EXIT_ERROR})
        raise CommandError(EXIT_ERROR, str(e)) from None
    except IsolationError as e:
        notify({"error": str(e), "code": EXIT_USAGE})
        raise CommandError(EXIT_USAGE, str(e)) from None
    if not up:
        notify({"error": "stopped while starting; everything was stopped", "code": EXIT_ERROR})
        say("xdom: stopped while starting; everything was stopped")
        return EXIT_ERROR
    if notify_fd is not None:
        notify({"ok": os.getpid()})
        pipe.close()
    else:
        say(f"xdom: up: {len(topo.domains)} domains; Ctrl-C stops them all")
    try:
        sup.serve()
    except SupervisorError as e:
        raise CommandError(EXIT_ERROR, str(e)) from None
    if notify_fd is None:
        say("xdom: everything stopped")
    return EXIT_OK


def _up_detached(args: argparse.Namespace, state_dir: str, run_dir: str) -> int:
    """Start ``xdom up`` again as a daemon (its own session, stdio to supervisor.log); wait until it is up."""
    lay = Layout(state_dir, run_dir)
    make_dirs(lay.logs_dir, 0o750)           # check_host found the state directory trusted, or its parent
    log_path = lay.log_path("supervisor")
    rfd, wfd = os.pipe()
    argv = [sys.executable, "-m", "xdom.deploy.cli", "--log-level", args.log_level, "up",
            os.path.abspath(args.topology), "--state-dir", state_dir, "--run-dir", run_dir, "--uids", args.uids,
            "--ready-timeout", str(args.ready_timeout), "--notify-fd", str(wfd)]
    with open(log_path, "ab") as logf:
        try:
            proc = subprocess.Popen(argv, pass_fds=(wfd,), stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
        finally:
            os.close(wfd)
    say(f"xdom: starting {args.topology} in the background (state {state_dir}, run {run_dir}, log {log_path})")
    try:
        with os.fdopen(rfd, "r") as pipe:
            for line in pipe:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if "progress" in msg:
                    say(f"  {msg['progress']}")
                elif "ok" in msg:
                    say(f"xdom: up; supervisor pid {msg['ok']}; xdom down --run-dir {run_dir} stops it")
                    return EXIT_OK
                elif "error" in msg:
                    proc.wait()
                    raise CommandError(int(msg.get("code", EXIT_ERROR)), str(msg["error"]))
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        return 130
    status = proc.wait()
    raise CommandError(EXIT_ERROR, f"the supervisor exited (status {status}) before it was up; see {log_path}")


# ---- down ------------------------------------------------------------------------

def _gone(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def cmd_down(args: argparse.Namespace) -> int:
    run_dir = resolve_run_dir(args, unsupervised=True)
    pid = running_pid(run_dir)
    if pid is None and os.path.isdir(run_dir):
        # A supervisor killed outright: its host runs on.  Stop it from what the supervisor wrote down
        # (and whatever else of this run directory runs), without adopting it (adopt.py).
        from .adopt import stop_orphaned
        from .rundir import LayoutError
        try:
            stopped, had_state = stop_orphaned(run_dir)
        except LayoutError:
            pid = running_pid(run_dir)      # a supervisor started meanwhile: ask it, below
        else:
            if not stopped:
                raise CommandError(EXIT_NOTHING, f"no supervisor is running in {run_dir}")
            say(f"xdom: no supervisor in {run_dir}; stopped the host it left"
                 f"{'' if had_state else ' (no state file: by what runs)'}:")
            for what in stopped:
                say(f"  {what}")
            say(f"xdom: {run_dir}: everything stopped")
            return EXIT_OK
    if pid is None:
        raise CommandError(EXIT_NOTHING, f"no supervisor is running in {run_dir}")
    try:
        with ControlClient(endpoint_for(control_socket(run_dir)), timeout=5.0) as c:
            c.request("stop")
    except (ControlError, TimeoutError, CommandError) as e:
        # pid comes from a pid file running_pid believed: root's (or ours), in a directory nobody else can write
        log.warning("the supervisor did not take the stop request (%s); sending it SIGTERM", e)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + args.timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            raise CommandError(EXIT_ERROR, f"the supervisor (pid {pid}) is still stopping after {args.timeout:g}s")
        time.sleep(0.05)        # polling another process's exit, with a deadline
    say(f"xdom: {run_dir}: everything stopped")
    return EXIT_OK
