"""netfront: a Xen virtual network interface in the guest, bridged to a packet port (a TAP, a VM's virtio-net).

Handshake as Linux ``xen-netfront`` (``talk_to_netback``: rings, event
channels, ``request-rx-copy``, ``feature-sg``, ``feature-rx-notify``, the
offload features, ``multi-queue-num-queues`` with ``queue-N/`` directories
when the backend offers several queues, ``event-channel-tx``/``-rx`` when
it offers split event channels), with xdom's Initialised step (see
:mod:`xdom.domains.xenbus`) before Connected.

Buffers: per queue, 256 transmit and 256 receive pages of guest memory,
granted to the backend once per connection (transmit read-only, receive
read-write) and reused, so the backend can keep them mapped and the broker
is not on the data path.  A frame read from the port is copied into transmit
pages (one slot per page, the first slot's ``size`` the frame's length,
``NETTXF_more_data`` on all but the last); every free receive page is
posted as a receive request, and a packet the backend writes into them
goes to the port and its pages are posted again.

The port (:mod:`.port`) is what the frames come from and go to: a TAP
device in the guest's namespace (:class:`~.port.TapPort`, the default) or
a VM's NIC served over vhost-user
(:class:`xdom.domains.vhost_user.net.VhostUserNetPort`).  Either speaks
virtio-net headers, so netfront does not care which.

Offloads: the TAP runs with ``IFF_VNET_HDR``, so TCP super-frames (GSO)
and blank checksums cross it in both directions; they travel on the rings
as ``NETTXF_csum_blank``/``NETRXF_csum_blank`` and a GSO extra-info slot,
as between Linux's netfront and netback (:mod:`xdom.domains.vnet`
translates, and finishes in software what the backend did not negotiate).

One thread moves the data: it reads the port in batches (a budget per
pass), spreads frames over the queues by flow (a flow stays on one ring,
in order), pushes each ring once per pass and notifies only when the
backend asked (``req_event``); received frames go to the port after the
rings are released.  When a ring is full it stops reading the port until
the backend's responses make room, as a NIC's queue would, instead of
dropping.

A backend that comes back after a crash (InitWait while we are Connected)
gets fresh rings and event channel.  Nothing the guest sent is lost for
it: a frame still on the old transmit ring without its responses is put
on the new one first (the dead backend may have forwarded it already: a
duplicate, which TCP and the rest tolerate as on any link, where a loss
would cost a retransmission timeout of 200 ms or more), and from the
backend's death until it is Connected again frames wait in the port (the
TAP's own queue) instead of being dropped.  Only a link that was never up,
or that the backend closed, drops what it is given.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import threading
from typing import Any

from ..abi.ring import RingOverflow
from ..abi.xs_wire import XenstoreError, XsType
from ..frame_pool import FramePool, OutOfFrames
from ..grant_table import GrantTableFull
from ..packet import flow_hash
from ..tun import READ_SIZE
from ..vnet import BackendOffloads, TxFrame, from_tap
from ..xenbus import XenbusState, parse_int, read_nodes
from ..xenbus_frontend import XenbusFrontend
from ..xenhost.base import XenHost
from ..xenstore import XenstoreClient
from .port import PacketPort, TapPort, open_tap
from .rings import QueueRings

__all__ = ["Netfront", "NetfrontError", "open_tap", "PacketPort", "TapPort"]

log = logging.getLogger("xdom.netfront")


TAP_READ = READ_SIZE
TAP_BUDGET = 64            # frames read from the port per pass before the rings are pushed
MAX_QUEUES = 16
# What netfront reads of the backend's offer (and the value of an absent or malformed node).
_OFFER = {"multi-queue-max-queues": 1, "feature-split-event-channels": 0, "feature-sg": 0, "feature-gso-tcpv4": 0,
          "feature-gso-tcpv6": 0, "feature-ipv6-csum-offload": 0}


class NetfrontError(Exception):
    """The interface could not be connected."""


class Netfront(XenbusFrontend):
    """One vif of this guest, moving frames between its rings and a packet port (by default a TAP device)."""

    kind = "vif"
    driver = "netfront"
    log = log
    error = NetfrontError
    step_errors = (NetfrontError, OSError, GrantTableFull, OutOfFrames)

    def __init__(self, host: XenHost, xs: XenstoreClient, devid: int, ifname: str | None = None,
                 pool: FramePool | None = None, tun_fd: int | None = None, offloads: bool = True,
                 max_queues: int = 1, port: PacketPort | None = None) -> None:
        """``offloads=False`` is a netfront without checksum offload or GSO (older or non-Linux PV drivers).

        ``max_queues`` caps the queues asked for (the backend's
        ``multi-queue-max-queues`` caps it too).  One is the default here,
        unlike Linux's one per CPU: one Python thread serves every queue, so
        more rings only cost memory (2 MiB of granted pages each).

        The frames go to ``port`` when given (netfront owns it once this
        returns, and closes it in :meth:`close`), else to the TAP device
        ``ifname`` (through ``tun_fd`` when given).
        """
        if not 1 <= max_queues <= MAX_QUEUES:
            raise ValueError(f"max_queues must be between 1 and {MAX_QUEUES}")
        if port is None and not ifname:
            raise ValueError("netfront needs a TAP device name or a packet port")
        self.host, self.xs, self.devid = host, xs, devid
        self.ifname = ifname if port is None or ifname else port.name
        self.use_offloads = offloads
        self.max_queues = max_queues
        self.pool = pool or FramePool.of(host)
        super().__init__(xs, host.domid, devid)
        self.stats = {"tx_packets": 0, "tx_dropped": 0, "tx_gso": 0, "rx_packets": 0, "rx_errors": 0,
                      "rx_gso": 0, "reconnects": 0, "tx_resent": 0, "broken_rings": 0}
        self.offloads = BackendOffloads()
        self._queues: list[QueueRings] = []
        self._deferred: list[tuple[int, int]] = []
        self._generation = 0
        self._resend: list[TxFrame] = []        # from a dead backend's rings, for the next ones
        self._was_up = False                    # connected once: frames wait for a reconnect, not dropped
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)       # the data thread's
        if port is None:
            assert ifname is not None           # checked above
            port = TapPort(ifname, tun_fd)
        self.port: PacketPort = port
        self._thread = threading.Thread(target=self._data_loop, name=f"netfront-{devid}", daemon=True)

    @property
    def queues(self) -> int:
        """How many queues the current connection has (0 while disconnected)."""
        return len(self._queues)

    # ---- xenbus ---------------------------------------------------------------------

    # The xenbus life is XenbusFrontend's (domains/xenbus_frontend.py); these are its netfront parts.

    def _backend_came_back(self) -> None:
        log.warning("vif %d: backend d%d came back: reconnecting", self.devid, self.backend_domid)
        self.stats["reconnects"] += 1
        self._teardown()

    def _read_backend(self) -> None:
        self.port.set_offloads(self.offloads.tun_flags() if self.use_offloads else 0)

    def _on_connected(self) -> None:
        self._was_up = True
        for q in self._queues:
            q.post_rx()
        self._kick()
        log.info("vif %d: connected as %s (%d queue%s)", self.devid, self.ifname, len(self._queues),
                 "s" if len(self._queues) > 1 else "")

    def _backend_closing(self) -> None:
        self._teardown()
        self._was_up = False
        self._resend.clear()

    def _talk_to_backend(self, state: XenbusState) -> None:
        offer = read_nodes(self.xs, self.backend_path, list(_OFFER))           # one round trip
        feature = {k: parse_int(offer[k], default) for k, default in _OFFER.items()}
        nqueues = max(1, min(self.max_queues, feature["multi-queue-max-queues"] or 1))
        split = feature["feature-split-event-channels"] == 1
        queues: list[QueueRings] = []
        try:
            for i in range(nqueues):
                queues.append(QueueRings(self.host, self.pool, self.backend_domid, i, split, self._deferred))
        except BaseException:
            for q in queues:
                q.release(self._deferred)
            raise
        # We take everything a Linux netfront takes: the port passes GSO and blank checksums on.
        on = int(self.use_offloads)
        nodes: dict[str, Any] = {
            "request-rx-copy": 1, "feature-rx-notify": 1, "feature-sg": 1, "feature-gso-tcpv4": on,
            "feature-gso-tcpv6": on, "feature-no-csum-offload": 1 - on, "feature-ipv6-csum-offload": on}
        if nqueues == 1:
            nodes |= queues[0].nodes()
        else:
            nodes["multi-queue-num-queues"] = nqueues
            for q in queues:
                nodes |= {f"queue-{q.index}/{k}": v for k, v in q.nodes().items()}
        self.offloads = BackendOffloads(feature["feature-sg"] == 1, feature["feature-gso-tcpv4"] == 1,
                                        feature["feature-gso-tcpv6"] == 1, feature["feature-ipv6-csum-offload"] == 1)
        stale = [(XsType.XS_RM, f"{self.path}/{key}".encode() + b"\0") for key in (
            "multi-queue-num-queues", "event-channel", "event-channel-tx", "event-channel-rx", "tx-ring-ref",
            "rx-ring-ref", *(f"queue-{i}" for i in range(MAX_QUEUES))) if key not in nodes]
        writes = [(XsType.XS_WRITE, f"{self.path}/{key}".encode() + b"\0" + str(value).encode())
                  for key, value in {**nodes, "state": int(state)}.items()]

        def body(tx: int) -> None:
            # What an earlier connection wrote and this one does not must not mislead the new backend (an
            # absent one is ENOENT, and fine).  Removals and writes go in one round trip.
            replies = self.xs.requests(stale + writes, tx)
            for r in replies[:len(stale)]:
                if isinstance(r, XenstoreError) and r.name == "EAGAIN":
                    raise r
            for r in replies[len(stale):]:
                if isinstance(r, XenstoreError):
                    raise r
        self._queues = queues
        self._generation += 1
        self._kick()
        self.xs.transaction(body)

    def _teardown(self, reap: bool = True) -> None:
        """Let the rings go; ``reap``: take the transmit answers the backend gave first (not from a ring
        it broke)."""
        queues, self._queues = self._queues, []
        if queues:
            self._generation += 1
            self._kick()
            for q in queues:
                if reap:
                    q.reap_tx()
                self._resend += q.unanswered()
                q.release(self._deferred)
            self._retry_deferred()

    def _retry_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for ref, gfn in deferred:
            if self.host.gnttab.try_end_access(ref):
                self.host.gnttab.release_ref(ref)
                self.pool.free([gfn])
            else:
                self._deferred.append((ref, gfn))

    def _kick(self) -> None:
        os.eventfd_write(self._wake, 1)

    # ---- the data thread -----------------------------------------------------------------

    def _data_loop(self) -> None:
        """Rings and port, both ways, one pass per wake-up (see the module docstring)."""
        epoll = select.epoll()
        epoll.register(self._wake, select.EPOLLIN)
        port = self.port
        port_fd, control_fd = port.fileno(), port.control_fileno()
        if control_fd is not None:
            epoll.register(control_fd, select.EPOLLIN)
        watched: set[int] = set()
        port_watched = False
        generation = -1
        pending: collections.deque[TxFrame] = collections.deque()    # read from the port, waiting for room
        try:
            while True:
                with self._lock:
                    if self._closing:
                        return
                    if generation != self._generation:
                        generation = self._generation
                        for fd in watched:
                            try:
                                epoll.unregister(fd)
                            except OSError:       # closed with its port: already out of the epoll set
                                pass
                        watched = {self.host.evtchn.fileno(p) for q in self._queues for p in q.ports}
                        for fd in watched:
                            epoll.register(fd, select.EPOLLIN)
                    # Read the port while frames can go somewhere: to a ring with room, or (link down) nowhere.
                    want_port = not pending
                    if want_port != port_watched:
                        if want_port:
                            epoll.register(port_fd, select.EPOLLIN)
                        else:
                            epoll.unregister(port_fd)
                        port_watched = want_port
                    timeout: float = 1.0 if self._deferred else -1
                interval = port.poll_interval()
                if interval is not None:
                    timeout = interval if timeout < 0 else min(timeout, interval)
                ready = {fd for fd, _ in epoll.poll(timeout)}
                port_ready = port_fd in ready
                if control_fd is not None and (control_fd in ready or interval is not None):
                    try:
                        # outside the lock: the port's own work, never netfront's state
                        port_ready = port.control() or port_ready
                    except Exception:
                        log.exception("vif %d: %s: control error", self.devid, port.name)
                out: list[tuple[bytes, bytes]] = []
                with self._lock:
                    if self._closing:
                        return
                    if self._wake in ready:
                        try:
                            os.eventfd_read(self._wake)
                        except BlockingIOError:
                            pass
                    if self._deferred:
                        self._retry_deferred()
                    if generation != self._generation:
                        continue
                    try:
                        out = self._pass(port_ready, pending)
                    except RingOverflow as e:
                        # As Linux's netfront ("disabled for further use"): the rings go, once; the
                        # interface waits for the backend to come back with new ones (a restart).
                        log.error("vif %d: backend d%d broke a ring: %s; the vif waits for it to come back",
                                  self.devid, self.backend_domid, e)
                        self.stats["broken_rings"] += 1
                        self._teardown(reap=False)
                    except Exception:       # a bug must not leave the interface dead for good
                        log.exception("vif %d: data path error", self.devid)
                if out:
                    try:
                        port.write_batch(out)
                    except Exception:
                        log.exception("vif %d: %s: write error", self.devid, port.name)
        finally:
            epoll.close()

    def _pass(self, port_ready: bool, pending: collections.deque[TxFrame]) -> list[tuple[bytes, bytes]]:
        """One pass under the lock: responses in, the port's frames out; the frames received are returned."""
        queues = self._queues
        connected = self.state == XenbusState.Connected and bool(queues)
        out: list[tuple[bytes, bytes]] = []
        if connected:
            for q in queues:
                for p in q.ports:
                    self.host.evtchn.consume(p)
                q.reap_tx(want_event=False)
                out += q.reap_rx(self.stats)
        if port_ready or pending:
            budget = TAP_BUDGET
            offloads, stats, read = self.offloads, self.stats, self.port.read_batch
            while budget and len(pending) < TAP_BUDGET:
                batch = read(min(budget, TAP_BUDGET - len(pending)))
                if not batch:
                    break
                budget -= len(batch)
                for hdr, data in batch:
                    frames = from_tap(hdr, data, offloads)
                    if isinstance(frames, str):
                        log.debug("vif %d: dropping a frame from %s: %s", self.devid, self.ifname, frames)
                        stats["tx_dropped"] += 1
                        continue
                    pending.extend(frames)
        if self._resend:
            pending.extendleft(reversed(self._resend))      # sent before anything read since
            self.stats["tx_resent"] += len(self._resend)
            self._resend = []
        if not connected:
            if not self._was_up or self._closing:
                self.stats["tx_dropped"] += len(pending)   # a link that is down drops, as a NIC does
                pending.clear()
            return out                                      # a backend coming back: they wait for it
        n = len(queues)
        while pending:
            f = pending[0]
            q = queues[0] if n == 1 else queues[flow_hash(f.data) % n]
            if not q.room(f):
                break               # wait for responses; a frame is never reordered past another
            q.put(f, self.stats)
            pending.popleft()
        for q in queues:
            q.push_tx()
        if pending and any([q.want_tx_event() for q in queues]):
            os.eventfd_write(self._wake, 1)     # answers came before the event was asked for: pass again
        return out

    # ---- closing -------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._stop_watching()
            self._closing = True
            self._kick()
        if self._thread.is_alive():
            self._thread.join()
        if self._say(XenbusState.Closing):
            self._say(XenbusState.Closed)
        with self._lock:
            self._teardown()
        self.port.close()
        os.close(self._wake)
