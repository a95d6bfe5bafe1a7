"""One connected vif's data path: its rings, event channels and mapped pages, driven by the netback loop.

Transmit (guest to netback): slots are copied off the TX ring, decided by
:class:`~.tx.TxProcessor` with Linux's rules (a fatal error closes this
vif only), charged against the vif's rate credit, read straight from the
frontend's granted pages into one frame, checked as ``checksum_setup``
does and handed to the vif's uplink (the switch, or its TAP on a bridge)
with its offload state.  Receive (netback to guest): frames the uplink
queued for this vif are fitted to what the frontend negotiated
(:mod:`.offload`), planned over the buffers it posted
(:class:`~.rx.RxPlanner`) and written straight into those granted pages.

Page mappings are kept per grant reference (xdom's netfront keeps its
buffers granted for the life of the connection), so the broker is not on
the data path.  Nothing here blocks on another domain except a grant map
of a page not yet seen, which a frontend reusing its buffers never causes.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from itertools import starmap
from typing import TYPE_CHECKING, Protocol

from xdom.domains.abi.netif import (
    RX_REQUEST,
    TX_RESPONSE,
    TX_RING_SIZE,
    rx_shared_ring,
    tx_shared_ring,
)
from xdom.domains.abi.ring import BackRing, RingOverflow
from xdom.domains.xenhost.base import GrantMapping, XenHost

from ..kept_mappings import KeptMappings
from .credit import CreditLimiter
from .offload import Frame, RxCaps, fit, from_tx
from .page_cache import PageCache
from .rx import OutgoingPacket, RxDrop, RxPlan, RxPlanner, RxRun, RxShortage
from .tx import TxAction, TxDrop, TxFatal, TxPacket, TxProcessor

if TYPE_CHECKING:
    from .switch import Port

log = logging.getLogger("xdom.netback")

UPLINK_BUDGET = 64              # frames taken from a vif's TAP per loop pass (a NAPI-like budget)
# What netback copies of a frame to look at before it goes to a TAP straight from the granted pages (Linux
# copies XEN_NETBACK_TX_COPY_LEN = 128 bytes and pulls more when the headers need it; parse_headers needs at
# most Ethernet + VLAN + a 60-byte IPv4 or an IPv6 header with options + a 60-byte TCP header).
HEAD_COPY = 256


# Slots packed and parsed by the struct's own (C) methods: a 64 KiB frame is 17 slots each way.
_pack_tx_response = TX_RESPONSE.pack             # (id, status): a TxResponse's fields in order
_unpack_rx_request = RX_REQUEST.unpack           # (id, gref): an RxRequest's fields in order


class BadFrontend(Exception):
    """The frontend's nodes do not describe a usable connection."""


class Uplink(Protocol):
    """Where a vif's transmitted frames go, and where the frames for its guest wait (a :class:`Port`).

    The built-in switch (:class:`~.switch.SwitchUplink`) fills the port
    itself; a TAP on a bridge (:class:`~.tap_uplink.TapUplink`) has a
    descriptor the loop watches, and :meth:`receive` moves what it holds.
    """

    port: Port

    def send(self, frame: Frame) -> None:
        """Forward a frame the guest transmitted."""

    def fileno(self) -> int | None:
        """A descriptor that becomes readable when frames for the guest arrive, or None."""

    def receive(self, budget: int) -> bool:
        """Queue up to ``budget`` arrived frames on the port; True if more are left."""


