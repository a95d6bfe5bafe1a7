"""The broker's scan of a grantee's /proc/PID/maps: one pass for many frames, a find each for a few,
the same answer either way, and a path cannot make a frame look unmapped (or mapped)."""

from __future__ import annotations

import mmap
import os
import random

import pytest

from xdom.broker.frames import MEMFD_DEV, mappings_of


def _line(start: int, end: int, dev: int, ino: int, path: bytes = b"/memfd:frame (deleted)") -> bytes:
    return b"%x-%x rw-s 00000000 %02x:%02x %d                    %s" % (
        start, end, os.major(dev), os.minor(dev), ino, path)


@pytest.mark.parametrize("count", [1, 5, 16, 17, 200])
def test_one_pass_and_a_find_each_agree_with_the_lines(count: int) -> None:
    rng = random.Random(count)
    truth: dict[tuple[int, int], list[tuple[int, int]]] = {}
    lines = []
    for i in range(3000):
        start = 0x7F0000000000 + i * 0x2000
        ino = 5000 + rng.randrange(1500)                 # some frames mapped more than once
        lines.append(_line(start, start + 0x1000, MEMFD_DEV, ino))
        truth.setdefault((MEMFD_DEV, ino), []).append((start, start + 0x1000))
    other_dev = os.makedev(8, 1)
    lines.append(_line(0x1000, 0x2000, other_dev, 5001))                 # same inode, another device
    # A path that spells another frame's device and inode: not a mapping of it.
    lines.append(_line(0x3000, 0x4000, 0, 0, b"/tmp/x %02x:%02x 4999 y" % (os.major(MEMFD_DEV), os.minor(MEMFD_DEV))))
    maps = b"\n".join(lines) + b"\n"
    ids = set(rng.sample(sorted(truth), count - 1)) | {(MEMFD_DEV, 4999)}   # 4999: in no line's inode field
    found = mappings_of(maps, ids)
    assert {k: sorted(v) for k, v in found.items()} == {k: sorted(truth[k]) for k in ids if k in truth}


def test_a_real_maps_file_shows_a_frame_where_it_is_mapped() -> None:
    fd = os.memfd_create("frame")
    try:
        os.ftruncate(fd, mmap.PAGESIZE)
        ino = os.fstat(fd).st_ino
        views = [mmap.mmap(fd, mmap.PAGESIZE) for _ in range(2)]
        with open("/proc/self/maps", "rb") as f:
            places = mappings_of(f.read(), {(MEMFD_DEV, ino)})[(MEMFD_DEV, ino)]
        assert len(places) == 2 and all(end - start == mmap.PAGESIZE for start, end in places)
        for v in views:
            v.close()
        with open("/proc/self/maps", "rb") as f:
            assert mappings_of(f.read(), {(MEMFD_DEV, ino)}) == {}
    finally:
        os.close(fd)


@pytest.mark.parametrize("spelled", [False, True])
def test_many_frames_none_mapped(spelled: bool) -> None:
    """The usual unmap: none of the frames is mapped any more (a quick scan says so); a path that
    spells one of them sends the scan to the exact parse, which finds no mapping either."""
    lines = [_line(0x7F0000000000 + i * 0x2000, 0x7F0000001000 + i * 0x2000, MEMFD_DEV, 5000 + i) for i in range(500)]
    if spelled:
        lines.append(_line(0x3000, 0x4000, 0, 0, b"/tmp/x %02x:%02x 9001 y" % (os.major(MEMFD_DEV), os.minor(MEMFD_DEV))))
    maps = b"\n".join(lines) + b"\n"
    ids = {(MEMFD_DEV, 9000 + i) for i in range(64)}
    assert mappings_of(maps, ids) == {}
    assert mappings_of(maps, ids | {(MEMFD_DEV, 5007)}) == {(MEMFD_DEV, 5007): [(0x7F000000E000, 0x7F000000F000)]}
