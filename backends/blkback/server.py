"""The blkback driver domain: finds its vbds in xenstore and serves each one.

``python -m xdom.backends.blkback [--ready-fd N]``, started by the
supervisor as a domain (its credentials in the environment).  It watches
``/local/domain/<self>/backend/vbd``, where the toolstack adds and removes
devices, and keeps one :class:`Vbd` per ``<frontend>/<devid>`` there.

Started again after a crash (same domid), it finds the devices the
toolstack wrote again, and frontends that are still Connected get their
rings picked up where the dead process left them (see
:mod:`xdom.domains.xenbus`).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import threading
from typing import Sequence

from xdom.domains.xenhost import connect
from xdom.domains.xenhost.base import XenHost
from xdom.domains.xenstore import XenstoreClient, XenstoreError

from .vbd import BackendFeatures, BadFrontend, Vbd

log = logging.getLogger("xdom.blkback")


class BlkbackServer:
    def __init__(self, host: XenHost, xs: XenstoreClient, features: BackendFeatures | None = None) -> None:
        self.host, self.xs = host, xs
        self.features = features or BackendFeatures()
        self.vbds: dict[tuple[int, int], Vbd] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.root = ""

    def start(self) -> None:
        """Watch the backend directory (the watch fires once at once: existing devices are probed)."""
        self.root = f"{self.xs.get_domain_path(self.host.domid)}/backend/vbd"
        self.xs.watch(self.root, "vbd", self._changed)

    def _changed(self, path: str, token: str) -> None:
        with self._lock:
            if not self._closed:
                self._rescan()

    def _list(self, path: str) -> list[int]:
        try:
            return [int(n) for n in self.xs.directory(path) if n.isdigit() and len(n) < 10]
        except XenstoreError:
            return []

    def _rescan(self) -> None:
        present = {(fe, dev) for fe in self._list(self.root) for dev in self._list(f"{self.root}/{fe}")}
        for key in [k for k in self.vbds if k not in present]:
            self.vbds.pop(key).remove()
        for fe, dev in sorted(present - set(self.vbds)):
            vbd = Vbd(self.host, self.xs, f"{self.root}/{fe}/{dev}", fe, dev, self.features)
            try:
                vbd.probe()
            except (BadFrontend, OSError, ValueError, XenstoreError) as e:
                # Half-written by the toolstack, or a disk we cannot open: say so where xl looks.
                log.error("vbd %d/%d: %s", fe, dev, e)
                try:
                    self.xs.write(f"{self.root}/{fe}/{dev}/hotplug-error", str(e))
                    self.xs.write(f"{self.root}/{fe}/{dev}/hotplug-status", "error")
                except XenstoreError:
                    pass
                vbd.remove()
            self.vbds[(fe, dev)] = vbd

    def close(self) -> None:
        with self._lock:
            self._closed = True
            vbds, self.vbds = list(self.vbds.values()), {}
        try:
            self.xs.unwatch(self.root, "vbd")
        except Exception:
            pass
        for vbd in vbds:
            vbd.remove()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xdom.backends.blkback", description="xdom's block driver domain")
    p.add_argument("--ready-fd", type=int, default=None, help="write 'ready' to this fd once serving")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("XDOM_LOG_LEVEL", "info").upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    faulthandler.register(signal.SIGUSR1)        # `kill -USR1` dumps every thread's stack to the log
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    host = connect()
    xs = XenstoreClient.ring(host)
    server = BlkbackServer(host, xs)
    try:
        server.start()
        log.info("blkback is domain %d, serving %s", host.domid, server.root)
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)
        while not stop.wait(3600):
            pass
        log.info("blkback stopping")
        host.shutdown("poweroff")
        return 0
    finally:
        server.close()
        xs.close()
        host.close()
