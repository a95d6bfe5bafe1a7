"""The lock that closes the grant in-use race, shared by granter and broker.

Xen closes the race between "granter ends access" and "hypervisor pins the
entry" with a compare-and-swap on the entry's flags.  Python has no CAS on
shared memory, so both sides take an open-file-description lock
(``F_OFD_SETLK``) on the entry's 8-byte range of the grant-table memfd and do
their read-check-write under it:

* the granter (``end_access``) waits for the lock: the broker holds it for a
  few microseconds only;
* the broker never waits on a lock a guest may hold: it tries a bounded number
  of times and answers GNTST_eagain, so a hostile granter cannot stall it.

OFD locks belong to an open file description, not a process: granter and
broker must each hold their *own* description of the table memfd (the broker
hands the domain a fresh ``open("/proc/self/fd/N")``, never a dup of its own),
otherwise the locks would not exclude each other.  Two descriptions in one
process exclude each other too, which the local xenhost variant relies on.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ..abi.grant_table import GRANT_ENTRY_V1_SIZE

# struct flock on Linux/x86_64: l_type, l_whence (short), l_start, l_len
# (off_t), l_pid (pid_t) + padding.  l_pid must be 0 for OFD locks.
_FLOCK = struct.Struct("hh4xqqi4x")


def _flock(kind: int, ref: int, count: int = 1) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, ref * GRANT_ENTRY_V1_SIZE, count * GRANT_ENTRY_V1_SIZE, 0)


def lock_entry(fd: int, ref: int, wait: bool) -> bool:
    """Lock grant entry ``ref``; returns False if ``wait`` is False and it is held."""
    return lock_entries(fd, ref, 1, wait)


def lock_entries(fd: int, first: int, count: int, wait: bool) -> bool:
    """Lock entries ``first .. first+count-1`` in one call (all or none).

    A batch of copies names many entries of one table, mostly neighbours: one
    lock over their span costs one syscall instead of one per entry.  The
    granter waiting on one of them waits no longer than for a single entry.
    """
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, first, count))
    except OSError as e:
        if not wait and e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def unlock_entry(fd: int, ref: int) -> None:
    unlock_entries(fd, ref, 1)


def unlock_entries(fd: int, first: int, count: int) -> None:
    """Release every lock this description holds on entries ``first .. first+count-1``."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, first, count))


def reopen(fd: int, flags: int = os.O_RDWR | os.O_CLOEXEC) -> int:
    """A new open file description of the same file (its own OFD locks)."""
    return os.open(f"/proc/self/fd/{fd}", flags)
