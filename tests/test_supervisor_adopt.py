"""A host outlives its supervisor: kill -9 of the supervisor under load, ``xdom ps`` without one, adoption by a
new ``xdom up`` (same pids, same domids, restart policies applied by the new supervisor), ``xdom down`` with and
without a supervisor leaving nothing, a guest that stays down leaving nothing, and the pieces (the keeper, the
state file, exit statuses nobody can read).

The supervisors here run as ``xdom up --detach`` daemons, so that a test can kill one outright.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from helpers import wait_until
from test_blk_domains import FioRun, make_image, nbd_serves, uri
from test_net_domains import Iperf3Stream, in_ns
from test_supervisor import XS, Host, assert_nothing_left, program
from test_vm_topology import NEEDS_ROOT, VM_SMALL, VmHost, vm_guest, vm_image, vm_run  # noqa: F401 (a fixture)

from xdom.deploy import host_state, netns
from xdom.deploy.keeper import KeeperClient, KeeperError, keeper_argv
from xdom.deploy.launcher import start_ready
from xdom.deploy.policy import UNKNOWN_RETURNCODE, Action, ExitStatus, RestartTracker
from xdom.deploy.rundir import Layout, running_pid
from xdom.deploy.topology import RestartPolicy
from xdom.deploy.xl_disk import parse_disk
from xdom.deploy.xl_vif import parse_vif
from xdom.deploy.xlcfg import EXPORT_VHOST_USER
from xdom.domains.xenstore import XenstoreClient

LIVE = pytest.mark.skipif(netns.unavailable_reason() is not None or not all(
    shutil.which(t) for t in ("fio", "iperf3", "ping", "nbdinfo", "qemu-img")),
    reason="needs root, iproute2, fio, iperf3, ping, nbdinfo and qemu-img (make test installs them as root)")


def xdom(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdom.deploy.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def write_topology(base: str, body: str) -> tuple[str, Layout]:
    lay = Layout(os.path.join(base, "state"), os.path.join(base, "run"))
    path = os.path.join(base, "t.toml")
    with open(path, "w") as f:
        f.write(f'[host]\nstate_dir = "{lay.state_dir}"\nrun_dir = "{lay.run_dir}"\n\n{body}')
    return path, lay


def ps(lay: Layout) -> dict[str, dict[str, Any]]:
    res = xdom("ps", "--json", "--run-dir", lay.run_dir)
    assert res.returncode == 0, res.stderr
    return {r["name"]: r for r in json.loads(res.stdout)}


def wait_row(lay: Layout, name: str, what: str, timeout: float = 30.0, **want: Any) -> dict[str, Any]:
    def ok() -> dict[str, Any] | None:
        r = ps(lay)[name]
        return r if all(r.get(k) == v for k, v in want.items()) else None
    return wait_until(ok, timeout, f"{name}: {what}", interval=0.1)


def kill_supervisor(lay: Layout) -> int:
    pid = running_pid(lay.run_dir)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: running_pid(lay.run_dir) is None, 10, "the supervisor to die")
    return pid


def alive(pid: int | None) -> bool:
    try:
        return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def host_processes(run_dir: str) -> list[tuple[int, str]]:
    """Every process of the host: command lines naming the run directory, or a domain's environment."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            env = p.environ() if p.pid != os.getpid() else {}
        except psutil.Error:
            continue
        if p.pid != os.getpid() and (run_dir in cmd or run_dir in env.get("XDOM_HYPERCALL", "")):
            found.append((p.pid, cmd))
    return found


def _links_everywhere() -> str:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=30).stdout
    out += subprocess.run(["ip", "-all", "netns", "exec", "ip", "-o", "link"], capture_output=True, text=True,
                          timeout=60).stdout
    return out


def assert_host_gone(lay: Layout, pids: list[int], macs: list[str], bridge: str) -> None:
    assert not [p for p in pids if alive(p)], "a process outlived xdom down"
    assert host_processes(lay.run_dir) == []
    assert netns.of_host(lay.run_dir) == []
    links = _links_everywhere()
    assert not any(mac in links for mac in macs), "a TAP outlived its host"
    assert bridge not in links
    with open("/proc/net/unix") as f:
        assert f" {lay.run_dir}/" not in f.read()
    assert not os.path.exists(lay.run_dir)
    assert not os.path.exists(lay.xenstored_state)


