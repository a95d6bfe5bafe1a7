"""The supervisor on live processes: start and stop order, restart policies, backoff and flapping,
a xenstored restart under running domains, health limits, hosts side by side, the control channel.

Each test runs a Supervisor in this process (its loop in a thread, as ``xdom up`` runs it in its
main thread) with its own state and run directories, and talks to it over its control channel
as the command line does.  The command line itself is tested in test_supervisor_cli.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import msgpack
import psutil
import pytest
import zmq
from helpers import wait_until

from xdom.broker.mgmt_client import ManagementClient
from xdom.deploy import netns
from xdom.deploy.control import ControlClient, ControlError, endpoint_for
from xdom.deploy.isolation import DOMAIN_EXEC
from xdom.deploy.rundir import Layout, running_pid
from xdom.deploy.spawning import MALLOC_TUNABLES, with_malloc_tunables
from xdom.deploy.supervisor import JournalEntry, StartupError, Supervisor
from xdom.deploy.topology_parse import load_topology
from xdom.domains.xenstore import XenstoreClient

PY = sys.executable

# A program domain for these tests: connects (so it is a domain), then does what argv[1] says.
#   wait   - SIGUSR1 exits 0, SIGUSR2 exits 1, SIGTERM kills it
#   exit1  - exits 1 at once
#   alloc  - touches argv[2] MiB, then waits as "wait" does
#   fds    - opens argv[2] descriptors and runs `sleep argv[3]` holding them too, then waits as "wait" does
#   xs     - opens its xenstore ring; each SIGUSR1 writes data/ping = n through it; SIGUSR2 powers off
PROG = r'''
import signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
from xdom.domains.xenhost import connect
mode = sys.argv[1]
host = connect()
if mode == "exit1":
    sys.exit(1)
if mode == "alloc":
    hog = bytearray(int(sys.argv[2]) << 20)
    for i in range(0, len(hog), 4096):
        hog[i] = 1
if mode == "fds":
    import os, subprocess
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(int(sys.argv[2]))]
    child = subprocess.Popen(["sleep", sys.argv[3]], pass_fds=held)
if mode == "xs":
    from xdom.domains.xenstore import XenstoreClient
    xs = XenstoreClient.ring(host)
    home = xs.get_domain_path(host.domid)
    n = 0
    while signal.sigwait({signal.SIGUSR1, signal.SIGUSR2}) == signal.SIGUSR1:
        n += 1
        xs.write(home + "/data/ping", str(n))
    xs.close()
    host.shutdown("poweroff")
    sys.exit(0)
sys.exit(0 if signal.sigwait({signal.SIGUSR1, signal.SIGUSR2}) == signal.SIGUSR1 else 1)
'''


def program(name: str, mode: str, *extra: str, restart: str = "never", more: str = "") -> str:
    args = ", ".join(f'"{a}"' for a in (PY, "{prog}", mode, *extra))
    return f'[[domain]]\nname = "{name}"\nkind = "program"\ncommand = [{args}]\nrestart = "{restart}"\n{more}\n'


XS = '[[domain]]\nname = "xs"\nkind = "xenstored"\nrestart_backoff = 0.1\n'
GUEST = '[[domain]]\nname = "g1"\nkind = "guest"\nmemory = "4M"\n'


def one_disk(run_dir: str, blkback: str = "", guest: str = "") -> str:
    """xenstored, blkback "blk0" and guest "g1" with one disk on a new 1 MiB image; ``blkback`` and
    ``guest``: more keys of their tables (restart policies)."""
    image = os.path.join(run_dir, "g1.img")
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    return (XS + f'[[domain]]\nname = "blk0"\nkind = "blkback"\n{blkback}\n'
            f'{GUEST}{guest}disk = ["format=raw, vdev=xvda, access=rw, backend=blk0, target={image}"]\n')


class Host:
    """A supervised host for one test: ``with Host(...) as h`` starts it, leaving stops everything."""

    def __init__(self, base: str, text: str, name: str = "t", **kw: Any) -> None:
        os.makedirs(base, exist_ok=True)
        prog = os.path.join(base, "prog.py")
        with open(prog, "w") as f:
            f.write(PROG)
        path = os.path.join(base, f"{name}.toml")
        with open(path, "w") as f:
            f.write(text.replace("{prog}", prog))
        self.layout = Layout(os.path.join(base, "state"), os.path.join(base, "run"))
        kw.setdefault("stop_grace", 3.0)
        kw.setdefault("ready_timeout", 15.0)
        self.sup = Supervisor(load_topology(path).resolved(self.layout.state_dir, self.layout.run_dir),
                              self.layout.state_dir, self.layout.run_dir, **kw)
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.control: ControlClient | None = None

    def __enter__(self) -> Host:
        assert self.sup.start() is True
        self.thread = threading.Thread(target=self._serve, name="supervisor")
        self.thread.start()
        self.control = ControlClient(endpoint_for(self.layout.control_socket), timeout=10)
        return self

    def _serve(self) -> None:
        try:
            self.sup.serve()
        except BaseException as e:
            self.error = e

    def __exit__(self, *exc: object) -> None:
        if self.control is not None:
            self.control.close()
        self.sup.request_stop()
        if self.thread is not None:
            self.thread.join(60)
            assert not self.thread.is_alive(), "the supervisor did not stop"
        self.sup.stop()
        assert self.error is None, self.error

    def ps(self) -> dict[str, dict[str, Any]]:
        assert self.control is not None
        return {r["name"]: r for r in self.control.request("ps")["domains"]}

    def row(self, name: str) -> dict[str, Any]:
        assert self.control is not None
        return self.control.request("info", name=name)["domain"]

    def wait(self, name: str, what: str, timeout: float = 20.0, **want: Any) -> dict[str, Any]:
        """Poll ``info`` until every field of ``want`` matches (callables are predicates)."""
        def ok() -> dict[str, Any] | None:
            r = self.row(name)
            good = all(v(r[k]) if callable(v) else r[k] == v for k, v in want.items())
            return r if good else None
        return wait_until(ok, timeout, f"{name}: {what}", interval=0.02)

    def journal(self, name: str | None = None, event: str | None = None) -> list[JournalEntry]:
        return [e for e in list(self.sup.journal)
                if (name is None or e.name == name) and (event is None or e.event == event)]


@pytest.fixture
def base(run_dir: str) -> Iterator[str]:
    yield run_dir


def assert_nothing_left(layout: Layout) -> None:
    assert not os.path.exists(layout.run_dir), os.listdir(layout.run_dir)
    assert netns.of_host(layout.run_dir) == []
    assert not os.path.exists(layout.xenstored_state)
    stray = []
    for p in psutil.process_iter(["pid", "cmdline", "environ"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            env = p.info["environ"] or {}
        except psutil.Error:
            continue
        if layout.run_dir in cmd or layout.run_dir in env.get("XDOM_HYPERCALL", ""):
            stray.append((p.pid, cmd))
    assert not stray, stray


# ---- start and stop ---------------------------------------------------------------

def test_start_and_stop_order_nodes_and_limits(base: str) -> None:
    text = XS + GUEST + program("p1", "wait", more="limits = { fds = 64 }") + program("p2", "wait")
    with Host(base, text) as h:
        ps = h.ps()
        assert [r["state"] for r in ps.values()] == ["running"] * 4
        assert [r["name"] for r in ps.values()] == ["xs", "g1", "p1", "p2"]
        assert len({r["domid"] for r in ps.values()}) == 4 and all(r["connected"] for r in ps.values())
        for r in ps.values():
            assert set(r) >= {"name", "domid", "kind", "pid", "state", "restarts", "uptime", "rss",
                              "mappings_held", "grants_mapped_by_others", "event_channels", "netns", "devices"}
            assert r["restarts"] == 0 and r["rss"] > 0 and r["domain_state"] == "running"
        assert ps["g1"]["devices"] == []
        if netns.unavailable_reason() is None:
            # each domain is in a namespace of its own, named after it; the host's is untouched
            for name, r in ps.items():
                assert r["netns"] == netns.netns_name(name, h.layout.run_dir)
                assert os.stat(f"/proc/{r['pid']}/ns/net").st_ino == os.stat(f"/run/netns/{r['netns']}").st_ino
            assert os.stat(f"/proc/{ps['g1']['pid']}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
            lo = subprocess.run(["ip", "-n", ps["g1"]["netns"], "-o", "link", "show", "lo"], capture_output=True,
                                text=True)
            assert "UP" in lo.stdout
        else:
            assert ps["g1"]["netns"] is None
        assert ps["g1"]["grants_mapped_by_others"] == 1          # xenstored maps its ring page
        # limits.fds is the domain process's RLIMIT_NOFILE, soft and hard; no domain may dump core
        with open(f"/proc/{ps['p1']['pid']}/limits") as f:
            assert re.search(r"^Max open files\s+64\s+64\s", f.read(), re.M)
        for r in ps.values():
            with open(f"/proc/{r['pid']}/limits") as f:
                assert re.search(r"^Max core file size\s+0\s+0\s", f.read(), re.M), r["name"]
        # the nodes libxl writes: dom0's, and each domain's (dom0 owns the home, the domain its control nodes)
        with XenstoreClient.unix(h.layout.xenstored_link) as xs:
            assert xs.read("/local/domain/0/name") == b"Domain-0"
            assert xs.read("/local/domain/0/domid") == b"0"
            g = ps["g1"]["domid"]
            assert xs.read(f"/local/domain/{g}/name") == b"g1"
            assert xs.read(f"/local/domain/{g}/domid") == str(g).encode()
            assert xs.get_perms(f"/local/domain/{g}") == ["n0", f"r{g}"]
            assert xs.get_perms(f"/local/domain/{g}/control/shutdown") == [f"n{g}"]
            assert xs.read(f"/local/domain/{g}/control/feature-poweroff") == b"1"    # the guest wrote it
            assert xs.read(f"/local/domain/{ps['xs']['domid']}/name") == b"xs"
        # per-domain logs, each opened by the supervisor's marker line
        for name in ps:
            with open(h.layout.log_path(name)) as f:
                assert f.readline().startswith("--- xdom ")
    # start: broker, then each domain launched only once the one before it was ready
    order = [(e.name, e.event) for e in h.sup.journal if e.event in ("ready", "spawn", "stopped")]
    assert order[:9] == [("broker", "ready"), ("xs", "spawn"), ("xs", "ready"), ("g1", "spawn"), ("g1", "ready"),
                         ("p1", "spawn"), ("p1", "ready"), ("p2", "spawn"), ("p2", "ready")]
    # stop: the reverse, the broker last
    assert order[9:] == [("p2", "stopped"), ("p1", "stopped"), ("g1", "stopped"), ("xs", "stopped"),
                         ("broker", "stopped")]
    # the broker's own record agrees: created in start order, destroyed in reverse
    with open(h.layout.log_path("broker")) as f:
        lifecycle = [(m.group(2), m.group(1)) for m in re.finditer(r"domain \d+ \((\w+)\): (created|destroyed)",
                                                                    f.read())]
    assert lifecycle == [("created", n) for n in ("xs", "g1", "p1", "p2")] + \
        [("destroyed", n) for n in ("p2", "p1", "g1", "xs")]
    assert_nothing_left(h.layout)
    assert os.path.exists(h.layout.log_path("g1"))          # logs stay for the post-mortem


def test_a_domain_that_cannot_start_stops_everything_started(base: str) -> None:
    text = XS + program("bad", "wait") .replace(PY, "/nonexistent/python")
    host = Host(base, text)
    with pytest.raises(StartupError, match="program domain bad did not start: exited with status 127"):
        host.sup.start()
    assert_nothing_left(host.layout)
    with open(host.layout.log_path("bad")) as f:
        assert "cannot execute '/nonexistent/python'" in f.read()


def test_a_program_that_never_connects_runs_as_a_plain_process(base: str, caplog: pytest.LogCaptureFixture) -> None:
    text = '[[domain]]\nname = "sleeper"\nkind = "program"\ncommand = ["sleep", "60"]\n'
    with Host(base, text, ready_timeout=0.5) as h:
        r = h.row("sleeper")
        assert r["state"] == "running" and r["connected"] is False and r["domain_state"] == "created"
    assert "has not connected to the broker within 0.5s" in caplog.text
    assert_nothing_left(h.layout)


# ---- restart policies, backoff, flapping --------------------------------------------

def test_restart_policies(base: str) -> None:
    text = (program("never1", "wait") + program("onf0", "wait", restart="on-failure")
            + program("onf1", "wait", restart="on-failure") + program("onfk", "wait", restart="on-failure")
            + program("alw0", "wait", restart="always"))
    text = text.replace('restart = "on-failure"', 'restart = "on-failure"\nrestart_backoff = 0.05')
    text = text.replace('restart = "always"', 'restart = "always"\nrestart_backoff = 0.05')
    with Host(base, text) as h:
        ps = h.ps()
        first = {n: r["pid"] for n, r in ps.items()}
        os.kill(first["never1"], signal.SIGUSR2)          # status 1, policy never: stays down
        os.kill(first["onf0"], signal.SIGUSR1)            # status 0, on-failure: stays down
        os.kill(first["onf1"], signal.SIGUSR2)            # status 1, on-failure: restarted
        os.kill(first["onfk"], signal.SIGKILL)            # killed, on-failure: restarted
        os.kill(first["alw0"], signal.SIGUSR1)            # status 0, always: restarted
        never1 = h.wait("never1", "exited", state="exited")
        assert never1["last_exit"] == "exited with status 1" and never1["pid"] is None
        assert never1["domain_state"] == "crashed"
        onf0 = h.wait("onf0", "exited", state="exited")
        assert onf0["last_exit"] == "exited with status 0" and onf0["restarts"] == 0
        for name, why in (("onf1", "exited with status 1"), ("onfk", "killed by SIGKILL"),
                          ("alw0", "exited with status 0")):
            r = h.wait(name, "restarted", state="running", generation=2)
            assert r["restarts"] == 1 and r["last_exit"] == why
            assert r["pid"] != first[name] and r["domid"] == ps[name]["domid"]   # a restart keeps the domid
            assert r["domain_state"] == "running" and r["connected"]
        # an operator's restart brings a stayed-down domain back
        h.control.request("restart", name="never1")
        assert h.wait("never1", "restarted on request", state="running", generation=2)["restarts"] == 1


def test_backoff_grows_then_the_flap_limit_gives_up(base: str, caplog: pytest.LogCaptureFixture) -> None:
    text = program("flappy", "exit1", restart="on-failure",
                   more="restart_backoff = 0.2\nflap_limit = 3\nflap_window = 60")
    with Host(base, text) as h:
        r = h.wait("flappy", "failed", state="failed")
        assert r["generation"] == 4 and r["restarts"] == 3
        assert "3 restarts within 60s (flap_limit 3); giving up" in r["last_exit"]
        exits = [e.time for e in h.journal("flappy", "exit")]
        spawns = [e.time for e in h.journal("flappy", "spawn")]
        assert len(exits) == 4 and len(spawns) == 4
        waits = [s - x for x, s in zip(exits, spawns[1:])]
        for got, want in zip(waits, (0.0, 0.2, 0.4)):
            assert want <= got < want + 0.5, waits
        assert "giving up" in caplog.text and "flappy" in caplog.text
        # failed is for good, until an operator says otherwise (the history is cleared)
        h.control.request("restart", name="flappy")
        h.wait("flappy", "restarted", generation=5)


# ---- xenstored restart ---------------------------------------------------------------

def test_killed_xenstored_comes_back_and_rings_keep_working(base: str) -> None:
    text = XS + GUEST + program("pxs", "xs")
    with Host(base, text) as h:
        ps = h.ps()
        xs_pid, g, p = ps["xs"]["pid"], ps["g1"]["domid"], ps["pxs"]["domid"]
        os.kill(ps["pxs"]["pid"], signal.SIGUSR1)
        with XenstoreClient.unix(h.layout.xenstored_link) as dom0:
            wait_until(lambda: dom0.exists(f"/local/domain/{p}/data/ping"), 10, "the first ping")
        os.kill(xs_pid, signal.SIGKILL)                       # the xenstore domain crashes
        r = h.wait("xs", "restarted", state="running", generation=2)
        assert r["domid"] == ps["xs"]["domid"] and r["pid"] != xs_pid
        assert r["last_exit"] == "killed by SIGKILL"
        assert h.row("g1")["state"] == "running" and h.row("pxs")["state"] == "running"
        with XenstoreClient.unix(h.layout.xenstored_link) as dom0:
            assert dom0.read(f"/local/domain/{p}/data/ping") == b"1"      # the store survived
            os.kill(ps["pxs"]["pid"], signal.SIGUSR1)                        # a write over the same ring
            wait_until(lambda: dom0.read(f"/local/domain/{p}/data/ping") == b"2", 10, "the ping after the restart")
            # the guest's watch, armed before the restart, still fires: xl shutdown's way of stopping it
            dom0.write(f"/local/domain/{g}/control/shutdown", "poweroff")
        g1 = h.wait("g1", "powered off", state="exited")
        assert g1["last_exit"] == "exited with status 0" and g1["domain_state"] == "shutdown"
        assert any(e.detail == "poweroff" for e in h.journal("g1", "broker:shutdown"))


# ---- health limits -------------------------------------------------------------------

def test_a_domain_over_its_rss_limit_is_killed_and_restarted(base: str, caplog: pytest.LogCaptureFixture) -> None:
    text = program("hog", "alloc", "96", restart="on-failure",
                   more='restart_backoff = 0.05\nflap_limit = 1\nlimits = { rss = "80M" }')
    with Host(base, text, health_interval=0.2) as h:
        first = h.wait("hog", "killed once", generation=lambda g: g >= 2)
        assert first["last_exit"].startswith("killed by SIGKILL (over its limits: rss ")
        assert "is over its limit of 80.0 MiB" in first["last_exit"]
        r = h.wait("hog", "failed after its second kill", state="failed")
        assert r["generation"] == 2 and "giving up" in r["last_exit"]
    assert "over its limits: rss" in caplog.text and "killing program domain hog" in caplog.text


def test_a_domain_over_its_fd_limit_is_killed_and_restarted(base: str, caplog: pytest.LogCaptureFixture) -> None:
    """limits.fds counts the domain and its children: each holds 40 here, under the RLIMIT_NOFILE of 64 each."""
    marker = f"{os.getpid() % 1000}.{int.from_bytes(os.urandom(3), 'big')}"      # a `sleep` argument no one else uses
    text = program("fdhog", "fds", "40", marker, restart="on-failure",
                   more="restart_backoff = 0.05\nflap_limit = 1\nlimits = { fds = 64 }")

    def sleepers() -> list[int]:
        return [p.pid for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", marker]]
    with Host(base, text, health_interval=0.2) as h:
        first = h.wait("fdhog", "killed once", generation=lambda g: g >= 2)
        assert first["last_exit"].startswith("killed by SIGKILL (over its limits: ")
        assert "open file descriptors is over its limit of 64" in first["last_exit"]
        r = h.wait("fdhog", "failed after its second kill", state="failed")
        assert r["generation"] == 2 and "giving up" in r["last_exit"]
        assert r["pid"] is None
        wait_until(lambda: not sleepers(), 10, "the domain's child to go with it")
    assert "over its limits: " in caplog.text and "killing program domain fdhog" in caplog.text


# ---- what a domain process is allowed ---------------------------------------------------

def _readable_by_a_peer(pid: int) -> bool:
    """Can a process of ``pid``'s own uid, holding no capabilities, read its /proc/PID/environ?

    The kernel lets a peer of the same uid do that only while the target is dumpable
    (ptrace access mode READ): that is what PR_SET_DUMPABLE 0 takes away.  As root the
    reader drops every capability (setpriv), so root's CAP_SYS_PTRACE does not count.
    """
    uid = psutil.Process(pid).uids().real
    cmd = ["cat", f"/proc/{pid}/environ"]
    if os.geteuid() == 0:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={psutil.Process(pid).gids().real}", "--clear-groups",
               "--inh-caps=-all", "--bounding-set=-all", "--", *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 or "Permission denied" in res.stderr, res.stderr
    return res.returncode == 0


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="needs setpriv (util-linux) as root")
def test_running_domains_are_not_dumpable(base: str) -> None:
    text = XS + GUEST + program("p1", "wait") + '[[domain]]\nname = "plain"\nkind = "program"\ncommand = ["sleep", "60"]\n'
    with Host(base, text, ready_timeout=1.0) as h:
        ps = h.ps()
        assert ps["plain"]["connected"] is False
        for name in ("xs", "g1", "p1"):
            pid = ps[name]["pid"]
            assert not _readable_by_a_peer(pid), f"{name} is dumpable"
            if psutil.Process(pid).uids().real != 0:
                # the files in /proc/PID of a non-dumpable process belong to root, not to its uid
                assert os.stat(f"/proc/{pid}/status").st_uid == 0
        # the control: a program that never connects never made itself non-dumpable, and the check sees that
        assert _readable_by_a_peer(ps["plain"]["pid"])
        if psutil.Process(ps["plain"]["pid"]).uids().real != 0:
            assert os.stat(f"/proc/{ps['plain']['pid']}/status").st_uid == psutil.Process(ps["plain"]["pid"]).uids().real


def test_xdoms_own_domains_keep_freed_heap_and_programs_run_as_they_are(base: str) -> None:
    """glibc's malloc settings for xdom's data paths (deploy/spawning.py) reach xdom's own domains only."""
    text = XS + GUEST + '[[domain]]\nname = "plain"\nkind = "program"\ncommand = ["sleep", "60"]\n'
    with Host(base, text, ready_timeout=1.0) as h:
        ps = h.ps()

        def tunables(name: str) -> str:
            env = psutil.Process(ps[name]["pid"]).environ()
            return env.get("GLIBC_TUNABLES", "")
        for name in ("xs", "g1"):
            assert "glibc.malloc.trim_threshold=8388608" in tunables(name).split(":"), tunables(name)
        assert tunables("plain") == os.environ.get("GLIBC_TUNABLES", "")


