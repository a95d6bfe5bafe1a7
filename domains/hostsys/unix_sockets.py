"""A listening unix socket's path: taken over from a dead server, never from a live one; made by its owner alone.

Every export a guest serves (NBD, vhost-user-blk, vhost-user-net) binds a path that a previous run of the same
guest may have left behind when it was killed.  One rule for all of them: unlink the path only if it is a
socket and nobody accepts on it; a regular file or a live server is refused, so a restart never steals a
socket from another process.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["owner_only", "remove_stale_socket", "unlink_quietly"]


@contextmanager
def owner_only() -> Iterator[None]:
    """Sockets bound meanwhile are their owner's alone (mode 0600), whatever umask the process was started
    with: a socket's mode is all that stands between another uid and what it serves (a toolstack's control
    socket: destroy, stop, attach), and a chmod after the bind leaves a moment to connect in.  The umask is
    the process's: call it where no other thread makes files meanwhile (servers binding as they start).
    (``deploy/keeper.py``, which imports nothing of xdom, does the same by hand.)"""
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)


def remove_stale_socket(path: str) -> None:
    """Unlink ``path`` if it is a socket nobody listens on; FileExistsError otherwise."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "path exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        unlink_quietly(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise FileExistsError(errno.EEXIST, "another server is listening on this socket", path)


def unlink_quietly(path: str) -> None:
    """Unlink ``path``; already gone is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
