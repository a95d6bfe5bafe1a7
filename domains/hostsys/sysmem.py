"""Page mappings through libc, so that a mapping costs no file descriptor.

Python 3.11's ``mmap.mmap`` keeps a dup of the fd for every mapping; a
backend holding thousands of grant mappings would hold thousands of fds
against a hard limit of 20000.  Mapping with ``libc.mmap`` and closing the fd
at once costs nothing but a VMA.
"""

from __future__ import annotations

import ctypes
import os

PROT_NONE = 0
PROT_READ = 1
PROT_WRITE = 2
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)     # the interpreter's own libc (find_library runs ldconfig)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.restype = ctypes.c_int
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _oserror(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def mmap(addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """libc mmap; returns the address or raises OSError with errno."""
    res: int | None = _libc.mmap(addr or None, length, prot, flags, fd, offset)
    if res is None or res == MAP_FAILED:
        raise _oserror("mmap")
    return res


def munmap(addr: int, length: int) -> None:
    if _libc.munmap(addr, length) != 0:
        raise _oserror("munmap")


def mprotect(addr: int, length: int, prot: int) -> None:
    if _libc.mprotect(addr, length, prot) != 0:
        raise _oserror("mprotect")


def view(addr: int, length: int, readonly: bool = False) -> memoryview:
    """A memoryview over raw memory at ``addr``.

    The view does not own the mapping: the owner must drop every view before
    unmapping, or a later access faults.
    """
    mv = memoryview((ctypes.c_char * length).from_address(addr)).cast("B")
    return mv.toreadonly() if readonly else mv