def test_malloc_tunables_keep_what_the_environment_names() -> None:
    assert with_malloc_tunables("") == MALLOC_TUNABLES
    assert with_malloc_tunables("glibc.malloc.trim_threshold=1:glibc.cpu.x86_rep_movsb_threshold=2048") == \
        "glibc.malloc.trim_threshold=1:glibc.cpu.x86_rep_movsb_threshold=2048:glibc.malloc.mmap_threshold=1048576"


# ---- side by side, control channel -----------------------------------------------------

def test_two_hosts_side_by_side_do_not_collide(run_dir: str) -> None:
    text = XS + GUEST + program("p1", "wait")
    with Host(os.path.join(run_dir, "a"), text) as a, Host(os.path.join(run_dir, "b"), text) as b:
        pa, pb = a.ps(), b.ps()
        assert [r["domid"] for r in pa.values()] == [r["domid"] for r in pb.values()]   # two brokers
        assert {r["pid"] for r in pa.values()}.isdisjoint(r["pid"] for r in pb.values())
        assert all(r["state"] == "running" for r in [*pa.values(), *pb.values()])
        if a.sup.uid_plan is not None and a.sup.uid_plan.separate:
            assert {r["uid"] for r in pa.values()}.isdisjoint(r["uid"] for r in pb.values())
        with XenstoreClient.unix(a.layout.xenstored_link) as xa:
            xa.write("/tool/which", "a")
        with XenstoreClient.unix(b.layout.xenstored_link) as xb:
            assert not xb.exists("/tool/which")
        assert running_pid(a.layout.run_dir) == running_pid(b.layout.run_dir) == os.getpid()
        os.kill(pa["p1"]["pid"], signal.SIGUSR2)
        a.wait("p1", "exited", state="exited")
        assert b.row("p1")["state"] == "running"


