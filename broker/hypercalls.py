"""The hypercalls a domain makes over its connection, each checked and handed to the Hypervisor.

A domain's identity is the connection it proved with its one-time token
(``hello``); no message field ever names the caller, and no handler here
reads one.  Each handler takes the caller's :class:`Connection` and the
request's fields, and returns a :data:`Reply`: the reply's fields, the
descriptors to send with it and those to close once it has left.  Bad
input raises :class:`HypercallError`, which the server turns into an error
reply; the socket, the poll loop and the journal are the server's
(broker/server.py), which is why ``rejoin`` (a broker taking over) is not
here.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xdom.domains.abi.event_channel import DOMID_SELF
from xdom.domains.abi.grant_table import PAGE_SIZE
from xdom.domains.abi.hypercall_wire import MAX_FDS, SHUTDOWN_REASONS, HypercallError, copy_columns, int_tuple

from .frames import FrameAllocator, ProcFrames
from .hypervisor import Domain, Hypervisor
from .takeover import process_starttime

log = logging.getLogger("xdom.broker")


@dataclass
class Connection:
    """One domain's hypercall connection (a SOCK_SEQPACKET socket): who connected, and, once it said hello,
    which domain it is."""

    sock: socket.socket
    pid: int
    uid: int
    opened: float = field(default_factory=time.monotonic)
    domain: Domain | None = None
    pidfd: int = -1
    memory_set: bool = False
    frames: FrameAllocator | None = None    # the domain's frames as the broker makes them


Reply = tuple[dict[str, Any], list[int], list[int]]   # fields, fds to send, fds to close after


def _domain(conn: Connection) -> Domain:
    """The caller's domain (``_dispatch`` lets nothing but hello and rejoin through before it is known)."""
    if conn.domain is None:
        raise HypercallError(errno.EPERM, "say hello with your token first")
    return conn.domain


def _domid(value: int) -> int:
    if not 0 <= value <= DOMID_SELF:
        raise HypercallError(errno.EINVAL, f"domid {value} out of range")
    return value


