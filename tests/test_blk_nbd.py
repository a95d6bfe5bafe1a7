"""The guest's NBD export of a blkfront disk, end to end: real NBD clients, blkfront, blkback, the image.

test_nbd.py proves the NBD server against a file; here the device under it
is a Blkfront talking to blkback (the in-process rig of test_blk_matrix.py),
so each NBD command is checked where it lands: FLUSH and FUA as blkif
flushes that blkback counts, WRITE_ZEROES as real zeroes written from one
page (never a discard: blkif leaves discarded data undefined), nbdcopy in
and out, and flush advertised only where the backend has a cache to flush.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest
import test_blk_matrix
from test_blk_matrix import DEVID, Rig, call

from xdom.domains.blkfront.device import Blkfront, FrontendOptions
from xdom.domains.nbd.server import NbdServer

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not all(shutil.which(t) for t in ("qemu-io", "nbdinfo", "nbdcopy")),
                                 reason="needs qemu-io, nbdinfo and nbdcopy (make test installs them as root)")]

MiB = 1 << 20
rig = test_blk_matrix.rig                      # the fixtures: xenstored, blkback and a frontend domain
loop_device = test_blk_matrix.loop_device


@contextlib.contextmanager
def exported(rig: Rig, front: Blkfront) -> Iterator[str]:
    """The disk served as the guest serves it; yields the NBD URI."""
    sock = os.path.join(rig.run_dir, "xvda.sock")
    server = NbdServer(sock, front)
    server.start()
    try:
        yield f"nbd+unix:///?socket={sock}"
    finally:
        server.close()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=100, cwd=tempfile.gettempdir())
    assert res.returncode == 0, f"{args[0]} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    # qemu-io reports a failed command on stdout and still exits 0
    assert "error" not in res.stdout.lower() and "failed" not in res.stdout.lower(), res.stdout
    return res


def nbdinfo(uri: str) -> dict:
    [export] = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"]
    return export


def backend_stats(rig: Rig) -> dict[str, int]:
    return rig.server.vbds[(rig.fe.domid, DEVID)].stats()


def image(rig: Rig, name: str = "disk.img", size: int = 8 * MiB) -> str:
    return rig.image(name, size)


def test_the_export_advertises_what_blkfront_and_blkback_do(rig: Rig) -> None:
    front = rig.attach(image(rig))
    with exported(rig, front) as uri:
        e = nbdinfo(uri)
    assert e["export-size"] == 8 * MiB
    assert e["can_flush"] and e["can_fua"] and e["can_zero"] and e["can_trim"] and not e["is_read_only"]
    assert e["can_multi_conn"] is False             # no promise across connections: a cache per connection
    assert e["block_size_minimum"] == 512


def test_flush_and_fua_reach_blkback_as_flushes(rig: Rig) -> None:
    path = image(rig)
    front = rig.attach(path)
    with exported(rig, front) as uri:
        # qemu-io writes through by default (a FUA on every write); writeback leaves FUA and FLUSH to the
        # commands.  What a session costs without either: qemu may still flush when it closes the disk.
        qemu_io = ("qemu-io", "-f", "raw", "-t", "writeback")
        before = backend_stats(rig)["flush_requests"]
        run(*qemu_io, "-c", "write -P 0x11 0 64k", uri)
        plain = backend_stats(rig)["flush_requests"] - before
        before = backend_stats(rig)["flush_requests"]
        run(*qemu_io, "-c", "write -f -P 0x22 64k 64k", uri)              # NBD_CMD_FLAG_FUA
        fua = backend_stats(rig)["flush_requests"] - before
        before = backend_stats(rig)["flush_requests"]
        run(*qemu_io, "-c", "write -P 0x33 128k 64k", "-c", "flush", uri)  # NBD_CMD_FLUSH
        flushed = backend_stats(rig)["flush_requests"] - before
    assert fua >= plain + 1 and flushed >= plain + 1, (plain, fua, flushed)
    with open(path, "rb") as f:
        assert f.read(192 * 1024) == b"\x11" * 65536 + b"\x22" * 65536 + b"\x33" * 65536
    assert backend_stats(rig)["errors"] == 0


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "not-persistent"])
def test_write_zeroes_writes_zeroes_from_one_page(rig: Rig, persistent: bool) -> None:
    """32 MiB of zeroes (the most one NBD request carries) written, not discarded, without 32 MiB of frames."""
    path = image(rig, size=40 * MiB)
    front = rig.attach(path, options=FrontendOptions(persistent=persistent))
    original = open(path, "rb").read()
    blocks = os.stat(path).st_blocks
    with exported(rig, front) as uri:
        run("qemu-io", "-f", "raw", "-c", "write -z 4M 32M", uri)                # NO_HOLE
        run("qemu-io", "-f", "raw", "-c", "write -z -u 1M 1M", uri)              # holes allowed
    with open(path, "rb") as f:
        got = f.read()
    assert got[MiB:2 * MiB] == bytes(MiB) and got[4 * MiB:36 * MiB] == bytes(32 * MiB)
    assert got[:MiB] == original[:MiB] and got[2 * MiB:4 * MiB] == original[2 * MiB:4 * MiB]
    assert got[36 * MiB:] == original[36 * MiB:]
    st = backend_stats(rig)
    assert st["discard_requests"] == 0 and st["errors"] == 0, st
    assert os.stat(path).st_blocks >= blocks, "zeroes were punched, not written"
    # One zero page and the indirect pages: a 32 MiB buffer would have taken the whole persistent pool.
    if persistent:
        assert 0 < front.stats()["persistent_frames"] < 64, front.stats()


def test_nbdcopy_in_and_out_through_blkfront(rig: Rig, tmp_path) -> None:
    """A source with data and zero runs: nbdcopy writes the zeroes as WRITE_ZEROES, the data as WRITE."""
    path = image(rig, size=16 * MiB)
    front = rig.attach(path)
    rng = random.Random("nbdcopy")
    src = bytearray(rng.randbytes(16 * MiB))
    for start in (0, 5 * MiB, 11 * MiB):
        src[start:start + 2 * MiB] = bytes(2 * MiB)
    (tmp_path / "src.raw").write_bytes(src)
    with exported(rig, front) as uri:
        run("nbdcopy", "--flush", str(tmp_path / "src.raw"), uri)
        run("nbdcopy", uri, str(tmp_path / "out.raw"))
    with open(path, "rb") as f:
        assert f.read() == bytes(src), "the image differs from the source"
    assert (tmp_path / "out.raw").read_bytes() == bytes(src), "the copy out differs"
    st = backend_stats(rig)
    assert st["errors"] == 0 and st["discard_requests"] == 0 and st["flush_requests"] >= 1, st


def test_no_flush_is_advertised_for_a_disk_without_a_write_cache(rig: Rig, loop_device: str) -> None:
    """A write-through disk (the kernel's queue/write_cache): blkback offers no flush, so neither does NBD.

    Linux blkback decides flush support from ``bdev_write_cache``; a client
    then knows completed writes are durable and has nothing to flush.
    """
    cache = f"/sys/block/{os.path.basename(loop_device)}/queue/write_cache"
    with open(cache, "w") as f:
        f.write("write through")
    try:
        front = rig.attach(loop_device)
        assert rig.xs.read(f"{front.backend_path}/feature-flush-cache") == b"0"
        assert rig.xs.read(f"{front.backend_path}/feature-barrier") == b"0"
        assert front.can_flush is False
        with exported(rig, front) as uri:
            e = nbdinfo(uri)
            assert not e["can_flush"] and not e["can_fua"], e
            run("qemu-io", "-f", "raw", "-c", "write -P 0x44 0 64k", uri)
        assert call(front.submit_read, 0, 65536) == (0, b"\x44" * 65536)
    finally:
        with open(cache, "w") as f:
            f.write("write back")


def test_a_disk_with_a_write_cache_advertises_flush(rig: Rig, loop_device: str) -> None:
    front = rig.attach(loop_device)
    assert rig.xs.read(f"{front.backend_path}/feature-flush-cache") == b"1"
    assert front.can_flush
    with exported(rig, front) as uri:
        e = nbdinfo(uri)
    assert e["can_flush"] and e["can_fua"]
