"""What a supervisor writes down so that another can adopt its host: ``RUN_DIR/supervisor-state``.

A host outlives its supervisor (README, "The supervisor"): when the
supervisor dies outright (SIGKILL, the OOM killer, a crash), the broker, the
domains and the VMs run on, and a new ``xdom up`` of the same topology
adopts them (``deploy/adopt.py``).  What it needs that neither the broker
nor xenstored can tell it is here, as a **model**: plain dicts and lists
(msgpack), nothing live, in the style of ``broker/persist.py``:

* each process of the host by **pid and start time** (field 22 of
  ``/proc/PID/stat``), never a pid alone: the broker, the keeper
  (``deploy/keeper.py``), every domain process and every VM's QEMU;
* each domain's table row: state, domid, credentials, store ring and port,
  generation, restart history (monotonic times: ``CLOCK_MONOTONIC`` is the
  same clock in every process until the next boot), uid, network namespace,
  its devices *as they are now* (hot-attached disks and vifs included, as xl
  strings), which TAPs its netback process was given, its last exit;
* each VM's row; the host's uids, the serial of the last disk handed to a
  blkback, the export directories made outside the run directory, the
  attaches to undo, the phase (starting, running, stopping).

The file is rewritten whole (about a kilobyte per domain) whenever it
changed, at the end of each turn of the supervisor's loop and at once after
every process it starts: write a temporary file, then ``rename`` it over
the old one, so a reader sees one or the other, never half.  It is root's
(the supervisor's uid), mode 0600, in the run directory, which only root
can write (``rundir.Layout.check_trust``); :func:`load` believes it only
there, and only from this boot (``/proc/sys/kernel/random/boot_id``).

Also here: :class:`AdoptedProcess`, what stands in for a ``Popen`` of a
process another supervisor started.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import select
import signal
import subprocess
from typing import Any

import msgpack

from xdom.broker.pathtrust import UntrustedPath, check_dir, check_file

from .policy import UNKNOWN_RETURNCODE
from .xl_disk import DiskSpec, parse_disk
from .xl_vif import VifSpec, parse_vif
from .xlcfg import XlCfgError

__all__ = ["STATE_FILE", "VERSION", "AdoptedProcess", "StateError", "alive", "boot_id", "decode_disks",
           "decode_vifs", "encode_disks", "encode_vifs", "identity", "load", "open_pidfd", "remove", "save",
           "starttime", "topology_digest"]

log = logging.getLogger("xdom.supervisor")

STATE_FILE = "supervisor-state"
VERSION = 1


class StateError(Exception):
    """The state file cannot be believed or read."""


# ---- processes by identity ----------------------------------------------------------------------

def starttime(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        rest = data[data.rindex(b")") + 2:].split()
        if rest[0] == b"Z" or rest[0] == b"X":
            return None         # a zombie has ended: its status is its parent's to read
        return int(rest[19])
    except (ValueError, IndexError):
        return None


def identity(pid: int | None) -> dict[str, int] | None:
    """``{"pid", "starttime"}`` of a live process, as the state file names it."""
    if pid is None:
        return None
    st = starttime(pid)
    return None if st is None else {"pid": pid, "starttime": st}


def open_pidfd(ident: dict[str, Any] | None) -> int | None:
    """A pidfd of the process the state file names, or None when it is gone (or its pid is someone else's).

    The pidfd is opened first and the start time checked after: if the pid
    had been reused before ``pidfd_open``, the start time differs; if the
    process ends after it, the pidfd says so.
    """
    if not ident:
        return None
    try:
        pid, want = int(ident["pid"]), int(ident["starttime"])
    except (KeyError, TypeError, ValueError):
        return None
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None
    if starttime(pid) != want:
        os.close(fd)
        return None
    return fd


def alive(ident: dict[str, Any] | None) -> bool:
    fd = open_pidfd(ident)
    if fd is None:
        return False
    try:
        return not select.select([fd], [], [], 0)[0]
    finally:
        os.close(fd)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


class AdoptedProcess:
    """A process of this host that another supervisor started, in place of its ``Popen``.

    It is not our child, so no ``waitpid``: it is watched through a pidfd,
    signalled through it (never by a pid that may have been reused), and its
    ``wait()`` gives :data:`~xdom.deploy.policy.UNKNOWN_RETURNCODE`: whoever
    reaped it (init, or a subreaper) got its status, not us.
    """

    adopted = True

    def __init__(self, pidfd: int, pid: int) -> None:
        self.pid = pid
        self.args = _cmdline(pid)
        self.returncode: int | None = None
        self._pidfd = pidfd

    @classmethod
    def of(cls, ident: dict[str, Any] | None) -> AdoptedProcess | None:
        """The process the state file names, if it still runs."""
        fd = open_pidfd(ident)
        if fd is None:
            return None
        assert ident is not None
        return cls(fd, int(ident["pid"]))

    def pidfd(self) -> int:
        """A new pidfd of this process (the caller closes it)."""
        if self._pidfd < 0:
            raise ProcessLookupError(f"pid {self.pid} has ended")
        return os.dup(self._pidfd)

    def _ended(self) -> None:
        self.returncode = UNKNOWN_RETURNCODE
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._pidfd], [], [], 0)[0]:
            self._ended()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._pidfd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            self._ended()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


# ---- the file -----------------------------------------------------------------------------------

def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def topology_digest(topology: Any) -> str:
    """What the host was started from, for "is this the same topology?" (its domains, as resolved)."""
    return hashlib.sha256(repr([d for d in topology.domains]).encode()).hexdigest()


def _path(run_dir: str) -> str:
    return os.path.join(run_dir, STATE_FILE)


def save(run_dir: str, model: dict[str, Any]) -> bytes:
    """Write the model (atomically: a temporary file renamed over the old one); returns what was written."""
    data = msgpack.packb(model, use_bin_type=True)
    write_bytes(run_dir, data)
    return data


def write_bytes(run_dir: str, data: bytes) -> None:
    path = _path(run_dir)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load(run_dir: str) -> dict[str, Any] | None:
    """The model a supervisor of ``run_dir`` left, or None when there is none (or it is of another boot).

    Raises StateError when the file is there but cannot be believed (others
    could have written it) or read.
    """
    path = _path(run_dir)
    if not os.path.lexists(path):
        return None
    try:
        check_dir(run_dir, "run directory")
        st = check_file(path, "file", f"the state file {path}")
        if st.st_uid != os.geteuid():
            raise UntrustedPath(f"refusing the state file {path}: owned by uid {st.st_uid}, not {os.geteuid()}")
        with open(path, "rb") as f:
            model = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
    except FileNotFoundError:
        return None
    except (UntrustedPath, OSError, ValueError, msgpack.UnpackException) as e:
        raise StateError(f"{path}: {e}") from None
    if not isinstance(model, dict) or model.get("version") != VERSION:
        raise StateError(f"{path}: not a version {VERSION} supervisor state")
    if model.get("boot_id") != boot_id():
        log.info("%s is from an earlier boot: ignored", path)
        return None
    return model


def remove(run_dir: str) -> None:
    for path in (_path(run_dir), _path(run_dir) + ".tmp"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("cannot remove %s: %s", path, e)


# ---- devices as xl strings ------------------------------------------------------------------------

def encode_disks(disks: tuple[DiskSpec, ...]) -> list[list[Any]]:
    return [[d.to_xl(), d.export_kind] for d in disks]


def decode_disks(items: Any) -> tuple[DiskSpec, ...]:
    out = []
    for xl, kind in items or ():
        try:
            out.append(dataclasses.replace(parse_disk(xl), export_kind=kind))
        except (XlCfgError, TypeError) as e:
            log.warning("a disk in the state file cannot be read back (%s): %s", xl, e)
    return tuple(out)


def encode_vifs(vifs: tuple[VifSpec, ...]) -> list[list[Any]]:
    return [[v.to_xl(), v.export_kind] for v in vifs]


def decode_vifs(items: Any) -> tuple[VifSpec, ...]:
    out = []
    for xl, kind in items or ():
        try:
            out.append(dataclasses.replace(parse_vif(xl), export_kind=kind))
        except (XlCfgError, TypeError) as e:
            log.warning("a vif in the state file cannot be read back (%s): %s", xl, e)
    return tuple(out)
