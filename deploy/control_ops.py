"""The control socket's operations: ``xdom ps``/``info``, ``restart``, ``destroy``, ``stop`` and hot-plug.

The fifth layer of the supervisor (``deploy/supervision.py`` lists them):
the handlers ``deploy/control.py`` dispatches requests to, in the loop's
thread.  Restart and destroy are lifecycle events (``deploy/lifecycle.py``);
``block-attach``/``-detach`` and ``network-attach``/``-detach`` are what
``xl`` does: check the request, wire the device (``deploy/devices.py``),
and for a VM guest plug it into the VM too (``deploy/vm/supervised.py``).
Every refusal is a ControlError with an errno and a sentence.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import Any

from xdom.broker.mgmt_client import ManagementError
from xdom.domains.abi.xs_wire import XenstoreError
from xdom.domains.confinement import mode as confinement_mode

from . import netns
from .access import AccessError
from .confined import confinement_of
from .control import ControlError, string_field
from .detaching import Detach
from .devices import DETACH_TIMEOUT, _backend_tap, _bridge_of, _ifname, _logged, _vifs
from .export_paths import export_problem, relative_export_problem
from .lifecycle import Effect, Event, State, step
from .lifecycle_driver import LifecycleDriver
from .process_tree import ProcessTree
from .rundir import unlink_socket
from .supervised_domain import SupervisedDomain
from .tap import TapError
from .topology import DomainKind, bridge_name_problem, vif_queues
from .xl_disk import parse_disk
from .xl_vif import VifSpec, generate_mac, parse_vif
from .xlcfg import EXPORT_NBD, EXPORT_VHOST_USER, XlCfgError
from .xsdevice import ask_to_close, remove_nodes

__all__ = ["ControlOps"]

log = logging.getLogger("xdom.supervisor")


class ControlOps(LifecycleDriver):
    """The control operations (see the module's docstring)."""

    def status(self) -> list[dict[str, Any]]:
        """One row per domain, as ``xdom ps --json`` prints it (call from the loop's thread)."""
        broker: dict[int, dict[str, Any]] = {}
        if self.mgmt is not None:
            try:
                broker = {s["domid"]: s for s in self.mgmt.request("list")["domains"]}
            except (ManagementError, TimeoutError) as e:
                log.warning("the broker did not list its domains: %s", e)
        tree: ProcessTree | None = None         # read once, and only if some domain has no sample yet
        for d in self.domains:
            if d.sample is None and d.state in (State.STARTING, State.RUNNING) and d.pidfd >= 0:
                tree = tree or ProcessTree()
                d.sample = self._sample(d, tree)
        return [self._row(d, broker.get(d.domid) if d.domid is not None else None) for d in self.domains]

    def _row(self, d: SupervisedDomain, b: dict[str, Any] | None) -> dict[str, Any]:
        b = b or {}
        alive = d.phase.has_process and d.pidfd >= 0
        s = d.sample
        row: dict[str, Any] = {
            "name": d.name, "domid": d.domid, "kind": str(d.kind), "state": str(d.state),
            "domain_state": b.get("state"), "pid": d.pid, "uid": d.uid if d.uid is not None else os.geteuid(),
            "connected": d.connected, "restarts": max(0, d.generation - 1), "generation": d.generation,
            "restart_policy": str(d.spec.restart), "state_changes": d.changes,
            "uptime": round(time.monotonic() - d.started_mono, 3) if alive else 0.0,
            "rss": s.rss if s and alive else None, "fds": s.fds if s and alive else None,
            "cpu_percent": round(s.cpu_percent, 1) if s and alive else None,
            "memory_kib": d.spec.memory_bytes >> 10, "populated_kib": b.get("populated_kib"),
            "mappings_held": b.get("mappings_held"), "grants_mapped_by_others": b.get("grants_mapped_by_others"),
            "grant_frames": b.get("grant_frames"), "event_channels": b.get("event_channels"),
            "last_exit": d.last_exit or None, "log": self.layout.log_path(d.name),
            "netns": d.netns, "confinement": confinement_of(d.pid if alive else None, d.confinement),
            "devices": [
                {"type": "vbd", "vdev": disk.vdev, "devid": disk.devid, "backend": disk.backend,
                 "target": disk.target, "mode": disk.mode, "export": self._export_path(d, disk),
                 "export_kind": disk.export_kind}
                for disk in d.spec.disks] + [
                {"type": "vif", "devid": devid, "ifname": _ifname(devid) if vif.export_kind is None else None,
                 "mac": vif.mac, "backend": vif.backend, "ip": str(vif.ip) if vif.ip else None,
                 "mtu": vif.mtu or 1500, "export_kind": vif.export_kind or "tap",
                 "export": self._vif_export(d, devid, vif) if vif.export_kind == EXPORT_VHOST_USER else None}
                for devid, vif in _vifs(d.spec)],
        }
        if d.kind == DomainKind.GUEST:
            row["vm"] = self.vms.row(d)
            row["detaching"], row["detached"] = self.detaches.of(d.name)
        if d.kind == DomainKind.NETBACK:
            # The vifs it serves; bridged, each with its bridge and its TAP in this domain's namespace.
            row["switch"] = str(d.switch)
            row["vifs"] = [
                {"frontend": fe.name, "frontend_domid": fe.domid, "devid": devid, "mac": vif.mac,
                 "bridge": _bridge_of(d, vif), "tap": _backend_tap(d, fe, devid)}
                for fe in self.domains for devid, vif in _vifs(fe.spec) if vif.backend == d.name]
        return row

    def _relative_export(self, d: SupervisedDomain, export: str) -> str:
        """A hot-attached device's relative ``export=``: a socket name in the guest's own directory, by the
        topology's rule (export_paths.relative_export_problem)."""
        why = relative_export_problem(d.name, export)
        if why is not None:
            raise ControlError.of(errno.EINVAL, why)
        return os.path.join(self.layout.export_dir(d.name), os.path.normpath(export))

    def _domain_named(self, req: dict[str, Any]) -> SupervisedDomain:
        name = string_field(req, "name")
        d = self._by_name.get(name)
        if d is None:
            raise ControlError.of(errno.ESRCH, f"no domain named {name!r:.70} in this host "
                                               f"(domains: {', '.join(self._by_name)})")
        return d

    def _op_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "phase": self.phase, "topology": os.path.abspath(self.topology.source),
                "state_dir": self.layout.state_dir, "run_dir": self.layout.run_dir,
                "broker_pid": self.broker.proc.pid if self.broker else None, "adopted": self.adopted,
                "keeper_pid": self._keeper_proc.pid if self._keeper_proc is not None else None,
                "uids": "separate" if self.uid_plan and self.uid_plan.separate else "shared",
                "xenstored_socket": self.layout.xenstored_link if self.xenstored else None}

    def _op_ps(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"domains": self.status(), **self._op_ping(req)}

    def _op_info(self, req: dict[str, Any]) -> dict[str, Any]:
        d = self._domain_named(req)
        rows = self.status()
        return {"domain": rows[self.domains.index(d)]}

    def _op_restart(self, req: dict[str, Any]) -> dict[str, Any]:
        d = self._domain_named(req)
        if self.phase != "running":
            raise ControlError.of(errno.EBUSY, f"the host is {self.phase}; try again once it is running")
        generation = d.generation
        if Effect.REFUSE_BUSY in step(d.phase, Event.RESTART).effects:
            raise ControlError.of(errno.EBUSY, f"domain {d.name} is being destroyed")
        d.tracker.reset()
        self.vms.restart_requested(d)
        log.info("%s domain %s on request", "restarting" if d.phase.has_process else "starting", d.name)
        self._fire(d, Event.RESTART, "restart requested")
        return {"generation": generation}

    def _op_destroy(self, req: dict[str, Any]) -> dict[str, Any]:
        d = self._domain_named(req)
        if self.phase != "running":
            raise ControlError.of(errno.EBUSY, f"the host is {self.phase}; try again once it is running")
        if d is self.xenstored:
            raise ControlError.of(errno.EBUSY, f"{d.name} is the xenstore domain, which every other domain "
                                               f"needs; stop the whole host with xdom down")
        if d.state == State.DESTROYED:
            return {}
        log.info("destroying domain %s on request", d.name)
        self._fire(d, Event.DESTROY, "destroyed")
        return {}

    def _op_stop(self, req: dict[str, Any]) -> dict[str, Any]:
        log.info("stop requested over the control channel")
        self.request_stop()
        return {"pid": os.getpid()}

    def _guest_for_devices(self, req: dict[str, Any]) -> SupervisedDomain:
        d = self._domain_named(req)
        if self.phase != "running":
            raise ControlError.of(errno.EBUSY, f"the host is {self.phase}; try again once it is running")
        if d.kind != DomainKind.GUEST:
            raise ControlError.of(errno.EINVAL, f"{d.name} is a {d.kind} domain; disks attach to guests")
        if d.state != State.RUNNING or d.domid is None:
            raise ControlError.of(errno.EBUSY, f"{d.name} is {d.state}; disks attach to a running guest")
        if (why := self.vms.devices_problem(d)) is not None:      # a VM's: hot-plugged over QMP (vm/supervised.py)
            raise ControlError.of(errno.EBUSY, why)
        return d

    def _device_backend(self, name: str | None, kind: DomainKind) -> SupervisedDomain:
        """The running backend a device names, or else this host's only one of ``kind``."""
        if name is None:
            backends = [b.name for b in self.domains if b.kind == kind]
            if len(backends) != 1:
                raise ControlError.of(errno.EINVAL, f"say backend=NAME: this host has {len(backends)} {kind} domains")
            name = backends[0]
        be = self._by_name.get(name)
        if be is None or be.kind != kind:
            raise ControlError.of(errno.EINVAL, f"backend {name!r} is not a {kind} domain of this host")
        if be.state != State.RUNNING:
            raise ControlError.of(errno.EBUSY, f"backend {be.name} is {be.state}")
        return be

    def _op_block_attach(self, req: dict[str, Any]) -> dict[str, Any]:
        """``xl block-attach``: add a disk to a running guest; it stays in the guest's spec across restarts."""
        d = self._guest_for_devices(req)
        spec = string_field(req, "disk")
        try:
            disk = parse_disk(spec)
        except XlCfgError as e:
            raise ControlError.of(errno.EINVAL, str(e)) from None
        be = self._device_backend(disk.backend, DomainKind.BLKBACK)
        disk = dataclasses.replace(disk, backend=be.name)
        if any(x.devid == disk.devid for x in d.spec.disks):
            raise ControlError.of(errno.EEXIST, f"{d.name} already has a disk at {disk.vdev}")
        if disk.target is None:
            raise ControlError.of(errno.EINVAL, "an empty drive has nothing to attach")
        target = disk.target if os.path.isabs(disk.target) else os.path.join(self.layout.state_dir, disk.target)
        export = disk.export_path
        if export is not None and not os.path.isabs(export):
            export = self._relative_export(d, export)
        if export is not None:
            export = os.path.normpath(export)
            why = export_problem(d.name, export, self.layout.run_dir, self.layout.state_dir,
                                 [(g.name, self._export_path(g, x)) for g in self.domains for x in g.spec.disks],
                                 [x.target for g in self.domains for x in g.spec.disks if x.target is not None]
                                 + [target])
            if why is not None:
                raise ControlError.of(errno.EINVAL, why)
        kind = disk.export_kind or (EXPORT_VHOST_USER if d.spec.vm is not None else EXPORT_NBD)
        if d.spec.vm is not None and kind != EXPORT_VHOST_USER:
            raise ControlError.of(errno.EINVAL, f"export={kind}: {d.name} runs a VM, which reaches its disks over "
                                                f"vhost-user only; leave export= out or write export=vhost-user:NAME")
        target = os.path.normpath(target)
        disk = dataclasses.replace(disk, target=target, export_path=export, export_kind=kind)
        try:
            st = os.stat(target)
        except OSError as e:
            raise ControlError.of(errno.ENOENT, f"{target}: {e.strerror}") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ControlError.of(errno.EINVAL, f"{target} is neither a file nor a block device")
        path = self._export_path(d, disk)
        if any(self._export_path(g, x) == path for g in self.domains for x in g.spec.disks):
            raise ControlError.of(errno.EEXIST, f"export socket {path} is already in use")
        dirs = d.export_dirs()
        if os.path.dirname(path) not in dirs and confinement_mode() != "off":
            raise ControlError.of(errno.EACCES, f"{d.name} is confined to export sockets in {', '.join(sorted(dirs))}"
                                                f"; put {disk.vdev} in its topology to export it elsewhere")
        plug = self.vms.plug_disk(d, disk, path)         # a VM's disk: into the VM once served (vm/supervised.py)
        d.spec = dataclasses.replace(d.spec, disks=(*d.spec.disks, disk))
        try:
            self._prepare_exports(d, (disk,))
            with self._xs() as xs:
                self._write_devices(xs, d, only=disk)
        except (XenstoreError, OSError, TimeoutError, AccessError) as e:
            self.vms.forget_plug(d, plug.get("device", ""))
            d.spec = dataclasses.replace(d.spec, disks=tuple(x for x in d.spec.disks if x is not disk))
            if not isinstance(e, (XenstoreError, AccessError)):      # xenstored may have committed them
                self._refused_attach("vbd", d, disk.devid, be, self._export_path(d, disk))
            raise ControlError.of(errno.EIO, f"attaching {disk.vdev} to {d.name}: {e}") from None
        log.info("attached %s (%s) to %s on %s", disk.vdev, disk.target, d.name, be.name)
        return {"vdev": disk.vdev, "devid": disk.devid, "export": path, "backend": be.name, "export_kind": kind,
                **({"vm": plug} if plug else {})}

    def _op_block_detach(self, req: dict[str, Any]) -> dict[str, Any]:
        """``xl block-detach``: the backend closes, the guest lets go, then the nodes go -- followed from the
        loop, not waited for in it (``deploy/detaching.py``); ``xdom block-detach`` waits for the end."""
        d = self._guest_for_devices(req)
        which = string_field(req, "vdev")
        disk = next((x for x in d.spec.disks if x.vdev == which or str(x.devid) == which), None)
        if disk is None:
            raise ControlError.of(errno.ENODEV, f"{d.name} has no disk {which!r:.40} "
                                                f"(disks: {', '.join(x.vdev for x in d.spec.disks) or 'none'})")
        if self.detaches.pending(d.name, disk.vdev):
            raise ControlError.of(errno.EBUSY, f"{disk.vdev} of {d.name} is being detached already")
        be = self._by_name.get(disk.backend or "")

        def forget(closed: bool) -> None:
            d.spec = dataclasses.replace(d.spec, disks=tuple(x for x in d.spec.disks if x is not disk))
            unlink_socket(self._export_path(d, disk))
            log.info("detached %s from %s%s", disk.vdev, d.name, "" if closed else " (the backend did not confirm)")

        def begin() -> bool:
            return self._begin_detach(d, disk.vdev, "vbd", be, disk.devid, forget)
        # A VM's disk leaves the VM first (device_del, answered when its kernel let go): the rest follows then.
        pending = self.vms.unplug_disk(d, disk, lambda: _logged(begin, f"detaching {disk.vdev} from {d.name}"))
        if pending is not None:
            return {"vdev": disk.vdev, "clean": None, "vm": pending}
        try:
            return {"vdev": disk.vdev, "clean": None, "detaching": True} if begin() else \
                {"vdev": disk.vdev, "clean": False}
        except (XenstoreError, OSError, TimeoutError) as e:
            raise ControlError.of(errno.EIO, f"detaching {disk.vdev} from {d.name}: {e}") from None

    def _begin_detach(self, d: SupervisedDomain, key: str, kind: str, be: SupervisedDomain | None, devid: int,
                      forget: Callable[[bool], None]) -> bool:
        """Ask the backend to close ``d``'s device and have the loop follow it (True); or, with no backend
        nodes to close, remove what there is and ``forget`` it now (False)."""
        if be is not None and be.domid is not None and d.domid is not None:
            with self._xs() as xs:
                if ask_to_close(xs, kind, be.domid, d.domid, devid):
                    self.detaches.add(Detach(d.name, key, kind, be.domid, d.domid, devid,
                                             time.monotonic() + DETACH_TIMEOUT, forget))
                    return True
                remove_nodes(xs, kind, be.domid, d.domid, devid)
        forget(False)
        return False

    def _op_network_attach(self, req: dict[str, Any]) -> dict[str, Any]:
        """``xl network-attach``: a new vif on a running guest: its TAP in the guest's namespace, then the nodes."""
        d = self._guest_for_devices(req)
        try:
            vif = parse_vif(string_field(req, "vif"))
        except XlCfgError as e:
            raise ControlError.of(errno.EINVAL, str(e)) from None
        be = self._device_backend(vif.backend, DomainKind.NETBACK)
        vif = dataclasses.replace(vif, backend=be.name)
        if vif.bridge is not None and (why := bridge_name_problem(vif.bridge)) is not None:
            raise ControlError.of(errno.EINVAL, why)
        used = {devid for devid, _ in _vifs(d.spec)}
        devid = max(used, default=-1) + 1
        if vif.mac is None:
            taken = {v.mac for g in self.domains for v in g.spec.vifs}
            attempt = 0
            while (mac := generate_mac(d.name, devid, attempt)) in taken:
                attempt += 1
            vif = dataclasses.replace(vif, mac=mac)
        elif any(v.mac == vif.mac for g in self.domains for v in g.spec.vifs):
            raise ControlError.of(errno.EEXIST, f"MAC {vif.mac} is already in use on this host")
        vif = dataclasses.replace(vif, extra={**vif.extra, "devid": str(devid)})
        vif, export = self._vhost_user_vif(d, devid, vif)     # a VM's NIC, or a vif served to a VMM: its socket
        plug = self.vms.plug_nic(d, devid, vif, export) if export is not None else {}   # into the VM once served
        d.spec = dataclasses.replace(d.spec, vifs=(*d.spec.vifs, vif))
        try:
            self._prepare_vifs(d)
            if export is None:
                self._offer_tun(d, devid)
            with self._xs() as xs:
                self._write_vifs(xs, d, only=devid)
        except (netns.NetnsError, TapError, XenstoreError, OSError, TimeoutError) as e:
            self.vms.forget_plug(d, plug.get("device", ""))
            self._forget_vif(d, devid, vif)
            if isinstance(e, (ConnectionError, TimeoutError)):         # xenstored may have committed them
                self._refused_attach("vif", d, devid, be)
            raise ControlError.of(errno.EIO, f"attaching a vif to {d.name}: {e}") from None
        log.info("attached vif %d (%s) to %s on %s", devid, vif.mac, d.name, be.name)
        return {"devid": devid, "ifname": _ifname(devid) if export is None else None, "mac": vif.mac,
                "backend": be.name, "ip": str(vif.ip) if vif.ip else None, "netns": d.netns,
                "bridge": _bridge_of(be, vif), "backend_tap": _backend_tap(be, d, devid), "export": export,
                **({"queues": vif_queues(vif, d.spec.vm)} if export is not None else {}),
                **({"vm": plug} if plug else {})}

    def _vhost_user_vif(self, d: SupervisedDomain, devid: int, vif: VifSpec) -> tuple[VifSpec, str | None]:
        """A vif being attached to ``d``: a VM's is vhost-user-net on a socket in the guest's export
        directory (or where its ``export=`` says, within the directories its Landlock rules allow); its
        socket, or None for a TAP vif."""
        kind = vif.export_kind or (EXPORT_VHOST_USER if d.spec.vm is not None else None)
        if kind is None:
            if vif.queues is not None:
                raise ControlError.of(errno.EINVAL, f"queues={vif.queues}: queues are a vhost-user NIC's queue pairs; "
                                                    f"this vif is a TAP device, which has one")
            return vif, None
        export = vif.export_path
        if export is not None and not os.path.isabs(export):
            export = self._relative_export(d, export)
        vif = dataclasses.replace(vif, export_kind=kind, export_path=os.path.normpath(export) if export else None)
        path = self._vif_export(d, devid, vif)
        if path in self._export_sockets_of_host():
            raise ControlError.of(errno.EEXIST, f"export socket {path} is already in use")
        dirs = d.export_dirs()
        if os.path.dirname(path) not in dirs and confinement_mode() != "off":
            raise ControlError.of(errno.EACCES, f"{d.name} is confined to export sockets in {', '.join(sorted(dirs))}"
                                                f"; leave export= out (its socket then goes in "
                                                f"{self.layout.export_dir(d.name)}/)")
        unlink_socket(path)            # a stale one would look served
        return vif, path

    def _op_network_detach(self, req: dict[str, Any]) -> dict[str, Any]:
        """``xl network-detach``: by devid or MAC; the backend closes, the guest lets go, nodes and TAP go."""
        d = self._guest_for_devices(req)
        which = string_field(req, "vif").lower()
        found = next(((devid, v) for devid, v in _vifs(d.spec) if str(devid) == which or v.mac == which), None)
        if found is None:
            raise ControlError.of(errno.ENODEV, f"{d.name} has no vif {which!r:.40} (vifs: "
                                                f"{', '.join(f'{i} {v.mac}' for i, v in _vifs(d.spec)) or 'none'})")
        devid, vif = found
        if self.detaches.pending(d.name, str(devid)):
            raise ControlError.of(errno.EBUSY, f"vif {devid} of {d.name} is being detached already")
        be = self._by_name.get(vif.backend or "")

        def forget(closed: bool) -> None:
            self._forget_vif(d, devid, vif)
            if vif.export_kind == EXPORT_VHOST_USER:
                unlink_socket(self._vif_export(d, devid, vif))
            log.info("detached vif %d from %s%s", devid, d.name, "" if closed else " (the backend did not confirm)")

        def begin() -> bool:
            return self._begin_detach(d, str(devid), "vif", be, devid, forget)
        # A VM's NIC leaves the VM first (device_del, answered when its kernel let go): the rest follows then.
        pending = self.vms.unplug_nic(d, devid, lambda: _logged(begin, f"detaching vif {devid} from {d.name}"))
        if pending is not None:
            return {"devid": devid, "clean": None, "vm": pending}
        try:
            return {"devid": devid, "clean": None, "detaching": True} if begin() else {"devid": devid, "clean": False}
        except (XenstoreError, OSError, TimeoutError) as e:
            raise ControlError.of(errno.EIO, f"detaching vif {devid} from {d.name}: {e}") from None
