#!/usr/bin/env python3
"""xdom VM network benchmark: VM-to-VM TCP through netback vs QEMU's own virtio-net on a Linux bridge.

    python benchmarks/bench_vm_net.py           # 64 MiB per transfer, 5 transfers per path (~1.5 minutes)
    python benchmarks/bench_vm_net.py --quick   # 16 MiB, 1 transfer per path, to check that it works

One run, one VM image (the project's: ``ensure_image()``), two VMs per path,
the same kernel command line, memory, vCPUs and accelerator (TCG unless
``--accel kvm``; nested KVM on this machine fails mid-boot):

* XDOM  each VM's NIC is vhost-user-net served by its guest domain process:
        VM virtio-net -> vhost-user (the guest domain maps the VM's memory) -> one copy into
        netfront's granted pages -> netif rings -> netback (built-in switch, sees only those pages)
        -> the other guest's rings -> one copy into the other VM's buffers
        (the domains are started by hand, as tests/test_vhost_user_net_vm.py does)
* QEMU  the same two VMs with QEMU's own virtio-net (``-netdev tap,vhost=off``) on TAPs in a Linux
        bridge, in a network namespace made for the run

The figure: busybox ``nc`` sends a file from tmpfs in VM 1 to ``nc -l`` in
VM 2 (to /dev/null); the time is busybox ``time``'s real time inside VM 1,
from connect to the receiver closing after the last byte.  The best and the
median of the transfers are reported, with the ratios XDOM/QEMU.  CPU s/GiB: user+system
time of the processes on the path (both QEMUs; for XDOM also netback and
the two guest domains) over the bytes moved.  Both paths run their NICs
without MSI-X (``virtio-net-pci.vectors=0``): QEMU 7.2 under TCG crashes on
a vhost-user-net device's MSI-X unmask, and the comparison must use the same
interrupt mode.  Under TCG the VMs' CPU emulation dominates both columns:
the ratio says more than the absolute figures.  Nothing is asserted about
timings; a failed transfer or a domain that dies stops the run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import psutil

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from test_vhost_user_net_vm import TCG_NET_ARGS, VmNet  # noqa: E402

from xdom.deploy.vm.console import Console  # noqa: E402
from xdom.deploy.vm.image import ensure_image  # noqa: E402
from xdom.deploy.vm.machine import RunningVm  # noqa: E402
from xdom.deploy.vm.qemu import QemuProcess, VmPaths, VmSpec, own_virtio_net, qemu_argv  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30


class BenchError(Exception):
    """The run is broken: its figures would mean nothing."""


def transfer(vm1: RunningVm, vm2: RunningVm, size_mib: int, port: int) -> float:
    """Send ``size_mib`` MiB from VM 1's tmpfs to VM 2 over TCP; the seconds it took, as VM 1 timed it."""
    vm2.check(f"(sleep 600 | nc -l -p {port} > /dev/null) >/dev/null 2>&1 &")
    out = vm1.run(f"time nc 10.78.0.2 {port} < /tmp/data", timeout=600)
    vm2.run("killall sleep")
    if out.status != 0:
        raise BenchError(f"nc in VM 1 failed ({out.status}): {out.output[-400:]}")
    m = re.search(r"real\s+(\d+)m\s*([\d.]+)s", out.output)
    if not m:
        raise BenchError(f"no time from busybox: {out.output[-400:]}")
    return int(m.group(1)) * 60 + float(m.group(2))


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            out[name] = 0.0
    return out


def measure(vm1: RunningVm, vm2: RunningVm, pids: dict[str, int], size_mib: int, runs: int) -> dict[str, Any]:
    vm1.check(f"dd if=/dev/urandom of=/tmp/data bs=1M count={size_mib} 2>/dev/null")
    vm1.check("ping -c 2 -W 5 10.78.0.2", timeout=60)       # ARP and the path warm
    transfer(vm1, vm2, 1, 4999)                              # and the TCP window: untimed
    before = cpu_seconds(pids)
    times = [transfer(vm1, vm2, size_mib, 5000 + i) for i in range(runs)]
    after = cpu_seconds(pids)
    moved = size_mib * MiB * runs
    cpu = {n: after[n] - before[n] for n in pids}
    best, median = min(times), sorted(times)[len(times) // 2]
    return {"mbit": size_mib * MiB * 8 / best / 1e6, "median": size_mib * MiB * 8 / median / 1e6, "times": times, "cpu_per_gib": sum(cpu.values()) / (moved / GiB),
            "cpu": {n: v / (moved / GiB) for n, v in cpu.items()}}


def ours(tmp: str, image: Any, size_mib: int, runs: int, accel: str) -> dict[str, Any]:
    run_dir = os.path.join(tmp, "xdom")
    os.makedirs(run_dir)
    os.chmod(run_dir, 0o755)
    print("XDOM: broker, xenstored, netback, two guest domains, two VMs on vhost-user-net ...", file=sys.stderr,
          flush=True)
    rig = VmNet(run_dir, accel=accel)
    try:
        rig.boot(image)
        vm1, vm2 = rig.vms
        pids = {"vm1": vm1.qemu.pid, "vm2": vm2.qemu.pid, **{n: p.pid for n, p in rig.procs.items()}}
        res = measure(vm1, vm2, pids, size_mib, runs)
        for name, proc in rig.procs.items():
            if proc.poll() is not None:
                raise BenchError(f"domain {name} died during the run:\n{rig.log(name)[-2000:]}")
        return res
    finally:
        rig.close()


def qemu_bridge(tmp: str, image: Any, size_mib: int, runs: int, accel: str) -> dict[str, Any]:
    ns = f"xvb{os.getpid()}"
    print(f"QEMU: two VMs with QEMU's virtio-net on TAPs in bridge br0 of namespace {ns} ...", file=sys.stderr,
          flush=True)
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    vms: list[RunningVm] = []
    try:
        for args in (["link", "add", "br0", "type", "bridge"], ["link", "set", "br0", "up"],
                     *[a for i in (1, 2) for a in (["tuntap", "add", f"tap{i}", "mode", "tap"],
                                                   ["link", "set", f"tap{i}", "master", "br0"],
                                                   ["link", "set", f"tap{i}", "up"])]):
            subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)
        results: dict[int, Any] = {}

        def one(i: int) -> None:
            mac = f"00:16:3e:00:02:{i:02x}"
            spec = VmSpec(kernel=str(image.kernel), initrd=str(image.initrd),
                          append=image.append(f"xdom.ip=10.78.0.{i}/24"), accel=accel, name=f"qvm{i}",
                          extra_args=[*(TCG_NET_ARGS if accel == "tcg" else []),
                                      *own_virtio_net(f"tap,ifname=tap{i},script=no,downscript=no,vhost=off", mac)])
            paths = VmPaths.in_dir(tmp, f"qvm{i}")
            try:
                results[i] = boot_in_netns(ns, spec, paths, accel)
            except BaseException as e:
                results[i] = e
        threads = [threading.Thread(target=one, args=(i,)) for i in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        vms = [r for _, r in sorted(results.items()) if isinstance(r, RunningVm)]
        for r in results.values():
            if isinstance(r, BaseException):
                raise r
        vm1, vm2 = vms
        return measure(vm1, vm2, {"vm1": vm1.qemu.pid, "vm2": vm2.qemu.pid}, size_mib, runs)
    finally:
        for vm in vms:
            vm.stop()
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)


