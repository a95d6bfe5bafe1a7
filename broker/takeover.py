"""A new broker takes over the domains of one that died.

The model (:mod:`broker.persist`) says who is what; the descriptors are
still in the domains' processes.  A domain's grant table is a memfd it
holds a description of; every event channel's two eventfds are held by the
domains at its ends; frames are mapped in the domains themselves.  So the
new broker, which as root may take a copy of another process's descriptor
(``pidfd_getfd``), finds each one by identity -- the table by its inode,
an eventfd by the kernel's ``eventfd-id`` -- never by what a domain says,
and rebuilds its tables around them.

What cannot be rebuilt fails the one domain concerned, said in the log:

* a domain that had not finished starting (no memory registered yet): its
  toolstack-made store channel and seeded grant lived only in the dead
  broker.  It is marked crashed (and its process killed): the toolstack's
  restart policy starts it again;
* a running domain whose grant table is no longer among its descriptors
  (a hostile domain closed it): killed and marked crashed;
* a channel neither of whose ends holds its eventfds any more: closed;
* a domain whose process is gone (or is another process with its pid,
  told apart by start time): it died while no broker was there to see it;
  its mappings are released, its ports closed and VIRQ_DOM_EXC raised,
  exactly as if the broker had seen it die.

Mappings of a granter that restarted in the meantime pin a table that is
gone; they are kept, against a detached table, until the grantee unmaps.
"""

from __future__ import annotations

import array
import ctypes
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from xdom.domains.abi.event_channel import GLOBAL_VIRQS, EVTCHNSTAT_unbound

from .evtchn import EventPair, Port, PortTable, eventfd_id
from .frames import MEMFD_DEV, ProcFrames
from .gnttab import BrokerGrantTable
from .hypervisor import CRASHED, CREATED, DOMAIN_FDS, PAUSED, RUNNING, Domain, Hypervisor, Mapping
from .persist import Model, Record, empty_model

log = logging.getLogger("xdom.broker")

_SYS_pidfd_getfd = 438
_libc = ctypes.CDLL(None, use_errno=True)


# ---- the live tables, written down --------------------------------------------------------------

def info_of(dom: Domain) -> dict[str, Any]:
    return {"name": dom.name, "nr_frames": dom.nr_frames, "privileged": dom.privileged,
            "grant_frames": dom.gnttab.nr_frames, "state": dom.state, "pid": dom.pid, "starttime": dom.starttime,
            "created_at": dom.created_at, "started_at": dom.started_at, "shutdown_reason": dom.shutdown_reason,
            "restarts": dom.restarts, "params": dict(dom.params), "uid": dom.uid,
            "evtchn_fd_quota": dom.evtchn_fd_quota, "gnttab_ino": dom.gnttab.ino, "rejoin_hash": dom.rejoin_hash,
            "next_handle": dom.next_handle}


def frames_of(dom: Domain) -> dict[str, Any] | None:
    f = dom.frames
    if not isinstance(f, ProcFrames):
        return None
    return {"base": f.base, "inodes": f.inodes.tobytes(), "exposed": bytes(f.exposed)}


def ports_of(dom: Domain) -> dict[int, Any]:
    out = {}
    for n, p in dom.ports.ports.items():
        charged = p.pair.charged if p.pair is not None else None
        out[n] = {"state": p.state, "remote_domid": p.remote_domid, "remote_port": p.remote_port, "virq": p.virq,
                  "owner_side": p.owner_side, "pair": list(p.pair.ids) if p.pair is not None else None,
                  "charged": charged.domid if isinstance(charged, Domain) else None,
                  "virq_id": eventfd_id(p.virq_fd) if p.virq_fd >= 0 else None}
    return out


def map_of(m: Mapping) -> list[Any]:
    return [m.granter.domid, m.ref, m.readonly, m.gfn, m.frame_id[1], m.incarnation]


