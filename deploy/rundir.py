"""Where a supervised host keeps its files, and how the command line finds a running supervisor.

Two directories per host, one pair per topology so that hosts run side by side:

* the **state directory** (``/var/lib/xdom/<topology>`` as root): ``logs/``
  (one ``<domain>.log`` per domain, ``broker.log``, ``supervisor.log`` when
  detached) and ``xenstored/`` (the store, kept across a xenstored restart,
  discarded when the host stops: it names domids of a broker that is gone);
* the **run directory** (``/run/xdom/<topology>`` as root): the broker's
  sockets (``hypercall.sock``, ``mgmt.sock``, ``events.sock``, so ``xdom list
  --run-dir`` works on it) and what it writes down (``broker-state/``),
  ``xenstored.sock`` (a symlink into ``xenstored/``, a directory the
  xenstore domain's uid owns), ``supervisor.sock``, ``supervisor.pid``,
  ``supervisor-state`` (what a new supervisor adopts the host from:
  ``host_state.py``), ``keeper.sock`` (the keeper's: ``keeper.py``),
  ``exports/GUEST/``, each guest's directory for its NBD export sockets, and
  ``vms/GUEST/``.  Empty, and removed, once the host is down.

Both directories, and every directory above them, are writable by root (or
the supervisor's own uid) only: everything the toolstack or the broker reads
back or connects to lives there.  A domain writes only in a directory of its
own: ``xenstored/`` (owned by the xenstore domain's uid), ``exports/GUEST/``
(root's, mode 0700, with an ACL entry giving the guest's uid rwx) and the
xenstore domain's store ``STATE_DIR/xenstored/``.  :meth:`Layout.check_trust`
refuses directories others can write before anything starts, and
:func:`running_pid` believes a pid file only in such a directory, owned by
root or the caller's uid and writable by nobody else
(``xdom.broker.pathtrust``).

Unix socket addresses hold at most 107 bytes; :meth:`Layout.check` refuses a
run directory too long for them before anything starts.

``supervisor.pid`` is held under an exclusive ``flock`` for the supervisor's
life: a pid file nobody holds is stale whatever pid it names, so a crashed
supervisor never makes ``xdom down`` signal a stranger.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import logging
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xdom.broker.mgmt_client import endpoint_for as mgmt_endpoint_for
from xdom.broker.mgmt_client import events_endpoint_for
from xdom.broker.pathtrust import UntrustedPath, check_dir, check_file

from .xlcfg import EXPORTS_DIR, MAX_UNIX_PATH, default_export, export_dir

if TYPE_CHECKING:
    import psutil

log = logging.getLogger("xdom.supervisor")

__all__ = ["PID_FILE", "STATE_FILE", "Layout", "LayoutError", "PidFile", "UntrustedPath", "clear_run_files",
           "default_base", "default_dirs", "find_supervisors", "find_unsupervised", "leftover_processes", "make_dirs",
           "remove_run_dir", "running_pid", "stop_leftovers", "topology_name"]

PID_FILE = "supervisor.pid"
CONTROL_SOCKET = "supervisor.sock"
XENSTORED_LINK = "xenstored.sock"
XENSTORED_DIR = "xenstored"
VMS_DIR = "vms"
BROKER_STATE = "broker-state"    # what a broker writes down for the one that takes over (broker/persist.py)
STATE_FILE = "supervisor-state"  # what a supervisor writes down for the one that adopts its host (host_state.py)
KEEPER_SOCKET = "keeper.sock"    # the host's keeper of descriptors (keeper.py)


class LayoutError(Exception):
    """The directories cannot work (a socket path too long, a file where a directory must be)."""


@dataclass(frozen=True)
class Layout:
    state_dir: str
    run_dir: str

    @property
    def logs_dir(self) -> str:
        return os.path.join(self.state_dir, "logs")

    def log_path(self, name: str) -> str:
        return os.path.join(self.logs_dir, f"{name}.log")

    @property
    def xenstored_state(self) -> str:
        return os.path.join(self.state_dir, XENSTORED_DIR)

    @property
    def xenstored_run(self) -> str:
        return os.path.join(self.run_dir, XENSTORED_DIR)

    @property
    def xenstored_socket(self) -> str:
        """Where xenstored binds: inside a directory its own uid owns."""
        return os.path.join(self.xenstored_run, "socket")

    @property
    def xenstored_link(self) -> str:
        """What users and tools use (XENSTORED_PATH): a symlink to the socket."""
        return os.path.join(self.run_dir, XENSTORED_LINK)

    @property
    def control_socket(self) -> str:
        return os.path.join(self.run_dir, CONTROL_SOCKET)

    @property
    def exports_dir(self) -> str:
        """``RUN_DIR/exports``: root's; one directory per guest in it."""
        return os.path.join(self.run_dir, EXPORTS_DIR)

    @property
    def vms_dir(self) -> str:
        """``RUN_DIR/vms``: root's; one directory per VM guest in it, for its QEMU's console and QMP sockets."""
        return os.path.join(self.run_dir, VMS_DIR)

    def export_dir(self, guest: str) -> str:
        """``RUN_DIR/exports/GUEST``: the only directory of the run directory ``guest``'s uid may write."""
        return export_dir(self.run_dir, guest)

    def default_export(self, guest: str, vdev: str) -> str:
        return default_export(self.run_dir, guest, vdev)

    @property
    def pid_file(self) -> str:
        return os.path.join(self.run_dir, PID_FILE)

    @property
    def hypercall_socket(self) -> str:
        return os.path.join(self.run_dir, "hypercall.sock")

    @property
    def mgmt_endpoint(self) -> str:
        return mgmt_endpoint_for(self.run_dir)

    @property
    def events_endpoint(self) -> str:
        return events_endpoint_for(self.run_dir)

    @property
    def state_file(self) -> str:
        return os.path.join(self.run_dir, STATE_FILE)

    @property
    def keeper_socket(self) -> str:
        return os.path.join(self.run_dir, KEEPER_SOCKET)

    def socket_paths(self) -> list[str]:
        return [self.hypercall_socket, os.path.join(self.run_dir, "mgmt.sock"),
                os.path.join(self.run_dir, "events.sock"), self.control_socket, self.xenstored_socket,
                self.xenstored_link, self.keeper_socket]

    def check(self) -> None:
        """Raise LayoutError unless both directories are absolute and every socket path fits."""
        for what, d in (("state", self.state_dir), ("run", self.run_dir)):
            if not os.path.isabs(d):
                raise LayoutError(f"the {what} directory {d!r} must be an absolute path")
        too_long = [p for p in self.socket_paths() if len(os.fsencode(p)) > MAX_UNIX_PATH]
        if too_long:
            longest = max(too_long, key=len)
            raise LayoutError(f"the run directory {self.run_dir!r} is too long: {longest!r} is "
                              f"{len(os.fsencode(longest))} bytes, more than the {MAX_UNIX_PATH} a unix socket "
                              f"address holds; choose a shorter --run-dir")
        self.check_trust()

    def check_trust(self) -> None:
        """Raise LayoutError unless only root (or this uid) can write the two directories and those above them.

        A directory not made yet is judged by the nearest existing one above
        it, which must be such a directory too, or sticky (``/tmp``).
        """
        for what, d in (("state directory", self.state_dir), ("run directory", self.run_dir)):
            try:
                _check_dir_or_above(d, what)
            except UntrustedPath as e:
                raise LayoutError(str(e)) from None


