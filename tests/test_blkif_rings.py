"""Our ring.h transcription against Xen's real macros: rings shared with C peers, and its properties.

Python maps the same ring file as the C peer (tests/blkif_c_peer.py; the
ends: tests/blkif_ring_ends.py) and plays the other end.  The same script of
ring operations is run with C/C (the reference), Python/C, C/Python and
Python/Python ends; every notify/work boolean, free count, request copy (raw
bytes and decoded fields), response and the four shared indices after every
step must equal the C/C run.  Rings start at index 0 and just below 2**32,
on one page and on four (order 2, slots straddling page boundaries).

The last tests are pure Python: a hypothesis property that FrontRing and
BackRing never lose, duplicate or reorder anything, and that a BackRing
facing a req_prod more than a ring ahead raises RingOverflow.
"""

from __future__ import annotations

import collections
import random
import struct
from dataclasses import dataclass, field
from typing import Any

import blkif_c_peer
import pytest
from blkif_c_peer import MASK32, needs_headers
from blkif_ring_ends import CBack, PyBack, RingFile, Spec, Taken, response_for, ring_pair, spec_bytes, spec_request
from hypothesis import given, settings
from hypothesis import strategies as st

from xdom.domains.abi.blkif import (
    BLKIF_DISCARD_SECURE,
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_OKAY,
    SEGMENTS_PER_INDIRECT_FRAME,
    X86_32,
    X86_64,
    BlkifABI,
    Request,
    pack_request,
    pack_response,
    parse_request,
    parse_response,
)
from xdom.domains.abi.ring import (
    PAGE_SIZE,
    RING_HEADER_SIZE,
    BackRing,
    FrontRing,
    RingOverflow,
    SharedRing,
    ring_size,
)

# The C peer's fixtures (pytest finds them by name in this module).
abi_peer = blkif_c_peer.abi_peer
build_dir = blkif_c_peer.build_dir


# ---------------------------------------------------------------------------
# 2a/2b. A batch of every kind of request, each direction
# ---------------------------------------------------------------------------

BATCH: list[Spec] = [
    ("rw", BLKIF_OP_WRITE, 0x8000000000000001, 2048, 0x0CA0,
     ((0x100, 0, 7), (0x101, 0, 7), (0xFFFFFFFE, 2, 5), (0x103, 7, 7))),
    ("rw", BLKIF_OP_READ, 2, 0xFFFFFFFFFFFFFFF0, 0x0CA0,
     tuple((0x200 + i, i % 8, 7) for i in range(BLKIF_MAX_SEGMENTS_PER_REQUEST))),
    ("discard", 0xDEADBEEFCAFEF00D, 1 << 40, 0x123456789, 0x0CA0, BLKIF_DISCARD_SECURE),
    ("discard", 4, 0, 8, 0x0CA0, 0),
    ("indirect", BLKIF_OP_WRITE, 5, 4096, 0x0CA0, 1000, (0x300, 0x301)),
    ("indirect", BLKIF_OP_READ, 6, 8192, 0x0CA0, 8 * SEGMENTS_PER_INDIRECT_FRAME,
     tuple(0x400 + i for i in range(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST))),
    ("rw", BLKIF_OP_FLUSH_DISKCACHE, 7, 0, 0x0CA0, ()),
    ("rw", BLKIF_OP_WRITE_BARRIER, 8, 16, 0x0CA0, ((0x500, 0, 0),)),
]
GEOMETRIES = [(1, 0), (4, 0xFFFFFFFD)]     # (pages, first index): order 0 fresh; order 2 about to wrap


def _sends(front: Any, back: Any, ring: RingFile, abi: BlkifABI, start: int) -> None:
    """Batch both ways between a frontend and a backend, checked against the specs."""
    for spec in BATCH:
        front.put(spec)
    assert front.free() == front.size - len(BATCH)
    assert front.push() is True                       # the backend waits at req_event = start + 1
    taken = back.take()
    assert [raw for raw, _ in taken] == [spec_bytes(abi, s).hex() for s in BATCH]    # bit for bit
    assert [req for _, req in taken] == [spec_request(s) for s in BATCH]
    assert back.final() is False                      # nothing more; re-arms req_event
    responses = [response_for(req) for _, req in taken]
    for rsp in responses:
        back.respond(*rsp)
    assert back.push() is True                        # the frontend waits at rsp_event = start + 1
    assert front.responses() == responses
    assert front.final() is False                     # re-arms rsp_event
    end = (start + len(BATCH)) & MASK32
    assert ring.header() == (end, (end + 1) & MASK32, end, (end + 1) & MASK32)
    assert front.free() == front.size