class Hypercalls:
    """The handlers of every hypercall but ``rejoin``, by op name (:attr:`handlers`)."""

    def __init__(self, hv: Hypervisor, introduced: Callable[[Connection], None]) -> None:
        """``introduced``: called when ``hello`` has bound a connection to its domain (its pidfd is open),
        for the server to watch the process."""
        self.hv = hv
        self._introduced = introduced
        self.handlers: dict[str, Callable[[Connection, dict[str, Any]], Reply]] = {
            "hello": self._hello, "populate_physmap": self._populate_physmap, "set_memory": self._set_memory,
            "shutdown": self._shutdown,
            "map": self._map, "unmap": self._unmap, "copy": self._copy, "replace_frames": self._replace_frames,
            "evtchn_alloc_unbound": self._alloc_unbound, "evtchn_bind_interdomain": self._bind_interdomain,
            "evtchn_bind_virq": self._bind_virq, "evtchn_close": self._close,
            "evtchn_status": self._status, "evtchn_send": self._send, "domain_info": self._domain_info,
            "get_param": self._get_param, "evtchn_fds": self._evtchn_fds,
        }

    def _hello(self, conn: Connection, args: dict[str, Any]) -> Reply:
        if conn.domain is not None:
            raise HypercallError(errno.EALREADY, "already introduced")
        dom = self.hv.find_by_token(args["token"])
        if dom is None:
            raise HypercallError(errno.EACCES, "unknown or used token")
        if dom.uid is not None and conn.uid != dom.uid:
            # A token read or guessed by another domain's uid is worthless: the
            # toolstack said which uid runs this domain, and the kernel says who
            # connected (SO_PEERCRED).  The token stays valid for the real one.
            log.warning("hello for domain %d (%s) from pid %d uid %d, not its uid %d: refused",
                        dom.domid, dom.name, conn.pid, conn.uid, dom.uid)
            raise HypercallError(errno.EACCES, f"domain {dom.domid} runs as uid {dom.uid}, not uid {conn.uid}")
        try:
            conn.pidfd = os.pidfd_open(conn.pid)
        except OSError as e:
            raise HypercallError(errno.ESRCH, f"peer process: {e.strerror}") from None
        try:
            starttime = process_starttime(conn.pid)
        except (OSError, ValueError, IndexError) as e:
            os.close(conn.pidfd)
            conn.pidfd = -1
            raise HypercallError(errno.ESRCH, f"peer process: {e}") from None
        dom.token = ""          # one use only
        dom.pid, dom.starttime = conn.pid, starttime
        # The key this process rejoins a broker that takes over from us with; we keep its hash.
        key = secrets.token_hex(16)
        dom.rejoin_hash = hashlib.sha256(key.encode()).digest()
        self.hv.changes.info.add(dom.domid)
        conn.domain = dom
        self._introduced(conn)
        gnt_fd = dom.gnttab.domain_fd()
        return ({"domid": dom.domid, "name": dom.name, "nr_frames": dom.nr_frames,
                 "grant_frames": dom.gnttab.nr_frames, "privileged": dom.privileged, "rejoin_key": key},
                [gnt_fd], [gnt_fd])

    def _populate_physmap(self, conn: Connection, args: dict[str, Any]) -> Reply:
        """XENMEM_populate_physmap: frames for ``count`` gfns from ``start`` that have none yet.

        The broker makes every frame and records its identity, so that no
        page a domain got from elsewhere can ever pass for one of its own.
        A domain populates what it needs before ``set_memory`` and the rest
        as it comes to use it; a frame made after ``set_memory`` is
        journaled before the reply leaves, and a reply lost with the broker
        is answered again with frames made anew (``Broker._replay``).
        """
        dom = conn.domain
        assert dom is not None
        start, count = int_tuple([args["start"], args["count"]], 2, "populate_physmap")
        if count > MAX_FDS:
            raise HypercallError(errno.E2BIG, f"at most {MAX_FDS} frames per call")
        allocator = self.frame_allocator(conn)
        try:
            fds = allocator.populate(start, count)
        except ValueError as e:
            raise HypercallError(errno.EINVAL, str(e)) from None
        except OSError as e:
            raise HypercallError(errno.ENOMEM, f"cannot make frames: {e.strerror}") from None
        if conn.memory_set:
            self.hv.changes.gfns.extend((dom.domid, g) for g in range(start, start + count))
        return {"start": start, "count": count}, fds, fds

    @staticmethod
    def frame_allocator(conn: Connection) -> FrameAllocator:
        """The allocator of the caller's frames (after a takeover: over the frames the broker before knew)."""
        dom = conn.domain
        assert dom is not None
        if conn.frames is None:
            known = dom.frames.inodes if isinstance(dom.frames, ProcFrames) else None
            conn.frames = FrameAllocator(dom.nr_frames, known)
        return conn.frames

    def _set_memory(self, conn: Connection, args: dict[str, Any]) -> Reply:
        dom = conn.domain
        assert dom is not None
        if conn.memory_set:
            raise HypercallError(errno.EALREADY, "memory is registered")
        if conn.frames is None or not conn.frames.populated:
            raise HypercallError(errno.EINVAL, "populate a frame first")
        base = args["base"]
        if base <= 0 or base % PAGE_SIZE or base >= 1 << 47:
            raise HypercallError(errno.EINVAL, "memory base must be a page-aligned user address")
        inodes = conn.frames.inodes
        frames = ProcFrames(conn.pid, base, inodes)
        # Spot-check the first and last frames (or any made): ours, where the domain says.
        made = [g for g in (0, dom.nr_frames - 1) if inodes[g]] or [next(g for g, ino in enumerate(inodes) if ino)]
        for gfn in made:
            try:
                fd, _ = frames.open_frame(gfn, readonly=True)
                os.close(fd)
            except Exception as e:
                raise HypercallError(errno.EFAULT, f"frame {gfn} at the given base: {e}") from None
        self.hv.attach(dom, frames, conn.pid)
        conn.memory_set = True
        return {}, [], []

    def _shutdown(self, conn: Connection, args: dict[str, Any]) -> Reply:
        if args["reason"] not in SHUTDOWN_REASONS:
            raise HypercallError(errno.EINVAL, f"reason must be one of {SHUTDOWN_REASONS}")
        assert conn.domain is not None
        conn.domain.shutdown_reason = args["reason"]
        self.hv.changes.info.add(conn.domain.domid)
        return {}, [], []

    def _map(self, conn: Connection, args: dict[str, Any]) -> Reply:
        ops = []
        for entry in args["ops"]:
            if not isinstance(entry, list) or len(entry) != 3 or type(entry[2]) not in (bool, int) \
                    or entry[2] not in (0, 1):
                raise HypercallError(errno.EINVAL, "map: each entry is [domid, ref, readonly (bool or 0/1)]")
            domid, ref = int_tuple(entry[:2], 2, "map")
            ops.append((domid, ref, bool(entry[2])))
        results = self.hv.grant_map(_domain(conn), ops)
        fds = [r.frame for r in results if isinstance(r.frame, int)]    # descriptors: ProcFrames, kept by FrameFds
        return {"results": [[r.status, r.handle] for r in results]}, fds, []

    def _unmap(self, conn: Connection, args: dict[str, Any]) -> Reply:
        handles = [int_tuple([h], 1, "unmap")[0] for h in args["handles"]]
        return {"results": self.hv.grant_unmap(_domain(conn), handles)}, [], []

    def _replace_frames(self, conn: Connection, args: dict[str, Any]) -> Reply:
        gfns = [int_tuple([g], 1, "replace_frames")[0] for g in args["gfns"]]
        done, fds = self.hv.replace_frames(_domain(conn), gfns)
        return {"gfns": done}, fds, fds

    def _copy(self, conn: Connection, args: dict[str, Any]) -> Reply:
        return {"results": self.hv.grant_copy(_domain(conn), copy_columns(args["ops"]))}, [], []

    def _alloc_unbound(self, conn: Connection, args: dict[str, Any]) -> Reply:
        p = self.hv.evtchn_alloc_unbound(_domain(conn), _domid(args["remote_dom"]))
        return {"port": p.port}, [p.wait_fd, p.notify_fd], []

    def _bind_interdomain(self, conn: Connection, args: dict[str, Any]) -> Reply:
        p = self.hv.evtchn_bind_interdomain(_domain(conn), _domid(args["remote_dom"]), args["remote_port"])
        return {"port": p.port}, [p.wait_fd, p.notify_fd], []

    def _bind_virq(self, conn: Connection, args: dict[str, Any]) -> Reply:
        p = self.hv.evtchn_bind_virq(_domain(conn), args["virq"])
        return {"port": p.port}, [p.wait_fd], []

    def _close(self, conn: Connection, args: dict[str, Any]) -> Reply:
        self.hv.evtchn_close(_domain(conn), args["port"])
        return {}, [], []

    def _status(self, conn: Connection, args: dict[str, Any]) -> Reply:
        return self.hv.evtchn_status(_domain(conn), args["port"]), [], []

    def _send(self, conn: Connection, args: dict[str, Any]) -> Reply:
        self.hv.evtchn_send(_domain(conn), args["port"])
        return {}, [], []

    def _get_param(self, conn: Connection, args: dict[str, Any]) -> Reply:
        return {"value": self.hv.get_param(_domain(conn), args["index"])}, [], []

    def _evtchn_fds(self, conn: Connection, args: dict[str, Any]) -> Reply:
        p = self.hv.port_fds(_domain(conn), args["port"])
        fds = [p.wait_fd] + ([p.notify_fd] if p.notify_fd >= 0 else [])
        return {"port": p.port}, fds, []

    def _domain_info(self, conn: Connection, args: dict[str, Any]) -> Reply:
        dom = conn.domain
        assert dom is not None
        target = dom.domid if args["domid"] == DOMID_SELF else args["domid"]
        if target != dom.domid and not dom.privileged:
            raise HypercallError(errno.EPERM, "only a privileged domain asks about others")
        other = self.hv.domains.get(target)
        if other is None:
            raise HypercallError(errno.ESRCH, f"no domain {target}")
        # incarnation: how many times the domid was restarted, so that a
        # privileged caller (xenstored) can tell a restarted domain from the one it knew.
        return {"domid": other.domid, "name": other.name, "state": other.state,
                "incarnation": other.restarts}, [], []
