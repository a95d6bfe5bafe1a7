"""The rules of a topology that relate its domains to each other, and the start order they give.

:mod:`xdom.deploy.topology_parse` reads each ``[[domain]]`` table on its
own into a :class:`Draft`; what no single table can tell is checked here,
over all of them at once: names are unique, there is one xenstored when
anyone needs it, every disk and vif has a backend of the right kind, devices
do not collide (vdevs within a guest; MACs, IPs, export sockets and writable
images across the topology), uids are not shared, a VM's log names are free.
Then the missing MACs are generated (after every explicit one is known) and
the drafts become :class:`~xdom.deploy.topology.DomainSpec` in start order.

Like the table checks, these record every problem in the :class:`Checker`
instead of stopping at the first, so one run of ``xdom up`` shows them all.
"""

from __future__ import annotations

import dataclasses
import heapq
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from .export_paths import relative_export_problem, shared_path_problems
from .topology import (
    DEFAULT_FLAP_LIMIT,
    DEFAULT_FLAP_WINDOW,
    DEFAULT_RESTART_BACKOFF,
    START_RANK,
    Checker,
    DomainKind,
    DomainSpec,
    Limits,
    NetSwitch,
    RestartPolicy,
    TopologyError,
    VmConfig,
    bridge_name_problem,
)
from .xl_disk import DiskSpec
from .xl_vif import VifSpec, generate_mac
from .xlcfg import EXPORT_NBD, EXPORT_VHOST_USER, did_you_mean

__all__ = ["VM_LOG_SUFFIXES", "Draft", "check_across", "finish"]

# A VM guest's other logs: STATE_DIR/logs/NAME-vm.log (what QEMU printed) and NAME-console.log (the serial console).
VM_LOG_SUFFIXES = ("-vm", "-console")

_Device = TypeVar("_Device", DiskSpec, VifSpec)


@dataclass
class Draft:
    """A domain while it is being checked; becomes a DomainSpec once the whole file is valid.

    A setting is None when the table does not give it (its default applies)
    or when it was refused (the error is recorded, and no DomainSpec is made).
    """

    index: int
    label: str
    name: str | None
    kind: DomainKind | None
    memory_frames: int | None = None
    restart: RestartPolicy | None = None
    restart_backoff: float | None = None
    flap_limit: int | None = None
    flap_window: float | None = None
    command: tuple[str, ...] | None = None
    workload: tuple[str, ...] | None = None
    limits: Limits | None = None
    uid: int | None = None
    switch: NetSwitch | None = None
    vm: VmConfig | None = None
    has_vm: bool = False        # a [domain.vm] table, valid or not (so the checks that depend on it still run)
    disks: list[DiskSpec] = field(default_factory=list)
    vifs: list[VifSpec] = field(default_factory=list)
    # Positions in the file's disk/vif arrays (entries that failed to parse are absent above).
    disk_at: list[int] = field(default_factory=list)
    vif_at: list[int] = field(default_factory=list)


def check_across(chk: Checker, drafts: list[Draft]) -> None:
    """Every rule between domains; fills in each device's backend and each vif's MAC where it can."""
    by_name: dict[str, Draft] = {}
    for d in drafts:
        if d.name is None:
            continue
        if d.name in by_name:
            chk.error(f"{d.label}.name", f"name {d.name!r} is already used by {by_name[d.name].label}")
        else:
            by_name[d.name] = d
    _check_xenstored(chk, drafts)
    _check_vm_log_names(chk, drafts, by_name)
    _resolve_backends(chk, drafts, by_name)
    _check_devices(chk, drafts)
    _check_uids(chk, drafts)


def _check_xenstored(chk: Checker, drafts: list[Draft]) -> None:
    stores = [d for d in drafts if d.kind == DomainKind.XENSTORED]
    for extra in stores[1:]:
        chk.error(extra.label, f"a second xenstored domain ({stores[0].label} is one); a topology has at most one")
    needy = [d for d in drafts if d.kind in (DomainKind.GUEST, DomainKind.BLKBACK, DomainKind.NETBACK)]
    if needy and not stores:
        chk.error("", f"no xenstored domain, but {needy[0].label} is a {needy[0].kind}: guests and driver "
                      f"domains need one (add a [[domain]] with kind = \"xenstored\")")


def _resolve_backends(chk: Checker, drafts: list[Draft], by_name: Mapping[str, Draft]) -> None:
    """Give every disk and vif its backend domain, checking it is a domain of the right kind."""
    for backend_kind in (DomainKind.BLKBACK, DomainKind.NETBACK):
        serving = [d.name for d in drafts if d.kind == backend_kind and d.name is not None]
        for d in drafts:
            if backend_kind == DomainKind.BLKBACK:
                _give_backends(chk, f"{d.label}.disk", d.disks, d.disk_at, backend_kind, serving, by_name)
            else:
                _give_backends(chk, f"{d.label}.vif", d.vifs, d.vif_at, backend_kind, serving, by_name)


