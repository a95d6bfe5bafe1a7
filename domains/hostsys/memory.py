"""A domain's memory: 4 KiB frames, each its own memfd, seen as one buffer.

Each frame is a separate memfd mapped MAP_SHARED|MAP_FIXED into one reserved
region, and its fd is closed at once.  The domain gets a contiguous buffer
(gfn -> offset gfn*4096) and holds no per-frame descriptors; the broker can
reach exactly one frame, and nothing else, through
``/proc/<pid>/map_files/<start>-<end>`` because every frame is its own VMA.

Under a broker the frames are the broker's (``populate``: the
populate_physmap hypercall hands them over in batches), so that the broker
knows each frame's identity and never takes a domain's word, or its
address space, for which page is its own.  The in-process variant makes
its own.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterable

from ..abi.grant_table import PAGE_SIZE
from ..abi.hypercall_wire import HypercallError
from . import sysmem

FRAME_MEMFD_NAME = "xdom-frame"
# Frames asked for per populate_physmap: each arrives as a descriptor, so a
# batch needs that many free fds for a moment (domains may run under an
# RLIMIT_NOFILE of 64); a chunk of memory is populated by one call.
POPULATE_BATCH = 32
START_FRAMES = 2 * POPULATE_BATCH       # populated at start under a broker: the first and last chunks


def max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except OSError:
        return 65530


class DomainMemory:
    """``nr_frames`` frames of guest memory in this process.

    Frames are chmod 0600 so that a grantee running under another uid cannot
    reopen a read-only mapping's fd for writing through /proc/self/fd.

    Under a broker the memory is populated on demand, a chunk of ``batch``
    frames at a time (:meth:`ensure`): the region is reserved whole (one
    PROT_NONE mapping) and a chunk's frames are asked for the first time one
    of its gfns is used (the first and last chunks at once: the last holds
    the xenstore ring), so a guest of 32 MiB that uses a few costs the
    broker, and the kernel, a few.  Whoever hands out gfns (the frame pool)
    or reaches a frame (:meth:`frame`) populates it first; the rest of the
    region is never touched.
    """

    def __init__(self, nr_frames: int, populate: Callable[[int, int], list[int]] | None = None,
                 batch: int = 128) -> None:
        """``populate(start, count)`` returns the fds of frames start..start+count-1
        (the broker's: populated on demand, starting with the first chunk); without it
        the frames are made here, all at once."""
        if nr_frames <= 0:
            raise ValueError("a domain needs at least one frame")
        self._limit = max_map_count() - 1024
        if nr_frames > self._limit:
            raise MemoryError(
                f"{nr_frames} frames need {nr_frames} mappings but vm.max_map_count is {self._limit + 1024}: "
                f"each 4 KiB frame is its own mapping, so a domain is capped near "
                f"{self._limit * PAGE_SIZE >> 20} MiB; raise vm.max_map_count for more")
        self.nr_frames = nr_frames
        self.size = nr_frames * PAGE_SIZE
        self._populate = populate or (lambda _start, count: _make_frames(count))
        self._batch = batch
        self._chunks = bytearray(-(-nr_frames // batch))     # 1: that chunk's frames are mapped
        self._lock = threading.Lock()
        self.base = sysmem.mmap(0, self.size, sysmem.PROT_NONE,
                                sysmem.MAP_PRIVATE | sysmem.MAP_ANONYMOUS | sysmem.MAP_NORESERVE)
        try:
            # Under a broker: the first chunk, and the last, where the toolstack puts the xenstore ring
            # (special pages sit at the top of RAM, and Xen's domain builder populates them too).
            self._populate_chunks(range(len(self._chunks)) if populate is None else sorted({0, len(self._chunks) - 1}))
        except BaseException:
            sysmem.munmap(self.base, self.size)
            raise
        self.buffer = sysmem.view(self.base, self.size)

    @property
    def populated(self) -> int:
        """Frames mapped so far."""
        whole = self._chunks.count(1) * self._batch
        return whole - (self._batch * len(self._chunks) - self.nr_frames if self._chunks[-1] else 0)

    def ensure(self, gfns: Iterable[int]) -> None:
        """Populate every chunk holding one of ``gfns`` that is not yet (MemoryError if the broker or
        the kernel has no more to give)."""
        batch, chunks = self._batch, self._chunks
        wanted = {g // batch for g in gfns if 0 <= g < self.nr_frames}
        if any(not chunks[c] for c in wanted):
            with self._lock:
                self._populate_chunks(sorted(c for c in wanted if not chunks[c]))

    def _populate_chunks(self, chunks: Iterable[int]) -> None:
        for chunk in chunks:
            start = chunk * self._batch
            count = min(self._batch, self.nr_frames - start)
            try:
                fds = self._populate(start, count)
            except (OSError, HypercallError) as e:
                if e.errno == errno.ENOMEM:
                    raise MemoryError(f"cannot populate frames {start}..{start + count - 1}: {e}") from e
                raise
            try:
                if len(fds) != count:
                    raise OSError(errno.EPROTO, f"{len(fds)} frames given for {count}")
                for i, fd in enumerate(fds):
                    sysmem.mmap(self.base + (start + i) * PAGE_SIZE, PAGE_SIZE,
                                sysmem.PROT_READ | sysmem.PROT_WRITE,
                                sysmem.MAP_SHARED | sysmem.MAP_FIXED, fd, 0)
            except OSError as e:
                if e.errno == errno.ENOMEM:
                    raise MemoryError(f"cannot map frames (vm.max_map_count={self._limit + 1024}): {e}") from e
                raise
            finally:
                for fd in fds:
                    os.close(fd)
            self._chunks[chunk] = 1

    def frame(self, gfn: int) -> memoryview:
        """The 4 KiB of frame ``gfn`` (populated first if need be)."""
        if not 0 <= gfn < self.nr_frames:
            raise IndexError(f"gfn {gfn} outside 0..{self.nr_frames - 1}")
        if not self._chunks[gfn // self._batch]:
            self.ensure([gfn])
        return self.buffer[gfn * PAGE_SIZE:(gfn + 1) * PAGE_SIZE]

    def frame_address(self, gfn: int) -> int:
        if not 0 <= gfn < self.nr_frames:
            raise IndexError(f"gfn {gfn} outside 0..{self.nr_frames - 1}")
        if not self._chunks[gfn // self._batch]:
            self.ensure([gfn])
        return self.base + gfn * PAGE_SIZE

    def close(self) -> None:
        """Unmap all frames; every view handed out must be gone by now."""
        if self.base:
            try:
                self.buffer.release()
            except BufferError:
                return        # someone still exports the buffer: keep the pages rather than fault
            sysmem.munmap(self.base, self.size)
            self.base = 0


def _make_frames(count: int) -> list[int]:
    fds: list[int] = []
    try:
        for _ in range(count):
            fd = os.memfd_create(FRAME_MEMFD_NAME, os.MFD_CLOEXEC)
            fds.append(fd)
            os.ftruncate(fd, PAGE_SIZE)
            os.fchmod(fd, 0o600)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds
