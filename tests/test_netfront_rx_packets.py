"""netfront's receive path taken whole packet at a time decides every packet as the slot-by-slot path does.

``QueueRings.reap_rx`` takes a usual packet in one step from the
responses' fields read as columns (``_whole_packet``) and leaves
everything else to the general path, slot by slot.  Here random response
streams -- well-formed packets with and without a GSO extra, one slot or
many, pages filled end to end or not, mixed with broken ones (sizes off
the page, negative or zero, chained extras, packets too long, packets
split over passes) -- go to two queues, one with the whole-packet step
and one without, with the same bytes in the same pages: the frames
delivered, the counters, the buffers posted again and what is held of a
packet still arriving must be the same after every pass.
"""

from __future__ import annotations

import gc
import random
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdom.domains.abi.netif import (
    EXTRA_UNION_OFFSET,
    RX_RESPONSE,
    RX_SLOT_SIZE,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
    XEN_NETIF_GSO_TYPE_TCPV4,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_extra_info,
    NETRXF_more_data,
    parse_rx_request,
    rx_shared_ring,
)
from xdom.domains.abi.ring import PAGE_SIZE, BackRing
from xdom.domains.frame_pool import FramePool
from xdom.domains.netfront.rings import QueueRings
from xdom.domains.xenhost import LocalHypervisor, LocalXenHost

# A slot to answer: ("data", offset, flags, status) or ("extra", type, more, gso_size)
Slot = tuple


@st.composite
def packets(draw: st.DrawFn) -> list[Slot]:
    """One packet's response slots: usually well formed, sometimes broken the ways a backend can."""
    ndata = draw(st.sampled_from([1, 1, 2, 3, 17, 18, 19, 20]) | st.integers(1, 24))
    csum = draw(st.sampled_from([0, 0, NETRXF_data_validated, NETRXF_csum_blank]))
    extras = draw(st.sampled_from(["none", "none", "gso", "mcast", "chained"]))
    tail = draw(st.integers(1, PAGE_SIZE))
    offset0 = draw(st.sampled_from([0, 0, 0, 42]))
    slots: list[Slot] = []
    for k in range(ndata):
        last = k == ndata - 1
        offset = offset0 if k == 0 else draw(st.sampled_from([0, 0, 0, 0, 8]))
        status = tail if last else PAGE_SIZE - offset
        status = draw(st.sampled_from([status] * 12 + [0, -1, -32768, PAGE_SIZE - offset + 1, 32767]))
        flags = (0 if last else NETRXF_more_data) | (csum if k == 0 else 0)
        if k == 0 and extras != "none":
            flags |= NETRXF_extra_info
        slots.append(("data", offset, flags, status))
        if k == 0 and extras == "gso":
            slots.append(("extra", XEN_NETIF_EXTRA_TYPE_GSO, False, draw(st.sampled_from([1448, 0]))))
        elif k == 0 and extras == "mcast":
            slots.append(("extra", XEN_NETIF_EXTRA_TYPE_MCAST_ADD, False, 0))
        elif k == 0 and extras == "chained":
            slots.append(("extra", XEN_NETIF_EXTRA_TYPE_GSO, True, 1448))
            slots.append(("extra", XEN_NETIF_EXTRA_TYPE_GSO, False, 1448))
    return slots


def encode(slot: Slot, rid: int) -> bytes:
    if slot[0] == "data":
        _, offset, flags, status = slot
        return RX_RESPONSE.pack(rid, offset, flags, status)
    _, etype, more, gso_size = slot
    raw = bytearray(RX_SLOT_SIZE)
    raw[0], raw[1] = etype, XEN_NETIF_EXTRA_FLAG_MORE if more else 0
    raw[EXTRA_UNION_OFFSET:EXTRA_UNION_OFFSET + 2] = gso_size.to_bytes(2, "little")
    raw[EXTRA_UNION_OFFSET + 2] = XEN_NETIF_GSO_TYPE_TCPV4
    return bytes(raw)


class Backend:
    """One queue in its own in-process hypervisor, answered by hand."""

    def __init__(self, stack: ExitStack, whole_packets_first: bool) -> None:
        hv = LocalHypervisor()
        stack.callback(hv.close)
        self.guest: LocalXenHost = hv.create_domain("g", "3M")
        # Last, the guest's memory (an in-process domain's stays mapped when it dies, for the others'
        # views: a run of examples would use up the process's mappings), once no view holds it.
        stack.callback(self.guest.memory.close)
        stack.callback(gc.collect)
        stack.callback(self.guest.close)
        backend = hv.create_domain("b", "1M")
        stack.callback(backend.memory.close)
        stack.callback(backend.close)
        deferred: list[tuple[int, int]] = []
        self.q = QueueRings(self.guest, FramePool.of(self.guest), backend.domid, 0, split=False, deferred=deferred)
        stack.callback(self.q.release, deferred)
        self.q.whole_packets_first = whole_packets_first
        self.q.post_rx()
        self.ring = BackRing(rx_shared_ring([self.guest.memory.frame(self.q.gfns[1])]))
        # The rings' views go before the memory closes (a view still held keeps every frame mapped,
        # and a run of examples would use up the process's mappings).
        stack.callback(lambda: [view.release() for ring in (self.q.tx, self.q.rx, self.ring)
                                for view in ring.shared.pages])
        self.posted: list[int] = []
        self.stats = {"rx_packets": 0, "rx_errors": 0, "rx_gso": 0}

    def answer(self, slots: list[Slot], fill: random.Random) -> list[tuple[bytes, bytes]]:
        """Write each data slot's page and the responses; netfront's frames for them."""
        self.posted += [parse_rx_request(r).id for r in self.ring.take_requests()]
        raws = []
        for slot in slots:
            rid = self.posted.pop(0)
            if slot[0] == "data":
                page = self.guest.memory.frame(self.q.rx_gfns[rid])
                page[:] = fill.randbytes(PAGE_SIZE)
                page.release()
            raws.append(encode(slot, rid))
        self.ring.put_responses(raws)
        self.ring.push_responses()
        return self.q.reap_rx(self.stats)

    def state(self) -> tuple:
        q = self.q
        return (dict(self.stats), list(q.rx_posted), [bytes(p) for p in q.rx_partial], q.rx_in_extras,
                q.rx_data_done, q.rx_overlong)


