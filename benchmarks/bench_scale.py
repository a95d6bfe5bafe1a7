#!/usr/bin/env python3
"""xdom scale benchmark: N guests on one blkback and one netback; bring-up time and 4 KiB random reads.

    python benchmarks/bench_scale.py                       # N = 1, 4, 8, 16, 32
    python benchmarks/bench_scale.py --guests 1,4,100 --seconds 5

For each N, one host (``xdom up --detach``): xenstored, blkback, netback on a Linux bridge and N
guests of 32 MiB, each with one disk (an image of its own, exported over NBD) and one vif, the
shape issue 14 measures.  Then:

* UP      the wall time of ``xdom up --detach`` (it returns when every domain is ready), the time
          each guest took from its start to ready as the supervisor logged it (first and last
          guest), and the CPU seconds xenstored, the broker and the supervisor spent bringing the
          host up.  The reference is the N = 1 host of the same run: S/GUEST is what each guest
          beyond the first added, (up(N) - up(1)) / (N - 1), constant across N when bring-up is
          linear.
* RANDREAD fio with one job per guest, all at once, on the guests' NBD exports: 4 KiB random reads
          at queue depth 4 per guest, time-based, after an untimed warm-up run on every export (the
          first seconds after a bring-up, or nbdkit's start, are not the steady state the goals are
          about).  The figures are the aggregate IOPS and the slowest and fastest guest.  The
          reference is the same fio on N nbdkit processes serving the same N images
          (``nbdkit file``), in the same run, warmed up the same way.

The goals (issue 14): bring-up linear in N and 100 guests up in under 30 s; aggregate IOPS that
does not fall as guests are added; the slowest guest within 2x of the fastest.  Nothing is
asserted: a host that does not come up, a fio error or anything left behind is reported (exit
status 1) and the figures are printed anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil
from steal import StealClock

from xdom.deploy import netns
from xdom.deploy.control import ControlClient, endpoint_for
from xdom.deploy.rundir import Layout

IMAGE_BYTES = 32 << 20
QD = 4
RAMP = 1.0                 # s: fio's ramp_time, not counted
WARMUP = 3.0               # s: an untimed fio run on every export first (as bench_blk.py does)
READY = re.compile(r"^(\S+ \S+) \S+ INFO (g\d+): guest domain \d+ ready \(pid \d+, ([\d.]+)s")

HEAD = """\
[host]
state_dir = "{state}"
run_dir = "{run}"

[[domain]]
name = "xs"
kind = "xenstored"

[[domain]]
name = "blk0"
kind = "blkback"

