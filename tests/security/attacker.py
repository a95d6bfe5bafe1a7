"""A compromised domain: the domain agent (domains/agent.py) plus what an attacker inside a domain would run.

Started by tests/security as a real domain process under a uid of its own
(``deploy.launcher.start_domain_process``), driven one JSON line at a time
like the agent.  The attacks use only what a domain process has: its
hypercall connection (raw ``BrokerXenHost.call``), its grant table, its
memory region, ctypes, mmap with MAP_FIXED, fork, unix sockets.  Each
command reports what the kernel and the broker said (``errno`` 0 means the
step *succeeded*), never raises for a refusal: the test decides what a
refusal means.

Run as ``attacker.py hello-probe`` it only says hello with the token it was
given and prints the broker's reply (a process under the wrong uid trying
someone else's token).
"""

from __future__ import annotations

import array
import ctypes
import errno
import json
import os
import select
import signal
import socket
import sys
from typing import Any

import msgpack

from xdom.domains.abi.grant_table import PAGE_SIZE, GNTST_okay
from xdom.domains.abi.hypercall_wire import (
    MAX_FDS,
    MAX_MESSAGE,
    HypercallError,
    encode_request,
    pack_copy_segments,
    take_fds,
)
from xdom.domains.agent import DomainAgent

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
libc.unshare.argtypes = [ctypes.c_int]
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


libc.vmsplice.restype = ctypes.c_ssize_t
libc.vmsplice.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_uint]
libc.process_vm_writev.restype = ctypes.c_ssize_t
libc.process_vm_writev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                                   ctypes.c_ulong]

PROT_READ, PROT_WRITE = 1, 2
MAP_SHARED, MAP_FIXED = 0x01, 0x10
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MAP_FAILED = ctypes.c_void_p(-1).value
CLONE_NEWUSER = 0x10000000
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
F_ADD_SEALS, F_SEAL_WRITE, F_SEAL_FUTURE_WRITE = 1033, 0x0008, 0x0010
RW = PROT_READ | PROT_WRITE


def mmap(addr: int, prot: int, flags: int, fd: int) -> int:
    got = libc.mmap(addr or None, PAGE_SIZE, prot, flags, fd, 0)
    if got in (None, MAP_FAILED):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return got


def munmap(addr: int) -> None:
    libc.munmap(addr, PAGE_SIZE)


def _errno_of(fn: Any, *args: Any) -> int:
    """0 if ``fn(*args)`` succeeded, else the errno it failed with."""
    try:
        fn(*args)
        return 0
    except OSError as e:
        return e.errno or -1


def _in_child(fn: Any, timeout: float = 10.0) -> str:
    """Run ``fn`` in a forked child; what became of it: "exit N" or "signal NAME"."""
    try:
        pid = os.fork()
    except OSError as e:
        return f"fork refused: {errno.errorcode.get(e.errno, e.errno)}"
    if pid == 0:
        code = 0
        try:
            code = fn() or 0
        except BaseException:
            code = 99
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.WEXITSTATUS(status)}"


