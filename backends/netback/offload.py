"""Frames with their offload state, and fitting them to what each receiver negotiated.

A frame crosses netback as it left its sender: a TCP super-frame of up to
64 KiB still to be segmented (GSO) and a checksum still blank
(CHECKSUM_PARTIAL) stay that way through the switch, so a receiver that
negotiated the same offloads gets one big frame and nobody spends a
checksum pass on it.  Only at the receiving vif, knowing what that
frontend asked for, is the work finished, as Linux's
``validate_xmit_skb`` finishes it for a device lacking a feature:
segment in software (``skb_gso_segment``), fill in the checksum
(``skb_checksum_help``), or drop a frame the receiver's MTU cannot take
(``is_skb_forwardable``).  Sans-IO: bytes in, frames or a reason out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from xdom.domains.abi.netif import XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6, GsoInfo
from xdom.domains.packet import checksum_setup, finish_checksum, parse_headers, segment_tcp

from .tx import ETH_HLEN, VLAN_HLEN, Checksum, TxPacket

__all__ = ["Frame", "RxCaps", "fit", "from_tx"]

#: The netif size field is 16 bits: no frame on a ring is longer, whatever its GSO.
MAX_RING_FRAME = 0xFFFF


class Frame(NamedTuple):
    """A frame in flight between vifs: its bytes, the segmentation it still needs, its checksum state."""
    data: bytes
    gso: GsoInfo | None = None
    checksum: Checksum = Checksum.NONE


@dataclass(frozen=True)
class RxCaps:
    """What a receiving frontend negotiated (``feature-*`` nodes) and the MTU its vif has."""
    sg: bool = True
    gso_tcpv4: bool = False
    gso_tcpv6: bool = False
    csum_ipv4: bool = True              # not feature-no-csum-offload
    csum_ipv6: bool = False             # feature-ipv6-csum-offload
    mtu: int = 1500

    @classmethod
    def negotiated(cls, sg: bool, gso_tcpv4: bool, gso_tcpv6: bool, no_csum_offload: bool,
                   ipv6_csum_offload: bool, mtu: int) -> RxCaps:
        """As ``xenvif_fix_features``: TSO needs SG and the checksum offload of its family."""
        csum4, csum6 = not no_csum_offload, ipv6_csum_offload
        return cls(sg, sg and gso_tcpv4 and csum4, sg and gso_tcpv6 and csum6, csum4, csum6, mtu)

    def takes_gso(self, gso_type: int) -> bool:
        return (gso_type == XEN_NETIF_GSO_TYPE_TCPV4 and self.gso_tcpv4) or \
            (gso_type == XEN_NETIF_GSO_TYPE_TCPV6 and self.gso_tcpv6)


def from_tx(pkt: TxPacket, data: bytes) -> Frame | str:
    """The frame a frontend transmitted, checked as ``xenvif_tx_submit`` does before the stack sees it.

    A frame that asks for checksum offload (or GSO, which implies it) must
    carry TCP or UDP over IP that parses (``checksum_setup``); GSO must be
    TCP of the family its type says.  Otherwise the reason to drop it
    (its slots were already answered OKAY, as in Linux).  ``data`` may be
    the frame's head only (a private copy of its first bytes, the rest sent
    on from the frontend's pages): ``pkt.length`` is the whole.
    """
    if pkt.csum_blank:
        done = checksum_setup(data, recompute_pseudo=pkt.csum_fixup, length=pkt.length)
        if done is None:
            return "checksum offload asked for a frame that is not TCP/UDP over IP"
        data, h = done
        if pkt.gso is not None and (h.proto != 6 or h.ipv6 != (pkt.gso.type == XEN_NETIF_GSO_TYPE_TCPV6)):
            return f"GSO type {pkt.gso.type} on a frame that is not TCP of that family"
    return Frame(data, pkt.gso, pkt.checksum)


def fit(frame: Frame, caps: RxCaps) -> list[Frame] | str:
    """``frame`` as this receiver can take it: itself, its segments, or a reason to drop it."""
    data = frame.data
    limit = caps.mtu + ETH_HLEN + VLAN_HLEN
    if frame.gso is None:
        if len(data) > min(limit, MAX_RING_FRAME):
            return f"{len(data)}-byte frame exceeds the receiver's MTU {caps.mtu}"
        if frame.checksum == Checksum.PARTIAL:
            h = parse_headers(data)
            if h is None:                # cannot happen for a frame from_tx accepted; a hostile caller's
                return "CHECKSUM_PARTIAL frame without TCP/UDP headers"
            if not (caps.csum_ipv6 if h.ipv6 else caps.csum_ipv4):
                return [Frame(finish_checksum(data, h), None, Checksum.NONE)]
        return [frame]
    h = parse_headers(data)
    if h is None or h.proto != 6:
        return "GSO frame that is not TCP"
    # skb_gso_validate_network_len: every segment must fit the receiver's MTU.
    if h.header_len - h.l3_offset + frame.gso.size > caps.mtu:
        return f"GSO segments of {frame.gso.size} bytes exceed the receiver's MTU {caps.mtu}"
    if h.header_len + frame.gso.size > MAX_RING_FRAME:
        return f"GSO segments of {frame.gso.size} bytes do not fit a ring slot chain's 16-bit size"
    if caps.takes_gso(frame.gso.type) and len(data) <= MAX_RING_FRAME:
        return [frame]
    partial = caps.csum_ipv6 if h.ipv6 else caps.csum_ipv4
    segments = segment_tcp(data, frame.gso.size, h, partial=partial)
    if segments is None:
        return "GSO frame that cannot be segmented"
    # Finished checksums go as CHECKSUM_NONE, as skb_segment leaves them: the receiver verifies.
    state = Checksum.PARTIAL if partial else Checksum.NONE
    return [Frame(s, None, state) for s in segments]