@pytest.fixture
def down_after(run_dir: str) -> Iterator[list[str]]:
    """Run directories to bring down after the test, whatever happened (with or without a supervisor)."""
    dirs: list[str] = []
    yield dirs
    for d in dirs:
        if os.path.exists(d):
            xdom("down", "--run-dir", d)


def bridged_host(base: str, tag: bytes) -> tuple[str, Layout, list[str], str, str]:
    macs = [f"00:16:3e:{tag[0]:02x}:{tag[1]:02x}:{tag[2] & 0xfe | n:02x}" for n in (0, 1)]
    bridge = f"xda{tag.hex()}"
    image = os.path.join(base, "g1.img")
    make_image(image, 24 << 20)
    body = (XS + '[[domain]]\nname = "blk0"\nkind = "blkback"\nrestart_backoff = 0.1\n\n'
            '[[domain]]\nname = "net0"\nkind = "netback"\nswitch = "bridge"\nrestart_backoff = 0.1\n\n'
            '[[domain]]\nname = "g1"\nkind = "guest"\nmemory = "16M"\nrestart = "on-failure"\n'
            f'disk = ["format=raw, vdev=xvda, access=rw, backend=blk0, target={image}"]\n'
            f'vif = ["mac={macs[0]}, bridge={bridge}, backend=net0, ip=10.81.{tag[0]}.1/24"]\n\n'
            '[[domain]]\nname = "g2"\nkind = "guest"\nmemory = "16M"\nrestart = "on-failure"\n'
            f'vif = ["mac={macs[1]}, bridge={bridge}, backend=net0, ip=10.81.{tag[0]}.2/24"]\n\n')
    path, lay = write_topology(base, body)
    return path, lay, macs, bridge, image


# ---- under load: kill -9 of the supervisor, adoption, restarts by the new supervisor, down ----------------

@LIVE
@pytest.mark.timeout(240)
def test_a_supervisor_killed_under_load_is_adopted_and_nothing_notices(run_dir: str, down_after: list[str]) -> None:
    tag = os.urandom(3)
    path, lay, macs, bridge, _image = bridged_host(run_dir, tag)
    down_after.append(lay.run_dir)
    ip1, ip2 = f"10.81.{tag[0]}.1", f"10.81.{tag[0]}.2"
    up = xdom("up", path, "--detach")
    assert up.returncode == 0, up.stdout + up.stderr
    before = ps(lay)
    export = before["g1"]["devices"][0]["export"]
    ns1, ns2 = before["g1"]["netns"], before["g2"]["netns"]
    size = 16 << 20
    fio_job = FioRun(["fio", "--name=xdom", "--ioengine=nbd", f"--uri={uri(export)}", "--verify_state_save=0",
                      "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={size}", "--verify=crc32c",
                      "--do_verify=1", "--verify_backlog=1024", "--verify_fatal=1", "--rate=4m"], run_dir)
    stream = Iperf3Stream(ns2, ns1, ip1)
    try:
        stream.start()
        wait_until(lambda: fio_job.progress()[0] > 0 or fio_job.proc.poll() is not None, 60,
                   "fio's first progress report", interval=0.05)
        assert fio_job.proc.poll() is None, fio_job.stderr
        dead = kill_supervisor(lay)
        killed_at = len(stream.intervals)
        # Nothing it started notices: every process lives on.
        assert all(alive(r["pid"]) for r in before.values())
        # ps says plainly what it found, without a supervisor, at once.
        t0 = time.monotonic()
        said = xdom("ps", "--run-dir", lay.run_dir)
        took = time.monotonic() - t0
        assert said.returncode == 0 and took < 5, (took, said.stderr)
        assert f"supervisor not running (pid {dead} is gone" in said.stdout and "host adopted by none" in said.stdout
        assert "5 of 5 domains alive" in said.stdout, said.stdout
        # A new `xdom up` of the same topology adopts the host: same processes, same domids.
        again = xdom("up", path, "--detach")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "adopting the host" in again.stdout and "5 of 5 domains alive" in again.stdout, again.stdout
        adopted = ps(lay)
        for name, r in before.items():
            a = adopted[name]
            assert (a["pid"], a["domid"], a["state"], a["generation"]) == (r["pid"], r["domid"], "running", 1), a
        # fio verified every block across it; the TCP stream went on.
        job = fio_job.finish(timeout=120)
        assert fio_job.proc.returncode == 0, fio_job.stderr
        assert job["error"] == 0 and job["write"]["io_bytes"] == size and job["read"]["io_bytes"] == size, job
        wait_until(lambda: len(stream.intervals) >= killed_at + 5, 30, "iperf3 intervals after the kill")
        after_kill = stream.intervals[killed_at:killed_at + 5]
        assert all(" 0.00 bits/sec" not in line for line in after_kill), after_kill
    finally:
        fio_job.stop()
        stream.stop()

    # The new supervisor applies the restart policies: a guest killed now comes back with its vif (its TAP
    # goes to netback over the channel the keeper kept) ...
    os.kill(before["g2"]["pid"], signal.SIGKILL)
    g2 = wait_row(lay, "g2", "restarted by the new supervisor", state="running", generation=2)
    assert g2["domid"] == before["g2"]["domid"] and g2["last_exit"].startswith("exit status unknown (adopted")
    wait_until(lambda: in_ns(ns2, "ping", "-c", "1", "-W", "1", ip1).returncode == 0, 30, "g2 reaching g1 again")
    # ... and one with a disk gets it back (blkback gets the image over its kept channel).
    os.kill(before["g1"]["pid"], signal.SIGKILL)
    wait_row(lay, "g1", "restarted by the new supervisor", state="running", generation=2)
    wait_until(lambda: nbd_serves(export), 30, "g1's export after its restart")
    assert subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri(export),
                           os.path.join(run_dir, "copy.img")], capture_output=True, timeout=120).returncode == 0
    wait_until(lambda: in_ns(ns1, "ping", "-c", "1", "-W", "1", ip2).returncode == 0, 30, "g1 reaching g2 again")
    rows = ps(lay)
    assert rows["blk0"]["generation"] == 1 and rows["net0"]["generation"] == 1, "a driver domain was restarted"

    pids = [r["pid"] for r in rows.values()] + [p for p, _ in host_processes(lay.run_dir)]
    down = xdom("down", "--run-dir", lay.run_dir)
    assert down.returncode == 0, down.stdout + down.stderr
    assert_host_gone(lay, pids, macs, bridge)


