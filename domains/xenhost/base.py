"""What every xenhost variant offers, and the parts they share."""

from __future__ import annotations

import os
import select
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..abi.event_channel import DOMID_SELF
from ..abi.grant_table import GNTST_NAMES, GNTCOPY_dest_gref, GNTCOPY_source_gref, GNTST_okay
from ..grant_table import GrantTable
from ..hostsys.grant_window import GrantWindow
from ..hostsys.memory import DomainMemory


class GrantError(Exception):
    """A grant operation failed with a GNTST_* status."""

    def __init__(self, status: int, what: str = "") -> None:
        super().__init__(f"{what}: GNTST {status} ({GNTST_NAMES.get(status, '?')})" if what else
                         f"GNTST {status} ({GNTST_NAMES.get(status, '?')})")
        self.status = status


class GrantMapping:
    """A foreign frame mapped into this domain.

    ``view`` is a memoryview of the 4 KiB page (read-only for a read-only
    grant); it is released on unmap, so a stale view raises ValueError
    instead of touching a page that is no longer ours.
    """

    def __init__(self, domid: int, ref: int, readonly: bool, handle: int, view: memoryview,
                 window: GrantWindow | None = None) -> None:
        self.domid = domid
        self.ref = ref
        self.readonly = readonly
        self.handle = handle
        self.view = view
        self.window = window        # the GrantWindow the page was placed in, if any
        self.live = True

    def __repr__(self) -> str:
        return f"<GrantMapping d{self.domid} ref {self.ref} {'ro' if self.readonly else 'rw'} handle {self.handle}>"


@dataclass(frozen=True)
class MapResult:
    status: int
    mapping: GrantMapping | None = None

    @property
    def ok(self) -> bool:
        return self.status == GNTST_okay


class _GnttabCopy(NamedTuple):
    """Xen's ``struct gnttab_copy``, field by field in its order (GNTTAB_COPY packs them as they are)."""
    src_ref_or_gfn: int     # source.u: a grant ref, or a gfn of the caller's own
    src_dom: int            # source.domid: the granter, or DOMID_SELF
    src_offset: int
    dst_ref_or_gfn: int
    dst_dom: int
    dst_offset: int
    length: int             # len
    flags: int              # GNTCOPY_source_gref | GNTCOPY_dest_gref
    status: int             # filled in by Xen; always 0 going in


class CopyOp(_GnttabCopy):
    """One GNTTABOP_copy segment; a side is a grant (``*_domid``, ref) or a local gfn (``*_domid`` None).

    Made as the struct's fields in order, so that a batch is packed with one
    ``starmap`` and no Python per op: packing was a quarter of a copy call's
    cost on the caller's side.  A local side is named DOMID_SELF, as in Xen.
    """
    __slots__ = ()

    def __new__(cls, src_ref_or_gfn: int, src_offset: int, dst_ref_or_gfn: int, dst_offset: int, length: int,
                src_domid: int | None = None, dst_domid: int | None = None) -> CopyOp:
        return tuple.__new__(cls, (
            src_ref_or_gfn, DOMID_SELF if src_domid is None else src_domid, src_offset,
            dst_ref_or_gfn, DOMID_SELF if dst_domid is None else dst_domid, dst_offset, length,
            (0 if src_domid is None else GNTCOPY_source_gref) | (0 if dst_domid is None else GNTCOPY_dest_gref), 0))

    @property
    def src_domid(self) -> int | None:
        """The granter of the source grant; None: the source is a local gfn."""
        return self.src_dom if self.flags & GNTCOPY_source_gref else None

    @property
    def dst_domid(self) -> int | None:
        """The granter of the destination grant; None: the destination is a local gfn."""
        return self.dst_dom if self.flags & GNTCOPY_dest_gref else None


