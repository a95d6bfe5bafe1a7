"""The attack rig: domains under uids of their own running tests/security/attacker.py, and the after-check.

Every attacker and victim is a real domain process started the toolstack's
way (``mgmt.request("create", ..., uid=U)`` then
``launcher.start_domain_process(creds, argv, uid=U)``), each under a uid of
its own taken from the supervisor's range and held under the supervisor's
lock (``/run/xdom/uids/<uid>``), so that tests side by side, and supervised
hosts started meanwhile, never share one.

``World.assert_serving`` is how every test ends: the broker process is
alive, answers the toolstack, creates a domain, and that new domain and
each victim exchange an event and a grant through it.
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import json
import os
import pwd
import resource
import subprocess
import sys
from typing import Any

from helpers import wait_until

from xdom.broker.mgmt_client import ManagementClient, ManagementError
from xdom.deploy.agent_client import AgentProcess
from xdom.deploy.isolation import LOCK_DIR, UID_BASE, UID_COUNT, probe_uid
from xdom.deploy.launcher import BrokerProcess, start_domain_process, start_ready
from xdom.domains.xenhost import BrokerXenHost

ATTACKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attacker.py")
CHECK_GFN = 200          # the frame of a victim that the after-check grants (every victim has 1M = 256 frames)


@functools.cache
def uid_problem() -> str | None:
    """Why domains cannot run under uids of their own here, or None (the supervisor's own probe)."""
    if os.geteuid() != 0:
        return "per-domain uids need root"
    why = probe_uid(UID_BASE + UID_COUNT - 1)
    if why is not None:
        return f"uid {UID_BASE + UID_COUNT - 1} cannot run {sys.executable} with xdom: {why}"
    return None


class UidPool:
    """Uids nobody else uses while we hold them: the supervisor's range and lock files, taken from the top."""

    def __init__(self, lock_dir: str = LOCK_DIR) -> None:
        self.lock_dir = lock_dir
        self.held: dict[int, int] = {}

    def take(self) -> int:
        os.makedirs(self.lock_dir, mode=0o700, exist_ok=True)
        for uid in range(UID_BASE + UID_COUNT - 1, UID_BASE - 1, -1):
            if uid in self.held or _is_user(uid):
                continue
            fd = os.open(os.path.join(self.lock_dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.held[uid] = fd
            return uid
        raise RuntimeError(f"no free uid in {UID_BASE}..{UID_BASE + UID_COUNT - 1}")

    def release(self) -> None:
        for fd in self.held.values():
            os.close(fd)
        self.held.clear()


def _is_user(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


class Dom(AgentProcess):
    """A domain process running attacker.py under its own uid."""

    def __init__(self, mgmt: ManagementClient, name: str, uid: int, memory: str = "1M",
                 privileged: bool = False, creds: dict[str, Any] | None = None) -> None:
        """Create domain ``name`` for ``uid`` and start it; with ``creds``, start the domain they name."""
        super().__init__(mgmt, name, memory=memory, privileged=privileged, uid=uid,
                         argv=[sys.executable, ATTACKER], creds=creds)
        self.uid = uid

    def hypercall(self, op: str, **fields: Any) -> dict[str, Any]:
        """A raw hypercall from inside the domain: ``{"errno": None, "reply": ...}`` or ``{"errno": NAME}``."""
        return self.call("hypercall", name=op, fields=fields)

    def alive(self) -> bool:
        return self.proc.poll() is None


class World:
    """A broker, its management client, and the domains a test starts (all stopped at the end)."""

    def __init__(self, broker: BrokerProcess, mgmt: ManagementClient, uids: UidPool) -> None:
        self.broker = broker
        self.mgmt = mgmt
        self.uids = uids
        self.doms: list[Dom] = []
        self._checks = itertools.count(1)

    def spawn(self, name: str, memory: str = "1M", privileged: bool = False) -> Dom:
        d = Dom(self.mgmt, name, self.uids.take(), memory=memory, privileged=privileged)
        self.doms.append(d)
        return d

    def adopt(self, creds: dict[str, Any], uid: int) -> Dom:
        """Start the process of a domain created already (``creds``) under ``uid``."""
        d = Dom(self.mgmt, creds["name"], uid, creds=creds)
        self.doms.append(d)
        return d

    def start_probe(self, creds: dict[str, Any], uid: int) -> dict[str, Any]:
        """Run ``attacker.py hello-probe`` with ``creds`` under ``uid``: the broker's answer to its hello."""
        proc = start_domain_process(creds, [sys.executable, ATTACKER, "hello-probe"], uid=uid,
                                    stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, f"the probe under uid {uid} failed ({proc.returncode})"
        return json.loads(out)

    def assert_serving(self, *victims: Dom) -> None:
        """The broker is alive and answers; a domain created now and each victim still work together."""
        rc = self.broker.proc.poll()
        assert rc is None, f"the broker died (exit status {rc}): every domain lost its hypervisor"
        self.mgmt.request("list")
        n = next(self._checks)
        creds = self.mgmt.request("create", name=f"after-check-{n}", memory="1M", uid=os.geteuid())
        peer = BrokerXenHost(creds["hypercall"], creds["token"])
        try:
            for v in victims:
                assert v.alive(), f"victim {v.name} died (exit status {v.proc.returncode})"
                port = v.call("alloc_unbound", remote=peer.domid)["port"]
                local = peer.bind_interdomain(v.domid, port)
                peer.notify(local)
                assert port in v.call("wait", secs=10)["ports"], f"victim {v.name} got no event"
                stamp = f"still serving {v.name} #{n}"
                ref = v.call("grant", domid=peer.domid, gfn=CHECK_GFN, ro=True, data=stamp)["ref"]
                m = peer.map_grant(v.domid, ref, readonly=True)
                assert bytes(m.view[:len(stamp)]).decode() == stamp
                peer.unmap_grant(m)
                assert v.call("end", ref=ref)["ok"], f"victim {v.name} cannot end a grant after its unmap"
                peer.close_port(local)
        finally:
            peer.close()
            self._forget(creds["domid"])

    def _forget(self, domid: int) -> None:
        """Destroy the after-check domain, best effort (a failed check has said why already).

        Only once the broker has seen it go: destroying a connected domain
        SIGKILLs its process, which for this in-process peer is the test itself.
        """
        if self.broker.proc.poll() is not None:
            return
        try:
            wait_until(lambda: self.mgmt.request("info", domid=domid)["domain"]["state"] != "running",
                       what="the broker to notice the after-check domain is gone")
            self.mgmt.request("destroy", domid=domid)
        except (AssertionError, TimeoutError, ManagementError):
            pass

    def close(self) -> None:
        for d in reversed(self.doms):
            d.stop()


def start_broker_with_fd_limit(run_dir: str, nofile: int) -> BrokerProcess:
    """``xdom broker`` under a hard and soft RLIMIT_NOFILE of ``nofile`` (as ``prlimit --nofile=N:N``)."""
    os.makedirs(run_dir, exist_ok=True)
    argv = [sys.executable, "-m", "xdom.deploy.cli", "broker", "--run-dir", run_dir]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    def launch(a: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(a, start_new_session=True, preexec_fn=limit, **kw)

    proc = start_ready(argv, os.path.join(run_dir, "broker.log"), "broker", start=launch)
    return BrokerProcess(proc, run_dir)