def test_control_channel_survives_bad_requests_and_does_restart_and_destroy(base: str) -> None:
    with Host(base, XS + program("p1", "wait", restart="always") + program("p2", "wait")) as h:
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(endpoint_for(h.layout.control_socket))
        try:
            for payload in (b"", b"\xc1garbage", msgpack.packb([1]), msgpack.packb({"op": "nope"}),
                            msgpack.packb({"op": "restart"}), msgpack.packb({"op": "restart", "name": 7}),
                            b"x" * 100000):
                raw.send_multipart([b"", payload])
                assert raw.poll(5000), payload[:20]
                reply = msgpack.unpackb(raw.recv_multipart()[-1], raw=False)
                assert reply["ok"] is False and reply["error"], reply
        finally:
            raw.close(0)
        with pytest.raises(ControlError) as e:
            h.control.request("restart", name="nope")
        assert e.value.errno_name == "ESRCH" and "p1" in e.value.message
        with pytest.raises(ControlError) as e:
            h.control.request("destroy", name="xs")
        assert e.value.errno_name == "EBUSY"
        ping = h.control.request("ping")
        assert ping["phase"] == "running" and ping["pid"] == os.getpid()

        before = h.row("p1")
        assert h.control.request("restart", name="p1")["generation"] == 1
        after = h.wait("p1", "restarted", state="running", generation=2)
        assert after["domid"] == before["domid"] and after["pid"] != before["pid"]

        domid = h.row("p2")["domid"]
        h.control.request("destroy", name="p2")
        r = h.wait("p2", "destroyed", state="destroyed")
        assert r["domid"] is None and r["pid"] is None
        with ManagementClient(h.layout.mgmt_endpoint) as mgmt:
            assert domid not in {d["domid"] for d in mgmt.request("list")["domains"]}
        with XenstoreClient.unix(h.layout.xenstored_link) as xs:
            assert not xs.exists(f"/local/domain/{domid}")
        h.control.request("restart", name="p2")                 # a destroyed domain is created anew
        assert h.wait("p2", "created again", state="running")["domid"] is not None


