"""The broker's side of one domain's v1 grant table: pinning entries.

The table is a memfd the broker creates; the domain maps its own open file
description of it and writes entries directly.  Pinning follows Xen's
``_set_status_v1``: under the entry lock (see xdom.domains.hostsys.grant_lock) the
entry is copied out, checked (type GTF_permit_access, no sub-page, domid is
the mapper, a writable pin needs a writable grant) and GTF_reading /
GTF_writing are set.  Pin counts live here, not in guest memory, so a guest
that scribbles over its flags cannot make the broker forget a mapping.

The broker never waits for a lock a guest holds: it tries ``LOCK_TRIES``
times and answers GNTST_eagain.  Clearing flags on unpin that cannot get
the lock is deferred and retried, the pin count having dropped already.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import sub
from typing import NamedTuple

from xdom.domains.abi.grant_table import (
    ENTRIES_PER_FRAME,
    GRANT_ENTRY_V1,
    GRANT_ENTRY_V1_SIZE,
    PAGE_SIZE,
    GNTST_bad_gntref,
    GNTST_eagain,
    GNTST_general_error,
    GNTST_okay,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_sub_page,
    GTF_type_mask,
    GTF_writing,
    XDOM_GTF_mapped,
)
from xdom.domains.abi.hypercall_wire import MAX_BATCH
from xdom.domains.hostsys import grant_lock

LOCK_TRIES = 64
TABLE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_FLAGS = struct.Struct("<H")
_RUN_LAYOUTS: dict[int, struct.Struct] = {}      # n -> n grant_entry_v1 (flags, domid, frame) in a row


def _run_layout(count: int) -> struct.Struct:
    layout = struct.Struct("<" + GRANT_ENTRY_V1.format.lstrip("<") * count)
    if count <= 4 * MAX_BATCH:          # a batch's runs: kept; a longer run (the broker's own business) is not
        _RUN_LAYOUTS[count] = layout
    return layout


class Run(NamedTuple):
    """A run of entries read in one go and judged whole: what each held, as columns."""
    first: int                  # its first ref
    flags: tuple[int, ...]      # each entry's flags
    gfns: tuple[int, ...]       # each entry's frame
    kinds: frozenset[int]       # the distinct flags among them


@dataclass
class Pin:
    """Xen's active grant entry: who pinned it, how often, which frame."""
    domid: int
    gfn: int
    readers: int = 0
    writers: int = 0


@dataclass
class HeldEntries:
    """Entries of one table locked for a batch, and what each held when checked.

    A run judged whole under its lock (every entry a whole-page grant to
    the caller, none pinned) is kept as the columns read out of the table
    (``whole``, a :class:`Run` each), not spelled out entry by entry: a
    uniform copy batch takes its frames straight from the column
    (:meth:`whole_gfns`), and :attr:`checked` spells the runs out only for
    a batch judged op by op.
    """
    judged: dict[int, tuple[int, int, int]]     # ref -> (GNTST status, flags, gfn): turned away, or judged alone
    runs: list[tuple[int, int]] = field(default_factory=list)    # (first, count), each locked in one call
    singles: list[int] = field(default_factory=list)             # locked one by one
    whole: list[Run] = field(default_factory=list)

    def locked(self) -> Iterator[int]:
        for first, count in self.runs:
            yield from range(first, first + count)
        yield from self.singles

    @property
    def checked(self) -> dict[int, tuple[int, int, int]]:
        """Every ref's (GNTST status, flags, gfn), the whole runs' entries included."""
        out = dict(self.judged)
        for first, flags, gfns, _kinds in self.whole:
            out.update(zip(range(first, first + len(gfns)), zip(repeat(GNTST_okay), flags, gfns)))
        return out

    def whole_gfns(self, refs: Sequence[int], writable: bool) -> Sequence[int] | None:
        """The frame of each of ``refs`` when every entry held lies in one run judged whole (and, for
        ``writable``, none of that run is read-only), looked up in C; else None: ask :attr:`checked`.

        ``refs`` must be among the refs held (each run is made of named refs only); ``refs`` that
        are the run itself, in order, are answered with the run's own column."""
        if self.judged or len(self.whole) != 1:
            return None
        first, _flags, gfns, kinds = self.whole[0]
        if writable and any(kind & GTF_readonly for kind in kinds):
            return None
        if len(refs) == len(gfns) and tuple(refs) == tuple(range(first, first + len(gfns))):
            return gfns
        return list(map(gfns.__getitem__, map(sub, refs, repeat(first)) if first else refs))


