"""Xen's network-device protocol (``xen/io/netif.h``): constants and ring layouts.

A vif is a pair of rings per queue, each one page here:

* **TX** (guest transmit, frontend -> backend): the frontend posts
  ``netif_tx_request`` slots naming granted buffers that hold packet data;
  the backend copies the data out and answers every slot with a
  ``netif_tx_response``.
* **RX** (guest receive, backend -> frontend): the frontend posts empty
  granted pages as ``netif_rx_request``; the backend fills them and answers
  with ``netif_rx_response`` (``status`` is the byte count, or a negative
  ``NETIF_RSP_*``).

Unlike blkif, nothing in netif has a 64-bit member, so the x86_32 and
x86_64 layouts are the same (the tests compile with ``-m64`` and ``-m32``).

A packet may take several slots, and slots are not all requests of one
kind: after the first slot of a packet come optional *extra-info* slots
(``netif_extra_info``: GSO segment size, multicast filter changes, an RSS
hash), then continuation fragments.  :func:`walk_tx_packet` and
:func:`walk_rx_packet` split a run of slot copies into packets.

Parsing is deliberately split from validation, as in :mod:`blkif`: every
``parse_*`` decodes a copy the caller already took off the ring and never
raises on bytes of at least the structure's size; whether a gref is
granted, an offset fits in the page, sizes add up or a chain is too long is
the backend's business (see :class:`TxPacket`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from .ring import SharedRing, ring_size

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

#: The fewest slots per packet a backend must accept without negotiation.
#:
#: Old frontends and backends silently assumed their peer had the same
#: MAX_SKB_FRAGS, i.e. that a packet never spans more slots than the local
#: kernel would produce.  18 (old Linux MAX_SKB_FRAGS) is what most
#: frontends send at most, so a backend must accept any packet of up to 18
#: slots; a backend may refuse longer chains (Linux netback drops them, and
#: treats a chain a little longer again as a malicious frontend and
#: disconnects it), which is what bounds the work one packet costs it.
XEN_NETIF_NR_SLOTS_MIN = 18

#: ``size`` is a u16: no single transmitted packet is larger (GSO included).
XEN_NETIF_MAX_TX_SIZE = 0xFFFF

# netif_tx_request.flags
NETTXF_csum_blank = 1 << 0        # checksum field left blank (offload): backend must fill it in
NETTXF_data_validated = 1 << 1    # checksum already known good
NETTXF_more_data = 1 << 2         # the packet continues in the next data slot
NETTXF_extra_info = 1 << 3        # the next slot is a netif_extra_info, not a request

# netif_rx_response.flags
NETRXF_data_validated = 1 << 0
NETRXF_csum_blank = 1 << 1
NETRXF_more_data = 1 << 2
NETRXF_extra_info = 1 << 3
NETRXF_gso_prefix = 1 << 4        # deprecated: GSO info in a prefix slot before the packet

# netif_extra_info.type
XEN_NETIF_EXTRA_TYPE_NONE = 0     # never used: invalid
XEN_NETIF_EXTRA_TYPE_GSO = 1      # u.gso
XEN_NETIF_EXTRA_TYPE_MCAST_ADD = 2  # u.mcast
XEN_NETIF_EXTRA_TYPE_MCAST_DEL = 3  # u.mcast
XEN_NETIF_EXTRA_TYPE_HASH = 4     # u.hash
XEN_NETIF_EXTRA_TYPE_MAX = 5      # (Linux's copy adds XDP = 5; Xen's header does not)

# netif_extra_info.flags
XEN_NETIF_EXTRA_FLAG_MORE = 1 << 0  # another extra-info slot follows this one

# netif_extra_info.u.gso.type
XEN_NETIF_GSO_TYPE_NONE = 0
XEN_NETIF_GSO_TYPE_TCPV4 = 1
XEN_NETIF_GSO_TYPE_TCPV6 = 2

# Response status.  Xen's header spells them NETIF_RSP_*; Linux's copy of
# the header renamed them XEN_NETIF_RSP_*.  Both spellings are provided.
NETIF_RSP_DROPPED = -2
NETIF_RSP_ERROR = -1
NETIF_RSP_OKAY = 0
NETIF_RSP_NULL = 1                # no response: the answer to an extra-info slot
XEN_NETIF_RSP_DROPPED = NETIF_RSP_DROPPED
XEN_NETIF_RSP_ERROR = NETIF_RSP_ERROR
XEN_NETIF_RSP_OKAY = NETIF_RSP_OKAY
XEN_NETIF_RSP_NULL = NETIF_RSP_NULL

# Hash types.  The header defines both a bit number (_XEN_NETIF_CTRL_HASH_TYPE_*)
# and a mask.  The masks go in the control ring's SET_HASH_FLAGS; the hash
# extra-info's ``type`` field carries the *bit number*.  Header names are kept
# verbatim, leading underscore included, so they grep to the header.
_XEN_NETIF_CTRL_HASH_TYPE_IPV4 = 0
_XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP = 1
_XEN_NETIF_CTRL_HASH_TYPE_IPV6 = 2
_XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP = 3
XEN_NETIF_CTRL_HASH_TYPE_IPV4 = 1 << _XEN_NETIF_CTRL_HASH_TYPE_IPV4
XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP = 1 << _XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP
XEN_NETIF_CTRL_HASH_TYPE_IPV6 = 1 << _XEN_NETIF_CTRL_HASH_TYPE_IPV6
XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP = 1 << _XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP
HASH_TYPE_BITS = {                 # public view of the bit numbers above
    "ipv4": _XEN_NETIF_CTRL_HASH_TYPE_IPV4,
    "ipv4-tcp": _XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP,
    "ipv6": _XEN_NETIF_CTRL_HASH_TYPE_IPV6,
    "ipv6-tcp": _XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP,
}

XEN_NETIF_CTRL_HASH_ALGORITHM_NONE = 0
XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ = 1

# Control ring (xen_netif_ctrl_request.type / response.status)
XEN_NETIF_CTRL_TYPE_INVALID = 0
XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS = 1
XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS = 2
XEN_NETIF_CTRL_TYPE_SET_HASH_KEY = 3
XEN_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE = 4
XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE = 5
XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING = 6
XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM = 7
XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE = 8
XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING = 9
XEN_NETIF_CTRL_TYPE_DEL_GREF_MAPPING = 10

XEN_NETIF_CTRL_STATUS_SUCCESS = 0
XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED = 1
XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER = 2
XEN_NETIF_CTRL_STATUS_BUFFER_OVERFLOW = 3

XEN_NETIF_CTRLF_GREF_readonly = 1 << 0

# --------------------------------------------------------------------------
# Layouts (little-endian, natural alignment; identical on x86_32 and x86_64)
# --------------------------------------------------------------------------

TX_REQUEST = struct.Struct("<IHHHH")     # gref, offset, flags, id, size            (12)
TX_RESPONSE = struct.Struct("<Hh")       # id, status                              (4)
RX_REQUEST = struct.Struct("<HxxI")      # id, pad, gref                           (8)
RX_RESPONSE = struct.Struct("<HHHh")     # id, offset, flags, status               (8)
EXTRA_HEAD = struct.Struct("<BB")        # type, flags                             (2)
EXTRA_INFO_SIZE = 8                      # sizeof(struct netif_extra_info)
EXTRA_UNION_OFFSET = 2                   # offsetof(struct netif_extra_info, u)
EXTRA_GSO = struct.Struct("<HBBH")       # u.gso: size, type, pad, features         (6)
EXTRA_MCAST = struct.Struct("<6s")       # u.mcast: addr[6]
EXTRA_HASH = struct.Struct("<BB4s")      # u.hash: type, algorithm, value[4]
CTRL_REQUEST = struct.Struct("<HH3I")    # id, type, data[3]                       (16)
CTRL_RESPONSE = struct.Struct("<HHII")   # id, type, status, data                  (12)
GREF = struct.Struct("<IHH")             # struct xen_netif_gref: ref, flags, status (8)

# A ring slot is the union of request and response; extra-info must fit both
# rings' slots, which is why it is limited to 8 bytes (the RX slot).
TX_SLOT_SIZE = max(TX_REQUEST.size, TX_RESPONSE.size)          # 12
RX_SLOT_SIZE = max(RX_REQUEST.size, RX_RESPONSE.size)          # 8
CTRL_SLOT_SIZE = max(CTRL_REQUEST.size, CTRL_RESPONSE.size)    # 16

#: Entries per one-page ring: __CONST_RING_SIZE(netif_tx, 4096) and (netif_rx, 4096).
TX_RING_SIZE = ring_size(1, TX_REQUEST.size, TX_RESPONSE.size)      # 256 (336 fit)
RX_RING_SIZE = ring_size(1, RX_REQUEST.size, RX_RESPONSE.size)      # 256 (504 fit)
CTRL_RING_SIZE = ring_size(1, CTRL_REQUEST.size, CTRL_RESPONSE.size)  # 128


def tx_shared_ring(pages: Sequence[memoryview]) -> SharedRing:
    """A :class:`SharedRing` over TX ring page(s) (12-byte requests, 4-byte responses)."""
    return SharedRing(pages, TX_REQUEST.size, TX_RESPONSE.size)


def rx_shared_ring(pages: Sequence[memoryview]) -> SharedRing:
    """A :class:`SharedRing` over RX ring page(s) (8-byte requests and responses)."""
    return SharedRing(pages, RX_REQUEST.size, RX_RESPONSE.size)


def ctrl_shared_ring(pages: Sequence[memoryview]) -> SharedRing:
    """A :class:`SharedRing` over the control ring page."""
    return SharedRing(pages, CTRL_REQUEST.size, CTRL_RESPONSE.size)


# --------------------------------------------------------------------------
# Structures
# --------------------------------------------------------------------------

class TxRequest(NamedTuple):
    """``struct netif_tx_request``: one data slot of a transmitted packet.

    ``size`` means two things.  In the *first* slot of a packet it is the
    size of the whole packet, not of that slot's buffer: the backend learns
    how much to allocate (and can refuse an oversized packet) before it has
    walked the chain, and the first fragment's own length is what is left
    after subtracting the later slots' sizes (:attr:`TxPacket.first_fragment_size`).
    In every later slot it is that fragment's size.
    """
    gref: int
    offset: int
    flags: int
    id: int
    size: int


class TxResponse(NamedTuple):
    """``struct netif_tx_response``: ``status`` is a ``NETIF_RSP_*``."""
    id: int
    status: int


class RxRequest(NamedTuple):
    """``struct netif_rx_request``: an empty granted page for the backend to fill."""
    id: int
    gref: int


class RxResponse(NamedTuple):
    """``struct netif_rx_response``: ``status`` is the byte count, or a negative ``NETIF_RSP_*``.

    The backend must put each response in the ring slot of the request it
    consumed: Linux netfront ignores ``id`` and pairs by slot, because an
    extra-info slot overlays the id and so carries none.
    """
    id: int
    offset: int
    flags: int
    status: int


class GsoInfo(NamedTuple):
    """``u.gso``: ``size`` is the segment payload size (the TCP MSS), ``type`` a ``XEN_NETIF_GSO_TYPE_*``.

    A named tuple, not a frozen dataclass: every TCP super-frame makes one
    or more on its way (the ring's extra slot, the TAP's virtio-net header),
    and a frozen dataclass costs four times as much to build.
    """
    size: int
    type: int
    pad: int = 0
    features: int = 0


@dataclass(frozen=True)
class McastInfo:
    """``u.mcast``: the Ethernet address to add to or drop from the backend's filter."""
    addr: bytes