class Attacker(DomainAgent):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.hidden: dict[str, Any] = {}       # how -> what keeps the page (address, fd, child, socket)

    # ---- plumbing ------------------------------------------------------------------------------

    def addr(self, gfn: int) -> int:
        if not 0 <= gfn < self.h.memory.nr_frames:
            raise ValueError(f"gfn {gfn} is not ours")
        return self.h.memory.base + gfn * PAGE_SIZE

    def _map(self, domid: int, ref: int, ro: bool) -> tuple[int, int, int]:
        """One raw GNTTABOP_map_grant_ref: (status, handle, the frame fd or -1); we own the fd."""
        reply, fds = self.h.call("map", ops=[[domid, ref, bool(ro)]])   # type: ignore[attr-defined]
        status, handle = reply["results"][0]
        for extra in fds[1:]:
            os.close(extra)
        return status, handle, (fds[0] if fds else -1)

    def cmd_hypercall(self, name: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Any hypercall, raw: its reply (fds it brought are counted and closed) or its errno.

        A copy's ``ops`` come as rows [flags, sdom, sref, soff, ddom, dref, doff, len], packed here as
        Xen's struct gnttab_copy, or as hex: those bytes, whatever they are.
        """
        if name == "copy":
            ops = fields["ops"]
            fields = {**fields, "ops": bytes.fromhex(ops) if isinstance(ops, str) else pack_copy_segments(
                [(sref, sdom, soff, dref, ddom, doff, n, flags, 0) for flags, sdom, sref, soff, ddom, dref, doff, n in ops])}
        try:
            reply, fds = self.h.call(name, **fields)     # type: ignore[attr-defined]
        except HypercallError as e:
            return {"errno": e.name, "message": e.message}
        except (ConnectionError, OSError) as e:
            return {"errno": "hung up", "message": str(e)}
        for fd in fds:
            os.close(fd)
        return {"errno": None, "reply": {k: v for k, v in reply.items() if k != "ok"}, "fds": len(fds)}

    def cmd_write(self, gfn: int, data: str) -> dict[str, Any]:
        """Write at one of our gfns, by address: whatever is mapped there now."""
        raw = data.encode()
        ctypes.memmove(self.addr(gfn), raw, len(raw))
        return {}

    def cmd_peek_gfn(self, gfn: int, len: int) -> dict[str, Any]:     # noqa: A002
        return {"data": ctypes.string_at(self.addr(gfn), len).decode(errors="replace")}

    def cmd_grant_only(self, domid: int, gfn: int, ro: bool = False) -> dict[str, Any]:
        """Grant a gfn without touching it (what is mapped there may not be writable)."""
        return {"ref": self.h.gnttab.grant_access(domid, gfn, ro)}

    # ---- attack 1: someone else's page over one of our gfns, then granted on ---------------------

    def cmd_overlay(self, domid: int, ref: int, ro: bool, gfn: int) -> dict[str, Any]:
        """Map a grant and put the page over our own gfn with MAP_FIXED (the frame there is gone)."""
        status, handle, fd = self._map(domid, ref, ro)
        if status != GNTST_okay:
            return {"status": status}
        try:
            mmap(self.addr(gfn), PROT_READ | (0 if ro else PROT_WRITE), MAP_SHARED | MAP_FIXED, fd)
        finally:
            os.close(fd)
        seen = ctypes.string_at(self.addr(gfn), 64).decode(errors="replace")
        return {"status": status, "handle": handle, "seen": seen}

    def cmd_map_and_write(self, domid: int, ref: int, data: str) -> dict[str, Any]:
        """Map a grant writable and write ``data`` through it."""
        status, handle, fd = self._map(domid, ref, False)
        if status != GNTST_okay:
            return {"status": status, "wrote": False}
        try:
            addr = mmap(0, RW, MAP_SHARED, fd)
        except OSError as e:
            return {"status": status, "handle": handle, "wrote": False, "mmap_errno": e.errno}
        finally:
            os.close(fd)
        raw = data.encode()
        ctypes.memmove(addr, raw, len(raw))
        munmap(addr)
        return {"status": status, "handle": handle, "wrote": True}

    # ---- attack 2: keep a writable page while telling the broker it is unmapped ------------------

    def cmd_hide(self, domid: int, ref: int, how: str, gfn: int = 0, ro: bool = False,
                 unmap: bool = True) -> dict[str, Any]:
        """Map ``ref``, keep the page ``how``, unmap the ordinary mapping and claim "unmapped".

        mmap: a second mapping of the frame fd over our own gfn; mremap: the
        mapping moved onto our own gfn; fd: a dup of the frame fd; fork: a
        child that inherited the mapping; inflight: the frame fd parked in a
        unix socket's queue (in no fd table, in no address space); vmsplice:
        the page itself referenced by a pipe of ours (no mapping, no fd).
        Without ``unmap`` the claim is left for later (a raw "unmap" hypercall).
        """
        status, handle, fd = self._map(domid, ref, ro)
        if status != GNTST_okay:
            return {"status": status}
        setup = "ok"
        prot = PROT_READ if ro else RW
        addr = mmap(0, prot, MAP_SHARED, fd)
        try:
            if how == "mmap":
                mmap(self.addr(gfn), prot, MAP_SHARED | MAP_FIXED, fd)
                self.hidden[how] = self.addr(gfn)
            elif how == "mremap":
                moved = libc.mremap(addr, PAGE_SIZE, PAGE_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, self.addr(gfn))
                if moved in (None, MAP_FAILED):
                    setup = f"mremap: {os.strerror(ctypes.get_errno())}"
                else:
                    addr = 0
                    self.hidden[how] = moved
            elif how == "fd":
                self.hidden[how] = os.dup(fd)
            elif how == "fork":
                setup = self._fork_keeper(addr, fd)
            elif how == "vmsplice":
                r, w = os.pipe()
                iov = _IoVec(addr, PAGE_SIZE)
                if libc.vmsplice(w, ctypes.byref(iov), 1, 0) != PAGE_SIZE:
                    raise OSError(ctypes.get_errno(), "vmsplice")
                self.hidden[how] = (r, w)
            elif how == "inflight":
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                a.sendmsg([b"page"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
                self.hidden[how] = (a, b)
            else:
                raise ValueError(how)
        except OSError as e:
            setup = f"{how}: {errno.errorcode.get(e.errno or 0, e.errno)}"
        os.close(fd)
        if addr:
            munmap(addr)
        if not unmap:
            return {"status": status, "handle": handle, "setup": setup}
        reply, _ = self.h.call("unmap", handles=[handle])   # type: ignore[attr-defined]
        return {"status": status, "handle": handle, "setup": setup, "unmap": reply["results"][0]}

    def _fork_keeper(self, addr: int, fd: int) -> str:
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:        # the keeper: holds the inherited mapping (not the fd), writes what it is told, exits
            os.close(fd)
            os.close(cmd_w)
            os.close(res_r)
            data = os.read(cmd_r, PAGE_SIZE)
            if data:
                ctypes.memmove(addr, data, len(data))
                os.write(res_w, b"done")
            os._exit(0)
        os.close(cmd_r)
        os.close(res_w)
        self.hidden["fork"] = (pid, cmd_w, res_r)
        return "ok"

    def cmd_hidden_read(self, how: str, len: int) -> dict[str, Any]:     # noqa: A002
        """Read the page kept by :meth:`cmd_hide` (vmsplice: what the pipe holds now)."""
        r, w = self.hidden.pop(how)
        data = os.read(r, len)
        os.close(r)
        os.close(w)
        return {"data": data.decode(errors="replace")}

    def cmd_hidden_write(self, how: str, data: str) -> dict[str, Any]:
        """Write ``data`` into the page kept by :meth:`cmd_hide`."""
        raw = data.encode()
        kept = self.hidden.pop(how)
        if how in ("mmap", "mremap"):
            ctypes.memmove(kept, raw, len(raw))
            return {"wrote": True}
        if how == "fork":
            pid, cmd_w, res_r = kept
            os.write(cmd_w, raw)
            r, _, _ = select.select([res_r], [], [], 10)
            done = bool(r) and os.read(res_r, 4) == b"done"
            os.close(cmd_w)
            os.close(res_r)
            os.waitpid(pid, 0)
            return {"wrote": done}
        if how == "fd":
            fd = kept
        else:
            a, b = kept
            _, anc, _, _ = b.recvmsg(16, socket.CMSG_SPACE(4))
            a.close()
            b.close()
            fds = take_fds(anc)
            if not fds:
                return {"wrote": False}
            fd = fds[0]
        try:
            addr = mmap(0, RW, MAP_SHARED, fd)
        finally:
            os.close(fd)
        ctypes.memmove(addr, raw, len(raw))
        munmap(addr)
        return {"wrote": True}

    # ---- read-only mappings: every way to write one ---------------------------------------------

    def cmd_write_read_only(self, domid: int, ref: int, data: str) -> dict[str, Any]:
        """Map ``ref`` read-only and try to write ``data`` into the page every way a process can.

        Each entry is 0 if that way *worked*, else the errno (or how a child died).
        """
        status, handle, fd = self._map(domid, ref, True)
        if status != GNTST_okay:
            return {"status": status}
        raw = data.encode()
        out: dict[str, Any] = {"status": status, "handle": handle}
        addr = mmap(0, PROT_READ, MAP_SHARED, fd)

        def map_writable() -> None:
            munmap(mmap(0, RW, MAP_SHARED, fd))

        def mprotect() -> None:
            if libc.mprotect(addr, PAGE_SIZE, RW) != 0:
                raise OSError(ctypes.get_errno(), "mprotect")
            ctypes.memmove(addr, raw, len(raw))

        def reopen(path: str) -> None:
            wfd = os.open(path, os.O_RDWR)
            try:
                os.pwrite(wfd, raw, 0)
            finally:
                os.close(wfd)

        def proc_mem() -> None:
            mem = os.open("/proc/self/mem", os.O_RDWR)
            try:
                if os.pwrite(mem, raw, addr) != len(raw):
                    raise OSError(errno.EIO, "short write")
            finally:
                os.close(mem)

        def vm_writev() -> None:
            buf = ctypes.create_string_buffer(raw)
            local, remote = _IoVec(ctypes.addressof(buf), len(raw)), _IoVec(addr, len(raw))
            if libc.process_vm_writev(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) < 0:
                raise OSError(ctypes.get_errno(), "process_vm_writev")

        def punch() -> None:
            if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, PAGE_SIZE) != 0:
                raise OSError(ctypes.get_errno(), "fallocate")

        out["mmap_writable"] = _errno_of(map_writable)
        out["mprotect"] = _errno_of(mprotect)
        out["reopen_proc_fd"] = _errno_of(reopen, f"/proc/self/fd/{fd}")
        out["reopen_map_files"] = _errno_of(reopen, f"/proc/self/map_files/{addr:x}-{addr + PAGE_SIZE:x}")
        out["proc_self_mem"] = _errno_of(proc_mem)
        out["process_vm_writev"] = _errno_of(vm_writev)
        out["pwrite_fd"] = _errno_of(os.pwrite, fd, raw, 0)
        out["punch_hole"] = _errno_of(punch)
        out["ftruncate"] = _errno_of(os.ftruncate, fd, 0)

        def userns_reopen() -> int:      # root of a user namespace of our own: no override of others' files
            if libc.unshare(CLONE_NEWUSER) != 0:
                return 100 + ctypes.get_errno() % 100
            try:
                reopen(f"/proc/self/fd/{fd}")
            except OSError as e:
                return e.errno or 1
            return 0

        out["reopen_in_user_namespace"] = _in_child(userns_reopen)

        def store() -> int:
            ctypes.memmove(addr, raw, len(raw))
            return 0

        out["store_instruction"] = _in_child(store)
        munmap(addr)
        os.close(fd)
        reply, _ = self.h.call("unmap", handles=[handle])   # type: ignore[attr-defined]
        out["unmap"] = reply["results"][0]
        return out

    # ---- a writable grant's frame fd, abused as a file ---------------------------------------

    def cmd_abuse_frame_fd(self, domid: int, ref: int) -> dict[str, Any]:
        """With a writable grant's frame fd: seal it, chmod it, grow it, shrink it (0 = it worked)."""
        status, handle, fd = self._map(domid, ref, False)
        if status != GNTST_okay:
            return {"status": status}
        out: dict[str, Any] = {"status": status, "handle": handle}
        out["add_seals"] = _errno_of(lambda: __import__("fcntl").fcntl(fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE))
        out["fchmod"] = _errno_of(os.fchmod, fd, 0o666)
        out["grow"] = _errno_of(os.ftruncate, fd, 2 * PAGE_SIZE)
        out["shrink"] = _errno_of(os.ftruncate, fd, 0)
        os.close(fd)
        reply, _ = self.h.call("unmap", handles=[handle])   # type: ignore[attr-defined]
        out["unmap"] = reply["results"][0]
        return out

    def cmd_truncate_grant_table(self) -> dict[str, Any]:
        """Shrink the grant table memfd the broker shares with us (we never touch our table again)."""
        fd = self.h.gnttab.fd
        return {"shrink": _errno_of(os.ftruncate, fd, 0)}

    # ---- the hypercall connection itself ------------------------------------------------------

    def _raw(self, payload: bytes, fds: list[int] | None = None) -> dict[str, Any]:
        sock = self.h._sock       # type: ignore[attr-defined]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sock.sendmsg([payload], anc)
        data, anc, _, _ = sock.recvmsg(MAX_MESSAGE + 1, socket.CMSG_SPACE(MAX_FDS * 4))
        for fd in take_fds(anc):
            os.close(fd)
        if not data:
            return {"closed": True}
        return msgpack.unpackb(data, raw=False)

    def cmd_bad_frames(self) -> dict[str, Any]:
        """Undecodable and misshapen frames, and frames carrying descriptors: the broker's answers."""
        out: dict[str, Any] = {"answers": []}
        for payload in (b"\xc1", b"\x92\x01", msgpack.packb([1, 2]), msgpack.packb({"op": "nope"}),
                        msgpack.packb({"op": "map", "ops": "x"}), msgpack.packb({"op": "map", "ops": [[0, 0]]}),
                        msgpack.packb({"op": "copy", "ops": [[0] * 9]}), b"\x91" * 3000 + b"\xc0",
                        msgpack.packb({"op": "domain_info", "domid": 0x7FF0, "caller": 0})):
            out["answers"].append(self._raw(payload).get("errno"))
        rfd, wfd = os.pipe()
        valid = encode_request("domain_info", domid=0x7FF0)
        out["with_fds"] = self._raw(valid, [wfd, wfd, wfd]).get("errno")
        os.close(wfd)
        r, _, _ = select.select([rfd], [], [], 10)
        out["fds_released"] = bool(r) and os.read(rfd, 1) == b""
        os.close(rfd)
        out["still_served"] = self._raw(valid).get("domid")
        return out

    def cmd_hello_again(self, token: str) -> dict[str, Any]:
        """hello on our own, introduced connection."""
        return {"errno": self._raw(encode_request("hello", token=token)).get("errno")}

    def cmd_hello_fresh(self, token: str) -> dict[str, Any]:
        """hello on a new connection of ours."""
        return _hello(os.environ["XDOM_HYPERCALL"], token)

    # ---- exhaustion ------------------------------------------------------------------------------

    def cmd_flood_ports(self, remote: int, limit: int) -> dict[str, Any]:
        """Allocate unbound ports (closing the eventfds we are sent) until refused or ``limit``."""
        n = 0
        while n < limit:
            try:
                _reply, fds = self.h.call("evtchn_alloc_unbound", remote_dom=remote)   # type: ignore[attr-defined]
            except HypercallError as e:
                return {"ports": n, "errno": e.name, "message": e.message}
            except (ConnectionError, OSError) as e:
                return {"ports": n, "errno": "hung up", "message": str(e)}
            for fd in fds:
                os.close(fd)
            n += 1
        return {"ports": n, "errno": None}

    def cmd_flood_maps(self, domid: int, ref: int, limit: int) -> dict[str, Any]:
        """Map one grant again and again, never unmapping (closing the fds), until refused or ``limit``."""
        n = 0
        while n < limit:
            batch = min(128, limit - n)
            try:
                reply, fds = self.h.call("map", ops=[[domid, ref, True]] * batch)   # type: ignore[attr-defined]
            except HypercallError as e:
                return {"maps": n, "errno": e.name}
            for fd in fds:
                os.close(fd)
            for status, _handle in reply["results"]:
                if status != GNTST_okay:
                    return {"maps": n, "status": status}
                n += 1
        return {"maps": n, "status": None}

    def cmd_flood_connections(self, count: int) -> dict[str, Any]:
        """Open connections to the hypercall socket that never say hello; keep them."""
        socks = self.hidden.setdefault("conns", [])
        try:
            for _ in range(count):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
                socks.append(s)
                s.connect(os.environ["XDOM_HYPERCALL"])
        except OSError as e:
            return {"opened": len(socks) - 1, "errno": errno.errorcode.get(e.errno or 0)}
        return {"opened": len(socks), "errno": None}


def _hello(path: str, token: str) -> dict[str, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(20)
        s.connect(path)
        s.sendmsg([encode_request("hello", token=token)])
        data, anc, _, _ = s.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4))
        for fd in take_fds(anc):
            os.close(fd)
    finally:
        s.close()
    if not data:
        return {"errno": "closed"}
    reply = msgpack.unpackb(data, raw=False)
    return {"errno": None if reply.get("ok") else reply.get("errno"), "domid": reply.get("domid")}


def main() -> None:
    if sys.argv[1:] == ["hello-probe"]:
        print(json.dumps({"uid": os.getuid(), **_hello(os.environ["XDOM_HYPERCALL"], os.environ["XDOM_TOKEN"])}),
              flush=True)
        return
    from xdom.domains.xenhost import connect
    Attacker(connect()).run()


if __name__ == "__main__":
    main()
