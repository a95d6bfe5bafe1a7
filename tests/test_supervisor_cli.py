"""``xdom up/down/ps/logs/restart/destroy`` as a user runs them: exit statuses, output, and what is left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
from helpers import wait_until

from xdom.deploy import netns
from xdom.deploy.rundir import Layout, default_base, running_pid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XDOM = [sys.executable, "-m", "xdom.deploy.cli"]
WAITER = ("import signal, sys; from xdom.domains.xenhost import connect; h = connect(); "
          "signal.sigwait({signal.SIGUSR1})")


def xdom(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*XDOM, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def topology(base: str, body: str, host: bool = True) -> tuple[str, Layout]:
    lay = Layout(os.path.join(base, "state"), os.path.join(base, "run"))
    head = f'[host]\nstate_dir = "{lay.state_dir}"\nrun_dir = "{lay.run_dir}"\n\n' if host else ""
    path = os.path.join(base, "t.toml")
    with open(path, "w") as f:
        f.write(head + body)
    return path, lay


XS = '[[domain]]\nname = "xs"\nkind = "xenstored"\n\n'
GUEST = '[[domain]]\nname = "g1"\nkind = "guest"\nmemory = "4M"\n\n'
PROGRAM = f'[[domain]]\nname = "p1"\nkind = "program"\ncommand = ["{sys.executable}", "-c", "{WAITER}"]\n\n'


def leftovers(run_dir: str) -> list[tuple[int, str]]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if run_dir in cmd and p.pid != os.getpid():
            found.append((p.pid, cmd))
    return found


@pytest.fixture
def cleanup(run_dir: str) -> Iterator[list[str]]:
    """Run directories whose supervisors must be gone after the test, whatever happened."""
    dirs: list[str] = []
    yield dirs
    for d in dirs:
        if os.path.exists(d):               # a supervisor, or a host whose supervisor died: down stops either
            xdom("down", "--run-dir", d)
        for pid, _ in leftovers(d):
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


def test_up_detach_ps_logs_restart_destroy_down(run_dir: str, cleanup: list[str]) -> None:
    path, lay = topology(run_dir, XS + GUEST + PROGRAM)
    cleanup.append(lay.run_dir)
    up = xdom("up", path, "--detach")
    assert up.returncode == 0, up.stdout + up.stderr
    for name in ("broker", "xs", "g1", "p1"):
        assert f"  {name}: " in up.stdout
    assert f"xdom down --run-dir {lay.run_dir}" in up.stdout
    supervisor = running_pid(lay.run_dir)
    assert supervisor is not None and psutil.Process(supervisor).ppid() != os.getpid()   # a daemon

    again = xdom("up", path, "--detach")
    assert again.returncode == 1 and "already runs" in again.stderr

    ps = xdom("ps", "--json", "--topology", path)              # found through the topology's [host] run_dir
    assert ps.returncode == 0, ps.stderr
    rows = json.loads(ps.stdout)
    assert [(r["name"], r["kind"], r["state"]) for r in rows] == [
        ("xs", "xenstored", "running"), ("g1", "guest", "running"), ("p1", "program", "running")]
    assert all(r["pid"] and r["domid"] and r["restarts"] == 0 and r["rss"] for r in rows)
    assert rows[1]["devices"] == []
    assert rows[1]["netns"] == (netns.netns_name("g1", lay.run_dir) if netns.unavailable_reason() is None else None)
    table = xdom("ps", "--run-dir", lay.run_dir)
    assert table.returncode == 0 and "NAME" in table.stdout and "guest" in table.stdout
    top = xdom("top", "--run-dir", lay.run_dir, "-n", "2", "--interval", "0.1")
    assert top.returncode == 0 and top.stdout.count("NAME") == 2 and "program" in top.stdout

    logs = xdom("logs", "g1", "--run-dir", lay.run_dir)
    assert logs.returncode == 0 and "starting guest domain g1" in logs.stdout

    restarted = xdom("restart", "p1", "--run-dir", lay.run_dir)
    assert restarted.returncode == 0, restarted.stderr
    assert "p1 restarted" in restarted.stdout
    assert xdom("restart", "nope", "--run-dir", lay.run_dir).returncode == 1
    refused = xdom("destroy", "xs", "--run-dir", lay.run_dir)
    assert refused.returncode == 1 and "xenstore domain" in refused.stderr
    destroyed = xdom("destroy", "p1", "--run-dir", lay.run_dir)
    assert destroyed.returncode == 0, destroyed.stderr
    rows = {r["name"]: r for r in json.loads(xdom("ps", "--json", "--run-dir", lay.run_dir).stdout)}
    assert rows["p1"]["state"] == "destroyed" and rows["p1"]["restarts"] == 1 and rows["g1"]["state"] == "running"

    down = xdom("down", "--run-dir", lay.run_dir)
    assert down.returncode == 0, down.stderr
    assert not psutil.pid_exists(supervisor) or psutil.Process(supervisor).status() == psutil.STATUS_ZOMBIE
    assert leftovers(lay.run_dir) == []
    assert not os.path.exists(lay.run_dir)
    assert not os.path.exists(lay.xenstored_state)
    assert not any(netns.exists(netns.netns_name(n, lay.run_dir)) for n in ("xs", "g1", "p1"))
    with open(lay.log_path("supervisor")) as f:
        text = f.read()
    assert "stop requested over the control channel" in text
    assert " INFO " in text and " DEBUG " not in text          # the default --log-level is info

    # nothing running now: status 3, and logs still readable from the state directory
    assert xdom("ps", "--run-dir", lay.run_dir).returncode == 3
    assert xdom("down", "--run-dir", lay.run_dir).returncode == 3
    assert xdom("restart", "g1", "--run-dir", lay.run_dir).returncode == 3
    old = xdom("logs", "g1", "--state-dir", lay.state_dir, "-n", "1")
    assert old.returncode == 0 and "stopped with the host" in old.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_foreground_up_stops_cleanly_on_ctrl_c_or_sigterm(run_dir: str, cleanup: list[str], sig: int) -> None:
    path, lay = topology(run_dir, XS + PROGRAM, host=False)
    cleanup.append(lay.run_dir)
    proc = subprocess.Popen([*XDOM, "up", path, "--state-dir", lay.state_dir, "--run-dir", lay.run_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("xdom: up:"):
                break
        assert seen and seen[-1].startswith("xdom: up: 2 domains"), "".join(seen) + proc.stderr.read()
        assert "  xs: xenstored domain" in "".join(seen)
        rows = json.loads(xdom("ps", "--json", "--run-dir", lay.run_dir).stdout)
        pids = [r["pid"] for r in rows]
        proc.send_signal(sig)
        out, _err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "everything stopped" in out
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert leftovers(lay.run_dir) == [] and not os.path.exists(lay.run_dir)


BAD = {
    "missing images": None,             # deploy/examples/default.toml, whose images do not exist here
    "not toml": "[[domain\nname=",
    "unknown kind": '[[domain]]\nname = "x"\nkind = "hypervisor"\n',
    "no command": '[[domain]]\nname = "p"\nkind = "program"\n',
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("detach", [False, True])
def test_up_refuses_bad_and_unsupported_topologies_and_starts_nothing(run_dir: str, case: str, detach: bool) -> None:
    if BAD[case] is None:
        path = os.path.join(ROOT, "deploy", "examples", "default.toml")
    else:
        path = os.path.join(run_dir, "bad.toml")
        with open(path, "w") as f:
            f.write(BAD[case])
    run = os.path.join(run_dir, "run")
    res = xdom("up", path, "--state-dir", os.path.join(run_dir, "state"), "--run-dir", run,
               *(["--detach"] if detach else []))
    assert res.returncode == 2, res.stdout + res.stderr
    if BAD[case] is None:
        assert 'domain[3] ("g1"): disk xvda: ' in res.stderr and "g1.img: No such file or directory" in res.stderr
        assert "g2.img: No such file or directory" in res.stderr and "nothing was started" in res.stderr
    assert not os.path.exists(run) and not os.path.exists(os.path.join(run_dir, "state"))
    assert leftovers(run) == []


def test_up_refuses_a_run_dir_too_long_for_unix_sockets(run_dir: str) -> None:
    path, _ = topology(run_dir, PROGRAM, host=False)
    run = os.path.join(run_dir, "r" * 100)
    res = xdom("up", path, "--run-dir", run, "--state-dir", os.path.join(run_dir, "s"))
    assert res.returncode == 2
    assert "too long" in res.stderr and "unix socket" in res.stderr
    assert not os.path.exists(run)


def test_commands_without_a_host_say_nothing_runs(run_dir: str) -> None:
    for cmd in (["down"], ["ps"], ["logs", "g1"], ["restart", "g1"], ["destroy", "g1"]):
        res = xdom(*cmd, "--run-dir", os.path.join(run_dir, "none"))
        assert res.returncode == 3, (cmd, res.stdout, res.stderr)
        assert "no supervisor is running" in res.stderr
    assert xdom("up").returncode == 2                  # argparse: a usage error


def test_a_supervisor_killed_outright_leaves_its_host_running_and_down_stops_it(run_dir: str,
                                                                              cleanup: list[str]) -> None:
    path, lay = topology(run_dir, XS + GUEST + PROGRAM)
    cleanup.append(lay.run_dir)
    assert xdom("up", path, "--detach").returncode == 0
    rows = json.loads(xdom("ps", "--json", "--run-dir", lay.run_dir).stdout)
    supervisor = running_pid(lay.run_dir)
    assert supervisor is not None
    os.kill(supervisor, signal.SIGKILL)
    wait_until(lambda: running_pid(lay.run_dir) is None, 10, "the supervisor to die")
    # nothing it started dies with it: no parent-death signal any more (a new `xdom up` adopts them)
    assert all(psutil.pid_exists(r["pid"]) and psutil.Process(r["pid"]).status() != psutil.STATUS_ZOMBIE
               for r in rows)
    # ps says plainly what it found, at once (no wait on a control socket nobody serves)
    t0 = time.monotonic()
    ps = xdom("ps", "--run-dir", lay.run_dir)
    assert ps.returncode == 0 and time.monotonic() - t0 < 5, ps.stderr
    assert "supervisor not running" in ps.stdout and "host adopted by none" in ps.stdout
    assert "3 of 3 domains alive" in ps.stdout, ps.stdout
    found = {r["name"]: r for r in json.loads(xdom("ps", "--json", "--run-dir", lay.run_dir).stdout)}
    assert {n: (r["pid"], r["alive"], r["supervised"]) for n, r in found.items()} == \
        {r["name"]: (r["pid"], True, False) for r in rows}
    # other commands say who is missing
    res = xdom("restart", "p1", "--run-dir", lay.run_dir)
    assert res.returncode == 3 and "runs on without one" in res.stderr
    # down without a supervisor stops it all, and leaves nothing
    down = xdom("down", "--run-dir", lay.run_dir)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped the host it left" in down.stdout and "everything stopped" in down.stdout
    assert not any(psutil.pid_exists(r["pid"]) and psutil.Process(r["pid"]).status() != psutil.STATUS_ZOMBIE
                   for r in rows)
    assert leftovers(lay.run_dir) == [] and not os.path.exists(lay.run_dir)
    assert netns.of_host(lay.run_dir) == []
    assert not os.path.exists(os.path.join(lay.state_dir, "xenstored"))
    assert xdom("down", "--run-dir", lay.run_dir).returncode == 3


def _follow(cmd: list[str]) -> tuple[subprocess.Popen[str], list[str], threading.Thread]:
    """Start ``cmd``; its stdout lines arrive in the list as they are printed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return proc, lines, reader


