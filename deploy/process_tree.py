"""The host's process tree, read once per health round.

A domain's health counts its descendants (a guest's workload, QEMU's
helpers).  psutil's ``Process.children`` reads every process's
``/proc/<pid>/stat`` on each call, so asking it once per domain made a
health round cost domains x processes reads: with 100 guests that was most
of the supervisor's CPU while a host came up.  One map of parent to children
per round makes it one read per process, however many domains ask.
"""

from __future__ import annotations

from collections import defaultdict

import psutil

__all__ = ["ProcessTree"]


class ProcessTree:
    """Parent-to-children map of every process at one moment."""

    def __init__(self) -> None:
        self._children: defaultdict[int, list[int]] = defaultdict(list)
        for p in psutil.process_iter(["ppid"]):
            ppid = p.info.get("ppid")
            if ppid is not None:
                self._children[ppid].append(p.pid)

    def descendants(self, pid: int) -> list[int]:
        """Every process below ``pid``, parents before their children."""
        out: list[int] = []
        todo = [pid]
        while todo:
            kids = self._children.get(todo.pop(), [])
            out.extend(kids)
            todo.extend(kids)
        return out
