"""Disks end to end: a supervised host (broker, xenstored, blkback, a guest) and real tools on the guest's NBD export.

Every domain is its own process; the guest's blkfront talks to blkback
through granted pages and event channels only.  The checks are the ones a
user would make: fio with crc32c verification, qemu-img convert
byte-identical, a read-only disk refusing writes, discard leaving holes,
and fio carrying on across a SIGKILL of the blkback domain.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
from typing import Any

import pytest
from helpers import wait_until
from test_supervisor import Host, assert_nothing_left

from xdom.domains.xenstore import XenstoreClient

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(not all(shutil.which(t) for t in ("fio", "qemu-img", "qemu-io", "nbdinfo")),
                                 reason="needs fio, qemu-img, qemu-io and nbdinfo (make test installs them as root)")]

IMAGE = 48 << 20


def topology(images: dict[str, str], extra: str = "") -> str:
    """xenstored, blk0 and g1 with a disk per image: xvda read-write, xvdb read-only."""
    disks = [f"format=raw, vdev=xvda, access=rw, backend=blk0, export=nbd:g1-xvda.sock, target={images['a']}"]
    if "b" in images:
        disks.append(f"format=raw, vdev=xvdb, access=ro, backend=blk0, target={images['b']}")
    listed = ", ".join(f'"{d}"' for d in disks)
    return ('[[domain]]\nname = "xs"\nkind = "xenstored"\n'
            '[[domain]]\nname = "blk0"\nkind = "blkback"\nrestart_backoff = 0.1\n'
            f'[[domain]]\nname = "g1"\nkind = "guest"\nmemory = "32M"\ndisk = [{listed}]\n{extra}')


def make_image(path: str, size: int = IMAGE) -> bytes:
    data = random.Random(path).randbytes(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


def uri(export: str) -> str:
    return f"nbd+unix:///?socket={export}"


def fio(export: str, cwd: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = ["fio", "--name=xdom", "--ioengine=nbd", f"--uri={uri(export)}", "--verify_state_save=0",
           "--output-format=terse", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout)


def devices(h: Host, name: str) -> dict[str, dict[str, Any]]:
    return {d["vdev"]: d for d in h.row(name)["devices"]}


def test_a_guest_disk_through_blkback_serves_real_tools(run_dir: str) -> None:
    a, b = os.path.join(run_dir, "a.img"), os.path.join(run_dir, "b.img")
    make_image(a)
    original_b = make_image(b, 8 << 20)
    with Host(run_dir, topology({"a": a, "b": b})) as h:
        devs = devices(h, "g1")
        assert devs["xvda"]["backend"] == "blk0" and devs["xvda"]["mode"] == "w"
        assert devs["xvdb"]["mode"] == "r"
        xvda, xvdb = devs["xvda"]["export"], devs["xvdb"]["export"]
        assert xvdb == os.path.join(h.layout.run_dir, "exports", "g1", "xvdb.sock")     # the default export socket
        assert xvda == os.path.join(h.layout.run_dir, "exports", "g1", "g1-xvda.sock")  # a name in g1's directory

        info = subprocess.run(["nbdinfo", "--json", uri(xvda)], capture_output=True, text=True, check=True)
        assert '"export-size": 50331648' in info.stdout

        # qemu-img convert out of the export: byte-identical to the image
        copy = os.path.join(run_dir, "copy.img")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri(xvda), copy], check=True,
                       capture_output=True, timeout=120)
        with open(a, "rb") as f1, open(copy, "rb") as f2:
            assert f1.read() == f2.read()

        # fio: random writes and reads, every block verified
        res = fio(xvda, run_dir, "--rw=randrw", "--bs=4k", "--iodepth=16", "--size=16M", "--verify=crc32c",
                  "--do_verify=1")
        assert res.returncode == 0, res.stderr
        res = fio(xvda, run_dir, "--rw=write", "--bs=1M", "--iodepth=4", "--size=16M", "--offset=24M",
                  "--verify=crc32c", "--do_verify=1")
        assert res.returncode == 0, res.stderr

        # discard punches a hole in the image file (asked of the filesystem itself: st_blocks
        # also counts extent-tree blocks, which a hole splitting an extent may add)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "discard 40M 4M", uri(xvda)], check=True,
                       capture_output=True, timeout=60)
        fd = os.open(a, os.O_RDONLY)
        try:
            assert os.lseek(fd, 40 << 20, os.SEEK_HOLE) == 40 << 20
            assert os.lseek(fd, 40 << 20, os.SEEK_DATA) >= 44 << 20
        finally:
            os.close(fd)

        # the read-only disk refuses writes, and reads still work
        res = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 64k", uri(xvdb)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode != 0 or "error" in (res.stdout + res.stderr).lower()
        with open(b, "rb") as f:
            assert f.read() == original_b
        res = subprocess.run(["qemu-io", "-f", "raw", "-r", "-c", "read 0 64k", uri(xvdb)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "read 65536/65536" in res.stdout
        layout = h.layout
    assert_nothing_left(layout)
    assert not os.path.exists(xvda) and not os.path.exists(xvdb)


class FioRun:
    """fio in the background, its JSON status read every second: how far it got, and its final report.

    ``--status-interval`` makes fio print a whole JSON report twice a second; the last
    one is the final report.
    """

    def __init__(self, cmd: list[str], cwd: str) -> None:
        self.proc = subprocess.Popen([*cmd, "--output-format=json", "--status-interval=500ms"], cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.reports: list[dict[str, Any]] = []
        self.stderr = ""
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        decoder, buf = json.JSONDecoder(), ""
        for line in self.proc.stdout:
            if not buf and not line.startswith("{"):
                continue                              # not part of a report (a warning, say)
            buf += line
            if line.rstrip() == "}":                  # the end of one report (fio indents everything inside)
                try:
                    self.reports.append(decoder.decode(buf))
                except ValueError:
                    continue                          # a brace closing something nested: read on
                buf = ""

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def progress(self) -> tuple[int, int]:
        """(bytes written, bytes read) in the latest report."""
        if not self.reports:
            return 0, 0
        job = self.reports[-1]["jobs"][0]
        return job["write"]["io_bytes"], job["read"]["io_bytes"]

    def finish(self, timeout: float) -> dict[str, Any]:
        """Wait for fio; its final report's job."""
        try:
            self.proc.wait(timeout)
        finally:
            self.stop()
        for t in self._readers:
            t.join(10)
        assert self.reports, f"fio printed no report: {self.stderr}"
        return self.reports[-1]["jobs"][0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_fio_survives_a_blkback_kill(run_dir: str) -> None:
    """A size-based write job, every block verified (during the run and read back after it), across kill -9."""
    a = os.path.join(run_dir, "a.img")
    make_image(a)
    size = 32 << 20
    with Host(run_dir, topology({"a": a})) as h:
        export = devices(h, "g1")["xvda"]["export"]
        before = h.ps()
        # randwrite with verify=crc32c: each block carries its checksum; verify_backlog reads back
        # and checks what was written while the job runs (reads and writes cross the kill), and
        # do_verify=1 reads back everything written that is left once the writes are done.  --rate
        # keeps the writes going for about four seconds, so the kill lands in the middle of them.
        fio_job = FioRun(["fio", "--name=xdom", "--ioengine=nbd", f"--uri={uri(export)}", "--verify_state_save=0",
                          "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={size}", "--verify=crc32c",
                          "--do_verify=1", "--verify_backlog=1024", "--verify_fatal=1", "--rate=8m"], run_dir)
        try:
            # Kill the driver domain once fio has written something, and before it has written everything.
            wait_until(lambda: fio_job.progress()[0] > 0 or fio_job.proc.poll() is not None, 60,
                       "fio's first progress report", interval=0.05)
            written_before, _ = fio_job.progress()
            assert 0 < written_before < size and fio_job.proc.poll() is None, (written_before, fio_job.stderr)
            os.kill(before["blk0"]["pid"], signal.SIGKILL)
            r = h.wait("blk0", "restarted", state="running", generation=2)
            assert r["domid"] == before["blk0"]["domid"] and r["last_exit"] == "killed by SIGKILL"
            job = fio_job.finish(timeout=180)
        finally:
            fio_job.stop()
        assert fio_job.proc.returncode == 0, fio_job.stderr
        assert job["error"] == 0, job
        assert job["write"]["io_bytes"] == size
        assert job["read"]["io_bytes"] == size, "fio did not read back (verify) every block it wrote"
        g1 = h.row("g1")
        assert g1["state"] == "running" and g1["generation"] == 1, "the guest was not restarted"
        with open(h.layout.log_path("g1")) as log:
            text = log.read()
        # fio's requests were in the guest's shadow when blkback died, and went again to the new one
        issued = [int(m) for m in re.findall(r"came back: reconnecting, (\d+) request\(s\) to issue again", text)]
        assert issued and issued[0] > 0, text[-2000:]
        # after the restart the disk still reads what the image holds
        copy = os.path.join(run_dir, "copy.img")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri(export), copy], check=True,
                       capture_output=True, timeout=120)
        with open(a, "rb") as f1, open(copy, "rb") as f2:
            assert f1.read() == f2.read()


