"""One virtual block device on the backend side: its xenbus life and its rings.

Follows Linux ``drivers/block/xen-blkback/xenbus.c``: on probe, open the
disk named by ``params``/``mode``, publish the features and go to
InitWait; when the frontend is Initialised (or already Connected: a
restarted backend, see :mod:`xdom.domains.xenbus`), read its rings and
event channels, start one :class:`RingServer` per queue, publish the
disk's size and go Connected; follow the frontend through Closing and
Closed.  Every value read from the frontend's directory is bounded before
use; a frontend that publishes nonsense gets its device closed, nothing
more.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from xdom.domains.abi.blkif import VDISK_READONLY, abi_for
from xdom.domains.device_channel import DeviceChannel
from xdom.domains.xenbus import XenbusState, parse_int, read_nodes, read_or_none, read_state, switch_state
from xdom.domains.hypercall_wire import HypercallError
from xdom.domains.xenhost.base import GrantError, XenHost
from xdom.domains.xenstore import XenstoreClient

from .disk import Disk
from .plan import MAX_INDIRECT_SEGMENTS, DiskGeometry, Refused
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


def backend_action(connected: bool, frontend: XenbusState) -> str:
    """What the backend does when the frontend's state is ``frontend`` (sans-IO core of frontend_changed)."""
    if frontend == XenbusState.Initialised:
        return "none" if connected else "connect"
    if frontend == XenbusState.Connected:
        # Not connected while the frontend says Connected: we are a restarted
        # backend and its rings are the dead one's.  It sees our InitWait and
        # publishes fresh rings (Initialised); connect then.
        return "none"
    if frontend == XenbusState.Closing:
        return "closing"
    if frontend == XenbusState.Closed:
        return "closed"
    if frontend == XenbusState.Initialising:
        return "reset" if connected else "none"
    return "gone" if connected else "none"       # Unknown: the frontend's nodes vanished


class Vbd:
    def __init__(self, host: XenHost, xs: XenstoreClient, path: str, frontend_domid: int, devid: int,
                 features: BackendFeatures, devices: DeviceChannel | None = None) -> None:
        """``devices``: the toolstack's device channel, over which each image comes open (else: by path)."""
        self.host, self.xs, self.path = host, xs, path
        self.devices = devices
        self._disk_serial = -1
        self.fe = frontend_domid
        self.devid = devid
        self.features = features
        self.name = f"vbd{frontend_domid}.{devid}"
        self.frontend_path = ""
        self.disk: Disk | None = None
        self.rings: list[RingServer] = []
        self._lock = threading.RLock()
        self._token = f"fe:{path}"
        self._own_token = f"be:{path}"
        self._removed = False

    # ---- lifecycle ------------------------------------------------------------------

    def probe(self) -> None:
        """Open the disk, publish features, InitWait, and start following the frontend and the toolstack."""
        fe_path = (read_or_none(self.xs, f"{self.path}/frontend") or b"").decode(errors="replace")
        expected = f"/local/domain/{self.fe}/device/vbd/{self.devid}"
        if fe_path != expected:
            raise BadFrontend(f"{self.path}/frontend is {fe_path!r}, expected {expected}")
        self.frontend_path = fe_path
        with self._lock:
            self._open_and_publish()
        self.xs.watch(f"{self.frontend_path}/state", self._token, self._frontend_changed)
        # The toolstack writes our state back to Initialising when it re-creates
        # the device (the frontend's domain restarted): start over then.
        self.xs.watch(f"{self.path}/state", self._own_token, self._own_state_changed)

    def _open_and_publish(self) -> None:
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
        switch_state(self.xs, self.path, XenbusState.InitWait, nodes)      # the features with the state
        log.info("%s: %s (%s, %d sectors of 512, logical %d), InitWait", self.name, params,
                 "ro" if self.disk.read_only else "rw", self.disk.sectors, self.disk.logical_sector_size)

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

    def _own_state_changed(self, path: str, token: str) -> None:
        with self._lock:
            if self._removed or read_state(self.xs, self.path) != XenbusState.Initialising:
                return
            log.info("%s: the toolstack re-created the device: starting over", self.name)
            self._disconnect()
            try:
                self._open_and_publish()
            except (BadFrontend, OSError, ValueError) as e:
                log.error("%s: %s", self.name, e)
                self._switch(XenbusState.Closed)
                return
        self._frontend_changed(path, token)

    def remove(self) -> None:
        """The toolstack removed the device: stop watching, disconnect, close the disk."""
        with self._lock:
            if self._removed:
                return
            self._removed = True
        for watched, token in ((f"{self.frontend_path}/state", self._token), (f"{self.path}/state", self._own_token)):
            try:
                self.xs.unwatch(watched, token)
            except Exception:
                pass
        with self._lock:
            self._disconnect()
            if self.disk is not None:
                self.disk.close()
                self.disk = None
            self._drop_offers(self._disk_serial)
        log.info("%s: removed", self.name)

    # ---- xenbus ---------------------------------------------------------------------

    def _frontend_changed(self, path: str, token: str) -> None:
        with self._lock:
            if self._removed:
                return
            fe_state = read_state(self.xs, self.frontend_path)
            action = backend_action(bool(self.rings), fe_state)
            if action == "connect":
                try:
                    self._connect()
                except (BadFrontend, Refused, OSError, HypercallError, GrantError) as e:
                    log.error("%s: cannot connect to d%d: %s", self.name, self.fe, e)
                    self._disconnect()
                    self._switch(XenbusState.Closing)
            elif action == "closing":
                self._disconnect()
                self._switch(XenbusState.Closing)
            elif action == "closed":
                self._disconnect()
                self._switch(XenbusState.Closed)
            elif action == "reset":
                self._disconnect()
                self._switch(XenbusState.InitWait)
            elif action == "gone":
                self._disconnect()
                self._switch(XenbusState.Closed)

    def _switch(self, state: XenbusState, nodes: dict[str, str | int] | None = None) -> None:
        try:
            switch_state(self.xs, self.path, state, nodes)
        except Exception as e:          # the toolstack may have removed the device meanwhile
            log.info("%s: cannot switch to %s: %s", self.name, state.name, e)

    def _fatal(self, ring: RingServer, why: str) -> None:
        """A ring of this device failed (a hostile or broken frontend): close this device only.

        Called on the failing ring's own thread, which must not wait for the
        device lock (whoever holds it may be joining that very thread), so
        the closing happens on a thread of its own.
        """
        log.error("%s: closing device: %s", self.name, why)

        def close() -> None:
            with self._lock:
                # A ring of an earlier connection: the device has moved on since.
                if not self._removed and ring in self.rings:
                    self._disconnect()
                    self._switch(XenbusState.Closing)
        threading.Thread(target=close, name=f"close-{self.name}", daemon=True).start()

    # ---- connection -----------------------------------------------------------------

    def _connect(self) -> None:
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
                                        f"{self.name}q{q}", self._fatal))
        except BaseException:
            for r in rings:
                r.stop()
            raise
        self.rings = rings
        info = VDISK_READONLY if self.disk.read_only else 0
        for r in rings:
            r.start()
        # The disk's size with the state, in one transaction (the frontend reads it once it sees Connected).
        self._switch(XenbusState.Connected, {"sectors": self.disk.sectors, "info": info,
                                             "sector-size": self.disk.logical_sector_size,
                                             "physical-sector-size": self.disk.physical_sector_size})
        log.info("%s: connected to d%d: %d queue(s), %d-page rings, %s, persistent %s", self.name, self.fe,
                 queues, 1 << order, abi.name, "on" if persistent else "off")

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
