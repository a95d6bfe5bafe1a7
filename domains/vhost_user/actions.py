"""What the sans-IO vhost-user core asks of its I/O shell: the actions.

``VhostUserBackend.next_action()`` returns one of these at a time; the shell
(``server``) carries each out before asking for the next.  Descriptors
travel inside them: every fd that arrived from the front end leaves the core
in exactly one action (``MapRegion``, ``SetQueueFd``, ``MapInflight``,
``CloseFds``), and from then on it is the shell's to keep or close.  Three
actions are completed by a call back into the core (``MapRegion`` by
``region_mapped``, ``AllocateInflight`` by ``inflight_allocated``,
``MapInflight`` by ``inflight_mapped``); a shell that cannot complete one
simply does not call back, and the core answers the front end with a
failure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .memory import MemoryRegion
from .virtqueue import SplitVirtqueue

__all__ = [
    "FdKind", "SendReply", "CloseFds", "MapRegion", "UnmapRegion", "SetQueueFd", "StartQueue", "StopQueue",
    "QueueEnabled", "AllocateInflight", "MapInflight", "UnmapInflight", "FeaturesAcked", "Refused", "Closed",
    "Action",
]


class FdKind(enum.Enum):
    KICK = "kick"
    CALL = "call"
    ERR = "err"


@dataclass(frozen=True, slots=True, kw_only=True)
class SendReply:
    """Write ``data`` to the front end, with ``fds`` as SCM_RIGHTS.  The fds are
    only lent: they stay the shell's (the inflight memfd, which it keeps)."""
    data: bytes
    fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseFds:
    """Descriptors the core does not keep: close them."""
    fds: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class MapRegion:
    """mmap ``region.mapping_length`` bytes of ``fd`` from offset 0, shared read/write,
    close ``fd`` (mapped or not), and on success call ``region_mapped(slot, view)``."""
    slot: int
    region: MemoryRegion
    fd: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UnmapRegion:
    """The core dropped its view of this slot: unmap it."""
    slot: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SetQueueFd:
    """Install ``fd`` as ring ``index``'s kick/call/err eventfd (None: no fd, i.e.
    poll the ring / do not signal), closing the one it replaces."""
    index: int
    kind: FdKind
    fd: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StartQueue:
    """Start processing ring ``index`` through ``queue`` (process it once right away:
    kicks sent before the start are lost)."""
    index: int
    queue: SplitVirtqueue
    enabled: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class StopQueue:
    """Stop processing ring ``index`` and forget its queue object (finish or abandon
    in-flight chains first: the reply that follows reports ``last_avail_idx``)."""
    index: int


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueEnabled:
    index: int
    enabled: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class AllocateInflight:
    """Create a zeroed shared memfd of ``size`` bytes, map it, and call
    ``inflight_allocated(fd, view)``; keep the fd until ``UnmapInflight``."""
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MapInflight:
    """mmap ``size`` bytes of ``fd`` at ``offset`` shared read/write and call
    ``inflight_mapped(view)``; keep (or close) the fd until ``UnmapInflight``."""
    fd: int
    size: int
    offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UnmapInflight:
    """Drop the inflight area's mapping and its fd."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FeaturesAcked:
    """The front end acknowledged these virtio features (the device may need to know)."""
    features: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """Informational: a request was refused (and answered, or the connection fails next)."""
    request: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Closed:
    """The connection is over (``error``: because of a protocol error); every resource
    was released by the actions before this one.  Close the socket."""
    reason: str
    error: bool


Action = (SendReply | CloseFds | MapRegion | UnmapRegion | SetQueueFd | StartQueue | StopQueue | QueueEnabled
          | AllocateInflight | MapInflight | UnmapInflight | FeaturesAcked | Refused | Closed)