def xdom(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdom.deploy.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def nbd_serves(export: str) -> bool:
    return subprocess.run(["nbdinfo", "--size", uri(export)], capture_output=True).returncode == 0


def test_block_attach_and_detach_while_the_guest_runs(run_dir: str) -> None:
    a, b = os.path.join(run_dir, "a.img"), os.path.join(run_dir, "b.img")
    make_image(a)
    make_image(b, 8 << 20)
    with Host(run_dir, topology({"a": a})) as h:
        run = ["--run-dir", h.layout.run_dir]
        xvda = devices(h, "g1")["xvda"]["export"]
        spec = f"format=raw, vdev=xvdb, access=rw, backend=blk0, export=nbd:g1-xvdb.sock, target={b}"
        res = xdom("block-attach", "g1", spec, *run)
        assert res.returncode == 0, res.stderr
        xvdb = os.path.join(h.layout.export_dir("g1"), "g1-xvdb.sock")
        assert xvdb in res.stdout
        wait_until(lambda: nbd_serves(xvdb), 30, "the hot-attached disk's export")
        assert "xvdb" in devices(h, "g1")
        listing = xdom("block-list", "g1", *run)
        assert listing.returncode == 0 and "xvdb" in listing.stdout and "xvda" in listing.stdout
        # the new disk carries verified I/O; the first one still does too
        for export in (xvdb, xvda):
            res = fio(export, run_dir, "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=4M",
                      "--verify=crc32c", "--do_verify=1")
            assert res.returncode == 0, res.stderr
        # attaching at a vdev in use, or from a backend that is not a blkback, is refused
        dup = xdom("block-attach", "g1", spec, *run)
        assert dup.returncode == 1 and "already has a disk at xvdb" in dup.stderr
        bad = xdom("block-attach", "g1", spec.replace("backend=blk0", "backend=xs"), *run)
        assert bad.returncode == 1 and "not a blkback domain" in bad.stderr

        res = xdom("block-detach", "g1", "xvdb", *run)
        assert res.returncode == 0, res.stderr
        assert "did not confirm" not in res.stdout
        wait_until(lambda: not os.path.exists(xvdb), 30, "the detached disk's export to go")
        g1, blk0 = h.row("g1")["domid"], h.row("blk0")["domid"]
        with XenstoreClient.unix(h.layout.xenstored_link) as xs:
            assert not xs.exists(f"/local/domain/{g1}/device/vbd/51728")
            assert not xs.exists(f"/local/domain/{blk0}/backend/vbd/{g1}/51728")
        assert "xvdb" not in devices(h, "g1")
        assert fio(xvda, run_dir, "--rw=randread", "--bs=4k", "--size=4M").returncode == 0
        with open(h.layout.log_path("g1")) as log:
            assert "reconnecting" not in log.read(), "attaching or detaching xvdb disturbed xvda"
        # and back again
        assert xdom("block-attach", "g1", spec, *run).returncode == 0
        wait_until(lambda: nbd_serves(xvdb), 30, "the re-attached disk's export")
        assert xdom("block-detach", "g1", "51728", *run).returncode == 0
        missing = xdom("block-detach", "g1", "xvdc", *run)
        assert missing.returncode == 1 and "has no disk" in missing.stderr


def test_a_restarted_guest_gets_its_disk_back(run_dir: str) -> None:
    a = os.path.join(run_dir, "a.img")
    data = make_image(a, 16 << 20)
    with Host(run_dir, topology({"a": a}).replace('memory = "32M"', 'memory = "32M"\nrestart = "on-failure"')) as h:
        export = devices(h, "g1")["xvda"]["export"]
        before = h.ps()
        os.kill(before["g1"]["pid"], signal.SIGKILL)
        h.wait("g1", "restarted", state="running", generation=2)
        wait_until(lambda: nbd_serves(export), 30, "the export of the restarted guest")
        copy = os.path.join(run_dir, "copy.img")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri(export), copy], check=True,
                       capture_output=True, timeout=120)
        with open(copy, "rb") as f:
            assert f.read() == data
        assert h.row("blk0")["generation"] == 1, "blkback was restarted, not just reconnected"
        res = fio(export, run_dir, "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=4M", "--verify=crc32c",
                  "--do_verify=1")
        assert res.returncode == 0, res.stderr


