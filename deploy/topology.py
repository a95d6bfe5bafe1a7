"""Topology files: the domains a host runs, read from TOML and checked before anything starts.

A topology is one ``[[domain]]`` table per domain (see
``deploy/examples/default.toml``), with devices written as xl.cfg strings
(:mod:`xdom.deploy.xlcfg`) so that a Xen user reads it at a glance::

    [[domain]]
    name = "g1"
    kind = "guest"
    disk = ["format=raw, vdev=xvda, backend=blk0, export=nbd:g1-xvda.sock, target=images/g1.img"]
    vif  = ["mac=00:16:3e:00:00:01, bridge=xdombr0, backend=net0, ip=10.77.0.1/24"]

A netback domain may say how it moves frames between its vifs: ``switch =
"bridge"`` (each vif gets a TAP in netback's own network namespace, a port
of the Linux bridge its ``bridge=`` names, ``xdombr0`` by default) or
``switch = "builtin"`` (netback's own learning switch, no privilege needed
anywhere).  Without the key the host decides when it starts: a bridge where
the toolstack can make one (root, iproute2, namespaces), else the builtin
switch (:func:`NetSwitch.default`).

Reading a file is :mod:`xdom.deploy.topology_parse` (each table, and
:func:`~xdom.deploy.topology_parse.parse_topology`,
:func:`~xdom.deploy.topology_parse.load_topology`), the rules that relate
domains to each other :mod:`xdom.deploy.topology_checks`; this module is
what comes out.  Validation is all-or-nothing: every problem in the file is
collected (:class:`Checker`) and raised as one :class:`TopologyError`
listing them all, each naming the file, the key path and what was expected,
because a half-started host (a guest up, its backend refused) is harder to
clean up than a refused file.  What comes out is fully defaulted: every disk
and vif names its backend domain, every vif has its final MAC, memory is
counted in 4 KiB frames, and the domains are in start order.

Relative paths stay relative here, since the state and run directories are
only known when a host starts: :meth:`Topology.resolved` makes a disk's
``target`` absolute against the state directory and its ``export=nbd:``
socket a file of the guest's own export directory, ``RUN_DIR/exports/GUEST/``
(:func:`export_dir`).

A guest may run a virtual machine: a ``[domain.vm]`` table (kernel, initrd,
append, cpus, memory, accel, extra_args; without kernel the project's own
image, :mod:`xdom.deploy.vm.image`) makes the supervisor start QEMU beside
the guest domain, and the guest domain serves the VM's devices over
vhost-user: every disk and vif of such a guest is an
``export=vhost-user:PATH`` socket (the default: ``VDEV.sock`` for a disk,
``vifDEVID.sock`` for a vif, in the guest's export directory), never an NBD
export or a TAP device the VM could not see.  A guest without a VM may still
export a disk or vif over vhost-user, for a VMM its user runs.

Export sockets are made by the guest, so the directory one lives in must
hold nothing anyone else trusts (:mod:`xdom.deploy.export_paths`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from xdom.domains.abi.grant_table import PAGE_SIZE

from .export_paths import export_problem, shared_path_problems
from .xl_disk import DiskSpec
from .xl_vif import MAX_VIF_QUEUES, VifSpec
from .xlcfg import MAX_UNIX_PATH, default_export, default_vif_export, export_dir

__all__ = [
    "DEFAULT_FLAP_LIMIT", "DEFAULT_FLAP_WINDOW", "DEFAULT_MEMORY", "DEFAULT_RESTART", "DEFAULT_RESTART_BACKOFF",
    "START_RANK", "DEFAULT_BRIDGE",
    "Checker", "DomainKind", "DomainSpec", "HostSettings", "Limits", "NetSwitch", "RestartPolicy", "Topology",
    "TopologyError", "VmConfig", "bridge_name_problem", "vif_devids", "vif_queues",
]


class DomainKind(StrEnum):
    """What runs in a domain: xdom's own services, a guest, or any program."""

    XENSTORED = "xenstored"
    BLKBACK = "blkback"
    NETBACK = "netback"
    GUEST = "guest"
    PROGRAM = "program"


