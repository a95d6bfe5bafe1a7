"""The printed report of ``bench_broker.py``: each figure beside the reference measured in the same run.

Kept apart from the measuring code, which is also the child program of the benchmark.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def rtt_row(label: str, r: dict[str, float] | str | None, ref: float | None) -> str:
    if not isinstance(r, dict):
        return f"  {label:<52} {'(' + (r or 'not run') + ')'}"
    ratio = f"{r['median_us'] / ref:6.2f}x" if ref else "   -   "
    return (f"  {label:<52} {r['median_us']:9.1f} {r['mean_us']:9.1f} {r['p99_us']:9.1f} "
            f"{r['min_us']:8.1f} {ratio:>8}")


def report(res: dict[str, Any], quick: bool, batches: tuple[int, ...], copy_batch: int) -> None:
    """Print ``bench_broker.py``'s results, each figure beside its reference."""
    line = "=" * 104
    print()
    print(line)
    print(f"xdom broker benchmark ({'quick' if quick else 'full'} run; {os.cpu_count()} CPUs; "
          f"Python {sys.version.split()[0]})")
    print(line)

    evs = res["evtchn"]
    print(f"\n1. Event-channel round trip between two processes ({evs['iters']} round trips each, "
          f"interleaved in {evs['rounds']} rounds, after {evs['warmup']} warm-up; microseconds)")
    for placement, ev in evs["placements"].items():
        raw_ref = ev["raw_poll"]["median_us"]
        print(f"  pinger and ponger on {placement}:")
        print(f"  {'':<52} {'median':>9} {'mean':>9} {'p99':>9} {'min':>8} {'vs ref':>8}")
        print(rtt_row("OURS  xdom domains: XenHost.notify + evtchn.wait", ev["xdom_api"], raw_ref))
        print(rtt_row("      xdom domains: notify + poll/consume on port fd", ev["xdom_poll"], raw_ref))
        print(rtt_row("REF   raw os.eventfd, 2 Python procs, poll + read", ev["raw_poll"], raw_ref))
        print(rtt_row("      raw os.eventfd, 2 Python procs, blocking read", ev["raw_block"], raw_ref))
        print(rtt_row("FLOOR C eventfd ping-pong, fork, blocking read", ev["c"], raw_ref))
        ours = ev["xdom_api"]["median_us"]
        print(f"  ratio OURS / REF (medians): {ours / raw_ref:.2f}x  "
              f"(+{ours - raw_ref:.1f} us per round trip)", end="")
        if isinstance(ev["c"], dict):
            print(f";  OURS / C floor: {ours / ev['c']['median_us']:.2f}x")
        else:
            print()

    g = res["grants"]
    print("\n2. Grant map+unmap: backend maps N refs in one map_grants call, unmaps them in one "
          "unmap_grants call")
    print("   (refs/s = refs taken through map AND unmap per second; us/batch = one map call + one unmap call)")
    print(f"  {'batch N':>8} {'OURS broker refs/s':>20} {'us/batch':>10} {'REF mmap+munmap refs/s':>23} "
          f"{'us/batch':>10} {'OURS/REF':>9} {'local refs/s':>13} {'local/broker':>13}   "
          f"CPU us/ref: backend  broker  local")
    for n in batches:
        b, loc, raw = g["broker"]["map"][str(n)], g["local"]["map"][str(n)], res["mmap"][str(n)]
        print(f"  {n:>8} {b['refs_per_s']:>20,.0f} {b['us_per_batch']:>10.1f} {raw['refs_per_s']:>23,.0f} "
              f"{raw['us_per_batch']:>10.1f} {b['refs_per_s'] / raw['refs_per_s']:>8.2f}x "
              f"{loc['refs_per_s']:>13,.0f} {loc['refs_per_s'] / b['refs_per_s']:>12.1f}x   "
              f"{b['cpu_s'] / b['refs'] * 1e6:>19.1f} {b['broker_cpu_s'] / b['refs'] * 1e6:>7.1f} "
              f"{loc['cpu_s'] / loc['refs'] * 1e6:>6.1f}")
    print("   (broker: backend is its own domain process, granter a domain in the benchmark process;")
    print("    REF: in-process mmap + munmap of N memfd pages; local: the in-process hypervisor variant;")
    print("    CPU: user + system per ref taken through map and unmap, of each process over its run)")

    print(f"\n3. Grant copy: {copy_batch} x 4 KiB copy ops per copy_grants call "
          f"(granter's granted page -> copier's own frame)")
    print(f"  {'':<52} {'MiB/s':>10} {'us/batch':>10} {'vs pread':>9} {'vs memcpy':>10}   "
          f"CPU s/GiB: copier  broker")
    mem, pread = res["memcpy"]["mib_s"], res["pread"]["mib_s"]
    rows = [(f"OURS  broker mode, broker + backend on {placement}", r)
            for placement, r in g["broker"]["copy"].items()]
    rows += [("REF   local mode (in-process hypervisor)", g["local"]["copy"]),
             ("REF   Python os.pread of 4 KiB from a memfd (64 x)", res["pread"]),
             ("REF   Python memoryview page copy (64 x 4 KiB)", res["memcpy"])]
    for label, r in rows:
        cpu = ""
        if "cpu_s" in r:
            cpu = f"   {r['cpu_s'] / r['bytes'] * 2**30:>17.2f}"
            cpu += f" {r['broker_cpu_s'] / r['bytes'] * 2**30:>7.2f}" if "broker_cpu_s" in r else "       -"
        print(f"  {label:<52} {r['mib_s']:>10,.1f} {r['us_per_batch']:>10.1f} {r['mib_s'] / pread:>8.2f}x "
              f"{r['mib_s'] / mem:>9.3f}x{cpu}")
    per_round = [r["copy"]["mib_s"] / r["pread"]["mib_s"] for r in g["broker"]["copy_rounds"]]
    print(f"   one CPU, {len(per_round)} rounds, each copy then pread on that CPU: the median round's copy "
          f"against the median pread; each round's ratio {min(per_round):.2f}x-{max(per_round):.2f}x")
    print("   (a copy is one hypercall: on two CPUs each call waits for two cross-CPU wakeups)")
    print(f"\n(total wall time {res['wall']:.1f} s)")
    print(line)
