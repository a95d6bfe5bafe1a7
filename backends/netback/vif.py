"""One virtual network interface on the backend side: its xenbus life, its rings, its port on the switch.

xenbus as Linux ``xen-netback/xenbus.c`` (features, InitWait, connect,
follow the frontend through Closing/Closed), with xdom's rule from
:mod:`xdom.domains.xenbus`: connect when the frontend is Initialised, so a
restarted netback never takes a dead predecessor's rings for fresh ones.

Data: the frontend's packets come off the TX ring as slot copies, go
through :class:`~.tx.TxProcessor` (Linux's rules; a fatal error closes
this vif only) and are read straight from the frontend's granted pages
into one frame for the switch.  Frames for the guest are planned by
:class:`~.rx.RxPlanner` over the receive buffers the frontend posted and
written straight into those granted pages.  Page mappings are kept per
grant reference (xdom's netfront keeps its buffers granted for the life of
the connection), so the broker is not on the data path.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import threading

from xdom.domains.abi.netif import RxRequest, pack_tx_response, parse_rx_request, rx_shared_ring, tx_shared_ring
from xdom.domains.abi.ring import BackRing, RingOverflow
from xdom.domains.hypercall_wire import HypercallError
from xdom.domains.xenbus import XenbusState, read_int, read_or_none, read_state, switch_state, write_nodes
from xdom.domains.xenhost.base import GrantError, GrantMapping, XenHost
from xdom.domains.xenstore import XenstoreClient

from .offload import Frame, RxCaps, fit, from_tx
from .rx import OutgoingPacket, RxDrop, RxPlan, RxPlanner, RxShortage
from .switch import LearningSwitch, Port
from .tx import TxDrop, TxFatal, TxMulticast, TxPacket, TxProcessor

log = logging.getLogger("xdom.netback")

MAX_CACHED_MAPPINGS = 1024      # per vif and direction: our netfront uses 256 buffers each way


class BadFrontend(Exception):
    """The frontend's nodes do not describe a usable connection."""


class _PageCache:
    """Mappings of the frontend's pages by grant reference, made in batches and kept."""

    def __init__(self, host: XenHost, fe: int, readonly: bool) -> None:
        self.host, self.fe, self.readonly = host, fe, readonly
        self.maps: dict[int, GrantMapping] = {}

    def pages(self, grefs: set[int]) -> dict[int, memoryview]:
        missing = [g for g in grefs if g not in self.maps]
        if missing:
            if len(self.maps) + len(missing) > MAX_CACHED_MAPPINGS:
                self.clear()
                missing = list(grefs)
            for g, res in zip(missing, self.host.map_grants([(self.fe, g, self.readonly) for g in missing])):
                if res.mapping is not None:
                    self.maps[g] = res.mapping
        return {g: self.maps[g].view for g in grefs if g in self.maps}

    def clear(self) -> None:
        maps, self.maps = list(self.maps.values()), {}
        if maps:
            try:
                self.host.unmap_grants(maps)
            except Exception as e:
                log.warning("unmapping %d pages: %s", len(maps), e)


