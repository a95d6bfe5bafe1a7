#!/usr/bin/env python3
"""xdom network benchmark: iperf3 through our PV network path, next to a veth pair and Python TAP forwarders.

    python benchmarks/bench_net.py           # full run: 3 rounds of 4 s of iperf3 (~1.5 minutes)
    python benchmarks/bench_net.py --quick   # 1 round of 3 s, to check that it works

Four paths, one iperf3 TCP stream each (client -> server, MTU 1500), measured in one run:

* OURS   g1 -> netfront -> rings + grants -> netback "net0" -> netfront -> g2 (``xdom up --detach``;
         each guest's eth0 a TAP in its own namespace with IFF_VNET_HDR: GSO and checksum offload cross
         the rings), twice: netback bridging its vifs' TAPs on a Linux bridge (the default as root), and
         netback's built-in learning switch
* CEIL   a plain veth pair between two fresh namespaces (the kernel alone)
* FLOOR  a minimal Python TAP-to-TAP forwarder: one TAP in each of two fresh namespaces, both fds
         held by one Python process in the root namespace, one thread per direction moving whole
         frames with os.read/os.write; without offloads (IFF_TAP|IFF_NO_PI) and with them
         (IFF_VNET_HDR, TUNSETOFFLOAD CSUM|TSO4|TSO6, the virtio_net_hdr passed through unchanged)

The figure is iperf3's receiver-side rate.  The forwarder with offloads, the reference the issue's
ratio is taken against, stays up for the whole run and is measured in turn with each of ours, round
by round (alternating which goes first); each figure is the median of its rounds, and beside the
ratio of the medians the lowest and highest ratio of one round's pair show how much the machine
moved meanwhile.  The veth pair and the forwarder without offloads are measured once, for context.
CPU s/GiB is psutil's user+system time of the processes on the data path (net0, g1, g2 and the
broker for ours; the forwarder process for the floors) over the bytes iperf3 received (medians).  Nothing is asserted about timings; a failed iperf3 run or a domain
restart stops the run.  Every namespace, device and process made here is removed at the end.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import glob
import json
import os
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import psutil
from steal import StealClock, steal_range

GiB = 1 << 30
TUNSETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ = 0x400454CA, 0x400454D0, 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
VNET_HDR = 10                                  # sizeof(struct virtio_net_hdr)
TOPOLOGY = """\
[[domain]]
name = "xs"
kind = "xenstored"
[[domain]]
name = "net0"
kind = "netback"
switch = "{switch}"
[[domain]]
name = "g1"
kind = "guest"
memory = "16M"
vif = ["mac=00:16:3e:00:00:01, backend=net0, ip=10.77.0.1/24"]
[[domain]]
name = "g2"
kind = "guest"
memory = "16M"
vif = ["mac=00:16:3e:00:00:02, backend=net0, ip=10.77.0.2/24"]
"""
PATHS = (("ours", "OURS  netfront/netback, bridge (g1 -> net0 -> g2)"),
         ("builtin", "OURS  netfront/netback, built-in switch"),
         ("veth", "CEIL  veth pair, kernel only"),
         ("plain", "FLOOR Python TAP forwarder, no offloads"),
         ("vnet", "FLOOR Python TAP forwarder, VNET_HDR + TSO"))


class BenchError(Exception):
    """The run is broken: its figures would mean nothing."""


# The forwarder: this file run as ``bench_net.py --forwarder MODE NS_A NS_B TAP_A TAP_B``.

def open_tap(ns: str, name: str, vnet: bool) -> int:
    """A TAP device created in namespace ``ns`` (the fd is opened there), with or without offloads."""
    from xdom.deploy.netns import entered
    with entered(ns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    if vnet:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR))
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    return fd


def forwarder_main(mode: str, ns_a: str, ns_b: str, tap_a: str, tap_b: str) -> None:
    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))           # PR_SET_PDEATHSIG: never outlive the benchmark
    signal.signal(signal.SIGINT, signal.SIG_IGN)              # Ctrl-C: the benchmark stops us when it cleans up
    vnet = mode == "vnet"
    bufsize = 65536 + 64 + (VNET_HDR if vnet else 0)
    a, b = open_tap(ns_a, tap_a, vnet), open_tap(ns_b, tap_b, vnet)

    def pump(src: int, dst: int) -> None:
        read, write = os.read, os.write
        while True:
            frame = read(src, bufsize)
            try:
                write(dst, frame)
            except OSError:
                pass                  # the other side is not up yet, or its queue is full: dropped
    for pair in ((a, b), (b, a)):
        threading.Thread(target=pump, args=pair, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()                  # until the benchmark closes our stdin (or kills us)


# The benchmark.

def run(*argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: status {res.returncode}: {res.stderr.strip()[-400:]}")
    return res


def xdom(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdom.deploy.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def domains(run_dir: str) -> dict[str, dict[str, Any]]:
    ps = xdom("ps", "--json", "--run-dir", run_dir, timeout=30)
    if ps.returncode != 0:
        raise BenchError(f"xdom ps failed (status {ps.returncode}): {ps.stderr.strip()}")
    return {r["name"]: r for r in json.loads(ps.stdout)}


def broker_pid(run_dir: str) -> int | None:
    with open(os.path.join(run_dir, "supervisor.pid")) as f:
        sup = psutil.Process(int(f.read().split()[0]))
    return next((c.pid for c in sup.children() if "broker" in c.cmdline()), None)


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    return {name: sum(psutil.Process(pid).cpu_times()[:2]) for name, pid in pids.items()}   # user + system


def sleeps(pids: dict[str, int]) -> dict[str, int]:
    """Voluntary context switches of all a process's threads: each is a sleep some wakeup (often one
    across CPUs) ends.  (psutil's count is the main thread's only.)"""
    out = {}
    for name, pid in pids.items():
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/status") as f:
                    total += int(f.read().split("\nvoluntary_ctxt_switches:")[1].split()[0])
            except (OSError, IndexError):
                pass            # a thread that ended meanwhile
        out[name] = total
    return out


def add_ns(name: str, made: list[str]) -> None:
    run("ip", "netns", "add", name)
    made.append(name)
    run("ip", "-n", name, "link", "set", "lo", "up")


def addr_up(ns: str, dev: str, ip: str) -> None:
    run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
    run("ip", "-n", ns, "link", "set", dev, "up")


def iperf(ns_client: str, ns_server: str, server_ip: str, seconds: float, pids: dict[str, int],
          procs: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    """One iperf3 TCP run; its receiver-side rate, retransmits and the CPU ``pids`` used per GiB."""
    server = subprocess.Popen(["ip", "netns", "exec", ns_server, "iperf3", "-s", "-1", "-B", server_ip],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(server)
    deadline = time.monotonic() + 10
    while True:
        before, slept = cpu_seconds(pids), sleeps(pids)
        with StealClock() as steal:
            res = subprocess.run(["ip", "netns", "exec", ns_client, "iperf3", "-c", server_ip, "-t",
                                  f"{seconds:g}", "-J"], capture_output=True, text=True, timeout=seconds + 60,
                                 stdin=subprocess.DEVNULL)
        after, woke = cpu_seconds(pids), sleeps(pids)
        if "Connection refused" not in res.stdout + res.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.05)              # the server is still binding
    try:
        out = json.loads(res.stdout)
    except ValueError:
        out = {}
    end = out.get("end")
    if res.returncode != 0 or end is None or out.get("error"):
        raise BenchError(f"iperf3 to {server_ip} failed (status {res.returncode}): "
                         f"{out.get('error') or res.stderr.strip()[-400:] or res.stdout.strip()[-400:]}")
    server.wait(30)
    rx = end["sum_received"]
    gib = rx["bytes"] / GiB
    if not gib:
        raise BenchError(f"iperf3 to {server_ip}: no bytes received in {seconds:g} s")
    return {"gbit_s": rx["bits_per_second"] / 1e9, "retr": end["sum_sent"].get("retransmits", 0),
            "bytes": rx["bytes"], "cpu_per_gib": {n: (after[n] - before[n]) / gib for n in pids}, "steal": steal.percent,
            "sleeps_per_64k": {n: (woke[n] - slept[n]) / (rx["bytes"] / 65536) for n in pids}}


def start_forwarder(mode: str, ns_a: str, ns_b: str, tap_a: str, tap_b: str,
                    procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--forwarder", mode, ns_a, ns_b, tap_a,
                             tap_b], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    procs.append(proc)
    if not select.select([proc.stdout], [], [], 30)[0] or proc.stdout.readline() != b"ready\n":
        raise BenchError(f"the {mode} forwarder did not start (status {proc.poll()})")
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A path's runs: the median of each figure (of each process's, for the per-process ones)."""
    out: dict[str, Any] = {f: statistics.median(r[f] for r in runs) for f in ("gbit_s", "retr")}
    for f in ("cpu_per_gib", "sleeps_per_64k"):
        out[f] = {n: statistics.median(r[f][n] for r in runs) for n in runs[0][f]}
    return out


