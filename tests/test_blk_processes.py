"""blkback as a real domain process, blkfront in this one, over the broker.

The supervised tests (test_blk_domains.py) run the guest's blkfront with
its defaults; a guest, like Linux, has no per-disk knobs for queues, ring
order or ABI.  Here the toolstack's steps are done by hand instead: a
broker, xenstored and ``python -m xdom.backends.blkback`` each in a domain
process of its own, and a frontend domain in the test process (the broker
xenhost variant: real grants through ``/proc/<pid>/map_files``, real event
channels, xenstore over its ring page), so that every blkfront option can be
chosen and blkback can be paused, killed and started again with other
features.

What the backend used is read from outside it: the broker's maptrack for
the blkback domain (ring pages, persistent grants still mapped) and the
responses each of our queues received.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from helpers import wait_until
from test_blk_matrix import exercise

from xdom.deploy.launcher import start_broker, start_domain_process, start_xenstored_domain, stop_process
from xdom.deploy.vbd import VbdConfig, add_vbd
from xdom.deploy.xsnodes import write_dom0_nodes, write_domain_nodes
from xdom.domains.abi.blkif import PROTOCOL_X86_32, PROTOCOL_X86_64
from xdom.domains.blkfront.device import Blkfront, FrontendOptions
from xdom.domains.xenbus import XenbusState, backend_path, read_state
from xdom.domains.xenhost import BrokerXenHost
from xdom.domains.xenstore import XenstoreClient, XenstoreError

pytestmark = pytest.mark.timeout(180)

DEVID = 51712                 # xvda
IMAGE_SIZE = 8 << 20
WAIT = 60.0                   # deadlines, generous for a loaded 2-CPU host; never a sleep before an assertion


class BlkHost:
    """Broker, xenstored and blkback domains, each its own process; frontend domains in this process."""

    def __init__(self, run_dir: str, blkback_args: tuple[str, ...] = ()) -> None:
        self.run_dir = run_dir
        self.fronts: list[Blkfront] = []
        self.clients: list[XenstoreClient] = []
        self.hosts: list[BrokerXenHost] = []
        self.blkback: subprocess.Popen[bytes] | None = None
        self.broker = start_broker(os.path.join(run_dir, "broker"))
        try:
            self.mgmt = self.broker.client()
            self.xenstored = start_xenstored_domain(self.mgmt, os.path.join(run_dir, "xs.sock"),
                                                    os.path.join(run_dir, "xs-state"))
            self.xs = self._client()
            write_dom0_nodes(self.xs)
            self.be_creds = self.mgmt.request("create", name="blk0", memory="1M")
            self.be_domid = int(self.be_creds["domid"])
            self.start_blkback(*blkback_args)
        except BaseException:
            self.close()
            raise

    def _client(self) -> XenstoreClient:
        c = XenstoreClient.unix(self.xenstored.socket_path)
        self.clients.append(c)
        return c

    @property
    def blkback_log(self) -> str:
        return os.path.join(self.run_dir, "blk0.log")

    def _introduce(self, domid: int, name: str, memory_kib: int, store: dict[str, Any]) -> None:
        """Domain nodes and XS_INTRODUCE in the supervisor's order (a restarted domid is ENOENT until introduced)."""
        try:
            write_domain_nodes(self.xs, domid, name, memory_kib)
            written = True
        except XenstoreError as e:
            if e.name != "ENOENT":
                raise
            written = False
        self.xs.introduce(domid, int(store["gfn"]), int(store["port"]))
        if not written:
            write_domain_nodes(self.xs, domid, name, memory_kib)

    def domain_state(self, domid: int) -> str:
        return self.mgmt.request("info", domid=domid)["domain"]["state"]

    def start_blkback(self, *args: str) -> None:
        """Start ``python -m xdom.backends.blkback ARGS`` in the blkback domain; return once it serves."""
        store = self.mgmt.request("setup_store", domid=self.be_domid, xenstore_domid=self.xenstored.domid)
        rfd, wfd = os.pipe()
        with open(self.blkback_log, "ab") as log:
            self.blkback = start_domain_process(
                self.be_creds, [sys.executable, "-m", "xdom.backends.blkback", "--ready-fd", str(wfd), *args],
                pass_fds=(wfd,), stdout=log, stderr=subprocess.STDOUT)
        os.close(wfd)
        try:
            # xenstored maps the store ring through the broker, which needs the process to have said hello.
            wait_until(lambda: self.blkback.poll() is not None or self.domain_state(self.be_domid) == "running",
                       WAIT, "the blkback process to connect to the broker")
            assert self.blkback.poll() is None, self.log_tail()
            self._introduce(self.be_domid, "blk0", 1024, store)
            ready, _, _ = select.select([rfd], [], [], WAIT)
            assert ready and os.read(rfd, 64), f"blkback did not get ready: {self.log_tail()}"
        finally:
            os.close(rfd)

    def log_tail(self) -> str:
        with open(self.blkback_log, errors="replace") as f:
            return f.read()[-3000:]

    def pause_blkback(self) -> None:
        """SIGSTOP through the broker; returns once every thread of blkback is stopped."""
        assert self.blkback is not None
        self.mgmt.request("pause", domid=self.be_domid)
        proc = psutil.Process(self.blkback.pid)
        wait_until(lambda: all(psutil.Process(t.id).status() == psutil.STATUS_STOPPED for t in proc.threads()),
                   WAIT, "blkback to stop")

    def kill_blkback(self) -> None:
        """SIGKILL; returns once the broker has buried it and xenstored removed the nodes it owned."""
        assert self.blkback is not None
        self.blkback.send_signal(signal.SIGKILL)
        self.blkback.wait()
        wait_until(lambda: self.domain_state(self.be_domid) not in ("running", "paused"), WAIT,
                   "the broker to see blkback die")
        wait_until(lambda: not self.xs.exists(backend_path(self.be_domid, "vbd", self.fronts[0].host.domid, DEVID)),
                   WAIT, "xenstored to release the dead blkback's nodes")

    def restart_blkback(self, *args: str, images: dict[int, str]) -> None:
        """What the supervisor does for a dead driver domain: same domid, a new process, its devices again."""
        self.be_creds = self.mgmt.request("restart", domid=self.be_domid)
        self.start_blkback(*args)
        for front in self.fronts:
            add_vbd(self.xs, VbdConfig(self.be_domid, front.host.domid, front.devid, "xvda", images[front.devid]))

    def frontend(self, name: str = "g1", memory: str = "16M") -> tuple[BrokerXenHost, XenstoreClient]:
        """A domain in this process, introduced to xenstored, talking to it over its ring."""
        creds = self.mgmt.request("create", name=name, memory=memory)
        store = self.mgmt.request("setup_store", domid=creds["domid"], xenstore_domid=self.xenstored.domid)
        host = BrokerXenHost(creds["hypercall"], creds["token"])
        self.hosts.append(host)
        self._introduce(host.domid, name, host.memory.nr_frames * 4, store)
        xs = XenstoreClient.ring(host)
        self.clients.append(xs)
        return host, xs

    def attach(self, host: BrokerXenHost, xs: XenstoreClient, image: str, options: FrontendOptions) -> Blkfront:
        add_vbd(self.xs, VbdConfig(self.be_domid, host.domid, DEVID, "xvda", image))
        front = Blkfront(host, xs, DEVID, options)
        self.fronts.append(front)
        front.connect(WAIT)
        return front

    def mappings_held_by_blkback(self) -> int:
        return int(self.mgmt.request("info", domid=self.be_domid)["domain"]["mappings_held"])

    def close(self) -> None:
        for f in self.fronts:
            try:
                f.close()
            except Exception:
                pass
        for c in reversed(self.clients):
            c.close()
        for h in self.hosts:
            h.close()
        if self.blkback is not None:
            if self.blkback.poll() is None:
                os.kill(self.blkback.pid, signal.SIGCONT)       # a paused one cannot act on SIGTERM
            stop_process(self.blkback)
        if getattr(self, "xenstored", None) is not None:
            self.xenstored.stop()
        if getattr(self, "mgmt", None) is not None:
            self.mgmt.close()
        self.broker.stop()


