#!/usr/bin/env python3
"""xdom xenstored benchmark: operations per second over the unix socket, beside Xen's C xenstored.

    python benchmarks/bench_xenstored.py           # full run (about three minutes)
    python benchmarks/bench_xenstored.py --quick   # short run (under a minute), to check that it works

This file holds the rows, the run and the report; xsbench_client.py the
requests and the client processes, xsbench_servers.py the servers under
test, xsbench_workloads.py the stores and bring-ups, xsbench_echo.py the
ECHO floor.

Rows (raw xs_wire messages over a unix socket, each client its own process,
every reply checked):

* XS_READ       ``/bench/c0/k``: 1 and 8 clients (synchronous), and 1 client
                keeping 16 requests outstanding (pipelined, as a busy ring does)
* XS_WRITE      ``/bench/cN/k`` = ``value`` (client N writes its own node): 1 and 8 clients
* XS_DIRECTORY  ``/bench/dir`` (a node with 20 children): 1 and 8 clients
* transaction   TRANSACTION_START, 10 WRITEs of ``/bench/cN/tx/0..9``, TRANSACTION_END "T"
                (counted as transactions/s; client N has its own subtree, so no conflicts)
* scale         a store grown by 10,000 nodes (``/scale/gKK/nJJ``, 100 x 100) with 100
                watchers (100 connections of one watcher process, each watching one
                ``/scale/gKK``): READ and WRITE of random nodes by 8 clients; every write
                fires one watch event, and the watch events delivered per second are
                counted by the watcher process
* bring-up      N guests' worth of toolstack traffic (INTRODUCE, the libxl-style home
                written in one transaction, a disk's and a vif's backend and frontend
                directories and their state changes 1..4) from one client; each guest's
                frontend and the backends watch their directories: the CPU xenstored
                burns per guest

Servers, all started before the first measurement and measured interleaved
(rotating order), so that drift hits them alike:

* REF    Xen 4.17's C xenstored on a unix socket.  Debian's xen-utils-4.17
         carries it, but it cannot start without a hypervisor (it opens
         privcmd first), so the benchmark runs it only through a launcher:
         ``--ref-xenstored CMD`` or ``XDOM_REF_XENSTORED`` (CMD gets the socket
         path as its last argument and must exec xenstored in the foreground,
         e.g. a wrapper that fakes the hypervisor calls with LD_PRELOAD).
         Without one the reference is reported missing and ratios fall back
         to ECHO.
* OURS   ``python -m xdom.deploy.cli xenstored --unix-socket ...`` (store in memory)
* OURS   the same with ``--state-dir`` (what a restart needs is on disk before
         the replies leave), and for the WRITE and transaction rows also
         ``python -m xdom.backends.xenstored ... --state-dir ... --fsync`` (on
         stable storage before the replies leave), where this xdom has it
* ECHO   a trivial Python unix-socket server with xenstored's loop shape,
         echoing each framed message: the floor of a Python server of this kind

Each measurement runs for a fixed time after a warm-up; the clients of one
measurement share the same window (CLOCK_MONOTONIC deadlines).  ops/s is the
sum over clients.  CPU us/op is the server process's CPU time (all its
threads, from /proc/PID/task/*/schedstat) during the window divided by the
operations completed in it, so a change that only moves cost shows.  An
unexpected reply stops the run: figures from a broken run are worthless.
Nothing is pinned and nothing is asserted about timings.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from xsbench_client import (
    DIR_CHILDREN,
    MAX_CLIENTS,
    SCALE_GROUPS,
    SCALE_PER_GROUP,
    TX_WRITES,
    BenchError,
    watcher_main,
    worker_main,
    xs_wire,
)
from xsbench_servers import READY_TIMEOUT, Server, cpu_ns, find_reference, start_server
from xsbench_workloads import bringup, host_bringup, set_up_scale, set_up_store

PIPELINE_DEPTH = 16
RESULT_SLACK = 30.0        # seconds past its window a measurement may take before we call it hung


class Pool:
    """MAX_CLIENTS worker processes, forked once, each fed measurements over a pipe."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self.pipes = []
        self.procs = []
        for i in range(MAX_CLIENTS):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(child, i), name=f"bench-client-{i}", daemon=True)
            p.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(p)

    def measure(self, server: Server, op: str, nclients: int, depth: int, warmup: float, duration: float,
                expected: dict[str, Any], watcher: Watcher | None = None) -> dict[str, Any]:
        t_start = time.monotonic() + warmup
        t_end = t_start + duration
        cmd = {"path": server.sock_path, "kind": server.name if server.name == "echo" else "xs", "op": op,
               "depth": depth, "t_start": t_start, "t_end": t_end, "expected": expected}
        for pipe in self.pipes[:nclients]:
            pipe.send(cmd)
        time.sleep(max(0.0, t_start - time.monotonic()))
        cpu0 = cpu_ns(server.pid)
        ev0 = watcher.count(server.name) if watcher else 0
        time.sleep(max(0.0, t_end - time.monotonic()))
        cpu1 = cpu_ns(server.pid)
        results, errors = [], []
        for i, pipe in enumerate(self.pipes[:nclients]):
            left = t_end + RESULT_SLACK - time.monotonic()
            if not pipe.poll(max(0.0, left)):
                server.check_alive()
                raise BenchError(f"{server.name}: client {i} got no reply for {RESULT_SLACK:.0f} s past the end of "
                                 f"its window ({op}, {nclients} clients): server hung?\n{server.log_tail()}")
            status, res = pipe.recv()
            (results if status == "ok" else errors).append(res)
        if errors:
            server.check_alive()
            raise BenchError(f"{server.name}, {op}, {nclients} client(s): " + "; ".join(errors))
        server.check_alive()
        ev1 = watcher.count(server.name) if watcher else 0
        ops = sum(r["ops"] for r in results)
        elapsed = max(r["elapsed"] for r in results)
        return {
            "ops": ops,
            "ops_per_s": sum(r["ops"] / r["elapsed"] for r in results),
            "cpu_us_per_op": (cpu1 - cpu0) / 1e3 / ops if ops else 0.0,
            "cpu_share": (cpu1 - cpu0) / 1e9 / duration,
            "events_per_s": (ev1 - ev0) / elapsed if watcher else None,
            "late_clients": sum(r["late"] for r in results),
        }

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(2)
            if p.is_alive():
                p.terminate()
                p.join(2)
        for pipe in self.pipes:
            pipe.close()


