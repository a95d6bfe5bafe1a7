"""Spawning a domain: its credentials from the broker, its command line, its process in its namespace.

The third layer of the supervisor (``deploy/supervision.py`` lists them).
Like libxl at domain build: the broker's ``create`` (or ``restart``, which
keeps the domid) and ``setup_store`` before the process starts.  A launch
performs I/O but decides nothing about the lifecycle: its outcome is
returned as a lifecycle event, which ``deploy/lifecycle_driver.py`` feeds to
the table (``deploy/lifecycle.py``).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any

from xdom.broker.mgmt_client import ManagementError

from . import host_state, netns
from .access import AccessError
from .devices import Devices, _ifname, _tap_vifs, _vifs
from .host_limits import xenstore_node_quota, xenstore_watch_quota
from .isolation import DOMAIN_EXEC
from .launcher import start_domain_process
from .lifecycle import Event, State
from .rundir import log_marker
from .supervised_domain import READY_PIPE_KINDS, SupervisedDomain
from .supervision import RESET_PATIENCE
from .tap import TapError, open_tun
from .topology import DomainKind, NetSwitch, vif_queues
from .xlcfg import EXPORT_VHOST_USER

__all__ = ["Spawning"]

# glibc's defaults hand freed memory at the top of the heap back to the kernel, and serve allocations
# of 128 KiB and more with mmap: a data path that makes and drops a 64 KiB frame at a time then faults
# its pages in again (some 20,000 minor faults a second in each guest at 3 Gbit/s; 15-20% of the
# network path's CPU).  xdom's own domains keep up to 8 MiB of freed heap and take allocations below
# 1 MiB from it.  A program domain runs with whatever its own environment says.
MALLOC_TUNABLES = "glibc.malloc.trim_threshold=8388608:glibc.malloc.mmap_threshold=1048576"


def with_malloc_tunables(tunables: str) -> str:
    """``GLIBC_TUNABLES`` with xdom's malloc settings added (the ones it names itself win)."""
    named = {t.split("=", 1)[0] for t in tunables.split(":") if t}
    ours = [t for t in MALLOC_TUNABLES.split(":") if t.split("=", 1)[0] not in named]
    return ":".join([t for t in tunables.split(":") if t] + ours)


log = logging.getLogger("xdom.supervisor")


