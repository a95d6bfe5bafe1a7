"""``xdom restart/destroy/block-*/network-*``: acting on one domain of a running host, as xl does.

Each command sends one request to the supervisor and then follows its
outcome by polling ``info`` with a deadline: a restart until the domain runs
again under a new generation, a destroy until it is gone, a VM guest's
hot-plugged disk or NIC until its VM has it (or has let go of it).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from .control import ControlError
from .supervisor_client import (
    EXIT_ERROR,
    EXIT_OK,
    CommandError,
    client,
    request,
    resolve_run_dir,
    say,
)

__all__ = ["VM_PLUG_WAIT", "cmd_block_attach", "cmd_block_detach", "cmd_block_list", "cmd_destroy",
           "cmd_network_attach", "cmd_network_detach", "cmd_network_list", "cmd_restart"]


def _wait_for(run_dir: str, name: str, timeout: float, done: Callable[[dict[str, Any]], str | None]) -> dict[str, Any]:
    """Poll ``info`` until ``done(row)`` says "ok" or gives an error text; CommandError on error or timeout."""
    deadline = time.monotonic() + timeout
    with client(run_dir, 10.0) as c:
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
    run_dir = resolve_run_dir(args)
    before = request(run_dir, args.timeout, "info", name=args.domain)["domain"]
    generation = request(run_dir, args.timeout, "restart", name=args.domain)["generation"]
    if args.no_wait:
        say(f"xdom: restarting {args.domain}")
        return EXIT_OK

    def done(row: dict[str, Any]) -> str | None:
        if row["generation"] > generation and row["state"] == "running":
            return "ok"
        if row["state_changes"] > before["state_changes"] and row["state"] in ("exited", "failed", "destroyed"):
            return f"{args.domain} did not restart: {row['state']}: {row['last_exit'] or ''}"
        return None
    row = _wait_for(run_dir, args.domain, args.wait, done)
    say(f"xdom: {args.domain} restarted (domid {row['domid']}, pid {row['pid']})")
    return EXIT_OK


def cmd_destroy(args: argparse.Namespace) -> int:
    run_dir = resolve_run_dir(args)
    request(run_dir, args.timeout, "destroy", name=args.domain)
    _wait_for(run_dir, args.domain, args.wait, lambda row: "ok" if row["state"] == "destroyed" else None)
    say(f"xdom: {args.domain} destroyed")
    return EXIT_OK


# ---- block devices -----------------------------------------------------------------

def cmd_block_attach(args: argparse.Namespace) -> int:
    run_dir = resolve_run_dir(args)
    r = request(run_dir, args.timeout, "block-attach", name=args.domain, disk=args.disk)
    if "vm" in r:               # a VM's disk: in the VM once its guest domain serves it (vm/supervised.py)
        say(f"xdom: {r['vdev']} (devid {r['devid']}) attached to {args.domain} on {r['backend']}; "
             + _follow_vm_plug(run_dir, args.domain, "disks", r["vm"], removing=False))
        return EXIT_OK
    say(f"xdom: {r['vdev']} (devid {r['devid']}) attached to {args.domain} on {r['backend']}; "
         f"NBD export nbd+unix:///?socket={r['export']}")
    return EXIT_OK


def cmd_block_detach(args: argparse.Namespace) -> int:
    run_dir = resolve_run_dir(args)
    r = request(run_dir, args.timeout, "block-detach", name=args.domain, vdev=args.vdev)
    if "vm" in r:
        _follow_vm_plug(run_dir, args.domain, "disks", r["vm"], removing=True)
        clean = _follow_detach(run_dir, args.domain, r["vdev"])
        say(f"xdom: {r['vdev']} detached from {args.domain} (removed from its VM, then from xenbus)" + unclean_detach(clean))
        return EXIT_OK
    clean = _follow_detach(run_dir, args.domain, r["vdev"]) if r.get("detaching") else r["clean"]
    say(f"xdom: {r['vdev']} detached from {args.domain}" + unclean_detach(clean))
    return EXIT_OK


DETACH_WAIT = 60.0      # seconds a detach is followed (the supervisor gives a backend DETACH_TIMEOUT to close)


def _follow_detach(run_dir: str, name: str, key: str) -> bool | None:
    """Wait until the supervisor is done detaching device ``key`` of ``name`` (its row's ``detaching``);
    whether the backend confirmed it closed (None: not known)."""
    row = _wait_for(run_dir, name, DETACH_WAIT, lambda row: detached_row(row, key))
    return (row.get("detached") or {}).get(key)


def detached_row(row: dict[str, Any], key: str) -> str | None:
    """For following a detach through ``info`` rows: "ok" once device ``key`` is no longer detaching."""
    return "ok" if key not in (row.get("detaching") or ()) else None


def unclean_detach(clean: bool | None) -> str:
    """What to add to "detached" when the backend did not confirm it closed."""
    return "" if clean or clean is None else " (the backend did not confirm it closed; its nodes were removed anyway)"


VM_PLUG_WAIT = 120.0    # seconds a VM device's hot-add (its guest domain connects first) or removal may take


def _follow_vm_plug(run_dir: str, name: str, key: str, vm: dict[str, Any], *, removing: bool) -> str:
    """Wait until a VM device's hot-plug step is done (``xdom ps``'s ``vm.disks``/``vm.nics`` rows); what
    the VM got, or CommandError with why not."""
    dev = vm.get("device")
    if vm.get("at_start"):
        return f"its VM is not running: it gets {dev} when it starts"
    deadline = time.monotonic() + VM_PLUG_WAIT
    with client(run_dir, 10.0) as c:
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
    run_dir = resolve_run_dir(args)
    row = request(run_dir, args.timeout, "info", name=args.domain)["domain"]
    disks = [d for d in row["devices"] if d["type"] == "vbd"]
    if args.json:
        say(json.dumps(disks, indent=2))
        return EXIT_OK
    say(f"{'Vdev':<6} {'DevId':>6} {'Backend':<10} {'Mode':<4} {'Target':<40} Export")
    for d in disks:
        say(f"{d['vdev']:<6} {d['devid']:>6} {d['backend'] or '-':<10} {d['mode']:<4} {d['target'] or '-':<40} "
             f"{d['export']}")
    return EXIT_OK


def cmd_network_attach(args: argparse.Namespace) -> int:
    run_dir = resolve_run_dir(args)
    r = request(run_dir, args.timeout, "network-attach", name=args.domain, vif=args.vif)
    if "vm" in r:
        say(f"xdom: vif {r['devid']} ({r['mac']}, {r['queues']} queue pair{'s' if r['queues'] > 1 else ''}) attached "
             f"to {args.domain} on {r['backend']}; " + _follow_vm_plug(run_dir, args.domain, "nics", r["vm"],
                                                                      removing=False))
        return EXIT_OK
    say(f"xdom: vif {r['devid']} ({r['mac']}) attached to {args.domain} on {r['backend']}: {r['ifname']}"
         + (f" {r['ip']}" if r["ip"] else "") + (f" in namespace {r['netns']}" if r["netns"] else "")
         + (f"; {r['backend']}'s side: {r['backend_tap']} on bridge {r['bridge']}" if r.get("backend_tap") else ""))
    return EXIT_OK


def cmd_network_detach(args: argparse.Namespace) -> int:
    run_dir = resolve_run_dir(args)
    r = request(run_dir, args.timeout, "network-detach", name=args.domain, vif=args.vif)
    if "vm" in r:
        _follow_vm_plug(run_dir, args.domain, "nics", r["vm"], removing=True)
        clean = _follow_detach(run_dir, args.domain, str(r["devid"]))
        say(f"xdom: vif {r['devid']} detached from {args.domain} (removed from its VM, then from xenbus)"
            + unclean_detach(clean))
        return EXIT_OK
    clean = _follow_detach(run_dir, args.domain, str(r["devid"])) if r.get("detaching") else r["clean"]
    say(f"xdom: vif {r['devid']} detached from {args.domain}" + unclean_detach(clean))
    return EXIT_OK


def cmd_network_list(args: argparse.Namespace) -> int:
    run_dir = resolve_run_dir(args)
    row = request(run_dir, args.timeout, "info", name=args.domain)["domain"]
    vifs = [d for d in row["devices"] if d["type"] == "vif"]
    if args.json:
        say(json.dumps(vifs, indent=2))
        return EXIT_OK
    say(f"{'Idx':>3} {'Iface':<6} {'MAC':<18} {'Backend':<10} {'MTU':>5} IP   (namespace {row['netns'] or '-'})")
    for d in vifs:
        say(f"{d['devid']:>3} {d['ifname']:<6} {d['mac']:<18} {d['backend'] or '-':<10} {d['mtu']:>5} {d['ip'] or '-'}")
    return EXIT_OK
