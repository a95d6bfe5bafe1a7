"""Packet ports: where netfront's data thread takes frames from and gives frames to.

netfront moves frames between the PV rings and *something that speaks
virtio-net headers*: a TAP device with ``IFF_VNET_HDR`` in the guest's
namespace (:class:`TapPort`, programs on the host use it), or a VM's
virtio-net device served over vhost-user
(:class:`xdom.domains.vhost_user.net.VhostUserNetPort`).  Both carry the
same offload state with each frame (``struct virtio_net_hdr``: blank
checksums, TCP super-frames), which :mod:`xdom.domains.vnet` maps to and
from netif's flags, so netfront needs to know nothing else about them.

Rules of this module:

* A port is driven by exactly one thread, netfront's data thread: every
  method but :meth:`PacketPort.close` is called there (``close`` is called
  once that thread has ended).  A port never takes netfront's lock and never
  calls back into netfront.
* Readiness is level-triggered: netfront polls :meth:`PacketPort.fileno`
  for input only while it can take frames (nothing is waiting for ring
  room), so a port whose fd stays readable is simply not polled while the
  rings are full -- its frames wait where they are (the TAP's queue, the
  VM's TX virtqueue), as in a NIC that stops fetching descriptors.
  :meth:`PacketPort.control_fileno` (if not None) is polled always: work a
  port must do whatever the rings' state (a vhost-user front end's
  messages) is done in :meth:`PacketPort.control`.
* Batches, not frames: :meth:`PacketPort.read_batch` returns what one pass
  may take, :meth:`PacketPort.write_batch` takes what one pass received.
  A frame that cannot be delivered (no room on the other side) is dropped
  and counted there, as a NIC does; netfront never blocks on a port.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from typing import Protocol

from ..packet import VIRTIO_NET_HDR_SIZE, VirtioNetHdr
from ..tun import READ_SIZE, attach_tap, set_offloads

__all__ = ["PacketPort", "TapPort", "open_tap"]

log = logging.getLogger("xdom.netfront")


class PacketPort(Protocol):
    """What netfront's data thread needs from the other side of the interface (see the module rules)."""

    #: For log messages: the TAP's name, the vhost-user socket.
    name: str

    def fileno(self) -> int:
        """Readable (level-triggered) when :meth:`read_batch` may have frames."""
        ...

    def control_fileno(self) -> int | None:
        """Polled always (None: nothing to poll); when readable, the data thread calls :meth:`control`."""
        ...

    def control(self) -> bool:
        """Work that does not wait for ring room (a protocol socket, kicks): cheap, never blocks.

        True when :meth:`read_batch` may have frames now (the data fd was
        just made readable): the data thread reads in the same pass instead
        of waking up again for it."""
        ...

    def poll_interval(self) -> float | None:
        """Seconds after which the data thread must call :meth:`control` even without an event, or None."""
        ...

    def read_batch(self, limit: int) -> list[tuple[VirtioNetHdr, bytes]]:
        """Up to ``limit`` frames sent to us, each with its virtio-net header; [] when there are none now."""
        ...

    def write_batch(self, frames: Sequence[tuple[bytes, bytes]]) -> None:
        """Hand over received frames, each ``(packed struct virtio_net_hdr, frame)``."""
        ...

    def set_offloads(self, tun_flags: int) -> None:
        """What unfinished work (``TUN_F_*`` of :mod:`xdom.domains.vnet`) the backend takes from us now."""
        ...

    def close(self) -> None:
        ...


def open_tap(ifname: str, tun_fd: int | None = None) -> int:
    """Attach to the TAP device the toolstack made for us (``tuntap add ... user UID``: no privilege needed).

    ``tun_fd`` is a ``/dev/net/tun`` descriptor the toolstack opened for us
    (a domain under its own uid may not be able to open the device).  The
    TAP carries a virtio-net header with every frame (``IFF_VNET_HDR``), so
    checksum and segmentation offload can cross it; what the kernel may
    leave to us is set per backend with :func:`set_offloads`.
    """
    fd = tun_fd if tun_fd is not None else os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        attach_tap(fd, ifname)
    except OSError:
        os.close(fd)
        raise
    return fd


class TapPort:
    """A TAP device with ``IFF_VNET_HDR``: one ``readv`` per frame in, one ``writev`` per frame out."""

    def __init__(self, ifname: str, tun_fd: int | None = None) -> None:
        self.name = ifname
        self.fd = open_tap(ifname, tun_fd)
        os.set_blocking(self.fd, False)
        self._buf = bytearray(READ_SIZE)
        self._view = memoryview(self._buf)

    def fileno(self) -> int:
        return self.fd

    def control_fileno(self) -> int | None:
        return None

    def control(self) -> bool:
        return False

    def poll_interval(self) -> float | None:
        return None

    def read_batch(self, limit: int) -> list[tuple[VirtioNetHdr, bytes]]:
        fd, buf, view = self.fd, self._buf, self._view
        out: list[tuple[VirtioNetHdr, bytes]] = []
        for _ in range(limit):
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.EINTR:
                    log.error("reading %s: %s", self.name, e)
                break
            if n < VIRTIO_NET_HDR_SIZE:
                continue
            out.append((VirtioNetHdr.parse(buf), bytes(view[VIRTIO_NET_HDR_SIZE:n])))
        return out

    def write_batch(self, frames: Sequence[tuple[bytes, bytes]]) -> None:
        fd = self.fd
        for hdr, frame in frames:
            try:
                os.writev(fd, (hdr, frame))
            except OSError as e:
                log.debug("writing to %s: %s", self.name, e)

    def set_offloads(self, tun_flags: int) -> None:
        set_offloads(self.fd, tun_flags)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