class _Connection:
    """The rings and the thread of one connected vif."""

    def __init__(self, vif: "Vif", tx_ref: int, rx_ref: int, tx_evtchn: int, rx_evtchn: int, caps: RxCaps,
                 tx_mtu: int) -> None:
        self.vif = vif
        host, fe = vif.host, vif.fe
        self.host, self.fe = host, fe
        self.maps: list[GrantMapping] = []
        self.ports: list[int] = []
        self.tx_pages = _PageCache(host, fe, readonly=True)
        self.rx_pages = _PageCache(host, fe, readonly=False)
        self.txp = TxProcessor(mtu=tx_mtu)
        self.caps = caps
        self.planner = RxPlanner(sg=caps.sg, gso_tcpv4=caps.gso_tcpv4, gso_tcpv6=caps.gso_tcpv6)
        self.posted: list[RxRequest] = []
        self.fitted: collections.deque[Frame] = collections.deque()   # a frame's segments, waiting for room
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.thread: threading.Thread | None = None
        self.stats = {"tx_packets": 0, "tx_dropped": 0, "tx_gso": 0, "rx_packets": 0, "rx_dropped": 0,
                      "rx_gso": 0, "rx_segmented": 0}
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

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"netback-{self.vif.name}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        os.eventfd_write(self.stop_fd, 1)
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()
        self.release()

    def release(self) -> None:
        self.tx_pages.clear()
        self.rx_pages.clear()
        maps, self.maps = self.maps, []
        if maps:
            try:
                self.host.unmap_grants(maps)
            except Exception as e:
                log.warning("%s: unmapping rings: %s", self.vif.name, e)
        for port in self.ports:
            try:
                self.host.close_port(port)
            except Exception as e:
                log.warning("%s: closing port %d: %s", self.vif.name, port, e)
        self.ports = []
        if self.stop_fd >= 0:
            os.close(self.stop_fd)
            self.stop_fd = -1

    # ---- the loop ----------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        for fd in {self.host.evtchn.fileno(p) for p in self.ports} | {self.vif.port.wake_fd, self.stop_fd}:
            poller.register(fd, select.POLLIN)
        try:
            while True:
                self._tx()
                self._rx()
                ready = {fd for fd, _ in poller.poll()}
                if self.stop_fd in ready:
                    return
                for p in self.ports:
                    self.host.evtchn.consume(p)
                try:
                    os.eventfd_read(self.vif.port.wake_fd)
                except BlockingIOError:
                    pass
        except _Stopped:
            return
        except RingOverflow as e:
            self.vif.fatal(self, f"ring overflow: {e}")
        except Exception as e:
            log.exception("%s: vif thread failed", self.vif.name)
            self.vif.fatal(self, f"vif thread failed: {e}")

    def _tx(self) -> None:
        """Guest to switch: every packet the frontend published, answered in slot order."""
        while True:
            slots = self.tx.take_requests()
            if slots:
                for action in self.txp.feed(slots, at_req_prod=True):
                    if isinstance(action, TxFatal):
                        self.vif.fatal(self, f"frontend broke the tx protocol: {action.reason}")
                        raise _Stopped()
                    responses = action.responses
                    if isinstance(action, TxPacket):
                        data = self._gather(action)
                        if data is None:
                            responses = action.error_responses()
                            self.stats["tx_dropped"] += 1
                        else:
                            frame = from_tx(action, data)
                            if isinstance(frame, str):
                                log.debug("%s: dropping a transmitted frame: %s", self.vif.name, frame)
                                self.stats["tx_dropped"] += 1
                            else:
                                self.stats["tx_packets"] += 1
                                self.stats["tx_gso"] += frame.gso is not None
                                self.vif.switch.deliver(self.vif.port, frame)
                    elif isinstance(action, TxDrop):
                        self.stats["tx_dropped"] += 1
                    elif isinstance(action, TxMulticast):
                        pass              # the switch floods multicast; the filter is the guest's business
                    for r in responses:
                        self.tx.put_response(pack_tx_response(r))
                if self.tx.push_responses():
                    self.host.notify(self.tx_port)
            if not self.tx.final_check_for_requests():
                return

    def _gather(self, pkt: TxPacket) -> bytes | None:
        pages = self.tx_pages.pages({p.gref for p in pkt.pieces})
        if any(p.gref not in pages for p in pkt.pieces):
            return None
        return b"".join(bytes(pages[p.gref][p.offset:p.offset + p.length]) for p in pkt.pieces)

    def _rx(self) -> None:
        """Switch to guest: as many queued frames as the frontend has posted buffers for.

        Each frame is first fitted to what this frontend negotiated
        (segmented, its checksum finished, or dropped); its pieces wait in
        ``fitted`` until the frontend has posted buffers for them.
        """
        port, fitted = self.vif.port, self.fitted
        pushed = False
        while True:
            if not fitted:
                taken = port.take()
                if taken is None:
                    break
                pieces = fit(taken, self.caps)
                if isinstance(pieces, str):
                    log.debug("%s: dropping a frame for the guest: %s", self.vif.name, pieces)
                    self.stats["rx_dropped"] += 1
                    continue
                if taken.gso is not None and len(pieces) > 1:
                    self.stats["rx_segmented"] += 1
                fitted.extend(pieces)
            frame = fitted[0]
            self.posted += [parse_rx_request(raw) for raw in self.rx.take_requests()]
            decision = self.planner.plan(OutgoingPacket(len(frame.data), frame.gso, frame.checksum), self.posted)
            if isinstance(decision, RxShortage):
                # Re-arm req_event: when the frontend posts buffers we hear of it.
                if self.rx.final_check_for_requests():
                    continue
                break
            fitted.popleft()
            if isinstance(decision, RxDrop):
                self.stats["rx_dropped"] += 1
                continue
            self._deliver(decision, frame.data)
            self.stats["rx_gso"] += frame.gso is not None
            self.posted = self.posted[decision.consumed:]
            pushed = True
        if pushed and self.rx.push_responses():
            self.host.notify(self.rx_port)

    def _deliver(self, plan: RxPlan, frame: bytes) -> None:
        pages = self.rx_pages.pages({c.gref for c in plan.copies})
        failed = set()
        for c in plan.copies:
            page = pages.get(c.gref)
            if page is None:
                failed.add(c.slot)
                continue
            page[c.offset:c.offset + c.length] = frame[c.src_offset:c.src_offset + c.length]
        for raw in plan.packed_responses(failed):
            self.rx.put_response(raw)
        self.stats["rx_dropped" if failed else "rx_packets"] += 1


