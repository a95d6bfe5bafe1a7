"""Domains: what xenstored knows of each, whether one exists, and what the shell must do for them.

Rules (Xen 4.17 ``xenstored_domain.c``; the departures are the core's, see core.py):

* Domain 0 is privileged and always known.  Every other domid is an
  unprivileged domain; a record is made when xenstored first hears of it
  (an INTRODUCE, a connection, or a permission naming a domain the
  hypervisor says is alive).
* Permissions may only name domains that exist (XSA-322; C's
  ``domain_alloc_permrefs``, ``chk_domain_generation`` and
  ``domain_adjust_node_perms``).  A domain is dated by a generation number
  of its own, taken when its record is made: an entry naming it on a node
  last written before that belongs to a dead namesake and is ignored, for
  good.  Without a hypervisor hook only known domains exist, as in C with
  dom0 alone.
* A record keeps the domid's *incarnation* when the hypervisor tells it
  (how many times the domid was restarted), so that the shell can tell a
  restarted domain from the one it knew.
* The table notes which domids' records changed (``changed``), for the
  journal; it does not decide what a domain's death removes: that is the
  core's (its nodes, watches and connections).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Final

from .permissions import Perms
from .store import Node

log = logging.getLogger(__name__)

DOMID_FIRST_RESERVED: Final = 0x7FF0
DOMID_SELF: Final = 0x7FF0
PRIVILEGED_DOMID: Final = 0

# The hypervisor's answer to "does this domid live?": False (or None) for no, True or the
# domid's incarnation (an int, not a bool) for yes.  It may raise: the domain then counts as absent.
DomainExists = Callable[[int], int | bool | None]


# ---- effects: what the shell must do --------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Introduced:
    """XS_INTRODUCE succeeded: map ``domid``'s ring (grant 1 / ``gfn``) and bind ``port``.

    Sent again, with possibly new values, when an introduced domain is
    introduced once more (C rebinds the event channel and resets the
    connection): drop the old ring connection and set up the new one.
    """

    domid: int
    gfn: int
    port: int

    def __post_init__(self) -> None:
        if not 0 < self.domid < DOMID_FIRST_RESERVED or self.port <= 0:
            raise ValueError(f"impossible introduction {self!r}")


@dataclass(frozen=True, slots=True)
class Released:
    """The domain was released (XS_RELEASE) or died: unmap its ring, close its port, disconnect it."""

    domid: int


Effect = Introduced | Released


# ---- the records ------------------------------------------------------------------------------

@dataclass(slots=True)
class Domain:
    """What xenstored knows of one domain (C's ``struct domain``).

    ``generation`` dates the record: a generation number of its own, taken
    when xenstored first heard of the domain.  A permission entry naming it
    on a node last written *before* that is a dead namesake's and is ignored.
    """

    domid: int
    generation: int
    introduced: bool = False
    gfn: int = 0
    port: int = 0
    target: int | None = None
    incarnation: int | None = None      # the hypervisor's restart count of the domid, when it said


_ASK: Final = object()


class DomainTable:
    """The domain records, keyed by domid, and the rules for when a domain exists.

    ``next_generation`` dates a new record (the store's counter: records and
    nodes share it, so that "written before the record" is a comparison).
    """

    def __init__(self, next_generation: Callable[[], int], domain_exists: DomainExists | None = None) -> None:
        self._next_generation = next_generation
        self._exists_hook = domain_exists
        self._records: dict[int, Domain] = {PRIVILEGED_DOMID: Domain(PRIVILEGED_DOMID, 0, introduced=True)}
        self.changed: set[int] = set()       # domids whose records changed since the journal looked

    def get(self, domid: int) -> Domain | None:
        return self._records.get(domid)

    def __contains__(self, domid: int) -> bool:
        return domid in self._records

    def __iter__(self) -> Iterator[Domain]:
        """Every record but domain 0's (which is always there and never saved)."""
        return (d for d in self._records.values() if d.domid != PRIVILEGED_DOMID)

    def restore(self, domain: Domain) -> None:
        """Put back a saved record."""
        self._records[domain.domid] = domain

    def remove(self, domid: int) -> Domain | None:
        """Forget ``domid`` (released or dead); a later domain with that domid gets a new record."""
        self.changed.add(domid)
        return self._records.pop(domid, None)

    def introduced(self, domid: int | None) -> Domain | None:
        domain = self._records.get(domid) if domid is not None else None
        return domain if domain is not None and domain.introduced else None

    def ask_hypervisor(self, domid: int) -> tuple[bool, int | None]:
        """Whether a domid is a live domain (C's ``get_domain_info``), and its incarnation if told.

        Only the hypervisor can say; without it, or when asking fails, the
        answer is no: a permission for a domain nobody vouches for is exactly
        what a later domain with that domid would inherit.
        """
        if domid >= DOMID_FIRST_RESERVED or self._exists_hook is None:
            return False, None
        try:
            answer = self._exists_hook(domid)
        except Exception as e:
            log.warning("xenstored: cannot ask the hypervisor about domain %d (%s): taking it for absent",
                        domid, e)
            return False, None
        if answer is None or isinstance(answer, bool):
            return bool(answer), None
        return True, int(answer)

    def find_or_alloc_existing(self, domid: int) -> Domain | None:
        """The known domain, or a new record if the hypervisor says it exists (C's namesake)."""
        domain = self._records.get(domid)
        if domain is None:
            exists, incarnation = self.ask_hypervisor(domid)
            if exists:
                domain = self.find_or_alloc(domid, incarnation)
        return domain

    def find_or_alloc(self, domid: int, incarnation: Any = _ASK) -> Domain:
        """The record of ``domid``, made now if there is none.

        A new record takes a generation of its own: C dates it with the
        current count without a step, so the node written last before it
        shares its generation and counts as younger, and a grant on that node
        to a dead namesake passes to the new domain.  With the step, every
        node written before the record is older than it, everything after
        younger (nodes the toolstack writes for it before its introduction).
        """
        domain = self._records.get(domid)
        if domain is None:
            if incarnation is _ASK:
                incarnation = self.ask_hypervisor(domid)[1] if domid != PRIVILEGED_DOMID else None
            domain = self._records[domid] = Domain(domid, self._next_generation(), incarnation=incarnation)
            self.changed.add(domid)
        return domain

    def alloc_permrefs(self, perms: Perms) -> Perms:
        """C's ``domain_alloc_permrefs``: an existing domain not known yet gets its record
        (dated now, so the node about to be written is younger than it); entries naming a
        domain that does not exist are marked ignored."""
        out = []
        for p in perms:
            if self.find_or_alloc_existing(p.domid) is None:
                p = replace(p, ignored=True)
            out.append(p)
        return tuple(out)

    def adjust_perms(self, node: Node) -> None:
        """Mark entries naming a domain that is gone, or newer than the node, as ignored (C's
        ``domain_adjust_node_perms``).  Once ignored, an entry stays ignored."""
        perms = node.perms
        for i in range(1, len(perms)):
            entry = perms[i]
            if entry.ignored:
                continue
            domain = self._records.get(entry.domid)
            if domain is None or domain.generation > node.generation:
                node.perms = perms = perms[:i] + (replace(entry, ignored=True),) + perms[i + 1:]
