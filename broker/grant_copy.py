"""GNTTABOP_copy: the broker moves the bytes; the caller never sees the frames.

A batch runs in three steps, as Xen's ``gnttab_copy`` does under its
active-entry locks: every grant the batch names is locked and checked (each
granter's entries together, ``BrokerGrantTable.hold_many``), so no granter
can end access mid-batch; the copies run on the broker's own mappings of the
frames (``CopyFrames``: each opened through the domain's map_files and
checked to be the frame made for that gfn); then the locks go.

The per-op loop is the whole cost of a copy from Python's side (64 ops of
4 KiB each are 256 KiB a call), so each grant and each of the caller's own
frames is resolved once per batch, into a (status, frame, writable) triple,
and each op is two dict lookups and one slice assignment.  The batch
arrives as Xen's ``struct gnttab_copy`` array, unpacked in C
(``hypercall_wire.copy_segments``): no value needs checking one by one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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

from .frames import CopyFrames
from .gnttab import BrokerGrantTable, HeldEntries

if TYPE_CHECKING:
    from .hypervisor import Domain

# (GNTST status, the granted frame to copy through, writable) of one grant a batch names
Grant = tuple[int, "memoryview | None", bool]
_DENIED: Grant = (GNTST_permission_denied, None, False)    # a gfn of another domain, named as a frame


def grant_copy(domains: Mapping[int, Domain], caller: Domain, ops: Sequence[tuple[int, ...]],
               frames: CopyFrames) -> list[int]:
    """Run one batch of segments, each the fields of a ``struct gnttab_copy``; a status each.

    A side flagged as a grant names ``(domid, u & GNTTAB_COPY_REF_MASK)``, as
    Xen reads ``u.ref``; any other side names a gfn ``u`` of the caller's own.
    """
    mine = (DOMID_SELF, caller.domid)
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
        own_frames: dict[int, Grant] = {
            gfn: (GNTST_bad_page, None, False) if view is None else (GNTST_okay, view, True)
            for gfn, view in frames.views(caller.frames, own).items()}
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
        views = frames.views(dom.frames, {gfn for status, _flags, gfn in checked.values() if status == GNTST_okay})
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
