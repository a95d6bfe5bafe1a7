"""A vif on a Linux bridge: its backend side is a TAP device, ``vif<domid>.<devid>``, as in Xen.

In bridge mode the toolstack makes a TAP per vif in netback's own network
namespace, puts it on the bridge the vif names (``bridge=``) and hands
netback a ``/dev/net/tun`` descriptor for it.  Frames the guest transmits
are written to the TAP, into the bridge; frames the bridge forwards to the
TAP are the guest's to receive.  The TAP runs with ``IFF_VNET_HDR`` and
every offload on, so TCP super-frames and blank checksums pass between the
guest and the kernel untouched, and the kernel finishes them for any port
that cannot take them (another vif's frontend is fitted by
:mod:`.offload`, as with the built-in switch).

While no frontend is connected the TAP's carrier is off, so the bridge
stops forwarding to it instead of filling its queue.
"""

from __future__ import annotations

import errno
import logging
import os

from xdom.domains.packet import VIRTIO_NET_HDR_SIZE, VirtioNetHdr
from xdom.domains.tun import READ_SIZE, attach_tap, set_carrier
from xdom.domains.vnet import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, BackendOffloads, from_tap, to_tap

from .offload import Frame
from .switch import Port
from .tx import Checksum

__all__ = ["TapUplink"]

log = logging.getLogger("xdom.netback")

# What the bridge may hand us: everything a vif's frontend can be given (fit() finishes what one cannot take).
_EVERYTHING = BackendOffloads(sg=True, gso_tcpv4=True, gso_tcpv6=True, ipv6_csum=True)


class TapUplink:
    """A vif's TAP on the driver domain's bridge (see the module docstring)."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd
        self.port = Port(name)
        self.stats = {"tap_in": 0, "tap_out": 0, "tap_dropped": 0}
        self._buf = bytearray(READ_SIZE)
        try:
            attach_tap(fd, name, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            os.set_blocking(fd, False)
        except OSError:
            os.close(fd)
            self.fd = -1
            raise
        self.set_carrier(False)

    def fileno(self) -> int | None:
        return self.fd

    def set_carrier(self, up: bool) -> None:
        """Tell the bridge whether anyone is there (TUNSETCARRIER, Linux 5.0+; without it the port stays up)."""
        try:
            set_carrier(self.fd, up)
        except OSError as e:
            log.debug("%s: TUNSETCARRIER: %s", self.name, e)

    def send(self, frame: Frame) -> None:
        """Into the bridge, with the frame's offload state as a virtio-net header."""
        out = to_tap(frame.data, frame.checksum == Checksum.PARTIAL, frame.checksum == Checksum.UNNECESSARY,
                     frame.gso)
        if out is None:                 # from_tx only lets through frames whose offloads parse
            self.stats["tap_dropped"] += 1
            return
        hdr, data = out
        try:
            os.writev(self.fd, (hdr.pack(), data))
            self.stats["tap_out"] += 1
        except OSError as e:
            self.stats["tap_dropped"] += 1
            if e.errno not in (errno.EAGAIN, errno.EIO):     # EIO: the carrier is off
                log.warning("%s: writing to the TAP: %s", self.name, e)

    def send_parts(self, head: Frame, tail: list[memoryview]) -> None:
        """:meth:`send` for a frame whose head was copied and checked and whose rest is ``tail``, views of
        the frontend's granted pages: the kernel copies it straight from there (no copy of ours)."""
        out = to_tap(head.data, head.checksum == Checksum.PARTIAL, head.checksum == Checksum.UNNECESSARY,
                     head.gso)
        if out is None:
            self.stats["tap_dropped"] += 1
            return
        hdr, data = out
        try:
            os.writev(self.fd, [hdr.pack(), data, *tail])
            self.stats["tap_out"] += 1
        except OSError as e:
            self.stats["tap_dropped"] += 1
            if e.errno not in (errno.EAGAIN, errno.EIO):
                log.warning("%s: writing to the TAP: %s", self.name, e)

    def receive(self, budget: int) -> bool:
        """Move up to ``budget`` frames from the TAP to the port; True if the budget ran out first."""
        buf = self._buf
        view = memoryview(buf)
        for _ in range(budget):
            try:
                n = os.readv(self.fd, [buf])
            except BlockingIOError:
                return False
            except OSError as e:
                log.warning("%s: reading the TAP: %s", self.name, e)
                return False
            if n < VIRTIO_NET_HDR_SIZE:
                continue
            frames = from_tap(VirtioNetHdr.parse(buf), bytes(view[VIRTIO_NET_HDR_SIZE:n]), _EVERYTHING)
            if isinstance(frames, str):
                self.stats["tap_dropped"] += 1
                continue
            for f in frames:
                state = Checksum.PARTIAL if f.csum_blank else \
                    Checksum.UNNECESSARY if f.data_validated else Checksum.NONE
                self.port.put(Frame(f.data, f.gso, state))
                self.stats["tap_in"] += 1
        return True

    def close(self) -> None:
        self.port.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
