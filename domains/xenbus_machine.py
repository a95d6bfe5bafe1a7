"""The xenbus handshake, sans-IO: what a backend or a frontend does when the states change.

Rules:

* One table per side, keyed by (own state, peer state), total over every
  pair of :class:`XenbusState` values (a peer's node may hold anything: it
  is hostile input, and an unparsable one reads as Unknown).  The answer is
  one action; the device (``backends/xenbus_backend.py``,
  ``domains/xenbus_frontend.py``) does the I/O it names and writes the
  states :data:`BACKEND_WRITES` / :data:`FRONTEND_WRITES` give, or those of
  :data:`BACKEND_FAILED` / :data:`FRONTEND_FAILED` when the action fails.
* "Own state" is the state this end last wrote (Initialising before the
  first write).  The one exception: a backend whose own node the toolstack
  set back to Initialising (it re-created the device) takes Initialising as
  its own state and starts over.
* A watch reports that a node changed, not each value it took: the peer's
  state is read when the event is handled, so intermediate values can be
  missed.  Every entry must be right whatever came before.
* Every step an action writes is in :data:`BACKEND_STEPS` /
  :data:`FRONTEND_STEPS`.  tests/test_xenbus_machine.py checks all of this,
  and that restarts and closes end where they must, over every pair and
  over generated interleavings of the two ends.
* No I/O and no imports beyond the ABI's state enum.

The model is Linux: ``frontend_changed`` of ``xen-blkback/xenbus.c`` and
``xen-netback/xenbus.c``, ``blkback_changed`` of ``xen-blkfront.c`` and
``netback_changed`` of ``xen-netfront.c``, on the states of
``xen/io/xenbus.h``.  Where Linux's two backends differ, or xdom departs
from both, the entry says so here:

Backend (own state down, frontend's across; ``.`` is NONE)::

                 Unknown Initialising InitWait Initialised Connected Closing Closed Reconf*
    Initialising  PROBE   PROBE        PROBE    PROBE       PROBE     PROBE   PROBE  PROBE
    InitWait      CLOSED  .            .        CONNECT     .         CLOSE   CLOSED .
    Connected     CLOSED  RESET        .        .           .         CLOSE   CLOSED .
    Closing       CLOSED  RESET        .        CONNECT     .         .       CLOSED .
    Closed        .       RESET        .        CONNECT     .         CLOSE   .      .

* Unknown (the frontend's node is gone: its domain died, or the toolstack
  removed it) always ends in Closed.  Both Linux backends do so
  (``device_unregister``, after which xenbus writes Closed; netback sets
  Closed first).  blkback used to do nothing when not connected and netback
  wrote Closed: the copies disagreed, this is Linux's answer.
* Initialising from the frontend (it starts over) brings the backend back to
  InitWait from Connected, Closing or Closed.  Linux's netback does that
  (``set_backend_state(InitWait)``, by way of Closing and Closed); Linux's
  blkback only from Closed ("prepare for reconnect").  xdom goes straight
  from Connected to InitWait, as both xdom backends did before: a frontend
  already starting over would take a Closing for a detach and close.
* Connect on Initialised only, never on Connected.  Linux connects on
  either (Connected covers a missed Initialised).  xdom's frontends always
  wait for the backend's Connected before their own, so a Connected
  frontend seen by a backend that is not connected means a restarted
  backend whose rings died with its predecessor: the frontend sees its
  InitWait, publishes fresh rings and goes Initialised, and the backend
  connects then.  A backend that closed a hostile frontend's device keeps
  it closed while that frontend stays Connected.
* CONNECT from Closing or Closed is Linux blkback's rule ("ensure we
  connect even when two watches fire in close succession"): a frontend in
  Initialised gets a connection attempt on every event, and a failed one
  leaves the device Closing.
* Closing from the frontend is answered with Closing, after unmapping
  everything (netback's ``backend_disconnect``; Linux blkback unmaps on
  Closed, but xdom's frontends wait for the unmap before saying Closed);
  Closed with Closed.
* Reconfiguring/Reconfigured (Linux netback's XDP switch) and states a
  frontend never writes (InitWait) change nothing; Linux closes the device
  with ``xenbus_dev_fatal`` on the latter, both xdom backends ignored them.

Frontend (own state down, backend's across)::

                 Unknown Initialising InitWait  Initialised Connected Closing Closed Reconf*
    Initialising .       .            TALK      .           .         CLOSE   .      .
    Initialised  .       .            .         .           CONNECT   CLOSE   CLOSE  .
    Connected    WAIT    WAIT         RECONNECT .           .         CLOSE   CLOSE  .
    Closing      .       .            .         .           .         .       .      .
    Closed       .       .            .         .           .         .       .      .

* A Connected frontend whose backend's node goes Unknown or Initialising
  (the driver domain died; the toolstack writes its nodes again) keeps
  everything and lets I/O wait: the stall of the restart promise.  When the
  backend is back in InitWait it reconnects (xdom's addition: Linux's
  frontends never see a backend come back) straight to Initialised, as
  Linux's ``blkfront_resume`` re-runs ``talk_to_blkback``.
* A frontend in Initialised whose backend restarted before connecting
  waits: the new backend connects to the rings already published (they
  are fresh: no I/O went on them before Connected).
* xdom's frontends go Initialised and wait for the backend's Connected
  before going Connected (Linux's netfront goes Connected at once; its
  blkfront waits, as here): the rule the backends' "connect on Initialised
  only" rests on.  An Initialising frontend does not take a backend's
  Connected as meant for it either: it waits for the InitWait the backend
  answers its Initialising with.
* An Initialising frontend waits through a backend's Connected or Closed
  (left by the frontend's previous life: a restarted guest, or a new
  frontend object after a close): the backend answers its Initialising
  with InitWait.  This is what Linux's ``xenbus_reset_frontend`` does for a
  frontend that starts on a device left Closed (write Initialising, wait
  for InitWait); Linux's blkback_changed itself would close.
* Closing from the backend (a detach) is answered with Closing then
  Closed, from any state not already closing; Closed too once the frontend
  has published rings (Initialised, Connected).  Closed is final for a
  frontend object: Linux's blkfront talks to a backend again from Closed,
  because its ``xenbus_device`` outlives the connection; an xdom frontend
  that closed is done, and whoever owns it makes a new one for a new
  attach (which may come while the old one is still open, on the same
  nodes).  A frontend closing on its own (``close()``) writes Closing and
  Closed itself and stops watching first.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Final, TypeVar

from .abi.xenbus import XenbusState

__all__ = ["XenbusState", "BackendAction", "FrontendAction", "BACKEND", "FRONTEND", "BACKEND_WRITES",
           "BACKEND_FAILED", "FRONTEND_WRITES", "FRONTEND_FAILED", "BACKEND_STEPS", "FRONTEND_STEPS",
           "backend_action", "frontend_action", "legal_step"]

S = XenbusState


class BackendAction(Enum):
    """What a backend device does; every action but NONE and PROBE starts by unmapping what it had mapped."""
    NONE = "none"
    PROBE = "probe"          # open what the device needs, publish its features: InitWait (failing: Closed)
    CONNECT = "connect"      # map the frontend's rings, bind its event channels: Connected (failing: Closing)
    RESET = "reset"          # the frontend starts over: InitWait
    CLOSE = "close"          # the frontend is closing: Closing
    CLOSED = "closed"        # the frontend is closed or gone: Closed


class FrontendAction(Enum):
    """What a frontend device does."""
    NONE = "none"
    TALK = "talk"            # rings and event channels set up, published: Initialised
    RECONNECT = "reconnect"  # the backend came back: the old rings go (what was in flight stays), then TALK
    CONNECT = "connect"      # the backend is Connected: read what it published, go Connected
    WAIT = "wait"            # the backend is away (dead, restarting): keep everything, I/O waits
    CLOSE = "close"          # the backend is going (a detach): fail what is in flight, let go: Closing, Closed


A = TypeVar("A", BackendAction, FrontendAction)


def _table(rows: Mapping[XenbusState, tuple[A, Mapping[XenbusState, A]]], default: A) -> dict[tuple[S, S], A]:
    """Every (own, peer) pair: the row's entry for ``peer``, else the row's default, else ``default``."""
    return {(own, peer): rows[own][1].get(peer, rows[own][0]) if own in rows else default
            for own in S for peer in S}


B = BackendAction
BACKEND: Final[Mapping[tuple[XenbusState, XenbusState], BackendAction]] = _table({
    S.Initialising: (B.PROBE, {}),
    S.InitWait: (B.NONE, {S.Unknown: B.CLOSED, S.Initialised: B.CONNECT, S.Closing: B.CLOSE, S.Closed: B.CLOSED}),
    S.Connected: (B.NONE, {S.Unknown: B.CLOSED, S.Initialising: B.RESET, S.Closing: B.CLOSE, S.Closed: B.CLOSED}),
    S.Closing: (B.NONE, {S.Unknown: B.CLOSED, S.Initialising: B.RESET, S.Initialised: B.CONNECT,
                         S.Closed: B.CLOSED}),
    S.Closed: (B.NONE, {S.Initialising: B.RESET, S.Initialised: B.CONNECT, S.Closing: B.CLOSE}),
}, B.NONE)
"""The backend's action for (own state, frontend's state)."""

F = FrontendAction
FRONTEND: Final[Mapping[tuple[XenbusState, XenbusState], FrontendAction]] = _table({
    S.Initialising: (F.NONE, {S.InitWait: F.TALK, S.Closing: F.CLOSE}),
    S.Initialised: (F.NONE, {S.Connected: F.CONNECT, S.Closing: F.CLOSE, S.Closed: F.CLOSE}),
    S.Connected: (F.NONE, {S.Unknown: F.WAIT, S.Initialising: F.WAIT, S.InitWait: F.RECONNECT,
                           S.Closing: F.CLOSE, S.Closed: F.CLOSE}),
}, F.NONE)
"""The frontend's action for (own state, backend's state)."""

BACKEND_WRITES: Final[Mapping[BackendAction, tuple[XenbusState, ...]]] = {
    B.NONE: (), B.PROBE: (S.InitWait,), B.CONNECT: (S.Connected,), B.RESET: (S.InitWait,),
    B.CLOSE: (S.Closing,), B.CLOSED: (S.Closed,)}
"""The states a backend writes, in order, when the action succeeds."""

BACKEND_FAILED: Final[Mapping[BackendAction, tuple[XenbusState, ...]]] = {
    B.PROBE: (S.Closed,),            # the toolstack's configuration is unusable (a probe at start-up raises)
    B.CONNECT: (S.Closing,)}         # the frontend's nodes are unusable (Linux: xenbus_dev_fatal)
"""What a backend writes when the action fails (an action not listed cannot fail)."""

FRONTEND_WRITES: Final[Mapping[FrontendAction, tuple[XenbusState, ...]]] = {
    F.NONE: (), F.TALK: (S.Initialised,), F.RECONNECT: (S.Initialised,), F.CONNECT: (S.Connected,),
    F.WAIT: (), F.CLOSE: (S.Closing, S.Closed)}
"""The states a frontend writes, in order, when the action succeeds."""

FRONTEND_FAILED: Final[Mapping[FrontendAction, tuple[XenbusState, ...]]] = {
    F.TALK: (), F.RECONNECT: (), F.CONNECT: ()}
"""A frontend's failed step writes nothing: the error goes to whoever waits in ``connect()``."""