def _give_backends(chk: Checker, key_path: str, devices: list[_Device], positions: list[int],
                   backend_kind: DomainKind, serving: list[str], by_name: Mapping[str, Draft]) -> None:
    """One guest's disks (or vifs) without ``backend=`` get the only domain of ``backend_kind`` (in place)."""
    key = key_path.rsplit(".", 1)[1]
    for j, dev in enumerate(devices):
        where = f"{key_path}[{positions[j]}]"
        if dev.backend is None:
            if len(serving) == 1:
                devices[j] = dataclasses.replace(dev, backend=serving[0])
            elif not serving:
                chk.error(where, f"no {backend_kind} domain in this topology to serve it "
                                 f"(add a [[domain]] with kind = \"{backend_kind}\")")
            else:
                chk.error(where, f"backend= is required: there are {len(serving)} {backend_kind} domains "
                                 f"({', '.join(serving)})")
            continue
        other = by_name.get(dev.backend)
        if other is None:
            chk.error(where, f"backend {dev.backend!r} is not a domain of this topology"
                             f"{did_you_mean(dev.backend, serving)}")
        elif other.kind != backend_kind:
            what = f"is a {other.kind} domain" if other.kind else "is a domain without a valid kind"
            chk.error(where, f"backend {dev.backend!r} {what}; a {key}'s backend must be a {backend_kind}")


def _check_devices(chk: Checker, drafts: list[Draft]) -> None:
    """Per guest: what xdom's blkback can serve, distinct vdevs.  Across the topology:
    distinct MACs, IPs, export sockets and writable images.  Then generate the missing MACs."""
    all_disks: list[tuple[str, str | None, DiskSpec]] = []
    all_vifs: list[tuple[str, str | None, VifSpec]] = []
    macs: dict[str, str] = {}
    ips: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
    for d in drafts:
        devids: dict[int, tuple[int, str]] = {}
        vm, limits = d.vm, d.limits
        if vm is not None and (d.disks or d.vifs) and limits is not None and limits.rss_bytes is not None \
                and limits.rss_bytes <= vm.memory_mib << 20:
            chk.error(f"{d.label}.limits.rss", f"rss {limits.rss_bytes >> 20} MiB is not above the VM's memory "
                                               f"({vm.memory_mib} MiB): the guest domain maps the VM's memory to "
                                               f"serve its vhost-user devices, and its RSS grows toward the VM's "
                                               f"memory as the VM does I/O; raise limits.rss (e.g. vm.memory + 64M)")
        for j, disk in zip(d.disk_at, d.disks):
            where = f"{d.label}.disk[{j}]"
            if disk.format != "raw":
                chk.error(where, f"format {disk.format!r} is not served: xdom's blkback serves raw images only")
            if disk.target is None:
                chk.error(where, "an empty cdrom drive (no target) is not served by xdom's blkback; give a target")
            if disk.devid in devids:
                k, vdev = devids[disk.devid]
                same = "" if vdev == disk.vdev else f" '{vdev}', the same device number {disk.devid}"
                chk.error(where, f"vdev {disk.vdev!r} duplicates disk[{k}]{same}; each disk of a guest needs its "
                                 f"own vdev")
            else:
                devids[disk.devid] = (j, disk.vdev)
            _check_relative_export(chk, where, d, disk.export_path)
            if d.has_vm and disk.export_kind == EXPORT_NBD:
                chk.error(where, f"export=nbd: serves the disk to programs on the host, but {d.name or 'this guest'} "
                                 f"runs a VM ([domain.vm]), which reaches its disks over vhost-user only; write "
                                 f"export=vhost-user:NAME, or leave export= out (VDEV.sock in its export directory)")
            all_disks.append((where, d.name, disk))
        for j, vif in zip(d.vif_at, d.vifs):
            where = f"{d.label}.vif[{j}]"
            _check_relative_export(chk, where, d, vif.export_path)
            if vif.queues is not None and vif.export_kind is None and not d.has_vm:
                chk.error(where, f"queues={vif.queues}: queues are a vhost-user NIC's queue pairs (a VM's, or "
                                 f"export=vhost-user:PATH); this vif is a TAP device, which has one")
            all_vifs.append((where, d.name, vif))
            if vif.bridge is not None and (why := bridge_name_problem(vif.bridge)) is not None:
                chk.error(where, why)
            if vif.mac is not None:
                if vif.mac in macs:
                    chk.error(where, f"mac {vif.mac} is already used by {macs[vif.mac]}")
                else:
                    macs[vif.mac] = where
            if vif.ip is not None:
                if vif.ip.ip in ips:
                    chk.error(where, f"ip {vif.ip.ip} is already used by {ips[vif.ip.ip]}")
                else:
                    ips[vif.ip.ip] = where
    for where, why in shared_path_problems(all_disks, all_vifs):
        chk.error(where, why)
    # Generated MACs come after every explicit one is known, so a generated
    # address never takes one the file spells out.
    for d in drafts:
        for k, (j, vif) in enumerate(zip(d.vif_at, d.vifs)):
            if vif.mac is None and d.name is not None:
                attempt = 0
                while (mac := generate_mac(d.name, j, attempt)) in macs:
                    attempt += 1
                macs[mac] = f"{d.label}.vif[{j}]"
                d.vifs[k] = dataclasses.replace(vif, mac=mac)


