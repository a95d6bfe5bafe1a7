"""GNTTABOP_copy: the broker moves the bytes; the caller never sees the frames.

A batch runs in three steps, as Xen's ``gnttab_copy`` does under its
active-entry locks: every grant the batch names is locked and checked (each
granter's entries together, ``BrokerGrantTable.hold_many``), so no granter
can end access mid-batch; the copies run on the broker's own mappings of the
frames (``CopyFrames``: each opened through the domain's map_files and
checked to be the frame made for that gfn); then the locks go.

The per-op loop is the whole cost of a copy from Python's side (64 ops of
4 KiB each are 256 KiB a call), so each grant is resolved once per batch and
each op is a few dict lookups and one slice assignment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from xdom.domains.abi.event_channel import DOMID_SELF
from xdom.domains.abi.grant_table import (
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

from .frames import CopyFrames
from .gnttab import BrokerGrantTable, HeldEntries

if TYPE_CHECKING:
    from .hypervisor import Domain

# (GNTST status, the granted frame to copy through, writable) of one grant a batch names
Grant = tuple[int, "memoryview | None", bool]


def grant_copy(domains: Mapping[int, Domain], caller: Domain, ops: Sequence[tuple[int, ...]],
               frames: CopyFrames) -> list[int]:
    """Run one batch of (flags, sdom, sref, soff, ddom, dref, doff, length) ops; a status each."""
    named: dict[int, set[int]] = {}     # domid -> refs the batch names in its table
    for op in ops:
        if op[0] & GNTCOPY_source_gref:
            named.setdefault(op[1], set()).add(op[2])
        if op[0] & GNTCOPY_dest_gref:
            named.setdefault(op[4], set()).add(op[5])
    held: list[tuple[BrokerGrantTable, HeldEntries]] = []
    try:
        grants = _hold(domains, caller, named, held, frames)
        return _copy(caller, ops, grants, frames)
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
        for ref, (status, flags, gfn) in entries.checked.items():
            view = frames.view(dom.frames, gfn) if status == GNTST_okay else None
            if status == GNTST_okay and view is None:
                status = GNTST_bad_page
            grants[domid, ref] = (status, view, not flags & GTF_readonly)
    return grants


def _copy(caller: Domain, ops: Sequence[tuple[int, ...]], grants: dict[tuple[int, int], Grant],
          frames: CopyFrames) -> list[int]:
    statuses = [GNTST_general_error] * len(ops)
    me = caller.domid
    own = caller.frames
    view = frames.view

    def end(is_gref: int, domid: int, ref_or_gfn: int, write: bool) -> tuple[int, memoryview | None]:
        """One side of an op: a grant the batch holds, or a gfn of the caller's own."""
        if is_gref:
            status, page, writable = grants[domid, ref_or_gfn]
            return (GNTST_general_error if write and status == GNTST_okay and not writable else status), page
        if domid not in (DOMID_SELF, me):
            return GNTST_permission_denied, None
        page = view(own, ref_or_gfn)
        return (GNTST_okay if page is not None else GNTST_bad_page), page

    for index, (flags, sdom, sref, soff, ddom, dref, doff, length) in enumerate(ops):
        if soff + length > PAGE_SIZE or doff + length > PAGE_SIZE or min(soff, doff, length) < 0:
            statuses[index] = GNTST_bad_copy_arg
            continue
        status, sview = end(flags & GNTCOPY_source_gref, sdom, sref, False)
        if status == GNTST_okay:
            status, dview = end(flags & GNTCOPY_dest_gref, ddom, dref, True)
        if status != GNTST_okay:
            statuses[index] = status
            continue
        assert sview is not None and dview is not None
        dview[doff:doff + length] = sview[soff:soff + length]     # memmove: overlap is fine
        statuses[index] = GNTST_okay
    return statuses
