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

Validation is all-or-nothing: :func:`parse_topology` collects every problem
in the file and raises one :class:`TopologyError` listing them all, each
naming the file, the key path and what was expected, because a half-started
host (a guest up, its backend refused) is harder to clean up than a refused
file.  What comes out is fully defaulted: every disk and vif names its
backend domain, every vif has its final MAC, memory is counted in 4 KiB
frames, and the domains are in start order.

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

Export sockets are made by the guest, so the directory one lives in is
writable by the guest's uid: it must hold nothing anyone else trusts.  A
relative ``export=nbd:NAME`` is a plain file name (no ``/``); an absolute one
may not be in the run directory (except the guest's own export directory),
in the state directory, above either, above a disk image, or in (or above
or below) another guest's export directory (:func:`export_problem`).
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import heapq
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from xdom.domains.abi.grant_table import PAGE_SIZE
from xdom.domains.abi.sizes import parse_size as parse_memory_size

from .xlcfg import (
    EXPORT_NBD,
    EXPORT_VHOST_USER,
    EXPORTS_DIR,
    MAX_UNIX_PATH,
    MAX_VIF_QUEUES,
    DiskSpec,
    VifSpec,
    XlCfgError,
    default_export,
    default_vif_export,
    export_dir,
    generate_mac,
    parse_disk,
    parse_vif,
)

__all__ = [
    "DEFAULT_FLAP_LIMIT", "DEFAULT_FLAP_WINDOW", "DEFAULT_MEMORY", "DEFAULT_RESTART", "DEFAULT_RESTART_BACKOFF",
    "MAX_TOPOLOGY_BYTES", "MIN_FDS", "START_RANK",
    "DEFAULT_BRIDGE", "DEFAULT_VM_MEMORY", "MIN_VM_MEMORY_MIB", "VM_ACCELS", "VM_LOG_SUFFIXES",
    "DomainKind", "DomainSpec", "HostSettings", "Limits", "NetSwitch", "RestartPolicy", "Topology",
    "TopologyError", "VmConfig", "vif_devids", "vif_queues",
    "bridge_name_problem", "default_export", "export_dir", "export_problem", "load_topology", "parse_memory_size",
    "parse_topology",
]


def _within(path: str, top: str) -> bool:
    """``path`` is ``top`` or below it (both normalised, absolute)."""
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


def export_problem(guest: str, path: str, run_dir: str | None, state_dir: str | None,
                   others: Iterable[tuple[str, str]] = (), targets: Iterable[str] = ()) -> str | None:
    """Why the absolute export socket ``path`` of ``guest`` cannot be, or None.

    The guest's uid gets write access to the socket's directory, so that
    directory must be the guest's alone: not the run directory or anything in
    it but ``RUN_DIR/exports/GUEST``, not the state directory or anything in
    it, not a directory above either, not one holding a disk image (the guest
    could swap it), and not the directory of another guest's export, or one
    above or below it (``others``: (guest, socket path) pairs).
    """
    folder = os.path.dirname(os.path.normpath(path))
    own = None if run_dir is None else export_dir(os.path.normpath(run_dir), guest)
    hint = (f"; leave export= a plain socket name (it goes in {own}/) or name a directory of {guest}'s own"
            if own else "")
    for what, top in (("run", run_dir), ("state", state_dir)):
        if top is None or folder == own:
            continue
        top = os.path.normpath(top)
        if _within(folder, top):
            why = ("the toolstack's and the broker's sockets and pid file live there" if what == "run" else
                   "logs, the store and disk images live there")
            return (f"export socket {path!r} is in the {what} directory {top}, which no domain may write "
                    f"({why}){hint}")
        if _within(top, folder):
            return (f"export socket {path!r}: its directory {folder} holds the {what} directory {top}; "
                    f"{guest} could write {folder} and replace {top}{hint}")
    for target in targets:
        if _within(os.path.normpath(target), folder):
            return (f"export socket {path!r}: its directory {folder} holds the disk image {target}; "
                    f"{guest} could write {folder} and replace the image{hint}")
    for other, other_path in others:
        if other == guest:
            continue
        theirs = os.path.dirname(os.path.normpath(other_path))
        if _within(folder, theirs) or _within(theirs, folder):
            return (f"export socket {path!r}: its directory {folder} is shared with {other}'s export "
                    f"{other_path!r}; each guest's exports need a directory of their own, or one guest could "
                    f"replace the other's socket")
    return None


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
# A domain process needs its stdio, the hypercall socket, event and grant
# descriptors and the interpreter's own before it does any work.
MIN_FDS = 16
# A topology is a page of text; anything near this size is a wrong file.
MAX_TOPOLOGY_BYTES = 1 << 20

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}", re.ASCII)
_TOP_KEYS = ("domain", "host")
_HOST_KEYS = ("state_dir", "run_dir", "listen", "events_listen", "server_key", "allowed_clients")
# A remote host's listener: tcp only (ipc:// is the local control socket), an address to bind and a port.
_LISTEN_RE = re.compile(r"tcp://(\*|[0-9.]+|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):([0-9]{1,5})", re.ASCII)
_DOMAIN_KEYS = ("name", "kind", "memory", "restart", "restart_backoff", "flap_limit", "flap_window",
                "disk", "vif", "command", "workload", "limits", "uid", "switch", "vm")
