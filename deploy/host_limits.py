"""What this host can run, checked before anything starts: each refusal names its limit.

The topology file says what a host should be (``deploy/topology.py``); this
says whether *this* machine can be it, so that ``xdom up`` refuses up front,
with the limit and the way out, instead of a domain failing in its log:

* **A domain's memory against ``vm.max_map_count``.**  Every 4 KiB frame is
  its own memfd mapping, so its own VMA in the domain's process
  (``domains/memory.py``), and a process has at most ``vm.max_map_count``
  of them (65530 by default), less what the interpreter, its libraries and
  threads take: a domain refuses more than ``max_map_count - 1024`` frames
  (about 251 MiB by default).  ``memory = "1G"`` used to pass validation and
  fail in the guest's log.
* **All the memory against the host's.**  Every domain's frames and every
  VM's RAM are memfds the broker or QEMU fill as they are touched; their sum
  must fit in ``MemTotal`` (``/proc/meminfo``).  The processes' own memory
  (an interpreter each, about 25-60 MiB) is not counted: this refuses only
  what cannot fit at all.
* **Starting within the ready timeout.**  A domain has ``--ready-timeout``
  seconds from launch to ready, and its start costs about
  :data:`START_SECONDS` plus :data:`FRAME_SECONDS` per frame it populates
  at start (the broker makes each frame, the domain maps it); memory is
  populated as it is used, so that is :data:`START_FRAMES` whatever the
  domain's size (when it was all of it, 64 MiB took 0.46 s and 200 MiB
  1.35 s here).  One that cannot make it in time is refused.
  So is a host whose domains, when they all start at once (after xenstored
  comes back, every domain waiting for it is launched together; a supervisor
  adopting a host restarts together whatever died while none ran), need
  more CPU time than the host's CPUs give within the ready timeout: more
  domains than the ready timeout can bring up.
* **Uids.**  As root with per-domain uids, each domain without a ``uid`` of
  its own takes one of the :data:`~xdom.deploy.isolation.UID_COUNT`
  reserved for xdom.
* **The broker's descriptors.**  Each domain costs the broker at least
  ``DOMAIN_FDS`` descriptors of its hard ``RLIMIT_NOFILE``, less the
  ``RESERVE`` it keeps for itself (``broker/fd_budget.py``).

The estimates are this machine's figures, not worst cases: a refusal means
the host clearly cannot do it; passing does not promise a busy host will.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

from xdom.domains.abi.grant_table import PAGE_SIZE
from xdom.domains.hostsys.memory import START_FRAMES

from .topology import DomainKind, Topology

__all__ = ["FRAME_SECONDS", "HostFacts", "MAP_COUNT_RESERVE", "START_SECONDS", "VM_START_SECONDS", "problems",
           "xenstore_node_quota", "xenstore_watch_quota"]

MAP_COUNT_RESERVE = 1024        # mappings a domain process needs besides its frames (domains/memory.py's margin)
START_SECONDS = 0.25            # CPU seconds to start a Python domain and connect it (4 MiB guest: 0.21 s)
FRAME_SECONDS = 30e-6           # per 4 KiB frame: made by the broker, passed, mapped by the domain
VM_START_SECONDS = 0.5          # QEMU until QMP says running (the VM's RAM is not touched up front)
PYTHON_KINDS = (DomainKind.XENSTORED, DomainKind.GUEST, DomainKind.BLKBACK, DomainKind.NETBACK)


@dataclass(frozen=True)
class HostFacts:
    """The machine's side of the checks (:meth:`measure`, or given by a test)."""

    max_map_count: int
    mem_total: int | None           # bytes
    cpus: int
    nofile_hard: int | None
    uid_slots: int | None           # uids xdom may still allocate (None: no per-domain uids here)

    @classmethod
    def measure(cls, separate_uids: bool | None = None) -> HostFacts:
        from xdom.domains.hostsys.memory import max_map_count

        from .isolation import UID_COUNT
        mem = None
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemTotal:"):
                        mem = int(line.split()[1]) << 10
        except (OSError, ValueError, IndexError):
            pass
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if separate_uids is None:
            separate_uids = os.geteuid() == 0
        return cls(max_map_count(), mem, len(os.sched_getaffinity(0)),
                   None if hard == resource.RLIM_INFINITY else hard, UID_COUNT if separate_uids else None)


def _mib(n: int) -> str:
    return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n / (1 << 20):.1f} MiB"


def start_seconds(kind: DomainKind, frames: int, vm: bool) -> float:
    """The estimated time for one domain to come up (its VM's QEMU included)."""
    t = START_SECONDS + min(frames, START_FRAMES) * FRAME_SECONDS if kind in PYTHON_KINDS else START_SECONDS
    return t + (VM_START_SECONDS if vm else 0.0)