class _Stopped(Exception):
    """The vif was closed from inside its own thread."""


class Vif:
    def __init__(self, host: XenHost, xs: XenstoreClient, path: str, frontend_domid: int, devid: int,
                 switch: LearningSwitch) -> None:
        self.host, self.xs, self.path = host, xs, path
        self.fe, self.devid, self.switch = frontend_domid, devid, switch
        self.name = f"vif{frontend_domid}.{devid}"
        self.port = Port(self.name)
        self.frontend_path = ""
        self.conn: _Connection | None = None
        self._lock = threading.RLock()
        self._removed = False
        self._tokens = (f"fe:{path}", f"be:{path}")

    def probe(self) -> None:
        fe_path = (read_or_none(self.xs, f"{self.path}/frontend") or b"").decode(errors="replace")
        expected = f"/local/domain/{self.fe}/device/vif/{self.devid}"
        if fe_path != expected:
            raise BadFrontend(f"{self.path}/frontend is {fe_path!r}, expected {expected}")
        self.frontend_path = fe_path
        self.switch.attach(self.port)
        with self._lock:
            self._publish()
        self.xs.watch(f"{fe_path}/state", self._tokens[0], self._frontend_changed)
        self.xs.watch(f"{self.path}/state", self._tokens[1], self._own_state_changed)

    def _publish(self) -> None:
        write_nodes(self.xs, self.path, {
            "feature-sg": 1, "feature-rx-copy": 1, "feature-rx-flip": 0, "feature-gso-tcpv4": 1,
            "feature-gso-tcpv6": 1, "feature-ipv6-csum-offload": 1, "feature-split-event-channels": 1,
            "feature-multicast-control": 0})
        switch_state(self.xs, self.path, XenbusState.InitWait)
        log.info("%s: InitWait", self.name)

    def remove(self) -> None:
        with self._lock:
            if self._removed:
                return
            self._removed = True
        for watched, token in zip((f"{self.frontend_path}/state", f"{self.path}/state"), self._tokens):
            try:
                self.xs.unwatch(watched, token)
            except Exception:
                pass
        with self._lock:
            self._disconnect()
        self.switch.detach(self.port)
        self.port.close()
        log.info("%s: removed", self.name)

    def _own_state_changed(self, path: str, token: str) -> None:
        with self._lock:
            if self._removed or read_state(self.xs, self.path) != XenbusState.Initialising:
                return
            log.info("%s: the toolstack re-created the device: starting over", self.name)
            self._disconnect()
            self._publish()
        self._frontend_changed(path, token)

    def _frontend_changed(self, path: str, token: str) -> None:
        with self._lock:
            if self._removed:
                return
            fe = read_state(self.xs, self.frontend_path)
            if fe == XenbusState.Initialised and self.conn is None:
                try:
                    self._connect()
                except (BadFrontend, OSError, HypercallError, GrantError) as e:
                    log.error("%s: cannot connect to d%d: %s", self.name, self.fe, e)
                    self._switch(XenbusState.Closing)
            elif fe in (XenbusState.Closing, XenbusState.Closed, XenbusState.Unknown):
                self._disconnect()
                self._switch(XenbusState.Closing if fe == XenbusState.Closing else XenbusState.Closed)
            elif fe == XenbusState.Initialising and self.conn is not None:
                self._disconnect()
                self._switch(XenbusState.InitWait)

    def _switch(self, state: XenbusState) -> None:
        try:
            switch_state(self.xs, self.path, state)
        except Exception as e:
            log.info("%s: cannot switch to %s: %s", self.name, state.name, e)

    def _connect(self) -> None:
        fe = self.frontend_path
        if read_int(self.xs, f"{fe}/request-rx-copy", 0) != 1:
            raise BadFrontend("the frontend does not request rx-copy (page flipping is not supported)")
        tx_ref, rx_ref = read_int(self.xs, f"{fe}/tx-ring-ref"), read_int(self.xs, f"{fe}/rx-ring-ref")
        single = read_int(self.xs, f"{fe}/event-channel")
        tx_ev = read_int(self.xs, f"{fe}/event-channel-tx", single)
        rx_ev = read_int(self.xs, f"{fe}/event-channel-rx", single)
        if None in (tx_ref, rx_ref, tx_ev, rx_ev):
            raise BadFrontend("tx-ring-ref, rx-ring-ref and event-channel(s) are needed")
        assert tx_ref is not None and rx_ref is not None and tx_ev is not None and rx_ev is not None
        def flag(name: str) -> bool:
            return bool(read_int(self.xs, f"{fe}/{name}", 0))
        sg = flag("feature-sg")
        # The toolstack's mtu node (libxl writes it), as Linux's xen_net_read_mtu; frames up to it are taken.
        mtu = read_int(self.xs, f"{self.path}/mtu", 1500) or 1500
        if not 68 <= mtu <= 65535:
            raise BadFrontend(f"{self.path}/mtu {mtu} out of range")
        # Without sg a frontend takes single pages only: Linux caps such a vif's MTU at ETH_DATA_LEN.
        caps = RxCaps.negotiated(sg, flag("feature-gso-tcpv4"), flag("feature-gso-tcpv6"),
                                 flag("feature-no-csum-offload"), flag("feature-ipv6-csum-offload"),
                                 mtu if sg else min(mtu, 1500))
        conn = _Connection(self, tx_ref, rx_ref, tx_ev, rx_ev, caps, mtu)
        self.conn = conn
        conn.start()
        self._switch(XenbusState.Connected)
        offloads = [n for n, on in (("gso-tcpv4", caps.gso_tcpv4), ("gso-tcpv6", caps.gso_tcpv6),
                                    ("csum", caps.csum_ipv4), ("ipv6-csum", caps.csum_ipv6)) if on]
        log.info("%s: connected to d%d (sg %s, mtu %d, %s event channels, offloads: %s)", self.name, self.fe,
                 "on" if sg else "off", mtu, "split" if tx_ev != rx_ev else "one", ", ".join(offloads) or "none")

    def _disconnect(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.stop()
            log.info("%s: disconnected from d%d", self.name, self.fe)

    def fatal(self, conn: _Connection, why: str) -> None:
        """Called on the vif's own thread: close this vif (only) from another thread."""
        log.error("%s: closing: %s", self.name, why)

        def close() -> None:
            with self._lock:
                if not self._removed and self.conn is conn:
                    self._disconnect()
                    self._switch(XenbusState.Closing)
        threading.Thread(target=close, name=f"close-{self.name}", daemon=True).start()

    def stats(self) -> dict[str, int]:
        conn = self.conn
        return dict(conn.stats) if conn is not None else {}

