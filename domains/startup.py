"""How long a domain process took to start, phase by phase, for its log.

A driver domain's guests are stalled from its death until its replacement
serves them again, so its start-up is part of every restart's stall (issue
13).  A domain's ``__main__`` calls :func:`begin` before it imports its
server (what happened before is the fork, ``domain_exec`` and the
interpreter's own start); :func:`mark` ends each later phase, and
:func:`summary` is the line for the log::

    start-up 812 ms: exec 130, imports 420, broker 60, xenstore 90, devices 112

Standard library only and nothing at import time but reading the clock:
it runs before everything else the domain imports.
"""

from __future__ import annotations

import os
import time

_began: float | None = None          # time.monotonic() at begin()
_age_at_begin = 0.0                  # how old the process was then
_marks: list[tuple[str, float]] = []


def process_age() -> float:
    """Seconds since this process was forked (its start time in the kernel; exec keeps it), to 10 ms."""
    try:
        with open("/proc/self/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2:].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")     # field 22, starttime, in clock ticks
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError):
        return 0.0


def begin() -> None:
    """The interpreter runs the domain's ``__main__``: what came before was the process's exec."""
    global _began, _age_at_begin
    _began = time.monotonic()
    _age_at_begin = process_age()
    _marks.clear()


def mark(phase: str) -> None:
    """``phase`` ends now (it began when the one before it ended)."""
    if _began is not None:
        _marks.append((phase, time.monotonic()))


def summary() -> str:
    """``start-up N ms: exec A, PHASE B, ...``; empty if :func:`begin` was not called."""
    if _began is None:
        return ""
    parts, last = [("exec", _age_at_begin)], _began
    for phase, at in _marks:
        parts.append((phase, at - last))
        last = at
    total = _age_at_begin + (last - _began)
    return f"start-up {total * 1000:.0f} ms: " + ", ".join(f"{p} {s * 1000:.0f}" for p, s in parts)
