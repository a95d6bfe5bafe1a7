#!/usr/bin/env python3
"""xdom VM disk benchmark: fio inside a QEMU VM on the xdom disk vs QEMU's own virtio-blk, same image file.

    python benchmarks/bench_vm_blk.py           # 256 MiB image, 10 s per fio job (~3 minutes under TCG)
    python benchmarks/bench_vm_blk.py --quick   # 64 MiB image, 3 s per job, to check that it works

One run, one random (written, not sparse) image file, one VM image (the
project's, with its fio layer: ``ensure_image(fio=True)``, 512 MiB of VM
memory), two VM boots:

* XDOM  the VM's disk is vhost-user-blk served by a guest domain process:
        VM virtio-blk -> vhost-user (the guest domain maps the VM's memory) -> one copy into
        blkfront's granted pages -> blkif ring -> blkback (sees only those pages) -> preadv/pwritev
* QEMU  the same VM with QEMU's own virtio-blk on the image file (``cache=writeback`` by default: the
        host page cache, as blkback's buffered I/O uses it; ``--cache none`` for O_DIRECT)

fio runs inside the VM on /dev/vda (libaio, O_DIRECT, one job, time based):
4 KiB random read at QD16, 1 MiB sequential read and write at QD4, each after
an untimed warm-up read.  The domains (broker, xenstored, blkback, guest) are
started by hand, as tests/test_vhost_user_blk_vm.py does.  The accelerator is TCG
unless ``--accel kvm`` (nested KVM on this machine fails mid-boot): the VM's
CPU emulation then dominates both columns, so the ratio says more than the
absolute figures.  Nothing is asserted about timings; a failed fio job or a
domain that dies stops the run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil

from xdom.deploy.launcher import start_broker, start_domain_process, start_xenstored_domain, stop_process
from xdom.deploy.vbd import VbdConfig, add_vbd
from xdom.deploy.vm.image import ensure_image
from xdom.deploy.vm.machine import RunningVm, boot_vm
from xdom.deploy.vm.qemu import VhostUserBlk, VmPaths, VmSpec, own_virtio_blk
from xdom.deploy.xsnodes import write_dom0_nodes, write_domain_nodes
from xdom.domains.xenstore import XenstoreClient

MiB, GiB = 1 << 20, 1 << 30
DEVID = 51712
# key, label, fio rw, block size, iodepth, the figure shown
TESTS = (("randread", "4 KiB random read, QD16 (IOPS)", "randread", "4k", 16, "iops"),
         ("seqread", "1 MiB sequential read, QD4 (MiB/s)", "read", "1m", 4, "mib_s"),
         ("seqwrite", "1 MiB sequential write, QD4 (MiB/s)", "write", "1m", 4, "mib_s"))
WAIT = 60.0


class BenchError(Exception):
    """The run is broken: its figures would mean nothing."""


def make_image(path: str, size: int) -> None:
    rnd = random.Random(0x5EED)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(rnd.randbytes(MiB))
        os.fsync(f.fileno())


def wait_for(pred: Any, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.02)


class XdomDisk:
    """broker, xenstored, blkback and a guest domain serving IMAGE as vhost-user-blk on ``sock``."""

    def __init__(self, tmp: str, image: str) -> None:
        self.tmp = tmp
        self.sock = os.path.join(tmp, "exports", "xvda.sock")
        os.makedirs(os.path.dirname(self.sock), mode=0o700)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.xs: XenstoreClient | None = None
        self.mgmt = None
        self.xenstored = None
        self.broker = start_broker(os.path.join(tmp, "broker"))
        try:
            self.mgmt = self.broker.client()
            self.xenstored = start_xenstored_domain(self.mgmt, os.path.join(tmp, "xs.sock"),
                                                    os.path.join(tmp, "xs-state"))
            self.xs = XenstoreClient.unix(self.xenstored.socket_path)
            write_dom0_nodes(self.xs)
            be = self._domain("blk0", "1M", [sys.executable, "-m", "xdom.backends.blkback"])
            g = self._domain("g1", "48M", [sys.executable, "-m", "xdom.domains.guest",
                                            f"--vhost-user-disk={DEVID}:{self.sock}"],
                             vbd=lambda domid: add_vbd(self.xs, VbdConfig(be, domid, DEVID, "xvda", image)))
            self.domids = {"blk0": be, "g1": g}
        except BaseException:
            self.close()
            raise

    def _domain(self, name: str, memory: str, argv: list[str], vbd: Any = None) -> int:
        assert self.mgmt is not None and self.xenstored is not None and self.xs is not None
        creds = self.mgmt.request("create", name=name, memory=memory)
        domid = int(creds["domid"])
        store = self.mgmt.request("setup_store", domid=domid, xenstore_domid=self.xenstored.domid)
        rfd, wfd = os.pipe()
        with open(os.path.join(self.tmp, f"{name}.log"), "ab") as log:
            proc = start_domain_process(creds, [*argv, "--ready-fd", str(wfd)], pass_fds=(wfd,), stdout=log,
                                        stderr=subprocess.STDOUT)
        os.close(wfd)
        self.procs[name] = proc
        try:
            wait_for(lambda: proc.poll() is not None
                     or self.mgmt.request("info", domid=domid)["domain"]["state"] == "running", f"{name} to start")
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with {proc.returncode}: {self.log_tail(name)}")
            write_domain_nodes(self.xs, domid, name, int(memory[:-1]) * 1024)
            self.xs.introduce(domid, int(store["gfn"]), int(store["port"]))
            if vbd is not None:
                vbd(domid)
            ready, _, _ = select.select([rfd], [], [], WAIT)
            if not (ready and os.read(rfd, 64)):
                raise BenchError(f"{name} did not get ready: {self.log_tail(name)}")
        finally:
            os.close(rfd)
        return domid

    def log_tail(self, name: str) -> str:
        with open(os.path.join(self.tmp, f"{name}.log"), errors="replace") as f:
            return f.read()[-2000:]

    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs.items()}

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise BenchError(f"{name} died ({p.returncode}): {self.log_tail(name)}")

    def close(self) -> None:
        for name in ("g1", "blk0"):
            if name in self.procs:
                stop_process(self.procs[name])
        if self.xs is not None:
            self.xs.close()
        if self.xenstored is not None:
            self.xenstored.stop()
        if self.mgmt is not None:
            self.mgmt.close()
        self.broker.stop()


def fio_in_vm(vm: RunningVm, name: str, rw: str, bs: str, qd: int, runtime: float, size: int) -> dict[str, float]:
    cmd = (f"fio --name={name} --filename=/dev/vda --ioengine=libaio --direct=1 --rw={rw} --bs={bs} "
           f"--iodepth={qd} --numjobs=1 --time_based --runtime={runtime:g} --size={size} --output-format=json")
    status, out = vm.run(cmd, timeout=runtime + 120)
    try:
        job = json.loads(out[out.index("{"):])["jobs"][0]
    except (ValueError, KeyError, IndexError):
        job = None
    if status != 0 or job is None or job.get("error"):
        raise BenchError(f"fio {name} in the VM failed (status {status}): {out.strip()[-800:]}")
    r, w = job["read"], job["write"]
    secs = max(r["runtime"], w["runtime"]) / 1e3
    moved = r["io_bytes"] + w["io_bytes"]
    return {"iops": r["iops"] + w["iops"], "mib_s": moved / MiB / secs, "bytes": moved}


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    return {name: sum(psutil.Process(pid).cpu_times()[:2]) for name, pid in pids.items()}   # user + system


def run_jobs(vm: RunningVm, args: argparse.Namespace, pids: dict[str, int]) -> dict[str, dict[str, Any]]:
    fio_in_vm(vm, "warmup", "read", "1m", 4, 1.0, args.size)
    out: dict[str, dict[str, Any]] = {}
    for key, label, rw, bs, qd, _ in TESTS:
        print(f"  {label} ...", file=sys.stderr, flush=True)
        before = cpu_seconds(pids)
        res = fio_in_vm(vm, key, rw, bs, qd, args.runtime, args.size)
        after = cpu_seconds(pids)
        gib = res["bytes"] / GiB
        res["cpu_per_gib"] = {n: (after[n] - before[n]) / gib if gib else float("nan") for n in pids}
        out[key] = res
    return out


def report(results: dict[str, dict[str, dict[str, Any]]], args: argparse.Namespace, wall: float,
           accel: str) -> None:
    line = "=" * 110
    print(f"\n{line}\nxdom VM disk benchmark ({'quick' if args.quick else 'full'} run; {args.size // MiB} MiB random "
          f"image; {args.runtime:g} s per fio job; fio in the VM: libaio, O_DIRECT, 1 job; accel {accel}; "
          f"QEMU cache={args.cache}; {os.cpu_count()} host CPUs)\n{line}")
    print(f"  {'test':<38} {'XDOM':>10} {'QEMU':>10} {'xdom/qemu':>10}   "
          f"{'CPU s/GiB: qemu':>15} {'g1':>6} {'blk0':>6} {'broker':>6} {'| qemu':>7}")
    for key, label, *_, fig in TESTS:
        x, q = results["xdom"][key], results["qemu"][key]
        xc, qc = x["cpu_per_gib"], q["cpu_per_gib"]
        fmt = "{:>10,.0f}" if fig == "iops" else "{:>10,.1f}"
        print(f"  {label:<38} {fmt.format(x[fig])} {fmt.format(q[fig])} {x[fig] / q[fig]:>9.3f}x   "
              f"{xc['qemu']:>15.2f} {xc['g1']:>6.2f} {xc['blk0']:>6.2f} {xc['broker']:>6.2f} {qc['qemu']:>7.2f}")
    print("  (CPU s/GiB: user+system seconds each process used during the job, per GiB fio moved; XDOM's\n"
          "   processes first, then QEMU's own with its virtio-blk)")
    print(f"\n(total wall time {wall:.1f} s)\n{line}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB image, 3 s per job: check that it works")
    ap.add_argument("--runtime", type=float, default=None, help="seconds per fio job (default 10, 3 with --quick)")
    ap.add_argument("--size", type=int, default=None, help="image size in MiB (default 256, 64 with --quick)")
    ap.add_argument("--cache", choices=("writeback", "none"), default="writeback",
                    help="QEMU's own virtio-blk: host page cache (as blkback) or O_DIRECT")
    ap.add_argument("--accel", choices=("tcg", "kvm", "auto"), default="tcg")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (image, logs)")
    args = ap.parse_args()
    args.runtime = args.runtime or (3.0 if args.quick else 10.0)
    args.size = (args.size or (64 if args.quick else 256)) * MiB
    if shutil.which("qemu-system-x86_64") is None:
        print("bench_vm_blk: qemu-system-x86_64 is not installed", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="xdb-vm-", dir="/tmp")
    os.chmod(tmp, 0o755)
    image = os.path.join(tmp, "disk.img")
    host: XdomDisk | None = None
    results: dict[str, dict[str, dict[str, Any]]] = {}
    accel = args.accel
    try:
        print("the VM image with fio ...", file=sys.stderr, flush=True)
        img = ensure_image(fio=True)
        print(f"writing a {args.size // MiB} MiB random image in {tmp} ...", file=sys.stderr, flush=True)
        make_image(image, args.size)
        memory = max(512, img.min_memory_mib)

        print("XDOM: broker, xenstored, blkback, guest domain (vhost-user-blk) ...", file=sys.stderr, flush=True)
        host = XdomDisk(tmp, image)
        spec = VmSpec(kernel=str(img.kernel), initrd=str(img.initrd), append=img.append(), memory=memory,
                      accel=args.accel, vhost_user_blk=[VhostUserBlk(host.sock)])
        with boot_vm(spec, VmPaths.in_dir(tmp, "xdom"), ready_timeout=120) as vm:
            accel = vm.accel
            print(f"  VM up in {vm.boot_seconds:.1f} s ({accel})", file=sys.stderr, flush=True)
            results["xdom"] = run_jobs(vm, args, {"qemu": vm.qemu.pid, **host.pids(),
                                                  "broker": host.broker.proc.pid})
        host.check_alive()
        host.close()
        host = None

        print(f"QEMU: its own virtio-blk on the same image (cache={args.cache}) ...", file=sys.stderr, flush=True)
        spec = VmSpec(kernel=str(img.kernel), initrd=str(img.initrd), append=img.append(), memory=memory,
                      accel=args.accel, extra_args=own_virtio_blk(image, cache=args.cache))
        with boot_vm(spec, VmPaths.in_dir(tmp, "qemu"), ready_timeout=120) as vm:
            print(f"  VM up in {vm.boot_seconds:.1f} s ({vm.accel})", file=sys.stderr, flush=True)
            results["qemu"] = run_jobs(vm, args, {"qemu": vm.qemu.pid})
        report(results, args, time.monotonic() - t0, accel)
        return 0
    except (BenchError, psutil.Error) as e:
        print(f"bench_vm_blk: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_vm_blk: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if host is not None:
            host.close()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
