"""Reading a topology file: each TOML table checked on its own, then the whole, into a :class:`Topology`.

:func:`load_topology` reads a file (at most :data:`MAX_TOPOLOGY_BYTES`),
:func:`parse_topology` validates what TOML made of it: the top level, the
``[host]`` table, each ``[[domain]]`` table with its ``limits`` and
``[domain.vm]`` tables, and its ``disk``/``vif`` arrays (xl strings:
:mod:`xdom.deploy.xlcfg`).  Each table becomes a
:class:`~xdom.deploy.topology_checks.Draft`; the rules between domains
(:mod:`xdom.deploy.topology_checks`) then run over all the drafts, so that
every problem of the file is reported at once, in one
:class:`~xdom.deploy.topology.TopologyError`: a message names the file, the
key path (``domain[2] ("g1").vm.memory``) and what was expected, with a
"did you mean" for a misspelt key or choice.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from typing import Any

from xdom.domains.abi.grant_table import PAGE_SIZE
from xdom.domains.abi.sizes import described_type
from xdom.domains.abi.sizes import parse_size as parse_memory_size

from .topology import (
    DEFAULT_MEMORY,
    DEFAULT_RESTART,
    Checker,
    DomainKind,
    HostSettings,
    Limits,
    NetSwitch,
    RestartPolicy,
    Topology,
    TopologyError,
    VmConfig,
)
from .topology_checks import Draft, check_across, finish
from .xl_disk import parse_disk
from .xl_vif import parse_vif
from .xlcfg import XlCfgError, did_you_mean

__all__ = ["DEFAULT_VM_MEMORY", "MAX_TOPOLOGY_BYTES", "MIN_FDS", "MIN_VM_MEMORY_MIB", "VM_ACCELS", "load_topology",
           "parse_topology"]

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
# QEMU options that would take the VM out of the supervisor's hands (QEMU forks away from its pid).
_FORBIDDEN_VM_ARGS = {"-daemonize": "QEMU would fork away from the process the supervisor watches"}
_MAX_UID = (1 << 32) - 2  # (uid_t)-1 means "no change" to setuid()


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


def parse_topology(data: Mapping[str, Any], source: str = "<topology>") -> Topology:
    """Validate a topology already read from TOML (``source`` names it in messages).

    Raises :class:`TopologyError` listing every problem found.
    """
    chk = Checker(source)
    if not isinstance(data, Mapping):
        chk.error("", f"expected a table at the top level, found {described_type(data)}")
        chk.raise_if_any()
    _unknown_keys(chk, "", data, _TOP_KEYS)
    host = _parse_host(chk, data.get("host"))

    raw_domains = data.get("domain")
    drafts: list[Draft] = []
    if raw_domains is None:
        chk.error("", "no [[domain]] tables: a topology has at least one domain")
    elif isinstance(raw_domains, Mapping):
        chk.error("domain", "expected an array of tables: write [[domain]], not [domain]")
    elif not isinstance(raw_domains, list):
        chk.error("domain", f"expected an array of tables ([[domain]]), found {described_type(raw_domains)}")
    else:
        for i, raw in enumerate(raw_domains):
            if not isinstance(raw, Mapping):
                chk.error(f"domain[{i}]", f"expected a table, found {described_type(raw)}")
                continue
            drafts.append(_parse_domain(chk, i, raw))
    if isinstance(raw_domains, list) and not raw_domains:
        chk.error("domain", "the array is empty: a topology has at least one domain")
    check_across(chk, drafts)
    chk.raise_if_any()
    return Topology(finish(drafts, source), host, source)


# ---- TOML values ----------------------------------------------------------------




def _unknown_keys(chk: Checker, where: str, table: Mapping[str, Any], known: tuple[str, ...]) -> None:
    for key in table:
        if key not in known:
            prefix = f"{where}." if where else ""
            chk.error(f"{prefix}{key}", f"unknown key{did_you_mean(key, known)}; expected one of {', '.join(known)}")


def _number(chk: Checker, where: str, value: object, minimum: float, strict: bool = False) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        chk.error(where, f"expected a number, found {described_type(value)}")
        return None
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        chk.error(where, f"expected a finite number {'>' if strict else '>='} {minimum:g}, found {value!r}")
        return None
    return float(value)


def _integer(chk: Checker, where: str, value: object, minimum: int, maximum: int | None = None) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        chk.error(where, f"expected an integer, found {described_type(value)}")
        return None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        chk.error(where, f"expected an integer {bound}, found {value}")
        return None
    return value


def _argv(chk: Checker, where: str, value: object) -> tuple[str, ...] | None:
    """An exec() argument vector: a non-empty array of strings without NUL, the first non-empty."""
    if not isinstance(value, list) or not value:
        found = "an empty array" if isinstance(value, list) else described_type(value)
        chk.error(where, f"expected a non-empty array of strings (program and arguments), found {found}")
        return None
    ok = True
    for k, arg in enumerate(value):
        if not isinstance(arg, str):
            chk.error(f"{where}[{k}]", f"expected a string, found {described_type(arg)}")
            ok = False
        elif "\0" in arg:
            chk.error(f"{where}[{k}]", "contains a NUL character, which no exec() argument can")
            ok = False
    if ok and not value[0]:
        chk.error(f"{where}[0]", "the program to run is an empty string")
        ok = False
    return tuple(value) if ok else None


def _host_dir(chk: Checker, where: str, value: object) -> str | None:
    if not isinstance(value, str):
        chk.error(where, f"expected a string (an absolute directory path), found {described_type(value)}")
        return None
    if not value.startswith("/") or "\0" in value:
        chk.error(where, f"expected an absolute directory path, found {value!r}")
        return None
    return os.path.normpath(value)


def _path_string(chk: Checker, where: str, value: object, what: str) -> str | None:
    if not isinstance(value, str):
        chk.error(where, f"expected a string (the path of the {what}), found {described_type(value)}")
    elif not value or "\0" in value:
        chk.error(where, f"expected the path of the {what}, found {value!r}")
    else:
        return value
    return None


# ---- [host] ---------------------------------------------------------------------


def _parse_host(chk: Checker, raw: object) -> HostSettings:
    if raw is None:
        return HostSettings()
    if not isinstance(raw, Mapping):
        chk.error("host", f"expected a table ([host]), found {described_type(raw)}")
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
                                         f"found {described_type(value)}")
            else:
                files[key] = os.path.normpath(value)
    return HostSettings(state, run, listen.get("listen"), listen.get("events_listen"), files.get("server_key"),
                        files.get("allowed_clients"))


def _listen(chk: Checker, where: str, value: object) -> str | None:
    if not isinstance(value, str) or not (m := _LISTEN_RE.fullmatch(value)) or not 0 < int(m.group(2)) < 65536:
        chk.error(where, f"expected tcp://ADDRESS:PORT (CurveZMQ; plaintext and ipc:// are not served remotely), "
                         f"found {value!r:.80}")
        return None
    return value


# ---- [[domain]] -----------------------------------------------------------------


def _parse_domain(chk: Checker, index: int, raw: Mapping[str, Any]) -> Draft:
    name = raw.get("name")
    valid_name = isinstance(name, str) and _NAME_RE.fullmatch(name) is not None
    label = f'domain[{index}] ("{name}")' if valid_name else f"domain[{index}]"
    if "name" not in raw:
        chk.error(label, "name is required (a string like \"g1\")")
    elif not isinstance(name, str):
        chk.error(f"{label}.name", f"expected a string, found {described_type(name)}")
    elif not valid_name:
        chk.error(f"{label}.name", f"name {name!r} is not 1-32 characters of a-z, 0-9, '_' and '-', "
                                   f"starting with a letter or digit")
    kind: DomainKind | None = None
    raw_kind = raw.get("kind")
    if "kind" not in raw:
        chk.error(label, f"kind is required (one of {', '.join(k.value for k in DomainKind)})")
    elif not isinstance(raw_kind, str) or raw_kind not in DomainKind.__members__.values():
        chk.error(f"{label}.kind", f"kind {raw_kind!r} is not one of {', '.join(k.value for k in DomainKind)}"
                                   f"{did_you_mean(raw_kind, [k.value for k in DomainKind])}")
    else:
        kind = DomainKind(raw_kind)
    _unknown_keys(chk, label, raw, _DOMAIN_KEYS)
    draft = Draft(index, label, name if isinstance(name, str) and valid_name else None, kind)

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
                draft.memory_frames = nbytes // PAGE_SIZE

    if "restart" in raw:
        value = raw["restart"]
        if isinstance(value, str) and value in RestartPolicy.__members__.values():
            draft.restart = RestartPolicy(value)
        else:
            choices = [p.value for p in RestartPolicy]
            chk.error(f"{label}.restart",
                      f"restart {value!r} is not one of {', '.join(choices)}{did_you_mean(value, choices)}")
    elif kind is not None:
        draft.restart = DEFAULT_RESTART[kind]
    if "restart_backoff" in raw:
        draft.restart_backoff = _number(chk, f"{label}.restart_backoff", raw["restart_backoff"], 0.0)
    if "flap_limit" in raw:
        draft.flap_limit = _integer(chk, f"{label}.flap_limit", raw["flap_limit"], 1)
    if "flap_window" in raw:
        draft.flap_window = _number(chk, f"{label}.flap_window", raw["flap_window"], 0.0, strict=True)

    for j, item in _device_strings(chk, label, "disk", kind, raw):
        try:
            draft.disks.append(parse_disk(item))
            draft.disk_at.append(j)
        except XlCfgError as e:
            chk.error(f"{label}.disk[{j}]", str(e))
    for j, item in _device_strings(chk, label, "vif", kind, raw):
        try:
            draft.vifs.append(parse_vif(item))
            draft.vif_at.append(j)
        except XlCfgError as e:
            chk.error(f"{label}.vif[{j}]", str(e))

    if "command" in raw:
        if kind is not None and kind != DomainKind.PROGRAM:
            chk.error(f"{label}.command", f"only program domains take a command; a {kind.value} domain runs "
                                          f"xdom's own code")
        else:
            draft.command = _argv(chk, f"{label}.command", raw["command"])
    elif kind == DomainKind.PROGRAM:
        chk.error(label, "command is required for a program domain (an array: program and arguments)")
    if "workload" in raw:
        if kind is not None and kind != DomainKind.GUEST:
            chk.error(f"{label}.workload", f"only guest domains have a workload; this is a {kind.value} domain")
        else:
            draft.workload = _argv(chk, f"{label}.workload", raw["workload"])

    if "limits" in raw:
        draft.limits = _parse_limits(chk, f"{label}.limits", raw["limits"])
    if "uid" in raw:
        if raw["uid"] == 0 and not isinstance(raw["uid"], bool):
            chk.error(f"{label}.uid", "uid 0 is root: a domain never runs as root, its frames would be open "
                                      "to every process")
        else:
            draft.uid = _integer(chk, f"{label}.uid", raw["uid"], 1, _MAX_UID)
    if "switch" in raw:
        value = raw["switch"]
        choices = [s.value for s in NetSwitch]
        if kind is not None and kind != DomainKind.NETBACK:
            chk.error(f"{label}.switch", f"only netback domains have a switch; this is a {kind.value} domain")
        elif isinstance(value, str) and value in choices:
            draft.switch = NetSwitch(value)
        else:
            shown = repr(value) if isinstance(value, str) else described_type(value)
            chk.error(f"{label}.switch", f"switch {shown} is not one of {', '.join(choices)}"
                                         f"{did_you_mean(value, choices)} (\"bridge\": a Linux bridge in netback's "
                                         f"namespace, \"builtin\": netback's own learning switch)")
    if "vm" in raw:
        if kind is not None and kind != DomainKind.GUEST:
            chk.error(f"{label}.vm", f"only guest domains run a VM; this is a {kind.value} domain")
        else:
            draft.vm = _parse_vm(chk, f"{label}.vm", raw["vm"])
            draft.has_vm = True
            if "workload" in raw:
                chk.error(f"{label}.workload", "a guest with a VM ([domain.vm]) has no workload: the VM is what it "
                                               "runs")
    return draft


def _device_strings(chk: Checker, label: str, key: str, kind: DomainKind | None,
                    raw: Mapping[str, Any]) -> Iterator[tuple[int, str]]:
    """(position, string) of each item of a guest's ``disk`` (or ``vif``) array, as the caller parses them."""
    if key not in raw:
        return
    value = raw[key]
    if kind is not None and kind != DomainKind.GUEST:
        chk.error(f"{label}.{key}", f"only guest domains have {key} devices; this is a {kind.value} domain")
        return
    if not isinstance(value, list):
        chk.error(f"{label}.{key}", f"expected an array of xl {key} strings, e.g. {key} = [\"...\"], "
                                    f"found {described_type(value)}")
        return
    for j, item in enumerate(value):
        if not isinstance(item, str):
            chk.error(f"{label}.{key}[{j}]", f"expected an xl {key} string, found {described_type(item)}")
            continue
        yield j, item


