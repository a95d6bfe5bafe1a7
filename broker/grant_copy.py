"""GNTTABOP_copy: the broker moves the bytes; the caller never sees the frames.

A batch runs in three steps, as Xen's ``gnttab_copy`` does under its
active-entry locks: every grant the batch names is locked and checked (each
granter's entries together, ``BrokerGrantTable.hold_many``), so no granter
can end access mid-batch; the copies run on the broker's own mappings of the
frames (``CopyFrames``: each opened through the domain's map_files and
checked to be the frame made for that gfn); then the locks go.

Per-op Python is the whole cost of a copy from Python's side (64 ops of
4 KiB each are 256 KiB a call, 8 us of memmove), so a batch whose ops all
name their sides alike and all succeed -- a backend's batch -- is checked
as a whole, column by column in C, and only its slice assignments run op by
op (``_copy_uniform``).  Any other batch resolves each grant and each of
the caller's own frames once, into a (status, frame, writable) triple, and
each op is two dict lookups and one slice assignment (``_copy_op_by_op``);
both give every op the same status.  The batch arrives as Xen's ``struct
gnttab_copy`` array, unpacked in C into a column per field
(``hypercall_wire.copy_columns``): no value needs checking one by one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import repeat
from operator import add, and_, itemgetter
from typing import TYPE_CHECKING

from xdom.domains.abi.event_channel import DOMID_SELF
from xdom.domains.abi.grant_table import (
    GNTTAB_COPY_REF_MASK,
    PAGE_SIZE,
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTST_bad_copy_arg,
    GNTST_bad_domain,
    GNTST_bad_page,
    GNTST_general_error,
    GNTST_okay,
    GNTST_permission_denied,
    GTF_readonly,
)
from xdom.domains.abi.hypercall_wire import CopyColumns

from .frames import CopyFrames
from .gnttab import BrokerGrantTable, HeldEntries

if TYPE_CHECKING:
    from .hypervisor import Domain

# (GNTST status, the granted frame to copy through, writable) of one grant a batch names
Grant = tuple[int, "memoryview | None", bool]
_DENIED: Grant = (GNTST_permission_denied, None, False)    # a gfn of another domain, named as a frame


def grant_copy(domains: Mapping[int, Domain], caller: Domain, columns: CopyColumns,
               frames: CopyFrames) -> list[int]:
    """Run one batch of segments, given as the columns of ``struct gnttab_copy``'s fields; a status each.

    A side flagged as a grant names ``(domid, u & GNTTAB_COPY_REF_MASK)``, as
    Xen reads ``u.ref``; any other side names a gfn ``u`` of the caller's own.
    """
    mine = (DOMID_SELF, caller.domid)
    try:
        statuses = _copy_uniform(domains, caller, mine, columns, frames) if columns[0] else None
        if statuses is None:
            statuses = _copy_op_by_op(domains, caller, mine, list(zip(*columns)), frames)
        return statuses
    finally:
        frames.trim()


def _copy_op_by_op(domains: Mapping[int, Domain], caller: Domain, mine: tuple[int, int],
                   ops: Sequence[tuple[int, ...]], frames: CopyFrames) -> list[int]:
    """Any batch: each grant and frame it names resolved once, then each op in order, a status each."""
    named: dict[int, set[int]] = {}     # domid -> refs the batch names in its table
    own: set[int] = set()               # the caller's own gfns the batch names
    for su, sdom, _soff, du, ddom, _doff, _length, flags, _status in ops:
        if flags & GNTCOPY_source_gref:
            named.setdefault(sdom, set()).add(su & GNTTAB_COPY_REF_MASK)
        elif sdom in mine:
            own.add(su)
        if flags & GNTCOPY_dest_gref:
            named.setdefault(ddom, set()).add(du & GNTTAB_COPY_REF_MASK)
        elif ddom in mine:
            own.add(du)
    held: list[tuple[BrokerGrantTable, HeldEntries]] = []
    try:
        grants = _hold(domains, caller, named, held, frames)
        own_gfns = list(own)
        own_frames: dict[int, Grant] = {
            gfn: (GNTST_bad_page, None, False) if view is None else (GNTST_okay, view, True)
            for gfn, view in zip(own_gfns, frames.views(caller.frames, own_gfns))}
        return _copy(mine, ops, grants, own_frames)
    finally:
        for table, entries in held:
            table.release(entries)


def _hold(domains: Mapping[int, Domain], caller: Domain, named: dict[int, set[int]],
          held: list[tuple[BrokerGrantTable, HeldEntries]], frames: CopyFrames) -> dict[tuple[int, int], Grant]:
    """Lock and check every grant named, and reach its frame; ``held`` collects what to release."""
    grants: dict[tuple[int, int], Grant] = {}
    for domid, refs in named.items():
        dom = domains.get(domid)
        if dom is None or not dom.alive or dom.frames is None:
            for ref in refs:
                grants[domid, ref] = (GNTST_bad_domain, None, False)
            continue
        entries = dom.gnttab.hold_many(refs, caller.domid)
        held.append((dom.gnttab, entries))
        checked = entries.checked
        gfns = list({gfn for status, _flags, gfn in checked.values() if status == GNTST_okay})
        views = dict(zip(gfns, frames.views(dom.frames, gfns)))
        for ref, (status, flags, gfn) in checked.items():
            if status != GNTST_okay:
                grants[domid, ref] = (status, None, False)
            elif (view := views[gfn]) is None:
                grants[domid, ref] = (GNTST_bad_page, None, False)
            else:
                grants[domid, ref] = (GNTST_okay, view, not flags & GTF_readonly)
    return grants


def _copy(mine: tuple[int, int], ops: Sequence[tuple[int, ...]], grants: dict[tuple[int, int], Grant],
          own_frames: dict[int, Grant]) -> list[int]:
    """The ops in order, each side resolved by one lookup: a held grant or one of the caller's own frames."""
    statuses: list[int] = []
    status_of = statuses.append
    for su, sdom, soff, du, ddom, doff, length, flags, _status in ops:
        if soff + length > PAGE_SIZE or doff + length > PAGE_SIZE:
            status_of(GNTST_bad_copy_arg)
            continue
        src = (grants[sdom, su & GNTTAB_COPY_REF_MASK] if flags & GNTCOPY_source_gref
               else own_frames[su] if sdom in mine else _DENIED)
        if src[0] != GNTST_okay:
            status_of(src[0])
            continue
        dst = (grants[ddom, du & GNTTAB_COPY_REF_MASK] if flags & GNTCOPY_dest_gref
               else own_frames[du] if ddom in mine else _DENIED)
        if dst[0] != GNTST_okay or not dst[2]:
            status_of(dst[0] or GNTST_general_error)     # okay but read-only: Xen's general error
            continue
        # memmove (overlap is fine); a side whose status is okay always has its frame
        dst[1][doff:doff + length] = src[1][soff:soff + length]     # type: ignore[index]
        status_of(GNTST_okay)
    return statuses


