"""A supervised domain's lifecycle as a pure transition table: no processes, no clocks, no I/O.

The supervisor (``deploy/supervisor.py`` and its parts) owns the processes,
the broker and xenstored; this module only answers "where is the domain now,
and what must be done?" given where it was and what happened, like h11 for
HTTP.  Every rule is therefore tested without starting anything
(``tests/test_lifecycle.py``, a property test over every phase and event).

Rules:

* :class:`Phase` is where a domain is.  It says more than the state ``xdom ps``
  shows (:class:`State`): a stop with a restart or a destroy to follow, and a
  domain waiting for its xenstore domain, are phases of their own (they were
  an ``after_stop`` string and a ``waiting_for_store`` flag beside the state).
  :attr:`Phase.shown` is the state a person sees.
* :func:`step` is total: every (phase, event) pair has a transition, most of
  them "nothing happens" (a late timer, an exit already handled).  The
  supervisor never has to ask whether an event is expected.
* A transition names the phase that follows and the :class:`Effect` s the
  supervisor performs, in order.  Effects whose outcome is another event
  (:attr:`Effect.LAUNCH` ends in SPAWNED, STORE_DOWN, BROKER_BUSY,
  LAUNCH_FAILED...; :attr:`Effect.ASK_POLICY` ends in one of the ``DIED_*``
  events) are fed back by the supervisor.
* Restart decisions are the restart policy's (``deploy/policy.py``): an exit
  the supervisor did not ask for is judged there, and its :class:`Action`
  comes back as :func:`died` 's event.  This table honours it: restart means
  backoff, stay-down means exited, give-up means failed.
* ``STOP`` (the host stops) always ends in a down phase: a domain with a
  process goes to STOPPING and to STOPPED on its exit; one without goes to
  STOPPED at once (one never launched stays PENDING, one destroyed stays
  DESTROYED).  Nothing but an explicit START or RESTART launches it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .policy import Action

__all__ = ["DOWN", "LAUNCHABLE", "Effect", "Event", "Lifecycle", "Phase", "State", "Transition", "died",
           "is_ready", "step"]


class State(StrEnum):
    """What ``xdom ps`` shows (and the state file records) of a domain's lifecycle."""

    PENDING = "pending"        # not launched yet (start-up order)
    STARTING = "starting"      # process launched, not ready yet
    RUNNING = "running"
    STOPPING = "stopping"      # SIGTERM sent, waiting for the exit
    BACKOFF = "backoff"        # dead; to be restarted
    EXITED = "exited"          # dead; its restart policy leaves it down
    FAILED = "failed"          # dead; flapping, or could not be launched
    DESTROYED = "destroyed"    # removed from the broker on request
    STOPPED = "stopped"        # stopped with the host


class Phase(StrEnum):
    """Where a domain is in its lifecycle; :attr:`shown` is its :class:`State`."""

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"                    # then stopped (the host stops)
    STOPPING_RESTART = "stopping-restart"    # then launched again (xdom restart)
    STOPPING_DESTROY = "stopping-destroy"    # then destroyed in the broker (xdom destroy)
    BACKOFF = "backoff"                      # dead; launched when its timer fires
    AWAITING_STORE = "awaiting-store"        # dead; launched once xenstored serves again
    EXITED = "exited"
    FAILED = "failed"
    DESTROYED = "destroyed"
    STOPPED = "stopped"

    @property
    def shown(self) -> State:
        return _SHOWN[self]

    @property
    def has_process(self) -> bool:
        """A process was launched for this phase and has not been seen to exit."""
        return self in _WITH_PROCESS

    @property
    def stopping(self) -> bool:
        return self in _STOPPING


_SHOWN = {p: State(p.value) for p in Phase if p.value in State._value2member_map_}
_SHOWN.update({Phase.STOPPING_RESTART: State.STOPPING, Phase.STOPPING_DESTROY: State.STOPPING,
               Phase.AWAITING_STORE: State.BACKOFF})
_STOPPING = frozenset({Phase.STOPPING, Phase.STOPPING_RESTART, Phase.STOPPING_DESTROY})
_WITH_PROCESS = frozenset({Phase.STARTING, Phase.RUNNING}) | _STOPPING
LAUNCHABLE = frozenset({Phase.PENDING, Phase.BACKOFF})           # where a launch's outcome is expected
DOWN = frozenset({Phase.EXITED, Phase.FAILED, Phase.DESTROYED, Phase.STOPPED})


