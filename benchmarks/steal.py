"""The machine's steal time while a measurement runs: CPU time the hypervisor gave to other guests.

This machine is a virtual one with neighbours.  When they are busy, our
vCPUs wait for the host: the same fio job here went from 62k to 20k IOPS
within minutes, with ``vmstat`` showing 33-36% steal, and back.  Such a
figure says more about the neighbours than about xdom, and the reference
measured beside it may or may not have been hit as hard.  The benchmarks
print the steal of each measurement beside it (from ``/proc/stat``), so a
round taken in a bad phase can be told from a real change.
"""

from __future__ import annotations

_STEAL = 7          # /proc/stat "cpu" line: user nice system idle iowait irq softirq steal


def _cpu_jiffies() -> tuple[int, int]:
    """(all CPU time, steal time) since boot, summed over CPUs, in clock ticks."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:_STEAL + 2]]
    return sum(fields), fields[_STEAL]


class StealClock:
    """``with StealClock() as s: ...`` then ``s.percent``: the share of CPU time stolen meanwhile."""

    def __init__(self) -> None:
        self.percent = 0.0
        self._start = (0, 0)

    def __enter__(self) -> StealClock:
        self._start = _cpu_jiffies()
        return self

    def __exit__(self, *exc: object) -> None:
        total, steal = _cpu_jiffies()
        elapsed = total - self._start[0]
        self.percent = 100.0 * (steal - self._start[1]) / elapsed if elapsed > 0 else 0.0


def steal_range(percents: list[float]) -> str:
    """How a row's measurements were hit: "3%" or "1-36%"."""
    if not percents:
        return "-"
    lo, hi = min(percents), max(percents)
    return f"{lo:.0f}%" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f}%"