def test_global_log_level_and_logs_follow(run_dir: str, cleanup: list[str]) -> None:
    path, lay = topology(run_dir, XS + PROGRAM)
    cleanup.append(lay.run_dir)
    # --log-level is xdom's own option: before the command, not after it
    misplaced = xdom("up", path, "--detach", "--log-level", "debug")
    assert misplaced.returncode == 2 and "unrecognized arguments: --log-level" in misplaced.stderr
    assert xdom("--log-level", "loud", "ps").returncode == 2
    up = xdom("--log-level", "debug", "up", path, "--detach")
    assert up.returncode == 0, up.stdout + up.stderr
    rows = {r["name"]: r for r in json.loads(xdom("ps", "--json", "--run-dir", lay.run_dir).stdout)}
    # the daemon, xenstored and every domain process run at that level
    with open(lay.log_path("supervisor")) as f:
        assert " xdom.supervisor DEBUG " in f.read()
    assert "--log-level debug xenstored" in " ".join(psutil.Process(rows["xs"]["pid"]).cmdline())
    for name in ("xs", "p1"):
        assert psutil.Process(rows[name]["pid"]).environ()["XDOM_LOG_LEVEL"] == "debug"

    # logs -f prints what is there, then each new line as the domain's log grows, until the host stops
    follow, lines, reader = _follow([*XDOM, "logs", "p1", "-f", "--run-dir", lay.run_dir])
    try:
        wait_until(lambda: any("generation 1" in line for line in lines), 20, "the log as it was")
        assert not any("generation 2" in line for line in lines)
        assert xdom("restart", "p1", "--run-dir", lay.run_dir).returncode == 0     # the log gets a new marker
        wait_until(lambda: any("generation 2" in line for line in lines), 20, "the line written after -f started")
        assert follow.poll() is None, "logs -f stopped following"
        assert xdom("down", "--run-dir", lay.run_dir).returncode == 0
        assert follow.wait(30) == 0                     # the host is gone: -f ends, status 0
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
        reader.join(10)
    assert any("stopped with the host" in line for line in lines), "".join(lines[-5:])