def make_image(run_dir: str, name: str = "disk.img", size: int = IMAGE_SIZE) -> str:
    path = os.path.join(run_dir, name)
    with open(path, "wb") as f:
        f.write(random.Random(name).randbytes(size))
    return path


@pytest.fixture
def blkhost(request: pytest.FixtureRequest, run_dir: str) -> Iterator[BlkHost]:
    h = BlkHost(run_dir, getattr(request, "param", ()))
    try:
        yield h
    finally:
        h.close()


# ---- the feature matrix, across processes -------------------------------------------------------

# A covering array of strength 2 for the five features (persistent, indirect, ring order 2, two queues,
# x86_32): every pair of features meets in every on/off combination, in 6 rows instead of 32.  The
# whole matrix runs in-process in test_blk_matrix.py.
PAIRWISE = [
    (False, False, 0, 1, PROTOCOL_X86_64),
    (False, False, 0, 1, PROTOCOL_X86_32),
    (False, True, 2, 2, PROTOCOL_X86_64),
    (True, False, 2, 2, PROTOCOL_X86_64),
    (True, True, 0, 2, PROTOCOL_X86_32),
    (True, True, 2, 1, PROTOCOL_X86_32),
]


@pytest.mark.parametrize("persistent,indirect,order,queues,abi", [
    pytest.param(*row, id=f"{'pers' if row[0] else 'nopers'}-{'ind' if row[1] else 'noind'}-o{row[2]}-q{row[3]}-"
                          f"{'64' if row[4] == PROTOCOL_X86_64 else '32'}") for row in PAIRWISE])
