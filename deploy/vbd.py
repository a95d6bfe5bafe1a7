"""The toolstack's half of a virtual block device: libxl's xenstore nodes, attach and detach.

``libxl__device_disk_add`` writes, in one transaction, the backend
directory (owned by the backend domain, readable by the frontend) and the
frontend directory (owned by the frontend, readable by the backend); the
drivers do the rest through xenbus.  Detach is libxl's too: set the
backend ``online = 0`` and ``state = Closing``, wait until the backend
reports Closed (the frontend has let go), then remove both directories.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdom.domains.xenbus import XenbusState
from xdom.domains.xenstore import XenstoreClient

from .xsdevice import add_device, remove_device


@dataclass(frozen=True)
class VbdConfig:
    backend_domid: int
    frontend_domid: int
    devid: int
    vdev: str
    target: str
    read_only: bool = False
    logical_sector_size: int | None = None
    export: str | None = None        # xdom: the unix socket the guest serves the disk on
    export_kind: str = "nbd"         # xdom: over NBD (for host programs) or "vhost-user" (to its VM)
    disk_fd: int | None = None       # xdom: the serial of the image's descriptor on blkback's device channel


def add_vbd(xs: XenstoreClient, cfg: VbdConfig) -> None:
    """Create the device's nodes (or write them again for a restarted backend), as libxl does."""
    be_nodes: dict[str, str | int] = {
        "frontend-id": cfg.frontend_domid, "online": 1, "removable": 0, "bootable": 1,
        "state": int(XenbusState.Initialising), "dev": cfg.vdev, "type": "phy", "mode": "r" if cfg.read_only else "w",
        "device-type": "disk", "discard-enable": 0 if cfg.read_only else 1, "params": cfg.target,
    }
    if cfg.logical_sector_size:
        be_nodes["logical-sector-size"] = cfg.logical_sector_size
    if cfg.disk_fd is not None:     # blkback opens nothing by path: the toolstack's descriptor, by serial
        be_nodes["xdom-disk-fd"] = cfg.disk_fd
    fe_nodes: dict[str, str | int] = {"backend-id": cfg.backend_domid, "state": int(XenbusState.Initialising),
                                      "virtual-device": cfg.devid, "device-type": "disk"}
    if cfg.export:                  # NBD's a bare path (as before there were kinds), else KIND:PATH
        fe_nodes["xdom-export"] = cfg.export if cfg.export_kind == "nbd" else f"{cfg.export_kind}:{cfg.export}"

    add_device(xs, "vbd", cfg.backend_domid, cfg.frontend_domid, cfg.devid, be_nodes, fe_nodes)


def remove_vbd(xs: XenstoreClient, backend_domid: int, frontend_domid: int, devid: int,
               timeout: float = 10.0) -> bool:
    """Detach (libxl's way): True once the backend reported Closed, False on timeout; the nodes go either way."""
    return remove_device(xs, "vbd", backend_domid, frontend_domid, devid, timeout)