[[domain]]
name = "net0"
kind = "netback"
switch = "bridge"
"""

GUEST = """
[[domain]]
name = "g{i}"
kind = "guest"
memory = "32M"
disk = ["format=raw, vdev=xvda, access=ro, backend=blk0, export=nbd:xvda.sock, target=images/g{i}.img"]
vif = ["mac=00:16:3e:01:{hi:02x}:{lo:02x}, bridge=xdombr0, backend=net0, ip=10.79.{hi}.{lo}/16"]
"""


def say(*what: object) -> None:
    print(*what, file=sys.stderr, flush=True)


def xdom(*args: str, timeout: float = 900.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdom.deploy.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@dataclass
class Row:
    """What one N measured."""
    n: int
    up: float = float("nan")                     # s: xdom up --detach, start to return
    down: float = float("nan")                   # s: xdom down, start to return
    ready_first: float = float("nan")            # s: the first guest's start-to-ready
    ready_last: float = float("nan")             # s: the last guest's
    ready_span: float = float("nan")             # s: from the first guest ready to the last
    cpu: dict[str, float] = field(default_factory=dict)    # CPU seconds spent bringing the host up
    iops: list[float] = field(default_factory=list)        # per guest, through xdom
    ref_iops: list[float] = field(default_factory=list)    # per image, through nbdkit
    cpu_per_io: dict[str, float] = field(default_factory=dict)       # us per I/O, by process group, xdom
    ref_cpu_per_io: dict[str, float] = field(default_factory=dict)   # the same through nbdkit
    steal: float = float("nan")                  # %: the machine's steal time during the reads, xdom
    ref_steal: float = float("nan")              # the same, nbdkit
    problems: list[str] = field(default_factory=list)


def fio_randread(sockets: list[str], seconds: float, cwd: str,
                 watch: dict[str, list[int]]) -> tuple[list[float], dict[str, float], float, str]:
    """One fio job per NBD socket, all at once: each job's read IOPS, the CPU each group of ``watch``
    spent per I/O (microseconds; "fio" is added), the machine's steal time (%, steal.py), or the error.

    The CPU is taken over a window inside fio's measured period (after its ramp, before its end),
    so start-up and teardown count in neither the CPU nor the I/Os it is divided by."""
    argv = ["fio", "--ioengine=nbd", "--rw=randread", "--bs=4k", f"--iodepth={QD}", f"--size={IMAGE_BYTES}",
            "--time_based", f"--runtime={seconds:g}", f"--ramp_time={RAMP:g}", "--output-format=json"]
    for i, sock in enumerate(sockets):
        argv += [f"--name=j{i}", f"--uri=nbd+unix:///?socket={sock}"]
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    window = max(seconds - 1.0, 0.5)
    cpu: dict[str, float] = {}
    try:
        time.sleep(RAMP + 0.5)
        groups = {**watch, "fio": fio_pids(proc.pid)}
        before, t0 = cpu_of_groups(groups), time.monotonic()
        with StealClock() as steal:
            time.sleep(window)
        after, elapsed = cpu_of_groups(groups), time.monotonic() - t0
        cpu = {name: cpu_spent(before[name], after[name]) / elapsed for name in groups}
        out, err = proc.communicate(timeout=seconds + 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    try:
        jobs = json.loads(out[out.index("{"):])["jobs"]
    except (ValueError, KeyError):
        return [], {}, steal.percent, f"fio exit status {proc.returncode}, no report: {err.strip()[-300:]}"
    bad = [j["jobname"] for j in jobs if j.get("error")]
    if proc.returncode != 0 or bad:
        return [], {}, steal.percent, f"fio exit status {proc.returncode}, errors in {bad}: {err.strip()[-300:]}"
    iops = [float(j["read"]["iops"]) for j in jobs]
    total = sum(iops)
    return iops, {name: rate / total * 1e6 if total else float("nan") for name, rate in cpu.items()}, steal.percent, ""


def fio_pids(pid: int) -> list[int]:
    """fio and the job processes it forked."""
    try:
        parent = psutil.Process(pid)
        return [pid] + [c.pid for c in parent.children(recursive=True)]
    except psutil.Error:
        return [pid]


def cpu_of_groups(groups: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    """User + system seconds so far of each group's processes (all their threads), by pid."""
    out: dict[str, dict[int, float]] = {}
    for name, pids in groups.items():
        out[name] = {}
        for pid in pids:
            try:
                t = psutil.Process(pid).cpu_times()
                out[name][pid] = t.user + t.system
            except psutil.Error:
                pass
    return out


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two samples, over the processes alive at both (one that ended in between
    took its CPU time with it)."""
    return sum(after[pid] - before[pid] for pid in after.keys() & before.keys())


class Nbdkits:
    """``nbdkit file`` on each image, one process and unix socket each: the reference data path."""

    def __init__(self, images: list[str], sock_dir: str) -> None:
        self.sockets = [os.path.join(sock_dir, f"ref{i}.sock") for i in range(len(images))]
        self.procs = [subprocess.Popen(["nbdkit", "--foreground", "--readonly", "--unix", s, "file", img],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
                      for s, img in zip(self.sockets, images)]
        deadline = time.monotonic() + 30
        while not all(os.path.exists(s) for s in self.sockets):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                self.stop()
                raise RuntimeError("nbdkit did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            out[name] = float("nan")
    return out


def ready_times(log_path: str) -> tuple[list[float], list[float]]:
    """Per guest, from the supervisor's log: start-to-ready seconds and the wall time it said ready."""
    took, when = [], []
    with open(log_path, errors="replace") as f:
        for line in f:
            m = READY.match(line)
            if m:
                stamp = time.mktime(time.strptime(m.group(1)[:19], "%Y-%m-%d %H:%M:%S")) + int(m.group(1)[20:]) / 1e3
                took.append(float(m.group(3)))
                when.append(stamp)
    return took, when