def test_feature_matrix_across_processes(blkhost: BlkHost, persistent: bool, indirect: bool, order: int,
                                         queues: int, abi: str) -> None:
    host, xs = blkhost.frontend()
    image = make_image(blkhost.run_dir)
    front = blkhost.attach(host, xs, image, FrontendOptions(queues=queues, ring_page_order=order,
                                                            persistent=persistent, indirect=indirect,
                                                            protocol=abi))
    assert front.size == IMAGE_SIZE
    exercise(front, image, f"proc-{persistent}{indirect}{order}{queues}{abi}")
    assert read_state(blkhost.xs, front.backend_path) == XenbusState.Connected

    # Every queue was served by the backend's ring of that queue, with the pages negotiated.
    per_queue = front.queue_stats()
    assert [q["ring_pages"] for q in per_queue] == [1 << order] * queues
    assert all(q["responses"] > 0 and q["responses"] == q["requests"] for q in per_queue), per_queue
    # Indirect requests were sent only when negotiated, and every one of them was answered OK (exercise()
    # checks each operation's status and data).
    stats = front.stats()
    assert (stats["indirect_requests"] > 0) == indirect, stats
    # The broker's maptrack of the blkback domain, once every request is answered: its rings' pages, plus,
    # with persistent grants, the data pages it keeps mapped (each ring keeps its own, as Linux's do);
    # without them, nothing but the rings.
    ring_pages = queues << order
    held = blkhost.mappings_held_by_blkback()
    assert (stats["persistent_frames"] > 0) == persistent, stats
    if persistent:
        assert ring_pages < held <= ring_pages + queues * stats["persistent_frames"], (held, stats)
    else:
        assert held == ring_pages


# ---- a blkback that dies with requests in flight ----------------------------------------------------

class Pending:
    """Operations submitted at once; ``wait`` collects (error, data) in submission order.

    A ``"lent"`` operation is a write whose data goes into pages blkfront lends (``write_buffer``,
    as the NBD server receives payloads) and is submitted with ``submit_write_buffer``."""

    def __init__(self, front: Blkfront, ops: list[tuple]) -> None:
        self.results: list = [None] * len(ops)
        self._left = threading.Semaphore(0)
        self.completed = 0
        for i, (kind, *args) in enumerate(ops):
            if kind == "lent":
                offset, data, fua = args
                buf = front.write_buffer(offset, len(data))
                assert buf is not None, "blkfront lent no pages"
                pos = 0
                for view in buf.views:
                    view[:] = data[pos:pos + len(view)]
                    pos += len(view)
                front.submit_write_buffer(offset, buf, fua, self._completer(i))
                continue
            getattr(front, f"submit_{kind}")(*args, self._completer(i))

    def _completer(self, i: int):
        def complete(error: int, data=None) -> None:
            self.results[i] = (error, b"".join(bytes(d) for d in data) if data is not None else None)
            self.completed += 1
            self._left.release()
        return complete

    def wait(self, timeout: float = WAIT) -> list:
        for _ in self.results:
            assert self._left.acquire(timeout=timeout), f"only {self.completed} of {len(self.results)} completed"
        return self.results


