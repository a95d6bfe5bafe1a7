"""The xenhost handle: the one object through which a driver reaches the hypervisor.

Drivers never import the broker.  They get a ``XenHost`` (grants, event
channels, and later xenstore) and the same code runs whichever variant
sits underneath:

* ``BrokerXenHost`` (``connect()``): this domain is its own process and
  talks to the broker over its hypercall socket.  The real, isolated mode.
* ``LocalXenHost`` (``LocalHypervisor().create_domain()``): hypervisor,
  backends and frontends in one process; a mapping is a checked view.
"""

from .base import CopyOp, GrantMapping, MapResult, XenHost
from .broker import BrokerXenHost, connect
from .local import LocalHypervisor, LocalXenHost

__all__ = ["CopyOp", "GrantMapping", "MapResult", "XenHost", "BrokerXenHost", "connect",
           "LocalHypervisor", "LocalXenHost"]
