"""blkfront and netfront against a compromised backend domain's xenstore nodes (Linux xen-blkfront/-netfront).

The backend domain owns ``/local/domain/<be>/backend/vbd|vif/<fe>/<devid>``
and writes what it likes there.  Here the test is that backend: a real
xenstored, in-process (local) domains, the real frontends, and the
backend's nodes written by hand: feature offers of "2", "-1", "yes", "",
20-digit numbers, "0x10", 4000-byte values; disk geometries that are zero,
negative, not a power of two or past blkif's 64-bit sector numbers;
``state`` values outside XenbusState, flapping between states, nodes
removed mid-handshake.  A correct frontend clamps to its own limits or
refuses the device (stays short of Connected, ``connect()`` raises), never
raises out of its threads (the xenstore watch thread runs its steps),
never takes frames or grants beyond its own bounds, and never connects
with a geometry that makes later I/O wrong; another disk of the guest, on
an honest blkback, keeps working throughout.

netfront reads no ``mac`` from the backend (the guest's address is the
toolstack's ``mac`` node in the frontend's own directory): a malformed
backend ``mac`` is written below only to show that it changes nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from helpers import wait_until
from xs_fixtures import introduce, start_xenstored

from xdom.deploy.vbd import VbdConfig, add_vbd
from xdom.deploy.vif import VifConfig, add_vif
from xdom.domains.blkfront.device import Blkfront, BlkfrontError, FrontendOptions
from xdom.domains.blkfront.negotiate import BACKEND_FEATURES, MAX_INDIRECT_SEGMENTS
from xdom.domains.grant_table import GrantTableFull
from xdom.domains.netfront.device import Netfront, NetfrontError
from xdom.domains.xenbus import XenbusState, backend_path, read_or_none, read_state
from xdom.domains.xenhost import LocalHypervisor
from xdom.domains.xenstore import XenstoreClient

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")]

S = XenbusState
VBD, VBD2, VIF = 51712, 51728, 0           # xvda, xvdb, eth0
LONG = "7" * 3900                          # near xenstore's 4096-byte payload, path included
HOSTILE = ["2", "-1", "yes", "", "99999999999999999999", "0x10", "40", " 3 ", "1e3", "\xff", LONG]
BAD_STATES = ["99", "-1", "connected", "", "4x", "0x4", LONG]
# What a Linux-like blkfront/netfront offers at most here (the frontend's own bounds).
BLK_OPTIONS = FrontendOptions(queues=2, ring_page_order=1, max_persistent_frames=64)
NET_MAX_QUEUES = 2


class NullPort:
    """netfront's packet port with nothing on the other side (no TAP, no root needed)."""

    name = "null"

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)      # never readable: no frames to send
        self.offloads: list[int] = []

    def fileno(self) -> int:
        return self._fd

    def control_fileno(self) -> int | None:
        return None

    def control(self) -> bool:
        return False

    def poll_interval(self) -> float | None:
        return None

    def read_batch(self, limit: int) -> list[Any]:
        return []

    def write_batch(self, frames: Sequence[tuple[bytes, bytes]]) -> None:
        pass

    def set_offloads(self, tun_flags: int) -> None:
        self.offloads.append(tun_flags)

    def close(self) -> None:
        os.close(self._fd)


class Connecting:
    """``front.connect(timeout)`` on a thread of its own (as the guest's attach does): the error it raised."""

    def __init__(self, front: Any, timeout: float = 5.0) -> None:
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(front, timeout), daemon=True)
        self._thread.start()

    def _run(self, front: Any, timeout: float) -> None:
        try:
            front.connect(timeout)
        except BaseException as e:          # noqa: BLE001 (the test looks at it)
            self.error = e

    def result(self, timeout: float = 10.0) -> BaseException | None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "connect() never returned"
        return self.error


