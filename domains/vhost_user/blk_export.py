"""The I/O shell of vhost-user-blk: a thread serving one disk on a unix socket.

The vhost-user loop (``server.VhostUserServer``) runs on a thread of its
own and is the only thread that touches the VM's memory and rings (the rule
``blk``'s data path relies on).  With a block device that lets its caller
reap completions (blkfront's ``completion_fd`` and friends) the same thread
reaps them, so a request goes from the VM's ring to blkfront's ring and back
without a hand-off; completions from other threads come in through an
eventfd the loop polls.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import Any

from ..blockdev import BlockDevice
from .blk import DRAIN_TIMEOUT, VirtioBlkHandler
from .blk_device import blk_device_spec
from .server import VhostUserServer

__all__ = ["DEFAULT_QUEUES", "VhostUserBlkExport"]

log = logging.getLogger("xdom.vhost_user.blk")

#: blkif rings a guest domain asks blkback for, for a VM's disk (blkback offers up to 4, as Linux's);
#: the VM is offered one virtqueue per ring it got.
DEFAULT_QUEUES = 4
_REAPER_METHODS = ("completion_fd", "reap_completions", "attach_reaper", "detach_reaper")


class VhostUserBlkExport:
    """Serve ``dev`` as a vhost-user-blk device on the unix socket ``path`` (QEMU connects to it).

    One thread runs the vhost-user loop; with a device that offers its
    completions to callers (blkfront's ``completion_fd`` and friends) that
    thread is also the device's reaper, so a request goes from the VM's ring
    to blkfront's ring and back on one thread.  ``num_queues`` defaults to
    blkfront's number of rings (one virtqueue per blkif ring); the VMM may use
    fewer.  A stale socket left by a guest domain that died is replaced (the
    VMM, reconnecting, finds the new one); one that someone listens on is
    refused.  ``close()`` drains the rings (bounded) and joins the thread; the
    device is its owner's to close, after.
    """

    def __init__(self, path: str, dev: BlockDevice, *, serial: str | bytes = b"", num_queues: int | None = None,
                 mode: int = 0o600, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        if num_queues is None:
            stats = getattr(dev, "queue_stats", None)
            num_queues = max(1, len(stats())) if callable(stats) else 1
        self.path = path
        self.dev = dev
        self.num_queues = num_queues
        self.handler = VirtioBlkHandler(dev, serial, drain_timeout=drain_timeout)
        self.server = VhostUserServer(path, lambda: blk_device_spec(dev, num_queues), self.handler,
                                      mode=mode)
        self._reaper = all(callable(getattr(dev, m, None)) for m in _REAPER_METHODS)
        self._efd = -1
        self._cfd = -1
        self._attached = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from xdom.domains.hostsys.unix_sockets import remove_stale_socket
        remove_stale_socket(self.path)
        self.server.listen()
        try:
            self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.server.add_reader(self._efd, self._handoffs_ready)
            if self._reaper:
                self._cfd = self.dev.completion_fd()          # type: ignore[attr-defined]
                self.dev.attach_reaper()                      # type: ignore[attr-defined]
                self._attached = True
                self.server.add_reader(self._cfd, self._reap)
            self.handler.notify = self.server.notify_used
            self.handler.wake = self._wake
            self.handler.wait = self._wait
            self._thread = threading.Thread(target=self._run, name=f"vhost-user-blk:{os.path.basename(self.path)}",
                                            daemon=True)
            self._thread.start()
        except BaseException:
            self.close()
            raise
        log.info("vhost-user-blk: %d bytes, %d queue(s) on %s", self.dev.size, self.num_queues, self.path)

    def _run(self) -> None:
        self.handler.adopt_thread()
        try:
            self.server.serve()
        except Exception:
            log.exception("vhost-user-blk on %s: the loop failed", self.path)

    def close(self) -> None:
        self.server.stop()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.handler.adopt_thread()          # the loop is over: this thread finishes what is left
        self.server.close()
        if self._attached:
            self._attached = False
            self.dev.detach_reaper()                          # type: ignore[attr-defined]
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1

    @property
    def connected(self) -> threading.Event:
        return self.server.connected

    def stats(self) -> dict[str, Any]:
        return dict(self.handler.stats)

    # --- on the loop thread ---------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.eventfd_write(self._efd, 1)
        except OSError:
            pass

    def _handoffs_ready(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        self.handler.run_handoffs()

    def _reap(self) -> None:
        self.dev.reap_completions()                           # type: ignore[attr-defined]
        self.handler.flush()

    def _wait(self, timeout: float) -> None:
        """While a ring drains: wait for the device's completions or hand-offs, and run them."""
        fds = [fd for fd in (self._cfd, self._efd) if fd >= 0]
        if not fds:
            time.sleep(min(timeout, 0.01))
            return
        ready, _, _ = select.select(fds, [], [], timeout)
        if self._cfd in ready:
            self._reap()
        if self._efd in ready or self.handler.pending_handoffs:
            self._handoffs_ready()