def test_two_hosts_running_make_commands_without_a_host_ambiguous(run_dir: str, cleanup: list[str]) -> None:
    """Under the default base with two supervisors, `ps` (and the others) must be told which: status 2."""
    tag = os.path.basename(run_dir)[-8:]
    runs = [os.path.join(default_base(), f"xdt-{tag}-{n}") for n in "ab"]
    for n, run in zip("ab", runs):
        cleanup.append(run)
        path = os.path.join(run_dir, f"{n}.toml")
        with open(path, "w") as f:
            f.write(XS)
        up = xdom("up", path, "--detach", "--state-dir", os.path.join(run_dir, f"state-{n}"), "--run-dir", run)
        assert up.returncode == 0, up.stdout + up.stderr
    env = {k: v for k, v in os.environ.items() if k != "XENSTORED_PATH"}
    for cmd in (["ps"], ["logs", "xs"], ["restart", "xs"], ["down"], ["xenstore", "ls", "/"]):
        res = subprocess.run([*XDOM, *cmd], capture_output=True, text=True, timeout=60, env=env,
                             stdin=subprocess.DEVNULL)
        assert res.returncode == 2, (cmd, res.stdout, res.stderr)
        assert "supervisors are running" in res.stderr and "--run-dir" in res.stderr, res.stderr
        assert all(run in res.stderr for run in runs), res.stderr
    assert all(running_pid(run) is not None for run in runs), "an ambiguous command stopped something"
    ps = xdom("ps", "--json", "--run-dir", runs[0])
    assert ps.returncode == 0 and [r["name"] for r in json.loads(ps.stdout)] == ["xs"]

    # xdom xenstore finds each host's xenstored from its run directory (or its topology)
    for n, run in zip("ab", runs):
        w = xdom("xenstore", "write", "/tool/which", n, "--run-dir", run)
        assert w.returncode == 0, w.stderr
    for n, run in zip("ab", runs):
        r = xdom("xenstore", "read", "/tool/which", "--run-dir", run)
        assert r.returncode == 0 and r.stdout.strip() == n, r.stdout + r.stderr
    ls = xdom("xenstore", "ls", "/local/domain/0", "--run-dir", runs[1])
    assert ls.returncode == 0 and '/local/domain/0/name = "Domain-0"' in ls.stdout, ls.stdout + ls.stderr
    for run in runs:
        assert xdom("down", "--run-dir", run).returncode == 0
    gone = xdom("xenstore", "ls", "/", "--run-dir", runs[0])
    assert gone.returncode == 3 and "no supervisor is running" in gone.stderr


