"""blkback + blkfront, in-process (local xenhost), across the feature matrix.

Every combination of persistent grants, indirect segments, ring page order,
queue count and ABI moves data both ways and is checked against the image
file itself; then read-only disks, discard, 4096-byte sectors and
detach/attach.  The same code runs in separate processes in
test_blk_domains.py.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Iterator

import pytest
from helpers import wait_until
from xs_fixtures import introduce, start_xenstored

from xdom.backends.blkback.server import BlkbackServer
from xdom.deploy.vbd import VbdConfig, add_vbd, remove_vbd
from xdom.domains.abi.blkif import PROTOCOL_X86_32, PROTOCOL_X86_64
from xdom.domains.blkfront.device import Blkfront, FrontendOptions
from xdom.domains.xenbus import XenbusState, read_state
from xdom.domains.xenhost import LocalHypervisor
from xdom.domains.xenstore import XenstoreClient

pytestmark = pytest.mark.timeout(120)

DEVID = 51712          # xvda
IMAGE_SIZE = 8 << 20


class Rig:
    """xenstored, a backend domain running blkback and a frontend domain, all but xenstored in this process."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.xenstored = start_xenstored(run_dir)
        try:
            self._start()
        except BaseException:
            self.xenstored.stop()
            raise

    def _start(self) -> None:
        self.hv = LocalHypervisor()
        self.be = self.hv.create_domain("blk", "1M")
        self.fe = self.hv.create_domain("guest", "16M")
        self.clients: list[XenstoreClient] = []
        self.xs = self.client()
        self.server = BlkbackServer(self.be, self.client())
        self.server.start()
        self.fronts: list[Blkfront] = []

    def client(self) -> XenstoreClient:
        c = XenstoreClient.unix(self.xenstored.socket_path)
        self.clients.append(c)
        return c

    def image(self, name: str = "disk.img", size: int = IMAGE_SIZE) -> str:
        path = os.path.join(self.run_dir, name)
        with open(path, "wb") as f:
            f.write(random.Random(name).randbytes(size))
        return path

    def attach(self, path: str, devid: int = DEVID, options: FrontendOptions | None = None,
               **cfg: object) -> Blkfront:
        introduce(self.xs, self.be.domid, self.fe.domid)
        add_vbd(self.xs, VbdConfig(self.be.domid, self.fe.domid, devid, "xvda", path, **cfg))  # type: ignore[arg-type]
        front = Blkfront(self.fe, self.client(), devid, options or FrontendOptions())
        front.connect(20)
        self.fronts.append(front)
        return front

    def close(self) -> None:
        for f in self.fronts:
            f.close()
        self.server.close()
        for c in self.clients:
            c.close()
        self.fe.close()
        self.be.close()
        self.hv.close()
        # Local domains leave their memory mapped (views may outlive them); ours
        # are all gone, and each test's frames would count against vm.max_map_count.
        self.fronts.clear()
        for dom in (self.fe, self.be):
            dom.memory.close()
        self.xenstored.stop()


@pytest.fixture
def rig(run_dir: str) -> Iterator[Rig]:
    r = Rig(run_dir)
    try:
        yield r
    finally:
        r.close()


def call(submit, *args, timeout: float = 30.0):
    """Run one asynchronous block operation and wait for its completion: (error, data or None)."""
    done = threading.Event()
    out: list = []

    def complete(error: int, data=None) -> None:
        out.append((error, b"".join(bytes(d) for d in data) if data is not None else None))
        done.set()
    submit(*args, complete)
    assert done.wait(timeout), "operation never completed"
    return out[0]


def run_concurrently(front: Blkfront, ops: list[tuple], timeout: float = 60.0, reads_at_once: bool = False) -> list:
    """Submit every op at once (a real queue depth) and collect results in submission order;
    ``reads_at_once``: the reads (all of ``ops``) in one ``submit_reads`` call, as the NBD server does."""
    results: list = [None] * len(ops)
    left = threading.Semaphore(0)

    def completer(i: int):
        def complete(error: int, data=None) -> None:
            results[i] = (error, b"".join(bytes(d) for d in data) if data is not None else None)
            left.release()
        return complete
    if reads_at_once:
        assert {kind for kind, *_ in ops} == {"read"}
        front.submit_reads([(offset, length, completer(i)) for i, (_, offset, length) in enumerate(ops)])
        ops = []
    for i, (kind, *args) in enumerate(ops):
        getattr(front, f"submit_{kind}")(*args, completer(i))
    for _ in results:
        assert left.acquire(timeout=timeout), "operations never completed"
    return results


MATRIX = [
    pytest.param(persistent, indirect, order, queues, abi,
                 id=f"{'pers' if persistent else 'nopers'}-{'ind' if indirect else 'noind'}-o{order}-q{queues}-"
                    f"{'64' if abi == PROTOCOL_X86_64 else '32'}")
    for persistent in (True, False) for indirect in (True, False) for order in (0, 2) for queues in (1, 2)
    for abi in (PROTOCOL_X86_64, PROTOCOL_X86_32)
]


