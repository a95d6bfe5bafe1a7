"""Page mappings through libc, so that a mapping costs no file descriptor.

Python 3.11's ``mmap.mmap`` keeps a dup of the fd for every mapping; a
backend holding thousands of grant mappings would hold thousands of fds
against a hard limit of 20000.  Mapping with ``libc.mmap`` and closing the fd
at once costs nothing but a VMA.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
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

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.restype = ctypes.c_int
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _oserror(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def mmap(addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """libc mmap; returns the address or raises OSError with errno."""
    res = _libc.mmap(addr or None, length, prot, flags, fd, offset)
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


_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong,
                                   ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
_libc.process_vm_writev.restype = ctypes.c_ssize_t
_libc.process_vm_writev.argtypes = _libc.process_vm_readv.argtypes


class VmCopier:
    """Copies between the memories of processes (needs ptrace rights over them).

    One bounce buffer and two iovecs are set up once: a copy is two
    syscalls and no Python objects, because grant copies are per-page and
    many.  Both ends see the target processes' own page protections: a
    read-only or unmapped page is EFAULT, never a fault of the caller.
    """

    def __init__(self, max_len: int = 1 << 19) -> None:
        self._buf = ctypes.create_string_buffer(max_len)
        self._max = max_len
        self._local = _IoVec(ctypes.addressof(self._buf), 0)
        self._remote = _IoVec(0, 0)
        self._lp = ctypes.addressof(self._local)
        self._rp = ctypes.addressof(self._remote)
        self._self = os.getpid()

    def copy(self, src_pid: int, src_addr: int, dst_pid: int, dst_addr: int, length: int) -> None:
        if length > self._max:
            raise ValueError("copy longer than the bounce buffer")
        self._local.iov_len = self._remote.iov_len = length
        self._remote.iov_base = src_addr
        n = _libc.process_vm_readv(src_pid, self._lp, 1, self._rp, 1, 0)
        if n != length:
            raise _oserror("process_vm_readv") if n < 0 else OSError(errno.EFAULT, "short read")
        self._remote.iov_base = dst_addr
        n = _libc.process_vm_writev(dst_pid, self._lp, 1, self._rp, 1, 0)
        if n != length:
            raise _oserror("process_vm_writev") if n < 0 else OSError(errno.EFAULT, "short write")

    def copy_many(self, src_pid: int, srcs: list[tuple[int, int]], dst_pid: int, dsts: list[int]) -> bool:
        """Copy each (src_addr, length) of ``src_pid`` to the matching ``dsts`` address of ``dst_pid``.

        Two syscalls for the whole batch.  Returns False if either side
        faulted part-way (which piece is unknown): the caller then copies
        one by one to learn each piece's fate.
        """
        total = sum(n for _, n in srcs)
        if total > self._max or not srcs:
            return False
        remote = (_IoVec * len(srcs))(*(_IoVec(a, n) for a, n in srcs))
        self._local.iov_len = total
        if _libc.process_vm_readv(src_pid, self._lp, 1, ctypes.addressof(remote), len(srcs), 0) != total:
            return False
        for iov, addr in zip(remote, dsts):
            iov.iov_base = addr
        return _libc.process_vm_writev(dst_pid, self._lp, 1, ctypes.addressof(remote), len(srcs), 0) == total
