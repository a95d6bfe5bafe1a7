"""The hypervisor proper: the domain table, grant operations, event channels.

No sockets here.  The broker server (server.py) and the in-process xenhost
variant both drive this object; it is told who the caller is, never asked.
Every operation that a domain can invoke either returns Xen status codes or
raises ``HypercallError`` with the errno Xen would give; anything else
escaping is a bug.
"""

from __future__ import annotations

import errno
import os
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from xdom.domains.abi.event_channel import (
    DOMID_FIRST_RESERVED,
    DOMID_SELF,
    GLOBAL_VIRQS,
    NR_VIRQS,
    VIRQ_DOM_EXC,
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_unbound,
    EVTCHNSTAT_virq,
)
from xdom.domains.abi.grant_table import (
    GNTTAB_RESERVED_XENSTORE,
    PAGE_SIZE,
    GNTST_bad_domain,
    GNTST_bad_handle,
    GNTST_bad_page,
    GNTST_general_error,
    GNTST_no_space,
    GNTST_okay,
)
from xdom.domains.abi.hvm_params import HVM_PARAM_STORE_EVTCHN, HVM_PARAM_STORE_PFN
from xdom.domains.abi.hypercall_wire import CopyColumns, HypercallError

from .evtchn import MAX_PORTS, EventPair, Port, PortTable, new_virq_fd, signal
from .fd_budget import FdBudget
from .frames import BadFrame, CopyFrames, FrameFds, FrameId, FrameSource, NoFrameSpace
from .gnttab import BrokerGrantTable
from .grant_copy import grant_copy

MAX_MAPTRACK = 65536          # live mappings per domain (Xen's default maptrack size is similar)
# Descriptors the broker keeps for one domain's event channels (2 per unbound
# port it allocates, 1 per virq): 255 channels, as many as a guest with a dozen
# multi-queue devices needs; a privileged domain (xenstored) gets more.
DEFAULT_EVTCHN_FDS = 512
PRIVILEGED_EVTCHN_FDS = 4096
DOMAIN_FDS = 4                # per domain: its connection, pidfd, grant table memfd and its mapping
DEFAULT_GRANT_FRAMES = 32     # 16384 references
MAX_GRANT_FRAMES = 256

# Domain states, as `xdom list` shows them.
CREATED, RUNNING, PAUSED, SHUTDOWN, CRASHED = "created", "running", "paused", "shutdown", "crashed"


@dataclass
class Mapping:
    """One maptrack entry: a grant some domain has mapped."""
    granter: Domain
    table: BrokerGrantTable
    ref: int
    readonly: bool
    frame_id: FrameId
    gfn: int
    incarnation: int = 0        # the granter's restarts when mapped: which of its tables this pins


@dataclass
class Domain:
    domid: int
    name: str
    nr_frames: int
    privileged: bool
    gnttab: BrokerGrantTable
    token: str
    state: str = CREATED
    frames: FrameSource | None = None
    pid: int = 0
    ports: PortTable = field(default_factory=PortTable)
    maptrack: dict[int, Mapping] = field(default_factory=dict)
    next_handle: int = 1
    created_at: float = field(default_factory=time.time)
    started_at: float = 0.0
    shutdown_reason: str = ""
    restarts: int = 0
    stats: dict[str, int] = field(default_factory=lambda: {"map": 0, "unmap": 0, "copy": 0, "hypercalls": 0})
    params: dict[int, int] = field(default_factory=dict)     # HVM_PARAM_* set by the toolstack
    uid: int | None = None          # the uid the toolstack runs this domain under; hello must come from it
    evtchn_fd_quota: int = DEFAULT_EVTCHN_FDS
    evtchn_fds: int = 0             # descriptors the broker keeps for this domain's channels now
    starttime: int = 0              # the process's start time (/proc/PID/stat): a pid is not enough
    rejoin_hash: bytes = b""        # sha256 of the key this process rejoins a restarted broker with
    last: tuple[int, bytes, list[Any]] | None = None   # (seq, reply, fd spec) of its last state-changing call

    @property
    def alive(self) -> bool:
        return self.state in (RUNNING, PAUSED)

    def _populated(self) -> int:
        """Frames made for this domain so far (Xen's tot_pages: memory is populated as it is used)."""
        inodes = getattr(self.frames, "inodes", None)
        if inodes is None:
            return self.nr_frames if self.frames is not None else 0
        return int(len(inodes) - inodes.count(0))

    def summary(self) -> dict[str, object]:
        return {
            "domid": self.domid, "name": self.name, "state": self.state, "pid": self.pid,
            "memory_kib": self.nr_frames * PAGE_SIZE // 1024, "populated_kib": self._populated() * PAGE_SIZE // 1024,
            "privileged": self.privileged,
            "grant_frames": self.gnttab.nr_frames, "mappings_held": len(self.maptrack),
            "grants_mapped_by_others": self.gnttab.mapped_count(), "event_channels": len(self.ports.ports),
            "restarts": self.restarts, "shutdown_reason": self.shutdown_reason, "uid": self.uid,
            "evtchn_fds": self.evtchn_fds, "evtchn_fd_quota": self.evtchn_fd_quota,
            "uptime": round(time.time() - self.started_at, 3) if self.alive else 0.0,
            **{f"{k}_ops": v for k, v in self.stats.items()},
        }


