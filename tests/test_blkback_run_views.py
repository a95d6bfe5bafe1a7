"""blkback serves a large request of consecutive persistent grants from one view of its grant window.

A frontend's persistent pool grants its pages with consecutive references,
and blkback maps them into a ``GrantWindow`` by reference, so the 256 pages
of a 1 MiB request are one buffer (one iovec) instead of 256 lookups and 256
views.  Run on both hypervisor variants: in process nothing is placed, so
every request takes the page-by-page path; through the broker, the run path
(``run_views`` counts it).  Either way the bytes, and the sectors beside a
request that ends inside a page, must be exactly what the page-by-page path
leaves.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
from hostile_vbd import ERR, OK, PAGE, Hostile
from test_blk_matrix import call
from xs_fixtures import introduce

from xdom.backends.blkback.server import BlkbackServer
from xdom.deploy.vbd import VbdConfig, add_vbd
from xdom.domains.abi.blkif import BLKIF_OP_READ, BLKIF_OP_WRITE, pack_segments
from xdom.domains.blkfront.device import Blkfront, FrontendOptions
from xdom.domains.xenstore import XenstoreClient

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
DEVID = 51712
IMAGE = 16 * MiB


class Disk:
    """blkback on one domain and our blkfront on another, with persistent grants and indirect requests."""

    def __init__(self, domains, socket_path: str, run_dir: str) -> None:
        self.clients: list[XenstoreClient] = []
        self.be, self.fe = domains.create("blk", "1M"), domains.create("guest", "16M")
        self.image = os.path.join(run_dir, "disk.img")
        with open(self.image, "wb") as f:
            f.write(random.Random(7).randbytes(IMAGE))
        self.model = bytearray(open(self.image, "rb").read())
        self.server = BlkbackServer(self.be, self.client(socket_path))
        self.server.start()
        xs = self.client(socket_path)
        introduce(xs, self.be.domid, self.fe.domid)
        add_vbd(xs, VbdConfig(self.be.domid, self.fe.domid, DEVID, "xvda", self.image))
        self.front = Blkfront(self.fe, self.client(socket_path), DEVID,
                              FrontendOptions(persistent=True, indirect=True))
        self.front.connect(20)

    def client(self, socket_path: str) -> XenstoreClient:
        c = XenstoreClient.unix(socket_path)
        self.clients.append(c)
        return c

    def stats(self) -> dict[str, int]:
        return self.server.vbds[(self.fe.domid, DEVID)].stats()

    def close(self) -> None:
        self.front.close()
        self.server.close()
        for c in self.clients:
            c.close()


@pytest.fixture
def disk(domains, xenstored, run_dir: str) -> Iterator[Disk]:
    d = Disk(domains, xenstored.socket_path, run_dir)
    try:
        yield d
    finally:
        d.close()


def _write_lent(d: Disk, offset: int, payload: bytes) -> int:
    """A WRITE whose payload is received into pages the device lends (the NBD server's way)."""
    lent = d.front.write_buffer(offset, len(payload))
    assert lent is not None
    at = 0
    for v in lent.views:
        v[:] = payload[at:at + v.nbytes]
        at += v.nbytes
    return call(d.front.submit_write_buffer, offset, lent, False)[0]


# (offset, length): whole pages, and requests that end inside a page (the last segment's sectors)
CASES = [(0, MiB), (3 * MiB, MiB), (5 * MiB + 512, MiB - 1024), (8 * MiB, MiB - 512), (12 * MiB, 2 * MiB)]


def test_large_requests_of_consecutive_grants_move_exactly_their_bytes(disk: Disk, domains) -> None:
    rng = random.Random(3)
    for rnd in range(3):
        for offset, length in CASES:
            payload = rng.randbytes(length)
            if rnd % 2:
                assert call(disk.front.submit_write, offset, memoryview(payload), False)[0] == 0
            else:
                assert _write_lent(disk, offset, payload) == 0
            disk.model[offset:offset + length] = payload
        for offset, length in CASES:
            err, data = call(disk.front.submit_read, offset, length)
            assert err == 0 and data == bytes(disk.model[offset:offset + length])
    with open(disk.image, "rb") as f:
        assert f.read() == bytes(disk.model)         # nothing beside a request's sectors moved
    stats = disk.stats()
    assert stats["indirect_requests"] > 0 and stats["errors"] == 0, stats
    if domains.variant == "broker":
        assert stats["run_views"] > 0, stats          # the pool's pages did sit side by side in the window
    else:
        assert stats["run_views"] == 0, stats         # in process nothing is placed: page by page


class _HostileRig:
    """What a hand-driven hostile frontend (hostile_vbd.Hostile) needs of its rig, on either variant."""

    def __init__(self, domains, disk: Disk, run_dir: str, socket_path: str) -> None:
        self._domains, self._run_dir = domains, run_dir
        self.hv = self
        self.hosts: list = []
        self.be = disk.be
        self.xs = disk.client(socket_path)

    def create_domain(self, name: str, memory: str, grant_frames: int = 32):
        return self._domains.create(name, memory)

    def make_image(self, name: str, size: int) -> str:
        path = os.path.join(self._run_dir, name)
        with open(path, "wb") as f:
            f.write(random.Random(name).randbytes(size))
        return path


def test_a_hostile_run_of_consecutive_references_gets_exactly_what_it_names(disk: Disk, domains, xenstored,
                                                                            run_dir: str) -> None:
    """A run is only a run when every reference is the next one: a request whose ends look like a run
    but whose middle is swapped, or names a page never mapped here, is served (or refused) exactly as
    page by page."""
    h = Hostile(_HostileRig(domains, disk, run_dir, xenstored.socket_path))   # type: ignore[arg-type]
    h.connect(persistent=True)
    data = [h.grant(bytes([i + 1]) * PAGE) for i in range(16)]
    refs = [ref for _, ref in data]
    assert refs == list(range(refs[0], refs[0] + 16))            # a fresh table: consecutive references
    igfn, iref = h.grant(pack_segments([(r, 0, 7) for r in refs]))
    stats = disk.server.vbds[(h.host.domid, h.devid)].stats
    h.expect([(h.indirect(BLKIF_OP_READ, 0, 16, [iref]), OK)])           # maps them all, kept
    h.expect([(h.indirect(BLKIF_OP_READ, 0, 16, [iref]), OK)])           # now a run, where one can be
    runs = stats()["run_views"]
    assert runs == (1 if domains.variant == "broker" else 0), stats()

    def image(sector: int, pages: int) -> bytes:
        with open(h.image, "rb") as f:
            f.seek(sector * 512)
            return f.read(pages * PAGE)
    frame = {ref: h.host.memory.frame(gfn) for gfn, ref in data}
    page = h.host.memory.frame(igfn)
    swapped = refs[:7] + [refs[8], refs[7]] + refs[9:]                  # the ends still look like a run
    page[:] = pack_segments([(r, 0, 7) for r in swapped])
    h.expect([(h.indirect(BLKIF_OP_READ, 128, 16, [iref]), OK)])
    want = image(128, 16)
    assert [bytes(frame[r]) for r in swapped] == [want[i * PAGE:(i + 1) * PAGE] for i in range(16)]
    for i, r in enumerate(swapped):
        frame[r][:] = bytes([0xA0 + i]) * PAGE
    h.expect([(h.indirect(BLKIF_OP_WRITE, 256, 16, [iref]), OK)])
    assert image(256, 16) == b"".join(bytes([0xA0 + i]) * PAGE for i in range(16))
    assert stats()["run_views"] == runs                                  # neither was taken for a run

    # Sixteen more consecutive references, one in the middle granted to another domain: never mapped
    # here, so never in the window; the request is refused and reads nothing into the others.
    other = domains.create("other")
    more = [h.grant(to=other.domid if i == 9 else None) for i in range(16)]
    more_refs = [ref for _, ref in more]
    assert more_refs == list(range(more_refs[0], more_refs[0] + 16))
    page[:] = pack_segments([(r, 0, 7) for r in more_refs])
    h.expect([(h.indirect(BLKIF_OP_READ, 0, 16, [iref]), ERR)])
    assert all(bytes(h.host.memory.frame(gfn)) == bytes(PAGE) for gfn, _ in more)
    h.close()                                                            # every grant given back
