"""netback's built-in learning switch: vifs talk to each other without a bridge or any privilege.

Each vif is a port.  A frame's source MAC teaches the switch which port it
lives behind; a frame to a known unicast MAC goes to that port only, any
other (broadcast, multicast, unknown) to every port but the one it came
from.  Each port's queue is bounded: a guest that does not post receive
buffers loses its own frames, never slows the others.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from xdom.domains.packet import flow_hash

from .offload import Frame

PORT_QUEUE = 512          # frames a port holds for its guest before it drops


class Port:
    """One vif's side of the switch (or its TAP's): frames waiting for the guest, a queue per ring.

    A vif with several queues (multi-queue) gets each flow on one of them,
    by :func:`~xdom.domains.packet.flow_hash`, so a flow is never
    reordered.  ``on_put(q)`` is called after a frame is queued on queue
    ``q``: the netback loop sets it to mark that queue's connection as
    having work (it runs on the loop thread, where frames are delivered).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.queues: list[collections.deque[Frame]] = [collections.deque()]
        self.lock = threading.Lock()
        self.on_put: Callable[[int], None] | None = None
        self.dropped = 0
        self.received = 0

    @property
    def queue(self) -> collections.deque[Frame]:
        """The first (for a single-queue vif: the only) queue."""
        return self.queues[0]

    def set_queues(self, n: int) -> None:
        """``n`` queues from now on; frames waiting are dropped (the rings they were for are gone)."""
        with self.lock:
            self.queues = [collections.deque() for _ in range(max(1, n))]

    def put(self, frame: Frame) -> None:
        with self.lock:
            queues = self.queues
            q = 0 if len(queues) == 1 else flow_hash(frame.data) % len(queues)
            if len(queues[q]) >= PORT_QUEUE:
                self.dropped += 1
                return
            queues[q].append(frame)
            self.received += 1
        on_put = self.on_put
        if on_put is not None:
            on_put(q)

    def take(self, q: int = 0) -> Frame | None:
        with self.lock:
            queues = self.queues
            if q >= len(queues) or not queues[q]:
                return None
            return queues[q].popleft()

    def close(self) -> None:
        self.on_put = None
        with self.lock:
            for queue in self.queues:
                queue.clear()


class LearningSwitch:
    def __init__(self) -> None:
        self._ports: list[Port] = []
        self._macs: dict[bytes, Port] = {}
        self._lock = threading.Lock()

    def attach(self, port: Port) -> None:
        with self._lock:
            self._ports.append(port)

    def detach(self, port: Port) -> None:
        with self._lock:
            self._ports = [p for p in self._ports if p is not port]
            self._macs = {m: p for m, p in self._macs.items() if p is not port}

    def deliver(self, src: Port, frame: Frame) -> None:
        """Forward by destination MAC; the frame keeps its offload state (receivers finish it, see offload)."""
        data = frame.data
        if len(data) < 14:
            return
        dst, mac = data[0:6], data[6:12]
        with self._lock:
            if not mac[0] & 1:                     # a multicast source address is bogus: do not learn it
                self._macs[mac] = src
            target = self._macs.get(dst) if not dst[0] & 1 else None
            ports = [target] if target is not None else [p for p in self._ports if p is not src]
        for p in ports:
            if p is not src:
                p.put(frame)


class SwitchUplink:
    """A vif on the learning switch: what its guest sends is switched, what comes for it waits in ``port``."""

    def __init__(self, switch: LearningSwitch, port: Port) -> None:
        self.switch, self.port = switch, port

    def send(self, frame: Frame) -> None:
        self.switch.deliver(self.port, frame)

    def fileno(self) -> int | None:
        return None                     # frames arrive by deliver(), on the loop thread

    def receive(self, budget: int) -> bool:
        return False

    def set_carrier(self, up: bool) -> None:
        pass

    def close(self) -> None:
        self.port.close()
