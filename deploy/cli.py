"""The ``xdom`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Any, Sequence

from xdom.broker.mgmt_client import ManagementClient, ManagementError, endpoint_for

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def default_run_dir() -> str:
    if os.geteuid() == 0:
        return "/run/xdom"
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/xdom-{os.getuid()}", "xdom")


def cmd_broker(args: argparse.Namespace) -> int:
    from xdom.broker.server import BrokerServer, check_isolation
    check_isolation()
    server = BrokerServer(args.run_dir, args.mgmt, args.events)

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


def _client(args: argparse.Namespace) -> ManagementClient:
    return ManagementClient(args.mgmt or endpoint_for(args.run_dir), timeout=args.timeout)


def _fmt_uptime(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s else "-"


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        domains = c.request("list")["domains"]
    if args.json:
        print(json.dumps(domains, indent=2))
        return EXIT_OK
    print(f"{'Name':<16} {'ID':>4} {'Mem(KiB)':>9} {'State':<9} {'PID':>7} {'Uptime':>8} "
          f"{'Maps':>5} {'Granted':>7} {'Evtchn':>6} {'Restarts':>8}")
    for d in domains:
        print(f"{d['name']:<16} {d['domid']:>4} {d['memory_kib']:>9} {d['state']:<9} {d['pid'] or '-':>7} "
              f"{_fmt_uptime(d['uptime']):>8} {d['mappings_held']:>5} {d['grants_mapped_by_others']:>7} "
              f"{d['event_channels']:>6} {d['restarts']:>8}")
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
    b.set_defaults(func=cmd_broker)

    for name in ("list", "ps"):
        sp = sub.add_parser(name, help="show the domain table")
        common(sp)
        sp.add_argument("--json", action="store_true")
        sp.add_argument("--timeout", type=float, default=5.0)
        sp.set_defaults(func=cmd_list)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except TimeoutError as e:
        print(f"xdom: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ManagementError as e:
        print(f"xdom: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
