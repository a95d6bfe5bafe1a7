"""Hot-plug into a running VM: ``xdom block-attach``/``-detach`` and ``network-attach``/``-detach`` of a VM guest.

The first layer of the VM supervisor (``deploy/vm/supervised.py`` builds on
it).  A device is added once its guest domain serves the device's socket
(polled, bounded by :data:`PLUG_TIMEOUT`), over QMP (chardev, netdev,
device_add on a free PCIe root port); it is removed with ``device_del``,
answered once the VM's kernel let go, and only then is the toolstack's
teardown of the device run.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import Any

from ..control import ControlError
from ..topology import VmConfig, vif_queues
from ..xl_disk import DiskSpec
from ..xl_vif import VifSpec
from .qemu import VhostUserBlk, VhostUserNet, after_unplug, boot_port, hotplug_blk, hotplug_net, unplug_device_id
from .records import _ALIVE, PlugState, VmState, _Plug, _Vm

__all__ = ["HOTPLUG_SLOTS", "PLUG_TIMEOUT", "VmHotplug"]

log = logging.getLogger("xdom.supervisor")

HOTPLUG_SLOTS = 4           # empty PCIe root ports a VM keeps for hot-added disks and NICs
PLUG_TIMEOUT = 60.0         # seconds the guest domain has to serve a hot-added device's socket
SOCKET_POLL = 0.05          # seconds between looks for that socket


class VmHotplug:
    """Hot-plug steps of the VMs in :attr:`vms` (see the module's docstring)."""

    vms: dict[str, _Vm]
    _record: Callable[[str, str, str], None]

    def _of(self, d: Any) -> _Vm | None:
        return self.vms.get(d.name) if d.spec.vm is not None else None

    # ---- hot-plug: xdom block-attach/-detach, network-attach/-detach on a VM guest --------------------
    #
    # Attach: the toolstack writes the device's nodes as for any guest; the guest domain connects
    # blkfront/netfront and serves the device on a new vhost-user socket; once that socket is there the
    # device is added to the running VM over QMP (a chardev with reconnect, the netdev for a NIC, then
    # device_add on a free root port).  Detach: device_del; once the VM's kernel let go (DEVICE_DELETED)
    # the netdev and the chardev go, then the toolstack's xenbus teardown (``done``).  Nothing here waits:
    # the client follows a device's ``plug`` state in ``xdom ps``.  A VM not running now gets the device
    # on its command line when it starts (every device of the guest's spec is).

    def devices_problem(self, d: Any) -> str | None:
        """Why ``d``'s devices cannot change now (its VM is starting or stopping), None when they can."""
        vm = self._of(d)
        if vm is not None and vm.state in (VmState.STARTING, VmState.STOPPING):
            return f"the VM of {vm.name} is {vm.state}; add or remove its devices once it runs (or is down)"
        return None

    def plug_disk(self, d: Any, disk: Any, sock: str) -> dict[str, Any]:
        """A disk is being attached to ``d`` (its nodes are written next): into its VM once served on
        ``sock``.  Returns the reply's ``vm`` part; raises ControlError (nothing done) when it cannot be."""
        vm = self._of(d)
        if vm is None:
            return {}
        dev = vm_disk(sock, disk, vm.config)
        return self._plug(vm, "blk", _qemu_id(disk.vdev), sock,
                          lambda bus: hotplug_blk(dev, _qemu_id(disk.vdev), bus, 1))

    def plug_nic(self, d: Any, devid: int, vif: Any, sock: str) -> dict[str, Any]:
        """:meth:`plug_disk` for a vif: a virtio-net NIC on vhost-user-net."""
        vm = self._of(d)
        if vm is None:
            return {}
        nic = vm_nic(sock, devid, vif, vm.config)
        accel = vm.plan.accel
        return self._plug(vm, "net", f"vif{devid}", sock,
                          lambda bus: hotplug_net(nic, f"vif{devid}", accel, bus, 1))

    def forget_plug(self, d: Any, dev_id: str) -> None:
        """The attach did not happen after all (its nodes could not be written): its slot is free again."""
        vm = self._of(d)
        plug = vm.plugs.get(dev_id) if vm is not None else None
        if vm is not None and plug is not None and plug.state == PlugState.WAITING:
            del vm.plugs[dev_id]
            vm.free_ports.insert(0, plug.bus)

    def unplug_disk(self, d: Any, disk: Any, done: Callable[[], None]) -> dict[str, Any] | None:
        return self.unplug(d, _qemu_id(disk.vdev), done)

    def unplug_nic(self, d: Any, devid: int, done: Callable[[], None]) -> dict[str, Any] | None:
        return self.unplug(d, f"vif{devid}", done)

    def unplug(self, d: Any, dev_id: str, done: Callable[[], None]) -> dict[str, Any] | None:
        """A device of ``d`` is being detached: out of its VM first.  None when its VM is not running
        (nothing to do there: the caller tears it down now); else the reply's ``vm`` part, and ``done`` is
        called once the VM let go of it.  Raises ControlError when it cannot be removed now."""
        vm = self._of(d)
        if vm is None or vm.state != VmState.RUNNING:
            return None
        if vm.qmp is None:
            raise ControlError.of(errno.EAGAIN, f"the VM of {vm.name} runs but its QMP socket is not connected yet: "
                                                f"{dev_id} cannot be taken out of it now; try again")
        plug = vm.plugs.get(dev_id)
        if plug is not None and plug.state in (PlugState.WAITING, PlugState.ADDING):
            raise ControlError.of(errno.EBUSY, f"{dev_id} is still being added to the VM of {vm.name}; detach it "
                                               f"once it is there (xdom ps shows its plug state)")
        if plug is not None and plug.state == PlugState.REMOVING:
            plug.done = done
            return {"device": dev_id, "plug": plug.row()}
        kind = "net" if dev_id.startswith("vif") else "blk"
        if plug is None or plug.state == PlugState.FAILED:
            plug = _Plug(kind, dev_id, "", plug.bus if plug is not None else boot_port(dev_id), PlugState.REMOVING)
        plug.state, plug.error, plug.done = PlugState.REMOVING, "", done
        vm.plugs[dev_id] = plug
        self._record(vm.name, "vm-unplug", dev_id)
        vm.qmp.send("device_del", lambda msg: self._unplug_answered(vm, plug, msg), id=unplug_device_id(kind, dev_id))
        return {"device": dev_id, "plug": plug.row()}

    def _plug(self, vm: _Vm, kind: str, dev_id: str, sock: str,
              commands: Callable[[str], list[tuple[str, dict[str, Any]]]]) -> dict[str, Any]:
        if vm.state != VmState.RUNNING:
            return {"device": dev_id, "plug": None, "at_start": True}
        if vm.qmp is None:
            raise ControlError.of(errno.EAGAIN, f"the VM of {vm.name} runs but its QMP socket is not connected yet: "
                                                f"{dev_id} cannot be added to it now; try again")
        old = vm.plugs.get(dev_id)
        if old is not None and old.state != PlugState.FAILED:
            raise ControlError.of(errno.EBUSY, f"{dev_id} is {old.state} in the VM of {vm.name}")
        if not vm.free_ports:
            raise ControlError.of(errno.ENOSPC, f"the VM of {vm.name} has no free PCIe slot for {dev_id}: it keeps "
                                                f"{HOTPLUG_SLOTS} for hot-added devices and each device removed frees "
                                                f"one (its next start gives every device a slot of its own)")
        bus = old.bus if old is not None else vm.free_ports.pop(0)
        now = time.monotonic()
        plug = _Plug(kind, dev_id, sock, bus, PlugState.WAITING, commands(bus), poll_at=now + SOCKET_POLL,
                     give_up=now + PLUG_TIMEOUT)
        vm.plugs[dev_id] = plug
        self._record(vm.name, "vm-plug", f"{dev_id} on {bus} once {sock} is served")
        return {"device": dev_id, "plug": plug.row()}

    def _plug_poll(self, vm: _Vm, plug: _Plug, now: float) -> None:
        """WAITING: the socket is there (the guest domain's blkfront/netfront connected): add the device."""
        plug.poll_at = None
        try:
            served = stat.S_ISSOCK(os.stat(plug.socket).st_mode)
        except OSError:
            served = False
        if not served:
            if now < plug.give_up:
                plug.poll_at = now + SOCKET_POLL
            else:
                self._plug_failed(vm, plug, f"the guest domain did not serve {plug.socket} within "
                                            f"{PLUG_TIMEOUT:g}s (see its log: xdom logs {vm.name})")
            return
        plug.state = PlugState.ADDING
        self._plug_next(vm, plug, [])

    def _plug_next(self, vm: _Vm, plug: _Plug, sent: list[tuple[str, dict[str, Any]]]) -> None:
        """Send the next add command; each is sent once the one before succeeded."""
        if plug.state != PlugState.ADDING or vm.plugs.get(plug.dev_id) is not plug:
            return
        if len(sent) == len(plug.commands):
            plug.state = PlugState.PRESENT
            self._record(vm.name, "vm-plugged", f"{plug.dev_id} on {plug.bus}")
            log.info("the VM of %s: %s added (%s)", vm.name, plug.dev_id, plug.socket)
            return
        command, args = plug.commands[len(sent)]

        def answered(msg: dict[str, Any]) -> None:
            if "error" in msg:
                self._plug_failed(vm, plug, f"QMP {command}: {_qmp_error(msg)}")
                for undo, undo_args in _undo(sent):
                    if vm.qmp is not None:
                        vm.qmp.send(undo, lambda _msg: None, **undo_args)
            else:
                self._plug_next(vm, plug, sent + [(command, args)])
        if vm.qmp is None or not vm.qmp.send(command, answered, **args):
            self._plug_failed(vm, plug, "QEMU's QMP connection is gone")

    def _plug_failed(self, vm: _Vm, plug: _Plug, why: str) -> None:
        plug.state, plug.error, plug.poll_at = PlugState.FAILED, why, None
        log.error("the VM of %s: cannot add %s: %s", vm.name, plug.dev_id, why)
        self._record(vm.name, "vm-plug-failed", f"{plug.dev_id}: {why}"[:200])

    def _unplug_answered(self, vm: _Vm, plug: _Plug, msg: dict[str, Any]) -> None:
        if "error" not in msg or plug.state != PlugState.REMOVING:
            return                   # accepted: DEVICE_DELETED follows once the VM's kernel let go
        why = _qmp_error(msg)
        if "not found" in why.lower():
            self._unplugged(vm, plug)            # already gone (QEMU restarted without it, say)
            return
        plug.state, plug.error = PlugState.FAILED, f"QMP device_del: {why}"
        plug.done = None
        log.error("the VM of %s: cannot remove %s: %s", vm.name, plug.dev_id, why)
        self._record(vm.name, "vm-unplug-failed", f"{plug.dev_id}: {why}"[:200])

    def _unplugged(self, vm: _Vm, plug: _Plug) -> None:
        """The VM let go of the device: its netdev and chardev go, its slot is free, the teardown goes on."""
        if vm.plugs.get(plug.dev_id) is not plug:
            return
        del vm.plugs[plug.dev_id]
        if vm.qmp is not None:
            for command, args in after_unplug(plug.kind, plug.dev_id):
                vm.qmp.send(command, lambda _msg: None, **args)
        if plug.bus not in vm.free_ports:
            vm.free_ports.append(plug.bus)
        self._record(vm.name, "vm-unplugged", plug.dev_id)
        log.info("the VM of %s: %s removed", vm.name, plug.dev_id)
        done, plug.done = plug.done, None
        if done is not None:
            done()

    def _plugs_at_exit(self, vm: _Vm, teardown: bool) -> None:
        """QEMU is gone, and its devices with it: a removal under way is complete (``teardown``: its
        toolstack half goes on now), anything being added is on the next QEMU's command line."""
        plugs, vm.plugs = list(vm.plugs.values()), {}
        vm.free_ports = []
        for plug in plugs:
            done, plug.done = plug.done, None
            if plug.state == PlugState.REMOVING and done is not None and teardown:
                done()

    @staticmethod
    def _plug_state(vm: _Vm, dev_id: str) -> dict[str, Any]:
        """A device's hot-plug state: its step under way (or failed), else present while QEMU runs."""
        plug = vm.plugs.get(dev_id)
        if plug is not None:
            return plug.row()
        alive = vm.state in _ALIVE
        return {"state": "present" if alive else "at-start", "error": None, "bus": boot_port(dev_id) if alive else None}


def _qmp_error(msg: dict[str, Any]) -> str:
    err = msg.get("error")
    if isinstance(err, dict):
        return str(err.get("desc") or err.get("class") or err)[:300]
    return str(err)[:300]


def _undo(sent: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """What takes back the add commands that succeeded before one failed, last first."""
    out: list[tuple[str, dict[str, Any]]] = []
    for command, args in reversed(sent):
        if command == "chardev-add":
            out.append(("chardev-remove", {"id": args["id"]}))
        elif command == "netdev_add":
            out.append(("netdev_del", {"id": args["id"]}))
    return out


def _qemu_id(vdev: str) -> str:
    """A QEMU device id from a vdev (xvda, hdc, d1p2: already letters and digits, starting with a letter)."""
    return "".join(ch for ch in vdev if ch.isalnum()) or "disk"


def vm_disk(sock: str, disk: DiskSpec, cfg: VmConfig) -> VhostUserBlk:
    """A disk's vhost-user-blk device in a VM, the same whether the VM boots with it or it is hot-plugged."""
    return VhostUserBlk(sock, num_queues=cfg.cpus, id=_qemu_id(disk.vdev))


def vm_nic(sock: str, devid: int, vif: VifSpec, cfg: VmConfig) -> VhostUserNet:
    """:func:`vm_disk` for a vif: its virtio-net NIC on vhost-user-net."""
    if vif.mac is None:       # the topology gives every vif a MAC before anything is planned
        raise ValueError(f"vif {devid} has no MAC")
    return VhostUserNet(sock, vif.mac, queues=vif_queues(vif, cfg), id=f"vif{devid}")
