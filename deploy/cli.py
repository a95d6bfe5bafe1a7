"""The ``xdom`` command."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any

from xdom.broker.mgmt_client import ManagementError
from xdom.broker.pathtrust import UntrustedPath

from .broker_list import cmd_list
from .exit_codes import EXIT_ERROR, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE


def default_run_dir() -> str:
    if os.geteuid() == 0:
        return "/run/xdom"
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/xdom-{os.getuid()}", "xdom")


def cmd_broker(args: argparse.Namespace) -> int:
    from xdom.broker.server import BrokerServer, check_isolation
    check_isolation()
    state_dir = args.state_dir or os.path.join(args.run_dir, "broker-state")
    # refuses a run directory others can write; takes over from a broker that died on the same state
    server = BrokerServer(args.run_dir, args.mgmt, args.events, state_dir=state_dir)

    def stop(signum: int, frame: Any) -> None:
        server.stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.getLogger("xdom.broker").info(
        "broker serving: hypercalls on %s, management on %s, events on %s",
        server.hypercall_sock_path, server.mgmt_endpoint, server.events_endpoint)
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)
    server.serve_forever()
    return EXIT_OK


def cmd_xenstored(args: argparse.Namespace) -> int:
    """A xenstored in the foreground: on a unix socket, and on domain rings
    when started as a domain (XDOM_HYPERCALL/XDOM_TOKEN in the environment)."""
    from xdom.backends.xenstored.server import FSYNC_ENV, XenstoredServer
    if args.fsync:
        if not args.state_dir:
            print("xdom xenstored: --fsync needs --state-dir", file=sys.stderr)
            return EXIT_USAGE
        os.environ[FSYNC_ENV] = "1"
    host = None
    if os.environ.get("XDOM_HYPERCALL") and os.environ.get("XDOM_TOKEN"):
        from xdom.domains.xenhost import connect
        host = connect()
    if args.unix_socket:
        os.makedirs(os.path.dirname(os.path.abspath(args.unix_socket)), exist_ok=True)
    if args.state_dir:
        os.makedirs(args.state_dir, exist_ok=True)
    from xdom.backends.xenstored.quota import Quota
    server = XenstoredServer(args.unix_socket, args.state_dir, host,
                             quota=Quota(**{k: v for k, v in (("nodes", args.entry_nb), ("watches", args.watch_nb))
                                            if v is not None}))

    def stop(signum: int, frame: Any) -> None:
        server.stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.getLogger("xdom.xenstored").info(
        "xenstored serving%s%s", f" on {args.unix_socket}" if args.unix_socket else "",
        f" and domain rings as domain {host.domid}" if host else "")
    message = b"ready\n"
    if host is not None:
        # A domain: its store and its socket's directory only, then its syscalls (it has no threads).
        from xdom.domains import confinement
        confinement.restrict_files("xenstored", state_dirs=[args.state_dir] if args.state_dir else [],
                                   socket_dirs=[os.path.dirname(os.path.abspath(args.unix_socket))]
                                   if args.unix_socket else [])
        confinement.lock_down("xenstored")
        message = confinement.ready_message()

    def ready() -> None:
        if args.ready_fd is not None:
            os.write(args.ready_fd, message)
            os.close(args.ready_fd)
    server.serve_forever(ready)
    if host is not None:
        host.shutdown("poweroff")      # a clean stop, not a crash, to the broker
        host.close()
    return EXIT_OK


def cmd_xenstore(args: argparse.Namespace) -> int:
    """Xenstore access through our own client (like xenstore-read/-write/-ls/-rm/-watch)."""
    from xdom.domains.abi.xs_wire import XenstoreError
    from xdom.domains.xenstore import DEFAULT_SOCKET, UnixTransport, XenstoreClient

    from .supervisor_client import CommandError, xenstored_endpoint
    try:
        socket_path, server_uid = xenstored_endpoint(args.socket, args.run_dir, args.topology)
    except CommandError as e:
        print(f"xdom: {e}", file=sys.stderr)
        return e.code
    path = socket_path or os.environ.get("XENSTORED_PATH") or DEFAULT_SOCKET
    try:
        transport = UnixTransport(path)
    except OSError as e:
        print(f"xdom: cannot reach xenstored: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if server_uid is not None:
        # A host's xenstored socket lives in the xenstore domain's own directory: believed only when that
        # domain's uid serves it.
        uid = struct.unpack("3i", transport.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))[1]
        if uid != server_uid:
            transport.close()
            print(f"xdom: refusing {path}: it is served by uid {uid}, not by the xenstore domain's uid {server_uid}",
                  file=sys.stderr)
            return EXIT_ERROR
    client = XenstoreClient(transport)
    try:
        if args.action == "read":
            for path in args.paths:
                print(client.read(path).decode(errors="replace"))
        elif args.action == "write":
            if len(args.paths) % 2:
                print("xdom: write takes PATH VALUE pairs", file=sys.stderr)
                return EXIT_USAGE
            for path, value in zip(args.paths[::2], args.paths[1::2]):
                client.write(path, value)
        elif args.action == "rm":
            for path in args.paths:
                client.rm(path)
        elif args.action == "ls":
            for path, value in client.walk(args.paths[0] if args.paths else "/"):
                print(f"{path} = \"{value.decode(errors='replace')}\"")
        elif args.action == "watch":
            import threading
            done = threading.Event()
            seen = [0]

            def fired(path: str, token: str) -> None:
                print(path, flush=True)
                seen[0] += 1
                if args.count and seen[0] >= args.count:
                    done.set()
            client.watch(args.paths[0], "xdom-cli", fired)
            done.wait()
    except XenstoreError as e:
        print(f"xdom: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        client.close()
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xdom", description="Xen-style disaggregated driver domains on Linux")
    p.add_argument("--log-level", default=os.environ.get("XDOM_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--run-dir", default=default_run_dir(), help="broker sockets live here")
        sp.add_argument("--mgmt", default=None, help="management endpoint (default ipc://RUN_DIR/mgmt.sock)")

    b = sub.add_parser("broker", help="run the broker (the hypervisor) in the foreground")
    common(b)
    b.add_argument("--events", default=None, help="lifecycle event PUB endpoint")
    b.add_argument("--ready-fd", type=int, default=None, help="write 'ready' to this fd once serving")
    b.add_argument("--state-dir", default=None,
                   help="where the broker writes down its tables so that a broker started after it died takes "
                        "over its running domains (default RUN_DIR/broker-state)")
    b.set_defaults(func=cmd_broker)

    x = sub.add_parser("xenstored", help="run xenstored in the foreground")
    x.add_argument("--unix-socket", default=None, help="serve Xen's tools on this socket (XENSTORED_PATH)")
    x.add_argument("--state-dir", default=None, help="keep the store here across restarts")
    x.add_argument("--fsync", action="store_true",
                   help="with --state-dir: every journal record on stable storage before its replies leave "
                        "(survives power loss, not only a SIGKILL); also XDOM_XENSTORED_FSYNC=1")
    x.add_argument("--entry-nb", "-E", type=int, default=None, metavar="N",
                   help="nodes an unprivileged domain may own (C xenstored's -E; default 1000)")
    x.add_argument("--watch-nb", "-W", type=int, default=None, metavar="N",
                   help="watches an unprivileged domain may set (C xenstored's -W; default 128)")
    x.add_argument("--ready-fd", type=int, default=None, help="write 'ready' to this fd once serving")
    x.set_defaults(func=cmd_xenstored)

    xc = sub.add_parser("xenstore", help="read, write, list, remove or watch xenstore nodes")
    xc.add_argument("action", choices=["read", "write", "ls", "rm", "watch"])
    xc.add_argument("paths", nargs="*")
    xc.add_argument("--socket", default=None, help="xenstored socket (default: the host's given by --run-dir or "
                                                   "--topology, else $XENSTORED_PATH, else the only host running)")
    xc.add_argument("--run-dir", default=None, help="the xenstored of the host running in this run directory")
    xc.add_argument("--topology", "-t", default=None, help="the xenstored of the host started from this topology")
    xc.add_argument("--count", type=int, default=0, help="watch: stop after this many events")
    xc.set_defaults(func=cmd_xenstore)

    sp = sub.add_parser("list", help="show a broker's domain table")
    common(sp)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--timeout", type=float, default=5.0)
    sp.set_defaults(func=cmd_list)

    # up, down, ps, logs, restart, destroy: the supervisor's commands
    from .supervisor_cli import add_parsers
    add_parsers(sub)
    # vm-image: the VM image the project builds itself
    from .vm.cli import add_parsers as add_vm_parsers
    add_vm_parsers(sub)
    # keys, events, --host/--fleet, ps --all: many hosts (fleet_cli.py)
    from .fleet_cli import add_parsers as add_fleet_parsers
    add_fleet_parsers(sub, p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .fleet_cli import run_remote, wants_remote
    if args.command not in ("events", "keys") and wants_remote(args):
        return run_remote(args)
    try:
        return args.func(args)
    except TimeoutError as e:
        print(f"xdom: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ManagementError as e:
        print(f"xdom: {e}", file=sys.stderr)
        return EXIT_ERROR
    except UntrustedPath as e:
        print(f"xdom: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