class Watcher:
    """The watcher process of the scale rows."""

    def __init__(self, sock_paths: dict[str, str]) -> None:
        ctx = multiprocessing.get_context("fork")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=watcher_main, args=(child, sock_paths), name="bench-watcher", daemon=True)
        self.proc.start()
        child.close()
        self._expect("ready")

    def _expect(self, what: str) -> Any:
        if not self.pipe.poll(READY_TIMEOUT):
            raise BenchError(f"the watcher process did not answer ({what})")
        status, res = self.pipe.recv()
        if status != "ok":
            raise BenchError(res)
        return res

    def count(self, name: str) -> int:
        self.pipe.send("count")
        return self._expect("count")[name]

    def close(self) -> None:
        try:
            self.pipe.send(None)
        except OSError:
            pass
        self.proc.join(2)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(2)


# ---- the rows


ROWS = (   # key, label, op, clients, outstanding per client, scale row
    ("read1", "XS_READ", "read", 1, 1, False),
    ("read8", "XS_READ", "read", 8, 1, False),
    ("read_p16", f"XS_READ, {PIPELINE_DEPTH} outstanding", "read", 1, PIPELINE_DEPTH, False),
    ("write1", "XS_WRITE", "write", 1, 1, False),
    ("write8", "XS_WRITE", "write", 8, 1, False),
    ("dir1", f"XS_DIRECTORY ({DIR_CHILDREN})", "directory", 1, 1, False),
    ("dir8", f"XS_DIRECTORY ({DIR_CHILDREN})", "directory", 8, 1, False),
    ("tx1", f"transaction ({TX_WRITES} writes)", "tx", 1, 1, False),
    ("tx8", f"transaction ({TX_WRITES} writes)", "tx", 8, 1, False),
    ("sread8", "10k nodes: XS_READ random", "sread", 8, 1, True),
    ("swrite1", "10k nodes+100 watchers: WRITE", "swrite", 1, 1, True),
    ("swrite8", "10k nodes+100 watchers: WRITE", "swrite", 8, 1, True),
)
DURABLE_OPS = ("write", "tx", "swrite")
LABEL = {"echo": "ECHO floor", "ref": "REF C xenstored", "xs": "OURS in memory", "xs_state": "OURS --state-dir",
         "xs_fsync": "OURS --state-dir --fsync"}


