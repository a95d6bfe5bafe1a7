"""Guest receive (RX ring, backend -> frontend), sans-IO: one packet -> the slots it takes.

The frontend keeps its RX ring stocked with empty granted pages
(``netif_rx_request``: id, gref).  To hand it a packet the backend consumes
some of those requests, copies the packet into their pages (grant copy:
only feature-rx-copy is supported; page flipping is long gone from Linux,
which refuses a frontend without request-rx-copy) and answers each
consumed request with a response in the *same* ring slot.
:class:`RxPlanner` decides all of that for one packet, mirroring Linux
``drivers/net/xen-netback/rx.c`` (``xenvif_rx_skb`` and helpers):

* the slots needed: one per page of data, plus one per extra-info slot (a
  GSO extra when the packet is GSO and the frontend negotiated that GSO
  type, a hash extra when the caller supplies a hash)
  (``xenvif_update_needed_slots``).  With fewer requests posted nothing is
  consumed (``xenvif_rx_ring_slots_available``): :class:`RxShortage`.
* data slots are filled from offset 0 to a full page (no XDP headroom is
  offered), the last with what is left (``xenvif_rx_data_slot``); each
  response carries the request's id, offset 0, the byte count as status,
  ``NETRXF_more_data`` while data remains; the first also the checksum
  flags and ``NETRXF_extra_info``.
* extra-info slots come right after the first data slot
  (``xenvif_rx_skb``: "Extras must go after the first data slot"), GSO
  before hash, chained by ``XEN_NETIF_EXTRA_FLAG_MORE``; they overlay the
  response and carry no id (``xenvif_rx_extra_slot``).

Nothing here trusts the frontend's requests beyond using their id and
gref: a bad gref makes that slot's grant copy fail, and the caller then
writes ``NETIF_RSP_ERROR`` as that slot's status
(:meth:`RxPlan.packed_responses`), as ``xenvif_rx_copy_flush`` overwrites a
failed copy's status.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple, cast

from xdom.domains.abi.netif import (
    NETIF_RSP_ERROR,
    RX_REQUEST,
    RX_RESPONSE,
    RX_SLOT_SIZE,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_HASH,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    XEN_NETIF_NR_SLOTS_MIN,
    ExtraInfo,
    GsoInfo,
    HashInfo,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_extra_info,
    NETRXF_more_data,
    RxRequest,
    RxResponse,
    pack_extra_info,
    packed_gso_extra,
)

from .tx import PAGE_SIZE, Checksum

_new = tuple.__new__      # a named tuple from a ready tuple, in C (its own constructor is a Python function)


@dataclass(frozen=True)
class OutgoingPacket:
    """What the planner needs to know of a packet for the guest (its bytes stay with the caller).

    ``gso`` is the segmentation the packet still needs (``size`` = MSS,
    ``type`` = ``XEN_NETIF_GSO_TYPE_TCPV4``/``TCPV6``), None for a plain
    frame.  ``checksum`` is the packet's ``ip_summed`` state; ``hash`` a
    flow hash to pass on (only when the frontend configured hashing through
    the control ring, as Linux clears the hash otherwise).
    """
    length: int
    gso: GsoInfo | None = None
    checksum: Checksum = Checksum.NONE
    hash: HashInfo | None = None


class RxCopy(NamedTuple):
    """Copy ``length`` bytes from ``src_offset`` in the packet to ``offset`` in granted page ``gref``.

    ``slot`` is the index (among the requests the plan consumes) whose
    response reports this copy: if the copy fails, that slot's status
    becomes ``NETIF_RSP_ERROR``.
    """
    slot: int
    gref: int
    offset: int
    length: int
    src_offset: int


RxSlotAnswer = RxResponse | ExtraInfo


@dataclass(frozen=True)
class RxPlan:
    """Consume the first ``consumed`` requests, do ``copies``, then write ``responses`` (one per request).

    ``copies`` are in the packet's order, each from offset 0 of its page and
    a whole page but the last: copies to neighbouring references are one
    run of the packet into one run of pages (netback copies it at once).
    """
    consumed: int
    copies: tuple[RxCopy, ...]
    responses: tuple[RxSlotAnswer, ...]

    def packed_responses(self, failed: Collection[int] = ()) -> list[bytes]:
        """The responses as ring slots (``RX_SLOT_SIZE`` bytes each), in order.

        ``failed`` are the slot indices whose copy failed: their status is
        written as ``NETIF_RSP_ERROR`` (netfront then drops the packet).
        """
        pack = RX_RESPONSE.pack
        out = [pack(*r) if type(r) is RxResponse else pack_extra_info(cast(ExtraInfo, r), RX_SLOT_SIZE)
               for r in self.responses]
        for i in failed:
            r = self.responses[i]
            if type(r) is RxResponse:
                out[i] = pack(r.id, r.offset, r.flags, NETIF_RSP_ERROR)
        return out


class RxRun(NamedTuple):
    """An :class:`RxPlan` in the form the data path writes it (:meth:`RxPlanner.plan_run`).

    The packet goes into the pages of ``grefs`` in order, each from offset
    0, whole pages but the last; ``responses`` are the ``consumed`` slots'
    answers, packed and ready for the ring (``RX_SLOT_SIZE`` bytes each).
    The same decisions as :meth:`RxPlanner.plan` makes, without a Python
    object per slot: a 64 KiB packet's 17 copies and 18 responses were a
    good part of netback's receive path.
    """
    consumed: int
    grefs: tuple[int, ...]
    responses: bytes


@dataclass(frozen=True)
class RxShortage:
    """The frontend has posted ``available`` requests, the packet needs ``needed``: nothing consumed.

    The caller waits for more (re-arming ``req_event``), or drops the
    packet after its own timeout (Linux: ``rx_drain_timeout_msecs``).
    """
    needed: int
    available: int


@dataclass(frozen=True)
class RxDrop:
    """A packet this frontend cannot receive; nothing is consumed."""
    reason: str


RxDecision = RxPlan | RxShortage | RxDrop


class RxPlanner:
    """Plans packets into one frontend's RX ring, given what it negotiated.

    ``sg`` is the frontend's ``feature-sg``: without it a packet must fit
    one page (Linux turns NETIF_F_SG off and caps the MTU at 1500), so a
    longer one is dropped.  ``gso_tcpv4``/``gso_tcpv6`` are
    ``feature-gso-tcpv4``/``-tcpv6``: a GSO packet of a type the frontend
    did not ask for is dropped (Linux never sees one: it turns TSO off on
    the vif and the stack segments; a caller without that stack must
    segment before planning).  ``max_data_slots`` is what a frontend must
    accept (``XEN_NETIF_NR_SLOTS_MIN``; netfront refuses longer chains).
    """

    def __init__(self, sg: bool = True, gso_tcpv4: bool = False, gso_tcpv6: bool = False,
                 max_data_slots: int = XEN_NETIF_NR_SLOTS_MIN) -> None:
        self.sg = sg
        self.gso_types = frozenset(t for t, on in ((XEN_NETIF_GSO_TYPE_TCPV4, gso_tcpv4),
                                                   (XEN_NETIF_GSO_TYPE_TCPV6, gso_tcpv6)) if on)
        self.max_data_slots = max_data_slots

    def refusal(self, packet: OutgoingPacket) -> str | None:
        """Why ``packet`` cannot go to this frontend at all, or None."""
        return self._refusal(packet.length, packet.gso)

    def _refusal(self, length: int, gso: GsoInfo | None) -> str | None:
        if length <= 0:
            return "empty packet"
        if not self.sg and length > PAGE_SIZE:
            return f"{length}-byte packet needs feature-sg"
        if -(-length // PAGE_SIZE) > self.max_data_slots:
            return f"{length}-byte packet needs more than {self.max_data_slots} slots"
        if gso is not None:
            if gso.type not in (XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6) or gso.size == 0:
                return f"invalid GSO (type {gso.type}, size {gso.size})"
            if gso.type not in self.gso_types:
                return f"frontend did not negotiate GSO type {gso.type}: segment the packet first"
        return None

    def extras(self, packet: OutgoingPacket) -> tuple[ExtraInfo, ...]:
        """The extra-info slots ``packet`` carries, in Linux's order (by type), FLAG_MORE on all but the last."""
        bodies: list[tuple[int, GsoInfo | HashInfo]] = []
        if packet.gso is not None:
            bodies.append((XEN_NETIF_EXTRA_TYPE_GSO, GsoInfo(packet.gso.size, packet.gso.type, 0, 0)))
        if packet.hash is not None:
            bodies.append((XEN_NETIF_EXTRA_TYPE_HASH, packet.hash))
        return tuple(ExtraInfo(t, XEN_NETIF_EXTRA_FLAG_MORE if i < len(bodies) - 1 else 0, b)
                     for i, (t, b) in enumerate(bodies))

    def slots_needed(self, packet: OutgoingPacket) -> int:
        """Requests ``packet`` consumes: pages of data plus extra-info slots (``xenvif_update_needed_slots``)."""
        return -(-packet.length // PAGE_SIZE) + len(self.extras(packet))

    def plan(self, packet: OutgoingPacket, requests: Sequence[RxRequest | tuple[int, int] | bytes]) -> RxDecision:
        """Plan ``packet`` into the frontend's posted ``requests`` (copies of RX slots, in ring order).

        Only the first :meth:`slots_needed` requests are looked at; the plan
        consumes exactly that many.  Never raises on request contents.
        """
        why = self.refusal(packet)
        if why is not None:
            return RxDrop(why)
        extras = self.extras(packet)
        needed = -(-packet.length // PAGE_SIZE) + len(extras)
        if len(requests) < needed:
            return RxShortage(needed, len(requests))
        # (id, gref) each: an RxRequest, a plain tuple of the two, or a slot copy to parse
        reqs = [r if isinstance(r, tuple) else RX_REQUEST.unpack_from(r) for r in requests[:needed]]

        flags0 = 0
        if packet.checksum == Checksum.PARTIAL:
            flags0 |= NETRXF_csum_blank | NETRXF_data_validated
        elif packet.checksum == Checksum.UNNECESSARY:
            flags0 |= NETRXF_data_validated
        if extras:
            flags0 |= NETRXF_extra_info

        # Data in slot 0 and in the slots after the extras; full pages but the last.  Built whole
        # (a 64 KiB packet is 17 slots, each a copy and a response) rather than slot by slot.
        length = packet.length
        data_slots = [0, *range(1 + len(extras), needed)]
        last = len(data_slots) - 1
        tail = length - last * PAGE_SIZE
        copies = [_new(RxCopy, (slot, reqs[slot][1], 0, PAGE_SIZE, k * PAGE_SIZE))
                  for k, slot in enumerate(data_slots)]
        copies[last] = _new(RxCopy, (data_slots[last], reqs[data_slots[last]][1], 0, tail, last * PAGE_SIZE))
        responses: list[RxSlotAnswer] = [_new(RxResponse, (reqs[slot][0], 0, NETRXF_more_data, PAGE_SIZE))
                                         for slot in data_slots]
        responses[last] = _new(RxResponse, (reqs[data_slots[last]][0], 0, 0, tail))
        responses[0] = _new(RxResponse, (reqs[0][0], 0, flags0 | (NETRXF_more_data if last else 0),
                                         PAGE_SIZE if last else tail))
        responses[1:1] = extras
        return RxPlan(needed, tuple(copies), tuple(responses))

    def plan_run(self, length: int, gso: GsoInfo | None, checksum: Checksum,
                 requests: Sequence[tuple[int, int]]) -> RxRun | RxShortage | RxDrop:
        """:meth:`plan` for a packet without a hash, over ``requests`` as (id, gref) pairs, as an :class:`RxRun`.

        Decides exactly what :meth:`plan` decides for
        ``OutgoingPacket(length, gso, checksum)`` (a test compares the two
        on random packets and requests); what differs is the form.
        """
        why = self._refusal(length, gso)
        if why is not None:
            return RxDrop(why)
        data = -(-length // PAGE_SIZE)
        needed = data + (gso is not None)
        if len(requests) < needed:
            return RxShortage(needed, len(requests))
        ids, grefs = zip(*requests[:needed])
        flags0 = _CSUM_FLAGS[checksum]
        if gso is not None:
            flags0 |= NETRXF_extra_info
            ids = ids[:1] + ids[2:]
            grefs = grefs[:1] + grefs[2:]
        last = data - 1
        tail = length - last * PAGE_SIZE
        # (id, offset 0, more_data, PAGE_SIZE) a slot; a planner allowing more slots than the template has
        # makes its own
        rsp = _RSP_TEMPLATE[:4 * data] if 4 * data <= len(_RSP_TEMPLATE) else _RSP_TEMPLATE[:4] * data
        rsp[0::4] = array("H", ids)
        rsp[4 * last + 2] = 0
        rsp[4 * last + 3] = tail
        rsp[2] = flags0 | (NETRXF_more_data if last else 0)
        if _SWAP:
            rsp.byteswap()
        packed = rsp.tobytes()
        if gso is not None:
            packed = packed[:RX_SLOT_SIZE] + packed_gso_extra(gso.size, gso.type, RX_SLOT_SIZE) + packed[RX_SLOT_SIZE:]
        return RxRun(needed, grefs, packed)


_CSUM_FLAGS = {Checksum.PARTIAL: NETRXF_csum_blank | NETRXF_data_validated,
               Checksum.UNNECESSARY: NETRXF_data_validated, Checksum.NONE: 0}
# The data slots' responses, 16-bit fields in order: id, offset, flags, status (a status fits: at most a page).
_RSP_TEMPLATE = array("H", [0, 0, NETRXF_more_data, PAGE_SIZE] * 64)
_SWAP = sys.byteorder != "little"