@LIVE
@pytest.mark.timeout(120)
def test_down_without_a_supervisor_leaves_nothing_whatever_died_first(run_dir: str, down_after: list[str]) -> None:
    tag = os.urandom(3)
    path, lay, macs, bridge, image = bridged_host(run_dir, tag)
    down_after.append(lay.run_dir)
    up = xdom("up", path, "--detach")
    assert up.returncode == 0, up.stdout + up.stderr
    rows = ps(lay)
    kill_supervisor(lay)
    pids = [r["pid"] for r in rows.values()] + [p for p, _ in host_processes(lay.run_dir)]
    # While no supervisor runs, a guest, netback and the broker die too.
    broker = next(p for p, cmd in host_processes(lay.run_dir) if " broker " in f" {cmd} ")
    for pid in (rows["g2"]["pid"], rows["net0"]["pid"], broker):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(alive(p) for p in (rows["g2"]["pid"], rows["net0"]["pid"], broker)), 10, "deaths")
    said = xdom("ps", "--run-dir", lay.run_dir)
    assert "3 of 5 domains alive" in said.stdout and "broker dead" in said.stdout, said.stdout
    down = xdom("down", "--run-dir", lay.run_dir)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped the host it left" in down.stdout
    assert_host_gone(lay, pids, macs, bridge)
    assert os.path.getsize(image) == 24 << 20           # the user's image stays


# ---- adoption applies restart policies to what died meanwhile -------------------------------------------

