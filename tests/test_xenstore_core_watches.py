"""The core's watches: which events fire, when, in what order, for whom.  "(C)": as Xen 4.17's
xenstored answered."""

from __future__ import annotations

import pytest
from xs_core_harness import XS, T, home_for, perms_world_of, xs_with_dom0

from xdom.backends.xenstored.quota import Quota
from xdom.domains.abi.xs_wire import Message


@pytest.fixture
def xs() -> XS:
    return xs_with_dom0()


@pytest.fixture
def perms_world(xs: XS) -> XS:
    return perms_world_of(xs)


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
