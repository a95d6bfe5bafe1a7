"""The TUN/TAP ioctls both ends of xdom's network path use (``linux/if_tun.h``).

netfront attaches to the guest's TAP and netback (bridge mode) to each
vif's TAP the same way: ``TUNSETIFF`` on a ``/dev/net/tun`` descriptor
someone opened in the right namespace (the toolstack, usually), as a TAP
with no packet-info prefix and a virtio-net header on every frame
(``IFF_VNET_HDR``), so offload state crosses the device; ``TUNSETOFFLOAD``
says which unfinished work the kernel may hand us.  Attaching to a TAP the
caller's uid owns needs no privilege.
"""

from __future__ import annotations

import fcntl
import os
import struct

from .packet import VIRTIO_NET_HDR_SIZE

__all__ = ["READ_SIZE", "attach_tap", "set_offloads", "set_carrier"]

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETCARRIER = 0x400454E2
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
# What one read can return: a virtio-net header and a GSO super-frame (GSO_MAX_SIZE is 64 KiB of payload
# plus headers; BIG TCP is off unless someone raises gso_max_size).
READ_SIZE = VIRTIO_NET_HDR_SIZE + 65536 + 256


def attach_tap(fd: int, ifname: str, offloads: int = 0) -> None:
    """Make ``fd`` (``/dev/net/tun``, close-on-exec from now on) the TAP ``ifname`` with virtio-net headers.

    Raises OSError naming the device; the caller still owns ``fd``.
    """
    os.set_inheritable(fd, False)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETOFFLOAD, offloads)
    except OSError as e:
        raise OSError(e.errno, f"cannot attach to TAP {ifname}: {e.strerror}") from None


def set_offloads(fd: int, flags: int) -> None:
    """``TUNSETOFFLOAD``: which offloads (TUN_F_*) the kernel may hand us unfinished."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


def set_carrier(fd: int, up: bool) -> None:
    """``TUNSETCARRIER`` (Linux 5.0+): whether the link is up, so a bridge stops forwarding to it."""
    fcntl.ioctl(fd, TUNSETCARRIER, struct.pack("i", int(up)))
