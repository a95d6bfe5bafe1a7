"""What may wait is served off blkback's loops: one guest's slow disk does not stall the others.

blkback serves many rings on each loop thread (ring_loop.py); a flush, a
discard, or a batch that maps grants at the broker goes to a worker thread
while that ring waits; a read the page cache cannot answer goes alone to a
worker while the ring is served on.  Here two
guests share one loop and the first one's flush hangs in its disk: the
second keeps reading and writing, and the first one's later requests are
served after its flush, in order, once the disk answers.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
from blk_guest import BlkGuest, running_blkback
from test_blk_matrix import call

from xdom.backends.blkback.disk import Disk
from xdom.backends.blkback.ring_loop import RingLoops
from xdom.backends.blkback.server import BlkbackServer

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


@pytest.fixture
def server(domains, xenstored) -> Iterator[tuple[BlkbackServer, object]]:
    with running_blkback(domains, xenstored, loops=RingLoops(1)) as pair:       # every ring on one loop
        yield pair


def test_a_flush_that_hangs_stalls_its_own_ring_only(server, domains, xenstored, run_dir: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    srv, be = server
    slow, other = (BlkGuest(domains, xenstored.socket_path, be, run_dir, n, 4 * MiB) for n in ("slow", "other"))
    release = threading.Event()
    entered = threading.Event()
    real_flush = Disk.flush

    def flush(disk: Disk) -> None:
        if disk.path == slow.image:
            entered.set()
            assert release.wait(60), "the test never released the flush"
        real_flush(disk)
    monkeypatch.setattr(Disk, "flush", flush)
    try:
        assert call(slow.front.submit_write, 0, memoryview(b"a" * 4096), False) == (0, None)   # persistent now
        flushed: list[int] = []
        after: list[tuple[int, object]] = []
        slow.front.submit_flush(flushed.append)
        assert entered.wait(20), "the flush never reached the disk"
        # the slow guest's next write waits behind its flush (a ring's requests are served in order) ...
        slow.front.submit_write(8192, memoryview(b"b" * 4096), False, lambda err: after.append((err, None)))
        # ... while the other guest, on the same loop, is served as if nothing were happening
        data = os.urandom(64 * 1024)
        for i in range(20):
            assert call(other.front.submit_write, i * 65536, memoryview(data), False, timeout=10) == (0, None)
            assert call(other.front.submit_read, i * 65536, 65536, timeout=10) == (0, data)
        assert flushed == [] and after == []
        release.set()
        for _ in range(200):
            if flushed and after:
                break
            threading.Event().wait(0.05)
        assert flushed == [0] and after == [(0, None)]
        with open(slow.image, "rb") as f:
            f.seek(8192)
            assert f.read(4096) == b"b" * 4096
        stats = srv.vbds[(slow.host.domid, 51712)].stats()
        assert stats["flush_requests"] == 1 and stats["errors"] == 0 and stats["offloaded"] >= 2, stats
    finally:
        release.set()
        slow.close()
        other.close()


def test_a_read_the_page_cache_misses_does_not_hold_back_its_ring(server, domains, xenstored, run_dir: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A read ``RWF_NOWAIT`` cannot answer goes alone to a worker: the same ring's later reads and
    writes are answered while it waits for the disk (out of ring order, by id, as Linux blkback's
    bios complete), and it is answered with the right data once the disk is."""
    srv, be = server
    guest = BlkGuest(domains, xenstored.socket_path, be, run_dir, "miss", 4 * MiB)
    release = threading.Event()
    entered = threading.Event()
    real_cached, real_readv = Disk.read_cached, Disk.readv
    missed = 3 * MiB                                  # the one offset the page cache "does not hold"

    def read_cached(disk: Disk, bufs, offset: int, length: int) -> bool:
        return offset != missed and real_cached(disk, bufs, offset, length)

    def readv(disk: Disk, bufs, offset: int, length: int = -1) -> None:
        if offset == missed:
            entered.set()
            assert release.wait(60), "the test never released the read"
        real_readv(disk, bufs, offset, length)
    monkeypatch.setattr(Disk, "read_cached", read_cached)
    monkeypatch.setattr(Disk, "readv", readv)
    try:
        data = os.urandom(4096)
        for off in (0, missed):                                   # the pages persistent, the data there
            assert call(guest.front.submit_write, off, memoryview(data), False) == (0, None)
        vbd = srv.vbds[(guest.host.domid, 51712)]
        slow: list[tuple[int, object]] = []
        guest.front.submit_read(missed, 4096, lambda err, views=(): slow.append((err, b"".join(views))))
        assert entered.wait(20), "the missed read never reached the disk"
        for i in range(20):
            assert call(guest.front.submit_read, 0, 4096, timeout=10) == (0, data)
            assert call(guest.front.submit_write, (1 + i % 2) * MiB, memoryview(data), False, timeout=10) == (0, None)
        assert slow == []
        release.set()
        for _ in range(200):
            if slow:
                break
            threading.Event().wait(0.05)
        assert slow == [(0, data)]
        stats = vbd.stats()
        assert stats["read_aside"] == 1 and stats["errors"] == 0, stats
    finally:
        release.set()
        guest.close()
