"""A domain process under remote control, for multi-process tests.

Started by deploy.launcher.spawn_domain with XDOM_HYPERCALL/XDOM_TOKEN set;
reads one JSON command per line on stdin and answers one JSON line on
stdout.  Some commands misbehave on purpose (writing through a read-only
mapping, keeping a page while claiming to have unmapped it).
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import sys
import time

from xdom.domains import sysmem
from xdom.domains.abi.grant_table import PAGE_SIZE
from xdom.domains.xenhost import connect


libc = ctypes.CDLL(None, use_errno=True)
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]


def main() -> None:
    h = connect()
    maps = {}
    kept = []

    def out(**kw: object) -> None:
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()

    out(domid=h.domid, pid=os.getpid())
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "grant":
            h.memory.frame(cmd["gfn"])[:len(cmd.get("data", ""))] = cmd.get("data", "").encode()
            out(ref=h.gnttab.grant_access(cmd["domid"], cmd["gfn"], cmd.get("ro", False)))
        elif op == "end":
            out(ok=h.gnttab.try_end_access(cmd["ref"]))
        elif op == "read_u64":
            out(value=int.from_bytes(h.memory.frame(cmd["gfn"])[:8], "little"))
        elif op == "read":
            out(data=bytes(h.memory.frame(cmd["gfn"])[:cmd["len"]]).decode(errors="replace"))
        elif op == "map":
            res = h.map_grants([(cmd["domid"], r, cmd.get("ro", False)) for r in cmd["refs"]])
            for r in res:
                if r.mapping is not None:
                    maps[r.mapping.handle] = r.mapping
            out(results=[[r.status, r.mapping.handle if r.mapping else 0] for r in res])
        elif op == "peek":
            m = maps[cmd["handle"]]
            out(data=bytes(m.view[:cmd["len"]]).decode(errors="replace"))
        elif op == "poke":
            m = maps[cmd["handle"]]
            data = cmd["data"].encode()
            # bypass the memoryview's read-only flag: the kernel must refuse
            addr = h._maps[m.handle][0]
            ctypes.memmove(addr, data, len(data))
            out(ok=True)
        elif op == "mprotect":
            addr = h._maps[cmd["handle"]][0]
            try:
                sysmem.mprotect(addr, PAGE_SIZE, sysmem.PROT_READ | sysmem.PROT_WRITE)
                out(errno=0)
            except OSError as e:
                out(errno=e.errno)
        elif op == "raw_map_write":
            # ask for the fd ourselves and try to map it writable
            reply, fds = h.call("map", ops=[[cmd["domid"], cmd["ref"], True]])
            errs = []
            for fd in fds:
                try:
                    sysmem.munmap(sysmem.mmap(0, PAGE_SIZE, sysmem.PROT_READ | sysmem.PROT_WRITE,
                                              sysmem.MAP_SHARED, fd, 0), PAGE_SIZE)
                    errs.append(0)
                except OSError as e:
                    errs.append(e.errno)
                try:
                    os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDWR))
                    errs.append(0)
                except OSError as e:
                    errs.append(e.errno)
                os.close(fd)
            h.call("unmap", handles=[hd for st, hd in reply["results"] if st == 0])
            out(results=reply["results"], errnos=errs)
        elif op == "unmap":
            ms = [maps.pop(hd) for hd in cmd["handles"]]
            out(results=h.unmap_grants(ms))
        elif op == "unmap_but_keep":
            # hostile: duplicate the mapping (mremap with old_size 0 makes a
            # second mapping of the same shared page), drop the original,
            # then claim the grant is unmapped
            m = maps[cmd["handle"]]
            addr = h._maps[m.handle][0]
            new = libc.mremap(addr, 0, PAGE_SIZE, 1)   # MREMAP_MAYMOVE
            m.view.release()
            sysmem.munmap(addr, PAGE_SIZE)
            reply, _ = h.call("unmap", handles=[m.handle])
            kept.append(new)
            out(results=reply["results"], duplicated=new not in (None, ctypes.c_void_p(-1).value))
        elif op == "drop_kept":
            for addr in kept:
                sysmem.munmap(addr, PAGE_SIZE)
            kept.clear()
            reply, _ = h.call("unmap", handles=cmd["handles"])
            out(results=reply["results"])
        elif op == "alloc_unbound":
            out(port=h.alloc_unbound(cmd["remote"]))
        elif op == "bind":
            port = h.bind_interdomain(cmd["remote"], cmd["port"])
            h.evtchn.wait(0)
            out(port=port)
        elif op == "bind_virq":
            out(port=h.bind_virq(cmd["virq"]))
        elif op == "wait":
            out(ports=h.evtchn.wait(cmd["secs"]))
        elif op == "pingpong":
            # answer every event on port with a notify, n times
            port, n = cmd["port"], cmd["n"]
            start = time.monotonic()
            for _ in range(n):
                if cmd["first"]:
                    h.notify(port)
                    while not h.evtchn.wait(5):
                        pass
                else:
                    while not h.evtchn.wait(5):
                        pass
                    h.notify(port)
            out(elapsed=time.monotonic() - start)
        elif op == "torture_granter":
            out(**torture_granter(h, cmd["grantee"], cmd["ref"], cmd["gfn"], cmd["rounds"]))
        elif op == "torture_grantee":
            out(**torture_grantee(h, cmd["granter"], cmd["ref"], cmd["seconds"]))
        elif op == "quit":
            out(ok=True)
            break
        else:
            out(error=f"unknown op {op}")


def _increment(page: memoryview) -> None:
    """A deliberately non-atomic read-modify-write of the u64 at offset 0."""
    value = int.from_bytes(page[:8], "little")
    for _ in range(20):      # widen the window between read and write
        pass
    page[:8] = (value + 1).to_bytes(8, "little")


def torture_granter(h, grantee: int, ref: int, gfn: int, rounds: int) -> dict:
    """Grant, then end access as soon as the grantee lets go; own the page in between."""
    page = h.memory.frame(gfn)
    busy = incs = 0
    for _ in range(rounds):
        h.gnttab.grant_access_ref(ref, grantee, gfn)
        hold = time.perf_counter() + random.random() * 0.0005   # give the grantee a chance
        while time.perf_counter() < hold:
            pass
        while not h.gnttab.try_end_access(ref):
            busy += 1
        _increment(page)      # the page is ours alone now
        incs += 1
    h.gnttab.grant_access_ref(ref + 1, grantee, gfn, readonly=True)   # tells the grantee to stop
    return {"incs": incs, "busy": busy}


def torture_grantee(h, granter: int, ref: int, seconds: float) -> dict:
    """Map whenever the grant is there, increment while mapped, unmap."""
    from xdom.domains.abi.grant_table import GNTST_okay
    incs = failed_maps = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        (res,) = h.map_grants([(granter, ref, False)])
        if res.mapping is None:
            failed_maps += 1
            if failed_maps % 16 == 0:
                (stop,) = h.map_grants([(granter, ref + 1, True)])
                if stop.mapping is not None:       # the granter's stop signal
                    h.unmap_grants([stop.mapping])
                    break
            continue
        _increment(res.mapping.view)
        incs += 1
        assert h.unmap_grants([res.mapping]) == [GNTST_okay]
    return {"incs": incs, "failed_maps": failed_maps}


if __name__ == "__main__":
    main()
