"""The entry locks a grant-copy batch takes (BrokerGrantTable.hold_many): only entries that grant the
copier access are locked, neighbours in one call, one by one around an entry the granter holds; a grant
map (pin) likewise turns such an entry away before taking its lock."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from xdom.broker.gnttab import BrokerGrantTable
from xdom.domains.abi.grant_table import GNTST_eagain, GNTST_general_error, GNTST_okay
from xdom.domains.hostsys import grant_lock

COPIER, OTHER = 5, 6


@pytest.fixture
def table() -> Iterator[tuple[BrokerGrantTable, int]]:
    """A broker table, and the granter's own description of it (its locks exclude the broker's)."""
    t = BrokerGrantTable(1, owner=1)
    granter_fd = t.domain_fd()
    for ref in (10, 12, 20, 21, 22):
        t.seed(ref, COPIER, 100 + ref)
    t.seed(11, OTHER, 111)
    try:
        yield t, granter_fd
    finally:
        os.close(granter_fd)
        t.close()


def _locked_by_broker(granter_fd: int, ref: int) -> bool:
    if grant_lock.lock_entry(granter_fd, ref, wait=False):
        grant_lock.unlock_entry(granter_fd, ref)
        return False
    return True


def test_an_entry_granted_to_another_domain_is_not_locked_by_naming_it(table) -> None:
    t, granter_fd = table
    held = t.hold_many({10, 11, 12, 13}, COPIER)
    try:
        assert held.checked[10] == (GNTST_okay, held.checked[10][1], 110)
        assert held.checked[12][0] == GNTST_okay
        assert held.checked[11][0] == GNTST_general_error       # granted to OTHER
        assert held.checked[13][0] == GNTST_general_error       # not granted at all
        assert [_locked_by_broker(granter_fd, r) for r in (10, 11, 12, 13)] == [True, False, True, False]
    finally:
        t.release(held)
    assert not any(_locked_by_broker(granter_fd, r) for r in (10, 11, 12, 13))


def test_neighbours_are_locked_in_one_call(table) -> None:
    t, granter_fd = table
    held = t.hold_many([22, 20, 21, 10], COPIER)
    try:
        assert sorted(held.runs) == [(10, 1), (20, 3)] and held.singles == []
        assert all(held.checked[r][0] == GNTST_okay for r in (10, 20, 21, 22))
    finally:
        t.release(held)
    assert not any(_locked_by_broker(granter_fd, r) for r in (10, 20, 21, 22))


def test_an_entry_the_granter_holds_is_eagain_and_its_neighbours_are_held_one_by_one(table) -> None:
    t, granter_fd = table
    assert grant_lock.lock_entry(granter_fd, 21, wait=False)
    try:
        held = t.hold_many({20, 21, 22}, COPIER)
        try:
            assert held.checked[21][0] == GNTST_eagain
            assert held.checked[20][0] == held.checked[22][0] == GNTST_okay
            assert held.runs == [] and sorted(held.singles) == [20, 22]
        finally:
            t.release(held)
    finally:
        grant_lock.unlock_entry(granter_fd, 21)
    assert not any(_locked_by_broker(granter_fd, r) for r in (20, 21, 22))


def test_mapping_an_entry_granted_to_another_domain_does_not_lock_it(table) -> None:
    """pin (grant map) turns such an entry away before locking: with the granter holding its lock,
    the answer is the entry's own error at once, not GNTST_eagain after waiting for the lock."""
    t, granter_fd = table
    assert grant_lock.lock_entry(granter_fd, 11, wait=False)
    try:
        assert t.pin(11, COPIER, readonly=True) == (GNTST_general_error, 0)
        assert t.pin(10, COPIER, readonly=True) == (GNTST_okay, 110)
    finally:
        grant_lock.unlock_entry(granter_fd, 11)
    t.unpin(10, readonly=True)


def test_a_failure_while_locking_leaves_nothing_locked(table, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel refusing a lock (ENOLCK) half-way: what was locked before is released, not leaked
    (a leaked lock would block the granter's end_access for good)."""
    t, granter_fd = table
    real = grant_lock.lock_entries

    def second_fails(fd: int, first: int, count: int, wait: bool) -> bool:
        if fd == t.fd and first == 20:
            raise OSError(errno.ENOLCK, "no locks available")
        return real(fd, first, count, wait)
    monkeypatch.setattr(grant_lock, "lock_entries", second_fails)
    with pytest.raises(OSError):
        t.hold_many({10, 20, 21}, COPIER)
    assert not any(_locked_by_broker(granter_fd, r) for r in (10, 20, 21))
