"""Simulated machines for the many-hosts tests (issue 15): network namespaces joined by veth pairs to a bridge.

A client namespace holds a bridge; each host has a namespace of its own,
joined to it by a veth pair, with an address on the bridge's subnet.  Hosts
are reached only over those addresses.  Names carry a random tag, so
pytest-xdist workers never collide.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil

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


def usable() -> bool:
    return os.geteuid() == 0 and shutil.which("nsenter") is not None


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


@contextlib.contextmanager
def simulated_hosts(count: int = 3, start: bool = True, topology: str = TOPOLOGY,
                    before_up: Callable[[Host], None] | None = None) -> Iterator[Sim]:
    """``count`` hosts in namespaces of their own, joined to a client namespace's bridge; with ``start``, each
    running ``xdom up --detach`` of a small topology (``topology``: its ``{state}``, ``{run}``, ``{listen}``
    and ``{base}`` filled in; ``before_up`` makes what it needs) that listens on its address.  Everything is
    stopped and deleted on leaving, whatever happened."""
    tag = os.urandom(3).hex()
    base = tempfile.mkdtemp(prefix="xf-", dir="/tmp")
    os.chmod(base, 0o755)
    client_ns = f"xfc-{tag}"
    hosts = [Host(f"h{i}", f"xfh{i}-{tag}", f"{SUBNET}.{10 + i}", os.path.join(base, f"h{i}")) for i in range(1, count + 1)]
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
                f.write(topology.format(state=h.state_dir, run=h.run_dir, base=h.base,
                                        listen=f'listen = "tcp://{h.address}:7700"\n'))
            if before_up is not None:
                before_up(h)
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
        for h in hosts if start else []:
            up = in_ns(h.ns, [*XDOM, "up", h.topology, "--detach"])
            if up.returncode != 0:
                raise RuntimeError(f"{h.name}: xdom up failed: {up.stdout}{up.stderr}")
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
