"""The core's quotas: nodes, node size, permissions, watches, transactions and memory per domain."""

from __future__ import annotations

import pytest
from xs_core_harness import XS, T, home_for, xs_with_dom0

from xdom.backends.xenstored.quota import Quota


@pytest.fixture
def xs() -> XS:
    return xs_with_dom0()


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