def problems(topology: Topology, facts: HostFacts, ready_timeout: float) -> list[str]:
    """Every reason this host cannot run ``topology`` within ``ready_timeout``, each naming its limit."""
    src = topology.source
    out: list[str] = []
    cap = facts.max_map_count - MAP_COUNT_RESERVE
    for d in topology.domains:
        if d.memory_frames > cap:
            out.append(f"{src}: {d.label}.memory: {_mib(d.memory_bytes)} is {d.memory_frames} frames of 4 KiB, each "
                       f"its own mapping in the domain's process, and vm.max_map_count is {facts.max_map_count} "
                       f"(less {MAP_COUNT_RESERVE} the process needs for itself): at most {cap} frames, "
                       f"{_mib(cap * PAGE_SIZE)}, on this host; give it less memory or raise the limit "
                       f"(sysctl vm.max_map_count={d.memory_frames + MAP_COUNT_RESERVE})")
    if facts.mem_total is not None:
        total = sum(d.memory_bytes + ((d.vm.memory_mib << 20) if d.vm is not None else 0) for d in topology.domains)
        if total > facts.mem_total:
            biggest = sorted(topology.domains, key=lambda d: -d.memory_bytes)[:3]
            out.append(f"{src}: the domains' memory (and their VMs') adds up to {_mib(total)}, more than this host's "
                       f"{_mib(facts.mem_total)} (MemTotal): the largest are "
                       + ", ".join(f"{d.name} {_mib(d.memory_bytes)}" for d in biggest))
    for d in topology.domains:
        t = start_seconds(d.kind, d.memory_frames, d.vm is not None)
        if t > ready_timeout:
            out.append(f"{src}: {d.label}: starting it takes about {t:.1f}s here (the interpreter, "
                       f"{min(d.memory_frames, START_FRAMES)} frames to make and map at ~{FRAME_SECONDS * 1e6:.0f} µs "
                       "each" + (", and its VM" if d.vm is not None else "") + f"), more than the ready timeout of "
                       f"{ready_timeout:g}s; raise --ready-timeout")
    together = [d for d in topology.domains if d.kind != DomainKind.XENSTORED]
    need = sum(start_seconds(d.kind, d.memory_frames, d.vm is not None) for d in together) / max(1, facts.cpus)
    if len(together) > 1 and need > ready_timeout:
        out.append(f"{src}: {len(together)} domains that may have to start at once (after a xenstored restart, or "
                   f"when a supervisor adopts the host) need about {need:.1f}s on this host's {facts.cpus} CPU(s), "
                   f"more than the ready timeout of {ready_timeout:g}s: more domains than it can bring up; raise "
                   f"--ready-timeout to {need * 1.5:.0f} or run fewer domains")
    if facts.uid_slots is not None:
        wanted = sum(1 for d in topology.domains if d.uid is None)
        if wanted > facts.uid_slots:
            out.append(f"{src}: {wanted} domains need a uid of their own and xdom has {facts.uid_slots} "
                       f"(isolation.UID_COUNT); give some a uid = of their own, or run with --uids shared")
    if facts.nofile_hard is not None:
        from xdom.broker.fd_budget import RESERVE
        from xdom.broker.hypervisor import DOMAIN_FDS
        room = max(0, facts.nofile_hard - RESERVE) // DOMAIN_FDS
        if len(topology.domains) > room:
            out.append(f"{src}: {len(topology.domains)} domains need at least {DOMAIN_FDS} of the broker's "
                       f"descriptors each, and its hard RLIMIT_NOFILE ({facts.nofile_hard}, less {RESERVE} for itself) "
                       f"leaves room for {room}; raise the hard limit (ulimit -Hn) or run fewer domains")
    return out


# xenstored's node quota, sized for the topology.  A driver domain owns the backend directory of every
# device it serves (28 nodes for a blkback disk, fewer for a vif), so C's default of 1000 nodes a domain
# stops a blkback at its 36th disk with ENOSPC.  Xen's admins raise it with xenstored's -E; the toolstack
# knows the topology and does it for them, with room for as many devices again hot-attached later.  It is
# one limit for every unprivileged domain (as C's -E), so a guest may own as many nodes: its memory quota
# (2.5 MiB of xenstore a domain) still bounds what it can take.
# The same goes for watches: a backend watches its frontend's state for each device, two watches a
# device at most, so C's 128 (-W) stopped it at its 64th with E2BIG.
DEFAULT_NODE_QUOTA = 1000       # C xenstored's default (quota nodes)
NODES_PER_DEVICE = 32           # a backend directory, with a margin over blkback's 28
DEFAULT_WATCH_QUOTA = 128       # C xenstored's default (quota watches)
WATCHES_PER_DEVICE = 2


def _busiest_backend(topology: Topology) -> int:
    """How many devices the busiest backend domain serves."""
    served: dict[str | None, int] = {}          # None: the default backend
    for d in topology.domains:
        for backend in [disk.backend for disk in d.disks] + [vif.backend for vif in d.vifs]:
            served[backend] = served.get(backend, 0) + 1
    return max(served.values(), default=0)


def xenstore_node_quota(topology: Topology) -> int:
    """The ``--entry-nb`` for this topology's xenstored: the busiest backend's devices, twice over, fit."""
    return max(DEFAULT_NODE_QUOTA, DEFAULT_NODE_QUOTA // 4 + 2 * NODES_PER_DEVICE * _busiest_backend(topology))


def xenstore_watch_quota(topology: Topology) -> int:
    """The ``--watch-nb``: the busiest backend's watches, for twice its devices, fit."""
    return max(DEFAULT_WATCH_QUOTA,
               DEFAULT_WATCH_QUOTA // 4 + 2 * WATCHES_PER_DEVICE * _busiest_backend(topology))
