"""One netfront queue: its two rings, event channel(s) and granted buffers, and the packets part-way through.

:class:`QueueRings` is the ring half of :mod:`.device`: it lays frames out
on the transmit ring (one copy into consecutive granted pages, the middle
slots' requests made once), frees transmit pages as the backend answers,
and turns the backend's receive responses back into frames, posting the
pages again at once.  Everything here runs on netfront's data thread under
its lock; nothing here blocks.
"""

from __future__ import annotations

import collections
import logging
import sys
from operator import add

from ..abi.netif import (
    NETIF_RSP_NULL,
    RX_REQUEST,
    RX_RESPONSE,
    RX_RING_SIZE,
    RX_SLOT_SIZE,
    TX_REQUEST,
    TX_RING_SIZE,
    TX_SLOT_SIZE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_NR_SLOTS_MIN,
    GsoInfo,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    NETTXF_more_data,
    packed_gso_extra,
    parse_extra_info,
    rx_shared_ring,
    tx_shared_ring,
)
from ..abi.ring import FrontRing, RingOverflow
from ..frame_pool import FramePool
from ..log_budget import worth_logging
from ..vnet import TxFrame, to_tap
from ..xenhost.base import XenHost

__all__ = ["QueueRings"]

log = logging.getLogger("xdom.netfront")

PAGE_SIZE = 4096
# A run of receive responses as columns: each slot's offset, flags and status, and per slot 1 while
# NETRXF_more_data (from the flags' low byte), to find where a packet ends with bytes.find.
_RxColumns = tuple[list[int], list[int], list[int], bytes]
_MORE_DATA = bytes(int(bool(b & NETRXF_more_data)) for b in range(256))


def _rx_columns(blob: bytes) -> _RxColumns:
    halves = memoryview(blob).cast("H")
    return (halves[1::4].tolist(), halves[2::4].tolist(), memoryview(blob).cast("h")[3::4].tolist(),
            blob[4::RX_SLOT_SIZE].translate(_MORE_DATA))


_TX_SLOT_HALVES = TX_SLOT_SIZE // 2            # 16-bit fields per transmit slot: a response's id, then status