_LIMIT_KEYS = ("rss", "fds", "cpu_percent")
_VM_KEYS = ("kernel", "initrd", "append", "cpus", "memory", "accel", "extra_args", "fio", "limits")
VM_ACCELS = ("kvm", "tcg", "auto")
DEFAULT_VM_MEMORY = "256M"
# Below this no Linux kernel gets far; the project's image needs more (the supervisor checks its own figure).
MIN_VM_MEMORY_MIB = 16
MAX_VM_CPUS = 255
# A VM guest's other logs: STATE_DIR/logs/NAME-vm.log (what QEMU printed) and NAME-console.log (the serial console).
VM_LOG_SUFFIXES = ("-vm", "-console")
# QEMU options that would take the VM out of the supervisor's hands (QEMU forks away from its pid).
_FORBIDDEN_VM_ARGS = {"-daemonize": "QEMU would fork away from the process the supervisor watches"}
_MAX_UID = (1 << 32) - 2  # (uid_t)-1 means "no change" to setuid()


class TopologyError(Exception):
    """A topology that must not be started; ``errors`` lists every problem, one per line of the message."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


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
        chk = _Checker(self.source)

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
        placed = [(d.name, path) for d in domains for path in _export_sockets(d)]
        targets = [disk.target for d in domains for disk in d.disks if disk.target is not None]
        bad = set()
        for others in ((), placed):         # where each may not be, then (among those that may) who shares
            for d in domains:
                for where, path in _export_sockets(d, labelled=True):
                    if (d.name, path) in bad:
                        continue
                    why = export_problem(d.name, path, run, state, [o for o in others if o not in bad], targets)
                    if why is not None:
                        bad.add((d.name, path))
                        chk.error(where, why)
        _check_shared_paths(chk, [(f"{d.label}.disk[{j}]", d.name, disk) for d in domains
                                  for j, disk in enumerate(d.disks)],
                            [(f"{d.label}.vif[{j}]", d.name, vif) for d in domains for j, vif in enumerate(d.vifs)])
        chk.raise_if_any()
        return Topology(domains, dataclasses.replace(self.host, state_dir=state, run_dir=run), self.source)


def _export_sockets(d: DomainSpec, labelled: bool = False) -> list[Any]:
    """The export sockets ``d``'s devices name explicitly (disks', then vifs'), as paths or (where, path)."""
    out: list[Any] = []
    for key, devices in (("disk", d.disks), ("vif", d.vifs)):
        for j, dev in enumerate(devices):
            if dev.export_path is not None:
                out.append((f"{d.label}.{key}[{j}]", dev.export_path) if labelled else dev.export_path)
    return out


# --------------------------------------------------------------------------

class _Checker:
    """Collects errors, each prefixed with the file and a key path."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{self.source}: {where}: {message}" if where else f"{self.source}: {message}")

    def raise_if_any(self) -> None:
        if self.errors:
            raise TopologyError(self.errors)


def _a(value: object) -> str:
    """The TOML type of a value, with its article, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, (datetime.date, datetime.time)):
        return "a date/time"
    return f"a {type(value).__name__}"