@pytest.mark.parametrize("persistent,indirect,order,queues,abi", MATRIX)
def test_feature_matrix_data_integrity(rig: Rig, persistent: bool, indirect: bool, order: int, queues: int,
                                       abi: str) -> None:
    path = rig.image()
    front = rig.attach(path, options=FrontendOptions(queues=queues, ring_page_order=order, persistent=persistent,
                                                     indirect=indirect, protocol=abi))
    assert front.size == IMAGE_SIZE
    be_path = front.backend_path
    assert rig.xs.read(f"{front.path}/protocol").decode() == abi
    assert rig.xs.read(f"{front.path}/feature-persistent").decode() == str(int(persistent))
    if queues > 1:
        assert rig.xs.read(f"{front.path}/multi-queue-num-queues") == b"2"
        assert rig.xs.exists(f"{front.path}/queue-1/event-channel")
    if order:
        assert rig.xs.read(f"{front.path}/ring-page-order") == b"2"
        assert rig.xs.exists(f"{front.path}/{'queue-0/' if queues > 1 else ''}ring-ref3")
    exercise(front, path, f"{persistent}{indirect}{order}{queues}{abi}")
    vbd = rig.server.vbds[(rig.fe.domid, DEVID)]
    stats = vbd.stats()
    assert stats["errors"] == 0 and stats["requests"] >= 48
    assert read_state(rig.xs, be_path) == XenbusState.Connected
    assert_features_used(vbd.queue_stats(), persistent, indirect, order, queues)


