"""Per-domain uids (deploy/isolation.py): who runs under which uid, and what `up` says when it cannot separate them.

As root, each domain of a host runs under a uid of its own, held under a lock
so that hosts side by side never share one.  When those uids cannot run the
interpreter (a venv in a 0700 directory, like one under /root), ``--uids
auto`` runs every domain as root and says so once at start-up, and ``--uids
separate`` refuses to start.  The unreadable interpreter here is a real venv
in a 0700 directory: no probe is faked.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator

import psutil
import pytest
from test_supervisor import GUEST, XS, Host, program

from xdom.deploy.isolation import UID_BASE, UID_COUNT, IsolationError, UidMode, plan_uids, probe_uid
from xdom.deploy.rundir import Layout, running_pid
from xdom.deploy.topology import Topology
from xdom.deploy.topology_parse import parse_topology

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="per-domain uids need root")
TEXT = XS + GUEST + program("p1", "wait")


def separable() -> bool:
    return os.geteuid() == 0 and probe_uid(UID_BASE + UID_COUNT - 1) is None


def _topology(text: str) -> Topology:
    return parse_topology(tomllib.loads(text.replace("{prog}", "/bin/true")), "t.toml")


@ROOT_ONLY
def test_plans_give_each_domain_its_own_uid_and_hosts_never_share_one(run_dir: str) -> None:
    if not separable():
        pytest.skip(f"uid {UID_BASE + UID_COUNT - 1} cannot run {sys.executable} with xdom")
    lock_dir = os.path.join(run_dir, "uids")
    topo = _topology(TEXT + '[[domain]]\nname = "fixed"\nkind = "program"\ncommand = ["true"]\nuid = 64500\n')
    a = plan_uids(topo, UidMode.SEPARATE, lock_dir)
    try:
        assert a.separate and set(a.uids) == {"xs", "g1", "p1", "fixed"}
        assert a.uids["fixed"] == 64500                        # the topology's uid is taken as given
        uids = list(a.uids.values())
        assert len(set(uids)) == len(uids)
        for uid in uids:
            assert uid is not None and UID_BASE <= uid < UID_BASE + UID_COUNT
            with pytest.raises(KeyError):
                pwd.getpwuid(uid)                              # never a user of this system
        assert "each domain runs under its own uid: xs=" in a.note
        # a second host at the same time: other uids; the fixed one is refused while the first holds it
        with pytest.raises(IsolationError, match="uid 64500 of domain 'fixed' is in use by another xdom host"):
            plan_uids(topo, UidMode.SEPARATE, lock_dir)
        b = plan_uids(_topology(TEXT), UidMode.AUTO, lock_dir)
        try:
            assert b.separate and set(b.uids.values()).isdisjoint(uids)
        finally:
            b.release()
    finally:
        a.release()
    again = plan_uids(topo, UidMode.SEPARATE, lock_dir)         # released: free again
    try:
        assert again.uids["fixed"] == 64500
    finally:
        again.release()
    shared = plan_uids(topo, UidMode.SHARED, lock_dir)
    assert not shared.separate and set(shared.uids.values()) == {None} and "--uids shared" in shared.note


@ROOT_ONLY
def test_domains_of_a_live_host_run_under_distinct_uids(run_dir: str) -> None:
    if not separable():
        pytest.skip(f"uid {UID_BASE + UID_COUNT - 1} cannot run {sys.executable} with xdom")
    with Host(run_dir, TEXT, uids="separate") as h:
        ps = h.ps()
        uids = [r["uid"] for r in ps.values()]
        assert len(set(uids)) == len(uids) and all(u >= UID_BASE for u in uids), uids
        for name, r in ps.items():
            real, effective, saved = psutil.Process(r["pid"]).uids()
            assert real == effective == saved == r["uid"], name
            assert psutil.Process(r["pid"]).gids().real == r["uid"]       # a group of its own too
        assert h.control is not None and h.control.request("ps")["uids"] == "separate"


def test_not_as_root_everything_runs_under_the_callers_uid() -> None:
    """plan_uids as an unprivileged user (run under uid 65534 when we are root)."""
    code = ("import sys, tomllib\nfrom xdom.deploy.isolation import *\nfrom xdom.deploy.topology_parse import parse_topology\n"
            "t = parse_topology(tomllib.loads(sys.stdin.read()), 't.toml')\n"
            "p = plan_uids(t, UidMode.AUTO)\nprint(p.separate, set(p.uids.values()), p.note)\n"
            "try:\n    plan_uids(t, UidMode.SEPARATE)\nexcept IsolationError as e:\n    print('refused:', e)\n")
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        if probe_uid(65534) is not None:
            pytest.skip(f"uid 65534 cannot run {sys.executable} with xdom")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *cmd]
    res = subprocess.run(cmd, input=_text(), capture_output=True, text=True, timeout=60, cwd="/")
    assert res.returncode == 0, res.stderr
    me = 65534 if os.geteuid() == 0 else os.geteuid()
    assert res.stdout.splitlines()[0] == (f"False {{None}} not running as root: every domain runs under uid {me} "
                                          f"(no per-domain uid isolation)")
    assert "refused: per-domain uids need root; run as root or use --uids shared" in res.stdout


def _text() -> str:
    return TEXT.replace("{prog}", "/bin/true")


# ---- an interpreter other uids cannot run -------------------------------------------------

@pytest.fixture
def closed_python(run_dir: str) -> Iterator[str]:
    """A venv of this interpreter with xdom's packages, in a directory only root may enter (like /root)."""
    closed = os.path.join(run_dir, "closed")
    os.makedirs(os.path.join(closed, "venv", "bin"))
    os.chmod(closed, 0o700)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    os.makedirs(os.path.join(closed, "venv", "lib", version))
    os.symlink(site, os.path.join(closed, "venv", "lib", version, "site-packages"))
    base = os.path.realpath(sys.executable)
    os.symlink(base, os.path.join(closed, "venv", "bin", "python"))
    with open(os.path.join(closed, "venv", "pyvenv.cfg"), "w") as f:
        f.write(f"home = {os.path.dirname(base)}\ninclude-system-site-packages = false\n")
    yield os.path.join(closed, "venv", "bin", "python")


