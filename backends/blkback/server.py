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
from xdom.domains.xenstore import XenstoreClient

from ..device_table import DeviceTable

from .vbd import BackendFeatures, BadFrontend, Vbd

log = logging.getLogger("xdom.blkback")


class BlkbackServer:
    def __init__(self, host: XenHost, xs: XenstoreClient, features: BackendFeatures | None = None) -> None:
        self.host, self.xs = host, xs
        self.features = features or BackendFeatures()
        self.table: DeviceTable[Vbd] | None = None

    @property
    def vbds(self) -> dict[tuple[int, int], Vbd]:
        return self.table.devices if self.table is not None else {}

    @property
    def root(self) -> str:
        return self.table.root if self.table is not None else ""

    def start(self) -> None:
        self.table = DeviceTable(self.xs, self.host.domid, "vbd",
                                 lambda path, fe, dev: Vbd(self.host, self.xs, path, fe, dev, self.features),
                                 (BadFrontend, OSError, ValueError))
        self.table.start()

    def close(self) -> None:
        if self.table is not None:
            self.table.close()


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
