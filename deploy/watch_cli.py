"""``xdom ps/top/logs/console``: what a running host's domains are doing, their logs, a VM's console.

``ps`` asks the supervisor; a host whose supervisor died is shown from its
state file, checked against /proc (``adopt.report``), and a broker started
by hand from its own table (``deploy/broker_list.py``).  ``logs`` reads
``STATE_DIR/logs/NAME.log`` (``NAME-vm`` and ``NAME-console``: a VM
guest's QEMU and serial console), following it while the host runs.
``console`` attaches to a VM's serial console, believed only when
``SO_PEERCRED`` says the VM's own QEMU serves it.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time
from typing import Any

from .rundir import STATE_FILE, Layout, default_base, running_pid
from .supervisor_client import (
    EXIT_ERROR,
    EXIT_NOTHING,
    EXIT_OK,
    CommandError,
    request,
    resolve_run_dir,
    say,
)

__all__ = ["cmd_console", "cmd_logs", "cmd_ps", "cmd_top"]


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f}"


def _uptime(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if seconds else "-"


def cmd_ps(args: argparse.Namespace) -> int:
    try:
        run_dir = resolve_run_dir(args, unsupervised=True)
    except CommandError as e:
        if e.code == EXIT_NOTHING and not args.topology and os.path.exists(
                os.path.join(args.run_dir or default_base(), "mgmt.sock")):
            return _broker_list(args.run_dir or default_base(), args)
        raise
    if running_pid(run_dir) is None and os.path.exists(os.path.join(run_dir, STATE_FILE)):
        return _unsupervised_ps(run_dir, args)  # its supervisor died: what it wrote down, checked against /proc
    if running_pid(run_dir) is None and os.path.exists(os.path.join(run_dir, "mgmt.sock")):
        return _broker_list(run_dir, args)      # a broker started by hand: its own table
    reply = request(run_dir, args.timeout, "ps")
    rows = reply["domains"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    say(f"supervisor pid {reply['pid']} ({reply['phase']}{', adopted the host' if reply.get('adopted') else ''}), "
         f"broker pid {reply['broker_pid']}, run {reply['run_dir']}, uids {reply['uids']}")
    say(f"{'NAME':<16} {'KIND':<9} {'ID':>4} {'STATE':<9} {'PID':>7} {'UPTIME':>8} {'RSS(MiB)':>8} "
         f"{'RESTARTS':>8} {'MAPS':>5} {'GRANTED':>7} {'EVTCHN':>6} {'CONFINED':<24} LAST EXIT")
    for r in rows:
        dash = "-"
        say(f"{r['name']:<16} {r['kind']:<9} {r['domid'] if r['domid'] is not None else dash:>4} {r['state']:<9} "
             f"{r['pid'] or dash:>7} {_uptime(r['uptime']):>8} {_mib(r['rss']):>8} {r['restarts']:>8} "
             f"{_n(r['mappings_held']):>5} {_n(r['grants_mapped_by_others']):>7} {_n(r['event_channels']):>6} "
             f"{_confined(r.get('confinement')):<24} {r['last_exit'] or ''}")
        vm = r.get("vm")
        if vm:
            # The guest's VMM: a process of its own, supervised beside the guest domain.
            note = f"accel {vm['accel']} ({vm['accel_reason']})"
            if vm.get("last_exit"):
                note += f"; last exit: {vm['last_exit']}"
            say(f"{'  vm':<16} {'qemu':<9} {dash:>4} {vm['state']:<9} {vm['pid'] or dash:>7} "
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
    say(f"supervisor not running (pid {r['dead_supervisor_pid']} is gone; it last wrote its state {age:.0f}s ago); "
         f"host adopted by none; {r['domains_alive']} of {len(rows)} domains alive; broker "
         + (f"pid {r['broker_pid']} alive" if r["broker_alive"] else "dead") + f"; run {run_dir}")
    say(f"  xdom up {r['topology']} adopts it; xdom down --run-dir {run_dir} stops it")
    say(f"{'NAME':<16} {'KIND':<9} {'ID':>4} {'STATE':<9} {'PID':>7} {'RESTARTS':>8} {'BROKER SAYS':<12} LAST EXIT")
    for row in rows:
        dash = "-"
        say(f"{row['name']:<16} {row['kind']:<9} {row['domid'] if row['domid'] is not None else dash:>4} "
             f"{row['state']:<9} {row['pid'] or dash:>7} {row['restarts']:>8} {row['domain_state'] or dash:<12} "
             f"{row['last_exit'] or ''}")
        vm = row.get("vm")
        if vm:
            say(f"{'  vm':<16} {'qemu':<9} {dash:>4} {vm['state']:<9} {vm['pid'] or dash:>7}")
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
                row = request(run_dir, timeout, "info", name=name[:-len(suffix)])["domain"]
            except CommandError:
                break
            if row.get("vm"):
                return str(row["vm"][key])
    return str(request(run_dir, timeout, "info", name=name)["domain"]["log"])


def cmd_logs(args: argparse.Namespace) -> int:
    run_dir: str | None = None
    if args.state_dir:
        path = Layout(os.path.abspath(args.state_dir), "/").log_path(args.domain)
    else:
        run_dir = resolve_run_dir(args)
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
    run_dir = resolve_run_dir(args)
    row = request(run_dir, args.timeout, "info", name=args.domain)["domain"]
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
