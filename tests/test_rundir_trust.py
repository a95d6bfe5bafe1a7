"""No domain uid can write what the toolstack or the broker trusts (security issue 11).

A guest given write access to the run directory (its export socket's
directory, by default) could replace ``hypercall.sock``, plant
``supervisor.pid`` for root's ``xdom down`` to signal, or sit in the middle
of ``xenstored.sock`` or another guest's export.  Here, on a live host whose
domains run under their own uids:

* the run and state directories, the sockets and pid file in them and the
  directories above them are root's, with no group/other write and no ACL
  entry giving anyone write (read from the filesystem: modes, owners and the
  ``system.posix_acl_access`` xattr, parsed here);
* processes running as the guest's, blkback's and xenstored's uids try to
  create, rename and bind in those directories and get EACCES; the guest can
  create entries in its own export directory only, and nbdinfo and qemu-img
  use the export it made there;
* a pid file written by another uid, in a directory others can write, or
  naming a process of another uid is refused by ``xdom down`` and ``xdom ps``
  (the process it names is not signalled);
* the broker and the supervisor refuse to start in a run directory others
  can write; the supervisor and ``xdom xenstore`` refuse a xenstored socket
  served by anyone but the xenstore domain.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from test_supervisor import Host

from xdom.broker.pathtrust import UntrustedPath
from xdom.deploy.control import ControlError
from xdom.deploy.isolation import UID_BASE, UID_COUNT, probe_uid
from xdom.deploy.launcher import start_broker
from xdom.deploy.rundir import Layout, LayoutError, find_supervisors, running_pid
from xdom.deploy.supervisor import StartupError, Supervisor
from xdom.deploy.topology_parse import load_topology

XDOM = [sys.executable, "-m", "xdom.deploy.cli"]
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="uids and ownership need root")
STRANGER = UID_BASE + UID_COUNT - 2        # a uid no host of this test holds

ACL_XATTR = "system.posix_acl_access"
ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x02, 0x04, 0x08, 0x10, 0x20


def xdom(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*XDOM, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def separable() -> bool:
    return os.geteuid() == 0 and probe_uid(UID_BASE + UID_COUNT - 1) is None


def acl(path: str) -> list[tuple[int, int, int]]:
    """The access ACL's entries (tag, perms, id), read from the xattr; [] when there is none."""
    try:
        raw = os.getxattr(path, ACL_XATTR, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return []
        raise
    return [struct.unpack_from("<HHI", raw, 4 + 8 * i) for i in range((len(raw) - 4) // 8)]


def set_acl_user(path: str, uid: int, perms: int) -> None:
    """Add user:uid:perms to path's ACL the way setfacl -m would, written here (not with the code under test)."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    entries = [(0x01, (mode >> 6) & 7, 0xFFFFFFFF), (ACL_USER, perms, uid), (ACL_GROUP_OBJ, (mode >> 3) & 7, 0xFFFFFFFF),
               (ACL_MASK, 7, 0xFFFFFFFF), (ACL_OTHER, mode & 7, 0xFFFFFFFF)]
    os.setxattr(path, ACL_XATTR, struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries))


def writers_besides_owner(path: str) -> list[str]:
    """Who but the owner may write ``path`` by its mode and ACL (a symlink: nobody; its directory decides)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return []
    entries = acl(path)
    if not entries:
        return [w for bit, w in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "other")) if st.st_mode & bit]
    mask = next((p for t, p, _ in entries if t == ACL_MASK), 7)
    out = [f"user:{i}" for t, p, i in entries if t == ACL_USER and p & mask & 2]
    out += [f"group:{i}" for t, p, i in entries if t == ACL_GROUP and p & mask & 2]
    out += ["group" for t, p, _ in entries if t == ACL_GROUP_OBJ and p & mask & 2]
    out += ["other" for t, p, _ in entries if t == ACL_OTHER and p & 2]
    return out


# Run as a domain's uid: each operation's outcome, "ok" or the errno's name.
PROBE = textwrap.dedent(r'''
    import errno, json, os, socket, sys
    out = []
    for op, a, b in json.loads(sys.argv[1]):
        try:
            if op == "create":
                os.close(os.open(a, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                os.unlink(a)
            elif op == "rename":
                os.rename(a, b)
                os.rename(b, a)
            elif op == "unlink":
                os.unlink(a)
            elif op == "symlink":
                os.symlink(b, a)
                os.unlink(a)
            elif op == "mkdir":
                os.mkdir(a)
                os.rmdir(a)
            elif op == "bind":
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(a)
                s.close()
                os.unlink(a)
            elif op == "chmod":
                os.chmod(a, 0o777)
            out.append("ok")
        except OSError as e:
            out.append(errno.errorcode.get(e.errno, str(e.errno)))
    print(json.dumps(out))
''')


def as_uid(uid: int, ops: list[tuple[str, str, str]]) -> list[str]:
    res = subprocess.run([sys.executable, "-I", "-c", PROBE, json.dumps(ops)], user=uid, group=uid, extra_groups=[],
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def topology_text(*disks: str, g2: bool = True) -> str:
    listed = ", ".join(f'"{d}"' for d in disks)
    return ('[[domain]]\nname = "xs"\nkind = "xenstored"\n'
            '[[domain]]\nname = "blk0"\nkind = "blkback"\n'
            f'[[domain]]\nname = "g1"\nkind = "guest"\nmemory = "16M"\ndisk = [{listed}]\n'
            + ('[[domain]]\nname = "g2"\nkind = "guest"\nmemory = "4M"\n' if g2 else ''))


def trusted_files(lay: Layout) -> list[str]:
    return [os.path.join(lay.run_dir, n) for n in ("hypercall.sock", "mgmt.sock", "events.sock", "supervisor.sock",
                                                   "supervisor.pid", "xenstored.sock")]


# ---- a live host ----------------------------------------------------------------------------

@ROOT_ONLY
@pytest.mark.timeout(240)
@pytest.mark.skipif(not all(shutil.which(t) for t in ("nbdinfo", "qemu-img")), reason="needs nbdinfo and qemu-img")
def test_no_domain_uid_can_write_what_the_toolstack_trusts(run_dir: str) -> None:
    if not separable():
        pytest.skip(f"uid {UID_BASE + UID_COUNT - 1} cannot run {sys.executable} with xdom")
    image, spare = os.path.join(run_dir, "g1.img"), os.path.join(run_dir, "spare.img")
    for path in (image, spare):
        with open(path, "wb") as f:
            f.truncate(8 << 20)
    made = os.path.join(run_dir, "made-for-g1")                 # an absolute export= in a directory not there yet
    text = topology_text(f"format=raw, vdev=xvda, access=rw, backend=blk0, target={image}",
                         f"format=raw, vdev=xvdb, access=ro, backend=blk0, export=nbd:{made}/b.sock, target={spare}")
    with Host(run_dir, text, uids="separate") as h:
        lay = h.layout
        ps = h.ps()
        uids = {name: r["uid"] for name, r in ps.items()}
        assert len(set(uids.values())) == 4 and all(u >= UID_BASE for u in uids.values()), uids
        export = next(d["export"] for d in ps["g1"]["devices"] if d["vdev"] == "xvda")
        own = lay.export_dir("g1")
        assert export == os.path.join(own, "xvda.sock")

        # -- owners, modes and ACLs, read from the filesystem
        d = lay.run_dir
        while True:                                              # the run and state directories and everything above
            st = os.stat(d)
            assert st.st_uid == 0, d
            assert writers_besides_owner(d) == [] or st.st_mode & stat.S_ISVTX, (d, writers_besides_owner(d))
            if d == "/":
                break
            d = os.path.dirname(d)
        for d in (lay.run_dir, lay.state_dir, lay.logs_dir, lay.exports_dir):
            st = os.lstat(d)
            assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and writers_besides_owner(d) == [], d
        for path in trusted_files(lay) + [os.path.join(lay.logs_dir, f) for f in os.listdir(lay.logs_dir)]:
            st = os.lstat(path)
            assert st.st_uid == 0, path
            # a socket's write bit is who may connect (hypercall.sock is 0666: the token authenticates); who may
            # replace it is its directory's business, checked above
            assert stat.S_ISSOCK(st.st_mode) or writers_besides_owner(path) == [], (path, oct(st.st_mode), acl(path))
        assert os.readlink(lay.xenstored_link) == "xenstored/socket"
        pid_st = os.lstat(lay.pid_file)
        assert stat.S_ISREG(pid_st.st_mode) and stat.S_IMODE(pid_st.st_mode) == 0o644 and acl(lay.pid_file) == []
        # g1's export directory: root's, mode 0700, and an ACL giving g1's uid (and no one else) rwx
        st = os.lstat(own)
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) & 0o007 == 0
        assert writers_besides_owner(own) == [f"user:{uids['g1']}"]
        assert [(t, p, i) for t, p, i in acl(own) if t == ACL_USER] == [(ACL_USER, 7, uids["g1"])]
        # the guest made its socket there, and real programs use it
        sock_st = os.lstat(export)
        assert stat.S_ISSOCK(sock_st.st_mode) and sock_st.st_uid == uids["g1"]
        info = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={export}"], capture_output=True, text=True,
                              timeout=30)
        assert info.returncode == 0 and info.stdout.strip() == str(8 << 20), info.stderr
        qi = subprocess.run(["qemu-img", "info", "--output=json", f"nbd+unix:///?socket={export}"],
                            capture_output=True, text=True, timeout=30)
        assert qi.returncode == 0 and json.loads(qi.stdout)["virtual-size"] == 8 << 20, qi.stderr

        # -- what each domain's uid may do, tried as that uid
        run, state = lay.run_dir, lay.state_dir
        forbidden = [("create", os.path.join(run, "x"), ""), ("mkdir", os.path.join(run, "x"), ""),
                     ("rename", lay.hypercall_socket, os.path.join(run, "x")),
                     ("unlink", lay.pid_file, ""), ("rename", lay.pid_file, os.path.join(run, "x")),
                     ("rename", lay.xenstored_link, os.path.join(run, "x")),
                     ("rename", lay.control_socket, os.path.join(run, "x")),
                     ("symlink", os.path.join(run, "supervisor.pid.new"), "/proc/1"),
                     ("bind", os.path.join(run, "y.sock"), ""),
                     ("create", os.path.join(lay.exports_dir, "x"), ""),
                     ("rename", own, os.path.join(lay.exports_dir, "x")),
                     ("create", os.path.join(state, "x"), ""), ("create", os.path.join(lay.logs_dir, "x"), ""),
                     ("chmod", run, "")]
        for name in ("g1", "g2", "blk0", "xs"):
            got = as_uid(uids[name], forbidden)
            assert all(r in ("EACCES", "EPERM") for r in got), (name, list(zip(forbidden, got)))
        # nobody but g1 reaches into g1's export directory; xenstored's is its own
        others = [("create", os.path.join(own, "x"), ""), ("bind", os.path.join(own, "x.sock"), ""),
                  ("rename", export, os.path.join(own, "x"))]
        for name in ("g2", "blk0", "xs"):
            assert all(r == "EACCES" for r in as_uid(uids[name], others)), name
        for name in ("g1", "g2", "blk0"):
            assert as_uid(uids[name], [("create", os.path.join(lay.xenstored_run, "x"), "")]) == ["EACCES"], name
        # g1 may make entries in its own directory, and nowhere else
        assert as_uid(uids["g1"], [("create", os.path.join(own, "x"), ""), ("bind", os.path.join(own, "y.sock"), ""),
                                   ("chmod", own, "")]) == ["ok", "ok", "EPERM"]

        # -- an export named elsewhere: the directory, not there before, was made g1's alone
        st = os.lstat(made)
        assert st.st_uid == 0 and writers_besides_owner(made) == [f"user:{uids['g1']}"]
        assert stat.S_ISSOCK(os.lstat(os.path.join(made, "b.sock")).st_mode)
        # exports a guest may not have, hot-attached: refused, saying why
        for bad, why in ((f"{run}/c.sock", "is in the run directory"), (f"{state}/c.sock", "is in the state directory"),
                         (f"{lay.export_dir('g1')}/c.sock", "is in the run directory"),     # g1's, not g2's
                         (f"{made}/c.sock", "is shared with g1's export"),
                         (f"{run_dir}/c.sock", f"its directory {run_dir} holds the run directory"),
                         ("sub/c.sock", "a relative export is a socket name in g2's own directory")):
            with pytest.raises(ControlError, match=why):
                h.control.request("block-attach", name="g2", disk=f"format=raw, vdev=xvdc, access=ro, "
                                                                     f"backend=blk0, export=nbd:{bad}, target={spare}")

        # -- the xenstored socket is believed only when xenstored serves it
        out = xdom("xenstore", "read", "/local/domain/0/name", "--run-dir", run)
        assert out.returncode == 0 and out.stdout.strip() == "Domain-0", out.stderr
        real = lay.xenstored_socket
        os.rename(real, real + ".real")
        impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            impostor.bind(real)
            impostor.listen(1)
            out = xdom("xenstore", "read", "/local/domain/0/name", "--run-dir", run)
            assert out.returncode == 1 and f"refusing {lay.xenstored_link}: it is served by uid 0, not by the " \
                                           f"xenstore domain's uid {uids['xs']}" in out.stderr, out.stderr
            with pytest.raises(OSError, match="not by xenstore domain xs"), h.sup._xs():
                pass
        finally:
            impostor.close()
            os.unlink(real)
            os.rename(real + ".real", real)
    assert not os.path.exists(lay.run_dir) and not os.path.exists(made)       # what we made went with the host


