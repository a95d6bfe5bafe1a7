"""How the broker reaches one frame of a domain, and nothing else.

Two sources, one interface:

* ``ProcFrames`` (the real, isolated mode): the domain's frames live in its
  own process; the broker opens ``/proc/<pid>/map_files/<start>-<end>`` for
  exactly one frame (O_RDONLY for a read-only grant, so the grantee's
  ``mmap(PROT_WRITE)`` and later ``mprotect`` fail with EACCES) and copies
  through its own mappings of such descriptors (a bounded cache of them,
  ``CopyFrames``).  It keeps no per-frame descriptors.
* ``LocalFrames`` (the in-process variant): a checked memoryview slice.

**Frame identity.**  A hostile domain controls what is mapped at its frame
addresses: it can put a page it only mapped from someone else (read-only,
say) over one of its own gfns with ``MAP_FIXED``.  So the broker does not
trust addresses.  It creates every frame of every domain itself
(``FrameAllocator``, the ``populate_physmap`` hypercall), sends the memfd to
the domain to map at its gfn, and records the memfd's inode.  Every frame it
later opens through map_files is checked to be *that* inode: the granter's
own frame for that gfn, never a page the granter got from another domain.
Copies go through the broker's own mapping of such a checked descriptor
(``CopyFrames``), so what a domain maps at its addresses between the check
and the copy does not matter either.  And
unmap verification looks for the exact frame (its inode) anywhere in the
grantee's address space and fd table, allowing it only at the granter's
own address when granter and grantee share a process.

The broker's frame memfds are root's with mode 0600: a domain under any
other uid cannot reopen one through ``/proc/<pid>/fd`` (to turn a read-only
mapping's descriptor into a writable one), whoever else's uid it runs under.
"""

from __future__ import annotations

import array
import errno
import fcntl
import mmap
import os
import re
import stat
from collections import OrderedDict
from collections.abc import Sequence
from itertools import repeat
from operator import is_, itemgetter
from typing import Protocol

from xdom.domains.abi.grant_table import PAGE_SIZE
from xdom.domains.abi.hypercall_wire import MAX_BATCH
from xdom.domains.hostsys.memory import FRAME_MEMFD_NAME, DomainMemory

from .fd_budget import FRAME_FDS

FrameId = tuple[int, int]   # (st_dev, st_ino) of the frame's memfd


class BadFrame(Exception):
    """The frame is out of range or not this domain's own frame (GNTST_bad_page)."""


class NoFrameSpace(Exception):
    """The broker is out of descriptors to open the frame (GNTST_no_space): not the granter's fault."""


def _memfd_device() -> int:
    fd = os.memfd_create("xdom-probe", os.MFD_CLOEXEC)
    try:
        return os.fstat(fd).st_dev
    finally:
        os.close(fd)


MEMFD_DEV = _memfd_device()
FRAME_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class FrameAllocator:
    """Makes a domain's frames (XENMEM_populate_physmap) and remembers who they are.

    Each gfn gets one frame, made when the domain first asks for it: at
    start-up or later, in any order (Xen's populate_physmap takes any gfns
    not populated yet), so a domain pays for the memory it uses, not for
    all it may use.  A frame is a 4 KiB memfd of root's, mode 0600, sealed
    against shrinking and growing: whoever holds a descriptor of a frame
    (its domain, a grantee with a writable mapping) cannot truncate it
    under another mapper, who would take SIGBUS.  The broker hands each fd
    out once and closes its copy; what it keeps is the inode, 8 bytes a
    frame (0: not populated), in the array its ``ProcFrames`` shares.
    """

    def __init__(self, nr_frames: int, inodes: array.array[int] | None = None) -> None:
        self.nr_frames = nr_frames
        self.inodes = inodes if inodes is not None else array.array("Q", bytes(8 * nr_frames))
        self.populated = len(self.inodes) - self.inodes.count(0)

    def populate(self, start: int, count: int) -> list[int]:
        """The fds of new frames for gfns ``start .. start+count-1``, none of which may have one yet."""
        if start < 0 or not 0 < count <= self.nr_frames - start:
            raise ValueError(f"{count} frames from gfn {start} do not fit in {self.nr_frames}")
        if self.inodes[start:start + count].count(0) != count:
            raise ValueError(f"gfns {start}..{start + count - 1}: some have their frame already")
        return self.remake(start, count)

    def remake(self, start: int, count: int) -> list[int]:
        """New frames for gfns ``start .. start+count-1``, whatever they had (a populate whose reply
        was lost with the broker that made it: those frames reached no one)."""
        fds: list[int] = []
        made = []
        try:
            for _ in range(count):
                fd, ino = make_frame()
                fds.append(fd)
                made.append(ino)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        before = self.inodes[start:start + count].count(0)
        self.inodes[start:start + count] = array.array("Q", made)
        self.populated += before
        return fds