def test_fio_survives_a_broker_kill_and_a_blkback_kill_after_it(run_dir: str) -> None:
    """kill -9 of the hypervisor itself under a verified write job: a new broker takes over the
    running domains (their memory, grants and channels live on in them), the supervisor keeps the
    host, fio sees no error; then blkback is killed too, and its restart -- new grants, new
    channels, all through the new broker -- costs a stall again, not an error."""
    a = os.path.join(run_dir, "a.img")
    make_image(a)
    size = 32 << 20
    with Host(run_dir, topology({"a": a})) as h:
        export = devices(h, "g1")["xvda"]["export"]
        before = h.ps()
        fio_job = FioRun(["fio", "--name=xdom", "--ioengine=nbd", f"--uri={uri(export)}", "--verify_state_save=0",
                          "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={size}", "--verify=crc32c",
                          "--do_verify=1", "--verify_backlog=1024", "--verify_fatal=1", "--rate=6m"], run_dir)
        try:
            wait_until(lambda: fio_job.progress()[0] > 0 or fio_job.proc.poll() is not None, 60,
                       "fio's first progress report", interval=0.05)
            assert fio_job.proc.poll() is None, fio_job.stderr
            assert h.sup.broker is not None
            old_broker = h.sup.broker.proc.pid
            os.kill(old_broker, signal.SIGKILL)
            # The supervisor records the takeover just after the new broker runs: wait for the record.
            wait_until(lambda: h.sup.broker is not None and h.sup.broker.proc.pid != old_broker
                       and h.sup.broker.proc.poll() is None and h.journal("broker", "restarted"), 30,
                       "a new broker, recorded as a restart")
            written_mid, _ = fio_job.progress()
            assert written_mid < size and fio_job.proc.poll() is None, "the kills must land mid-job"
            os.kill(before["blk0"]["pid"], signal.SIGKILL)
            r = h.wait("blk0", "restarted", state="running", generation=2, timeout=60)
            assert r["domid"] == before["blk0"]["domid"]
            job = fio_job.finish(timeout=180)
        finally:
            fio_job.stop()
        assert fio_job.proc.returncode == 0, fio_job.stderr
        assert job["error"] == 0, job
        assert job["write"]["io_bytes"] == size and job["read"]["io_bytes"] == size
        after = h.ps()
        for name in ("xs", "g1"):                  # the broker's death cost them nothing
            assert after[name]["pid"] == before[name]["pid"] and after[name]["restarts"] == 0, after[name]
        copy = os.path.join(run_dir, "copy.img")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri(export), copy], check=True,
                       capture_output=True, timeout=120)
        with open(a, "rb") as f1, open(copy, "rb") as f2:
            assert f1.read() == f2.read()
