"""The toolstack's device nodes against what hostile domains put in xenstore (deploy/xsdevice.py, vbd.py, vif.py,
devices.py), on a real xenstored, and on a real supervised host where the attack needs one.

What a domain controls here: the nodes it owns.  A guest owns its frontend directory
(``/local/domain/FE/device/vbd/DEV``) and everything it creates below it; a backend owns its backend
directory.  Both may write as deep, as wide and as often as xenstored's quotas allow (nodes per domain,
path length, no rate limit).  The toolstack rewrites both directories whenever either end (re)starts
(``add_device``: one transaction that reads and re-permissions the nodes below each directory, node by
node after a few conflicts) and waits for the backend to say Closed on detach (``remove_device``).

Four holes were found here in the tenth session, each closed by the test that found it: a tree as deep
as the quotas allow made the re-permissioning recurse into a RecursionError that ended the supervisor
(and every domain); a domain rewriting its own ``state`` node without pause made every transaction
conflict, so the other end (a backend serving every guest) was never set up again; one device whose
nodes could not be written cost its guest all of them; and a xenstored answering TRANSACTION_START
with a non-number or an id past 2**32 raised out of the supervisor's handlers.

A compromised xenstored domain is a driver domain too: what it answers must cost at most the store,
never the supervisor (whose handlers catch XenstoreError, OSError and TimeoutError: devices.py
``Devices._introduce``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import test_supervisor as ts
from helpers import wait_until
from xs_core_harness import T, home_for, xs_with_dom0
from xs_fixtures import Xenstored, introduce

from xdom.backends.xenstored.quota import Quota
from xdom.deploy.control import ControlClient, endpoint_for
from xdom.deploy.vbd import VbdConfig, add_vbd, remove_vbd
from xdom.deploy.vif import VifConfig, add_vif, remove_vif
from xdom.domains.abi.xs_wire import Message, MessageReader, XenstoreError, XsType
from xdom.domains.xenbus import XenbusState
from xdom.domains.xenstore import UnixTransport, XenstoreClient

pytestmark = pytest.mark.timeout(60)

BE, FE, DEVID = 3, 7, 51712
BE_PATH = f"/local/domain/{BE}/backend/vbd/{FE}/{DEVID}"
FE_PATH = f"/local/domain/{FE}/device/vbd/{DEVID}"
CFG = VbdConfig(BE, FE, DEVID, "xvda", "/srv/g1.img", export="/run/xdom/g1-xvda.sock")

# What the supervisor's xenstore handlers survive (devices.py Devices._introduce, _on_store_up, ...).
SURVIVED = (XenstoreError, OSError, TimeoutError)


@pytest.fixture
def xs(xs: XenstoreClient) -> XenstoreClient:
    introduce(xs, BE, FE)
    return xs


def in_thread(fn: Callable[[], object], timeout: float = 30.0) -> object:
    """``fn()`` on a fresh thread (the shallowest Python stack there is); its result or its exception."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:      # noqa: BLE001 -- handed back to the test
            out.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} hung"
    return out[0]


def deepest_chain_a_guest_can_own() -> int:
    """How many levels a guest can hang below its frontend directory, as itself, within xenstored's default
    quotas (the sans-IO core: nodes per domain and path length are what stop it)."""
    core = xs_with_dom0()
    home_for(core, FE)
    home_for(core, BE)
    core.mkdir("dom0", FE_PATH)
    core.set_perms("dom0", FE_PATH, f"n{FE}", f"r{BE}")
    for key in ("backend", "backend-id", "state", "virtual-device", "device-type", "xdom-export", "ring-ref",
                "event-channel", "protocol"):
        core.write("dom0", f"{FE_PATH}/{key}", b"1")
    path, depth = FE_PATH, 0
    while core.raw(f"dom{FE}", T.XS_WRITE, f"{path}/a".encode() + b"\0").type != T.XS_ERROR:
        path += "/a"
        depth += 1
    return depth


def owned_by(xs: XenstoreClient, domid: int, path: str = "/local") -> int:
    """How many nodes at and below ``path`` ``domid`` owns (what counts against its node quota)."""
    n = int(xs.get_perms(path)[0] == f"n{domid}")
    return n + sum(owned_by(xs, domid, f"{path}/{c}") for c in xs.directory(path))


