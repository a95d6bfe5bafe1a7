"""The netback driver domain: finds its vifs in xenstore and switches frames between them.

``python -m xdom.backends.netback [--ready-fd N]``, started by the
supervisor as a domain.  It watches ``/local/domain/<self>/backend/vif``
and keeps one :class:`Vif` per ``<frontend>/<devid>``, all ports of one
built-in learning switch (no bridge, no TAP, no privilege in this domain),
all moved by one :class:`~.loop.NetbackLoop` thread.
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

from .loop import NetbackLoop
from .switch import LearningSwitch
from .vif import BadFrontend, Vif

log = logging.getLogger("xdom.netback")


class NetbackServer:
    def __init__(self, host: XenHost, xs: XenstoreClient) -> None:
        self.host, self.xs = host, xs
        self.switch = LearningSwitch()
        self.loop = NetbackLoop()
        self.table: DeviceTable[Vif] | None = None

    @property
    def vifs(self) -> dict[tuple[int, int], Vif]:
        return self.table.devices if self.table is not None else {}

    @property
    def root(self) -> str:
        return self.table.root if self.table is not None else ""

    def start(self) -> None:
        self.table = DeviceTable(self.xs, self.host.domid, "vif",
                                 lambda path, fe, dev: Vif(self.host, self.xs, path, fe, dev, self.switch, self.loop),
                                 (BadFrontend, OSError))
        self.table.start()

    def close(self) -> None:
        if self.table is not None:
            self.table.close()
        self.loop.stop()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xdom.backends.netback", description="xdom's network driver domain")
    p.add_argument("--ready-fd", type=int, default=None, help="write 'ready' to this fd once serving")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("XDOM_LOG_LEVEL", "info").upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    faulthandler.register(signal.SIGUSR1)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    host = connect()
    xs = XenstoreClient.ring(host)
    server = NetbackServer(host, xs)
    try:
        server.start()
        log.info("netback is domain %d, serving %s", host.domid, server.root)
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)
        while not stop.wait(3600):
            pass
        host.shutdown("poweroff")
        return 0
    finally:
        server.close()
        xs.close()
        host.close()
