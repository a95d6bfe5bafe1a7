"""Giving one domain's uid access to one file or directory, with a POSIX ACL entry.

With a uid per domain, blkback must open the disk images it serves and a
guest must create its NBD export socket, but neither should own those paths
nor open them to everyone.  What a Xen hotplug script does for a driver
domain, the supervisor does here: it adds ``user:<uid>:<perms>`` to the
path's access ACL (keeping every entry already there) and ``user:<uid>:x``
to each ancestor directory the uid could not otherwise traverse.

The ACL is written as the kernel's ``system.posix_acl_access`` xattr
(``struct posix_acl_xattr_header`` + entries), so no ``setfacl`` is needed.

Write access to a directory is only ever given by :func:`private_dir`: a
directory of the supervisor's own whose ACL is *set* (not added to) so that
exactly one domain uid may write it, so a uid a host used before (and now
another domain's) keeps nothing.  :func:`grant_access` with ``write`` is for
files (a disk image blkback serves).
"""

from __future__ import annotations

import errno
import os
import stat
import struct

__all__ = ["AccessError", "grant_access", "grant_search", "private_dir"]

_XATTR = "system.posix_acl_access"
_VERSION = 2
_ENTRY = struct.Struct("<HHI")
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_UNDEFINED_ID = 0xFFFFFFFF
R, W, X = 4, 2, 1


class AccessError(Exception):
    """The path's ACL could not be changed (a filesystem without ACLs, say)."""


def _read_acl(path: str, mode: int) -> list[tuple[int, int, int]]:
    try:
        raw = os.getxattr(path, _XATTR)
    except OSError as e:
        if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
            raise
        raw = b""
    if len(raw) >= 4 and struct.unpack_from("<I", raw)[0] == _VERSION:
        return [_ENTRY.unpack_from(raw, 4 + i * _ENTRY.size) for i in range((len(raw) - 4) // _ENTRY.size)]
    # No ACL yet: the mode bits are the three base entries.
    return [(ACL_USER_OBJ, (mode >> 6) & 7, _UNDEFINED_ID), (ACL_GROUP_OBJ, (mode >> 3) & 7, _UNDEFINED_ID),
            (ACL_OTHER, mode & 7, _UNDEFINED_ID)]


def _add_user(path: str, uid: int, perms: int) -> None:
    mode = stat.S_IMODE(os.stat(path).st_mode)
    entries = _read_acl(path, mode)
    users = {eid: p for tag, p, eid in entries if tag == ACL_USER}
    if (users.get(uid, 0) & perms) == perms:
        return
    users[uid] = users.get(uid, 0) | perms
    base = {tag: p for tag, p, _ in entries if tag in (ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_OTHER)}
    groups = {eid: p for tag, p, eid in entries if tag == ACL_GROUP}
    mask = base[ACL_GROUP_OBJ]
    for p in list(users.values()) + list(groups.values()):
        mask |= p
    out = [(ACL_USER_OBJ, base[ACL_USER_OBJ], _UNDEFINED_ID)]
    out += [(ACL_USER, users[u], u) for u in sorted(users)]
    out += [(ACL_GROUP_OBJ, base[ACL_GROUP_OBJ], _UNDEFINED_ID)]
    out += [(ACL_GROUP, groups[g], g) for g in sorted(groups)]
    out += [(ACL_MASK, mask, _UNDEFINED_ID), (ACL_OTHER, base[ACL_OTHER], _UNDEFINED_ID)]
    try:
        os.setxattr(path, _XATTR, struct.pack("<I", _VERSION) + b"".join(_ENTRY.pack(*e) for e in out))
    except OSError as e:
        raise AccessError(f"cannot give uid {uid} access to {path}: {e.strerror}") from None


def _traversable_by_others(path: str) -> bool:
    return bool(os.stat(path).st_mode & stat.S_IXOTH)


def grant_access(path: str, uid: int, write: bool = False, directory: bool = False) -> None:
    """Let ``uid`` read (and write) ``path``; for a directory, read and search it.

    Ancestors that others cannot search get a search-only entry for ``uid``.
    Write access to a directory is refused here (ValueError): whoever can
    write a directory can replace anything in it; give a domain a directory
    of its own with :func:`private_dir`.
    """
    if write and directory:
        raise ValueError(f"refusing write access to the directory {path} for uid {uid}: use private_dir")
    path = os.path.abspath(path)
    perms = R | (W if write else 0) | (X if directory else 0)
    if directory:
        perms |= W | X if write else X
    _add_user(path, uid, perms)
    grant_search(os.path.dirname(path), uid)


def grant_search(path: str, uid: int) -> None:
    """Let ``uid`` reach entries under directory ``path``: search-only entries where others cannot search."""
    path = os.path.abspath(path)
    while True:
        if not _traversable_by_others(path):
            _add_user(path, uid, X)
        if path == "/":
            break
        path = os.path.dirname(path)


def private_dir(path: str, uid: int | None) -> None:
    """Make the existing directory ``path`` (not a symlink, owned by this process's uid) private: mode 0700
    and, with ``uid``, an ACL giving that uid rwx and nobody else anything; without, no ACL at all.

    Works on the directory's descriptor (``O_NOFOLLOW``): a symlink put in its
    place is refused, never followed.  Raises AccessError.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise AccessError(f"cannot open the directory {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise AccessError(f"{path} is owned by uid {st.st_uid}, not by uid {os.geteuid()}: not ours to give")
        os.fchmod(fd, 0o700)
        if uid is None:
            try:
                os.removexattr(fd, _XATTR)
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                    raise
            return
        entries = [(ACL_USER_OBJ, R | W | X, _UNDEFINED_ID), (ACL_USER, R | W | X, uid),
                   (ACL_GROUP_OBJ, 0, _UNDEFINED_ID), (ACL_MASK, R | W | X, _UNDEFINED_ID),
                   (ACL_OTHER, 0, _UNDEFINED_ID)]
        os.setxattr(fd, _XATTR, struct.pack("<I", _VERSION) + b"".join(_ENTRY.pack(*e) for e in entries))
    except OSError as e:
        raise AccessError(f"cannot give uid {uid} its directory {path}: {e.strerror}") from None
    finally:
        os.close(fd)