class QueueRings:
    """One queue's rings, event channel(s) and granted buffers, and the packets it is part-way through."""

    def __init__(self, host: XenHost, pool: FramePool, be: int, index: int, split: bool,
                 deferred: list[tuple[int, int]]) -> None:
        """On failure what was granted goes to ``deferred`` (ended once the backend lets go), the rest back
        to the pool."""
        self.host, self.pool, self.be, self.index = host, pool, be, index
        self.gfns = pool.alloc(2 + TX_RING_SIZE + RX_RING_SIZE)
        self.refs: list[int] = []           # granted so far, in the order of gfns
        self.ports: list[int] = []
        try:
            for g in self.gfns[:2]:
                host.memory.frame(g)[:] = bytes(PAGE_SIZE)
            self.tx_gfns = self.gfns[2:2 + TX_RING_SIZE]
            self.rx_gfns = self.gfns[2 + TX_RING_SIZE:]
            grant, refs = host.gnttab.grant_access, self.refs
            for i, g in enumerate(self.gfns):        # rings, then transmit pages (read-only), then receive
                refs.append(grant(be, g, readonly=2 <= i < 2 + TX_RING_SIZE))
            self.tx_ring_ref, self.rx_ring_ref = refs[0], refs[1]
            self.tx_refs = refs[2:2 + TX_RING_SIZE]
            self.rx_refs = refs[2 + TX_RING_SIZE:]
            self.tx_port = host.alloc_unbound(be)
            self.ports.append(self.tx_port)
            self.rx_port = host.alloc_unbound(be) if split else self.tx_port
            if split:
                self.ports.append(self.rx_port)
        except BaseException:
            self.release(deferred)
            raise
        # A buffer's receive request is always the same (its id, its grant): made once.
        self.rx_requests = [RX_REQUEST.pack(i, ref) for i, ref in enumerate(self.rx_refs)]
        self.tx = FrontRing(tx_shared_ring([host.memory.frame(self.gfns[0])]))
        self.rx = FrontRing(rx_shared_ring([host.memory.frame(self.gfns[1])]))
        # Transmit slots: 1 while the backend has the slot's page.  A frame takes a run of slots
        # (_tx_slots), from a cursor that follows the backend's answers round the ring: the pages of
        # consecutive frames (allocated together) are then one copy from the frame, and the requests
        # of a frame's middle slots are the same every time (made once, here).
        self.tx_in_flight = bytearray(TX_RING_SIZE)
        self.tx_next = 0
        first = self.tx_gfns[0]
        self.tx_contiguous = self.tx_gfns == list(range(first, first + TX_RING_SIZE))
        self.tx_middle = [TX_REQUEST.pack(self.tx_refs[s], 0, NETTXF_more_data, s, PAGE_SIZE)
                          for s in range(TX_RING_SIZE)]
        # Frames on the ring, oldest first, with their slots: what a new ring takes over if the backend dies.
        self.tx_sent: collections.deque[tuple[range | list[int], TxFrame]] = collections.deque()
        # Which of them each slot was last put in: an answered frame behind an unanswered one stays in
        # tx_sent, and a later frame may have its slots by now; that one's being in flight is not its.
        self.tx_owner: list[tuple[range | list[int], TxFrame] | None] = [None] * TX_RING_SIZE
        self.tx_pushed = False
        self.rx_partial: list[bytes | memoryview] = []   # views into posted pages until reposted
        self.rx_first_flags = 0                 # the packet being received: its first slot's flags,
        self.rx_gso: GsoInfo | None = None      # its GSO extra,
        self.rx_in_extras = False               # whether extra-info slots come next,
        self.rx_data_done = False               # whether its last data slot has come,
        self.rx_overlong = False                # and whether it ran past the slots a packet may take
        self.rx_overlong_packets = 0
        # Buffer ids in the order their requests were posted: a response sits in
        # its request's slot, so this (not the response's id, which an
        # extra-info slot does not carry) says whose page it filled.
        self.rx_posted: collections.deque[int] = collections.deque()

    def nodes(self) -> dict[str, int]:
        """This queue's xenstore nodes (in the device directory, or in ``queue-N/``)."""
        out = {"tx-ring-ref": self.tx_ring_ref, "rx-ring-ref": self.rx_ring_ref}
        if self.rx_port != self.tx_port:
            out |= {"event-channel-tx": self.tx_port, "event-channel-rx": self.rx_port}
        else:
            out["event-channel"] = self.tx_port
        return out

    def release(self, deferred: list[tuple[int, int]]) -> None:
        for port in self.ports:
            try:
                self.host.close_port(port)
            except Exception as e:
                log.warning("closing port %d: %s", port, e)
        self.ports = []
        for ref, gfn in zip(self.refs, self.gfns):
            deferred.append((ref, gfn))
        self.pool.free(self.gfns[len(self.refs):])       # allocated, never granted (a failed set-up)

    # ---- transmit ------------------------------------------------------------------------

    def tx_slots_free(self) -> int:
        return TX_RING_SIZE - self.tx_in_flight.count(1)

    def _tx_slots(self, nslots: int) -> range | list[int] | None:
        """Free slots for a frame: a run (at the cursor, else the first anywhere), else any (a backend
        that answers out of order), else None."""
        at = self.tx_next
        if at + nslots > TX_RING_SIZE:
            at = 0
        in_flight = self.tx_in_flight
        if in_flight.find(1, at, at + nslots) < 0:
            return range(at, at + nslots)
        at = in_flight.find(bytes(nslots))
        if at >= 0:
            return range(at, at + nslots)
        free = [slot for slot, busy in enumerate(in_flight) if not busy]
        return free[:nslots] if len(free) >= nslots else None

    def _still_sent(self, sent: tuple[range | list[int], TxFrame]) -> bool:
        """Does the backend still have any of this frame's slots (not a later frame put in one of them)?"""
        slots = sent[0]
        in_flight, owner = self.tx_in_flight, self.tx_owner
        if type(slots) is range and in_flight.find(1, slots.start, slots.stop) < 0:
            return False                # the usual answer, found in C
        return any([in_flight[slot] and owner[slot] is sent for slot in slots])

    def room(self, f: TxFrame) -> bool:
        nslots = max(1, -(-len(f.data) // PAGE_SIZE))
        return self.tx.free_requests() >= nslots + (f.gso is not None) and self._tx_slots(nslots) is not None

    def put(self, f: TxFrame, stats: dict[str, int]) -> None:
        """The frame into transmit pages and requests (the caller checked :meth:`room`)."""
        frame = memoryview(f.data)
        total = len(frame)
        nslots = max(1, -(-total // PAGE_SIZE))
        slots = self._tx_slots(nslots)
        if slots is None:
            raise RingOverflow("no transmit slots: room() was not asked")
        buffer, gfns, refs, in_flight = self.host.memory.buffer, self.tx_gfns, self.tx_refs, self.tx_in_flight
        first = slots[0]
        pack = TX_REQUEST.pack
        flags = (NETTXF_more_data if nslots > 1 else 0) | (NETTXF_csum_blank if f.csum_blank else 0) | \
            (NETTXF_data_validated if f.data_validated else 0) | (NETTXF_extra_info if f.gso else 0)
        requests = [pack(refs[first], 0, flags, first, total)]
        if f.gso is not None:
            requests.append(packed_gso_extra(f.gso.size, f.gso.type, TX_SLOT_SIZE))
        sent = (slots, f)
        if type(slots) is range and self.tx_contiguous:
            # The usual frame: one copy into consecutive pages, the middle requests ready made.
            at = gfns[first] * PAGE_SIZE
            buffer[at:at + total] = frame
            in_flight[first:first + nslots] = b"\1" * nslots
            self.tx_owner[first:first + nslots] = [sent] * nslots
            if nslots > 1:
                last = first + nslots - 1
                requests += self.tx_middle[first + 1:last]
                requests.append(pack(refs[last], 0, 0, last, total - (nslots - 1) * PAGE_SIZE))
        else:
            for i, slot in enumerate(slots):
                at = gfns[slot] * PAGE_SIZE
                chunk = frame[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                buffer[at:at + len(chunk)] = chunk
                in_flight[slot] = 1
                self.tx_owner[slot] = sent
                if i:
                    requests.append(pack(refs[slot], 0, NETTXF_more_data if i < nslots - 1 else 0, slot, len(chunk)))
        if type(slots) is range:
            self.tx_next = slots.stop
        self.tx.put_requests(requests)
        self.tx_sent.append(sent)
        self.tx_pushed = True
        stats["tx_packets"] += 1
        if f.gso is not None:
            stats["tx_gso"] += 1

    def push_tx(self) -> None:
        if self.tx_pushed:
            self.tx_pushed = False
            if self.tx.push_requests():
                self.host.notify(self.tx_port)

    def reap_tx(self, want_event: bool = True) -> None:
        """Buffers whose requests were answered are free again (an id answered twice frees once).

        Without ``want_event`` the backend is asked not to notify for the
        next answers: the data loop reaps them on its next pass anyway, and
        needs an event only while frames wait for room (:meth:`want_tx_event`).
        Each event spared is a wakeup of this domain and an eventfd write
        in the backend's loop (a wakeup across CPUs costs some 40 us here).
        """
        in_flight = self.tx_in_flight
        while True:
            blob = self.tx.take_response_run()         # whole slots: (id, status) and the request's rest
            if blob:
                ids = memoryview(blob).cast("H")[0::_TX_SLOT_HALVES].tolist()
                statuses = memoryview(blob).cast("h")[1::_TX_SLOT_HALVES].tolist()
                for rid, status in zip(ids, statuses):
                    if rid < TX_RING_SIZE and status != NETIF_RSP_NULL:     # (an extra slot's answer is NULL)
                        in_flight[rid] = 0
            if not want_event:
                self.tx.ignore_responses()
                break
            if not self.tx.final_check_for_responses():
                break
        sent = self.tx_sent
        while sent and not self._still_sent(sent[0]):
            sent.popleft()
        if len(sent) > TX_RING_SIZE:
            # The head is a frame the backend has not answered while it answered more than a ring's
            # worth after it (a backend that spent that answer on another id, or never gives it): keep
            # only what it can still have, or every frame sent after that one would stay here for good.
            self.tx_sent = collections.deque(s for s in sent if self._still_sent(s))

    def want_tx_event(self) -> bool:
        """Ask for an event on the next answer; True if answers came meanwhile (reap them now)."""
        return self.tx.final_check_for_responses()

    def unanswered(self) -> list[TxFrame]:
        """Frames the backend has not answered, in the order they were sent (it died: they go on again)."""
        return [sent[1] for sent in self.tx_sent if self._still_sent(sent)]

    # ---- receive -------------------------------------------------------------------------

    #: Whether :meth:`reap_rx` takes whole packets in one step where it can (:meth:`_whole_packet`); a
    #: test turns it off to compare the two.  It reads the slots' fields in the host's byte order,
    #: which must be the ring's.
    whole_packets_first = sys.byteorder == "little"

    def reap_rx(self, stats: dict[str, int]) -> list[tuple[bytes, bytes]]:
        """Frames the backend wrote, each with its virtio-net header; their pages are posted again at once.

        A packet is its first data slot, the extra-info slots chained after
        it (``XEN_NETIF_EXTRA_FLAG_MORE``; a GSO extra says how to segment),
        then its other data slots.  A packet whose first data slot is also
        its last is complete only once its extra slots are read: a GSO
        super-frame can fit one page.  The responses are copied out of the
        ring in one go; a usual packet is then taken whole from their
        fields read as columns, anything else slot by slot (:meth:`_rx_slot`).
        """
        frames: list[tuple[bytes, bytes]] = []
        repost: list[int] = []
        while True:
            blob = self.rx.take_response_run()
            n = len(blob) // RX_SLOT_SIZE
            columns = _rx_columns(blob) if n and self.whole_packets_first else None
            i = 0
            while i < n:
                if columns is not None and not self.rx_partial and not self.rx_in_extras:
                    taken = self._whole_packet(blob, columns, i, frames, repost, stats)
                    if taken:
                        i += taken
                        continue
                self._rx_slot(blob[i * RX_SLOT_SIZE:(i + 1) * RX_SLOT_SIZE], frames, repost, stats)
                i += 1
            if not self.rx.final_check_for_responses():
                break
        if self.rx_partial:
            # A packet whose last slots have not come: its pages are about to be posted again.
            self.rx_partial = [bytes(p) for p in self.rx_partial]
        self.post_rx(repost)
        return frames

    def _whole_packet(self, blob: bytes, columns: _RxColumns, i: int, frames: list[tuple[bytes, bytes]],
                      repost: list[int], stats: dict[str, int]) -> int:
        """The packet starting at slot ``i``, taken in one step if it is a usual one: how many slots it
        took, or 0 (nothing done) for :meth:`_rx_slot` to take it slot by slot.

        Usual: all its slots in ``blob``, at most one extra slot (and that
        one not chained on), at most ``XEN_NETIF_NR_SLOTS_MIN`` data slots,
        each holding at least a byte within its page, and buffers posted
        for them all -- on every path of :meth:`_rx_slot` such a packet
        is delivered (or refused by ``to_tap``) the same.  Its bytes are one
        copy when its pages are consecutive frames filled end to end (a
        backend fills them so), else one copy of each page's part.
        """
        offsets, flags, statuses, more = columns
        first = flags[i]
        gso = None
        rest = i + 1                        # its second data slot, if it has one
        if first & NETRXF_extra_info:
            at = rest * RX_SLOT_SIZE
            if at >= len(blob):
                return 0
            extra = parse_extra_info(blob[at:at + RX_SLOT_SIZE])
            if extra.more:
                return 0
            if extra.type == XEN_NETIF_EXTRA_TYPE_GSO and isinstance(extra.body, GsoInfo):
                gso = extra.body
            rest += 1
        if first & NETRXF_more_data:
            last = more.find(0, rest)       # its last data slot: the first after ``rest`` without more_data
            if last < 0:
                return 0
            offs = [offsets[i], *offsets[rest:last + 1]]
            sizes = [statuses[i], *statuses[rest:last + 1]]
        else:
            last = rest - 1
            offs, sizes = [offsets[i]], [statuses[i]]
        count = last + 1 - i
        posted = self.rx_posted
        if len(offs) > XEN_NETIF_NR_SLOTS_MIN or len(posted) < count or min(sizes) <= 0 \
                or max(map(add, offs, sizes)) > PAGE_SIZE:
            return 0
        bufs = [posted.popleft() for _ in range(count)]
        repost += bufs
        gfns = self.rx_gfns
        pages = [gfns[bufs[0]], *[gfns[b] for b in bufs[count - len(offs) + 1:]]]
        buffer = self.host.memory.buffer
        start = pages[0] * PAGE_SIZE + offs[0]
        if len(pages) == 1:
            frame = bytes(buffer[start:start + sizes[0]])
        elif pages[1:] == list(range(pages[1], pages[1] + len(pages) - 1)) and max(offs[1:]) == 0 \
                and set(sizes[1:-1]) <= {PAGE_SIZE}:
            # The pages after the first are consecutive frames filled from their start: one span, and
            # the first page's part before it (one span with it if it ends where the span starts).
            end = pages[-1] * PAGE_SIZE + sizes[-1]
            if pages[1] == pages[0] + 1 and offs[0] + sizes[0] == PAGE_SIZE:
                frame = bytes(buffer[start:end])
            else:
                frame = b"".join((buffer[start:start + sizes[0]], buffer[pages[1] * PAGE_SIZE:end]))
        else:
            frame = b"".join([buffer[p * PAGE_SIZE + o:p * PAGE_SIZE + o + n] for p, o, n in zip(pages, offs, sizes)])
        self._deliver(frame, first, gso, frames, stats)
        return count

    def _rx_slot(self, raw: bytes, frames: list[tuple[bytes, bytes]], repost: list[int],
                 stats: dict[str, int]) -> None:
        """One response slot, wherever in a packet it falls (the general path of :meth:`reap_rx`)."""
        posted = self.rx_posted
        if not posted:
            raise RingOverflow("a receive response without a posted request")
        buf = posted.popleft()
        repost.append(buf)
        if self.rx_in_extras:                  # an extra-info slot: its buffer was not written
            extra = parse_extra_info(raw)
            if extra.type == XEN_NETIF_EXTRA_TYPE_GSO and isinstance(extra.body, GsoInfo):
                self.rx_gso = extra.body
            self.rx_in_extras = extra.more
            if not extra.more and self.rx_data_done:
                self._finish_packet(frames, stats)
            return
        _id, offset, flags, status = RX_RESPONSE.unpack_from(raw)
        if not self.rx_partial:
            self.rx_first_flags, self.rx_gso = flags, None
            self.rx_in_extras = bool(flags & NETRXF_extra_info)
        if self.rx_overlong:
            pass                               # the rest of a packet too long: consumed, not kept
        elif len(self.rx_partial) >= XEN_NETIF_NR_SLOTS_MIN:
            # No packet takes more slots (Linux's xennet_get_responses: "Too many slots"): the rest
            # of this one is consumed and the packet dropped, holding nothing of it meanwhile.
            self.rx_overlong = True
            self.rx_partial = [b""]
            stats["rx_errors"] += 1
            self.rx_overlong_packets += 1
            if worth_logging(self.rx_overlong_packets):
                log.warning("backend d%d: a received packet runs past %d slots: dropped (%d so far)",
                            self.be, XEN_NETIF_NR_SLOTS_MIN, self.rx_overlong_packets)
        elif status >= 0 and offset + status <= PAGE_SIZE:
            # A view, copied once when the packet is joined (or at the end of the pass, if it is not complete).
            at = self.rx_gfns[buf] * PAGE_SIZE + offset
            self.rx_partial.append(self.host.memory.buffer[at:at + status])
        else:
            self.rx_partial.append(b"")
            stats["rx_errors"] += 1
        if not flags & NETRXF_more_data:
            self.rx_data_done = True
            if not self.rx_in_extras:
                self._finish_packet(frames, stats)

    def _finish_packet(self, frames: list[tuple[bytes, bytes]], stats: dict[str, int]) -> None:
        frame = b"".join(self.rx_partial)
        if all(self.rx_partial) and frame:
            self._deliver(frame, self.rx_first_flags, self.rx_gso, frames, stats)
        self.rx_partial = []
        self.rx_data_done = self.rx_overlong = False

    @staticmethod
    def _deliver(frame: bytes, flags: int, gso: GsoInfo | None, frames: list[tuple[bytes, bytes]],
                 stats: dict[str, int]) -> None:
        """A received packet, whole, to ``frames`` with its virtio-net header (refused: an error)."""
        out = to_tap(frame, bool(flags & NETRXF_csum_blank), bool(flags & NETRXF_data_validated), gso)
        if out is None:
            stats["rx_errors"] += 1
            return
        frames.append((out[0].pack(), out[1]))
        stats["rx_packets"] += 1
        if gso is not None:
            stats["rx_gso"] += 1

    def post_rx(self, ids: list[int] | range | None = None) -> None:
        rx = self.rx
        take = list(range(RX_RING_SIZE) if ids is None else ids)[:rx.free_requests()]
        rx.put_requests(list(map(self.rx_requests.__getitem__, take)))
        self.rx_posted.extend(take)
        if rx.push_requests():
            self.host.notify(self.rx_port)
