"""What a descriptor from the front end must be before the I/O shell uses it.

The front end (the VMM) chooses every descriptor it passes, and a wrong one
must cost it a refusal, never the guest domain: ``server`` runs in the
process that also serves the VM's other devices (and, for vhost-user-net,
on netfront's data thread), so a fault there takes all of them down.

* Memory (a region of the memory table, the inflight area): mapped shared,
  it is only safe if it stays as long as the mapping.  A page of a mapping
  past the end of its file is a SIGBUS at first access -- in Python, the
  death of the process -- so the fd must be a sealable file (a memfd) with
  ``F_SEAL_SHRINK`` (seals are never removed: once there, nobody can shrink
  it under us) and at least as long as what is mapped.  The seal is checked
  before the size, so the size cannot change in between.  QEMU's
  ``memory-backend-memfd`` seals its memfd so by default (``seal=on``), as
  the broker seals the frames it hands out.  Not hugetlbfs (``hugetlb=on``):
  the seal does not stop holes punched in it, and a hole the huge page pool
  cannot fill again is a SIGBUS at our next access.
* Kick fds: an eventfd, not in semaphore mode.  Anything else can stay
  readable with one write of the front end's: a semaphore eventfd given a
  count of 2**63 reads 1 at a time, a pipe or socket 8 bytes at a time --
  the ring processed on every turn of the loop, for ever, for one kick.
* Ring eventfds: written and read without blocking (``O_NONBLOCK``; QEMU's
  own eventfds are non-blocking already): a blocked loop serves nothing.
  The descriptor is shared with the front end, so the flag is set on the
  open file description both sides use; that is what QEMU sets anyway.

No protocol decisions here: ``server`` asks, and carries out the answer.
"""

from __future__ import annotations

import fcntl
import os

from ..hostsys.files import HUGETLBFS_MAGIC, filesystem_magic

__all__ = ["INFLIGHT_SEALS", "kick_fd_problem", "memory_fd_problem", "sealed_memfd", "set_nonblocking"]

#: The seals of the inflight area the back end makes: the front end gets it and could resize it otherwise.
INFLIGHT_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def memory_fd_problem(fd: int, end: int) -> str | None:
    """Why the first ``end`` bytes of ``fd`` cannot be mapped shared without risking a SIGBUS, or None."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        return f"not a sealable memfd ({e.strerror})"
    if not seals & fcntl.F_SEAL_SHRINK:
        return "not sealed against shrinking (F_SEAL_SHRINK): it could be truncated under the mapping"
    try:
        size = os.fstat(fd).st_size
        magic = filesystem_magic(fd)
    except OSError as e:
        return f"fstat: {e.strerror}"
    if magic == HUGETLBFS_MAGIC:
        return "on hugetlbfs: holes punched in it are not stopped by the seal (use memory without hugetlb)"
    if size < end:
        return f"{size} bytes long, {end} would be mapped"
    return None


def kick_fd_problem(fd: int) -> str | None:
    """Why ``fd`` (non-blocking already) cannot be a ring's kick fd, or None.

    It must be an eventfd (``/proc/self/fdinfo`` names its count) in counter mode, which is told by
    what it does, on any kernel: after it is drained, a write of 2 reads back 2 (or more, with the
    front end's own kicks), where a semaphore reads 1.  The kicks pending are consumed: the caller
    processes the ring after."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            info = f.read()
    except OSError as e:
        return f"not checkable in /proc/self/fdinfo ({e.strerror})"
    if b"\neventfd-count:" not in info:
        return "not an eventfd"
    try:
        if os.get_blocking(fd):
            return "a blocking eventfd"
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        os.eventfd_write(fd, 2)
        count = os.eventfd_read(fd)
    except BlockingIOError:
        return "an eventfd that stays at its limit after a read (semaphore mode)"
    except OSError as e:
        return f"an eventfd that cannot be read and written ({e.strerror})"
    if count < 2:
        return "an eventfd in semaphore mode: one write would have its ring processed on every turn of the loop"
    return None


def sealed_memfd(name: str, size: int) -> int:
    """A new memfd of ``size`` zero bytes sealed with ``INFLIGHT_SEALS`` (raises OSError)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, INFLIGHT_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def set_nonblocking(fd: int) -> None:
    """Make ``fd`` non-blocking if it can be (a descriptor that cannot fails later, where it is used)."""
    try:
        os.set_blocking(fd, False)
    except OSError:
        pass