def _up(python: str, run_dir: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], Layout, str]:
    lay = Layout(os.path.join(run_dir, "state"), os.path.join(run_dir, "run"))
    path = os.path.join(run_dir, "t.toml")
    with open(path, "w") as f:
        f.write(XS + GUEST + '[[domain]]\nname = "p1"\nkind = "program"\ncommand = ["sleep", "60"]\n')
    res = subprocess.run([python, "-m", "xdom.deploy.cli", "up", path, "--state-dir", lay.state_dir,
                          "--run-dir", lay.run_dir, "--ready-timeout", "1", *extra], capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    return res, lay, path


SAID = "every domain runs as root (no per-domain uid isolation)"


def _ps_uids(run: str) -> dict[str, int]:
    ps = subprocess.run([sys.executable, "-m", "xdom.deploy.cli", "ps", "--json", "--run-dir", run],
                        capture_output=True, text=True, timeout=60)
    assert ps.returncode == 0, ps.stderr
    return {r["name"]: psutil.Process(r["pid"]).uids().real for r in json.loads(ps.stdout)}


@ROOT_ONLY
def test_a_closed_interpreter_means_one_uid_said_once_at_start_up(run_dir: str, closed_python: str) -> None:
    res, lay, _ = _up(closed_python, run_dir, "--detach")
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        out = res.stdout + res.stderr
        assert out.count(SAID) == 1, out
        assert f"cannot run {closed_python} with xdom" in out and "Permission denied" in out
        with open(lay.log_path("supervisor")) as f:
            assert f.read().count(SAID) == 1
        assert _ps_uids(lay.run_dir) == {"xs": 0, "g1": 0, "p1": 0}
    finally:
        if running_pid(lay.run_dir) is not None:
            down = subprocess.run([sys.executable, "-m", "xdom.deploy.cli", "down", "--run-dir", lay.run_dir],
                                  capture_output=True, text=True, timeout=120)
            assert down.returncode == 0, down.stderr


@ROOT_ONLY
def test_a_closed_interpreter_is_said_once_in_the_foreground_too(run_dir: str, closed_python: str) -> None:
    lay = Layout(os.path.join(run_dir, "state"), os.path.join(run_dir, "run"))
    path = os.path.join(run_dir, "t.toml")
    with open(path, "w") as f:
        f.write(XS)
    proc = subprocess.Popen([closed_python, "-m", "xdom.deploy.cli", "up", path, "--state-dir", lay.state_dir,
                             "--run-dir", lay.run_dir], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("xdom: up:"):
                break
        assert _ps_uids(lay.run_dir) == {"xs": 0}
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(seen) + rest
    assert proc.returncode == 0, out
    assert out.count(SAID) == 1, out


@ROOT_ONLY
def test_uids_separate_refuses_a_closed_interpreter_and_starts_nothing(run_dir: str, closed_python: str) -> None:
    for detach in ((), ("--detach",)):
        res, lay, _ = _up(closed_python, run_dir, "--uids", "separate", *detach)
        assert res.returncode == 2, res.stdout + res.stderr
        assert f"cannot run {closed_python} with xdom" in res.stderr
        assert "install xdom where other users can read it, or use --uids shared" in res.stderr
        assert running_pid(lay.run_dir) is None and not os.path.exists(lay.run_dir)
        assert not [p for p in psutil.process_iter(["cmdline"]) if lay.run_dir in " ".join(p.info["cmdline"] or [])]


@ROOT_ONLY
def test_a_host_under_a_directory_others_cannot_search_still_reaches_its_domains(run_dir: str) -> None:
    """State and run directories inside a 0700 directory (a mkdtemp, a home): each domain's uid is given
    search access to the ancestors it needs (an ACL entry), or no domain could reach the hypercall socket."""
    if not separable():
        pytest.skip(f"uid {UID_BASE + UID_COUNT - 1} cannot run {sys.executable} with xdom")
    closed = os.path.join(run_dir, "closed")
    os.makedirs(closed, mode=0o700)
    os.chmod(closed, 0o700)
    with Host(closed, TEXT, uids="separate") as h:
        ps = h.ps()
        assert all(r["state"] == "running" for r in ps.values()), ps
        assert len({r["uid"] for r in ps.values()}) == len(ps)
    assert os.stat(closed).st_mode & 0o007 == 0       # still closed to others: an ACL entry per uid, no o+x