# ---- guests ----------------------------------------------------------------------------

def test_the_guests_example_runs_with_its_workload(base: str) -> None:
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy", "examples",
                           "guests.toml")
    lay = Layout(os.path.join(base, "state"), os.path.join(base, "run"))
    sup = Supervisor(load_topology(example), lay.state_dir, lay.run_dir, stop_grace=3.0)
    try:
        assert sup.start()
        rows = {r["name"]: r for r in sup.status()}
        assert all(r["state"] == "running" for r in rows.values())
        g2 = psutil.Process(rows["g2"]["pid"])
        wait_until(lambda: any(c.name() == "sleep" for c in g2.children()), 10, "g2's workload, its child")
        wait_until(lambda: f"hello from g2 as domain {rows['g2']['domid']}" in open(lay.log_path("g2")).read(),
                   10, "the workload's output in g2's log")
    finally:
        sup.stop()
    assert_nothing_left(lay)


def test_a_guest_exits_with_its_workloads_status(base: str) -> None:
    text = XS + GUEST + 'workload = ["sh", "-c", "exit 3"]\n'
    with Host(base, text) as h:
        r = h.wait("g1", "exited", state="exited")
        assert r["last_exit"] == "exited with status 3" and r["domain_state"] == "shutdown"


# ---- the exec wrapper every domain process starts through ------------------------------------