class Hostile:
    """A xenstored, a guest domain and a backend domain with no backend running in it: the test writes the
    backend's nodes.  ``xs`` is dom0's client; each frontend gets a client of its own."""

    def __init__(self, run_dir: str) -> None:
        self.xenstored = start_xenstored(run_dir)
        self.hv = LocalHypervisor()
        self.be = self.hv.create_domain("evil", "1M")
        self.fe = self.hv.create_domain("guest", "16M")
        self.clients: list[XenstoreClient] = []
        self.fronts: list[Any] = []
        self.xs = self.client()
        introduce(self.xs, self.be.domid, self.fe.domid)

    def client(self) -> XenstoreClient:
        c = XenstoreClient.unix(self.xenstored.socket_path)
        self.clients.append(c)
        return c

    def vbd(self, devid: int = VBD, options: FrontendOptions = BLK_OPTIONS) -> tuple[Blkfront, str]:
        add_vbd(self.xs, VbdConfig(self.be.domid, self.fe.domid, devid, "xvdz", "/nonexistent.img"))
        front = Blkfront(self.fe, self.client(), devid, options)
        self.fronts.append(front)
        return front, backend_path(self.be.domid, "vbd", self.fe.domid, devid)

    def vif(self, devid: int = VIF) -> tuple[Netfront, str]:
        add_vif(self.xs, VifConfig(self.be.domid, self.fe.domid, devid, "00:16:3e:00:00:01"))
        front = Netfront(self.fe, self.client(), devid, port=NullPort(), max_queues=NET_MAX_QUEUES)
        self.fronts.append(front)
        return front, backend_path(self.be.domid, "vif", self.fe.domid, devid)

    def write(self, base: str, **nodes: str) -> None:
        self.xs.write_many({f"{base}/{k.replace('_', '-')}": v for k, v in nodes.items()})

    def state_of(self, front: Any) -> XenbusState:
        return read_state(self.xs, front.path)

    def wait_front(self, front: Any, state: XenbusState) -> None:
        wait_until(lambda: self.state_of(front) == state and front.state == state, what=f"frontend {state.name}")

    def close(self) -> None:
        try:
            for f in self.fronts:
                f.close(0) if isinstance(f, Blkfront) else f.close()
            for c in self.clients:
                c.close()
            self.fe.close()
            self.be.close()
            self.hv.close()
            for dom in (self.fe, self.be):
                dom.memory.close()
        finally:
            self.xenstored.stop()


@pytest.fixture
def hostile(run_dir: str) -> Iterator[Hostile]:
    h = Hostile(run_dir)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def quiet_watches(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """After the test: no frontend step raised out into the xenstore watch thread ("watch callback failed")
    and no data thread hit an unexpected error."""
    with caplog.at_level(logging.ERROR):
        yield
    bad = [r.getMessage() for r in caplog.get_records("setup") + caplog.get_records("call")
           if r.name == "xdom.xenstore" or "data path error" in r.getMessage() or r.exc_info]
    assert not bad, bad


def grants_free(h: Hostile) -> int:
    return len(h.fe.gnttab._free)


def read(front: Blkfront, offset: int, length: int) -> int | str:
    """One read's completion status, or the exception submit_read raised instead of completing."""
    got: list[int] = []
    done = threading.Event()

    def complete(error: int, data: object = None) -> None:
        got.append(error)
        done.set()
    try:
        front.submit_read(offset, length, complete)
    except Exception as e:               # noqa: BLE001
        return f"raised {type(e).__name__}: {e}"
    return got[0] if done.wait(2) else "never completed"


# ---- blkfront: the backend's offer ---------------------------------------------------------------------

@pytest.mark.usefixtures("quiet_watches")
@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: repr(v)[:24])
def test_blkfront_clamps_every_offer_to_its_own_limits(hostile: Hostile, value: str) -> None:
    """Every feature node (queues, ring order, indirect segments, persistent, flush, discard) set to one
    hostile value: the terms stay within the frontend's own options, and the rings it grants are exactly
    what those terms need (no frame or grant in proportion to the backend's number)."""
    front, be = hostile.vbd()
    frames0, grants0 = front.pool.available(), grants_free(hostile)
    hostile.write(be, **{k.replace("-", "_"): value for k in BACKEND_FEATURES}, state="2")
    connecting = Connecting(front)
    hostile.wait_front(front, S.Initialised)
    t = front._terms
    assert 1 <= t.queues <= BLK_OPTIONS.queues and 0 <= t.ring_page_order <= BLK_OPTIONS.ring_page_order
    assert 1 <= t.max_segments <= MAX_INDIRECT_SEGMENTS
    ring_frames = t.queues << t.ring_page_order
    assert [q["ring_pages"] for q in front.queue_stats()] == [1 << t.ring_page_order] * t.queues
    assert frames0 - front.pool.available() == ring_frames and grants0 - grants_free(hostile) == ring_frames
    published = {k: read_or_none(hostile.xs, f"{front.path}/{k}") for k in ("ring-page-order",
                                                                               "multi-queue-num-queues")}
    assert int(published["ring-page-order"] or 0) == t.ring_page_order
    assert int(published["multi-queue-num-queues"] or 1) == t.queues
    hostile.write(be, sectors="2048", sector_size="512", state="4")
    assert connecting.result() is None and front.state == S.Connected
    front.close(0)
    assert front.pool.available() == frames0 and grants_free(hostile) == grants0