def test_a_domain_that_died_while_no_supervisor_ran_is_handled_on_adoption(run_dir: str,
                                                                           down_after: list[str]) -> None:
    prog = os.path.join(run_dir, "prog.py")
    with open(prog, "w") as f:
        f.write("import signal\nsignal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
                "from xdom.domains.xenhost import connect\nh = connect()\n"
                "signal.sigwait({signal.SIGUSR1})\nh.shutdown('poweroff')\n")
    body = XS + "".join(program(n, "x", restart=r).replace('"{prog}", "x"', f'"{prog}"')
                        for n, r in (("again", "on-failure"), ("never", "never"), ("clean", "on-failure")))
    path, lay = write_topology(run_dir, body)
    down_after.append(lay.run_dir)
    assert xdom("up", path, "--detach", "--ready-timeout", "15").returncode == 0
    rows = ps(lay)
    kill_supervisor(lay)
    os.kill(rows["again"]["pid"], signal.SIGKILL)
    os.kill(rows["never"]["pid"], signal.SIGKILL)
    os.kill(rows["clean"]["pid"], signal.SIGUSR1)       # says poweroff to the broker, then exits 0
    wait_until(lambda: not any(alive(rows[n]["pid"]) for n in ("again", "never", "clean")), 10, "three deaths")
    said = xdom("ps", "--run-dir", lay.run_dir).stdout
    assert "1 of 4 domains alive" in said, said
    up = xdom("up", path, "--detach", "--ready-timeout", "15")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "1 of 4 domains alive" in up.stdout
    again = wait_row(lay, "again", "restarted", state="running", generation=2)
    assert again["domid"] == rows["again"]["domid"]
    after = ps(lay)
    assert after["xs"]["pid"] == rows["xs"]["pid"]
    # Nobody could read their exit statuses; the broker saw a crash, a crash and a poweroff.
    assert after["never"]["state"] == "exited"
    assert after["never"]["last_exit"] == "exit status unknown (adopted; the broker saw it crash) " \
                                          "(it ended while no supervisor ran)"
    assert after["clean"]["state"] == "exited", after["clean"]       # on-failure: a poweroff is clean
    assert "the broker saw it poweroff" in after["clean"]["last_exit"]
    if netns.unavailable_reason() is None:
        assert not netns.exists(rows["never"]["netns"]), "a domain that stays down keeps its namespace"
    down = xdom("down", "--run-dir", lay.run_dir)
    assert down.returncode == 0 and "everything stopped" in down.stdout
    assert not os.path.exists(lay.run_dir) and host_processes(lay.run_dir) == []


def test_up_refuses_to_adopt_a_host_of_another_topology(run_dir: str, down_after: list[str]) -> None:
    path, lay = write_topology(run_dir, XS)
    down_after.append(lay.run_dir)
    assert xdom("up", path, "--detach").returncode == 0
    xs = ps(lay)["xs"]["pid"]
    kill_supervisor(lay)
    other = os.path.join(run_dir, "other.toml")
    with open(path) as f:
        text = f.read()
    with open(other, "w") as f:
        f.write(text + '[[domain]]\nname = "p"\nkind = "program"\ncommand = ["sleep", "60"]\n')
    res = xdom("up", other, "--detach")
    assert res.returncode == 1 and "not this topology's" in res.stderr, res.stdout + res.stderr
    assert alive(xs) and os.path.exists(lay.state_file), "a refused adoption touched the host"
    assert xdom("down", "--run-dir", lay.run_dir).returncode == 0
    assert not alive(xs)


# ---- a guest that stays down leaves nothing its restart does not need -----------------------------------

@LIVE
def test_a_guest_that_stays_down_leaves_nothing_behind(run_dir: str) -> None:
    tag = os.urandom(3)
    image = os.path.join(run_dir, "g1.img")
    make_image(image, 8 << 20)
    mac = f"00:16:3e:{tag[0]:02x}:{tag[1]:02x}:{tag[2] & 0xfe:02x}"
    text = (XS + '[[domain]]\nname = "blk0"\nkind = "blkback"\n'
            '[[domain]]\nname = "net0"\nkind = "netback"\nswitch = "bridge"\n'
            '[[domain]]\nname = "g1"\nkind = "guest"\nmemory = "8M"\nrestart = "never"\n'
            f'disk = ["format=raw, vdev=xvda, access=rw, backend=blk0, target={image}"]\n'
            f'vif = ["mac={mac}, backend=net0, ip=10.82.{tag[0]}.1/24"]\n')
    with Host(run_dir, text) as h:
        g1 = h.row("g1")
        net0, blk0 = h.row("net0"), h.row("blk0")
        export = g1["devices"][0]["export"]
        tap = net0["vifs"][0]["tap"]
        assert nbd_serves(export) and netns.exists(g1["netns"])
        assert tap in subprocess.run(["ip", "-n", net0["netns"], "-o", "link"], capture_output=True, text=True,
                                     timeout=30).stdout
        os.kill(g1["pid"], signal.SIGKILL)
        r = h.wait("g1", "exited", state="exited")
        assert r["last_exit"] == "killed by SIGKILL"
        wait_until(lambda: any(e.event == "released" for e in h.journal("g1")), 10, "g1 released")
        # its socket, its export directory, its namespace (its TAP in it), netback's TAP for it: gone
        assert not os.path.lexists(export) and not os.path.exists(os.path.dirname(export))
        assert not netns.exists(g1["netns"])
        assert tap not in subprocess.run(["ip", "-n", net0["netns"], "-o", "link"], capture_output=True, text=True,
                                         timeout=30).stdout
        with XenstoreClient.unix(h.layout.xenstored_socket) as xs:
            for path in (f"/local/domain/{blk0['domid']}/backend/vbd/{g1['domid']}",
                         f"/local/domain/{net0['domid']}/backend/vif/{g1['domid']}", f"/local/domain/{g1['domid']}"):
                assert not xs.exists(path), path
        # what its restart needs stays: its domid in the broker; `xdom restart` brings it all back
        assert r["domid"] == g1["domid"] and r["domain_state"] == "crashed"
        h.control.request("restart", name="g1")  # type: ignore[union-attr]
        r = h.wait("g1", "started again", state="running", generation=2)
        assert r["domid"] == g1["domid"]
        wait_until(lambda: nbd_serves(export), 30, "g1's export again")
        assert netns.exists(g1["netns"])
    assert_nothing_left(h.layout)


