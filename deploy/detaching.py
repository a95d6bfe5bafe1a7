"""Detaches in flight: the backend is asked to close, and the supervisor's loop looks for its answer.

``xl block-detach`` waits until the backend reports Closed (or a timeout),
then removes the device's nodes.  The supervisor serves every domain from
one loop, so it must not wait there: a guest that never lets go of its
disk (frozen, or hostile) held every other request, death and timer of
the host for the whole timeout -- 4.7 s a detach, measured.  Here a
detach is a record with a deadline: the control request asks the backend
to close and answers at once; each turn of the loop that is due
(``POLL`` apart) reads the backends' states, and a device whose backend
let go, or whose deadline passed, has its nodes removed and its
``finish`` called (which forgets the device), ``clean`` saying which.
``xdom block-detach`` follows it in ``xdom ps`` (the row's ``detaching``
and ``detached``) and says what became of it, as before.

Each look is one short xenstore connection for every detach due; a
xenstored that does not answer holds the loop as any other xenstore
request of the supervisor does (``XS_TIMEOUT``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from xdom.domains.abi.xs_wire import XenstoreError
from xdom.domains.xenstore import XenstoreClient

from .xsdevice import backend_closed, remove_nodes

__all__ = ["POLL", "Detach", "Detaches"]

log = logging.getLogger("xdom.supervisor")

#: Seconds between two looks at the backends of the detaches in flight.
POLL = 0.05
#: Outcomes kept for ``xdom ps`` (per host, the latest).
KEPT_OUTCOMES = 256


@dataclass
class Detach:
    """One device being detached: whose, which, until when, and what to do once it is over."""

    domain: str                     # the guest's name
    key: str                        # the device as the CLI names it: a vdev, or a vif's devid
    kind: str                       # "vbd" or "vif"
    backend_domid: int
    frontend_domid: int
    devid: int
    deadline: float
    finish: Callable[[bool], None]  # the device forgotten; True if the backend confirmed it closed


class Detaches:
    """The detaches in flight of one host, and the latest outcomes."""

    def __init__(self) -> None:
        self._pending: list[Detach] = []
        self._next = 0.0
        self._warned_at = -1e9                # when a failure was last logged
        self.outcomes: OrderedDict[tuple[str, str], bool] = OrderedDict()

    def add(self, detach: Detach) -> None:
        self.outcomes.pop((detach.domain, detach.key), None)
        self._pending.append(detach)
        self._next = 0.0

    def pending(self, domain: str, key: str) -> bool:
        return any(x.domain == domain and x.key == key for x in self._pending)

    def of(self, domain: str) -> tuple[list[str], dict[str, bool]]:
        """``domain``'s devices being detached, and how its latest detaches ended (True: clean)."""
        return ([x.key for x in self._pending if x.domain == domain],
                {key: clean for (name, key), clean in self.outcomes.items() if name == domain})

    def due(self) -> float | None:
        """When the loop should look next (None: nothing in flight)."""
        return self._next if self._pending else None

    def poll(self, now: float, xs_open: Callable[[], AbstractContextManager[XenstoreClient]]) -> None:
        """Finish every detach whose backend let go or whose deadline passed (from the loop, when due)."""
        if not self._pending or now < self._next:
            return
        self._next = now + POLL
        done: list[tuple[Detach, bool]] = []
        try:
            with xs_open() as xs:
                for x in self._pending:
                    closed = backend_closed(xs, x.kind, x.backend_domid, x.frontend_domid, x.devid)
                    if closed or now >= x.deadline:
                        remove_nodes(xs, x.kind, x.backend_domid, x.frontend_domid, x.devid)
                        done.append((x, closed))
        except (XenstoreError, OSError, TimeoutError) as e:
            if now - self._warned_at >= 1.0:        # one line a second at most: a silent xenstored fails at once
                self._warned_at = now
                log.warning("detaching: xenstore: %s; looked at again in %gs", e, POLL)
            done += [(x, False) for x in self._pending if now >= x.deadline and all(x is not y for y, _ in done)]
        for x, closed in done:
            self._pending.remove(x)
            self._record(x, closed)
            try:
                x.finish(closed)
            except Exception:
                log.exception("detaching %s of %s: finishing failed", x.key, x.domain)

    def _record(self, x: Detach, closed: bool) -> None:
        self.outcomes[(x.domain, x.key)] = closed
        while len(self.outcomes) > KEPT_OUTCOMES:
            self.outcomes.popitem(last=False)