class Connection:
    """The rings of one connected vif; :class:`~.loop.NetbackLoop` calls :meth:`work` when there is some."""

    def __init__(self, name: str, host: XenHost, fe: int, tx_ref: int, rx_ref: int, tx_evtchn: int,
                 rx_evtchn: int, caps: RxCaps, tx_mtu: int, uplink: Uplink, fatal: Callable[[str], None],
                 kept: KeptMappings, limiter: CreditLimiter | None = None, queue: int = 0) -> None:
        """Queue ``queue`` of a vif; ``limiter`` is the vif's rate credit (shared by all its queues);
        ``kept`` the bound on kept pages all of netback's vifs share."""
        self.name, self.host, self.fe = name, host, fe
        self.queue = queue
        self.uplink = uplink
        self._fatal = fatal
        self.maps: list[GrantMapping] = []
        self.ports: list[int] = []
        self.tx_pages = PageCache(host, fe, readonly=True, kept=kept)
        self.rx_pages = PageCache(host, fe, readonly=False, kept=kept)
        self.txp = TxProcessor(mtu=tx_mtu)
        self.caps = caps
        self.planner = RxPlanner(sg=caps.sg, gso_tcpv4=caps.gso_tcpv4, gso_tcpv6=caps.gso_tcpv6)
        self.posted: list[tuple[int, int]] = []       # (id, gref) of each buffer the frontend posted, in ring order
        self.fitted: collections.deque[Frame] = collections.deque()   # a frame's segments, waiting for room
        self.held: collections.deque[TxAction] = collections.deque()  # decided, waiting for rate credit
        self.limiter = limiter
        self.dead = False
        self.uplink_ready = False
        self.stats = {"tx_packets": 0, "tx_dropped": 0, "tx_gso": 0, "tx_rate_waits": 0, "rx_packets": 0,
                      "rx_dropped": 0, "rx_gso": 0, "rx_segmented": 0, "notifies": 0}
        try:
            results = host.map_grants([(fe, tx_ref, False), (fe, rx_ref, False)])
            self.maps = [r.mapping for r in results if r.mapping is not None]
            if len(self.maps) != 2:
                raise BadFrontend(f"cannot map the rings (tx-ring-ref {tx_ref}, rx-ring-ref {rx_ref})")
            self.tx = BackRing(tx_shared_ring([self.maps[0].view]))
            self.rx = BackRing(rx_shared_ring([self.maps[1].view]))
            self.tx_port = host.bind_interdomain(fe, tx_evtchn)
            self.ports.append(self.tx_port)
            self.rx_port = self.tx_port if rx_evtchn == tx_evtchn else host.bind_interdomain(fe, rx_evtchn)
            if self.rx_port != self.tx_port:
                self.ports.append(self.rx_port)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Unmap and unbind everything (once the loop no longer serves this connection)."""
        self.dead = True
        # One unmap for the lot: the broker checks each unmap call against this process's whole
        # memory map, which is large when many guests are served (three calls cost three reads).
        maps = self.tx_pages.take() + self.rx_pages.take() + self.maps
        self.maps = []
        if maps:
            try:
                self.host.unmap_grants(maps)
            except Exception as e:
                log.warning("%s: unmapping rings and pages: %s", self.name, e)
        self.tx_pages.close_window()
        self.rx_pages.close_window()
        for port in self.ports:
            try:
                self.host.close_port(port)
            except Exception as e:
                log.warning("%s: closing port %d: %s", self.name, port, e)
        self.ports = []

    # ---- the loop's interface ----------------------------------------------------------

    def fds(self) -> dict[int, str]:
        fds = {self.host.evtchn.fileno(p): "evtchn" for p in self.ports}
        up = self.uplink.fileno()
        if up is not None and self.queue == 0:      # a bridged vif's one TAP: read by queue 0, whose receive
            fds[up] = "uplink"                      # spreads the frames over the queues by flow (port.put)
        return fds

    def on_ready(self, what: str) -> None:
        if what == "uplink":
            self.uplink_ready = True
            return
        for p in self.ports:
            self.host.evtchn.consume(p)

    def deadline(self) -> float | None:
        return self.limiter.deadline() if self.limiter is not None and self.held else None

    def work(self, now: float) -> bool:
        if self.dead:
            return False
        try:
            more = False
            if self.uplink_ready:
                more = self.uplink_ready = self.uplink.receive(UPLINK_BUDGET)
            more = self._tx(now) or more
            self._rx()
            if self.tx_pages.transient or self.rx_pages.transient:      # past the bound on kept pages
                self.tx_pages.drop_transient()
                self.rx_pages.drop_transient()
            return more
        except RingOverflow as e:
            self._die(f"ring overflow: {e}")
        except _Fatal as e:
            self._die(str(e))
        return False

    def _die(self, why: str) -> None:
        self.dead = True
        self._fatal(why)

    # ---- transmit: ring -> uplink --------------------------------------------------------

    def _tx(self, now: float) -> bool:
        """One ring's worth of the guest's packets; True if more were published meanwhile."""
        if not self.held:
            slots = self.tx.take_requests(TX_RING_SIZE)
            if slots:
                self.held.extend(self.txp.feed(slots, at_req_prod=True))
        held, tx, limiter = self.held, self.tx, self.limiter
        send_parts = getattr(self.uplink, "send_parts", None)
        answers: list[bytes] = []
        while held:
            action = held[0]
            if isinstance(action, TxFatal):
                raise _Fatal(f"frontend broke the tx protocol: {action.reason}")
            if limiter is not None and isinstance(action, TxPacket) and not limiter.admit(action.length, now):
                self.stats["tx_rate_waits"] += 1
                break
            held.popleft()
            responses = action.responses
            if isinstance(action, TxPacket):
                if send_parts is not None and action.pieces[0].length > HEAD_COPY:
                    sent = self._send_parts(action, send_parts)
                    if sent is None:
                        responses = action.error_responses()
                    self.stats["tx_packets" if sent else "tx_dropped"] += 1
                    answers += starmap(_pack_tx_response, responses)
                    continue
                data = self._gather(action)
                if data is None:
                    responses = action.error_responses()
                    self.stats["tx_dropped"] += 1
                else:
                    frame = from_tx(action, data)
                    if isinstance(frame, str):
                        log.debug("%s: dropping a transmitted frame: %s", self.name, frame)
                        self.stats["tx_dropped"] += 1
                    else:
                        self.stats["tx_packets"] += 1
                        if frame.gso is not None:
                            self.stats["tx_gso"] += 1
                        self.uplink.send(frame)
            elif isinstance(action, TxDrop):
                self.stats["tx_dropped"] += 1
            # TxMulticast: the switch floods multicast; the filter is the guest's business
            answers += starmap(_pack_tx_response, responses)
        tx.put_responses(answers)
        if tx.push_responses():
            self._notify(self.tx_port)
        if held:
            return False                  # waiting for rate credit: the deadline brings us back
        return tx.final_check_for_requests()

    def _send_parts(self, pkt: TxPacket, send_parts: Callable[[Frame, list[memoryview]], None]) -> bool | None:
        """To a TAP, without gathering: the head copied and checked, the rest written from the granted pages.

        True when sent; False when dropped after all (its slots are
        answered OKAY, as Linux does); None when a page could not be mapped
        (they are answered with an error).  The frontend may change its
        pages under us: what reaches the kernel past the head is its own
        payload, and the kernel checks the virtio-net header against the
        packet again.  Headers longer than the head copy are looked at in
        the whole frame, gathered.
        """
        views = self.tx_pages.views
        grefs = [p.gref for p in pkt.pieces]
        if not all(map(views.__contains__, grefs)):
            self.tx_pages.ensure(set(grefs))
            if not all(map(views.__contains__, grefs)):
                return None
        first = pkt.pieces[0]
        page = views[first.gref]
        frame = from_tx(pkt, bytes(page[first.offset:first.offset + HEAD_COPY]))
        if isinstance(frame, str):
            data = self._gather(pkt)
            whole = from_tx(pkt, data) if data is not None else "pages went away"
            if isinstance(whole, str):
                log.debug("%s: dropping a transmitted frame: %s", self.name, whole)
                return False
            self.uplink.send(whole)
            frame = whole
        else:
            tail = self.tx_pages.views_past(pkt.pieces, pkt.length, HEAD_COPY)
            send_parts(frame, tail)
        if frame.gso is not None:
            self.stats["tx_gso"] += 1
        return True

    def _gather(self, pkt: TxPacket) -> bytes | None:
        """The packet's bytes, copied out of the granted pages (one copy of one span when its pieces
        tile neighbouring pages, as a frontend's frame does); None if a page cannot be mapped."""
        pieces, pages = pkt.pieces, self.tx_pages
        try:
            return b"".join(pages.views_past(pieces, pkt.length, 0))
        except KeyError:
            pages.ensure({p.gref for p in pieces})
        try:
            return b"".join(pages.views_past(pieces, pkt.length, 0))
        except KeyError:
            return None

    # ---- receive: uplink -> ring ----------------------------------------------------------

    def _rx(self) -> None:
        """As many queued frames as the frontend has posted buffers for, pushed with one notification.

        Each frame is first fitted to what this frontend negotiated
        (segmented, its checksum finished, or dropped); its pieces wait in
        ``fitted`` until the frontend has posted buffers for them.
        """
        port, fitted, rx = self.uplink.port, self.fitted, self.rx
        pushed = False
        while True:
            if not fitted:
                taken = port.take(self.queue)
                if taken is None:
                    break
                pieces = fit(taken, self.caps)
                if isinstance(pieces, str):
                    log.debug("%s: dropping a frame for the guest: %s", self.name, pieces)
                    self.stats["rx_dropped"] += 1
                    continue
                if taken.gso is not None and len(pieces) > 1:
                    self.stats["rx_segmented"] += 1
                fitted.extend(pieces)
            frame = fitted[0]
            if len(self.posted) < 20:        # enough for any packet: parse requests in batches
                self.posted += map(_unpack_rx_request, rx.take_requests())
            decision = self.planner.plan_run(len(frame.data), frame.gso, frame.checksum, self.posted)
            if isinstance(decision, RxShortage):
                # Re-arm req_event: when the frontend posts buffers we hear of it.
                if rx.final_check_for_requests():
                    self.posted += map(_unpack_rx_request, rx.take_requests())
                    continue
                break
            fitted.popleft()
            if isinstance(decision, RxDrop):
                self.stats["rx_dropped"] += 1
                continue
            self._deliver(decision, frame)
            if frame.gso is not None:
                self.stats["rx_gso"] += 1
            del self.posted[:decision.consumed]
            pushed = True
        if pushed and rx.push_responses():
            self._notify(self.rx_port)

    def _deliver(self, run: RxRun, frame: Frame) -> None:
        pages = self.rx_pages
        if not all(map(pages.views.__contains__, run.grefs)):
            # Every buffer posted so far, not just this frame's: the frontend reuses its grants, so
            # one hypercall maps what the next frames would each have missed (a bridge floods a
            # new guest's ARP and neighbour discovery to every vif: one map each was N^2 calls).
            pages.ensure(set(run.grefs), prefetch={gref for _id, gref in self.posted})
            if not all(map(pages.views.__contains__, run.grefs)):
                self._deliver_failing(frame)
                return
        pages.fill(run.grefs, frame.data)
        self.rx.put_response_run(run.responses, run.consumed)
        self.stats["rx_packets"] += 1

    def _deliver_failing(self, frame: Frame) -> None:
        """A frame some of whose pages cannot be mapped: the slots of those answer NETIF_RSP_ERROR
        (netfront drops the packet), the rest are copied as usual."""
        plan = self.planner.plan(OutgoingPacket(len(frame.data), frame.gso, frame.checksum), self.posted)
        assert isinstance(plan, RxPlan)     # plan_run planned it from the same requests
        failed = self.rx_pages.copy_in(plan.copies, frame.data)
        self.rx.put_responses(plan.packed_responses(failed))
        self.stats["rx_dropped" if failed else "rx_packets"] += 1

    def _notify(self, port: int) -> None:
        self.stats["notifies"] += 1
        self.host.notify(port)


class _Fatal(Exception):
    """The frontend broke the protocol: close this vif."""