@needs_headers
@pytest.mark.parametrize("npages,start", GEOMETRIES)
def test_c_frontend_python_backend(abi_peer: tuple[BlkifABI, str], npages: int, start: int, tmp_path: Any) -> None:
    abi, exe = abi_peer
    with ring_pair(exe, abi, npages, start, "c", "py", str(tmp_path / "ring")) as (front, back, ring):
        _sends(front, back, ring, abi, start)


@needs_headers
@pytest.mark.parametrize("npages,start", GEOMETRIES)
def test_python_frontend_c_backend(abi_peer: tuple[BlkifABI, str], npages: int, start: int, tmp_path: Any) -> None:
    abi, exe = abi_peer
    with ring_pair(exe, abi, npages, start, "py", "c", str(tmp_path / "ring")) as (front, back, ring):
        _sends(front, back, ring, abi, start)


# ---------------------------------------------------------------------------
# 2c. The same script through C/C, Python/C, C/Python and Python/Python
# ---------------------------------------------------------------------------

def random_spec(rng: random.Random, n: int) -> Spec:
    rid = (n << 40) | rng.getrandbits(40)                  # unique, and uses all 8 bytes
    sector, handle = rng.getrandbits(64), rng.getrandbits(16)
    kind = rng.choice(["rw", "rw", "flush", "discard", "indirect"])
    if kind == "rw":
        segs = tuple((rng.getrandbits(32), f, rng.randint(f, 7)) for f in
                     (rng.randint(0, 7) for _ in range(rng.randint(1, BLKIF_MAX_SEGMENTS_PER_REQUEST))))
        return ("rw", rng.choice([BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER]), rid, sector, handle, segs)
    if kind == "flush":
        return ("rw", BLKIF_OP_FLUSH_DISKCACHE, rid, sector, handle, ())
    if kind == "discard":
        return ("discard", rid, sector, rng.getrandbits(64), handle, rng.choice([0, BLKIF_DISCARD_SECURE]))
    grefs = tuple(rng.getrandbits(32) for _ in range(rng.randint(1, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)))
    return ("indirect", rng.choice([BLKIF_OP_READ, BLKIF_OP_WRITE]), rid, sector, handle,
            rng.randint(1, len(grefs) * SEGMENTS_PER_INDIRECT_FRAME), grefs)


@dataclass
class Run:
    trace: list[tuple] = field(default_factory=list)
    produced: list[Spec] = field(default_factory=list)
    taken: list[Taken] = field(default_factory=list)
    collected: list[tuple[int, int, int]] = field(default_factory=list)


def run_script(front: Any, back: Any, ring: RingFile, script: list[tuple[str, Any]], seed: int) -> Run:
    """Play ``script``; record every result and the shared indices after each step.

    produce N: put min(N, room) requests, then RING_FREE_REQUESTS and PUSH_REQUESTS_AND_CHECK_NOTIFY
    consume L: the backend copies out up to L (None: all) requests
    respond N: answer the N oldest answered-not-yet requests, then PUSH_RESPONSES_AND_CHECK_NOTIFY
    back_final / front_final: FINAL_CHECK_FOR_REQUESTS / _RESPONSES (re-arm the event, check again)
    collect: the frontend consumes every published response
    """
    rng = random.Random(seed)
    run = Run()
    pending: collections.deque[Request] = collections.deque()

    def step(name: str, arg: Any) -> None:
        if name == "produce":
            n = min(arg, front.size - (len(run.produced) - len(run.collected)))
            for _ in range(n):
                spec = random_spec(rng, len(run.produced))
                front.put(spec)
                run.produced.append(spec)
            result: Any = (n, front.free(), front.push())
        elif name == "consume":
            result = back.take(arg)
            run.taken += result
            pending.extend(req for _, req in result)
        elif name == "respond":
            n = min(arg, len(pending))
            for _ in range(n):
                back.respond(*response_for(pending.popleft()))
            result = (n, back.push())
        elif name == "back_final":
            result = back.final()
        elif name == "collect":
            result = front.responses()
            run.collected += result
        elif name == "front_final":
            result = front.final()
        else:
            raise ValueError(name)
        run.trace.append((name, arg, result, ring.header()))

    for name, arg in script:
        step(name, arg)
    for _ in range(2):                                     # drain
        step("consume", None)
        step("respond", front.size)
        step("collect", None)
    return run


