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
from collections.abc import Callable

from ..abi.grant_table import PAGE_SIZE
from . import sysmem

FRAME_MEMFD_NAME = "xdom-frame"


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
    """

    def __init__(self, nr_frames: int, populate: Callable[[int, int], list[int]] | None = None,
                 batch: int = 128) -> None:
        """``populate(start, count)`` returns the fds of frames start..start+count-1
        (the broker's); without it the frames are made here."""
        if nr_frames <= 0:
            raise ValueError("a domain needs at least one frame")
        limit = max_map_count()
        if nr_frames > limit - 1024:
            raise MemoryError(
                f"{nr_frames} frames need {nr_frames} mappings but vm.max_map_count is {limit}: "
                f"each 4 KiB frame is its own mapping, so a domain is capped near "
                f"{(limit - 1024) * PAGE_SIZE >> 20} MiB; raise vm.max_map_count for more")
        self.nr_frames = nr_frames
        self.size = nr_frames * PAGE_SIZE
        self.base = sysmem.mmap(0, self.size, sysmem.PROT_NONE,
                                sysmem.MAP_PRIVATE | sysmem.MAP_ANONYMOUS | sysmem.MAP_NORESERVE)
        try:
            for start in range(0, nr_frames, batch):
                count = min(batch, nr_frames - start)
                fds = populate(start, count) if populate is not None else _make_frames(count)
                try:
                    if len(fds) != count:
                        raise OSError(errno.EPROTO, f"{len(fds)} frames given for {count}")
                    for i, fd in enumerate(fds):
                        sysmem.mmap(self.base + (start + i) * PAGE_SIZE, PAGE_SIZE,
                                    sysmem.PROT_READ | sysmem.PROT_WRITE,
                                    sysmem.MAP_SHARED | sysmem.MAP_FIXED, fd, 0)
                finally:
                    for fd in fds:
                        os.close(fd)
        except BaseException as e:
            sysmem.munmap(self.base, self.size)
            if isinstance(e, OSError) and e.errno == errno.ENOMEM:
                raise MemoryError(f"cannot map {nr_frames} frames (vm.max_map_count={limit}): {e}") from e
            raise
        self.buffer = sysmem.view(self.base, self.size)

    def frame(self, gfn: int) -> memoryview:
        """The 4 KiB of frame ``gfn``."""
        if not 0 <= gfn < self.nr_frames:
            raise IndexError(f"gfn {gfn} outside 0..{self.nr_frames - 1}")
        return self.buffer[gfn * PAGE_SIZE:(gfn + 1) * PAGE_SIZE]

    def frame_address(self, gfn: int) -> int:
        if not 0 <= gfn < self.nr_frames:
            raise IndexError(f"gfn {gfn} outside 0..{self.nr_frames - 1}")
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
