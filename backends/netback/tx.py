"""Guest transmit (TX ring, frontend -> backend), sans-IO: slot copies in, decisions out.

:class:`TxProcessor` is the part of Linux ``xenvif_tx_build_gops``
(``drivers/net/xen-netback/netback.c``) that decides, for every packet the
frontend put on its TX ring, what the backend does with it.  It never maps
a grant, copies a byte of packet data or writes the ring: the caller takes
slot copies off the :class:`~xdom.domains.abi.ring.BackRing`, feeds them in
ring order, and gets one action per packet, in ring order:

* :class:`TxPacket`: a well-formed packet; the ``pieces`` (gref, offset,
  length) to copy out of the frontend's granted pages, in order, the GSO
  and checksum metadata, and one response per slot to write once the data
  is copied.
* :class:`TxDrop`: a packet Linux drops (``xenvif_tx_err``): every slot is
  answered ``NETIF_RSP_ERROR`` (extra-info slots ``NETIF_RSP_NULL``) and
  nothing is copied.
* :class:`TxMulticast`: a multicast filter change (MCAST_ADD/DEL extra);
  the processor records it in :attr:`TxProcessor.multicast`.
* :class:`TxFatal`: a frontend Linux considers malicious
  (``xenvif_fatal_tx_err``): the caller must disconnect the vif.  Nothing
  is answered and the processor accepts nothing more.

The frontend is hostile: any slot bytes are accepted and never make the
processor raise, every slot it consumes is answered exactly once, a
response only ever carries the id of the request in its slot, and the work
one packet costs is bounded (at most ``fatal_slots`` data slots, at most a
ring's worth of slots in all).

Deliberately not here (the caller's business): credit-based rate limiting
(``tx_credit_exceeded``), grant copy/map failures (answer the packet's
slots ``NETIF_RSP_ERROR`` as ``xenvif_tx_check_gop`` does) and header
parsing (``checksum_setup`` drops a packet whose headers cannot carry the
offloads it asks for, after the slots were answered ``OKAY``).  Copy, do
not map, at least the headers before looking at them: the frontend can
rewrite its granted pages at any time (Linux copies the first
``XEN_NETBACK_TX_COPY_LEN`` = 128 bytes for that reason).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from itertools import repeat
from operator import add as _plus
from typing import NamedTuple

from xdom.domains.abi.netif import (
    EXTRA_GSO,
    EXTRA_HEAD,
    EXTRA_UNION_OFFSET,
    HASH_TYPE_BITS,
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    TX_REQUEST,
    TX_RING_SIZE,
    TX_SLOT_SIZE,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_HASH,
    XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
    XEN_NETIF_EXTRA_TYPE_MCAST_DEL,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    XEN_NETIF_NR_SLOTS_MIN,
    ExtraInfo,
    GsoInfo,
    HashInfo,
    McastInfo,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    NETTXF_more_data,
    TxRequest,
    TxResponse,
    parse_extra_info,
    parse_tx_request,
)

#: XEN_PAGE_SIZE: a slot's buffer lies within one granted page.
PAGE_SIZE = 4096
ETH_HLEN = 14
VLAN_HLEN = 4
DEFAULT_MTU = 1500

#: common.h: the most slots after the first a packet may use and still be
#: delivered (historic MAX_SKB_FRAGS).  Linux compares it with the number
#: of slots *after the first*, so a packet of up to 19 data slots passes.
XEN_NETBK_LEGACY_SLOTS_MAX = XEN_NETIF_NR_SLOTS_MIN

#: netback.c FATAL_SKB_SLOTS_DEFAULT (module parameter fatal_skb_slots):
#: a frontend that chains this many slots after the first and still sets
#: more_data is malicious.
FATAL_SKB_SLOTS_DEFAULT = 20

#: common.h XEN_NETBK_MCAST_MAX: the frontend's multicast filter is at most this long.
XEN_NETBK_MCAST_MAX = 64

#: Linux's copy of netif.h knows one more extra-info type than Xen's (the
#: XDP headroom extra, meaningful only on RX); netback accepts it on TX and
#: ignores it.  Any other type at or past Xen's MAX, and NONE, is fatal.
XEN_NETIF_EXTRA_TYPE_XDP = 5
LINUX_EXTRA_TYPE_MAX = 6

_VALID_HASH_TYPES = frozenset(HASH_TYPE_BITS.values())


class Checksum(IntEnum):
    """Linux ``skb->ip_summed``, the checksum state a packet carries between TX and RX."""
    NONE = 0            # nothing known: the receiver verifies
    UNNECESSARY = 1     # already verified (NETTXF_data_validated / NETRXF_data_validated)
    PARTIAL = 3         # left blank for offload (NETTXF_csum_blank / NETRXF_csum_blank)


class TxPiece(NamedTuple):
    """``length`` bytes at ``offset`` in the frontend's granted page ``gref`` (never crosses the page)."""
    gref: int
    offset: int
    length: int


