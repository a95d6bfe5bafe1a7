"""The VM image xdom builds itself: Debian's cloud kernel and a busybox initramfs.

Tests, the demo and benchmarks need a real Linux guest, and a fresh machine
has no VM image and no network beyond the Debian mirror.  So the image is
made from Debian packages: the kernel of ``linux-image-cloud-amd64`` (its
``/boot/vmlinuz-*``; it has what a VM needs and boots in seconds), and an
initramfs written here in Python from ``busybox-static`` (one static binary
and its applet links), the kernel's virtio modules with their dependencies
(from ``modules.dep``; whatever the kernel has built in (``=y``) is left
out), and the ``/init`` of :mod:`.initscript`.  ``fio`` and every shared
library ``ldd`` names for it can be added as a second, optional layer
(Debian's fio links against ceph, gluster and ICU: ~85 MiB, stored
uncompressed so the VM does not gunzip it at every boot; only images asked
for with ``fio=True`` carry it, and they need 512 MiB of VM memory).

Images are cached in a directory named by a hash of every input (the stat
signature -- path, size, mtime -- of the kernel, each module, busybox and
the fio files, the init script, the module list and this builder's format
version), so a second call is a few stats and a JSON read.  The cache lives
in ``$XDOM_VM_IMAGE_DIR`` if set, else ``/var/cache/xdom/vm-image`` for root
and ``$XDG_CACHE_HOME/xdom/vm-image`` (``~/.cache``) for others.  Parallel
builders (pytest-xdist workers) serialize on a lock file and build into a
temporary directory renamed into place, so nobody sees half an image.
"""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .cpio import CpioWriter
from .initscript import INIT_SCRIPT

FORMAT_VERSION = 2
KERNEL_PACKAGE = "linux-image-cloud-amd64"
DEB_PACKAGES = ("linux-image-cloud-amd64", "busybox-static", "qemu-system-x86")
BUSYBOX = "/bin/busybox"

# What the VM needs from the kernel: the PCI transport, the block and net
# drivers (vhost-user-blk and vhost-user-net look like plain virtio devices
# to the guest) and virtio-console (an optional second console, hvc0).
# Dependencies (virtio, virtio_ring, failover, ...) come from modules.dep.
VIRTIO_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console")
# The ACPI power button and its input events: QMP's system_powerdown (how the supervisor stops a VM) presses
# it, and /init powers off when it sees the press.
POWER_MODULES = ("button", "evdev")
GUEST_MODULES = VIRTIO_MODULES + POWER_MODULES
# Config symbols of those drivers, to say which are built in rather than modules.
_CONFIG_SYMBOLS = {"virtio_pci": "CONFIG_VIRTIO_PCI", "virtio_blk": "CONFIG_VIRTIO_BLK",
                   "virtio_net": "CONFIG_VIRTIO_NET", "virtio_console": "CONFIG_VIRTIO_CONSOLE",
                   "button": "CONFIG_ACPI_BUTTON", "evdev": "CONFIG_INPUT_EVDEV"}

DEFAULT_APPEND = "console=ttyS0 panic=-1 quiet loglevel=3"


class ImageError(RuntimeError):
    """The image cannot be built (a package missing and not installable, a module not found)."""


@dataclasses.dataclass(frozen=True)
class VmImage:
    """A built image: what ``-kernel`` and ``-initrd`` take, and what went into it."""

    directory: Path
    kernel: Path
    initrd: Path
    kernel_release: str
    modules: tuple[str, ...]           # load order, paths relative to /lib/modules in the VM
    builtin: tuple[str, ...]           # drivers the kernel has built in (nothing to load)
    fio: bool
    min_memory_mib: int                # what the VM needs to unpack this initrd whole
    build_seconds: float               # how long the cold build took (0 if never measured)
    cached: bool                       # this call found the image already built
    manifest: dict[str, Any] = dataclasses.field(compare=False, repr=False)

    def append(self, *extra: str) -> str:
        """The default kernel command line plus ``extra`` (e.g. ``xdom.ip=10.77.0.1/24``)."""
        return " ".join((DEFAULT_APPEND,) + tuple(e for e in extra if e))


# ----------------------------------------------------------------- packages

