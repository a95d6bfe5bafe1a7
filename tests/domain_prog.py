"""The domain agent plus commands that misbehave on purpose, for tests.

Writing through a read-only mapping, asking for a frame fd and trying to
map it writable, keeping a page while claiming to have unmapped it, and
the two halves of the grant torture test.
"""

from __future__ import annotations

import ctypes
import os
import random
import time
from typing import Any

from xdom.domains.abi.grant_table import PAGE_SIZE, GNTST_okay
from xdom.domains.agent import DomainAgent
from xdom.domains.hostsys import sysmem
from xdom.domains.xenhost import connect

libc = ctypes.CDLL(None, use_errno=True)
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
MREMAP_MAYMOVE = 1


class HostileAgent(DomainAgent):
    kept: list[int] = []

    def _addr(self, handle: int) -> int:
        return self.h._maps[handle][0]   # type: ignore[attr-defined]

    def cmd_poke(self, handle: int, data: str) -> dict[str, Any]:
        """Write through a mapping behind the memoryview's back: the kernel must refuse."""
        raw = data.encode()
        ctypes.memmove(self._addr(handle), raw, len(raw))
        return {"ok": True}

    def cmd_mprotect(self, handle: int) -> dict[str, Any]:
        try:
            sysmem.mprotect(self._addr(handle), PAGE_SIZE, sysmem.PROT_READ | sysmem.PROT_WRITE)
            return {"errno": 0}
        except OSError as e:
            return {"errno": e.errno}

    def cmd_raw_map_write(self, domid: int, ref: int) -> dict[str, Any]:
        """Take the frame fd of a read-only map and try to make it writable two ways."""
        reply, fds = self.h.call("map", ops=[[domid, ref, True]])   # type: ignore[attr-defined]
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
        self.h.call("unmap", handles=[hd for st, hd in reply["results"] if st == 0])  # type: ignore[attr-defined]
        return {"results": reply["results"], "errnos": errs}

    def cmd_unmap_but_keep(self, handle: int) -> dict[str, Any]:
        """Duplicate the mapping (mremap, old_size 0), drop the original, claim it is unmapped."""
        m = self.maps[handle]
        addr = self._addr(handle)
        new = libc.mremap(addr, 0, PAGE_SIZE, MREMAP_MAYMOVE)
        m.view.release()
        sysmem.munmap(addr, PAGE_SIZE)
        reply, _ = self.h.call("unmap", handles=[handle])   # type: ignore[attr-defined]
        self.kept.append(new)
        return {"results": reply["results"], "duplicated": new not in (None, ctypes.c_void_p(-1).value)}

    def cmd_drop_kept(self, handles: list[int]) -> dict[str, Any]:
        for addr in self.kept:
            sysmem.munmap(addr, PAGE_SIZE)
        self.kept.clear()
        reply, _ = self.h.call("unmap", handles=handles)   # type: ignore[attr-defined]
        return {"results": reply["results"]}

    def cmd_xs_break_ring(self) -> dict[str, Any]:
        """Publish a request producer index far past the ring size, then look at the error field."""
        import struct

        from xdom.domains.abi.hvm_params import HVM_PARAM_STORE_EVTCHN, HVM_PARAM_STORE_PFN
        from xdom.domains.abi.xs_wire import RING_ERROR, RING_REQ_CONS, RING_REQ_PROD
        page = self.h.memory.frame(self.h.get_param(HVM_PARAM_STORE_PFN))
        port = self.h.adopt_port(self.h.get_param(HVM_PARAM_STORE_EVTCHN))
        cons = struct.unpack_from("<I", page, RING_REQ_CONS)[0]
        struct.pack_into("<I", page, RING_REQ_PROD, (cons + 5000) & 0xFFFFFFFF)
        self.h.notify(port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            error = struct.unpack_from("<I", page, RING_ERROR)[0]
            if error:
                return {"ring_error": error}
            self.h.evtchn.wait(0.1)
        return {"ring_error": 0}

    def cmd_notify(self, port: int) -> dict[str, Any]:
        """An event to our peer: an eventfd write, no hypercall (works with no broker)."""
        self.h.notify(port)
        return {}

    def cmd_write_map(self, handle: int, data: str) -> dict[str, Any]:
        """Write through a live writable mapping (no hypercall)."""
        raw = data.encode()
        self.maps[handle].view[:len(raw)] = raw
        return {}

    def cmd_port_status(self, port: int) -> dict[str, Any]:
        return self.h.port_status(port)

    def cmd_leak_rejoin_key(self) -> dict[str, Any]:
        """What a compromised domain could hand a colluder: the key it rejoins a new broker with."""
        return {"key": self.h._rejoin_key}   # type: ignore[attr-defined]

    def cmd_broker_restarts(self) -> dict[str, Any]:
        return {"restarts": self.h.broker_restarts}   # type: ignore[attr-defined]

    def cmd_drop_frame(self, gfn: int) -> dict[str, Any]:
        """Unmap one of our own frames (its grant now names a hole)."""
        sysmem.munmap(self.h.memory.frame_address(gfn), PAGE_SIZE)
        return {}

    def cmd_copy_from(self, domid: int, refs: list[int], first_gfn: int) -> dict[str, Any]:
        """One GNTTABOP_copy batch: each granted page into our frames from first_gfn on."""
        from xdom.domains.xenhost import CopyOp
        ops = [CopyOp(ref, 0, first_gfn + i, 0, PAGE_SIZE, src_domid=domid) for i, ref in enumerate(refs)]
        self.h.memory.ensure(range(first_gfn, first_gfn + len(refs)))     # our side: frames we have
        statuses = self.h.copy_grants(ops)
        stamps = [int.from_bytes(self.h.memory.frame(first_gfn + i)[:8], "little") for i in range(len(refs))]
        return {"statuses": statuses, "stamps": stamps}

    def cmd_torture_granter(self, grantee: int, ref: int, gfn: int, rounds: int,
                            neighbours: int = 0) -> dict[str, Any]:
        """Grant, then end access as soon as the grantee lets go; own the page in between.

        ``neighbours``: the refs just below ``ref`` stay granted throughout (gfns after ``gfn``), so the
        grantee's batch is a run of entries of which the granter keeps locking the last one."""
        self.h.memory.ensure(range(gfn, gfn + neighbours + 1))
        for k in range(1, neighbours + 1):
            self.h.gnttab.grant_access_ref(ref - k, grantee, gfn + k)
        page = self.h.memory.frame(gfn)
        busy = incs = 0
        for _ in range(rounds):
            self.h.gnttab.grant_access_ref(ref, grantee, gfn)
            hold = time.perf_counter() + random.random() * 0.0005   # give the grantee a chance
            while time.perf_counter() < hold:
                pass
            while not self.h.gnttab.try_end_access(ref):
                busy += 1
            _increment(page)      # the page is ours alone now
            incs += 1
        self.h.gnttab.grant_access_ref(ref + 1, grantee, gfn, readonly=True)   # the stop signal
        return {"incs": incs, "busy": busy}

    def cmd_torture_grantee(self, granter: int, ref: int, seconds: float, neighbours: int = 0) -> dict[str, Any]:
        """Map whenever the grant is there, increment while mapped, unmap.

        ``neighbours``: map the refs just below ``ref`` in the same batch, and unmap them with it;
        once the granter has granted them (it starts after us), each must map every time."""
        incs = failed_maps = 0
        batch = [(granter, ref - k, False) for k in range(neighbours, 0, -1)] + [(granter, ref, False)]
        granted = False
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            *around, res = self.h.map_grants(batch)
            mapped = [r.mapping for r in around if r.mapping is not None]
            if len(mapped) != len(around) and granted:
                raise RuntimeError(f"a neighbour of the contended entry did not map: {[r.status for r in around]}")
            granted = granted or len(mapped) == len(around)
            if mapped and self.h.unmap_grants(mapped) != [GNTST_okay] * len(mapped):
                raise RuntimeError("unmapping the neighbours failed")
            if res.mapping is None:
                failed_maps += 1
                if failed_maps % 16 == 0:
                    (stop,) = self.h.map_grants([(granter, ref + 1, True)])
                    if stop.mapping is not None:
                        self.h.unmap_grants([stop.mapping])
                        break
                continue
            _increment(res.mapping.view)
            incs += 1
            if self.h.unmap_grants([res.mapping]) != [GNTST_okay]:
                raise RuntimeError("unmap failed")
        return {"incs": incs, "failed_maps": failed_maps}


def _increment(page: memoryview) -> None:
    """A deliberately non-atomic read-modify-write of the u64 at offset 0."""
    value = int.from_bytes(page[:8], "little")
    for _ in range(20):      # widen the window between read and write
        pass
    page[:8] = (value + 1).to_bytes(8, "little")


if __name__ == "__main__":
    HostileAgent(connect()).run()
