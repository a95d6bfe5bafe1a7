"""Which of this domain's frames are free: the guest's page allocator for rings and I/O buffers.

Frontends grant frames to backends; a frame must belong to one user at a
time, or one device's DMA would land in another's ring.  The xenstore ring
frame (HVM_PARAM_STORE_PFN) is never handed out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from .abi.hvm_params import HVM_PARAM_STORE_PFN


class OutOfFrames(Exception):
    """No free frames left (the topology's ``memory`` is too small for the devices)."""


class FramePool:
    def __init__(self, nr_frames: int, reserved: Iterable[int] = (),
                 populate: Callable[[Iterable[int]], None] | None = None) -> None:
        """``populate(gfns)``: make sure these frames exist before they are handed out (a domain's
        memory is populated on demand: ``DomainMemory.ensure``)."""
        self.nr_frames = nr_frames
        self._populate = populate
        self._reserved = set(reserved)
        self._free = [g for g in range(nr_frames - 1, -1, -1) if g not in self._reserved]
        self._lock = threading.Lock()

    @classmethod
    def of(cls, host: object) -> FramePool:
        """The one pool of ``host``'s domain (created on first use)."""
        pool = getattr(host, "_xdom_frame_pool", None)
        if pool is None:
            reserved = set()
            try:
                reserved.add(host.get_param(HVM_PARAM_STORE_PFN))     # type: ignore[attr-defined]
            except Exception:
                pass          # no xenstore ring (an in-process domain)
            memory = host.memory                                        # type: ignore[attr-defined]
            pool = cls(memory.nr_frames, reserved, getattr(memory, "ensure", None))
            setattr(host, "_xdom_frame_pool", pool)     # noqa: B010 (host is any object: no attribute to type)
        return pool

    def available(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        with self._lock:
            if n > len(self._free):
                raise OutOfFrames(f"{n} frames wanted, {len(self._free)} free of {self.nr_frames}")
            out = [self._free.pop() for _ in range(n)]
        if self._populate is not None:
            try:
                self._populate(out)
            except BaseException as e:
                self.free(out)
                if isinstance(e, MemoryError):
                    raise OutOfFrames(f"{n} frames wanted: {e}") from None
                raise
        return out

    def free(self, gfns: Iterable[int]) -> None:
        with self._lock:
            self._free.extend(gfns)
