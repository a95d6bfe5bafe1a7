"""Many hosts (issue 15): three xdom hosts, each in a network namespace of its own, managed by one CLI.

The simulated machines: a client namespace with a bridge, and per host a
namespace joined to it by a veth pair; each host is ``xdom up --detach`` run
inside its namespace (its own state and run directories) with ``[host]
listen`` on its namespace address, and the CLI runs in the client namespace,
so hosts are reached only over tcp, through their front doors.  Names carry
a random tag, so pytest-xdist workers never collide; every host is stopped
and every namespace deleted at the end, whatever happened.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nsenter"),
                                reason="network namespaces need root and nsenter")

XDOM = [sys.executable, "-m", "xdom.deploy.cli"]
SUBNET = "10.231.0"
TOPOLOGY = """[host]
state_dir = "{state}"
run_dir = "{run}"
{listen}
[[domain]]
name = "xs"
kind = "xenstored"

[[domain]]
name = "g1"
kind = "guest"
memory = "4M"
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def in_ns(ns: str, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--net=/run/netns/{ns}", *argv], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@dataclass
class Host:
    name: str
    ns: str
    address: str
    base: str

    @property
    def run_dir(self) -> str:
        return os.path.join(self.base, "run")

    @property
    def state_dir(self) -> str:
        return os.path.join(self.base, "state")

    @property
    def topology(self) -> str:
        return os.path.join(self.base, "t.toml")

    def supervisor_pid(self) -> int:
        with open(os.path.join(self.run_dir, "supervisor.pid")) as f:
            return int(f.read().split()[0])


@dataclass
class Sim:
    client_ns: str
    hosts: list[Host]
    fleet: str
    bad_fleet: str

    def xdom(self, *args: str, fleet: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return in_ns(self.client_ns, [*XDOM, "--fleet", fleet or self.fleet, *args], timeout)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(["nsenter", f"--net=/run/netns/{self.client_ns}", *XDOM, "--fleet", self.fleet,
                                 *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _leftovers(run_dir: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if run_dir in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.fixture
def sim() -> Iterator[Sim]:
    tag = os.urandom(3).hex()
    base = tempfile.mkdtemp(prefix="xf-", dir="/tmp")
    os.chmod(base, 0o755)
    client_ns = f"xfc-{tag}"
    hosts = [Host(f"h{i}", f"xfh{i}-{tag}", f"{SUBNET}.{10 + i}", os.path.join(base, f"h{i}")) for i in (1, 2, 3)]
    made: list[str] = []
    try:
        sh("ip", "netns", "add", client_ns)
        made.append(client_ns)
        sh("ip", "-n", client_ns, "link", "set", "lo", "up")
        sh("ip", "-n", client_ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", client_ns, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        sh("ip", "-n", client_ns, "link", "set", "br0", "up")
        keys = os.path.join(base, "client")
        subprocess.run([*XDOM, "keys", "client", "admin", "--dir", keys], check=True, capture_output=True)
        subprocess.run([*XDOM, "keys", "client", "stranger", "--dir", keys], check=True, capture_output=True)
        fleet = ["[client]", 'key = "client/admin.key_secret"', "timeout = 2.0", ""]
        for i, h in enumerate(hosts, 1):
            sh("ip", "netns", "add", h.ns)
            made.append(h.ns)
            sh("ip", "-n", h.ns, "link", "set", "lo", "up")
            sh("ip", "-n", client_ns, "link", "add", f"vh{i}", "type", "veth", "peer", "name", "eth0", "netns", h.ns)
            sh("ip", "-n", client_ns, "link", "set", f"vh{i}", "master", "br0", "up")
            sh("ip", "-n", h.ns, "addr", "add", f"{h.address}/24", "dev", "eth0")
            sh("ip", "-n", h.ns, "link", "set", "eth0", "up")
            os.makedirs(h.state_dir, 0o755)
            kd = os.path.join(h.state_dir, "keys")
            subprocess.run([*XDOM, "keys", "server", kd], check=True, capture_output=True)
            subprocess.run([*XDOM, "keys", "allow", os.path.join(keys, "admin.key"), "--dir",
                            os.path.join(kd, "allowed_clients")], check=True, capture_output=True)
            with open(h.topology, "w") as f:
                f.write(TOPOLOGY.format(state=h.state_dir, run=h.run_dir,
                                        listen=f'listen = "tcp://{h.address}:7700"\n'))
            server_key = subprocess.run([*XDOM, "keys", "show", os.path.join(kd, "server.key")], check=True,
                                        capture_output=True, text=True).stdout.strip()
            fleet += ["[[host]]", f'name = "{h.name}"', f'address = "tcp://{h.address}:7700"',
                      f'server_key = "{server_key}"', ""]
        fleet_path = os.path.join(base, "fleet.toml")
        with open(fleet_path, "w") as f:
            f.write("\n".join(fleet))
        bad_path = os.path.join(base, "stranger.toml")
        with open(bad_path, "w") as f:
            f.write("\n".join(fleet).replace("admin.key_secret", "stranger.key_secret"))
        for h in hosts:
            up = in_ns(h.ns, [*XDOM, "up", h.topology, "--detach"])
            assert up.returncode == 0, up.stdout + up.stderr
        yield Sim(client_ns, hosts, fleet_path, bad_path)
    finally:
        for h in hosts:
            for run_dir in (h.run_dir, os.path.join(h.base, "extra-run")):
                if os.path.exists(run_dir):
                    for p in _leftovers(run_dir):
                        try:
                            p.resume()      # a host the test stopped with SIGSTOP
                        except psutil.Error:
                            pass
                    in_ns(h.ns, [*XDOM, "down", "--run-dir", run_dir])
                for p in _leftovers(run_dir):
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_one_cli_for_three_hosts(sim: Sim) -> None:
    h1, h2, h3 = sim.hosts

    # Every host's domains, each with its host.
    ps = sim.xdom("ps", "--all", "--json")
    assert ps.returncode == 0, ps.stderr
    listed = json.loads(ps.stdout)
    assert listed["unreachable"] == {}
    assert {(r["host"], r["name"]) for r in listed["domains"]} == {(h.name, n) for h in sim.hosts for n in ("xs", "g1")}
    assert all(r["state"] == "running" for r in listed["domains"])
    table = sim.xdom("ps", "--all")
    assert table.returncode == 0 and table.stdout.startswith("HOST")

    # Stop a domain on one host, start it again; the others are untouched.
    assert sim.xdom("--host", "h1", "destroy", "g1").returncode == 0
    rows = {(r["host"], r["name"]): r for r in json.loads(sim.xdom("ps", "--all", "--json").stdout)["domains"]}
    assert rows[("h1", "g1")]["state"] == "destroyed"
    assert rows[("h2", "g1")]["state"] == rows[("h3", "g1")]["state"] == "running"
    restart = sim.xdom("--host", "h1", "restart", "g1")
    assert restart.returncode == 0, restart.stderr
    one = json.loads(sim.xdom("--host", "h1", "ps", "--json").stdout)
    assert {r["name"]: r["state"] for r in one} == {"xs": "running", "g1": "running"}

    # up and down of another topology file that lives on a host: run there.
    extra = os.path.join(h2.base, "extra.toml")
    with open(extra, "w") as f:
        f.write(TOPOLOGY.format(state=os.path.join(h2.base, "extra-state"), run=os.path.join(h2.base, "extra-run"),
                                listen=""))
    up = sim.xdom("--host", "h2", "up", extra)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "h2:   g1: guest domain" in up.stdout
    assert os.path.exists(os.path.join(h2.base, "extra-run", "supervisor.pid"))
    again = sim.xdom("--host", "h2", "up", h2.topology)        # its own: already up, nothing started
    assert again.returncode == 0 and "it is up" in again.stdout
    down = sim.xdom("--host", "h2", "down", "--topology", extra)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not os.path.exists(os.path.join(h2.base, "extra-run"))

    # The lifecycle events of every host, on one stream: restart g1 on h3 until the stream has seen one.
    follower = sim.popen("events", "--all", "--json", "--count", "1", "--idle-timeout", "60")
    try:
        for _ in range(10):
            assert sim.xdom("--host", "h3", "restart", "g1").returncode == 0
            try:
                out, _err = follower.communicate(timeout=3)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            pytest.fail("xdom events --all saw nothing of ten restarts")
    finally:
        follower.kill()
        follower.wait()
    event = json.loads(out.splitlines()[0])
    assert event["host"] == "h3" and event["name"] == "g1"

    # A client whose key is not on the allow-list gets nothing, and is told so.
    refused = sim.xdom("--host", "h1", "ps", fleet=sim.bad_fleet)
    assert refused.returncode == 3 and "refused this client's key" in refused.stderr
    assert "xs" not in refused.stdout
    # A plaintext client gets nothing at all.
    plain = in_ns(sim.client_ns, [sys.executable, "-c", (
        "import sys, zmq, msgpack; s = zmq.Context.instance().socket(zmq.DEALER); s.linger = 0; "
        f"s.connect('tcp://{h1.address}:7700'); s.send_multipart([b'', msgpack.packb({{'op': 'ps'}})]); "
        "sys.exit(0 if not s.poll(2000) else 1)")])
    assert plain.returncode == 0, "a plaintext client got an answer"

    # A host that stops answering mid-way is reported unreachable; the others are still listed.
    os.kill(h2.supervisor_pid(), signal.SIGSTOP)
    try:
        ps = sim.xdom("ps", "--all", "--json")
    finally:
        os.kill(h2.supervisor_pid(), signal.SIGCONT)
    assert ps.returncode == 3
    listed = json.loads(ps.stdout)
    assert set(listed["unreachable"]) == {"h2"} and "no answer" in listed["unreachable"]["h2"]
    assert {r["host"] for r in listed["domains"]} == {"h1", "h3"}
    # ... and one that died.
    os.kill(h3.supervisor_pid(), signal.SIGKILL)
    ps = sim.xdom("ps", "--all")
    assert ps.returncode == 3
    assert any(line.startswith("h3") and "UNREACHABLE" in line for line in ps.stdout.splitlines())
    assert any(line.startswith("h2 ") and " g1 " in line for line in ps.stdout.splitlines())

    # down over the network: the host stops and its door closes.
    down = sim.xdom("--host", "h1", "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not os.path.exists(h1.run_dir)