class EventChannels:
    """This domain's ports: fds to wait on and fds to notify through.

    ``notify`` writes the peer's eventfd directly, with no hypervisor in
    the path.  ``wait`` blocks in epoll until some port is pending and
    returns the pending ports, clearing them (Xen's "clear pending, then
    look at the ring" order is the caller's job).
    """

    def __init__(self) -> None:
        self._wait: dict[int, int] = {}
        self._notify: dict[int, int] = {}
        self._port_of: dict[int, int] = {}      # wait fd -> port
        self._epoll = select.epoll()             # epoll directly: selectors costs ~5 us a wait

    def add(self, port: int, wait_fd: int, notify_fd: int = -1) -> None:
        self._wait[port] = wait_fd
        self._port_of[wait_fd] = port
        self._epoll.register(wait_fd, select.EPOLLIN)
        if notify_fd >= 0:
            self._notify[port] = notify_fd

    def remove(self, port: int) -> None:
        fd = self._wait.pop(port, None)
        if fd is not None:
            self._port_of.pop(fd, None)
            self._epoll.unregister(fd)
            os.close(fd)
        nfd = self._notify.pop(port, None)
        if nfd is not None:
            os.close(nfd)

    def fileno(self, port: int) -> int:
        return self._wait[port]

    def notify(self, port: int) -> None:
        try:
            os.eventfd_write(self._notify[port], 1)
        except KeyError:
            raise KeyError(f"port {port} has no peer to notify") from None
        except BlockingIOError:
            pass   # counter saturated: already pending

    def consume(self, port: int) -> int:
        """Clear ``port``'s pending state; returns how many events had arrived."""
        try:
            return os.eventfd_read(self._wait[port])
        except BlockingIOError:
            return 0

    def wait(self, timeout: float | None = None, ports: Iterable[int] | None = None) -> list[int]:
        """Block until a port is pending; return and clear the pending ones.

        ``maxevents`` is the number of ports: left out, CPython allocates
        room for 1023 events on every call, and a round trip is two calls
        measured against a bare eventfd (about 0.1 us a call)."""
        events = self._epoll.poll(-1 if timeout is None else timeout, len(self._port_of) or 1)
        wanted = None if ports is None else set(ports)
        port_of = self._port_of
        ready = []
        for fd, _ in events:
            port = port_of.get(fd)
            if port is None or (wanted is not None and port not in wanted):
                continue
            try:
                if os.eventfd_read(fd):
                    ready.append(port)
            except BlockingIOError:
                pass
        return ready

    def ports(self) -> list[int]:
        return sorted(self._wait)

    def close(self) -> None:
        for port in list(self._wait):
            self.remove(port)
        self._epoll.close()


class XenHost(ABC):
    """The handle drivers hold.  Thread-safe for concurrent callers."""

    domid: int
    name: str
    memory: DomainMemory
    gnttab: GrantTable
    evtchn: EventChannels

    # grants
    @abstractmethod
    def map_grants(self, ops: Sequence[tuple[int, int, bool]], window: GrantWindow | None = None) -> list[MapResult]:
        """Map a batch of (granter domid, ref, readonly); one result per op.

        ``window``: place each page whose reference falls in it there (every op
        then names the window's granter), so that neighbouring references sit
        side by side (:class:`~xdom.domains.hostsys.grant_window.GrantWindow`).
        A variant that cannot place pages maps them as without it."""

    @abstractmethod
    def unmap_grants(self, mappings: Sequence[GrantMapping]) -> list[int]:
        """Unmap a batch; returns GNTST codes.  Views are released first."""

    @abstractmethod
    def copy_grants(self, ops: Sequence[CopyOp]) -> list[int]:
        """Have the hypervisor copy between grants and local frames."""

    def map_grant(self, domid: int, ref: int, readonly: bool = False) -> GrantMapping:
        (res,) = self.map_grants([(domid, ref, readonly)])
        if res.mapping is None:
            raise GrantError(res.status, f"map d{domid} ref {ref}")
        return res.mapping

    def unmap_grant(self, mapping: GrantMapping) -> None:
        (status,) = self.unmap_grants([mapping])
        if status != GNTST_okay:
            raise GrantError(status, f"unmap {mapping!r}")

    # event channels
    @abstractmethod
    def alloc_unbound(self, remote_domid: int) -> int: ...
    @abstractmethod
    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int: ...
    @abstractmethod
    def bind_virq(self, virq: int) -> int: ...
    @abstractmethod
    def close_port(self, port: int) -> None: ...
    @abstractmethod
    def port_status(self, port: int) -> dict[str, int]: ...

    @abstractmethod
    def adopt_port(self, port: int) -> int:
        """Take up a port the toolstack allocated for us (e.g. the xenstore channel)."""

    def notify(self, port: int) -> None:
        self.evtchn.notify(port)

    # domain information
    @abstractmethod
    def get_param(self, index: int) -> int:
        """An HVM_PARAM_* the toolstack set for this domain (KeyError-like HypercallError if unset)."""

    @abstractmethod
    def domain_info(self, domid: int) -> dict[str, Any]:
        """{"domid", "name", "state", "incarnation"} of a domain (privileged domains may ask about others).

        ``incarnation`` counts the domid's restarts: a domain restarted under
        its domid is a different domain to anyone who remembers the old one."""

    # lifecycle
    @abstractmethod
    def shutdown(self, reason: str = "poweroff") -> None:
        """Tell the hypervisor why this domain is about to go away."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> XenHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
