"""netfront: a Xen virtual network interface in the guest, bridged to a TAP device in the guest's namespace.

Handshake as Linux ``xen-netfront`` (``talk_to_netback``: rings, event
channel, ``request-rx-copy``, ``feature-sg``, ``feature-rx-notify``), with
xdom's Initialised step (see :mod:`xdom.domains.xenbus`) before Connected.

Buffers: 256 transmit and 256 receive pages of guest memory, granted to
the backend once per connection (transmit read-only, receive read-write)
and reused, so the backend can keep them mapped and the broker is not on
the data path.  A frame read from the TAP device is copied into transmit
pages (one slot per page, the first slot's ``size`` the frame's length,
``NETTXF_more_data`` on all but the last); every free receive page is
posted as a receive request, and a packet the backend writes into them
goes to the TAP device and its pages are posted again.

Offloads: the TAP runs with ``IFF_VNET_HDR``, so TCP super-frames (GSO)
and blank checksums cross it in both directions; they travel on the rings
as ``NETTXF_csum_blank``/``NETRXF_csum_blank`` and a GSO extra-info slot,
as between Linux's netfront and netback (:mod:`.offload` translates, and
finishes in software what the backend did not negotiate).  When the
transmit ring is full the TAP thread waits for room, as a NIC's queue
would, instead of dropping.

A backend that comes back after a crash (InitWait while we are Connected)
gets fresh rings and event channel; frames in flight then are lost, as on
a real link, and TCP retransmits them.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import select
import struct
import threading

from ..abi.netif import (
    NETRXF_csum_blank, NETRXF_data_validated, NETRXF_extra_info, NETRXF_more_data, NETTXF_csum_blank,
    NETTXF_data_validated, NETTXF_extra_info, NETTXF_more_data, RX_RING_SIZE, TX_RING_SIZE,
    XEN_NETIF_EXTRA_TYPE_GSO, GsoInfo, RxRequest, TxRequest, gso_extra, pack_extra_info, pack_rx_request,
    pack_tx_request, parse_extra_info, parse_rx_response, parse_tx_response, rx_shared_ring, tx_shared_ring,
    TX_SLOT_SIZE,
)
from ..abi.ring import FrontRing, RingOverflow
from ..frame_pool import FramePool
from ..packet import VIRTIO_NET_HDR_SIZE, VirtioNetHdr
from ..xenbus import XenbusState, read_int, read_or_none, read_state, switch_state
from ..xenhost.base import XenHost
from ..xenstore import XenstoreClient
from ..vnet import BackendOffloads, TxFrame, from_tap, to_tap

log = logging.getLogger("xdom.netfront")

PAGE_SIZE = 4096
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
# What one read from the TAP can return: a virtio-net header and a GSO super-frame (GSO_MAX_SIZE is
# 64 KiB of payload plus headers; BIG TCP is off unless someone raises gso_max_size).
TAP_READ = VIRTIO_NET_HDR_SIZE + 65536 + 256


class NetfrontError(Exception):
    """The interface could not be connected."""


def open_tap(ifname: str, tun_fd: int | None = None) -> int:
    """Attach to the TAP device the toolstack made for us (``tuntap add ... user UID``: no privilege needed).

    ``tun_fd`` is a ``/dev/net/tun`` descriptor the toolstack opened for us
    (a domain under its own uid may not be able to open the device).  The
    TAP carries a virtio-net header with every frame (``IFF_VNET_HDR``), so
    checksum and segmentation offload can cross it; what the kernel may
    leave to us is set per backend with :func:`set_offloads`.
    """
    fd = tun_fd if tun_fd is not None else os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    os.set_inheritable(fd, False)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    except OSError:
        os.close(fd)
        raise
    return fd


def set_offloads(tap: int, flags: int) -> None:
    """``TUNSETOFFLOAD``: which offloads the guest kernel may hand us unfinished (no privilege needed)."""
    fcntl.ioctl(tap, TUNSETOFFLOAD, flags)


class _Rings:
    """One connection's rings, event channel and granted buffers."""

    def __init__(self, host: XenHost, pool: FramePool, be: int) -> None:
        self.host, self.pool, self.be = host, pool, be
        self.gfns = pool.alloc(2 + TX_RING_SIZE + RX_RING_SIZE)
        self.refs: list[int] = []
        for g in self.gfns[:2]:
            host.memory.frame(g)[:] = bytes(PAGE_SIZE)
        self.tx_gfns = self.gfns[2:2 + TX_RING_SIZE]
        self.rx_gfns = self.gfns[2 + TX_RING_SIZE:]
        grant = host.gnttab.grant_access
        self.tx_ring_ref = grant(be, self.gfns[0])
        self.rx_ring_ref = grant(be, self.gfns[1])
        self.tx_refs = [grant(be, g, readonly=True) for g in self.tx_gfns]
        self.rx_refs = [grant(be, g) for g in self.rx_gfns]
        self.refs = [self.tx_ring_ref, self.rx_ring_ref, *self.tx_refs, *self.rx_refs]
        self.port = host.alloc_unbound(be)
        self.tx = FrontRing(tx_shared_ring([host.memory.frame(self.gfns[0])]))
        self.rx = FrontRing(rx_shared_ring([host.memory.frame(self.gfns[1])]))
        self.tx_free = list(range(TX_RING_SIZE))
        self.rx_partial: list[bytes] = []
        self.rx_first_flags = 0                 # the packet being received: its first slot's flags,
        self.rx_gso: GsoInfo | None = None      # its GSO extra,
        self.rx_in_extras = False               # and whether extra-info slots come next
        # Buffer ids in the order their requests were posted: a response sits in
        # its request's slot, so this (not the response's id, which an
        # extra-info slot does not carry) says whose page it filled.
        self.rx_posted: collections.deque[int] = collections.deque()

    def release(self, deferred: list[tuple[int, int]]) -> None:
        try:
            self.host.close_port(self.port)
        except Exception as e:
            log.warning("closing port %d: %s", self.port, e)
        for ref, gfn in zip(self.refs, self.gfns):
            deferred.append((ref, gfn))