def run_one(n: int, seconds: float, keep: bool) -> Row:
    base = tempfile.mkdtemp(prefix=f"xdb-scale{n}-")
    try:
        return measure(n, seconds, base)
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def measure(n: int, seconds: float, base: str) -> Row:
    """One host of N guests in ``base``: brought up, read from, stopped; then nbdkit on the same images."""
    row = Row(n)
    layout = Layout(os.path.join(base, "state"), os.path.join(base, "run"))
    topology = os.path.join(base, "scale.toml")
    images_dir = os.path.join(layout.state_dir, "images")
    os.makedirs(images_dir)
    images = []
    for i in range(1, n + 1):
        img = os.path.join(images_dir, f"g{i}.img")
        with open(img, "wb") as f:
            f.write(os.urandom(IMAGE_BYTES))
        images.append(img)
    with open(topology, "w") as f:
        f.write(HEAD.format(state=layout.state_dir, run=layout.run_dir))
        for i in range(1, n + 1):
            f.write(GUEST.format(i=i, hi=i >> 8, lo=i & 0xFF))
    started = False
    try:
        say(f"N = {n}: xdom up ({n} guests) in {base} ...")
        t0 = time.monotonic()
        started = True
        res = xdom("up", topology, "--detach", "--ready-timeout", "120")
        row.up = time.monotonic() - t0
        if res.returncode != 0:
            row.problems.append(f"xdom up failed (status {res.returncode}): {(res.stdout + res.stderr)[-600:]}")
            return row
        control = ControlClient(endpoint_for(layout.control_socket), timeout=30)
        try:
            ping = control.request("ping")
            rows = {r["name"]: r for r in control.request("ps")["domains"]}
        finally:
            control.close()
        row.cpu = cpu_of({"xenstored": rows["xs"]["pid"], "broker": ping["broker_pid"],
                          "supervisor": ping["pid"], "blkback": rows["blk0"]["pid"], "netback": rows["net0"]["pid"]})
        took, when = ready_times(os.path.join(layout.logs_dir, "supervisor.log"))
        if len(took) == n:
            row.ready_first, row.ready_last, row.ready_span = took[0], took[-1], when[-1] - when[0]
        exports = [rows[f"g{i}"]["devices"][0]["export"] for i in range(1, n + 1)]
        say(f"  up in {row.up:.1f} s; warm-up, then fio randread on {n} guests ...")
        _, _, _, err = fio_randread(exports, WARMUP, base, {})
        if err:
            row.problems.append(f"through xdom (warm-up): {err}")
        guests = [rows[f"g{i}"]["pid"] for i in range(1, n + 1)]
        others = [rows["xs"]["pid"], rows["net0"]["pid"], ping["broker_pid"], ping["pid"]]
        row.iops, row.cpu_per_io, row.steal, err = fio_randread(
            exports, seconds, base, {"guests": guests, "blkback": [rows["blk0"]["pid"]], "others": others})
        if err:
            row.problems.append(f"through xdom: {err}")
    finally:
        if started:
            t0 = time.monotonic()
            res = xdom("down", "--run-dir", layout.run_dir)
            row.down = time.monotonic() - t0
            if res.returncode not in (0, 3):
                row.problems.append(f"xdom down: status {res.returncode}: {res.stderr.strip()[-300:]}")
            if os.path.exists(layout.run_dir):
                row.problems.append(f"left behind: run directory {layout.run_dir}")
            row.problems += [f"left behind: namespace {ns}" for ns in netns.of_host(layout.run_dir)]
    say(f"  reference: nbdkit on the {n} images ...")
    kits = Nbdkits(images, base)
    try:
        _, _, _, err = fio_randread(kits.sockets, WARMUP, base, {})
        if err:
            row.problems.append(f"through nbdkit (warm-up): {err}")
        row.ref_iops, row.ref_cpu_per_io, row.ref_steal, err = fio_randread(kits.sockets, seconds, base,
                                                             {"nbdkit": [p.pid for p in kits.procs]})
        if err:
            row.problems.append(f"through nbdkit: {err}")
    finally:
        kits.stop()
    return row


def spread(iops: list[float]) -> str:
    if not iops:
        return "-"
    return f"{min(iops):7.0f} / {max(iops):7.0f}  {max(iops) / max(min(iops), 1):5.2f}x"