def records(hv: Hypervisor) -> list[Record]:
    """The journal records for what changed since the last call (and forget the marks)."""
    ch = hv.changes
    if not ch:
        return []
    out: list[Record] = []
    if ch.next_domid:
        out.append(("next_domid", hv.next_domid))
    for domid in ch.removed:
        out.append(("remove", domid))
    for domid in sorted(ch.info):
        if (dom := hv.domains.get(domid)) is not None:
            out.append(("info", domid, info_of(dom)))
    for domid in sorted(ch.frames):
        if (dom := hv.domains.get(domid)) is not None:
            out.append(("frames", domid, frames_of(dom)))
    for domid, gfn in dict.fromkeys(ch.gfns):
        dom = hv.domains.get(domid)
        if dom is not None and isinstance(dom.frames, ProcFrames):
            out.append(("gfn", domid, gfn, dom.frames.inodes[gfn], dom.frames.exposed[gfn]))
    for domid in sorted(ch.ports):
        if (dom := hv.domains.get(domid)) is not None:
            out.append(("ports", domid, ports_of(dom)))
    for domid, handle in dict.fromkeys(ch.maps):
        dom = hv.domains.get(domid)
        if dom is not None:
            m = dom.maptrack.get(handle)
            out.append(("map", domid, handle, map_of(m) if m is not None else None))
    removed = set(ch.removed)
    out = [r for r in out if r[0] in ("next_domid", "remove") or r[1] not in removed]
    hv.changes.clear()
    return out


def model_of(hv: Hypervisor) -> Model:
    """The whole model, for a snapshot."""
    model = empty_model()
    model["next_domid"] = hv.next_domid
    for domid, dom in hv.domains.items():
        model["domains"][domid] = {"info": info_of(dom), "frames": frames_of(dom), "ports": ports_of(dom),
                                   "maps": {h: map_of(m) for h, m in dom.maptrack.items()},
                                   "last": list(dom.last) if dom.last is not None else None}
    hv.changes.clear()
    return model


# ---- finding descriptors in the domains ------------------------------------------------------------

