"""blkfront against a compromised blkback: forged responses complete nothing they should not.

A driver domain is not trusted by its guests either.  Here blkback
connects as usual (the rig of test_blk_matrix.py), then its ring is taken
off its loop and answered by hand: a response for an id never issued, one
repeated, an error status, and answers for reads blkfront cut in two and
took as a run.  Each operation must complete exactly once, with the
status its own request got (an error where the backend said so), the
guest must keep working, and the ring a backend wrecks (a response index
past the ring) must stop that ring, not the guest.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import Any

import pytest
from helpers import wait_until
from test_blk_matrix import DEVID, Rig

from xdom.domains.abi.blkif import BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, pack_response, parse_request
from xdom.domains.blkfront.device import FrontendOptions
from xdom.domains.log_budget import LOGGED_FIRST

pytestmark = pytest.mark.timeout(120)
rig = __import__("test_blk_matrix").rig          # the fixture: xenstored, blkback and a frontend domain


class Completed:
    """Every ``done`` call, per operation: (error, bytes read)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[int, int]]] = {}
        self.lock = threading.Lock()

    def done(self, name: str) -> Callable[..., None]:
        self.calls[name] = []

        def complete(error: int, data: Any = None) -> None:
            with self.lock:
                self.calls[name].append((error, sum(len(bytes(d)) for d in data) if data else 0))
        return complete

    def count(self) -> int:
        with self.lock:
            return sum(len(c) for c in self.calls.values())


def hijack(rig: Rig) -> Any:
    """blkback's ring server for the device, no longer served by its loop (the test answers instead)."""
    vbd = rig.server.vbds[(rig.fe.domid, DEVID)]
    (ring,) = vbd.rings
    for loop in rig.server.loops.loops:
        loop.remove(ring)
    assert not rig.server.loops.serves(ring)
    return ring


def answer(ring: Any, responses: list[tuple[int, int, int]]) -> None:
    """Forged responses ``(id, operation, status)`` written straight into the ring's slots, published and
    notified: what a compromised backend can do (our own BackRing would refuse to answer more than it took)."""
    back = ring.ring
    for rid, op, status in responses:
        back.shared.write_slot(back.rsp_prod_pvt, pack_response(ring.abi, rid, op, status))
        back.rsp_prod_pvt = (back.rsp_prod_pvt + 1) & 0xFFFFFFFF
    back.push_responses()
    ring.host.notify(ring.port)