def exercise(front: Blkfront, path: str, seed: str) -> None:
    """Writes of every size class at once, then 48 concurrent reads and a flush, checked against ``path``."""
    rng = random.Random(seed)
    model = bytearray(open(path, "rb").read())
    # Writes of every size class at once (sub-page, 11-segment, indirect-sized), overlapping none.
    writes = []
    for i, length in enumerate((512, 4096, 45056, 300 * 1024, 1 << 20)):
        offset = (i * (1 << 20) + rng.randrange(0, 64) * 512)
        data = rng.randbytes(length)
        model[offset:offset + length] = data
        writes.append(("write", offset, memoryview(data), False))
    assert [r[0] for r in run_concurrently(front, writes)] == [0] * len(writes)
    reads = [("read", off, length) for off, length in
             [(rng.randrange(0, len(model) // 512 - 2048) * 512, rng.choice((512, 4096, 65536, 1 << 20)))
              for _ in range(48)]]
    for at_once in (False, True):            # one by one, and as one run (submit_reads: sizes mixed)
        for (_, off, length), (err, data) in zip(reads, run_concurrently(front, reads, reads_at_once=at_once)):
            assert err == 0
            assert data == bytes(model[off:off + length]), f"read {off}+{length} differs ({at_once=})"
    assert call(front.submit_flush)[0] == 0
    with open(path, "rb") as f:
        assert f.read() == bytes(model), "image file differs from what was written"


def assert_features_used(per_queue: list[dict[str, int]], persistent: bool, indirect: bool, order: int,
                         queues: int) -> None:
    """The backend's own counters show it served what was negotiated, and nothing that was not.

    Data surviving proves little about features: a backend that ignored
    ``feature-persistent`` or a frontend that never sent an indirect request
    would move the same bytes.
    """
    assert len(per_queue) == queues, per_queue
    for q, st in enumerate(per_queue):
        assert st["ring_pages"] == 1 << order, (q, st)
        assert st["requests"] > 0, f"queue {q} served nothing: {per_queue}"
    total = {k: sum(st[k] for st in per_queue) for k in per_queue[0]}
    if persistent:
        assert total["persistent_grants"] > 0 and total["persistent_reuses"] > 0, total
    else:
        assert total["persistent_grants"] == 0 and total["persistent_reuses"] == 0, total
    assert total["grants_mapped"] > 0, total
    if indirect:
        assert total["indirect_requests"] > 0, total
    else:
        assert total["indirect_requests"] == 0, total


@pytest.mark.parametrize("protocol", ["", "x86_64"])
def test_blkfront_names_its_abi_explicitly(rig: Rig, protocol: str) -> None:
    """blkfront never leaves ``protocol`` to the backend's default (x86_32 in Linux): it must be a known name."""
    with pytest.raises(ValueError, match="protocol"):
        Blkfront(rig.fe, rig.client(), DEVID, FrontendOptions(protocol=protocol))


def test_read_only_disk_refuses_writes(rig: Rig) -> None:
    path = rig.image()
    before = open(path, "rb").read()
    front = rig.attach(path, read_only=True)
    assert front.read_only
    assert rig.xs.read(f"{front.backend_path}/info") == b"4"        # VDISK_READONLY
    err, data = call(front.submit_read, 0, 65536)
    assert err == 0 and data == before[:65536]
    assert call(front.submit_write, 0, memoryview(b"x" * 4096), False)[0] != 0
    assert call(front.submit_trim, 0, 1 << 20)[0] != 0
    assert open(path, "rb").read() == before


def test_discard_punches_holes(rig: Rig) -> None:
    path = rig.image()
    front = rig.attach(path)
    assert front.can_trim
    assert rig.xs.read(f"{front.backend_path}/discard-granularity") == b"4096"
    blocks = os.stat(path).st_blocks
    assert call(front.submit_trim, 1 << 20, 2 << 20)[0] == 0
    assert os.stat(path).st_blocks <= blocks - (2 << 20) // 512
    err, data = call(front.submit_read, 1 << 20, 2 << 20)
    assert err == 0 and data == bytes(2 << 20)
    assert os.path.getsize(path) == IMAGE_SIZE


def test_4096_byte_sectors(rig: Rig) -> None:
    path = rig.image()
    front = rig.attach(path, logical_sector_size=4096)
    assert front.sector_size == 4096
    assert rig.xs.read(f"{front.backend_path}/sector-size") == b"4096"
    data = os.urandom(8192)
    assert call(front.submit_write, 4096, memoryview(data), True)[0] == 0
    assert call(front.submit_read, 4096, 8192) == (0, data)
    # Misaligned to the logical sector: refused by the frontend before the ring...
    assert call(front.submit_read, 512, 4096)[0] != 0
    # ... and so in a run of reads, where the others are served all the same.
    results = run_concurrently(front, [("read", 4096, 8192), ("read", 512, 4096), ("read", IMAGE_SIZE - 4096, 8192),
                                       ("read", 4096, 4096)], reads_at_once=True)
    assert results == [(0, data), (errno.EINVAL, b""), (errno.EINVAL, b""), (0, data[:4096])]


def test_detach_then_attach_while_the_guest_runs(rig: Rig) -> None:
    first = rig.image("a.img")
    second = rig.image("b.img")
    front = rig.attach(first)
    assert call(front.submit_read, 0, 4096) == (0, open(first, "rb").read(4096))
    assert remove_vbd(rig.xs, rig.be.domid, rig.fe.domid, DEVID)
    wait_until(lambda: front.state == XenbusState.Closed, what="frontend closed")
    assert call(front.submit_read, 0, 4096)[0] != 0
    assert run_concurrently(front, [("read", 0, 4096)] * 2, reads_at_once=True) == [(errno.ENODEV, b"")] * 2
    assert not rig.xs.exists(front.backend_path)
    wait_until(lambda: (rig.fe.domid, DEVID) not in rig.server.vbds, what="backend dropped the device")
    again = rig.attach(second)
    assert call(again.submit_read, 0, 4096) == (0, open(second, "rb").read(4096))
    # The old frontend's frames come back once the backend let go of them.
    wait_until(lambda: front.stats()["frames_still_mapped"] == 0, what="frames released after detach")


def test_two_devices_on_one_backend(rig: Rig) -> None:
    a = rig.attach(rig.image("a.img"), DEVID)
    b = rig.attach(rig.image("b.img"), DEVID + 16)        # xvdb
    da, db = os.urandom(65536), os.urandom(65536)
    results = run_concurrently(a, [("write", 0, memoryview(da), False)])
    results += run_concurrently(b, [("write", 0, memoryview(db), False)])
    assert [r[0] for r in results] == [0, 0]
    assert call(a.submit_read, 0, 65536) == (0, da)
    assert call(b.submit_read, 0, 65536) == (0, db)


@pytest.fixture
def loop_device(run_dir: str) -> Iterator[str]:
    """A loop block device with 4096-byte logical sectors over an image file (root only)."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup for a loop block device")
    backing = os.path.join(run_dir, "loop.img")
    with open(backing, "wb") as f:
        f.write(random.Random("loop").randbytes(IMAGE_SIZE))
    res = subprocess.run(["losetup", "--find", "--show", "--sector-size", "4096", backing],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"no loop device: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_a_block_device_with_4096_byte_sectors(rig: Rig, loop_device: str) -> None:
    front = rig.attach(loop_device)
    assert front.size == IMAGE_SIZE
    assert front.sector_size == 4096                     # from the device (BLKSSZGET), not from a node
    assert rig.xs.read(f"{front.backend_path}/sector-size") == b"4096"
    data = os.urandom(1 << 20)
    assert call(front.submit_write, 1 << 20, memoryview(data), True)[0] == 0
    assert call(front.submit_read, 1 << 20, 1 << 20) == (0, data)
    with open(loop_device, "rb") as dev:
        dev.seek(1 << 20)
        assert dev.read(1 << 20) == data
    assert call(front.submit_trim, 4 << 20, 1 << 20)[0] == 0         # BLKDISCARD
    assert call(front.submit_read, 4 << 20, 1 << 20) == (0, bytes(1 << 20))