@dataclass(frozen=True)
class HashInfo:
    """``u.hash``: ``type`` is a hash-type *bit number* (``_XEN_NETIF_CTRL_HASH_TYPE_*``),
    ``algorithm`` a ``XEN_NETIF_CTRL_HASH_ALGORITHM_*``, ``value`` the 4 hash bytes, LSB first."""
    type: int
    algorithm: int
    value: bytes

    @property
    def value_u32(self) -> int:
        return int.from_bytes(self.value, "little")


ExtraBody = GsoInfo | McastInfo | HashInfo | bytes


@dataclass(frozen=True)
class ExtraInfo:
    """``struct netif_extra_info``: per-packet metadata carried in its own ring slot.

    Why a slot of its own: the ring has one fixed slot size and strict
    slot-for-slot accounting (each request slot is freed by exactly one
    response slot).  Widening every request for metadata most packets lack
    would shrink the ring; instead the first request sets
    ``NETTXF_extra_info`` (``NETRXF_extra_info`` on RX) and the following
    slot(s) are reinterpreted as this 8-byte structure, chained by
    ``XEN_NETIF_EXTRA_FLAG_MORE``.  On TX the backend answers such a slot
    with ``NETIF_RSP_NULL`` so the slot is released in order; on RX an
    extra-info response occupies the slot of a request the backend consumed
    without filling, which is why it carries no id.  8 bytes is the RX slot
    size, the smaller of the two rings.

    ``body`` is the union decoded by ``type``: :class:`GsoInfo` for GSO,
    :class:`McastInfo` for MCAST_ADD/DEL, :class:`HashInfo` for HASH, and
    the 6 raw union bytes for any other type (NONE is invalid; what to do
    with it is the caller's decision).
    """
    type: int
    flags: int
    body: ExtraBody

    @property
    def more(self) -> bool:
        return bool(self.flags & XEN_NETIF_EXTRA_FLAG_MORE)