def test_forged_responses_complete_each_operation_once_with_its_own_status(rig: Rig) -> None:
    front = rig.attach(rig.image(), options=FrontendOptions(indirect=False))
    ring = hijack(rig)
    got = Completed()
    # A run of three one-page reads, and one of 48 KiB that blkfront cuts in two direct requests.
    front.submit_reads([(0, 4096, got.done("a")), (8192, 4096, got.done("b")), (16384, 4096, got.done("c"))])
    front.submit_read(65536, 49152, got.done("big"))
    wait_until(lambda: ring.ring.unconsumed_requests() >= 5, what="the requests on the ring")
    a, b, c, big1, big2 = [parse_request(ring.abi, raw) for raw in ring.ring.take_requests()]
    never = max(r.id for r in (a, b, c, big1, big2)) + 1000
    answer(ring, [(never, a.operation, BLKIF_RSP_OKAY),          # an id never issued: ignored
                  (a.id, a.operation, BLKIF_RSP_ERROR),          # a fails
                  (a.id, a.operation, BLKIF_RSP_OKAY),           # ... and "succeeds" again: ignored
                  (b.id, b.operation, BLKIF_RSP_OKAY),
                  (big1.id, big1.operation, BLKIF_RSP_OKAY)])    # half of the big read
    wait_until(lambda: got.count() >= 2, what="a and b completed")
    assert got.calls["a"] == [(errno.EIO, 0)]
    assert got.calls["b"] == [(0, 4096)]
    assert got.calls["c"] == [] and got.calls["big"] == []        # still waiting for their answers
    # Six more reads: room on the ring for six more responses, three of which the backend wastes.
    more = "defghi"
    front.submit_reads([(i * 4096, 4096, got.done(name)) for i, name in enumerate(more)])
    wait_until(lambda: ring.ring.unconsumed_requests() >= 6, what="the next requests on the ring")
    d, e, f, *_ = [parse_request(ring.abi, raw) for raw in ring.ring.take_requests()]
    answer(ring, [(b.id, b.operation, BLKIF_RSP_OKAY),           # b again: ignored
                  (big2.id, big2.operation, BLKIF_RSP_ERROR),    # the other half fails: the whole read does
                  (c.id, c.operation, BLKIF_RSP_OKAY),
                  *((r.id, r.operation, BLKIF_RSP_OKAY) for r in (d, e, f))])
    wait_until(lambda: got.count() >= 7, what="c, the big read, d, e and f completed")
    threading.Event().wait(0.3)                                    # anything late would show by now
    assert got.calls["c"] == [(0, 4096)]
    assert got.calls["big"] == [(errno.EIO, 0)]
    assert [got.calls[n] for n in "def"] == [[(0, 4096)]] * 3
    assert [got.calls[n] for n in "ghi"] == [[], [], []]           # their response slots went to the repeats
    assert front.stats()["ignored_responses"] == 3                 # the unknown id and the two repeats
    # Closing fails what is still in flight, once each; nothing completed twice on the way.
    front.close()
    wait_until(lambda: got.count() == 10, what="g, h and i failed at close")
    assert all(len(calls) == 1 for calls in got.calls.values()), got.calls
    assert all(calls[0][0] != 0 for name, calls in got.calls.items() if name in "ghi"), got.calls


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")   # a dead thread fails it
def test_a_response_index_past_the_ring_fails_what_is_in_flight_and_kills_no_thread(rig: Rig) -> None:
    front = rig.attach(rig.image())
    ring = hijack(rig)
    got = Completed()
    front.submit_reads([(0, 4096, got.done("a")), (4096, 4096, got.done("b"))])
    wait_until(lambda: ring.ring.unconsumed_requests() >= 2, what="the requests on the ring")
    ring.ring.take_requests()
    ring.ring.rsp_prod_pvt += 10 * ring.ring.shared.size          # far past anything the frontend issued
    ring.ring.push_responses()
    ring.host.notify(ring.port)
    # As Linux's blkfront (BLKIF_STATE_ERROR): what was in flight fails, nothing is read from that ring.
    wait_until(lambda: got.count() == 2, what="the reads in flight failed")
    assert got.calls == {"a": [(errno.EIO, 0)], "b": [(errno.EIO, 0)]}
    # New I/O waits for the backend to come back with new rings (a restart); closing fails it, once.
    front.submit_read(8192, 4096, got.done("c"))
    threading.Event().wait(0.3)
    assert got.calls["c"] == []
    front.close()
    wait_until(lambda: got.count() == 3, what="the waiting read failed at close")
    assert got.calls["c"] == [(errno.ENODEV, 0)]


def test_forged_responses_do_not_flood_the_guests_log(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Each forged response takes the slot of a request in flight, so the guest's own I/O bounds how many
    come; still, as blkback does with a frontend's bad requests, only the first few are logged one by one."""
    front = rig.attach(rig.image())
    ring = hijack(rig)
    got = Completed()
    n = 30
    front.submit_reads([(i * 4096, 4096, got.done(f"r{i}")) for i in range(n)])
    wait_until(lambda: ring.ring.unconsumed_requests() >= n, what="the requests on the ring")
    reqs = [parse_request(ring.abi, raw) for raw in ring.ring.take_requests()]
    with caplog.at_level("WARNING", logger="xdom.blkfront"):
        answer(ring, [(1_000_000 + i, r.operation, BLKIF_RSP_OKAY) for i, r in enumerate(reqs)])
        wait_until(lambda: front.stats()["ignored_responses"] == n, what="the forged responses seen")
    lines = [r for r in caplog.records if "unknown request id" in r.getMessage()]
    assert len(lines) == LOGGED_FIRST < n
    assert got.count() == 0
    front.close()
    wait_until(lambda: got.count() == n, what="the reads failed at close")