def process_starttime(pid: int) -> int:
    """Field 22 of /proc/PID/stat (after the command name, which may hold anything)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2:].split()[19])


def pidfd_getfd(pidfd: int, fd: int) -> int:
    res: int = _libc.syscall(_SYS_pidfd_getfd, pidfd, fd, 0)
    if res < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"pidfd_getfd: {os.strerror(e)}")
    os.set_inheritable(res, False)
    return res


@dataclass
class _Holder:
    """One live domain process, its descriptors indexed."""
    dom_id: int
    pid: int
    pidfd: int
    eventfds: dict[int, int] = field(default_factory=dict)     # eventfd-id -> fd number there
    memfds: dict[int, int] = field(default_factory=dict)       # inode -> fd number there

    def scan(self) -> None:
        fddir = f"/proc/{self.pid}/fd"
        for name in os.listdir(fddir):
            try:
                target = os.readlink(f"{fddir}/{name}")
                if target == "anon_inode:[eventfd]":
                    self.eventfds.setdefault(eventfd_id(int(name), self.pid), int(name))
                elif target.startswith("/memfd:xdom-gnttab-"):
                    st = os.stat(f"{fddir}/{name}")
                    if st.st_dev == MEMFD_DEV:
                        self.memfds.setdefault(st.st_ino, int(name))
            except (OSError, ValueError):
                continue


@dataclass
class Takeover:
    """What the new broker found: live domains (to rejoin), and what it had to give up."""
    live: dict[int, int] = field(default_factory=dict)          # domid -> pidfd
    failed: dict[int, str] = field(default_factory=dict)        # domid -> why
    died: list[int] = field(default_factory=list)
    lost_ports: list[tuple[int, int]] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.live)} domain(s) to rejoin, {len(self.died)} died meanwhile, "
                f"{len(self.failed)} failed ({'; '.join(f'{d}: {w}' for d, w in self.failed.items()) or 'none'}), "
                f"{len(self.lost_ports)} channel end(s) lost")


def rebuild(model: Model, hv: Hypervisor) -> Takeover:
    """Fill an empty hypervisor from ``model`` and the live domains; see the module docstring."""
    result = Takeover()
    hv.next_domid = model.get("next_domid", 1)
    holders: dict[int, _Holder] = {}
    doms: dict[int, Domain] = {}
    gone: set[int] = set()                                     # running before, not now: died meanwhile
    for domid, d in model["domains"].items():
        info = d["info"]
        dom = Domain(domid, info["name"], info["nr_frames"], info["privileged"],
                     BrokerGrantTable.detached(info["grant_frames"], domid), token="",
                     state=info["state"], pid=info["pid"], created_at=info["created_at"],
                     started_at=info["started_at"], shutdown_reason=info["shutdown_reason"],
                     restarts=info["restarts"], params={int(k): v for k, v in info["params"].items()},
                     uid=info["uid"], evtchn_fd_quota=info["evtchn_fd_quota"], starttime=info["starttime"],
                     rejoin_hash=info["rejoin_hash"], next_handle=info["next_handle"])
        dom.last = tuple(d["last"]) if d.get("last") else None
        doms[domid] = dom
        if dom.state == CREATED:
            _kill(dom)
            result.failed[domid] = "it had not finished starting: its store channel died with the broker"
            dom.state, dom.shutdown_reason, dom.pid = CRASHED, "broker restart", 0
            continue
        if dom.state not in (RUNNING, PAUSED):
            continue
        pidfd = _open_if_same(dom)
        if pidfd is None:
            gone.add(domid)
            continue
        holder = _Holder(domid, dom.pid, pidfd)
        try:
            holder.scan()
        except OSError:
            os.close(pidfd)
            gone.add(domid)
            continue
        holders[domid] = holder
        fd = holder.memfds.get(info["gnttab_ino"])
        try:
            if fd is None:
                raise ValueError("its grant table is no longer among its descriptors")
            dom.gnttab = BrokerGrantTable(info["grant_frames"], domid, pidfd_getfd(pidfd, fd))
        except (OSError, ValueError) as e:
            result.failed[domid] = str(e)
            _kill(dom, pidfd)
            gone.add(domid)
            continue
        frames = d["frames"]
        if frames is None:
            result.failed[domid] = "no memory registered"
            _kill(dom, pidfd)
            gone.add(domid)
            continue
        pf = ProcFrames(dom.pid, frames["base"], array.array("Q", frames["inodes"]))
        pf.exposed[:] = frames["exposed"]
        dom.frames = pf
        result.live[domid] = pidfd
    hv.domains.update(doms)
    for dom in doms.values():
        if not hv.budget.take(DOMAIN_FDS):
            log.error("takeover: the descriptor budget cannot cover domain %d", dom.domid)
    _rebuild_ports(model, hv, doms, holders, result)
    _rebuild_maps(model, hv, doms)
    for domid, holder in holders.items():
        if domid not in result.live:
            os.close(holder.pidfd)
    for domid in result.live:
        doms[domid].gnttab.sweep_flags()
    # Deaths last, once every table and channel is in place: releasing a
    # dead domain unpins others' grants and unbinds its peers' ports.
    for domid in sorted(gone):
        dom = doms[domid]
        if dom.alive:
            hv.domain_died(dom, "crash")
            if domid not in result.failed:
                result.died.append(domid)
    for domid, why in result.failed.items():
        log.error("takeover: domain %d (%s) failed: %s", domid, doms[domid].name, why)
    return result


def _open_if_same(dom: Domain) -> int | None:
    """A pidfd for the domain's process, if that pid is still the process that said hello."""
    if dom.pid <= 0:
        return None
    try:
        pidfd = os.pidfd_open(dom.pid)
    except OSError:
        return None
    try:
        if process_starttime(dom.pid) == dom.starttime:
            return pidfd
    except (OSError, ValueError, IndexError):
        pass
    os.close(pidfd)
    return None


def _kill(dom: Domain, pidfd: int | None = None) -> None:
    """Stop a process the new broker cannot take over (the toolstack restarts it)."""
    own = pidfd is None
    if pidfd is None:
        pidfd = _open_if_same(dom)
        if pidfd is None:
            return
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        if own:
            os.close(pidfd)


