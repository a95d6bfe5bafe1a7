"""One virtual network interface on the backend side: its uplink and its queues.

xenbus as Linux ``xen-netback/xenbus.c`` (features with InitWait, connect,
follow the frontend through Closing/Closed), in
:class:`~xdom.backends.xenbus_backend.XenbusBackend` with blkback's vbds,
after :mod:`xdom.domains.xenbus_machine`: connect when the frontend is
Initialised, so a restarted netback never takes a dead predecessor's rings
for fresh ones.

Connecting reads what the frontend negotiated and the toolstack's ``mtu``
and ``rate`` nodes, maps the rings and binds the event channels
(:class:`~.connection.Connection`), and hands the connection to the
netback loop, which moves its packets from then on.  Disconnecting takes
it out of the loop before anything is unmapped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from xdom.domains.abi.hypercall_wire import HypercallError
from xdom.domains.xenbus import parse_int, read_nodes
from xdom.domains.xenhost.base import GrantError, XenHost
from xdom.domains.xenstore import XenstoreClient

from ..kept_mappings import KeptMappings
from ..xenbus_backend import Nodes, XenbusBackend
from .connection import BadFrontend, Connection
from .credit import CreditLimiter, parse_rate_node
from .loop import NetbackLoop
from .offload import RxCaps
from .switch import LearningSwitch, Port, SwitchUplink
from .tap_uplink import TapUplink

__all__ = ["BadFrontend", "Vif"]

log = logging.getLogger("xdom.netback")

# What _connect reads of the frontend besides request-rx-copy and multi-queue-num-queues.
_FLAGS = ("feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6", "feature-no-csum-offload",
          "feature-ipv6-csum-offload")
_QUEUE_NODES = ("tx-ring-ref", "rx-ring-ref", "event-channel", "event-channel-tx", "event-channel-rx")


class Vif(XenbusBackend):
    kind = "vif"
    log = log
    bad_frontend = BadFrontend
    publish_errors = (BadFrontend, OSError)
    connect_errors = (BadFrontend, OSError, HypercallError, GrantError)

    def __init__(self, host: XenHost, xs: XenstoreClient, path: str, frontend_domid: int, devid: int,
                 switch: LearningSwitch | None, loop: NetbackLoop,
                 kept: KeptMappings, take_tap: Callable[[int, int], int | None] | None = None,
                 max_queues: int = 1) -> None:
        """On the built-in ``switch``, or (``switch`` None) bridged through the TAP the toolstack gives us:
        ``take_tap(frontend, devid)`` returns its /dev/net/tun descriptor (None if none came).  ``kept``:
        the bound on kept pages all of netback's vifs share."""
        super().__init__(xs, path, frontend_domid, devid)
        self.host, self.switch, self.loop = host, switch, loop
        self._take_tap = take_tap
        self.uplink: SwitchUplink | TapUplink | None = None
        if switch is not None:
            self.uplink = SwitchUplink(switch, Port(self.name))
            self.port = self.uplink.port
        self.max_queues = max_queues
        self.kept = kept
        self.queues: list[Connection] = []

    def _prepare(self) -> None:
        if self.switch is not None:
            self.switch.attach(self.port)
        else:
            fd = self._take_tap(self.fe, self.devid) if self._take_tap is not None else None
            if fd is None:
                raise BadFrontend("bridge mode, but the toolstack gave no TAP for this vif")
            self.uplink = TapUplink(self.name, fd)
            self.port = self.uplink.port
            log.info("%s: bridged on TAP %s", self.name, self.name)

    def _publish(self) -> Nodes:
        log.info("%s: InitWait", self.name)
        return {"feature-sg": 1, "feature-rx-copy": 1, "feature-rx-flip": 0, "feature-gso-tcpv4": 1,
                "feature-gso-tcpv6": 1, "feature-ipv6-csum-offload": 1, "feature-split-event-channels": 1,
                "feature-multicast-control": 0, "multi-queue-max-queues": self.max_queues}

    def _release(self) -> None:
        if self.uplink is not None:
            if self.switch is not None:
                self.switch.detach(self.port)
            self.uplink.close()

    def _connect(self) -> Nodes:
        """Read what the frontend negotiated, connect each of its queues, hand them to the loop.

        As ``connect`` in Linux's xenbus.c: ``multi-queue-num-queues``
        (absent: 1) must not exceed what we advertised; with one queue the
        ring nodes are in the device directory, with several in
        ``queue-N/``; each queue has one event channel or a split pair.
        """
        fe = self.frontend_path
        # Everything a one-queue frontend publishes, and the toolstack's nodes: one round trip.
        got = read_nodes(self.xs, fe, ["request-rx-copy", "multi-queue-num-queues", *_FLAGS, *_QUEUE_NODES])
        mine = read_nodes(self.xs, self.path, ["mtu", "rate"])
        if parse_int(got["request-rx-copy"], 0) != 1:
            raise BadFrontend("the frontend does not request rx-copy (page flipping is not supported)")
        nqueues = parse_int(got["multi-queue-num-queues"], 1)
        if nqueues is None or not 1 <= nqueues <= self.max_queues:
            raise BadFrontend(f"guest requested {got['multi-queue-num-queues']!r} "
                              f"queues, not between 1 and the maximum of {self.max_queues}")
        rings = [self._queue_nodes(fe, got) if nqueues == 1 else
                 self._queue_nodes(f"{fe}/queue-{q}", read_nodes(self.xs, f"{fe}/queue-{q}", list(_QUEUE_NODES)))
                 for q in range(nqueues)]

        def flag(name: str) -> bool:
            return bool(parse_int(got[name], 0))
        sg = flag("feature-sg")
        # The toolstack's mtu node (libxl writes it), as Linux's xen_net_read_mtu; frames up to it are taken.
        mtu = parse_int(mine["mtu"], 1500) or 1500
        if not 68 <= mtu <= 65535:
            raise BadFrontend(f"{self.path}/mtu {mtu} out of range")
        # Without sg a frontend takes single pages only: Linux caps such a vif's MTU at ETH_DATA_LEN.
        caps = RxCaps.negotiated(sg, flag("feature-gso-tcpv4"), flag("feature-gso-tcpv6"),
                                 flag("feature-no-csum-offload"), flag("feature-ipv6-csum-offload"),
                                 mtu if sg else min(mtu, 1500))
        rate = parse_rate_node(mine["rate"])
        # One credit for the whole vif: Linux gives each queue the full rate, which a user asking for
        # rate=10Mb/s would not expect of a guest with four queues.
        limiter = CreditLimiter(rate[0], rate[1], time.monotonic()) if rate else None
        assert self.uplink is not None             # probe() made it
        uplink = self.uplink
        queues: list[Connection] = []
        try:
            for q, (tx_ref, rx_ref, tx_ev, rx_ev) in enumerate(rings):
                conn = Connection(f"{self.name}-q{q}" if nqueues > 1 else self.name, self.host, self.fe, tx_ref,
                                  rx_ref, tx_ev, rx_ev, caps, mtu, uplink, self._fatal_for(queues), self.kept, limiter,
                                  q)
                queues.append(conn)
            self.port.set_queues(nqueues)
            for conn in queues:
                self.loop.add(conn)
        except BaseException:
            self._drop(queues)
            raise
        self.port.on_put = lambda q: self.loop.kick(queues[q])
        uplink.set_carrier(True)
        self.queues = queues
        offloads = [n for n, on in (("gso-tcpv4", caps.gso_tcpv4), ("gso-tcpv6", caps.gso_tcpv6),
                                    ("csum", caps.csum_ipv4), ("ipv6-csum", caps.csum_ipv6)) if on]
        split = any(r[2] != r[3] for r in rings)
        log.info("%s: connected to d%d (%d queue%s, sg %s, mtu %d, %s event channels, offloads: %s%s)", self.name,
                 self.fe, nqueues, "s" if nqueues > 1 else "", "on" if sg else "off", mtu,
                 "split" if split else "one", ", ".join(offloads) or "none",
                 f", rate {rate[0]} bytes per {rate[1]} us" if rate else "")
        return {}

    @staticmethod
    def _queue_nodes(base: str, got: dict[str, bytes | None]) -> tuple[int, int, int, int]:
        """A queue's ring references and event channels (tx and rx: the same port unless split), from
        its nodes ``got`` (read under ``base``)."""
        tx_ref, rx_ref = parse_int(got["tx-ring-ref"]), parse_int(got["rx-ring-ref"])
        single = parse_int(got["event-channel"])
        tx_ev = parse_int(got["event-channel-tx"], single)
        rx_ev = parse_int(got["event-channel-rx"], single)
        if tx_ref is None or rx_ref is None or tx_ev is None or rx_ev is None:
            raise BadFrontend(f"{base}: tx-ring-ref, rx-ring-ref and event-channel(s) are needed")
        return tx_ref, rx_ref, tx_ev, rx_ev

    def _fatal_for(self, queues: list[Connection]) -> Callable[[str], None]:
        return lambda why: self.fatal(queues, why)

    def _drop(self, queues: list[Connection]) -> None:
        for conn in queues:
            conn.dead = True
            try:
                self.loop.remove(conn)
            except RuntimeError as e:          # the loop is gone (netback is stopping): nothing serves it
                log.debug("%s: %s", self.name, e)
            conn.release()

    def _disconnect(self) -> None:
        queues, self.queues = self.queues, []
        if queues:
            self.port.on_put = None
            if self.uplink is not None:
                self.uplink.set_carrier(False)
            self._drop(queues)
            log.info("%s: disconnected from d%d", self.name, self.fe)

    @property
    def conn(self) -> Connection | None:
        """The first queue's connection, None while disconnected."""
        return self.queues[0] if self.queues else None

    @property
    def served(self) -> bool:
        """Whether the netback loop is moving this vif's packets (every queue's)."""
        queues = self.queues
        return bool(queues) and all(not c.dead and self.loop.serves(c) for c in queues)

    def fatal(self, queues: list[Connection], why: str) -> None:
        """Called on the loop thread by one of ``queues``: close this vif (only) from another thread."""
        for conn in queues:
            conn.dead = True
        self._close_from_ring(lambda: self.queues is queues, why)

    def stats(self) -> dict[str, int]:
        """Every queue's counters, summed."""
        total: dict[str, int] = {}
        for conn in self.queues:
            for k, v in conn.stats.items():
                total[k] = total.get(k, 0) + v
            for pages in (conn.tx_pages, conn.rx_pages):
                total["kept_vmas"] = total.get("kept_vmas", 0) + pages.charged
                total["pages_unkept"] = total.get("pages_unkept", 0) + pages.unkept
        return total