class TxPacket(NamedTuple):
    """A packet to deliver: copy ``pieces`` in order (``length`` bytes), then write ``responses``.

    ``responses`` has one entry per ring slot the packet used (``slots``),
    in slot order: ``NETIF_RSP_OKAY`` with the request's id for data slots,
    ``NETIF_RSP_NULL`` (id 0) for extra-info slots.  If copying fails the
    caller answers the same slots with ``NETIF_RSP_ERROR`` instead
    (:meth:`error_responses`), as ``xenvif_tx_check_gop`` does.

    Checksum state mirrors ``xenvif_tx_submit``: ``csum_blank`` is
    ``NETTXF_csum_blank`` (CHECKSUM_PARTIAL), ``data_validated`` is
    ``NETTXF_data_validated`` when ``csum_blank`` is not set
    (CHECKSUM_UNNECESSARY).  A GSO packet must be CHECKSUM_PARTIAL; buggy
    frontends omit the flag, so Linux forces it (``checksum_setup``,
    ``rx_gso_checksum_fixup``): then ``csum_blank`` and ``csum_fixup`` are
    both true and the pseudo-header checksum must be recomputed.

    A named tuple, not a frozen dataclass: one is made for every packet a
    guest sends, and a frozen dataclass's constructor costs four times as
    much (each field set through ``object.__setattr__``).
    """
    pieces: tuple[TxPiece, ...]
    length: int
    gso: GsoInfo | None
    csum_blank: bool
    data_validated: bool
    csum_fixup: bool
    hash: HashInfo | None
    responses: tuple[TxResponse, ...]

    @property
    def slots(self) -> int:
        return len(self.responses)

    @property
    def checksum(self) -> Checksum:
        if self.csum_blank:
            return Checksum.PARTIAL
        if self.data_validated:
            return Checksum.UNNECESSARY
        return Checksum.NONE

    def error_responses(self) -> tuple[TxResponse, ...]:
        """The answers when the data could not be copied: ERROR for data slots, NULL stays NULL."""
        return tuple(r if r.status == NETIF_RSP_NULL else TxResponse(r.id, NETIF_RSP_ERROR)
                     for r in self.responses)

    def gather(self, read: Callable[[int, int, int], bytes]) -> bytes:
        """The packet's bytes, ``read(gref, offset, length)`` supplying each piece."""
        return b"".join(read(p.gref, p.offset, p.length) for p in self.pieces)


@dataclass(frozen=True)
class TxDrop:
    """A packet that is not delivered; ``responses`` answer each of its slots, in slot order.

    ``status`` is ``NETIF_RSP_ERROR`` for everything refused on the ring
    (``xenvif_tx_err``).  The one exception is a well-formed frame longer
    than the MTU allows (see :class:`TxProcessor`): Linux takes it off the
    ring, answers ``OKAY`` and the stack drops it later, so ``status`` is
    ``NETIF_RSP_OKAY`` then.
    """
    reason: str
    status: int
    responses: tuple[TxResponse, ...]

    @property
    def slots(self) -> int:
        return len(self.responses)


@dataclass(frozen=True)
class TxMulticast:
    """A request carrying MCAST_ADD/DEL: the filter change and the answers for its slots.

    ``accepted`` is False when an add found the filter full
    (``XEN_NETBK_MCAST_MAX``); the request is then answered ERROR.
    """
    add: bool
    addr: bytes
    accepted: bool
    responses: tuple[TxResponse, ...]

    @property
    def slots(self) -> int:
        return len(self.responses)