class Spawning(Devices):
    """Launching domains (see the module's docstring)."""

    def _launch(self, d: SupervisedDomain) -> tuple[Event, str]:
        """Create (or restart, keeping the domid) the domain in the broker and start its process.

        Returns the launch's outcome as a lifecycle event (``deploy/lifecycle.py``) and why: SPAWNED,
        STORE_DOWN, STORE_GONE, BROKER_BUSY, BROKER_STUCK or LAUNCH_FAILED.
        """
        now = time.monotonic()
        assert self.mgmt is not None
        if self._needs_store(d) and not self._store_up():
            if self.xenstored is not None and self.xenstored.state in (State.EXITED, State.FAILED,
                                                                       State.DESTROYED):
                d.last_exit = f"its xenstore domain {self.xenstored.name} is {self.xenstored.state}"
                log.error("%s domain %s cannot start: %s", d.kind, d.name, d.last_exit)
                return Event.STORE_GONE, d.last_exit
            return Event.STORE_DOWN, "waiting for xenstored"      # launched when xenstored serves again
        try:
            creds = self._credentials(d)
            if creds is None:                   # the broker has not seen the old process die yet
                d.reset_since = d.reset_since or now
                if now - d.reset_since > RESET_PATIENCE:
                    d.last_exit = f"the broker still reports domain {d.domid} alive after {RESET_PATIENCE:g}s"
                    log.error("%s domain %s cannot restart: %s", d.kind, d.name, d.last_exit)
                    return Event.BROKER_STUCK, d.last_exit
                return Event.BROKER_BUSY, "waiting for the broker"
            d.reset_since = None
            d.creds, d.domid = creds, int(creds["domid"])
            d.store = None
            if self._needs_store(d):
                assert self.xenstored is not None and self.xenstored.domid is not None
                st = self.mgmt.request("setup_store", domid=d.domid, xenstore_domid=self.xenstored.domid)
                d.store = (int(st["gfn"]), int(st["port"]))
        except (ManagementError, TimeoutError) as e:
            return self._launch_failed(d, f"the broker refused: {e}")
        return self._spawn(d, creds)

    @staticmethod
    def _launch_failed(d: SupervisedDomain, why: str) -> tuple[Event, str]:
        """A launch that never got a process: a failure for the restart policy, like status 127."""
        log.error("domain %s: %s", d.name, why)
        return Event.LAUNCH_FAILED, why

    def _credentials(self, d: SupervisedDomain) -> dict[str, Any] | None:
        assert self.mgmt is not None
        if d.domid is not None:
            try:
                return self.mgmt.request("restart", domid=d.domid, uid=self._runs_as(d))
            except ManagementError as e:
                if e.errno_name == "ESRCH":           # destroyed behind our back: a new domain
                    d.domid = d.creds = None
                elif e.errno_name == "EBUSY":
                    info = self.mgmt.request("info", domid=d.domid)["domain"]
                    # "created" with its token unused: the last process never said hello.
                    return d.creds if info["state"] == "created" else None
                else:
                    raise
        return self.mgmt.request("create", name=d.name, memory=d.spec.memory_arg,
                                 privileged=d.kind == DomainKind.XENSTORED, uid=self._runs_as(d))

    def _argv(self, d: SupervisedDomain, ready_w: int, tun_fds: dict[int, int] | None = None,
              device_fd: int = -1) -> tuple[list[str], str]:
        """The domain's command line (wrapped by domain_exec) and its working directory."""
        py = sys.executable
        if d.kind == DomainKind.XENSTORED:
            argv = [py, "-m", "xdom.deploy.cli", "--log-level", self.log_level, "xenstored",
                    "--unix-socket", self.layout.xenstored_socket, "--state-dir", self.layout.xenstored_state,
                    "--entry-nb", str(xenstore_node_quota(self.topology)),
                    "--watch-nb", str(xenstore_watch_quota(self.topology)), "--ready-fd", str(ready_w)]
            cwd = "/"
        elif d.kind == DomainKind.GUEST:
            # A disk is an NBD export for host programs, or a vhost-user-blk device for a VM.
            disks = [(f"--vhost-user-disk={disk.devid}:" if disk.export_kind == EXPORT_VHOST_USER else
                      f"--disk={disk.devid}:") + self._export_path(d, disk) for disk in d.spec.disks]
            # Each TAP vif comes with a /dev/net/tun descriptor we opened in its namespace: a
            # domain under its own uid cannot open the device (mode 0600 here), but may
            # attach to a TAP it owns.
            disks += [f"--vif={devid}:{_ifname(devid)}" + (f":{tun_fds[devid]}" if tun_fds and devid in tun_fds
                                                             else "") for devid, _ in _tap_vifs(d.spec)]
            # A VM's vif is a vhost-user-net device on a socket of the guest domain's.
            disks += [f"--vhost-user-vif={devid}:{self._vif_export(d, devid, vif)}:{vif_queues(vif, d.spec.vm)}"
                      for devid, vif in _vifs(d.spec) if vif.export_kind == EXPORT_VHOST_USER]
            if device_fd >= 0:
                disks.append(f"--device-fd={device_fd}")
            disks.append(f"--export-dir={self.layout.export_dir(d.name)}")    # where hot-attached disks' exports go
            argv = [py, "-m", "xdom.domains.guest", "--ready-fd", str(ready_w), *disks, "--",
                    *(d.spec.workload or ())]
            cwd = "/"
        elif d.kind == DomainKind.BLKBACK:
            # Images come open over its device channel: blkback opens nothing by path.
            argv = [py, "-m", "xdom.backends.blkback", "--ready-fd", str(ready_w), "--device-fd", str(device_fd)]
            cwd = "/"
        elif d.kind == DomainKind.NETBACK:
            argv = [py, "-m", "xdom.backends.netback", "--ready-fd", str(ready_w)]
            if d.switch == NetSwitch.BRIDGE:
                argv += ["--bridge", "--device-fd", str(device_fd)]
            cwd = "/"
        else:
            argv = list(d.spec.command or ())
            cwd = os.path.dirname(os.path.abspath(self.topology.source)) if os.path.exists(self.topology.source) \
                else "/"
        wrap = [py, "-I", "-S", DOMAIN_EXEC]        # no parent-death signal: the host outlives its supervisor
        if d.spec.limits.fds is not None:
            wrap += ["--nofile", str(d.spec.limits.fds)]
        return [*wrap, "--", *argv], cwd

    def _spawn(self, d: SupervisedDomain, creds: dict[str, Any]) -> tuple[Event, str]:
        try:
            self._prepare_exports(d)
        except (AccessError, OSError) as e:
            return self._launch_failed(d, f"cannot prepare its disk exports: {e}")
        tun_fds: dict[int, int] = {}
        if d.kind == DomainKind.GUEST and d.domid is not None:
            for b in self.domains:          # its vifs' TAPs are offered again when its nodes are written
                b.offered = {k for k in b.offered if k[0] != d.domid}
        try:
            self._prepare_vifs(d)
            if d.netns is not None:
                for devid, _ in _tap_vifs(d.spec):
                    tun_fds[devid] = open_tun(d.netns)
        except (netns.NetnsError, TapError, OSError) as e:
            for fd in tun_fds.values():
                os.close(fd)
            return self._launch_failed(d, f"cannot make its network interfaces: {e}")
        try:
            return self._spawn_process(d, creds, tun_fds)
        finally:
            # Ours to close at once: a copy left open would keep the TAP attached after the guest dies.
            for fd in tun_fds.values():
                os.close(fd)

    def _spawn_process(self, d: SupervisedDomain, creds: dict[str, Any],
                       tun_fds: dict[int, int]) -> tuple[Event, str]:
        """The process, in its namespace, with its ready pipe and device channel; the caller watches them."""
        ready_r = ready_w = -1
        if d.kind in READY_PIPE_KINDS:
            # A socket, not a pipe: the supervisor peeks at the word, writes it down, then takes it, so a
            # supervisor dying in between leaves it for the one that adopts the host (_on_ready_pipe).
            ours, its = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ready_r, ready_w = ours.detach(), its.detach()
        devices = theirs = None
        if d.kind in (DomainKind.GUEST, DomainKind.BLKBACK) or d.switch == NetSwitch.BRIDGE:
            devices, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            devices.setblocking(False)
        argv, cwd = self._argv(d, ready_w, tun_fds, theirs.fileno() if theirs is not None else -1)
        d.generation += 1
        logfd = os.open(self.layout.log_path(d.name), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            log_marker(logfd, f"starting {d.kind} domain {d.name} (domid {d.domid}, generation {d.generation}"
                               f"{f', uid {d.uid}' if d.uid is not None else ''}): {' '.join(argv)}")
            env = dict(os.environ, XDOM_LOG_LEVEL=self.log_level)
            if d.kind != DomainKind.PROGRAM:
                env["GLIBC_TUNABLES"] = with_malloc_tunables(env.get("GLIBC_TUNABLES", ""))
            # xdom's own Python comes first, so a program's "python3 -m ..." finds xdom
            env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
            with self._in_netns(d):
                d.proc = start_domain_process(creds, argv, env=env, uid=d.uid, stdin=subprocess.DEVNULL,
                                              stdout=logfd, stderr=subprocess.STDOUT,
                                              pass_fds=((ready_w,) if ready_w >= 0 else ()) + tuple(tun_fds.values())
                                              + ((theirs.fileno(),) if theirs is not None else ()),
                                              cwd=cwd)
        except (OSError, subprocess.SubprocessError, netns.NetnsError) as e:
            for fd in (ready_r, ready_w):
                if fd >= 0:
                    os.close(fd)
            if devices is not None:
                devices.close()
            return self._launch_failed(d, f"cannot start its process: {e}")
        finally:
            os.close(logfd)
            if theirs is not None:
                theirs.close()
        d.devices = devices
        d.offered.clear()           # a new channel: the new process has been given nothing yet
        if ready_w >= 0:
            os.close(ready_w)
        d.ident = host_state.identity(d.proc.pid)
        if devices is not None:
            self._keep(f"dev/{d.name}", devices.fileno())
        if ready_r >= 0:
            self._keep(f"ready/{d.name}", ready_r)
        d.pidfd = os.pidfd_open(d.proc.pid)
        d.ready_fd, d.ready_seen = ready_r, False
        d.connected = d.introduced = False
        d.kill_reason = ""
        d.confinement = ""
        d.sample = None
        d.ps_cache.clear()
        d.health.reset()
        d.started_mono = time.monotonic()
        d.deadline = d.started_mono + self.ready_timeout
        return Event.SPAWNED, f"pid {d.proc.pid}, domid {d.domid}, generation {d.generation}"

    def _replug(self, d: SupervisedDomain) -> None:
        """A bridged netback's new process: its TAPs are offered on its new device channel."""
        if d.switch == NetSwitch.BRIDGE:
            # Its TAPs persist in its namespace, but this process has a new channel: every vif it
            # serves gets its TAP (made again if need be) before the vif's nodes are written anew.
            for be, fe, devid, vif in self._served_vifs(d):
                try:
                    self._plug(be, fe, devid, vif)
                except (TapError, netns.NetnsError, OSError) as e:
                    self._plug_failed(fe, devid, be, e)
