"""Which uid each domain process runs under, decided once before a host starts.

Isolation between domains is by uid: a domain's frames are memfds of mode
0600, so a domain under another domain's uid could reopen them read-write
through ``/proc/<pid>/fd`` (README, "Isolation and its limits").  As root the
supervisor therefore runs each domain under its own uid:

* the topology's ``uid`` when it gives one, else one allocated from
  :data:`UID_BASE` upwards, skipping uids that name a user of this system;
* every uid in use is held under an ``flock`` on ``/run/xdom/uids/<uid>`` for
  the host's life, so two hosts running side by side never share one (a
  lock dies with its holders: nothing to clean up after a crash).  The
  supervisor holds it, and so does the host's keeper (``deploy/keeper.py``),
  so that a supervisor's death does not free the uids of running domains;
* a uid some process still runs as is not given out, whatever its lock says,
  and when a domain's process ends, whatever else still runs as its uid is
  killed (:func:`kill_leftovers_of`): a guest's workload may leave its
  process group (``setsid``, as any daemon does), and would otherwise
  outlive its guest and share its uid with the next domain given it.

Separate uids only work when those uids can run the interpreter and import
xdom: a checkout or a venv under a 0700 home directory cannot.  ``auto``
(the default) probes that with the first allocated uid and, when it fails,
runs every domain under the supervisor's own uid, saying so once and why;
``separate`` makes the failure an error; ``shared`` skips uids altogether.
Not as root, every domain runs under the caller's uid, said once too.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

import psutil

from .topology import Topology

__all__ = ["DOMAIN_EXEC", "LOCK_DIR", "UID_BASE", "UID_COUNT", "IsolationError", "UidMode", "UidPlan",
           "is_system_user", "kill_leftovers_of", "plan_uids", "probe_uid", "uids_in_use"]

UID_BASE = 64000
UID_COUNT = 1000
LOCK_DIR = "/run/xdom/uids"
DOMAIN_EXEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "domain_exec.py")
_PROBE_IMPORTS = "import xdom.domains.xenhost, xdom.domains.xenstore, xdom.backends.xenstored.server"


class IsolationError(Exception):
    """The uids asked for cannot be had."""


class UidMode(StrEnum):
    AUTO = "auto"
    SEPARATE = "separate"
    SHARED = "shared"


@dataclass
class UidPlan:
    """``uids[name]`` is the uid domain ``name`` runs under, None for the supervisor's own."""

    separate: bool
    uids: dict[str, int | None]
    note: str
    _locks: list[int] = field(default_factory=list, repr=False)
    lock_of: dict[str, int] = field(default_factory=dict, repr=False)     # domain name -> its uid's lock


    def release(self) -> None:
        for fd in self._locks:
            os.close(fd)
        self._locks.clear()
        self.lock_of.clear()


def probe_uid(uid: int) -> str | None:
    """Can ``uid`` run this interpreter, the exec wrapper, and import xdom?  None if so, else why not."""
    argv = [sys.executable, "-I", "-S", DOMAIN_EXEC, "--", sys.executable, "-c", _PROBE_IMPORTS]
    try:
        res = subprocess.run(argv, user=uid, group=uid, extra_groups=[], cwd="/", capture_output=True,
                             timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{e.__class__.__name__}: {e}"
    if res.returncode == 0:
        return None
    lines = res.stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit status {res.returncode}"


def _lock(lock_dir: str, uid: int) -> int | None:
    fd = os.open(os.path.join(lock_dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def is_system_user(uid: int) -> bool:
    """Whether ``uid`` names a user of this system (/etc/passwd, NSS): never one xdom allocates."""
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def uids_in_use() -> dict[int, int]:
    """Every uid a live process runs as (real, effective or saved), with one such pid."""
    used: dict[int, int] = {}
    for p in psutil.process_iter(["uids"]):
        for uid in p.info.get("uids") or ():
            used.setdefault(uid, p.pid)
    return used


def kill_leftovers_of(uid: int, spare: Iterable[int] = ()) -> list[int]:
    """SIGKILL every process running as ``uid`` (a domain's own, whose process has ended) but ``spare``
    and their descendants (a guest's VM, which outlives a restart of its guest domain); the pids killed."""
    keep = set(spare)
    for pid in list(keep):
        try:
            keep.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            pass
    killed = []
    for p in psutil.process_iter(["uids"]):
        uids = p.info.get("uids")
        if p.pid in keep or not uids or uid not in uids:
            continue
        try:
            os.kill(p.pid, signal.SIGKILL)
            killed.append(p.pid)
        except ProcessLookupError:
            pass
    return killed


def plan_uids(topology: Topology, mode: UidMode = UidMode.AUTO, lock_dir: str = LOCK_DIR) -> UidPlan:
    """Decide every domain's uid; the plan holds locks until :meth:`UidPlan.release`.

    Raises IsolationError when ``separate`` cannot be honoured or a
    topology uid is held by another host.
    """
    names = [d.name for d in topology.domains]
    me = os.geteuid()
    if me != 0:
        if mode == UidMode.SEPARATE:
            raise IsolationError("per-domain uids need root; run as root or use --uids shared")
        return UidPlan(False, dict.fromkeys(names), f"not running as root: every domain runs under uid {me} "
                                                   f"(no per-domain uid isolation)")
    if mode == UidMode.SHARED:
        return UidPlan(False, dict.fromkeys(names), "--uids shared: every domain runs as root "
                                                   "(no per-domain uid isolation)")
    os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    plan = UidPlan(True, {}, "")
    try:
        explicit = {d.uid for d in topology.domains if d.uid is not None}
        busy = uids_in_use()
        candidates = (u for u in range(UID_BASE, UID_BASE + UID_COUNT)
                      if u not in explicit and u not in busy and not is_system_user(u))
        for d in topology.domains:
            if d.uid is not None:
                if d.uid in busy:
                    raise IsolationError(f"uid {d.uid} of domain {d.name!r} is in use: pid {busy[d.uid]} runs as "
                                         f"it, and would share everything the domain has")
                fd = _lock(lock_dir, d.uid)
                if fd is None:
                    raise IsolationError(f"uid {d.uid} of domain {d.name!r} is in use by another xdom host")
                plan._locks.append(fd)
                plan.lock_of[d.name] = fd
                plan.uids[d.name] = d.uid
                continue
            for uid in candidates:
                fd = _lock(lock_dir, uid)
                if fd is not None:
                    plan._locks.append(fd)
                    plan.lock_of[d.name] = fd
                    plan.uids[d.name] = uid
                    break
            else:
                raise IsolationError(f"no free uid left in {UID_BASE}..{UID_BASE + UID_COUNT - 1} for domain "
                                     f"{d.name!r}")
        first = next(iter(plan.uids.values()))
        assert first is not None
        why = probe_uid(first)
        if why is not None:
            if mode == UidMode.SEPARATE:
                raise IsolationError(f"uid {first} cannot run {sys.executable} with xdom ({why}); install xdom "
                                     f"where other users can read it, or use --uids shared")
            plan.release()
            return UidPlan(False, dict.fromkeys(names),
                           f"every domain runs as root (no per-domain uid isolation): uid {first} cannot run "
                           f"{sys.executable} with xdom ({why}); install xdom where other users can read it "
                           f"(make's .venv on /usr/bin/python3 in a readable checkout)")
        plan.note = "each domain runs under its own uid: " + ", ".join(f"{n}={u}" for n, u in plan.uids.items())
        return plan
    except BaseException:
        plan.release()
        raise
