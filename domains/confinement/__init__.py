"""Confining a running domain: a seccomp allow-list of syscalls and a Landlock view of the filesystem.

Why and how (security issue 11)
===============================

A driver domain parses what hostile frontends write (rings, xenstore
nodes); the point of disaggregation is that a compromised one holds as
little as possible.  Separate uids, network namespaces and non-dumpable
processes bound what it can *reach*; this bounds what it can *do* with
the kernel: which syscalls it may make and which files it may open.

Two steps, because the two mechanisms attach differently:

1. :func:`restrict_files` (Landlock), while the domain still runs one
   thread.  A Landlock domain binds the calling thread and what it starts
   later, never threads already running (ABI 7 has no TSYNC), so it must
   come before the first thread: after ``connect()`` to the broker in the
   backends, before the guest's device channel; xenstored has no threads
   and restricts itself together with step 2.  It needs
   ``PR_SET_NO_NEW_PRIVS`` (set first).  No domain may execute anything
   (EXECUTE is granted nowhere), make device nodes, links or directories;
   reads go to the interpreter, its libraries and xdom; writes only where
   the kind keeps state (xenstored's store) or binds sockets (xenstored's
   socket directory, a guest's NBD export directories); TCP bind/connect
   and abstract unix sockets outside the domain are refused, and so are
   signals to processes outside it (except for a guest, which stops its
   workload).  See :mod:`.landlock` for what ABI 7 does not cover.
2. :func:`lock_down` (seccomp), once set-up is done: imports made, the
   broker connected, xenstore open, devices probed, just before the domain
   says it is ready.  The allow-list (:mod:`.policy`) is what the kind was
   measured to use after that point; everything else kills the whole
   process (``SECCOMP_RET_KILL_PROCESS``: the supervisor sees it die of
   SIGSYS, says so, and applies its restart policy, as for any crash).  The
   filter is installed on every thread at once (``TSYNC``).  A few calls
   get an errno instead (``clone3``: ENOSYS, so that glibc uses ``clone``
   whose flags can be checked).  A filter installed before start-up would
   have to allow ``execve``, module loading and every file syscall
   ``import`` makes; after it, none of those.

Modes (environment ``XDOM_CONFINE``, inherited from ``xdom up``):
``kill`` (default), ``log`` (unlisted syscalls are allowed and logged by
the kernel's audit: ``dmesg | grep type=1326``; Landlock is still
enforced; for finding what a list misses), ``off`` (nothing; says so in
the domain's log).

What is confined: xenstored (when it runs as a domain), blkback, netback
and guests, by default.  A ``program`` domain runs a command of the
topology's and stays unconfined unless it calls :func:`lock_down` itself
(kind ``"domain"``: the runtime and xenhost list).  A guest's workload is
the user's program, like a ``program``: the guest forks it before it
confines itself and lets it exec once the guest is ready
(:class:`xdom.domains.guest.HeldWorkload`), so it inherits neither the
filter, nor the Landlock domain, nor no-new-privs.

How a domain tells the toolstack: :func:`ready_message` is the line it
writes on its ready pipe (``ready seccomp=kill:blkback landlock=abi7``);
the supervisor checks it against ``/proc/<pid>/status`` (``Seccomp``,
``Seccomp_filters``, ``NoNewPrivs``), which the kernel keeps and the
domain cannot fake, and shows it in ``xdom ps``.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from . import landlock, policy, seccomp
from .seccomp import SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_LOG

__all__ = ["ENV", "ConfinementError", "lock_down", "mode", "ready_message", "report", "restrict_files"]

log = logging.getLogger("xdom.confinement")

ENV = "XDOM_CONFINE"
MODES = ("kill", "log", "off")


class ConfinementError(RuntimeError):
    pass


@dataclass
class _Applied:
    seccomp: str | None = None       # "kill:blkback"
    landlock: int | None = None      # the ABI it was applied with
    landlock_missing: str = ""       # why not, when the kernel has none


_applied = _Applied()


def mode() -> str:
    value = os.environ.get(ENV, "kill").strip().lower() or "kill"
    if value not in MODES:
        raise ConfinementError(f"{ENV}={value!r}: one of {', '.join(MODES)}")
    return value


def restrict_files(kind: str, *, state_dirs: Iterable[str] = (), socket_dirs: Iterable[str] = (),
                   open_by_path: bool = False, devices: Iterable[str] = ()) -> None:
    """Landlock for ``kind`` (see :func:`policy.ruleset`); call while this process runs one thread.

    A kernel without Landlock leaves the domain's files to DAC, with a
    warning; any other failure raises: the domain does not run less
    confined than it was asked to.
    """
    if mode() == "off":
        return
    rs = policy.ruleset(kind, state_dirs=[os.path.abspath(d) for d in state_dirs],
                        socket_dirs=[os.path.abspath(d) for d in socket_dirs],
                        open_by_path=open_by_path, devices=devices)
    seccomp.no_new_privs()
    try:
        _applied.landlock = landlock.restrict_self(rs)
    except landlock.LandlockError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise ConfinementError(f"{kind}: Landlock: {e}") from e
        _applied.landlock_missing = str(e)
        log.warning("%s: files not confined: %s", kind, e)


def lock_down(kind: str, extra: Iterable[str] = ()) -> str:
    """Install ``kind``'s seccomp allow-list on every thread of this process; returns :func:`report`.

    ``extra``: syscalls by name beyond the kind's list (never one of
    :data:`policy.NEVER`).  Raises ConfinementError if the filter cannot be
    installed (in ``kill`` and ``log`` modes).
    """
    m = mode()
    if m == "off":
        log.warning("%s: not confined (%s=off)", kind, ENV)
        return report()
    spec = policy.filter_spec(kind, SECCOMP_RET_KILL_PROCESS if m == "kill" else SECCOMP_RET_LOG, extra)
    try:
        seccomp.install_filter(seccomp.build_filter(spec))
    except (OSError, ValueError) as e:
        raise ConfinementError(f"{kind}: seccomp: {e}") from e
    _applied.seccomp = f"{m}:{kind}"
    log.info("%s confined: %s (%d syscalls allowed)", kind, report(), len(spec.allow))
    return report()


def report() -> str:
    """What this process applied, as ``xdom ps`` shows it: ``seccomp=kill:blkback landlock=abi7``, or ``none``."""
    parts = []
    if _applied.seccomp:
        parts.append(f"seccomp={_applied.seccomp}")
    if _applied.landlock:
        parts.append(f"landlock=abi{_applied.landlock}")
    return " ".join(parts) or "none"


def ready_message() -> bytes:
    """The line a domain writes on its ready pipe: readiness, then its confinement."""
    return f"ready {report()}\n".encode()