def test_xenstore_finds_the_host_by_its_topology(run_dir: str, cleanup: list[str]) -> None:
    path, lay = topology(run_dir, XS + GUEST)
    cleanup.append(lay.run_dir)
    assert xdom("up", path, "--detach").returncode == 0
    g1 = json.loads(xdom("ps", "--json", "--run-dir", lay.run_dir).stdout)[1]["domid"]
    res = xdom("xenstore", "read", f"/local/domain/{g1}/name", "--topology", path)
    assert res.returncode == 0 and res.stdout.strip() == "g1", res.stdout + res.stderr
    # --socket and XENSTORED_PATH still work as they do for Xen's tools
    res = xdom("xenstore", "read", "/local/domain/0/name", "--socket", lay.xenstored_link)
    assert res.returncode == 0 and res.stdout.strip() == "Domain-0"
    env = dict(os.environ, XENSTORED_PATH=lay.xenstored_link)
    res = subprocess.run([*XDOM, "xenstore", "read", f"/local/domain/{g1}/domid"], capture_output=True, text=True,
                         timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert res.returncode == 0 and res.stdout.strip() == str(g1), res.stderr
    assert xdom("down", "--run-dir", lay.run_dir).returncode == 0


def _links_everywhere() -> str:
    """`ip -o link` of the host's namespace and of every named one (ip -all netns exec)."""
    host = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30).stdout
    named = subprocess.run(["ip", "-all", "netns", "exec", "ip", "-o", "link", "show"], capture_output=True,
                           text=True, timeout=60).stdout
    return host + named