def servers_for(op: str, available: list[str]) -> list[str]:
    return [k for k in available if k != "xs_fsync" or op in DURABLE_OPS]


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one server and row: the median round's rate and CPU, plus the spread."""
    def median(xs: list[float]) -> float:
        xs = sorted(xs)
        n = len(xs)
        return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    rates = [r["ops_per_s"] for r in rounds]
    mid = median(rates)
    ev = [r["events_per_s"] for r in rounds if r["events_per_s"] is not None]
    return {
        "ops_per_s": mid,
        "cpu_us_per_op": median([r["cpu_us_per_op"] for r in rounds]),
        "cpu_share": median([r["cpu_share"] for r in rounds]),
        "events_per_s": median(ev) if ev else None,
        "round_ops_per_s": rates,
        "spread": (max(rates) - min(rates)) / mid if mid else 0.0,
        "late_clients": sum(r["late_clients"] for r in rounds),
    }


def fs_type(path: str) -> str:
    """The file system holding ``path`` (from /proc/mounts), for the report."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3:
                    mnt = fields[1].replace("\\040", " ")
                    if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                        best, kind = mnt, fields[2]
    except OSError:
        pass
    return f"{kind} on {best or '?'}"


def scan_log(path: str) -> int:
    """Warning/error lines, less our standalone xenstored's notes on rings it cannot map (bring-up)."""
    try:
        with open(path, errors="replace") as f:
            return sum(1 for line in f if (" WARNING " in line or " ERROR " in line or "Traceback" in line)
                       and "cannot map the ring" not in line)
    except OSError:
        return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        warmup, duration, n_rounds, guests = 0.2, 0.6, 1, (16,)
    else:
        warmup, duration, n_rounds, guests = 0.3, 2.0, 4, (16, 100)
    if args.duration is not None:
        duration = args.duration
    if args.rounds is not None:
        n_rounds = max(1, args.rounds)
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="xsb-", dir="/tmp")       # short: unix socket paths max 108 bytes
    ref_argv, ref_source = find_reference(args)
    available = ["echo"] + (["ref"] if ref_argv else []) + ["xs", "xs_state", "xs_fsync"]
    servers: dict[str, Server] = {}
    pool: Pool | None = None
    watcher: Watcher | None = None
    res: dict[str, Any] = {"warmup": warmup, "duration": duration, "rounds": n_rounds, "results": {},
                           "bringup": {}, "loadavg_before": os.getloadavg(), "ref_source": ref_source,
                           "servers": available}
    try:
        pool = Pool()      # fork the clients before anything else exists
        print(f"starting {', '.join(LABEL[k] for k in available)} ...", file=sys.stderr, flush=True)
        for kind in available:
            servers[kind] = start_server(kind, tmp, ref_argv)
        for s in servers.values():
            s.wait_ready()
        stores = [k for k in available if k != "echo"]
        expected: dict[str, dict[str, Any]] = {"echo": {}}
        for kind in stores:
            expected[kind] = set_up_store(servers[kind].sock_path)
        res["state_fs"] = fs_type(tmp)

        def measure_row(key: str, op: str, n: int, depth: int) -> None:
            kinds = servers_for(op, available)
            rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
            for r in range(n_rounds):
                order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]   # no server always first
                for kind in order:
                    rounds[kind].append(pool.measure(servers[kind], op, n, depth, warmup, duration / n_rounds,
                                                     expected[kind], watcher if kind != "echo" else None))
            res["results"][key] = {k: combine(v) for k, v in rounds.items()}

        only = set(args.only.split(",")) if args.only else None
        rows = [row for row in ROWS if only is None or row[0] in only]
        plain = [row for row in rows if not row[5]]
        for i, (key, label, op, n, depth, _) in enumerate(plain, 1):
            print(f"{i}/{len(ROWS)} {label}, {n} client(s) ...", file=sys.stderr, flush=True)
            measure_row(key, op, n, depth)

        for kind in (stores if only is None or "bringup" in only else []):
            print(f"bring-up of {guests[-1]} guests on {LABEL[kind]} ...", file=sys.stderr, flush=True)
            s = servers[kind]
            out = res["bringup"][kind] = {}
            cpu0, w0, first = cpu_ns(s.pid), time.monotonic(), 1
            for n in guests:
                bringup(s.sock_path, range(first, n + 1))
                first = n + 1
                out[str(n)] = {"cpu_s": (cpu_ns(s.pid) - cpu0) / 1e9, "wall_s": time.monotonic() - w0}
            s.check_alive()

        scale = [row for row in rows if row[5]]
        if scale:
            print(f"growing the stores by {SCALE_GROUPS * SCALE_PER_GROUP:,} nodes, {SCALE_GROUPS} watchers each ...",
                  file=sys.stderr, flush=True)
            for kind in stores:
                set_up_scale(servers[kind].sock_path)
            watcher = Watcher({k: servers[k].sock_path for k in stores})
        for i, (key, label, op, n, depth, _) in enumerate(scale, len(plain) + 1):
            print(f"{i}/{len(ROWS)} {label}, {n} client(s) ...", file=sys.stderr, flush=True)
            measure_row(key, op, n, depth)
        for n in args.host_guests:
            print(f"xdom up of {n} guests (a real host) ...", file=sys.stderr, flush=True)
            try:
                res.setdefault("host", {})[str(n)] = host_bringup(n, tmp)
            except (BenchError, OSError, subprocess.TimeoutExpired) as e:      # the other rows still stand
                res.setdefault("host", {})[str(n)] = {"error": str(e)[-600:]}
        res["state_files"] = {}
        for kind in ("xs_state", "xs_fsync"):
            if kind in servers and servers[kind].state_dir:
                d = servers[kind].state_dir
                res["state_files"][kind] = {f: os.path.getsize(os.path.join(d, f)) for f in sorted(os.listdir(d))}
    finally:
        if watcher is not None:
            watcher.close()
        if pool is not None:
            pool.close()
        for s in servers.values():
            s.stop()
        warnings = {s.name: scan_log(s.log_path) for s in servers.values()}
        res["log_warnings"] = {k: v for k, v in warnings.items() if v}
        if args.keep_logs:
            print(f"server logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    res["wall"] = time.monotonic() - t0
    res["loadavg_after"] = os.getloadavg()
    return res


def report(res: dict[str, Any], args: argparse.Namespace) -> None:
    width = 150
    line = "=" * width
    have = res["servers"]
    has_ref = "ref" in have
    print()
    print(line)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n_rounds = res["rounds"]
    print(f"xdom xenstored benchmark ({'quick' if args.quick else 'full'} run: {res['duration']:g} s per server "
          f"and row" + (f" in {n_rounds} interleaved rounds (median shown)" if n_rounds > 1 else "")
          + f", each after {res['warmup']:g} s warm-up)")
    print(f"{cpus} CPUs usable, nothing pinned; load average {res['loadavg_before'][0]:.2f} before, "
          f"{res['loadavg_after'][0]:.2f} after; Python {sys.version.split()[0]}; state on {res['state_fs']}")
    print(f"REF: {res['ref_source']}")
    print(line)
    ref_name = "ref" if has_ref else "echo"
    hdr = (f"{'operation':<31} {'cl':>3} | {'REF C xenstored':>22} | {'OURS in memory':>31} | "
           f"{'OURS --state-dir':>31} | {'--fsync':>17} | {'ECHO':>8}")
    print(hdr)
    print(f"{'':<31} {'':>3} | {'ops/s':>10} {'cpu us/op':>11} | {'ops/s':>10} {'cpu us/op':>10} "
          f"{'/' + ('REF' if has_ref else 'ECHO'):>9} | {'ops/s':>10} {'cpu us/op':>10} {'/memory':>9} | "
          f"{'ops/s':>8} {'/memory':>8} | {'ops/s':>8}")
    print("-" * width)
    for key, label, _op, n, _depth, _ in ROWS:
        row = res["results"].get(key)
        if not row:
            continue
        xs_ = row["xs"]
        ref = row.get("ref")
        st = row["xs_state"]
        fs = row.get("xs_fsync")
        base = row[ref_name]["ops_per_s"]
        cells = [f"{label:<31} {n:>3}",
                 (f"{ref['ops_per_s']:>10,.0f} {ref['cpu_us_per_op']:>11.1f}" if ref else f"{'missing':>22}"),
                 f"{xs_['ops_per_s']:>10,.0f} {xs_['cpu_us_per_op']:>10.1f} {xs_['ops_per_s'] / base:>8.2f}x",
                 f"{st['ops_per_s']:>10,.0f} {st['cpu_us_per_op']:>10.1f} {st['ops_per_s'] / xs_['ops_per_s']:>8.2f}x",
                 (f"{fs['ops_per_s']:>8,.0f} {fs['ops_per_s'] / xs_['ops_per_s']:>7.2f}x" if fs else f"{'':>17}"),
                 f"{row['echo']['ops_per_s']:>8,.0f}"]
        print(" | ".join(cells))
    print("-" * width)
    print("ops/s: operations completed per second, summed over the clients (transaction rows: whole transactions);"
          " cl: clients")
    print(f"(a '{PIPELINE_DEPTH} outstanding' row is one client keeping that many requests in flight).  cpu us/op: "
          "the server's CPU time in the window / operations.")
    print(f"/{'REF' if has_ref else 'ECHO'}: ours in memory against "
          f"{'the C xenstored' if has_ref else 'the echo floor (no C xenstored in this run)'}; /memory: ours with "
          "its state on disk against ours in memory, same run.")
    ev_rows = [(key, label, n) for key, label, op, n, _, _ in ROWS if op == "swrite" and key in res["results"]]
    if ev_rows:
        print("\nwatch events delivered per second (each write to /scale/gKK/.. fires the watcher of /scale/gKK):")
        for key, _label, n in ev_rows:
            row = res["results"][key]
            cells = []
            for k in ("ref", "xs", "xs_state", "xs_fsync"):
                if k in row and row[k]["events_per_s"] is not None:
                    r = row[k]
                    cells.append(f"{LABEL[k]} {r['events_per_s']:,.0f}/s ({r['events_per_s'] / r['ops_per_s']:.2f} "
                                 "per write)")
            print(f"  {n} client(s): " + "; ".join(cells))
    if res["bringup"]:
        print("\nbring-up (toolstack + backends + frontends over sockets; one disk and one vif per guest): "
              "xenstored CPU seconds, wall seconds")
        ns = sorted({int(n) for v in res["bringup"].values() for n in v})
        for k, v in res["bringup"].items():
            cells = [f"{n} guests: {v[str(n)]['cpu_s']:6.2f} s CPU ({v[str(n)]['cpu_s'] / n * 1e3:5.1f} ms/guest), "
                     f"{v[str(n)]['wall_s']:6.2f} s wall" for n in ns if str(n) in v]
            ratio = ""
            if "ref" in res["bringup"] and k != "ref":
                last = str(ns[-1])
                ratio = f"   CPU {v[last]['cpu_s'] / max(res['bringup']['ref'][last]['cpu_s'], 1e-9):.2f}x REF's"
            print(f"  {LABEL[k]:<26} " + "; ".join(cells) + ratio)
    if res.get("host"):
        print("\nxdom up of N process guests (xenstored, blkback, netback; one disk and one vif each): xenstored's "
              "CPU from its start to all guests ready (no reference: the supervisor runs only ours)")
        for n, h in res["host"].items():
            if "error" in h:
                print(f"  {n:>4} guests: failed: {h['error']}")
            else:
                print(f"  {n:>4} guests: xenstored {h['xenstored_cpu_s']:6.2f} s CPU, `xdom up` {h['up_wall_s']:6.1f} s wall")
    if res.get("state_files"):
        print("\nstate directories at the end: " + "; ".join(
            f"{LABEL[k]}: " + ", ".join(f"{f} {size:,} B" for f, size in files.items())
            for k, files in res["state_files"].items()))
    if n_rounds > 1:
        busy = [f"{LABEL[k]} {key} {r['spread'] * 100:.0f}%" for key, row in res["results"].items()
                for k, r in row.items() if r["spread"] > 0.25]
        if busy:
            print("\nround-to-round spread above 25% (the machine was busy or the server is erratic): "
                  + ", ".join(busy))
    late = sum(r["late_clients"] for row in res["results"].values() for r in row.values())
    if late:
        print(f"\nnote: {late} client run(s) were still connecting when their window opened (warm-up too short)")
    for name, warn in res.get("log_warnings", {}).items():
        print(f"\nnote: the {LABEL.get(name, name)} log has {warn} warning/error line(s)")
    print(f"\n(total wall time {res['wall']:.1f} s)")
    print(line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run to check the benchmark works")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds per server per row, over all rounds (default 2, quick 0.3)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds the duration is split into (default 4, quick 1); the median is shown")
    ap.add_argument("--ref-xenstored", metavar="CMD", default=None,
                    help="command running Xen's C xenstored in the foreground on the socket path appended to it "
                         "(default: $XDOM_REF_XENSTORED)")
    ap.add_argument("--only", metavar="ROWS", default=None,
                    help="comma-separated row keys to run (" + ",".join(r[0] for r in ROWS) + ",bringup)")
    ap.add_argument("--host-guests", metavar="N,N", default="",
                    help="also bring a real host up (xdom up --detach) with N process guests, for each N, and "
                         "report xenstored's CPU (slow: not in the default run)")
    ap.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temporary directory with the server logs")
    args = ap.parse_args()
    args.host_guests = [int(n) for n in args.host_guests.split(",") if n.strip()]
    try:
        xs_wire()
    except ImportError as e:
        print(f"bench_xenstored: cannot import xdom ({e}); run it with the project's venv python", file=sys.stderr)
        return 2
    try:
        res = run(args)
    except BenchError as e:
        print(f"\nbench_xenstored: run aborted, no figures: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench_xenstored: interrupted", file=sys.stderr)
        return 130
    report(res, args)
    if args.json:
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