def topology_name(path: str) -> str:
    """A host's name: the topology file's stem, reduced to characters safe in a path."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip(".")
    return name or "default"


def default_base() -> str:
    """Where hosts of this user live when no directory is given (not as root: no /run/xdom)."""
    if os.geteuid() == 0:
        return "/run/xdom"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "xdom") if runtime else f"/tmp/xdom-{os.getuid()}"


def default_dirs(name: str) -> tuple[str, str]:
    """(state_dir, run_dir) for topology ``name``."""
    if os.geteuid() == 0:
        return f"/var/lib/xdom/{name}", f"/run/xdom/{name}"
    base = default_base()
    return os.path.join(base, "state", name), os.path.join(base, "run", name)


def run_dirs_under(base: str, name: str = PID_FILE) -> list[str]:
    """Run directories that could hold a supervisor (or, with ``name=STATE_FILE``, a host whose supervisor
    died), for both layouts of :func:`default_dirs`."""
    found = glob.glob(os.path.join(glob.escape(base), "*", name))
    found += glob.glob(os.path.join(glob.escape(base), "run", "*", name))
    return sorted({os.path.dirname(p) for p in found})


def _check_dir_or_above(path: str, what: str) -> None:
    """:func:`check_dir` on ``path``, or, while it does not exist, on the nearest directory above it."""
    path = os.path.abspath(path)
    probe, sticky_ok = path, False
    while not os.path.lexists(probe):
        probe, sticky_ok = os.path.dirname(probe), True
    if probe == path:
        check_dir(path, what)
    else:
        try:
            check_dir(probe, "directory", sticky_ok=sticky_ok)
        except UntrustedPath as e:
            raise UntrustedPath(f"refusing the {what} {path}: {e}") from None


def make_dirs(path: str, mode: int = 0o755) -> None:
    """``os.makedirs``, each directory made with exactly ``mode`` (whatever the umask): made by us, ours."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    make_dirs(os.path.dirname(path), 0o755)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    os.chmod(path, mode)