def _unix_sockets_under(path: str) -> list[str]:
    """Bound unix sockets under ``path``, in the host's namespace and every named one (a domain binds in its own)."""
    with open("/proc/net/unix") as f:
        text = f.read()
    text += subprocess.run(["ip", "-all", "netns", "exec", "cat", "/proc/net/unix"], capture_output=True, text=True,
                           timeout=60).stdout
    return sorted({line.split()[-1] for line in text.splitlines() if f" {path}/" in line})


@pytest.mark.skipif(netns.unavailable_reason() is not None, reason="needs root and iproute2 (namespaces, TAPs)")
def test_down_leaves_no_process_namespace_tap_bridge_or_socket(run_dir: str, cleanup: list[str]) -> None:
    tag = os.urandom(3)
    macs = [f"00:16:3e:{tag[0]:02x}:{tag[1]:02x}:{tag[2] & 0xfe | n:02x}" for n in (0, 1)]
    bridge = f"xdt{tag.hex()}"
    image = os.path.join(run_dir, "g1.img")
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    body = (XS + '[[domain]]\nname = "blk0"\nkind = "blkback"\n\n[[domain]]\nname = "net0"\nkind = "netback"\n\n'
            f'[[domain]]\nname = "g1"\nkind = "guest"\nmemory = "16M"\n'
            f'disk = ["format=raw, vdev=xvda, access=rw, backend=blk0, target={image}"]\n'
            f'vif = ["mac={macs[0]}, bridge={bridge}, backend=net0, ip=10.79.0.1/24"]\n\n'
            f'[[domain]]\nname = "g2"\nkind = "guest"\nmemory = "16M"\n'
            f'vif = ["mac={macs[1]}, bridge={bridge}, backend=net0, ip=10.79.0.2/24"]\n\n')
    path, lay = topology(run_dir, body)
    cleanup.append(lay.run_dir)
    up = xdom("up", path, "--detach")
    assert up.returncode == 0, up.stdout + up.stderr
    rows = {r["name"]: r for r in json.loads(xdom("ps", "--json", "--run-dir", lay.run_dir).stdout)}
    supervisor = running_pid(lay.run_dir)
    broker = [p.pid for p in psutil.Process(supervisor).children() if "broker" in " ".join(p.cmdline())]
    pids = [supervisor, *broker, *(r["pid"] for r in rows.values())]
    export = rows["g1"]["devices"][0]["export"]
    # what down must remove is there now: the check below can see it
    assert len(pids) == 7 and all(psutil.pid_exists(p) for p in pids), pids
    spaces = netns.of_host(lay.run_dir)
    assert sorted(spaces) == sorted(r["netns"] for r in rows.values())
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    assert all(ns in listed for ns in spaces)
    links = _links_everywhere()
    assert all(mac in links for mac in macs), "the guests' TAPs are not where the check looks"
    sockets = _unix_sockets_under(lay.run_dir)
    assert export in sockets and os.path.join(lay.run_dir, "supervisor.sock") in sockets, sockets

    down = xdom("down", "--run-dir", lay.run_dir)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "everything stopped" in down.stdout
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == [] and leftovers(lay.run_dir) == []
    assert netns.of_host(lay.run_dir) == []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    assert not any(ns in listed for ns in spaces), listed
    links = _links_everywhere()
    assert not any(mac in links for mac in macs), "a TAP outlived its guest"
    assert bridge not in links                          # no bridge, in the host's namespace or any other
    assert _unix_sockets_under(lay.run_dir) == []
    assert not os.path.exists(lay.run_dir) and not os.path.exists(export)
    assert os.path.getsize(image) == 8 << 20             # the disk is the user's: it stays


@pytest.mark.parametrize("detach", [False, True])
def test_up_refuses_memory_beyond_vm_max_map_count_up_front(run_dir: str, detach: bool) -> None:
    path, lay = topology(run_dir, XS + GUEST.replace('"4M"', '"1G"'))
    res = xdom("up", path, *(["--detach"] if detach else []))
    assert res.returncode == 2, res.stdout + res.stderr
    assert 'domain[1] ("g1").memory: 1024 MiB' in res.stderr and "vm.max_map_count" in res.stderr
    assert "nothing was started" in res.stderr
    assert not os.path.exists(lay.run_dir) and leftovers(lay.run_dir) == []
