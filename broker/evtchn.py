"""Event channels: per-domain ports backed by eventfds.

A channel's two eventfds are created with its *unbound* port and stay with
it across rebinding: the owner of the unbound port waits on ``to_owner``
and notifies ``to_peer``; whoever binds to it waits on ``to_peer`` and
notifies ``to_owner``.  Domains write the peer's eventfd directly, so the
broker is not on the notification path, and a frontend's notify fd stays
right when its backend dies and a restarted backend binds the same port
again (only the domain the port names as remote may bind it, so the pair
is never shared with a stranger).

Closing one end turns the other back into an unbound port (Xen's
semantics); its writes then land on an eventfd nobody waits on, harmless.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from xdom.domains.abi.event_channel import (
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_unbound,
    EVTCHNSTAT_virq,
)

MAX_PORTS = 4096   # per domain; each port costs the broker one or two fds


class EventPair:
    """Two eventfds shared by both ends of a channel, closed with the last end.

    ``charged`` is whoever pays for the two descriptors (the domain that
    allocated the unbound port), until the pair closes.
    """

    def __init__(self, charged: object = None, fds: tuple[int, int] | None = None) -> None:
        """``fds``: adopt two existing eventfds (a broker taking over its predecessor's channels)."""
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
        if fds is not None:
            self.to_owner, self.to_peer = fds
        else:
            self.to_owner = os.eventfd(0, flags)
            try:
                self.to_peer = os.eventfd(0, flags)
            except BaseException:
                os.close(self.to_owner)
                raise
        self.refs = 0
        self.charged = charged
        self._ids: tuple[int, int] | None = None

    @property
    def ids(self) -> tuple[int, int]:
        """The kernel's ``eventfd-id`` of both eventfds: how a new broker finds them in the domains."""
        if self._ids is None:
            self._ids = (eventfd_id(self.to_owner), eventfd_id(self.to_peer))
        return self._ids

    def close(self) -> None:
        os.close(self.to_owner)
        os.close(self.to_peer)


@dataclass
class Port:
    port: int
    state: int
    remote_domid: int = 0
    remote_port: int = 0
    virq: int = -1
    pair: EventPair | None = None      # interdomain/unbound ports
    owner_side: bool = True            # which end of the pair this port is
    virq_fd: int = -1                  # virq ports: the one eventfd

    @property
    def wait_fd(self) -> int:
        if self.pair is None:
            return self.virq_fd
        return self.pair.to_owner if self.owner_side else self.pair.to_peer

    @property
    def notify_fd(self) -> int:
        if self.pair is None:
            return -1
        return self.pair.to_peer if self.owner_side else self.pair.to_owner


@dataclass
class PortTable:
    ports: dict[int, Port] = field(default_factory=dict)

    def allocate(self, state: int) -> Port:
        for n in range(1, MAX_PORTS):
            if n not in self.ports:
                p = self.ports[n] = Port(n, state)
                return p
        raise OverflowError("no free event channel port")

    def attach(self, port: Port, pair: EventPair, owner_side: bool) -> None:
        port.pair = pair
        port.owner_side = owner_side
        pair.refs += 1

    def release(self, port: Port) -> list[tuple[object, int]]:
        """Drop ``port`` and its hold on its fds.

        Returns (who was charged, count) for the fds closed; None for the
        port's own domain."""
        freed: list[tuple[object, int]] = []
        self.ports.pop(port.port, None)
        if port.pair is not None:
            port.pair.refs -= 1
            if port.pair.refs == 0:
                port.pair.close()
                freed.append((port.pair.charged, 2))
            port.pair = None
        if port.virq_fd >= 0:
            os.close(port.virq_fd)
            port.virq_fd = -1
            freed.append((None, 1))          # paid by the port's own domain
        return freed


def eventfd_id(fd: int, pid: int | str = "self") -> int:
    """An eventfd's ``eventfd-id`` (unique among live eventfds), from /proc/PID/fdinfo."""
    with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"eventfd-id:"):
                return int(line.split()[1])
    raise OSError(f"fd {fd} of {pid} is not an eventfd")


def new_virq_fd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def signal(fd: int) -> None:
    """Raise an event on ``fd``; a full counter already means "pending"."""
    try:
        os.eventfd_write(fd, 1)
    except (BlockingIOError, OSError):
        pass


__all__ = ["EventPair", "Port", "PortTable", "MAX_PORTS", "eventfd_id", "EVTCHNSTAT_interdomain",
           "EVTCHNSTAT_unbound", "EVTCHNSTAT_virq", "new_virq_fd", "signal"]
