"""Whether a file in a run directory can be believed: only root (or this process's own uid) could have put it there.

The broker and the toolstack keep sockets and a pid file in a run directory
and connect to them or signal the pid they hold.  A domain that could write
that directory could replace the broker's hypercall socket, plant a pid file
or sit in the middle of a socket, so before a directory, or a file in it, is
trusted:

* the directory is a real directory (not a symlink) owned by root or by this
  process's effective uid, and nobody else can write it: no group or other
  write bit, no POSIX ACL entry (named user, named group, owning group)
  granting write through the mask;
* every directory above it is the same, or sticky (``/tmp``: others may add
  entries but cannot rename or remove ours);
* a file in it is of the kind expected (``lstat``: a socket, a regular file,
  a symlink), owned by root or this uid, and (a regular file) writable by
  nobody else.

:class:`UntrustedPath` says which path failed and why, in words a person can
act on.
"""

from __future__ import annotations

import errno
import os
import stat
import struct

__all__ = ["UntrustedPath", "check_dir", "check_file", "other_writers", "trusted_owners"]

_ACL_XATTR = "system.posix_acl_access"
_ACL_ENTRY = struct.Struct("<HHI")
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_W = 2


class UntrustedPath(Exception):
    """A path someone other than root (or this uid) could have written: not believed."""


def trusted_owners() -> set[int]:
    return {0, os.geteuid()}


def _acl(path: str) -> list[tuple[int, int, int]] | None:
    try:
        raw = os.getxattr(path, _ACL_XATTR, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise
    if len(raw) < 4 or struct.unpack_from("<I", raw)[0] != 2:
        return None
    return [_ACL_ENTRY.unpack_from(raw, 4 + i * _ACL_ENTRY.size) for i in range((len(raw) - 4) // _ACL_ENTRY.size)]


def other_writers(path: str, st: os.stat_result | None = None) -> list[str]:
    """Who besides the owner can write ``path`` (not following a symlink), in words; empty when nobody."""
    st = st if st is not None else os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return []       # a symlink's own mode means nothing; what matters is who can replace it (its directory)
    entries = _acl(path)
    if not entries:
        out = []
        if st.st_mode & stat.S_IWGRP:
            out.append(f"group {st.st_gid} (mode {stat.S_IMODE(st.st_mode):04o})")
        if st.st_mode & stat.S_IWOTH:
            out.append(f"everyone (mode {stat.S_IMODE(st.st_mode):04o})")
        return out
    mask = next((p for tag, p, _ in entries if tag == _MASK), 7)
    out = []
    for tag, perm, eid in entries:
        if tag == _USER and perm & mask & _W:
            out.append(f"uid {eid} (ACL user:{eid}:w)")
        elif tag == _GROUP and perm & mask & _W:
            out.append(f"gid {eid} (ACL group:{eid}:w)")
        elif tag == _GROUP_OBJ and perm & mask & _W:
            out.append(f"group {st.st_gid} (ACL group::w)")
        elif tag == _OTHER and perm & _W:
            out.append("everyone (ACL other::w)")
    return out


def _problem(path: str, st: os.stat_result, *, ancestor: bool) -> str | None:
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid not in trusted_owners():
        return f"is owned by uid {st.st_uid}, not by root or uid {os.geteuid()}"
    writers = other_writers(path, st)
    if writers and not (ancestor and st.st_mode & stat.S_ISVTX):
        return f"can be written by {', '.join(writers)}"
    return None


def _chain(path: str) -> list[str]:
    """``path`` and every directory above it, for the path as given and as resolved (symlinks followed)."""
    seen: list[str] = []
    for p in (os.path.abspath(path), os.path.realpath(path)):
        while True:
            if p not in seen:
                seen.append(p)
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
    return seen


def check_dir(path: str, what: str = "directory", sticky_ok: bool = False) -> None:
    """Raise UntrustedPath unless ``path`` and every directory above it is writable only by root or this uid.

    ``path`` itself must not be a symlink, nor sticky and writable by others
    unless ``sticky_ok``; an ancestor may be (``/tmp``).  ``what`` names the
    directory in the message ("run directory").  FileNotFoundError when
    ``path`` does not exist.
    """
    path = os.path.abspath(path)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UntrustedPath(f"the {what} {path} is a symlink; give the directory itself")
    problem = _problem(path, st, ancestor=sticky_ok)
    if problem is not None:
        raise UntrustedPath(f"refusing the {what} {path}: it {problem}; only root (or uid {os.geteuid()}) may "
                            f"write it, else a domain could replace the sockets and pid file kept there "
                            f"(fix: chown root and chmod go-w it, setfacl -b it, or remove it)")
    for p in _chain(path)[1:]:
        problem = _problem(p, os.stat(p), ancestor=True)
        if problem is not None:
            raise UntrustedPath(f"refusing the {what} {path}: the directory {p} above it {problem}; whoever "
                                f"can write {p} can replace {path} with a directory of their own")


def check_file(path: str, kind: str, what: str | None = None) -> os.stat_result:
    """``lstat`` ``path`` and raise UntrustedPath unless it is a ``kind`` ("socket", "file", "symlink")
    owned by root or this uid, in a directory :func:`check_dir` accepts; a regular file must be writable
    by nobody else.  FileNotFoundError when it does not exist."""
    check_dir(os.path.dirname(os.path.abspath(path)))
    st = os.lstat(path)
    name = what or path
    want = {"socket": stat.S_ISSOCK, "file": stat.S_ISREG, "symlink": stat.S_ISLNK}[kind]
    if not want(st.st_mode):
        raise UntrustedPath(f"refusing {name}: it is not a {kind}")
    if st.st_uid not in trusted_owners():
        raise UntrustedPath(f"refusing {name}: it is owned by uid {st.st_uid}, not by root or uid {os.geteuid()}; "
                            f"a file another user wrote is not believed")
    if kind == "file":
        writers = other_writers(path, st)
        if writers:
            raise UntrustedPath(f"refusing {name}: it can be written by {', '.join(writers)}")
    return st
