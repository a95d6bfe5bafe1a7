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
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from fleet_sim import TOPOLOGY, Sim, in_ns, simulated_hosts, usable

pytestmark = pytest.mark.skipif(not usable(), reason="network namespaces need root and nsenter")


@pytest.fixture
def sim() -> Iterator[Sim]:
    with simulated_hosts(3) as s:
        yield s


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


DISK_TOPOLOGY = TOPOLOGY + '''
[[domain]]
name = "blk0"
kind = "blkback"
''' + '''
[[domain]]
name = "g2"
kind = "guest"
memory = "4M"
disk = ["format=raw, vdev=xvda, access=rw, backend=blk0, target={base}/g2.img"]
'''


def _image(h: object) -> None:
    with open(os.path.join(h.base, "g2.img"), "wb") as f:        # type: ignore[attr-defined]
        f.truncate(1 << 20)


def test_remote_block_detach_is_followed_to_its_end() -> None:
    """``xdom --host H block-detach`` waits, as the host's own command does, until the disk's nodes are gone,
    and says how it ended: here the guest is frozen, so its blkfront never lets go and the host removes
    the nodes at the detach's deadline, unconfirmed.  Attached again, the disk is back."""
    with simulated_hosts(1, topology=DISK_TOPOLOGY, before_up=_image) as sim:
        def g2() -> dict:
            rows = {r["name"]: r for r in json.loads(sim.xdom("--host", "h1", "ps", "--json").stdout)}
            return rows["g2"]

        def disks(row: dict) -> list[str]:
            return [d["vdev"] for d in row["devices"] if d["type"] == "vbd"]
        row = g2()
        assert disks(row) == ["xvda"]
        os.kill(row["pid"], signal.SIGSTOP)
        try:
            detach = sim.xdom("--host", "h1", "block-detach", "g2", "xvda")
            after = g2()
        finally:
            os.kill(row["pid"], signal.SIGCONT)
        assert detach.returncode == 0, detach.stdout + detach.stderr
        assert "xvda detached from g2 (the backend did not confirm it closed" in detach.stdout, detach.stdout
        # over when the command returned:
        assert disks(after) == [] and not after["detaching"] and after["detached"] == {"xvda": False}, after
        attach = sim.xdom("--host", "h1", "block-attach", "g2", "format=raw, vdev=xvdb, access=rw, backend=blk0, "
                          f"target={sim.hosts[0].base}/g2.img")
        assert attach.returncode == 0, attach.stdout + attach.stderr
        assert disks(g2()) == ["xvdb"]