def check_delivery(run: Run) -> None:
    """Nothing lost, duplicated or reordered; every request decoded as written."""
    assert [req for _, req in run.taken] == [spec_request(s) for s in run.produced]
    assert run.collected == [response_for(spec_request(s)) for s in run.produced]


def compare_with_reference(exe: str, abi: BlkifABI, npages: int, start: int, script: list[tuple[str, Any]],
                           front_kind: str, back_kind: str, tmp_path: Any) -> Run:
    runs = {}
    for kinds in (("c", "c"), (front_kind, back_kind)):
        path = str(tmp_path / f"ring-{kinds[0]}-{kinds[1]}")
        with ring_pair(exe, abi, npages, start, *kinds, path) as (front, back, ring):
            runs[kinds] = run_script(front, back, ring, script, seed=npages * 1000 + start % 977)
    ref, got = runs[("c", "c")], runs[(front_kind, back_kind)]
    check_delivery(ref)
    assert len(got.trace) == len(ref.trace)
    for i, (theirs, ours) in enumerate(zip(ref.trace, got.trace)):
        assert ours == theirs, f"step {i} ({theirs[0]} {theirs[1]}): C/C gave {theirs[2:]}, we gave {ours[2:]}"
    check_delivery(got)
    return ref


COMBOS = [("py", "c"), ("c", "py"), ("py", "py")]
SCRIPT_GEOMETRIES = [(1, 0), (1, 0xFFFFFFFE), (4, 0xFFFFFFFE)]

# Each comment is what ring.h does; the booleans come from the C run and are checked below.
NOTIFY_SCRIPT: list[tuple[str, Any]] = [
    ("produce", 3),        # backend waits at req_event = start + 1: notify
    ("produce", 2),        # backend has not re-armed: suppressed
    ("consume", None),
    ("back_final", None),  # nothing left: req_event = req_cons + 1, no work
    ("produce", 1),        # re-armed: notify
    ("consume", 1),        # backend takes it but does not re-arm...
    ("produce", 1),        # ...so this one is suppressed
    ("back_final", None),  # work already waiting: true, req_event untouched
    ("consume", None),
    ("respond", 4),        # frontend waits at rsp_event = start + 1: notify
    ("respond", 2),        # frontend has not re-armed: suppressed
    ("collect", None),
    ("front_final", None),  # nothing left: rsp_event = rsp_cons + 1, no work
    ("respond", 1),        # re-armed: notify
    ("front_final", None),  # a response is waiting: true
    ("collect", None),
    ("respond", 0),        # pushing nothing never notifies
    ("produce", 0),
]
NOTIFY_EXPECTED = [("push_req", True), ("push_req", False), ("back_final", False), ("push_req", True),
                   ("push_req", False), ("back_final", True), ("push_rsp", True), ("push_rsp", False),
                   ("front_final", False), ("push_rsp", True), ("front_final", True), ("push_rsp", False),
                   ("push_req", False)]


def notify_flags(run: Run) -> list[tuple[str, bool]]:
    out = []
    for name, _, result, _ in run.trace:
        if name == "produce":
            out.append(("push_req", result[2]))
        elif name == "respond":
            out.append(("push_rsp", result[1]))
        elif name.endswith("final"):
            out.append((name, result))
    return out


@needs_headers
@pytest.mark.parametrize("front_kind,back_kind", COMBOS)
@pytest.mark.parametrize("npages,start", SCRIPT_GEOMETRIES)
def test_notification_suppression_matches_c(abi_peer: tuple[BlkifABI, str], npages: int, start: int,
                                            front_kind: str, back_kind: str, tmp_path: Any) -> None:
    abi, exe = abi_peer
    ref = compare_with_reference(exe, abi, npages, start, NOTIFY_SCRIPT, front_kind, back_kind, tmp_path)
    assert notify_flags(ref)[:len(NOTIFY_EXPECTED)] == NOTIFY_EXPECTED
    if start:
        assert ref.trace[-1][3][0] < start, "the indices should have wrapped past 2**32"