class Event(StrEnum):
    START = "start"                  # its turn in the host's start order
    SPAWNED = "spawned"              # LAUNCH made its process
    STORE_DOWN = "store-down"        # LAUNCH found xenstored not serving (it is restarting)
    STORE_GONE = "store-gone"        # LAUNCH found xenstored down for good
    STORE_UP = "store-up"            # xenstored serves again
    BROKER_BUSY = "broker-busy"      # LAUNCH: the broker has not seen the old process die yet; retry soon
    BROKER_STUCK = "broker-stuck"    # ... and still has not after the supervisor's patience
    LAUNCH_FAILED = "launch-failed"  # LAUNCH got no process (the broker refused, no namespace...): like status 127
    READY = "ready"                  # the readiness rule (:func:`is_ready`) holds, or a program is let run
    EXITED = "exited"                # its process exited (its pidfd said so)
    DIED_RESTART = "died-restart"    # a death the restart policy judged (:func:`died`): restart
    DIED_STAY_DOWN = "died-stay-down"
    DIED_GIVE_UP = "died-give-up"
    DEADLINE = "deadline"            # its timer fired: ready timeout, stop grace or backoff
    RESTART = "restart"              # xdom restart
    DESTROY = "destroy"              # xdom destroy
    STOP = "stop"                    # the host stops


class Effect(StrEnum):
    LAUNCH = "launch"                # create (or restart) it in the broker and start its process
    ASK_POLICY = "ask-policy"        # an unrequested exit: the restart policy decides (a DIED_* event)
    ARM_BACKOFF = "arm-backoff"      # timer: the policy decision's delay
    ARM_RETRY = "arm-retry"          # timer: a short retry of a launch the broker refused for now
    ARM_NOW = "arm-now"              # timer: due at once (launched from the loop, not from this handler)
    CANCEL_TIMER = "cancel-timer"
    STOP_PROCESS = "stop-process"    # its VM powered off first, SIGTERM, the stop grace timer
    KILL = "kill"                    # SIGKILL to its process group (grace over)
    KILL_NOT_READY = "kill-not-ready"    # SIGKILL: not ready within the ready timeout
    ANNOUNCE_READY = "announce-ready"    # it runs: say so, and start whatever waited for it
    RELEASE = "release"              # it stays down: its sockets, device nodes, TAPs and namespace go
    DESTROY = "destroy"              # destroyed in the broker, then released
    REFUSE_BUSY = "refuse-busy"      # the request cannot be honoured now (restart while being destroyed)


@dataclass(frozen=True, slots=True)
class Transition:
    phase: Phase
    effects: tuple[Effect, ...] = ()


def died(action: Action) -> Event:
    """The event for a death the restart policy judged (``RestartTracker.on_exit``)."""
    return {Action.RESTART: Event.DIED_RESTART, Action.STAY_DOWN: Event.DIED_STAY_DOWN,
            Action.GIVE_UP: Event.DIED_GIVE_UP}[action]