def boot_in_netns(ns: str, spec: VmSpec, paths: VmPaths, accel: str) -> RunningVm:
    """``machine.boot_vm`` for a QEMU started inside network namespace ``ns`` (where its TAP is)."""
    argv = ["ip", "netns", "exec", ns, *qemu_argv(spec, paths, accel)]      # -global: no MSI-X, as for ours
    q = QemuProcess(argv, paths, accel, "asked for")
    try:
        q.wait_socket(paths.console)
        con = Console(paths.console)
        try:
            con.wait_ready(120)
        except BaseException:
            con.close()
            raise
    except BaseException as e:
        q.stop()
        e.add_note(f"QEMU said: {q.log_text().strip()[-2000:]}")
        raise
    return RunningVm(q, con, time.monotonic() - q.started)


def report(res: dict[str, dict[str, Any]], size_mib: int, runs: int, accel: str, wall: float) -> None:
    line = "=" * 110
    print(line)
    print(f"xdom VM network benchmark: VM -> VM TCP (busybox nc, {size_mib} MiB x {runs}), "
          f"accel {accel}, {os.cpu_count()} CPUs")
    print(line)
    print(f"  {'path':<52} {'Mbit/s':>8} {'median':>8} {'runs (s)':>30} {'CPU s/GiB':>10}")
    names = {"xdom": "XDOM  vhost-user-net / netfront / netback (builtin)",
             "qemu": "QEMU  virtio-net, tap (vhost=off), Linux bridge"}
    for key in ("xdom", "qemu"):
        r = res[key]
        runs_s = " ".join(f"{t:.2f}" for t in r["times"])
        print(f"  {names[key]:<52} {r['mbit']:>8.1f} {r['median']:>8.1f} {runs_s:>30} {r['cpu_per_gib']:>10.1f}")
    print(f"  XDOM/QEMU throughput ratio: {res['xdom']['mbit'] / res['qemu']['mbit']:.3f}x (best), "
          f"{res['xdom']['median'] / res['qemu']['median']:.3f}x (median)")
    for key in ("xdom", "qemu"):
        by = ", ".join(f"{n} {v:.1f}" for n, v in res[key]["cpu"].items())
        print(f"  {key.upper()} CPU s/GiB by process: {by}")
    print(f"  (time measured inside VM 1 by busybox time; NICs without MSI-X on both paths; total wall time "
          f"{wall:.0f} s)")
    print(line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 MiB, one transfer per path: check that it works")
    ap.add_argument("--size", type=int, default=None, help="MiB per transfer (default 64, 16 with --quick)")
    ap.add_argument("--runs", type=int, default=None, help="transfers per path (default 5, 1 with --quick)")
    ap.add_argument("--accel", default="tcg", choices=("tcg", "kvm"), help="the VMs' accelerator (default tcg)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args()
    size = args.size or (16 if args.quick else 64)
    runs = args.runs or (1 if args.quick else 5)
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("qemu-system-x86_64"):
        print("bench_vm_net: needs root, iproute2 and qemu-system-x86_64", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="xvn-", dir="/tmp")
    os.chmod(tmp, 0o755)
    try:
        image = ensure_image()
        res = {"xdom": ours(tmp, image, size, runs, args.accel),
               "qemu": qemu_bridge(tmp, image, size, runs, args.accel)}
        report(res, size, runs, args.accel, time.monotonic() - t0)
        return 0
    except (BenchError, psutil.Error, OSError, subprocess.SubprocessError, AssertionError) as e:
        print(f"bench_vm_net: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_vm_net: interrupted; cleaned up", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