@pytest.mark.usefixtures("quiet_watches")
def test_blkfront_out_of_grant_references_part_way_keeps_nothing_and_connects_later(hostile: Hostile) -> None:
    """Grant references run out while the rings are being made (a backend that keeps old rings mapped
    across flaps leaves their grants deferred; here the test holds all but three): the step fails as a
    step -- connect() raises, nothing escapes into the watch thread -- and the half-made queue's frames
    and grants come back; with references free again the device connects.  (A hole when written:
    GrantTableFull escaped the step, and the half-made queue's frames and grants were kept.)"""
    front, be = hostile.vbd()              # 2 queues of 2 ring pages: 4 grants
    frames0 = front.pool.available()
    gnttab, held = hostile.fe.gnttab, []
    with pytest.raises(GrantTableFull):
        while True:
            held.append(gnttab.grant_access(hostile.be.domid, 0))
    for ref in held[-3:]:
        assert gnttab.try_end_access(ref)
        gnttab.release_ref(ref)
    del held[-3:]
    hostile.write(be, multi_queue_max_queues="2", max_ring_page_order="1", state="2")
    error = Connecting(front, timeout=3.0).result()
    assert isinstance(error, BlkfrontError) and front.state != S.Connected, error
    assert front.pool.available() == frames0 and grants_free(hostile) == 3
    for ref in held:
        assert gnttab.try_end_access(ref)
        gnttab.release_ref(ref)
    hostile.write(be, state="1")           # the backend goes round again: the frontend makes its rings anew
    hostile.write(be, state="2")
    hostile.wait_front(front, S.Initialised)
    hostile.write(be, sectors="2048", sector_size="512", state="4")
    wait_until(lambda: front.state == S.Connected, what="the device connected once references are free")


# ---- blkfront: the disk's geometry ---------------------------------------------------------------------

# (nodes the Connected backend writes, what a correct frontend makes of them: "refuse", or (size, sector size))
GEOMETRY = {
    "sectors 0": ({"sectors": "0"}, (0, 512)),
    "sectors -1": ({"sectors": "-1"}, "refuse"),
    "sectors empty": ({"sectors": ""}, "refuse"),
    "sectors hex": ({"sectors": "0x10"}, "refuse"),
    "sectors float": ({"sectors": "1e3"}, "refuse"),
    "sectors 3900 digits": ({"sectors": LONG}, "refuse"),
    "sectors absent": ({}, "refuse"),
    "sector-size 0": ({"sectors": "64", "sector-size": "0"}, (64 * 512, 512)),
    "sector-size 1": ({"sectors": "64", "sector-size": "1"}, "refuse"),
    "sector-size 3000": ({"sectors": "64", "sector-size": "3000"}, "refuse"),
    "sector-size 1024": ({"sectors": "64", "sector-size": "1024"}, "refuse"),
    "sector-size 2**40": ({"sectors": "64", "sector-size": str(2**40)}, "refuse"),
    "sector-size 2**64": ({"sectors": "64", "sector-size": str(2**64)}, "refuse"),
    "sector-size -4096": ({"sectors": "64", "sector-size": "-4096"}, (64 * 512, 512)),
    "sector-size 4096": ({"sectors": "64", "sector-size": "4096"}, (64 * 512, 4096)),
    "physical-sector-size nonsense": ({"sectors": "64", "physical-sector-size": "3"}, (64 * 512, 512)),
    "info huge": ({"sectors": "64", "info": "99999999999999999999"}, (64 * 512, 512)),
    "largest u64 sector count": ({"sectors": str(2**64 - 1)}, ((2**64 - 1) * 512, 512)),
}


