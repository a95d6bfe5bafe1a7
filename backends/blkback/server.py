"""The blkback driver domain: finds its vbds in xenstore and serves each one.

``python -m xdom.backends.blkback [--ready-fd N]``, started by the
supervisor as a domain (its credentials in the environment).  It watches
``/local/domain/<self>/backend/vbd``, where the toolstack adds and removes
devices, and keeps one :class:`Vbd` per ``<frontend>/<devid>`` there.

Started again after a crash (same domid), it finds the devices the
toolstack wrote again; frontends that are still Connected see it go
InitWait, set up fresh rings and issue again what was in flight (see
:mod:`xdom.domains.blkfront.device`).

The options are Linux xen-blkback's module parameters (``max_ring_page_order``,
``max_queues``, ``feature_persistent``) plus the indirect-segment limit, so an
operator can run a backend that offers less, and so the frontend's handling
of a backend that comes back with fewer features can be tested for real.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from xdom.domains.device_channel import DeviceChannel
from xdom.domains.xenhost.base import XenHost
from xdom.domains.xenstore import XenstoreClient

from ..device_table import DeviceTable
from ..driver_domain import run_driver_domain
from ..kept_mappings import KeptMappings
from .ring_loop import RingLoops
from .vbd import BackendFeatures, Vbd


class BlkbackServer:
    def __init__(self, host: XenHost, xs: XenstoreClient, features: BackendFeatures | None = None,
                 devices: DeviceChannel | None = None, kept: KeptMappings | None = None,
                 loops: RingLoops | None = None) -> None:
        """``kept``, ``loops``: the bound on persistent grants and the threads serving the rings
        (defaults: from ``vm.max_map_count``; a loop per CPU)."""
        self.host, self.xs = host, xs
        self.features = features or BackendFeatures()
        self.devices = devices          # the toolstack's device channel: images come open over it
        self.kept = kept or KeptMappings()      # persistent grants, bounded across every ring
        self.loops = loops or RingLoops()       # the threads that serve every ring
        self.table: DeviceTable[Vbd] | None = None

    @property
    def vbds(self) -> dict[tuple[int, int], Vbd]:
        return self.table.devices if self.table is not None else {}

    @property
    def root(self) -> str:
        return self.table.root if self.table is not None else ""

    def start(self) -> None:
        self.table = DeviceTable(self.xs, self.host.domid, "vbd",
                                 lambda path, fe, dev: Vbd(self.host, self.xs, path, fe, dev, self.features,
                                                           self.kept, self.loops, self.devices),
                                 Vbd.publish_errors)
        self.table.start()

    def close(self) -> None:
        if self.table is not None:
            self.table.close()
        self.loops.stop()
        if self.devices is not None:
            self.devices.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xdom.backends.blkback", description="xdom's block driver domain")
    p.add_argument("--ready-fd", type=int, default=None, help="write 'ready' to this fd once serving")
    p.add_argument("--device-fd", type=int, default=None, metavar="FD",
                   help="the toolstack's device channel: each disk image comes over it, opened (else blkback "
                        "opens the vbd's params path itself)")
    defaults = BackendFeatures()
    p.add_argument("--max-ring-page-order", type=int, choices=range(0, defaults.max_ring_page_order + 1),
                   default=defaults.max_ring_page_order, metavar="0..4",
                   help="largest ring a frontend may use: 2^N pages (Linux's max_ring_page_order)")
    p.add_argument("--max-queues", type=int, choices=range(1, defaults.max_queues + 1),
                   default=defaults.max_queues, metavar="1..4", help="queues (rings) per device a frontend may use")
    p.add_argument("--no-persistent", dest="persistent", action="store_false",
                   help="do not offer feature-persistent (Linux's feature_persistent=0)")
    p.add_argument("--max-indirect-segments", type=int, choices=range(0, defaults.max_indirect_segments + 1),
                   default=defaults.max_indirect_segments, metavar="0..256",
                   help="segments per indirect request; 0 offers no indirect requests")
    args = p.parse_args(argv)
    features = BackendFeatures(max_ring_page_order=args.max_ring_page_order, max_queues=args.max_queues,
                               persistent=args.persistent, max_indirect_segments=args.max_indirect_segments)
    # Without the device channel blkback opens the images the toolstack names, by path: reading and
    # writing files is left to DAC then.
    return run_driver_domain("blkback", args.ready_fd,
                             lambda host, xs: BlkbackServer(host, xs, features, DeviceChannel(args.device_fd)
                                                            if args.device_fd is not None else None),
                             open_by_path=args.device_fd is None)
