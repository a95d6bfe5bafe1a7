"""A domain's log kept to a bound: its tail, once it passes ``LOG_MAX``.

A domain writes its log itself (stdout and stderr are the file, opened
``O_APPEND``; a VM's QEMU log and serial console likewise), so whatever
runs there -- a compromised driver domain, a guest's workload, a VM's
kernel -- can write without end, into the filesystem that also holds the
other domains' logs and xenstored's store.  The supervisor looks at each
log once a health round (``lifecycle_driver``) and cuts one past
``LOG_MAX`` down to its last ``LOG_KEEP`` bytes, under a line saying so.
The writer's ``O_APPEND`` writes go on at the new end.  So a log is
bounded by ``LOG_MAX`` plus what its domain writes in one round, not by
the disk; what a flood pushed out is lost, the last of it kept.
"""

from __future__ import annotations

import os
import stat

__all__ = ["LOG_KEEP", "LOG_MAX", "bound_log"]

LOG_MAX = 32 << 20
LOG_KEEP = 1 << 20


def bound_log(path: str, limit: int = LOG_MAX, keep: int = LOG_KEEP) -> int | None:
    """Cut ``path`` to its last ``keep`` bytes if it is longer than ``limit``: the size it had, or None."""
    try:
        if os.stat(path, follow_symlinks=False).st_size <= limit:     # the usual answer, without a descriptor
            return None
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None                     # not there (yet), or not a file we may touch
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size <= limit:
            return None
        tail = os.pread(fd, keep, st.st_size - keep)
        os.ftruncate(fd, 0)
        start = tail.find(b"\n") + 1 if b"\n" in tail[:4096] else 0     # from a line's start, where one is near
        os.write(fd, f"--- xdom: this log passed {limit >> 20} MiB ({st.st_size >> 20} MiB): cut to its last "
                     f"{(len(tail) - start) >> 10} KiB\n".encode() + tail[start:])
        return st.st_size
    finally:
        os.close(fd)