def report(runs: dict[str, list[dict[str, Any]]], pairs: dict[str, list[float]], args: argparse.Namespace,
           wall: float) -> None:
    res = {key: summarise(r) for key, r in runs.items()}
    line = "=" * 104
    print(f"\n{line}\nxdom network benchmark ({'quick' if args.quick else 'full'} run; iperf3 TCP, 1 stream, "
          f"{args.rounds} round(s) of {args.seconds:g} s, medians; MTU 1500; {os.cpu_count()} CPUs)\n{line}")
    veth = res["veth"]["gbit_s"]
    print(f"  {'path':<46} {'Gbit/s':>9} {'retr':>7} {'vs veth':>9} {'ours/this':>10} {'CPU s/GiB':>10} "
          f"{'steal':>8}")
    for key, label in PATHS:
        r = res[key]
        ours = "" if key in ("ours", "builtin", "veth") else f"{res['ours']['gbit_s'] / r['gbit_s']:>9.4f}x"
        cpu = f"{sum(r['cpu_per_gib'].values()):.2f}" if r["cpu_per_gib"] else "-"
        print(f"  {label:<46} {r['gbit_s']:>9.3f} {r['retr']:>7.0f} {r['gbit_s'] / veth:>8.4f}x {ours:>10} {cpu:>10} "
              f"{steal_range([run['steal'] for run in runs[key]]):>8}")
    for key, mode in (("ours", "bridge"), ("builtin", "built-in switch")):
        print(f"  OURS ({mode}) CPU s/GiB by process: "
              + ", ".join(f"{n} {v:.2f}" for n, v in res[key]["cpu_per_gib"].items())
              + "; sleeps per 64 KiB moved: "
              + ", ".join(f"{n} {v:.2f}" for n, v in res[key]["sleeps_per_64k"].items() if n != "broker"))
    ref = res["vnet"]["gbit_s"]
    print("  OURS / TSO forwarder, lowest and highest of one round's pair: "
          + "; ".join(f"{mode} {min(pairs[key]):.2f}-{max(pairs[key]):.2f}x (medians {res[key]['gbit_s'] / ref:.2f}x)"
                      for key, mode in (("ours", "bridge"), ("builtin", "built-in switch"))))
    print(f"  (receiver-side rate; veth and the plain forwarder one run each, the TSO forwarder "
          f"{len(runs['vnet'])} runs; retr: TCP retransmits;")
    print("   CPU s/GiB: user+system s of data-path processes per GiB; steal: the CPU time the hypervisor gave")
    print("   other guests during the path's runs, lowest-highest -- tens of per cent: the neighbours were measured too)")
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
    ap.add_argument("--quick", action="store_true", help="3 s per path: check that it works")
    ap.add_argument("--seconds", type=float, default=None, help="iperf3 time per run (default 4, 3 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of ours against the TSO forwarder "
                    "(default 3, 1 with --quick)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (topology, logs)")
    ap.add_argument("--forwarder", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.forwarder:
        forwarder_main(*args.forwarder)
        return 0
    args.seconds = args.seconds or (3.0 if args.quick else 4.0)
    args.rounds = max(1, args.rounds or (1 if args.quick else 3))
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("iperf3"):
        print("bench_net: needs root, iproute2 and iperf3", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    t0, tag = time.monotonic(), f"xnb{os.getpid()}"
    tmp = tempfile.mkdtemp(prefix="xdb-net-", dir="/tmp")
    made_ns: list[str] = []
    procs: list[subprocess.Popen[bytes]] = []
    up_dirs: list[tuple[str, str]] = []
    runs: dict[str, list[dict[str, Any]]] = {"vnet": []}
    pairs: dict[str, list[float]] = {}
    try:
        ns_va, ns_vb = f"{tag}-vneta", f"{tag}-vnetb"
        add_ns(ns_va, made_ns)
        add_ns(ns_vb, made_ns)
        vnet = start_forwarder("vnet", ns_va, ns_vb, f"{tag}tva", f"{tag}tvb", procs)
        addr_up(ns_va, f"{tag}tva", "10.78.3.1")
        addr_up(ns_vb, f"{tag}tvb", "10.78.3.2")
        for key, switch in (("ours", "bridge"), ("builtin", "builtin")):
            state_dir, run_dir = os.path.join(tmp, switch, "state"), os.path.join(tmp, switch, "run")
            os.makedirs(os.path.join(tmp, switch), exist_ok=True)
            topo = os.path.join(tmp, switch, "bench.toml")
            with open(topo, "w") as f:
                f.write(TOPOLOGY.replace("{switch}", switch))
            print(f"xdom up (xenstored, net0 with switch = {switch!r}, g1, g2) ...", file=sys.stderr, flush=True)
            up_dirs.append((state_dir, run_dir))
            up = xdom("up", topo, "--detach", "--state-dir", state_dir, "--run-dir", run_dir)
            if up.returncode != 0:
                raise BenchError(f"xdom up failed (status {up.returncode}):\n{up.stdout}{up.stderr}")
            doms = domains(run_dir)
            pids = {n: doms[n]["pid"] for n in ("net0", "g1", "g2")}
            bpid = broker_pid(run_dir)
            if bpid is not None:
                pids["broker"] = bpid
            runs[key], pairs[key] = [], []
            for r in range(args.rounds):
                ours = ref = None
                for who in ((key, "vnet") if r % 2 == 0 else ("vnet", key)):
                    print(f"round {r + 1}/{args.rounds}: {'OURS (' + switch + ')' if who == key else 'REF: TSO forwarder'}"
                          f" for {args.seconds:g} s ...", file=sys.stderr, flush=True)
                    if who == key:
                        ours = iperf(doms["g1"]["netns"], doms["g2"]["netns"], "10.77.0.2", args.seconds, pids, procs)
                    else:
                        ref = iperf(ns_va, ns_vb, "10.78.3.2", args.seconds, {"forwarder": vnet.pid}, procs)
                assert ours is not None and ref is not None
                runs[key].append(ours)
                runs["vnet"].append(ref)
                pairs[key].append(ours["gbit_s"] / ref["gbit_s"])
            after = domains(run_dir)
            for name in ("xs", "net0", "g1", "g2"):
                if after[name]["restarts"] or after[name]["pid"] != doms[name]["pid"]:
                    raise BenchError(f"domain {name} restarted during the run ({after[name]['last_exit']})")
            xdom("down", "--run-dir", run_dir)

        ns_a, ns_b = f"{tag}-va", f"{tag}-vb"
        add_ns(ns_a, made_ns)
        add_ns(ns_b, made_ns)
        run("ip", "link", "add", f"{tag}a", "netns", ns_a, "type", "veth", "peer", "name", f"{tag}b", "netns", ns_b)
        addr_up(ns_a, f"{tag}a", "10.78.1.1")
        addr_up(ns_b, f"{tag}b", "10.78.1.2")
        stop(vnet)                    # its TAPs go with its fds
        print(f"CEIL: veth for {args.seconds:g} s ...", file=sys.stderr, flush=True)
        runs["veth"] = [iperf(ns_a, ns_b, "10.78.1.2", args.seconds, {}, procs)]

        ns_a, ns_b, tap_a, tap_b = f"{tag}-plaina", f"{tag}-plainb", f"{tag}tpa", f"{tag}tpb"
        add_ns(ns_a, made_ns)
        add_ns(ns_b, made_ns)
        fwd = start_forwarder("plain", ns_a, ns_b, tap_a, tap_b, procs)
        addr_up(ns_a, tap_a, "10.78.2.1")
        addr_up(ns_b, tap_b, "10.78.2.2")
        print(f"FLOOR: Python TAP forwarder (plain) for {args.seconds:g} s ...", file=sys.stderr, flush=True)
        runs["plain"] = [iperf(ns_a, ns_b, "10.78.2.2", args.seconds, {"forwarder": fwd.pid}, procs)]
        stop(fwd)
        report(runs, pairs, args, time.monotonic() - t0)
        return 0
    except (BenchError, psutil.Error, OSError, subprocess.SubprocessError) as e:
        print(f"bench_net: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_net: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # let the clean-up finish (children inherit this)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for p in procs:
            stop(p)
        for ns in made_ns:            # their veth ends and any TAP left go with them
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)
        for state_dir, run_dir in up_dirs:
            down = xdom("down", "--run-dir", run_dir)
            if down.returncode not in (0, 3):
                print(f"bench_net: xdom down failed (status {down.returncode}): {down.stderr.strip()}",
                      file=sys.stderr)
            scan_logs(state_dir)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