def make_frame() -> tuple[int, int]:
    """A new frame: (its memfd, its inode)."""
    fd = os.memfd_create(FRAME_MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, PAGE_SIZE)
        os.fchmod(fd, 0o600)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, FRAME_SEALS)
        return fd, os.fstat(fd).st_ino
    except BaseException:
        os.close(fd)
        raise


class FrameSource(Protocol):
    nr_frames: int

    def open_frame(self, gfn: int, readonly: bool) -> tuple[object, FrameId]: ...
    def frame_id(self, gfn: int) -> FrameId: ...
    def expose(self, gfn: int) -> None: ...
    def replace(self, gfns: Sequence[int], busy: set[int]) -> tuple[list[int], list[int]]: ...
    def address(self, gfn: int) -> tuple[int, int]: ...
    def still_mapped(self, ids: set[FrameId], allowed: set[tuple[FrameId, int]] = ...) -> set[FrameId]: ...
    def close_frame(self, frame: object) -> None: ...


class ProcFrames:
    """Frames of a domain process, reached through procfs and checked by inode."""

    def __init__(self, pid: int, base: int, inodes: array.array[int]) -> None:
        self.pid = pid
        self.base = base
        self.inodes = inodes
        self.nr_frames = len(inodes)
        self.exposed = bytearray(self.nr_frames)    # mapped by a grantee since it was made

    def expose(self, gfn: int) -> None:
        """A grantee was given frame ``gfn``: from now on it may keep it out of sight."""
        self.exposed[gfn] = 1

    def replace(self, gfns: Sequence[int], busy: set[int]) -> tuple[list[int], list[int]]:
        """New frames for the exposed ``gfns`` (not those in ``busy``, still mapped
        through another grant): returns (gfns replaced, their fds).

        Only a frame some grantee was given is replaced, once per exposure:
        a domain cannot make the broker mint memory at will.  From now on
        only the new frame passes for the gfn.
        """
        done: list[int] = []
        fds: list[int] = []
        try:
            for gfn in gfns:
                if not 0 <= gfn < self.nr_frames:
                    raise BadFrame(f"gfn {gfn} outside 0..{self.nr_frames - 1}")
                if not self.exposed[gfn] or gfn in busy or gfn in done:     # (exposed: populated too)
                    continue
                fd, ino = make_frame()
                fds.append(fd)
                done.append(gfn)
                self.inodes[gfn] = ino
                self.exposed[gfn] = 0
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return done, fds

    def _addr(self, gfn: int) -> int:
        if not 0 <= gfn < self.nr_frames:
            raise BadFrame(f"gfn {gfn} outside 0..{self.nr_frames - 1}")
        if not self.inodes[gfn]:
            raise BadFrame(f"gfn {gfn} is not populated")
        return self.base + gfn * PAGE_SIZE

    def frame_id(self, gfn: int) -> FrameId:
        self._addr(gfn)
        return MEMFD_DEV, self.inodes[gfn]

    def address(self, gfn: int) -> tuple[int, int]:
        """(pid, address) where this domain keeps frame ``gfn`` (if it has not moved it)."""
        return self.pid, self._addr(gfn)

    def open_frame(self, gfn: int, readonly: bool) -> tuple[int, FrameId]:
        """An fd for exactly this domain's frame ``gfn``; the caller sends or uses it, then closes it.

        Whatever the domain has mapped at the gfn's address, the fd is
        accepted only if it is the memfd the broker made for that gfn.
        """
        start = self._addr(gfn)
        path = f"/proc/{self.pid}/map_files/{start:x}-{start + PAGE_SIZE:x}"
        try:
            fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BadFrame(f"gfn {gfn} is not mapped as one frame") from None
        except PermissionError as e:
            raise BadFrame(f"gfn {gfn}: {e.strerror} (the broker needs root or CAP_CHECKPOINT_RESTORE)") from None
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise NoFrameSpace(f"gfn {gfn}: {e.strerror}") from None
            raise BadFrame(f"gfn {gfn}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if st.st_ino != self.inodes[gfn] or st.st_dev != MEMFD_DEV or not stat.S_ISREG(st.st_mode):
                raise BadFrame(f"gfn {gfn} is not this domain's own frame")
        except BaseException:
            os.close(fd)
            raise
        return fd, (st.st_dev, st.st_ino)

    def close_frame(self, frame: object) -> None:
        assert isinstance(frame, int)
        os.close(frame)

    def still_mapped(self, ids: set[FrameId], allowed: set[tuple[FrameId, int]] = set()) -> set[FrameId]:  # noqa: B006
        """Which of ``ids`` this process still maps (anywhere) or holds an fd of.

        The broker cannot unmap inside a grantee; it checks the grantee's
        claim before it clears GTF_reading/GTF_writing, so a grantee that
        says "unmapped" while keeping the page -- at a fresh address or over
        one of its own gfns -- cannot let the granter reuse it under its
        feet.  The one mapping not counted is a frame at its own granter's
        address, ``(frame id, address)`` in ``allowed``, for when granter and
        grantee are domains of one (test) process.
        """
        if not ids:
            return set()
        try:
            with open(f"/proc/{self.pid}/maps", "rb") as f:
                maps = f.read()
        except OSError:
            return set()  # the process is gone: nothing is mapped
        left = {fid for fid, places in mappings_of(maps, ids).items()
                if any((fid, start) not in allowed or end - start != PAGE_SIZE for start, end in places)}
        remaining = ids - left
        if remaining:
            left |= self._held_fds(remaining)
        return left

    def _held_fds(self, ids: set[FrameId]) -> set[FrameId]:
        held: set[FrameId] = set()
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


# A /proc/PID/maps line's address range, device and inode (the kernel prints "%02x:%02x %lu"; a path
# after them cannot start a line: seq_file_path escapes its newlines).
_MAPS_LINE = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ ([0-9a-f]+:[0-9a-f]+) (\d+)", re.MULTILINE)
_FIND_EACH = 16     # up to this many frames, a bytes.find each beats parsing every line (one parse: ~20 finds)


def mappings_of(maps: bytes, ids: set[FrameId]) -> dict[FrameId, list[tuple[int, int]]]:
    """Every (start, end) at which a /proc/PID/maps text maps each of ``ids`` (absent: nowhere).

    A grantee that unmaps a backend's worth of grants at once (a guest
    gone: hundreds) is checked in one pass over its maps, not one pass per
    frame: netback serving 100 guests holds some 60,000 mappings, and a
    pass per frame made ``xdom down`` of those guests take 39 s of broker CPU.
    """
    found: dict[FrameId, list[tuple[int, int]]] = {}
    if len(ids) <= _FIND_EACH:
        for dev, ino in ids:
            key = b" %02x:%02x %d " % (os.major(dev), os.minor(dev), ino)
            pos = maps.find(key)
            while pos >= 0:
                line = maps.rfind(b"\n", 0, pos) + 1
                m = _MAPS_LINE.match(maps, line)
                if m is not None and m.end() == pos + len(key) - 1:
                    found.setdefault((dev, ino), []).append((int(m[1], 16), int(m[2], 16)))
                pos = maps.find(key, pos + 1)
        return found
    wanted = {(b"%02x:%02x" % (os.major(dev), os.minor(dev)), b"%d" % ino): (dev, ino) for dev, ino in ids}
    if not _may_map(maps, wanted):
        return found
    for start, end, dev_text, ino_text in _MAPS_LINE.findall(maps):
        fid = wanted.get((dev_text, ino_text))
        if fid is not None:
            found.setdefault(fid, []).append((int(start, 16), int(end, 16)))
    return found


def _may_map(maps: bytes, wanted: dict[tuple[bytes, bytes], FrameId]) -> bool:
    """Whether any of ``wanted`` appears in ``maps`` at all: a quick scan for the usual answer, no.

    An honest grantee has unmapped what it says it unmapped, so the frames
    are nowhere in its map; finding " dev inode " texts (a fast literal
    search per device) is several times cheaper than parsing every line.
    A yes (a real mapping, or a path that merely spells one) sends the
    caller to the exact parse.
    """
    by_dev: dict[bytes, set[bytes]] = {}
    for dev_text, ino_text in wanted:
        by_dev.setdefault(dev_text, set()).add(ino_text)
    for dev_text, inos in by_dev.items():
        present = re.findall(rb" " + re.escape(dev_text) + rb" (\d+) ", maps)
        if not inos.isdisjoint(present):
            return True
    return False


class LocalFrames:
    """Frames of a domain that lives in the broker's own process (the in-process variant)."""

    def __init__(self, memory: DomainMemory) -> None:
        self.memory = memory
        self.nr_frames = memory.nr_frames

    def _frame(self, gfn: int) -> memoryview:
        if not 0 <= gfn < self.nr_frames:
            raise BadFrame(f"gfn {gfn} outside 0..{self.nr_frames - 1}")
        return self.memory.frame(gfn)

    def frame_id(self, gfn: int) -> FrameId:
        self._frame(gfn)
        return id(self.memory), gfn

    def expose(self, gfn: int) -> None:
        pass    # the in-process variant does not isolate: nothing to revoke later

    def replace(self, gfns: Sequence[int], busy: set[int]) -> tuple[list[int], list[int]]:
        return [], []   # the in-process variant does not isolate; nothing to revoke

    def address(self, gfn: int) -> tuple[int, int]:
        self._frame(gfn)
        return os.getpid(), self.memory.base + gfn * PAGE_SIZE

    def view(self, gfn: int) -> memoryview:
        """Frame ``gfn`` to copy into or out of, there and then (not to keep)."""
        return self._frame(gfn)

    def open_frame(self, gfn: int, readonly: bool) -> tuple[memoryview, FrameId]:
        view = self._frame(gfn)
        return (view.toreadonly() if readonly else view), (id(self.memory), gfn)

    def close_frame(self, frame: object) -> None:
        assert isinstance(frame, memoryview)
        frame.release()

    def still_mapped(self, ids: set[FrameId], allowed: set[tuple[FrameId, int]] = set()) -> set[FrameId]:  # noqa: B006
        return set()  # views are released by the local xenhost on unmap


class FrameFds:
    """Descriptors of frames lately mapped, kept for the next map of the same frame.

    Reaching a frame through the granter's map_files is a procfs path walk
    and a check, about 5 us, for every ref of every map; backends map the
    same frames again and again (a ring's data pages).  So the descriptor a
    map sends is kept in a small LRU, per (frames, gfn, read-only): a
    read-only map is only ever sent an O_RDONLY descriptor.  An entry
    serves for as long as the gfn's frame is the same inode: a frame
    replaced is opened afresh, and a dead or restarted domain's descriptors
    are closed with it (:meth:`forget`).  Like :class:`CopyFrames`, the
    grant, not the granter's address space, decides: a granter that unmaps
    its own frame gets GNTST_bad_page or the frame as it was.  At least
    :data:`MAX_BATCH` entries, so no descriptor of a reply being built is
    closed before it is sent; the broker's fd budget reserves the cache's
    size (``fd_budget.RESERVE``).
    """

    def __init__(self, size: int = FRAME_FDS) -> None:
        self._cache: OrderedDict[tuple[int, int, bool], tuple[ProcFrames, int, int]] = OrderedDict()
        self._size = max(MAX_BATCH, size)

    def open(self, frames: FrameSource, gfn: int, readonly: bool) -> tuple[object, FrameId]:
        """A descriptor (or, in process, a view) of frame ``gfn``, and its identity; the cache
        owns a descriptor: send it, never close it.  Raises as ``open_frame`` does."""
        if not isinstance(frames, ProcFrames):
            return frames.open_frame(gfn, readonly)
        key = (id(frames), gfn, readonly)
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] is frames and hit[1] == frames.inodes[gfn]:
                self._cache.move_to_end(key)
                return hit[2], (MEMFD_DEV, hit[1])
            os.close(self._cache.pop(key)[2])          # the gfn's frame was replaced since
        fd, frame_id = frames.open_frame(gfn, readonly)
        self._cache[key] = (frames, frame_id[1], fd)
        while len(self._cache) > self._size:
            os.close(self._cache.popitem(last=False)[1][2])
        return fd, frame_id

    def forget(self, frames: FrameSource) -> None:
        """Close the descriptors kept for a domain that died or restarted."""
        for key in [k for k, v in self._cache.items() if v[0] is frames]:
            os.close(self._cache.pop(key)[2])

    def close(self) -> None:
        for _frames, _ino, fd in self._cache.values():
            os.close(fd)
        self._cache.clear()