@dataclass(frozen=True)
class CtrlRequest:
    """``struct xen_netif_ctrl_request``."""
    id: int
    type: int
    data: tuple[int, int, int]


@dataclass(frozen=True)
class CtrlResponse:
    """``struct xen_netif_ctrl_response``."""
    id: int
    type: int
    status: int
    data: int


@dataclass(frozen=True)
class Gref:
    """``struct xen_netif_gref`` (the control ring's gref-mapping page entries)."""
    ref: int
    flags: int
    status: int


# --------------------------------------------------------------------------
# Parse (never raises on bytes at least the structure's size) and pack
# --------------------------------------------------------------------------

def parse_tx_request(raw: bytes) -> TxRequest:
    return TxRequest(*TX_REQUEST.unpack_from(raw))


def pack_tx_request(req: TxRequest) -> bytes:
    return TX_REQUEST.pack(req.gref, req.offset, req.flags, req.id, req.size)


def parse_tx_response(raw: bytes) -> TxResponse:
    return TxResponse(*TX_RESPONSE.unpack_from(raw))


def pack_tx_response(rsp: TxResponse) -> bytes:
    return TX_RESPONSE.pack(rsp.id, rsp.status)


def parse_rx_request(raw: bytes) -> RxRequest:
    """The ``pad`` field is ignored (and written as zero by :func:`pack_rx_request`)."""
    return RxRequest(*RX_REQUEST.unpack_from(raw))


