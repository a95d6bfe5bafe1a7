"""A domain program driven by its parent over stdin/stdout, one JSON line each way.

The toolstack's demo and the test suite start domains that do what they are
told: grant pages, map grants, bind and signal event channels.  Each
command is a method ``cmd_<op>``; subclasses add their own (the tests add
hostile ones).  The first line out is ``{"domid": N, "pid": P}``.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import time
from typing import IO, Any

from .xenhost import GrantMapping, XenHost, connect


class DomainAgent:
    def __init__(self, host: XenHost, out: IO[str] = sys.stdout) -> None:
        self.h = host
        self.maps: dict[int, GrantMapping] = {}
        self._out = out

    def reply(self, **fields: Any) -> None:
        self._out.write(json.dumps(fields) + "\n")
        self._out.flush()

    def run(self, lines: IO[str] = sys.stdin) -> None:
        self.reply(domid=self.h.domid, pid=os.getpid())
        for line in lines:
            cmd = json.loads(line)
            op = cmd.pop("op", "")
            handler = getattr(self, f"cmd_{op}", None)
            if handler is None:
                self.reply(error=f"unknown op {op!r}")
                continue
            try:
                result = handler(**cmd)
            except Exception as e:   # report, stay up: the parent decides
                self.reply(error=f"{e.__class__.__name__}: {e}")
                continue
            self.reply(**(result or {}))
            if op == "quit":
                return

    # ---- grants (granting side) ------------------------------------------

    def cmd_grant(self, domid: int, gfn: int, ro: bool = False, data: str = "") -> dict[str, Any]:
        self.h.memory.frame(gfn)[:len(data)] = data.encode()
        return {"ref": self.h.gnttab.grant_access(domid, gfn, ro)}

    def cmd_grant_only(self, domid: int, gfn: int, ro: bool = False) -> dict[str, Any]:
        """Grant ``gfn`` without touching it (a gfn never used stays unpopulated)."""
        return {"ref": self.h.gnttab.grant_access(domid, gfn, ro)}

    def cmd_populated(self) -> dict[str, Any]:
        return {"frames": self.h.memory.populated}

    def cmd_grant_many(self, domid: int, first_gfn: int, count: int, ro: bool = False) -> dict[str, Any]:
        """Grant ``count`` frames, each stamped with (our domid, gfn) in its first 8 bytes."""
        refs = []
        for gfn in range(first_gfn, first_gfn + count):
            self.h.memory.frame(gfn)[:8] = (self.h.domid << 32 | gfn).to_bytes(8, "little")
            refs.append(self.h.gnttab.grant_access(domid, gfn, ro))
        return {"refs": refs}

    def cmd_end(self, ref: int) -> dict[str, Any]:
        return {"ok": self.h.gnttab.try_end_access(ref)}

    def cmd_read(self, gfn: int, len: int) -> dict[str, Any]:
        return {"data": bytes(self.h.memory.frame(gfn)[:len]).decode(errors="replace")}

    def cmd_read_u64(self, gfn: int) -> dict[str, Any]:
        return {"value": int.from_bytes(self.h.memory.frame(gfn)[:8], "little")}

    # ---- grants (mapping side) -------------------------------------------

    def cmd_map(self, domid: int, refs: list[int], ro: bool = False) -> dict[str, Any]:
        res = self.h.map_grants([(domid, r, ro) for r in refs])
        for r in res:
            if r.mapping is not None:
                self.maps[r.mapping.handle] = r.mapping
        return {"results": [[r.status, r.mapping.handle if r.mapping else 0] for r in res]}

    def cmd_peek(self, handle: int, len: int) -> dict[str, Any]:
        return {"data": bytes(self.maps[handle].view[:len]).decode(errors="replace")}

    def cmd_check_maps(self) -> dict[str, Any]:
        """Every live mapping must show its granter's stamp (see grant_many)."""
        bad = [hd for hd, m in self.maps.items() if int.from_bytes(m.view[:8], "little") >> 32 != m.domid]
        return {"live": len(self.maps), "bad": bad, "fds": len(os.listdir("/proc/self/fd"))}

    def cmd_unmap(self, handles: list[int]) -> dict[str, Any]:
        return {"results": self.h.unmap_grants([self.maps.pop(hd) for hd in handles])}

    # ---- event channels ----------------------------------------------------

    def cmd_alloc_unbound(self, remote: int) -> dict[str, Any]:
        return {"port": self.h.alloc_unbound(remote)}

    def cmd_bind(self, remote: int, port: int) -> dict[str, Any]:
        local = self.h.bind_interdomain(remote, port)
        self.h.evtchn.wait(0)    # drop the pending event Xen sets on bind
        return {"port": local}

    def cmd_bind_virq(self, virq: int) -> dict[str, Any]:
        return {"port": self.h.bind_virq(virq)}

    def cmd_wait(self, secs: float) -> dict[str, Any]:
        return {"ports": self.h.evtchn.wait(secs)}

    def cmd_pingpong(self, port: int, n: int, first: bool) -> dict[str, Any]:
        """``n`` round trips on ``port``; the ``first`` side starts each one."""
        start = time.monotonic()
        for _ in range(n):
            if first:
                self.h.notify(port)
            while not self.h.evtchn.wait(5):
                pass
            if not first:
                self.h.notify(port)
        return {"elapsed": time.monotonic() - start}

    # ---- xenstore over this domain's ring ---------------------------------

    def cmd_xs_connect(self) -> dict[str, Any]:
        from .xenstore import XenstoreClient
        self.xs = XenstoreClient.ring(self.h)
        self.xs_events: queue.Queue[tuple[str, str]] = queue.Queue()
        return {"domain_path": self.xs.get_domain_path(self.h.domid)}

    def cmd_xs_write(self, path: str, value: str) -> dict[str, Any]:
        self.xs.write(path, value)
        return {}

    def cmd_xs_read(self, path: str) -> dict[str, Any]:
        from .abi.xs_wire import XenstoreError
        try:
            return {"value": self.xs.read(path).decode(errors="replace")}
        except XenstoreError as e:
            return {"errno": e.name}

    def cmd_xs_watch(self, path: str, token: str) -> dict[str, Any]:
        self.xs.watch(path, token, lambda p, t: self.xs_events.put((p, t)))
        return {}

    def cmd_xs_events(self, n: int, secs: float) -> dict[str, Any]:
        """Up to ``n`` watch events, waiting at most ``secs`` for each."""
        got = []
        for _ in range(n):
            try:
                got.append(list(self.xs_events.get(timeout=secs)))
            except queue.Empty:
                break
        return {"events": got}

    def cmd_quit(self) -> dict[str, Any]:
        self.h.shutdown("poweroff")
        return {"ok": True}


def main() -> None:
    DomainAgent(connect()).run()


if __name__ == "__main__":
    main()
