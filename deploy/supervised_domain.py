"""What the supervisor knows of each domain it runs, its journal entries and its errors: records, no behaviour.

Shared by the supervisor's parts (``deploy/supervision.py`` and the modules
built on it) and by adoption (``deploy/adopt.py``), which writes a record
down in the state file and reads it back; this module imports neither, so
none of them import each other to name these types.

A domain's lifecycle position is ``life`` (``deploy/lifecycle.py``: its
phase, and whether it was ever ready); ``state`` is what ``xdom ps`` shows of
it.  The remaining fields are facts about the current process (its pid and
descriptors, whether the broker reports it connected, whether it was
introduced to xenstored, what it said on its ready pipe) and the devices
wired to it.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass, field
from typing import Any

import psutil

from .host_state import AdoptedProcess
from .lifecycle import Lifecycle, Phase, State
from .policy import HealthCheck, HealthSample, RestartTracker
from .topology import DomainKind, DomainSpec, NetSwitch

__all__ = ["READY_PIPE_KINDS", "AlreadyRunning", "JournalEntry", "StartupError", "SupervisedDomain",
           "SupervisorError"]


# A guest's arguments naming where it may bind export sockets (its Landlock rules allow those directories).
_EXPORT_ARGS = ("--export-dir=", "--disk=", "--vhost-user-disk=", "--vhost-user-vif=")


class SupervisorError(Exception):
    """The host could not be started or kept running."""


class StartupError(SupervisorError):
    """A domain could not be started; everything started was stopped again."""


class AlreadyRunning(SupervisorError):
    """Another supervisor holds this run directory."""


# The kinds that say "ready" on a pipe (a program is ready once the broker reports it connected).
READY_PIPE_KINDS = (DomainKind.XENSTORED, DomainKind.GUEST, DomainKind.BLKBACK, DomainKind.NETBACK)


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """What the supervisor did or saw, in order: the record tests and ``xdom ps`` history rely on."""

    time: float
    name: str
    event: str
    detail: str = ""


@dataclass(eq=False)
class SupervisedDomain:
    spec: DomainSpec
    uid: int | None
    tracker: RestartTracker
    health: HealthCheck
    life: Lifecycle = field(default_factory=Lifecycle)
    domid: int | None = None
    creds: dict[str, Any] | None = None
    store: tuple[int, int] | None = None         # (gfn, port) from setup_store
    proc: subprocess.Popen[bytes] | AdoptedProcess | None = None   # AdoptedProcess: another supervisor's child
    pidfd: int = -1
    ready_fd: int = -1
    ready_seen: bool = False
    devices: socket.socket | None = None          # device channel: a guest's hot-added vifs, a bridged netback's TAPs
    switch: NetSwitch | None = None               # a netback's: bridge or builtin, fixed when the host starts
    offered: set[tuple[int, int]] = field(default_factory=set)  # a bridged netback's: (fe domid, devid) whose TAP
                                                                # this process's channel was given
    connected: bool = False                       # the broker reports this process running as the domain
    introduced: bool = False                      # XS_INTRODUCE'd to xenstored, its nodes written
    generation: int = 0
    changes: int = 0                              # state changes, so a client sees that something happened
    started_mono: float = 0.0
    deadline: float | None = None                 # its one timer: ready timeout, stop grace, backoff or retry
    reset_since: float | None = None              # since when the broker refuses its restart as "still alive"
    kill_reason: str = ""                         # why the supervisor killed it, said with its exit
    confinement: str = ""                         # as the process reported it with its readiness
    netns: str | None = None                      # its network namespace (as root), made before it starts
    last_exit: str = ""
    sample: HealthSample | None = None
    ps_cache: dict[int, psutil.Process] = field(default_factory=dict)
    ident: dict[str, int] | None = None           # its process by pid and start time, as the state file names it

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> DomainKind:
        return self.spec.kind

    @property
    def phase(self) -> Phase:
        return self.life.phase

    @property
    def state(self) -> State:
        """What ``xdom ps`` shows."""
        return self.life.phase.shown

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.pidfd >= 0 else None

    @property
    def argv(self) -> list[str]:
        """Its process's command line ([] without one): as started, or as /proc shows an adopted one."""
        if self.proc is None:
            return []
        args = self.proc.args
        if isinstance(args, (str, bytes, os.PathLike)):
            return [os.fsdecode(args)]
        return [os.fsdecode(a) for a in args]

    def export_dirs(self) -> set[str]:
        """Where a running guest may bind export sockets: its Landlock domain allows the directories its
        command line named, and no other."""
        return {a.partition("=")[2] if a.startswith("--export-dir=") else os.path.dirname(a.partition(":")[2])
                for a in self.argv if a.startswith(_EXPORT_ARGS)}
