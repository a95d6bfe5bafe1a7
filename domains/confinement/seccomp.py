"""A seccomp-BPF allow-list: built as bytes by a pure function, installed with prctl + seccomp(2) through ctypes.

The program (classic BPF over ``struct seccomp_data``) is, in order:

1. the architecture token must be ``AUDIT_ARCH_X86_64``, else the process
   is killed (an ``int 0x80`` i386 call from a 64-bit process carries
   another token and other numbers: allowing it would open a second,
   unfiltered table);
2. a syscall number with the x32 bit (``0x40000000``) kills the process
   (same token, other ABI);
3. syscalls whose allowance depends on an argument (``clone`` flags:
   threads only, no namespaces; ``ioctl`` requests; ``socket``
   families), each a self-contained block that ends in a return;
4. the unconditional allows, one ``jeq; ret ALLOW`` pair each (no jump
   ever spans more than a block, so the 8-bit jump offsets of classic BPF
   never overflow however long the list);
5. the calls answered with an errno instead (``clone3`` gets ENOSYS, so
   glibc falls back to ``clone``, whose flags a filter can read: clone3
   passes them in memory, out of BPF's reach);
6. the default action: ``SECCOMP_RET_KILL_PROCESS``, or ``SECCOMP_RET_LOG``
   in the debugging mode.

Argument checks read the low 32 bits of the argument only (``args[i]`` at
offset 16 + 8 i, little-endian).  That is sound for the arguments checked
here because the kernel itself reads them as 32-bit ints (``socket``'s
family, ``ioctl``'s request) or keeps every flag a check looks at in the
low word (``clone``'s namespace flags).

Speed: the filter looks at nothing but the arch and the number for an
unconditionally allowed call, so the kernel's seccomp action cache (Linux
5.11+) learns those calls are always allowed and skips the program for
them: the data path (``read``/``write``/``preadv``/``pwritev``/``futex``/
``ppoll``/``eventfd`` writes) pays nothing.  Only ``clone``, ``ioctl`` and
``socket`` run the program, and they come first.

The filter is installed with ``SECCOMP_FILTER_FLAG_TSYNC``: every thread
of the process gets it at once (a thread already running xenstore watches
or a ring must not stay unfiltered), and it is inherited by every thread
and child started later.  ``PR_SET_NO_NEW_PRIVS`` comes first: without
CAP_SYS_ADMIN the kernel refuses a filter otherwise, and it keeps a
filtered process from gaining privileges through a set-uid exec.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from .syscalls import NR, X32_SYSCALL_BIT

__all__ = ["AUDIT_ARCH_X86_64", "ArgBits", "ArgIn", "FilterSpec", "SeccompError", "build_filter",
           "install_filter", "no_new_privs", "SECCOMP_RET_ALLOW", "SECCOMP_RET_ERRNO",
           "SECCOMP_RET_KILL_PROCESS", "SECCOMP_RET_LOG"]

AUDIT_ARCH_X86_64 = 0xC000003E

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39

# classic BPF opcodes
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20
BPF_JMP_JEQ_K = 0x05 | 0x10 | 0x00
BPF_JMP_JGE_K = 0x05 | 0x30 | 0x00
BPF_JMP_JSET_K = 0x05 | 0x40 | 0x00
BPF_RET_K = 0x06 | 0x00
BPF_ALU_AND_K = 0x04 | 0x50 | 0x00
BPF_MAXINSNS = 4096

OFF_NR = 0
OFF_ARCH = 4
OFF_ARGS = 16

_INSN = struct.Struct("=HBBI")


@dataclass(frozen=True)
class ArgIn:
    """Allowed when argument ``index`` (low 32 bits) is one of ``values``."""
    index: int
    values: frozenset[int]


@dataclass(frozen=True)
class ArgBits:
    """Allowed when argument ``index`` (low 32 bits) has none of the bits of ``forbidden`` and all of ``required``."""
    index: int
    forbidden: int = 0
    required: int = 0


ArgCheck = ArgIn | ArgBits


@dataclass(frozen=True)
class FilterSpec:
    """What a filter allows: by syscall number, unconditionally (None) or under one argument check."""
    allow: Mapping[int, ArgCheck | None]
    errno: Mapping[int, int] = field(default_factory=dict)     # syscall -> errno it gets instead
    default: int = SECCOMP_RET_KILL_PROCESS

    @classmethod
    def by_name(cls, allow: Mapping[str, ArgCheck | None], errno: Mapping[str, int] | None = None,
                default: int = SECCOMP_RET_KILL_PROCESS) -> FilterSpec:
        unknown = sorted(n for n in [*allow, *(errno or {})] if n not in NR)
        if unknown:
            raise ValueError(f"unknown x86_64 syscalls: {', '.join(unknown)}")
        return cls({NR[n]: c for n, c in allow.items()}, {NR[n]: e for n, e in (errno or {}).items()}, default)


class SeccompError(OSError):
    pass


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    if not (0 <= jt <= 255 and 0 <= jf <= 255):
        raise ValueError("BPF jump out of range")
    return _INSN.pack(code, jt, jf, k & 0xFFFFFFFF)


def _ret(action: int) -> bytes:
    return _insn(BPF_RET_K, action)


def _arg_block(nr: int, check: ArgCheck, default: int) -> list[bytes]:
    """``if nr == N: load the argument; allow if the check holds, else the default`` (ends in a return)."""
    body = [_insn(BPF_LD_W_ABS, OFF_ARGS + 8 * check.index)]
    if isinstance(check, ArgBits):
        if check.forbidden:         # jset: any forbidden bit set -> the default action
            body.append(_insn(BPF_JMP_JSET_K, check.forbidden, 3 if check.required else 1, 0))
        if check.required:          # A &= required; all of them there -> allow
            body += [_insn(BPF_ALU_AND_K, check.required), _insn(BPF_JMP_JEQ_K, check.required, 0, 1)]
        body += [_ret(SECCOMP_RET_ALLOW), _ret(default)]
    else:
        for value in sorted(check.values):
            body += [_insn(BPF_JMP_JEQ_K, value, 0, 1), _ret(SECCOMP_RET_ALLOW)]
        body.append(_ret(default))
    if len(body) > 255:
        raise ValueError(f"syscall {nr}: argument check too long for one BPF jump")
    return [_insn(BPF_JMP_JEQ_K, nr, 0, len(body))] + body


def build_filter(spec: FilterSpec) -> bytes:
    """The BPF program for ``spec``, as the bytes of its ``struct sock_filter`` array."""
    overlap = set(spec.allow) & set(spec.errno)
    if overlap:
        raise ValueError(f"syscalls both allowed and refused: {sorted(overlap)}")
    for nr in [*spec.allow, *spec.errno]:
        if not 0 <= nr < X32_SYSCALL_BIT:
            raise ValueError(f"syscall number {nr} out of range")
    for e in spec.errno.values():
        if not 0 < e < 4096:
            raise ValueError(f"errno {e} out of range")
    reload_nr = _insn(BPF_LD_W_ABS, OFF_NR)
    prog = [
        _insn(BPF_LD_W_ABS, OFF_ARCH),
        _insn(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        _ret(SECCOMP_RET_KILL_PROCESS),                    # another architecture: always fatal
        reload_nr,
        _insn(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 1),
        _ret(SECCOMP_RET_KILL_PROCESS),                    # x32: always fatal
    ]
    for nr in sorted(n for n, c in spec.allow.items() if c is not None):
        prog += _arg_block(nr, spec.allow[nr], spec.default)   # type: ignore[arg-type]
    for nr in sorted(n for n, c in spec.allow.items() if c is None):
        prog += [_insn(BPF_JMP_JEQ_K, nr, 0, 1), _ret(SECCOMP_RET_ALLOW)]
    for nr in sorted(spec.errno):
        prog += [_insn(BPF_JMP_JEQ_K, nr, 0, 1), _ret(SECCOMP_RET_ERRNO | spec.errno[nr])]
    prog.append(_ret(spec.default))
    if len(prog) > BPF_MAXINSNS:
        raise ValueError(f"filter of {len(prog)} instructions is over the kernel's {BPF_MAXINSNS}")
    return b"".join(prog)


# ---- the I/O: prctl and seccomp(2) ---------------------------------------------------------------

class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def no_new_privs() -> None:
    """``PR_SET_NO_NEW_PRIVS``: needed before a filter (or a Landlock domain) without CAP_SYS_ADMIN."""
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise SeccompError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    if _libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
        raise SeccompError(_errno.EPERM, "PR_SET_NO_NEW_PRIVS did not take effect")


def install_filter(program: bytes, tsync: bool = True) -> None:
    """Install ``program`` (from :func:`build_filter`) on this process: every thread with ``tsync``."""
    n, rest = divmod(len(program), _INSN.size)
    if rest or not 0 < n <= BPF_MAXINSNS:
        raise ValueError("not a BPF program")
    no_new_privs()
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(n, ctypes.cast(buf, ctypes.c_void_p))
    flags = SECCOMP_FILTER_FLAG_TSYNC if tsync else 0
    rc = _libc.syscall(ctypes.c_long(NR["seccomp"]), ctypes.c_long(SECCOMP_SET_MODE_FILTER), ctypes.c_long(flags),
                       ctypes.byref(fprog))
    if rc != 0:
        if rc > 0:      # TSYNC: the id of a thread that could not be synchronised
            raise SeccompError(_errno.EBUSY, f"seccomp: thread {rc} could not take the filter")
        err = ctypes.get_errno()
        raise SeccompError(err, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(err)}")