@dataclass(frozen=True)
class TxFatal:
    """The frontend broke the protocol in a way Linux punishes by disabling the vif.

    ``slots`` is how many slots of the offending packet were looked at; none
    of them is answered (Linux does not either: the rings are torn down).
    """
    reason: str
    slots: int


TxAction = TxPacket | TxDrop | TxMulticast | TxFatal


# A continuation slot as TX_REQUEST unpacks it: TxRequest's fields, in its order, without the named tuple.
_Slot = tuple[int, int, int, int, int]
_GREF, _OFFSET, _, _ID, _SIZE = range(5)      # (flags are read where the slot is unpacked)
# Named tuples made from a ready tuple in C: their own constructor is a Python function, and a 64 KiB
# packet makes some 35 of them.
_new = tuple.__new__


_unpack_tx = TX_REQUEST.unpack_from
_unpack_head = EXTRA_HEAD.unpack_from
_unpack_gso = EXTRA_GSO.unpack_from
_NULL_RESPONSE = TxResponse(0, NETIF_RSP_NULL)


class _Fatal(Exception):
    def __init__(self, reason: str, slots: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.slots = slots


class _NeedMore(Exception):
    """The slots end inside the packet: wait for the frontend to publish the rest."""


def _answers(first: TxRequest, extra_count: int, frags: Sequence[_Slot], status: int) -> tuple[TxResponse, ...]:
    """``make_tx_response``: the first request, a NULL per extra slot after it, then each fragment."""
    out = [TxResponse(first.id, status)]
    out += [TxResponse(0, NETIF_RSP_NULL)] * extra_count
    out += [_new(TxResponse, (f[_ID], status)) for f in frags]
    return tuple(out)


class TxProcessor:
    """One TX queue's packet decisions, fed slot copies in ring order (see the module docstring).

    ``max_slots`` is Linux's XEN_NETBK_LEGACY_SLOTS_MAX and ``fatal_slots``
    its ``fatal_skb_slots``; both are compared, as Linux does, with the
    number of slots *after the first*: a packet with more than
    ``max_slots`` continuation slots is dropped, one that goes on past
    ``fatal_slots`` of them is fatal.  ``fatal_slots`` below ``max_slots``
    is raised to it (``netback_init``).

    ``mtu`` is that of the device the packets go to.  A non-GSO frame
    longer than ``mtu + ETH_HLEN + VLAN_HLEN`` cannot leave it: Linux's
    bridge drops it (``is_skb_forwardable``) after netback answered OKAY;
    here it becomes a :class:`TxDrop` with OKAY responses.

    ``ring_size`` bounds one packet's slots: a frontend cannot have more
    requests outstanding than the ring holds, so a chain (of extra-info
    slots: data slots stop at ``fatal_slots``) longer than that is fatal,
    as ``xenvif_get_extras`` running out of requests is.
    """

    def __init__(self, max_slots: int = XEN_NETIF_NR_SLOTS_MIN, mtu: int = DEFAULT_MTU,
                 fatal_slots: int = FATAL_SKB_SLOTS_DEFAULT, ring_size: int = TX_RING_SIZE,
                 mcast_max: int = XEN_NETBK_MCAST_MAX) -> None:
        if max_slots < 0 or mtu <= 0 or ring_size <= 0 or mcast_max < 0:
            raise ValueError("max_slots, mtu, ring_size and mcast_max must be positive")
        self.max_slots = max_slots
        self.fatal_slots = max(fatal_slots, max_slots)
        self.mtu = mtu
        self.ring_size = ring_size
        self.mcast_max = mcast_max
        self.fatal: str | None = None
        self.stats = {"packets": 0, "bytes": 0, "dropped": 0, "multicast": 0, "csum_fixup": 0}
        self._buf: list[bytes] = []
        self._mcast: list[bytes] = []     # a list, as Linux's: duplicates count toward the limit

    @property
    def pending(self) -> int:
        """Slots taken off the ring but not yet answered: the start of an unfinished packet."""
        return len(self._buf)

    @property
    def multicast(self) -> frozenset[bytes]:
        """The Ethernet addresses the frontend subscribed to (feature-multicast-control)."""
        return frozenset(self._mcast)

    def feed(self, slots: Sequence[bytes], *, at_req_prod: bool = False) -> list[TxAction]:
        """Decide every packet that ``slots`` (after what is pending) completes.

        ``slots`` are TX slot copies (``TX_SLOT_SIZE`` bytes each, longer
        ones are cut) in ring order.  A packet whose slots have not all
        arrived stays pending and is decided by a later call.  Pass
        ``at_req_prod=True`` when ``slots`` end at the frontend's published
        ``req_prod``: frontends push whole packets, so one still unfinished
        then is a :class:`TxFatal` (Linux: "Missing extra info", "Asked for
        N slots but exceeds this limit").

        After a :class:`TxFatal` the processor is dead: it returns nothing more.
        Raises ValueError only for a slot shorter than ``TX_SLOT_SIZE`` (a
        caller's bug, not the frontend's).
        """
        if self.fatal is not None:
            return []
        buf = self._buf
        if set(map(type, slots)) <= {bytes} and set(map(len, slots)) <= {TX_SLOT_SIZE}:
            buf.extend(slots)                  # private copies already (the ring's read_slots made them)
        else:
            for s in slots:
                if type(s) is bytes and len(s) == TX_SLOT_SIZE:
                    buf.append(s)
                elif len(s) < TX_SLOT_SIZE:
                    raise ValueError(f"a TX slot copy is {TX_SLOT_SIZE} bytes, got {len(s)}")
                else:
                    buf.append(bytes(s[:TX_SLOT_SIZE]))
        out: list[TxAction] = []
        while buf:
            try:
                action = self._one(at_req_prod)
            except _NeedMore:
                break
            except _Fatal as e:
                self.fatal = e.reason
                buf.clear()
                out.append(TxFatal(e.reason, e.slots))
                break
            out.append(action)
            if action.slots >= len(buf):
                buf.clear()
            else:
                del buf[:action.slots]
        return out

    # ---- one packet ------------------------------------------------------------------

    def _slot(self, i: int, at_req_prod: bool, missing: str) -> bytes:
        if i >= self.ring_size:
            raise _Fatal(f"packet runs over {i} slots, more than the ring's {self.ring_size}", i)
        if i >= len(self._buf):
            if at_req_prod:
                raise _Fatal(missing, i)
            raise _NeedMore
        return self._buf[i]

    #: Whether :meth:`_one` tries :meth:`_usual` first (a test turns it off to compare the two; it reads
    #: the slots' fields in the host's byte order, which must be the ring's).
    usual_first = sys.byteorder == "little"

    def _one(self, at_req_prod: bool) -> TxAction:
        """The packet at the head of the buffer (``xenvif_tx_build_gops``, one loop iteration).

        Mutates nothing but the multicast list, and that only once the
        packet is complete (so a :class:`_NeedMore` can simply be retried).
        """
        if self.usual_first:
            usual = self._usual()
            if usual is not None:
                return usual
        first = parse_tx_request(self._buf[0])
        pos = 1

        # xenvif_get_extras: chained by FLAG_MORE; NONE or an unknown type is
        # fatal; a later extra of a type replaces an earlier one.
        extras: dict[int, ExtraInfo] = {}
        if first.flags & NETTXF_extra_info:
            while True:
                extra = parse_extra_info(self._slot(pos, at_req_prod, "missing extra info"))
                pos += 1
                if not 0 < extra.type < LINUX_EXTRA_TYPE_MAX:
                    raise _Fatal(f"invalid extra type {extra.type}", pos)
                extras[extra.type] = extra
                if not extra.more:
                    break
        extra_count = pos - 1

        # Multicast control requests are answered on their own; the data
        # slots (if the first request claimed any) are not consumed with
        # them: Linux goes straight on to the next request.
        for etype, add in ((XEN_NETIF_EXTRA_TYPE_MCAST_ADD, True), (XEN_NETIF_EXTRA_TYPE_MCAST_DEL, False)):
            if etype in extras:
                body = extras[etype].body
                addr = body.addr if isinstance(body, McastInfo) else b"\0" * 6
                accepted = self._mcast_change(add, addr)
                self.stats["multicast"] += 1
                status = NETIF_RSP_OKAY if accepted else NETIF_RSP_ERROR
                return TxMulticast(add, addr, accepted, _answers(first, extra_count, (), status))

        frags, drop = self._count_requests(first, pos, at_req_prod)
        if drop is not None:
            self.stats["dropped"] += 1
            return TxDrop(drop, NETIF_RSP_ERROR, _answers(first, extra_count, frags, NETIF_RSP_ERROR))
        pos += len(frags)

        # first.size is the whole packet; what the first slot itself holds
        # is what the continuation slots leave (never negative here:
        # _count_requests dropped the packet otherwise).
        first_len = first.size - sum(f[_SIZE] for f in frags)
        if first_len < ETH_HLEN:
            self.stats["dropped"] += 1
            return TxDrop(f"first slot holds {first_len} bytes, less than an Ethernet header",
                          NETIF_RSP_ERROR, _answers(first, extra_count, frags, NETIF_RSP_ERROR))
        if first.offset + first_len > PAGE_SIZE:
            raise _Fatal(f"first slot crosses its page: offset {first.offset} + {first_len}", pos)

        gso = None
        if XEN_NETIF_EXTRA_TYPE_GSO in extras:
            gso = self._gso(extras[XEN_NETIF_EXTRA_TYPE_GSO], pos)

        hash_info = None
        if XEN_NETIF_EXTRA_TYPE_HASH in extras:
            body = extras[XEN_NETIF_EXTRA_TYPE_HASH].body
            if isinstance(body, HashInfo) and body.type in _VALID_HASH_TYPES:
                hash_info = body       # any other hash type is ignored, as skb_set_hash is skipped

        length = first.size
        if gso is None and length > self.mtu + ETH_HLEN + VLAN_HLEN:
            self.stats["dropped"] += 1
            return TxDrop(f"{length}-byte frame exceeds MTU {self.mtu} without GSO", NETIF_RSP_OKAY,
                          _answers(first, extra_count, frags, NETIF_RSP_OKAY))

        pieces = [TxPiece(first.gref, first.offset, first_len)]
        pieces += [_new(TxPiece, (f[_GREF], f[_OFFSET], f[_SIZE])) for f in frags if f[_SIZE]]
        csum_blank = bool(first.flags & NETTXF_csum_blank)
        data_validated = not csum_blank and bool(first.flags & NETTXF_data_validated)
        csum_fixup = gso is not None and not csum_blank
        if csum_fixup:
            csum_blank, data_validated = True, False
            self.stats["csum_fixup"] += 1
        self.stats["packets"] += 1
        self.stats["bytes"] += length
        return TxPacket(tuple(pieces), length, gso, csum_blank, data_validated, csum_fixup, hash_info,
                        _answers(first, extra_count, frags, NETIF_RSP_OKAY))

    def _usual(self) -> TxPacket | None:
        """The packet at the head of the buffer if it is a usual one, decided in bulk; else None.

        Usual: several data slots, all of them here, at most ``max_slots``
        after the first, none empty or crossing its page, their sizes within
        the first's, a first slot holding at least an Ethernet header, and
        no extra slot but one valid GSO.  Such a packet is a :class:`TxPacket`
        on every path of :meth:`_one`; this finds it with the slots' fields
        read as columns (a 64 KiB packet's 16 continuation slots were a
        Python step each, twice).  Anything else -- every drop, every fatal
        error, a packet still arriving -- is left to the general path,
        which decides it exactly as before.  A test feeds random slots to
        both and compares.
        """
        buf = self._buf
        gref0, off0, flags0, id0, size0 = _unpack_tx(buf[0])
        if not flags0 & NETTXF_more_data:
            return None
        gso = None
        pos = 1
        if flags0 & NETTXF_extra_info:
            if len(buf) < 2:
                return None
            etype, eflags = _unpack_head(buf[1])
            if etype != XEN_NETIF_EXTRA_TYPE_GSO or eflags & XEN_NETIF_EXTRA_FLAG_MORE:
                return None
            gso = GsoInfo(*_unpack_gso(buf[1], EXTRA_UNION_OFFSET))
            if gso.size == 0 or gso.type not in (XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6):
                return None
            pos = 2
        window = buf[pos:pos + self.max_slots]
        fields = memoryview(b"".join(window)).cast("H")
        ends = [f & NETTXF_more_data for f in fields[3::6]]
        if 0 not in ends:
            return None
        k = ends.index(0) + 1
        if pos + k > self.ring_size:
            return None
        sizes = fields[5:6 * k:6].tolist()
        offsets = fields[2:6 * k:6].tolist()
        total = sum(sizes)
        first_len = size0 - total
        if first_len < ETH_HLEN or off0 + first_len > PAGE_SIZE or 0 in sizes \
                or max(map(_plus, offsets, sizes)) > PAGE_SIZE:
            return None
        if gso is None and size0 > self.mtu + ETH_HLEN + VLAN_HLEN:
            return None
        grefs = fields.cast("B").cast("I")[0:3 * k:3].tolist()
        ids = fields[4:6 * k:6].tolist()
        pieces = (_new(TxPiece, (gref0, off0, first_len)), *map(_new, repeat(TxPiece), zip(grefs, offsets, sizes)))
        responses = [_new(TxResponse, (id0, NETIF_RSP_OKAY))]
        if gso is not None:
            responses.append(_NULL_RESPONSE)
        responses += map(_new, repeat(TxResponse), zip(ids, repeat(NETIF_RSP_OKAY)))
        csum_blank = bool(flags0 & NETTXF_csum_blank)
        data_validated = not csum_blank and bool(flags0 & NETTXF_data_validated)
        csum_fixup = gso is not None and not csum_blank
        stats = self.stats
        if csum_fixup:
            csum_blank, data_validated = True, False
            stats["csum_fixup"] += 1
        stats["packets"] += 1
        stats["bytes"] += size0
        return _new(TxPacket, (pieces, size0, gso, csum_blank, data_validated, csum_fixup, None, tuple(responses)))

    def _count_requests(self, first: TxRequest, pos: int, at_req_prod: bool) -> tuple[list[_Slot], str | None]:
        """``xenvif_count_requests``: the continuation slots, and why to drop the packet if so.

        Linux reads on after deciding to drop, so that every slot of the
        packet is consumed and answered, and still checks each slot's page
        bounds: a slot that crosses its page is fatal even in a packet being
        dropped.  ``remaining`` is u16 arithmetic as ``first->size -=`` is.
        The slots are plain (gref, offset, flags, id, size) tuples, the
        fields of ``TxRequest`` in its order: a packet of 64 KiB has 16 of
        them, and a named tuple each cost as much as the checks.
        """
        frags: list[_Slot] = []
        drop: str | None = None
        if not first.flags & NETTXF_more_data:
            return frags, None
        remaining = first.size
        buf, fatal_slots, max_slots = self._buf, self.fatal_slots, self.max_slots
        easy = min(len(buf), self.ring_size)        # slots _slot() would hand over without a word
        unpack = TX_REQUEST.unpack_from
        while True:
            n = len(frags)
            if n >= fatal_slots:
                raise _Fatal(f"malicious frontend using more than {fatal_slots} slots", pos + n)
            if drop is None and n >= max_slots:
                drop = f"too many slots: more than {max_slots} after the first"
            i = pos + n
            txp = unpack(buf[i] if i < easy else self._slot(i, at_req_prod, f"packet needs more than {n} slots"))
            _gref, offset, flags, _id, size = txp
            if drop is None and size > remaining:
                drop = f"slot size {size} > remaining size {remaining}"
            remaining = (remaining - size) & 0xFFFF
            frags.append(txp)
            if offset + size > PAGE_SIZE:
                raise _Fatal(f"slot crosses its page: offset {offset} + size {size}", pos + n + 1)
            if not flags & NETTXF_more_data:
                return frags, drop

    def _gso(self, extra: ExtraInfo, pos: int) -> GsoInfo:
        """``xenvif_set_skb_gso``: a zero segment size or a type other than TCPv4/v6 is fatal."""
        body = extra.body
        if not isinstance(body, GsoInfo):       # cannot happen: parse_extra_info decodes GSO as GsoInfo
            raise _Fatal("undecodable GSO extra", pos)
        if body.size == 0:
            raise _Fatal("GSO size must not be zero", pos)
        if body.type not in (XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6):
            raise _Fatal(f"bad GSO type {body.type}", pos)
        return body

    def _mcast_change(self, add: bool, addr: bytes) -> bool:
        """``xenvif_mcast_add`` / ``xenvif_mcast_del``: add fails when full; del removes one entry."""
        if add:
            if len(self._mcast) >= self.mcast_max:
                return False
            self._mcast.append(addr)
            return True
        if addr in self._mcast:
            self._mcast.remove(addr)
        return True
