#!/usr/bin/env python3
"""xdom block benchmark: fio through our PV block path, next to nbdkit serving the same image file.

    python benchmarks/bench_blk.py           # full run: 256 MiB image, 3 rounds of 4 s per fio job (~2 minutes)
    python benchmarks/bench_blk.py --quick   # 64 MiB image, 1 round of 3 s per job, to check that it works

One run brings up xenstored, a blkback domain "blk0" and a guest "g1" whose
disk is a random (written, not sparse) image with ``xdom up --detach``, and
``nbdkit file`` on the same image.  fio's nbd engine runs the same jobs (4 KiB
random read at QD16, 1 MiB sequential read and write at QD4; one job,
buffered, time based) against both:

* OURS  g1's export: fio -> guest NBD server -> blkfront -> ring + grants -> blkback -> preadv/pwritev
* REF   ``nbdkit --unix SOCK file IMAGE``: fio -> nbdkit -> pread/pwrite

The image is read into the page cache and each export gets an untimed fio
warm-up first; each test runs both back to back, alternating which goes
first, with the image fsync'ed before each job, in several rounds.  The
figures are each side's median over the rounds and the ratio of the medians;
beside it, the lowest and highest ratio of one round's pair (a machine whose
load changes mid-run shows there, instead of in one lucky or unlucky
figure).  CPU s/GiB is psutil's user+system time of the serving processes
(blk0, g1, broker; nbdkit) over the bytes fio moved, the median over the
rounds.  Nothing is asserted about timings; a failed fio job, a
domain restart or an export that never comes up stops the run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil
from steal import StealClock, steal_range

MiB, GiB = 1 << 20, 1 << 30
# key, label, fio rw, block size, iodepth, the figure shown
TESTS = (("randread", "4 KiB random read, QD16 (IOPS)", "randread", "4k", 16, "iops"),
         ("seqread", "1 MiB sequential read, QD4 (MiB/s)", "read", "1m", 4, "mib_s"),
         ("seqwrite", "1 MiB sequential write, QD4 (MiB/s)", "write", "1m", 4, "mib_s"))
TOPOLOGY = """\
[[domain]]
name = "xs"
kind = "xenstored"

[[domain]]
name = "blk0"
kind = "blkback"

[[domain]]
name = "g1"
kind = "guest"
memory = "64M"
disk = ["format=raw, vdev=xvda, access=rw, backend=blk0, export=nbd:g1-xvda.sock, target=IMAGE"]
"""


class BenchError(Exception):
    """The run is broken: its figures would mean nothing."""


def xdom(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdom.deploy.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def make_image(path: str, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
        os.fsync(f.fileno())


def wait_export(sock: str, what: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until an NBD handshake on ``sock`` succeeds (nbdinfo), or at least a connect (without nbdinfo)."""
    nbdinfo = shutil.which("nbdinfo")
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before serving")
        if os.path.exists(sock):
            if nbdinfo:
                if subprocess.run([nbdinfo, "--size", f"nbd+unix:///?socket={sock}"], capture_output=True,
                                  timeout=10).returncode == 0:
                    return
            else:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    if s.connect_ex(sock) == 0:
                        return
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: no NBD server on {sock} after {timeout:g}s")
        time.sleep(0.05)    # polling another process's socket, with a deadline


def fio(sock: str, name: str, rw: str, bs: str, qd: int, runtime: float, size: int) -> dict[str, float]:
    argv = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}", f"--rw={rw}",
            f"--bs={bs}", f"--iodepth={qd}", "--numjobs=1", "--direct=0", "--time_based", f"--runtime={runtime:g}",
            f"--size={size}", "--output-format=json"]
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + 120, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError(f"fio {name} on {sock}: still running {runtime + 120:g}s after it started") from None
    out = run.stdout
    try:
        job = json.loads(out[out.index("{"):])["jobs"][0]
    except (ValueError, KeyError, IndexError):
        job = None
    if run.returncode != 0 or job is None or job.get("error"):
        raise BenchError(f"fio {name} on {sock} failed: exit status {run.returncode}, job error "
                         f"{job.get('error') if job else '(no JSON output)'}\n  fio stderr: "
                         f"{run.stderr.strip()[-800:] or '(empty)'}"
                         + ("" if job else f"\n  fio stdout: {out.strip()[-400:] or '(empty)'}"))
    r, w = job["read"], job["write"]
    secs = max(r["runtime"], w["runtime"]) / 1e3
    moved = r["io_bytes"] + w["io_bytes"]
    return {"iops": r["iops"] + w["iops"], "mib_s": moved / MiB / secs, "bytes": moved}


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    return {name: sum(psutil.Process(pid).cpu_times()[:2]) for name, pid in pids.items()}   # user + system


