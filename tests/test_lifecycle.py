"""The domain lifecycle table (deploy/lifecycle.py): total, and its promises hold over any history."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from xdom.deploy.lifecycle import DOWN, LAUNCHABLE, Effect, Event, Lifecycle, Phase, State, died, is_ready, step
from xdom.deploy.policy import Action, ExitStatus, RestartTracker
from xdom.deploy.topology import RestartPolicy

phases = st.sampled_from(list(Phase))
events = st.sampled_from(list(Event))


def reachable() -> set[Phase]:
    seen, todo = {Phase.PENDING}, [Phase.PENDING]
    while todo:
        p = todo.pop()
        for e in Event:
            q = step(p, e).phase
            if q not in seen:
                seen.add(q)
                todo.append(q)
    return seen


def test_the_table_is_total_and_every_phase_is_reachable_and_shown() -> None:
    for p in Phase:
        assert isinstance(p.shown, State)
        for e in Event:
            t = step(p, e)
            assert isinstance(t.phase, Phase) and all(isinstance(x, Effect) for x in t.effects)
    assert reachable() == set(Phase)
    assert {p.shown for p in Phase} == set(State)


@given(phases, events)
def test_a_launch_never_doubles_a_process(p: Phase, e: Event) -> None:
    """LAUNCH only where no process runs: from a launchable phase, or right after the old one exited."""
    t = step(p, e)
    if Effect.LAUNCH in t.effects:
        assert t.phase in LAUNCHABLE
        assert not p.has_process or e == Event.EXITED
    if Effect.ASK_POLICY in t.effects:
        assert t.phase == p and ((p.has_process and e == Event.EXITED) or
                                 (p in LAUNCHABLE and e == Event.LAUNCH_FAILED))


_LAUNCH_OUTCOMES = frozenset({Event.SPAWNED, Event.STORE_DOWN, Event.STORE_GONE, Event.BROKER_BUSY,
                              Event.BROKER_STUCK, Event.LAUNCH_FAILED})
_JUDGEMENTS = frozenset({Event.DIED_RESTART, Event.DIED_STAY_DOWN, Event.DIED_GIVE_UP})


class World:
    """Feeds a lifecycle events the way the supervisor does: an outcome only after the effect it answers
    (a launch's after LAUNCH, the policy's after ASK_POLICY), an exit only from a process."""

    def __init__(self) -> None:
        self.life = Lifecycle()
        self.awaiting: frozenset[Event] = frozenset()

    def feed(self, e: Event) -> list[Effect] | None:
        """The effects of ``e``, or None when it cannot happen now."""
        if (e in _LAUNCH_OUTCOMES | _JUDGEMENTS and e not in self.awaiting) or \
                (e == Event.EXITED and not self.life.phase.has_process):
            return None
        effects = list(self.life.fire(e).effects)
        self.awaiting = (_LAUNCH_OUTCOMES if Effect.LAUNCH in effects else
                         _JUDGEMENTS if Effect.ASK_POLICY in effects else frozenset())
        return effects


def settle(world: World, events: list[Event]) -> list[Effect]:
    done: list[Effect] = []
    for e in events:
        done += world.feed(e) or []
    return done


@given(st.lists(events, max_size=20), st.lists(events.filter(lambda e: e not in (Event.START, Event.RESTART)),
                                              max_size=20))
def test_a_stop_always_ends_down_and_stays_down(history: list[Event], later: list[Event]) -> None:
    """Whatever happened before, STOP (then the process's exit, if it had one) ends in a down phase, and
    nothing but an explicit START or RESTART launches the domain again."""
    world = World()
    settle(world, history)
    life = world.life
    before = life.phase
    had_process = before.has_process
    t = life.fire(Event.STOP)
    assert (Effect.STOP_PROCESS in t.effects) == (had_process and not before.stopping)
    if had_process:
        assert life.phase == Phase.STOPPING
        life.fire(Event.EXITED)
    assert life.phase in (Phase.STOPPED, Phase.PENDING, Phase.DESTROYED)
    world.awaiting = frozenset()
    for e in later:
        effects = world.feed(e) or []
        assert Effect.LAUNCH not in effects and Effect.ARM_NOW not in effects
        assert life.phase in DOWN | {Phase.PENDING}


@settings(max_examples=200)
@given(st.sampled_from(list(RestartPolicy)), st.lists(st.tuples(st.integers(-15, 3), st.floats(0, 5)),
                                                      min_size=1, max_size=15))
def test_the_restart_policy_decision_is_honoured(policy: RestartPolicy, exits: list[tuple[int, float]]) -> None:
    """A domain that keeps dying: each death goes to the policy, and the table does what it decided."""
    tracker = RestartTracker(policy, backoff=0.1, flap_limit=3, flap_window=10.0)
    life, now = Lifecycle(), 0.0
    life.fire(Event.START)
    life.fire(Event.SPAWNED)
    for rc, gap in exits:
        if life.phase != Phase.STARTING:
            break
        life.fire(Event.READY)
        assert life.phase == Phase.RUNNING and life.ever_ready
        assert life.fire(Event.EXITED).effects == (Effect.ASK_POLICY,)
        now += gap
        decision = tracker.on_exit(ExitStatus.from_returncode(rc), now)
        t = life.fire(died(decision.action))
        want = {Action.RESTART: Phase.BACKOFF, Action.STAY_DOWN: Phase.EXITED, Action.GIVE_UP: Phase.FAILED}
        assert life.phase == want[decision.action]
        if decision.action == Action.RESTART:
            assert t.effects == (Effect.ARM_BACKOFF,)
            assert life.fire(Event.DEADLINE).effects == (Effect.LAUNCH,)
            life.fire(Event.SPAWNED)
        else:
            assert t.effects == (Effect.RELEASE,)
            assert all(Effect.LAUNCH not in life.fire(e).effects for e in (Event.DEADLINE, Event.STORE_UP))


@given(st.lists(events, max_size=20))
def test_a_restart_request_launches_unless_a_destroy_is_under_way(history: list[Event]) -> None:
    world = World()
    settle(world, history)
    life = world.life
    before = life.phase
    t = life.fire(Event.RESTART)
    if before == Phase.STOPPING_DESTROY:
        assert t.effects == (Effect.REFUSE_BUSY,) and life.phase == before
        return
    if life.phase.stopping:
        assert life.phase == Phase.STOPPING_RESTART
        assert (Effect.STOP_PROCESS in t.effects) == (not before.stopping)
        t = life.fire(Event.EXITED)
        assert Effect.LAUNCH in t.effects
    else:
        assert t.effects == (Effect.ARM_NOW,) and life.phase == Phase.BACKOFF
        assert life.fire(Event.DEADLINE).effects == (Effect.LAUNCH,)
    assert life.fire(Event.SPAWNED).phase == Phase.STARTING


@given(st.lists(events, max_size=20))
def test_a_destroy_ends_destroyed_and_destroys_once(history: list[Event]) -> None:
    world = World()
    settle(world, history)
    life = world.life
    before = life.phase
    effects = list(life.fire(Event.DESTROY).effects)
    if life.phase.stopping:
        effects += life.fire(Event.EXITED).effects
    assert life.phase == Phase.DESTROYED
    assert effects.count(Effect.DESTROY) == (0 if before == Phase.DESTROYED else 1)


def test_a_domain_waiting_for_xenstored_is_launched_when_it_serves() -> None:
    life = Lifecycle()
    assert life.fire(Event.START).effects == (Effect.LAUNCH,)
    life.fire(Event.STORE_DOWN)
    assert life.phase == Phase.AWAITING_STORE and life.phase.shown == State.BACKOFF
    assert life.fire(Event.DEADLINE).effects == ()           # no timer launches it: xenstored does
    assert life.fire(Event.STORE_UP).effects == (Effect.ARM_NOW,)
    assert life.fire(Event.DEADLINE).effects == (Effect.LAUNCH,)


def test_readiness() -> None:
    base = dict(is_store=False, needs_store=True, has_ready_pipe=True, connected=True, introduced=True,
                ready_seen=True)
    assert is_ready(**base)
    for fact in ("connected", "introduced", "ready_seen"):
        assert not is_ready(**{**base, fact: False})
    assert is_ready(**{**base, "needs_store": False, "introduced": False})
    assert is_ready(**{**base, "has_ready_pipe": False, "ready_seen": False})
    assert is_ready(**{**base, "is_store": True, "connected": False, "introduced": False})
    assert not is_ready(**{**base, "is_store": True, "ready_seen": False})