def running_pid(run_dir: str) -> int | None:
    """The pid of the supervisor holding ``run_dir``'s pid file, or None if none does.

    Raises UntrustedPath (never a pid) when someone other than root or this
    uid could have written the run directory, or the pid file, or when the
    pid it names runs under another uid than the file's owner: ``xdom down``
    must never signal a pid a domain chose.
    """
    path = os.path.join(run_dir, PID_FILE)
    if not os.path.isdir(run_dir):
        return None
    check_dir(run_dir, "run directory")
    try:
        st = check_file(path, "file", f"the pid file {path}")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        if (os.fstat(fd).st_ino, os.fstat(fd).st_dev) != (st.st_ino, st.st_dev):
            raise UntrustedPath(f"refusing the pid file {path}: it was replaced while it was read")
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            pid = int(text) if text.isdigit() else None
        else:
            return None     # nobody holds it: stale
    finally:
        os.close(fd)
    if pid is not None:
        import psutil
        try:
            uid = psutil.Process(pid).uids().real
        except psutil.NoSuchProcess:
            return None
        if uid != st.st_uid:
            raise UntrustedPath(f"refusing the pid file {path}: it names pid {pid}, which runs as uid {uid}, not "
                                f"as the file's owner (uid {st.st_uid})")
    return pid


def find_supervisors(base: str | None = None) -> list[str]:
    """Run directories under ``base`` (default: :func:`default_base`) with a live supervisor.

    Raises UntrustedPath when others can write ``base``; a run directory
    under it that is not to be believed is left out, with a warning.
    """
    base = base or default_base()
    if os.path.isdir(base):
        check_dir(base, "directory of hosts")
    found = []
    for d in run_dirs_under(base):
        try:
            if running_pid(d) is not None:
                found.append(d)
        except UntrustedPath as e:
            log.warning("%s", e)
    return found


def find_unsupervised(base: str | None = None) -> list[str]:
    """Run directories under ``base`` holding a host whose supervisor is gone (a state file, no live supervisor).

    Whether anything of such a host still runs is for ``adopt.report`` to
    say; a directory others could write is left out, with a warning.
    """
    base = base or default_base()
    found = []
    for d in run_dirs_under(base, STATE_FILE):
        try:
            if running_pid(d) is None:
                found.append(d)
        except UntrustedPath as e:
            log.warning("%s", e)
    return found


class PidFile:
    """``run_dir/supervisor.pid``, locked for as long as this supervisor lives."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1

    def acquire(self) -> None:
        """Raise LayoutError naming the other supervisor if one holds the file."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            os.close(fd)
            raise LayoutError(f"refusing the pid file {self.path}: not a regular file of uid {os.geteuid()}'s own "
                              f"(owner uid {st.st_uid}); remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LayoutError(f"a supervisor (pid {other or '?'}) already runs in "
                                  f"{os.path.dirname(self.path)}; stop it with xdom down") from None
            raise
        os.fchmod(fd, 0o644)
        try:
            os.removexattr(fd, "system.posix_acl_access")
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        if self._fd < 0:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = -1


