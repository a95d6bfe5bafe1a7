"""Attack 6: a guest's uid against the run directory of a supervised host.

The run directory holds what the toolstack and every domain trust:
``hypercall.sock`` (domains connect there and hand over their tokens),
``mgmt.sock``/``events.sock`` (the broker's management API),
``supervisor.sock`` and ``supervisor.pid`` (what ``xdom down`` signals),
``xenstored.sock`` (dom0's way to the store) and each guest's NBD export
socket.  The toolstack used to give a guest's uid write access to the
directory of its export socket, which by default was the run directory
itself: the guest could then replace any of those files.

From a process under the guest's uid (what a compromised guest is), each
replacement is tried with ``renameat2(RENAME_EXCHANGE)`` of the guest's own
export socket and the target, and swapped back at once if it worked, so a
successful attack shows the danger without wrecking the host; creating
files, directories, symlinks and sockets is tried too (and cleaned up).

Secure outcome: every attempt fails with EACCES or EPERM, and the host
keeps running: the broker answers, the files are the ones it made, and the
other guest's disk is still served on its export.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_supervisor import Host

from xdom.broker.mgmt_client import ManagementClient

from .rig import uid_problem

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(shutil.which("nbdinfo") is None, reason="needs nbdinfo (make test installs it)")]

IMAGE = 4 << 20

ATTACK = r'''
import ctypes, json, os, socket, sys
run, state, own, other = sys.argv[1:5]
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2

def exchange(a, b):
    if libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), RENAME_EXCHANGE) != 0:
        return ctypes.get_errno()
    libc.renameat2(AT_FDCWD, b.encode(), AT_FDCWD, a.encode(), RENAME_EXCHANGE)    # put it back at once
    return 0

def attempt(make, undo):
    try:
        make()
    except OSError as e:
        return e.errno
    try:
        undo()
    except OSError:
        pass
    return 0

out = {}
for name in ("hypercall.sock", "mgmt.sock", "events.sock", "supervisor.sock", "supervisor.pid", "xenstored.sock"):
    out["replace " + name] = exchange(own, os.path.join(run, name))
out["replace the other guest's export socket"] = exchange(own, other)
planted = os.path.join(run, "planted")
out["create a file in the run directory"] = attempt(
    lambda: os.close(os.open(planted, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)), lambda: os.unlink(planted))
out["make a directory in the run directory"] = attempt(lambda: os.mkdir(planted), lambda: os.rmdir(planted))
out["make a symlink in the run directory"] = attempt(lambda: os.symlink("/etc/passwd", planted),
                                                    lambda: os.unlink(planted))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
out["bind a socket in the run directory"] = attempt(lambda: s.bind(planted), lambda: os.unlink(planted))
moved = os.path.join(run, "moved.sock")
out["move its export into the run directory"] = attempt(lambda: os.rename(own, moved), lambda: os.rename(moved, own))
out["write supervisor.pid"] = attempt(lambda: os.close(os.open(os.path.join(run, "supervisor.pid"), os.O_WRONLY)),
                                      lambda: None)
out["chmod the run directory"] = attempt(lambda: os.chmod(run, 0o777), lambda: os.chmod(run, 0o755))
xs_planted = os.path.join(run, "xenstored", "planted")
out["create a file in xenstored's directory"] = attempt(
    lambda: os.close(os.open(xs_planted, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)), lambda: os.unlink(xs_planted))
state_planted = os.path.join(state, "planted")
out["create a file in the state directory"] = attempt(
    lambda: os.close(os.open(state_planted, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)),
    lambda: os.unlink(state_planted))
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
out["connect to the other guest's export"] = attempt(lambda: c.connect(other), lambda: None)
print(json.dumps({"uid": os.getuid(), "attempts": out}))
'''


def _topology(run_dir: str) -> str:
    disks = {}
    for g in ("g1", "g2"):
        image = os.path.join(run_dir, f"{g}.img")
        with open(image, "wb") as f:
            f.write(g.encode() * (IMAGE // 2))
        disks[g] = f'disk = ["format=raw, vdev=xvda, access=rw, backend=blk0, target={image}"]'
    return ('[[domain]]\nname = "xs"\nkind = "xenstored"\n'
            '[[domain]]\nname = "blk0"\nkind = "blkback"\n'
            f'[[domain]]\nname = "g1"\nkind = "guest"\nmemory = "8M"\n{disks["g1"]}\n'
            f'[[domain]]\nname = "g2"\nkind = "guest"\nmemory = "8M"\n{disks["g2"]}\n')


def _export_size(export: str) -> int:
    res = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={export}"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return int(res.stdout)


def test_guest_uid_cannot_replace_or_plant_files_in_the_run_directory(run_dir: str) -> None:
    why = uid_problem()
    if why is not None:
        pytest.skip(why)
    with Host(run_dir, _topology(run_dir), uids="separate") as h:
        ps = h.ps()
        g1 = ps["g1"]
        own = g1["devices"][0]["export"]
        other = ps["g2"]["devices"][0]["export"]
        run, state = h.layout.run_dir, h.layout.state_dir
        before = {name: os.lstat(os.path.join(run, name)).st_ino for name in os.listdir(run)}
        res = subprocess.run([sys.executable, "-c", ATTACK, run, state, own, other], user=g1["uid"], group=g1["uid"],
                             extra_groups=[], capture_output=True, text=True, timeout=60, cwd="/")
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        assert got["uid"] == g1["uid"] != ps["g2"]["uid"]
        worked = sorted(what for what, err in got["attempts"].items() if err == 0)
        assert not worked, (f"guest g1 (uid {g1['uid']}, export {own}) could, in the run directory {run}: "
                            f"{', '.join(worked)}")
        other_errors = {what: os.strerror(err) for what, err in got["attempts"].items() if err not in (13, 1)}
        assert not other_errors, other_errors
        # The host is intact and serving: the same files, the broker answers, g2's disk is served.
        after = {name: os.lstat(os.path.join(run, name)).st_ino for name in os.listdir(run)}
        assert after == before
        with ManagementClient(h.layout.mgmt_endpoint) as mgmt:
            assert {d["name"] for d in mgmt.request("list")["domains"]} >= {"xs", "blk0", "g1", "g2"}
        assert all(r["state"] == "running" for r in h.ps().values())
        assert os.stat(other).st_uid == ps["g2"]["uid"]
        assert _export_size(other) == IMAGE
        assert _export_size(own) == IMAGE