@pytest.mark.usefixtures("quiet_watches")
@pytest.mark.parametrize("case", list(GEOMETRY))
def test_blkfront_refuses_or_keeps_a_geometry_every_later_io_is_right_for(hostile: Hostile, case: str) -> None:
    """Refused: connect() raises, the frontend stays Initialised (never Connected) and close() gives back
    every frame and grant.  Kept: sizes in 512-byte sectors, a logical sector of 512 or 4096, and the
    I/O checks made against that geometry (no ZeroDivisionError, nothing past the end, no exception)."""
    nodes, expected = GEOMETRY[case]
    front, be = hostile.vbd()
    frames0, grants0 = front.pool.available(), grants_free(hostile)
    hostile.write(be, state="2")
    connecting = Connecting(front)
    hostile.wait_front(front, S.Initialised)
    hostile.xs.write_many({f"{be}/{k}": v for k, v in {**nodes, "state": "4"}.items()})
    error = connecting.result()
    if expected == "refuse":
        assert isinstance(error, BlkfrontError) and "did not connect" not in str(error), error    # refused, at once
        assert front.state == S.Initialised and hostile.state_of(front) == S.Initialised
        front.close(0)
        assert front.pool.available() == frames0 and grants_free(hostile) == grants0
        return
    assert error is None and front.state == S.Connected
    assert isinstance(expected, tuple)
    size, sector = expected
    assert (front.size, front.sector_size) == (size, sector)
    assert front.size // 512 < 2**64                      # addressable by blkif's uint64 sector_number
    assert read(front, front.size, sector) == errno.EINVAL               # past the end
    assert read(front, 0, sector // 2 or 1) == errno.EINVAL              # not whole sectors
    if size == 0:
        assert read(front, 0, sector) == errno.EINVAL


@pytest.mark.usefixtures("quiet_watches")
def test_blkfront_refuses_a_sector_count_past_what_blkif_can_address(hostile: Hostile) -> None:
    front, be = hostile.vbd()
    hostile.write(be, state="2")
    connecting = Connecting(front)
    hostile.wait_front(front, S.Initialised)
    hostile.write(be, sectors=str(2**64 + 7), sector_size="512", state="4")
    error = connecting.result()
    # Refused, as Linux's u64 sector_t refuses it (a hole when written: blkfront connected, and a read of
    # a sector past 2**64 raised struct.error out of submit_read and wedged every later I/O of the disk).
    assert isinstance(error, BlkfrontError) and front.state != S.Connected, \
        f"connected with {front.size // 512} sectors"


@pytest.mark.usefixtures("quiet_watches")
def test_blkfront_refuses_a_disk_whose_nodes_vanish_mid_handshake(hostile: Hostile) -> None:
    """The backend publishes its disk, then removes the nodes and its whole directory between our
    Initialised and its Connected: connect() fails naming the missing node, nothing is left granted."""
    front, be = hostile.vbd()
    frames0, grants0 = front.pool.available(), grants_free(hostile)
    hostile.write(be, feature_persistent="1", max_ring_page_order="1", multi_queue_max_queues="2", state="2")
    connecting = Connecting(front)
    hostile.wait_front(front, S.Initialised)
    assert front.pool.available() < frames0
    hostile.write(be, sectors="64", sector_size="512")
    hostile.xs.rm(f"{be}/sectors")
    hostile.xs.rm(f"{be}/sector-size")
    hostile.write(be, state="4")
    error = connecting.result()
    assert isinstance(error, BlkfrontError) and "sectors missing" in str(error)
    assert front.state == S.Initialised
    hostile.xs.rm(be)                      # the state node too: Unknown, which a frontend in Initialised waits out
    threading.Event().wait(0.1)
    assert front.state == S.Initialised and hostile.state_of(front) == S.Initialised
    front.close(0)
    assert front.pool.available() == frames0 and grants_free(hostile) == grants0


# ---- both: the state node ------------------------------------------------------------------------------

def _flap(hostile: Hostile, be: str, rounds: int) -> None:
    """What the backend writes as fast as it can: every state short of a detach (Closing and Closed are one,
    final for the frontend, tested apart), garbage between them."""
    seq = ["2", "4", "1", "4", "2", "0", "4", "2", "7", "3", "8", "4"]
    for i in range(rounds):
        hostile.xs.write(f"{be}/state", seq[i % len(seq)])
        hostile.xs.write(f"{be}/state", BAD_STATES[i % len(BAD_STATES)])


@pytest.mark.usefixtures("quiet_watches")
def test_blkfront_answers_garbage_states_and_flapping_without_leaking(hostile: Hostile) -> None:
    """States outside XenbusState before InitWait allocate nothing and write nothing; after connecting,
    a backend flapping through every state (restarts, as xdom reads InitWait while Connected) and garbage
    200 times leaves, once it settles, one connection's rings: not one per flap."""
    front, be = hostile.vbd()
    frames0, grants0 = front.pool.available(), grants_free(hostile)
    connecting = Connecting(front, timeout=8)
    for bad in BAD_STATES:
        hostile.write(be, state=bad)
        threading.Event().wait(0.02)
    assert front.state == S.Initialising and hostile.state_of(front) == S.Initialising
    assert front.pool.available() == frames0 and grants_free(hostile) == grants0
    hostile.write(be, multi_queue_max_queues="99999999999999999999", max_ring_page_order="40", state="2")
    hostile.wait_front(front, S.Initialised)
    hostile.write(be, state="99")
    threading.Event().wait(0.05)
    assert front.state == S.Initialised
    hostile.write(be, sectors="64", state="4")
    assert connecting.result() is None and front.state == S.Connected
    used = frames0 - front.pool.available(), grants0 - grants_free(hostile)
    assert used == (4, 4)                                  # 2 queues of 2-page rings: the frontend's options
    _flap(hostile, be, 200)
    hostile.write(be, state="2")
    hostile.wait_front(front, S.Initialised)
    hostile.write(be, state="4")
    hostile.wait_front(front, S.Connected)
    assert front._thread.is_alive() and front.reconnects >= 1
    assert (frames0 - front.pool.available(), grants0 - grants_free(hostile)) == used
    assert len(front._queues) == 2
    hostile.write(be, state="5")                           # a detach: Closing, Closed, and final
    hostile.wait_front(front, S.Closed)
    hostile.write(be, state="2")
    threading.Event().wait(0.05)
    assert front.state == S.Closed and not front._queues
    assert read(front, 0, 512) == errno.ENODEV
    front.close(0)
    assert front.pool.available() == frames0 and grants_free(hostile) == grants0


# ---- netfront ------------------------------------------------------------------------------------------

NET_OFFER = ["multi-queue-max-queues", "feature-split-event-channels", "feature-sg", "feature-gso-tcpv4",
             "feature-gso-tcpv6", "feature-ipv6-csum-offload"]


def queue_frames(front: Netfront) -> int:
    return sum(len(q.gfns) for q in front._queues)


@pytest.mark.usefixtures("quiet_watches")
@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: repr(v)[:24])
def test_netfront_clamps_every_offer_to_its_own_limits(hostile: Hostile, value: str) -> None:
    """Every offer node (queues, split event channels, sg, gso, csum) and a malformed ``mac`` set to one
    hostile value: at most the frontend's own max_queues, each queue the same fixed set of frames, the
    published nodes agreeing; Connected, and everything given back at close."""
    front, be = hostile.vif()
    frames0, grants0 = front.pool.available(), grants_free(hostile)
    hostile.write(be, **{k.replace("-", "_"): value for k in NET_OFFER}, mac=value or "zz:zz")
    hostile.write(be, state="2")
    connecting = Connecting(front)
    hostile.wait_front(front, S.Initialised)
    n = front.queues
    assert 1 <= n <= NET_MAX_QUEUES
    well_formed = value.strip().isdigit() and len(value.strip()) <= 20      # else it reads as absent: one queue
    assert n == (NET_MAX_QUEUES if well_formed and int(value) >= NET_MAX_QUEUES else 1)
    per_queue = {len(q.gfns) for q in front._queues}
    assert len(per_queue) == 1 and per_queue.pop() <= 514            # 256 + 256 pages + 2 rings
    used = frames0 - front.pool.available()
    assert used == queue_frames(front) and grants0 - grants_free(hostile) == used
    published = read_or_none(hostile.xs, f"{front.path}/multi-queue-num-queues")
    assert int(published or 1) == n
    hostile.write(be, state="4")
    assert connecting.result() is None and front.state == S.Connected
    assert read_or_none(hostile.xs, f"{front.path}/mac") == b"00:16:3e:00:00:01"   # the toolstack's, untouched
    front.close()
    assert front.pool.available() == frames0 and grants_free(hostile) == grants0


