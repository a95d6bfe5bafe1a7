"""The management API (toolstack -> broker), sans-IO.

Requests are msgpack maps ``{"op": NAME, ...}`` arriving on the broker's
ZeroMQ ROUTER socket; replies are ``{"ok": true, ...}`` or ``{"ok": false,
"errno": NAME, "error": text}``.  Anything malformed gets an error reply;
nothing a client sends can stop the broker.  The convention, and the
decoding and dispatching, are the supervisor's too: :mod:`.rpc`.
"""

from __future__ import annotations

import errno
import logging
from typing import Any, Protocol

from xdom.domains.abi.hypercall_wire import HypercallError
from xdom.domains.abi.sizes import memory_frames

from .hypervisor import DEFAULT_GRANT_FRAMES, Domain, Hypervisor
from .rpc import Dispatcher, RequestError, error_reply

log = logging.getLogger("xdom.broker")

# The broker reads memory sizes as the topology does (xdom.domains.abi.sizes).
parse_memory = memory_frames


class DomainControl(Protocol):
    """What the management API needs from the I/O layer: the processes."""

    def destroy(self, dom: Domain) -> None: ...
    def pause(self, dom: Domain, paused: bool) -> None: ...
    def hypercall_path(self) -> str: ...


class ManagementError(RequestError):
    """An error reply of the broker's: ``code`` is its errno."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(errno.errorcode.get(code, str(code)), message)
        self.code = code


def _field(req: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    if name not in req:
        if default is ...:
            raise ManagementError(errno.EINVAL, f"missing field {name!r}")
        return default
    value = req[name]
    if kind is int and (type(value) is not int):
        raise ManagementError(errno.EINVAL, f"field {name!r} must be an integer")
    if kind is not int and not isinstance(value, kind):
        raise ManagementError(errno.EINVAL, f"field {name!r} must be {kind.__name__}")
    return value


class Management(Dispatcher):
    def __init__(self, hv: Hypervisor, control: DomainControl) -> None:
        self.hv = hv
        self.control = control
        super().__init__({
            "ping": lambda req: {},
            "create": self.create,
            "destroy": self.destroy,
            "pause": lambda req: self._pause(req, True),
            "unpause": lambda req: self._pause(req, False),
            "restart": self.restart,
            "list": lambda req: {"domains": self.hv.list()},
            "info": lambda req: {"domain": self._domain(req).summary()},
            "stats": self.stats,
            "setup_store": self.setup_store,
        }, server="broker", what="management", log=log)

    def refusal(self, e: Exception) -> dict[str, Any] | None:
        if isinstance(e, HypercallError):
            return {"ok": False, "errno": e.name, "error": e.message}
        if isinstance(e, OSError):
            # Out of descriptors or memory, say: the request failed, the toolstack is told why.
            log.error("management request failed: %s", e)
            return error_reply(e.errno or errno.EIO, f"broker: {e}")
        return None

    def _domain(self, req: dict[str, Any]) -> Domain:
        if "name" in req and "domid" not in req:
            name = _field(req, "name", str)
            for dom in self.hv.domains.values():
                if dom.name == name:
                    return dom
            raise ManagementError(errno.ESRCH, f"no domain named {name!r:.70}")
        domid = _field(req, "domid", int)
        found = self.hv.domains.get(domid)
        if found is None:
            raise ManagementError(errno.ESRCH, f"no domain {domid}")
        return found

    def create(self, req: dict[str, Any]) -> dict[str, Any]:
        name = _field(req, "name", str)
        try:
            frames = parse_memory(req.get("memory", "16M"))
        except ValueError as e:
            raise ManagementError(errno.EINVAL, str(e)) from None
        dom = self.hv.create_domain(
            name, frames, privileged=_field(req, "privileged", bool, False),
            grant_frames=_field(req, "grant_frames", int, DEFAULT_GRANT_FRAMES),
            domid=_field(req, "domid", int, None), uid=_field(req, "uid", int, None),
            evtchn_fd_quota=_field(req, "evtchn_fd_quota", int, None))
        return self._credentials(dom)

    def _credentials(self, dom: Domain) -> dict[str, Any]:
        return {"domid": dom.domid, "name": dom.name, "token": dom.token,
                "hypercall": self.control.hypercall_path(), "nr_frames": dom.nr_frames}

    def setup_store(self, req: dict[str, Any]) -> dict[str, Any]:
        """Give a created domain its xenstore ring and channel (before it starts)."""
        dom = self._domain(req)
        xs_domid = _field(req, "xenstore_domid", int)
        xenstore = self.hv.domains.get(xs_domid)
        if xenstore is None:
            raise ManagementError(errno.ESRCH, f"no xenstore domain {xs_domid}")
        gfn, port = self.hv.setup_store(dom, xenstore)
        return {"domid": dom.domid, "gfn": gfn, "port": port}

    def destroy(self, req: dict[str, Any]) -> dict[str, Any]:
        dom = self._domain(req)
        self.control.destroy(dom)
        self.hv.remove_domain(dom)
        return {"domid": dom.domid}

    def restart(self, req: dict[str, Any]) -> dict[str, Any]:
        """Give a dead domain a new token so a new process can take its domid."""
        dom = self._domain(req)
        uid = _field(req, "uid", int, dom.uid)
        if uid is not None and not 0 <= uid < 1 << 32:
            raise ManagementError(errno.EINVAL, f"uid {uid} out of range")
        self.hv.reset_domain(dom)
        dom.uid = uid
        return self._credentials(dom)

    def _pause(self, req: dict[str, Any], paused: bool) -> dict[str, Any]:
        dom = self._domain(req)
        self.hv.set_paused(dom, paused)
        self.control.pause(dom, paused)
        return {"domid": dom.domid, "state": dom.state}

    def stats(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"domains": len(self.hv.domains),
                "mappings": sum(len(d.maptrack) for d in self.hv.domains.values()),
                "event_channels": sum(len(d.ports.ports) for d in self.hv.domains.values()),
                **getattr(self.control, "process_stats", lambda: {})()}
