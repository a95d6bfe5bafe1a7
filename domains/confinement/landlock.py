"""Landlock through ctypes: a ruleset of the paths a domain may use, then ``landlock_restrict_self``.

Sans-IO where it can be: :class:`Ruleset` is data (what is handled, which
paths get which rights) and :func:`access_for_abi` trims it to the kernel's
ABI; :func:`restrict_self` is the only part that talks to the kernel.

Semantics worth knowing (Linux 6.18, ABI 7):

* A Landlock domain applies to the calling **thread** and what it starts
  later, not to threads already running (no ``TSYNC`` before ABI 8).  So a
  domain restricts itself while it still has one thread: the caller
  checks, and :func:`restrict_self` refuses when Python runs more than one.
* Rights are checked when a file is opened (and on the path operations:
  create, remove, rename, link, truncate), not on descriptors already
  open.  A descriptor received over a socket (a disk image, a TAP) is used
  as it was opened: that is how blkback serves images it cannot open.
* Not covered by ABI 7: ``stat``/``chdir``/``getxattr`` on paths (a domain
  can still see which files exist), ``connect()`` to a pathname unix socket
  (DAC and the peers' ``SO_PEERCRED`` checks do that), and pseudo
  filesystems' private inodes (memfds, pipes, sockets) which are always
  usable.
* Scopes (ABI 6): with ``LANDLOCK_SCOPE_SIGNAL`` a domain can signal only
  processes in its own Landlock domain; with
  ``LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET`` it can reach only abstract unix
  sockets made inside it.
* Network (ABI 4): handling ``BIND_TCP``/``CONNECT_TCP`` with no rule
  refuses every TCP bind and connect.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import struct
import threading
from dataclasses import dataclass, field

from .syscalls import NR

__all__ = ["FS", "NET", "SCOPE", "LandlockError", "Ruleset", "abi_version", "access_for_abi",
           "restrict_self"]


class FS:
    EXECUTE = 1 << 0
    WRITE_FILE = 1 << 1
    READ_FILE = 1 << 2
    READ_DIR = 1 << 3
    REMOVE_DIR = 1 << 4
    REMOVE_FILE = 1 << 5
    MAKE_CHAR = 1 << 6
    MAKE_DIR = 1 << 7
    MAKE_REG = 1 << 8
    MAKE_SOCK = 1 << 9
    MAKE_FIFO = 1 << 10
    MAKE_BLOCK = 1 << 11
    MAKE_SYM = 1 << 12
    REFER = 1 << 13           # ABI 2
    TRUNCATE = 1 << 14        # ABI 3
    IOCTL_DEV = 1 << 15       # ABI 5

    # what a path-beneath rule on a non-directory may carry
    FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
    READ = READ_FILE | READ_DIR
    READ_EXEC = READ | EXECUTE
    # a directory the domain keeps files in: read, write, replace by rename
    STATE = READ | WRITE_FILE | MAKE_REG | REMOVE_FILE | TRUNCATE
    # a directory the domain binds unix sockets in
    SOCKETS = MAKE_SOCK | REMOVE_FILE


class NET:
    BIND_TCP = 1 << 0         # ABI 4
    CONNECT_TCP = 1 << 1


class SCOPE:
    ABSTRACT_UNIX_SOCKET = 1 << 0   # ABI 6
    SIGNAL = 1 << 1


# every FS right a given ABI knows (index: ABI version)
ABI_FS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1,
          6: (1 << 16) - 1, 7: (1 << 16) - 1}
ABI_NET = {4: 3, 5: 3, 6: 3, 7: 3}
ABI_SCOPE = {6: 3, 7: 3}

LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_RESTRICT_SELF_LOG_SAME_EXEC_OFF = 1 << 0   # ABI 7; we keep the default: denials are audited


class LandlockError(OSError):
    pass


@dataclass
class Ruleset:
    """What a domain may do with files: every right in ``handled`` is refused except under ``paths``."""
    handled_fs: int
    paths: dict[str, int] = field(default_factory=dict)     # path -> rights beneath it (a file: FILE_RIGHTS only)
    handled_net: int = 0
    scoped: int = 0

    def allow(self, path: str, rights: int) -> None:
        self.paths[path] = self.paths.get(path, 0) | rights


def access_for_abi(rs: Ruleset, abi: int) -> Ruleset:
    """``rs`` trimmed to what a kernel of Landlock ABI ``abi`` knows (best effort, as the man page advises)."""
    top = max(ABI_FS)
    fs = ABI_FS.get(abi, ABI_FS[top] if abi > top else 0)
    net = ABI_NET.get(abi, ABI_NET[top] if abi > top else 0)
    scope = ABI_SCOPE.get(abi, ABI_SCOPE[top] if abi > top else 0)
    return Ruleset(rs.handled_fs & fs, {p: r & rs.handled_fs & fs for p, r in rs.paths.items()},
                   rs.handled_net & net, rs.scoped & scope)


# ---- the I/O --------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(name: str, *args: object) -> int:
    return _libc.syscall(ctypes.c_long(NR[name]), *args)


def abi_version() -> int:
    """The running kernel's Landlock ABI, 0 when it has none (or it is disabled)."""
    rc = _syscall("landlock_create_ruleset", None, ctypes.c_size_t(0), ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return rc if rc > 0 else 0


def restrict_self(rs: Ruleset) -> int:
    """Apply ``rs`` (trimmed to this kernel) to the calling thread and what it starts; returns the ABI used.

    Paths that do not exist are skipped (a host without ``/lib64``, say).
    Raises LandlockError when the kernel has no Landlock or refuses; the
    caller decides whether running unconfined is acceptable.  Needs
    ``PR_SET_NO_NEW_PRIVS`` (set by the caller) or CAP_SYS_ADMIN.
    """
    if threading.active_count() != 1:
        raise LandlockError(_errno.EBUSY, "Landlock applies to the calling thread only: restrict before any "
                                          f"thread starts ({threading.active_count()} running)")
    abi = abi_version()
    if abi <= 0:
        raise LandlockError(_errno.EOPNOTSUPP, "this kernel has no Landlock (or it is disabled)")
    rs = access_for_abi(rs, abi)
    attr = struct.pack("=QQQ", rs.handled_fs, rs.handled_net, rs.scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    buf = ctypes.create_string_buffer(attr[:size], size)
    fd = _syscall("landlock_create_ruleset", buf, ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise LandlockError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    try:
        for path, rights in sorted(rs.paths.items()):
            _add_path(fd, path, rights)
        rc = _syscall("landlock_restrict_self", ctypes.c_int(fd), ctypes.c_uint32(0))
        if rc != 0:
            err = ctypes.get_errno()
            raise LandlockError(err, f"landlock_restrict_self: {os.strerror(err)}")
    finally:
        os.close(fd)
    return abi


def _add_path(ruleset_fd: int, path: str, rights: int) -> None:
    try:
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        if not os.path.isdir(path):
            rights &= FS.FILE_RIGHTS
        if not rights:
            return
        rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, pfd), 12)
        rc = _syscall("landlock_add_rule", ctypes.c_int(ruleset_fd), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                      rule, ctypes.c_uint32(0))
        if rc != 0:
            err = ctypes.get_errno()
            raise LandlockError(err, f"landlock_add_rule({path}, {rights:#x}): {os.strerror(err)}")
    finally:
        os.close(pfd)
