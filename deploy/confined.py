"""The toolstack's view of a domain's confinement: what ``xdom ps`` shows, and why a domain died of SIGSYS.

A domain confines itself (``xdom.domains.confinement``) and says how on
its ready pipe (``ready seccomp=kill:blkback landlock=abi7``).  The
supervisor does not take that on trust where the kernel can tell:
``/proc/<pid>/status`` gives ``Seccomp`` (2: a filter), ``Seccomp_filters``
and ``NoNewPrivs``.  A claimed filter the kernel does not show is not
shown; Landlock has no such trace in ``/proc``, so it is shown as the
domain reported it.

A filter's kill is the kernel's ``SIGSYS``.  Which syscall it was is only
in the kernel's audit record (``type=1326 ... pid=P ... syscall=N ...
code=0x80000000``), printed to the kernel log when no audit daemon takes
it: :class:`SeccompKills` reads ``/dev/kmsg`` (root only) from the
supervisor's start for the record of a given pid.
"""

from __future__ import annotations

import errno
import os
import re
import select
import time
from typing import Any

from xdom.domains.confinement.syscalls import NAME

__all__ = ["SeccompKills", "confinement_of", "parse_ready"]

_AUDIT = re.compile(rb"type=1326 .*? pid=(\d+) .*? syscall=(\d+) .*? code=(0x[0-9a-f]+)")
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0


def parse_ready(data: bytes) -> str:
    """The confinement a domain reported with its readiness (``ready ...``); "" when it said none."""
    words = data.decode(errors="replace").split()
    return " ".join(w for w in words[1:] if "=" in w and len(w) < 64)[:200] if words[:1] == ["ready"] else ""


def _proc_status(pid: int) -> dict[str, str]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("Seccomp", "Seccomp_filters", "NoNewPrivs"):
                    out[key] = value.strip()
    except OSError:
        pass
    return out


def confinement_of(pid: int | None, reported: str) -> dict[str, Any] | None:
    """What ``xdom ps --json`` gives as a domain's ``confinement`` (None when it has no process).

    The seccomp filter is the kernel's word (``/proc/PID/status``); the
    domain's only names it.  Landlock shows nowhere outside the process, so
    the ABI the domain reports is shown only where the kernel shows the
    filter its lock-down installs after Landlock: a process that never
    locked down (one compromised before it did) claims nothing."""
    if pid is None:
        return None
    st = _proc_status(pid)
    claims = dict(w.split("=", 1) for w in reported.split() if "=" in w)
    filtered = st.get("Seccomp") == "2"
    seccomp = (claims.get("seccomp") or "filter") if filtered else None
    landlock = claims.get("landlock") if filtered else None
    summary = " ".join(f"{k}={v}" for k, v in (("seccomp", seccomp), ("landlock", landlock)) if v) or "none"
    return {"seccomp": seccomp, "seccomp_filters": int(st.get("Seccomp_filters", "0") or 0),
            "no_new_privs": st.get("NoNewPrivs") == "1", "landlock": landlock, "summary": summary}


class SeccompKills:
    """The kernel log's seccomp records, read from :meth:`open` on (``None`` fd: no kmsg to read)."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self._seen: dict[int, int] = {}          # pid -> syscall, of kill records read so far

    def open(self) -> None:
        """Start reading: records from now on (none without root or a kernel log)."""
        if self.fd is not None:
            return
        try:
            self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            self.close()

    def syscall_of(self, pid: int, patience: float = 0.3) -> int | None:
        """The syscall whose filter verdict killed ``pid``, if the kernel logged it (waiting up to ``patience``:
        the audit record is printed by a kernel thread, possibly just after the death is seen)."""
        deadline = time.monotonic() + patience
        while self.fd is not None:
            self._drain()
            if pid in self._seen:
                return self._seen.pop(pid)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return self._seen.pop(pid, None)
        return None

    def _drain(self) -> None:
        assert self.fd is not None
        while True:
            try:
                rec = os.read(self.fd, 8192)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EPIPE:       # overwritten before we read it: go on from the next
                    continue
                return
            if not rec:
                return
            m = _AUDIT.search(rec)
            if m and int(m.group(3), 16) in (SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_KILL_THREAD):
                self._seen[int(m.group(1))] = int(m.group(2))
                if len(self._seen) > 1024:
                    self._seen.pop(next(iter(self._seen)))

    def describe(self, pid: int | None) -> str:
        """The reason given for a death by SIGSYS."""
        nr = self.syscall_of(pid) if pid is not None else None
        if nr is None:
            return "its seccomp filter refused a syscall (which one is not in the kernel log)"
        return f"its seccomp filter refused syscall {nr} ({NAME.get(nr, 'unknown')})"

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
