"""The core's domains: INTRODUCE, RELEASE, death, SET_TARGET and CONTROL."""

from __future__ import annotations

import pytest
from xs_core_harness import XS, T, home_for, xs_with_dom0

from xdom.backends.xenstored.domains import DOMID_SELF, Introduced, Released


@pytest.fixture
def xs() -> XS:
    return xs_with_dom0()


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
