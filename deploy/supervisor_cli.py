"""``xdom up/down/ps/logs/console/restart/destroy/block-*``: the command line of the supervisor.

``up`` runs a :class:`~xdom.deploy.supervisor.Supervisor` in the foreground
(Ctrl-C or SIGTERM stops everything cleanly) or, with ``--detach``, as a
daemon that the command waits for until everything is up.  The others talk to
a running supervisor over its control channel (``deploy/control.py``); they
find it by ``--run-dir``, by ``--topology`` (the run directory ``up`` would
choose for it), or as the only one running under the default directory.

Exit statuses scripts can rely on (:data:`EXIT_OK` ...): 0 done; 1 an error
(a domain did not start, a request was refused, a timeout); 2 a usage or
topology error, nothing started; 3 nothing running.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from .control import ControlClient, ControlError, endpoint_for
from .rundir import (
    STATE_FILE,
    Layout,
    UntrustedPath,
    default_base,
    default_dirs,
    find_supervisors,
    find_unsupervised,
    make_dirs,
    running_pid,
    topology_name,
)

if TYPE_CHECKING:
    from .topology import Topology

# The supervisor, the topology parser and psutil are imported by the commands
# that need them: every `xdom broker` and `xdom xenstored` builds this parser.
UID_MODES = ("auto", "separate", "shared")

__all__ = ["EXIT_ERROR", "EXIT_NOTHING", "EXIT_OK", "EXIT_USAGE", "CommandError", "add_parsers", "xenstored_endpoint",
           "xenstored_socket"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOTHING = 0, 1, 2, 3
log = logging.getLogger("xdom.cli")


class CommandError(Exception):
    """Ends a command with ``code`` after printing the message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _say(text: str, out: TextIO = sys.stdout) -> None:
    print(text, file=out, flush=True)


# ---- finding things ------------------------------------------------------------

def _load(path: str) -> Topology:
    from .topology import TopologyError
    from .topology_parse import load_topology
    try:
        return load_topology(path)
    except TopologyError as e:
        raise CommandError(EXIT_USAGE, f"{e}") from None


def _dirs_for(topo: Topology, state_dir: str | None, run_dir: str | None) -> tuple[str, str]:
    """Command line, then the topology's [host] table, then the defaults for its name."""
    d_state, d_run = default_dirs(topology_name(topo.source))
    return (os.path.abspath(state_dir or topo.host.state_dir or d_state),
            os.path.abspath(run_dir or topo.host.run_dir or d_run))


def _resolve_run_dir(args: argparse.Namespace, unsupervised: bool = False) -> str:
    """The host's run directory: ``--run-dir``, ``--topology``, or the only one running (with
    ``unsupervised``, counting hosts whose supervisor died: ``ps`` and ``down`` deal with those)."""
    if args.run_dir:
        return os.path.abspath(args.run_dir)
    if args.topology:
        return _dirs_for(_load(args.topology), None, None)[1]
    found = find_supervisors()
    if unsupervised:
        found = sorted({*found, *find_unsupervised()})
    if len(found) == 1:
        return found[0]
    if not found:
        raise CommandError(EXIT_NOTHING, f"no supervisor is running under {default_base()}; give --run-dir or "
                                         f"--topology")
    raise CommandError(EXIT_USAGE, f"{len(found)} supervisors are running ({', '.join(found)}); say which with "
                                   f"--run-dir")


def xenstored_socket(socket: str | None, run_dir: str | None, topology: str | None) -> str | None:
    """The socket ``xdom xenstore`` talks to: ``--socket``; the host named by ``--run-dir`` or
    ``--topology``; ``$XENSTORED_PATH``; the only host running.  None: Xen's default socket."""
    return xenstored_endpoint(socket, run_dir, topology)[0]


