"""One virtual block device on the backend side: its disk and its rings.

Follows Linux ``drivers/block/xen-blkback/xenbus.c``; the xenbus life (the
states, when to connect and disconnect) is
:class:`~xdom.backends.xenbus_backend.XenbusBackend`'s.  On probe, open the
disk named by ``params``/``mode`` and publish the features with InitWait;
on connecting (the frontend is Initialised), read its rings and event
channels, start one :class:`RingServer` per queue and publish the disk's
size with Connected.  Every value read from the frontend's directory is
bounded before use; a frontend that publishes nonsense gets its device
closed, nothing more.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from xdom.domains.abi.blkif import VDISK_READONLY, abi_for
from xdom.domains.abi.hypercall_wire import HypercallError
from xdom.domains.device_channel import DeviceChannel
from xdom.domains.xenbus import parse_int, read_nodes
from xdom.domains.xenhost.base import GrantError, XenHost
from xdom.domains.xenstore import XenstoreClient

from ..kept_mappings import KeptMappings
from ..xenbus_backend import Nodes, XenbusBackend
from .disk import Disk
from .plan import MAX_INDIRECT_SEGMENTS, DiskGeometry, Refused
from .ring_loop import RingLoops
from .ring_server import RingServer

log = logging.getLogger("xdom.blkback")

DISK_TIMEOUT = 10.0     # seconds for an image's descriptor to follow its nodes (it is sent before them)


@dataclass(frozen=True)
class BackendFeatures:
    """What this backend offers every frontend (Linux's module parameters)."""
    max_ring_page_order: int = 4
    max_queues: int = 4
    persistent: bool = True
    max_indirect_segments: int = MAX_INDIRECT_SEGMENTS


class BadFrontend(Exception):
    """The frontend's nodes do not describe a usable connection."""


class Vbd(XenbusBackend):
    kind = "vbd"
    log = log
    bad_frontend = BadFrontend
    publish_errors = (BadFrontend, OSError, ValueError)
    connect_errors = (BadFrontend, Refused, OSError, HypercallError, GrantError)

    def __init__(self, host: XenHost, xs: XenstoreClient, path: str, frontend_domid: int, devid: int,
                 features: BackendFeatures, kept: KeptMappings, loops: RingLoops,
                 devices: DeviceChannel | None = None) -> None:
        """``devices``: the toolstack's device channel, over which each image comes open (else: by path);
        ``kept``: the server's bound on persistent grants, which every ring of every vbd shares;
        ``loops``: the server's threads that serve the rings."""
        super().__init__(xs, path, frontend_domid, devid)
        self.host = host
        self.kept = kept
        self.loops = loops
        self.devices = devices
        self._disk_serial = -1
        self.features = features
        self.disk: Disk | None = None
        self.rings: list[RingServer] = []

    # ---- the disk ---------------------------------------------------------------------

    def _publish(self) -> Nodes:
        """Open the disk (again: the toolstack may name another); its features, for InitWait."""
        got = read_nodes(self.xs, self.path, ["params", "mode", "logical-sector-size", "xdom-disk-fd"])
        params = (got["params"] or b"").decode(errors="replace")
        mode = (got["mode"] or b"w").decode(errors="replace")
        lss = parse_int(got["logical-sector-size"], None)
        if not params:
            raise BadFrontend(f"{self.path}/params is missing")
        if self.disk is not None:
            self.disk.close()
            self.disk = None
        self.disk = Disk(params, read_only=mode != "w", logical_sector_size=lss,
                         fd=self._take_disk(params, parse_int(got["xdom-disk-fd"], None)))
        nodes: dict[str, str | int] = {
            # Nothing to flush on a disk without a volatile cache: Linux offers neither then.
            "feature-flush-cache": int(self.disk.write_cache),
            "feature-barrier": int(self.disk.write_cache),
            "feature-discard": 0 if self.disk.read_only else 1,
            "discard-granularity": self.disk.discard_granularity,
            "discard-alignment": 0,
            "discard-secure": 0,
            "feature-persistent": int(self.features.persistent),
            "max-ring-page-order": self.features.max_ring_page_order,
            "multi-queue-max-queues": self.features.max_queues,
            "sector-size": self.disk.logical_sector_size,
            "physical-sector-size": self.disk.physical_sector_size,
        }
        if self.features.max_indirect_segments:      # absent: no indirect requests (as a backend without them)
            nodes["feature-max-indirect-segments"] = self.features.max_indirect_segments
        log.info("%s: %s (%s, %d sectors of 512, logical %d), InitWait", self.name, params,
                 "ro" if self.disk.read_only else "rw", self.disk.sectors, self.disk.logical_sector_size)
        return nodes

    def _take_disk(self, params: str, serial: int | None) -> int | None:
        """The image the toolstack opened for this device (its offer named by ``xdom-disk-fd``, whose value
        is ``serial``), or None without a device channel (blkback started by hand opens ``params`` itself)."""
        if self.devices is None:
            return None
        if serial is None:
            raise BadFrontend(f"{self.path}/xdom-disk-fd is missing: the toolstack could not open {params}")
        fd = self.devices.take("disk", (self.fe, self.devid, serial), DISK_TIMEOUT)
        if fd is None:
            raise BadFrontend(f"the toolstack's descriptor of {params} did not come within {DISK_TIMEOUT:g}s")
        self._disk_serial = serial
        self._drop_offers(serial)
        return fd

    def _drop_offers(self, upto: int) -> None:
        """Close offers for this device older than the one taken (a re-creation superseded them)."""
        if self.devices is not None:
            fe, devid = self.fe, self.devid
            self.devices.discard("disk", lambda k: isinstance(k, tuple) and len(k) == 3 and k[:2] == (fe, devid)
                                 and k[2] <= upto)

    def _release(self) -> None:
        with self._lock:
            if self.disk is not None:
                self.disk.close()
                self.disk = None
            self._drop_offers(self._disk_serial)

    def _fatal(self, ring: RingServer, why: str) -> None:
        """A ring of this device failed: close the device, unless it has moved on to another connection."""
        self._close_from_ring(lambda: ring in self.rings, why)

    # ---- connection -----------------------------------------------------------------

    def _connect(self) -> Nodes:
        assert self.disk is not None
        fe = self.frontend_path
        # What a one-queue, one-page frontend (the usual one) publishes, in one round trip.
        got = read_nodes(self.xs, fe, ["protocol", "multi-queue-num-queues", "ring-page-order", "feature-persistent",
                                       "ring-ref", "event-channel"])
        protocol = (got["protocol"] or b"").decode(errors="replace")
        try:
            abi = abi_for(protocol)
        except ValueError as e:
            raise BadFrontend(str(e)) from None
        queues = parse_int(got["multi-queue-num-queues"], 1)
        if queues is None or not 1 <= queues <= self.features.max_queues:
            raise BadFrontend(f"multi-queue-num-queues {queues} (max {self.features.max_queues})")
        order = parse_int(got["ring-page-order"], 0)
        if order is None or order > self.features.max_ring_page_order:
            raise BadFrontend(f"ring-page-order {order} (max {self.features.max_ring_page_order})")
        persistent = bool(parse_int(got["feature-persistent"], 0)) and self.features.persistent
        geometry = DiskGeometry(sectors=self.disk.sectors, logical_sector_size=self.disk.logical_sector_size,
                                read_only=self.disk.read_only, discard=not self.disk.read_only,
                                max_indirect_segments=self.features.max_indirect_segments)
        rings = []
        try:
            for q in range(queues):
                qdir = fe if queues == 1 else f"{fe}/queue-{q}"
                if queues == 1 and order == 0:
                    refs, port = self._ring_refs(qdir, order, {"ring-ref": got["ring-ref"]}), \
                        parse_int(got["event-channel"])
                else:
                    names = ["event-channel", *(["ring-ref"] if order == 0 else
                                                [f"ring-ref{i}" for i in range(1 << order)])]
                    more = read_nodes(self.xs, qdir, names)
                    refs, port = self._ring_refs(qdir, order, more), parse_int(more["event-channel"])
                if port is None:
                    raise BadFrontend(f"{qdir}/event-channel missing")
                rings.append(RingServer(self.host, self.fe, refs, port, abi, self.disk, geometry, persistent,
                                        f"{self.name}q{q}", self._fatal, self.kept))
        except BaseException:
            for r in rings:
                r.stop()
            raise
        self.rings = rings
        info = VDISK_READONLY if self.disk.read_only else 0
        for r in rings:
            r.start(self.loops)
        log.info("%s: connected to d%d: %d queue(s), %d-page rings, %s, persistent %s", self.name, self.fe,
                 queues, 1 << order, abi.name, "on" if persistent else "off")
        # The disk's size with the state, in one transaction (the frontend reads it once it sees Connected).
        return {"sectors": self.disk.sectors, "info": info, "sector-size": self.disk.logical_sector_size,
                "physical-sector-size": self.disk.physical_sector_size}

    def _ring_refs(self, qdir: str, order: int, got: dict[str, bytes | None]) -> list[int]:
        names = ["ring-ref"] if order == 0 else [f"ring-ref{i}" for i in range(1 << order)]
        refs = []
        for name in names:
            ref = parse_int(got.get(name))
            if ref is None or ref >= 1 << 32:
                raise BadFrontend(f"{qdir}/{name} missing or not a grant reference")
            refs.append(ref)
        return refs

    def _disconnect(self) -> None:
        rings, self.rings = self.rings, []
        for r in rings:
            r.stop()
        if rings:
            log.info("%s: disconnected from d%d", self.name, self.fe)

    def stats(self) -> dict[str, int]:
        """The connected rings' counters, summed (see :attr:`RingServer.stats`)."""
        total: dict[str, int] = {}
        for r in self.rings:
            for k, v in r.stats.items():
                total[k] = total.get(k, 0) + v
        return total

    def queue_stats(self) -> list[dict[str, int]]:
        """Each connected queue's counters, in queue order: shows how work spread over the queues."""
        return [dict(r.stats) for r in self.rings]