def _domain_exec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-I", "-S", DOMAIN_EXEC, *args], capture_output=True, text=True, timeout=30)


def test_domain_exec_sets_the_fd_limit_and_the_parent_death_signal_only_when_asked() -> None:
    res = _domain_exec("--parent", str(os.getpid()), "--nofile", "48", "--", PY, "-c",
                       "import resource as r; print(r.getrlimit(r.RLIMIT_NOFILE), r.getrlimit(r.RLIMIT_CORE))")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "(48, 48) (0, 0)"          # and no core dumps, soft and hard
    # PR_GET_PDEATHSIG (2), asked by the exec'd program itself: with --parent the signal survived the exec;
    # without it (as the supervisor runs every domain: the host outlives it) there is none
    probe = "import ctypes, signal; v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); print(v.value)"
    asked = _domain_exec("--parent", str(os.getpid()), "--", PY, "-c", probe)
    assert asked.stdout.strip() == str(int(signal.SIGKILL))
    assert _domain_exec("--", PY, "-c", probe).stdout.strip() == "0"


def test_domain_exec_reports_what_it_cannot_do() -> None:
    missing = _domain_exec("--", "/nonexistent/prog")
    assert missing.returncode == 127 and "cannot execute '/nonexistent/prog'" in missing.stderr
    orphan = _domain_exec("--parent", "1", "--", "true")            # its parent is not pid 1: refuse
    assert orphan.returncode == 127
    assert _domain_exec("--bogus", "--", "true").returncode == 127
    assert _domain_exec("--nofile", str(1 << 40), "--", "true").returncode == 127