# ---- [domain.vm] and limits ------------------------------------------------------


def _parse_vm(chk: Checker, where: str, raw: object) -> VmConfig | None:
    """A ``[domain.vm]`` table; None (with errors recorded) when it is not valid."""
    if not isinstance(raw, Mapping):
        chk.error(where, f"expected a table ([domain.vm], or vm = {{ memory = \"256M\" }}), found {described_type(raw)}")
        return None
    before = len(chk.errors)
    _unknown_keys(chk, where, raw, _VM_KEYS)
    kernel = _path_string(chk, f"{where}.kernel", raw["kernel"], "VM's kernel") if "kernel" in raw else None
    initrd = _path_string(chk, f"{where}.initrd", raw["initrd"], "VM's initramfs") if "initrd" in raw else None
    if "initrd" in raw and "kernel" not in raw:
        chk.error(f"{where}.initrd", "an initrd without a kernel: without kernel the VM boots the project's own "
                                     "image, which brings its own initrd; give kernel too, or neither")
    append = None
    if "append" in raw:
        value = raw["append"]
        if not isinstance(value, str):
            chk.error(f"{where}.append", f"expected a string (the kernel command line), found {described_type(value)}")
        elif any(ch in value for ch in "\0\n\r"):
            chk.error(f"{where}.append", "the kernel command line is one line, without NUL")
        else:
            append = value
    cpus = _integer(chk, f"{where}.cpus", raw["cpus"], 1, MAX_VM_CPUS) if "cpus" in raw else VmConfig.cpus
    memory_mib = None
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
            memory_mib = nbytes >> 20
    accel = VmConfig.accel
    if "accel" in raw:
        value = raw["accel"]
        if isinstance(value, str) and value in VM_ACCELS:
            accel = value
        else:
            shown = repr(value) if isinstance(value, str) else described_type(value)
            chk.error(f"{where}.accel", f"accel {shown} is not one of {', '.join(VM_ACCELS)}"
                                        f"{did_you_mean(value, VM_ACCELS)} "
                                        f"(\"auto\": KVM where a probe VM really boots with it, else TCG)")
    extra_args = _qemu_args(chk, f"{where}.extra_args", raw["extra_args"]) if "extra_args" in raw else ()
    fio = VmConfig.fio
    if "fio" in raw:
        value = raw["fio"]
        if not isinstance(value, bool):
            chk.error(f"{where}.fio", f"expected true or false, found {described_type(value)}")
        elif value and "kernel" in raw:
            chk.error(f"{where}.fio", "fio = true picks the project's image with fio in it; a VM with a kernel of "
                                      "its own has no such variant")
        else:
            fio = value
    limits = Limits()
    if "limits" in raw:
        limits = _parse_limits(chk, f"{where}.limits", raw["limits"]) or limits
        if limits.rss_bytes is not None and memory_mib is not None and limits.rss_bytes <= memory_mib << 20:
            chk.error(f"{where}.limits.rss", f"rss {raw['limits']['rss']!r} is not above the VM's memory "
                                             f"({memory_mib} MiB): QEMU's RSS grows to the VM's memory as the VM "
                                             f"touches it, and the VM would be killed for doing so; leave room for "
                                             f"QEMU itself (e.g. memory + 128M)")
    if len(chk.errors) != before or cpus is None or memory_mib is None or extra_args is None:
        return None
    return VmConfig(kernel=kernel, initrd=initrd, append=append, cpus=cpus, memory_mib=memory_mib, accel=accel,
                    extra_args=extra_args, fio=fio, limits=limits)


def _qemu_args(chk: Checker, where: str, value: object) -> tuple[str, ...] | None:
    """A VM's ``extra_args``: QEMU arguments, none of which takes the VM out of the supervisor's hands."""
    if not isinstance(value, list):
        chk.error(where, f"expected an array of strings (QEMU arguments), found {described_type(value)}")
        return None
    ok = True
    for k, arg in enumerate(value):
        if not isinstance(arg, str):
            chk.error(f"{where}[{k}]", f"expected a string, found {described_type(arg)}")
            ok = False
        elif "\0" in arg:
            chk.error(f"{where}[{k}]", "contains a NUL character, which no exec() argument can")
            ok = False
        elif arg in _FORBIDDEN_VM_ARGS:
            chk.error(f"{where}[{k}]", f"{arg} is not allowed: {_FORBIDDEN_VM_ARGS[arg]}")
            ok = False
    return tuple(value) if ok else None


def _parse_limits(chk: Checker, where: str, raw: object) -> Limits | None:
    if not isinstance(raw, Mapping):
        chk.error(where, f"expected a table (limits = {{ rss = \"64M\", fds = 256 }}), found {described_type(raw)}")
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

