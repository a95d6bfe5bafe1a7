"""``xdom up/down/ps/top/logs/console/restart/destroy/block-*/network-*``: the command line of the supervisor.

This module builds the commands' parsers (:func:`add_parsers`) and turns a
:class:`~xdom.deploy.supervisor_client.CommandError` into its message and
exit status.  The commands themselves are grouped by what they act on:
starting and stopping a host (:mod:`xdom.deploy.host_cli`), watching it
(:mod:`xdom.deploy.watch_cli`: ps, top, logs, console), acting on one of its
domains (:mod:`xdom.deploy.domain_cli`: restart, destroy, the block and
network devices).  How they find a host and ask its supervisor, and the exit
statuses scripts can rely on, are :mod:`xdom.deploy.supervisor_client`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from .domain_cli import (
    cmd_block_attach,
    cmd_block_detach,
    cmd_block_list,
    cmd_destroy,
    cmd_network_attach,
    cmd_network_detach,
    cmd_network_list,
    cmd_restart,
)
from .host_cli import cmd_down, cmd_up
from .rundir import UntrustedPath
from .supervisor_client import EXIT_ERROR, CommandError
from .watch_cli import cmd_console, cmd_logs, cmd_ps, cmd_top

# The supervisor, the topology parser and psutil are imported by the commands
# that need them: every `xdom broker` and `xdom xenstored` builds this parser.
UID_MODES = ("auto", "separate", "shared")

__all__ = ["UID_MODES", "add_parsers"]


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