def _hint(word: object, choices: Iterable[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unknown_keys(chk: _Checker, where: str, table: Mapping[str, Any], known: tuple[str, ...]) -> None:
    for key in table:
        if key not in known:
            prefix = f"{where}." if where else ""
            chk.error(f"{prefix}{key}", f"unknown key{_hint(key, known)}; expected one of {', '.join(known)}")


def _number(chk: _Checker, where: str, value: object, minimum: float, strict: bool = False) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        chk.error(where, f"expected a number, found {_a(value)}")
        return None
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        chk.error(where, f"expected a finite number {'>' if strict else '>='} {minimum:g}, found {value!r}")
        return None
    return float(value)


def _integer(chk: _Checker, where: str, value: object, minimum: int, maximum: int | None = None) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        chk.error(where, f"expected an integer, found {_a(value)}")
        return None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        chk.error(where, f"expected an integer {bound}, found {value}")
        return None
    return value


def _argv(chk: _Checker, where: str, value: object) -> tuple[str, ...] | None:
    """An exec() argument vector: a non-empty array of strings without NUL, the first non-empty."""
    if not isinstance(value, list) or not value:
        found = "an empty array" if isinstance(value, list) else _a(value)
        chk.error(where, f"expected a non-empty array of strings (program and arguments), found {found}")
        return None
    ok = True
    for k, arg in enumerate(value):
        if not isinstance(arg, str):
            chk.error(f"{where}[{k}]", f"expected a string, found {_a(arg)}")
            ok = False
        elif "\0" in arg:
            chk.error(f"{where}[{k}]", "contains a NUL character, which no exec() argument can")
            ok = False
    if ok and not value[0]:
        chk.error(f"{where}[0]", "the program to run is an empty string")
        ok = False
    return tuple(value) if ok else None


def _host_dir(chk: _Checker, where: str, value: object) -> str | None:
    if not isinstance(value, str):
        chk.error(where, f"expected a string (an absolute directory path), found {_a(value)}")
        return None
    if not value.startswith("/") or "\0" in value:
        chk.error(where, f"expected an absolute directory path, found {value!r}")
        return None
    return os.path.normpath(value)


def _parse_host(chk: _Checker, raw: object) -> HostSettings:
    if raw is None:
        return HostSettings()
    if not isinstance(raw, Mapping):
        chk.error("host", f"expected a table ([host]), found {_a(raw)}")
        return HostSettings()
    _unknown_keys(chk, "host", raw, _HOST_KEYS)
    state = _host_dir(chk, "host.state_dir", raw["state_dir"]) if "state_dir" in raw else None
    run = _host_dir(chk, "host.run_dir", raw["run_dir"]) if "run_dir" in raw else None
    listen = {key: _listen(chk, f"host.{key}", raw[key]) for key in ("listen", "events_listen") if key in raw}
    if "events_listen" in listen and "listen" not in raw:
        chk.error("host.events_listen", "needs host.listen (the control operations' address) too")
    if listen.get("listen") and listen.get("listen") == listen.get("events_listen"):
        chk.error("host.events_listen", "must differ from host.listen")
    files: dict[str, str | None] = {}
    for key in ("server_key", "allowed_clients"):
        if key in raw:
            value = raw[key]
            if not isinstance(value, str) or not value or "\0" in value:
                chk.error(f"host.{key}", f"expected a path (absolute, or relative to the state directory), "
                                         f"found {_a(value)}")
            else:
                files[key] = os.path.normpath(value)
    return HostSettings(state, run, listen.get("listen"), listen.get("events_listen"), files.get("server_key"),
                        files.get("allowed_clients"))


def _listen(chk: _Checker, where: str, value: object) -> str | None:
    if not isinstance(value, str) or not (m := _LISTEN_RE.fullmatch(value)) or not 0 < int(m.group(2)) < 65536:
        chk.error(where, f"expected tcp://ADDRESS:PORT (CurveZMQ; plaintext and ipc:// are not served remotely), "
                         f"found {value!r:.80}")
        return None
    return value


@dataclass
class _Draft:
    """A domain while it is being checked; becomes a DomainSpec once the whole file is valid."""

    index: int
    label: str
    name: str | None
    kind: DomainKind | None
    fields: dict[str, Any] = field(default_factory=dict)
    disks: list[DiskSpec] = field(default_factory=list)
    vifs: list[VifSpec] = field(default_factory=list)
    # Positions in the file's disk/vif arrays (entries that failed to parse are absent above).
    disk_at: list[int] = field(default_factory=list)
    vif_at: list[int] = field(default_factory=list)
    has_vm: bool = False        # a [domain.vm] table, valid or not (so the checks that depend on it still run)


def _parse_domain(chk: _Checker, index: int, raw: Mapping[str, Any]) -> _Draft:
    name = raw.get("name")
    valid_name = isinstance(name, str) and _NAME_RE.fullmatch(name) is not None
    label = f'domain[{index}] ("{name}")' if valid_name else f"domain[{index}]"
    if "name" not in raw:
        chk.error(label, "name is required (a string like \"g1\")")
    elif not isinstance(name, str):
        chk.error(f"{label}.name", f"expected a string, found {_a(name)}")
    elif not valid_name:
        chk.error(f"{label}.name", f"name {name!r} is not 1-32 characters of a-z, 0-9, '_' and '-', "
                                   f"starting with a letter or digit")
    kind: DomainKind | None = None
    raw_kind = raw.get("kind")
    if "kind" not in raw:
        chk.error(label, f"kind is required (one of {', '.join(k.value for k in DomainKind)})")
    elif not isinstance(raw_kind, str) or raw_kind not in DomainKind.__members__.values():
        chk.error(f"{label}.kind", f"kind {raw_kind!r} is not one of {', '.join(k.value for k in DomainKind)}"
                                   f"{_hint(raw_kind, [k.value for k in DomainKind])}")
    else:
        kind = DomainKind(raw_kind)
    _unknown_keys(chk, label, raw, _DOMAIN_KEYS)
    draft = _Draft(index, label, name if valid_name else None, kind)
    f = draft.fields

    if "memory" in raw or kind is not None:
        value = raw.get("memory", DEFAULT_MEMORY[kind] if kind is not None else None)
        try:
            nbytes = parse_memory_size(value)
        except ValueError as e:
            chk.error(f"{label}.memory", str(e))
        else:
            if nbytes % PAGE_SIZE:
                chk.error(f"{label}.memory", f"memory {value!r} is not a multiple of 4 KiB (one frame)")
            else:
                f["memory_frames"] = nbytes // PAGE_SIZE

    if "restart" in raw:
        value = raw["restart"]
        if isinstance(value, str) and value in RestartPolicy.__members__.values():
            f["restart"] = RestartPolicy(value)
        else:
            choices = [p.value for p in RestartPolicy]
            chk.error(f"{label}.restart",
                      f"restart {value!r} is not one of {', '.join(choices)}{_hint(value, choices)}")
    elif kind is not None:
        f["restart"] = DEFAULT_RESTART[kind]
    if "restart_backoff" in raw:
        f["restart_backoff"] = _number(chk, f"{label}.restart_backoff", raw["restart_backoff"], 0.0)
    if "flap_limit" in raw:
        f["flap_limit"] = _integer(chk, f"{label}.flap_limit", raw["flap_limit"], 1)
    if "flap_window" in raw:
        f["flap_window"] = _number(chk, f"{label}.flap_window", raw["flap_window"], 0.0, strict=True)

    for key, parse, attr, at in (("disk", parse_disk, draft.disks, draft.disk_at),
                                 ("vif", parse_vif, draft.vifs, draft.vif_at)):
        if key not in raw:
            continue
        value = raw[key]
        if kind is not None and kind != DomainKind.GUEST:
            chk.error(f"{label}.{key}", f"only guest domains have {key} devices; this is a {kind.value} domain")
            continue
        if not isinstance(value, list):
            chk.error(f"{label}.{key}", f"expected an array of xl {key} strings, e.g. {key} = [\"...\"], "
                                        f"found {_a(value)}")
            continue
        for j, item in enumerate(value):
            if not isinstance(item, str):
                chk.error(f"{label}.{key}[{j}]", f"expected an xl {key} string, found {_a(item)}")
                continue
            try:
                attr.append(parse(item))  # type: ignore[arg-type]
                at.append(j)
            except XlCfgError as e:
                chk.error(f"{label}.{key}[{j}]", str(e))

    if "command" in raw:
        if kind is not None and kind != DomainKind.PROGRAM:
            chk.error(f"{label}.command", f"only program domains take a command; a {kind.value} domain runs "
                                          f"xdom's own code")
        else:
            f["command"] = _argv(chk, f"{label}.command", raw["command"])
    elif kind == DomainKind.PROGRAM:
        chk.error(label, "command is required for a program domain (an array: program and arguments)")
    if "workload" in raw:
        if kind is not None and kind != DomainKind.GUEST:
            chk.error(f"{label}.workload", f"only guest domains have a workload; this is a {kind.value} domain")
        else:
            f["workload"] = _argv(chk, f"{label}.workload", raw["workload"])

    if "limits" in raw:
        f["limits"] = _parse_limits(chk, f"{label}.limits", raw["limits"])
    if "uid" in raw:
        if raw["uid"] == 0 and not isinstance(raw["uid"], bool):
            chk.error(f"{label}.uid", "uid 0 is root: a domain never runs as root, its frames would be open "
                                      "to every process")
        else:
            f["uid"] = _integer(chk, f"{label}.uid", raw["uid"], 1, _MAX_UID)
    if "switch" in raw:
        value = raw["switch"]
        choices = [s.value for s in NetSwitch]
        if kind is not None and kind != DomainKind.NETBACK:
            chk.error(f"{label}.switch", f"only netback domains have a switch; this is a {kind.value} domain")
        elif isinstance(value, str) and value in choices:
            f["switch"] = NetSwitch(value)
        else:
            shown = repr(value) if isinstance(value, str) else _a(value)
            chk.error(f"{label}.switch", f"switch {shown} is not one of {', '.join(choices)}{_hint(value, choices)} "
                                         f"(\"bridge\": a Linux bridge in netback's namespace, \"builtin\": "
                                         f"netback's own learning switch)")
    if "vm" in raw:
        if kind is not None and kind != DomainKind.GUEST:
            chk.error(f"{label}.vm", f"only guest domains run a VM; this is a {kind.value} domain")
        else:
            f["vm"] = _parse_vm(chk, f"{label}.vm", raw["vm"])
            draft.has_vm = True
            if "workload" in raw:
                chk.error(f"{label}.workload", "a guest with a VM ([domain.vm]) has no workload: the VM is what it "
                                               "runs")
    return draft


def _path_string(chk: _Checker, where: str, value: object, what: str) -> str | None:
    if not isinstance(value, str):
        chk.error(where, f"expected a string (the path of the {what}), found {_a(value)}")
    elif not value or "\0" in value:
        chk.error(where, f"expected the path of the {what}, found {value!r}")
    else:
        return value
    return None


def _parse_vm(chk: _Checker, where: str, raw: object) -> VmConfig | None:
    """A ``[domain.vm]`` table; None (with errors recorded) when it is not valid."""
    if not isinstance(raw, Mapping):
        chk.error(where, f"expected a table ([domain.vm], or vm = {{ memory = \"256M\" }}), found {_a(raw)}")
        return None
    before = len(chk.errors)
    _unknown_keys(chk, where, raw, _VM_KEYS)
    f: dict[str, Any] = {}
    for key, what in (("kernel", "VM's kernel"), ("initrd", "VM's initramfs")):
        if key in raw:
            f[key] = _path_string(chk, f"{where}.{key}", raw[key], what)
    if "initrd" in raw and "kernel" not in raw:
        chk.error(f"{where}.initrd", "an initrd without a kernel: without kernel the VM boots the project's own "
                                     "image, which brings its own initrd; give kernel too, or neither")
    if "append" in raw:
        value = raw["append"]
        if not isinstance(value, str):
            chk.error(f"{where}.append", f"expected a string (the kernel command line), found {_a(value)}")
        elif any(ch in value for ch in "\0\n\r"):
            chk.error(f"{where}.append", "the kernel command line is one line, without NUL")
        else:
            f["append"] = value
    if "cpus" in raw:
        f["cpus"] = _integer(chk, f"{where}.cpus", raw["cpus"], 1, MAX_VM_CPUS)
    memory = raw.get("memory", DEFAULT_VM_MEMORY)
    try:
        nbytes = parse_memory_size(memory, "memory")
    except ValueError as e:
        chk.error(f"{where}.memory", str(e))
    else:
        if nbytes % (1 << 20):
            chk.error(f"{where}.memory", f"memory {memory!r} is not a whole number of MiB (QEMU's RAM is one "
                                         f"memfd of N MiB)")
        elif nbytes >> 20 < MIN_VM_MEMORY_MIB:
            chk.error(f"{where}.memory", f"memory {memory!r} is less than {MIN_VM_MEMORY_MIB} MiB: no Linux kernel "
                                         f"boots in that")
        else:
            f["memory_mib"] = nbytes >> 20
    if "accel" in raw:
        value = raw["accel"]
        if isinstance(value, str) and value in VM_ACCELS:
            f["accel"] = value
        else:
            shown = repr(value) if isinstance(value, str) else _a(value)
            chk.error(f"{where}.accel", f"accel {shown} is not one of {', '.join(VM_ACCELS)}{_hint(value, VM_ACCELS)} "
                                        f"(\"auto\": KVM where a probe VM really boots with it, else TCG)")
    if "extra_args" in raw:
        value = raw["extra_args"]
        if not isinstance(value, list):
            chk.error(f"{where}.extra_args", f"expected an array of strings (QEMU arguments), found {_a(value)}")
        else:
            ok = True
            for k, arg in enumerate(value):
                if not isinstance(arg, str):
                    chk.error(f"{where}.extra_args[{k}]", f"expected a string, found {_a(arg)}")
                    ok = False
                elif "\0" in arg:
                    chk.error(f"{where}.extra_args[{k}]", "contains a NUL character, which no exec() argument can")
                    ok = False
                elif arg in _FORBIDDEN_VM_ARGS:
                    chk.error(f"{where}.extra_args[{k}]", f"{arg} is not allowed: {_FORBIDDEN_VM_ARGS[arg]}")
                    ok = False
            if ok:
                f["extra_args"] = tuple(value)
    if "fio" in raw:
        value = raw["fio"]
        if not isinstance(value, bool):
            chk.error(f"{where}.fio", f"expected true or false, found {_a(value)}")
        elif value and "kernel" in raw:
            chk.error(f"{where}.fio", "fio = true picks the project's image with fio in it; a VM with a kernel of "
                                      "its own has no such variant")
        else:
            f["fio"] = value
    if "limits" in raw:
        f["limits"] = _parse_limits(chk, f"{where}.limits", raw["limits"])
        lim = f["limits"]
        if lim is not None and lim.rss_bytes is not None and "memory_mib" in f \
                and lim.rss_bytes <= f["memory_mib"] << 20:
            chk.error(f"{where}.limits.rss", f"rss {raw['limits']['rss']!r} is not above the VM's memory "
                                             f"({f['memory_mib']} MiB): QEMU's RSS grows to the VM's memory as the VM "
                                             f"touches it, and the VM would be killed for doing so; leave room for "
                                             f"QEMU itself (e.g. memory + 128M)")
    if len(chk.errors) != before:
        return None
    return VmConfig(**{k: v for k, v in f.items() if v is not None})


def _parse_limits(chk: _Checker, where: str, raw: object) -> Limits | None:
    if not isinstance(raw, Mapping):
        chk.error(where, f"expected a table (limits = {{ rss = \"64M\", fds = 256 }}), found {_a(raw)}")
        return None
    _unknown_keys(chk, where, raw, _LIMIT_KEYS)
    rss = fds = cpu = None
    if "rss" in raw:
        try:
            rss = parse_memory_size(raw["rss"], "rss")
        except ValueError as e:
            chk.error(f"{where}.rss", str(e))
    if "fds" in raw:
        fds = _integer(chk, f"{where}.fds", raw["fds"], MIN_FDS, 1 << 20)
    if "cpu_percent" in raw:
        cpu = _number(chk, f"{where}.cpu_percent", raw["cpu_percent"], 0.0, strict=True)
    return Limits(rss, fds, cpu)


def _check_shared_paths(chk: _Checker, disks: list[tuple[str, str | None, DiskSpec]],
                        vifs: Iterable[tuple[str, str | None, VifSpec]] = ()) -> None:
    """Two devices on one export socket, or one image writable by two disks, are errors.

    Read-only sharing of an image is fine (Xen allows it too); a writable
    image seen by two frontends is corrupted by the first write.  A relative
    export socket is a name in its guest's own directory, so two guests may
    use the same one.
    """
    exports: dict[object, str] = {}
    targets: dict[str, tuple[str, DiskSpec]] = {}
    devices: list[tuple[str, str | None, DiskSpec | VifSpec]] = [*disks, *vifs]
    for where, guest, dev in devices:
        if dev.export_path is not None:
            key: object = os.path.normpath(dev.export_path)
            if not os.path.isabs(dev.export_path):
                key = (guest, key)
            if key in exports:
                chk.error(where, f"export socket {dev.export_path!r} is already used by {exports[key]}")
            else:
                exports[key] = where
        if isinstance(dev, DiskSpec) and dev.target is not None:
            key = os.path.normpath(dev.target)
            other = targets.get(key)
            if other is None:
                targets[key] = (where, dev)
            elif not (dev.readonly and other[1].readonly):
                chk.error(where, f"target {dev.target!r} is also used by {other[0]}, and one of them is "
                                 f"writable; only read-only disks may share an image")


def parse_topology(data: Mapping[str, Any], source: str = "<topology>") -> Topology:
    """Validate a topology already read from TOML (``source`` names it in messages).

    Raises :class:`TopologyError` listing every problem found.
    """
    chk = _Checker(source)
    if not isinstance(data, Mapping):
        chk.error("", f"expected a table at the top level, found {_a(data)}")
        chk.raise_if_any()
    _unknown_keys(chk, "", data, _TOP_KEYS)
    host = _parse_host(chk, data.get("host"))

    raw_domains = data.get("domain")
    drafts: list[_Draft] = []
    if raw_domains is None:
        chk.error("", "no [[domain]] tables: a topology has at least one domain")
    elif isinstance(raw_domains, Mapping):
        chk.error("domain", "expected an array of tables: write [[domain]], not [domain]")
    elif not isinstance(raw_domains, list):
        chk.error("domain", f"expected an array of tables ([[domain]]), found {_a(raw_domains)}")
    else:
        for i, raw in enumerate(raw_domains):
            if not isinstance(raw, Mapping):
                chk.error(f"domain[{i}]", f"expected a table, found {_a(raw)}")
                continue
            drafts.append(_parse_domain(chk, i, raw))
    if isinstance(raw_domains, list) and not raw_domains:
        chk.error("domain", "the array is empty: a topology has at least one domain")

    by_name: dict[str, _Draft] = {}
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
    chk.raise_if_any()

    specs = [_finish(d) for d in drafts]
    return Topology(_start_order(specs, source), host, source)


def _check_xenstored(chk: _Checker, drafts: list[_Draft]) -> None:
    stores = [d for d in drafts if d.kind == DomainKind.XENSTORED]
    for extra in stores[1:]:
        chk.error(extra.label, f"a second xenstored domain ({stores[0].label} is one); a topology has at most one")
    needy = [d for d in drafts if d.kind in (DomainKind.GUEST, DomainKind.BLKBACK, DomainKind.NETBACK)]
    if needy and not stores:
        chk.error("", f"no xenstored domain, but {needy[0].label} is a {needy[0].kind}: guests and driver "
                      f"domains need one (add a [[domain]] with kind = \"xenstored\")")


def _resolve_backends(chk: _Checker, drafts: list[_Draft], by_name: Mapping[str, _Draft]) -> None:
    """Give every disk and vif its backend domain, checking it is a domain of the right kind."""
    for key, backend_kind in (("disk", DomainKind.BLKBACK), ("vif", DomainKind.NETBACK)):
        serving = [d.name for d in drafts if d.kind == backend_kind and d.name is not None]
        for d in drafts:
            devices: list[Any] = d.disks if key == "disk" else d.vifs
            positions = d.disk_at if key == "disk" else d.vif_at
            for j, dev in enumerate(devices):
                where = f"{d.label}.{key}[{positions[j]}]"
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
                                     f"{_hint(dev.backend, serving)}")
                elif other.kind != backend_kind:
                    what = f"is a {other.kind} domain" if other.kind else "is a domain without a valid kind"
                    chk.error(where, f"backend {dev.backend!r} {what}; a {key}'s backend must be a {backend_kind}")


def _check_devices(chk: _Checker, drafts: list[_Draft]) -> None:
    """Per guest: what xdom's blkback can serve, distinct vdevs.  Across the topology:
    distinct MACs, IPs, export sockets and writable images.  Then generate the missing MACs."""
    all_disks: list[tuple[str, str | None, DiskSpec]] = []
    all_vifs: list[tuple[str, str | None, VifSpec]] = []
    macs: dict[str, str] = {}
    ips: dict[Any, str] = {}
    for d in drafts:
        devids: dict[int, tuple[int, str]] = {}
        vm: VmConfig | None = d.fields.get("vm")
        limits: Limits | None = d.fields.get("limits")
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
    _check_shared_paths(chk, all_disks, all_vifs)
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


def _check_relative_export(chk: _Checker, where: str, d: _Draft, export: str | None) -> None:
    if export is not None and not os.path.isabs(export) and (
            os.sep in os.path.normpath(export) or os.path.normpath(export) == ".."):
        chk.error(where, f"export socket {export!r}: a relative export is a socket name in "
                         f"{d.name or 'the guest'}'s own directory RUN_DIR/{EXPORTS_DIR}/"
                         f"{d.name or 'GUEST'}/, without '/'; give a plain name or an absolute path")


def _check_vm_log_names(chk: _Checker, drafts: list[_Draft], by_name: Mapping[str, _Draft]) -> None:
    """A VM guest's QEMU and console logs are NAME-vm.log and NAME-console.log: no domain may be called so."""
    for d in drafts:
        if d.name is None or not d.has_vm:
            continue
        for suffix in VM_LOG_SUFFIXES:
            other = by_name.get(d.name + suffix)
            if other is not None:
                chk.error(f"{other.label}.name", f"name {other.name!r} is taken by the log of {d.label}'s VM "
                                                 f"(STATE_DIR/logs/{other.name}.log); choose another name")


def _check_uids(chk: _Checker, drafts: list[_Draft]) -> None:
    """Isolation between domains is by uid: two domains under one uid could open each other's frames."""
    owners: dict[int, str] = {}
    for d in drafts:
        uid = d.fields.get("uid")
        if uid is None:
            continue
        if uid in owners:
            chk.error(f"{d.label}.uid", f"uid {uid} is already used by {owners[uid]}; each domain needs its own uid")
        else:
            owners[uid] = d.label


def _finish(d: _Draft) -> DomainSpec:
    if d.name is None or d.kind is None:  # each of these was reported as an error
        raise RuntimeError(f"{d.label} finished without a name or kind")
    f = d.fields
    vm: VmConfig | None = f.get("vm")
    return DomainSpec(
        name=d.name,
        kind=d.kind,
        memory_frames=f["memory_frames"],
        restart=f["restart"],
        restart_backoff=f.get("restart_backoff", DEFAULT_RESTART_BACKOFF),
        flap_limit=f.get("flap_limit", DEFAULT_FLAP_LIMIT),
        flap_window=f.get("flap_window", DEFAULT_FLAP_WINDOW),
        disks=tuple(dataclasses.replace(disk, export_kind=disk.export_kind or (EXPORT_VHOST_USER if vm else EXPORT_NBD))
                    for disk in d.disks),
        vifs=tuple(dataclasses.replace(vif, export_kind=vif.export_kind or (EXPORT_VHOST_USER if vm else None))
                   for vif in d.vifs),
        command=f.get("command"),
        workload=f.get("workload"),
        limits=f.get("limits") or Limits(),
        uid=f.get("uid"),
        switch=f.get("switch"),
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


def load_topology(path: str) -> Topology:
    """Read and validate a topology file; every problem is reported in one :class:`TopologyError`."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TOPOLOGY_BYTES + 1)
    except OSError as e:
        raise TopologyError([f"{path}: cannot read: {e.strerror or e}"]) from None
    if len(raw) > MAX_TOPOLOGY_BYTES:
        raise TopologyError([f"{path}: larger than {MAX_TOPOLOGY_BYTES} bytes; not a topology file"])
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TopologyError([f"{path}: not UTF-8 text: {e}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise TopologyError([f"{path}: not valid TOML: {e}"]) from None
    return parse_topology(data, path)