@pytest.mark.usefixtures("quiet_watches")
def test_netfront_answers_garbage_states_flapping_and_a_vanished_backend(hostile: Hostile) -> None:
    """Garbage states before InitWait cost nothing; a backend that removes its directory between our
    Initialised and its Connected leaves connect() timing out (not Connected) with rings released at
    close; on a second vif, flapping 200 times ends in one connection's frames."""
    front, be = hostile.vif()
    frames0, grants0 = front.pool.available(), grants_free(hostile)
    connecting = Connecting(front, timeout=1.0)
    for bad in BAD_STATES:
        hostile.write(be, state=bad)
    threading.Event().wait(0.1)
    assert front.state == S.Initialising and front.pool.available() == frames0
    hostile.write(be, state="2")
    hostile.wait_front(front, S.Initialised)
    hostile.xs.rm(be)
    error = connecting.result()
    assert isinstance(error, NetfrontError) and front.state == S.Initialised
    front.close()
    assert front.pool.available() == frames0 and grants_free(hostile) == grants0

    front2, be2 = hostile.vif(devid=1)
    hostile.write(be2, multi_queue_max_queues="2", feature_split_event_channels="1", state="2")
    connecting = Connecting(front2)
    hostile.wait_front(front2, S.Initialised)
    hostile.write(be2, state="4")
    assert connecting.result() is None
    used = frames0 - front2.pool.available(), grants0 - grants_free(hostile)
    _flap(hostile, be2, 200)
    hostile.write(be2, state="2")
    hostile.wait_front(front2, S.Initialised)
    hostile.write(be2, state="4")
    hostile.wait_front(front2, S.Connected)
    assert front2._thread.is_alive() and front2.stats["reconnects"] >= 1 and front2.queues == 2
    assert (frames0 - front2.pool.available(), grants0 - grants_free(hostile)) == used
    front2.close()
    assert front2.pool.available() == frames0 and grants_free(hostile) == grants0


