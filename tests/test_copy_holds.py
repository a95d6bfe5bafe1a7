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


def test_a_run_is_judged_whole_only_when_every_entry_grants_the_copier_a_whole_page() -> None:
    """hold_many reads a run in one go and passes it whole only if every entry is a whole-page
    grant to the copier: a sub-page grant, another domain's or a transitive entry in the middle
    is judged alone (and refused), its neighbours still pass, each with its own flags and frame."""
    from xdom.domains.abi.grant_table import GTF_permit_access, GTF_readonly, GTF_sub_page, GTF_transitive
    t = BrokerGrantTable(1, owner=1)
    try:
        for ref in range(30, 38):
            t.seed(ref, COPIER, 200 + ref)
        odd = {31: GTF_permit_access | GTF_sub_page, 33: GTF_transitive, 35: GTF_permit_access | GTF_readonly}
        for ref, flags in odd.items():
            t._map[ref * 8:ref * 8 + 2] = flags.to_bytes(2, "little")
        t.seed(36, OTHER, 236)
        held = t.hold_many(range(30, 38), COPIER)
        try:
            assert {ref: status for ref, (status, _flags, _gfn) in held.checked.items()} == {
                30: GNTST_okay, 31: GNTST_general_error, 32: GNTST_okay, 33: GNTST_general_error,
                34: GNTST_okay, 35: GNTST_okay, 36: GNTST_general_error, 37: GNTST_okay}
            assert held.checked[35] == (GNTST_okay, GTF_permit_access | GTF_readonly, 235)
            assert held.checked[37] == (GNTST_okay, GTF_permit_access, 237)
        finally:
            t.release(held)
        # all granted: one run, judged whole, the same answers an entry at a time would give
        for ref in (31, 33, 36):
            t.seed(ref, COPIER, 200 + ref)
        held = t.hold_many(range(30, 38), COPIER)
        try:
            assert held.runs == [(30, 8)]
            assert held.checked == {ref: t._check(ref, COPIER, readonly=True) for ref in range(30, 38)}
        finally:
            t.release(held)
    finally:
        t.close()


def test_a_pinned_entry_in_a_run_is_copied_through_its_pinned_frame() -> None:
    """Xen keeps using the frame of the first pin: a granter that rewrites the frame of an entry
    mapped by the copier does not move a copy of it, whole run or not."""
    t = BrokerGrantTable(1, owner=1)
    try:
        for ref in range(40, 44):
            t.seed(ref, COPIER, 300 + ref)
        assert t.pin(42, COPIER, readonly=True) == (GNTST_okay, 342)
        t.seed(42, COPIER, 999)          # the granter points the mapped entry elsewhere
        held = t.hold_many(range(40, 44), COPIER)
        try:
            assert [held.checked[ref][2] for ref in range(40, 44)] == [340, 341, 342, 343]
        finally:
            t.release(held)
        t.unpin(42, readonly=True)
    finally:
        t.close()


def test_refs_out_of_the_table_are_bad_and_the_rest_still_held() -> None:
    from xdom.domains.abi.grant_table import GNTST_bad_gntref
    t = BrokerGrantTable(1, owner=1)
    try:
        t.seed(0, COPIER, 7)
        t.seed(511, COPIER, 8)
        held = t.hold_many([-1, 0, 511, 512, 1 << 31], COPIER)
        try:
            assert held.checked == {-1: (GNTST_bad_gntref, 0, 0), 512: (GNTST_bad_gntref, 0, 0),
                                    1 << 31: (GNTST_bad_gntref, 0, 0),
                                    0: (GNTST_okay, 1, 7), 511: (GNTST_okay, 1, 8)}
            assert held.runs == [(0, 1), (511, 1)]
        finally:
            t.release(held)
    finally:
        t.close()


@pytest.mark.parametrize("odd", ["sub-page", "transitive", "other domain", "not granted"])
def test_one_odd_entry_alone_keeps_its_run_from_passing_whole(odd: str) -> None:
    """Each way an entry can fail a copier, alone in a run of good ones: the run is not passed whole,
    that entry is refused and every other passes with its own frame."""
    from xdom.domains.abi.grant_table import GTF_permit_access, GTF_sub_page, GTF_transitive
    t = BrokerGrantTable(1, owner=1)
    try:
        for ref in range(40, 48):
            t.seed(ref, COPIER, 300 + ref)
        if odd == "other domain":
            t.seed(44, OTHER, 344)
        else:
            flags = {"sub-page": GTF_permit_access | GTF_sub_page, "transitive": GTF_transitive, "not granted": 0}[odd]
            t._map[44 * 8:44 * 8 + 2] = flags.to_bytes(2, "little")
        held = t.hold_many(range(40, 48), COPIER)
        try:
            assert not any(run.first <= 44 < run.first + len(run.gfns) for run in held.whole)
            assert held.whole_gfns(range(40, 48), writable=False) is None
            assert held.checked[44][0] == GNTST_general_error
            assert [held.checked[ref] for ref in (40, 47)] == [(GNTST_okay, GTF_permit_access, 340),
                                                              (GNTST_okay, GTF_permit_access, 347)]
        finally:
            t.release(held)
    finally:
        t.close()


def test_whole_gfns_answers_the_refs_in_the_order_named() -> None:
    """A uniform batch takes its frames from whole_gfns: the run's own column when the refs are the
    run in order, else each ref's frame looked up; in any order, each ref gets its own entry's frame."""
    t = BrokerGrantTable(1, owner=1)
    try:
        for ref in range(50, 58):
            t.seed(ref, COPIER, 400 + 3 * ref)
        in_order = list(range(50, 58))
        for refs in (in_order, in_order[::-1], [53, 50, 57, 51, 52, 56, 54, 55], in_order[2:] + in_order[:2]):
            held = t.hold_many(refs, COPIER)
            try:
                assert list(held.whole_gfns(refs, writable=True)) == [400 + 3 * ref for ref in refs]
                assert list(held.whole_gfns(refs[:3], writable=False)) == [400 + 3 * ref for ref in refs[:3]]
            finally:
                t.release(held)
    finally:
        t.close()
