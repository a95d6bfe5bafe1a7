"""A test client for xenstored's sans-IO core, shared by the test_xenstore_core*.py files.

``XS`` drives ``XenstoreCore.handle()`` with raw wire messages and checks
that each request gets exactly one reply echoing its ids; the helpers build
what several tests start from (a domain's home, the permission world).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable

from xdom.backends.xenstored.core import XenstoreCore
from xdom.backends.xenstored.quota import Quota
from xdom.domains.abi.xs_wire import Message, XsType, split_strings

T = XsType


class XS:
    """A test client for the core: one call, one checked reply, events logged per connection."""

    def __init__(self, core: XenstoreCore | None = None, quota: Quota | None = None) -> None:
        self.core = core or XenstoreCore(quota)
        self.events: dict[Hashable, list[tuple[bytes, bytes]]] = defaultdict(list)
        self.req_id = 1000
        self.last_output: list[tuple[Hashable, Message]] = []

    def connect(self, conn: Hashable, domid: int) -> Hashable:
        self.core.connect(conn, domid)
        self._collect(self.core.take_output())
        return conn

    def _collect(self, output: list[tuple[Hashable, Message]]) -> None:
        for conn, m in output:
            if m.type == T.XS_WATCH_EVENT:
                assert (m.req_id, m.tx_id) == (0, 0)
                path, token = split_strings(m.payload)
                self.events[conn].append((path, token))

    def raw(self, conn: Hashable, type_: int, payload: bytes, tx: int = 0) -> Message:
        """Send one request; exactly one reply to it must come back, echoing req_id and tx_id."""
        self.req_id += 1
        self.core.handle(conn, Message(type_, self.req_id, tx, payload))
        out = self.last_output = self.core.take_output()
        replies = [m for k, m in out if k == conn and m.type != T.XS_WATCH_EVENT]
        assert len(replies) == 1, out
        reply = replies[0]
        assert (reply.req_id, reply.tx_id) == (self.req_id, tx)
        assert reply.type in (type_, T.XS_ERROR)
        self._collect(out)
        assert self.core.internal_errors == 0
        return reply

    def ok(self, conn: Hashable, type_: int, payload: bytes, tx: int = 0) -> bytes:
        reply = self.raw(conn, type_, payload, tx)
        assert reply.type == type_, f"{T(type_).name} {payload[:60]!r}: {reply.error_name}"
        return reply.payload

    def error(self, conn: Hashable, type_: int, payload: bytes, tx: int = 0) -> str:
        reply = self.raw(conn, type_, payload, tx)
        assert reply.type == T.XS_ERROR, f"{T(type_).name} {payload[:60]!r} succeeded: {reply.payload[:60]!r}"
        assert reply.error_name is not None
        return reply.error_name

    def result(self, conn: Hashable, type_: int, payload: bytes, tx: int = 0) -> str:
        """'OK' or the errno name: for tables of expectations."""
        reply = self.raw(conn, type_, payload, tx)
        return reply.error_name or "OK"

    # conveniences ----------------------------------------------------------------------------
    def write(self, conn: Hashable, path: str, value: bytes = b"", tx: int = 0) -> None:
        assert self.ok(conn, T.XS_WRITE, path.encode() + b"\0" + value, tx) == b"OK\0"

    def read(self, conn: Hashable, path: str, tx: int = 0) -> bytes:
        return self.ok(conn, T.XS_READ, path.encode() + b"\0", tx)

    def mkdir(self, conn: Hashable, path: str, tx: int = 0) -> None:
        self.ok(conn, T.XS_MKDIR, path.encode() + b"\0", tx)

    def rm(self, conn: Hashable, path: str, tx: int = 0) -> None:
        self.ok(conn, T.XS_RM, path.encode() + b"\0", tx)

    def directory(self, conn: Hashable, path: str, tx: int = 0) -> list[bytes]:
        return self.ok(conn, T.XS_DIRECTORY, path.encode() + b"\0", tx).split(b"\0")[:-1]

    def set_perms(self, conn: Hashable, path: str, *perms: str, tx: int = 0) -> None:
        self.ok(conn, T.XS_SET_PERMS, path.encode() + b"\0" + b"".join(p.encode() + b"\0" for p in perms), tx)

    def get_perms(self, conn: Hashable, path: str, tx: int = 0) -> list[str]:
        return [p.decode() for p in self.ok(conn, T.XS_GET_PERMS, path.encode() + b"\0", tx).split(b"\0")[:-1]]

    def watch(self, conn: Hashable, path: str, token: str) -> None:
        self.ok(conn, T.XS_WATCH, path.encode() + b"\0" + token.encode() + b"\0")

    def start(self, conn: Hashable) -> int:
        reply = self.ok(conn, T.XS_TRANSACTION_START, b"\0")
        assert reply.endswith(b"\0")
        return int(reply[:-1])

    def end(self, conn: Hashable, tx: int, commit: bool = True) -> str:
        return self.result(conn, T.XS_TRANSACTION_END, b"T\0" if commit else b"F\0", tx)

    def introduce(self, conn: Hashable, domid: int, gfn: int = 77, port: int = 3) -> None:
        self.ok(conn, T.XS_INTRODUCE, f"{domid}\0{gfn}\0{port}\0".encode())

    def take_events(self, conn: Hashable) -> list[tuple[bytes, bytes]]:
        self._collect(self.core.take_output())        # output of direct core calls (domain_gone, ...)
        events, self.events[conn] = self.events[conn], []
        return events

    def generation(self, conn: Hashable, path: str, tx: int = 0) -> int:
        return int(self.ok(conn, T.XS_DIRECTORY_PART, path.encode() + b"\0" + b"0\0", tx).split(b"\0")[0])


def xs_with_dom0() -> XS:
    """A fresh core with domain 0 connected as "dom0" (what the ``xs`` fixtures give)."""
    harness = XS()
    harness.connect("dom0", 0)
    return harness


def home_for(xs: XS, domid: int, conn: str | None = None) -> str:
    """Connect domain ``domid`` and give it /local/domain/<domid>, owned by it, as a toolstack does.

    Connected first: without a hypervisor a domain exists only once xenstored
    knows it, and SET_PERMS naming a domain that does not exist is ENOENT.
    """
    home = f"/local/domain/{domid}"
    xs.connect(conn or f"dom{domid}", domid)
    xs.mkdir("dom0", home)
    xs.set_perms("dom0", home, f"n{domid}")
    return home


def tree(xs: XS, conn: Hashable = "dom0", path: str = "/") -> dict[str, tuple[bytes, list[str]]]:
    out = {path: (xs.read(conn, path), xs.get_perms(conn, path))}
    for child in xs.directory(conn, path):
        out.update(tree(xs, conn, (path.rstrip("/") + "/" + child.decode())))
    return out


# /local/domain/5/data: owner 5, r6 reads, w7 writes, b8 both; 9 is a stranger; 10 targets 5.
ROLES = {"privileged": 0, "owner": 5, "reader": 6, "writer": 7, "both": 8, "stranger": 9, "target": 10}


def perms_world_of(xs: XS) -> XS:
    """The world of ROLES around /local/domain/5/data (the ``perms_world`` fixtures)."""
    home_for(xs, 5)
    for role, domid in ROLES.items():
        if domid not in (0, 5):
            xs.connect(role, domid)
    xs.introduce("dom0", 5)
    xs.introduce("dom0", 10)
    xs.ok("dom0", T.XS_SET_TARGET, b"10\0" b"5\0")
    xs.write("dom0", "/local/domain/5/data", b"secret")
    xs.set_perms("dom0", "/local/domain/5/data", "n5", "r6", "w7", "b8")
    xs.core.take_effects()
    return xs