# ---- the pieces -----------------------------------------------------------------------------------------

def test_the_keeper_holds_descriptors_for_its_uid_only(run_dir: str) -> None:
    proc = start_ready(keeper_argv(sys.executable, run_dir), os.path.join(run_dir, "keeper.log"), "keeper")
    try:
        path = os.path.join(run_dir, "keeper.sock")
        with pytest.raises(KeeperError, match="not by the keeper"):
            KeeperClient(path, proc.pid + 1)
        a, b = socket.socketpair()
        k = KeeperClient(path, proc.pid)
        k.put("dev/g1", a.fileno())
        k.put("uid/g1", os.open("/dev/null", os.O_RDONLY))
        a.close()                                   # ours is closed; the keeper's keeps the pair open
        b.send(b"still there")
        got = k.get("dev/")
        assert set(got) == {"dev/g1"}
        with socket.socket(fileno=got["dev/g1"]) as again:
            assert again.recv(64) == b"still there"
        k.drop(prefix="uid/")
        assert k.ping()["names"] == ["dev/g1"]
        k.drop("dev/g1")
        b.settimeout(5)
        assert b.recv(64) == b""                    # the last copy went with the drop: the peer sees EOF
        with pytest.raises(KeeperError, match="refused"):
            k._call({"op": "put", "name": "x"})     # a put without a descriptor
        k.exit()
        assert proc.wait(10) == 0
        k.close()
        b.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_state_file_is_believed_only_as_written(run_dir: str) -> None:
    model = {"version": host_state.VERSION, "boot_id": host_state.boot_id(), "domains": []}
    host_state.save(run_dir, model)
    assert host_state.load(run_dir) == model
    assert os.stat(os.path.join(run_dir, host_state.STATE_FILE)).st_mode & 0o777 == 0o600
    host_state.save(run_dir, {**model, "boot_id": "another boot"})
    assert host_state.load(run_dir) is None
    os.chmod(os.path.join(run_dir, host_state.STATE_FILE), 0o666)
    with pytest.raises(host_state.StateError):
        host_state.load(run_dir)
    # a process by pid and start time: never a pid alone
    me = host_state.identity(os.getpid())
    assert me is not None and host_state.alive(me)
    assert not host_state.alive({"pid": os.getpid(), "starttime": me["starttime"] + 1})
    # devices as they are now, hot-attached ones included, come back equal
    disks = (parse_disk("format=raw, vdev=xvda, access=ro, backend=blk0, target=/x/a.img"),
             parse_disk("vdev=xvdb, backend=blk0, target=/x/b.img").__class__(
                 vdev="xvdb", target="/x/b.img", backend="blk0", export_kind=EXPORT_VHOST_USER))
    vifs = (parse_vif("mac=00:16:3e:00:00:01, bridge=xb, backend=net0, ip=10.0.0.1/24, rate=10Mb/s, devid=3"),)
    assert host_state.decode_disks(host_state.encode_disks(disks)) == disks
    assert host_state.decode_vifs(host_state.encode_vifs(vifs)) == vifs