def pack_rx_request(req: RxRequest) -> bytes:
    return RX_REQUEST.pack(req.id, req.gref)


def parse_rx_response(raw: bytes) -> RxResponse:
    return RxResponse(*RX_RESPONSE.unpack_from(raw))


def pack_rx_response(rsp: RxResponse) -> bytes:
    return RX_RESPONSE.pack(rsp.id, rsp.offset, rsp.flags, rsp.status)


def parse_extra_info(raw: bytes) -> ExtraInfo:
    """Decode the first 8 bytes of a slot copy (a TX slot's last 4 bytes are padding)."""
    etype, flags = EXTRA_HEAD.unpack_from(raw)
    body: ExtraBody
    if etype == XEN_NETIF_EXTRA_TYPE_GSO:
        body = GsoInfo(*EXTRA_GSO.unpack_from(raw, EXTRA_UNION_OFFSET))
    elif etype in (XEN_NETIF_EXTRA_TYPE_MCAST_ADD, XEN_NETIF_EXTRA_TYPE_MCAST_DEL):
        body = McastInfo(*EXTRA_MCAST.unpack_from(raw, EXTRA_UNION_OFFSET))
    elif etype == XEN_NETIF_EXTRA_TYPE_HASH:
        body = HashInfo(*EXTRA_HASH.unpack_from(raw, EXTRA_UNION_OFFSET))
    else:
        body = bytes(raw[EXTRA_UNION_OFFSET:EXTRA_INFO_SIZE])
        if len(body) != EXTRA_INFO_SIZE - EXTRA_UNION_OFFSET:
            raise struct.error("extra info needs 8 bytes")
    return ExtraInfo(etype, flags, body)


def pack_extra_info(info: ExtraInfo, slot_size: int = EXTRA_INFO_SIZE) -> bytes:
    """8 bytes, zero-padded to ``slot_size``.

    The union is packed by the Python type of ``body``, not by ``type``, so a
    caller can build a deliberately inconsistent slot (tests of a peer's
    validation).  Pass ``slot_size=TX_SLOT_SIZE`` when writing into a TX ring
    so the slot's trailing 4 bytes are zeroed rather than left from an older
    request.
    """
    body = info.body
    if isinstance(body, GsoInfo):
        u = EXTRA_GSO.pack(body.size, body.type, body.pad, body.features)
    elif isinstance(body, McastInfo):
        if len(body.addr) != 6:
            raise ValueError("a multicast address is 6 bytes")
        u = EXTRA_MCAST.pack(body.addr)
    elif isinstance(body, HashInfo):
        if len(body.value) != 4:
            raise ValueError("a hash value is 4 bytes")
        u = EXTRA_HASH.pack(body.type, body.algorithm, body.value)
    else:
        u = bytes(body)
        if len(u) != EXTRA_INFO_SIZE - EXTRA_UNION_OFFSET:
            raise ValueError("a raw extra-info union is 6 bytes")
    return (EXTRA_HEAD.pack(info.type, info.flags) + u).ljust(slot_size, b"\0")


