"""The in-process xenhost: hypervisor, backends and frontends in one process.

For unit tests, for embedding, and as the baseline that isolation is
measured against.  The same ``Hypervisor`` as the broker's does every check
(pins, GNTST codes, port states); only the transport differs: a mapping is
a checked memoryview of the granter's frame instead of an fd, and event
channel fds are dup'd instead of sent by SCM_RIGHTS.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

from xdom.broker.frames import LocalFrames
from xdom.broker.hypervisor import Domain, Hypervisor

from ..abi.grant_table import GNTST_okay
from ..abi.hypercall_wire import MAX_BATCH, SHUTDOWN_REASONS, copy_columns, pack_copy_segments
from ..abi.sizes import memory_frames
from ..grant_table import GrantTable
from ..hostsys.grant_window import GrantWindow
from ..hostsys.memory import DomainMemory
from .base import CopyOp, EventChannels, GrantMapping, MapResult, XenHost


class LocalHypervisor:
    """A hypervisor living in this process; domains are objects."""

    def __init__(self) -> None:
        self.hv = Hypervisor()
        self.lock = threading.RLock()

    def create_domain(self, name: str, memory: int | str = "4M", privileged: bool = False,
                      grant_frames: int = 32) -> LocalXenHost:
        with self.lock:
            dom = self.hv.create_domain(name, memory_frames(memory), privileged, grant_frames)
            return LocalXenHost(self, dom)

    def close(self) -> None:
        with self.lock:
            self.hv.close()


class LocalXenHost(XenHost):
    def __init__(self, host: LocalHypervisor, dom: Domain) -> None:
        self._host = host
        self._dom = dom
        self.domid = dom.domid
        self.name = dom.name
        self.privileged = dom.privileged
        self.memory = DomainMemory(dom.nr_frames)
        self.gnttab = GrantTable(dom.gnttab.domain_fd(), dom.gnttab.nr_frames)
        self.evtchn = EventChannels()
        with host.lock:
            host.hv.attach(dom, LocalFrames(self.memory), os.getpid())
        self._maps: dict[int, GrantMapping] = {}

    def map_grants(self, ops: Sequence[tuple[int, int, bool]], window: GrantWindow | None = None) -> list[MapResult]:
        # In process a grant's view is the granter's own memory: nothing to place (``window`` unused).
        with self._host.lock:
            results = self._host.hv.grant_map(self._dom, [(d, r, bool(ro)) for d, r, ro in ops])
        out = []
        for (domid, ref, ro), res in zip(ops, results):
            if res.status != GNTST_okay:
                out.append(MapResult(res.status))
                continue
            assert isinstance(res.frame, memoryview)
            m = GrantMapping(domid, ref, bool(ro), res.handle, res.frame)
            self._maps[res.handle] = m
            out.append(MapResult(res.status, m))
        return out

    def unmap_grants(self, mappings: Sequence[GrantMapping]) -> list[int]:
        for m in mappings:
            if self._maps.pop(m.handle, None) is not None and m.live:
                m.view.release()
                m.live = False
        with self._host.lock:
            return self._host.hv.grant_unmap(self._dom, [m.handle for m in mappings])

    def copy_grants(self, ops: Sequence[CopyOp]) -> list[int]:
        with self._host.lock:
            out: list[int] = []
            for start in range(0, len(ops), MAX_BATCH):
                # The broker's wire, packed and unpacked: both variants refuse the same values.
                batch = copy_columns(pack_copy_segments(ops[start:start + MAX_BATCH]))
                out.extend(self._host.hv.grant_copy(self._dom, batch))
            return out

    def _bound(self, port: Any, with_notify: bool = True) -> int:
        self.evtchn.add(port.port, os.dup(port.wait_fd), os.dup(port.notify_fd) if with_notify else -1)
        return port.port

    def alloc_unbound(self, remote_domid: int) -> int:
        with self._host.lock:
            return self._bound(self._host.hv.evtchn_alloc_unbound(self._dom, remote_domid))

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        with self._host.lock:
            return self._bound(self._host.hv.evtchn_bind_interdomain(self._dom, remote_domid, remote_port))

    def bind_virq(self, virq: int) -> int:
        with self._host.lock:
            return self._bound(self._host.hv.evtchn_bind_virq(self._dom, virq), with_notify=False)

    def adopt_port(self, port: int) -> int:
        with self._host.lock:
            p = self._host.hv.port_fds(self._dom, port)
            return self._bound(p, with_notify=p.notify_fd >= 0)

    def get_param(self, index: int) -> int:
        with self._host.lock:
            return self._host.hv.get_param(self._dom, index)

    def close_port(self, port: int) -> None:
        with self._host.lock:
            self._host.hv.evtchn_close(self._dom, port)
        self.evtchn.remove(port)

    def port_status(self, port: int) -> dict[str, int]:
        with self._host.lock:
            return self._host.hv.evtchn_status(self._dom, port)

    def domain_info(self, domid: int) -> dict[str, Any]:
        with self._host.lock:
            d = self._host.hv.domain(domid)
            return {"domid": d.domid, "name": d.name, "state": d.state, "incarnation": d.restarts}

    def shutdown(self, reason: str = "poweroff") -> None:
        if reason not in SHUTDOWN_REASONS:
            raise ValueError(f"reason must be one of {SHUTDOWN_REASONS}")
        self._dom.shutdown_reason = reason

    def close(self) -> None:
        """The domain dies: the hypervisor releases what it held."""
        with self._host.lock:
            self._host.hv.domain_died(self._dom, self._dom.shutdown_reason)
        for m in self._maps.values():
            m.view.release()
            m.live = False
        self._maps.clear()
        self.evtchn.close()
        self.gnttab.close()
        # The memory stays: other in-process domains may still hold checked
        # views of it, and unmapping under them would fault the process.
