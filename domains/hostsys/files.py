"""What Python's ``os`` lacks for files, through the interpreter's libc: fallocate(2) with its mode
flags (``os.posix_fallocate`` has none) and fstatfs(2)'s filesystem type (``os.fstatvfs`` drops it)."""

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
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_fstatfs.restype = ctypes.c_int

#: ``statfs.f_type`` of hugetlbfs (linux/magic.h), where ``memfd_create(MFD_HUGETLB)`` files live.
HUGETLBFS_MAGIC = 0x958458F6
#: Bytes enough for ``struct statfs`` on every Linux ABI (120 on x86_64); ``f_type`` is its first word.
_STATFS_SIZE = 256


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(fd, mode, offset, length)``; OSError on failure (EINTR retried)."""
    while _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        if e != errno.EINTR:
            raise OSError(e, os.strerror(e))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``length`` bytes at ``offset``, keeping the file's size (they read back as zeros)."""
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def filesystem_magic(fd: int) -> int:
    """The type (``f_type``, a magic number of linux/magic.h) of the filesystem ``fd``'s file is on."""
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    while _fstatfs(fd, buf) != 0:
        e = ctypes.get_errno()
        if e != errno.EINTR:
            raise OSError(e, os.strerror(e))
    f_type: int = ctypes.c_ulong.from_buffer(buf).value
    return f_type
