"""The core's permissions: who may do what to a node, and that permissions only name domains that
exist (XSA-322).  "(C)": as Xen 4.17's xenstored answered."""

from __future__ import annotations

import pytest
from xs_core_harness import ROLES, XS, T, home_for, perms_world_of, xs_with_dom0

from xdom.backends.xenstored.core import XenstoreCore
from xdom.domains.abi.xs_wire import Message


@pytest.fixture
def xs() -> XS:
    return xs_with_dom0()


# ---- permissions -----------------------------------------------------------------------------------

# ROLES (xs_core_harness): /local/domain/5/data: owner 5, r6 reads, w7 writes, b8 both; 9 is a stranger;
# 10 targets 5.
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
    return perms_world_of(xs)


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