def _rebuild_ports(model: Model, hv: Hypervisor, doms: dict[int, Domain], holders: dict[int, _Holder],
                   result: Takeover) -> None:
    pairs: dict[tuple[int, int], EventPair | None] = {}

    def adopt(ids: tuple[int, int], charged: Domain | None) -> EventPair | None:
        if ids in pairs:
            return pairs[ids]
        fds: list[int] = []
        for eid in ids:
            for h in holders.values():
                if eid in h.eventfds:
                    try:
                        fds.append(pidfd_getfd(h.pidfd, h.eventfds[eid]))
                        break
                    except OSError:
                        continue
        pair = None
        if len(fds) == 2 and (eventfd_id(fds[0]), eventfd_id(fds[1])) == ids:
            pair = EventPair(charged=charged, fds=(fds[0], fds[1]))
            if charged is not None:
                charged.evtchn_fds += 2
            hv.budget.take(2)
        else:
            for fd in fds:
                os.close(fd)
        pairs[ids] = pair
        return pair

    for domid, d in model["domains"].items():
        dom = doms[domid]
        table = PortTable()
        dom.ports = table
        for n, p in d["ports"].items():
            port = Port(int(n), p["state"], p["remote_domid"], p["remote_port"], p["virq"])
            if p["pair"] is not None:
                pair = adopt(tuple(p["pair"]), doms.get(p["charged"]) if p["charged"] is not None else None)
                if pair is None:
                    result.lost_ports.append((domid, port.port))
                    continue
                table.ports[port.port] = port
                table.attach(port, pair, p["owner_side"])
            elif p["virq_id"] is not None:
                fd = _find_eventfd(holders.get(domid), p["virq_id"])
                if fd is None:
                    result.lost_ports.append((domid, port.port))
                    continue
                port.virq_fd = fd
                table.ports[port.port] = port
                dom.evtchn_fds += 1
                hv.budget.take(1)
                if port.virq in GLOBAL_VIRQS:
                    hv.virq_handlers[port.virq] = (dom, port)
    # An end whose pair was lost leaves its peer bound to nothing: unbound, as a close would.
    for domid, n in result.lost_ports:
        for dom in doms.values():
            for p in dom.ports.ports.values():
                if p.remote_domid == domid and p.remote_port == n and p.state != EVTCHNSTAT_unbound:
                    p.state, p.remote_domid, p.remote_port = EVTCHNSTAT_unbound, domid, 0


def _find_eventfd(holder: _Holder | None, eid: int) -> int | None:
    if holder is None or eid not in holder.eventfds:
        return None
    try:
        return pidfd_getfd(holder.pidfd, holder.eventfds[eid])
    except OSError:
        return None


def _rebuild_maps(model: Model, hv: Hypervisor, doms: dict[int, Domain]) -> None:
    detached: dict[tuple[int, int], tuple[Domain, BrokerGrantTable]] = {}
    for domid, d in model["domains"].items():
        dom = doms[domid]
        for handle, (granter_id, ref, readonly, gfn, ino, inc) in d["maps"].items():
            granter = doms.get(granter_id)
            if granter is not None and granter.restarts == inc and granter.gnttab.fd >= 0:
                table = granter.gnttab
            else:
                key = (granter_id, inc)
                if key not in detached:
                    frames = granter.gnttab.nr_frames if granter is not None else 1
                    stub = granter if granter is not None else Domain(
                        granter_id, f"gone-{granter_id}", 1, False, BrokerGrantTable.detached(frames, granter_id),
                        token="", state=CRASHED)
                    detached[key] = (stub, BrokerGrantTable.detached(frames, granter_id))
                granter, table = detached[key]
            table.add_pin(ref, domid, gfn, readonly)
            dom.maptrack[int(handle)] = Mapping(granter, table, ref, readonly, (MEMFD_DEV, ino), gfn, inc)


__all__ = ["Takeover", "info_of", "model_of", "pidfd_getfd", "process_starttime", "rebuild", "records"]