def report(rows: list[Row], seconds: float) -> None:
    one = next((r for r in rows if r.n == 1 and r.up == r.up), None)
    print("=" * 118)
    print(f"xdom scale benchmark: N guests (32 MiB, one disk, one vif) on one blkback and one netback, "
          f"{os.cpu_count()} CPUs; fio 4 KiB randread QD{QD} per guest for {seconds:g} s")
    print("=" * 118)
    print(f"{'N':>4} {'up (s)':>8} {'s/guest':>8} {'down (s)':>8} {'ready first/last (s)':>21} {'span (s)':>9} "
          f"{'xs/broker/sup CPU (s)':>22}   {'IOPS xdom':>10} {'nbdkit':>8} {'ratio':>6}   "
          f"{'per guest min / max, max/min':>30}")
    for r in rows:
        # the cost of each guest beyond the first: constant across N when bring-up is linear
        lin = f"{(r.up - one.up) / (r.n - 1):8.2f}" if one and r.n > 1 else f"{'-':>8}"
        cpu = "/".join(f"{r.cpu.get(k, float('nan')):.1f}" for k in ("xenstored", "broker", "supervisor"))
        agg, ref = sum(r.iops), sum(r.ref_iops)
        ratio = f"{agg / ref:5.2f}x" if r.iops and ref else "    -"
        print(f"{r.n:>4} {r.up:8.1f} {lin} {r.down:8.1f} {r.ready_first:10.2f} /{r.ready_last:9.2f} {r.ready_span:9.1f} "
              f"{cpu:>22}   {agg:10.0f} {ref:8.0f} {ratio:>6}   {spread(r.iops):>30}")
        print(f"{'':>4} {'':>8} {'':>8} {'':>8} {'':>21} {'':>9} {'':>22}   {'':>10} {'':>8} {'':>6}   "
              f"{'nbdkit: ' + spread(r.ref_iops):>30}")
    print("\nCPU per I/O during the reads (us; user + system of every process of the group, over a window "
          "inside fio's measured period):")
    print(f"{'N':>4} {'guests':>8} {'blkback':>8} {'others':>8} {'xdom':>8} {'fio':>8}   {'nbdkit':>8} {'fio':>8}   "
          f"{'xdom/nbdkit':>11}   {'steal xdom/nbdkit':>17}")
    for r in rows:
        c, rc = r.cpu_per_io, r.ref_cpu_per_io
        ours = sum(c.get(k, float("nan")) for k in ("guests", "blkback", "others"))
        ref = rc.get("nbdkit", float("nan"))
        print(f"{r.n:>4} {c.get('guests', float('nan')):8.1f} {c.get('blkback', float('nan')):8.1f} "
              f"{c.get('others', float('nan')):8.1f} {ours:8.1f} {c.get('fio', float('nan')):8.1f}   {ref:8.1f} "
              f"{rc.get('fio', float('nan')):8.1f}   {ours / ref if ref else float('nan'):10.2f}x   "
              f"{f'{r.steal:.0f}% / {r.ref_steal:.0f}%':>17}")
    print("(others: xenstored, netback, the broker and the supervisor; steal: the CPU time the hypervisor gave other")
    print(" guests during the reads (steal.py) -- tens of per cent: the neighbours were measured too)")
    print("goals (issue 14): up linear in N and 100 guests in under 30 s; aggregate IOPS not falling with N; "
          "slowest guest within 2x of the fastest")
    problems = [f"N = {r.n}: {p}" for r in rows for p in r.problems]
    for p in problems:
        print("PROBLEM", p)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", default="1,4,8,16,32", help="the Ns to run, comma-separated (default 1,4,8,16,32)")
    ap.add_argument("--seconds", type=float, default=8.0, help="fio's time-based runtime per N (default 8)")
    ap.add_argument("--keep", action="store_true", help="keep each N's temporary directory (logs)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        say("bench_scale needs root (a bridged netback, per-domain uids)")
        return 2
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            say(f"bench_scale needs {tool} (make sysdeps)")
            return 2
    rows = [run_one(int(n), args.seconds, args.keep) for n in args.guests.split(",")]
    report(rows, args.seconds)
    return 1 if any(r.problems for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
