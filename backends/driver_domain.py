"""How a driver domain runs, from its start to its poweroff: what blkback and netback do the same way.

A driver domain is a process the supervisor starts as a domain (its
credentials in the environment).  In this order, because each step rests
on the one before: the broker (the domain's hypercalls), Landlock for its
files while the process still has one thread (``restrict_files`` must come
before the first thread), the xenstore ring, its devices (the server's
:class:`~xdom.backends.device_table.DeviceTable` starts watching), then
seccomp on every thread and readiness on ``--ready-fd`` (the line says how
it is confined).  It runs until SIGTERM or SIGINT, then powers off: its
domain says ``poweroff`` to the broker before the process exits.  SIGUSR1
dumps every thread's stack to the log.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Protocol

from xdom.domains import confinement, startup
from xdom.domains.xenhost import connect
from xdom.domains.xenhost.base import XenHost
from xdom.domains.xenstore import XenstoreClient

__all__ = ["DriverServer", "run_driver_domain"]


class DriverServer(Protocol):
    """What a driver domain serves its devices with (BlkbackServer, NetbackServer)."""

    @property
    def root(self) -> str: ...
    def start(self) -> None: ...
    def close(self) -> None: ...


def run_driver_domain(kind: str, ready_fd: int | None, make_server: Callable[[XenHost, XenstoreClient], DriverServer],
                      *, open_by_path: bool = False) -> int:
    """Run driver domain ``kind`` (its confinement's name, and its log's) until it is told to stop; 0.

    ``open_by_path``: its Landlock lets it open files by path (blkback
    without the toolstack's device channel opens the images itself).
    """
    log = logging.getLogger(f"xdom.{kind}")
    logging.basicConfig(level=os.environ.get("XDOM_LOG_LEVEL", "info").upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    faulthandler.register(signal.SIGUSR1)        # `kill -USR1` dumps every thread's stack to the log
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    startup.mark("imports")
    host = connect()
    startup.mark("broker")
    confinement.restrict_files(kind, open_by_path=open_by_path)     # before the first thread
    xs = XenstoreClient.ring(host)
    startup.mark("xenstore")
    server = make_server(host, xs)
    try:
        server.start()
        startup.mark("devices")
        log.info("%s is domain %d, serving %s (%s)", kind, host.domid, server.root, startup.summary())
        confinement.lock_down(kind)
        if ready_fd is not None:
            os.write(ready_fd, confinement.ready_message())
            os.close(ready_fd)
        while not stop.wait(3600):
            pass
        log.info("%s stopping", kind)
        host.shutdown("poweroff")
        return 0
    finally:
        server.close()
        xs.close()
        host.close()