NOT_KEPT = 2**64 - 1     # in _DomainKept.ino_row: no frame kept for that gfn (no inode is this)
ROWS_UP_TO = 1 << 15     # _DomainKept's rows cover gfns below this (128 MiB of a domain's memory)


class CopyFrames:
    """GNTTABOP_copy's data movement, through the frames themselves.

    Between domain processes a copy goes through the broker's own mapping of
    each frame, never through addresses in a domain: a domain that remaps
    its gfns cannot steer a copy to a page it got from someone else.  A
    frame is opened through map_files (and checked to be the frame made for
    that gfn) the first time a copy names it, mapped, and the mapping kept
    (copies come back to the same pages, a ring's data pages) for as long
    as that gfn's frame is the same inode: a frame replaced
    (``replace_frames``) is never copied to again, and a dead or restarted
    domain's mappings go with it (:meth:`forget`).  So a copy reaches the
    gfn's own frame by identity; a domain that unmaps one of its own frames
    gets GNTST_bad_page or the frame as it was, whichever is kept -- the
    grant, not the domain's address space, is what revokes.  Frames are
    sealed against shrinking, so a mapping kept here can never fault.  A
    copy is then one memmove (a slice assignment), where a
    ``copy_file_range`` per op cost a syscall and the page cache's locking;
    in-process domains (the local variant) are copied the same way through
    their memory's views.

    Mappings are kept per domain, so that a batch whose frames are all kept
    is looked up in C (:meth:`views`: a slice for a run of gfns, one
    ``itemgetter`` for scattered ones), and dropped oldest first down to
    ``cache_size`` only by :meth:`trim`, between batches: a view handed out
    for a batch is never unmapped under it.  A
    hit does not reorder (first in, first out): the cost of a frame dropped
    while still in use is one map_files open the next time.
    """

    def __init__(self, cache_size: int = 2 * MAX_BATCH) -> None:
        self._kept: dict[int, _DomainKept] = {}                  # id(frames) -> that domain's kept mappings
        self._order: OrderedDict[tuple[int, int], _Kept] = OrderedDict()     # (id(frames), gfn), oldest first
        self._cache_size = cache_size

    def views(self, frames: FrameSource | None, gfns: Sequence[int]) -> list[memoryview | None]:
        """Frame ``gfns[i]`` of ``frames`` to copy into or out of during this batch, or None for one
        that is not that domain's own frame; call :meth:`trim` when the batch is done."""
        kept: list[memoryview | None] | None = self._kept_views(frames, gfns)     # type: ignore[assignment]
        return kept or [self._view(frames, gfn) for gfn in gfns]

    def all_views(self, frames: FrameSource | None, gfns: Sequence[int]) -> list[memoryview] | None:
        """:meth:`views`, or None when any of ``gfns`` is not that domain's own frame."""
        kept = self._kept_views(frames, gfns)
        if kept:
            return kept
        views = [self._view(frames, gfn) for gfn in gfns]
        return None if any(map(is_, views, repeat(None))) else views     # type: ignore[return-value]

    def _kept_views(self, frames: FrameSource | None, gfns: Sequence[int]) -> list[memoryview] | None:
        """Every one of ``gfns`` kept and still its gfn's frame: their views, looked up in C."""
        if not isinstance(frames, ProcFrames):
            return None
        kept = self._kept.get(id(frames))
        if kept is None:
            return None
        count = len(gfns)
        if count < 2:           # (itemgetter of one gfn answers a view, not a tuple of them)
            return None
        first = gfns[0]
        if gfns[-1] - first == count - 1 and first + count <= len(kept.ino_row) \
                and tuple(gfns) == tuple(range(first, first + count)):
            return kept.run_views(first, count, frames.inodes)
        each = itemgetter(*gfns)
        try:
            # a gfn never kept raises KeyError, and out of range IndexError or OverflowError
            if each(kept.inos) != each(frames.inodes):
                return None
        except (KeyError, IndexError, OverflowError):
            return None
        return list(each(kept.views))

    def _view(self, frames: FrameSource | None, gfn: int) -> memoryview | None:
        if isinstance(frames, ProcFrames):
            kept = self._kept.get(id(frames))
            if kept is not None and gfn in kept.inos and kept.inos[gfn] == frames.inodes[gfn]:
                return kept.views[gfn]
        return self._reach(frames, gfn)

    def _reach(self, frames: FrameSource | None, gfn: int) -> memoryview | None:
        """A frame not kept, or kept but replaced since (that mapping goes): reached afresh."""
        if frames is None:
            return None
        if isinstance(frames, LocalFrames):
            try:
                return frames.view(gfn)
            except BadFrame:
                return None
        if not isinstance(frames, ProcFrames):
            raise TypeError(f"cannot copy through {type(frames).__name__}")
        key = (id(frames), gfn)
        stale = self._order.pop(key, None)     # an entry holds its frames, so the id is not reused
        if stale is not None:
            self._drop(key[0], gfn, stale)
        try:
            ino = frames.frame_id(gfn)[1]
            fd, _ = frames.open_frame(gfn, readonly=False)
        except (BadFrame, NoFrameSpace):
            return None
        assert isinstance(fd, int)
        try:
            mapping = mmap.mmap(fd, PAGE_SIZE)
        except OSError:
            return None
        finally:
            os.close(fd)
        kept = _Kept(frames, ino, mapping)
        self._order[key] = kept
        self._kept.setdefault(key[0], _DomainKept()).add(gfn, kept)
        return kept.view

    def trim(self) -> None:
        """Unmap the oldest frames kept beyond ``cache_size``; between batches only."""
        while len(self._order) > self._cache_size:
            (fid, gfn), kept = self._order.popitem(last=False)
            self._drop(fid, gfn, kept)

    def _drop(self, fid: int, gfn: int, kept: _Kept) -> None:
        by_gfn = self._kept[fid]
        by_gfn.remove(gfn)
        if not by_gfn.inos:
            del self._kept[fid]
        kept.unmap()

    def forget(self, frames: FrameSource) -> None:
        """Unmap the frames kept for a domain that died or restarted."""
        fid = id(frames)
        for gfn, kept in list(self._kept[fid].kept.items() if fid in self._kept else ()):
            del self._order[fid, gfn]
            self._drop(fid, gfn, kept)

    def close(self) -> None:
        for kept in self._order.values():
            kept.unmap()
        self._order.clear()
        self._kept.clear()


