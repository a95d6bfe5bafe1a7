"""How the broker reaches one frame of a domain, and nothing else.

Two sources, one interface:

* ``ProcFrames`` (the real, isolated mode): the domain's frames live in its
  own process; the broker opens ``/proc/<pid>/map_files/<start>-<end>`` for
  exactly one frame (O_RDONLY for a read-only grant, so the grantee's
  ``mmap(PROT_WRITE)`` and later ``mprotect`` fail with EACCES) and copies
  with process_vm_readv/writev, which honour the domain's own page
  protections.  It keeps no per-frame descriptors.
* ``LocalFrames`` (the in-process variant): a checked memoryview slice.

A hostile domain controls what is mapped at its frame addresses, so every
frame the broker opens is checked to be a 4 KiB memfd of the domain's own:
a domain cannot re-grant, writable, a page it only mapped from someone else.
"""

from __future__ import annotations

import ctypes
import os
import stat
from typing import Protocol, Sequence

from xdom.domains import sysmem
from xdom.domains.memory import DomainMemory
from xdom.domains.abi.grant_table import PAGE_SIZE

FrameId = tuple[int, int]   # (st_dev, st_ino) of the frame's memfd


class FrameCopier:
    """Copies between frames wherever they live: memmove within this
    process, process_vm_readv/writev between others."""

    def __init__(self) -> None:
        self._vm = sysmem.VmCopier()
        self._self = os.getpid()

    def copy(self, src: "FrameSource", sgfn: int, soff: int,
             dst: "FrameSource", dgfn: int, doff: int, length: int) -> None:
        spid, saddr = src.locate(sgfn)
        dpid, daddr = dst.locate(dgfn)
        if spid == dpid == self._self:
            ctypes.memmove(daddr + doff, saddr + soff, length)
            return
        try:
            self._vm.copy(spid, saddr + soff, dpid, daddr + doff, length)
        except OSError as e:
            raise BadFrame(f"copy: {e.strerror}") from None


    def copy_batch(self, plans: list[tuple[int, "FrameSource", int, int, "FrameSource", int, int, int]],
                   statuses: list[int]) -> None:
        """Run (index, src, sgfn, soff, dst, dgfn, doff, length) copies, setting
        ``statuses[index]`` to 0 or GNTST_bad_page.  Runs between the same two
        processes go in two syscalls; one that faults is redone piece by piece."""
        from xdom.domains.abi.grant_table import GNTST_bad_page, GNTST_okay
        located = []
        for index, src, sgfn, soff, dst, dgfn, doff, length in plans:
            try:
                spid, saddr = src.locate(sgfn)
                dpid, daddr = dst.locate(dgfn)
            except BadFrame:
                statuses[index] = GNTST_bad_page
                continue
            located.append((index, spid, saddr + soff, dpid, daddr + doff, length))
        start = 0
        while start < len(located):
            spid, dpid = located[start][1], located[start][3]
            end = start
            while end < len(located) and (located[end][1], located[end][3]) == (spid, dpid):
                end += 1
            run = located[start:end]
            if spid == dpid == self._self:
                for index, _, saddr, _, daddr, length in run:
                    ctypes.memmove(daddr, saddr, length)
                    statuses[index] = GNTST_okay
            elif self._vm.copy_many(spid, [(sa, n) for _, _, sa, _, _, n in run], dpid, [da for *_, da, _ in run]):
                for index, *_ in run:
                    statuses[index] = GNTST_okay
            else:
                for index, _, saddr, _, daddr, length in run:
                    try:
                        self._vm.copy(spid, saddr, dpid, daddr, length)
                        statuses[index] = GNTST_okay
                    except OSError:
                        statuses[index] = GNTST_bad_page
            start = end


class BadFrame(Exception):
    """The frame is out of range or not a frame of this domain (GNTST_bad_page)."""


def _memfd_device() -> int:
    fd = os.memfd_create("xdom-probe", os.MFD_CLOEXEC)
    try:
        return os.fstat(fd).st_dev
    finally:
        os.close(fd)


MEMFD_DEV = _memfd_device()


class FrameSource(Protocol):
    nr_frames: int

    def open_frame(self, gfn: int, readonly: bool) -> tuple[object, FrameId]: ...
    def locate(self, gfn: int) -> tuple[int, int]: ...
    def still_mapped(self, ids: set[FrameId], own: Sequence[tuple[int, int]] = ()) -> set[FrameId]: ...
    def region(self) -> tuple[int, int, int]: ...
    def close_frame(self, frame: object) -> None: ...