def domains(run_dir: str) -> dict[str, dict[str, Any]]:
    ps = xdom("ps", "--json", "--run-dir", run_dir, timeout=30)
    if ps.returncode != 0:
        raise BenchError(f"xdom ps failed (status {ps.returncode}): {ps.stderr.strip()}")
    return {r["name"]: r for r in json.loads(ps.stdout)}


def broker_pid(run_dir: str) -> int | None:
    with open(os.path.join(run_dir, "supervisor.pid")) as f:
        sup = psutil.Process(int(f.read().split()[0]))
    return next((c.pid for c in sup.children() if "broker" in c.cmdline()), None)


def measure(sock: str, pids: dict[str, int], key: str, rw: str, bs: str, qd: int, args: argparse.Namespace,
            image: str) -> dict[str, Any]:
    with open(image, "rb") as f:
        os.fsync(f.fileno())     # earlier jobs' dirty pages go to disk now, not during this job
    before = cpu_seconds(pids)
    with StealClock() as steal:
        res = fio(sock, key, rw, bs, qd, args.runtime, args.size)
    after = cpu_seconds(pids)
    res["steal"] = steal.percent
    gib = res["bytes"] / GiB
    res["cpu_per_gib"] = {n: (after[n] - before[n]) / gib if gib else float("nan") for n in pids}
    return res


def summarise(rounds: list[dict[str, Any]], fig: str) -> dict[str, Any]:
    """One side's rounds of a test: the median figure, and the median CPU s/GiB of each process."""
    return {fig: statistics.median(r[fig] for r in rounds),
            "cpu_per_gib": {n: statistics.median(r["cpu_per_gib"][n] for r in rounds) for n in rounds[0]["cpu_per_gib"]}}


def report(results: dict[str, dict[str, list[dict[str, Any]]]], args: argparse.Namespace, wall: float) -> None:
    line = "=" * 118
    print(f"\n{line}\nxdom block benchmark ({'quick' if args.quick else 'full'} run; {args.size // MiB} MiB random "
          f"image; {args.rounds} round(s) of {args.runtime:g} s per fio job, medians; fio nbd engine, 1 job, buffered; "
          f"{os.cpu_count()} CPUs)\n{line}")
    print(f"  {'test':<38} {'OURS':>10} {'nbdkit':>10} {'ours/nbdkit':>12} {'rounds':>13}   "
          f"{'CPU s/GiB: blk0':>15} {'g1':>6} {'broker':>6} {'nbdkit':>7} {'steal':>8}")
    for key, label, *_, fig in TESTS:
        ours, ref = results[key]["ours"], results[key]["nbdkit"]
        o, n = summarise(ours, fig), summarise(ref, fig)
        oc, nc = o["cpu_per_gib"], n["cpu_per_gib"]
        paired = [a[fig] / b[fig] for a, b in zip(ours, ref)]
        fmt = "{:>10,.0f}" if fig == "iops" else "{:>10,.1f}"
        print(f"  {label:<38} {fmt.format(o[fig])} {fmt.format(n[fig])} {o[fig] / n[fig]:>11.3f}x "
              f"{f'{min(paired):.2f}-{max(paired):.2f}x':>13}   {oc['blk0']:>15.2f} {oc['g1']:>6.2f} "
              f"{oc.get('broker', float('nan')):>6.2f} {nc['nbdkit']:>7.2f} "
              f"{steal_range([r['steal'] for r in ours + ref]):>8}")
    print("  (ours/nbdkit: the ratio of the medians; rounds: the lowest and highest ratio of one round's pair;")
    print("   CPU s/GiB: user+system seconds the serving processes used during the job, per GiB fio moved;")
    print("   steal: the CPU time the hypervisor gave other guests during the row's jobs, lowest-highest:")
    print("   a row with tens of per cent measured the neighbours as much as xdom)")
    print(f"\n(total wall time {wall:.1f} s)\n{line}")


