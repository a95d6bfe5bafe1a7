"""Restart policies, backoff, flap limiting and health limits: pure decisions, no processes.

The supervisor (``deploy/supervisor.py``) owns the processes; this module only
answers "what now?" given what happened and when, so every rule is tested
without starting anything (``tests/test_supervisor_policy.py``).

Rules (the topology's ``restart``, ``restart_backoff``, ``flap_limit`` and
``flap_window`` keys):

* An exit is *clean* (status 0), a *failure* (non-zero status) or a *kill*
  (a signal, including the supervisor's own SIGKILL for a limit).
* ``never`` never restarts; ``on-failure`` restarts failures and kills, not
  clean exits; ``always`` restarts every exit.
* Backoff: the first restart within the flap window is immediate (a driver
  domain's guests are stalled until it is back: every millisecond counts);
  one decided when ``n >= 1`` restarts already happened within the window
  waits ``restart_backoff * 2**(n-1)`` seconds, capped at
  :data:`MAX_BACKOFF`.  A domain that crashes once a day always comes back
  at once; one that crashes in a loop waits longer each time.
* Flap limit: when ``flap_limit`` restarts already happened within the last
  ``flap_window`` seconds, the next exit gives up (state ``failed``) instead
  of restarting.  A manual ``xdom restart`` clears the history.
* Health: RSS and open descriptors are checked against their limits on every
  sample; CPU is averaged over :data:`CPU_WINDOW` samples, because a start-up
  (importing an interpreter's modules) is a legitimate burst.
"""

from __future__ import annotations

import signal
from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from .topology import DomainSpec, Limits, RestartPolicy

__all__ = ["CPU_WINDOW", "MAX_BACKOFF", "UNKNOWN_RETURNCODE", "Action", "Decision", "ExitStatus", "HealthCheck",
           "HealthSample", "RestartTracker"]

MAX_BACKOFF = 30.0
CPU_WINDOW = 5
# What an adopted process's ``wait()`` gives (deploy/host_state.py): it is not our child, so its exit status
# went to whoever reaped it.  No real status is this large (an exit code is 0..255, a signal -1..-64).
UNKNOWN_RETURNCODE = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class ExitStatus:
    """How a process ended: an exit status or the signal that killed it (exactly one is set), or, for a
    process this supervisor adopted (not its child: no ``waitpid``), neither, with ``unknown`` saying why.

    An unknown status is a failure for the restart policy unless ``seen_clean``: something else saw the
    end and says it was clean (the broker recorded the domain's own ``poweroff``, QMP reported the VM's
    shutdown), as Xen's toolstack decides between ``on_poweroff`` and ``on_crash`` from the hypervisor's
    shutdown code rather than from a process status.
    """

    code: int | None = None
    signal: int | None = None
    unknown: str = ""
    seen_clean: bool = False

    def __post_init__(self) -> None:
        if self.unknown:
            if self.code is not None or self.signal is not None:
                raise ValueError("an unknown exit has neither a status code nor a signal")
        elif (self.code is None) == (self.signal is None):
            raise ValueError("an exit has either a status code or a signal")

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        """From ``Popen.returncode``: negative means killed by that signal; :data:`UNKNOWN_RETURNCODE`, an
        adopted process whose status nobody here could read."""
        if returncode == UNKNOWN_RETURNCODE:
            return cls(unknown="adopted")
        return cls(signal=-returncode) if returncode < 0 else cls(code=returncode)

    @property
    def clean(self) -> bool:
        return self.code == 0 or (bool(self.unknown) and self.seen_clean)

    def describe(self) -> str:
        if self.unknown:
            return f"exit status unknown ({self.unknown})"
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        return f"exited with status {self.code}"


class Action(StrEnum):
    RESTART = "restart"
    STAY_DOWN = "stay-down"     # the policy does not restart this exit
    GIVE_UP = "give-up"         # it would, but the domain is flapping: failed


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    delay: float = 0.0
    reason: str = ""