class Netfront:
    """One vif of this guest, moving frames between its rings and a TAP device."""

    def __init__(self, host: XenHost, xs: XenstoreClient, devid: int, ifname: str,
                 pool: FramePool | None = None, tun_fd: int | None = None, offloads: bool = True) -> None:
        """``offloads=False`` is a netfront without checksum offload or GSO (older or non-Linux PV drivers)."""
        self.host, self.xs, self.devid, self.ifname = host, xs, devid, ifname
        self.use_offloads = offloads
        self.pool = pool or FramePool.of(host)
        self.path = f"{xs.get_domain_path(host.domid)}/device/vif/{devid}"
        be = read_or_none(xs, f"{self.path}/backend")
        be_id = read_int(xs, f"{self.path}/backend-id")
        if be is None or be_id is None:
            raise NetfrontError(f"{self.path}: no backend/backend-id: the toolstack has not added this vif")
        self.backend_path, self.backend_domid = be.decode(errors="replace"), be_id
        self.state = XenbusState.Initialising
        self.stats = {"tx_packets": 0, "tx_dropped": 0, "tx_gso": 0, "rx_packets": 0, "rx_errors": 0,
                      "rx_gso": 0, "reconnects": 0}
        self.offloads = BackendOffloads()
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._rings: _Rings | None = None
        self._deferred: list[tuple[int, int]] = []
        self._generation = 0
        self._closing = False
        self._error = ""
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)       # the event thread's
        self._tap_wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)   # the TAP thread's (on close)
        self.tap = open_tap(ifname, tun_fd)
        self._tx_room = threading.Condition(self._lock)
        self._threads = [threading.Thread(target=self._tap_loop, name=f"netfront-tap-{devid}", daemon=True),
                         threading.Thread(target=self._event_loop, name=f"netfront-ev-{devid}", daemon=True)]
        self._token = f"netfront:{devid}"

    # ---- xenbus ---------------------------------------------------------------------

    def connect(self, timeout: float = 30.0) -> None:
        for t in self._threads:
            t.start()
        switch_state(self.xs, self.path, XenbusState.Initialising)
        self.xs.watch(f"{self.backend_path}/state", self._token, self._backend_changed)
        with self._changed:
            if not self._changed.wait_for(lambda: self.state == XenbusState.Connected or self._error, timeout):
                raise NetfrontError(f"vif {self.devid}: backend {self.backend_path} did not connect within "
                                    f"{timeout:g}s (state {read_state(self.xs, self.backend_path).name})")
            if self._error:
                raise NetfrontError(f"vif {self.devid}: {self._error}")

    def _backend_changed(self, path: str, token: str) -> None:
        with self._lock:
            if self._closing:
                return
            be = read_state(self.xs, self.backend_path)
            try:
                if be == XenbusState.InitWait and self.state in (XenbusState.Initialising, XenbusState.Connected):
                    if self.state == XenbusState.Connected:
                        log.warning("vif %d: backend d%d came back: reconnecting", self.devid, self.backend_domid)
                        self.stats["reconnects"] += 1
                    self._teardown()
                    self._talk_to_backend()
                elif be == XenbusState.Connected and self.state == XenbusState.Initialised:
                    set_offloads(self.tap, self.offloads.tun_flags() if self.use_offloads else 0)
                    switch_state(self.xs, self.path, XenbusState.Connected)
                    self.state = XenbusState.Connected
                    self._post_rx()
                    log.info("vif %d: connected as %s", self.devid, self.ifname)
                elif be in (XenbusState.Closing, XenbusState.Closed) and self.state != XenbusState.Closed:
                    log.info("vif %d: backend is %s: closing", self.devid, be.name)
                    self._teardown()
                    switch_state(self.xs, self.path, XenbusState.Closing)
                    switch_state(self.xs, self.path, XenbusState.Closed)
                    self.state = XenbusState.Closed
            except (NetfrontError, OSError) as e:
                self._error = str(e)
                log.error("vif %d: %s", self.devid, e)
            self._changed.notify_all()

    def _talk_to_backend(self) -> None:
        rings = _Rings(self.host, self.pool, self.backend_domid)
        # We take everything a Linux netfront takes: the TAP passes GSO and blank checksums to our kernel.
        on = int(self.use_offloads)
        nodes = {"tx-ring-ref": rings.tx_ring_ref, "rx-ring-ref": rings.rx_ring_ref, "event-channel": rings.port,
                 "request-rx-copy": 1, "feature-rx-notify": 1, "feature-sg": 1, "feature-gso-tcpv4": on,
                 "feature-gso-tcpv6": on, "feature-no-csum-offload": 1 - on, "feature-ipv6-csum-offload": on,
                 "state": int(XenbusState.Initialised)}

        def feature(name: str) -> bool:
            return read_int(self.xs, f"{self.backend_path}/{name}", 0) == 1
        self.offloads = BackendOffloads(feature("feature-sg"), feature("feature-gso-tcpv4"),
                                        feature("feature-gso-tcpv6"), feature("feature-ipv6-csum-offload"))

        def body(tx: int) -> None:
            for key, value in nodes.items():
                self.xs.write(f"{self.path}/{key}", str(value), tx)
        self._rings = rings
        self._generation += 1
        os.eventfd_write(self._wake, 1)
        self.xs.transaction(body)
        self.state = XenbusState.Initialised

    def _teardown(self) -> None:
        rings, self._rings = self._rings, None
        if rings is not None:
            self._generation += 1
            os.eventfd_write(self._wake, 1)
            rings.release(self._deferred)
            self._retry_deferred()
        self._tx_room.notify_all()

    def _retry_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for ref, gfn in deferred:
            if self.host.gnttab.try_end_access(ref):
                self.host.gnttab.release_ref(ref)
                self.pool.free([gfn])
            else:
                self._deferred.append((ref, gfn))

    # ---- transmit: TAP -> ring -------------------------------------------------------

    def _tap_loop(self) -> None:
        poller = select.poll()
        poller.register(self.tap, select.POLLIN)
        poller.register(self._tap_wake, select.POLLIN)
        buf = bytearray(TAP_READ)
        while not self._closing:
            ready = {fd for fd, _ in poller.poll()}
            if self._closing:
                return
            if self.tap not in ready:
                continue
            try:
                n = os.readv(self.tap, [buf])
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EINTR):
                    continue
                log.error("vif %d: reading %s: %s", self.devid, self.ifname, e)
                return
            if n < VIRTIO_NET_HDR_SIZE:
                continue
            frames = from_tap(VirtioNetHdr.parse(buf), bytes(buf[VIRTIO_NET_HDR_SIZE:n]), self.offloads)
            if isinstance(frames, str):
                log.debug("vif %d: dropping a frame from %s: %s", self.devid, self.ifname, frames)
                self.stats["tx_dropped"] += 1
                continue
            self._send(frames)

    def _send(self, frames: list[TxFrame]) -> None:
        """Put frames on the transmit ring, waiting (briefly) for room as a NIC's queue would.

        A link that is down drops; one whose ring stays full for a second
        drops too, rather than stall the guest's TAP for good.
        """
        with self._lock:
            for f in frames:
                nslots = max(1, -(-len(f.data) // PAGE_SIZE))
                needed = nslots + (f.gso is not None)

                def room() -> bool:
                    rings = self._rings
                    return self._closing or self.state != XenbusState.Connected or rings is None or \
                        (len(rings.tx_free) >= nslots and rings.tx.free_requests() >= needed)
                self._tx_room.wait_for(room, 1.0)
                rings = self._rings
                if self.state != XenbusState.Connected or rings is None or len(rings.tx_free) < nslots \
                        or rings.tx.free_requests() < needed:
                    self.stats["tx_dropped"] += 1
                    continue
                self._put_frame(rings, f, nslots)
            rings = self._rings
            if rings is not None and rings.tx.push_requests():
                self.host.notify(rings.port)

    def _put_frame(self, rings: _Rings, f: TxFrame, nslots: int) -> None:
        frame = f.data
        for i in range(nslots):
            chunk = frame[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
            slot = rings.tx_free.pop()
            self.host.memory.frame(rings.tx_gfns[slot])[:len(chunk)] = chunk
            flags = NETTXF_more_data if i < nslots - 1 else 0
            if i == 0:
                flags |= (NETTXF_csum_blank if f.csum_blank else 0) | \
                    (NETTXF_data_validated if f.data_validated else 0) | (NETTXF_extra_info if f.gso else 0)
            size = len(frame) if i == 0 else len(chunk)
            rings.tx.put_request(pack_tx_request(TxRequest(rings.tx_refs[slot], 0, flags, slot, size)))
            if i == 0 and f.gso is not None:
                rings.tx.put_request(pack_extra_info(gso_extra(f.gso.size, f.gso.type), TX_SLOT_SIZE))
        self.stats["tx_packets"] += 1
        self.stats["tx_gso"] += f.gso is not None

    # ---- events: responses and received frames -----------------------------------------

    def _event_loop(self) -> None:
        generation, poller = -1, select.poll()
        while True:
            with self._lock:
                if self._closing:
                    return
                if generation != self._generation:
                    generation = self._generation
                    poller = select.poll()
                    poller.register(self._wake, select.POLLIN)
                    if self._rings is not None:
                        poller.register(self.host.evtchn.fileno(self._rings.port), select.POLLIN)
            poller.poll(1000 if self._deferred else None)
            with self._lock:
                if self._closing:
                    return
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
                if self._deferred:
                    self._retry_deferred()
                if generation != self._generation or self._rings is None:
                    continue
                self.host.evtchn.consume(self._rings.port)
                if self.state == XenbusState.Connected:
                    try:
                        self._reap_tx(self._rings)
                        frames = self._reap_rx(self._rings)
                    except RingOverflow as e:
                        log.error("vif %d: backend broke a ring: %s", self.devid, e)
                        continue
                else:
                    frames = []
            for hdr, frame in frames:
                try:
                    os.writev(self.tap, (hdr, frame))
                except OSError as e:
                    log.debug("vif %d: writing to %s: %s", self.devid, self.ifname, e)

    def _reap_tx(self, rings: _Rings) -> None:
        freed = False
        while True:
            for raw in rings.tx.take_responses():
                rsp = parse_tx_response(raw)
                if 0 <= rsp.id < TX_RING_SIZE and rsp.status != 1 and rsp.id not in rings.tx_free:
                    rings.tx_free.append(rsp.id)
                    freed = True
            if not rings.tx.final_check_for_responses():
                break
        if freed:
            self._tx_room.notify_all()

    def _reap_rx(self, rings: _Rings) -> list[tuple[bytes, bytes]]:
        """Frames the backend wrote, each with its virtio-net header; their pages are posted again at once.

        A packet is its first data slot, the extra-info slots chained after
        it (``XEN_NETIF_EXTRA_FLAG_MORE``; a GSO extra says how to segment),
        then its other data slots.
        """
        frames, repost = [], []
        while True:
            for raw in rings.rx.take_responses():
                if not rings.rx_posted:
                    raise RingOverflow("a receive response without a posted request")
                buf = rings.rx_posted.popleft()
                repost.append(buf)
                if rings.rx_in_extras:                  # an extra-info slot: its buffer was not written
                    extra = parse_extra_info(raw)
                    if extra.type == XEN_NETIF_EXTRA_TYPE_GSO and isinstance(extra.body, GsoInfo):
                        rings.rx_gso = extra.body
                    rings.rx_in_extras = extra.more
                    continue
                rsp = parse_rx_response(raw)
                if not rings.rx_partial:
                    rings.rx_first_flags, rings.rx_gso = rsp.flags, None
                    rings.rx_in_extras = bool(rsp.flags & NETRXF_extra_info)
                ok = rsp.status >= 0 and rsp.offset + rsp.status <= PAGE_SIZE
                if ok:
                    page = self.host.memory.frame(rings.rx_gfns[buf])
                    rings.rx_partial.append(bytes(page[rsp.offset:rsp.offset + rsp.status]))
                else:
                    rings.rx_partial.append(b"")
                    self.stats["rx_errors"] += 1
                if not rsp.flags & NETRXF_more_data:
                    frame = b"".join(rings.rx_partial)
                    if all(rings.rx_partial) and frame:
                        flags = rings.rx_first_flags
                        out = to_tap(frame, bool(flags & NETRXF_csum_blank), bool(flags & NETRXF_data_validated),
                                     rings.rx_gso)
                        if out is None:
                            self.stats["rx_errors"] += 1
                        else:
                            frames.append((out[0].pack(), out[1]))
                            self.stats["rx_packets"] += 1
                            self.stats["rx_gso"] += rings.rx_gso is not None
                    rings.rx_partial = []
            if not rings.rx.final_check_for_responses():
                break
        self._post_rx(repost)
        return frames

    def _post_rx(self, ids: list[int] | None = None) -> None:
        rings = self._rings
        if rings is None:
            return
        for i in (range(RX_RING_SIZE) if ids is None else ids):
            if rings.rx.full():
                break
            rings.rx.put_request(pack_rx_request(RxRequest(i, rings.rx_refs[i])))
            rings.rx_posted.append(i)
        if rings.rx.push_requests():
            self.host.notify(rings.port)

    # ---- closing -------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            try:
                self.xs.unwatch(f"{self.backend_path}/state", self._token)
            except Exception:
                pass
            self._closing = True
            os.eventfd_write(self._wake, 1)
            os.eventfd_write(self._tap_wake, 1)
            self._tx_room.notify_all()
        for t in self._threads:
            if t.is_alive():
                t.join()
        for state in (XenbusState.Closing, XenbusState.Closed):
            try:
                switch_state(self.xs, self.path, state)
            except Exception:
                break
        with self._lock:
            self._teardown()
        os.close(self.tap)
        os.close(self._wake)
        os.close(self._tap_wake)