def _build() -> dict[tuple[Phase, Event], Transition]:
    t: dict[tuple[Phase, Event], Transition] = {}

    def on(phases: object, event: Event, to: Phase | None, *effects: Effect) -> None:
        for p in (phases if isinstance(phases, (set, frozenset, tuple, list)) else (phases,)):
            assert isinstance(p, Phase)
            t[p, event] = Transition(p if to is None else to, effects)

    alive = (Phase.STARTING, Phase.RUNNING)
    # launching, and what a launch ends in
    on(Phase.PENDING, Event.START, None, Effect.LAUNCH)
    on(LAUNCHABLE, Event.SPAWNED, Phase.STARTING)
    on(LAUNCHABLE, Event.STORE_DOWN, Phase.AWAITING_STORE)
    on((*LAUNCHABLE, Phase.AWAITING_STORE), Event.STORE_GONE, Phase.FAILED, Effect.RELEASE)
    on(Phase.AWAITING_STORE, Event.STORE_UP, Phase.BACKOFF, Effect.ARM_NOW)
    on(LAUNCHABLE, Event.BROKER_BUSY, Phase.BACKOFF, Effect.ARM_RETRY)
    on(LAUNCHABLE, Event.BROKER_STUCK, Phase.FAILED, Effect.RELEASE)
    on(LAUNCHABLE, Event.LAUNCH_FAILED, None, Effect.ASK_POLICY)
    on(Phase.STARTING, Event.READY, Phase.RUNNING, Effect.ANNOUNCE_READY)
    # deaths: an unrequested exit goes to the restart policy, whose decision this table honours
    on(alive, Event.EXITED, None, Effect.ASK_POLICY)
    on(Phase.STOPPING, Event.EXITED, Phase.STOPPED)
    on(Phase.STOPPING_RESTART, Event.EXITED, Phase.BACKOFF, Effect.LAUNCH)
    on(Phase.STOPPING_DESTROY, Event.EXITED, Phase.DESTROYED, Effect.DESTROY)
    judged = (*alive, *LAUNCHABLE)          # a launch that failed is judged like a death (status 127)
    on(judged, Event.DIED_RESTART, Phase.BACKOFF, Effect.ARM_BACKOFF)
    on(judged, Event.DIED_STAY_DOWN, Phase.EXITED, Effect.RELEASE)
    on(judged, Event.DIED_GIVE_UP, Phase.FAILED, Effect.RELEASE)
    # timers
    on(Phase.STARTING, Event.DEADLINE, None, Effect.KILL_NOT_READY)
    on(_STOPPING, Event.DEADLINE, None, Effect.KILL)
    on(Phase.BACKOFF, Event.DEADLINE, None, Effect.LAUNCH)
    # requests
    on(alive, Event.RESTART, Phase.STOPPING_RESTART, Effect.STOP_PROCESS)
    on((Phase.STOPPING, Phase.STOPPING_RESTART), Event.RESTART, Phase.STOPPING_RESTART)
    on(Phase.STOPPING_DESTROY, Event.RESTART, None, Effect.REFUSE_BUSY)
    on((Phase.PENDING, Phase.BACKOFF, Phase.AWAITING_STORE, *DOWN), Event.RESTART, Phase.BACKOFF, Effect.ARM_NOW)
    on(alive, Event.DESTROY, Phase.STOPPING_DESTROY, Effect.STOP_PROCESS)
    on(_STOPPING, Event.DESTROY, Phase.STOPPING_DESTROY)
    on((Phase.PENDING, Phase.BACKOFF, Phase.AWAITING_STORE, Phase.EXITED, Phase.FAILED, Phase.STOPPED),
       Event.DESTROY, Phase.DESTROYED, Effect.CANCEL_TIMER, Effect.DESTROY)
    on(alive, Event.STOP, Phase.STOPPING, Effect.STOP_PROCESS)
    on(_STOPPING, Event.STOP, Phase.STOPPING)
    on((Phase.BACKOFF, Phase.AWAITING_STORE, Phase.EXITED, Phase.FAILED), Event.STOP, Phase.STOPPED,
       Effect.CANCEL_TIMER)
    # everything else: nothing happens (a late timer, a duplicate request, an event for a phase past it)
    for p in Phase:
        for e in Event:
            t.setdefault((p, e), Transition(p))
    return t


_TABLE = _build()


def step(phase: Phase, event: Event) -> Transition:
    """The transition for ``event`` in ``phase``: defined for every pair."""
    return _TABLE[phase, event]


@dataclass(slots=True)
class Lifecycle:
    """One domain's phase, and whether it was ever ready (the host's start order waits for that)."""

    phase: Phase = Phase.PENDING
    ever_ready: bool = False

    def fire(self, event: Event) -> Transition:
        """Take the transition for ``event``; the caller performs its effects."""
        t = step(self.phase, event)
        self.phase = t.phase
        if t.phase == Phase.RUNNING:
            self.ever_ready = True
        return t


def is_ready(*, is_store: bool, needs_store: bool, has_ready_pipe: bool, connected: bool, introduced: bool,
             ready_seen: bool) -> bool:
    """The readiness rule of a starting domain (see ``deploy/supervisor.py``'s docstring).

    The xenstore domain is ready when it says so on its pipe (it connects to
    the broker before it serves); any other domain once the broker reports it
    running, it was introduced to xenstored when the host has one, and, for
    those with a ready pipe, it said "ready" there.
    """
    if is_store:
        return ready_seen
    return connected and (introduced or not needs_store) and (ready_seen or not has_ready_pipe)
