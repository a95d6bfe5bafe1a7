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

from xdom.domains.xenbus import XenbusState, backend_path, frontend_path
from xdom.domains.xenstore import XenstoreClient

from .xsdevice import remove_device, set_perms_under


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
    be = backend_path(cfg.backend_domid, "vbd", cfg.frontend_domid, cfg.devid)
    fe = frontend_path(cfg.frontend_domid, "vbd", cfg.devid)
    be_perms = [f"n{cfg.backend_domid}", f"r{cfg.frontend_domid}"]
    fe_perms = [f"n{cfg.frontend_domid}", f"r{cfg.backend_domid}"]
    be_nodes = {
        "frontend": fe, "frontend-id": cfg.frontend_domid, "online": 1, "removable": 0, "bootable": 1,
        "state": int(XenbusState.Initialising), "dev": cfg.vdev, "type": "phy", "mode": "r" if cfg.read_only else "w",
        "device-type": "disk", "discard-enable": 0 if cfg.read_only else 1, "params": cfg.target,
    }
    if cfg.logical_sector_size:
        be_nodes["logical-sector-size"] = cfg.logical_sector_size
    if cfg.disk_fd is not None:     # blkback opens nothing by path: the toolstack's descriptor, by serial
        be_nodes["xdom-disk-fd"] = cfg.disk_fd
    fe_nodes = {"backend": be, "backend-id": cfg.backend_domid, "state": int(XenbusState.Initialising),
                "virtual-device": cfg.devid, "device-type": "disk"}
    if cfg.export:                  # NBD's a bare path (as before there were kinds), else KIND:PATH
        fe_nodes["xdom-export"] = cfg.export if cfg.export_kind == "nbd" else f"{cfg.export_kind}:{cfg.export}"

    be_dirs = [f"/local/domain/{cfg.backend_domid}/backend", f"/local/domain/{cfg.backend_domid}/backend/vbd",
               f"/local/domain/{cfg.backend_domid}/backend/vbd/{cfg.frontend_domid}"]
    fe_dirs = [f"/local/domain/{cfg.frontend_domid}/device/vbd"]

    def body(tx: int) -> None:
        fe_exists = xs.exists(f"{fe}/state", tx)
        # The directories above the device are dom0's, readable by the domain that
        # lists them.  Set again every time: xenstored ignores a restarted
        # domain's permissions on nodes made before it was introduced again.
        for path, reader in [(d, cfg.backend_domid) for d in be_dirs] + [(d, cfg.frontend_domid) for d in fe_dirs]:
            xs.mkdir(path, tx)
            xs.set_perms(path, ["n0", f"r{reader}"], tx)
        xs.mkdir(be, tx)
        for key, value in be_nodes.items():
            xs.write(f"{be}/{key}", str(value), tx)
        set_perms_under(xs, tx, be, be_perms)
        if not fe_exists:               # a live frontend keeps its nodes across a backend restart
            xs.mkdir(fe, tx)
            xs.set_perms(fe, fe_perms, tx)
            for key, value in fe_nodes.items():
                xs.write(f"{fe}/{key}", str(value), tx)
        # Either side may have restarted under its old domid; xenstored ignores its
        # permissions on nodes older than its new introduction until they are set again.
        set_perms_under(xs, tx, fe, fe_perms)
    xs.transaction(body)


def remove_vbd(xs: XenstoreClient, backend_domid: int, frontend_domid: int, devid: int,
               timeout: float = 10.0) -> bool:
    """Detach (libxl's way): True once the backend reported Closed, False on timeout; the nodes go either way."""
    return remove_device(xs, "vbd", backend_domid, frontend_domid, devid, timeout)