def _dpkg_installed(pkg: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip().endswith(" installed")


def ensure_packages(packages: Iterable[str], install: bool = True) -> list[str]:
    """Install the Debian packages that are missing (as root); returns those installed.

    As the Makefile does: try ``apt-get install`` on the current lists, and
    only if that fails ``apt-get update`` and try again.  Not root, or
    ``install=False``, a missing package is an :class:`ImageError` naming it.
    """
    missing = [p for p in packages if not _dpkg_installed(p)]
    if not missing:
        return []
    if not install or os.geteuid() != 0:
        raise ImageError(f"missing Debian packages: {' '.join(missing)} "
                         f"(run as root, or apt-get install -y {' '.join(missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", *missing]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise ImageError(f"apt-get install {' '.join(missing)} failed: {r.stderr.strip()[-2000:]}")
    return missing


def default_kernel_release() -> str:
    """The release ``linux-image-cloud-amd64`` points at (the newest cloud kernel in /boot otherwise)."""
    r = subprocess.run(["dpkg-query", "-W", "-f=${Depends}", KERNEL_PACKAGE], capture_output=True, text=True)
    m = re.search(r"linux-image-(\S+-cloud-amd64)", r.stdout)
    if m and Path(f"/boot/vmlinuz-{m.group(1)}").exists():
        return m.group(1)
    found = sorted(Path("/boot").glob("vmlinuz-*-cloud-amd64"), key=lambda p: p.stat().st_mtime)
    if found:
        return found[-1].name[len("vmlinuz-"):]
    raise ImageError(f"no cloud kernel in /boot (apt-get install -y {KERNEL_PACKAGE})")


# ------------------------------------------------------------------ modules

def read_kernel_config(release: str) -> dict[str, str]:
    """``/boot/config-RELEASE`` as {symbol: value}; empty if the file is missing."""
    cfg: dict[str, str] = {}
    try:
        text = Path(f"/boot/config-{release}").read_text()
    except FileNotFoundError:
        return cfg
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            k, v = line.split("=", 1)
            cfg[k] = v
    return cfg


def _modname(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base)
    return base.replace("-", "_")


def resolve_modules(release: str, wanted: Iterable[str] = GUEST_MODULES,
                    moddir: str = "/lib/modules") -> tuple[list[str], list[str]]:
    """The module files to load, dependencies first, and the wanted drivers that are built in.

    ``modules.dep`` lists each module's full dependency closure; a module is
    emitted after everything it depends on, each once.  A wanted driver
    that is neither a module nor built in (per ``modules.builtin`` or the
    kernel config) is an error: the VM would boot without its disk.
    """
    root = Path(moddir) / release
    deps: dict[str, tuple[str, list[str]]] = {}
    try:
        dep_text = (root / "modules.dep").read_text()
    except FileNotFoundError as e:
        raise ImageError(f"{root}/modules.dep missing: is the kernel package installed?") from e
    for line in dep_text.splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[_modname(path)] = (path, rest.split())
    builtin_names: set[str] = set()
    try:
        builtin_names = {_modname(p) for p in (root / "modules.builtin").read_text().split()}
    except FileNotFoundError:
        pass
    config = read_kernel_config(release)
    order: list[str] = []
    builtin: list[str] = []

    def visit(name: str) -> None:
        path, dlist = deps[name]
        if path in order:
            return
        for d in dlist:
            visit(_modname(d))
        if path not in order:
            order.append(path)

    for w in wanted:
        name = w.replace("-", "_")
        if name in deps:
            visit(name)
        elif name in builtin_names or config.get(_CONFIG_SYMBOLS.get(name, "")) == "y":
            builtin.append(name)
        else:
            raise ImageError(f"kernel {release} has no module or built-in driver {name}")
    return order, builtin


def _module_bytes(path: Path) -> tuple[str, bytes]:
    """A module's file name in the VM (uncompressed: busybox insmod takes plain .ko) and bytes."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko.xz"):
        return name[:-3], lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return name[:-3], gzip.decompress(data)
    if name.endswith(".ko.zst"):
        # no zstd in Python 3.11's standard library; Debian kernels that compress use xz,
        # but the zstd tool (Debian package zstd) handles the others
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ImageError(f"{path} is zstd-compressed and there is no zstd tool (apt-get install zstd)")
        return name[:-4], subprocess.run([zstd, "-dc", str(path)], capture_output=True, check=True).stdout
    return name, data


# ---------------------------------------------------------------------- fio

def fio_files(fio: str = "/usr/bin/fio") -> list[tuple[str, str]]:
    """``(path in the VM, file to read)`` for fio and every library ``ldd`` resolves for it.

    Each library goes where the loader found it on the host (so RUNPATHs
    such as ceph's private directory keep working) with the content of the
    file its symlinks end at.
    """
    r = subprocess.run(["ldd", fio], capture_output=True, text=True)
    if r.returncode != 0:
        raise ImageError(f"ldd {fio}: {r.stderr.strip()}")
    out = [(fio, fio)]
    for line in r.stdout.splitlines():
        line = line.strip()
        m = re.match(r"\S+ => (/\S+) \(0x[0-9a-f]+\)$", line) or re.match(r"(/\S+) \(0x[0-9a-f]+\)$", line)
        if m:
            out.append((m.group(1), os.path.realpath(m.group(1))))
        elif "not found" in line:
            raise ImageError(f"ldd {fio}: {line}")
    return out


# -------------------------------------------------------------------- cache

def default_cache_root() -> Path:
    if os.environ.get("XDOM_VM_IMAGE_DIR"):
        return Path(os.environ["XDOM_VM_IMAGE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/cache/xdom/vm-image")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xdom" / "vm-image"


def _stat_sig(path: str) -> list[Any]:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


@dataclasses.dataclass
class _Inputs:
    release: str
    kernel: str
    modules: list[str]           # absolute paths on the host, load order
    builtin: list[str]
    fio: list[tuple[str, str]]   # empty if no fio layer
    key: str = ""

    def compute_key(self) -> str:
        sig = {
            "format": FORMAT_VERSION,
            "release": self.release,
            "kernel": _stat_sig(self.kernel),
            "busybox": _stat_sig(BUSYBOX),
            "init": INIT_SCRIPT,
            "modules": [_stat_sig(m) for m in self.modules],
            "builtin": self.builtin,
            "fio": [[dst, *_stat_sig(src)] for dst, src in self.fio],
        }
        self.key = hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:20]
        return self.key


def _gather(release: str | None, fio: bool, moddir: str) -> _Inputs:
    release = release or default_kernel_release()
    kernel = f"/boot/vmlinuz-{release}"
    if not os.path.exists(kernel):
        raise ImageError(f"{kernel} missing")
    if not os.path.exists(BUSYBOX):
        raise ImageError(f"{BUSYBOX} missing (apt-get install -y busybox-static)")
    order, builtin = resolve_modules(release, moddir=moddir)
    root = Path(moddir) / release
    return _Inputs(release, kernel, [str(root / m) for m in order], builtin, fio_files() if fio else [])


# -------------------------------------------------------------------- build

def _busybox_applets() -> list[str]:
    r = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True, check=True)
    return [a for a in r.stdout.split() if a and not a.endswith("/busybox")]


def build_base_cpio(inp: _Inputs) -> tuple[bytes, list[str]]:
    """The base initramfs (uncompressed) and the module names it loads in order."""
    buf = io.BytesIO()
    w = CpioWriter(buf)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/xdom", "lib/modules", "proc", "sys", "dev",
              "tmp", "run", "root", "mnt", "var/tmp"):
        w.directory(d)
    w.device("dev/console", "c", 5, 1, 0o600)
    w.device("dev/null", "c", 1, 3, 0o666)
    w.device("dev/ttyS0", "c", 4, 64, 0o600)
    w.file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
    for applet in _busybox_applets():
        depth = applet.count("/")
        w.symlink(applet, "../" * depth + "bin/busybox")
    loaded: list[str] = []
    for m in inp.modules:
        name, data = _module_bytes(Path(m))
        w.file(f"lib/modules/{name}", data, 0o644)
        loaded.append(name)
    w.file("etc/xdom/modules", "".join(n + "\n" for n in loaded).encode())
    w.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    w.file("etc/group", b"root:x:0:\n")
    w.file("etc/hostname", b"xdom-vm\n")
    w.file("init", INIT_SCRIPT.encode(), 0o755)
    w.close()
    return buf.getvalue(), loaded


def build_fio_cpio(files: list[tuple[str, str]]) -> bytes:
    """The fio layer: fio and its libraries at the paths the loader finds them."""
    buf = io.BytesIO()
    w = CpioWriter(buf)
    # directories the base archive made already (lib, usr/bin) are named again: the kernel
    # ignores mkdir's EEXIST while unpacking, so each layer stands on its own
    for dst, src in files:
        w.file(dst, Path(src).read_bytes(), 0o755)
    w.close()
    return buf.getvalue()


def _gz(data: bytes, level: int) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


def _build(inp: _Inputs, dest: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    shutil.copyfile(inp.kernel, dest / "vmlinuz")
    base, loaded = build_base_cpio(inp)
    initrd = _gz(base, 6)
    fio_size = 0
    if inp.fio:
        # Uncompressed: the VM would gunzip ~80 MiB of libraries at every boot (under TCG that doubled
        # the boot, 13 s against 7 s).  The kernel looks for the next archive's magic at a multiple of
        # 4 bytes and skips zeros, so the gzip member before it is padded.
        layer = build_fio_cpio(inp.fio)
        fio_size = len(layer)
        initrd += b"\0" * (-len(initrd) % 4) + layer
    (dest / "initrd.img").write_bytes(initrd)
    manifest = {
        "format": FORMAT_VERSION,
        "key": inp.key,
        "kernel_release": inp.release,
        "kernel_source": inp.kernel,
        "modules": loaded,
        "builtin": inp.builtin,
        "busybox": subprocess.run([BUSYBOX], capture_output=True, text=True).stdout.split("\n", 1)[0],
        "fio": bool(inp.fio),
        "fio_files": [dst for dst, _ in inp.fio],
        "base_cpio_bytes": len(base),
        "fio_cpio_bytes": fio_size,
        "initrd_bytes": len(initrd),
        # the kernel holds the initrd and its unpacked copy at once; short of memory it leaves files
        # truncated (fio then dies with SIGBUS), so the fio image says what it needs
        "min_memory_mib": 512 if inp.fio else 128,
        "build_seconds": round(time.monotonic() - t0, 3),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for p in dest.iterdir():
        p.chmod(0o644)
    dest.chmod(0o755)        # QEMU may run under another uid than the builder
    return manifest


def _image(directory: Path, manifest: dict[str, Any], cached: bool) -> VmImage:
    return VmImage(directory=directory, kernel=directory / "vmlinuz", initrd=directory / "initrd.img",
                   kernel_release=manifest["kernel_release"], modules=tuple(manifest["modules"]),
                   builtin=tuple(manifest["builtin"]), fio=manifest["fio"],
                   min_memory_mib=manifest["min_memory_mib"],
                   build_seconds=manifest["build_seconds"], cached=cached, manifest=manifest)


def ensure_image(*, fio: bool = False, release: str | None = None, cache_root: str | os.PathLike[str] | None = None,
                 install: bool = True, moddir: str = "/lib/modules") -> VmImage:
    """Build the image if it is not cached yet; return where it is.

    ``release`` picks another installed kernel (``/boot/vmlinuz-RELEASE``)
    instead of the one ``linux-image-cloud-amd64`` points at.  ``install``
    lets a root caller ``apt-get install`` what is missing.
    """
    pkgs = list(DEB_PACKAGES) + (["fio"] if fio else [])
    if release is not None:
        pkgs.remove(KERNEL_PACKAGE)
    ensure_packages(pkgs, install=install)
    inp = _gather(release, fio, moddir)
    key = inp.compute_key()
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    manifest_path = final / "manifest.json"
    if manifest_path.exists():
        return _image(final, json.loads(manifest_path.read_text()), cached=True)
    with open(root / f".lock-{key}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if manifest_path.exists():             # another builder finished while we waited
            return _image(final, json.loads(manifest_path.read_text()), cached=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            manifest = _build(inp, tmp)
            if final.exists():                  # a stale half-made directory (no manifest)
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _image(final, manifest, cached=False)


def describe(img: VmImage) -> str:
    """Lines for ``xdom vm-image``: where the files are and what is inside."""
    m = img.manifest
    lines = [
        f"kernel   {img.kernel}  ({img.kernel_release})",
        f"initrd   {img.initrd}  ({m['initrd_bytes'] / 1e6:.1f} MB gzip; base {m['base_cpio_bytes'] / 1e6:.1f} MB"
        + (f", fio layer {m['fio_cpio_bytes'] / 1e6:.1f} MB" if img.fio else "") + ")",
        f"append   {img.append()}",
        f"modules  {' '.join(img.modules) or '-'}",
        f"built-in {' '.join(img.builtin) or '-'}",
        f"busybox  {m['busybox']}",
        f"fio      {'yes' if img.fio else 'no (--fio adds it)'}; the VM needs {img.min_memory_mib} MiB or more",
        f"cache    {img.directory} ({'cached' if img.cached else 'built'}; cold build took {img.build_seconds:.2f} s)",
    ]
    return "\n".join(lines)