def test_an_exit_nobody_could_read_is_a_failure_unless_seen_clean() -> None:
    unknown = ExitStatus.from_returncode(UNKNOWN_RETURNCODE)
    assert unknown.unknown and not unknown.clean and unknown.describe() == "exit status unknown (adopted)"
    t = RestartTracker(RestartPolicy.ON_FAILURE, 0.1, 5, 60.0)
    assert t.on_exit(unknown, 0.0).action == Action.RESTART
    clean = ExitStatus(unknown="adopted; the broker saw it poweroff", seen_clean=True)
    assert clean.clean and t.on_exit(clean, 1.0).action == Action.STAY_DOWN
    with pytest.raises(ValueError):
        ExitStatus(unknown="adopted", code=0)


# ---- a VM guest: QEMU adopted, its QMP and console reconnected ----------------------------------------------

@NEEDS_ROOT
@pytest.mark.timeout(240)
@pytest.mark.usefixtures("vm_image")
def test_a_vm_guest_is_adopted_with_its_qemu(run_dir: str, down_after: list[str]) -> None:
    h = VmHost(run_dir, XS + vm_guest(vm=VM_SMALL, memory='"4M"', restart='"on-failure"', restart_backoff="0.1"))
    down_after.append(h.run)
    h.up()
    before = ps(h.layout)["g1"]
    qemu = before["vm"]["pid"]
    assert vm_run(h.run, "g1", "echo before > /tmp/mark; echo ok").strip() == "ok"
    kill_supervisor(h.layout)
    said = xdom("ps", "--run-dir", h.run)
    assert "2 of 2 domains alive" in said.stdout, said.stdout
    assert any(line.split() == ["vm", "qemu", "-", "running", str(qemu)] for line in said.stdout.splitlines())
    up = xdom("up", h.path, "--detach")
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"g1: VM adopted (QEMU pid {qemu}, QMP reconnected)" in up.stdout, up.stdout
    now = ps(h.layout)["g1"]
    assert (now["pid"], now["vm"]["pid"], now["vm"]["state"]) == (before["pid"], qemu, "running")
    assert vm_run(h.run, "g1", "cat /tmp/mark").strip() == "before"      # the same VM, its console reached again
    # QEMU killed after adoption: the new supervisor restarts the VM by the guest's policy
    os.kill(qemu, signal.SIGKILL)
    again = wait_until(lambda: (r := ps(h.layout)["g1"])["vm"]["state"] == "running" and r["vm"]["restarts"] == 1
                       and r, 60, "the VM restarted by the new supervisor", interval=0.2)
    assert again["vm"]["pid"] != qemu and again["pid"] == before["pid"]
    assert again["vm"]["last_exit"] == "exit status unknown (adopted)"
    assert vm_run(h.run, "g1", "echo back").strip() == "back"
    h.down({"g1": again, "g1-first": before})


@pytest.mark.parametrize("when", ["seen", "saved"])
def test_a_supervisor_killed_as_a_domain_says_ready_leaves_the_word_to_its_adopter(
        run_dir: str, down_after: list[str], when: str) -> None:
    """The supervisor dies (a failpoint) as blkback's ready word arrives: before it wrote it down ("seen":
    the word is still in the channel the keeper holds) or after ("saved": the state has it).  Either way
    the supervisor that adopts the host knows blkback ready: it is not killed as never ready, nor restarted."""
    path, lay = write_topology(run_dir, XS + '\n[[domain]]\nname = "blk0"\nkind = "blkback"\n')
    down_after.append(lay.run_dir)
    env = dict(os.environ, XDOM_SUPERVISOR_DIE_AT_READY=f"blk0:{when}")
    subprocess.run([sys.executable, "-m", "xdom.deploy.cli", "up", path, "--detach", "--ready-timeout", "20"],
                   capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL, env=env)
    wait_until(lambda: running_pid(lay.run_dir) is None, 30, "the supervisor to die at its failpoint")
    before = ps(lay)["blk0"]
    assert alive(before["pid"])
    up = xdom("up", path, "--detach", "--ready-timeout", "20")
    assert up.returncode == 0, up.stdout + up.stderr
    after = ps(lay)["blk0"]
    assert (after["state"], after["pid"], after["generation"]) == ("running", before["pid"], 1), after
    assert xdom("down", "--run-dir", lay.run_dir).returncode == 0