def scan_logs(state_dir: str) -> None:
    odd = []
    for path in sorted(glob.glob(os.path.join(state_dir, "logs", "*.log"))):
        with open(path, errors="replace") as f:
            odd += [f"  {os.path.basename(path)}: {ln.rstrip()[:200]}" for ln in f
                    if any(w in ln for w in (" ERROR ", " CRITICAL ", "Traceback", " WARNING "))]
    if odd:
        print(f"domain logs: {len(odd)} warning/error lines (first 12):", *odd[:12], sep="\n", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB image, 3 s per job: check that it works")
    ap.add_argument("--runtime", type=float, default=None, help="seconds per fio job (default 4, 3 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of every job on both (default 3, 1 with --quick)")
    ap.add_argument("--size", type=int, default=None, help="image size in MiB (default 256, 64 with --quick)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (image, logs)")
    args = ap.parse_args()
    args.runtime = args.runtime or (3.0 if args.quick else 4.0)
    args.rounds = max(1, args.rounds or (1 if args.quick else 3))
    args.size = (args.size or (64 if args.quick else 256)) * MiB
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            print(f"bench_blk: {tool} is not installed", file=sys.stderr)
            return 2

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="xdb-blk-", dir="/tmp")
    image, ref_sock = os.path.join(tmp, "disk.img"), os.path.join(tmp, "nbdkit.sock")
    state_dir, run_dir = os.path.join(tmp, "state"), os.path.join(tmp, "run")
    nbdkit: subprocess.Popen[bytes] | None = None
    started = False
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        print(f"writing a {args.size // MiB} MiB random image in {tmp} ...", file=sys.stderr, flush=True)
        make_image(image, args.size)
        topo = os.path.join(tmp, "bench.toml")
        with open(topo, "w") as f:
            f.write(TOPOLOGY.replace("IMAGE", image))
        print("xdom up (xenstored, blk0, g1) ...", file=sys.stderr, flush=True)
        started = True
        up = xdom("up", topo, "--detach", "--state-dir", state_dir, "--run-dir", run_dir)
        if up.returncode != 0:
            raise BenchError(f"xdom up failed (status {up.returncode}):\n{up.stdout}{up.stderr}")
        doms = domains(run_dir)
        ours_sock = doms["g1"]["devices"][0]["export"]
        ours_pids = {"blk0": doms["blk0"]["pid"], "g1": doms["g1"]["pid"]}
        bpid = broker_pid(run_dir)
        if bpid is not None:
            ours_pids["broker"] = bpid
        with open(os.path.join(tmp, "nbdkit.log"), "wb") as log:
            nbdkit = subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent", "--unix", ref_sock,
                                       "file", image], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        wait_export(ours_sock, "g1's export")
        wait_export(ref_sock, "nbdkit", proc=nbdkit)
        paths = {"ours": (ours_sock, ours_pids), "nbdkit": (ref_sock, {"nbdkit": nbdkit.pid})}

        print("warm-up: reading the image into the page cache, 1 s of fio on each export ...", file=sys.stderr,
              flush=True)
        with open(image, "rb") as f:
            while f.read(8 * MiB):
                pass
        for sock, _ in paths.values():
            fio(sock, "warmup", "read", "1m", 4, 1.0, args.size)

        for i, (key, label, rw, bs, qd, _) in enumerate(TESTS):
            results[key] = {"ours": [], "nbdkit": []}
            for r in range(args.rounds):
                order = ("ours", "nbdkit") if (i + r) % 2 == 0 else ("nbdkit", "ours")
                for who in order:
                    print(f"{label}, round {r + 1}/{args.rounds}: {who} ...", file=sys.stderr, flush=True)
                    sock, pids = paths[who]
                    results[key][who].append(measure(sock, pids, key, rw, bs, qd, args, image))

        after = domains(run_dir)
        for name in ("xs", "blk0", "g1"):
            if after[name]["restarts"] or after[name]["pid"] != doms[name]["pid"]:
                raise BenchError(f"domain {name} restarted during the run ({after[name]['last_exit']})")
        report(results, args, time.monotonic() - t0)
        return 0
    except (BenchError, psutil.Error) as e:
        print(f"bench_blk: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_blk: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # let the clean-up finish (children inherit this)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if nbdkit is not None:
            nbdkit.terminate()
            try:
                nbdkit.wait(10)
            except subprocess.TimeoutExpired:
                nbdkit.kill()
                nbdkit.wait()
        if started:
            down = xdom("down", "--run-dir", run_dir)
            if down.returncode not in (0, 3):
                print(f"bench_blk: xdom down failed (status {down.returncode}): {down.stderr.strip()}",
                      file=sys.stderr)
            scan_logs(state_dir)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