class BrokerGrantTable:
    def __init__(self, nr_frames: int, owner: int, fd: int | None = None) -> None:
        """``fd``: adopt the table a previous broker made (its domain still holds it), checked sealed."""
        self.owner = owner
        self.nr_frames = nr_frames
        self.nr_entries = nr_frames * ENTRIES_PER_FRAME
        if fd is None:
            fd = os.memfd_create(f"xdom-gnttab-d{owner}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, nr_frames * PAGE_SIZE)
            # The domain holds a read-write description of this file: sealed, it
            # cannot shrink it under the broker's mapping (a SIGBUS would kill the
            # hypervisor) nor grow it.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, TABLE_SEALS)
        elif fcntl.fcntl(fd, fcntl.F_GET_SEALS) & TABLE_SEALS != TABLE_SEALS \
                or os.fstat(fd).st_size != nr_frames * PAGE_SIZE:
            os.close(fd)
            raise ValueError(f"domain {owner}'s grant table is not the sealed table of {nr_frames} frames")
        self.fd = fd
        self.ino = os.fstat(fd).st_ino
        self._map = mmap.mmap(self.fd, nr_frames * PAGE_SIZE)
        self.pins: dict[int, Pin] = {}
        self._deferred: set[int] = set()
        self.retired = False
        self.closed = False

    @classmethod
    def detached(cls, nr_frames: int, owner: int) -> BrokerGrantTable:
        """A table that is gone (its domain restarted while the broker was down), kept only
        so that mappings of it can be counted and released; no flags to clear."""
        t = cls.__new__(cls)
        t.owner, t.nr_frames, t.nr_entries = owner, nr_frames, nr_frames * ENTRIES_PER_FRAME
        t.fd, t.ino, t.pins, t._deferred = -1, 0, {}, set()
        t.retired = t.closed = True
        return t

    def sweep_flags(self) -> None:
        """Clear GTF_reading/GTF_writing of entries no pin holds (a previous broker's, unpinned since)."""
        flags_mask = GTF_reading | GTF_writing
        self._sync_flags([ref for ref, (flags, _domid, _frame) in enumerate(GRANT_ENTRY_V1.iter_unpack(self._map))
                          if flags & flags_mask and ref not in self.pins])

    def domain_fd(self) -> int:
        """A fresh open file description for the domain (its own OFD locks)."""
        return grant_lock.reopen(self.fd)

    def _try_lock(self, ref: int) -> bool:
        for _ in range(LOCK_TRIES):
            if grant_lock.lock_entry(self.fd, ref, wait=False):
                return True
            os.sched_yield()
        return False

    def _grants_to(self, ref: int, grantee: int) -> bool:
        """A first look, without the lock: does entry ``ref`` grant ``grantee`` access at all?"""
        flags, domid, _frame = GRANT_ENTRY_V1.unpack_from(self._map, ref * GRANT_ENTRY_V1_SIZE)
        return bool((flags & (GTF_type_mask | GTF_sub_page)) == GTF_permit_access and domid == grantee)

    def _check(self, ref: int, grantee: int, readonly: bool) -> tuple[int, int, int]:
        """Validate entry ``ref`` for ``grantee``; the entry lock must be held.

        Returns (GNTST status, flags, gfn).  The entry is copied out once and
        only the copy is looked at.
        """
        flags, domid, frame = GRANT_ENTRY_V1.unpack_from(self._map, ref * GRANT_ENTRY_V1_SIZE)
        if (flags & (GTF_type_mask | GTF_sub_page)) != GTF_permit_access or domid != grantee:
            return GNTST_general_error, flags, 0
        if not readonly and flags & GTF_readonly:
            return GNTST_general_error, flags, 0
        pin = self.pins.get(ref)
        if pin is not None:
            if pin.domid != grantee:
                return GNTST_general_error, flags, 0
            frame = pin.gfn      # Xen keeps using the frame of the first pin
        return GNTST_okay, flags, frame

    def pin(self, ref: int, grantee: int, readonly: bool) -> tuple[int, int]:
        """Pin ``ref`` for ``grantee``; returns (GNTST status, gfn).  :meth:`pin_many` of one."""
        return self.pin_many([(ref, readonly)], grantee)[0]

    def pin_many(self, requests: Sequence[tuple[int, bool]], grantee: int) -> list[tuple[int, int]]:
        """Pin each (ref, readonly) for ``grantee``; a (GNTST status, gfn) each, in order.

        An entry that does not grant ``grantee`` access is turned away
        before its lock is taken (and checked again under it): naming
        others' entries holds up nothing their granter does.  A map batch
        names neighbouring entries, so their locks are taken a run at a time
        (:meth:`_lock_runs`): two fcntl calls a run, where one entry at a
        time cost two an entry.
        """
        held = self._lock_runs((ref for ref, _ in requests), grantee)
        try:
            return [self._pin_locked(ref, grantee, readonly, held.judged) for ref, readonly in requests]
        finally:
            self.release(held)

    def _pin_locked(self, ref: int, grantee: int, readonly: bool,
                    refused: dict[int, tuple[int, int, int]]) -> tuple[int, int]:
        if ref in refused:
            return refused[ref][0], 0
        status, flags, gfn = self._check(ref, grantee, readonly)
        if status != GNTST_okay:
            return status, 0
        self.add_pin(ref, grantee, gfn, readonly)
        new = flags | GTF_reading | (0 if readonly else GTF_writing) | XDOM_GTF_mapped
        if new != flags:
            _FLAGS.pack_into(self._map, ref * GRANT_ENTRY_V1_SIZE, new)
        self._deferred.discard(ref)
        return GNTST_okay, gfn

    def add_pin(self, ref: int, grantee: int, gfn: int, readonly: bool) -> None:
        """Count one more pin of ``ref``; the first records whose it is and which frame (Xen's active
        entry), flags aside: :meth:`pin_many` sets them, a takeover finds them set."""
        pin = self.pins.get(ref)
        if pin is None:
            pin = self.pins[ref] = Pin(grantee, gfn)
        if readonly:
            pin.readers += 1
        else:
            pin.writers += 1

    def hold_many(self, refs: Iterable[int], grantee: int) -> HeldEntries:
        """Lock and check the entries a copy batch names, until :meth:`release`.

        For a copy, holding the entry locks for the microseconds of the copy
        is cheaper than pinning (two flag updates under two locks) and just
        as safe: the granter cannot end access while we hold them.  Each
        entry locked (:meth:`_lock_runs`) is checked again under its lock, as
        for a read (write permission is the caller's to test on the flags),
        and only that checked copy is used.  A locked run is copied out in
        one read and judged whole (:meth:`_granting`), and kept as the
        columns read (``HeldEntries.whole``); only a run that is not all
        granted to ``grantee``, or holds a pinned entry, is judged entry by
        entry.
        """
        held = self._lock_runs(refs, grantee)
        checked = held.judged
        try:
            for first, count in held.runs:
                run = range(first, first + count)
                seen = self._granting(first, count, grantee)
                if seen is None or (self.pins and not self.pins.keys().isdisjoint(run)):
                    for ref in run:
                        checked[ref] = self._check(ref, grantee, readonly=True)
                else:
                    held.whole.append(seen)
            for ref in held.singles:
                checked[ref] = self._check(ref, grantee, readonly=True)
        except BaseException:
            self.release(held)
            raise
        return held

    def _granting(self, first: int, count: int, grantee: int) -> Run | None:
        """Entries ``first .. first+count-1`` copied out in one read, as a :class:`Run`, when every one
        grants ``grantee`` access to a whole page; else None.

        What :meth:`_grants_to` asks of one entry, asked of a run in C: the
        domids counted, and the flags tested once per distinct value (a run's
        entries differ in a few bits at most).  A batch's entries are
        neighbours, and one Python test an entry cost more than the copies.
        """
        layout = _RUN_LAYOUTS.get(count) or _run_layout(count)
        fields = layout.unpack_from(self._map, first * GRANT_ENTRY_V1_SIZE)
        if fields[1::3].count(grantee) != count:
            return None
        flags = fields[0::3]
        kinds = frozenset(flags)
        if any(kind & (GTF_type_mask | GTF_sub_page) != GTF_permit_access for kind in kinds):
            return None
        return Run(first, flags, fields[2::3], kinds)

    def _lock_runs(self, refs: Iterable[int], grantee: int | None) -> HeldEntries:
        """Lock the entries of ``refs`` that grant ``grantee`` access, until :meth:`release`.

        Only entries that grant the caller access are locked -- a first look
        without the lock turns the others away -- so a domain cannot hold up
        a granter's entries that are not its own by naming them (``grantee``
        None: the broker's own business, every entry in the table).  Each run of
        neighbouring entries is locked in one call (one by one when the
        granter holds one of them).  ``judged`` of the result holds the
        status of each ref turned away (bad reference, not granted, or
        GNTST_eagain: locked by the granter); every other ref is locked.
        """
        refused: dict[int, tuple[int, int, int]] = {}
        held = HeldEntries(refused)
        wanted = sorted(set(refs))
        if wanted and (wanted[0] < 0 or wanted[-1] >= self.nr_entries):
            refused.update((ref, (GNTST_bad_gntref, 0, 0)) for ref in wanted if not 0 <= ref < self.nr_entries)
            wanted = [ref for ref in wanted if 0 <= ref < self.nr_entries]
        runs: list[tuple[int, int]] = []
        for first, count in _runs(wanted):
            if grantee is None or self._granting(first, count, grantee) is not None:
                runs.append((first, count))       # the usual batch: all of a run granted to the caller
                continue
            mine = []
            for ref in range(first, first + count):
                if self._grants_to(ref, grantee):
                    mine.append(ref)
                else:
                    refused[ref] = (GNTST_general_error, 0, 0)
            runs += _runs(mine)
        try:
            for first, count in runs:
                if grant_lock.lock_entries(self.fd, first, count, wait=False):
                    held.runs.append((first, count))
                    continue
                for ref in range(first, first + count):
                    if self._try_lock(ref):
                        held.singles.append(ref)
                    else:
                        refused[ref] = (GNTST_eagain, 0, 0)
        except BaseException:
            self.release(held)      # a lock left held (ENOLCK, say) would hang the granter's end_access
            raise
        return held

    def seed(self, ref: int, domid: int, gfn: int) -> None:
        """Write an entry on the owner's behalf (the toolstack's reserved grants)."""
        struct.pack_into("<HI", self._map, ref * GRANT_ENTRY_V1_SIZE + 2, domid, gfn)
        _FLAGS.pack_into(self._map, ref * GRANT_ENTRY_V1_SIZE, GTF_permit_access)

    def release(self, held: HeldEntries) -> None:
        """Unlock what :meth:`hold_many` locked."""
        for first, count in held.runs:
            grant_lock.unlock_entries(self.fd, first, count)
        for ref in held.singles:
            grant_lock.unlock_entry(self.fd, ref)

    def unpin(self, ref: int, readonly: bool) -> None:
        self.unpin_many([(ref, readonly)])

    def unpin_many(self, requests: Sequence[tuple[int, bool]]) -> None:
        """Drop one pin of each (ref, readonly), then bring their flags in line a run of locks at a time.

        A ref no longer pinned (its table was reset under the mapping) has nothing to drop."""
        for ref, readonly in requests:
            pin = self.pins.get(ref)
            if pin is None:
                continue
            if readonly:
                pin.readers -= 1
            else:
                pin.writers -= 1
            if pin.readers + pin.writers == 0:
                del self.pins[ref]
        self._sync_flags(ref for ref, _ in requests)

    def _sync_flags(self, refs: Iterable[int]) -> None:
        """Clear GTF_writing / GTF_reading that no pin holds any more; an entry the granter
        holds locked is retried later (:meth:`retry_deferred`), its pin count having dropped already."""
        if self.retired:
            return
        held = self._lock_runs(refs, None)
        try:
            self._deferred.update(ref for ref, (status, _, _) in held.judged.items() if status == GNTST_eagain)
            for ref in held.locked():
                off = ref * GRANT_ENTRY_V1_SIZE
                (flags,) = _FLAGS.unpack_from(self._map, off)
                pin = self.pins.get(ref)
                new = flags
                if pin is None:
                    new &= ~(GTF_reading | GTF_writing)
                elif pin.writers == 0:
                    new &= ~GTF_writing
                if new != flags:
                    _FLAGS.pack_into(self._map, off, new)
                self._deferred.discard(ref)
        finally:
            self.release(held)

    def retry_deferred(self) -> None:
        if self.closed:
            return
        if self._deferred:
            self._sync_flags(list(self._deferred))

    def pinned_gfns(self) -> set[int]:
        return {p.gfn for p in self.pins.values()}

    def mapped_count(self) -> int:
        return sum(p.readers + p.writers for p in self.pins.values())

    def retire(self) -> None:
        """The owner is gone or reset: close once the last pin is dropped.

        Grantees keep the old pages (their mappings hold the memfds); the
        table itself only serves to clear flags nobody will read.
        """
        self.retired = True
        self.close_if_retired()

    def close_if_retired(self) -> None:
        if self.retired and not self.pins and not self.closed:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._map.close()
            os.close(self.fd)


def _runs(refs: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct ``refs`` as (first, count) runs of neighbours; one run, the usual case, at a glance."""
    if not refs:
        return []
    if refs[-1] - refs[0] + 1 == len(refs):
        return [(refs[0], len(refs))]
    runs = []
    start = 0
    for end in range(1, len(refs) + 1):
        if end == len(refs) or refs[end] != refs[end - 1] + 1:
            runs.append((refs[start], end - start))
            start = end
    return runs