class NetSwitch(StrEnum):
    """How a netback domain moves frames between its vifs (its ``switch`` key)."""

    BRIDGE = "bridge"      # a TAP per vif, a port of a Linux bridge in netback's own network namespace
    BUILTIN = "builtin"    # netback's own learning switch: no bridge, no TAP, no privilege

    @classmethod
    def default(cls, unavailable: str | None) -> NetSwitch:
        """Without a ``switch`` key: a bridge when the host can make one (``unavailable`` is None), else builtin.

        ``unavailable`` is :func:`xdom.deploy.netns.unavailable_reason` of the host that runs the topology.
        """
        return cls.BRIDGE if unavailable is None else cls.BUILTIN


# The bridge a vif of a netback in bridge mode joins when its xl string has no bridge=.
DEFAULT_BRIDGE = "xdombr0"
_TAP_NAME_RE = re.compile(r"vif[0-9]+\.[0-9]+", re.ASCII)


def bridge_name_problem(name: str) -> str | None:
    """Why ``name`` (a vif's ``bridge=``, already a valid Linux interface name) cannot be a bridge, or None."""
    if name == "lo" or _TAP_NAME_RE.fullmatch(name):
        return (f"bridge {name!r} is a name netback's namespace uses for another device (lo, and "
                f"vif<domid>.<devid> for the vifs' TAPs); choose another bridge name")
    return None


class RestartPolicy(StrEnum):
    NEVER = "never"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


# Services keep running for everyone else; a guest or program that stops is
# its owner's business.
DEFAULT_MEMORY: dict[DomainKind, str] = {
    DomainKind.XENSTORED: "4M", DomainKind.BLKBACK: "4M", DomainKind.NETBACK: "4M",
    DomainKind.GUEST: "32M", DomainKind.PROGRAM: "4M",
}
DEFAULT_RESTART: dict[DomainKind, RestartPolicy] = {
    DomainKind.XENSTORED: RestartPolicy.ALWAYS, DomainKind.BLKBACK: RestartPolicy.ALWAYS,
    DomainKind.NETBACK: RestartPolicy.ALWAYS, DomainKind.GUEST: RestartPolicy.NEVER,
    DomainKind.PROGRAM: RestartPolicy.NEVER,
}
# Start order: the store first (everyone writes to it), then driver domains
# (their backends must be waiting when a frontend appears), then the rest.
START_RANK: dict[DomainKind, int] = {
    DomainKind.XENSTORED: 0, DomainKind.BLKBACK: 1, DomainKind.NETBACK: 1,
    DomainKind.PROGRAM: 2, DomainKind.GUEST: 2,
}
DEFAULT_RESTART_BACKOFF = 0.5
DEFAULT_FLAP_LIMIT = 5
DEFAULT_FLAP_WINDOW = 60.0


class TopologyError(Exception):
    """A topology that must not be started; ``errors`` lists every problem, one per line of the message."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class Checker:
    """Collects a topology's errors, each prefixed with the file and a key path, to raise them all at once."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{self.source}: {where}: {message}" if where else f"{self.source}: {message}")

    def raise_if_any(self) -> None:
        if self.errors:
            raise TopologyError(self.errors)


@dataclass(frozen=True)
class HostSettings:
    """The optional ``[host]`` table: absolute directories, or None to use the command line's defaults.

    ``listen`` (``tcp://ADDR:PORT``) makes the host serve its control
    operations to remote ``xdom`` clients over CurveZMQ, and its broker's
    lifecycle events on ``events_listen`` (default: the next port); the
    server's secret key and the allow-list of client keys are files
    (``server_key``, ``allowed_clients``: absolute, or relative to the state
    directory; by default ``keys/server.key_secret`` and
    ``keys/allowed_clients``).  See :mod:`xdom.deploy.remote`.
    """

    state_dir: str | None = None
    run_dir: str | None = None
    listen: str | None = None
    events_listen: str | None = None
    server_key: str | None = None
    allowed_clients: str | None = None


@dataclass(frozen=True)
class Limits:
    """Resource limits for a domain's process; None means no limit."""

    rss_bytes: int | None = None
    fds: int | None = None
    cpu_percent: float | None = None