def gso_extra(size: int, gso_type: int, features: int = 0, flags: int = 0) -> ExtraInfo:
    return ExtraInfo(XEN_NETIF_EXTRA_TYPE_GSO, flags, GsoInfo(size, gso_type, 0, features))


@lru_cache(maxsize=64)
def packed_gso_extra(size: int, gso_type: int, slot_size: int) -> bytes:
    """The last (no FLAG_MORE) GSO extra-info slot for an MSS and type, packed once: every super-frame
    carries one, each way, and packing it from fresh dataclasses cost more than the rest of its slot."""
    return pack_extra_info(gso_extra(size, gso_type), slot_size)


def mcast_extra(addr: bytes, add: bool = True, flags: int = 0) -> ExtraInfo:
    etype = XEN_NETIF_EXTRA_TYPE_MCAST_ADD if add else XEN_NETIF_EXTRA_TYPE_MCAST_DEL
    return ExtraInfo(etype, flags, McastInfo(bytes(addr)))


def hash_extra(hash_type_bit: int, value: int, algorithm: int = XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ,
               flags: int = 0) -> ExtraInfo:
    return ExtraInfo(XEN_NETIF_EXTRA_TYPE_HASH, flags,
                     HashInfo(hash_type_bit, algorithm, (value & 0xFFFFFFFF).to_bytes(4, "little")))


def parse_ctrl_request(raw: bytes) -> CtrlRequest:
    rid, rtype, *data = CTRL_REQUEST.unpack_from(raw)
    return CtrlRequest(rid, rtype, (data[0], data[1], data[2]))


def pack_ctrl_request(req: CtrlRequest) -> bytes:
    return CTRL_REQUEST.pack(req.id, req.type, *req.data)


def parse_ctrl_response(raw: bytes) -> CtrlResponse:
    return CtrlResponse(*CTRL_RESPONSE.unpack_from(raw))


def pack_ctrl_response(rsp: CtrlResponse) -> bytes:
    return CTRL_RESPONSE.pack(rsp.id, rsp.type, rsp.status, rsp.data)


def parse_gref(raw: bytes) -> Gref:
    return Gref(*GREF.unpack_from(raw))


def pack_gref(g: Gref) -> bytes:
    return GREF.pack(g.ref, g.flags, g.status)


# --------------------------------------------------------------------------
# Packets: splitting a run of slots (parsing only; no validation)
# --------------------------------------------------------------------------

def _extras(slots: Sequence[bytes], pos: int) -> tuple[tuple[ExtraInfo, ...], int] | None:
    """Extra-info slots from ``pos`` while FLAG_MORE; None if the run ends first."""
    out = []
    while True:
        if pos >= len(slots):
            return None
        extra = parse_extra_info(slots[pos])
        out.append(extra)
        pos += 1
        if not extra.more:
            return tuple(out), pos


@dataclass(frozen=True)
class TxPacket:
    """One transmitted packet as the frontend laid it out, undecided whether it is acceptable.

    The wire format: first request (flags, ``size`` = whole packet);
    if it has ``NETTXF_extra_info``, extra-info slots chained by
    ``XEN_NETIF_EXTRA_FLAG_MORE``; then, while the previous *request* had
    ``NETTXF_more_data``, continuation requests (flags on extras do not
    matter for that).  A backend answers all ``slots`` of it: the first and
    each continuation request with their own id and a status, each extra
    slot with ``NETIF_RSP_NULL`` (:func:`tx_responses`).

    What the backend still has to check: ``slots`` against
    ``XEN_NETIF_NR_SLOTS_MIN`` / its own limit, each ``offset + size`` within
    a page, :attr:`first_fragment_size` positive, extra types valid.
    """
    first: TxRequest
    extras: tuple[ExtraInfo, ...]
    frags: tuple[TxRequest, ...]

    @property
    def slots(self) -> int:
        return 1 + len(self.extras) + len(self.frags)

    @property
    def requests(self) -> tuple[TxRequest, ...]:
        return (self.first,) + self.frags

    @property
    def first_fragment_size(self) -> int:
        """``first.size`` minus the continuation sizes; negative means a lying frontend."""
        return self.first.size - sum(f.size for f in self.frags)