@ROOT_ONLY
@pytest.mark.timeout(120)
def test_an_export_directory_that_is_not_the_guests_is_refused(run_dir: str) -> None:
    if not separable():
        pytest.skip(f"uid {UID_BASE + UID_COUNT - 1} cannot run {sys.executable} with xdom")
    image = os.path.join(run_dir, "g1.img")
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    existing = os.path.join(run_dir, "existing")            # say, a directory of some other service's sockets
    os.mkdir(existing, 0o755)
    with open(os.path.join(existing, "theirs.conf"), "w") as f:
        f.write("trusted\n")
    text = topology_text(f"format=raw, vdev=xvda, access=rw, backend=blk0, export=nbd:{existing}/x.sock, "
                         f"target={image}", g2=False)
    with pytest.raises(StartupError, match=rf"cannot prepare its disk exports: the export directory {existing} already "
                                           rf"exists and is not g1's own"), Host(run_dir, text, uids="separate"):
        pass
    assert acl(existing) == [] and stat.S_IMODE(os.stat(existing).st_mode) == 0o755     # nothing was given away
    assert os.listdir(existing) == ["theirs.conf"]


# ---- pid files ----------------------------------------------------------------------------

@pytest.fixture
def victim() -> Any:
    """A process a planted pid file names: it must survive `xdom down`."""
    p = subprocess.Popen(["sleep", "120"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def plant(run: str, pid: int, owner: int = 0, mode: int = 0o644) -> int:
    """supervisor.pid naming ``pid``, owned by ``owner``, locked (as a live supervisor's is): returns the lock's fd."""
    os.makedirs(run, mode=0o755, exist_ok=True)
    path = os.path.join(run, "supervisor.pid")
    with open(path, "w") as f:
        f.write(f"{pid}\n")
    os.chown(path, owner, owner)
    os.chmod(path, mode)
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def refused(run: str, victim: subprocess.Popen[bytes], why: str) -> None:
    with pytest.raises(UntrustedPath, match=why):
        running_pid(run)
    for cmd in (["down", "--run-dir", run, "--timeout", "3"], ["ps", "--run-dir", run]):
        out = xdom(*cmd)
        assert out.returncode == 1 and why in out.stderr, (cmd, out.returncode, out.stderr)
    assert victim.poll() is None, "a planted pid file got a process signalled"


@ROOT_ONLY
def test_a_pid_file_a_domain_could_have_written_is_not_believed(run_dir: str,
                                                                 victim: subprocess.Popen[bytes]) -> None:
    run = os.path.join(run_dir, "run")
    # written by another uid
    fd = plant(run, victim.pid, owner=STRANGER)
    try:
        refused(run, victim, f"refusing the pid file {run}/supervisor.pid: it is owned by uid {STRANGER}")
    finally:
        os.close(fd)
    # root's, but others may write it
    fd = plant(run, victim.pid, mode=0o666)
    try:
        refused(run, victim, "it can be written by")
    finally:
        os.close(fd)
    # root's, in a run directory a domain uid may write (the old export directory: an ACL entry)
    fd = plant(run, victim.pid)
    set_acl_user(run, STRANGER, 7)
    try:
        refused(run, victim, f"refusing the run directory {run}: it can be written by uid {STRANGER}")
        # scanning for hosts leaves it out (a warning says why)
        assert find_supervisors(run_dir) == []
        os.removexattr(run, ACL_XATTR)
        os.chmod(run, 0o777)
        refused(run, victim, f"refusing the run directory {run}: it can be written by")
        os.chmod(run, 0o755)
        os.chmod(run_dir, 0o777)                # the directory above it: whoever writes it can swap run
        refused(run, victim, f"the directory {run_dir} above it can be written by")
        with pytest.raises(UntrustedPath, match="refusing the directory of hosts"):
            find_supervisors(run_dir)
    finally:
        os.chmod(run_dir, 0o755)
        os.close(fd)
    # root's, in a trusted directory, but naming a process of another uid
    stranger = subprocess.Popen(["sleep", "120"], user=STRANGER, group=STRANGER, extra_groups=[])
    fd = plant(run, stranger.pid)
    try:
        refused(run, victim, f"it names pid {stranger.pid}, which runs as uid {STRANGER}")
        assert stranger.poll() is None
    finally:
        os.close(fd)
        stranger.kill()
        stranger.wait()
    # the same file, root's, naming a root process, is believed (a live supervisor's)
    fd = plant(run, victim.pid)
    try:
        assert running_pid(run) == victim.pid
    finally:
        os.close(fd)
    # a symlink is never a pid file
    os.unlink(os.path.join(run, "supervisor.pid"))
    other = os.path.join(run_dir, "elsewhere.pid")
    with open(other, "w") as f:
        f.write(f"{victim.pid}\n")
    os.symlink(other, os.path.join(run, "supervisor.pid"))
    with pytest.raises(UntrustedPath, match="it is not a file"):
        running_pid(run)


# ---- run directories others can write --------------------------------------------------------

@ROOT_ONLY
def test_the_broker_refuses_a_run_directory_others_can_write(run_dir: str) -> None:
    log = os.path.join(run_dir, "broker.log")
    for how in ("mode", "acl"):
        run = os.path.join(run_dir, f"open-{how}")
        os.mkdir(run)
        if how == "mode":
            os.chmod(run, 0o777)
        else:
            os.chmod(run, 0o755)
            set_acl_user(run, STRANGER, 7)
        with pytest.raises(RuntimeError, match="exited before it was ready"):
            start_broker(run, log_path=log)
        with open(log) as f:
            text = f.read()
        assert f"xdom: refusing the run directory {run}: it can be written by" in text, text
        assert not os.path.exists(os.path.join(run, "hypercall.sock"))
    # one it makes itself is fine, and so is one under a sticky /tmp-like directory
    sticky = os.path.join(run_dir, "sticky")
    os.mkdir(sticky)
    os.chmod(sticky, 0o1777)
    b = start_broker(os.path.join(sticky, "made"), log_path=log)
    try:
        assert stat.S_IMODE(os.stat(os.path.join(sticky, "made")).st_mode) & 0o022 == 0
    finally:
        b.stop()


@ROOT_ONLY
def test_the_supervisor_refuses_directories_others_can_write(run_dir: str) -> None:
    path = os.path.join(run_dir, "t.toml")
    with open(path, "w") as f:
        f.write('[[domain]]\nname = "xs"\nkind = "xenstored"\n')
    state, run = os.path.join(run_dir, "state"), os.path.join(run_dir, "run")
    topo = load_topology(path)
    os.mkdir(run)
    set_acl_user(run, STRANGER, 7)
    with pytest.raises(LayoutError, match=f"refusing the run directory {run}: it can be written by uid {STRANGER}"):
        Supervisor(topo, state, run)
    out = xdom("up", path, "--state-dir", state, "--run-dir", run)
    assert out.returncode == 2 and f"refusing the run directory {run}" in out.stderr, out.stderr
    assert os.listdir(run) == [] and not os.path.exists(state)       # nothing started, nothing made
    shutil.rmtree(run)
    # a state directory not made yet is judged by the directory it would be made in
    os.chmod(run_dir, 0o777)
    try:
        with pytest.raises(LayoutError, match=f"refusing the state directory {state}: .*{run_dir}.*can be written"):
            Supervisor(topo, state, run)
    finally:
        os.chmod(run_dir, 0o755)
    os.mkdir(state)
    os.chmod(state, 0o775)
    with pytest.raises(LayoutError, match=f"refusing the state directory {state}: it can be written by group"):
        Supervisor(topo, state, run)