# ---- refusals up front: what this host cannot run, with the limit named (deploy/host_limits.py) -------------

def _facts(**kw: Any) -> Any:
    from xdom.deploy.host_limits import HostFacts
    return HostFacts(**{"max_map_count": 65530, "mem_total": 8 << 30, "cpus": 2, "nofile_hard": 20000,
                        "uid_slots": 1000, **kw})


def _refusals(text: str, ready_timeout: float = 20.0, **facts: Any) -> list[str]:
    import tomllib

    from xdom.deploy.host_limits import problems
    from xdom.deploy.topology_parse import parse_topology
    return problems(parse_topology(tomllib.loads(text), "t.toml"), _facts(**facts), ready_timeout)


def test_memory_beyond_what_a_domain_can_map_is_refused_naming_vm_max_map_count() -> None:
    assert _refusals(XS + GUEST) == []
    big = _refusals(XS + GUEST.replace('"4M"', '"1G"'))
    assert len(big) == 1 and 'domain[1] ("g1").memory: 1024 MiB is 262144 frames' in big[0]
    assert "vm.max_map_count is 65530" in big[0] and "at most 64506 frames" in big[0]
    assert "sysctl vm.max_map_count=263168" in big[0]
    assert _refusals(XS + GUEST.replace('"4M"', '"1G"'), max_map_count=300000) == []
    assert _refusals(XS + GUEST.replace('"4M"', '"251M"')) == []           # just under: 64256 frames


