"""Offload surgery on Ethernet frames: header parsing, checksums, TCP segmentation, virtio-net headers.

A PV network path hands packets around with their offload state attached
instead of finished: a TCP super-frame of up to 64 KiB that still needs
cutting into MSS-sized segments (GSO), and a checksum left blank for
"hardware" to fill in (CHECKSUM_PARTIAL).  Whoever finally gives the
packet to something that cannot take that state (a frontend that did not
negotiate GSO or checksum offload, a TAP without ``IFF_VNET_HDR``) must
finish the work first: that is what Linux's ``skb_checksum_setup``,
``skb_checksum_help`` and ``tcp_gso_segment`` do, and what this module does
for xdom's netback and netfront.  Pure functions over ``bytes``; no I/O.

Conventions are Linux's: a CHECKSUM_PARTIAL packet has the pseudo-header
sum (folded, not inverted) in its L4 checksum field, and the checksum is
the inverted one's-complement sum from ``csum_start`` to the end, stored at
``csum_start + csum_offset``.  The one's-complement sum is taken as the
big-endian integer of the bytes modulo 0xFFFF (65536 = 1 mod 65535): one C
call, where a Python loop over 16-bit words would cost microseconds per
packet.

Every parser treats its input as hostile: lengths are checked against the
frame, never trusted, and a frame that does not parse gives None.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple

__all__ = ["L4Headers", "parse_headers", "ones_sum", "checksum_setup", "finish_checksum", "segment_tcp",
           "VirtioNetHdr", "VIRTIO_NET_HDR_SIZE", "VirtioGso", "flow_hash"]

ETH_HLEN = 14
VLAN_HLEN = 4
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
IPPROTO_TCP = 6
IPPROTO_UDP = 17
# IPv6 extension headers Linux's skb_checksum_setup_ipv6 walks (hop-by-hop, routing, destination options);
# a fragment header (44) means the packet cannot carry an offloaded checksum at all.
_IPV6_EXT = (0, 43, 60)
_IPV6_FRAGMENT = 44
_TCP_FIN, _TCP_PSH, _TCP_CWR = 0x01, 0x08, 0x80


class L4Headers(NamedTuple):
    """Where a frame's headers are: what offloads need to know, all offsets from the frame's start."""
    l3_offset: int          # the IP header
    ipv6: bool
    l4_offset: int          # the TCP/UDP header: csum_start
    proto: int              # IPPROTO_TCP or IPPROTO_UDP
    l4_len: int             # TCP: doff * 4; UDP: 8

    @property
    def csum_offset(self) -> int:
        return 16 if self.proto == IPPROTO_TCP else 6

    @property
    def header_len(self) -> int:
        """Bytes of headers before the L4 payload: what every GSO segment repeats."""
        return self.l4_offset + self.l4_len


def parse_headers(frame: bytes | bytearray | memoryview) -> L4Headers | None:
    """The L3/L4 layout of an Ethernet frame carrying TCP or UDP over IPv4/IPv6 (one VLAN tag allowed).

    None for anything else, for an IPv4 fragment, and for headers that run
    past the frame: such a packet cannot carry checksum or segmentation
    offload (Linux's ``skb_checksum_setup`` fails it with -EPROTO).
    """
    n = len(frame)
    if n < ETH_HLEN:
        return None
    off = 12
    ethertype = (frame[off] << 8) | frame[off + 1]
    off += 2
    if ethertype in (ETH_P_8021Q, ETH_P_8021AD):
        if n < off + VLAN_HLEN:
            return None
        ethertype = (frame[off + 2] << 8) | frame[off + 3]
        off += VLAN_HLEN
    if ethertype == ETH_P_IP:
        if n < off + 20 or frame[off] >> 4 != 4:
            return None
        ihl = (frame[off] & 0x0F) * 4
        tot_len = (frame[off + 2] << 8) | frame[off + 3]
        frag = ((frame[off + 6] << 8) | frame[off + 7]) & 0x3FFF     # MF flag and fragment offset
        if ihl < 20 or n < off + ihl or frag or tot_len < ihl:
            return None
        proto, l4, ipv6 = frame[off + 9], off + ihl, False
    elif ethertype == ETH_P_IPV6:
        if n < off + 40 or frame[off] >> 4 != 6:
            return None
        proto, l4, ipv6 = frame[off + 6], off + 40, True
        for _ in range(8):                        # a bounded walk: a hostile chain cannot loop us
            if proto not in _IPV6_EXT:
                break
            if n < l4 + 8:
                return None
            proto, l4 = frame[l4], l4 + (frame[l4 + 1] + 1) * 8
        if proto == _IPV6_FRAGMENT or proto in _IPV6_EXT:
            return None
    else:
        return None
    if proto == IPPROTO_TCP:
        if n < l4 + 20:
            return None
        l4_len = (frame[l4 + 12] >> 4) * 4
        if l4_len < 20 or n < l4 + l4_len:
            return None
    elif proto == IPPROTO_UDP:
        if n < l4 + 8:
            return None
        l4_len = 8
    else:
        return None
    return L4Headers(off, ipv6, l4, proto, l4_len)


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The one's-complement sum of ``data`` as big-endian 16-bit words (odd length: zero-padded), 0..0xFFFF.

    Returns 0xFFFF, not 0, for a nonzero sum that wraps to zero, as a
    running one's-complement adder would.
    """
    if len(data) & 1:
        data = bytes(data) + b"\0"
    value = int.from_bytes(data, "big")
    folded = value % 0xFFFF
    return 0xFFFF if folded == 0 and value else folded


def _pseudo_sum(frame: bytes | bytearray | memoryview, h: L4Headers, l4_length: int) -> int:
    """The pseudo-header sum for an L4 segment of ``l4_length`` bytes (addresses, protocol, length)."""
    if h.ipv6:
        addrs = frame[h.l3_offset + 8:h.l3_offset + 40]
        tail = struct.pack("!IxxxB", l4_length, h.proto)
    else:
        addrs = frame[h.l3_offset + 12:h.l3_offset + 20]
        tail = struct.pack("!xBI", h.proto, l4_length)      # a 32-bit length, as csum_tcpudp_magic's
    return _fold(ones_sum(addrs) + ones_sum(tail))


def _fold(s: int) -> int:
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def checksum_setup(frame: bytes, recompute_pseudo: bool = False,
                   length: int | None = None) -> tuple[bytes, L4Headers] | None:
    """Locate the checksum of a CHECKSUM_PARTIAL frame; optionally rewrite its pseudo-header sum.

    ``recompute_pseudo`` is Linux's ``recalculate_partial_csum``: a GSO
    packet from a frontend that forgot ``csum_blank`` has garbage in the
    field, so netback writes the pseudo-header sum there.  None when the
    frame cannot carry an offloaded checksum (the packet is dropped).
    ``frame`` may be just the head of a longer frame of ``length`` bytes
    (what netback copies to look at, as Linux's first 128 bytes).
    """
    h = parse_headers(frame)
    if h is None:
        return None
    if not recompute_pseudo:
        return frame, h
    buf = bytearray(frame)
    pos = h.l4_offset + h.csum_offset
    total = len(buf) if length is None else length
    buf[pos:pos + 2] = _pseudo_sum(buf, h, total - h.l4_offset).to_bytes(2, "big")
    return bytes(buf), h


def finish_checksum(frame: bytes, h: L4Headers) -> bytes:
    """``skb_checksum_help``: fill in the checksum a CHECKSUM_PARTIAL frame left for offload."""
    total = ones_sum(memoryview(frame)[h.l4_offset:])
    csum = ~total & 0xFFFF
    if h.proto == IPPROTO_UDP and csum == 0:
        csum = 0xFFFF                      # UDP's zero means "no checksum"
    pos = h.l4_offset + h.csum_offset
    return frame[:pos] + csum.to_bytes(2, "big") + frame[pos + 2:]


def segment_tcp(frame: bytes, mss: int, h: L4Headers, *, partial: bool) -> list[bytes] | None:
    """``tcp_gso_segment``: cut a TCP super-frame into frames of at most ``mss`` payload bytes.

    Each segment repeats the headers with IPv4 total length, id and header
    checksum (IPv6 payload length) and TCP sequence number fixed; FIN and
    PSH stay on the last segment only, CWR on the first only.  With
    ``partial`` each TCP checksum is left CHECKSUM_PARTIAL (pseudo-header
    sum in the field, for a receiver with checksum offload); otherwise it
    is complete.  None when the frame is not TCP, ``mss`` is not positive, or a
    segment would be too long for its IP length field.
    """
    if h.proto != IPPROTO_TCP or mss <= 0:
        return None
    hlen = h.header_len
    payload = memoryview(frame)[hlen:]
    if hlen - h.l3_offset - (40 if h.ipv6 else 0) + min(mss, len(payload)) > 0xFFFF:
        return None                               # a segment's IP length would not fit its 16-bit field
    header = bytearray(frame[:hlen])
    ip, tcp = h.l3_offset, h.l4_offset
    seq0 = int.from_bytes(header[tcp + 4:tcp + 8], "big")
    flags0 = header[tcp + 13]
    ip_id0 = int.from_bytes(header[ip + 4:ip + 6], "big") if not h.ipv6 else 0
    out = []
    count = max(1, -(-len(payload) // mss))      # a header-only frame is one segment, its checksum done too
    for i in range(count):
        chunk = payload[i * mss:(i + 1) * mss]
        hdr = bytearray(header)
        hdr[tcp + 4:tcp + 8] = ((seq0 + i * mss) & 0xFFFFFFFF).to_bytes(4, "big")
        flags = flags0
        if i != count - 1:
            flags &= ~(_TCP_FIN | _TCP_PSH)
        if i != 0:
            flags &= ~_TCP_CWR
        hdr[tcp + 13] = flags
        l4_length = h.l4_len + len(chunk)
        if h.ipv6:
            hdr[ip + 4:ip + 6] = (l4_length + tcp - ip - 40).to_bytes(2, "big")
        else:
            hdr[ip + 2:ip + 4] = (l4_length + tcp - ip).to_bytes(2, "big")
            hdr[ip + 4:ip + 6] = ((ip_id0 + i) & 0xFFFF).to_bytes(2, "big")
            hdr[ip + 10:ip + 12] = b"\0\0"
            hdr[ip + 10:ip + 12] = (~ones_sum(hdr[ip:tcp]) & 0xFFFF).to_bytes(2, "big")
        pseudo = _pseudo_sum(hdr, h, l4_length)
        if partial:
            hdr[tcp + 16:tcp + 18] = pseudo.to_bytes(2, "big")
        else:
            hdr[tcp + 16:tcp + 18] = b"\0\0"
            total = _fold(pseudo + ones_sum(hdr[tcp:]) + ones_sum(chunk))    # the TCP header's length is even
            hdr[tcp + 16:tcp + 18] = (~total & 0xFFFF).to_bytes(2, "big")
        out.append(bytes(hdr) + bytes(chunk))
    return out


# ---- virtio-net headers (IFF_VNET_HDR) ----------------------------------------------------------

VIRTIO_NET_HDR = struct.Struct("<BBHHHH")     # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VIRTIO_NET_HDR_SIZE = VIRTIO_NET_HDR.size     # 10: struct virtio_net_hdr, what TUNSETVNETHDRSZ defaults to
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2


class VirtioGso(IntEnum):
    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    ECN = 0x80


class VirtioNetHdr(NamedTuple):
    """``struct virtio_net_hdr``, what a TAP with ``IFF_VNET_HDR`` puts before (and expects with) each frame."""
    flags: int = 0
    gso_type: int = 0
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def pack(self) -> bytes:
        return VIRTIO_NET_HDR.pack(*self)

    @classmethod
    def parse(cls, raw: bytes | bytearray | memoryview) -> VirtioNetHdr:
        return cls(*VIRTIO_NET_HDR.unpack_from(raw))

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)

    @property
    def data_valid(self) -> bool:
        return bool(self.flags & VIRTIO_NET_HDR_F_DATA_VALID)


def flow_hash(frame: bytes | memoryview) -> int:
    """A hash of the frame's flow (IP addresses and TCP/UDP ports), to keep a flow on one queue.

    Frames of one TCP connection always hash alike, so spreading them over
    several rings never reorders a flow (what ``skb_get_hash`` buys Linux's
    ``xennet_select_queue`` and ``xenvif_select_queue``).  Anything that is
    not TCP/UDP over IP hashes to 0.
    """
    h = parse_headers(frame)
    if h is None:
        return 0
    addrs = frame[h.l3_offset + 8:h.l3_offset + 40] if h.ipv6 else frame[h.l3_offset + 12:h.l3_offset + 20]
    # SipHash (Python's bytes hash): well mixed in every bit, unlike a CRC's low bits over ports that
    # Linux hands out in steps of two.  Per process, which is all a queue choice needs.
    return hash(bytes(addrs) + bytes(frame[h.l4_offset:h.l4_offset + 4]) + bytes((h.proto,))) & 0xFFFFFFFF