def reachable_depth(xs: XenstoreClient, domid: int, top: str) -> int:
    """The longest chain ``domid`` could still hang below ``top`` itself: what is left of its node quota, and of
    the path-length quota below /local/domain/<domid>/ (2 bytes a level)."""
    quota = Quota()
    rel = len(top) - len(f"/local/domain/{domid}/")
    return min(quota.nodes - owned_by(xs, domid) - 1, (quota.path_max - rel) // 2)


def back_again(h: ts.Host, name: str, old_pid: int) -> bool:
    """``name`` runs again, in a process other than ``old_pid`` (one row: state and pid of the same moment)."""
    with ControlClient(endpoint_for(h.layout.control_socket), timeout=1) as c:
        try:
            r = c.request("info", name=name)["domain"]
        except TimeoutError:
            return False                # a supervisor that died meanwhile: the caller's wait says so
    return r["state"] == "running" and r["pid"] != old_pid


def hang_chain(xs: XenstoreClient, top: str, depth: int) -> None:
    """``top/a/a/...`` ``depth`` levels deep, inheriting ``top``'s owner (written as dom0, owned as the domain
    would own what it wrote itself)."""
    def body(tx: int) -> None:
        path = top
        for _ in range(depth):
            path += "/a"
            xs.write(path, "", tx)
    xs.transaction(body)


# ---- depth ---------------------------------------------------------------------------------------

def test_a_guest_can_own_a_chain_nearly_a_thousand_levels_deep() -> None:
    """The premise of the next tests: the default quotas let a guest hang ~990 levels below its device."""
    assert deepest_chain_a_guest_can_own() >= 980


def test_a_moderately_deep_frontend_tree_is_rewritten(xs: XenstoreClient) -> None:
    add_vbd(xs, CFG)
    hang_chain(xs, FE_PATH, 300)
    assert in_thread(lambda: add_vbd(xs, CFG)) is None
    assert xs.get_perms(FE_PATH + "/a" * 300) == [f"n{FE}", f"r{BE}"]


def test_a_frontend_tree_as_deep_as_the_quotas_allow_is_rewritten(xs: XenstoreClient) -> None:
    add_vbd(xs, CFG)
    hang_chain(xs, FE_PATH, deepest_chain_a_guest_can_own())
    result = in_thread(lambda: add_vbd(xs, CFG))        # a backend restart writes the device again
    assert result is None or isinstance(result, SURVIVED), repr(result)


def test_a_guests_deep_frontend_tree_does_not_end_the_supervisor_when_blkback_restarts(run_dir: str) -> None:
    text = ts.one_disk(run_dir, blkback='restart = "always"\nrestart_backoff = 0.1\n')
    with ts.Host(run_dir, text, ready_timeout=8.0) as h:
        ps = h.ps()
        g = ps["g1"]["domid"]
        fe = f"/local/domain/{g}/device/vbd/51712"
        with XenstoreClient.unix(h.layout.xenstored_link) as xs:
            assert xs.get_perms(fe)[0] == f"n{g}"        # the guest's: what it hangs below is its own
            hang_chain(xs, fe, reachable_depth(xs, g, fe))
        old = ps["blk0"]["pid"]
        os.kill(old, signal.SIGKILL)                     # blkback crashes (or is restarted by hand)
        wait_until(lambda: h.thread is None or not h.thread.is_alive() or back_again(h, "blk0", old), 15,
                   "blk0 back")
        assert h.error is None and h.thread is not None and h.thread.is_alive(), repr(h.error)
        assert h.row("g1")["state"] == "running"


def test_a_blkbacks_deep_tree_does_not_end_the_supervisor_when_its_guest_restarts(run_dir: str) -> None:
    text = ts.one_disk(run_dir, guest='restart = "always"\nrestart_backoff = 0.1\n')
    with ts.Host(run_dir, text, ready_timeout=8.0) as h:
        ps = h.ps()
        b = ps["blk0"]["domid"]
        be = f"/local/domain/{b}/backend/vbd/{ps['g1']['domid']}/51712"
        os.kill(ps["blk0"]["pid"], signal.SIGSTOP)      # a hostile blkback runs none of the honest code
        try:
            with XenstoreClient.unix(h.layout.xenstored_link) as xs:
                assert xs.get_perms(be)[0] == f"n{b}"    # blkback's: what it hangs below is its own
                for key in xs.directory(be):             # its own nodes, which it may remove to spend the quota
                    xs.rm(f"{be}/{key}")
                hang_chain(xs, be, reachable_depth(xs, b, be))
            old = ps["g1"]["pid"]
            os.kill(old, signal.SIGKILL)                 # the guest crashes and is restarted
            # The new g1 cannot say ready (a guest connects every disk first, and its blkback is stopped):
            # what must hold is that the supervisor re-introduces it, writes its disk again and lives on.
            fe = f"/local/domain/{ps['g1']['domid']}/device/vbd/51712/backend"
            wait_until(lambda: h.thread is None or not h.thread.is_alive() or h.row("g1")["pid"] != old, 15,
                       "g1 restarted")
            with XenstoreClient.unix(h.layout.xenstored_link) as xs:
                wait_until(lambda: h.thread is None or not h.thread.is_alive() or xs.exists(fe), 15,
                           "g1's disk written again")
            time.sleep(1.0)                              # its introduction done, whatever it met
            assert h.error is None and h.thread is not None and h.thread.is_alive(), repr(h.error)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(ps["blk0"]["pid"], signal.SIGCONT)


# ---- width ---------------------------------------------------------------------------------------

def test_a_frontend_tree_as_wide_as_the_quotas_allow_is_rewritten_in_bounded_time(xs: XenstoreClient) -> None:
    """~990 nodes (the guest's whole node quota; 33 directories of 29, as each node's record must stay under
    the node-size quota) cost one transaction of ~2000 requests: done, quickly."""
    add_vbd(xs, CFG)

    def body(tx: int) -> None:
        xs.write_many({f"{FE_PATH}/d{i}/n{j}": "x" * 16 for i in range(33) for j in range(29)}, tx)
    xs.transaction(body)
    t0 = time.monotonic()
    add_vbd(xs, CFG)
    assert time.monotonic() - t0 < 5.0
    assert xs.get_perms(f"{FE_PATH}/d32/n28") == [f"n{FE}", f"r{BE}"]
    assert xs.read(f"{BE_PATH}/params") == b"/srv/g1.img"


# ---- timing: a peer that keeps writing ------------------------------------------------------------

FLAP = r"""
import sys, time
from xdom.domains.xenstore import XenstoreClient
xs = XenstoreClient.unix(sys.argv[1])
path, value, period = sys.argv[2], sys.argv[3], float(sys.argv[4])
print("go", flush=True)
while True:
    xs.write(path, value)
    time.sleep(period)
"""


class Flapper:
    """A domain writing one of its nodes again and again (in a process of its own, as a domain is), about
    once a millisecond: a program domain on this host writes ~12,000 nodes a second through its own ring,
    so this is a slow flapper."""

    def __init__(self, socket_path: str, path: str, value: str, period: float = 0.001) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", FLAP, socket_path, path, value, str(period)],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == b"go\n"
        time.sleep(0.05)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def churn(xenstored: Xenstored) -> Iterator[Callable[[str, str], None]]:
    flappers: list[Flapper] = []

    def start(path: str, value: str) -> None:
        flappers.append(Flapper(xenstored.socket_path, path, value))
    yield start
    for f in flappers:
        f.stop()


def test_a_guest_flapping_its_state_does_not_stop_its_device_being_written_again(
        xs: XenstoreClient, churn: Callable[[str, str], None]) -> None:
    add_vbd(xs, CFG)
    churn(f"{FE_PATH}/state", str(int(XenbusState.Connected)))
    add_vbd(xs, CFG)        # the backend restarted: its nodes are written again
    assert xs.read(f"{BE_PATH}/state") == str(int(XenbusState.Initialising)).encode()


def test_a_guest_flapping_its_state_does_not_keep_blkback_from_coming_back(run_dir: str) -> None:
    text = ts.one_disk(run_dir, blkback='restart = "always"\nrestart_backoff = 0.1\n')
    with ts.Host(run_dir, text, ready_timeout=4.0) as h:
        ps = h.ps()
        fe = f"/local/domain/{ps['g1']['domid']}/device/vbd/51712"
        with XenstoreClient.unix(h.layout.xenstored_link) as xs:
            state = xs.read(f"{fe}/state").decode()
        # what g1 may do through its ring: write its own node, with the value it has, often
        flapper = Flapper(h.layout.xenstored_link, f"{fe}/state", state)
        try:
            old = ps["blk0"]["pid"]
            os.kill(old, signal.SIGKILL)
            wait_until(lambda: back_again(h, "blk0", old), 10, "blk0 introduced again while g1 flaps",
                       interval=0.05)
        finally:
            flapper.stop()


def test_a_backend_flapping_its_state_costs_only_its_own_device_when_the_guest_restarts(run_dir: str) -> None:
    images = [os.path.join(run_dir, f"{n}.img") for n in ("a", "b")]
    for image in images:
        with open(image, "wb") as f:
            f.truncate(1 << 20)
    text = (ts.XS + '[[domain]]\nname = "bad"\nkind = "blkback"\n\n'
            '[[domain]]\nname = "good"\nkind = "blkback"\n\n'
            '[[domain]]\nname = "g1"\nkind = "guest"\nmemory = "4M"\nrestart = "always"\nrestart_backoff = 0.1\n'
            f'disk = ["format=raw, vdev=xvda, access=rw, backend=bad, target={images[0]}", '
            f'"format=raw, vdev=xvdb, access=rw, backend=good, target={images[1]}"]\n')
    with ts.Host(run_dir, text, ready_timeout=4.0) as h:
        ps = h.ps()
        be = f"/local/domain/{ps['bad']['domid']}/backend/vbd/{ps['g1']['domid']}/51712"
        with XenstoreClient.unix(h.layout.xenstored_link) as xs:
            assert xs.get_perms(be)[0] == f"n{ps['bad']['domid']}"     # the backend's own node
            state = xs.read(f"{be}/state").decode()
        flapper = Flapper(h.layout.xenstored_link, f"{be}/state", state)
        try:
            old = ps["g1"]["pid"]
            os.kill(old, signal.SIGKILL)
            # g1 is introduced again and its honest disk written, whatever the bad backend does with its
            # own node.  (Whether g1 then says ready is its own business: a guest connects every disk
            # before it does, as libxl waits for every device's backend.)
            good = f"/local/domain/{ps['g1']['domid']}/device/vbd/51728/backend"
            with XenstoreClient.unix(h.layout.xenstored_link) as xs:
                wait_until(lambda: h.row("g1")["pid"] != old and xs.exists(good), 10,
                           "g1 restarted, with its honest disk written", interval=0.05)
            assert h.error is None and h.thread is not None and h.thread.is_alive(), repr(h.error)
        finally:
            flapper.stop()


# ---- detach: a backend that never closes, or flaps -----------------------------------------------

def test_detach_from_a_backend_that_never_closes_is_bounded_and_removes_both_directories(
        xs: XenstoreClient) -> None:
    add_vbd(xs, CFG)
    xs.write(f"{BE_PATH}/state", str(int(XenbusState.Connected)))
    t0 = time.monotonic()
    assert remove_vbd(xs, BE, FE, DEVID, timeout=0.5) is False
    assert time.monotonic() - t0 < 3.0
    assert not xs.exists(BE_PATH) and not xs.exists(FE_PATH)


def test_detach_from_a_backend_writing_garbage_and_flapping_states_is_bounded(
        xs: XenstoreClient, churn: Callable[[str, str], None]) -> None:
    """Garbage in ``state`` (not a number, huge, negative) read by the detach watch: no crash, no hang."""
    add_vbd(xs, CFG)
    for value in ("banana", "99999999999999999999", "-1", "\x01\x02", "4"):
        churn(f"{BE_PATH}/state", value)
    t0 = time.monotonic()
    closed = remove_vbd(xs, BE, FE, DEVID, timeout=1.0)
    assert time.monotonic() - t0 < 5.0
    assert closed in (True, False)


def test_a_vif_backend_that_never_closes_costs_a_bounded_detach(xs: XenstoreClient) -> None:
    cfg = VifConfig(BE, FE, 0, "00:16:3e:00:00:01")
    add_vif(xs, cfg)
    be = f"/local/domain/{BE}/backend/vif/{FE}/0"
    xs.write(f"{be}/hotplug-status", "x" * 2000)       # a backend's word about its hotplug: never believed
    xs.write(f"{be}/state", "4")
    t0 = time.monotonic()
    assert remove_vif(xs, BE, FE, 0, timeout=0.5) is False
    assert time.monotonic() - t0 < 3.0
    assert not xs.exists(be)


# ---- a compromised xenstored ---------------------------------------------------------------------

class LyingXenstored:
    """A unix-socket "xenstored" answering every request OK, but TRANSACTION_START with ``tx_reply``."""

    def __init__(self, path: str, tx_reply: bytes) -> None:
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(4)
        self.tx_reply = tx_reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.srv.accept()
        except OSError:
            return
        reader = MessageReader()
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                for m in reader.feed(data):
                    payload = self.tx_reply if m.type == XsType.XS_TRANSACTION_START else b"OK\0"
                    try:
                        conn.sendall(Message(m.type, m.req_id, m.tx_id, payload).encode())
                    except OSError:
                        return

    def close(self) -> None:
        self.srv.close()
        self.thread.join(5)


@pytest.mark.parametrize("tx_reply", [b"not-a-number\0", b"99999999999999\0"])
def test_a_lying_xenstored_costs_only_the_request(run_dir: str, tx_reply: bytes) -> None:
    path = os.path.join(run_dir, "liar.sock")
    liar = LyingXenstored(path, tx_reply)
    client = XenstoreClient(UnixTransport(path), timeout=2.0)
    try:
        result = in_thread(lambda: add_vbd(client, CFG), timeout=10)
        assert result is None or isinstance(result, SURVIVED), repr(result)
    finally:
        client.close()
        liar.close()
