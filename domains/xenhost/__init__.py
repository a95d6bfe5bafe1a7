"""The xenhost handle: the one object through which a driver reaches the hypervisor.

Drivers never import the broker.  They get a ``XenHost`` (grants, event
channels, and later xenstore) and the same code runs whichever variant
sits underneath:

* ``BrokerXenHost`` (``connect()``): this domain is its own process and
  talks to the broker over its hypercall socket.  The real, isolated mode.
* ``LocalXenHost`` (``LocalHypervisor().create_domain()``): hypervisor,
  backends and frontends in one process; a mapping is a checked view.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import CopyOp, GrantMapping, MapResult, XenHost
from .broker import BrokerXenHost, connect

if TYPE_CHECKING:
    from .local import LocalHypervisor, LocalXenHost


def __getattr__(name: str) -> Any:
    # The local variant brings the whole hypervisor (xdom.broker) with it: a domain process, which only
    # ever connects, does not import it (a restarted driver domain's start-up is part of its guests' stall).
    if name in ("LocalHypervisor", "LocalXenHost"):
        from . import local
        return getattr(local, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CopyOp", "GrantMapping", "MapResult", "XenHost", "BrokerXenHost", "connect",
           "LocalHypervisor", "LocalXenHost"]
