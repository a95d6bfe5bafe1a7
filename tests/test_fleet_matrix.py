"""The feature matrix spread over simulated hosts (issue 15): pytest-xdist workers reached through execnet.

Each host is a network namespace (tests/fleet_sim.py) running its own xdom
host and an execnet socketserver bound to its namespace address only; the
test runs pytest-xdist with one ``--tx socket=ADDRESS:PORT//id=HOST`` per
host, from the client namespace, so every worker runs on a host of its own
and is reached only over the namespace network.  xdist sends the test code
nothing but the test paths (in each worker's environment, as README's ssh
recipe does): every host runs its own installation of xdom and its tests,
at the same path (here the shared checkout and venv).
The run's report (tests/fleet_report.py) says which host ran which test;
the test checks the run passed and that every host ran part of it.

The matrix: blkif features x ABIs in-process and across processes, netif
switch modes: 40 tests, about a minute here, so it runs in ``make test``
too (``XDOM_FLEET_MATRIX=0`` skips it); ``make test-fleet`` runs the
many-hosts tests alone.

The execnet socketserver executes whatever it is sent, without
authentication: it is test machinery, bound only inside a namespace of the
test's own, never on a real network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
from fleet_sim import in_ns, simulated_hosts, usable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = 8888
MATRIX = [
    "tests/test_blk_matrix.py::test_feature_matrix_data_integrity",
    "tests/test_blk_processes.py::test_feature_matrix_across_processes",
    "tests/test_net_domains.py::test_64_mib_streams_arrive_byte_identical_both_ways",
]

pytestmark = [
    pytest.mark.skipif(not usable(), reason="network namespaces need root and nsenter"),
    pytest.mark.skipif(os.environ.get("XDOM_FLEET_MATRIX") == "0", reason="XDOM_FLEET_MATRIX=0"),
    pytest.mark.timeout(1800),
]


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        family = []
    for p in family:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait()


def test_the_matrix_across_three_hosts() -> None:
    with simulated_hosts(3) as sim:
        servers: list[subprocess.Popen[bytes]] = []
        try:
            for h in sim.hosts:
                scratch = os.path.join(h.base, "exec")
                os.makedirs(scratch, 0o755)
                log = open(os.path.join(h.base, "socketserver.log"), "wb")
                env = {**os.environ, "XDOM_FLEET_HOST": h.name, "PYTHONPATH": os.path.join(ROOT, "tests")}
                servers.append(subprocess.Popen(
                    ["nsenter", f"--net=/run/netns/{h.ns}", sys.executable, "-m", "execnet.script.socketserver",
                     f"{h.address}:{PORT}"], cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL))
                log.close()
            for h in sim.hosts:       # listening inside its namespace: a connection from the client's gets through
                probe = [sys.executable, "-c", f"import socket; socket.create_connection(('{h.address}', {PORT}), 1)"]
                deadline = time.monotonic() + 30
                while in_ns(sim.client_ns, probe).returncode != 0:
                    assert time.monotonic() < deadline, f"{h.name}'s execnet socketserver is not listening"
                    time.sleep(0.2)     # waiting for a process to bind, with a deadline
            report = os.path.join(os.path.dirname(sim.hosts[0].base), "fleet-report.json")
            # The code does not travel (xdist's --rsyncdir is deprecated): each host runs its own installation,
            # and the test paths go in the workers' environment, so xdist has no local path to rewrite.
            paths = " ".join(os.path.join(ROOT, t) for t in MATRIX)
            tx = [arg for h in sim.hosts for arg in (
                "--tx", f"socket={h.address}:{PORT}//id={h.name}//chdir={h.base}/exec"
                        f"//env:PYTEST_ADDOPTS=--rootdir={ROOT} {paths}")]
            run = subprocess.run(
                ["nsenter", f"--net=/run/netns/{sim.client_ns}", sys.executable, "-m", "pytest", "-p", "fleet_report",
                 "-p", "no:cacheprovider", "--dist", "load", *tx, "--fleet-report", report, "-q", "-rA"], cwd=ROOT, capture_output=True, text=True, timeout=1700,
                env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "tests")})
            print(run.stdout[-20000:])
            print(run.stderr[-5000:], file=sys.stderr)
            assert run.returncode == 0, "the matrix failed across the hosts (its report is above)"
            with open(report) as f:
                ran = json.load(f)
        finally:
            for proc in servers:
                _kill_tree(proc)
    assert ran and all(r["outcome"] == "passed" for r in ran)
    assert {r["host"] for r in ran} == {h.name for h in sim.hosts}, "a host ran none of the matrix"
    assert all(r["worker"] == r["host"] for r in ran), "a test's report came from another host than its worker's"
    assert "which host ran what" in run.stdout