@contextmanager
def two_queues() -> Iterator[tuple[Backend, Backend]]:
    with ExitStack() as stack:
        yield Backend(stack, True), Backend(stack, False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(packets(), min_size=1, max_size=12), st.lists(st.integers(1, 80), min_size=1, max_size=6),
       st.integers(0, 2**32))
def test_whole_packets_are_decided_as_slot_by_slot(stream: list[list[Slot]], cuts: list[int], seed: int) -> None:
    slots = [slot for packet in stream for slot in packet]
    with two_queues() as (whole, general):
        assert whole.q.rx_gfns == general.q.rx_gfns
        at, passes = 0, 0
        while at < len(slots):
            size = cuts[passes % len(cuts)]
            chunk = slots[at:at + size]
            at += size
            passes += 1
            got = whole.answer(chunk, random.Random(seed + passes))
            want = general.answer(chunk, random.Random(seed + passes))
            assert got == want
            assert whole.state() == general.state()


def test_a_usual_stream_is_taken_whole() -> None:
    """The step is taken: 64 KiB packets with an extra slot, in pages filled end to end, come out as the
    bytes written, and the general path sees none of their slots.  (The extra is not a GSO one: a GSO
    packet's headers are parsed, and random bytes are not a TCP segment.)"""
    with two_queues() as (whole, _general):
        q = whole.q
        seen: list[bytes] = []
        q._rx_slot = lambda raw, *rest: seen.append(raw)     # type: ignore[method-assign]
        rng = random.Random(1)
        packet: list[Slot] = [("data", 0, NETRXF_more_data | NETRXF_extra_info | NETRXF_data_validated, PAGE_SIZE),
                              ("extra", XEN_NETIF_EXTRA_TYPE_MCAST_ADD, False, 0)]
        packet += [("data", 0, NETRXF_more_data, PAGE_SIZE)] * 15 + [("data", 0, 0, 14)]
        for _ in range(3):
            expect_pages = []
            state = rng.getstate()
            for slot in packet:             # what answer() will write into each data slot's page
                if slot[0] == "data":
                    expect_pages.append(rng.randbytes(PAGE_SIZE)[:slot[3]])
            rng.setstate(state)
            frames = whole.answer(packet, rng)
            assert len(frames) == 1 and frames[0][1] == b"".join(expect_pages)
        assert seen == [] and whole.stats["rx_packets"] == 3 and whole.stats["rx_gso"] == 0


_FULL = ("data", 0, NETRXF_more_data, PAGE_SIZE)
EDGES = {
    "18 data slots, the most a packet takes": [_FULL] * 17 + [("data", 0, 0, 10)],
    "19 data slots, one too many": [_FULL] * 18 + [("data", 0, 0, 10)],
    "a slot of no bytes": [_FULL, ("data", 0, 0, 0)],
    "a slot past its page": [("data", 8, NETRXF_more_data, PAGE_SIZE), ("data", 0, 0, 10)],
    "a negative status": [_FULL, ("data", 0, 0, -1)],
    "chained extras": [("data", 0, NETRXF_extra_info, 60), ("extra", XEN_NETIF_EXTRA_TYPE_GSO, True, 1448),
                       ("extra", XEN_NETIF_EXTRA_TYPE_MCAST_ADD, False, 0)],
    "an extra after a one-slot packet": [("data", 0, NETRXF_extra_info, 60),
                                         ("extra", XEN_NETIF_EXTRA_TYPE_MCAST_ADD, False, 0)],
}


@pytest.mark.parametrize("cut", [1, 3, 100])
@pytest.mark.parametrize("edge", list(EDGES))
def test_edges_are_decided_as_slot_by_slot(edge: str, cut: int) -> None:
    """Each edge between a packet the step takes and one it leaves, then a plain packet, in passes of
    ``cut`` slots: the same frames, counters and state either way."""
    slots = EDGES[edge] + [("data", 0, 0, 100)]
    with two_queues() as (whole, general):
        for at in range(0, len(slots), cut):
            chunk = slots[at:at + cut]
            assert whole.answer(chunk, random.Random(at)) == general.answer(chunk, random.Random(at))
            assert whole.state() == general.state()
        assert whole.stats["rx_packets"] >= 1