def xenstored_endpoint(socket: str | None, run_dir: str | None, topology: str | None) -> tuple[str | None, int | None]:
    """:func:`xenstored_socket`, and for a host's xenstored the uid its server must run as (else None).

    A host's ``xenstored.sock`` is believed only as the supervisor made it: a
    symlink of root's (or this uid's) in a trusted run directory, to
    ``xenstored/socket``; that directory's owner is the xenstore domain's
    uid, which the caller checks the server against (``SO_PEERCRED``).
    Raises UntrustedPath otherwise.
    """
    if socket:
        return socket, None
    if not run_dir and not topology and os.environ.get("XENSTORED_PATH"):
        return None, None
    try:
        found = _resolve_run_dir(argparse.Namespace(run_dir=run_dir, topology=topology))
    except CommandError as e:
        if e.code == EXIT_NOTHING:
            return None, None       # no host here: Xen's default socket, as xenstore-ls would use
        raise
    if (run_dir or topology) and running_pid(found) is None:
        raise CommandError(EXIT_NOTHING, f"no supervisor is running in {found}")
    from xdom.broker.pathtrust import check_file
    lay = Layout("/", found)
    try:
        check_file(lay.xenstored_link, "symlink", f"the xenstored link {lay.xenstored_link}")
    except FileNotFoundError:
        raise CommandError(EXIT_ERROR, f"the host in {found} has no xenstored ({lay.xenstored_link})") from None
    want = os.path.relpath(lay.xenstored_socket, found)
    if os.readlink(lay.xenstored_link) != want:
        raise UntrustedPath(f"refusing {lay.xenstored_link}: it points to {os.readlink(lay.xenstored_link)!r}, "
                            f"not to {want!r}")
    import stat
    st = os.lstat(lay.xenstored_run)
    if not stat.S_ISDIR(st.st_mode):
        raise UntrustedPath(f"refusing {lay.xenstored_run}: not a directory")
    return lay.xenstored_link, st.st_uid


def _client(run_dir: str, timeout: float) -> ControlClient:
    if running_pid(run_dir) is None:      # which checked the run directory: only root (or we) can write it
        if os.path.exists(os.path.join(run_dir, STATE_FILE)):
            raise CommandError(EXIT_NOTHING, f"no supervisor is running in {run_dir}: its host runs on without one "
                                             f"(xdom ps shows what is alive; xdom up TOPOLOGY adopts it, xdom down "
                                             f"stops it)")
        raise CommandError(EXIT_NOTHING, f"no supervisor is running in {run_dir}")
    return ControlClient(endpoint_for(_control_socket(run_dir)), timeout)


def _control_socket(run_dir: str) -> str:
    """``supervisor.sock``, believed only as a socket of root's (or ours) in a trusted run directory."""
    from xdom.broker.pathtrust import check_file
    path = Layout("/", run_dir).control_socket
    try:
        check_file(path, "socket", f"the control socket {path}")
    except FileNotFoundError:
        raise CommandError(EXIT_ERROR, f"the supervisor in {run_dir} has no control socket ({path}) yet") from None
    return path


def _request(run_dir: str, timeout: float, op: str, **fields: Any) -> dict[str, Any]:
    with _client(run_dir, timeout) as c:
        try:
            return c.request(op, **fields)
        except ControlError as e:
            raise CommandError(EXIT_ERROR, f"{e.message} ({e.errno_name})") from None
        except TimeoutError as e:
            raise CommandError(EXIT_ERROR, str(e)) from None


# ---- up --------------------------------------------------------------------------

def cmd_up(args: argparse.Namespace) -> int:
    from . import remote
    from .rundir import LayoutError
    from .supervisor import check_host
    from .topology import TopologyError
    topo = _load(args.topology)
    state_dir, run_dir = _dirs_for(topo, args.state_dir, args.run_dir)
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
                _say(f"  {msg['progress']}")

    sup = Supervisor(topo, state_dir, run_dir, uids=args.uids, ready_timeout=args.ready_timeout,
                     progress=lambda line: notify({"progress": line}), log_level=args.log_level)

    def on_signal(signum: int, frame: Any) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        sup.request_stop()
    for sig in (signal.SIGINT, signal.SIGTERM) + (() if notify_fd is not None else (signal.SIGHUP,)):
        signal.signal(sig, on_signal)

    if notify_fd is None:
        _say(f"xdom: starting {topo.source} (state {state_dir}, run {run_dir})")
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
        _say("xdom: stopped while starting; everything was stopped")
        return EXIT_ERROR
    if notify_fd is not None:
        notify({"ok": os.getpid()})
        pipe.close()
    else:
        _say(f"xdom: up: {len(topo.domains)} domains; Ctrl-C stops them all")
    try:
        sup.serve()
    except SupervisorError as e:
        raise CommandError(EXIT_ERROR, str(e)) from None
    if notify_fd is None:
        _say("xdom: everything stopped")
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
    _say(f"xdom: starting {args.topology} in the background (state {state_dir}, run {run_dir}, log {log_path})")
    try:
        with os.fdopen(rfd, "r") as pipe:
            for line in pipe:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if "progress" in msg:
                    _say(f"  {msg['progress']}")
                elif "ok" in msg:
                    _say(f"xdom: up; supervisor pid {msg['ok']}; xdom down --run-dir {run_dir} stops it")
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
    run_dir = _resolve_run_dir(args, unsupervised=True)
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
            _say(f"xdom: no supervisor in {run_dir}; stopped the host it left"
                 f"{'' if had_state else ' (no state file: by what runs)'}:")
            for what in stopped:
                _say(f"  {what}")
            _say(f"xdom: {run_dir}: everything stopped")
            return EXIT_OK
    if pid is None:
        raise CommandError(EXIT_NOTHING, f"no supervisor is running in {run_dir}")
    try:
        with ControlClient(endpoint_for(_control_socket(run_dir)), timeout=5.0) as c:
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
    _say(f"xdom: {run_dir}: everything stopped")
    return EXIT_OK