class RestartTracker:
    """One domain's restart history; :meth:`on_exit` is the whole policy.

    ``now`` is a monotonic time in seconds, passed in so tests control it.
    """

    def __init__(self, policy: RestartPolicy, backoff: float, flap_limit: int, flap_window: float,
                 max_backoff: float = MAX_BACKOFF) -> None:
        if backoff < 0 or flap_limit < 1 or flap_window <= 0 or max_backoff < 0:
            raise ValueError("backoff >= 0, flap_limit >= 1, flap_window > 0 and max_backoff >= 0 are required")
        self.policy = policy
        self.backoff = backoff
        self.flap_limit = flap_limit
        self.flap_window = flap_window
        self.max_backoff = max_backoff
        self._restarts: deque[float] = deque()      # times at which restarts were decided

    @classmethod
    def for_spec(cls, spec: DomainSpec) -> RestartTracker:
        return cls(spec.restart, spec.restart_backoff, spec.flap_limit, spec.flap_window)

    def recent(self, now: float) -> int:
        """Restarts decided within the flap window before ``now``."""
        while self._restarts and now - self._restarts[0] >= self.flap_window:
            self._restarts.popleft()
        return len(self._restarts)

    def delay_for(self, n: int) -> float:
        """The wait before a restart that follows ``n`` recent ones: none for the first."""
        if n == 0:
            return 0.0
        return min(self.max_backoff, self.backoff * (2.0 ** min(n - 1, 64)))

    def on_exit(self, status: ExitStatus, now: float) -> Decision:
        if self.policy == RestartPolicy.NEVER:
            return Decision(Action.STAY_DOWN, reason="restart policy is never")
        if self.policy == RestartPolicy.ON_FAILURE and status.clean:
            return Decision(Action.STAY_DOWN, reason="clean exit; restart policy is on-failure")
        n = self.recent(now)
        if n >= self.flap_limit:
            return Decision(Action.GIVE_UP, reason=f"{n} restarts within {self.flap_window:g}s "
                                                   f"(flap_limit {self.flap_limit}); giving up")
        self._restarts.append(now)
        delay = self.delay_for(n)
        return Decision(Action.RESTART, delay, f"restart {n + 1} of at most {self.flap_limit} within "
                                               f"{self.flap_window:g}s, after {delay:.2f}s")

    def reset(self) -> None:
        """Forget the history: an operator asked for this restart."""
        self._restarts.clear()


@dataclass(frozen=True, slots=True)
class HealthSample:
    """One look at a domain's processes (the domain process and its descendants)."""

    rss: int
    fds: int
    cpu_percent: float


class HealthCheck:
    """A domain's topology ``limits`` against its samples; :meth:`check` says why it must die, or None."""

    def __init__(self, limits: Limits, cpu_window: int = CPU_WINDOW) -> None:
        if cpu_window < 1:
            raise ValueError("cpu_window must be at least 1")
        self.limits = limits
        self._cpu: deque[float] = deque(maxlen=cpu_window)

    def reset(self) -> None:
        """A new process: its CPU history starts again."""
        self._cpu.clear()

    def check(self, sample: HealthSample) -> str | None:
        lim = self.limits
        if lim.rss_bytes is not None and sample.rss > lim.rss_bytes:
            return f"rss {_mib(sample.rss)} is over its limit of {_mib(lim.rss_bytes)}"
        if lim.fds is not None and sample.fds > lim.fds:
            return f"{sample.fds} open file descriptors is over its limit of {lim.fds}"
        self._cpu.append(sample.cpu_percent)
        if lim.cpu_percent is not None and len(self._cpu) == self._cpu.maxlen:
            average = sum(self._cpu) / len(self._cpu)
            if average > lim.cpu_percent:
                return (f"cpu {average:.0f}% averaged over {len(self._cpu)} samples is over its limit of "
                        f"{lim.cpu_percent:g}%")
        return None


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
