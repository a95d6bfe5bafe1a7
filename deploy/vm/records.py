"""The VM supervisor's records: a VM's state, its QMP connection, the devices being hot-plugged into it.

Shared by ``deploy/vm/hotplug.py`` and ``deploy/vm/supervised.py``; no behaviour
beyond reading and writing QMP lines.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import psutil

from ..host_state import AdoptedProcess
from ..policy import HealthCheck, HealthSample, RestartTracker
from ..topology import VmConfig
from .plan import VmPlan
from .qemu import VmPaths

__all__ = ["PlugState", "VmState"]

QMP_LINE_LIMIT = 1 << 20    # a QMP message longer than this ends the connection (QEMU is the VM's side)


class VmState(StrEnum):
    PENDING = "pending"        # not started yet: waiting for its guest domain
    STARTING = "starting"      # QEMU started, QMP has not said "running" yet
    RUNNING = "running"
    STOPPING = "stopping"      # powering off (system_powerdown, then quit, then SIGKILL)
    BACKOFF = "backoff"        # crashed; restarted after a delay (or once its guest domain is back)
    EXITED = "exited"          # its restart policy leaves it down
    FAILED = "failed"          # flapping, or could not be started
    STOPPED = "stopped"        # powered off by the toolstack


_ALIVE = (VmState.STARTING, VmState.RUNNING, VmState.STOPPING)


class _QmpLink:
    """The supervisor's QMP connection to one QEMU: non-blocking, fed from the loop when readable."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self._serial = 0
        self._replies: dict[str, Callable[[dict[str, Any]], None]] = {}

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, command: str, _reply: Callable[[dict[str, Any]], None] | None = None, **arguments: Any) -> bool:
        """Send ``command``; ``_reply`` (if given) gets QEMU's answer to it, ``return`` or ``error``."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        if _reply is not None:
            self._serial += 1
            msg["id"] = f"xdom-{self._serial}"
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError:
            return False            # QEMU is going; its pidfd says so
        if _reply is not None:
            self._replies[msg["id"]] = _reply
        return True

    def reply_to(self, msg: dict[str, Any]) -> Callable[[dict[str, Any]], None] | None:
        """The callback waiting for ``msg`` (an answer to a command sent with one), taken out."""
        rid = msg.get("id")
        return self._replies.pop(rid, None) if isinstance(rid, str) else None

    def read(self) -> list[dict[str, Any]] | None:
        """The messages that arrived; None at EOF (or when QEMU floods the connection)."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return []
        except OSError:
            return None
        if not data:
            return None
        self._buf += data
        out = []
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict):
                out.append(msg)
        if len(self._buf) > QMP_LINE_LIMIT:
            return None
        return out

    def close(self) -> None:
        self.sock.close()


def _peer_pid(sock: socket.socket) -> int:
    pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    return int(pid)


# ---- the VMs of a host -----------------------------------------------------------------------------

class PlugState(StrEnum):
    WAITING = "waiting"          # for the guest domain to serve the device's socket
    ADDING = "adding"            # QMP commands under way (chardev-add, netdev_add, device_add)
    PRESENT = "present"          # in the VM
    REMOVING = "removing"        # device_del sent; the VM's kernel lets go, then QEMU says DEVICE_DELETED
    FAILED = "failed"


@dataclass(eq=False)
class _Plug:
    """A device being hot-added to or removed from a running VM (or whose last such step failed)."""

    kind: str                        # "blk" or "net"
    dev_id: str                      # QEMU's id: the disk's (xvdb), the NIC's netdev (vif1)
    socket: str
    bus: str                         # its PCIe root port
    state: PlugState
    commands: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    poll_at: float | None = None     # WAITING: the next look for the socket
    give_up: float = 0.0             # WAITING: then it failed
    error: str = ""
    done: Callable[[], None] | None = None     # REMOVING: the toolstack's teardown, once the VM let go

    def row(self) -> dict[str, Any]:
        return {"state": str(self.state), "error": self.error or None, "bus": self.bus}


@dataclass(eq=False)
class _Vm:
    guest: Any                       # the supervisor's _Domain of the guest
    plan: VmPlan
    tracker: RestartTracker
    health: HealthCheck
    paths: VmPaths
    state: VmState = VmState.PENDING
    proc: subprocess.Popen[bytes] | AdoptedProcess | None = None     # AdoptedProcess: another supervisor's QEMU
    pidfd: int = -1
    qmp: _QmpLink | None = None
    status: str = ""                 # what QMP's query-status said last
    generation: int = 0
    started_once: bool = False
    started_mono: float = 0.0
    ready_by: float | None = None
    deadline: float | None = None    # the next thing to do: try QMP again, escalate a stop, restart
    stage: str = ""                  # of a stop: "powerdown", "quit", "kill"
    then: str = ""                   # after a stop: "restart" (start again with the guest domain), "" (stay down)
    resume: Callable[[], None] | None = None
    kill_reason: str = ""
    last_exit: str = ""
    changes: int = 0
    sample: HealthSample | None = None
    ps_cache: dict[int, psutil.Process] = field(default_factory=dict)
    plugs: dict[str, _Plug] = field(default_factory=dict)         # by QEMU id: hot-plug steps of this QEMU
    free_ports: list[str] = field(default_factory=list)           # empty root ports of this QEMU
    ident: dict[str, int] | None = None       # QEMU by pid and start time, as the state file names it

    @property
    def name(self) -> str:
        return str(self.guest.name)

    @property
    def config(self) -> VmConfig:
        vm = self.guest.spec.vm
        assert vm is not None
        return vm

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.pidfd >= 0 else None
