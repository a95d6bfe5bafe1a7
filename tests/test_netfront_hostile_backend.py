"""netfront against a compromised netback: what it holds when the backend writes the shared rings by hand.

The backend writes the response producer index of the rings in the
guest's pages; one that publishes more responses than the guest posted
requests has broken the ring (RING_RESPONSE_PROD_OVERFLOW in Linux).
netfront then does what Linux's does ("disabled for further use"): the
rings go, once, and the vif waits for the backend to come back with new
ones, however many events the backend sends after; the data thread
lives on.

The other tests take the vif's queue off netback's loop (after that the
real netback never touches the rings) and answer by hand, writing
``netif_rx_response``/``netif_tx_response`` slots at ``rsp_prod`` and
publishing it, as a compromised backend can: receive responses whose
offset and status run off the page, are negative or huge, or name a
buffer never posted; transmit responses for ids out of range, twice, or
with ``NETIF_RSP_NULL``; a chain of extra-info slots, or of data slots,
that never ends.  Each must cost the guest nothing but the traffic the
backend spoils: no frame from memory outside the granted page, no
exception, no dead thread, no memory that grows with what the backend
sends; and the vif carries real traffic through the real netback once it
has the ring back.
"""

from __future__ import annotations

import collections
import logging
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import pytest
from helpers import wait_until
from test_net_local import NetRig, in_ns

from xdom.deploy import netns
from xdom.domains.abi.netif import (
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    RX_REQUEST,
    RX_RESPONSE,
    RX_RING_SIZE,
    RX_SLOT_SIZE,
    TX_REQUEST,
    TX_RESPONSE,
    TX_RING_SIZE,
    TX_SLOT_SIZE,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_MAX,
    XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
    XEN_NETIF_EXTRA_TYPE_NONE,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_NR_SLOTS_MIN,
    ExtraInfo,
    GsoInfo,
    McastInfo,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_extra_info,
    NETTXF_more_data,
    pack_extra_info,
)
from xdom.domains.abi.ring import PAGE_SIZE, RING_HEADER_SIZE

pytestmark = pytest.mark.timeout(120)

