"""``xdom keys``, ``xdom events``, and the commands that act on remote hosts: ``xdom --host NAME ...``, ``ps --all``.

What works on a remote host is what its front door serves
(:mod:`xdom.deploy.remote`): ``ps``, ``up`` of a topology file that lives on
that host, ``down``, ``restart``, ``destroy``, ``block-attach``,
``block-detach``, ``network-attach``, ``network-detach``, ``events``.  The
rest (``logs``, ``console``, ``xenstore``, ``top``) read files or sockets of
the machine itself and say so.

A host that does not answer within the fleet's timeout is reported
unreachable, with exit status 3, and never hides the hosts that did answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from . import curvekeys
from .control import ControlError
from .domain_cli import DETACH_WAIT, detached_row, unclean_detach
from .exit_codes import EXIT_ERROR, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from .fleet import (
    Fleet,
    FleetError,
    FleetHost,
    HostClient,
    HostUnreachable,
    ask_all,
    follow_events,
    load_fleet,
)
from .remote import JOB_TIMEOUT

__all__ = ["REMOTE_COMMANDS", "add_parsers", "run_remote", "wants_remote"]


class _Fail(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _say(text: str) -> None:
    print(text, flush=True)


# ---- xdom keys -------------------------------------------------------------------------------------

def cmd_keys(args: argparse.Namespace) -> int:
    try:
        if args.action == "server":
            public, secret = curvekeys.make_pair(args.dir, "server")
            allowed = os.path.join(args.dir, "allowed_clients")
            os.makedirs(allowed, mode=0o700, exist_ok=True)
            _say(f"xdom: server key pair {secret} (secret, 0600) and {public}; allow-list {allowed}/")
            _say(f"  public key for the fleet file: server_key = \"{curvekeys.load_public(public).decode()}\"")
        elif args.action == "client":
            public, secret = curvekeys.make_pair(args.dir, args.name)
            _say(f"xdom: client key pair {secret} (secret, 0600) and {public}")
            _say(f"  on each host: xdom keys allow {public} --dir STATE_DIR/keys/allowed_clients")
        elif args.action == "allow":
            dest = curvekeys.allow(args.dir, args.file)
            _say(f"xdom: {dest}: {curvekeys.load_public(dest).decode()} may connect (from its next connection)")
        else:       # show
            _say(curvekeys.load_public(args.file).decode())
    except curvekeys.KeyFileError as e:
        print(f"xdom: {e}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


# ---- remote commands --------------------------------------------------------------------------------

def _fleet(args: argparse.Namespace) -> Fleet:
    fleet = load_fleet(args.fleet)
    if getattr(args, "timeout_override", None):
        return Fleet(fleet.path, fleet.hosts, args.timeout_override)
    return fleet


def _one(args: argparse.Namespace) -> tuple[Fleet, FleetHost]:
    fleet = _fleet(args)
    return fleet, fleet.host(args.host)


def _ask(client: HostClient, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
    try:
        return client.request(op, timeout, **fields)
    except ControlError as e:
        raise _Fail(EXIT_ERROR, f"{client.host.name}: {e.message} ({e.errno_name})") from None
    except HostUnreachable as e:
        raise _Fail(EXIT_UNREACHABLE, str(e)) from None


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f}"


def _uptime(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if seconds else "-"


def remote_ps(args: argparse.Namespace) -> int:
    fleet = _fleet(args)
    hosts = list(fleet.hosts.values()) if args.all else [fleet.host(args.host)]
    answers = ask_all(hosts, "ps", fleet.timeout)
    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    for h in hosts:
        a = answers[h.name]
        if isinstance(a, ControlError):
            failed[h.name] = f"{a.message} ({a.errno_name})"
        elif isinstance(a, Exception):
            failed[h.name] = str(a)
        else:
            rows.extend({"host": h.name, **r} for r in a["domains"])
    if args.json:
        _say(json.dumps({"domains": rows, "unreachable": failed} if args.all else rows, indent=2))
    else:
        _say(f"{'HOST':<12} {'NAME':<16} {'KIND':<9} {'ID':>4} {'STATE':<9} {'PID':>7} {'UPTIME':>8} "
             f"{'RSS(MiB)':>8} {'RESTARTS':>8} LAST EXIT")
        for r in rows:
            dash = "-"
            _say(f"{r['host']:<12} {r['name']:<16} {r['kind']:<9} {r['domid'] if r['domid'] is not None else dash:>4} "
                 f"{r['state']:<9} {r['pid'] or dash:>7} {_uptime(r['uptime']):>8} {_mib(r['rss']):>8} "
                 f"{r['restarts']:>8} {r['last_exit'] or ''}")
        for name, why in failed.items():
            _say(f"{name:<12} {'-':<16} {'-':<9} {'-':>4} {'UNREACHABLE':<9}  {why}")
    for name, why in failed.items():
        print(f"xdom: {why if why.startswith(name) else f'{name}: {why}'}", file=sys.stderr)
    return EXIT_UNREACHABLE if failed else EXIT_OK


def _remote_path(path: str) -> str:
    if not path.startswith("/"):
        raise _Fail(EXIT_USAGE, f"{path}: give the topology file's absolute path on the remote host")
    return path


def remote_up(args: argparse.Namespace) -> int:
    fleet, host = _one(args)
    with HostClient(host, fleet.timeout) as c:
        r = _ask(c, "up", JOB_TIMEOUT + fleet.timeout, topology=_remote_path(args.topology))
    sys.stdout.write("".join(f"  {host.name}: {line}\n" for line in r.get("output", "").splitlines()))
    if r.get("status") != 0:
        raise _Fail(EXIT_ERROR, f"{host.name}: xdom up {args.topology} exited with status {r.get('status')}")
    _say(f"xdom: {host.name}: {args.topology} is up")
    return EXIT_OK


def remote_down(args: argparse.Namespace) -> int:
    fleet, host = _one(args)
    fields = {"topology": _remote_path(args.topology)} if args.topology else {}
    with HostClient(host, fleet.timeout) as c:
        r = _ask(c, "down", max(fleet.timeout, args.timeout), **fields)
        if "status" in r:           # another host of that machine, stopped by xdom down run there
            sys.stdout.write("".join(f"  {host.name}: {line}\n" for line in r.get("output", "").splitlines()))
            if r["status"] != 0:
                raise _Fail(EXIT_ERROR, f"{host.name}: xdom down exited with status {r['status']}")
            return EXIT_OK
        # This host's own supervisor is stopping; its door is the last thing it closes (after the run
        # directory is gone).  A ping left unanswered is a supervisor busy stopping: only a refused
        # connection says it has finished.
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            try:
                c.request("ping", min(1.0, fleet.timeout))
            except HostUnreachable:
                if c.door_closed(min(1.0, fleet.timeout)):
                    _say(f"xdom: {host.name}: everything stopped (supervisor pid {r.get('pid')})")
                    return EXIT_OK
            except ControlError:
                pass        # the supervisor is busy stopping; its door still answers
            time.sleep(0.2)     # polling a remote host's stop, with a deadline
    raise _Fail(EXIT_ERROR, f"{host.name} still answers {args.timeout:g}s after the stop request")


def _wait_row(c: HostClient, name: str, wait: float, done: Callable[[dict[str, Any]], str | None]) -> dict[str, Any]:
    deadline = time.monotonic() + wait
    while True:
        row = _ask(c, "info", name=name)["domain"]
        verdict = done(row)
        if verdict == "ok":
            return row
        if verdict:
            raise _Fail(EXIT_ERROR, f"{c.host.name}: {verdict}")
        if time.monotonic() > deadline:
            raise _Fail(EXIT_ERROR, f"{c.host.name}: {name} is {row['state']} after {wait:g}s")
        time.sleep(0.1)     # polling a remote supervisor, with a deadline


def remote_restart(args: argparse.Namespace) -> int:
    fleet, host = _one(args)
    with HostClient(host, fleet.timeout) as c:
        before = _ask(c, "info", name=args.domain)["domain"]
        generation = _ask(c, "restart", name=args.domain)["generation"]
        if args.no_wait:
            _say(f"xdom: {host.name}: restarting {args.domain}")
            return EXIT_OK

        def done(row: dict[str, Any]) -> str | None:
            if row["generation"] > generation and row["state"] == "running":
                return "ok"
            if row["state_changes"] > before["state_changes"] and row["state"] in ("exited", "failed", "destroyed"):
                return f"{args.domain} did not restart: {row['state']}: {row['last_exit'] or ''}"
            return None
        row = _wait_row(c, args.domain, args.wait, done)
    _say(f"xdom: {host.name}: {args.domain} restarted (domid {row['domid']}, pid {row['pid']})")
    return EXIT_OK


def remote_destroy(args: argparse.Namespace) -> int:
    fleet, host = _one(args)
    with HostClient(host, fleet.timeout) as c:
        _ask(c, "destroy", name=args.domain)
        _wait_row(c, args.domain, args.wait, lambda row: "ok" if row["state"] == "destroyed" else None)
    _say(f"xdom: {host.name}: {args.domain} destroyed")
    return EXIT_OK


def _device(op: str, field: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        fleet, host = _one(args)
        with HostClient(host, fleet.timeout) as c:
            r = _ask(c, op, max(fleet.timeout, args.timeout), name=args.domain, **{field: getattr(args, field)})
            what = r.get("vdev") or f"vif {r.get('devid')}"
            if r.get("detaching"):
                # The host's backend is closing it, followed by its supervisor: followed here as
                # ``xdom block-detach`` on that host follows it (its row's detaching, then detached).
                key = str(r["vdev"] if op == "block-detach" else r["devid"])
                row = _wait_row(c, args.domain, DETACH_WAIT, lambda row: detached_row(row, key))
                r["clean"] = (row.get("detached") or {}).get(key)
        detail = {k: r[k] for k in ("backend", "export", "ifname", "ip", "netns") if r.get(k) is not None}
        detaching = "detach" in op
        _say(f"xdom: {host.name}: {what} {'detached from' if detaching else 'attached to'} {args.domain}"
             + (f" ({', '.join(f'{k} {v}' for k, v in detail.items())})" if detail else "")
             + ("; its VM gets it by hot-plug: xdom --host NAME ps --json shows its plug state" if "vm" in r else "")
             + (unclean_detach(r.get("clean")) if detaching else ""))
        return EXIT_OK
    return run


REMOTE_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "ps": remote_ps, "up": remote_up, "down": remote_down, "restart": remote_restart, "destroy": remote_destroy,
    "block-attach": _device("block-attach", "disk"), "block-detach": _device("block-detach", "vdev"),
    "network-attach": _device("network-attach", "vif"), "network-detach": _device("network-detach", "vif"),
}


def wants_remote(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "host", None)) or bool(getattr(args, "all", False) and args.command == "ps")


def run_remote(args: argparse.Namespace) -> int:
    """The command on ``--host`` (or every host, ``ps --all``)."""
    cmd = REMOTE_COMMANDS.get(args.command)
    if cmd is None:
        print(f"xdom: {args.command} does not work on a remote host (what does: "
              f"{', '.join([*REMOTE_COMMANDS, 'events'])})", file=sys.stderr)
        return EXIT_USAGE
    try:
        return cmd(args)
    except _Fail as e:
        print(f"xdom: {e}", file=sys.stderr, flush=True)
        return e.code
    except FleetError as e:
        print(f"xdom: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE


# ---- xdom events -------------------------------------------------------------------------------------

def _print_event(host: str | None, ev: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _say(json.dumps({**({"host": host} if host else {}), **ev}))
        return
    when = time.strftime("%H:%M:%S", time.localtime(float(ev.get("time") or time.time())))
    reason = f" ({ev['reason']})" if ev.get("reason") else ""
    _say(f"{when} {(host or '-'):<12} {ev.get('name', '?'):<16} {ev.get('domid', '?'):>4} {ev.get('event')}"
         f"{reason}")


def cmd_events(args: argparse.Namespace) -> int:
    """Follow the brokers' lifecycle events: of the local host, of ``--host NAME``, or of every host (``--all``)."""
    try:
        if args.host or args.all:
            fleet = load_fleet(args.fleet)
            hosts = list(fleet.hosts.values()) if args.all else [fleet.host(args.host)]
            # Say up front which hosts do not answer now; they are followed all the same.
            answers = ask_all(hosts, "ping", fleet.timeout)
            down = [str(a) for a in answers.values() if isinstance(a, Exception)]
            for why in down:
                print(f"xdom: {why}; following it all the same", file=sys.stderr, flush=True)
            stream = follow_events(hosts, args.count, args.idle_timeout)
            for host, ev in stream:
                _print_event(host, ev, args.json)
            return EXIT_UNREACHABLE if down and len(down) == len(hosts) else EXIT_OK
    except FleetError as e:
        print(f"xdom: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    return _local_events(args)


def _local_events(args: argparse.Namespace) -> int:
    from xdom.broker.mgmt_client import EventSubscriber, events_endpoint_for

    from .supervisor_client import CommandError
    from .supervisor_client import resolve_run_dir as _resolve_run_dir
    try:
        run_dir = _resolve_run_dir(args, unsupervised=True)
    except CommandError as e:
        print(f"xdom: {e}", file=sys.stderr)
        return e.code
    sub = EventSubscriber(events_endpoint_for(run_dir))
    seen = 0
    try:
        while args.count is None or seen < args.count:
            ev = sub.next(args.idle_timeout if args.idle_timeout is not None else 3600.0)
            if ev is None:
                if args.idle_timeout is not None:
                    break
                continue
            seen += 1
            _print_event(None, ev, args.json)
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
    return EXIT_OK


# ---- parsers ---------------------------------------------------------------------------------------

def add_parsers(sub: Any, top: argparse.ArgumentParser) -> None:
    """``keys`` and ``events``; ``--host``/``--fleet`` on ``xdom`` itself; ``--all`` on ``ps``."""
    top.add_argument("--host", default=None, metavar="NAME",
                     help="run the command on this host of the fleet file (remote, over CurveZMQ)")
    top.add_argument("--fleet", default=None, metavar="FILE",
                     help="the fleet file (default $XDOM_FLEET, else ~/.config/xdom/fleet.toml)")
    sub.choices["ps"].add_argument("--all", action="store_true", help="every host of the fleet file, with a HOST "
                                                                      "column; unreachable ones said as such")
    keys = sub.add_parser("keys", help="CurveZMQ keys for remote hosts: a host's server pair, a client's, "
                                       "an allow-list entry")
    ksub = keys.add_subparsers(dest="action", required=True)
    ks = ksub.add_parser("server", help="a host's key pair (DIR/server.key_secret) and its allow-list directory")
    ks.add_argument("dir", help="e.g. STATE_DIR/keys (where [host] listen looks by default)")
    kc = ksub.add_parser("client", help="a client's key pair (DIR/NAME.key_secret)")
    kc.add_argument("name")
    kc.add_argument("--dir", default=os.path.join(os.path.expanduser("~/.config"), "xdom", "keys"))
    ka = ksub.add_parser("allow", help="let a client's public key in (copies it into an allow-list directory)")
    ka.add_argument("file", help="the client's NAME.key")
    ka.add_argument("--dir", required=True, help="the host's allow-list, e.g. STATE_DIR/keys/allowed_clients")
    kshow = ksub.add_parser("show", help="print a key file's public key (a fleet file's server_key)")
    kshow.add_argument("file")
    keys.set_defaults(func=cmd_keys)

    ev = sub.add_parser("events", help="follow the lifecycle events of a host (--host NAME) or of all (--all)")
    ev.add_argument("--all", action="store_true", help="every host of the fleet file")
    ev.add_argument("--run-dir", default=None, help="a local host's run directory")
    ev.add_argument("--topology", "-t", default=None, help="a local host, by its topology file")
    ev.add_argument("--count", "-n", type=int, default=None, help="stop after N events")
    ev.add_argument("--idle-timeout", type=float, default=None, help="stop after this many seconds without one")
    ev.add_argument("--json", action="store_true", help="one JSON object per event, with its host")
    ev.set_defaults(func=cmd_events)