def _check_relative_export(chk: Checker, where: str, d: Draft, export: str | None) -> None:
    if (why := relative_export_problem(d.name, export)) is not None:
        chk.error(where, why)


def _check_vm_log_names(chk: Checker, drafts: list[Draft], by_name: Mapping[str, Draft]) -> None:
    """A VM guest's QEMU and console logs are NAME-vm.log and NAME-console.log: no domain may be called so."""
    for d in drafts:
        if d.name is None or not d.has_vm:
            continue
        for suffix in VM_LOG_SUFFIXES:
            other = by_name.get(d.name + suffix)
            if other is not None:
                chk.error(f"{other.label}.name", f"name {other.name!r} is taken by the log of {d.label}'s VM "
                                                 f"(STATE_DIR/logs/{other.name}.log); choose another name")


def _check_uids(chk: Checker, drafts: list[Draft]) -> None:
    """Isolation between domains is by uid: two domains under one uid could open each other's frames."""
    owners: dict[int, str] = {}
    for d in drafts:
        uid = d.uid
        if uid is None:
            continue
        if uid in owners:
            chk.error(f"{d.label}.uid", f"uid {uid} is already used by {owners[uid]}; each domain needs its own uid")
        else:
            owners[uid] = d.label


def finish(drafts: list[Draft], source: str) -> list[DomainSpec]:
    """The domains of a topology ``check_across`` found nothing wrong with, defaulted, in start order."""
    return _start_order([_finish(d) for d in drafts], source)


def _finish(d: Draft) -> DomainSpec:
    if d.name is None or d.kind is None or d.memory_frames is None or d.restart is None:
        raise RuntimeError(f"{d.label} finished without a name, kind, memory or restart policy")  # each an error
    vm = d.vm
    return DomainSpec(
        name=d.name,
        kind=d.kind,
        memory_frames=d.memory_frames,
        restart=d.restart,
        restart_backoff=d.restart_backoff if d.restart_backoff is not None else DEFAULT_RESTART_BACKOFF,
        flap_limit=d.flap_limit if d.flap_limit is not None else DEFAULT_FLAP_LIMIT,
        flap_window=d.flap_window if d.flap_window is not None else DEFAULT_FLAP_WINDOW,
        disks=tuple(dataclasses.replace(disk, export_kind=disk.export_kind or (EXPORT_VHOST_USER if vm else EXPORT_NBD))
                    for disk in d.disks),
        vifs=tuple(dataclasses.replace(vif, export_kind=vif.export_kind or (EXPORT_VHOST_USER if vm else None))
                   for vif in d.vifs),
        command=d.command,
        workload=d.workload,
        limits=d.limits or Limits(),
        uid=d.uid,
        switch=d.switch,
        vm=vm,
        index=d.index,
    )


def _start_order(specs: list[DomainSpec], source: str) -> list[DomainSpec]:
    """Dependency order, ties broken by rank (xenstored, driver domains, the rest) then file order.

    Every domain depends on xenstored, a guest on its devices' backends.  With
    today's kinds the ranks alone already respect those edges; the graph
    keeps the promise "a backend starts before its frontends" should a
    driver domain one day have devices of its own.
    """
    names = {s.name for s in specs}
    store = next((s.name for s in specs if s.kind == DomainKind.XENSTORED), None)
    deps: dict[str, set[str]] = {}
    for s in specs:
        deps[s.name] = {b for b in s.backends if b in names and b != s.name}
        if store is not None and s.name != store:
            deps[s.name].add(store)
    users: dict[str, list[str]] = {s.name: [] for s in specs}
    for name, needs in deps.items():
        for n in needs:
            users[n].append(name)
    key = {s.name: (START_RANK[s.kind], s.index) for s in specs}
    spec_of = {s.name: s for s in specs}
    ready = [(key[n], n) for n, needs in deps.items() if not needs]
    heapq.heapify(ready)
    order: list[DomainSpec] = []
    while ready:
        _, name = heapq.heappop(ready)
        order.append(spec_of[name])
        for user in users[name]:
            deps[user].discard(name)
            if not deps[user]:
                heapq.heappush(ready, (key[user], user))
    if len(order) != len(specs):  # a cycle; impossible while only guests have devices
        stuck = sorted(set(spec_of) - {s.name for s in order})
        raise TopologyError([f"{source}: domains {', '.join(stuck)} depend on each other; no start order exists"])
    return order
