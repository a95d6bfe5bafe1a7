"""The core's dump, journal and restore, and what a restart does to transactions and domains."""

from __future__ import annotations

import msgpack
import pytest
from xs_core_harness import XS, T, home_for, tree, xs_with_dom0

from xdom.backends.xenstored.core import TX_ID_RESERVE, XenstoreCore
from xdom.backends.xenstored.domains import Introduced


@pytest.fixture
def xs() -> XS:
    return xs_with_dom0()


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