@dataclass(frozen=True)
class VmConfig:
    """A guest's ``[domain.vm]`` table: the VM the supervisor runs (QEMU) beside the guest domain.

    ``kernel`` None means the project's own image (kernel and initrd,
    ``xdom vm-image``; ``fio`` picks the variant carrying fio); a relative
    ``kernel``/``initrd`` resolves against the state directory, as a disk's
    target does.  ``append`` None: the image's own command line (or
    ``console=ttyS0 panic=-1`` for a kernel of your own).  ``limits`` apply
    to the QEMU process (its RSS includes the VM's memory as the VM touches
    it).
    """

    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    cpus: int = 1
    memory_mib: int = 256
    accel: str = "auto"
    extra_args: tuple[str, ...] = ()
    fio: bool = False
    limits: Limits = field(default_factory=Limits)

    @property
    def own_image(self) -> bool:
        """True when the VM boots the project's image (no kernel given)."""
        return self.kernel is None


def vif_devids(vifs: Iterable[VifSpec]) -> list[tuple[int, VifSpec]]:
    """(devid, vif): libxl numbers a domain's vifs 0, 1, ... unless xl's devid= says otherwise."""
    out = []
    for i, vif in enumerate(vifs):
        devid = vif.extra.get("devid")
        out.append((int(devid) if isinstance(devid, str) and devid.isdigit() else i, vif))
    return out


def vif_queues(vif: VifSpec, vm: VmConfig | None) -> int:
    """A vhost-user NIC's queue pairs: its ``queues=``, else one per vCPU of its VM (as a disk's queues),
    at most MAX_VIF_QUEUES; 1 for a NIC served to a VMM the user runs."""
    if vif.queues is not None:
        return vif.queues
    return min(vm.cpus, MAX_VIF_QUEUES) if vm is not None else 1


@dataclass(frozen=True)
class DomainSpec:
    """One validated ``[[domain]]`` table, with every default applied.

    ``memory_frames`` counts 4 KiB frames (what the broker's ``create``
    allocates).  Each disk and vif names its backend domain; each vif has its
    final MAC.  Each disk has its ``export_kind`` ("nbd" or "vhost-user");
    a vif's is "vhost-user" or None (a TAP device).  ``command`` is set for
    programs only, ``workload`` for guests that have one, ``vm`` for guests
    that run a VM.  ``index`` is the table's position in the file,
    for messages.
    """

    name: str
    kind: DomainKind
    memory_frames: int
    restart: RestartPolicy
    restart_backoff: float = DEFAULT_RESTART_BACKOFF
    flap_limit: int = DEFAULT_FLAP_LIMIT
    flap_window: float = DEFAULT_FLAP_WINDOW
    disks: tuple[DiskSpec, ...] = ()
    vifs: tuple[VifSpec, ...] = ()
    command: tuple[str, ...] | None = None
    workload: tuple[str, ...] | None = None
    limits: Limits = field(default_factory=Limits)
    uid: int | None = None
    switch: NetSwitch | None = None      # a netback's ``switch``; None: the host decides (NetSwitch.default)
    vm: VmConfig | None = None
    index: int = 0

    @property
    def memory_bytes(self) -> int:
        return self.memory_frames * PAGE_SIZE

    @property
    def memory_arg(self) -> str:
        """The memory as the broker's ``create`` takes it (a bare integer there means MiB)."""
        return f"{self.memory_bytes >> 10}K"

    @property
    def backends(self) -> tuple[str, ...]:
        """Names of the driver domains serving this domain's devices, each once, in device order."""
        names = [d.backend for d in self.disks] + [v.backend for v in self.vifs]
        return tuple(dict.fromkeys(n for n in names if n is not None))

    @property
    def label(self) -> str:
        return f'domain[{self.index}] ("{self.name}")'


