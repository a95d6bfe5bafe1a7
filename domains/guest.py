"""The guest runtime: what runs in a ``kind = "guest"`` domain, today.

``python -m xdom.domains.guest [--ready-fd N] [-- WORKLOAD ARGS...]``, started
by the supervisor with the domain's credentials in its environment.  What a
guest does now, and nothing more:

1. connects to the broker as its domain (``connect()``: hello, then its memory);
2. opens its xenstore connection over its ring page (the toolstack set the
   ring up before starting it and introduces it once it runs: the first
   request waits for that);
3. does what a Linux guest's ``drivers/xen/manage.c`` does for the
   toolstack: watches ``control/shutdown`` and writes
   ``control/feature-poweroff = 1`` (once the toolstack's nodes exist: after
   a restart they are recreated just after the domain is introduced); when
   the toolstack writes ``poweroff`` (or ``halt``) to ``control/shutdown``,
   the guest acknowledges by writing ``""`` back and powers off;
4. says "ready" on ``--ready-fd`` (the supervisor's readiness pipe);
5. runs the workload, if the topology gives one, as its child and waits for
   it: the guest's exit status is the workload's (128 + n for signal n), and
   the guest powers off when it ends.  The child is forked before the guest
   confines itself and held until the guest is ready (:class:`HeldWorkload`):
   the workload is the user's program and inherits none of the guest's
   confinement (:mod:`xdom.domains.confinement`).  Without a workload it stays up until
   SIGTERM/SIGINT or a poweroff request;
6. shuts down cleanly: ``shutdown("poweroff")`` to the broker (so the broker
   records a shutdown, not a crash), then closes xenstore and the hypercall
   connection.

Disks (``--disk DEVID:SOCKET``, one per vbd the toolstack added) are
connected with blkfront before the guest says ready, each exported as an
NBD server on its unix socket for real programs (qemu-img, nbdcopy, fio).
Vifs (``--vif DEVID:IFNAME``) are connected with netfront to the TAP
device the toolstack made in the guest's network namespace (the guest
process starts inside it), so programs there use the network normally.
A VM's vifs (``--vhost-user-vif DEVID:SOCKET[:PAIRS]``) are connected with
netfront too, and served to the VM's virtio-net as a vhost-user device on
SOCKET with PAIRS queue pairs, one per netif queue (default 1;
:mod:`xdom.domains.vhost_user.net`).  A VM's disks (``--vhost-user-disk
DEVID:SOCKET``) are connected with blkfront and served to the VM's
virtio-blk as vhost-user-blk on SOCKET (:mod:`xdom.domains.vhost_user.blk`).
A workload sees ``XDOM_DOMID`` and ``XDOM_NAME``; the
domain's one-time token is not passed on.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
import threading
from collections.abc import Sequence

from . import confinement
from .abi.xs_wire import XenstoreError
from .blkfront.device import Blkfront, FrontendOptions
from .device_channel import DeviceChannel
from .hostsys.wakeup import WakePipe
from .nbd.server import NbdServer
from .netfront.device import Netfront
from .vhost_user.blk_export import DEFAULT_QUEUES as VHOST_USER_BLK_QUEUES
from .vhost_user.blk_export import VhostUserBlkExport
from .vhost_user.net import MAX_PAIRS as MAX_VHOST_USER_PAIRS
from .vhost_user.net import VhostUserNetPort
from .xenbus import read_or_none
from .xenhost import XenHost, connect
from .xenstore import XenstoreClient

log = logging.getLogger("xdom.guest")

EXPORT_NBD, EXPORT_VHOST_USER = "nbd", "vhost-user"     # an xdom-export node's kinds (deploy/xlcfg.py's names)

POWEROFF_REQUESTS = ("poweroff", "halt")
TOOLSTACK_TIMEOUT = 30.0  # seconds to wait for the toolstack's nodes
WORKLOAD_GRACE = 5.0     # seconds a workload gets between SIGTERM and SIGKILL when the guest stops


class Guest:
    """One guest's life: :meth:`run` returns its exit status (the workload's, or 0 when told to stop)."""

    def __init__(self, workload: HeldWorkload | None = None, ready_fd: int | None = None,
                 disks: Sequence[tuple[int, str]] = (), vifs: Sequence[tuple[int, str, int | None]] = (),
                 device_fd: int | None = None, vhost_user_vifs: Sequence[tuple[int, str, int]] = (),
                 vhost_user_disks: Sequence[tuple[int, str]] = ()) -> None:
        self.workload = workload
        self._devices = DeviceChannel(device_fd) if device_fd is not None else None
        self.disks = list(disks)
        self.vifs = list(vifs)
        self.vhost_user_vifs = list(vhost_user_vifs)
        self.vhost_user_disks = list(vhost_user_disks)
        self._nics: list[Netfront] = []
        self._attached: dict[int, tuple[Blkfront, NbdServer | VhostUserBlkExport]] = {}
        self._disk_lock = threading.Lock()
        self._hotplug: list[threading.Thread] = []
        self._connecting: dict[int, Blkfront] = {}     # disks being hot-attached, by devid
        self._scan_lock = threading.Lock()             # one disk scan at a time (watch and hot-attach threads)
        self.ready_fd = ready_fd
        self._wake = WakePipe()
        self.stop_reason = ""

    def request_stop(self, reason: str) -> None:
        """Safe from a signal handler and from the xenstore watch thread."""
        if not self.stop_reason:
            self.stop_reason = reason
        self._wake.wake()

    def run(self) -> int:
        host = connect()
        xs = None
        try:
            xs = XenstoreClient.ring(host)
            home = xs.get_domain_path(host.domid)
            log.info("guest %s is domain %d; xenstore at %s", host.name, host.domid, home)
            shutdown_node = f"{home}/control/shutdown"
            toolstack_done = threading.Event()

            def shutdown_requested(path: str, token: str) -> None:
                try:
                    request = xs.read(shutdown_node).decode(errors="replace")
                except Exception:       # not there yet, or the store is restarting: nothing asked
                    return
                toolstack_done.set()
                if request in POWEROFF_REQUESTS:
                    xs.write(shutdown_node, "")        # acknowledge, as Linux does
                    self.request_stop(f"{request} requested through xenstore")
                elif request:
                    log.warning("ignoring shutdown request %r: this guest handles %s", request,
                                " and ".join(POWEROFF_REQUESTS))
            xs.watch(shutdown_node, "shutdown", shutdown_requested)
            # A restarted domain is introduced before the toolstack recreates
            # the nodes it owns: wait for them (the watch fires when they appear).
            if not toolstack_done.wait(TOOLSTACK_TIMEOUT):
                raise RuntimeError(f"the toolstack did not create {shutdown_node} within {TOOLSTACK_TIMEOUT:g}s")
            xs.write(f"{home}/control/feature-poweroff", "1")
            for devid, export in self.disks:
                self._attach_disk(host, xs, home, devid, export)
            for devid, sock in self.vhost_user_disks:
                self._attach_vhost_user_disk(host, xs, home, devid, sock)
            xs.watch(f"{home}/device/vbd", "vbd-hotplug", lambda path, token: self._hotplug_scan(host, xs, home))
            for devid, ifname, tun_fd in self.vifs:
                self._attach_vif(host, xs, home, devid, ifname, tun_fd)
            for devid, sock, pairs in self.vhost_user_vifs:
                self._attach_vhost_user_vif(host, xs, home, devid, sock, pairs)
            xs.watch(f"{home}/device/vif", "vif-hotplug", lambda path, token: self._vif_hotplug(host, xs, home))
            # Until here SIGTERM kills outright: there is nothing to shut down cleanly yet.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: self.request_stop(signal.Signals(signum).name))
            confinement.lock_down("guest")
            self._ready()
            status = self._run_workload() if self.workload else self._wait_for_stop()
            log.info("guest powering off (%s)", self.stop_reason or "workload finished")
            host.shutdown("poweroff")
            return status
        finally:
            self.stop_reason = self.stop_reason or "stopping"
            for t in list(self._hotplug):
                t.join()
            with self._disk_lock:
                attached, self._attached = list(self._attached.values()), {}
            for front, server in attached:
                server.close()
                front.close(patience=0)     # this domain is going away: its frames go with it
            with self._disk_lock:
                nics, self._nics = self._nics, []
            for nic in nics:
                nic.close()
            if xs is not None:
                xs.close()
            if self._devices is not None:
                self._devices.close()
            if self.workload is not None:
                self.workload.cancel()
            host.close()

    def _attach_disk(self, host: XenHost, xs: XenstoreClient, home: str, devid: int, export: str) -> None:
        """Connect blkfront to the disk the toolstack added and export it over NBD."""
        self._wait_for_node(xs, f"{home}/device/vbd/{devid}/backend", f"vbd-{devid}")
        self._connect_and_export(host, xs, devid, export)

    def _attach_vhost_user_disk(self, host: XenHost, xs: XenstoreClient, home: str, devid: int, sock: str) -> None:
        """Connect blkfront to the disk the toolstack added and serve it to a VM as vhost-user-blk on ``sock``.

        blkfront asks blkback for ``VHOST_USER_BLK_QUEUES`` rings and the VM is
        offered one virtqueue per ring it got (its ``num-queues`` may be fewer);
        GET_ID answers the vbd's vdev (``xvda``).  QEMU may be started before
        the socket exists: it retries (``reconnect=``), as after a restart of
        this domain, when the stale socket of the one before is replaced.
        """
        self._wait_for_node(xs, f"{home}/device/vbd/{devid}/backend", f"vbd-{devid}")
        self._serve_vhost_user_disk(host, xs, devid, sock)

    def _serve_vhost_user_disk(self, host: XenHost, xs: XenstoreClient, devid: int, sock: str) -> None:
        front = Blkfront(host, xs, devid, FrontendOptions(queues=VHOST_USER_BLK_QUEUES))
        try:
            self._connect_disk(front)
            vdev = read_or_none(xs, f"{front.backend_path}/dev")
            export = VhostUserBlkExport(sock, front, serial=vdev.decode(errors="replace") if vdev
                                        else f"xdom-vbd-{devid}")
            export.start()
        except BaseException:
            front.close()
            raise
        with self._disk_lock:
            self._attached[devid] = (front, export)
        log.info("disk %d: %d bytes served as vhost-user-blk on %s (%d queues)", devid, front.size, sock,
                 export.num_queues)

    def _attach_vif(self, host: XenHost, xs: XenstoreClient, home: str, devid: int, ifname: str,
                    tun_fd: int | None) -> None:
        """Connect netfront to the vif the toolstack added, on the TAP device it made in our namespace."""
        self._wait_for_node(xs, f"{home}/device/vif/{devid}/backend", f"vif-{devid}")
        nic = Netfront(host, xs, devid, ifname, tun_fd=tun_fd)
        with self._disk_lock:
            self._nics.append(nic)
        nic.connect(TOOLSTACK_TIMEOUT)
        log.info("vif %d: connected on %s", devid, ifname)

    def _attach_vhost_user_vif(self, host: XenHost, xs: XenstoreClient, home: str, devid: int, sock: str,
                               pairs: int = 1) -> None:
        """Connect netfront to the vif the toolstack added and serve it to a VM as vhost-user-net on ``sock``.

        The VM's NIC gets the vif's MAC (its ``mac`` node) and ``pairs``
        queue pairs, netfront as many netif queues at most (the VMM must be
        given the same number); QEMU may connect before netfront is
        connected (it waits in the listen backlog) or after.
        """
        self._wait_for_node(xs, f"{home}/device/vif/{devid}/backend", f"vif-{devid}")
        self._serve_vhost_user_vif(host, xs, home, devid, sock, pairs)

    def _serve_vhost_user_vif(self, host: XenHost, xs: XenstoreClient, home: str, devid: int, sock: str,
                              pairs: int) -> None:
        mac = read_or_none(xs, f"{home}/device/vif/{devid}/mac")
        if mac is None:
            raise RuntimeError(f"vif {devid}: the toolstack wrote no mac node")
        port = VhostUserNetPort(sock, mac, max_pairs=pairs)
        try:
            nic = Netfront(host, xs, devid, port=port, max_queues=pairs)
        except BaseException:
            port.close()
            raise
        with self._disk_lock:
            self._nics.append(nic)
        nic.connect(TOOLSTACK_TIMEOUT)
        log.info("vif %d: connected, served as vhost-user-net on %s", devid, sock)

    def _vif_hotplug(self, host: XenHost, xs: XenstoreClient, home: str) -> None:
        """Vifs added or removed while we run (xdom network-attach / network-detach); attach on a thread.

        A hot-added vif's /dev/net/tun descriptor comes over the device
        channel (the toolstack sends it before it writes the vif's nodes);
        a guest started without one opens the device itself, which needs
        root or a node open to everyone.
        """
        if self.stop_reason:
            return
        present = self._device_ids(xs, f"{home}/device/vif")
        if present is None:
            return
        with self._disk_lock:
            gone = [nic for nic in self._nics if nic.devid not in present]
            self._nics = [nic for nic in self._nics if nic.devid in present]
            known = {nic.devid for nic in self._nics} | {int(t.name.rsplit("-", 1)[1]) for t in self._hotplug
                                                           if t.is_alive() and t.name.startswith("vifplug-")}
        for nic in gone:
            log.info("vif %d: removed by the toolstack", nic.devid)
            nic.close()
        for devid in sorted(present - known):
            raw = read_or_none(xs, f"{home}/device/vif/{devid}/xdom-ifname")
            state = read_or_none(xs, f"{home}/device/vif/{devid}/state")
            if raw is None or state != b"1":
                continue
            kind, sock = _export_node(read_or_none(xs, f"{home}/device/vif/{devid}/xdom-export"))
            if kind == EXPORT_VHOST_USER:
                queues = read_or_none(xs, f"{home}/device/vif/{devid}/xdom-queues") or b"1"
                pairs = int(queues) if queues.isdigit() and 1 <= int(queues) <= MAX_VHOST_USER_PAIRS else 1
                t = threading.Thread(target=self._vif_hotplug_vhost_user, args=(host, xs, home, devid, sock, pairs),
                                     name=f"vifplug-{devid}", daemon=True)
            elif kind is not None:
                log.error("vif %d: export %r is not served (a vif is a TAP device or vhost-user)", devid, kind)
                continue
            else:
                t = threading.Thread(target=self._vif_hotplug_attach,
                                     args=(host, xs, home, devid, raw.decode(errors="replace")),
                                     name=f"vifplug-{devid}", daemon=True)
            with self._disk_lock:
                self._hotplug.append(t)
            t.start()

    def _vif_hotplug_attach(self, host: XenHost, xs: XenstoreClient, home: str, devid: int, ifname: str) -> None:
        try:
            tun_fd = None
            if self._devices is not None:
                tun_fd = self._devices.take("vif", devid, TOOLSTACK_TIMEOUT)
                if tun_fd is None:
                    raise RuntimeError(f"the toolstack sent no /dev/net/tun descriptor for {ifname} within "
                                       f"{TOOLSTACK_TIMEOUT:g}s")
            self._attach_vif(host, xs, home, devid, ifname, tun_fd)
        except Exception as e:
            log.error("vif %d: hot-attach failed: %s", devid, e)

    def _vif_hotplug_vhost_user(self, host: XenHost, xs: XenstoreClient, home: str, devid: int, sock: str,
                                pairs: int) -> None:
        try:
            self._serve_vhost_user_vif(host, xs, home, devid, sock, pairs)
        except Exception as e:
            log.error("vif %d: hot-attach as vhost-user-net on %s failed: %s", devid, sock, e)

    @staticmethod
    def _device_ids(xs: XenstoreClient, path: str) -> set[int] | None:
        """The device ids under ``path``: none when it does not exist; None when the listing failed
        (the store restarting, say), which says nothing about what is there: the caller changes nothing."""
        try:
            return {int(n) for n in xs.directory(path) if n.isdigit()}
        except XenstoreError as e:
            if e.name == "ENOENT":
                return set()
            log.warning("listing %s: %s", path, e)
        except Exception as e:
            log.warning("listing %s: %s", path, e)
        return None

    def _wait_for_node(self, xs: XenstoreClient, node: str, token: str) -> None:
        present = threading.Event()

        def check(path: str, tok: str) -> None:
            try:
                if xs.exists(node):
                    present.set()
            except XenstoreError:
                # A restarted domain may not read its directory until the toolstack has set its
                # permissions again (EACCES): not there yet; its writes fire the watch again.
                pass
        xs.watch(node, token, check)
        try:
            if not present.wait(TOOLSTACK_TIMEOUT):
                raise RuntimeError(f"the toolstack did not create {node} within {TOOLSTACK_TIMEOUT:g}s")
        finally:
            xs.unwatch(node, token)

    def _connect_disk(self, front: Blkfront) -> None:
        """Connect, where a scan that finds the device removed meanwhile can abandon it (``_hotplug_scan``)."""
        with self._disk_lock:
            self._connecting[front.devid] = front
        log.info("disk %d: connecting to backend %s", front.devid, front.backend_path)
        try:
            front.connect(TOOLSTACK_TIMEOUT)
        finally:
            with self._disk_lock:
                self._connecting.pop(front.devid, None)

    def _connect_and_export(self, host: XenHost, xs: XenstoreClient, devid: int, export: str) -> None:
        front = Blkfront(host, xs, devid)
        try:
            self._connect_disk(front)
            server = NbdServer(export, front)
            server.start()
        except BaseException:
            front.close()
            raise
        with self._disk_lock:
            self._attached[devid] = (front, server)
        log.info("disk %d: %d bytes exported on nbd+unix:///?socket=%s", devid, front.size, export)

    def _hotplug_scan(self, host: XenHost, xs: XenstoreClient, home: str) -> None:
        """Disks the toolstack added or removed while we run (xdom block-attach / block-detach).

        Runs on the xenstore watch thread, which must stay free to deliver
        the events a handshake waits for: attaching happens on a thread.
        """
        with self._scan_lock:
            self._scan_disks(host, xs, home)

    def _scan_disks(self, host: XenHost, xs: XenstoreClient, home: str) -> None:
        if self.stop_reason:
            return
        present = self._device_ids(xs, f"{home}/device/vbd")
        if present is None:
            return
        me = threading.current_thread()      # a hot-attach thread rescanning as it ends is not busy
        with self._disk_lock:
            gone = [d for d in self._attached if d not in present]
            removed = [self._attached.pop(d) for d in gone]
            busy = {int(t.name.rsplit("-", 1)[1]) for t in self._hotplug
                    if t.is_alive() and t is not me and t.name.startswith("hotplug-")}
            self._hotplug = [t for t in self._hotplug if t.is_alive()]
            new = [d for d in present if d not in self._attached and d not in busy]
            # Removed while connecting (its attach undone, say): stop waiting for a backend that
            # is gone; once that attach ends, the rescan it does picks up a disk added again.
            abandoned = [front for devid, front in self._connecting.items() if devid not in present]
        for front in abandoned:
            log.info("disk %d: removed by the toolstack while connecting", front.devid)
            front.abandon()
        for devid, (front, server) in zip(gone, removed):
            log.info("disk %d: removed by the toolstack", devid)
            server.close()
            front.close()
        for devid in new:
            raw = read_or_none(xs, f"{home}/device/vbd/{devid}/xdom-export")
            state = read_or_none(xs, f"{home}/device/vbd/{devid}/state")
            if raw is None or state != b"1":      # not ours to export, or being torn down
                continue
            kind, export = _export_node(raw)
            if kind not in (EXPORT_NBD, EXPORT_VHOST_USER):
                log.error("disk %d: export %r is not served (nbd or vhost-user)", devid, kind)
                continue
            t = threading.Thread(target=self._hotplug_attach, args=(host, xs, home, devid, kind, export),
                                 name=f"hotplug-{devid}", daemon=True)
            with self._disk_lock:
                self._hotplug.append(t)
            t.start()

    def _hotplug_attach(self, host: XenHost, xs: XenstoreClient, home: str, devid: int, kind: str,
                        export: str) -> None:
        try:
            if kind == EXPORT_VHOST_USER:
                self._serve_vhost_user_disk(host, xs, devid, export)
            else:
                self._connect_and_export(host, xs, devid, export)
        except Exception as e:
            log.error("disk %d: hot-attach failed: %s", devid, e, exc_info=True)
        # The scans made while this ran skipped its devid: a disk removed (and perhaps added
        # again under it) meanwhile is seen to now.
        self._hotplug_scan(host, xs, home)

    def _ready(self) -> None:
        if self.ready_fd is not None:
            os.write(self.ready_fd, confinement.ready_message())
            os.close(self.ready_fd)
            self.ready_fd = None

    def _wait_for_stop(self) -> int:
        while not self.stop_reason:
            select.select([self._wake], [], [])
            self._wake.drain()
        return 0

    def _run_workload(self) -> int:
        proc = self.workload
        assert proc is not None
        proc.start()
        while True:
            r, _, _ = select.select([self._wake.fileno(), proc.pidfd], [], [])
            if proc.pidfd in r:
                rc = proc.wait()
                assert rc is not None       # no timeout
                log.info("workload %s", f"exited with status {rc}" if rc >= 0 else f"killed by signal {-rc}")
                return rc if rc >= 0 else 128 - rc
            self._wake.drain()
            if self.stop_reason:
                proc.send_signal(signal.SIGTERM)
                if proc.wait(WORKLOAD_GRACE) is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                return 0


class HeldWorkload:
    """The workload's process: forked now, before the guest confines itself; it execs on :meth:`start`.

    Forked while the guest still runs one thread, with the domain's token
    already out of its environment; until :meth:`start` it only waits on a
    pipe.  If the guest goes away first (or :meth:`cancel`), it sees the
    pipe close and exits without running anything.  Like the
    ``subprocess.Popen`` it replaces: stdin is ``/dev/null``, every other
    descriptor but stdout and stderr is closed, SIGPIPE is default again.
    A program that cannot be executed exits with status 127.
    """

    def __init__(self, argv: Sequence[str]) -> None:
        if not argv:
            raise ValueError("a workload needs a program")
        env = {k: v for k, v in os.environ.items() if k != "XDOM_TOKEN"}
        r, self._go = os.pipe2(os.O_CLOEXEC)
        self.pid = os.fork()
        if self.pid == 0:               # the workload-to-be
            os.close(self._go)
            _exec_when_told(r, list(argv), env)
        os.close(r)
        self.pidfd = os.pidfd_open(self.pid)
        self.returncode: int | None = None

    def start(self) -> None:
        os.write(self._go, b"1")
        os.close(self._go)
        self._go = -1

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self.pidfd, sig)

    def wait(self, timeout: float | None = None) -> int | None:
        """Its status as ``Popen.returncode`` (-N: killed by signal N); None if still running after ``timeout``."""
        if self.returncode is None:
            if timeout is not None and not select.select([self.pidfd], [], [], timeout)[0]:
                return None
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
            os.close(self.pidfd)
        return self.returncode

    def cancel(self) -> None:
        """Never started (or to be stopped): it exits (or is killed), and is reaped."""
        if self._go >= 0:
            os.close(self._go)          # it reads EOF and exits without running anything
            self._go = -1
        elif self.returncode is None and self.wait(0) is None:
            self.send_signal(signal.SIGKILL)
        self.wait()


def _exec_when_told(go: int, argv: list[str], env: dict[str, str]) -> None:
    """In the forked child: wait for the guest's word, then exec the workload; never returns.

    Every descriptor but stdio and the pipe is closed at once: a copy of
    the ready pipe, a TAP or the device channel must not outlive the guest.
    """
    try:
        top = os.sysconf("SC_OPEN_MAX")
        os.closerange(3, go)
        os.closerange(go + 1, top)
        if os.read(go, 1) == b"1":
            for sig in (signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.closerange(3, top)
            os.execvpe(argv[0], argv, env)
        os._exit(0)
    except BaseException as e:
        why = e.strerror if isinstance(e, OSError) else repr(e)
        os.write(2, f"guest: cannot run the workload {argv[0]!r}: {why}\n".encode(errors="replace"))
    finally:
        os._exit(127)



def _export_node(raw: bytes | None) -> tuple[str | None, str]:
    """A device's ``xdom-export`` node: ``vhost-user:PATH`` (a VM's device), ``nbd:PATH`` or a bare absolute
    PATH (NBD, what the toolstack wrote before there were kinds); (None, "") without one."""
    if raw is None:
        return None, ""
    text = raw.decode(errors="replace")
    if text.startswith("/"):
        return EXPORT_NBD, text
    kind, _, path = text.partition(":")
    return kind, path


def _disk_arg(text: str) -> tuple[int, str]:
    devid, sep, path = text.partition(":")
    if not sep or not devid.isdigit() or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: DEVID:SOCKET expected")
    return int(devid), path


def _vhost_vif_arg(text: str) -> tuple[int, str, int]:
    devid, sock = _disk_arg(text)
    head, sep, tail = sock.rpartition(":")
    if sep and tail.isdigit():
        if not head or not 1 <= int(tail) <= 16:
            raise argparse.ArgumentTypeError(f"{text!r}: DEVID:SOCKET[:PAIRS] expected, PAIRS 1..16")
        return devid, head, int(tail)
    return devid, sock, 1


def _vif_arg(text: str) -> tuple[int, str, int | None]:
    parts = text.split(":")
    if not 2 <= len(parts) <= 3 or not parts[0].isdigit() or not parts[1] or len(parts[1]) > 15 \
            or (len(parts) == 3 and not parts[2].isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: DEVID:IFNAME[:TUNFD] expected")
    return int(parts[0]), parts[1], int(parts[2]) if len(parts) == 3 else None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xdom.domains.guest", description="xdom's guest runtime")
    p.add_argument("--ready-fd", type=int, default=None, help="write 'ready' to this fd once up")
    p.add_argument("--disk", action="append", default=[], type=_disk_arg, metavar="DEVID:SOCKET",
                   help="connect vbd DEVID and export it over NBD on unix socket SOCKET (repeatable)")
    p.add_argument("--vif", action="append", default=[], type=_vif_arg, metavar="DEVID:IFNAME[:TUNFD]",
                   help="connect vif DEVID to TAP device IFNAME in this domain's namespace, through the "
                        "/dev/net/tun descriptor TUNFD when given (repeatable)")
    p.add_argument("--vhost-user-disk", action="append", default=[], type=_disk_arg, metavar="DEVID:SOCKET",
                   help="connect vbd DEVID and serve it to a VM as vhost-user-blk on unix socket SOCKET "
                        "(repeatable)")
    p.add_argument("--vhost-user-vif", action="append", default=[], type=_vhost_vif_arg,
                   metavar="DEVID:SOCKET[:PAIRS]",
                   help="connect vif DEVID and serve it to a VM as vhost-user-net on unix socket SOCKET, with "
                        "PAIRS queue pairs (default 1; repeatable)")
    p.add_argument("--device-fd", type=int, default=None, metavar="FD",
                   help="the toolstack's device channel: descriptors for hot-added devices arrive on it")
    p.add_argument("--export-dir", action="append", default=[], metavar="DIR",
                   help="a directory where hot-attached disks' NBD sockets may go (besides those of --disk)")
    p.add_argument("workload", nargs=argparse.REMAINDER, help="-- PROGRAM ARGS...: run and wait for it")
    args = p.parse_args(argv)
    workload = args.workload[1:] if args.workload[:1] == ["--"] else args.workload
    logging.basicConfig(level=os.environ.get("XDOM_LOG_LEVEL", "info").upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    held = HeldWorkload(workload) if workload else None     # before any confinement: it is the user's
    try:
        # Before the first thread: its export sockets' directories, /dev/net/tun for a vif that comes
        # without a descriptor, and the interpreter; nothing else.
        confinement.restrict_files("guest", socket_dirs=[*args.export_dir,
                                                         *(os.path.dirname(os.path.abspath(sock))
                                                           for _, sock in args.disk),
                                                         *(os.path.dirname(os.path.abspath(sock))
                                                           for _, sock, _ in args.vhost_user_vif),
                                                         *(os.path.dirname(os.path.abspath(sock))
                                                           for _, sock in args.vhost_user_disk)],
                                   devices=["/dev/net/tun"])
    except BaseException:
        if held is not None:
            held.cancel()
        raise
    return Guest(held, args.ready_fd, args.disk, args.vif, args.device_fd,
                 vhost_user_vifs=args.vhost_user_vif, vhost_user_disks=args.vhost_user_disk).run()


if __name__ == "__main__":
    sys.exit(main())
