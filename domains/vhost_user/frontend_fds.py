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
  the broker seals the frames it hands out.
* Ring eventfds: written and read without blocking (``O_NONBLOCK``; QEMU's
  own eventfds are non-blocking already): a blocked loop serves nothing.
  The descriptor is shared with the front end, so the flag is set on the
  open file description both sides use; that is what QEMU sets anyway.

No protocol decisions here: ``server`` asks, and carries out the answer.
"""

from __future__ import annotations

import fcntl
import os

__all__ = ["INFLIGHT_SEALS", "memory_fd_problem", "sealed_memfd", "set_nonblocking"]

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
    except OSError as e:
        return f"fstat: {e.strerror}"
    if size < end:
        return f"{size} bytes long, {end} would be mapped"
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