RSP_PROD = 8          # offset of rsp_prod in a ring's shared header (xen/io/ring.h: req_prod, req_event, rsp_prod)
ETH_P_TEST = 0x88B5   # IEEE 802 local experimental ethertype: the guest's kernel drops such frames unread
G1_MAC, G2_MAC = bytes.fromhex("00163e000001"), bytes.fromhex("00163e000002")     # NetRig's guests 1 and 2


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")   # a dead thread fails it
def test_a_response_index_past_the_ring_takes_the_rings_down_once(run_dir: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    rig = NetRig(run_dir, guests=1)
    try:
        rig.plug(1)
        front = rig.fronts[0]
        assert front.queues == 1
        rx_page = front._queues[0].rx.shared._head                # the ring's first page, in the guest's memory
        with caplog.at_level(logging.ERROR, logger="xdom.netfront"):
            # What a compromised netback writes there: far more responses than receive requests posted.
            (prod,) = struct.unpack_from("<I", rx_page, RSP_PROD)
            struct.pack_into("<I", rx_page, RSP_PROD, (prod + 100_000) & 0xFFFFFFFF)
            for _ in range(50):            # passes of the data thread, as the events a backend sends after cause
                front._kick()
                threading.Event().wait(0.005)
            wait_until(lambda: front.stats["broken_rings"] == 1, what="the broken ring seen")
            threading.Event().wait(0.3)
        broke = [r for r in caplog.records if "broke a ring" in r.getMessage()]
        assert len(broke) == 1 and front.stats["broken_rings"] == 1
        assert front.queues == 0                                   # the rings are gone: nothing reads them
    finally:
        rig.close()


# ---- the test as netback: a vif queue off netback's loop, answered by hand ---------------------------------

class HandBackend:
    """Guest ``index``'s vif queue taken off netback's loop: from here the test is its backend and writes
    the response slots and ``rsp_prod`` in the guest's ring pages itself.  Requests are taken through
    netback's own books (its parsed ``posted`` list and the ring's private indices), kept in step, so
    :meth:`give_back` returns a ring netback can carry on with (what a restarted, honest netback finds)."""

    def __init__(self, rig: NetRig, index: int) -> None:
        self.rig = rig
        self.front = rig.fronts[index - 1]
        (self.conn,) = rig.server.vifs[(rig.guests[index - 1].domid, 0)].queues
        rig.server.loop.remove(self.conn)            # after this the loop never touches the rings again
        assert not rig.server.loop.serves(self.conn)
        (self.q,) = self.front._queues
        self.rx_page = self.q.rx.shared._head        # the rings' first (only) pages, in the guest's memory
        self.tx_page = self.q.tx.shared._head
        # What the real netback published before it let go is the guest's, read by now.
        wait_until(kicked(self.front, lambda: self.q.rx.rsp_cons == self.conn.rx.rsp_prod_pvt
                          and self.q.tx.rsp_cons == self.conn.tx.rsp_prod_pvt), what="netback's last responses taken")

    def give_back(self) -> None:
        self.rig.server.loop.add(self.conn)

    # receive ring
    def rx_buffers(self, n: int | None = None) -> list[tuple[int, int]]:
        """The next ``n`` receive buffers the guest posted (all it has posted: None), (id, gref) in ring order."""
        conn = self.conn
        wait_until(lambda: len(conn.posted) + conn.rx.unconsumed_requests() >= (n or 1), what="buffers posted")
        conn.posted += map(RX_REQUEST.unpack, conn.rx.take_requests())
        got = conn.posted[:n] if n is not None else list(conn.posted)
        del conn.posted[:len(got)]
        return got

    def fill(self, gref: int, offset: int, data: bytes) -> None:
        """``data`` into a receive buffer at ``offset``, through the backend's mapping of its grant."""
        pages = self.conn.rx_pages
        pages.ensure({gref})
        pages.views[gref][offset:offset + len(data)] = data

    def respond_rx(self, responses: list[bytes]) -> None:
        self._respond(self.rx_page, self.conn.rx, RX_SLOT_SIZE, responses, self.conn.rx_port)

    def rx_taken(self) -> bool:
        """Has netfront read every response published and posted the buffers again?"""
        return self.q.rx.rsp_cons == self.conn.rx.rsp_prod_pvt and len(self.q.rx_posted) == RX_RING_SIZE

    # transmit ring
    def tx_requests(self) -> list[tuple[int, int, int, int, int]]:
        """Every request published since the last call: (gref, offset, flags, id, size)."""
        return [TX_REQUEST.unpack(raw) for raw in self.conn.tx.take_requests()]

    def tx_data(self, req: tuple[int, int, int, int, int]) -> bytes:
        """A one-slot transmit request's frame, read through the backend's mapping of its grant."""
        gref, offset, flags, _id, size = req
        assert not flags & (NETTXF_more_data | NETTXF_extra_info), req
        pages = self.conn.tx_pages
        pages.ensure({gref})
        return bytes(pages.views[gref][offset:offset + size])

    def respond_tx(self, answers: list[tuple[int, int]]) -> None:
        self._respond(self.tx_page, self.conn.tx, TX_SLOT_SIZE, [TX_RESPONSE.pack(*a) for a in answers],
                      self.conn.tx_port)

    def _respond(self, page: memoryview, ring: Any, slot: int, responses: list[bytes], port: int) -> None:
        """Response slots written from ``rsp_prod`` on, ``rsp_prod`` published after them, an event sent."""
        idx = ring.rsp_prod_pvt
        for raw in responses:
            at = RING_HEADER_SIZE + (idx % ring.size) * slot
            page[at:at + len(raw)] = raw
            idx = (idx + 1) & 0xFFFFFFFF
        ring.rsp_prod_pvt = idx                          # netback's own count, for when it has the ring back
        page[RSP_PROD:RSP_PROD + 4].cast("I")[0] = idx   # one 4-byte store (x86 keeps stores in order)
        self.conn.host.notify(port)


def kicked(front: Any, predicate: Callable[[], bool]) -> Callable[[], bool]:
    """``predicate``, after a wake-up of the data thread: netfront asks for no event on transmit answers
    (it reaps them on its next pass), so a test waiting for them brings the next pass itself."""
    def check() -> bool:
        front._kick()
        return predicate()
    return check


def eth_frame(dst: bytes, tag: bytes, size: int = 100) -> bytes:
    """An Ethernet frame of the experimental ethertype carrying ``tag``, ``size`` bytes long."""
    head = dst + bytes.fromhex("020000000099") + ETH_P_TEST.to_bytes(2, "big") + tag
    assert len(head) <= size
    return head + bytes(size - len(head))


def send_frames(ns: str, frames: list[bytes]) -> None:
    """Frames sent on eth0 in namespace ``ns``: the guest's kernel hands them to netfront's TAP."""
    with netns.entered(ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    try:
        s.bind(("eth0", 0))
        for f in frames:
            s.send(f)
    finally:
        s.close()


def quiet(ns: str) -> None:
    """No IPv6 in the namespace: its kernel sends nothing on its own (neighbour discovery, MLD)."""
    res = in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.eth0.disable_ipv6=1")
    assert res.returncode == 0, res.stderr


def record_delivered(front: Any, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every frame netfront writes to its port from now on (the TAP gets them too)."""
    delivered: list[bytes] = []
    write = front.port.write_batch

    def recording(frames: list[tuple[bytes, bytes]]) -> None:
        delivered.extend(bytes(f) for _hdr, f in frames)
        write(frames)
    monkeypatch.setattr(front.port, "write_batch", recording)
    return delivered


def settle() -> None:
    """Time for anything late (a second pass of the data thread, a frame that should not come) to show."""
    threading.Event().wait(0.3)


def assert_unharmed(front: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The data thread alive, no exception caught in it (netfront logs those), the rings not given up."""
    assert front._thread.is_alive()
    errors = [r.getMessage() for r in caplog.records if r.name == "xdom.netfront" and r.levelno >= logging.ERROR]
    assert errors == []
    assert front.stats["broken_rings"] == 0 and front.queues == 1


def carries_real_traffic(hb: Any, ns: str, front: Any, caplog: pytest.LogCaptureFixture) -> None:
    """netback has the ring back: real frames (ARP, ICMP) reach the guest through it and its replies leave."""
    hb.give_back()
    ping(ns, "10.99.0.1")
    assert_unharmed(front, caplog)


def footprint(q: Any) -> dict[str, int]:
    """How much each container a queue holds has in it, but the transmit side's (the guest's own traffic)."""
    return {k: len(v) for k, v in vars(q).items()
            if isinstance(v, list | collections.deque | dict | bytearray) and not k.startswith("tx_")}


def ping(ns: str, peer: str) -> None:
    res = in_ns(ns, "ping", "-c", "2", "-i", "0.2", "-W", "5", peer)
    assert res.returncode == 0, res.stdout + res.stderr


# ---- receive ------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_receive_responses_off_the_page_or_for_buffers_never_posted_deliver_nothing_from_elsewhere(
        run_dir: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A status past the page's end (from the offset, or alone), negative or at its extremes, an offset
    past the page: counted in rx_errors, nothing delivered.  A response's id is not what says whose
    buffer it filled, its slot is (as Linux's netfront, which indexes by the ring position): one with an
    id never posted, or another buffer's, delivers what its own slot's buffer holds."""
    rig = NetRig(run_dir, guests=2)
    try:
        rig.plug(1)
        ns2 = rig.plug(2)
        front = rig.fronts[0]
        caplog.set_level(logging.ERROR, logger="xdom.netfront")
        hb = HandBackend(rig, 1)
        settle()                           # a frame netfront read just before is in the TAP by now
        delivered = record_delivered(front, monkeypatch)
        errors = front.stats["rx_errors"]
        bufs = hb.rx_buffers(8)
        ids = [rid for rid, _gref in bufs]
        assert 0xFFFF not in ids
        own = [eth_frame(G1_MAC, b"in the buffer of slot %d" % i) for i in range(8)]
        for i, (_rid, gref) in enumerate(bufs):
            hb.fill(gref, 0, own[i])       # what netfront would deliver if it honoured a slot it must not
        hb.fill(bufs[6][1], 100, own[6])
        decoy = eth_frame(G1_MAC, b"the page of the buffer a response's id names, not of its slot")
        hb.fill(bufs[0][1], 100, decoy)
        tail = eth_frame(G1_MAC, b"a frame running off the page", size=96)
        hb.fill(bufs[0][1], PAGE_SIZE - len(tail), tail)
        rsp = RX_RESPONSE.pack             # id, offset, flags, status
        hb.respond_rx([
            rsp(ids[0], PAGE_SIZE - len(tail), 0, len(tail) + 104),   # 104 bytes past the page's end
            rsp(ids[1], 0, 0, NETIF_RSP_ERROR),
            rsp(ids[2], 0, 0, -0x8000),                               # the most negative status
            rsp(ids[3], 0, 0, 0x7FFF),                                # the largest: eight pages' worth
            rsp(ids[4], 0xFFFF, 0, 1),                                # an offset 15 pages on
            rsp(0xFFFF, 0, 0, len(own[5])),                           # an id never posted
            rsp(ids[0], 100, 0, len(own[6])),                         # another buffer's id
            rsp(ids[7], 0, 0, len(own[7])),
        ])
        wait_until(lambda: hb.q.rx.rsp_cons == hb.conn.rx.rsp_prod_pvt, what="the responses read")
        settle()
        assert_unharmed(front, caplog)
        assert delivered == [own[5], own[6], own[7]]
        assert front.stats["rx_errors"] - errors == 5
        wait_until(hb.rx_taken, 1, what="every buffer posted again")
        carries_real_traffic(hb, ns2, front, caplog)
    finally:
        rig.close()


# ---- transmit -----------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_transmit_responses_out_of_range_repeated_or_null_free_no_other_slot(
        run_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    """Answers for an id past the ring, for 0xFFFF (-1 read as signed), a NETIF_RSP_NULL for a data slot
    and an id answered twice: each ignored or freeing its own slot once, no other; the slots whose answers
    they took stay the backend's; later frames still go out.  (Linux's netfront is stricter: an id out of
    range or not pending disables the vif.)"""
    rig = NetRig(run_dir, guests=2)
    try:
        ns1 = rig.plug(1)
        rig.plug(2)
        quiet(ns1)
        front = rig.fronts[0]
        q = front._queues[0]
        caplog.set_level(logging.ERROR, logger="xdom.netfront")
        # The slot cursor brought to the ring's end first, so that the last slot (the one a -1 would free)
        # is among those the backend keeps.
        filler = eth_frame(G2_MAC, b"filler")
        wait_until(kicked(front, lambda: q.tx_slots_free() == TX_RING_SIZE), what="the guest's own frames answered")
        send_frames(ns1, [filler] * (TX_RING_SIZE - 6 - q.tx_next))
        wait_until(kicked(front, lambda: q.tx_next == TX_RING_SIZE - 6 and q.tx_slots_free() == TX_RING_SIZE),
                   what="the fillers sent and answered")
        hb = HandBackend(rig, 1)
        mine = [eth_frame(G2_MAC, b"tx %d" % i) for i in range(8)]
        send_frames(ns1, mine)
        reqs: list[tuple[int, int, int, int, int]] = []

        def all_mine_on_the_ring() -> bool:
            reqs.extend(hb.tx_requests())
            return len(reqs) >= len(mine)
        wait_until(all_mine_on_the_ring, what="the frames on the transmit ring")
        assert [hb.tx_data(r) for r in reqs] == mine
        ids = [r[3] for r in reqs]
        assert ids == [*range(TX_RING_SIZE - 6, TX_RING_SIZE), 0, 1]
        held = [ids[0], ids[5], ids[6], ids[7]]             # no answer of their own: the backend still has them
        assert TX_RING_SIZE - 1 in held
        hb.respond_tx([(TX_RING_SIZE, NETIF_RSP_OKAY),       # past the ring
                       (0xFFFF, NETIF_RSP_OKAY),             # -1 as a signed id
                       (ids[0], NETIF_RSP_NULL),             # "no response": an extra-info slot's answer
                       (ids[1], NETIF_RSP_OKAY), (ids[1], NETIF_RSP_OKAY),   # the same id twice
                       (ids[2], NETIF_RSP_OKAY), (ids[3], NETIF_RSP_ERROR), (ids[4], NETIF_RSP_OKAY)])
        wait_until(lambda: q.tx.rsp_cons == hb.conn.tx.rsp_prod_pvt, what="the answers taken")
        settle()
        assert_unharmed(front, caplog)
        assert [q.tx_in_flight[i] for i in ids] == [1, 0, 0, 0, 0, 1, 1, 1]
        assert q.tx_slots_free() == TX_RING_SIZE - 4
        # netback has the ring back (it answers only what it takes from now on): frames still go out.
        sent = front.stats["tx_packets"]
        hb.give_back()
        ping(ns1, "10.99.0.2")
        assert front.stats["tx_packets"] > sent
        wait_until(kicked(front, lambda: q.tx_slots_free() == TX_RING_SIZE - 4), what="the new frames answered")
        assert [q.tx_in_flight[i] for i in held] == [1, 1, 1, 1]
        assert_unharmed(front, caplog)
    finally:
        rig.close()


# ---- chains that never end ----------------------------------------------------------------------------------

ROUNDS = 40           # rings' worth of a chain: some 10,000 slots


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_extra_info_chain_that_never_ends_costs_no_memory_as_it_goes(
        run_dir: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A packet's first slot says extra-info follows, and every response after it, ring after ring, is an
    extra-info slot with XEN_NETIF_EXTRA_FLAG_MORE (GSO, multicast, the invalid type NONE and a type past
    those defined): netfront posts each buffer again at once and holds the packet's one data slot, no
    more; when the chain ends, the next packet arrives."""
    rig = NetRig(run_dir, guests=2)
    try:
        rig.plug(1)
        ns2 = rig.plug(2)
        front = rig.fronts[0]
        caplog.set_level(logging.ERROR, logger="xdom.netfront")
        hb = HandBackend(rig, 1)
        q = hb.q
        settle()
        delivered = record_delivered(front, monkeypatch)
        first = eth_frame(G1_MAC, b"a packet whose extra-info slots never end")
        more = XEN_NETIF_EXTRA_FLAG_MORE
        chain = [pack_extra_info(e, RX_SLOT_SIZE) for e in (
            ExtraInfo(XEN_NETIF_EXTRA_TYPE_GSO, more, GsoInfo(1448, XEN_NETIF_GSO_TYPE_TCPV4)),
            ExtraInfo(XEN_NETIF_EXTRA_TYPE_MCAST_ADD, more, McastInfo(bytes.fromhex("01005e000001"))),
            ExtraInfo(XEN_NETIF_EXTRA_TYPE_NONE, more, bytes(6)),
            ExtraInfo(XEN_NETIF_EXTRA_TYPE_MAX, more, bytes(6)))]
        bufs = hb.rx_buffers()
        hb.fill(bufs[0][1], 0, first)
        responses = [RX_RESPONSE.pack(bufs[0][0], 0, NETRXF_extra_info, len(first))]
        for n in range(ROUNDS):
            if n:
                bufs, responses = hb.rx_buffers(), []
            responses += [chain[i % len(chain)] for i in range(len(bufs) - len(responses))]
            hb.respond_rx(responses)
            wait_until(hb.rx_taken, what=f"round {n} of the chain taken and its buffers posted again")
            assert q.rx_in_extras and len(q.rx_partial) == 1, (n, len(q.rx_partial))
            if n == 0:
                steady = footprint(q)
            assert footprint(q) == steady, n          # nothing grows with the chain
        # The chain ends; the next packet is one slot.
        bufs = hb.rx_buffers(2)
        then = eth_frame(G1_MAC, b"the packet after the chain")
        hb.fill(bufs[1][1], 0, then)
        hb.respond_rx([pack_extra_info(ExtraInfo(XEN_NETIF_EXTRA_TYPE_MCAST_ADD, 0, McastInfo(bytes(6))),
                                       RX_SLOT_SIZE),
                       RX_RESPONSE.pack(bufs[1][0], 0, 0, len(then))])
        wait_until(lambda: then in delivered, what="the packet after the chain")
        wait_until(hb.rx_taken, what="the buffers posted again")
        settle()
        assert delivered[-1] == then and set(delivered) <= {first, then}
        assert not q.rx_in_extras and q.rx_partial == []
        assert_unharmed(front, caplog)
        carries_real_traffic(hb, ns2, front, caplog)
    finally:
        rig.close()


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_data_chain_that_never_ends_is_cut_off_at_the_slots_a_packet_may_take(
        run_dir: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every response a full page with NETRXF_more_data, ring after ring: the packet can never be longer
    than XEN_NETIF_NR_SLOTS_MIN slots (a 64 KiB GSO frame is 17 pages), so netfront must not hold more of
    it than that; when the chain ends, the next packet arrives."""
    rig = NetRig(run_dir, guests=2)
    try:
        rig.plug(1)
        ns2 = rig.plug(2)
        front = rig.fronts[0]
        caplog.set_level(logging.ERROR, logger="xdom.netfront")
        hb = HandBackend(rig, 1)
        q = hb.q
        settle()
        delivered = record_delivered(front, monkeypatch)
        for n in range(ROUNDS):
            bufs = hb.rx_buffers()
            hb.respond_rx([RX_RESPONSE.pack(rid, 0, NETRXF_more_data, PAGE_SIZE) for rid, _gref in bufs])
            wait_until(hb.rx_taken, what=f"round {n} of the chain taken and its buffers posted again")
            assert len(q.rx_partial) <= XEN_NETIF_NR_SLOTS_MIN, \
                f"round {n}: {len(q.rx_partial)} slots, {sum(map(len, q.rx_partial))} bytes held"
        bufs = hb.rx_buffers(2)
        then = eth_frame(G1_MAC, b"the packet after the chain")
        hb.fill(bufs[1][1], 0, then)
        hb.respond_rx([RX_RESPONSE.pack(bufs[0][0], 0, 0, 100),           # the chain's last slot
                       RX_RESPONSE.pack(bufs[1][0], 0, 0, len(then))])
        wait_until(lambda: then in delivered, what="the packet after the chain")
        wait_until(hb.rx_taken, what="the buffers posted again")
        settle()
        assert delivered == [then] and q.rx_partial == []
        assert_unharmed(front, caplog)
        carries_real_traffic(hb, ns2, front, caplog)
    finally:
        rig.close()


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_transmit_slot_the_backend_keeps_does_not_keep_every_frame_sent_after_it(
        run_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    """The backend answers the second frame twice, the first never; then it behaves (real netback), and
    the guest sends four rings' worth of frames, all answered: what netfront keeps of what it sent must
    stay within what the backend can still have, a ring's worth."""
    rig = NetRig(run_dir, guests=1)
    try:
        ns1 = rig.plug(1)
        quiet(ns1)
        front = rig.fronts[0]
        q = front._queues[0]
        caplog.set_level(logging.ERROR, logger="xdom.netfront")
        wait_until(kicked(front, lambda: q.tx_slots_free() == TX_RING_SIZE), what="the guest's own frames answered")
        hb = HandBackend(rig, 1)
        mine = [eth_frame(G2_MAC, b"kept by the backend"), eth_frame(G2_MAC, b"answered twice")]
        send_frames(ns1, mine)
        reqs: list[tuple[int, int, int, int, int]] = []

        def both_on_the_ring() -> bool:
            reqs.extend(hb.tx_requests())
            return len(reqs) >= len(mine)
        wait_until(both_on_the_ring, what="the frames on the transmit ring")
        assert [hb.tx_data(r) for r in reqs] == mine
        hb.respond_tx([(reqs[1][3], NETIF_RSP_OKAY)] * 2)
        wait_until(lambda: q.tx_slots_free() == TX_RING_SIZE - 1, what="the answers taken")
        hb.give_back()
        later = eth_frame(G2_MAC, b"a later frame", size=1000)
        batch = 128
        for n in range(1, 4 * TX_RING_SIZE // batch + 1):
            sent = front.stats["tx_packets"]
            send_frames(ns1, [later] * batch)
            wait_until(lambda: front.stats["tx_packets"] >= sent + batch, what=f"batch {n} sent")  # noqa: B023
        wait_until(kicked(front, lambda: q.tx_slots_free() == TX_RING_SIZE - 1), what="every later frame answered")
        assert_unharmed(front, caplog)
        assert len(q.tx_sent) <= TX_RING_SIZE, f"netfront keeps {len(q.tx_sent)} frames it sent"
    finally:
        rig.close()