BACKEND_STEPS: Final[Mapping[XenbusState, frozenset[XenbusState]]] = {
    S.Initialising: frozenset({S.InitWait, S.Closed}),
    S.InitWait: frozenset({S.Connected, S.Closing, S.Closed}),
    # To InitWait directly: the frontend starts over (Linux netback walks through Closing and Closed).
    S.Connected: frozenset({S.InitWait, S.Closing, S.Closed}),
    S.Closing: frozenset({S.InitWait, S.Connected, S.Closed}),
    S.Closed: frozenset({S.InitWait, S.Connected, S.Closing}),
}
"""The state changes a backend may write (netback's diagram in Linux's xenbus.c, with blkback's
connection from Closing and Closed, and xdom's Connected -> InitWait)."""

FRONTEND_STEPS: Final[Mapping[XenbusState, frozenset[XenbusState]]] = {
    S.Initialising: frozenset({S.Initialised, S.Closing}),
    S.Initialised: frozenset({S.Connected, S.Closing}),
    S.Connected: frozenset({S.Initialised, S.Closing}),      # a backend that came back: new rings
    S.Closing: frozenset({S.Closed}),
}
"""The state changes a frontend may write."""


def backend_action(own: XenbusState, frontend: XenbusState) -> BackendAction:
    """What the backend does in ``own`` state when the frontend's is ``frontend``."""
    return BACKEND[own, frontend]


def frontend_action(own: XenbusState, backend: XenbusState) -> FrontendAction:
    """What the frontend does in ``own`` state when the backend's is ``backend``."""
    return FRONTEND[own, backend]


def legal_step(steps: Mapping[XenbusState, frozenset[XenbusState]], own: XenbusState,
               writes: tuple[XenbusState, ...]) -> bool:
    """Whether writing ``writes`` in order from ``own`` takes only steps in ``steps`` (writing the state
    one is already in is no step, and allowed)."""
    for state in writes:
        if state != own and state not in steps.get(own, frozenset()):
            return False
        own = state
    return True