def _copy_uniform(domains: Mapping[int, Domain], caller: Domain, mine: tuple[int, int],
                  columns: CopyColumns, frames: CopyFrames) -> list[int] | None:
    """A batch whose ops all name their sides alike and all succeed, copied column by column.

    A backend's batch is uniform: every op from a grant of one domain to a
    frame of its own (or the other way), within the page.  Such a batch is
    checked as a whole -- column by column, ranges and domains tested
    with ``set`` and ``max``, each side's frames looked up by slice or ``itemgetter``, all
    in C -- so the only per-op Python left is the slice assignment.
    Anything else (mixed sides, or any op that would fail) returns None
    before a byte moves, and :func:`_copy_op_by_op` gives each op its
    status: the statuses are the same either way, only the cost differs.
    """
    su, sdom, soff, du, ddom, doff, length, flags, _status = columns
    sdoms, ddoms, kinds = set(sdom), set(ddom), set(flags)
    if len(sdoms) != 1 or len(ddoms) != 1 or len(kinds) != 1:
        return None
    longest = max(length)
    if (max(soff) + longest > PAGE_SIZE and max(map(add, soff, length)) > PAGE_SIZE) \
            or (max(doff) + longest > PAGE_SIZE and max(map(add, doff, length)) > PAGE_SIZE):
        return None             # (the sums op by op only when the bound at a glance does not settle it)
    (kind,) = kinds
    src = _Side(sdom[0], su, kind & GNTCOPY_source_gref)
    dst = _Side(ddom[0], du, kind & GNTCOPY_dest_gref)
    if not all(side.refs is not None or side.domid in mine for side in (src, dst)):
        return None
    named: dict[int, Sequence[int]] = {}      # hold_many takes each ref once, however often named
    for side in (src, dst):
        if side.refs is not None:
            named[side.domid] = (*named.get(side.domid, ()), *side.refs)
    held: list[tuple[BrokerGrantTable, HeldEntries]] = []
    try:
        held_of: dict[int, HeldEntries] = {}
        for domid, refs in named.items():
            dom = domains.get(domid)
            if dom is None or not dom.alive or dom.frames is None:
                return None
            entries = held_of[domid] = dom.gnttab.hold_many(refs, caller.domid)
            held.append((dom.gnttab, entries))
        src_views = src.views(domains, caller, held_of, frames, writing=False)
        dst_views = dst.views(domains, caller, held_of, frames, writing=True)
        if src_views is None or dst_views is None:
            return None
        if max(soff) == 0 == max(doff) and min(length) == PAGE_SIZE:
            for to, of in zip(dst_views, src_views):
                to[:] = of                                      # whole pages: no slices to make
        else:
            for to, to_off, of, of_off, n in zip(dst_views, doff, src_views, soff, length):
                to[to_off:to_off + n] = of[of_off:of_off + n]      # memmove: overlap within a frame is fine
        return [GNTST_okay] * len(su)
    finally:
        for table, entries in held:
            table.release(entries)


_STATUS, _FLAGS, _GFN = itemgetter(0), itemgetter(1), itemgetter(2)      # of a checked entry


class _Side:
    """One side of a uniform batch: grant ``refs`` of domain ``domid``, or (``refs`` None) the caller's ``gfns``."""

    __slots__ = ("domid", "refs", "gfns")

    def __init__(self, domid: int, u: tuple[int, ...], is_grant: int) -> None:
        self.domid, self.gfns = domid, u
        self.refs = (u if max(u) <= GNTTAB_COPY_REF_MASK else [x & GNTTAB_COPY_REF_MASK for x in u]) \
            if is_grant else None

    def views(self, domains: Mapping[int, Domain], caller: Domain, held_of: dict[int, HeldEntries],
              frames: CopyFrames, writing: bool) -> list[memoryview] | None:
        """Each op's frame on this side, or None when any op's would not be copied through."""
        if self.refs is None:
            return frames.all_views(caller.frames, self.gfns)
        entries = held_of[self.domid]
        gfns = entries.whole_gfns(self.refs, writable=writing)
        if gfns is None:        # not one run judged whole: entry by entry
            states = list(map(entries.checked.__getitem__, self.refs))
            if set(map(_STATUS, states)) != {GNTST_okay} \
                    or writing and any(map(and_, map(_FLAGS, states), repeat(GTF_readonly))):
                return None
            gfns = list(map(_GFN, states))
        return frames.all_views(domains[self.domid].frames, gfns)
