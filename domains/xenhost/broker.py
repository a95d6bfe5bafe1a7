"""The real xenhost: this domain is a process talking to the broker.

At start the domain connects to the broker's hypercall socket, proves who
it is with the one-time token the toolstack handed it (``hello``), maps the
grant table the broker shares with it, allocates its memory frames and
registers them (``set_memory``).  From then on grants and event channels
are hypercalls on this one connection, and notifications are eventfd
writes that never touch the broker.

If the broker dies, notifications go on (they never touched it) and the
next hypercall waits: the domain connects again, as often as it takes for
up to ``XDOM_BROKER_PATIENCE`` seconds, and ``rejoin``s a broker that took
over from the dead one, with the key the dead one gave it at hello; then it
sends its request again, with the same sequence number, so that one the
dead broker carried out is answered, not done twice.  To the domain's
drivers a broker restart is a slow hypercall.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..abi.grant_table import PAGE_SIZE, GNTST_okay
from ..abi.hypercall_wire import (
    MAX_BATCH,
    MAX_FDS,
    MAX_MESSAGE,
    HypercallError,
    decode_reply,
    encode_request,
    pack_copy_segments,
    take_fds,
)
from ..grant_table import GrantTable
from ..hostsys import sysmem
from ..hostsys.grant_window import GrantWindow
from ..hostsys.memory import POPULATE_BATCH, DomainMemory
from .base import CopyOp, EventChannels, GrantMapping, MapResult, XenHost

ENV_PATIENCE = "XDOM_BROKER_PATIENCE"
DEFAULT_PATIENCE = 60.0      # seconds a domain waits for a broker to come back
log = logging.getLogger("xdom.xenhost")

ENV_SOCKET = "XDOM_HYPERCALL"
ENV_TOKEN = "XDOM_TOKEN"


class BrokerXenHost(XenHost):
    def __init__(self, path: str, token: str) -> None:
        self._lock = threading.Lock()
        self._path = path
        self._seq = 0
        self._rejoin_key = ""          # set once this domain runs: what a broker taking over recognises us by
        self.broker_restarts = 0       # how many times this domain rejoined a new broker
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._sock.connect(path)
        hello, fds = self.call("hello", token=token)
        self.domid: int = hello["domid"]
        self.name: str = hello["name"]
        self.privileged: bool = hello["privileged"]
        self.gnttab = GrantTable(fds[0], hello["grant_frames"])
        self.memory = DomainMemory(hello["nr_frames"], self._populate, batch=POPULATE_BATCH)
        self.call("set_memory", base=self.memory.base)
        self._rejoin_key = hello.get("rejoin_key", "")
        self.gnttab.on_revoked = self._renew_frame
        self.evtchn = EventChannels()
        self._maps: dict[int, tuple[int, GrantMapping]] = {}   # handle -> (addr, mapping)

    def call(self, op: str, **fields: Any) -> tuple[dict[str, Any], list[int]]:
        """One hypercall: returns the reply fields and the fds that came with it."""
        with self._lock:
            self._seq += 1
            msg = encode_request(op, seq=self._seq, **fields)
            while True:
                try:
                    self._sock.sendmsg([msg])
                    data, anc, _flags, _ = self._sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4))
                except OSError as e:
                    if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                        raise
                    data, anc = b"", []
                fds = take_fds(anc)
                if data:
                    break
                for fd in fds:
                    os.close(fd)
                if not self._rejoin_key:
                    raise ConnectionError("the broker closed the hypercall connection")
                self._rejoin()
        try:
            return decode_reply(data), fds
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def _rejoin(self) -> None:
        """The broker is gone: wait for one that took over, and rejoin it (the call lock is held)."""
        self._sock.close()
        patience = float(os.environ.get(ENV_PATIENCE, DEFAULT_PATIENCE))
        deadline = time.monotonic() + patience
        delay = 0.005
        log.warning("domain %d: the broker is gone; waiting up to %gs for one to rejoin", self.domid, patience)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self._path)
                sock.sendmsg([encode_request("rejoin", domid=self.domid, key=self._rejoin_key)])
                data, anc, _flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4))
                for fd in take_fds(anc):
                    os.close(fd)
                if data:
                    decode_reply(data)          # raises HypercallError if we are refused
                    self._sock = sock
                    self.broker_restarts += 1
                    log.warning("domain %d: rejoined a new broker", self.domid)
                    return
            except HypercallError as e:
                sock.close()
                raise ConnectionError(f"the new broker does not take domain {self.domid} back: {e}") from None
            except OSError:
                pass
            sock.close()
            if time.monotonic() > deadline:
                raise ConnectionError(f"no broker came back within {patience:g}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _populate(self, start: int, count: int) -> list[int]:
        """The broker's frames start..start+count-1, to map as our memory."""
        _reply, fds = self.call("populate_physmap", start=start, count=count)
        return fds

    def _renew_frame(self, gfn: int) -> None:
        """A grantee was given frame ``gfn`` and may still hold it: take a fresh one.

        The new frame gets the old contents and is mapped over the old at
        the same address (views into our memory stay valid); whatever the
        grantee kept is the old page, which we never touch again.
        """
        reply, fds = self.call("replace_frames", gfns=[gfn])
        try:
            for g, fd in zip(reply["gfns"], fds):
                os.pwrite(fd, self.memory.frame(g), 0)
                sysmem.mmap(self.memory.frame_address(g), PAGE_SIZE, sysmem.PROT_READ | sysmem.PROT_WRITE,
                            sysmem.MAP_SHARED | sysmem.MAP_FIXED, fd, 0)
        finally:
            for fd in fds:
                os.close(fd)

    # ---- grants -------------------------------------------------------------

    def map_grants(self, ops: Sequence[tuple[int, int, bool]], window: GrantWindow | None = None) -> list[MapResult]:
        out: list[MapResult] = []
        for start in range(0, len(ops), MAX_BATCH):
            batch = ops[start:start + MAX_BATCH]
            reply, fds = self.call("map", ops=[[d, r, bool(ro)] for d, r, ro in batch])
            fd_iter = iter(fds)
            for (domid, ref, ro), (status, handle) in zip(batch, reply["results"]):
                if status != GNTST_okay:
                    out.append(MapResult(status))
                    continue
                fd = next(fd_iter)
                at = window.address(ref) if window is not None else None
                try:
                    prot = sysmem.PROT_READ | (0 if ro else sysmem.PROT_WRITE)
                    if at is None:
                        addr = sysmem.mmap(0, PAGE_SIZE, prot, sysmem.MAP_SHARED, fd, 0)
                    else:           # over the window's reserved page: one call, never a hole
                        assert window is not None
                        try:
                            addr = sysmem.mmap(at, PAGE_SIZE, prot, sysmem.MAP_SHARED | sysmem.MAP_FIXED, fd, 0)
                        except OSError:
                            window.lost(ref)
                            raise
                        window.place(ref)
                finally:
                    os.close(fd)
                m = GrantMapping(domid, ref, bool(ro), handle, sysmem.view(addr, PAGE_SIZE, readonly=bool(ro)),
                                 window if at is not None else None)
                self._maps[handle] = (addr, m)
                out.append(MapResult(status, m))
            for fd in fd_iter:   # only if the broker sent more than it said
                os.close(fd)
        return out

    def unmap_grants(self, mappings: Sequence[GrantMapping]) -> list[int]:
        handles = []
        for m in mappings:
            entry = self._maps.pop(m.handle, None)
            if entry is not None and m.live:
                m.view.release()     # raises BufferError while someone exports it: keep the page then
                m.live = False
                _unmap_page(entry[0], m)
            handles.append(m.handle)
        out: list[int] = []
        for start in range(0, len(handles), MAX_BATCH):
            reply, _ = self.call("unmap", handles=handles[start:start + MAX_BATCH])
            out.extend(reply["results"])
        return out

    def copy_grants(self, ops: Sequence[CopyOp]) -> list[int]:
        out: list[int] = []
        for start in range(0, len(ops), MAX_BATCH):
            reply, _ = self.call("copy", ops=pack_copy_segments(ops[start:start + MAX_BATCH]))
            out.extend(reply["results"])
        return out

    # ---- event channels -----------------------------------------------------

    def _bound(self, reply: dict[str, Any], fds: list[int]) -> int:
        port = reply["port"]
        self.evtchn.add(port, fds[0], fds[1] if len(fds) > 1 else -1)
        return port

    def alloc_unbound(self, remote_domid: int) -> int:
        return self._bound(*self.call("evtchn_alloc_unbound", remote_dom=remote_domid))

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        return self._bound(*self.call("evtchn_bind_interdomain", remote_dom=remote_domid, remote_port=remote_port))

    def bind_virq(self, virq: int) -> int:
        return self._bound(*self.call("evtchn_bind_virq", virq=virq))

    def adopt_port(self, port: int) -> int:
        return self._bound(*self.call("evtchn_fds", port=port))

    def get_param(self, index: int) -> int:
        reply, _ = self.call("get_param", index=index)
        return reply["value"]

    def close_port(self, port: int) -> None:
        self.call("evtchn_close", port=port)
        self.evtchn.remove(port)

    def port_status(self, port: int) -> dict[str, int]:
        reply, _ = self.call("evtchn_status", port=port)
        return {k: reply[k] for k in ("status", "remote_dom", "remote_port", "virq")}

    def domain_info(self, domid: int) -> dict[str, Any]:
        reply, _ = self.call("domain_info", domid=domid)
        return {k: reply[k] for k in ("domid", "name", "state", "incarnation")}

    # ---- lifecycle ----------------------------------------------------------

    def shutdown(self, reason: str = "poweroff") -> None:
        self.call("shutdown", reason=reason)
        # This memory has no future: nothing private will be put in a page again, so the devices'
        # teardown ends its grants without taking fresh frames (a replace_frames hypercall a page:
        # some 500 for a vif, which made stopping 100 guests take 25 s).
        self.gnttab.on_revoked = None

    def close(self) -> None:
        """Drop the connection; to the broker this domain is now gone."""
        if self._sock.fileno() < 0:
            return
        self._sock.close()
        self.evtchn.close()
        for addr, m in self._maps.values():
            try:
                m.view.release()
            except BufferError:
                continue
            _unmap_page(addr, m)
        self._maps.clear()
        self.gnttab.close()
        self.memory.close()


