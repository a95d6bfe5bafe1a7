"""A hostile frontend's xenstore nodes and departures against blkback (Linux xen-blkback semantics).

Missing or malformed nodes (protocol, ring references, event channels), a
second queue broken after the first was set up, a flapping state, a domain
that dies with requests in flight, a closed event channel, an exhausted
maptrack: the backend closes that one device and lets go of everything it
mapped, and the good device keeps working.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
from blkback_harness import Env, finish, hostile_env, served_rings
from helpers import wait_until
from hostile_vbd import ERR, OK, PAGE, WAIT, sha

from xdom.domains.abi.blkif import (
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    PROTOCOL_X86_64,
    X86_32,
    pack_segments,
)
from xdom.domains.xenbus import XenbusState

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def env(request: pytest.FixtureRequest, run_dir: str) -> Iterator[Env]:
    yield from hostile_env(request, run_dir)


# ---- xenbus ------------------------------------------------------------------------------------

XENBUS_CASES = {
    "ring-ref-not-granted": dict(extra={"ring-ref": 3000}),
    "ring-ref-out-of-table": dict(extra={"ring-ref": 2**32 - 1}),
    "ring-ref-not-a-u32": dict(extra={"ring-ref": 2**40}),
    "ring-ref-garbage": dict(extra={"ring-ref": "0x10"}),
    "ring-ref-read-only": dict(ring_readonly=True),
    "protocol-unknown": dict(protocol="sparc-abi"),
    "ring-page-order-too-big": dict(extra={"ring-page-order": 5, **{f"ring-ref{i}": 9 for i in range(32)}}),
    "queues-zero": dict(extra={"multi-queue-num-queues": 0}),
    "queues-too-many": dict(extra={"multi-queue-num-queues": 99}),
    "event-channel-garbage": dict(extra={"event-channel": "-1"}),
    "event-channel-missing-in-queue": dict(extra={"multi-queue-num-queues": 2, "queue-0/ring-ref": 8,
                                                  "queue-1/ring-ref": 8}),
    "multi-page-ring-one-ref-not-granted": dict(order=2, extra={"ring-ref3": 5000}),
    # indices a frontend leaves in its ring before connecting: the first look finds them impossible
    "req-prod-past-a-ring-before-connect": dict(ring_header=(1000, 0)),
    "rsp-prod-ahead-before-connect": dict(ring_header=(0, 1000)),
}


def test_frontend_without_protocol_node_gets_the_x86_32_layout(env: Env) -> None:
    """No ``protocol`` node: Linux blkback assumes BLKIF_PROTOCOL_DEFAULT, which on x86 is x86_32.

    The requests below are laid out for x86_32 (id at offset 4, 108-byte
    slots, 12-byte responses); a backend that assumed x86_64 would read the
    sector as the id and answer in the wrong slots, and ``expect`` would see
    responses for ids never sent (or none at all).
    """
    h = env.hostile()
    h.connect(protocol=None)
    assert not env.xs.exists(f"{h.path}/protocol")
    assert h.abi is X86_32
    rgfn, rref = h.grant()
    data = bytes(random.Random("no-protocol").randbytes(PAGE))
    _, wref = h.grant(data)
    with env.good_load():
        h.expect([(h.rw(BLKIF_OP_READ, 40, [(rref, 0, 7)]), OK),
                  (h.rw(BLKIF_OP_WRITE, 128, [(wref, 0, 7)]), OK)])
    with open(h.image, "rb") as f:
        f.seek(40 * 512)
        assert bytes(h.host.memory.frame(rgfn)) == f.read(PAGE)
        f.seek(128 * 512)
        assert f.read(PAGE) == data
    h.image_sha = sha(h.image)
    finish(env, h)


@pytest.mark.parametrize("case", list(XENBUS_CASES))
def test_bad_xenbus_nodes_close_the_device(env: Env, case: str) -> None:
    h = env.hostile()
    kw = dict(XENBUS_CASES[case])
    with env.good_load():
        h.connect(expect=XenbusState.Closing, **kw)
    finish(env, h, closed_by_backend=True)


@pytest.mark.parametrize("port", ["not-ours", "huge"])
def test_bad_event_channel_closes_the_device(env: Env, port: str) -> None:
    h = env.hostile()
    if port == "not-ours":
        value = h.host.alloc_unbound(env.good.host.domid)     # a port meant for another domain
    else:
        value = 10**15
    try:
        h.connect(expect=XenbusState.Closing, extra={"event-channel": value}, timeout=5.0)
    except AssertionError:
        # Even so: once the frontend closes, no grant stays mapped, and the good device works
        # (env.after() fails too while the crash is logged).
        h.close()
        env.after()
        raise
    finish(env, h, closed_by_backend=True)


def test_second_queue_broken_releases_the_first(env: Env) -> None:
    """Queue 0 is fine, queue 1's ring is not granted: the device closes and queue 0's ring is unmapped."""
    h = env.hostile()
    h.wait_backend(XenbusState.InitWait)
    gfn, ref = h.grant()
    port = h.host.alloc_unbound(env.be.domid)
    h.port = port
    with env.good_load():
        h.publish({"protocol": PROTOCOL_X86_64, "multi-queue-num-queues": 2,
                   "queue-0/ring-ref": ref, "queue-0/event-channel": port,
                   "queue-1/ring-ref": 4000, "queue-1/event-channel": port}, XenbusState.Initialised)
        h.wait_backend(XenbusState.Closing)
    finish(env, h, closed_by_backend=True)


def test_state_flapping(env: Env) -> None:
    """Initialised / Initialising over and over: rings come and go, no thread or grant leaks."""
    h = env.hostile()
    h.connect()
    with env.good_load():
        for _ in range(30):
            h.set_state(XenbusState.Initialising)
            h.wait_backend(XenbusState.InitWait)
            h.set_state(XenbusState.Initialised)
            h.wait_backend(XenbusState.Connected)
            alive = served_rings(env.server, h.host.domid)
            assert len(alive) == 1, alive
    finish(env, h)


# ---- a frontend that goes away badly ---------------------------------------------------------------

def test_frontend_domain_dies_mid_flight(env: Env) -> None:
    """The hostile guest dies with requests on the ring; the toolstack then removes its nodes."""
    h = env.hostile()
    h.connect(persistent=True)
    assert h.ring is not None
    pages = [h.grant() for _ in range(32)]
    with env.good_load():
        h.expect([(h.rw(BLKIF_OP_READ, 8 * i, [(ref, 0, 7)]), OK) for i, (_, ref) in enumerate(pages)])
        h.send([h.rw(BLKIF_OP_WRITE, 64 + 8 * i, [(ref, 0, 7)]) for i, (_, ref) in enumerate(pages)])
        h.host.close()                       # dies: the hypervisor takes back its grants and ports
        env.dead.append(h.host)
        env.xs.rm(h.be_path)                 # what libxl does for a destroyed domain
        env.xs.rm(h.path)
        wait_until(lambda: (h.host.domid, h.devid) not in env.server.vbds, WAIT, "the vbd to be removed")
        wait_until(lambda: not served_rings(env.server, h.host.domid),
                   WAIT, "blkback to stop serving the dead guest's ring")
    be_dom = env.hv.hv.domains[env.be.domid]

    def left() -> list[object]:
        return [m for m in list(be_dom.maptrack.values()) if m.granter.domid == h.host.domid]
    # the ring's grants go right after its thread has stopped (and the vbd left the table before that)
    wait_until(lambda: not left(), WAIT, "the backend to unmap the dead guest's grants")
    assert os.path.getsize(h.image) == h.image_size
    env.after()


def test_frontend_closes_its_event_channel(env: Env) -> None:
    """The frontend closes its port while connected, then pushes and closes the device: nothing breaks."""
    h = env.hostile()
    h.connect()
    _, ref = h.grant()
    with env.good_load():
        h.expect([(h.rw(BLKIF_OP_READ, 0, [(ref, 0, 7)]), OK)])
        h.host.close_port(h.port)
        h.port = -1
        assert h.ring is not None
        h.ring.put_request(h.rw(BLKIF_OP_READ, 8, [(ref, 0, 7)]))
        h.ring.push_requests()               # no way to notify any more
        h.close()
    env.after()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("env", [{"good_persistent": False}], indirect=True, ids=["good-not-persistent"])
def test_maptrack_exhaustion_does_not_hurt_other_devices(env: Env) -> None:
    h = env.hostile(grant_frames=256)                   # 131072 grant references, as xl's max_grant_frames allows
    h.connect(order=4)
    assert h.ring is not None and h.ring.size == 512
    (gfn,) = h.pool.alloc(1)
    gt = h.host.gnttab
    raws = []
    for _ in range(500):
        refs = [gt.grant_access(env.be.domid, gfn) for _ in range(256)]     # one frame, granted many times
        h.refs += refs
        _, iref = h.grant(pack_segments([(r, 0, 7) for r in refs]))
        raws.append(h.indirect(BLKIF_OP_READ, 0, 256, [iref]))
    with env.good_load():
        for _ in range(2):
            got = h.roundtrip(raws, timeout=90)
            assert all(status in (OK, ERR) for _, status in got.values())
    finish(env, h)