# ---- ps --------------------------------------------------------------------------

def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f}"


def _uptime(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if seconds else "-"


def cmd_ps(args: argparse.Namespace) -> int:
    try:
        run_dir = _resolve_run_dir(args, unsupervised=True)
    except CommandError as e:
        if e.code == EXIT_NOTHING and not args.topology and os.path.exists(
                os.path.join(args.run_dir or default_base(), "mgmt.sock")):
            return _broker_list(args.run_dir or default_base(), args)
        raise
    if running_pid(run_dir) is None and os.path.exists(os.path.join(run_dir, STATE_FILE)):
        return _unsupervised_ps(run_dir, args)  # its supervisor died: what it wrote down, checked against /proc
    if running_pid(run_dir) is None and os.path.exists(os.path.join(run_dir, "mgmt.sock")):
        return _broker_list(run_dir, args)      # a broker started by hand: its own table
    reply = _request(run_dir, args.timeout, "ps")
    rows = reply["domains"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    _say(f"supervisor pid {reply['pid']} ({reply['phase']}{', adopted the host' if reply.get('adopted') else ''}), "
         f"broker pid {reply['broker_pid']}, run {reply['run_dir']}, uids {reply['uids']}")
    _say(f"{'NAME':<16} {'KIND':<9} {'ID':>4} {'STATE':<9} {'PID':>7} {'UPTIME':>8} {'RSS(MiB)':>8} "
         f"{'RESTARTS':>8} {'MAPS':>5} {'GRANTED':>7} {'EVTCHN':>6} {'CONFINED':<24} LAST EXIT")
    for r in rows:
        dash = "-"
        _say(f"{r['name']:<16} {r['kind']:<9} {r['domid'] if r['domid'] is not None else dash:>4} {r['state']:<9} "
             f"{r['pid'] or dash:>7} {_uptime(r['uptime']):>8} {_mib(r['rss']):>8} {r['restarts']:>8} "
             f"{_n(r['mappings_held']):>5} {_n(r['grants_mapped_by_others']):>7} {_n(r['event_channels']):>6} "
             f"{_confined(r.get('confinement')):<24} {r['last_exit'] or ''}")
        vm = r.get("vm")
        if vm:
            # The guest's VMM: a process of its own, supervised beside the guest domain.
            note = f"accel {vm['accel']} ({vm['accel_reason']})"
            if vm.get("last_exit"):
                note += f"; last exit: {vm['last_exit']}"
            _say(f"{'  vm':<16} {'qemu':<9} {dash:>4} {vm['state']:<9} {vm['pid'] or dash:>7} "
                 f"{_uptime(vm['uptime']):>8} {_mib(vm['rss']):>8} {vm['restarts']:>8} {dash:>5} {dash:>7} {dash:>6} "
                 f"{'qemu-sandbox' if vm.get('seccomp') else '-' if vm.get('seccomp') is None else 'none':<24} {note}")
    return EXIT_OK


def _unsupervised_ps(run_dir: str, args: argparse.Namespace) -> int:
    """``ps`` of a host whose supervisor died, from its state file (adopt.report): plain, and quick."""
    from .adopt import report
    from .host_state import StateError
    try:
        r = report(run_dir)
    except StateError as e:
        raise CommandError(EXIT_ERROR, f"no supervisor is running in {run_dir}, and its state cannot be read: {e}") \
            from None
    if r is None:
        raise CommandError(EXIT_NOTHING, f"no supervisor is running in {run_dir}")
    rows = r["domains"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    age = time.time() - float(r["written"] or 0)
    _say(f"supervisor not running (pid {r['dead_supervisor_pid']} is gone; it last wrote its state {age:.0f}s ago); "
         f"host adopted by none; {r['domains_alive']} of {len(rows)} domains alive; broker "
         + (f"pid {r['broker_pid']} alive" if r["broker_alive"] else "dead") + f"; run {run_dir}")
    _say(f"  xdom up {r['topology']} adopts it; xdom down --run-dir {run_dir} stops it")
    _say(f"{'NAME':<16} {'KIND':<9} {'ID':>4} {'STATE':<9} {'PID':>7} {'RESTARTS':>8} {'BROKER SAYS':<12} LAST EXIT")
    for row in rows:
        dash = "-"
        _say(f"{row['name']:<16} {row['kind']:<9} {row['domid'] if row['domid'] is not None else dash:>4} "
             f"{row['state']:<9} {row['pid'] or dash:>7} {row['restarts']:>8} {row['domain_state'] or dash:<12} "
             f"{row['last_exit'] or ''}")
        vm = row.get("vm")
        if vm:
            _say(f"{'  vm':<16} {'qemu':<9} {dash:>4} {vm['state']:<9} {vm['pid'] or dash:>7}")
    return EXIT_OK


def _confined(c: dict[str, Any] | None) -> str:
    """``kill:blkback+landlock7``: the seccomp filter (as the kernel shows it) and the Landlock ABI."""
    if c is None:
        return "-"
    parts = [c["seccomp"]] if c.get("seccomp") else []
    if c.get("landlock"):
        parts.append(str(c["landlock"]).replace("abi", "landlock"))
    return "+".join(parts) or "none"


def cmd_top(args: argparse.Namespace) -> int:
    """``ps`` again every ``--interval`` seconds on a cleared screen, until Ctrl-C."""
    shown = 0
    try:
        while args.iterations is None or shown < args.iterations:
            if shown and sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")
            rc = cmd_ps(args)
            if rc != EXIT_OK:
                return rc
            shown += 1
            if args.iterations is None or shown < args.iterations:
                sys.stdout.flush()
                time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _n(v: int | None) -> str:
    return "-" if v is None else str(v)


def _broker_list(run_dir: str, args: argparse.Namespace) -> int:
    from .broker_list import cmd_list
    return cmd_list(argparse.Namespace(mgmt=None, run_dir=run_dir, timeout=args.timeout, json=args.json))


# ---- logs ------------------------------------------------------------------------

# A VM guest's other logs: NAME-vm (what QEMU printed, the supervisor's lines about it) and NAME-console.
_VM_LOGS = (("-vm", "log"), ("-console", "console_log"))


def _log_path(run_dir: str, name: str, timeout: float) -> str:
    for suffix, key in _VM_LOGS:
        if name.endswith(suffix) and len(name) > len(suffix):
            try:
                row = _request(run_dir, timeout, "info", name=name[:-len(suffix)])["domain"]
            except CommandError:
                break
            if row.get("vm"):
                return str(row["vm"][key])
    return str(_request(run_dir, timeout, "info", name=name)["domain"]["log"])


def cmd_logs(args: argparse.Namespace) -> int:
    run_dir: str | None = None
    if args.state_dir:
        path = Layout(os.path.abspath(args.state_dir), "/").log_path(args.domain)
    else:
        run_dir = _resolve_run_dir(args)
        path = _log_path(run_dir, args.domain, args.timeout)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise CommandError(EXIT_ERROR, f"no log for {args.domain} at {path}") from None
    out = sys.stdout.buffer
    with f:
        if args.lines is not None:
            lines = f.read().splitlines(keepends=True)
            out.write(b"".join(lines[-args.lines:] if args.lines else []))
        else:
            out.write(f.read())
        out.flush()
        if not args.follow:
            return EXIT_OK
        try:
            while run_dir is None or running_pid(run_dir) is not None:
                chunk = f.read()
                if chunk:
                    out.write(chunk)
                    out.flush()
                else:
                    select.select([], [], [], 0.2)      # a file has no readiness to wait on
        except KeyboardInterrupt:
            return EXIT_OK
        out.write(f.read())
        out.flush()
    return EXIT_OK


# ---- console -------------------------------------------------------------------------

def _console_socket(vm: dict[str, Any], name: str) -> Any:
    """A connection to the VM's console, believed only when SO_PEERCRED says its QEMU serves it."""
    import socket
    import struct
    path = vm["console"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
    except OSError as e:
        sock.close()
        raise CommandError(EXIT_ERROR, f"cannot reach the console of {name}'s VM at {path}: {e.strerror or e}") \
            from None
    if pid != vm["pid"]:
        sock.close()
        raise CommandError(EXIT_ERROR, f"refusing {path}: it is served by pid {pid}, not by {name}'s QEMU "
                                       f"(pid {vm['pid']})")
    return sock


def cmd_console(args: argparse.Namespace) -> int:
    """``xl console``: the VM's serial console on this terminal (Ctrl-] leaves), or one command with --run."""
    from .vm.console import Console, ConsoleError, attach
    run_dir = _resolve_run_dir(args)
    row = _request(run_dir, args.timeout, "info", name=args.domain)["domain"]
    vm = row.get("vm")
    if not vm:
        raise CommandError(EXIT_ERROR, f"{args.domain} is a {row['kind']} domain without a VM; a console is a VM's "
                                       f"(a guest with a [domain.vm] table)")
    if vm["state"] not in ("starting", "running") or not vm["pid"]:
        raise CommandError(EXIT_ERROR, f"the VM of {args.domain} is {vm['state']}"
                                       + (f" ({vm['last_exit']})" if vm.get("last_exit") else "")
                                       + f"; see xdom logs {args.domain}-vm")
    sock = _console_socket(vm, args.domain)
    if args.run is None:
        try:
            return attach(vm["console"], name=f"{args.domain}'s console (QEMU pid {vm['pid']})", sock=sock)
        except ConsoleError as e:
            raise CommandError(EXIT_ERROR, str(e)) from None
    con = Console(vm["console"], sock=sock)
    try:
        con.wait_ready(args.wait)
        status, out = con.run_bytes(args.run, args.wait)
    except ConsoleError as e:
        hint = ("" if vm.get("own_image") else "; --run speaks the console protocol of the project's image "
                                                "(xdom vm-image), which this VM does not boot")
        raise CommandError(EXIT_ERROR, f"{args.domain}: {e}{hint}") from None
    finally:
        con.close()
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    return status


# ---- restart / destroy -------------------------------------------------------------

def _wait_for(run_dir: str, name: str, timeout: float, done: Callable[[dict[str, Any]], str | None]) -> dict[str, Any]:
    """Poll ``info`` until ``done(row)`` says "ok" or gives an error text; CommandError on error or timeout."""
    deadline = time.monotonic() + timeout
    with _client(run_dir, 10.0) as c:
        while True:
            try:
                row = c.request("info", name=name)["domain"]
            except ControlError as e:
                raise CommandError(EXIT_ERROR, f"{e.message} ({e.errno_name})") from None
            except TimeoutError as e:
                raise CommandError(EXIT_ERROR, str(e)) from None
            verdict = done(row)
            if verdict == "ok":
                return row
            if verdict:
                raise CommandError(EXIT_ERROR, verdict)
            if time.monotonic() > deadline:
                raise CommandError(EXIT_ERROR, f"{name} is {row['state']} after {timeout:g}s")
            time.sleep(0.05)    # polling the supervisor, with a deadline


def cmd_restart(args: argparse.Namespace) -> int:
    run_dir = _resolve_run_dir(args)
    before = _request(run_dir, args.timeout, "info", name=args.domain)["domain"]
    generation = _request(run_dir, args.timeout, "restart", name=args.domain)["generation"]
    if args.no_wait:
        _say(f"xdom: restarting {args.domain}")
        return EXIT_OK

    def done(row: dict[str, Any]) -> str | None:
        if row["generation"] > generation and row["state"] == "running":
            return "ok"
        if row["state_changes"] > before["state_changes"] and row["state"] in ("exited", "failed", "destroyed"):
            return f"{args.domain} did not restart: {row['state']}: {row['last_exit'] or ''}"
        return None
    row = _wait_for(run_dir, args.domain, args.wait, done)
    _say(f"xdom: {args.domain} restarted (domid {row['domid']}, pid {row['pid']})")
    return EXIT_OK


def cmd_destroy(args: argparse.Namespace) -> int:
    run_dir = _resolve_run_dir(args)
    _request(run_dir, args.timeout, "destroy", name=args.domain)
    _wait_for(run_dir, args.domain, args.wait, lambda row: "ok" if row["state"] == "destroyed" else None)
    _say(f"xdom: {args.domain} destroyed")
    return EXIT_OK


# ---- block devices -----------------------------------------------------------------

def cmd_block_attach(args: argparse.Namespace) -> int:
    run_dir = _resolve_run_dir(args)
    r = _request(run_dir, args.timeout, "block-attach", name=args.domain, disk=args.disk)
    if "vm" in r:               # a VM's disk: in the VM once its guest domain serves it (vm/supervised.py)
        _say(f"xdom: {r['vdev']} (devid {r['devid']}) attached to {args.domain} on {r['backend']}; "
             + _follow_vm_plug(run_dir, args.domain, "disks", r["vm"], removing=False))
        return EXIT_OK
    _say(f"xdom: {r['vdev']} (devid {r['devid']}) attached to {args.domain} on {r['backend']}; "
         f"NBD export nbd+unix:///?socket={r['export']}")
    return EXIT_OK


def cmd_block_detach(args: argparse.Namespace) -> int:
    run_dir = _resolve_run_dir(args)
    r = _request(run_dir, args.timeout, "block-detach", name=args.domain, vdev=args.vdev)
    if "vm" in r:
        _follow_vm_plug(run_dir, args.domain, "disks", r["vm"], removing=True)
        _say(f"xdom: {r['vdev']} detached from {args.domain} (removed from its VM, then from xenbus)")
        return EXIT_OK
    _say(f"xdom: {r['vdev']} detached from {args.domain}"
         + ("" if r["clean"] else " (the backend did not confirm it closed; its nodes were removed anyway)"))
    return EXIT_OK


VM_PLUG_WAIT = 120.0    # seconds a VM device's hot-add (its guest domain connects first) or removal may take


def _follow_vm_plug(run_dir: str, name: str, key: str, vm: dict[str, Any], *, removing: bool) -> str:
    """Wait until a VM device's hot-plug step is done (``xdom ps``'s ``vm.disks``/``vm.nics`` rows); what
    the VM got, or CommandError with why not."""
    dev = vm.get("device")
    if vm.get("at_start"):
        return f"its VM is not running: it gets {dev} when it starts"
    deadline = time.monotonic() + VM_PLUG_WAIT
    with _client(run_dir, 10.0) as c:
        while True:
            try:
                row = c.request("info", name=name)["domain"]
            except (ControlError, TimeoutError) as e:
                raise CommandError(EXIT_ERROR, str(e)) from None
            x = next((x for x in (row.get("vm") or {}).get(key, []) if x.get("id") == dev), None)
            plug = (x or {}).get("plug") or {}
            if removing and x is None:
                return ""
            if not removing and plug.get("state") == "present":
                return (f"the VM has it as a virtio device (vhost-user on {x and x.get('socket')}, PCIe slot "
                        f"{plug.get('bus')})")
            if plug.get("state") == "failed":
                undo = "" if removing else (f"; its xenbus device stays until xdom "
                                            f"{'block' if key == 'disks' else 'network'}-detach")
                raise CommandError(EXIT_ERROR, f"{dev}: {plug.get('error')}{undo}")
            if time.monotonic() > deadline:
                raise CommandError(EXIT_ERROR, f"the VM of {name} has not {'let go of' if removing else 'got'} {dev} "
                                               f"within {VM_PLUG_WAIT:g}s (its plug state: xdom ps --json)")
            time.sleep(0.05)    # polling the supervisor, with a deadline


def cmd_block_list(args: argparse.Namespace) -> int:
    run_dir = _resolve_run_dir(args)
    row = _request(run_dir, args.timeout, "info", name=args.domain)["domain"]
    disks = [d for d in row["devices"] if d["type"] == "vbd"]
    if args.json:
        _say(json.dumps(disks, indent=2))
        return EXIT_OK
    _say(f"{'Vdev':<6} {'DevId':>6} {'Backend':<10} {'Mode':<4} {'Target':<40} Export")
    for d in disks:
        _say(f"{d['vdev']:<6} {d['devid']:>6} {d['backend'] or '-':<10} {d['mode']:<4} {d['target'] or '-':<40} "
             f"{d['export']}")
    return EXIT_OK


def cmd_network_attach(args: argparse.Namespace) -> int:
    run_dir = _resolve_run_dir(args)
    r = _request(run_dir, args.timeout, "network-attach", name=args.domain, vif=args.vif)
    if "vm" in r:
        _say(f"xdom: vif {r['devid']} ({r['mac']}, {r['queues']} queue pair{'s' if r['queues'] > 1 else ''}) attached "
             f"to {args.domain} on {r['backend']}; " + _follow_vm_plug(run_dir, args.domain, "nics", r["vm"],
                                                                      removing=False))
        return EXIT_OK
    _say(f"xdom: vif {r['devid']} ({r['mac']}) attached to {args.domain} on {r['backend']}: {r['ifname']}"
         + (f" {r['ip']}" if r["ip"] else "") + (f" in namespace {r['netns']}" if r["netns"] else "")
         + (f"; {r['backend']}'s side: {r['backend_tap']} on bridge {r['bridge']}" if r.get("backend_tap") else ""))
    return EXIT_OK


def cmd_network_detach(args: argparse.Namespace) -> int:
    run_dir = _resolve_run_dir(args)
    r = _request(run_dir, args.timeout, "network-detach", name=args.domain, vif=args.vif)
    if "vm" in r:
        _follow_vm_plug(run_dir, args.domain, "nics", r["vm"], removing=True)
        _say(f"xdom: vif {r['devid']} detached from {args.domain} (removed from its VM, then from xenbus)")
        return EXIT_OK
    _say(f"xdom: vif {r['devid']} detached from {args.domain}"
         + ("" if r["clean"] else " (the backend did not confirm it closed; its nodes were removed anyway)"))
    return EXIT_OK


def cmd_network_list(args: argparse.Namespace) -> int:
    run_dir = _resolve_run_dir(args)
    row = _request(run_dir, args.timeout, "info", name=args.domain)["domain"]
    vifs = [d for d in row["devices"] if d["type"] == "vif"]
    if args.json:
        _say(json.dumps(vifs, indent=2))
        return EXIT_OK
    _say(f"{'Idx':>3} {'Iface':<6} {'MAC':<18} {'Backend':<10} {'MTU':>5} IP   (namespace {row['netns'] or '-'})")
    for d in vifs:
        _say(f"{d['devid']:>3} {d['ifname']:<6} {d['mac']:<18} {d['backend'] or '-':<10} {d['mtu']:>5} {d['ip'] or '-'}")
    return EXIT_OK


# ---- parsers ---------------------------------------------------------------------

def add_parsers(sub: Any) -> None:
    """Add the supervisor's commands to the ``xdom`` parser's subparsers."""
    up = sub.add_parser("up", help="start a topology: broker, xenstored, driver domains, guests")
    up.add_argument("topology", help="topology file (TOML)")
    up.add_argument("--detach", "-d", action="store_true", help="return once everything is up, leaving a daemon")
    up.add_argument("--state-dir", default=None, help="logs and xenstored's store (default /var/lib/xdom/NAME)")
    up.add_argument("--run-dir", default=None, help="sockets and the pid file (default /run/xdom/NAME)")
    up.add_argument("--uids", default="auto", choices=UID_MODES,
                    help="as root, run each domain under its own uid (separate), never (shared), or when this "
                         "installation allows it (auto, the default)")
    up.add_argument("--ready-timeout", type=float, default=20.0, help="seconds a domain has to become ready")
    up.add_argument("--notify-fd", type=int, default=None, help=argparse.SUPPRESS)
    up.set_defaults(func=_run(cmd_up))

    def target(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--run-dir", default=None, help="the host's run directory")
        sp.add_argument("--topology", "-t", default=None, help="find the host by its topology file")
        sp.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the supervisor's answer")

    down = sub.add_parser("down", help="stop a running host and wait until everything is gone")
    target(down)
    down.set_defaults(func=_run(cmd_down), timeout=60.0)

    ps = sub.add_parser("ps", help="the domains of a running host (or of a broker started by hand)")
    target(ps)
    ps.add_argument("--json", action="store_true", help="one JSON object per domain")
    ps.set_defaults(func=_run(cmd_ps))

    top = sub.add_parser("top", help="a live view of the domains (ps, refreshed)")
    target(top)
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--iterations", "-n", type=int, default=None, help="stop after N refreshes")
    top.set_defaults(func=_run(cmd_top), json=False)

    logs = sub.add_parser("logs", help="a domain's log (NAME-vm: a VM guest's QEMU, NAME-console: its console)")
    logs.add_argument("domain")
    target(logs)
    logs.add_argument("--state-dir", default=None, help="read STATE_DIR/logs/DOMAIN.log without a supervisor")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing while the host runs")
    logs.add_argument("--lines", "-n", type=int, default=None, help="only the last N lines")
    logs.set_defaults(func=_run(cmd_logs))

    console = sub.add_parser("console", help="attach to a VM guest's serial console (Ctrl-] leaves), as xl console")
    console.add_argument("domain")
    target(console)
    console.add_argument("--run", default=None, metavar="CMD",
                         help="run CMD in the VM (sh) instead, print its output and exit with its status "
                              "(the project's image only)")
    console.add_argument("--wait", type=float, default=60.0,
                         help="with --run: seconds for the VM to answer (it may still be booting) and for CMD")
    console.set_defaults(func=_run(cmd_console))

    for name, func, what in (("restart", cmd_restart, "restart a domain (it keeps its domid)"),
                             ("destroy", cmd_destroy, "stop a domain and remove it from the broker")):
        sp = sub.add_parser(name, help=what)
        sp.add_argument("domain")
        target(sp)
        sp.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the outcome")
        if name == "restart":
            sp.add_argument("--no-wait", action="store_true", help="return once the restart is under way")
        sp.set_defaults(func=_run(func))
    _add_block_parsers(sub, target)


def _add_block_parsers(sub: Any, target: Callable[[argparse.ArgumentParser], None]) -> None:
    attach = sub.add_parser("block-attach", help="attach a disk to a running guest (xl block-attach)")
    attach.add_argument("domain")
    attach.add_argument("disk", help="an xl disk spec, e.g. 'vdev=xvdb, access=rw, backend=blk0, target=/x.img'")
    target(attach)
    attach.set_defaults(func=_run(cmd_block_attach), timeout=30.0)
    detach = sub.add_parser("block-detach", help="detach a guest's disk (xl block-detach)")
    detach.add_argument("domain")
    detach.add_argument("vdev", help="the disk's vdev (xvdb) or devid (51728)")
    target(detach)
    detach.set_defaults(func=_run(cmd_block_detach), timeout=30.0)
    blist = sub.add_parser("block-list", help="a guest's disks and their NBD exports (xl block-list)")
    blist.add_argument("domain")
    target(blist)
    blist.add_argument("--json", action="store_true")
    blist.set_defaults(func=_run(cmd_block_list))
    nattach = sub.add_parser("network-attach", help="add a vif to a running guest (xl network-attach)")
    nattach.add_argument("domain")
    nattach.add_argument("vif", help="an xl network spec, e.g. 'mac=00:16:3e:00:00:09, backend=net0, ip=10.9.0.1/24'")
    target(nattach)
    nattach.set_defaults(func=_run(cmd_network_attach), timeout=30.0)
    ndetach = sub.add_parser("network-detach", help="remove a guest's vif (xl network-detach)")
    ndetach.add_argument("domain")
    ndetach.add_argument("vif", help="the vif's index (devid) or MAC")
    target(ndetach)
    ndetach.set_defaults(func=_run(cmd_network_detach), timeout=30.0)
    nlist = sub.add_parser("network-list", help="a guest's vifs (xl network-list)")
    nlist.add_argument("domain")
    target(nlist)
    nlist.add_argument("--json", action="store_true")
    nlist.set_defaults(func=_run(cmd_network_list))


def _run(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The command, with CommandError turned into its message and exit status."""
    def run(args: argparse.Namespace) -> int:
        try:
            return cmd(args)
        except CommandError as e:
            print(f"xdom: {e}", file=sys.stderr, flush=True)
            return e.code
        except UntrustedPath as e:
            print(f"xdom: {e}", file=sys.stderr, flush=True)
            return EXIT_ERROR
    run.__doc__ = cmd.__doc__
    return run