class ProcFrames:
    """Frames of a domain process, reached through procfs."""

    def __init__(self, pid: int, base: int, nr_frames: int) -> None:
        self.pid = pid
        self.base = base
        self.nr_frames = nr_frames

    def _addr(self, gfn: int) -> int:
        if not 0 <= gfn < self.nr_frames:
            raise BadFrame(f"gfn {gfn} outside 0..{self.nr_frames - 1}")
        return self.base + gfn * PAGE_SIZE

    def open_frame(self, gfn: int, readonly: bool) -> tuple[int, FrameId]:
        """An fd for exactly frame ``gfn``; the caller sends it and closes it."""
        start = self._addr(gfn)
        path = f"/proc/{self.pid}/map_files/{start:x}-{start + PAGE_SIZE:x}"
        try:
            fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BadFrame(f"gfn {gfn} is not mapped as one frame") from None
        except PermissionError as e:
            raise BadFrame(f"gfn {gfn}: {e.strerror} (the broker needs root or CAP_CHECKPOINT_RESTORE)") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != PAGE_SIZE or st.st_dev != MEMFD_DEV or st.st_nlink:
                raise BadFrame(f"gfn {gfn} is not a frame memfd")
            if st.st_mode & 0o077:
                os.fchmod(fd, 0o600)
        except BaseException:
            os.close(fd)
            raise
        return fd, (st.st_dev, st.st_ino)

    def close_frame(self, frame: object) -> None:
        assert isinstance(frame, int)
        os.close(frame)

    def locate(self, gfn: int) -> tuple[int, int]:
        """(pid, address) of frame ``gfn``, for copies by process_vm_*."""
        return self.pid, self._addr(gfn)

    def region(self) -> tuple[int, int, int]:
        """(pid, start, end) of this domain's frames."""
        return self.pid, self.base, self.base + self.nr_frames * PAGE_SIZE

    def still_mapped(self, ids: set[FrameId], own: Sequence[tuple[int, int]] = ()) -> set[FrameId]:
        """Which of ``ids`` this process still maps or holds an fd of.

        The broker cannot unmap inside a grantee; it checks the grantee's
        claim before it clears GTF_reading/GTF_writing, so a grantee that
        says "unmapped" while keeping the page cannot let the granter reuse
        it under its feet.  Mappings inside ``own`` (address ranges that are
        domains' own memory in this same process, as when several domains
        share a test process) are the granter's, not the grantee's.
        """
        if not ids:
            return set()
        try:
            with open(f"/proc/{self.pid}/maps", "rb") as f:
                maps = f.read()
        except OSError:
            return set()  # the process is gone: nothing is mapped
        left = set()
        for dev, ino in ids:
            key = b" %02x:%02x %d " % (os.major(dev), os.minor(dev), ino)
            pos = maps.find(key)
            while pos >= 0:
                line = maps.rfind(b"\n", 0, pos) + 1
                start = int(maps[line:maps.index(b"-", line)], 16)
                if not any(lo <= start < hi for lo, hi in own):
                    left.add((dev, ino))
                    break
                pos = maps.find(key, pos + 1)
        remaining = ids - left
        if remaining:
            left |= self._held_fds(remaining)
        return left

    def _held_fds(self, ids: set[FrameId]) -> set[FrameId]:
        held = set()
        fddir = f"/proc/{self.pid}/fd"
        try:
            names = os.listdir(fddir)
        except OSError:
            return held
        for name in names:
            try:
                if not os.readlink(f"{fddir}/{name}").startswith("/memfd:"):
                    continue
                st = os.stat(f"{fddir}/{name}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in ids:
                held.add((st.st_dev, st.st_ino))
        return held


class LocalFrames:
    """Frames of a domain that lives in the broker's own process."""

    def __init__(self, memory: DomainMemory) -> None:
        self.memory = memory
        self.nr_frames = memory.nr_frames

    def _frame(self, gfn: int) -> memoryview:
        if not 0 <= gfn < self.nr_frames:
            raise BadFrame(f"gfn {gfn} outside 0..{self.nr_frames - 1}")
        return self.memory.frame(gfn)

    def open_frame(self, gfn: int, readonly: bool) -> tuple[memoryview, FrameId]:
        view = self._frame(gfn)
        return (view.toreadonly() if readonly else view), (id(self.memory), gfn)

    def close_frame(self, frame: object) -> None:
        assert isinstance(frame, memoryview)
        frame.release()

    def locate(self, gfn: int) -> tuple[int, int]:
        self._frame(gfn)
        return os.getpid(), self.memory.base + gfn * PAGE_SIZE

    def region(self) -> tuple[int, int, int]:
        return os.getpid(), self.memory.base, self.memory.base + self.memory.size

    def still_mapped(self, ids: set[FrameId], own: Sequence[tuple[int, int]] = ()) -> set[FrameId]:
        return set()  # views are released by the local xenhost on unmap


