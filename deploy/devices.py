"""A domain's devices and xenstore set-up: nodes, TAPs, bridges, export sockets, network namespaces.

The second layer of the supervisor (``deploy/supervision.py`` lists them):
what libxl and Xen's hotplug scripts do.  Introduction to xenstored and a
domain's ``/local/domain/<domid>`` nodes (``deploy/xsnodes.py``), the vbd and
vif nodes of every device (``deploy/vbd.py``, ``deploy/vif.py``), the images
and TAPs handed to driver domains over their device channels (plug/unplug),
the guests' export directories, and what goes when a domain stays down
(release).  Nothing here changes a domain's lifecycle.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from xdom.domains.abi.xs_wire import XenstoreError
from xdom.domains.device_channel import offer_fd
from xdom.domains.xenstore import UnixTransport, XenstoreClient

from . import netns
from .access import AccessError, grant_search, private_dir
from .bridge import backend_tap_name, ensure_bridge, ensure_port
from .lifecycle import State
from .rundir import make_dirs, unlink_socket
from .supervised_domain import SupervisedDomain
from .supervision import XS_TIMEOUT, SupervisorBase
from .tap import TapError, create_tap, delete_tap, open_tun, tap_exists
from .topology import DEFAULT_BRIDGE, DomainKind, DomainSpec, NetSwitch, vif_devids, vif_queues
from .vbd import VbdConfig, add_vbd
from .vif import VifConfig, add_vif
from .xenstored_probe import XenstoredProbe
from .xl_disk import DiskSpec
from .xl_vif import VifSpec
from .xlcfg import EXPORT_NBD, EXPORT_VHOST_USER, default_vif_export
from .xsnodes import domain_path, write_domain_nodes

__all__ = ["DETACH_TIMEOUT", "Devices"]

log = logging.getLogger("xdom.supervisor")

DETACH_TIMEOUT = 5.0      # seconds a detach gives the backend to report Closed (detaching.py follows it)


class Devices(SupervisorBase):
    """Device wiring (see the module's docstring)."""

    @contextmanager
    def _xs(self) -> Iterator[XenstoreClient]:
        """A connection to xenstored for the loop's requests, each bounded by ``XS_TIMEOUT``.

        Once a request went unanswered, every later one fails at once (TimeoutError, which every
        caller already handles as xenstored not answering) until xenstored answers the probe or
        starts again: a burst of requests -- guests released, attaches undone -- then costs the loop
        one ``XS_TIMEOUT``, not one each (three guests destroyed under a frozen xenstored: 15 s)."""
        if self._store_silent:
            raise TimeoutError("xenstored left a request unanswered and has not answered the probe since")
        transport = UnixTransport(self.layout.xenstored_socket)
        try:
            self._check_xenstored_peer(transport.sock)
        except BaseException:
            transport.close()
            raise
        client = XenstoreClient(transport, timeout=XS_TIMEOUT)
        try:
            yield client
        except TimeoutError:
            self._store_went_silent()
            raise
        else:
            # Requests answered (a probe's answer alone does not end the pauses: a xenstored that
            # answers probes and nothing else would otherwise have them reset each time).
            self._store_probe().requests_answered()
        finally:
            client.close()

    def _store_went_silent(self) -> None:
        """A request went unanswered: the loop's requests fail at once until the probe is answered,
        asked after a pause that grows while this repeats (``XenstoredProbe.requests_unanswered``)."""
        if not self._store_silent:
            self._store_silent = True
            self._store_probe().requests_unanswered(time.monotonic())

    def _check_xenstored_peer(self, sock: socket.socket) -> None:
        """Raise OSError (EPERM) unless the process at the other end is the xenstore domain's.

        The socket lives in a directory xenstored's uid owns, so whatever is
        there is only believed when ``SO_PEERCRED`` names xenstored's process
        and uid (dom0's requests must never reach a guest that put a socket
        of its own there).
        """
        xs = self.xenstored
        assert xs is not None
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
        want_uid = self._runs_as(xs)
        if uid != want_uid or (xs.pid is not None and pid != xs.pid):
            raise OSError(errno.EPERM, f"{self.layout.xenstored_socket} is served by pid {pid} (uid {uid}), not by "
                                       f"xenstore domain {xs.name} (pid {xs.pid}, uid {want_uid}): not believed")

    def _write_domain_nodes(self, xs: XenstoreClient, d: SupervisedDomain) -> None:
        assert d.domid is not None
        write_domain_nodes(xs, d.domid, d.name, d.spec.memory_bytes >> 10)

    def _introduce(self, d: SupervisedDomain) -> None:
        """Introduce ``d`` to xenstored once it answers (:meth:`_introduce_now`), asked without waiting:
        the loop never waits for a xenstored that stopped answering (``xenstored_probe.py``)."""
        self._introduce_waiting.add(d.name)
        self._store_probe().ask(time.monotonic())

    def _store_probe(self) -> XenstoredProbe:
        if self._probe is None:
            self._probe = XenstoredProbe(self._probe_socket, self._watch_fd, self._unwatch_fd, self._store_answered)
        return self._probe

    def _probe_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(1.0)            # a unix socket's connect does not wait for the server's answer
            sock.connect(self.layout.xenstored_socket)
            self._check_xenstored_peer(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def _store_answered(self) -> None:
        """xenstored answered the probe: introduce the domains that waited for it.

        One request that goes unanswered (xenstored stopped right after the probe's answer) ends the
        round: the domains not yet introduced wait for its next answer (``_store_went_silent``).
        Going on would hold the loop ``XS_TIMEOUT`` once per waiting domain: 20 s for four guests,
        minutes for a hundred.  The next round starts after the domain this one ended at, so that one
        whose introduction keeps going unanswered does not keep the others waiting behind it."""
        self._store_silent = False
        waiting, self._introduce_waiting = sorted(self._introduce_waiting), set()
        stalled = self._introduce_stalled_at
        if stalled is not None:
            waiting = [n for n in waiting if n > stalled] + [n for n in waiting if n <= stalled]
        for at, name in enumerate(waiting):
            d = self._by_name.get(name)
            if d is not None and d.connected and not d.introduced and d.pidfd >= 0 \
                    and d.state in (State.STARTING, State.RUNNING) and self._store_up():
                if not self._introduce_now(d):
                    self._introduce_waiting.update(waiting[at:])
                    self._introduce_stalled_at = name
                    self._store_went_silent()
                    return
                self._introduced(d)

    def _introduced(self, d: SupervisedDomain) -> None:
        """After :meth:`_introduce_now` from the probe's answer (the lifecycle layer checks readiness)."""

    def _introduce_now(self, d: SupervisedDomain) -> bool:
        """The domain's nodes, then XS_INTRODUCE (libxl's order); False if xenstored did not answer
        (or is not there): the domain waits for its next answer, its readiness deadline bounding that.

        A restarted domain keeps its domid, and xenstored removed the nodes it
        owned when it died and takes the domid for gone until it is introduced
        again: setting permissions for it fails with ENOENT until then.  So a
        restart introduces first and writes the nodes right after; the guest
        runtime waits for its ``control/shutdown`` node before writing there.
        """
        if d.store is None or d.domid is None:
            return True
        try:
            with self._xs() as xs:
                try:
                    self._write_domain_nodes(xs, d)
                    written = True
                except XenstoreError as e:
                    if e.name != "ENOENT":
                        raise
                    written = False
                # Once only: an earlier try whose reply died with xenstored may have introduced it,
                # and XS_INTRODUCE of an introduced domain resets its connection (C's
                # domain_conn_reset drops its watches).  A domain restarted under its domid is not
                # introduced any more: xenstored released the old one when it died.
                if not xs.is_domain_introduced(d.domid):
                    xs.introduce(d.domid, *d.store)
                if not written:
                    self._write_domain_nodes(xs, d)
                self._write_devices(xs, d)
                self._write_vifs(xs, d)
        except XenstoreError as e:
            log.warning("domain %s: xenstore set-up failed (%s); retried when xenstored restarts, bounded by "
                        "its readiness deadline", d.name, e)
            return True
        except (TimeoutError, ConnectionError) as e:
            log.warning("domain %s: xenstore set-up failed (%s); retried when xenstored answers again, bounded "
                        "by its readiness deadline", d.name, e)
            return False
        except OSError as e:
            log.warning("domain %s: xenstore set-up failed (%s); retried when xenstored restarts, bounded by "
                        "its readiness deadline", d.name, e)
            return True
        except Exception:
            # What xenstored (a domain too) answers, or a domain put in its nodes, must cost at most
            # this domain's set-up, never the supervisor's loop and with it every domain of the host.
            log.exception("domain %s: xenstore set-up failed; retried when xenstored restarts, bounded by "
                          "its readiness deadline", d.name)
            return True
        d.introduced = True
        self._record(d.name, "introduced", f"gfn {d.store[0]} port {d.store[1]}")
        return True

    def _export_path(self, d: SupervisedDomain, disk: DiskSpec) -> str:
        return disk.export_path or self.layout.default_export(d.name, disk.vdev)

    def _vif_export(self, d: SupervisedDomain, devid: int, vif: VifSpec) -> str:
        """The vhost-user socket of a VM's vif."""
        return vif.export_path or default_vif_export(self.layout.run_dir, d.name, devid)

    def _export_sockets(self, d: SupervisedDomain) -> list[str]:
        """Every socket ``d`` serves its devices on: its disks' NBD or vhost-user exports, its vhost-user vifs."""
        return [self._export_path(d, disk) for disk in d.spec.disks] + [
            self._vif_export(d, devid, vif) for devid, vif in _vifs(d.spec) if vif.export_kind == EXPORT_VHOST_USER]

    def _export_sockets_of_host(self) -> set[str]:
        return {p for g in self.domains for p in self._export_sockets(g)}

    def _vbds_of(self, d: SupervisedDomain) -> list[tuple[SupervisedDomain, SupervisedDomain, DiskSpec]]:
        """(backend, frontend, disk) for every disk ``d`` serves or uses whose two domains have domids."""
        out = []
        for fe in self.domains:
            for disk in fe.spec.disks:
                be = self._by_name.get(disk.backend or "")
                if be is None or (d is not fe and d is not be) or fe.domid is None or be.domid is None:
                    continue
                out.append((be, fe, disk))
        return out

    def _write_devices(self, xs: XenstoreClient, d: SupervisedDomain, only: DiskSpec | None = None) -> None:
        """libxl's device nodes for ``d``'s disks, or those it serves (again, after a restart)."""
        for be, fe, disk in self._vbds_of(d):
            if disk.target is None or (only is not None and disk is not only):
                continue
            assert be.domid is not None and fe.domid is not None
            try:
                add_vbd(xs, VbdConfig(be.domid, fe.domid, disk.devid, disk.vdev, disk.target, disk.readonly,
                                      export=self._export_path(fe, disk), export_kind=disk.export_kind or EXPORT_NBD,
                                      disk_fd=self._offer_disk(be, fe, disk)))
            except XenstoreError as e:
                if only is not None:
                    raise
                if not self._peer_is_gone(e, d, be, fe, disk.vdev):
                    self._device_failed(fe, disk.vdev, be, e)
                continue
            self._record(fe.name, "vbd", f"{disk.vdev} on {be.name} -> {self._export_path(fe, disk)}")

    @staticmethod
    def _peer_is_gone(e: XenstoreError, d: SupervisedDomain, be: SupervisedDomain, fe: SupervisedDomain,
                      device: str) -> bool:
        """Whether a device's nodes failed only because the domain at its other end is dead right now.

        ``d`` is alive and being set up, so xenstored's ENOENT ("owner does
        not exist") names the other end: a frontend or backend that died and
        whose restart has not reached the hypervisor yet.  That end's own
        introduction writes the device again, so ``d``'s set-up goes on
        without it; failing it would leave ``d`` unready until xenstored
        itself restarted.
        """
        if e.name != "ENOENT" or be is fe:
            return False
        peer = fe if d is be else be
        log.info("domain %s: %s's nodes wait for %s (domid %s), which is not alive now: its restart writes them",
                 d.name, device, peer.name, peer.domid)
        return True

    def _offer_disk(self, be: SupervisedDomain, fe: SupervisedDomain, disk: DiskSpec) -> int | None:
        """Open the image (as a Xen hotplug script does) and hand it to blkback before its nodes are written.

        Returns the offer's serial for the vbd's ``xdom-disk-fd`` node, or
        None when blkback is not running (its next start gets one) or the
        image cannot be opened (blkback then reports the device failed).
        """
        if be.devices is None or disk.target is None:
            return None
        assert fe.domid is not None
        try:
            fd = os.open(disk.target, (os.O_RDONLY if disk.readonly else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            log.error("%s: cannot open %s for %s: %s", be.name, disk.target, fe.name, e.strerror)
            return None
        try:
            self._disk_serial += 1
            offer_fd(be.devices, "disk", (fe.domid, disk.devid, self._disk_serial), fd)
        except OSError as e:
            log.error("%s: cannot hand it %s: %s", be.name, disk.target, e)
            return None
        finally:
            os.close(fd)
        return self._disk_serial

    def _write_vifs(self, xs: XenstoreClient, d: SupervisedDomain, only: int | None = None) -> None:
        """libxl's vif nodes for ``d``'s vifs, or those it serves (again, after a restart).

        A vif of a bridged netback is plugged first (its TAP made and offered
        to netback, which looks for it once it sees the nodes).  One that
        cannot be plugged gets no nodes and an error in the log; with
        ``only`` (a hot-attach) the error is raised instead.
        """
        for be, fe, devid, vif in self._served_vifs(d):
            if only is not None and (d is not fe or devid != only):
                continue
            assert vif.mac is not None and be.domid is not None and fe.domid is not None
            if be.switch == NetSwitch.BRIDGE:
                try:
                    self._plug(be, fe, devid, vif)
                except (TapError, netns.NetnsError, OSError) as e:
                    if only is not None:
                        raise
                    self._plug_failed(fe, devid, be, e)
                    continue
            rate = vif.rate
            vhost_user = vif.export_kind == EXPORT_VHOST_USER        # served to a VM: its socket and queue pairs
            try:
                add_vif(xs, VifConfig(be.domid, fe.domid, devid, vif.mac, _bridge_of(be, vif), vif.mtu or 1500,
                                      rate.bytes_per_interval if rate else None, rate.interval_us if rate else None,
                                      _ifname(devid), export=self._vif_export(fe, devid, vif) if vhost_user else None,
                                      queues=vif_queues(vif, fe.spec.vm)))
            except XenstoreError as e:
                if only is not None:
                    raise
                if not self._peer_is_gone(e, d, be, fe, _ifname(devid)):
                    self._device_failed(fe, _ifname(devid), be, e)
                continue
            self._record(fe.name, "vif", f"{_ifname(devid)} {vif.mac} on {be.name}")

    def _served_vifs(self, d: SupervisedDomain) -> list[tuple[SupervisedDomain, SupervisedDomain, int, VifSpec]]:
        """(backend, frontend, devid, vif) for every vif ``d`` uses or serves whose two domains have domids."""
        out = []
        for fe in self.domains:
            for devid, vif in _vifs(fe.spec):
                be = self._by_name.get(vif.backend or "")
                if be is None or (d is not fe and d is not be) or fe.domid is None or be.domid is None:
                    continue
                out.append((be, fe, devid, vif))
        return out

    def _plug(self, be: SupervisedDomain, fe: SupervisedDomain, devid: int, vif: VifSpec) -> None:
        """A vif of a bridged netback: its bridge and TAP in netback's namespace, then the TAP's fd offered.

        What the vif-bridge hotplug script does in a Xen driver domain, plus
        the descriptor: netback (no CAP_NET_ADMIN) attaches to a TAP its uid
        owns through a ``/dev/net/tun`` fd opened in its namespace.  Done once
        per netback process and vif (``be.offered``); a netback not running
        now gets the fd right after its next spawn.  Raises TapError,
        NetnsError or OSError.
        """
        assert fe.domid is not None and be.netns is not None
        key = (fe.domid, devid)
        if key in be.offered:
            return
        tap = backend_tap_name(fe.domid, devid)
        bridge = _bridge_of(be, vif)
        assert bridge is not None
        if not netns.exists(be.netns):  # kept across its restarts; made again after a destroy
            netns.create(be.netns)
        if ensure_bridge(be.netns, bridge):
            log.info("made bridge %s in %s's namespace %s", bridge, be.name, be.netns)
        owner = be.uid if be.uid is not None else os.geteuid()
        if ensure_port(be.netns, tap, owner, vif.mtu or 1500, bridge):
            log.info("made %s (vif %d of %s) in %s's namespace, a port of %s", tap, devid, fe.name, be.name, bridge)
        if be.devices is None:
            return
        fd = open_tun(be.netns)
        try:
            offer_fd(be.devices, "tap", key, fd)
        finally:
            os.close(fd)
        be.offered.add(key)
        self._record(be.name, "tap", f"{tap} offered ({fe.name} vif {devid} on {bridge})")

    def _device_failed(self, fe: SupervisedDomain, device: str, be: SupervisedDomain, e: XenstoreError) -> None:
        """One device's nodes could not be written: that device is not set up (until either end restarts),
        the domain's other devices are.  One hostile end (a backend that rewrites its nodes without
        pause, say) costs its own device, not the whole guest, nor the backend's other guests."""
        log.error("%s of %s (on %s): its xenstore nodes could not be written: %s", device, fe.name, be.name, e)
        self._record(fe.name, "device-failed", f"{device} on {be.name}: {e}")
        self._progress(f"{fe.name}: {device} not set up: {e}")

    def _plug_failed(self, fe: SupervisedDomain, devid: int, be: SupervisedDomain, e: Exception) -> None:
        log.error("vif %d of %s is not connected to %s's bridge: %s", devid, fe.name, be.name, e)
        self._progress(f"{fe.name}: vif {devid} not connected: {e}")

    def _forget_vif(self, d: SupervisedDomain, devid: int, vif: VifSpec) -> None:
        """A vif detached (or whose attach failed): out of the guest's spec, both its TAPs gone."""
        d.spec = dataclasses.replace(d.spec, vifs=tuple(v for v in d.spec.vifs if v is not vif))
        self._unplug(d, devid, vif)
        if d.netns is not None:
            try:
                delete_tap(d.netns, _ifname(devid))
            except TapError as e:
                log.warning("%s", e)

    def _unplug(self, fe: SupervisedDomain, devid: int, vif: VifSpec) -> None:
        """A vif going away (detached, or its guest destroyed): its TAP in a bridged netback's namespace goes."""
        be = self._by_name.get(vif.backend or "")
        if be is None or be.switch != NetSwitch.BRIDGE or be.netns is None or fe.domid is None:
            return
        be.offered.discard((fe.domid, devid))
        try:
            delete_tap(be.netns, backend_tap_name(fe.domid, devid))
        except TapError as e:
            log.warning("%s", e)

    def _prepare_vifs(self, d: SupervisedDomain) -> None:
        """The guest's TAP devices, made by us in its namespace (owned by its uid) before it starts."""
        vifs = _tap_vifs(d.spec)
        if not vifs:
            return
        if d.netns is None:
            raise netns.NetnsError("a guest with vifs needs its own network namespace, which needs root and "
                                   "iproute2 (ip)")
        netns.create(d.netns)
        owner = d.uid if d.uid is not None else os.geteuid()
        for devid, vif in vifs:
            if tap_exists(d.netns, _ifname(devid)):
                continue            # a restarted guest finds its interface as it left it
            assert vif.mac is not None
            create_tap(d.netns, _ifname(devid), owner, vif.mac, vif.mtu or 1500, str(vif.ip) if vif.ip else None)

    def _offer_tun(self, d: SupervisedDomain, devid: int) -> None:
        """Hand the running guest a /dev/net/tun descriptor for its new TAP, before the vif's nodes appear."""
        if d.netns is None or d.devices is None:
            return              # not running: it gets one on its command line when it starts
        fd = open_tun(d.netns)
        try:
            offer_fd(d.devices, "vif", devid, fd)
        finally:
            os.close(fd)

    def _prepare_exports(self, d: SupervisedDomain, disks: tuple[DiskSpec, ...] | None = None) -> None:
        """Each export socket's directory is the guest's own, writable by its uid only; stale sockets go away.

        Before the guest starts (all its disks), or for a disk being
        hot-attached.  ``RUN_DIR/exports/GUEST`` and a directory an absolute
        ``export=`` names that does not exist yet are made here (root's, mode
        0700, an ACL entry giving the guest's uid rwx: :func:`private_dir`);
        the latter is removed when the host stops.  An existing directory
        that is not the guest's (owned by its uid) is refused (AccessError):
        giving its uid write access would let the guest replace whatever is
        in it.
        """
        separate = d.uid is not None and self.uid_plan is not None and self.uid_plan.separate
        uid = d.uid if separate else None
        for path in self._export_sockets(d) if disks is None else [self._export_path(d, disk) for disk in disks]:
            folder = os.path.dirname(path)
            own = folder == self.layout.export_dir(d.name)
            if own or self._made_exports.get(folder) == d.name:
                if not os.path.lexists(folder):
                    os.mkdir(folder, 0o700)
                private_dir(folder, uid)
            elif not os.path.lexists(folder):
                make_dirs(os.path.dirname(folder), 0o755)
                os.mkdir(folder, 0o700)
                self._made_exports[folder] = d.name
                private_dir(folder, uid)
                if uid is not None:
                    grant_search(os.path.dirname(folder), uid)
            elif separate:
                st = os.lstat(folder)
                if not stat.S_ISDIR(st.st_mode) or st.st_uid != d.uid:
                    raise AccessError(
                        f"the export directory {folder} already exists and is not {d.name}'s own (owner uid "
                        f"{st.st_uid}, {d.name} runs as uid {d.uid}): giving {d.name} write access to it would let "
                        f"it replace anything in it; name a directory that does not exist yet (xdom makes it "
                        f"{d.name}'s and removes it at xdom down), or give export= a plain socket name "
                        f"({self.layout.export_dir(d.name)}/)")
            unlink_socket(path)
        if disks is None and d.kind == DomainKind.GUEST and not os.path.lexists(self.layout.export_dir(d.name)):
            # Where hot-attached devices' sockets go: it must exist before the guest confines itself (Landlock).
            os.mkdir(self.layout.export_dir(d.name), 0o700)
            private_dir(self.layout.export_dir(d.name), uid)

    @contextmanager
    def _in_netns(self, d: SupervisedDomain) -> Iterator[None]:
        """The domain's process is forked inside its namespace (made on first start, kept across restarts)."""
        if d.netns is None:
            yield
            return
        netns.create(d.netns)
        with netns.entered(d.netns):
            yield

    def _remove_domain_nodes(self, domid: int) -> None:
        if not self._store_up():
            return
        try:
            with self._xs() as xs:
                xs.rm(domain_path(domid))
        except (XenstoreError, OSError, TimeoutError) as e:
            log.warning("removing /local/domain/%d failed: %s", domid, e)

    def _release_down(self, d: SupervisedDomain) -> None:
        """A domain that stays down (its policy, a failure, a destroy) keeps only what restarting it needs:
        its domid in the broker, its logs, and (xenstored) its store.  Its sockets and export directories,
        its device nodes, its TAPs (its own and a bridged netback's for its vifs) and its namespace go;
        starting it again makes them again."""
        if d is self.xenstored or not self._pidfile.held:
            return
        gone = []
        if d.kind == DomainKind.GUEST:
            if d.domid is not None:
                self._release_vbds(d)
                self._release_vifs(d)
                self._remove_domain_nodes(d.domid)
            for path in self._export_sockets(d):
                if os.path.lexists(path):
                    unlink_socket(path)
                    gone.append(path)
            own = self.layout.export_dir(d.name)
            if os.path.isdir(own):
                shutil.rmtree(own, ignore_errors=True)
            for folder, guest in self._made_exports.items():
                if guest == d.name:
                    _remove_made_dir(folder)      # kept in _made_exports: made again, ours, at its next start
        if d.netns is not None and netns.exists(d.netns):
            self._delete_netns(d.netns)           # its TAPs (a bridged netback's bridge) go with it
            gone.append(f"namespace {d.netns}")
        d.offered.clear()
        if gone:
            self._record(d.name, "released", ", ".join(gone))

    def _release_vbds(self, d: SupervisedDomain) -> None:
        """A guest that stays down: its disks' backend nodes go (blkback closes the images), as libxl's."""
        for be, fe, _disk in self._vbds_of(d):
            if fe is not d or be.domid is None or not self._store_up():
                continue
            try:
                with self._xs() as xs:
                    xs.rm(f"/local/domain/{be.domid}/backend/vbd/{d.domid}")
            except XenstoreError as e:
                if e.name != "ENOENT":
                    log.warning("removing %s's disks from %s's backend nodes: %s", d.name, be.name, e)
            except (OSError, TimeoutError) as e:
                log.warning("removing %s's disks from %s's backend nodes: %s", d.name, be.name, e)

    def _release_vifs(self, d: SupervisedDomain) -> None:
        """A destroyed guest's vifs, as libxl's forced device removal: backend nodes gone (netback drops the
        vif), then the vif's TAP in a bridged netback's namespace."""
        if d.domid is None:
            return
        backends = {vif.backend for _, vif in _vifs(d.spec)}
        for be in (self._by_name.get(name or "") for name in sorted(backends, key=str)):
            if be is None or be.domid is None or not self._store_up():
                continue
            try:
                with self._xs() as xs:
                    xs.rm(f"/local/domain/{be.domid}/backend/vif/{d.domid}")
            except (XenstoreError, OSError, TimeoutError) as e:
                log.warning("removing %s's vifs from %s's backend nodes: %s", d.name, be.name, e)
        for devid, vif in _vifs(d.spec):
            self._unplug(d, devid, vif)

    def _refused_attach(self, kind: str, d: SupervisedDomain, devid: int, be: SupervisedDomain,
                        export: str | None = None) -> None:
        """An attach refused because xenstored stopped answering (killed, restarting): its transaction
        may have committed before the reply was lost.  The device's nodes go once xenstored serves again
        (now, if it still does), so a refusal leaves nothing behind."""
        if d.domid is None or be.domid is None:
            return
        self._undo_attach.append((kind, d.name, devid, f"/local/domain/{be.domid}/backend/{kind}/{d.domid}/{devid}",
                                  export))
        if self._store_up():
            self._undo_refused_attaches()

    def _undo_refused_attaches(self) -> None:
        """Remove what refused attaches may have left; a request unanswered keeps the rest for
        xenstored's next start instead of waiting ``XS_TIMEOUT`` on each."""
        pending, self._undo_attach = self._undo_attach, []
        for at, (kind, name, devid, be_path, export) in enumerate(pending):
            d = self._by_name.get(name)
            if d is None or d.domid is None:
                continue
            if any(x.devid == devid for x in d.spec.disks) if kind == "vbd" else \
                    any(i == devid for i, _ in _vifs(d.spec)):
                continue                        # attached again since: its nodes are wanted
            try:
                with self._xs() as xs:
                    for path in (be_path, f"/local/domain/{d.domid}/device/{kind}/{devid}"):
                        try:
                            xs.rm(path)
                        except XenstoreError as e:
                            if e.name != "ENOENT":      # its parent is not there either: nothing to remove
                                raise
                if export is not None:
                    unlink_socket(export)
                log.info("removed what may be left of %s %d of %s, whose attach was refused", kind, devid, name)
            except (TimeoutError, ConnectionError) as e:
                log.warning("removing the nodes of %s %d of %s, whose attach was refused: %s; this and %d more "
                            "retried when xenstored restarts", kind, devid, name, e, len(pending) - at - 1)
                self._undo_attach.extend(pending[at:])
                return
            except (XenstoreError, OSError) as e:
                log.warning("removing the nodes of %s %d of %s, whose attach was refused: %s; retried when "
                            "xenstored restarts", kind, devid, name, e)
                self._undo_attach.append((kind, name, devid, be_path, export))


def _logged(step: Callable[[], Any], what: str) -> None:
    """A step that runs later, with no one to answer: its failure goes to the log."""
    try:
        step()
    except (XenstoreError, OSError, TimeoutError) as e:
        log.error("%s: %s", what, e)


def _vifs(spec: DomainSpec) -> list[tuple[int, VifSpec]]:
    """(devid, vif): libxl numbers a domain's vifs 0, 1, ... unless xl's devid= says otherwise."""
    return vif_devids(spec.vifs)


def _tap_vifs(spec: DomainSpec) -> list[tuple[int, VifSpec]]:
    """The vifs that are TAP devices in the guest's namespace (not a VM's vhost-user NICs)."""
    return [(devid, vif) for devid, vif in vif_devids(spec.vifs) if vif.export_kind is None]


def _backend_tap(be: SupervisedDomain | None, fe: SupervisedDomain, devid: int) -> str | None:
    """The name of the vif's TAP in a bridged netback's namespace, or None (builtin switch, no domid yet)."""
    if be is None or be.switch != NetSwitch.BRIDGE or fe.domid is None:
        return None
    try:
        return backend_tap_name(fe.domid, devid)
    except TapError:
        return None


def _bridge_of(be: SupervisedDomain, vif: VifSpec) -> str | None:
    """The bridge a vif joins: its ``bridge=``, else xdombr0 when its netback bridges; the builtin switch has none."""
    if be.switch == NetSwitch.BRIDGE:
        return vif.bridge or DEFAULT_BRIDGE
    return vif.bridge


def _ifname(devid: int) -> str:
    """The guest-side interface of vif ``devid``: eth0, eth1, ... as a Linux guest names them."""
    return f"eth{devid}"


def _remove_made_dir(path: str) -> None:
    """An export directory this supervisor made outside the run directory goes, with what its guest left in it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
        shutil.rmtree(path, ignore_errors=True)     # follows no symlink