@dataclass
class Topology:
    """A validated topology: ``domains`` in start order."""

    domains: list[DomainSpec]
    host: HostSettings = field(default_factory=HostSettings)
    source: str = "<topology>"

    def stop_order(self) -> list[DomainSpec]:
        """Reverse start order: guests before the backends they use, xenstored last."""
        return list(reversed(self.domains))

    def by_name(self, name: str) -> DomainSpec:
        for d in self.domains:
            if d.name == name:
                return d
        raise KeyError(f"{self.source}: no domain named {name!r}")

    def resolved(self, state_dir: str | None = None, run_dir: str | None = None) -> Topology:
        """This topology with relative disk targets, VM kernels and export sockets made absolute.

        Targets and a VM's kernel and initrd resolve against ``state_dir``,
        export sockets (disks' and vifs') against ``run_dir``; each argument,
        when given (the command line), overrides the file's ``[host]``
        setting.  Raises :class:`TopologyError` when a relative path has no
        directory to resolve against, when a socket path ends up too long for
        a unix socket address, or when two devices end up on the same socket
        or two disks on one writable image.
        """
        state = state_dir if state_dir is not None else self.host.state_dir
        run = run_dir if run_dir is not None else self.host.run_dir
        chk = Checker(self.source)

        def socket_of(where: str, guest: str, export: str | None, default: str | None) -> str | None:
            if export is not None and not os.path.isabs(export):
                if run is None:
                    chk.error(where, f"export socket {export!r} is relative and no run directory is set "
                                     f"([host] run_dir or the command line)")
                else:
                    export = os.path.join(export_dir(run, guest), os.path.normpath(export))
            length_of = export if export is not None else default
            if length_of is not None and len(length_of.encode("utf-8", "surrogatepass")) > MAX_UNIX_PATH:
                chk.error(where, f"export socket path {length_of!r} is longer than {MAX_UNIX_PATH} bytes, "
                                 f"the limit of a unix socket address"
                                 + ("" if export is not None else "; choose a shorter --run-dir"))
            return export

        def in_state(where: str, what: str, path: str | None) -> str | None:
            if path is not None and not os.path.isabs(path):
                if state is None:
                    chk.error(where, f"{what} {path!r} is relative and no state directory is set "
                                     f"([host] state_dir or the command line)")
                else:
                    path = os.path.normpath(os.path.join(state, path))
            return path

        domains = []
        for d in self.domains:
            disks = []
            for j, disk in enumerate(d.disks):
                where = f"{d.label}.disk[{j}]"
                target = in_state(where, "target", disk.target)
                export = socket_of(where, d.name, disk.export_path,
                                   default_export(run, d.name, disk.vdev) if run is not None else None)
                disks.append(dataclasses.replace(disk, target=target, export_path=export))
            vifs = []
            for j, (devid, vif) in enumerate(vif_devids(d.vifs)):
                if vif.export_kind is not None:
                    vif = dataclasses.replace(vif, export_path=socket_of(
                        f"{d.label}.vif[{j}]", d.name, vif.export_path,
                        default_vif_export(run, d.name, devid) if run is not None else None))
                vifs.append(vif)
            vm = d.vm
            if vm is not None:
                vm = dataclasses.replace(vm, kernel=in_state(f"{d.label}.vm.kernel", "kernel", vm.kernel),
                                         initrd=in_state(f"{d.label}.vm.initrd", "initrd", vm.initrd))
            domains.append(dataclasses.replace(d, disks=tuple(disks), vifs=tuple(vifs), vm=vm))
        placed = [(d.name, path) for d in domains for _, path in _export_sockets(d)]
        targets = [disk.target for d in domains for disk in d.disks if disk.target is not None]
        bad: set[tuple[str, str]] = set()
        for others in ((), placed):         # where each may not be, then (among those that may) who shares
            for d in domains:
                for where, path in _export_sockets(d):
                    if (d.name, path) in bad:
                        continue
                    why = export_problem(d.name, path, run, state, [o for o in others if o not in bad], targets)
                    if why is not None:
                        bad.add((d.name, path))
                        chk.error(where, why)
        for where, why in shared_path_problems(
                [(f"{d.label}.disk[{j}]", d.name, disk) for d in domains for j, disk in enumerate(d.disks)],
                [(f"{d.label}.vif[{j}]", d.name, vif) for d in domains for j, vif in enumerate(d.vifs)]):
            chk.error(where, why)
        chk.raise_if_any()
        return Topology(domains, dataclasses.replace(self.host, state_dir=state, run_dir=run), self.source)


def _export_sockets(d: DomainSpec) -> list[tuple[str, str]]:
    """The export sockets ``d``'s devices name explicitly (disks', then vifs'), as (where, path)."""
    out = [(f"{d.label}.disk[{j}]", disk.export_path) for j, disk in enumerate(d.disks)
           if disk.export_path is not None]
    out += [(f"{d.label}.vif[{j}]", vif.export_path) for j, vif in enumerate(d.vifs)
            if vif.export_path is not None]
    return out
