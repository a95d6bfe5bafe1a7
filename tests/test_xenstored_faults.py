"""Fault injection: xenstored killed with SIGKILL at random moments of a supervised host's life.

A host started with ``xdom up --detach`` (xenstored, blkback, netback, a
guest with a disk and a vif) goes through what an operator does, while a
killer thread sends SIGKILL to the xenstore domain's process at a random
moment (seeded) of each step:

* ``xdom block-attach`` of a new disk, and ``xdom network-attach`` of a new
  vif: the command either succeeds, and the device then reaches Connected
  (state 4) on both ends, or fails with an ``xdom:`` error and leaves
  nothing of the device behind (no nodes, not in the guest's device list);
* a guest's boot (``xdom restart g1``): it runs again, with every device it
  had Connected;
* ``xdom down``: it completes, and leaves no process, namespace, socket or
  state behind.

Between steps every device attached so far must be Connected again once
xenstored is back.  Every wait has a deadline; a failure names the seed,
which ``XDOM_FAULT_SEED`` replays.  ``make test`` runs one round (four
kills); ``XDOM_FAULT_ROUNDS=N`` runs N rounds on N hosts.

Two moments are too narrow for random kills to find often, so they are
made deterministic below: the supervisor's attach committed and its reply
lost, and a guest's XS_INTRODUCE done and its reply lost.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest
from helpers import wait_until

from xdom.deploy import netns
from xdom.deploy.control import ControlClient, endpoint_for
from xdom.deploy.rundir import Layout, running_pid
from xdom.deploy.xl_disk import vdev_to_devid
from xdom.domains.abi.xs_wire import XenstoreError
from xdom.domains.xenstore import XenstoreClient

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(netns.unavailable_reason() is not None,
                                 reason="needs root and iproute2 (make test installs it as root)")]

XDOM = [sys.executable, "-m", "xdom.deploy.cli"]
ROUNDS = int(os.environ.get("XDOM_FAULT_ROUNDS", "1"))
CONNECTED = b"4"
WAIT = 60.0             # seconds for anything to settle after a kill; a hang fails the test


def xdom(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*XDOM, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def topology(base: str, image: str) -> tuple[str, Layout]:
    lay = Layout(os.path.join(base, "state"), os.path.join(base, "run"))
    text = (f'[host]\nstate_dir = "{lay.state_dir}"\nrun_dir = "{lay.run_dir}"\n\n'
            '[[domain]]\nname = "xs"\nkind = "xenstored"\nrestart_backoff = 0.05\nflap_limit = 1000\n'
            '[[domain]]\nname = "blk0"\nkind = "blkback"\nrestart_backoff = 0.1\n'
            '[[domain]]\nname = "net0"\nkind = "netback"\nrestart_backoff = 0.1\n'
            '[[domain]]\nname = "g1"\nkind = "guest"\nmemory = "32M"\nrestart = "on-failure"\n'
            f'disk = ["format=raw, vdev=xvda, access=rw, backend=blk0, target={image}"]\n'
            'vif = ["mac=00:16:3e:00:01:01, backend=net0"]\n')
    path = os.path.join(base, "faults.toml")
    with open(path, "w") as f:
        f.write(text)
    return path, lay


class Killer:
    """SIGKILL to the xenstore domain's process, ``delay`` seconds after ``arm``."""

    def __init__(self, control: ControlClient, rng: random.Random) -> None:
        self.control, self.rng = control, rng
        self.kills = 0
        self._thread: threading.Thread | None = None

    def xenstored_pid(self) -> int | None:
        rows = {r["name"]: r for r in self.control.request("ps")["domains"]}
        xs = rows["xs"]
        return xs["pid"] if xs["state"] == "running" else None

    def arm(self, earliest: float, latest: float) -> float:
        delay = self.rng.uniform(earliest, latest)
        pid = wait_until(self.xenstored_pid, WAIT, "xenstored to run", interval=0.02)

        def kill() -> None:
            time.sleep(delay)
            try:
                os.kill(pid, signal.SIGKILL)
                self.kills += 1
            except ProcessLookupError:
                pass
        self._thread = threading.Thread(target=kill, name="killer")
        self._thread.start()
        return delay

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(WAIT)
            assert not self._thread.is_alive()


