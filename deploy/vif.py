"""The toolstack's half of a virtual network interface: libxl's xenstore nodes, attach and detach.

``libxl__device_nic_add`` writes, in one transaction, the backend directory
(owned by the backend domain, readable by the frontend) and the frontend
directory (owned by the frontend, readable by the backend), with the nodes
of ``libxl__set_xenstore_nic``; netback and netfront do the rest through
xenbus.  xdom adds ``xdom-ifname`` to the frontend directory: the TAP
device (made by :mod:`xdom.deploy.tap` in the guest's namespace) that the
guest attaches its side of the interface to, or for a VM's NIC
``xdom-export = vhost-user:PATH`` and ``xdom-queues``: the socket the guest
serves it on and its queue pairs.  Detach is libxl's, exactly as
for a vbd: backend ``online = 0`` and ``state = Closing``, wait until the
backend reports Closed, then remove both directories.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdom.domains.xenbus import XenbusState
from xdom.domains.xenstore import XenstoreClient

from .xsdevice import add_device, remove_device

__all__ = ["VifConfig", "add_vif", "remove_vif"]


@dataclass(frozen=True)
class VifConfig:
    backend_domid: int
    frontend_domid: int
    devid: int
    mac: str                                   # the guest's own address ("00:16:3e:..")
    bridge: str | None = None
    mtu: int = 1500
    rate_bytes_per_interval: int | None = None  # libxl's credit: both or neither, as xl computes them
    rate_interval_us: int | None = None
    ifname: str = "eth0"                       # xdom: the guest-side TAP in the guest's namespace
    export: str | None = None                  # xdom: a VM's NIC: the vhost-user socket its guest serves it on
    queues: int = 1                            # xdom: that NIC's queue pairs

    def __post_init__(self) -> None:
        if (self.rate_bytes_per_interval is None) != (self.rate_interval_us is None):
            raise ValueError("rate_bytes_per_interval and rate_interval_us are given together or not at all")


def add_vif(xs: XenstoreClient, cfg: VifConfig) -> None:
    """Create the device's nodes (or write them again for a restarted backend), as libxl does."""
    be_nodes: dict[str, str | int] = {
        "frontend-id": cfg.frontend_domid, "online": 1, "state": int(XenbusState.Initialising),
        "mac": cfg.mac, "handle": cfg.devid, "type": "vif", "mtu": cfg.mtu,
    }
    if cfg.bridge:
        be_nodes["bridge"] = cfg.bridge
    if cfg.rate_interval_us is not None:        # libxl: "%"PRIu64",%"PRIu32, bytes per interval, interval usecs
        be_nodes["rate"] = f"{cfg.rate_bytes_per_interval},{cfg.rate_interval_us}"
    fe_nodes: dict[str, str | int] = {"backend-id": cfg.backend_domid,
                                      "state": int(XenbusState.Initialising), "handle": cfg.devid,
                                      "mac": cfg.mac, "mtu": cfg.mtu, "xdom-ifname": cfg.ifname}
    if cfg.export:                  # served to a VM as vhost-user-net, not on a TAP device
        fe_nodes["xdom-export"] = f"vhost-user:{cfg.export}"
        fe_nodes["xdom-queues"] = cfg.queues

    add_device(xs, "vif", cfg.backend_domid, cfg.frontend_domid, cfg.devid, be_nodes, fe_nodes)


def remove_vif(xs: XenstoreClient, backend_domid: int, frontend_domid: int, devid: int,
               timeout: float = 10.0) -> bool:
    """Detach (libxl's way): True once the backend reported Closed, False on timeout; the nodes go either way."""
    return remove_device(xs, "vif", backend_domid, frontend_domid, devid, timeout)