class Changes:
    """What changed since the last journal write: marks now, records (takeover.records) later."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget them (they are written down)."""
        self.info: set[int] = set()
        self.ports: set[int] = set()
        self.frames: set[int] = set()
        self.maps: list[tuple[int, int]] = []      # (domid, handle)
        self.gfns: list[tuple[int, int]] = []      # (domid, gfn)
        self.removed: list[int] = []
        self.next_domid = False

    def __bool__(self) -> bool:
        return bool(self.info or self.ports or self.frames or self.maps or self.gfns or self.removed
                    or self.next_domid)


@dataclass(frozen=True)
class MapResult:
    status: int
    handle: int = 0
    frame: object = None     # fd (ProcFrames) or memoryview (LocalFrames)


def _err(code: int, message: str) -> HypercallError:
    return HypercallError(code, message)


class Hypervisor:
    """Domains and the resources they share.  Single-threaded: callers serialise."""

    def __init__(self, on_event: Callable[[str, Domain], None] | None = None,
                 fd_limit: int | None = None) -> None:
        """``fd_limit``: the process's descriptor limit, which the domains' charges must stay under."""
        self.budget = FdBudget(fd_limit)
        self.domains: dict[int, Domain] = {}
        self.next_domid = 1
        self.virq_handlers: dict[int, tuple[Domain, Port]] = {}
        self._copier = CopyFrames()
        self._frame_fds = FrameFds()
        self.on_event = on_event or (lambda kind, dom: None)
        self.changes = Changes()

    # ---- domain lifecycle -------------------------------------------------

    def create_domain(self, name: str, nr_frames: int, privileged: bool = False,
                      grant_frames: int = DEFAULT_GRANT_FRAMES, domid: int | None = None,
                      uid: int | None = None, evtchn_fd_quota: int | None = None) -> Domain:
        if not name or len(name) > 64 or not name.isprintable() or "/" in name:
            raise _err(errno.EINVAL, f"bad domain name {name!r:.70}")
        if any(d.name == name for d in self.domains.values()):
            raise _err(errno.EEXIST, f"a domain named {name!r} exists")
        if not 1 <= nr_frames <= 1 << 20:
            raise _err(errno.EINVAL, f"memory of {nr_frames} frames is out of range")
        if not 1 <= grant_frames <= MAX_GRANT_FRAMES:
            raise _err(errno.EINVAL, f"grant_frames must be 1..{MAX_GRANT_FRAMES}")
        if domid is None:
            domid = self._allocate_domid()
        elif not 0 <= domid < DOMID_FIRST_RESERVED or domid in self.domains:
            raise _err(errno.EEXIST, f"domid {domid} is taken or reserved")
        if uid is not None and not 0 <= uid < 1 << 32:
            raise _err(errno.EINVAL, f"uid {uid} out of range")
        if evtchn_fd_quota is None:
            evtchn_fd_quota = PRIVILEGED_EVTCHN_FDS if privileged else DEFAULT_EVTCHN_FDS
        if not 0 <= evtchn_fd_quota <= 2 * MAX_PORTS:
            raise _err(errno.EINVAL, f"evtchn_fd_quota must be 0..{2 * MAX_PORTS}")
        if not self.budget.take(DOMAIN_FDS):
            raise _err(errno.ENOMEM, f"the broker's descriptor budget is spent ({self._budget_text()}): "
                                     f"no room for another domain")
        try:
            table = BrokerGrantTable(grant_frames, domid)
        except OSError as e:
            self.budget.give(DOMAIN_FDS)
            raise _err(errno.ENOMEM, f"cannot make a grant table: {e.strerror}") from None
        dom = Domain(domid, name, nr_frames, privileged, table, token=secrets.token_hex(16), uid=uid,
                     evtchn_fd_quota=evtchn_fd_quota)
        self.domains[domid] = dom
        self.changes.info.add(domid)
        self.changes.ports.add(domid)
        self.changes.next_domid = True
        self.on_event("created", dom)
        return dom

    def _allocate_domid(self) -> int:
        for _ in range(DOMID_FIRST_RESERVED):
            domid = self.next_domid
            self.next_domid = domid + 1 if domid + 1 < DOMID_FIRST_RESERVED else 1
            self.changes.next_domid = True
            if domid not in self.domains:
                return domid
        raise _err(errno.ENOSPC, "no free domain id")

    def domain(self, domid: int) -> Domain:
        dom = self.domains.get(domid)
        if dom is None:
            raise _err(errno.ESRCH, f"no domain {domid}")
        return dom

    def attach(self, dom: Domain, frames: FrameSource, pid: int) -> None:
        """The domain's process has connected and registered its memory."""
        if frames.nr_frames != dom.nr_frames:
            raise _err(errno.EINVAL, f"domain has {dom.nr_frames} frames, not {frames.nr_frames}")
        dom.frames = frames
        dom.pid = pid
        dom.state = RUNNING
        dom.started_at = time.time()
        self.changes.info.add(dom.domid)
        self.changes.frames.add(dom.domid)
        self.on_event("running", dom)

    def set_paused(self, dom: Domain, paused: bool) -> None:
        if not dom.alive:
            raise _err(errno.EINVAL, f"domain {dom.domid} is {dom.state}")
        dom.state = PAUSED if paused else RUNNING
        self.changes.info.add(dom.domid)
        self.on_event("paused" if paused else "unpaused", dom)

    def domain_died(self, dom: Domain, reason: str = "") -> None:
        """The domain's process is gone: release everything it held.

        Its mappings are unpinned (so granters can end access), its ports
        closed (so peers see unbound ports), and VIRQ_DOM_EXC raised, which
        is how xenstored learns to fire @releaseDomain.
        """
        if dom.state in (SHUTDOWN, CRASHED):
            return
        destroyed = reason == "destroyed"
        # A reason the domain declared (SCHEDOP_shutdown) wins over how we noticed.
        reason = "destroyed" if destroyed else (dom.shutdown_reason or reason or "crash")
        dom.state = SHUTDOWN if reason in ("poweroff", "reboot", "suspend", "destroyed") else CRASHED
        dom.shutdown_reason = reason
        self._release(dom, list(dom.maptrack))
        for port in list(dom.ports.ports.values()):
            self._close_port(dom, port)
        if dom.frames is not None:
            self._copier.forget(dom.frames)
            self._frame_fds.forget(dom.frames)
        dom.frames = None
        dom.pid = 0
        self.changes.info.add(dom.domid)
        self.changes.frames.add(dom.domid)
        self.changes.ports.add(dom.domid)
        if not destroyed:            # remove_domain reports "destroyed" itself
            self.on_event(dom.state, dom)
        self.raise_virq(VIRQ_DOM_EXC)

    def reset_domain(self, dom: Domain) -> None:
        """Make a dead domain startable again with the same domid (a restart)."""
        if dom.alive or (dom.state == CREATED and dom.token):
            raise _err(errno.EBUSY, f"domain {dom.domid} is {dom.state}")
        dom.token = secrets.token_hex(16)
        dom.state = CREATED
        dom.restarts += 1
        dom.shutdown_reason = ""
        # A fresh process brings fresh memory: old grants are void.  Mappings
        # others still hold keep the old pages alive (memfds), as in Xen.
        old = dom.gnttab
        dom.gnttab = BrokerGrantTable(old.nr_frames, dom.domid)
        old.retire()
        self.changes.info.add(dom.domid)
        self.on_event("reset", dom)

    def remove_domain(self, dom: Domain) -> None:
        ran = dom.alive
        if ran:
            self.domain_died(dom, "destroyed")
        for port in list(dom.ports.ports.values()):   # a domain that never ran: the toolstack's ports
            self._close_port(dom, port)
        if self.domains.pop(dom.domid, None) is not None:
            self.budget.give(DOMAIN_FDS)
            self.changes.removed.append(dom.domid)
        dom.gnttab.retire()
        self.on_event("destroyed", dom)
        if not ran:
            # Xen raises VIRQ_DOM_EXC for every domain destroyed, started or
            # not: xenstored forgets what it knew of the domid (permissions
            # naming it, a record from an XS_INTRODUCE) only when told.
            self.raise_virq(VIRQ_DOM_EXC)

    def find_by_token(self, token: str) -> Domain | None:
        """The created domain this one-time token belongs to; a used token is ""."""
        given = token.encode("utf-8", "surrogatepass")
        for dom in self.domains.values():
            if dom.state == CREATED and dom.token and secrets.compare_digest(dom.token.encode(), given):
                return dom
        return None

    def setup_store(self, dom: Domain, xenstore: Domain) -> tuple[int, int]:
        """What Xen's toolstack does at domain build: a xenstore ring and channel.

        The ring is the domain's last frame (as HVM special pages sit at the
        top of RAM), granted to the xenstore domain at the reserved
        reference 1 by writing the entry into the domain's table, and an
        unbound port of the domain offered to the xenstore domain.  The
        domain finds both through HVM_PARAM_STORE_PFN/_EVTCHN.  Returns
        (gfn, port) for XS_INTRODUCE.
        """
        if dom.state != CREATED or not dom.token:
            raise _err(errno.EBUSY, f"domain {dom.domid} has started; set up its store before")
        gfn = dom.nr_frames - 1
        old = dom.params.get(HVM_PARAM_STORE_EVTCHN)
        if old is not None and old in dom.ports.ports:
            self._close_port(dom, dom.ports.ports[old])
        port = self.evtchn_alloc_unbound(dom, xenstore.domid)
        dom.gnttab.seed(GNTTAB_RESERVED_XENSTORE, xenstore.domid, gfn)
        dom.params[HVM_PARAM_STORE_PFN] = gfn
        dom.params[HVM_PARAM_STORE_EVTCHN] = port.port
        self.changes.info.add(dom.domid)
        return gfn, port.port

    def get_param(self, caller: Domain, index: int) -> int:
        if index not in caller.params:
            raise _err(errno.ENOENT, f"parameter {index} is not set")
        return caller.params[index]

    def port_fds(self, caller: Domain, port: int) -> Port:
        """An existing port of the caller (one the toolstack allocated for it)."""
        return self._port(caller, port)

    # ---- grant table --------------------------------------------------------

    def grant_map(self, caller: Domain, ops: Sequence[tuple[int, int, bool]]) -> list[MapResult]:
        """GNTTABOP_map_grant_ref for a batch of (granter domid, ref, readonly).

        Each granter's entries are pinned together first (``pin_many``: a
        run of neighbouring entries under one lock), then each op in order
        gets its frame and handle.
        """
        pinned: list[tuple[int, int]] = [(GNTST_bad_domain, 0)] * len(ops)
        by_granter: dict[int, list[int]] = {}
        for index, (domid, _ref, _readonly) in enumerate(ops):
            by_granter.setdefault(domid, []).append(index)
        for domid, indexes in by_granter.items():
            granter = self.domains.get(domid)
            if granter is None or not granter.alive or granter.frames is None:
                continue
            pins = granter.gnttab.pin_many([(ops[i][1], ops[i][2]) for i in indexes], caller.domid)
            for index, pin in zip(indexes, pins):
                pinned[index] = pin
        results = [self._map_one(caller, op, pin) for op, pin in zip(ops, pinned)]
        caller.stats["map"] += len(ops)
        return results

    def _map_one(self, caller: Domain, op: tuple[int, int, bool], pinned: tuple[int, int]) -> MapResult:
        """The rest of a map whose pin is done: (GNTST status, gfn) of ``pin_many``."""
        status, gfn = pinned
        if status != GNTST_okay:
            return MapResult(status)
        domid, ref, readonly = op
        granter = self.domains[domid]
        table = granter.gnttab
        assert granter.frames is not None
        if len(caller.maptrack) >= MAX_MAPTRACK:
            table.unpin(ref, readonly)
            return MapResult(GNTST_no_space)
        try:
            frame, frame_id = self._frame_fds.open(granter.frames, gfn, readonly)
        except BadFrame:
            table.unpin(ref, readonly)
            return MapResult(GNTST_bad_page)
        except NoFrameSpace:
            table.unpin(ref, readonly)
            return MapResult(GNTST_no_space)
        granter.frames.expose(gfn)
        self.changes.gfns.append((granter.domid, gfn))
        handle = caller.next_handle
        caller.next_handle = handle + 1 if handle < 0xFFFFFFFF else 1
        caller.maptrack[handle] = Mapping(granter, table, ref, readonly, frame_id, gfn, granter.restarts)
        self.changes.maps.append((caller.domid, handle))
        self.changes.info.add(caller.domid)          # next_handle
        return MapResult(GNTST_okay, handle, frame)

    def replace_frames(self, caller: Domain, gfns: Sequence[int]) -> tuple[list[int], list[int]]:
        """Fresh frames for gfns whose grants the caller ended after a grantee mapped them.

        Revocation by replacement: the hypervisor cannot take a page back
        from a grantee that hid it (a forked child, a descriptor in flight
        in a socket, a page in a pipe), but it can make sure the granter
        never puts anything private in that page again.  Gfns still mapped
        through another of the caller's grants are left as they are.
        Returns (gfns replaced, their fds).
        """
        if caller.frames is None:
            raise _err(errno.EPERM, "register memory first")
        try:
            done, fds = caller.frames.replace(gfns, caller.gnttab.pinned_gfns())
            self.changes.gfns.extend((caller.domid, g) for g in done)
            return done, fds
        except BadFrame as e:
            raise _err(errno.EINVAL, str(e)) from None
        except OSError as e:
            raise _err(errno.ENOMEM, f"cannot make frames: {e.strerror}") from None

    def grant_unmap(self, caller: Domain, handles: Sequence[int]) -> list[int]:
        """GNTTABOP_unmap_grant_ref: the caller says it has unmapped these.

        The claim is checked against the caller's address space and fd table
        before the grant is released; a mapping still present is refused with
        GNTST_general_error and stays pinned.

        The check protects the granter, whose page must not be reused while
        someone can still reach it.  A grant of a granter that has died
        protects no one (its process and memory are gone; a restart brings a
        fresh table and fresh frames, never the old ones), so it is released unchecked:
        a guest going away, or ``xdom down`` of many, does not cost a read
        of the backend's whole memory map per guest.
        """
        known = {h for h in handles if h in caller.maptrack}
        checked = {h for h in known if caller.maptrack[h].granter.alive and not caller.maptrack[h].table.retired}
        claimed = {caller.maptrack[h].frame_id for h in checked}
        still: set[FrameId] = set()
        if caller.frames is not None and claimed:
            kept = {m.frame_id for h, m in caller.maptrack.items() if h not in known}
            if claimed - kept:
                still = caller.frames.still_mapped(claimed - kept, self._own_places(caller, checked))
        out = []
        released: dict[int, None] = {}          # in order; a handle named twice is released once
        for h in handles:
            m = caller.maptrack.get(h)
            if m is None or h in released:
                out.append(GNTST_bad_handle)
            elif m.frame_id in still:
                out.append(GNTST_general_error)
            else:
                released[h] = None
                out.append(GNTST_okay)
        self._release(caller, released)
        caller.stats["unmap"] += len(handles)
        return out

    @staticmethod
    def _own_places(caller: Domain, handles: set[int]) -> set[tuple[FrameId, int]]:
        """Where the frames of these mappings legitimately sit in the caller's process:
        at their granter's own address, when the granter lives in that same
        process (domains of one test process).  Anywhere else they count."""
        assert caller.frames is not None
        pid = caller.frames.address(0)[0]
        places = set()
        for h in handles:
            m = caller.maptrack[h]
            frames = m.granter.frames
            if frames is not None and m.granter.gnttab is m.table:
                gpid, addr = frames.address(m.gfn)
                if gpid == pid:
                    places.add((m.frame_id, addr))
        return places

    def _release(self, caller: Domain, handles: Iterable[int]) -> None:
        """Drop these mappings of the caller's; each granter's entries are unpinned together, their
        flags updated a run of locks at a time."""
        unpins: dict[BrokerGrantTable, list[tuple[int, bool]]] = {}
        for handle in handles:
            m = caller.maptrack.pop(handle)
            self.changes.maps.append((caller.domid, handle))
            unpins.setdefault(m.table, []).append((m.ref, m.readonly))
        for table, refs in unpins.items():
            table.unpin_many(refs)
            table.close_if_retired()

    def grant_copy(self, caller: Domain, columns: CopyColumns) -> list[int]:
        """GNTTABOP_copy of a batch as ``hypercall_wire.copy_columns`` reads it (see xdom.broker.grant_copy)."""
        statuses = grant_copy(self.domains, caller, columns, self._copier)
        caller.stats["copy"] += len(statuses)
        return statuses

    def retry_deferred(self) -> None:
        for dom in self.domains.values():
            dom.gnttab.retry_deferred()

    # ---- event channels ---------------------------------------------------

    def _port(self, dom: Domain, port: int) -> Port:
        p = dom.ports.ports.get(port)
        if p is None:
            raise _err(errno.EINVAL, f"port {port} is not bound")
        return p

    def evtchn_alloc_unbound(self, caller: Domain, remote_dom: int) -> Port:
        remote = caller.domid if remote_dom == DOMID_SELF else remote_dom
        self.domain(remote)
        self._charge(caller, 2)
        try:
            pair = EventPair(charged=caller)
        except OSError as e:
            self._uncharge(caller, 2)
            raise _err(errno.ENOMEM, f"no event channel: {e.strerror}") from None
        try:
            port = self._allocate_port(caller, EVTCHNSTAT_unbound)
        except BaseException:
            pair.close()
            self._uncharge(caller, 2)
            raise
        port.remote_domid = remote
        caller.ports.attach(port, pair, owner_side=True)
        self.changes.ports.add(caller.domid)
        return port

    def evtchn_bind_interdomain(self, caller: Domain, remote_dom: int, remote_port: int) -> Port:
        remote = caller if remote_dom == DOMID_SELF else self.domain(remote_dom)
        rp = remote.ports.ports.get(remote_port)
        if rp is None or rp.state != EVTCHNSTAT_unbound or rp.remote_domid != caller.domid or rp.pair is None:
            raise _err(errno.EINVAL, f"port {remote_port} of domain {remote.domid} is not unbound for us")
        lp = self._allocate_port(caller, EVTCHNSTAT_interdomain)
        caller.ports.attach(lp, rp.pair, owner_side=not rp.owner_side)
        lp.remote_domid, lp.remote_port = remote.domid, rp.port
        rp.state, rp.remote_domid, rp.remote_port = EVTCHNSTAT_interdomain, caller.domid, lp.port
        self.changes.ports.update((caller.domid, remote.domid))
        # Xen marks the new local port pending: events sent to the unbound
        # port before the bind must not be lost.
        signal(lp.wait_fd)
        return lp

    def evtchn_bind_virq(self, caller: Domain, virq: int) -> Port:
        if not 0 <= virq < NR_VIRQS:
            raise _err(errno.EINVAL, f"virq {virq} out of range")
        if virq in GLOBAL_VIRQS:
            if not caller.privileged:
                raise _err(errno.EPERM, f"virq {virq} is global: only a privileged domain binds it")
            holder = self.virq_handlers.get(virq)
            if holder is not None and holder[0] is not caller:
                raise _err(errno.EBUSY, f"virq {virq} is bound by domain {holder[0].domid}")
        if any(p.virq == virq for p in caller.ports.ports.values()):
            raise _err(errno.EEXIST, f"virq {virq} is already bound")
        self._charge(caller, 1)
        try:
            fd = new_virq_fd()
        except OSError as e:
            self._uncharge(caller, 1)
            raise _err(errno.ENOMEM, f"no event channel: {e.strerror}") from None
        try:
            port = self._allocate_port(caller, EVTCHNSTAT_virq)
        except BaseException:
            os.close(fd)
            self._uncharge(caller, 1)
            raise
        port.virq, port.virq_fd = virq, fd
        self.changes.ports.add(caller.domid)
        if virq in GLOBAL_VIRQS:
            self.virq_handlers[virq] = (caller, port)
        return port

    def _charge(self, dom: Domain, n: int) -> None:
        """Charge ``n`` kept descriptors to ``dom`` and to the broker's budget, or refuse."""
        quota = self.evtchn_fd_quota(dom)
        if dom.evtchn_fds + n > quota:
            raise _err(errno.ENOSPC, f"domain {dom.domid} has used its quota of {quota} "
                                     f"event-channel descriptors in the broker; close ports first")
        if not self.budget.take(n):
            raise _err(errno.ENOMEM, f"the broker's descriptor budget is spent ({self._budget_text()})")
        dom.evtchn_fds += n

    def evtchn_fd_quota(self, dom: Domain) -> int:
        """The domain's own quota, capped at its share of the broker's budget."""
        share = self.budget.share
        return dom.evtchn_fd_quota if share is None else min(dom.evtchn_fd_quota, share)

    def _uncharge(self, dom: object, n: int) -> None:
        if isinstance(dom, Domain):
            dom.evtchn_fds -= n
        self.budget.give(n)

    def _budget_text(self) -> str:
        return f"{self.budget.used} of {self.budget.limit} descriptors kept for domains, " \
               f"{self.budget.reserve} reserved for the broker"

    def _allocate_port(self, dom: Domain, state: int) -> Port:
        try:
            return dom.ports.allocate(state)
        except OverflowError:
            raise _err(errno.ENOSPC, "no free event channel port") from None

    def evtchn_close(self, caller: Domain, port: int) -> None:
        self._close_port(caller, self._port(caller, port))

    def _close_port(self, dom: Domain, p: Port) -> None:
        if p.state == EVTCHNSTAT_interdomain:
            remote = self.domains.get(p.remote_domid)
            rp = remote.ports.ports.get(p.remote_port) if remote else None
            if rp is not None and rp.remote_domid == dom.domid and rp.remote_port == p.port:
                rp.state, rp.remote_domid, rp.remote_port = EVTCHNSTAT_unbound, dom.domid, 0
                self.changes.ports.add(p.remote_domid)
        if p.state == EVTCHNSTAT_virq and self.virq_handlers.get(p.virq, (None, None))[1] is p:
            del self.virq_handlers[p.virq]
        for charged, n in dom.ports.release(p):
            self._uncharge(dom if charged is None else charged, n)
        self.changes.ports.add(dom.domid)

    def evtchn_status(self, caller: Domain, port: int) -> dict[str, int]:
        p = self._port(caller, port)
        return {"status": p.state, "remote_dom": p.remote_domid, "remote_port": p.remote_port, "virq": p.virq}

    def evtchn_send(self, caller: Domain, port: int) -> None:
        p = self._port(caller, port)
        if p.state == EVTCHNSTAT_interdomain:
            signal(p.notify_fd)

    def raise_virq(self, virq: int) -> None:
        holder = self.virq_handlers.get(virq)
        if holder is not None:
            signal(holder[1].wait_fd)

    # ---- accounting ---------------------------------------------------------

    def list(self) -> list[dict[str, object]]:
        return [d.summary() for d in sorted(self.domains.values(), key=lambda d: d.domid)]

    def close(self) -> None:
        for dom in list(self.domains.values()):
            self.remove_domain(dom)
        self._copier.close()
        self._frame_fds.close()


def check_domid(domid: int) -> int:
    if not 0 <= domid <= DOMID_SELF:
        raise _err(errno.EINVAL, f"domid {domid} out of range")
    return domid