class Store:
    """The host's xenstored, read through a client that rides out its restarts."""

    def __init__(self, lay: Layout) -> None:
        self.xs = XenstoreClient.unix(lay.xenstored_link, reconnect=True, timeout=WAIT)

    def read(self, path: str) -> bytes | None:
        try:
            return self.xs.read(path)
        except XenstoreError as e:
            if e.name == "ENOENT":
                return None
            raise

    def close(self) -> None:
        self.xs.close()


def device_paths(row: dict[str, Any], rows: dict[str, dict[str, Any]], dev: dict[str, Any]) -> tuple[str, str]:
    kind = dev["type"]
    be = rows[dev["backend"]]["domid"]
    return (f"/local/domain/{be}/backend/{kind}/{row['domid']}/{dev['devid']}",
            f"/local/domain/{row['domid']}/device/{kind}/{dev['devid']}")


class Round:
    def __init__(self, base: str, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.image_dir = os.path.join(base, "images")
        os.makedirs(self.image_dir, exist_ok=True)
        xvda = self.image(8 << 20, "xvda")
        self.path, self.lay = topology(base, xvda)
        self.run = ["--run-dir", self.lay.run_dir]
        self.control: ControlClient | None = None
        self.store: Store | None = None
        self.killer: Killer | None = None

    def say(self, what: str) -> str:
        return f"seed {self.seed}: {what}"

    def image(self, size: int, name: str) -> str:
        path = os.path.join(self.image_dir, f"{name}.img")
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def start(self) -> None:
        up = xdom("up", self.path, "--detach")
        assert up.returncode == 0, self.say(up.stdout + up.stderr)
        self.control = ControlClient(endpoint_for(self.lay.control_socket), timeout=WAIT)
        self.store = Store(self.lay)
        self.killer = Killer(self.control, self.rng)

    def rows(self) -> dict[str, dict[str, Any]]:
        assert self.control is not None
        return {r["name"]: r for r in self.control.request("ps")["domains"]}

    def connected(self, be_path: str, fe_path: str) -> bool:
        assert self.store is not None
        return self.store.read(f"{be_path}/state") == CONNECTED and self.store.read(f"{fe_path}/state") == CONNECTED

    def all_connected(self, what: str) -> None:
        """Every device the guest has (as the supervisor says) reaches Connected on both ends."""
        def check() -> bool:
            rows = self.rows()
            g1 = rows["g1"]
            if g1["state"] != "running":
                return False
            return all(self.connected(*device_paths(g1, rows, d)) for d in g1["devices"])
        try:
            wait_until(check, WAIT, what, interval=0.05)
        except AssertionError:
            raise AssertionError(self.say(f"{what}: {self.states()}")) from None

    def states(self) -> str:
        rows = self.rows()
        g1 = rows["g1"]
        out = {f"{d['type']} {d['devid']}": [self.store.read(f"{p}/state") if self.store else None
                                             for p in device_paths(g1, rows, d)]
               for d in g1["devices"]}
        return f"g1 {g1['state']}, (backend, frontend) states {out}"

    def gone(self, kind: str, devid: int, what: str) -> None:
        """A refused device leaves nothing: not in the guest's list, no node on either end."""
        assert self.store is not None

        def check() -> bool:
            rows = self.rows()
            g1 = rows["g1"]
            if any(d["type"] == kind and d["devid"] == devid for d in g1["devices"]):
                return False
            be = rows["blk0" if kind == "vbd" else "net0"]["domid"]
            return (self.store.read(f"/local/domain/{be}/backend/{kind}/{g1['domid']}/{devid}") is None and
                    self.store.read(f"/local/domain/{g1['domid']}/device/{kind}/{devid}") is None)
        try:
            wait_until(check, WAIT, what, interval=0.05)
        except AssertionError:
            raise AssertionError(self.say(f"{what}: {self.states()}")) from None

    def cli_latency(self) -> float:
        """How long a command takes to reach the supervisor and come back (the interpreter's start, mostly)."""
        began = time.monotonic()
        assert xdom("block-list", "g1", *self.run, timeout=WAIT).returncode == 0
        return time.monotonic() - began

    def attach(self, kind: str, args: list[str], devid_of: Callable[[str], int]) -> bool:
        """Run the attach command with a kill somewhere in it (mostly while the supervisor writes the
        device's nodes, or while both ends connect); check the outcome both ways."""
        assert self.killer is not None
        latency = self.cli_latency()
        delay = self.killer.arm(0.5 * latency, latency + 0.4)
        began = time.monotonic()
        res = xdom(*args, *self.run, timeout=WAIT)
        took = time.monotonic() - began
        self.killer.join()
        step = f"{args[0]} {args[2]!r} with xenstored killed {delay * 1000:.0f} ms in"
        print(self.say(f"{step} ({took * 1000:.0f} ms): {'attached' if res.returncode == 0 else res.stderr.strip()}"))
        if res.returncode == 0:
            self.all_connected(f"{step}: succeeded, so every device must connect")
            return True
        assert res.returncode == 1 and res.stderr.startswith("xdom: "), self.say(f"{step}: {res!r}")
        self.gone(kind, devid_of(res.stderr), f"{step}: refused ({res.stderr.strip()}), so nothing may be left")
        self.all_connected(f"{step}: the devices attached before are connected again")
        return False

    def block_attach(self, n: int) -> None:
        vdev = f"xvd{chr(ord('b') + n)}"
        image = self.image(4 << 20, vdev)
        spec = f"format=raw, vdev={vdev}, access=rw, backend=blk0, target={image}"
        self.attach("vbd", ["block-attach", "g1", spec], lambda err: vdev_to_devid(vdev))

    def network_attach(self) -> None:
        devid = max((d["devid"] for d in self.rows()["g1"]["devices"] if d["type"] == "vif"), default=-1) + 1
        self.attach("vif", ["network-attach", "g1", "backend=net0"], lambda err: devid)

    def boot(self) -> None:
        assert self.killer is not None
        before = self.rows()["g1"]["generation"]
        delay = self.killer.arm(0, 1.5)
        began = time.monotonic()
        res = xdom("restart", "g1", *self.run, timeout=WAIT)
        took = time.monotonic() - began
        self.killer.join()
        step = f"restart g1 with xenstored killed {delay * 1000:.0f} ms in ({took * 1000:.0f} ms)"
        print(self.say(step))
        assert res.returncode == 0, self.say(f"{step}: {res!r}")
        wait_until(lambda: self.rows()["g1"]["generation"] > before, WAIT, self.say(f"{step}: g1 restarted"))
        self.all_connected(f"{step}: the guest's devices connect again")

    def down(self) -> None:
        assert self.killer is not None and self.control is not None and self.store is not None
        delay = self.killer.arm(0, 0.5)
        self.store.close()
        self.control.close()
        supervisor = running_pid(self.lay.run_dir)
        began = time.monotonic()
        res = xdom("down", *self.run, timeout=WAIT)
        took = time.monotonic() - began
        self.killer.join()
        step = f"down with xenstored killed {delay * 1000:.0f} ms in ({took * 1000:.0f} ms, {self.killer.kills} kills)"
        print(self.say(f"{step}: {res.stdout.strip()}"))
        assert res.returncode == 0, self.say(f"{step}: {res!r}")
        assert supervisor is None or not psutil.pid_exists(supervisor) or \
            psutil.Process(supervisor).status() == psutil.STATUS_ZOMBIE, self.say(step)
        left = leftovers(self.lay)
        assert not left, self.say(f"{step}: left behind {left}")

    def abandon(self) -> None:
        """After a failure: stop whatever runs, so the test leaves nothing either way."""
        for c in (self.store, self.control):
            try:
                if c is not None:
                    c.close()
            except Exception:
                pass
        if running_pid(self.lay.run_dir) is not None:
            xdom("down", *self.run, timeout=WAIT)
        for p in psutil.process_iter(["cmdline"]):
            try:
                if self.lay.run_dir in " ".join(p.info["cmdline"] or []):
                    p.kill()
            except psutil.Error:
                pass


def leftovers(lay: Layout) -> list[str]:
    found = []
    if os.path.exists(lay.run_dir):
        found.append(f"run directory {lay.run_dir}: {os.listdir(lay.run_dir)}")
    if os.path.exists(lay.xenstored_state):
        found.append(f"xenstored's state {lay.xenstored_state}")
    found += [f"namespace {n}" for n in netns.of_host(lay.run_dir)]
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if lay.run_dir in cmd and p.pid != os.getpid():
            found.append(f"process {p.pid} {cmd}")
    return found


@pytest.mark.parametrize("n", range(ROUNDS))
def test_xenstored_killed_during_attach_boot_and_down(run_dir: str, n: int) -> None:
    seed = int(os.environ.get("XDOM_FAULT_SEED", random.randrange(1 << 30))) + n
    r = Round(run_dir, seed)
    done = False
    try:
        r.start()
        r.all_connected("the host's devices connect")
        r.block_attach(0)
        r.network_attach()
        r.boot()
        r.down()
        done = True
    finally:
        if not done:
            r.abandon()
    assert r.killer is not None and r.killer.kills >= 1, r.say("no kill landed")
    shutil.rmtree(r.image_dir, ignore_errors=True)


# ---- the supervisor's side, made deterministic: a reply lost after xenstored committed ----------------

HOST = ('[[domain]]\nname = "xs"\nkind = "xenstored"\nrestart_backoff = 0.05\n'
        '[[domain]]\nname = "blk0"\nkind = "blkback"\n'
        '[[domain]]\nname = "g1"\nkind = "guest"\nmemory = "16M"\n')


def test_an_attach_whose_reply_was_lost_leaves_nothing(run_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor's transaction committed, then its connection died before the reply (xenstored
    killed in between): the attach is refused, and what reached the store is removed."""
    from test_supervisor import Host

    import xdom.deploy.devices as supervisor  # the supervisor's device wiring (deploy/devices.py)

    real = supervisor.add_vbd

    def committed_then_lost(xs: XenstoreClient, cfg: Any) -> None:
        real(xs, cfg)
        raise ConnectionError("xenstore connection lost (simulated)")
    image = os.path.join(run_dir, "d.img")
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    with Host(run_dir, HOST) as h:
        monkeypatch.setattr(supervisor, "add_vbd", committed_then_lost)
        with pytest.raises(Exception) as refused:
            h.control.request("block-attach", name="g1",                        # type: ignore[union-attr]
                              disk=f"format=raw, vdev=xvdb, access=rw, backend=blk0, target={image}")
        assert "connection lost" in str(refused.value)
        g1, blk0 = h.row("g1"), h.row("blk0")
        assert g1["devices"] == []
        devid = vdev_to_devid("xvdb")
        with XenstoreClient.unix(h.layout.xenstored_link) as xs:
            assert not xs.exists(f"/local/domain/{g1['domid']}/device/vbd/{devid}")
            assert not xs.exists(f"/local/domain/{blk0['domid']}/backend/vbd/{g1['domid']}/{devid}")
        monkeypatch.setattr(supervisor, "add_vbd", real)          # and the same disk attaches after all
        h.control.request("block-attach", name="g1",                            # type: ignore[union-attr]
                          disk=f"format=raw, vdev=xvdb, access=rw, backend=blk0, target={image}")
        with XenstoreClient.unix(h.layout.xenstored_link) as xs:
            be = f"/local/domain/{blk0['domid']}/backend/vbd/{g1['domid']}/{devid}"
            fe = f"/local/domain/{g1['domid']}/device/vbd/{devid}"
            wait_until(lambda: xs.read(f"{be}/state") == CONNECTED and xs.read(f"{fe}/state") == CONNECTED, WAIT,
                       "the disk to connect")


def test_a_disk_removed_while_connecting_and_added_again_connects(run_dir: str) -> None:
    """The toolstack adds a disk whose backend never answers, removes it while the guest waits for
    that backend, and adds a disk under the same id: the guest drops the first attach (not after its
    30 s timeout) without writing into the second's nodes, and attaches the second."""
    from test_supervisor import Host
    image = os.path.join(run_dir, "d.img")
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    with Host(run_dir, HOST) as h:
        g1, blk0 = h.row("g1"), h.row("blk0")
        devid = vdev_to_devid("xvdb")
        fe = f"/local/domain/{g1['domid']}/device/vbd/{devid}"
        log_path = h.layout.log_path("g1")

        def logged(text: str) -> bool:
            with open(log_path) as f:
                return text in f.read()
        with XenstoreClient.unix(h.layout.xenstored_link) as xs:
            def add_unanswered(tx: int) -> None:         # frontend nodes only: no backend directory, nobody answers
                xs.write(fe, "", tx)
                xs.set_perms(fe, [f"n{g1['domid']}", f"r{blk0['domid']}"], tx)      # the nodes below inherit it
                for key, value in {"backend": f"/local/domain/{blk0['domid']}/backend/vbd/{g1['domid']}/{devid}",
                                   "backend-id": blk0["domid"], "virtual-device": devid, "device-type": "disk",
                                   "xdom-export": os.path.join(run_dir, "never.sock"), "state": 1}.items():
                    xs.write(f"{fe}/{key}", str(value), tx)
            tx = xs.transaction_start()
            add_unanswered(tx)
            xs.transaction_end(tx)
            wait_until(lambda: logged(f"disk {devid}: connecting"), WAIT,
                       "the guest to wait for the backend")
            xs.rm(fe)
            t0 = time.monotonic()
            wait_until(lambda: logged("removed by the toolstack while connecting"), 10.0,
                       "the guest to drop the attach")
            h.control.request("block-attach", name="g1",                            # type: ignore[union-attr]
                              disk=f"format=raw, vdev=xvdb, access=rw, backend=blk0, target={image}")
            be = f"/local/domain/{blk0['domid']}/backend/vbd/{g1['domid']}/{devid}"
            wait_until(lambda: xs.read(f"{be}/state") == CONNECTED and xs.read(f"{fe}/state") == CONNECTED, 20.0,
                       "the second disk to connect")
            assert time.monotonic() - t0 < 25.0          # well before the first attach would have timed out
            assert h.row("g1")["devices"] != []


def test_a_domain_whose_introduction_reply_was_lost_is_not_introduced_twice(
        run_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """XS_INTRODUCE went through, its reply did not (xenstored killed in between).  When xenstored is
    back the supervisor finishes the guest's set-up without a second XS_INTRODUCE, which would reset
    the guest's connection and drop its watches: a disk hot-attached later still reaches it."""
    from test_supervisor import Host
    real = XenstoreClient.introduce
    lost: list[int] = []

    def introduced_then_lost(self: XenstoreClient, domid: int, gfn: int, port: int) -> None:
        real(self, domid, gfn, port)
        if not lost and domid > 2:                   # the guest's (xs is 1, blk0 2): xenstored dies now
            lost.append(domid)
            creds = self._t.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            os.kill(struct.unpack("3i", creds)[0], signal.SIGKILL)
            raise ConnectionError("xenstore connection lost (simulated)")
    monkeypatch.setattr(XenstoreClient, "introduce", introduced_then_lost)
    image = os.path.join(run_dir, "d.img")
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    with Host(run_dir, HOST, ready_timeout=30.0) as h:
        assert lost and h.row("xs")["restarts"] == 1
        assert len(h.journal("g1", "introduced")) == 1          # once the set-up was done, at the retry
        h.control.request("block-attach", name="g1",                            # type: ignore[union-attr]
                          disk=f"format=raw, vdev=xvdb, access=rw, backend=blk0, target={image}")
        g1, blk0 = h.row("g1"), h.row("blk0")
        devid = vdev_to_devid("xvdb")
        with XenstoreClient.unix(h.layout.xenstored_link) as xs:
            be = f"/local/domain/{blk0['domid']}/backend/vbd/{g1['domid']}/{devid}"
            fe = f"/local/domain/{g1['domid']}/device/vbd/{devid}"
            wait_until(lambda: xs.read(f"{be}/state") == CONNECTED and xs.read(f"{fe}/state") == CONNECTED, WAIT,
                       "the hot-attached disk to connect (the guest's watch is still there)")
