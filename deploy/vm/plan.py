"""Which VMs a topology asks for, and whether this host can run them: refused before anything starts.

For each guest with a ``vm`` table: its QEMU, its image, its memory against
the host's, its accelerator (KVM or TCG) and its kernel command line, as a
:class:`VmPlan` the VM supervisor (``deploy/vm/supervised.py``) starts from.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..rundir import VMS_DIR  # RUN_DIR/vms/GUEST/: a VM's console and QMP sockets, made by its QEMU
from ..topology import DomainSpec, Topology, TopologyError, VmConfig, vif_devids
from ..xlcfg import MAX_UNIX_PATH
from .qemu import (
    QEMU,
    VmPaths,
)

if TYPE_CHECKING:
    from ..rundir import Layout
    from .image import VmImage

__all__ = ["VmPlan", "check_vms", "plan_vms", "vm_paths"]



def vm_paths(layout: Layout, guest: str) -> VmPaths:
    """Where ``guest``'s VM keeps its sockets (``RUN_DIR/vms/GUEST/``) and logs (``STATE_DIR/logs``)."""
    folder = os.path.join(layout.vms_dir, guest)
    return VmPaths(console=os.path.join(folder, "console.sock"), qmp=os.path.join(folder, "qmp.sock"),
                   console_log=layout.log_path(f"{guest}-console"), qemu_log=layout.log_path(f"{guest}-vm"))


# ---- what a VM will run: checked before anything starts -------------------------------------------

@dataclass(frozen=True)
class VmPlan:
    """A VM guest's resolved VM: the files it boots, its command line, the accelerator and why."""

    kernel: str
    initrd: str | None
    append: str
    accel: str
    accel_reason: str
    own_image: bool
    qemu: str


def _mem_total_mib() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) >> 10
    except (OSError, ValueError, IndexError):
        pass
    return None


def _append_for(spec: DomainSpec, vm: VmConfig, img: VmImage | None) -> str:
    """The VM's kernel command line.  The project's image gets the vifs' addresses (``xdom.ip=``, in order,
    up to the first vif without one) and the guest's name as host name, then ``append``."""
    if img is None:
        return vm.append if vm.append is not None else "console=ttyS0 panic=-1"
    ips = []
    for _, vif in vif_devids(spec.vifs):
        if vif.ip is None:
            break
        ips.append(str(vif.ip))
    extra = [f"xdom.hostname={spec.name}"] + ([f"xdom.ip={','.join(ips)}"] if ips else [])
    return img.append(*extra, vm.append or "")


def plan_vms(topology: Topology, *, resolve_accel: bool = True) -> tuple[dict[str, VmPlan], list[str]]:
    """Each VM guest's plan, and every reason one cannot work (each naming the topology key).

    Not pure: builds (or finds) the project's image, looks for QEMU and
    ``/dev/kvm``, and for ``accel = "auto"`` boots the cached KVM probe
    (:func:`xdom.deploy.vm.accel.choose_accel`) once per host.
    """
    from .accel import choose_accel, kvm_device_problem
    from .image import ImageError, ensure_image
    plans: dict[str, VmPlan] = {}
    problems: list[str] = []
    guests = [d for d in topology.domains if d.vm is not None]
    if not guests:
        return plans, problems
    src = topology.source

    def problem(d: DomainSpec, key: str, text: str) -> None:
        problems.append(f"{src}: {d.label}.{key}: {text}" if key else f"{src}: {d.label}: {text}")

    qemu = shutil.which(QEMU)
    if qemu is None:
        for d in guests:
            problem(d, "vm", f"{QEMU} is not installed (Debian package qemu-system-x86): nothing can run the VM")
        return plans, problems
    total = _mem_total_mib()
    for d in guests:
        vm = d.vm
        assert vm is not None
        img = None
        kernel, initrd = vm.kernel, vm.initrd
        if vm.own_image:
            try:
                img = ensure_image(fio=vm.fio)
            except ImageError as e:
                problem(d, "vm", f"the project's VM image cannot be made: {e}; or give kernel (and initrd) of "
                                 f"your own")
                continue
            kernel, initrd = str(img.kernel), str(img.initrd)
            if vm.memory_mib < img.min_memory_mib:
                problem(d, "vm.memory", f"{vm.memory_mib} MiB is less than the {img.min_memory_mib} MiB the "
                                        f"project's image{' with fio' if vm.fio else ''} needs (its kernel unpacks "
                                        f"the whole initramfs into RAM, then runs from it)")
        else:
            for key, path in (("kernel", kernel), ("initrd", initrd)):
                if path is None:
                    continue
                try:
                    st = os.stat(path)
                except OSError as e:
                    problem(d, f"vm.{key}", f"{path}: {e.strerror}")
                    continue
                if not stat.S_ISREG(st.st_mode):
                    problem(d, f"vm.{key}", f"{path} is not a file")
        if total is not None and vm.memory_mib > total:
            problem(d, "vm.memory", f"{vm.memory_mib} MiB is more than this host's memory ({total} MiB): the "
                                    f"VM's RAM is one shared memfd that QEMU and the guest domain map whole")
        accel, reason = vm.accel, "asked for in the topology"
        if vm.accel == "kvm":
            why = kvm_device_problem()
            if why is not None:
                problem(d, "vm.accel", f"\"kvm\" cannot work here: {why}; use \"tcg\" or \"auto\"")
        elif vm.accel == "auto" and resolve_accel:
            choice = choose_accel(qemu=qemu)
            accel, reason = choice.accel, f"auto: {choice.reason}"
        assert kernel is not None
        plans[d.name] = VmPlan(kernel, initrd, _append_for(d, vm, img), accel, reason, img is not None, qemu)
    total_vms = sum(d.vm.memory_mib for d in guests if d.vm is not None)
    if total is not None and len(guests) > 1 and total_vms > total:
        problems.append(f"{src}: the VMs' memory adds up to {total_vms} MiB, more than this host's {total} MiB")
    return plans, problems


def check_vms(topology: Topology, run_dir: str) -> dict[str, VmPlan]:
    """:func:`plan_vms` on a resolved topology, plus socket path lengths; raises TopologyError listing all."""
    plans, problems = plan_vms(topology)
    for d in topology.domains:
        if d.vm is None:
            continue
        folder = os.path.join(run_dir, VMS_DIR, d.name)
        longest = os.path.join(folder, "console.sock")
        if len(os.fsencode(longest)) > MAX_UNIX_PATH:
            problems.append(f"{topology.source}: {d.label}.vm: the VM's console socket {longest!r} would be longer "
                            f"than {MAX_UNIX_PATH} bytes, the limit of a unix socket address; choose a shorter "
                            f"--run-dir")
    if problems:
        raise TopologyError(problems + [f"{topology.source}: nothing was started"])
    return plans


# ---- QMP, without waiting --------------------------------------------------------------------------
