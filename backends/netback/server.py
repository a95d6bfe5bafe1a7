"""The netback driver domain: finds its vifs in xenstore and switches frames between them.

``python -m xdom.backends.netback [--ready-fd N]``, started by the
supervisor as a domain.  It watches ``/local/domain/<self>/backend/vif``
and keeps one :class:`Vif` per ``<frontend>/<devid>``, all moved by one
:class:`~.loop.NetbackLoop` thread.  Vifs meet either on one built-in
learning switch (no bridge, no TAP, no privilege in this domain) or, with
``--bridge``, on Linux bridges in this domain's network namespace, each vif
a TAP ``vif<domid>.<devid>`` the toolstack made and handed over.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from xdom.domains.device_channel import DeviceChannel
from xdom.domains.xenhost.base import XenHost
from xdom.domains.xenstore import XenstoreClient

from ..device_table import DeviceTable
from ..driver_domain import run_driver_domain
from ..kept_mappings import KeptMappings
from .loop import NetbackLoop
from .switch import LearningSwitch
from .vif import Vif

TAP_TIMEOUT = 30.0       # seconds to wait for the toolstack's TAP descriptor of a bridged vif
MAX_QUEUES = 64
# Linux's xenvif_max_queues defaults to the number of CPUs; more queues than that buy nothing here either.
DEFAULT_MAX_QUEUES = max(1, min(os.cpu_count() or 1, 8))


class NetbackServer:
    """``devices`` set: bridge mode, each vif's TAP descriptor comes over the toolstack's device channel."""

    def __init__(self, host: XenHost, xs: XenstoreClient, devices: DeviceChannel | None = None,
                 max_queues: int = DEFAULT_MAX_QUEUES, kept: KeptMappings | None = None) -> None:
        """``kept``: the bound on the pages all vifs keep mapped (default: from ``vm.max_map_count``)."""
        if not 1 <= max_queues <= MAX_QUEUES:
            raise ValueError(f"max_queues must be between 1 and {MAX_QUEUES}")
        self.host, self.xs = host, xs
        self.max_queues = max_queues
        self.devices = devices
        self.switch = LearningSwitch() if devices is None else None
        self.loop = NetbackLoop()
        self.kept = kept or KeptMappings()
        self.table: DeviceTable[Vif] | None = None

    @property
    def vifs(self) -> dict[tuple[int, int], Vif]:
        return self.table.devices if self.table is not None else {}

    @property
    def root(self) -> str:
        return self.table.root if self.table is not None else ""

    def start(self) -> None:
        self.table = DeviceTable(self.xs, self.host.domid, "vif",
                                 lambda path, fe, dev: Vif(self.host, self.xs, path, fe, dev, self.switch, self.loop,
                                                          self.kept, self._take_tap, self.max_queues),
                                 Vif.publish_errors)
        self.table.start()

    def _take_tap(self, fe: int, devid: int) -> int | None:
        return self.devices.take("tap", (fe, devid), TAP_TIMEOUT) if self.devices is not None else None

    def close(self) -> None:
        if self.table is not None:
            self.table.close()
        self.loop.stop()
        if self.devices is not None:
            self.devices.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xdom.backends.netback", description="xdom's network driver domain")
    p.add_argument("--ready-fd", type=int, default=None, help="write 'ready' to this fd once serving")
    p.add_argument("--bridge", action="store_true",
                   help="bridge mode: each vif is a TAP on a Linux bridge in this domain's namespace, its "
                        "descriptor handed over the toolstack's device channel (else: the built-in switch)")
    p.add_argument("--device-fd", type=int, default=None, metavar="FD", help="the toolstack's device channel")
    p.add_argument("--max-queues", type=int, default=DEFAULT_MAX_QUEUES, metavar="N",
                   help=f"multi-queue-max-queues offered to frontends (Linux: max_queues; default {DEFAULT_MAX_QUEUES})")
    args = p.parse_args(argv)
    if not 1 <= args.max_queues <= MAX_QUEUES:
        p.error(f"--max-queues must be between 1 and {MAX_QUEUES}")
    if args.bridge and args.device_fd is None:
        p.error("--bridge needs --device-fd: the toolstack hands the TAP descriptors over it")
    # netback opens no file once it runs (a bridged vif's TAP comes open over the device channel).
    return run_driver_domain("netback", args.ready_fd,
                             lambda host, xs: NetbackServer(host, xs, DeviceChannel(args.device_fd) if args.bridge
                                                            else None, args.max_queues))
