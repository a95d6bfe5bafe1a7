"""netfront's queues: set-up when the grant table runs out part-way (nothing leaks, nothing is freed while
granted), and which frames a backend that died left unanswered (they go on the next rings)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from xdom.domains.abi.netif import (
    RX_RING_SIZE,
    NETRXF_more_data,
    NETTXF_more_data,
    RxResponse,
    TxResponse,
    pack_rx_response,
    pack_tx_response,
    parse_rx_request,
    parse_tx_request,
    rx_shared_ring,
    tx_shared_ring,
)
from xdom.domains.abi.ring import PAGE_SIZE, BackRing
from xdom.domains.frame_pool import FramePool
from xdom.domains.grant_table import GrantTableFull
from xdom.domains.netfront.rings import QueueRings
from xdom.domains.vnet import TxFrame
from xdom.domains.xenhost import LocalHypervisor, LocalXenHost


@contextmanager
def one_queue() -> Iterator[tuple[LocalXenHost, QueueRings, list[tuple[int, int]]]]:
    """A guest with one unsplit netfront queue granted to a backend domain; released and closed after."""
    hv = LocalHypervisor()
    guest = hv.create_domain("g", "8M")
    backend = hv.create_domain("b", "1M")
    try:
        deferred: list[tuple[int, int]] = []
        q = QueueRings(guest, FramePool.of(guest), backend.domid, 0, split=False, deferred=deferred)
        yield guest, q, deferred
        q.release(deferred)
    finally:
        guest.close()
        backend.close()
        hv.close()


def test_a_queue_that_cannot_grant_all_its_pages_gives_back_what_it_took() -> None:
    hv = LocalHypervisor()
    guest = hv.create_domain("g", "8M", grant_frames=1)        # 512 entries: fewer than a queue's 514 pages
    backend = hv.create_domain("b", "1M")
    try:
        pool = FramePool.of(guest)
        free_before = pool.available()
        deferred: list[tuple[int, int]] = []
        with pytest.raises(GrantTableFull):
            QueueRings(guest, pool, backend.domid, 0, split=True, deferred=deferred)
        granted = len(deferred)
        assert 0 < granted < 514
        # what was granted waits in deferred (to be ended), the rest is back in the pool, nothing twice
        assert pool.available() == free_before - granted
        gfns = [g for _, g in deferred]
        assert len(set(gfns)) == granted and not set(gfns) & set(pool._free)
        for ref, _ in deferred:                     # the backend never mapped them: they end at once
            assert guest.gnttab.try_end_access(ref)
    finally:
        guest.close()
        backend.close()
        hv.close()


def test_frames_a_dead_backend_left_unanswered_are_the_ones_sent_again_in_order() -> None:
    """A netback that dies answers some frames and not others; a new ring gets exactly those others."""
    with one_queue() as (guest, q, deferred):
        frames = [TxFrame(bytes([i]) * size) for i, size in enumerate((60, 5000, 1514, 9000, 64))]
        stats = {"tx_packets": 0, "tx_gso": 0}
        for f in frames:
            assert q.room(f)
            q.put(f, stats)
        q.push_tx()
        # The backend's side of the same page: it takes every request and answers the first two frames only
        # (1 + 2 slots), then dies.
        back = BackRing(tx_shared_ring([guest.memory.frame(q.gfns[0])]))
        requests = [parse_tx_request(r) for r in back.take_requests()]
        assert len(requests) == 1 + 2 + 1 + 3 + 1
        back.put_responses([pack_tx_response(TxResponse(r.id, 0)) for r in requests[:3]])
        back.push_responses()
        q.reap_tx()
        assert q.unanswered() == frames[2:]
        # The third frame answered, and one slot of the three-slot fourth: that one is not answered yet.
        back.put_responses([pack_tx_response(TxResponse(requests[3].id, 0)), pack_tx_response(
            TxResponse(requests[4].id, 0))])
        back.push_responses()
        q.reap_tx()
        assert q.unanswered() == frames[3:]
        assert len(q.tx_sent) == 2                  # the answered ones are no longer kept


def test_transmit_answers_notify_only_while_frames_wait_for_room() -> None:
    """netfront reaps transmit answers on each pass; the backend's push asks for an event only once
    netfront has said it waits for them (a full ring), so a busy sender is not woken per answer."""
    with one_queue() as (guest, q, deferred):
        back = BackRing(tx_shared_ring([guest.memory.frame(q.gfns[0])]))
        stats = {"tx_packets": 0, "tx_gso": 0}

        def answer() -> bool:
            back.put_responses([pack_tx_response(TxResponse(parse_tx_request(r).id, 0))
                                for r in back.take_requests()])
            return back.push_responses()

        q.put(TxFrame(b"\1" * 60), stats)
        q.push_tx()
        assert answer()                             # a fresh ring asks for the first answer
        q.reap_tx(want_event=False)                 # a pass with nothing waiting
        for i in range(3):
            q.put(TxFrame(bytes([i]) * 1514), stats)
            q.push_tx()
            assert not answer()                     # answered with no event...
            q.reap_tx(want_event=False)             # ...and reaped by the next pass all the same
        assert q.tx_slots_free() == 256 and q.unanswered() == []
        big = TxFrame(b"\2" * 4000)
        while q.room(big):
            q.put(big, stats)
        q.push_tx()
        assert not q.want_tx_event()                # frames wait: ask for the next answer
        assert answer()                             # it comes with an event
        assert q.want_tx_event()                    # and a pass that asks again finds it waiting
        q.reap_tx(want_event=False)
        assert q.tx_slots_free() == 256


def test_a_packet_split_over_two_passes_keeps_its_first_pages_once_they_are_posted_again() -> None:
    """netfront reads received slots as views and copies a packet once, when it is complete; a packet
    still incomplete when its pages go back to the backend is copied first, so what the backend writes
    into a page it got again never ends up in the packet."""
    with one_queue() as (guest, q, deferred):
        q.post_rx()
        back = BackRing(rx_shared_ring([guest.memory.frame(q.gfns[1])]))
        stats = {"rx_packets": 0, "rx_errors": 0, "rx_gso": 0}
        posted = [parse_rx_request(r) for r in back.take_requests()]
        assert len(posted) == RX_RING_SIZE

        def fill(req_id: int, data: bytes) -> None:
            page = guest.memory.frame(q.rx_gfns[req_id])
            page[:len(data)] = data
            page.release()

        first, second = bytes(range(256)) * 16, b"tail of the frame" * 10
        fill(posted[0].id, first)
        back.put_responses([pack_rx_response(RxResponse(posted[0].id, 0, NETRXF_more_data, len(first)))])
        back.push_responses()
        assert q.reap_rx(stats) == []                       # not complete: nothing yet
        again = [parse_rx_request(r) for r in back.take_requests()]
        assert [r.id for r in again] == [posted[0].id]      # its page is the backend's again...
        fill(posted[0].id, b"\xee" * PAGE_SIZE)             # ...which writes something else there
        fill(posted[1].id, second)
        back.put_responses([pack_rx_response(RxResponse(posted[1].id, 0, 0, len(second)))])
        back.push_responses()
        frames = q.reap_rx(stats)
        assert len(frames) == 1 and frames[0][1] == first + second


def _backend_reads(guest: LocalXenHost, q: QueueRings, back: BackRing) -> list[tuple[list[int], bytes]]:
    """What a backend takes off the transmit ring: per frame, its slots and the bytes of their pages
    (a first request's size is the frame's; each other's, its own slot's)."""
    frames: list[tuple[list[int], bytes]] = []
    more = False
    for raw in back.take_requests():
        r = parse_tx_request(raw)
        size = r.size if more else min(r.size, PAGE_SIZE)
        data = bytes(guest.memory.frame(q.tx_gfns[r.id])[:size])
        if more:
            frames[-1] = (frames[-1][0] + [r.id], frames[-1][1] + data)
        else:
            frames.append(([r.id], data))
        more = bool(r.flags & NETTXF_more_data)
    return frames


@pytest.mark.parametrize("contiguous", [True, False], ids=["one-copy", "page-by-page"])
def test_a_frame_takes_a_run_of_slots_and_any_free_ones_when_none_is_left(contiguous: bool) -> None:
    """Frames go into runs of consecutive slots (one copy into consecutive pages); a backend that answers
    out of order leaves no run, and a frame then takes free slots wherever they are, as before.
    (Transmit pages that are not consecutive frames are filled a page at a time.)"""
    with one_queue() as (guest, q, deferred):
        assert q.tx_contiguous
        q.tx_contiguous = contiguous
        back = BackRing(tx_shared_ring([guest.memory.frame(q.gfns[0])]))
        stats = {"tx_packets": 0, "tx_gso": 0}
        frames = [bytes([i]) * (1000 + 3000 * i) for i in range(1, 8)]
        for data in frames:
            q.put(TxFrame(data), stats)
        q.push_tx()
        seen = _backend_reads(guest, q, back)
        assert [data for _, data in seen] == frames
        assert all(ids == list(range(ids[0], ids[0] + len(ids))) for ids, _ in seen)
        # Answer every other slot of the ring's worth of one-slot frames: 128 free, no two in a row.
        back.put_responses([pack_tx_response(TxResponse(i, 0)) for ids, _ in seen for i in ids])
        back.push_responses()
        q.reap_tx()
        small = [TxFrame(i.to_bytes(2, "little") * 50) for i in range(256)]
        for f in small:
            assert q.room(f)
            q.put(f, stats)
        q.push_tx()
        assert not q.room(small[0]) and q.tx_slots_free() == 0
        taken = _backend_reads(guest, q, back)
        back.put_responses([pack_tx_response(TxResponse(ids[0], 0)) for ids, _ in taken[::2]])
        back.push_responses()
        q.reap_tx()
        assert q.tx_slots_free() == 128
        big = TxFrame(b"\x55" * 3 * PAGE_SIZE)
        assert q.room(big)
        q.put(big, stats)
        q.push_tx()
        ((ids, data),) = _backend_reads(guest, q, back)
        assert data == big.data and len(ids) == 3 and ids != list(range(ids[0], ids[0] + 3))
        # Frames answered behind unanswered ones are not taken for unanswered when a later frame (big) has
        # one of their slots: a backend that dies now gets each unanswered frame again, and only those.
        assert q.unanswered() == small[1::2] + [big]
