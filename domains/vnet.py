"""Translating offload state between a TAP's virtio-net header and netif's flags and GSO extra.

Both ends of xdom's network path meet a TAP: netfront hands the guest's
frames to and from one, and a netback in bridge mode gives each vif one
on the driver domain's bridge.  The guest's TAP runs with ``IFF_VNET_HDR``: the guest kernel hands us TCP
super-frames of up to 64 KiB with the checksum left blank, and takes the
same from us, exactly as a Linux netfront exchanges them with its stack.
Xen carries that state as ``NETTXF_csum_blank``/``NETRXF_csum_blank``,
``*_data_validated`` and a GSO extra-info slot (``xen-netfront``'s
``xennet_start_xmit`` and ``xennet_set_skb_gso``).  What the backend did not
negotiate is finished here before it reaches the ring: an IPv6 checksum
the backend cannot take is computed, a super-frame it cannot take (or one
longer than netif's 16-bit size field) is segmented.  Sans-IO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .abi.netif import XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6, GsoInfo
from .packet import (
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VirtioGso,
    VirtioNetHdr,
    checksum_setup,
    finish_checksum,
    parse_headers,
    segment_tcp,
)

__all__ = ["BackendOffloads", "TxFrame", "from_tap", "to_tap", "TUN_F_CSUM", "TUN_F_TSO4", "TUN_F_TSO6"]

TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
MAX_RING_FRAME = 0xFFFF          # netif's size field


@dataclass(frozen=True)
class BackendOffloads:
    """What the backend advertised it accepts on our transmit ring."""
    sg: bool = False
    gso_tcpv4: bool = False
    gso_tcpv6: bool = False
    ipv6_csum: bool = False

    def tun_flags(self) -> int:
        """``TUNSETOFFLOAD`` for the guest's TAP: what its kernel may leave for us (and the backend) to do.

        IPv4 checksum offload is always there: every netback takes
        ``csum_blank``.  TUN_F_CSUM covers IPv6 too; such frames are finished
        here when the backend lacks ``feature-ipv6-csum-offload``.  TSO needs
        scatter-gather, as in ``xennet_fix_features``.
        """
        flags = TUN_F_CSUM
        if self.sg and self.gso_tcpv4:
            flags |= TUN_F_TSO4
        if self.sg and self.gso_tcpv6 and self.ipv6_csum:
            flags |= TUN_F_TSO6
        return flags


class TxFrame(NamedTuple):
    """A frame for the transmit ring with what its first slot and GSO extra say."""
    data: bytes
    csum_blank: bool = False
    data_validated: bool = False
    gso: GsoInfo | None = None


def from_tap(hdr: VirtioNetHdr, frame: bytes, be: BackendOffloads) -> list[TxFrame] | str:
    """What the guest kernel wrote to its TAP, as frames for the ring; or why it cannot be sent."""
    gso_kind = hdr.gso_type & ~VirtioGso.ECN
    if gso_kind == VirtioGso.NONE:
        if len(frame) > MAX_RING_FRAME:
            return f"{len(frame)}-byte frame without GSO"
        if not hdr.needs_csum:
            return [TxFrame(frame, False, hdr.data_valid)]
        h = parse_headers(frame)
        if h is None or h.l4_offset != hdr.csum_start or h.csum_offset != hdr.csum_offset:
            return "NEEDS_CSUM on a frame that is not TCP/UDP over IP"
        if h.ipv6 and not be.ipv6_csum:
            return [TxFrame(finish_checksum(frame, h))]
        return [TxFrame(frame, True, True)]
    if gso_kind not in (VirtioGso.TCPV4, VirtioGso.TCPV6) or hdr.gso_size == 0:
        return f"virtio GSO type {hdr.gso_type} is not TCP"
    h = parse_headers(frame)
    if h is None or h.proto != 6 or h.ipv6 != (gso_kind == VirtioGso.TCPV6):
        return "a GSO frame whose headers are not TCP of its type"
    xen_type = XEN_NETIF_GSO_TYPE_TCPV6 if h.ipv6 else XEN_NETIF_GSO_TYPE_TCPV4
    takes = be.sg and (be.gso_tcpv6 and be.ipv6_csum if h.ipv6 else be.gso_tcpv4)
    if takes and len(frame) <= MAX_RING_FRAME:
        return [TxFrame(frame, True, True, GsoInfo(hdr.gso_size, xen_type))]
    partial = be.ipv6_csum if h.ipv6 else True
    segments = segment_tcp(frame, hdr.gso_size, h, partial=partial)
    if segments is None or len(segments[0]) > MAX_RING_FRAME:      # the first segment is the longest
        return "a GSO frame that cannot be segmented into frames the ring takes"
    return [TxFrame(s, partial, partial) for s in segments]


def to_tap(frame: bytes, csum_blank: bool, data_validated: bool,
           gso: GsoInfo | None) -> tuple[VirtioNetHdr, bytes] | None:
    """The virtio-net header (and the frame) for what the backend wrote; None when it cannot be honoured.

    Xen does not say where the blank checksum is: it is found from the
    headers, as ``xennet_poll``'s ``checksum_setup`` does (a frame that does
    not parse is dropped there too).  A GSO frame without ``csum_blank`` is
    a backend's bug Linux repairs (``rx_gso_checksum_fixup``): it gets the
    pseudo-header sum written in.
    """
    if not csum_blank and gso is None:
        return VirtioNetHdr(VIRTIO_NET_HDR_F_DATA_VALID if data_validated else 0), frame
    done = checksum_setup(frame, recompute_pseudo=not csum_blank)
    if done is None:
        return None
    frame, h = done
    if gso is None:
        return VirtioNetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, h.l4_offset, h.csum_offset), frame
    if h.proto != 6 or gso.type not in (XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6) \
            or h.ipv6 != (gso.type == XEN_NETIF_GSO_TYPE_TCPV6) or gso.size == 0:
        return None
    kind = VirtioGso.TCPV6 if h.ipv6 else VirtioGso.TCPV4
    return VirtioNetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, kind, h.header_len, gso.size, h.l4_offset,
                        h.csum_offset), frame