# ---- another disk of the same guest, on an honest blkback ------------------------------------------------

rig = __import__("test_blk_matrix").rig          # xenstored, a real blkback domain and the guest's domain


@pytest.mark.usefixtures("quiet_watches")
def test_a_hostile_backends_disk_costs_the_guests_other_disk_nothing(rig: Any) -> None:
    """The guest's xvda on a real blkback; xvdb's backend (another domain) writes hostile offers, garbage
    states, flaps, then an unusable geometry: xvdb is refused, and xvda reads its image throughout."""
    path = rig.image()
    good = rig.attach(path)
    with open(path, "rb") as f:
        head = f.read(65536)
    evil = rig.hv.create_domain("evil", "1M")
    try:
        introduce(rig.xs, evil.domid)
        add_vbd(rig.xs, VbdConfig(evil.domid, rig.fe.domid, VBD2, "xvdb", "/nonexistent.img"))
        be = backend_path(evil.domid, "vbd", rig.fe.domid, VBD2)
        bad = Blkfront(rig.fe, rig.client(), VBD2, BLK_OPTIONS)
        rig.fronts.append(bad)
        connecting = Connecting(bad)
        rig.xs.write_many({f"{be}/{k}": "99999999999999999999" for k in BACKEND_FEATURES})
        for i in range(100):
            rig.xs.write(f"{be}/state", ["2", "99", "4", "text", "1"][i % 5])
            if i % 20 == 0:
                assert read_bytes(good, 0, 65536) == head
        rig.xs.write(f"{be}/state", "2")
        wait_until(lambda: read_state(rig.xs, bad.path) == S.Initialised, what="xvdb Initialised")
        rig.xs.write_many({f"{be}/sectors": "64", f"{be}/sector-size": "3", f"{be}/state": "4"})
        assert isinstance(connecting.result(), BlkfrontError)
        assert read_bytes(good, 0, 65536) == head
        assert good.state == S.Connected and good._thread.is_alive()
        bad.close(0)
        assert read_bytes(good, 4096, 4096) == head[4096:8192]
    finally:
        evil.close()


def read_bytes(front: Blkfront, offset: int, length: int) -> bytes:
    out: list[bytes] = []
    done = threading.Event()

    def complete(error: int, data: Any = None) -> None:
        assert error == 0, errno.errorcode.get(error, error)
        out.append(b"".join(bytes(d) for d in data))
        done.set()
    front.submit_read(offset, length, complete)
    assert done.wait(10), "read never completed"
    return out[0]
