"""The broker's file descriptors as a budget that no domain can spend for the others.

Descriptors are the hypervisor's scarcest resource here: every event channel
costs the broker eventfds it must keep (to hand to a binder, to signal, to
give a restarted peer the same channel), and the process has a hard limit
(20000 on this host).  A domain that could allocate until ``EMFILE`` would
leave the broker unable to accept a connection, create a domain or even
answer the toolstack.  So, as Xen bounds each domain's event channels
(xl.cfg ``max_event_channels``) and keeps its own heap for itself:

* the broker raises its soft ``RLIMIT_NOFILE`` to the hard limit at start;
* every descriptor the hypervisor keeps on a domain's behalf is *charged*:
  to the domain (its quota, ``ENOSPC`` when spent, as Xen answers a domain
  out of ports) and to the broker's budget (``ENOMEM`` when spent, as Xen
  answers when its heap is);
* no domain's quota exceeds ``1/SHARE_DIVISOR`` of the budget, whatever the
  toolstack asked for, so one domain (or a few colluding ones) cannot
  spend it all on its own;
* the budget stops ``RESERVE`` descriptors short of the limit: what the
  broker needs for itself (its sockets, connections not yet introduced,
  the frame descriptors a map or copy batch opens for a moment), so that
  management requests and hypercalls can always be answered.

Pure bookkeeping: no descriptors are opened here.
"""

from __future__ import annotations

import resource

__all__ = ["FRAME_FDS", "RESERVE", "SHARE_DIVISOR", "FdBudget", "raise_nofile_limit"]

# The frame descriptors kept for maps (frames.FrameFds; a map reply sends them), one
# at a time while the copier maps a frame (it keeps mappings, not descriptors), plus
# the broker's own sockets and up to 64 connections that have not said hello.
FRAME_FDS = 256
RESERVE = 384 + FRAME_FDS
SHARE_DIVISOR = 8


class FdBudget:
    """How many descriptors the hypervisor may still keep for domains."""

    def __init__(self, limit: int | None, reserve: int = RESERVE) -> None:
        """``limit`` None means unbounded (the in-process variant holds no descriptors for domains)."""
        self.limit = limit
        self.reserve = reserve
        self.used = 0

    @property
    def available(self) -> int | None:
        if self.limit is None:
            return None
        return max(0, self.limit - self.reserve - self.used)

    @property
    def share(self) -> int | None:
        """The most descriptors any one domain may keep: a fraction of the budget."""
        if self.limit is None:
            return None
        return max(0, self.limit - self.reserve) // SHARE_DIVISOR

    def take(self, n: int) -> bool:
        """Charge ``n`` descriptors; False (and nothing charged) if the budget cannot cover them."""
        if self.limit is not None and self.used + n > self.limit - self.reserve:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)


def raise_nofile_limit() -> int:
    """Raise the soft descriptor limit to the hard one; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20     # fs.nr_open's default
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20