def walk_tx_packet(slots: Sequence[bytes]) -> TxPacket | None:
    """The packet starting at ``slots[0]``, or None if the slots end inside it.

    A frontend must push whole packets, so None for a run of everything the
    frontend has published is an error for the backend to act on; None from a
    run cut short by the caller means "read more".  Never raises on slot
    copies of ``TX_SLOT_SIZE`` bytes; the chain is bounded by ``len(slots)``,
    so a caller limits a hostile chain by how many slots it passes.
    """
    if not slots:
        return None
    first = parse_tx_request(slots[0])
    pos = 1
    extras: tuple[ExtraInfo, ...] = ()
    if first.flags & NETTXF_extra_info:
        got = _extras(slots, pos)
        if got is None:
            return None
        extras, pos = got
    frags = []
    more = bool(first.flags & NETTXF_more_data)
    while more:
        if pos >= len(slots):
            return None
        frag = parse_tx_request(slots[pos])
        frags.append(frag)
        pos += 1
        more = bool(frag.flags & NETTXF_more_data)
    return TxPacket(first, extras, tuple(frags))


def tx_responses(packet: TxPacket, status: int) -> list[bytes]:
    """One response per slot of ``packet``, in slot order (extras answered NETIF_RSP_NULL, id 0)."""
    out = [pack_tx_response(TxResponse(packet.first.id, status))]
    out += [pack_tx_response(TxResponse(0, NETIF_RSP_NULL))] * len(packet.extras)
    out += [pack_tx_response(TxResponse(f.id, status)) for f in packet.frags]
    return out


@dataclass(frozen=True)
class RxPacket:
    """One received packet: first response, its extras, continuation responses.

    On RX each response's ``status`` is that slot's byte count (unlike TX,
    there is no whole-packet size up front: the packet size is the sum), or
    a negative ``NETIF_RSP_*`` for that slot.
    """
    first: RxResponse
    extras: tuple[ExtraInfo, ...]
    frags: tuple[RxResponse, ...]

    @property
    def slots(self) -> int:
        return 1 + len(self.extras) + len(self.frags)

    @property
    def responses(self) -> tuple[RxResponse, ...]:
        return (self.first,) + self.frags

    @property
    def status(self) -> int:
        """The first negative status if any slot failed, else the packet's total size."""
        for r in self.responses:
            if r.status < 0:
                return r.status
        return sum(r.status for r in self.responses)


def walk_rx_packet(slots: Sequence[bytes]) -> RxPacket | None:
    """The packet starting at ``slots[0]`` (response copies), or None if the slots end inside it.

    Same shape as TX: extras (if ``NETRXF_extra_info``) right after the
    first response, then responses while ``NETRXF_more_data``.  Never raises
    on copies of ``RX_SLOT_SIZE`` bytes.
    """
    if not slots:
        return None
    first = parse_rx_response(slots[0])
    pos = 1
    extras: tuple[ExtraInfo, ...] = ()
    if first.flags & NETRXF_extra_info:
        got = _extras(slots, pos)
        if got is None:
            return None
        extras, pos = got
    frags = []
    more = bool(first.flags & NETRXF_more_data)
    while more:
        if pos >= len(slots):
            return None
        frag = parse_rx_response(slots[pos])
        frags.append(frag)
        pos += 1
        more = bool(frag.flags & NETRXF_more_data)
    return RxPacket(first, extras, tuple(frags))


# --------------------------------------------------------------------------
# Toeplitz hash (the header's reference xen_netif_toeplitz_hash)
# --------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def toeplitz_hash(key: bytes, data: bytes) -> int:
    """``xen_netif_toeplitz_hash``: the value a HASH extra carries for ALGORITHM_TOEPLITZ.

    A key shorter than ``8 + len(data)`` bytes is extended with zeros, as in
    the header's code.
    """
    prefix = 0
    for i in range(8):
        prefix = (prefix << 8) | (key[i] if i < len(key) else 0)
    keyi = 8
    value = 0
    for byte in data:
        for _ in range(8):
            if byte & 0x80:
                value ^= prefix
            prefix = (prefix << 1) & _MASK64
            byte = (byte << 1) & 0xFF
        prefix |= key[keyi] if keyi < len(key) else 0
        keyi += 1
    return value >> 32