RESTARTS = {
    "same-features": (),
    "no-indirect": ("--max-indirect-segments", "0"),
    "smaller-ring": ("--max-ring-page-order", "0"),
    "no-indirect-smaller-ring-no-persistent": ("--max-indirect-segments", "0", "--max-ring-page-order", "0",
                                               "--no-persistent"),
}


@pytest.mark.parametrize("new_args", list(RESTARTS.values()), ids=list(RESTARTS))
def test_requests_in_flight_are_issued_again_for_the_new_backend(blkhost: BlkHost, new_args: tuple[str, ...]) -> None:
    """blkback is stopped with ~85 requests on a 4-page ring, killed, and started again, maybe offering less.

    As Linux's blkif_recover: what was in flight is cut again for the new
    backend (11-segment requests when it has no indirect segments; queued for
    room on a 1-page, 32-slot ring) and completes with the right data; nothing
    fails.
    """
    host, xs = blkhost.frontend()
    image = make_image(blkhost.run_dir)
    front = blkhost.attach(host, xs, image, FrontendOptions(ring_page_order=2, persistent=True, indirect=True))
    model = bytearray(open(image, "rb").read())
    rng = random.Random("in-flight")
    # Warm up: persistent grants mapped, one indirect request served.
    warm = rng.randbytes(1 << 20)
    model[6 << 20:7 << 20] = warm
    assert Pending(front, [("write", 6 << 20, memoryview(warm), False)]).wait() == [(0, None)]
    assert front.stats()["indirect_requests"] == 1

    blkhost.pause_blkback()
    ops: list[tuple] = []
    # Writes alternate between data copied by blkfront and data already in pages it lent.
    for i in range(3):                                     # indirect-sized: 256 segments each
        data = rng.randbytes(1 << 20)
        model[i << 20:(i + 1) << 20] = data
        ops.append(("lent" if i % 2 else "write", i << 20, memoryview(data), False))
    for i in range(60):                                    # one page each
        off = (3 << 20) + i * 8192
        data = rng.randbytes(4096)
        model[off:off + 4096] = data
        ops.append(("lent" if i % 2 else "write", off, memoryview(data), False))
    fua = rng.randbytes(65536)                             # FUA: a write, then a flush
    model[4 << 20:(4 << 20) + 65536] = fua
    ops.append(("lent", 4 << 20, memoryview(fua), True))
    reads = [(5 << 20) + i * 65536 for i in range(20)]     # a region nobody writes
    ops += [("read", off, 16384) for off in reads]
    ops.append(("flush",))
    pending = Pending(front, ops)
    in_flight = front.stats()
    assert in_flight["in_flight"] > 32 and in_flight["pending"] == 0, in_flight    # more than a 1-page ring holds
    assert pending.completed == 0
    indirect_before = in_flight["indirect_requests"]

    blkhost.kill_blkback()
    blkhost.restart_blkback(*new_args, images={DEVID: image})
    results = pending.wait()
    assert [err for err, _ in results] == [0] * len(ops), results
    for (kind, *args), (_, data) in zip(ops, results):
        if kind == "read":
            off, length = args
            assert data == bytes(model[off:off + length]), f"read {off}+{length} differs"
    with open(image, "rb") as f:
        assert f.read() == bytes(model), "image file differs from what was written"

    stats = front.stats()
    assert stats["reconnects"] == 1 and stats["reissued"] == in_flight["in_flight"], stats
    order = 0 if "--max-ring-page-order" in new_args else 2
    assert [q["ring_pages"] for q in front.queue_stats()] == [1 << order]
    if "--max-indirect-segments" in new_args:
        assert stats["indirect_requests"] == indirect_before, "an indirect request went to a backend without them"
        # the three 1 MiB writes alone are 3 x 24 requests of at most 11 segments now
        assert sum(q["requests"] for q in front.queue_stats()) >= 3 * 24
    else:
        assert stats["indirect_requests"] > indirect_before
    if "--no-persistent" in new_args:
        assert stats["persistent_frames"] == 0, stats
        assert blkhost.mappings_held_by_blkback() == 1 << order
    # and the disk goes on working
    exercise(front, image, "after-restart")
