"""fallocate(2) with its mode flags (Python's ``os.posix_fallocate`` has none), through the interpreter's libc."""

from __future__ import annotations

import ctypes
import errno
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)     # the interpreter's own libc (find_library runs ldconfig)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(fd, mode, offset, length)``; OSError on failure (EINTR retried)."""
    while _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        if e != errno.EINTR:
            raise OSError(e, os.strerror(e))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``length`` bytes at ``offset``, keeping the file's size (they read back as zeros)."""
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
