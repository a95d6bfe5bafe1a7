"""The netback driver domain: finds its vifs in xenstore and switches frames between them.

``python -m xdom.backends.netback [--ready-fd N]``, started by the
supervisor as a domain.  It watches ``/local/domain/<self>/backend/vif``
and keeps one :class:`Vif` per ``<frontend>/<devid>``, all ports of one
built-in learning switch (no bridge, no TAP, no privilege in this domain).
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

from .switch import LearningSwitch
from .vif import BadFrontend, Vif

log = logging.getLogger("xdom.netback")


class NetbackServer:
    def __init__(self, host: XenHost, xs: XenstoreClient) -> None:
        self.host, self.xs = host, xs
        self.switch = LearningSwitch()
        self.vifs: dict[tuple[int, int], Vif] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.root = ""

    def start(self) -> None:
        self.root = f"{self.xs.get_domain_path(self.host.domid)}/backend/vif"
        self.xs.watch(self.root, "vif", self._changed)

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
        for key in [k for k in self.vifs if k not in present]:
            self.vifs.pop(key).remove()
        for fe, dev in sorted(present - set(self.vifs)):
            vif = Vif(self.host, self.xs, f"{self.root}/{fe}/{dev}", fe, dev, self.switch)
            try:
                vif.probe()
            except (BadFrontend, OSError, XenstoreError) as e:
                log.error("vif %d/%d: %s", fe, dev, e)
                vif.remove()
            self.vifs[(fe, dev)] = vif

    def close(self) -> None:
        with self._lock:
            self._closed = True
            vifs, self.vifs = list(self.vifs.values()), {}
        try:
            self.xs.unwatch(self.root, "vif")
        except Exception:
            pass
        for vif in vifs:
            vif.remove()


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