def clear_run_files(layout: Layout) -> None:
    """Remove the run directory's sockets, xenstored's socket directory, the guests' export directories, the
    VMs' socket directories and what a broker wrote down for a successor (not the state directory).  Only call this on a run directory :func:`check_dir` accepts: what domains
    left in their own directories goes too (``shutil.rmtree`` follows no symlink)."""
    for path in layout.socket_paths():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove %s: %s", path, e)
    for path in (layout.state_file, layout.state_file + ".tmp"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    # A broker's state only means something to a broker taking over in a live host: gone with it.
    for path in (layout.xenstored_run, layout.exports_dir, layout.vms_dir, os.path.join(layout.run_dir, BROKER_STATE)):
        if not os.path.lexists(path):
            continue
        try:
            shutil.rmtree(path)
        except OSError as e:
            log.warning("cannot remove %s: %s", path, e)


def remove_run_dir(layout: Layout) -> None:
    """The run directory goes once it is empty; anything else in it is not xdom's to delete."""
    try:
        os.rmdir(layout.run_dir)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno.ENOTEMPTY:
            log.warning("cannot remove %s: %s", layout.run_dir, e)
        else:
            log.info("leaving %s: it holds files that are not xdom's: %s", layout.run_dir,
                     ", ".join(sorted(os.listdir(layout.run_dir))))


def leftover_processes(run_dir: str, spared: set[int] | None = None) -> list[psutil.Process]:
    """Every process of the host at ``run_dir`` but ``spared`` (default: this process and its ancestors):
    xdom's broker, xenstored and keeper with the run directory on their command line, VMs' QEMUs with
    sockets in it, and domain processes, whose environment names its hypercall socket.

    A host outlives its supervisor; a new supervisor adopts what its state
    file names and stops the rest with this, and ``xdom down`` without a
    supervisor stops it all.
    """
    import psutil
    run, prefix = run_dir, run_dir.rstrip(os.sep) + os.sep
    hypercall = os.path.join(run_dir, "hypercall.sock")
    if spared is None:
        me = psutil.Process()
        spared = {me.pid, *(p.pid for p in me.parents())}
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if p.info["pid"] in spared:
            continue
        qemu = bool(cmd) and os.path.basename(cmd[0]).startswith("qemu-system")
        keeper = any(a.endswith(os.path.join("deploy", "keeper.py")) for a in cmd[:4])
        if qemu or keeper or ("xdom.deploy.cli" in cmd and {"broker", "xenstored"} & set(cmd)):
            if any(a == run or a.startswith(prefix) or (qemu and f"path={prefix}" in a) for a in cmd):
                found.append(p)
            continue
        try:
            env = p.environ()
        except psutil.Error:
            continue
        if env.get("XDOM_HYPERCALL") == hypercall and "XDOM_TOKEN" in env and "XDOM_DOMID" in env:
            found.append(p)
    return found


def stop_leftovers(run_dir: str, spared: set[int] | None = None, width: int | None = None) -> list[str]:
    """Kill :func:`leftover_processes` (but ``spared``) and wait for them; returns what they were, for a
    message (each command line cut to ``width`` characters)."""
    import psutil
    done = []
    for p in leftover_processes(run_dir, spared):
        try:
            what = f"pid {p.pid}: {' '.join(p.cmdline())[:width]}"
            p.kill()
            p.wait(10)
        except (psutil.Error, psutil.TimeoutExpired):
            continue
        done.append(what)
    return done


def unlink_socket(path: str) -> None:
    """Remove a unix socket left at ``path`` (never a file of another kind)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def log_marker(fd: int, text: str) -> None:
    """A line of xdom's own in a log a process writes (a domain's, a VM's): when, and what xdom did."""
    os.write(fd, f"--- xdom {time.strftime('%Y-%m-%d %H:%M:%S')}: {text}\n".encode())


def append_marker(path: str, text: str) -> None:
    """:func:`log_marker` in the log file at ``path``, which the supervisor does not hold open (nothing
    when it cannot be opened)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    except OSError:
        return
    try:
        log_marker(fd, text)
    finally:
        os.close(fd)
