"""A frontend's side of netif rings, without a hypervisor: granted pages as a dict, the slots it pushes.

Tests of netback's sans-IO core (test_netback_tx.py, test_netback_rx.py)
build packets the way netfront lays them out, with netif.py's ``pack_*``
helpers, over fake granted pages (gref -> page), carry out the backend's
plans on those pages and read back what netfront would.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from xdom.backends.netback import RxPlan, TxDrop, TxMulticast, TxPacket
from xdom.backends.netback.tx import TxAction
from xdom.domains.abi import netif as n

PAGE = 4096


# --------------------------------------------------------------------------
# A frontend's side: granted pages and the slots it puts on the TX ring
# --------------------------------------------------------------------------

class Grants:
    """The frontend's granted pages: gref -> 4 KiB page."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}
        self.next_ref = 8

    def grant(self, data: bytes = b"", offset: int = 0) -> int:
        ref = self.next_ref
        self.next_ref += 1
        page = bytearray(os.urandom(PAGE))       # garbage around the data, as in a real page
        page[offset:offset + len(data)] = data
        self.pages[ref] = page
        return ref

    def read(self, gref: int, offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= PAGE
        return bytes(self.pages[gref][offset:offset + length])


def chain_extras(extras: Sequence[n.ExtraInfo]) -> list[n.ExtraInfo]:
    """FLAG_MORE on every extra but the last."""
    return [n.ExtraInfo(e.type, n.XEN_NETIF_EXTRA_FLAG_MORE if i < len(extras) - 1 else 0, e.body)
            for i, e in enumerate(extras)]


def tx_slots(grants: Grants, data: bytes, chunks: Sequence[int] | None = None, *, first_id: int = 0,
             offset: int = 0, flags: int = 0, extras: Sequence[n.ExtraInfo] = (),
             size: int | None = None) -> list[bytes]:
    """The slots netfront would push for ``data``: first request (size = whole packet), extras, fragments.

    ``chunks`` are the bytes per data slot (default: the first slot up to its
    page end, then whole pages).  ``size`` overrides the first request's
    size field (to lie).
    """
    if chunks is None:
        chunks = [min(len(data), PAGE - offset)]
        rest = len(data) - chunks[0]
        while rest > 0:
            chunks.append(min(rest, PAGE))
            rest -= chunks[-1]
    assert sum(chunks) == len(data)
    pieces, pos = [], 0
    for c in chunks:
        pieces.append(data[pos:pos + c])
        pos += c
    more = n.NETTXF_more_data if len(pieces) > 1 else 0
    first = n.TxRequest(grants.grant(pieces[0], offset), offset,
                        flags | more | (n.NETTXF_extra_info if extras else 0), first_id,
                        len(data) if size is None else size)
    slots = [n.pack_tx_request(first)]
    slots += [n.pack_extra_info(e, n.TX_SLOT_SIZE) for e in chain_extras(extras)]
    for i, piece in enumerate(pieces[1:], 1):
        last = i == len(pieces) - 1
        slots.append(n.pack_tx_request(n.TxRequest(grants.grant(piece), 0, 0 if last else n.NETTXF_more_data,
                                                   first_id + i, len(piece))))
    return slots


def req(gref: int, offset: int, flags: int, rid: int, size: int) -> bytes:
    return n.pack_tx_request(n.TxRequest(gref, offset, flags, rid, size))


def extra_slot(info: n.ExtraInfo) -> bytes:
    return n.pack_extra_info(info, n.TX_SLOT_SIZE)


def one(actions: list[TxAction]) -> TxAction:
    assert len(actions) == 1, actions
    return actions[0]


def statuses(action: TxPacket | TxDrop | TxMulticast) -> list[tuple[int, int]]:
    return [(r.id, r.status) for r in action.responses]


OK, ERR, NULL = n.NETIF_RSP_OKAY, n.NETIF_RSP_ERROR, n.NETIF_RSP_NULL


# --------------------------------------------------------------------------
# ... and on the RX ring: buffers posted, responses read back by position
# --------------------------------------------------------------------------

def rx_requests(count: int, first_id: int = 0, first_gref: int = 500) -> list[n.RxRequest]:
    return [n.RxRequest((first_id + i) & 0xFFFF, first_gref + i) for i in range(count)]


def deliver(plan: RxPlan, data: bytes, failed: Iterable[int] = ()) -> tuple[dict[int, bytearray], list[bytes]]:
    """Carry out the plan's copies into fresh pages; return the pages and the packed responses."""
    pages: dict[int, bytearray] = {}
    for c in plan.copies:
        assert c.offset >= 0 and c.offset + c.length <= PAGE and c.length > 0
        page = pages.setdefault(c.gref, bytearray(PAGE))
        page[c.offset:c.offset + c.length] = data[c.src_offset:c.src_offset + c.length]
    return pages, plan.packed_responses(set(failed))


def netfront_receive(raw: list[bytes], reqs: Sequence[n.RxRequest], pages: dict[int, bytearray]
                     ) -> tuple[n.RxPacket, bytes]:
    """What netfront does with the responses: pair each slot with its request by position, reassemble."""
    pkt = n.walk_rx_packet(raw)
    assert pkt is not None and pkt.slots == len(raw)
    # data responses sit in the slots that are not extras: slot 0, then after the extras
    data_slots = [0] + list(range(1 + len(pkt.extras), pkt.slots))
    body = b""
    for slot, rsp in zip(data_slots, pkt.responses):
        assert rsp.id == reqs[slot].id
        body += bytes(pages[reqs[slot].gref][rsp.offset:rsp.offset + rsp.status])
    return pkt, body