def _unmap_page(addr: int, m: GrantMapping) -> None:
    """A mapped page gone: back into its window's reservation, or unmapped."""
    if m.window is not None:
        m.window.unplace(m.ref)
    else:
        sysmem.munmap(addr, PAGE_SIZE)


def connect(path: str | None = None, token: str | None = None) -> BrokerXenHost:
    """Connect as the domain the toolstack started us as (env XDOM_HYPERCALL, XDOM_TOKEN)."""
    path = path or os.environ.get(ENV_SOCKET)
    token = token or os.environ.get(ENV_TOKEN)
    if not path or not token:
        raise RuntimeError(f"not started as a domain: {ENV_SOCKET} and {ENV_TOKEN} must be set")
    os.environ.pop(ENV_TOKEN, None)   # one use only; keep it out of children
    _make_non_dumpable()
    return BrokerXenHost(path, token)


def _make_non_dumpable() -> None:
    """A domain's memory is its own: no core dumps, no ptrace by same-uid peers,
    /proc/<pid> owned by root (the broker, as root, still reaches its frames).

    Done here, by the domain process itself: the toolstack's exec wrapper cannot
    do it for it, because execve() resets the flag to 1 for an ordinary program
    (checked on this host's kernel).  A domain that cannot drop it does not run.
    """
    import ctypes
    PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(err)}; a domain must not be dumpable")
    if libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise RuntimeError("prctl(PR_SET_DUMPABLE, 0) did not take effect; a domain must not be dumpable")