def test_memory_beyond_the_hosts_and_starts_beyond_the_ready_timeout_are_refused() -> None:
    many = XS + "".join(GUEST.replace('"g1"', f'"g{n}"').replace('"4M"', '"200M"') for n in range(1, 6))
    [ram] = _refusals(many, mem_total=512 << 20)
    assert "adds up to 1004 MiB, more than this host's 512 MiB (MemTotal)" in ram
    # Memory is populated as it is used: a domain of 200 MiB starts as fast as one of 4.
    slow = _refusals(XS + GUEST.replace('"4M"', '"200M"'), ready_timeout=0.2)
    assert [s.split(":")[1] for s in slow] == [' domain[0] ("xs")', ' domain[1] ("g1")']      # each, whatever its size
    assert "starting it takes about 0.3s" in slow[1] and "ready timeout of 0.2s" in slow[1]
    assert _refusals(XS + GUEST.replace('"4M"', '"200M"'), ready_timeout=1.0) == []
    [crowd] = _refusals(many, ready_timeout=0.6)
    assert "5 domains that may have to start at once" in crowd and "2 CPU(s)" in crowd
    assert "more domains than it can bring up" in crowd
    assert _refusals(many, ready_timeout=0.6, cpus=8) == []
    uids = _refusals(XS + GUEST, uid_slots=1)
    assert len(uids) == 1 and "2 domains need a uid of their own and xdom has 1" in uids[0]
    assert _refusals(XS + GUEST, uid_slots=None) == []
    from xdom.broker.fd_budget import RESERVE
    [fds] = _refusals(XS + GUEST, nofile_hard=RESERVE + 3)
    assert f"hard RLIMIT_NOFILE ({RESERVE + 3}, less {RESERVE} for itself) leaves room for 0" in fds
    [fds] = _refusals(XS + GUEST, nofile_hard=RESERVE // 2)      # below the reserve itself: room for none
    assert f"hard RLIMIT_NOFILE ({RESERVE // 2}, less {RESERVE} for itself) leaves room for 0" in fds


def test_a_ready_channel_gives_the_supervisor_words_only() -> None:
    """The ready channel is a socket (the supervisor peeks before it saves): a hostile domain that sends
    descriptors over it, or more than a word, or nothing, gets none of them into the supervisor."""
    import array
    import socket

    from xdom.deploy.confined import parse_ready
    from xdom.deploy.lifecycle_driver import _peek

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    ours, its = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    bait = os.open("/dev/null", os.O_RDONLY)
    try:
        its.sendmsg([b"ready seccomp=kill:x " + b"y" * 1000 + b"\n"],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [bait, bait]).tobytes())])
        before = open_fds()
        word = _peek(ours.fileno())
        assert len(word) == 256 and word.startswith(b"ready seccomp=kill:x ")   # bounded, the fds not taken
        assert open_fds() == before
        assert _peek(ours.fileno()) == word                                      # peeked: still there
        assert parse_ready(word) == "seccomp=kill:x"
        its.close()
        ours.recv(4096)
        assert _peek(ours.fileno()) == b""                                       # EOF: nothing said
    finally:
        os.close(bait)
        ours.close()
        its.close()
    r, w = os.pipe()                    # a channel kept by an older supervisor: read, not peeked
    try:
        os.write(w, b"ready\n")
        assert _peek(r) == b"ready\n"
    finally:
        os.close(r)
        os.close(w)