def random_script(seed: int, length: int) -> list[tuple[str, Any]]:
    rng = random.Random(seed)
    script: list[tuple[str, Any]] = []
    for _ in range(length):
        name = rng.choices(["produce", "consume", "respond", "back_final", "collect", "front_final"],
                           weights=[4, 3, 3, 2, 3, 2])[0]
        if name == "produce":
            arg: Any = rng.randint(1, 40)
        elif name == "consume":
            arg = rng.choice([None, rng.randint(1, 24)])
        elif name == "respond":
            arg = rng.randint(0, 40)
        else:
            arg = None
        script.append((name, arg))
    return script


def straddling_slots(npages: int, abi: BlkifABI) -> list[int]:
    slot = max(abi.request_size, abi.response_size)
    return [i for i in range(ring_size(npages, abi.request_size, abi.response_size))
            if (RING_HEADER_SIZE + i * slot) // PAGE_SIZE != (RING_HEADER_SIZE + (i + 1) * slot - 1) // PAGE_SIZE]


@needs_headers
@pytest.mark.parametrize("front_kind,back_kind", COMBOS)
@pytest.mark.parametrize("npages,start", [(1, 0), (1, 0xFFFFFFF0), (4, 0xFFFFFF9B)])
def test_random_exchange_matches_c(abi_peer: tuple[BlkifABI, str], npages: int, start: int,
                                   front_kind: str, back_kind: str, tmp_path: Any) -> None:
    abi, exe = abi_peer
    size = ring_size(npages, abi.request_size, abi.response_size)
    script = random_script(seed=npages * 7 + start % 13, length=size + 60)
    ref = compare_with_reference(exe, abi, npages, start, script, front_kind, back_kind, tmp_path)
    # The script did what it is for: every slot used at least twice, the indices wrapped,
    # and both answers of every notify/final check came up.
    assert len(ref.produced) >= 2 * size
    if start:
        assert ref.trace[-1][3][0] < start
    if npages > 1:
        assert straddling_slots(npages, abi), "no slot straddles a page: the multi-page path is not exercised"
    flags = notify_flags(ref)
    for name in ("push_req", "push_rsp", "back_final", "front_final"):
        assert {v for n, v in flags if n == name} == {True, False}, name


@needs_headers
@pytest.mark.parametrize("npages,start", [(1, 0), (4, 0xFFFFFFF0)])
def test_request_prod_overflow_matches_c(abi_peer: tuple[BlkifABI, str], npages: int, start: int,
                                         tmp_path: Any) -> None:
    """A req_prod that claims more requests than the ring holds: C refuses exactly when we raise."""
    abi, exe = abi_peer
    with ring_pair(exe, abi, npages, start, "py", "c", str(tmp_path / "ring")) as (front, back, ring):
        size = front.size
        for ahead in (0, 1, size - 1, size, size + 1, 2 * size, 1 << 31, MASK32):
            ring.set_header(start + ahead, start + 1, start, start + 1)
            theirs = CBack(back.peer, start)                   # re-attach: req_cons back to start
            ours = PyBack(abi, ring)
            try:
                c_count: int | str = len(theirs.take())
            except RingOverflow:
                c_count = "overflow"
            try:
                py_count: int | str = len(ours.take())
            except RingOverflow:
                py_count = "overflow"
            assert py_count == c_count, f"req_prod {ahead} ahead"
            assert c_count == (ahead if ahead <= size else "overflow")


# ---------------------------------------------------------------------------
# 3. Pure Python properties
# ---------------------------------------------------------------------------

def _ring(abi: BlkifABI, npages: int, split: bool, start: int) -> tuple[FrontRing, BackRing, bytearray]:
    buf = bytearray(npages * PAGE_SIZE)
    view = memoryview(buf)
    pages = [view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(npages)] if split else [view]
    shared = SharedRing(pages, abi.request_size, abi.response_size)
    shared.init()
    struct.pack_into("<4I", buf, 0, start, (start + 1) & MASK32, start, (start + 1) & MASK32)
    return FrontRing(shared, init=False), BackRing(shared), buf


starts = st.one_of(st.just(0), st.integers(0, MASK32), st.integers(MASK32 - 300, MASK32))


@settings(max_examples=80, deadline=None)
@given(abi=st.sampled_from([X86_64, X86_32]), npages=st.sampled_from([1, 2, 4]), split=st.booleans(),
       start=starts,
       ops=st.lists(st.tuples(st.sampled_from(["produce", "consume", "respond", "collect", "back_final",
                                               "front_final"]), st.integers(0, 200)), max_size=40))
def test_front_back_never_lose_duplicate_or_reorder(abi: BlkifABI, npages: int, split: bool, start: int,
                                                    ops: list[tuple[str, int]]) -> None:
    front, back, _ = _ring(abi, npages, split, start)
    size = front.size
    sent: list[bytes] = []
    received: list[bytes] = []
    pending: collections.deque[int] = collections.deque()
    answered: list[int] = []
    collected: list[int] = []

    def request(i: int) -> bytes:
        return pack_request(abi, BLKIF_OP_WRITE, i, i * 8, 0x51, [(i & MASK32, 0, 7)])

    def check() -> None:
        assert 0 <= front.free_requests() <= size
        assert front.free_requests() == size - (len(sent) - len(collected))
        assert received == sent[:len(received)]
        assert collected == answered[:len(collected)]

    for name, n in ops:
        if name == "produce":
            room = front.free_requests()
            for _ in range(min(n, room)):
                sent.append(request(len(sent)))
                front.put_request(sent[-1])
            if n > room:
                with pytest.raises(RingOverflow):
                    front.put_request(request(len(sent)))
            front.push_requests()
        elif name == "consume":
            got = back.take_requests(n or None)
            received += got
            pending.extend(parse_request(abi, raw).id for raw in got)
        elif name == "respond":
            for _ in range(min(n, len(pending))):
                rid = pending.popleft()
                back.put_response(pack_response(abi, rid, BLKIF_OP_WRITE, BLKIF_RSP_OKAY))
                answered.append(rid)
            back.push_responses()
        elif name == "collect":
            collected += [parse_response(abi, raw)[0] for raw in front.take_responses()]
        elif name == "back_final":
            assert back.final_check_for_requests() == (len(received) < len(sent))
        else:
            assert front.final_check_for_responses() == (len(collected) < len(answered))
        check()
    # Drain: everything sent comes back, once, in order.
    received += back.take_requests()
    pending.extend(parse_request(abi, raw).id for raw in received[len(answered) + len(pending):])
    while pending:
        rid = pending.popleft()
        back.put_response(pack_response(abi, rid, BLKIF_OP_WRITE, BLKIF_RSP_OKAY))
        answered.append(rid)
    back.push_responses()
    collected += [parse_response(abi, raw)[0] for raw in front.take_responses()]
    check()
    assert received == sent
    assert collected == answered == list(range(len(sent)))
    assert front.free_requests() == size


@settings(max_examples=80, deadline=None)
@given(abi=st.sampled_from([X86_64, X86_32]), npages=st.sampled_from([1, 4]), start=starts,
       outstanding=st.integers(0, 40), data=st.data())
def test_back_ring_refuses_req_prod_beyond_the_ring(abi: BlkifABI, npages: int, start: int, outstanding: int,
                                                    data: st.DataObject) -> None:
    front, back, buf = _ring(abi, npages, split=npages > 1, start=start)
    size = back.size
    # Some requests taken but not yet answered: the bound is relative to rsp_prod_pvt, not req_cons.
    outstanding = min(outstanding, size)
    for i in range(outstanding):
        front.put_request(pack_request(abi, BLKIF_OP_READ, i, 0, 0, []))
    front.push_requests()
    assert len(back.take_requests()) == outstanding
    ahead = data.draw(st.integers(size + 1, MASK32), label="req_prod - rsp_prod")
    struct.pack_into("<I", buf, 0, (start + ahead) & MASK32)
    with pytest.raises(RingOverflow):
        back.take_requests()
    with pytest.raises(RingOverflow):
        back.final_check_for_requests()
    # Exactly a ring ahead is legal: the rest of the ring's requests are there to take.
    struct.pack_into("<I", buf, 0, (start + size) & MASK32)
    assert len(back.take_requests()) == size - outstanding

