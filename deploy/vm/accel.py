"""``accel = "auto"``: KVM where it really works, TCG elsewhere, and why.

``/dev/kvm`` existing, opening and answering ``KVM_GET_API_VERSION`` is not
enough: in a nested VM (this project's CI machine) KVM takes the guest
through the firmware and into the kernel's real-mode setup, then hangs or
stops with "KVM internal error ... emulation failure", whatever ``-cpu``
says.  Only booting tells.  So "auto" does the cheap checks first, then
boots the project's own image (:mod:`.image`) once with KVM and a short
deadline, and counts KVM as working only if the VM's init ran a command and
powered off.  The verdict is cached per host kernel, CPU, QEMU binary and
guest kernel (``<cache>/accel/<key>.json``), so the probe's cost (about a
second where KVM works, the deadline where it hangs) is paid once.

``XDOM_VM_ACCEL=kvm|tcg`` skips the probe and says so.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from .image import ImageError, default_cache_root, ensure_image
from .qemu import ACCELS, QEMU, QemuProcess, VmPaths, VmSpec, qemu_argv

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
PROBE_TIMEOUT = 8.0      # a working KVM boots the image in ~1 s; TCG needs ~2.5 s anyway


@dataclasses.dataclass(frozen=True)
class AccelChoice:
    """The accelerator picked and a sentence saying why."""

    accel: str
    reason: str
    cached: bool = False

    def __str__(self) -> str:
        return f"{self.accel} ({self.reason})"


def kvm_device_problem(dev: str = "/dev/kvm") -> str | None:
    """Why ``dev`` cannot be used at all, or None if it opens and speaks KVM API 12."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return f"no {dev} (KVM module not loaded, or no hardware virtualization)"
        return f"cannot open {dev}: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as e:
        return f"{dev}: KVM_GET_API_VERSION failed: {e.strerror}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return f"{dev} speaks KVM API {version}, not {KVM_API_VERSION}"
    return None


def _cpu_signature() -> str:
    model = flags = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].strip()
            if model and flags:
                break
    except OSError:
        pass
    return f"{model}|{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def _probe_key(qemu_path: str, guest_release: str) -> str:
    st = os.stat(qemu_path)
    sig = [platform.release(), platform.version(), _cpu_signature(), qemu_path, st.st_size, st.st_mtime_ns,
           guest_release]
    return hashlib.sha256(json.dumps(sig).encode()).hexdigest()[:20]


def probe_kvm(qemu: str = QEMU, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot the project's image with KVM; ``(works, what happened)``.

    The VM runs one command from its kernel command line and powers off;
    QEMU exiting 0 after the command's end marker is success.  "KVM
    internal error" in QEMU's output, QEMU exiting otherwise, or nothing
    within ``timeout`` is failure.
    """
    img = ensure_image()
    d = tempfile.mkdtemp(prefix="xdom-kvm-probe-", dir="/tmp")
    try:
        paths = VmPaths.in_dir(d, "probe")
        cmd = base64.b64encode(b"grep -c ^processor /proc/cpuinfo").decode()
        spec = VmSpec(kernel=str(img.kernel), initrd=str(img.initrd), name="xdom-kvm-probe", memory="128M",
                      append=img.append(f"xdom.cmd={cmd}", "xdom.poweroff=1"))
        q = QemuProcess(qemu_argv(spec, paths, "kvm", qemu), paths, "kvm", "probe")
        t0 = time.monotonic()
        try:
            while True:
                text = q.log_text()
                if "KVM internal error" in text or "emulation failure" in text:
                    line = next((ln for ln in text.splitlines() if "KVM" in ln or "emulation" in ln), text)
                    return False, f"the probe VM stopped with {line.strip()!r} after {time.monotonic() - t0:.1f} s"
                rc = q.poll()
                if rc is not None:
                    console = Path(paths.console_log).read_text(errors="replace") \
                        if os.path.exists(paths.console_log) else ""
                    if rc == 0 and "XDOM-END cmdline 0" in console:
                        return True, f"a probe VM booted with KVM and powered off in {time.monotonic() - t0:.1f} s"
                    return False, f"the probe VM's QEMU exited with {rc}: {text.strip()[-300:]}"
                if time.monotonic() - t0 > timeout:
                    return False, (f"the probe VM showed no sign of life within {timeout:.0f} s under KVM "
                                   f"(nested KVM stalls in early boot here)")
                time.sleep(0.05)
        finally:
            q.stop(timeout=2)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def choose_accel(qemu: str = QEMU, cache_root: str | os.PathLike[str] | None = None,
                 refresh: bool = False) -> AccelChoice:
    """Resolve ``accel = "auto"``: the cheap checks, then the cached or a fresh boot probe."""
    forced = os.environ.get("XDOM_VM_ACCEL")
    if forced in ("kvm", "tcg"):
        return AccelChoice(forced, f"XDOM_VM_ACCEL={forced}")
    problem = kvm_device_problem()
    if problem:
        return AccelChoice("tcg", problem)
    qemu_path = shutil.which(qemu) or qemu
    try:
        img = ensure_image()
    except ImageError as e:
        # "KVM only where it really works": unverified is not known to work
        return AccelChoice("tcg", f"KVM could not be verified (no probe image: {e}); "
                                  f"XDOM_VM_ACCEL=kvm uses it unverified")
    root = Path(cache_root) if cache_root is not None else default_cache_root().parent / "accel"
    root.mkdir(parents=True, exist_ok=True)
    key = _probe_key(qemu_path, img.kernel_release)
    verdict_path = root / f"{key}.json"
    with open(root / f".lock-{key}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)       # one probe at a time, the others read its verdict
        if verdict_path.exists() and not refresh:
            v = json.loads(verdict_path.read_text())
            return AccelChoice(v["accel"], f"{v['reason']} (probed {v['when']}; cached in {verdict_path})",
                               cached=True)
        works, what = probe_kvm(qemu_path)
        accel = "kvm" if works else "tcg"
        v = {"accel": accel, "reason": what, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
             "host": platform.release(), "cpu": _cpu_signature(), "qemu": qemu_path,
             "guest": img.kernel_release}
        tmp = verdict_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(v, indent=2) + "\n")
        os.replace(tmp, verdict_path)
        return AccelChoice(accel, what)


def start_qemu(spec: VmSpec, paths: VmPaths, accel: str | None = None, qemu: str = QEMU) -> QemuProcess:
    """Start QEMU for ``spec``; ``accel`` overrides ``spec.accel`` ("auto" is resolved by a probe, cached)."""
    requested = accel or spec.accel
    if requested not in ACCELS:
        raise ValueError(f"accel {requested!r}: want one of {ACCELS}")
    if requested == "auto":
        choice = choose_accel(qemu=qemu)
        chosen, reason = choice.accel, choice.reason
    else:
        chosen, reason = requested, "asked for"
    return QemuProcess(qemu_argv(spec, paths, chosen, qemu), paths, chosen, reason)
