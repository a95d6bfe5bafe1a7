"""xenstored's sans-IO core, driven through ``handle()`` with raw wire messages.

Expected values marked "(C)" were read off Xen 4.17's own xenstored answering
the same requests (run beside xdom as a differential reference while this
was written); the suite itself needs nothing but the core.  This file
holds framing, paths and the tree requests; test_xenstore_core_*.py one
concept each (permissions, watches, transactions, quotas, domains,
persistence); xs_core_harness.py the test client they share.
"""

from __future__ import annotations

import pytest
from xs_core_harness import XS, T, home_for, tree, xs_with_dom0

from xdom.domains.abi.xs_wire import XENSTORE_PAYLOAD_MAX, Message


@pytest.fixture
def xs() -> XS:
    return xs_with_dom0()


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
