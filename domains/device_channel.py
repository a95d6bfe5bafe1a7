"""Descriptors the toolstack hands a running domain: the ``/dev/net/tun`` fd of a hot-added vif, say.

A guest runs under its own uid and cannot open ``/dev/net/tun`` when the
host keeps it mode 0600 (Debian's test hosts do); it may only attach to a
TAP it owns, through a descriptor someone else opened *inside its network
namespace*.  At start the toolstack passes one per vif on the command line.
For a vif added later (``xdom network-attach``) it needs a way in: a
SOCK_SEQPACKET socketpair made when the guest is spawned, over which it
sends ``{"vif": DEVID}`` with the descriptor attached (SCM_RIGHTS) *before*
it writes the vif's xenstore nodes.  The guest's hotplug thread then
:meth:`DeviceChannel.take`\\ s it by devid.

A netback in bridge mode gets its vifs' TAP descriptors the same way,
keyed by (frontend domid, devid), and a blkback its disk images (kind
``"disk"``, key (frontend domid, devid, serial), the serial written to the
vbd's ``xdom-disk-fd`` node so that a re-created device never takes the
image of an earlier one).  The channel carries descriptors only; the devices themselves are still
discovered through xenstore, as under Xen.  A message that is not a
well-formed offer is dropped with its descriptors closed: the toolstack is
trusted, but a stray fd must not leak.  An offer never taken (the vif was
detached before the guest got to it) is replaced by the next offer for the
same devid and closed with the channel: at most one per devid.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

import msgpack

__all__ = ["DeviceChannel", "DeviceId", "offer_fd"]

log = logging.getLogger("xdom.device_channel")

MAX_MESSAGE = 256
MAX_FDS = 4


DeviceId = int | tuple[int, ...]


def offer_fd(sock: socket.socket, kind: str, devid: DeviceId, fd: int) -> None:
    """The toolstack's side: send ``fd`` for device ``kind``/``devid``; the caller still owns (closes) ``fd``.

    ``devid`` is a guest's device number, or a tuple such as a backend's
    (frontend domid, devid).
    """
    payload = msgpack.packb({kind: list(devid) if isinstance(devid, tuple) else devid})
    socket.send_fds(sock, [payload], [fd])


class DeviceChannel:
    """The guest's side: descriptors received by a reader thread, taken by devid (waiting if need be)."""

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._cond = threading.Condition()
        self._fds: dict[tuple[str, DeviceId], int] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._reader, name="device-channel", daemon=True)
        self._thread.start()

    def take(self, kind: str, devid: DeviceId, timeout: float) -> int | None:
        """The descriptor offered for ``kind``/``devid``, now yours; None if none came within ``timeout``."""
        with self._cond:
            self._cond.wait_for(lambda: (kind, devid) in self._fds or self._closed, timeout)
            return self._fds.pop((kind, devid), None)

    def discard(self, kind: str, match: Callable[[DeviceId], bool]) -> int:
        """Close the offers of ``kind`` held for devids ``match`` accepts (superseded ones); how many."""
        with self._cond:
            keys = [k for k in self._fds if k[0] == kind and match(k[1])]
            fds = [self._fds.pop(k) for k in keys]
        for fd in fds:
            os.close(fd)
        return len(fds)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5)
        self._sock.close()
        with self._cond:
            fds, self._fds = list(self._fds.values()), {}
            self._closed = True
            self._cond.notify_all()
        for fd in fds:
            os.close(fd)

    def _reader(self) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._sock, MAX_MESSAGE, MAX_FDS)
            except OSError as e:
                log.warning("device channel: %s", e)
                break
            if not data and not fds:
                break               # the toolstack closed its end
            key = _offer_key(data)
            if key is None or len(fds) != 1:
                log.warning("device channel: dropping a malformed offer (%d bytes, %d fds)", len(data), len(fds))
                for fd in fds:
                    os.close(fd)
                continue
            with self._cond:
                old = self._fds.pop(key, None)
                self._fds[key] = fds[0]
                self._cond.notify_all()
            if old is not None:
                os.close(old)
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _offer_key(data: bytes) -> tuple[str, DeviceId] | None:
    try:
        msg = msgpack.unpackb(data)
    except Exception:
        return None
    if not isinstance(msg, dict) or len(msg) != 1:
        return None
    ((kind, devid),) = msg.items()
    if not isinstance(kind, str):
        return None
    if isinstance(devid, list) and 0 < len(devid) <= 4 and all(_is_number(n) for n in devid):
        return kind, tuple(devid)
    return (kind, devid) if _is_number(devid) else None


def _is_number(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 32
