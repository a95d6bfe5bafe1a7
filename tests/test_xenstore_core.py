"""xenstored's sans-IO core, driven through ``handle()`` with raw wire messages.

Expected values marked "(C)" were read off Xen 4.17's own xenstored answering
the same requests (run beside xdom as a differential reference while this
was written); the suite itself needs nothing but the core.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable

import msgpack
import pytest

from xdom.backends.xenstored.core import TX_ID_RESERVE, XenstoreCore
from xdom.backends.xenstored.domains import DOMID_SELF, Introduced, Released
from xdom.backends.xenstored.quota import Quota
from xdom.domains.abi.xs_wire import XENSTORE_PAYLOAD_MAX, Message, XsType, split_strings

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


@pytest.fixture
def xs() -> XS:
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


# ---- initial state, framing, bad input ------------------------------------------------------------

def test_initial_tree_is_cs(xs: XS) -> None:
    # (C) setup_structure: /, /tool, /tool/xenstored, all n0, generations 1, 2, 3.
    assert tree(xs) == {"/": (b"", ["n0"]), "/tool": (b"", ["n0"]), "/tool/xenstored": (b"", ["n0"])}
    assert [xs.generation("dom0", p) for p in ("/", "/tool", "/tool/xenstored")] == [1, 2, 3]
    assert xs.core.node_count() == 3
    assert xs.core.check() == []


def test_unknown_types_get_enosys_with_ids_echoed(xs: XS) -> None:
    # (C) XS_RESTRICT (20), WATCH_EVENT, ERROR, and all of 4.18's new types: ENOSYS.
    for type_ in [20, 15, 16, 23, 24, 25, 26, 27, 100, 0xFFFF, 0xFFFFFFFF]:
        assert xs.error("dom0", type_, b"/\0", tx=7) == "ENOSYS"


BAD_INPUT = [
    (T.XS_READ, b"/tool", "EINVAL"),                 # no NUL (C answers a stale errno here)
    (T.XS_READ, b"", "EINVAL"),
    (T.XS_READ, b"\0", "EINVAL"),                    # (C) empty relative path -> /local/domain/0/
    (T.XS_READ, b"/tool\0x\0", "EINVAL"),            # (C) two arguments
    (T.XS_READ, b"/tool/\0", "EINVAL"),              # (C) trailing slash
    (T.XS_READ, b"//tool\0", "EINVAL"),              # (C) double slash
    (T.XS_READ, b"/to ol\0", "EINVAL"),
    (T.XS_READ, b"/t\xffol\0", "EINVAL"),
    (T.XS_READ, b"@introduceDomain\0", "EINVAL"),    # (C) special names are for watches only
    (T.XS_READ, b"/nonexistent\0", "ENOENT"),
    (T.XS_WRITE, b"/a", "EINVAL"),                   # (C) no NUL at all
    (T.XS_WRITE, b"", "EINVAL"),
    (T.XS_MKDIR, b"/a/", "EINVAL"),
    (T.XS_RM, b"/\0", "EINVAL"),                     # (C) the root stays
    (T.XS_RM, b"/zz/yy\0", "ENOENT"),                # (C) parent missing too
    (T.XS_RM, b"/a/bad!\0", "EINVAL"),
    (T.XS_DIRECTORY_PART, b"/tool\0", "EINVAL"),     # (C) offset missing
    (T.XS_DIRECTORY_PART, b"/tool\0" b"0\0x\0", "EINVAL"),
    (T.XS_DIRECTORY_PART, b"/tool\0" b"abc\0", "EINVAL"),   # C's atoi would read 0
    (T.XS_SET_PERMS, b"/tool\0", "EINVAL"),          # (C) no permission
    (T.XS_SET_PERMS, b"/tool\0x0\0", "EINVAL"),      # (C)
    (T.XS_SET_PERMS, b"/tool\0r\0", "EINVAL"),       # (C)
    (T.XS_SET_PERMS, b"/tool\0r5x\0", "EINVAL"),     # (C)
    (T.XS_SET_PERMS, b"/tool\0r0x\0", "EINVAL"),     # (C) strtol stops at 'x'
    (T.XS_SET_PERMS, b"/tool\0r08\0", "EINVAL"),     # (C) octal
    (T.XS_SET_PERMS, b"@foo\0n0\0", "EINVAL"),       # (C) no such special node
    (T.XS_GET_PERMS, b"@releaseDomain\0", "EINVAL"),  # (C)
    (T.XS_WATCH, b"/a\0tok", "EINVAL"),              # (C) token not terminated
    (T.XS_WATCH, b"/a\0tok\0depth\0", "EINVAL"),     # (C) 4.17 has no depth argument
    (T.XS_WATCH, b"/a//\0tok\0", "EINVAL"),          # (C)
    (T.XS_WATCH, b"@" + b"s" * 2048 + b"\0t\0", "EINVAL"),   # (C) special paths up to 2048
    (T.XS_UNWATCH, b"/a\0nottok\0", "ENOENT"),       # (C)
    (T.XS_UNWATCH, b"/a\0", "EINVAL"),
    (T.XS_TRANSACTION_END, b"X\0", "EINVAL"),        # (C) checked before the transaction
    (T.XS_TRANSACTION_END, b"T\0", "ENOENT"),        # (C) no transaction
    (T.XS_TRANSACTION_END, b"T", "EINVAL"),
    (T.XS_GET_DOMAIN_PATH, b"5", "EINVAL"),          # (C)
    (T.XS_GET_DOMAIN_PATH, b"abc\0", "EINVAL"),      # C's atoi would answer /local/domain/0
    (T.XS_GET_DOMAIN_PATH, b"-1\0", "EINVAL"),
    (T.XS_IS_DOMAIN_INTRODUCED, b"7", "EINVAL"),     # (C)
    (T.XS_INTRODUCE, b"5\0", "EINVAL"),              # (C) three arguments
    (T.XS_INTRODUCE, b"5\0" b"1\0" b"0\0", "EINVAL"),   # (C) port 0
    (T.XS_INTRODUCE, b"abc\0" b"1\0" b"3\0", "EINVAL"),  # C's atoi would re-introduce domain 0
    (T.XS_INTRODUCE, b"0\0" b"1\0" b"3\0", "EINVAL"),
    (T.XS_INTRODUCE, b"32752\0" b"1\0" b"3\0", "EINVAL"),  # DOMID_FIRST_RESERVED
    (T.XS_RELEASE, b"0\0", "EINVAL"),                # (C)
    (T.XS_RELEASE, b"5\0", "ENOENT"),                # (C) not introduced
    (T.XS_RESUME, b"5\0", "ENOENT"),                 # (C)
    (T.XS_SET_TARGET, b"5\0", "EINVAL"),             # (C)
    (T.XS_SET_TARGET, b"5\0" b"6\0", "ENOENT"),      # (C)
    (T.XS_CONTROL, b"", "EINVAL"),                   # (C)
    (T.XS_CONTROL, b"bogus\0", "EINVAL"),            # (C)
]


def test_bad_input_errno(xs: XS) -> None:
    """One test for the whole table (the suite's per-test fixtures are not free); lists every miss."""
    wrong = [(T(type_).name, payload[:40], errno, got) for type_, payload, errno in BAD_INPUT
             if (got := xs.result("dom0", type_, payload)) != errno]
    assert wrong == []
    assert xs.core.check() == []


def test_unknown_transaction_id_is_enoent_but_watch_ignores_it(xs: XS) -> None:
    assert xs.error("dom0", T.XS_READ, b"/tool\0", tx=77) == "ENOENT"          # (C)
    assert xs.ok("dom0", T.XS_WATCH, b"/tool\0tok\0", tx=77) == b"OK\0"       # (C) XS_FLAG_NOTID


def test_unconnected_connection_is_refused(xs: XS) -> None:
    xs.core.handle("nobody", Message(T.XS_READ, 5, 0, b"/\0"))
    assert xs.core.take_output() == [("nobody", Message(T.XS_ERROR, 5, 0, b"EACCES\0"))]


def test_reply_bigger_than_a_payload_is_e2big(xs: XS) -> None:
    for i in range(300):
        xs.write("dom0", f"/big/child-with-a-long-name-{i:04d}")
    assert xs.error("dom0", T.XS_DIRECTORY, b"/big\0") == "E2BIG"            # (C)


def test_unprivileged_domain_may_not_use_privileged_ops(xs: XS) -> None:
    home_for(xs, 5)
    for type_, payload in [(T.XS_INTRODUCE, b"6\0" b"1\0" b"3\0"), (T.XS_RELEASE, b"6\0"),
                           (T.XS_IS_DOMAIN_INTRODUCED, b"5\0"), (T.XS_SET_TARGET, b"5\0" b"6\0"),
                           (T.XS_RESUME, b"5\0"), (T.XS_CONTROL, b"help\0")]:
        assert xs.error("dom5", type_, payload) == "EACCES"
    # ...but GET_DOMAIN_PATH is for everyone
    assert xs.ok("dom5", T.XS_GET_DOMAIN_PATH, b"7\0") == b"/local/domain/7\0"


# ---- paths -----------------------------------------------------------------------------------------

def test_relative_paths_are_under_the_domains_home(xs: XS) -> None:
    xs.write("dom0", "rel/x", b"val")                                            # (C) sockets are dom0
    assert xs.read("dom0", "/local/domain/0/rel/x") == b"val"
    home_for(xs, 5)
    xs.write("dom5", "data/y", b"mine")
    assert xs.read("dom0", "/local/domain/5/data/y") == b"mine"
    assert xs.read("dom5", "data/y") == b"mine"
    assert xs.get_perms("dom0", "/local/domain/5/data/y") == ["n5"]


@pytest.mark.parametrize("path, ok", [
    ("/" + "x" * 2047, True), ("/" + "x" * 2048, False),                         # (C) path-max from /
    ("/local/domain/5/" + "y" * 2048, True), ("/local/domain/5/" + "y" * 2049, False),   # (C) below home
    ("/local/domain/123456/" + "y" * 2048, False),                                # (C) not a domid
    ("/local/domain/-123/" + "y" * 2048, True),                                   # (C) %5u takes a sign
    ("/A-Za_z09@", True), ("/a+b", False), ("/a.b", False), ("/a b", False),
])
def test_path_validity_and_length(xs: XS, path: str, ok: bool) -> None:
    assert xs.result("dom0", T.XS_WRITE, path.encode() + b"\0v") == ("OK" if ok else "EINVAL")


def test_deep_paths_do_not_recurse(xs: XS) -> None:
    deep = "/" + "a/" * 1000 + "z"
    xs.write("dom0", deep, b"deep")
    assert xs.core.node_count() == 3 + 1001
    xs.watch("dom0", "/a", "w")
    xs.take_events("dom0")
    xs.rm("dom0", "/a")
    assert xs.core.node_count() == 3
    assert xs.take_events("dom0") == [(b"/a", b"w")]
    assert xs.core.check() == []


# ---- read / write / mkdir / rm ---------------------------------------------------------------------

def test_write_creates_parents_and_counts_generations_like_c(xs: XS) -> None:
    xs.write("dom0", "/g/a/b", b"v")
    # (C) written bottom-up: b=4, a=5, g=6, then / gains a child: 7
    assert [xs.generation("dom0", p) for p in ("/g/a/b", "/g/a", "/g", "/")] == [4, 5, 6, 7]
    assert xs.read("dom0", "/g/a") == b""
    xs.write("dom0", "/g/a/c", b"v")
    xs.write("dom0", "/g/a/d", b"v")
    assert xs.generation("dom0", "/g/a") == 11                                  # (C)
    xs.rm("dom0", "/g/a")
    assert xs.generation("dom0", "/g") == 19                                    # (C) 3 deletes + 3 parent writes + 2
    assert xs.core.node_count() == 4


def test_write_value_may_hold_nuls_and_fill_a_payload(xs: XS) -> None:
    xs.write("dom0", "/a", b"b\0c\0")                                           # (C)
    assert xs.read("dom0", "/a") == b"b\0c\0"
    big = b"z" * (XENSTORE_PAYLOAD_MAX - len(b"/big\0"))
    xs.write("dom0", "/big", big)
    assert xs.read("dom0", "/big") == big


def test_new_nodes_inherit_the_parents_permissions(xs: XS) -> None:
    xs.introduce("dom0", 3)
    home_for(xs, 4)
    xs.mkdir("dom0", "/p")
    xs.set_perms("dom0", "/p", "n3", "r0", "b4")
    xs.write("dom0", "/p/q/r", b"x")
    assert xs.get_perms("dom0", "/p/q/r") == ["n3", "r0", "b4"]                 # privileged keeps the owner
    xs.write("dom4", "/p/mine/x", b"y")
    assert xs.get_perms("dom0", "/p/mine") == ["n4", "r0", "b4"]                # unprivileged becomes owner
    assert xs.get_perms("dom0", "/p/mine/x") == ["n4", "r0", "b4"]


def test_mkdir_existing_is_ok_and_silent(xs: XS) -> None:
    xs.mkdir("dom0", "/m/n")
    xs.watch("dom0", "/m", "w")
    xs.take_events("dom0")
    xs.mkdir("dom0", "/m/n")
    xs.mkdir("dom0", "/m")
    assert xs.take_events("dom0") == []                                         # (C)


def test_rm_of_missing_node_needs_an_existing_parent(xs: XS) -> None:
    xs.mkdir("dom0", "/a")
    assert xs.result("dom0", T.XS_RM, b"/a/zz\0") == "OK"                       # (C)
    assert xs.result("dom0", T.XS_RM, b"/zz/yy\0") == "ENOENT"                  # (C)


# ---- directories ----------------------------------------------------------------------------------

def test_directory_lists_children_in_creation_order(xs: XS) -> None:
    for name in ("b", "a", "c"):
        xs.mkdir("dom0", f"/d/{name}")
    assert xs.directory("dom0", "/d") == [b"b", b"a", b"c"]
    xs.rm("dom0", "/d/a")
    xs.mkdir("dom0", "/d/a")
    assert xs.directory("dom0", "/d") == [b"b", b"c", b"a"]


def test_directory_part_pages_a_big_directory(xs: XS) -> None:
    names = [(f"c{i:04d}" + "x" * (i % 37)).encode() for i in range(300)]
    for name in names:
        xs.write("dom0", "/big/" + name.decode())
    full = b"".join(n + b"\0" for n in names)
    assert len(full) == 7134
    pages, offset = [], 0
    while True:
        reply = xs.ok("dom0", T.XS_DIRECTORY_PART, b"/big\0" + str(offset).encode() + b"\0")
        assert len(reply) <= XENSTORE_PAYLOAD_MAX
        gen, rest = reply.split(b"\0", 1)
        assert int(gen) == xs.generation("dom0", "/big")
        pages.append(reply)
        if rest.endswith(b"\0\0") or rest == b"\0":
            break
        offset += len(rest)
    # (C) the same 300 names came back from C in pages of 4069 and 3074 bytes
    assert [len(p) for p in pages] == [4069, 3074]
    assert b"".join(p.split(b"\0", 1)[1] for p in pages)[:-1] == full
    # (C) an offset at or past the end gives just the generation and the end mark
    gen = str(xs.generation("dom0", "/big")).encode()
    assert xs.ok("dom0", T.XS_DIRECTORY_PART, b"/big\0" + b"7134\0") == gen + b"\0\0"
    assert xs.ok("dom0", T.XS_DIRECTORY_PART, b"/big\0" + b"99999\0") == gen + b"\0\0"
    # (C) an offset inside a name starts there
    assert xs.ok("dom0", T.XS_DIRECTORY_PART, b"/tool\0" b"1\0") == b"2\0" b"enstored\0\0"


# ---- permissions -----------------------------------------------------------------------------------

# /local/domain/5/data: owner 5, r6 reads, w7 writes, b8 both; 9 is a stranger; 10 targets 5.
ROLES = {"privileged": 0, "owner": 5, "reader": 6, "writer": 7, "both": 8, "stranger": 9, "target": 10}
PERMS_MATRIX = {
    #              read      write     get_perms set_perms rm        mkdir     read-missing-child
    "privileged": ("OK",     "OK",     "OK",     "OK",     "OK",     "OK",     "ENOENT"),
    "owner":      ("OK",     "OK",     "OK",     "OK",     "OK",     "OK",     "ENOENT"),
    "reader":     ("OK",     "EACCES", "OK",     "EACCES", "EACCES", "EACCES", "ENOENT"),
    "writer":     ("EACCES", "OK",     "EACCES", "EACCES", "OK",     "OK",     "EACCES"),
    "both":       ("OK",     "OK",     "OK",     "EACCES", "OK",     "OK",     "ENOENT"),
    "stranger":   ("EACCES", "EACCES", "EACCES", "EACCES", "EACCES", "EACCES", "EACCES"),
    "target":     ("OK",     "OK",     "OK",     "OK",     "OK",     "OK",     "ENOENT"),
}


@pytest.fixture
def perms_world(xs: XS) -> XS:
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


@pytest.mark.parametrize("role", ROLES)
def test_permission_matrix(perms_world: XS, role: str) -> None:
    xs = perms_world
    conn = "dom0" if role == "privileged" else ("dom5" if role == "owner" else role)
    node = b"/local/domain/5/data\0"
    got = (
        xs.result(conn, T.XS_READ, node),
        xs.result(conn, T.XS_WRITE, node + b"new"),
        xs.result(conn, T.XS_GET_PERMS, node),
        xs.result(conn, T.XS_SET_PERMS, node + b"n5\0r6\0w7\0b8\0"),
        xs.result(conn, T.XS_MKDIR, node),
        xs.result(conn, T.XS_READ, b"/local/domain/5/data/missing\0"),
        xs.result(conn, T.XS_RM, node),                 # last: it removes the node
    )
    read, write, get_perms, set_perms, rm, mkdir, read_missing = PERMS_MATRIX[role]
    assert got == (read, write, get_perms, set_perms, mkdir, read_missing, rm)
    assert xs.core.check() == []


def test_only_privileged_may_change_the_owner(perms_world: XS) -> None:
    xs = perms_world
    node = b"/local/domain/5/data\0"
    assert xs.error("dom5", T.XS_SET_PERMS, node + b"n6\0") == "EPERM"
    assert xs.error("target", T.XS_SET_PERMS, node + b"n10\0") == "EPERM"
    xs.ok("dom0", T.XS_SET_PERMS, node + b"n6\0")
    assert xs.get_perms("dom0", "/local/domain/5/data") == ["n6"]


def test_missing_node_under_unreadable_parent_is_eacces_not_enoent(perms_world: XS) -> None:
    # The stranger must not learn what exists below /local/domain/5.
    assert perms_world.error("stranger", T.XS_READ, b"/local/domain/5/nothing/here\0") == "EACCES"
    assert perms_world.error("dom5", T.XS_READ, b"/local/domain/5/nothing/here\0") == "ENOENT"


def test_perm_strings_follow_strtol(xs: XS) -> None:
    # (C) each of these was set and read back from C xenstored
    for given, shown in [("r 5", "r5"), ("r+5", "r5"), ("r010", "r8"), ("r0X1f", "r31"),
                         ("r99999999999", "r1215752191"), ("b4294967295", "b-1"),
                         ("n-2147483649", "n2147483647"), ("r-99999999999999999999999", "r0")]:
        xs.set_perms("dom0", "/tool", "n0", given)
        assert xs.get_perms("dom0", "/tool") == ["n0", shown]


def test_set_perms_ignores_trailing_bytes_after_the_last_nul(xs: XS) -> None:
    xs.ok("dom0", T.XS_SET_PERMS, b"/tool\0n0\0r7")                             # (C)
    assert xs.get_perms("dom0", "/tool") == ["n0"]


def test_owner_must_exist(xs: XS) -> None:
    home_for(xs, 5)
    xs.core.domain_gone(5)
    assert xs.error("dom0", T.XS_SET_PERMS, b"/tool\0n5\0") == "ENOENT"         # (C) no such domain
    assert xs.error("dom0", T.XS_SET_PERMS, b"/tool\0n40000\0") == "ENOENT"
    xs.set_perms("dom0", "/tool", "n0", "r5")                                   # a dead reader is ignored
    assert xs.get_perms("dom0", "/tool") == ["n0", "r5"]


def test_a_recycled_domid_does_not_inherit_a_dead_domains_rights(xs: XS) -> None:
    xs.write("dom0", "/shared", b"x")
    xs.introduce("dom0", 5)
    xs.set_perms("dom0", "/shared", "n0", "r5")
    xs.connect("dom5", 5)
    assert xs.read("dom5", "/shared") == b"x"
    xs.core.domain_gone(5)
    xs.core.disconnect("dom5")
    # Generations date a domain against the nodes: the new domain 5's record is younger than
    # /shared even though nothing was written in between (in C it would share /shared's
    # generation and inherit the grant; only a write in between, here its new home, saves it).
    xs.introduce("dom0", 5)                       # a new domain 5
    xs.connect("new5", 5)
    assert xs.error("new5", T.XS_READ, b"/shared\0") == "EACCES"
    xs.set_perms("dom0", "/shared", "n0", "r5")   # granted afresh: now it may
    assert xs.read("new5", "/shared") == b"x"


# ---- permissions may only name domains that exist (XSA-322) ----------------------------------------

def set_perms_result(xs: XS, path: str, *perms: str, tx: int = 0) -> str:
    return xs.result("dom0", T.XS_SET_PERMS, path.encode() + b"\0" + b"".join(p.encode() + b"\0" for p in perms), tx)


def test_set_perms_owned_by_a_domain_that_does_not_exist_is_enoent(xs: XS) -> None:
    """No hypervisor: only domain 0 and the domains xenstored was told of exist (C with dom0 alone)."""
    xs.write("dom0", "/a", b"x")
    assert set_perms_result(xs, "/a", "r7", "r1") == "ENOENT"                 # (C) the owner decides
    assert set_perms_result(xs, "/a", "n-1") == "ENOENT"                      # (C)
    assert set_perms_result(xs, "/a", "n32752") == "ENOENT"                   # (C) DOMID_FIRST_RESERVED
    assert set_perms_result(xs, "/nonexistent", "r7") == "ENOENT"             # (C)
    assert set_perms_result(xs, "@releaseDomain", "r7") == "ENOENT"           # (C) before the special case
    assert set_perms_result(xs, "/a", "x7") == "EINVAL"                       # (C) parsing comes first
    tx = xs.start("dom0")
    assert set_perms_result(xs, "/a", "n7", tx=tx) == "ENOENT"                # (C) the same in a transaction
    assert xs.end("dom0", tx) == "OK"
    assert xs.get_perms("dom0", "/a") == ["n0"]                               # nothing changed
    # (C) another entry naming no domain is kept, shown, and marked ignored
    xs.set_perms("dom0", "/a", "n0", "r7")
    assert xs.get_perms("dom0", "/a") == ["n0", "r7"]
    xs.set_perms("dom0", "@releaseDomain", "n0", "r7")
    # (C) and it gave xenstored no record of domain 7
    assert xs.error("dom0", T.XS_CONTROL, b"quota\0" b"7\0") == "ENOENT"
    # a domain 7 that comes later gets nothing from it
    xs.introduce("dom0", 7)
    xs.connect("dom7", 7)
    assert xs.error("dom7", T.XS_READ, b"/a\0") == "EACCES"
    xs.watch("dom7", "@releaseDomain", "R")
    assert xs.take_events("dom7") == [(b"@releaseDomain", b"R")]              # a new watch's first event
    xs.introduce("dom0", 12)
    xs.ok("dom0", T.XS_RELEASE, b"12\0")
    assert xs.take_events("dom7") == []                                       # the ignored entry grants nothing
    # once introduced it exists: the toolstack may now name it, owner or not
    xs.set_perms("dom0", "/a", "r7", "r1")
    assert xs.get_perms("dom0", "/a") == ["r7", "r1"]
    assert xs.read("dom7", "/a") == b"x"
    assert xs.core.check() == []


def test_a_released_domain_stops_existing(xs: XS) -> None:
    """(C) After XS_RELEASE its nodes are gone and naming it as owner is ENOENT again."""
    xs.introduce("dom0", 7)
    xs.write("dom0", "/b", b"")
    xs.set_perms("dom0", "/b", "n0", "r7", "r8")                              # (C) 8 kept, ignored
    xs.write("dom0", "/a", b"")
    xs.set_perms("dom0", "/a", "n7")
    xs.ok("dom0", T.XS_RELEASE, b"7\0")
    assert xs.error("dom0", T.XS_READ, b"/a\0") == "ENOENT"                  # (C) its node went with it
    assert xs.get_perms("dom0", "/b") == ["n0", "r7", "r8"]                   # (C) others' nodes keep the entry
    assert set_perms_result(xs, "/b", "r7") == "ENOENT"                       # (C)
    assert set_perms_result(xs, "/b", "n0", "r7") == "OK"                     # (C)
    assert xs.error("dom0", T.XS_CONTROL, b"quota\0" b"7\0") == "ENOENT"     # (C)
    assert xs.core.known_domains() == {}


def test_a_reused_domid_does_not_inherit_grants_made_after_the_release(xs: XS) -> None:
    """Entries written between a release and the next introduction name no domain: they stay
    ignored, so the next domain 7 gets nothing the toolstack meant for the old one."""
    xs.introduce("dom0", 7)
    xs.connect("old7", 7)
    xs.write("dom0", "/before", b"b")
    xs.set_perms("dom0", "/before", "n0", "r7")
    assert xs.read("old7", "/before") == b"b"
    xs.ok("dom0", T.XS_RELEASE, b"7\0")
    xs.core.disconnect("old7")
    xs.write("dom0", "/between", b"w")
    xs.set_perms("dom0", "/between", "n0", "r7")                              # the old domain 7 is gone
    xs.mkdir("dom0", "/local/domain/7")
    xs.introduce("dom0", 7)                                                   # a new domain 7
    xs.connect("new7", 7)
    assert xs.error("new7", T.XS_READ, b"/before\0") == "EACCES"
    assert xs.error("new7", T.XS_READ, b"/between\0") == "EACCES"
    xs.set_perms("dom0", "/between", "n0", "r7")                              # granted to the new one
    assert xs.read("new7", "/between") == b"w"
    assert xs.error("new7", T.XS_READ, b"/before\0") == "EACCES"


def test_with_a_hypervisor_a_domain_exists_before_its_introduction() -> None:
    """The toolstack writes a domain's nodes before introducing it (libxl's order); C asks the
    hypervisor, and records the domain then, so those nodes are younger than it."""
    alive = {5}
    xs = XS(XenstoreCore(domain_exists=lambda d: d in alive))
    xs.connect("dom0", 0)
    assert xs.error("dom0", T.XS_CONTROL, b"quota\0" b"5\0") == "ENOENT"     # (C, XS_SHIM_DOMAINS=0,5)
    xs.write("dom0", "/a", b"x")
    xs.set_perms("dom0", "/a", "n0", "r5")
    assert xs.core.known_domains() == {5: False}
    assert "nodes           :        0\n" in xs.ok("dom0", T.XS_CONTROL, b"quota\0" b"5\0").decode()   # (C)
    assert set_perms_result(xs, "/a", "n6") == "ENOENT"                       # (C) 6 does not exist
    xs.introduce("dom0", 5)
    xs.connect("dom5", 5)
    assert xs.read("dom5", "/a") == b"x"
    assert xs.core.check() == []


def test_a_domain_only_named_in_permissions_is_forgotten_when_it_dies() -> None:
    """C's check_domains frees the record of a domain never introduced once the hypervisor
    no longer knows it (the shell calls ``domain_gone`` for each such domain): a new domain
    with its domid is younger than every node that named the dead one."""
    alive = {5}
    xs = XS(XenstoreCore(domain_exists=lambda d: d in alive))
    xs.connect("dom0", 0)
    xs.write("dom0", "/secret", b"s")
    xs.set_perms("dom0", "/secret", "n0", "r5")                               # domain 5 exists, not introduced
    xs.write("dom0", "/owned", b"o")
    xs.set_perms("dom0", "/owned", "n5")
    alive.discard(5)                                                          # it dies before its introduction
    assert xs.core.known_domains() == {5: False}
    xs.core.domain_gone(5)
    assert xs.core.known_domains() == {}
    assert xs.error("dom0", T.XS_READ, b"/owned\0") == "ENOENT"               # (C) destroy_domain's tree walk
    alive.add(5)                                                              # a new domain 5
    xs.mkdir("dom0", "/local/domain/5")
    xs.set_perms("dom0", "/local/domain/5", "n0", "r5")
    xs.introduce("dom0", 5)
    xs.connect("dom5", 5)
    assert xs.error("dom5", T.XS_READ, b"/secret\0") == "EACCES"
    assert xs.ok("dom5", T.XS_DIRECTORY, b"/local/domain/5\0") == b""         # what was written for it counts
    assert xs.core.check() == []


def test_hypervisor_errors_count_as_absent() -> None:
    def broken(domid: int) -> bool:
        raise OSError("broker unreachable")
    xs = XS(XenstoreCore(domain_exists=broken))
    xs.connect("dom0", 0)
    assert set_perms_result(xs, "/tool", "n5") == "ENOENT"
    assert xs.core.internal_errors == 0


def test_a_transaction_may_not_leave_nodes_to_a_released_domain(xs: XS) -> None:
    """(C) transaction_fix_domains: a commit changing the node count of a domain that no
    longer exists fails with ENOMEM (its nodes would pass to a later namesake)."""
    xs.introduce("dom0", 9)
    xs.write("dom0", "/t", b"")
    tx = xs.start("dom0")
    xs.set_perms("dom0", "/t", "n9", tx=tx)
    assert set_perms_result(xs, "/t", "n8", tx=tx) == "ENOENT"                # (C)
    xs.set_perms("dom0", "/t", "n0", "r8", tx=tx)                             # (C)
    assert xs.get_perms("dom0", "/t", tx=tx) == ["n0", "r8"]
    xs.ok("dom0", T.XS_RELEASE, b"9\0")
    assert xs.end("dom0", tx) == "ENOMEM"                                     # (C) 9 lost the node it had gained
    assert xs.get_perms("dom0", "/t") == ["n0"]
    xs.introduce("dom0", 9)
    tx = xs.start("dom0")
    xs.write("dom0", "/t/c", b"x", tx=tx)
    xs.set_perms("dom0", "/t/c", "n9", tx=tx)
    xs.ok("dom0", T.XS_RELEASE, b"9\0")
    assert xs.end("dom0", tx) == "ENOMEM"                                     # (C)
    assert xs.directory("dom0", "/t") == []
    assert xs.core.check() == []


def test_a_grant_committed_after_the_domid_was_reused_stays_with_the_old_domain(xs: XS) -> None:
    """Deliberately stricter than C: a transaction's nodes are checked for stale entries at
    commit against the generation they were written with, so a grant made to domain 7 before
    7 was released and introduced again does not reach the new domain 7."""
    xs.introduce("dom0", 7)
    xs.write("dom0", "/g", b"v")
    tx = xs.start("dom0")
    xs.set_perms("dom0", "/g", "n0", "r7", tx=tx)
    xs.ok("dom0", T.XS_RELEASE, b"7\0")
    xs.introduce("dom0", 7)
    xs.connect("new7", 7)
    assert xs.end("dom0", tx) == "OK"
    assert xs.get_perms("dom0", "/g") == ["n0", "r7"]
    assert xs.error("new7", T.XS_READ, b"/g\0") == "EACCES"
    tx = xs.start("dom0")                                                     # granted while it lives: fine
    xs.set_perms("dom0", "/g", "n0", "r7", tx=tx)
    assert xs.end("dom0", tx) == "OK"
    assert xs.read("new7", "/g") == b"v"


def test_stale_permissions_stay_ignored_across_dump_and_restore(xs: XS) -> None:
    """What a restarted xenstored keeps: who exists, when each domain was first heard of,
    node generations and the ignored marks."""
    xs.introduce("dom0", 7)
    xs.write("dom0", "/kept", b"k")
    xs.set_perms("dom0", "/kept", "n0", "r7")                                 # 7 lives: must keep working
    xs.introduce("dom0", 8)
    xs.write("dom0", "/stale", b"s")
    xs.set_perms("dom0", "/stale", "n0", "r8")
    xs.ok("dom0", T.XS_RELEASE, b"8\0")
    xs.read("dom0", "/stale")                                                 # marks r8 ignored in the store

    restored = XS(XenstoreCore.restore(xs.core.dump()))
    restored.core.take_effects()
    restored.connect("dom0", 0)
    restored.connect("dom7", 7)
    assert restored.read("dom7", "/kept") == b"k"                             # the domain's date came back
    assert set_perms_result(restored, "/x", "n8") == "ENOENT"                 # 8 is still gone
    restored.write("dom0", "/x", b"")
    assert set_perms_result(restored, "/x", "n8") == "ENOENT"
    restored.introduce("dom0", 8)                                             # a new domain 8
    restored.connect("dom8", 8)
    assert restored.error("dom8", T.XS_READ, b"/stale\0") == "EACCES"
    assert restored.core.check() == []
    # a record made for a domain that only the hypervisor vouched for comes back too
    core = XenstoreCore(domain_exists=lambda d: d == 5)
    core.connect("dom0", 0)
    core.handle("dom0", Message(T.XS_WRITE, 1, 0, b"/n\0v"))
    core.handle("dom0", Message(T.XS_SET_PERMS, 2, 0, b"/n\0n0\0r5\0"))
    again = XenstoreCore.restore(core.dump(), domain_exists=lambda d: d == 5)
    assert again.known_domains() == {5: False}
    again.connect("dom5", 5)
    again.handle("dom5", Message(T.XS_READ, 3, 0, b"/n\0"))
    assert [m.payload for c, m in again.take_output() if c == "dom5"] == [b"v"]


# ---- watches ---------------------------------------------------------------------------------------

def test_watch_fires_once_at_once_after_the_reply(xs: XS) -> None:
    xs.raw("dom0", T.XS_WATCH, b"/nowhere\0tok\0")
    kinds = [(m.type, m.payload) for _, m in xs.last_output]
    assert kinds == [(T.XS_WATCH, b"OK\0"), (T.XS_WATCH_EVENT, b"/nowhere\0tok\0")]   # (C)
    assert xs.error("dom0", T.XS_WATCH, b"/nowhere\0tok\0") == "EEXIST"           # (C)
    xs.watch("dom0", "/nowhere", "other")                                         # another token is fine


def test_events_for_a_request_come_before_its_reply(xs: XS) -> None:
    xs.watch("dom0", "/a", "tok")
    xs.raw("dom0", T.XS_WRITE, b"/a/x\0v")
    assert [m.type for _, m in xs.last_output] == [T.XS_WATCH_EVENT, T.XS_WRITE]    # (C)


def test_rm_fires_like_c(xs: XS) -> None:
    xs.mkdir("dom0", "/w/a/b/c")
    xs.write("dom0", "/w/a/b2")
    xs.connect("watcher", 0)
    for path in ("/w", "/w/a", "/w/a/b", "/w/a/b/c", "/w/a/b/c/d", "/", "/w/a/b2"):
        xs.watch("watcher", path, "T" + path)
    xs.take_events("watcher")
    xs.rm("dom0", "/w/a")
    # (C) exactly this, in this order: removed children only for watches on them
    # (none for the never-existing /w/a/b/c/d), then the removed node for it and above.
    assert xs.take_events("watcher") == [
        (b"/w/a/b/c", b"T/w/a/b/c"), (b"/w/a/b", b"T/w/a/b"), (b"/w/a/b2", b"T/w/a/b2"),
        (b"/w/a", b"T/w"), (b"/w/a", b"T/w/a"), (b"/w/a", b"T/")]
    xs.mkdir("dom0", "/w/a/new/deeper")
    # (C) a create fires for the named node only, not for parents it created
    assert xs.take_events("watcher") == [(b"/w/a/new/deeper", b"T/w"), (b"/w/a/new/deeper", b"T/w/a"),
                                         (b"/w/a/new/deeper", b"T/")]


def test_write_set_perms_and_special_watches_fire(xs: XS) -> None:
    xs.mkdir("dom0", "/s")
    xs.watch("dom0", "/s", "t")
    xs.watch("dom0", "@introduceDomain", "i")
    xs.watch("dom0", "@releaseDomain", "r")
    xs.watch("dom0", "@whatever", "x")
    assert xs.take_events("dom0") == [(b"/s", b"t"), (b"@introduceDomain", b"i"), (b"@releaseDomain", b"r"),
                                      (b"@whatever", b"x")]
    xs.write("dom0", "/s", b"same")
    xs.write("dom0", "/s", b"same")
    xs.set_perms("dom0", "/s", "n0")
    assert xs.take_events("dom0") == [(b"/s", b"t")] * 3                           # (C) no "unchanged" filter
    xs.introduce("dom0", 7)
    assert xs.take_events("dom0") == [(b"@introduceDomain", b"i")]
    xs.introduce("dom0", 7, port=4)                                               # (C) again: no event
    assert xs.take_events("dom0") == []


def test_identical_pending_events_are_merged(xs: XS) -> None:
    xs.watch("dom0", "/", "t")
    xs.watch("dom0", "/dd/b", "t")
    xs.take_events("dom0")
    xs.write("dom0", "/dd/b/c", b"v")
    assert xs.take_events("dom0") == [(b"/dd/b/c", b"t")]                        # (C) one, not two


def test_relative_watches_report_relative_paths(xs: XS) -> None:
    xs.watch("dom0", "rel", "tok")
    xs.write("dom0", "rel/y", b"v")
    xs.write("dom0", "/local/domain/0/rel", b"v")
    assert xs.take_events("dom0") == [(b"rel", b"tok"), (b"rel/y", b"tok"), (b"rel", b"tok")]   # (C)
    home_for(xs, 5)
    xs.watch("dom5", "device", "d")
    xs.write("dom0", "/local/domain/5/device/vif/0", b"x")
    assert xs.take_events("dom5") == [(b"device", b"d"), (b"device/vif/0", b"d")]
    assert xs.ok("dom5", T.XS_UNWATCH, b"device\0d\0") == b"OK\0"
    assert xs.error("dom5", T.XS_UNWATCH, b"device\0d\0") == "ENOENT"


def test_events_only_reach_watchers_who_may_read(perms_world: XS) -> None:
    xs = perms_world
    xs.watch("reader", "/local/domain/5", "r")
    xs.watch("stranger", "/local/domain/5", "s")
    xs.take_events("reader")
    xs.take_events("stranger")
    xs.write("dom5", "data", b"readable by 6")
    xs.write("dom5", "private", b"n5 only, parent n5")
    assert xs.take_events("reader") == [(b"/local/domain/5/data", b"r")]
    assert xs.take_events("stranger") == []
    # losing the right still reports the change that took it away (old perms count)
    xs.set_perms("dom5", "/local/domain/5/data", "n5")
    assert xs.take_events("reader") == [(b"/local/domain/5/data", b"r")]
    xs.write("dom5", "data", b"now hidden")
    assert xs.take_events("reader") == []


def test_a_node_readable_through_its_parent_fires(xs: XS) -> None:
    home_for(xs, 5)
    xs.mkdir("dom0", "/pub")
    xs.set_perms("dom0", "/pub", "n0", "r5")
    xs.watch("dom5", "/pub", "p")
    xs.take_events("dom5")
    xs.write("dom0", "/pub/hidden", b"x")
    xs.set_perms("dom0", "/pub/hidden", "n0")
    assert xs.take_events("dom5") == [(b"/pub/hidden", b"p"), (b"/pub/hidden", b"p")]


def test_special_watch_events_follow_the_special_perms(xs: XS) -> None:
    home_for(xs, 5)
    xs.watch("dom5", "@introduceDomain", "i")
    assert xs.take_events("dom5") == [(b"@introduceDomain", b"i")]             # the first one always
    xs.introduce("dom0", 8)
    assert xs.take_events("dom5") == []
    assert xs.error("dom5", T.XS_SET_PERMS, b"@introduceDomain\0n5\0") == "EACCES"
    xs.set_perms("dom0", "@introduceDomain", "n0", "r5")
    xs.introduce("dom0", 9)
    assert xs.take_events("dom5") == [(b"@introduceDomain", b"i")]


def test_too_long_events_are_dropped(xs: XS) -> None:
    xs.watch("dom0", "/local/domain/0/l", "T" * 2100)
    xs.take_events("dom0")
    xs.write("dom0", "/local/domain/0/l/" + "q" * 2000)     # event payload 4120 bytes: dropped (C)
    xs.write("dom0", "/local/domain/0/l/" + "q" * 1900)
    assert [len(p) for p, _ in xs.take_events("dom0")] == [1918]


def test_backlog_is_bounded_and_reported(xs: XS) -> None:
    small = XS(quota=Quota(event_backlog_bytes=200))
    small.connect("w", 0)
    small.ok("w", T.XS_WATCH, b"/\0t\0")
    small.core.handle("w", Message(T.XS_WRITE, 1, 0, b"/x\0"))
    for i in range(20):
        small.core.handle("w", Message(T.XS_WRITE, 2 + i, 0, f"/x/{i}\0".encode()))
    assert small.core.backlogged("w")
    events = [m for _, m in small.core.take_output() if m.type == T.XS_WATCH_EVENT]
    assert 0 < len(events) < 21
    assert not small.core.backlogged("nobody")


# ---- transactions ----------------------------------------------------------------------------------

def test_transaction_ids_and_nesting(xs: XS) -> None:
    assert [xs.start("dom0"), xs.start("dom0")] == [1, 2]                        # (C)
    assert xs.error("dom0", T.XS_TRANSACTION_START, b"", tx=1) == "EBUSY"       # (C)
    assert xs.end("dom0", 2, commit=False) == "OK"
    assert xs.end("dom0", 2, commit=False) == "ENOENT"                          # (C)
    xs.connect("other", 0)
    assert xs.start("other") == 1                                               # ids are per connection


def test_transaction_sees_its_own_view_and_fires_at_commit(xs: XS) -> None:
    xs.connect("watcher", 0)
    xs.watch("watcher", "/w", "t")
    xs.take_events("watcher")
    tx = xs.start("dom0")
    xs.write("dom0", "/w/x", b"v1", tx)
    xs.write("dom0", "/w/y/z", b"v1", tx)
    xs.rm("dom0", "/w/x", tx)
    assert xs.error("dom0", T.XS_READ, b"/w/x\0", tx) == "ENOENT"
    assert xs.read("dom0", "/w/y/z", tx) == b"v1"
    assert xs.error("dom0", T.XS_READ, b"/w/y/z\0") == "ENOENT"                 # not visible outside
    assert xs.take_events("watcher") == []
    assert xs.end("dom0", tx) == "OK"
    # (C) one event for the surviving write; none for /w/x, created and removed inside
    assert xs.take_events("watcher") == [(b"/w/y/z", b"t")]
    assert xs.read("dom0", "/w/y/z") == b"v1"


def test_generation_counts_in_a_transaction_match_c(xs: XS) -> None:
    xs.write("dom0", "/g/a/b", b"v")
    xs.rm("dom0", "/g/a")                        # generation 11 (no children)
    t1, t2 = xs.start("dom0"), xs.start("dom0")
    xs.write("dom0", "/g/t1", b"x", t1)
    # (C) inside: the new node and its parent got the next generations
    assert xs.generation("dom0", "/g/t1", t1) == xs.generation("dom0", "/g", t1) - 1
    assert xs.end("dom0", t1) == "OK"
    # (C) commit gives them fresh ones, in first-access order: the node, then its parent
    assert xs.generation("dom0", "/g") == xs.generation("dom0", "/g/t1") + 1
    assert xs.end("dom0", t2, commit=False) == "OK"


def _conflict_read(xs: XS, tx: int) -> None:
    xs.read("dom0", "/c/node", tx)
    xs.write("other", "/c/node", b"theirs")


def _conflict_write_only(xs: XS, tx: int) -> None:
    xs.write("dom0", "/c/node", b"mine", tx)
    xs.write("other", "/c/node", b"theirs")


def _conflict_read_missing(xs: XS, tx: int) -> None:
    xs.error("dom0", T.XS_READ, b"/c/new\0", tx)
    xs.write("other", "/c/new", b"x")


def _conflict_sibling_create(xs: XS, tx: int) -> None:
    xs.write("dom0", "/c/p1", b"x", tx)
    xs.write("other", "/c/p2", b"x")


def _conflict_removed(xs: XS, tx: int) -> None:
    xs.read("dom0", "/c/node", tx)
    xs.rm("other", "/c/node")


def _no_conflict_unrelated(xs: XS, tx: int) -> None:
    xs.read("dom0", "/c/node", tx)
    xs.write("dom0", "/c/node/mine", b"x", tx)
    xs.write("other", "/elsewhere", b"x")


def _no_conflict_same_value_elsewhere(xs: XS, tx: int) -> None:
    xs.write("dom0", "/c/node", b"mine", tx)
    xs.read("other", "/c/node")


@pytest.mark.parametrize("scenario, commit, expected", [
    (_conflict_read, True, "EAGAIN"),             # (C) example 2 of transaction.c
    (_conflict_write_only, True, "EAGAIN"),       # (C) a write reads first
    (_conflict_read_missing, True, "EAGAIN"),     # (C)
    (_conflict_sibling_create, True, "EAGAIN"),   # (C) both changed /c's children
    (_conflict_removed, True, "EAGAIN"),          # (C) example 3
    (_no_conflict_unrelated, True, "OK"),
    (_no_conflict_same_value_elsewhere, True, "OK"),
    (_conflict_read, False, "OK"),                # abort always works
    (_no_conflict_unrelated, False, "OK"),
])
def test_commit_abort_conflict(xs: XS, scenario, commit: bool, expected: str) -> None:
    xs.connect("other", 0)
    xs.write("dom0", "/c/node", b"orig")
    before = tree(xs)
    tx = xs.start("dom0")
    scenario(xs, tx)
    outside = tree(xs)
    assert xs.end("dom0", tx, commit) == expected
    after = tree(xs)
    if expected == "OK" and commit:
        assert after != outside or scenario is _no_conflict_same_value_elsewhere
    else:
        assert after == outside                   # nothing of the transaction leaked
    assert before["/c/node"][1] == ["n0"]
    assert xs.end("dom0", tx) == "ENOENT"         # (C) gone either way
    assert xs.core.check() == []


def test_a_transaction_touching_thousands_of_nodes(xs: XS) -> None:
    xs.connect("watcher", 0)
    xs.watch("watcher", "/tx", "w")
    tx = xs.start("dom0")
    for i in range(3000):
        xs.write("dom0", f"/tx/n{i}", b"v%d" % i, tx)
    assert xs.core.node_count() == 3
    names, offset = [], 0
    while True:
        rest = xs.ok("dom0", T.XS_DIRECTORY_PART, b"/tx\0%d\0" % offset, tx).split(b"\0", 1)[1]
        if rest.endswith(b"\0\0") or rest == b"\0":
            names += rest.split(b"\0")[:-2]
            break
        names += rest.split(b"\0")[:-1]
        offset += len(rest)
    assert len(names) == 3000
    xs.take_events("watcher")
    assert xs.end("dom0", tx) == "OK"
    assert xs.core.node_count() == 3 + 1 + 3000
    assert len(xs.take_events("watcher")) == 3000
    xs.rm("dom0", "/tx")
    assert xs.core.node_count() == 3
    assert xs.core.check() == []


def test_reset_watches_drops_watches_and_transactions(xs: XS) -> None:
    xs.watch("dom0", "/a", "t")
    tx = xs.start("dom0")
    assert xs.ok("dom0", T.XS_RESET_WATCHES, b"junk\0") == b"OK\0"             # (C) arguments ignored
    assert xs.end("dom0", tx) == "ENOENT"
    assert xs.error("dom0", T.XS_UNWATCH, b"/a\0t\0") == "ENOENT"


def test_disconnect_drops_watches_transactions_and_pending_output(xs: XS) -> None:
    xs.connect("c", 0)
    xs.watch("c", "/", "t")
    xs.start("c")
    xs.core.handle("dom0", Message(T.XS_WRITE, 1, 0, b"/x\0"))
    xs.core.disconnect("c")
    assert all(k != "c" for k, _ in xs.core.take_output())
    xs.write("dom0", "/y")
    assert xs.events["c"] == [(b"/", b"t")]
    assert xs.core.check() == []


# ---- quotas ------------------------------------------------------------------------------------------

def test_node_quota(xs: XS) -> None:
    small = XS(quota=Quota(nodes=10))
    small.connect("dom0", 0)
    home_for(small, 5)                         # dom5 owns 1 node: its home
    for i in range(8):
        small.write("dom5", f"n{i}")
    small.write("dom5", "a")                   # 10 now
    assert small.error("dom5", T.XS_WRITE, b"b\0") == "ENOSPC"
    small.write("dom0", "/local/domain/5/c")   # privileged: no limit (owner stays 5)
    assert small.get_perms("dom0", "/local/domain/5/c") == ["n5"]
    small.rm("dom5", "a")
    small.rm("dom5", "c")
    assert small.error("dom5", T.XS_WRITE, b"x/y\0") == "ENOSPC"   # needs two, has room for one
    small.write("dom5", "x")
    assert small.core.check() == []


def test_node_size_quota(xs: XS) -> None:
    home = home_for(xs, 5)
    # record = 24 + 8 per permission + value + children; must stay below 2048
    xs.write("dom5", "v", b"x" * 2015)
    assert xs.error("dom5", T.XS_WRITE, b"v\0" + b"x" * 2016) == "ENOSPC"
    xs.write("dom0", home + "/v", b"x" * 3000)                                  # privileged
    assert xs.read("dom5", "v") == b"x" * 3000


def test_permissions_quota(xs: XS) -> None:
    home_for(xs, 5)
    xs.set_perms("dom5", "/local/domain/5", "n5", "r1", "r2", "r3", "r4")
    assert xs.error("dom5", T.XS_SET_PERMS, b"/local/domain/5\0n5\0r1\0r2\0r3\0r4\0r6\0") == "ENOSPC"
    xs.set_perms("dom0", "/local/domain/5", "n5", "r1", "r2", "r3", "r4", "r6")


def test_watch_quota(xs: XS) -> None:
    home_for(xs, 5)
    for i in range(129):                       # C's check is count > 128 before adding
        xs.watch("dom5", f"w{i}", "t")
    assert xs.error("dom5", T.XS_WATCH, b"w129\0t\0") == "E2BIG"
    for i in range(200):
        xs.watch("dom0", f"/w{i}", "t")


def test_transaction_quota(xs: XS) -> None:
    home_for(xs, 5)
    ids = [xs.start("dom5") for _ in range(11)]  # C's check is count > 10 before adding
    assert xs.error("dom5", T.XS_TRANSACTION_START, b"\0") == "ENOSPC"
    assert xs.end("dom5", ids[0], commit=False) == "OK"
    xs.start("dom5")
    for _ in range(20):
        xs.start("dom0")


def test_transaction_nodes_quota_poisons_the_transaction() -> None:
    xs = XS(quota=Quota(transaction_nodes=20))
    xs.connect("dom0", 0)
    home_for(xs, 5)
    tx = xs.start("dom5")
    results = [xs.result("dom5", T.XS_WRITE, f"n{i}\0".encode(), tx) for i in range(30)]
    assert "ENOSPC" in results
    assert xs.end("dom5", tx) == "ENOMEM"        # C: a failed request poisons the transaction
    tx = xs.start("dom0")
    for i in range(30):
        xs.write("dom0", f"/p{i}", b"", tx)
    assert xs.end("dom0", tx) == "OK"


def test_node_quota_is_checked_again_at_commit() -> None:
    xs = XS(quota=Quota(nodes=5))
    xs.connect("dom0", 0)
    home_for(xs, 5)
    tx = xs.start("dom5")
    for i in range(6):                          # inside, C only checks the count from before
        xs.write("dom5", f"n{i}", b"", tx)
    assert xs.end("dom5", tx) == "ENOSPC"
    assert xs.core.node_count() == 3 + 3


def test_memory_quota() -> None:
    xs = XS(quota=Quota(memory=3000))
    xs.connect("dom0", 0)
    home_for(xs, 5)
    results = [xs.result("dom5", T.XS_WRITE, f"n{i}\0".encode() + b"x" * 500) for i in range(8)]
    assert results[0] == "OK" and "ENOMEM" in results
    assert xs.error("dom5", T.XS_WATCH, b"w\0" + b"t" * 1000 + b"\0") == "ENOMEM"
    # dom0 may still write, even nodes owned by others, unless the owner is over quota
    xs.write("dom0", "/free", b"x" * 3000)
    assert xs.core.check() == []


def test_quota_accounting_follows_ownership(xs: XS) -> None:
    home_for(xs, 5)
    home_for(xs, 6)
    xs.write("dom5", "a")
    stats = lambda d: xs.ok("dom0", T.XS_CONTROL, b"quota\0%d\0" % d).decode()   # noqa: E731
    assert "nodes           :        2\n" in stats(5)
    xs.set_perms("dom0", "/local/domain/5/a", "n6")
    assert "nodes           :        1\n" in stats(5)
    assert "nodes           :        2\n" in stats(6)


# ---- domains -----------------------------------------------------------------------------------------

def test_introduce_and_release(xs: XS) -> None:
    xs.watch("dom0", "@introduceDomain", "I")
    xs.watch("dom0", "@releaseDomain", "R")
    xs.take_events("dom0")
    assert xs.ok("dom0", T.XS_IS_DOMAIN_INTRODUCED, b"7\0") == b"F\0"
    xs.introduce("dom0", 7, gfn=1234, port=3)
    assert xs.core.take_effects() == [Introduced(7, 1234, 3)]
    assert xs.take_events("dom0") == [(b"@introduceDomain", b"I")]
    assert xs.ok("dom0", T.XS_IS_DOMAIN_INTRODUCED, b"7\0") == b"T\0"
    assert xs.ok("dom0", T.XS_IS_DOMAIN_INTRODUCED, b"0\0") == b"T\0"              # (C)
    assert xs.ok("dom0", T.XS_IS_DOMAIN_INTRODUCED, str(DOMID_SELF).encode() + b"\0") == b"T\0"   # (C)
    # the toolstack gives the domain its home; the domain connects and writes
    home = home_for(xs, 7)
    xs.write("dom7", "data/sub", b"y")
    xs.write("dom0", "/other", b"y")
    xs.set_perms("dom0", "/other", "n0", "r7")
    xs.watch("dom0", home, "L")
    xs.watch("dom7", "data", "mine")
    xs.take_events("dom0")
    xs.raw("dom0", T.XS_RELEASE, b"7\0")
    # reply first, then the removal of what 7 owned, then @releaseDomain (C, usual case)
    assert [m.type for _, m in xs.last_output if _ == "dom0"] == [T.XS_RELEASE, T.XS_WATCH_EVENT,
                                                                   T.XS_WATCH_EVENT]
    assert xs.take_events("dom0") == [(home.encode(), b"L"), (b"@releaseDomain", b"R")]
    assert xs.core.take_effects() == [Released(7)]
    assert xs.directory("dom0", "/local/domain") == []                           # (C)
    assert xs.get_perms("dom0", "/other") == ["n0", "r7"]                         # (C) others' nodes stay
    assert xs.ok("dom0", T.XS_IS_DOMAIN_INTRODUCED, b"7\0") == b"F\0"
    assert xs.error("dom0", T.XS_RELEASE, b"7\0") == "ENOENT"
    assert xs.error("dom7", T.XS_READ, b"/other\0") == "EACCES"                  # it speaks for no one now
    assert xs.core.check() == []


def test_reintroduce_resets_the_domain_and_maps_again(xs: XS) -> None:
    xs.introduce("dom0", 7)
    home_for(xs, 7)
    xs.watch("dom7", "x", "t")
    tx = xs.start("dom7")
    xs.core.take_effects()
    xs.introduce("dom0", 7, gfn=5, port=9)
    assert xs.core.take_effects() == [Introduced(7, 5, 9)]
    assert xs.end("dom7", tx) == "ENOENT"                      # C's domain_conn_reset
    assert xs.error("dom7", T.XS_UNWATCH, b"x\0t\0") == "ENOENT"


def test_domain_gone_releases_and_fires(xs: XS) -> None:
    xs.watch("dom0", "@releaseDomain", "R")
    xs.introduce("dom0", 3)
    home_for(xs, 3)
    xs.write("dom3", "stuff/more", b"x")
    xs.take_events("dom0")
    xs.core.take_effects()
    before = xs.core.node_count()
    xs.core.domain_gone(3)
    assert xs.core.node_count() == before - 3
    assert xs.core.take_effects() == [Released(3)]
    assert xs.take_events("dom0") == [(b"@releaseDomain", b"R")]
    xs.core.domain_gone(4)                     # never introduced: no ring to unmap, still an event
    assert xs.core.take_effects() == []
    assert xs.take_events("dom0") == [(b"@releaseDomain", b"R")]
    assert xs.core.check() == []


def test_release_removes_owned_subtrees_of_others_too(xs: XS) -> None:
    xs.introduce("dom0", 4)
    xs.mkdir("dom0", "/vm/a/b")
    xs.set_perms("dom0", "/vm/a", "n4")
    xs.write("dom0", "/vm/a/b/c", b"owned by 4 through inheritance")
    xs.set_perms("dom0", "/vm/a/b/c", "n0")
    xs.ok("dom0", T.XS_RELEASE, b"4\0")
    assert xs.directory("dom0", "/vm") == []
    assert xs.core.check() == []


def test_set_target_gives_a_stub_domain_its_targets_rights(xs: XS) -> None:
    xs.introduce("dom0", 5)
    xs.introduce("dom0", 6)
    home_for(xs, 5)
    xs.connect("stub", 6)
    xs.write("dom5", "private", b"p")
    assert xs.error("stub", T.XS_READ, b"/local/domain/5/private\0") == "EACCES"
    assert xs.ok("dom0", T.XS_SET_TARGET, b"6\0" b"5\0") == b"OK\0"
    assert xs.read("stub", "/local/domain/5/private") == b"p"
    xs.write("stub", "/local/domain/5/by-stub", b"q")
    assert xs.get_perms("dom0", "/local/domain/5/by-stub") == ["n6"]
    assert xs.error("stub", T.XS_INTRODUCE, b"9\0" b"1\0" b"1\0") == "EACCES"   # still unprivileged


def test_control(xs: XS) -> None:
    assert xs.ok("dom0", T.XS_CONTROL, b"check\0") == b"OK\0"
    assert b"quota\t" in xs.ok("dom0", T.XS_CONTROL, b"help\0")
    settings = xs.ok("dom0", T.XS_CONTROL, b"quota\0").decode()
    # (C) the same table, same format
    assert "nodes            :     1000 Nodes per domain\n" in settings
    assert "memory           :  2621440 Total Xenstore memory per domain (error level)\n" in settings
    assert xs.ok("dom0", T.XS_CONTROL, b"quota\0set\0nodes\0" b"7\0") == b"OK\0"
    assert xs.core.quota.nodes == 7
    assert xs.error("dom0", T.XS_CONTROL, b"quota\0set\0bogus\0" b"7\0") == "EINVAL"
    assert xs.error("dom0", T.XS_CONTROL, b"quota\0" b"99\0") == "ENOENT"


# ---- persistence -------------------------------------------------------------------------------------

def test_dump_restore_keeps_tree_perms_generations_domains_and_domain_watches(xs: XS) -> None:
    xs.introduce("dom0", 5, gfn=99, port=7)
    xs.introduce("dom0", 6)
    home_for(xs, 5)
    xs.ok("dom0", T.XS_SET_TARGET, b"6\0" b"5\0")
    xs.write("dom5", "device/vbd/51712/state", b"4")
    xs.set_perms("dom0", "/tool", "n0", "r5")
    xs.set_perms("dom0", "@releaseDomain", "n0", "r5")
    xs.watch("dom5", "device", "rel")
    xs.watch("dom5", "/local/domain/5/device", "abs")
    xs.watch("dom0", "/tool", "socket watch")
    xs.start("dom5")
    before = tree(xs)
    generations = {p: xs.generation("dom0", p) for p in before}
    data = xs.core.dump()

    restored = XS(XenstoreCore.restore(data))
    # the shell maps the rings of the domains that were introduced, as after XS_INTRODUCE
    assert restored.core.take_effects() == [Introduced(5, 99, 7), Introduced(6, 77, 3)]
    restored.connect("dom0", 0)
    assert tree(restored) == before
    assert {p: restored.generation("dom0", p) for p in before} == generations
    assert restored.core.node_count() == xs.core.node_count()
    assert restored.ok("dom0", T.XS_IS_DOMAIN_INTRODUCED, b"5\0") == b"T\0"
    assert restored.core.check() == []
    # the domain reconnects: its watches come back (each fires once); dom0's did not survive
    restored.connect("dom5 again", 5)
    assert restored.take_events("dom5 again") == [(b"device", b"rel"), (b"/local/domain/5/device", b"abs")]
    restored.write("dom0", "/local/domain/5/device/x", b"1")
    restored.write("dom0", "/tool", b"t")
    assert restored.take_events("dom5 again") == [(b"device/x", b"rel"), (b"/local/domain/5/device/x", b"abs")]
    assert restored.take_events("dom0") == []
    # its transaction died with the old process: EAGAIN (retry), not C's ENOENT; a new one gets a new id
    assert restored.error("dom5 again", T.XS_TRANSACTION_END, b"T\0", tx=1) == "EAGAIN"
    assert restored.error("dom5 again", T.XS_TRANSACTION_END, b"T\0", tx=1 << 20) == "ENOENT"    # never issued
    assert restored.start("dom5 again") == 2 + TX_ID_RESERVE                  # after the ids the dump reserved
    # new writes get later generations than anything before the restart
    assert restored.generation("dom0", "/tool") > max(generations.values())
    # the target relation and special perms came back
    restored.connect("stub", 6)
    assert restored.read("stub", "/local/domain/5/device/vbd/51712/state") == b"4"
    restored.watch("dom5 again", "@releaseDomain", "r")
    restored.take_events("dom5 again")
    restored.core.domain_gone(6)
    assert restored.take_events("dom5 again") == [(b"@releaseDomain", b"r")]
    # a dump of a restored core before the domain came back keeps its watches
    again = XenstoreCore.restore(XenstoreCore.restore(data).dump())
    again.connect("d5", 5)
    assert len([m for _, m in again.take_output() if m.type == T.XS_WATCH_EVENT]) == 2


@pytest.mark.parametrize("data", [b"", b"junk", msgpack.packb({"format": "other"}),
                                  msgpack.packb({"format": "xdom-xenstored-core", "version": 99})])
def test_restore_refuses_what_it_cannot_read(data: bytes) -> None:
    with pytest.raises(ValueError):
        XenstoreCore.restore(data)


def test_a_transaction_open_at_a_restart_ends_with_eagain_on_any_connection_of_its_domid() -> None:
    """A restarted xenstored aborted every open transaction: a request naming an id given out
    before the restart is EAGAIN (the client retries the transaction), on a domain's ring and
    on a unix socket that reconnected (domain 0), however many restarts ago.  An id beyond
    those given out (and the few a dump reserves ahead) stays ENOENT, as in C."""
    xs = XS()
    xs.connect("a", 0)
    xs.connect("b", 0)
    xs.connect("dom0", 0)
    xs.introduce("a", 5)
    home_for(xs, 5)
    assert [xs.start("a"), xs.start("a"), xs.start("a")] == [1, 2, 3]
    assert xs.end("a", 3) == "OK"
    assert xs.start("b") == 1
    assert xs.start("dom5") == 1
    assert xs.error("a", T.XS_READ, b"/\0", tx=9) == "ENOENT"                  # (C) bogus, before a restart

    restored = XS(XenstoreCore.restore(XenstoreCore.restore(xs.core.dump()).dump()))   # two restarts
    restored.core.take_effects()
    restored.connect("socket", 0)
    assert restored.error("socket", T.XS_READ, b"/\0", tx=1) == "EAGAIN"
    assert restored.error("socket", T.XS_WRITE, b"/x\0v", tx=2) == "EAGAIN"
    assert restored.error("socket", T.XS_TRANSACTION_END, b"T\0", tx=1) == "EAGAIN"
    assert restored.error("socket", T.XS_TRANSACTION_END, b"F\0", tx=1) == "EAGAIN"  # b's tx 1 was open too
    # ended before the restart: its commit's reply may have died with xenstored (on a socket)
    assert restored.error("socket", T.XS_TRANSACTION_END, b"T\0", tx=3) == "EAGAIN"
    assert restored.error("socket", T.XS_READ, b"/\0", tx=4 + TX_ID_RESERVE) == "ENOENT"   # never given out
    first = 4 + TX_ID_RESERVE                                                   # after every id given out
    assert restored.start("socket") == first
    restored.connect("other socket", 0)
    assert restored.start("other socket") == first                              # ids are per connection (C)
    assert restored.core.transaction_ids_unsaved()                              # the shell saves now
    restored.core.dump()
    assert restored.start("other socket") == first + 1
    assert not restored.core.transaction_ids_unsaved()                          # the dump reserved it
    assert restored.error("x", T.XS_READ, b"/\0") == "EACCES"                   # unknown connection first
    restored.connect("dom5 again", 5)
    assert restored.error("dom5 again", T.XS_TRANSACTION_END, b"T\0", tx=1) == "EAGAIN"
    tx = restored.start("dom5 again")
    assert tx == 2 + TX_ID_RESERVE
    restored.write("dom5 again", "/local/domain/5/k", b"v", tx=tx)
    assert restored.end("dom5 again", tx) == "OK"
    assert restored.read("socket", "/local/domain/5/k") == b"v"
    # a domain that dies takes its ids with it: a new domain 5 is a stranger to them
    restored.core.domain_gone(5)
    restored.core.disconnect("dom5 again")
    restored.introduce("socket", 5)
    restored.connect("new dom5", 5)
    assert restored.error("new dom5", T.XS_READ, b"/\0", tx=1) == "ENOENT"
    assert restored.start("new dom5") == 1
    assert restored.core.check() == []


def test_transaction_ids_of_a_fresh_core_are_cs() -> None:
    """Without a restart nothing changes: ids from 1 per connection, unknown ids ENOENT."""
    xs = XS()
    xs.connect("a", 0)
    assert xs.error("a", T.XS_TRANSACTION_END, b"T\0", tx=1) == "ENOENT"       # (C)
    assert xs.start("a") == 1
    again = XS(XenstoreCore.restore(XS().core.dump()))
    again.connect("a", 0)
    assert again.error("a", T.XS_READ, b"/\0", tx=1) == "ENOENT"
    assert again.start("a") == 1


def test_incarnations_are_recorded_and_kept_across_dump_and_restore() -> None:
    """The hypervisor hook may answer with the domid's incarnation; the record keeps it."""
    alive = {5: 2, 6: 0}
    core = XenstoreCore(domain_exists=lambda d: alive.get(d, False))
    xs = XS(core)
    xs.connect("dom0", 0)
    xs.write("dom0", "/n", b"v")
    xs.set_perms("dom0", "/n", "n0", "r5")                                   # made by the hook's answer
    xs.introduce("dom0", 6)                                                  # made by an introduction
    assert (core.incarnation(5), core.incarnation(6), core.incarnation(7)) == (2, 0, None)
    again = XenstoreCore.restore(core.dump())
    assert (again.incarnation(5), again.incarnation(6)) == (2, 0)
    again.set_incarnation(6, 1)
    assert XenstoreCore.restore(again.dump()).incarnation(6) == 1
    plain = XS()                                                             # no hypervisor: not known
    plain.connect("dom0", 0)
    plain.introduce("dom0", 6)
    assert plain.core.incarnation(6) is None
    assert XenstoreCore.restore(plain.core.dump()).incarnation(6) is None


def test_restore_refuses_a_torn_tree() -> None:
    state = msgpack.unpackb(XenstoreCore().dump())
    state["nodes"] = [n for n in state["nodes"] if n[0] != "/tool"]
    with pytest.raises(ValueError):
        XenstoreCore.restore(msgpack.packb(state))


def test_domain_exists_asks_the_hypervisor_after_a_death() -> None:
    """A dead domid named in permissions is ignored; once the hypervisor says
    it lives again (a restarted domain keeps its domid), it counts again."""
    from xdom.backends.xenstored.core import XenstoreCore as Core
    from xdom.domains.abi.xs_wire import Message as Msg
    from xdom.domains.abi.xs_wire import XsType as T

    alive = {5: False}
    for hook in (None, lambda d: alive.get(d, True)):
        core = Core(domain_exists=hook)
        core.connect("dom0", 0)
        core.domain_gone(5)
        alive[5] = True                                  # restarted under the same domid
        core.handle("dom0", Msg(T.XS_WRITE, 1, 0, b"/shared\0v"))
        core.handle("dom0", Msg(T.XS_SET_PERMS, 2, 0, b"/shared\0n0\0r5\0"))
        core.connect("d5", 5)
        core.handle("d5", Msg(T.XS_READ, 3, 0, b"/shared\0"))
        reply = [m for c, m in core.take_output() if c == "d5"][-1]
        if hook is None:
            assert reply.type == T.XS_ERROR               # told dead, never told otherwise
        else:
            assert (reply.type, reply.payload) == (T.XS_READ, b"v")
        alive[5] = False
