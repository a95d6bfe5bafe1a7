"""``xdom list``: the broker's own list of its domains, as ``xl list`` prints the hypervisor's.

A module of its own because two command lines print it: ``xdom list`` (``deploy/cli.py``) and ``xdom ps``
on a host whose supervisor is gone (``deploy/watch_cli.py``); neither imports the other for it.
"""

from __future__ import annotations

import argparse
import json
import os

from xdom.broker.mgmt_client import ManagementClient, endpoint_for

__all__ = ["cmd_list"]


def _client(args: argparse.Namespace) -> ManagementClient:
    return ManagementClient(args.mgmt or endpoint_for(args.run_dir), timeout=args.timeout)


def _fmt_uptime(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s else "-"


def cmd_list(args: argparse.Namespace) -> int:
    if not args.mgmt:
        # the broker's socket is believed only in a run directory nobody else can write, as root's (or ours)
        from xdom.broker.pathtrust import check_file
        sock = os.path.join(args.run_dir, "mgmt.sock")
        try:
            check_file(sock, "socket", f"the broker's management socket {sock}")
        except FileNotFoundError:
            pass        # nothing there: the request times out and says so
    with _client(args) as c:
        domains = c.request("list")["domains"]
    if args.json:
        print(json.dumps(domains, indent=2))
        return os.EX_OK
    print(f"{'Name':<16} {'ID':>4} {'Mem(KiB)':>9} {'Used(KiB)':>9} {'State':<9} {'PID':>7} {'Uptime':>8} "
          f"{'Maps':>5} {'Granted':>7} {'Evtchn':>6} {'Restarts':>8}")
    for d in domains:
        print(f"{d['name']:<16} {d['domid']:>4} {d['memory_kib']:>9} {d['populated_kib']:>9} {d['state']:<9} "
              f"{d['pid'] or '-':>7} "
              f"{_fmt_uptime(d['uptime']):>8} {d['mappings_held']:>5} {d['grants_mapped_by_others']:>7} "
              f"{d['event_channels']:>6} {d['restarts']:>8}")
    return os.EX_OK