class _Kept:
    """One frame CopyFrames keeps mapped: whose, which inode it was checked to be, the mapping."""

    __slots__ = ("frames", "ino", "mapping", "view")

    def __init__(self, frames: ProcFrames, ino: int, mapping: mmap.mmap) -> None:
        self.frames, self.ino, self.mapping, self.view = frames, ino, mapping, memoryview(mapping)

    def unmap(self) -> None:
        self.view.release()
        self.mapping.close()


class _DomainKept:
    """The frames of one domain that CopyFrames keeps, by gfn: each one's inode and view side by side,
    so that a batch's frames are checked and looked up with one ``itemgetter``.

    The same, as rows indexed by gfn (``ino_row``, ``view_row``), up to the
    highest gfn kept: a batch naming a run of neighbouring gfns -- the usual
    batch -- is checked by comparing two slices of inodes (one ``memcmp``) and
    looked up by one slice (:meth:`run_views`).  A gfn not kept holds
    :data:`NOT_KEPT`, which no frame's inode is, and no view.  The rows cost
    16 bytes a frame up to the highest one kept, at most :data:`ROWS_UP_TO`
    frames (512 KiB; a frame above is found through the dicts alone), and
    go with the last frame kept; at most ``cache_size`` domains have frames
    kept, so a domain cannot make the broker hold rows for all its memory.
    """

    __slots__ = ("kept", "inos", "views", "ino_row", "view_row")

    def __init__(self) -> None:
        self.kept: dict[int, _Kept] = {}
        self.inos: dict[int, int] = {}
        self.views: dict[int, memoryview] = {}
        self.ino_row = array.array("Q")
        self.view_row: list[memoryview | None] = []

    def add(self, gfn: int, kept: _Kept) -> None:
        self.kept[gfn], self.inos[gfn], self.views[gfn] = kept, kept.ino, kept.view
        if gfn >= ROWS_UP_TO:
            return          # found through the dicts only
        if gfn >= len(self.ino_row):
            grow = gfn + 1 - len(self.ino_row)
            self.ino_row.extend(repeat(NOT_KEPT, grow))
            self.view_row.extend(repeat(None, grow))
        self.ino_row[gfn], self.view_row[gfn] = kept.ino, kept.view

    def __len__(self) -> int:
        return len(self.kept)

    def remove(self, gfn: int) -> None:
        del self.kept[gfn], self.inos[gfn], self.views[gfn]
        if gfn < len(self.ino_row):
            self.ino_row[gfn], self.view_row[gfn] = NOT_KEPT, None

    def run_views(self, first: int, count: int, inodes: array.array[int]) -> list[memoryview] | None:
        """The views of gfns ``first .. first+count-1`` when every one is kept and still its gfn's frame."""
        end = first + count
        if first < 0 or end > len(self.ino_row) or self.ino_row[first:end] != inodes[first:end]:
            return None
        return self.view_row[first:end]     # type: ignore[return-value]    # every one kept: no None
