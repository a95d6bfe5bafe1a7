"""An independent reference for the offload tests: textbook checksums and frames built by hand.

Frames are built here by hand with ``struct`` and every checksum is verified
with a textbook 16-bit one's-complement loop (:func:`textbook_sum`), never
with the module's own ``ones_sum``: a bug shared by producer and checker
cannot hide.  Layout offsets come from the builder, not from
``parse_headers``.  Used by the test_packet_*, test_netback_offload,
test_netfront_offload, test_offload_hostile and test_vhost_user_net tests.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from xdom.backends.netback.tx import TxPacket
from xdom.domains.abi.netif import GsoInfo
from xdom.domains.packet import L4Headers, VirtioGso, VirtioNetHdr
from xdom.domains.vnet import BackendOffloads

TCP, UDP = 6, 17
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
NEEDS_CSUM, DATA_VALID = 1, 2

SRC4, DST4 = bytes([10, 1, 2, 3]), bytes([192, 168, 254, 77])
SRC6 = bytes.fromhex("fd00000000000000a1b2c3d4e5f60718")
DST6 = bytes.fromhex("2001db80ffff0000fedcba9876543210")
MAC_DST, MAC_SRC = bytes.fromhex("02aabbccdd01"), bytes.fromhex("02aabbccdd02")
HOP, ROUTING, DSTOPTS, FRAGMENT = 0, 43, 60, 44


# ---- an independent reference: textbook checksum and hand-built frames ----------------------------

def textbook_sum(data: bytes) -> int:
    """RFC 1071: add 16-bit big-endian words with end-around carry; odd tail padded with a zero byte."""
    s = 0
    for i in range(0, len(data) - 1, 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    if len(data) % 2:
        s += data[-1] << 8
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo_header(v6: bool, src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if v6:
        return src + dst + struct.pack("!I3xB", length, proto)
    return src + dst + struct.pack("!xBH", proto, length)


@dataclass(frozen=True)
class Built:
    """A hand-built frame and where its parts are (known by construction, not by parsing)."""
    frame: bytes
    v6: bool
    proto: int
    l3: int
    l4: int
    l4_len: int
    vlan: bool

    @property
    def hlen(self) -> int:
        return self.l4 + self.l4_len

    @property
    def payload(self) -> bytes:
        return self.frame[self.hlen:]

    @property
    def field(self) -> int:
        """Where the L4 checksum is."""
        return self.l4 + (16 if self.proto == TCP else 6)

    def expected(self) -> L4Headers:
        return L4Headers(self.l3, self.v6, self.l4, self.proto, self.l4_len)


def build(*, v6: bool = False, proto: int = TCP, payload: bytes = b"", vlan: int | None = None,
          tpid: int = 0x8100, ip_opts: bytes = b"", tcp_opts: bytes = b"", ext: tuple[int, ...] = (),
          seq: int = 1_000_000, ack: int = 77, flags: int = ACK, ip_id: int = 0x1234, frag: int = 0x4000,
          csum: str | int = "partial", doff: int | None = None, ihl: int | None = None) -> Built:
    """An Ethernet frame carrying TCP or UDP over IPv4/IPv6.

    ``csum``: "partial" puts the folded pseudo-header sum in the L4 checksum
    field (Linux's CHECKSUM_PARTIAL), "full" a complete checksum, an int
    that value.
    """
    assert len(ip_opts) % 4 == 0 and len(tcp_opts) % 4 == 0
    eth = MAC_DST + MAC_SRC
    if vlan is not None:
        eth += struct.pack("!HH", tpid, vlan)
    eth += struct.pack("!H", 0x86DD if v6 else 0x0800)
    l3 = len(eth)
    if proto == TCP:
        l4_len = 20 + len(tcp_opts)
        l4_hdr = struct.pack("!HHIIBBHHH", 40000, 443, seq, ack, (doff if doff is not None else l4_len // 4) << 4,
                             flags, 65000, 0, 0) + tcp_opts
    else:
        l4_len = 8
        l4_hdr = struct.pack("!HHHH", 5353, 53, min(8 + len(payload), 0xFFFF), 0)
    l4_seg = bytearray(l4_hdr + payload)
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    # past 64 KiB (a GSO super-frame) the 16-bit length fields saturate; segmentation rewrites them
    pseudo = pseudo_header(v6, src, dst, proto, len(l4_seg) if v6 else min(len(l4_seg), 0xFFFF))
    pos = 16 if proto == TCP else 6
    if csum == "partial":
        value = textbook_sum(pseudo)
    elif csum == "full":
        value = ~textbook_sum(pseudo + bytes(l4_seg)) & 0xFFFF
        if proto == UDP and value == 0:
            value = 0xFFFF
    else:
        value = csum
    l4_seg[pos:pos + 2] = struct.pack("!H", value)
    if v6:
        exts = b""
        chain = list(ext) + [proto]
        for i, _kind in enumerate(ext):
            units = i % 3                       # 8, 16 or 24 bytes
            exts += bytes([chain[i + 1], units]) + bytes(range(i, i + 6 + units * 8))
        ip = struct.pack("!IHBB16s16s", (6 << 28) | (0x2E << 20) | 0xBEEF, min(len(exts) + len(l4_seg), 0xFFFF),
                         chain[0], 64, src, dst) + exts
    else:
        hl = ihl if ihl is not None else (20 + len(ip_opts)) // 4
        hdr = bytearray(struct.pack("!BBHHHBBH4s4s", (4 << 4) | hl, 0, min(20 + len(ip_opts) + len(l4_seg), 0xFFFF), ip_id,
                                    frag, 64, proto, 0, src, dst) + ip_opts)
        hdr[10:12] = struct.pack("!H", ~textbook_sum(bytes(hdr)) & 0xFFFF)
        ip = bytes(hdr)
    frame = eth + ip + bytes(l4_seg)
    return Built(frame, v6, proto, l3, l3 + len(ip), l4_len, vlan is not None)


def l4_checksum_ok(frame: bytes, v6: bool, l3: int, l4: int, proto: int) -> bool:
    """The complete L4 checksum of ``frame`` verifies (pseudo-header length: everything from ``l4``)."""
    src, dst = (frame[l3 + 8:l3 + 24], frame[l3 + 24:l3 + 40]) if v6 else (frame[l3 + 12:l3 + 16],
                                                                          frame[l3 + 16:l3 + 20])
    return textbook_sum(pseudo_header(v6, src, dst, proto, len(frame) - l4) + frame[l4:]) == 0xFFFF


def pseudo_sum_of(frame: bytes, v6: bool, l3: int, l4: int, proto: int) -> int:
    src, dst = (frame[l3 + 8:l3 + 24], frame[l3 + 24:l3 + 40]) if v6 else (frame[l3 + 12:l3 + 16],
                                                                          frame[l3 + 16:l3 + 20])
    return textbook_sum(pseudo_header(v6, src, dst, proto, len(frame) - l4))


def field_of(frame: bytes, b: Built) -> int:
    return struct.unpack_from("!H", frame, b.field)[0]


def without_field(frame: bytes, b: Built) -> bytes:
    return frame[:b.field] + frame[b.field + 2:]


def check_segments(b: Built, segs: list[bytes], mss: int, *, partial: bool) -> None:
    """Everything Linux's tcp_gso_segment promises about the segments of ``b``."""
    payload = b.payload
    count = max(1, -(-len(payload) // mss))
    assert len(segs) == count
    orig = b.frame
    l3, l4, hlen = b.l3, b.l4, b.hlen
    seq0 = struct.unpack_from("!I", orig, l4 + 4)[0]
    flags0 = orig[l4 + 13]
    id0 = struct.unpack_from("!H", orig, l3 + 4)[0]
    for i, seg in enumerate(segs):
        chunk = seg[hlen:]
        assert chunk == payload[i * mss:(i + 1) * mss]
        assert len(chunk) == mss or i == count - 1
        # Untouched header bytes: Ethernet (and VLAN), addresses, ports, ack, window, urgent pointer, options.
        assert seg[:l3] == orig[:l3]
        if b.v6:
            assert seg[l3:l3 + 4] == orig[l3:l3 + 4] and seg[l3 + 6:l4] == orig[l3 + 6:l4]
            assert struct.unpack_from("!H", seg, l3 + 4)[0] == len(seg) - l3 - 40
        else:
            assert seg[l3:l3 + 2] == orig[l3:l3 + 2] and seg[l3 + 6:l3 + 10] == orig[l3 + 6:l3 + 10]
            assert seg[l3 + 12:l4] == orig[l3 + 12:l4]
            assert struct.unpack_from("!H", seg, l3 + 2)[0] == len(seg) - l3
            assert struct.unpack_from("!H", seg, l3 + 4)[0] == (id0 + i) & 0xFFFF
            assert textbook_sum(seg[l3:l4]) == 0xFFFF
        assert seg[l4:l4 + 4] == orig[l4:l4 + 4]
        assert struct.unpack_from("!I", seg, l4 + 4)[0] == (seq0 + i * mss) & 0xFFFFFFFF
        assert seg[l4 + 8:l4 + 13] == orig[l4 + 8:l4 + 13]
        want = flags0
        if i != count - 1:
            want &= ~(FIN | PSH)
        if i != 0:
            want &= ~CWR
        assert seg[l4 + 13] == want
        assert seg[l4 + 14:l4 + 16] == orig[l4 + 14:l4 + 16]
        assert seg[l4 + 18:hlen] == orig[l4 + 18:hlen]
        if partial:
            assert field_of(seg, b) == pseudo_sum_of(seg, b.v6, l3, l4, TCP)
        else:
            assert l4_checksum_ok(seg, b.v6, l3, l4, TCP)
    assert b"".join(s[hlen:] for s in segs) == payload


def tx_packet(data: bytes, *, gso: GsoInfo | None = None, csum_blank: bool = False, data_validated: bool = False,
              csum_fixup: bool = False) -> TxPacket:
    return TxPacket(pieces=(), length=len(data), gso=gso, csum_blank=csum_blank, data_validated=data_validated,
                    csum_fixup=csum_fixup, hash=None, responses=())


TCP_OPTS = bytes([2, 4, 0x05, 0xB4, 1, 1, 8, 10]) + bytes(range(1, 9)) + bytes([1, 1, 4, 2])   # MSS, TS, SACKOK
IP_OPTS = bytes([0x94, 4, 0, 0, 1, 1, 1, 0])                                                   # router alert, NOPs

LAYOUTS = {
    "v4-tcp": dict(),
    "v4-udp": dict(proto=UDP),
    "v4-vlan-tcp": dict(vlan=0x0123),
    "v4-qinq-outer-udp": dict(vlan=7, tpid=0x88A8, proto=UDP),
    "v4-ipopts-tcpopts": dict(ip_opts=IP_OPTS, tcp_opts=TCP_OPTS),
    "v6-tcp": dict(v6=True),
    "v6-udp": dict(v6=True, proto=UDP),
    "v6-vlan-tcpopts": dict(v6=True, vlan=0x0FFF, tcp_opts=TCP_OPTS),
    "v6-ext-tcp": dict(v6=True, ext=(HOP, ROUTING, DSTOPTS)),
    "v6-ext-vlan-udp": dict(v6=True, ext=(HOP, DSTOPTS), vlan=5, proto=UDP),
}

VALID_FRAMES = [build(payload=b"0123456789", **kw).frame for kw in LAYOUTS.values()]


# ---- what a guest's TAP says of a TSO frame, and a backend that takes every offload ---------------

def tso_hdr(b: Built, mss: int, ecn: bool = False) -> VirtioNetHdr:
    kind = (VirtioGso.TCPV6 if b.v6 else VirtioGso.TCPV4) | (VirtioGso.ECN if ecn else 0)
    return VirtioNetHdr(NEEDS_CSUM, kind, b.hlen, mss, b.l4, 16)


ALL_BE = BackendOffloads(sg=True, gso_tcpv4=True, gso_tcpv6=True, ipv6_csum=True)
