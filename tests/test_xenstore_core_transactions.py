"""The core's transactions: ids, their private view, commit, abort and conflicts (EAGAIN).
"(C)": as Xen 4.17's xenstored answered."""

from __future__ import annotations

import pytest
from xs_core_harness import XS, T, tree, xs_with_dom0

from xdom.domains.abi.xs_wire import Message


@pytest.fixture
def xs() -> XS:
    return xs_with_dom0()


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
