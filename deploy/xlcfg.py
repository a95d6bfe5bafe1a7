"""xl.cfg device strings: ``disk = [...]`` and ``vif = [...]`` items, read as Xen's xl reads them.

A topology describes devices in the syntax a Xen user already knows, so that
``disk = ["format=raw, vdev=xvda, access=rw, target=/srv/g1.img"]`` means in
xdom what it means in an ``xl create`` file.  The rules below follow
xl-disk-configuration(5), xl-network-configuration(5) and
xen-vbd-interface(7), and where those documents are silent, what xl itself
does (tools/libs/util/libxlu_disk_l.l, libxlu_vif.c, tools/xl/xl_parse.c and
libxl_device.c in xen.git).  xdom adds one key of its own, ``export=``: on a
disk ``export=nbd:PATH`` (the unix socket on which the guest serves the disk
to host programs over NBD) or ``export=vhost-user:PATH`` (the socket on which
the guest serves it to a VM as a vhost-user-blk device); on a vif
``export=vhost-user:PATH`` (a vhost-user-net device for a VM; without it a
vif is a TAP device in the guest's network namespace).

Where xdom is deliberately stricter than xl, it is because xl would silently
do something surprising (last-one-wins respecification, octal rate numbers, a
bare replenishment interval meaning seconds although the manual says
microseconds); each such place says so.

The parsers are pure: no file is opened, no name is resolved.  They raise
:class:`XlCfgError`, and nothing else, for any input string (the test suite
checks this with random strings), so a caller can report a bad topology
instead of crashing on it.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "DEFAULT_IPV4_PREFIX", "DEFAULT_IPV6_PREFIX", "DEFAULT_RATE_INTERVAL_US", "DISK_EXPORTS", "DISK_FORMATS",
    "EXPORTS_DIR", "EXPORT_NBD", "EXPORT_VHOST_USER", "VIF_EXPORTS", "MAX_SPEC_LEN", "MAX_UNIX_PATH", "MAX_VIF_QUEUES", "MTU_MAX",
    "MTU_MIN", "XEN_OUI",
    "DiskSpec", "VifRate", "VifSpec", "XlCfgError",
    "default_export", "default_vif_export", "export_dir", "generate_mac", "parse_disk", "parse_mac", "parse_rate", "parse_vif", "vdev_to_devid",
]

# A device string longer than this is a mistake, not a configuration; the
# limit also keeps every later step (regexes, int()) on small inputs.
MAX_SPEC_LEN = 4096
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_UNIX_PATH = 107
# A guest's export sockets live in RUN_DIR/exports/GUEST/, a directory only its uid may write; a relative
# export=nbd:NAME (or vhost-user:NAME) is a name there, a disk without export= gets VDEV.sock there, a vif of a
# VM guest vifDEVID.sock.
EXPORTS_DIR = "exports"
# The export= schemes: NBD for host programs, vhost-user for a VM (a VMM connects to the guest's socket).
EXPORT_NBD = "nbd"
EXPORT_VHOST_USER = "vhost-user"
DISK_EXPORTS = (EXPORT_NBD, EXPORT_VHOST_USER)
VIF_EXPORTS = (EXPORT_VHOST_USER,)
# Formats xl accepts (xl-disk-configuration(5), "format"); xdom's blkback
# serves raw only, which the topology layer enforces, not this parser.
DISK_FORMATS = ("raw", "qcow", "qcow2", "vhd", "qed")
# Xen's OUI: xl picks generated MACs from 00:16:3e:00:00:00-00:16:3e:7f:ff:ff.
XEN_OUI = (0x00, 0x16, 0x3E)
# xl's default credit replenishment interval (libxlu_vif.c): 50 ms.
DEFAULT_RATE_INTERVAL_US = 50_000
# The MTU range xdom accepts: 68 is IPv4's minimum (RFC 791), 9000 a jumbo frame.
MTU_MIN, MTU_MAX = 68, 9000
# xl passes ``ip=`` through to the hotplug script without a prefix length;
# xdom configures the address itself and needs one, so a bare address gets
# these (a /24 is what a small bridged test network uses).
DEFAULT_IPV4_PREFIX = 24
DEFAULT_IPV6_PREFIX = 64

_UINT32_MAX = (1 << 32) - 1
# Linux IFNAMSIZ is 16 including the NUL.
_IFNAMSIZ = 16


class XlCfgError(ValueError):
    """An xl device string xl would reject, or one xdom cannot honour.

    The message names the offending item and what was expected, and is
    meant to be shown to the user as is (prefixed with where the string came
    from).
    """


IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


# --------------------------------------------------------------------------
# helpers shared by both parsers

def _check_spec(spec: object, what: str) -> str:
    if not isinstance(spec, str):
        raise XlCfgError(f"a {what} specification must be a string, not {type(spec).__name__}")
    if len(spec) > MAX_SPEC_LEN:
        raise XlCfgError(f"{what} specification is {len(spec)} characters long; at most {MAX_SPEC_LEN} are allowed")
    for ch in spec:
        if not ch.isprintable() and ch not in " \t\n":
            raise XlCfgError(f"{what} specification contains the control character {ch!r}")
    return spec


def _hint(word: str, choices: list[str] | tuple[str, ...] | frozenset[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _decimal(text: str, what: str, max_digits: int = 10) -> int:
    """A plain decimal number: ASCII digits, no sign, no leading zero.

    xl reads several numbers with ``strtoul(..., 0)``, where ``010`` is
    eight; refusing leading zeros means xdom never reads a number differently
    from xl without saying so.
    """
    if not re.fullmatch(r"0|[1-9][0-9]*", text, re.ASCII):
        raise XlCfgError(f"{what} {text!r} is not a decimal number (digits only, no leading zero)")
    if len(text) > max_digits:
        raise XlCfgError(f"{what} {text!r} is too large")
    return int(text)


def _ifname(value: str, what: str) -> str:
    """A Linux network interface name, as the kernel's dev_valid_name() checks it."""
    if not value:
        raise XlCfgError(f"{what} is empty")
    if len(value.encode("utf-8", "surrogatepass")) >= _IFNAMSIZ:
        raise XlCfgError(f"{what} {value!r} is longer than {_IFNAMSIZ - 1} bytes (Linux IFNAMSIZ)")
    if value in (".", "..") or any(ch in "/:" or ch.isspace() for ch in value):
        raise XlCfgError(f"{what} {value!r} is not a valid Linux interface name (no '/', ':' or whitespace)")
    return value


# --------------------------------------------------------------------------
# virtual disk names (xen-vbd-interface(7))

_VDEV_RE = re.compile(r"(xvd|hd|sd)([a-z]+)([1-9][0-9]*)?", re.ASCII)
_DP_RE = re.compile(r"d(0|[1-9][0-9]*)p(0|[1-9][0-9]*)", re.ASCII)
# (max disk index, max partition) per name prefix, from the encoding table
# of xen-vbd-interface(7).
_VDEV_LIMITS = {"xvd": ((1 << 20) - 1, 255), "hd": (3, 63), "sd": (15, 15)}
_VDEV_EXPECTED = ("expected xvd<letters>[<partition>], hd[a-d][<partition>], sd[a-p][<partition>] "
                  "or d<disk>p<partition>; see xen-vbd-interface(7)")


def _letters_to_index(letters: str, limit: int) -> int | None:
    """Decode a drive-letter suffix: a, b, ..., z, aa, ab, ... -> 0, 1, ..., 25, 26, 27, ...

    This is bijective base 26 (libxl's device_virtdisk_matches), which
    gives xen-vbd-interface(7)'s example ``xvdtq`` = disk 536.  Returns None
    as soon as the index exceeds ``limit``, so a long suffix costs nothing.
    """
    index = -1
    for ch in letters:
        index = (index + 1) * 26 + (ord(ch) - ord("a"))
        if index > limit:
            return None
    return index


def _parse_vdev(vdev: str) -> tuple[str, int, int]:
    """Split a vdev into (kind, disk, partition); kind is "xvd", "hd" or "sd"."""
    if not isinstance(vdev, str):
        raise XlCfgError(f"vdev must be a string, not {type(vdev).__name__}")
    m = _DP_RE.fullmatch(vdev)
    if m:
        if len(m.group(1)) > 7 or len(m.group(2)) > 3:
            raise XlCfgError(f"vdev {vdev!r} is out of range: Xen virtual disks are d0..d{(1 << 20) - 1}, "
                             f"partitions 0..255")
        disk, part = int(m.group(1)), int(m.group(2))
        if disk > (1 << 20) - 1 or part > 255:
            raise XlCfgError(f"vdev {vdev!r} is out of range: Xen virtual disks are d0..d{(1 << 20) - 1}, "
                             f"partitions 0..255")
        return "xvd", disk, part
    m = _VDEV_RE.fullmatch(vdev)
    if not m:
        raise XlCfgError(f"vdev {vdev!r} is not a Xen virtual device name ({_VDEV_EXPECTED})")
    kind, letters, digits = m.group(1), m.group(2), m.group(3)
    max_disk, max_part = _VDEV_LIMITS[kind]
    index = _letters_to_index(letters, max_disk)
    part = 0 if digits is None else (int(digits) if len(digits) <= 3 else max_part + 1)
    if index is None or part > max_part:
        ranges = {"xvd": "Xen virtual disks xvda..xvdbgqcv (disk numbers below 2^20), partitions 1..255",
                  "hd": "IDE disks hda..hdd, partitions 1..63",
                  "sd": "SCSI disks sda..sdp, partitions 1..15"}[kind]
        raise XlCfgError(f"vdev {vdev!r} is out of range: {ranges}")
    return kind, index, part


def vdev_to_devid(vdev: str) -> int:
    """The xenstore device number of a virtual disk name (xen-vbd-interface(7)).

    ``xvdX`` disks and partitions up to 15 use ``202 << 8 | disk << 4 |
    partition`` (xvda = 51712), larger ones the extended ``1 << 28 | disk <<
    8 | partition``; ``sdX`` is ``8 << 8 | disk << 4 | partition``; ``hdX``
    is ``3 << 8`` (hda, hdb) or ``22 << 8`` (hdc, hdd) ``| (disk & 1) << 6 |
    partition``.  ``dNpM`` names Xen disk N partition M directly.  The
    frontend finds its device under ``device/vbd/<devid>``, so two disks of
    one guest must never share a number.

    Not supported: the deprecated bare-number form (a raw xenstore value in
    place of a name), which exists only for guests that predate the
    specification.
    """
    kind, disk, part = _parse_vdev(vdev)
    if kind == "xvd":
        if disk <= 15 and part <= 15:
            return (202 << 8) | (disk << 4) | part
        return (1 << 28) | (disk << 8) | part
    if kind == "hd":
        return ((3 if disk < 2 else 22) << 8) | ((disk & 1) << 6) | part
    return (8 << 8) | (disk << 4) | part


# --------------------------------------------------------------------------
# disks (xl-disk-configuration(5))

@dataclass(frozen=True)
class DiskSpec:
    """One parsed ``disk=`` item.

    ``target`` is None only for an empty cdrom drive.  ``mode`` is "r" or
    "w", the value blkback writes to xenstore.  ``export_path`` is the unix
    socket of xdom's ``export=SCHEME:PATH`` key and ``export_kind`` its
    scheme (``"nbd"`` or ``"vhost-user"``); both are None without the key
    (the topology then picks the guest's default: NBD for a process guest,
    vhost-user for a guest with a VM).  ``extra`` keeps keys and flags
    xl accepts and xdom does not act on (``script``, ``backendtype``,
    ``discard``, COLO settings...), so nothing a user wrote is silently
    lost; flags appear as booleans (``no-discard`` is ``discard: False``).
    """

    vdev: str
    target: str | None
    format: str = "raw"
    mode: Literal["r", "w"] = "w"
    devtype: Literal["disk", "cdrom"] = "disk"
    backend: str | None = None
    export_path: str | None = None
    export_kind: str | None = None
    extra: Mapping[str, str | bool] = field(default_factory=dict, hash=False)

    @property
    def devid(self) -> int:
        """The xenstore device number (see :func:`vdev_to_devid`)."""
        return vdev_to_devid(self.vdev)

    @property
    def readonly(self) -> bool:
        return self.mode == "r"

    def to_xl(self) -> str:
        """The canonical keyword form; ``parse_disk(d.to_xl()) == d``."""
        parts = [f"format={self.format}", f"vdev={self.vdev}", f"access={'ro' if self.readonly else 'rw'}"]
        if self.devtype != "disk":
            parts.append(f"devtype={self.devtype}")
        if self.backend is not None:
            parts.append(f"backend={self.backend}")
        if self.export_path is not None:
            parts.append(f"export={self.export_kind or EXPORT_NBD}:{self.export_path}")
        for key, value in self.extra.items():
            if isinstance(value, bool):
                parts.append(_DISK_FLAG_WORDS[key][value])
            else:
                parts.append(f"{key}={value}")
        if self.target is not None:
            # parse_disk drops one trailing comma from a target= value, as xl does
            parts.append(f"target={self.target}" + ("," if self.target.endswith(",") else ""))
        return ", ".join(parts)


# Flags (bare words) xl accepts: word -> (parameter, value).
_DISK_FLAGS: dict[str, tuple[str, str | bool]] = {
    "cdrom": ("devtype", "cdrom"),
    "direct-io-safe": ("direct-io-safe", True),
    "discard": ("discard", True),
    "no-discard": ("discard", False),
    "colo": ("colo", True),
    "no-colo": ("colo", False),
    "trusted": ("trusted", True),
    "untrusted": ("trusted", False),
}
_DISK_FLAG_WORDS = {"direct-io-safe": {True: "direct-io-safe"}, "discard": {True: "discard", False: "no-discard"},
                    "colo": {True: "colo", False: "no-colo"}, "trusted": {True: "trusted", False: "untrusted"}}
_DISK_POSITIONAL = ("target", "format", "vdev", "access")
# Keyword parameters xl accepts that xdom keeps in ``extra``, with their
# permitted values (None: any string).
_DISK_EXTRA_KEYS: dict[str, tuple[str, ...] | None] = {
    "backendtype": ("phy", "qdisk", "standalone", "tap"),
    "specification": ("xen", "virtio"),
    "grant_usage": ("0", "1"),
    "script": None,
    "colo-host": None,
    "colo-port": None,
    "colo-export": None,
    "active-disk": None,
    "hidden-disk": None,
}
_DISK_KEYS = frozenset({"target", "format", "vdev", "access", "devtype", "backend", "export", *_DISK_EXTRA_KEYS})
_KEY_RE = re.compile(r"[a-z][-a-z0-9_]*", re.ASCII)
_TARGET_KEY_RE = re.compile(r"\s*target\s*=", re.ASCII)
# "target=/a.img, backend=blk0": a key after target= would become part of
# the path (xl's rule).  No real path contains ", <disk key>=", so this is
# reported as a misplaced target= instead.
_MISPLACED_TARGET_RE = re.compile(r",\s*([a-z][-a-z0-9_]*)=", re.ASCII)
# Prefixes of the deprecated xend syntax, e.g. "phy:/dev/vg/lv" or "tap:aio:/img".
# xl's lexer knows a list of them and treats any other "word:" followed by a
# non-alphanumeric as an unknown prefix; "hdc:cdrom" is neither.
_DEPRECATED_PREFIX_RE = re.compile(
    r"(tapdisk|tap2?|aio|ioemu|file|phy|raw|qcow2?|vhd|iscsi|e?nbd|drbd):|([a-z][a-z0-9]*):(?![a-z0-9])", re.ASCII)


def _disk_items(spec: str) -> list[tuple[str, bool]]:
    """Split a disk spec at commas; returns (item, is_target_keyword) pairs.

    ``target=`` takes the rest of the string, commas included (xl: "it
    consumes the whole rest of the DISKSPEC ... Therefore in that case it
    must come last").  Like xl's lexer, a trailing comma ends the list
    rather than adding an empty positional parameter, and xl's lexer strips
    one trailing comma from a ``target=`` value too.
    """
    items: list[tuple[str, bool]] = []
    start = 0
    while True:
        m = _TARGET_KEY_RE.match(spec, start)
        if m:
            value = spec[m.end():].strip()
            if value.endswith(","):
                value = value[:-1]
            items.append((value, True))
            return items
        comma = spec.find(",", start)
        if comma < 0:
            last = spec[start:].strip()
            if last:
                items.append((last, False))
            return items
        items.append((spec[start:comma].strip(), False))
        start = comma + 1


def export_dir(run_dir: str, guest: str) -> str:
    """The directory of ``guest``'s export sockets: its own, the only place in the run directory it may write."""
    return os.path.join(run_dir, EXPORTS_DIR, guest)


def default_export(run_dir: str, guest: str, vdev: str) -> str:
    """The export socket of a disk without ``export=``: ``RUN_DIR/exports/GUEST/VDEV.sock``."""
    return os.path.join(export_dir(run_dir, guest), f"{vdev}.sock")


_DISK_EXPORT_WHY = "nbd serves the disk to host programs, vhost-user to a VM"
_VIF_EXPORT_WHY = "a vif without export= is a TAP device in the guest's network namespace"


def default_vif_export(run_dir: str, guest: str, devid: int) -> str:
    """The vhost-user socket of a VM guest's vif without ``export=``: ``RUN_DIR/exports/GUEST/vifDEVID.sock``."""
    return os.path.join(export_dir(run_dir, guest), f"vif{devid}.sock")


def _parse_export(value: str, where: str, schemes: tuple[str, ...], why: str) -> tuple[str, str]:
    """``SCHEME:PATH`` of an ``export=`` value: (scheme, path); XlCfgError naming what was expected."""
    scheme, sep, path = value.partition(":")
    if not sep or scheme not in schemes:
        raise XlCfgError(f"export {value!r}{where}: expected "
                         f"{' or '.join(f'{s}:<unix socket path>' for s in schemes)} ({why})")
    if not path:
        raise XlCfgError(f"export {value!r}{where}: the socket path after '{scheme}:' is empty")
    if path.startswith("/") and len(path.encode("utf-8", "surrogatepass")) > MAX_UNIX_PATH:
        raise XlCfgError(f"export socket path {path!r} is longer than {MAX_UNIX_PATH} bytes, "
                         f"the limit of a unix socket address")
    return scheme, path


def parse_disk(spec: str) -> DiskSpec:
    """Parse one xl ``disk=`` string, in keyword form, positional form or a mix.

    ``'format=raw, vdev=xvda, access=rw, target=/srv/g1.img'`` and
    ``'/srv/g1.img,raw,xvda,rw'`` are the same disk.  Items without ``=``
    that are not flags fill the positional parameters target, format, vdev,
    access in that order, skipping any already given by name; each parameter
    may be given once (an empty value means "the default" and may be given
    again, which is how ``,raw,xvda,rw,target=/a,b`` supplies a target with a
    comma).  Whitespace around items is ignored, including, unlike xl,
    trailing whitespace after a ``target=`` value: a path that ends in a blank
    is taken for a typo.

    Not supported (rejected with a message saying what to write instead):
    the deprecated xend syntax with prefixes (``phy:``, ``file:``,
    ``tap:aio:``, ``raw:``...) and ``vdev:devtype``, and xl's silent
    downgrade of an explicit ``access=rw`` on a cdrom to read-only.  xl
    prepends ``/dev/`` to a relative target; xdom keeps it relative (the
    topology resolves it against the host's state directory).  A
    ``target=`` value containing ``, <disk key>=`` is refused as a
    misplaced ``target=`` (xl would take the rest as part of the path).
    """
    spec = _check_spec(spec, "disk")
    given: dict[str, str | bool] = {}

    def give(name: str, value: str | bool, item: str) -> None:
        old = given.get(name)
        if old not in (None, "") and value != "" and old != value:
            was = f"'{_DISK_FLAG_WORDS[name][old]}'" if isinstance(old, bool) else f"{name}={old}"
            raise XlCfgError(f"{name} respecified in {item!r}: it is already given as {was}; "
                             f"each parameter may be given once")
        if old in (None, "") or value != "":
            given[name] = value

    for item, is_target in _disk_items(spec):
        if is_target:
            m = _MISPLACED_TARGET_RE.search(item)
            if m and m.group(1) in _DISK_KEYS:
                raise XlCfgError(f"target {item!r} contains '{m.group(0).lstrip(', ')}...': target= takes the "
                                 f"rest of the string, commas included, so it must be the last item; "
                                 f"move {m.group(1)}=... before it")
            give("target", item, "target=" + item)
            continue
        if "=" in item:
            key, value = (s.strip() for s in item.split("=", 1))
            if key not in _DISK_KEYS:
                if not _KEY_RE.fullmatch(key):
                    raise XlCfgError(f"bad disk syntax near {item!r}: a positional parameter cannot contain '=' "
                                     f"(write a target with '=' or ',' as the last item, target=...)")
                raise XlCfgError(f"unknown disk parameter {key!r} in {item!r}{_hint(key, _DISK_KEYS)}")
            _check_disk_value(key, value, item)
            give(key, value, item)
        elif item in _DISK_FLAGS:
            name, flag = _DISK_FLAGS[item]
            give(name, flag, item)
        else:
            m = _DEPRECATED_PREFIX_RE.match(item)
            if m:
                raise XlCfgError(f"deprecated xend prefix '{m.group(1) or m.group(2)}:' in {item!r} is not supported: "
                                 f"write the path alone, the format as format=..., a script as script=...")
            for slot in _DISK_POSITIONAL:
                if slot not in given:
                    break
            else:
                raise XlCfgError(f"too many positional parameters at {item!r}: target, format, vdev and access "
                                 f"are all given already")
            if slot != "target":
                _check_disk_value(slot, item, item)
            given[slot] = item

    devtype = str(given.get("devtype") or "disk")
    vdev = str(given.get("vdev") or "")
    if not vdev:
        raise XlCfgError("no vdev specified: vdev (e.g. vdev=xvda) is mandatory")
    access = str(given.get("access") or "")
    if devtype == "cdrom":
        if access in ("w", "rw"):
            raise XlCfgError(f"access={access} on a cdrom: a cdrom is read-only (xl would silently make it 'ro')")
        mode: Literal["r", "w"] = "r"
    else:
        mode = "r" if access in ("r", "ro") else "w"
    target = str(given.get("target") or "") or None
    if target is None and devtype != "cdrom":
        raise XlCfgError("no target specified: a disk needs target (only an empty cdrom drive may omit it)")
    export = str(given.get("export") or "")
    export_kind, export_path = _parse_export(export, "", DISK_EXPORTS, _DISK_EXPORT_WHY) if export else (None, None)
    extra = {k: v for k, v in given.items() if k not in _DISK_KEYS or k in _DISK_EXTRA_KEYS}
    extra = {k: v for k, v in extra.items() if v != ""}
    return DiskSpec(
        vdev=vdev,
        target=target,
        format=str(given.get("format") or "raw"),
        mode=mode,
        devtype="cdrom" if devtype == "cdrom" else "disk",
        backend=str(given.get("backend") or "") or None,
        export_path=export_path,
        export_kind=export_kind,
        extra=extra,
    )


def _check_disk_value(key: str, value: str, item: str) -> None:
    """Validate one parameter's value as soon as it is seen, so the error names the item."""
    if value == "":
        return  # an empty value means the default (xl-disk-configuration(5))
    where = "" if item == value else f" in {item!r}"
    if key == "format":
        if value not in DISK_FORMATS:
            raise XlCfgError(f"format {value!r}{where} is not one of {', '.join(DISK_FORMATS)}"
                             f"{_hint(value, DISK_FORMATS)}")
    elif key == "vdev":
        if ":" in value and _VDEV_RE.fullmatch(value.split(":", 1)[0]):
            raise XlCfgError(f"vdev {value!r}: the deprecated vdev:devtype form is not supported; "
                             f"write vdev={value.split(':', 1)[0]}, devtype={value.split(':', 1)[1]}")
        _parse_vdev(value)
    elif key == "access":
        if value not in ("r", "ro", "w", "rw"):
            raise XlCfgError(f"access {value!r}{where} is not one of r, ro (read-only), w, rw (read-write)")
    elif key == "devtype":
        if value not in ("disk", "cdrom"):
            raise XlCfgError(f"devtype {value!r}{where} is not 'disk' or 'cdrom'")
    elif key == "backend":
        if any(ch.isspace() or ch == "/" for ch in value):
            raise XlCfgError(f"backend {value!r}{where} is not a domain name")
    elif key == "export":
        _parse_export(value, where, DISK_EXPORTS, _DISK_EXPORT_WHY)
    elif key == "colo-port":
        port = _decimal(value, "colo-port", 5)
        if not 0 < port < 65536:
            raise XlCfgError(f"colo-port {value!r}{where} is not a TCP port (1..65535)")
    else:
        allowed = _DISK_EXTRA_KEYS.get(key)
        if allowed is not None and value not in allowed:
            raise XlCfgError(f"{key} {value!r}{where} is not one of {', '.join(allowed)}")


# --------------------------------------------------------------------------
# MAC addresses

_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", re.ASCII)


def parse_mac(value: str) -> str:
    """Validate a MAC address (six colon-separated pairs of hex digits); returns it in lower case.

    Multicast addresses (low bit of the first octet set, broadcast included)
    and the all-zero address cannot name one interface, so they are refused
    although xl would take them.
    """
    if not isinstance(value, str) or not _MAC_RE.fullmatch(value):
        raise XlCfgError(f"mac {value!r} is not a MAC address: expected six pairs of hex digits "
                         f"separated by colons, e.g. 00:16:3e:12:34:56")
    octets = [int(x, 16) for x in value.split(":")]
    if octets[0] & 1:
        raise XlCfgError(f"mac {value!r} is a multicast address (low bit of the first octet set); "
                         f"a vif needs a unicast address")
    if not any(octets):
        raise XlCfgError(f"mac {value!r} is all zeros; a vif needs a real unicast address")
    return value.lower()


def generate_mac(domain: str, index: int, attempt: int = 0) -> str:
    """A reproducible MAC for vif ``index`` of ``domain``, in Xen's OUI space.

    xl draws a random 00:16:3e:xx:xx:xx (fourth octet below 0x80) when a vif
    has no ``mac=``; xdom derives the same shape from a hash instead, so the
    same topology gives the same MACs on every start and ARP caches, DHCP
    leases and captures stay meaningful.  ``attempt`` picks another address
    should two vifs' hashes collide (the topology checks uniqueness).
    """
    digest = hashlib.sha256(f"xdom-vif\0{domain}\0{index}\0{attempt}".encode("utf-8", "surrogatepass")).digest()
    octets = (*XEN_OUI, digest[0] & 0x7F, digest[1], digest[2])
    return ":".join(f"{o:02x}" for o in octets)


# --------------------------------------------------------------------------
# vif rates (xl-network-configuration(5), "rate")

@dataclass(frozen=True)
class VifRate:
    """A vif's transmit limit: credit-based, ``bytes_per_interval`` replenished every ``interval_us``."""

    bytes_per_sec: int
    interval_us: int = DEFAULT_RATE_INTERVAL_US

    @property
    def bytes_per_interval(self) -> int:
        """The credit per interval, computed as xl does (rounded down)."""
        return self.bytes_per_sec * self.interval_us // 1_000_000

    def to_xl(self) -> str:
        """``RATE/s@INTERVAL`` that :func:`parse_rate` reads back to this value."""
        for unit, amount in (("B", self.bytes_per_sec), ("b", self.bytes_per_sec * 8)):
            for prefix, mult in (("G", 1000 ** 3), ("M", 1000 ** 2), ("K", 1000), ("", 1)):
                if amount % mult == 0 and amount // mult <= _UINT32_MAX:
                    return f"{amount // mult}{prefix}{unit}/s@{_format_interval(self.interval_us)}"
        raise ValueError(f"{self!r} cannot be written in xl's rate syntax")


def _format_interval(us: int) -> str:
    for unit, mult in (("s", 1_000_000), ("ms", 1000)):
        if us % mult == 0:
            return f"{us // mult}{unit}"
    return f"{us}us"


_RATE_RE = re.compile(r"([0-9]+)([GMK]?)([Bb])/s", re.ASCII)
_INTERVAL_RE = re.compile(r"([0-9]+)(s|ms|us)", re.ASCII)
_RATE_MULT = {"": 1, "K": 1000, "M": 1000 ** 2, "G": 1000 ** 3}
_INTERVAL_MULT = {"s": 1_000_000, "ms": 1000, "us": 1}


def parse_rate(value: str) -> VifRate:
    """Parse xl's ``RATE/s[@INTERVAL]``, e.g. ``10Mb/s``, ``250KB/s``, ``1MB/s@20ms``.

    RATE is a decimal number with an optional K, M or G (powers of 1000, as
    in libxlu_vif.c) and B for bytes or b for bits (divided by 8, rounded
    down); INTERVAL takes s, ms or us and defaults to 50 ms.  As in xl, the
    number before the multiplier must fit 32 bits and the interval in
    microseconds too.

    Stricter than xl: a bare INTERVAL number is refused (the manual says it
    is microseconds, xl's code reads seconds), so are xl's undocumented
    one-letter ``m``/``u`` suffixes, leading zeros (octal to xl), and limits
    that round to zero bytes per second or per interval.
    """
    if not isinstance(value, str):
        raise XlCfgError(f"rate must be a string, not {type(value).__name__}")
    rate_text, at, interval_text = value.partition("@")
    m = _RATE_RE.fullmatch(rate_text)
    if not m:
        raise XlCfgError(f"rate {value!r} is not RATE/s[@INTERVAL]: expected e.g. 10Mb/s, 250KB/s or 1MB/s@20ms "
                         f"(units B, KB, MB, GB for bytes, b, Kb, Mb, Gb for bits)")
    number = _decimal(m.group(1), "rate", max_digits=10)
    if number == 0 or number > _UINT32_MAX:
        raise XlCfgError(f"rate {value!r}: the number must be between 1 and {_UINT32_MAX}")
    bytes_per_sec = number * _RATE_MULT[m.group(2)]
    if m.group(3) == "b":
        bytes_per_sec //= 8
    if bytes_per_sec == 0:
        raise XlCfgError(f"rate {value!r} is less than one byte per second")
    interval_us = DEFAULT_RATE_INTERVAL_US
    if at:
        mi = _INTERVAL_RE.fullmatch(interval_text)
        if not mi:
            raise XlCfgError(f"rate {value!r}: interval {interval_text!r} is not a number with unit s, ms or us "
                             f"(e.g. @20ms)")
        n = _decimal(mi.group(1), "rate interval", max_digits=10)
        interval_us = n * _INTERVAL_MULT[mi.group(2)]
        if interval_us == 0 or interval_us > _UINT32_MAX:
            raise XlCfgError(f"rate {value!r}: interval must be between 1us and {_UINT32_MAX}us")
    rate = VifRate(bytes_per_sec, interval_us)
    if rate.bytes_per_interval == 0:
        raise XlCfgError(f"rate {value!r} gives less than one byte per {interval_us}us interval; "
                         f"raise the rate or lengthen the interval")
    return rate


# --------------------------------------------------------------------------
# vifs (xl-network-configuration(5))

@dataclass(frozen=True)
class VifSpec:
    """One parsed ``vif=`` item.  Unset keys are None: defaults are the caller's.

    ``mac`` is None when the string has none; the topology then fills in
    :func:`generate_mac`.  ``ip`` carries its prefix length.  ``nictype`` is
    xl's ``type`` key ("vif" or "ioemu").  ``export_kind`` and
    ``export_path`` come from xdom's ``export=vhost-user:PATH`` (None
    without it: the topology picks a TAP device for a process guest,
    vhost-user for a guest with a VM); ``queues`` from xdom's ``queues=N``,
    a vhost-user NIC's queue pairs (None: the VM's vCPUs, 1 without a VM).  ``extra`` keeps documented xl
    keys xdom does not act on (``gatewaydev``, ``devid``, ``vlan``,
    ``trusted``/``untrusted`` as ``trusted: bool``).
    """

    mac: str | None = None
    bridge: str | None = None
    ip: IPInterface | None = None
    rate: VifRate | None = None
    mtu: int | None = None
    model: str | None = None
    nictype: str | None = None
    vifname: str | None = None
    script: str | None = None
    backend: str | None = None
    export_kind: str | None = None
    export_path: str | None = None
    queues: int | None = None
    extra: Mapping[str, str | bool] = field(default_factory=dict, hash=False)

    def to_xl(self) -> str:
        """The canonical keyword form; ``parse_vif(v.to_xl()) == v``."""
        parts = []
        export = f"{self.export_kind or EXPORT_VHOST_USER}:{self.export_path}" if self.export_path else None
        for key, value in (("mac", self.mac), ("bridge", self.bridge), ("ip", self.ip),
                           ("rate", self.rate.to_xl() if self.rate else None), ("mtu", self.mtu),
                           ("model", self.model), ("type", self.nictype), ("vifname", self.vifname),
                           ("script", self.script), ("backend", self.backend), ("export", export),
                           ("queues", self.queues)):
            if value is not None:
                parts.append(f"{key}={value}")
        for key, extra in self.extra.items():
            if isinstance(extra, bool):
                parts.append("trusted" if extra else "untrusted")
            else:
                parts.append(f"{key}={extra}")
        return ", ".join(parts)


_VIF_FIELD_KEYS = ("mac", "bridge", "ip", "rate", "mtu", "model", "type", "vifname", "script", "backend", "export",
                   "queues")
MAX_VIF_QUEUES = 16     # a vhost-user NIC's most queue pairs (the guest domain's, netfront's most netif queues)
_VIF_EXTRA_KEYS = ("gatewaydev", "netdev", "devid", "vlan")
_VIF_KEYS = frozenset((*_VIF_FIELD_KEYS, *_VIF_EXTRA_KEYS))
_VIF_FLAGS = {"trusted": True, "untrusted": False}
_VLAN_TERM_RE = re.compile(r"[0-9]+(p|u)?|[0-9]+-[0-9]+u?|[0-9]+\+[0-9]+x[0-9]+u?", re.ASCII)


def _parse_ip(value: str) -> IPInterface:
    """``addr/prefix`` or a bare address (which gets the documented default prefix)."""
    if not value or any(ch.isspace() for ch in value):
        raise XlCfgError(f"ip {value!r}: expected one address, e.g. 10.77.0.1/24 "
                         f"(xdom does not take xl's space-separated lists)")
    if "%" in value:
        raise XlCfgError(f"ip {value!r}: a scoped IPv6 address cannot be a vif's address")
    addr_text, slash, prefix_text = value.partition("/")
    try:
        addr = ipaddress.ip_address(addr_text)
        if slash:
            prefix = _decimal(prefix_text, "ip prefix length", max_digits=3)
        else:
            prefix = DEFAULT_IPV4_PREFIX if addr.version == 4 else DEFAULT_IPV6_PREFIX
        if prefix > addr.max_prefixlen:
            raise XlCfgError(f"ip {value!r}: prefix length {prefix} is more than {addr.max_prefixlen}")
        iface = ipaddress.ip_interface(f"{addr}/{prefix}")
    except ValueError as e:  # ipaddress's AddressValueError / NetmaskValueError
        if isinstance(e, XlCfgError):
            raise
        raise XlCfgError(f"ip {value!r} is not an address with optional prefix length, e.g. 10.77.0.1/24: {e}") \
            from None
    if iface.ip.is_multicast or iface.ip.is_unspecified or iface.ip.is_loopback:
        raise XlCfgError(f"ip {value!r} is a multicast, unspecified or loopback address, not a host's address")
    if iface.version == 4 and prefix <= 30 and iface.ip in (iface.network.network_address,
                                                             iface.network.broadcast_address):
        raise XlCfgError(f"ip {value!r} is the network or broadcast address of {iface.network}")
    return iface


def _check_vlan(value: str) -> str:
    terms = value.split("/")
    for term in terms:
        if not _VLAN_TERM_RE.fullmatch(term) or len(term) > 16:
            raise XlCfgError(f"vlan {value!r}: term {term!r} is not VLAN, VLAN-VLAN or VLAN+OFFSETxCOUNT "
                             f"(each optionally with p or u)")
        for vid in re.findall(r"[0-9]+", term)[:2]:
            if not 1 <= int(vid) <= 4094:
                raise XlCfgError(f"vlan {value!r}: VLAN ID {vid} is not in 1..4094")
    return value


def parse_vif(spec: str) -> VifSpec:
    """Parse one xl ``vif=`` string: comma-separated ``key=value`` items and flags.

    The empty string is a valid vif (all defaults), as in xl.  Empty items
    are skipped and whitespace around items and values is ignored.

    Stricter than xl: a key given twice is an error (xl keeps the last one),
    and the undocumented keys xl also reads (``accel``, ``forwarddev`` and the
    ``colo_*`` family) are unknown here.
    """
    spec = _check_spec(spec, "vif")
    values: dict[str, str] = {}
    extra: dict[str, str | bool] = {}
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        if item in _VIF_FLAGS:
            if "trusted" in extra and extra["trusted"] != _VIF_FLAGS[item]:
                raise XlCfgError(f"{item!r} contradicts an earlier trusted/untrusted flag")
            extra["trusted"] = _VIF_FLAGS[item]
            continue
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq:
            raise XlCfgError(f"vif item {item!r} is not key=value (keys: {', '.join(sorted(_VIF_KEYS))})"
                             f"{_hint(item, _VIF_KEYS)}")
        if key not in _VIF_KEYS:
            raise XlCfgError(f"unknown vif parameter {key!r} in {item!r}{_hint(key, _VIF_KEYS)}")
        if key == "netdev":
            key = "gatewaydev"  # xl: "netdev is a deprecated alias of this option"
        if key in values or key in extra:
            raise XlCfgError(f"{key} respecified in {item!r}: each parameter may be given once")
        if not value:
            raise XlCfgError(f"{key} in {item!r} has an empty value")
        if key in _VIF_FIELD_KEYS:
            values[key] = value
        else:
            if key == "devid":
                _decimal(value, "devid", max_digits=9)
            elif key == "vlan":
                _check_vlan(value)
            elif key == "gatewaydev":
                _ifname(value, "gatewaydev")
            extra[key] = value

    mtu = None
    if "mtu" in values:
        mtu = _decimal(values["mtu"], "mtu", max_digits=5)
        if not MTU_MIN <= mtu <= MTU_MAX:
            raise XlCfgError(f"mtu {mtu} is outside {MTU_MIN}..{MTU_MAX}")
    queues = None
    if "queues" in values:
        queues = _decimal(values["queues"], "queues", max_digits=3)
        if not 1 <= queues <= MAX_VIF_QUEUES:
            raise XlCfgError(f"queues {queues} is outside 1..{MAX_VIF_QUEUES} (a VM's NIC's queue pairs)")
    nictype = values.get("type")
    if nictype is not None and nictype not in ("vif", "ioemu"):
        raise XlCfgError(f"type {nictype!r} is not 'vif' or 'ioemu'")
    model = values.get("model")
    if model is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", model, re.ASCII):
        raise XlCfgError(f"model {model!r} is not a device model name such as e1000 or rtl8139")
    backend = values.get("backend")
    if backend is not None and any(ch.isspace() or ch == "/" for ch in backend):
        raise XlCfgError(f"backend {backend!r} is not a domain name")
    export_kind = export_path = None
    if "export" in values:
        export_kind, export_path = _parse_export(values["export"], "", VIF_EXPORTS, _VIF_EXPORT_WHY)
    return VifSpec(
        mac=parse_mac(values["mac"]) if "mac" in values else None,
        bridge=_ifname(values["bridge"], "bridge") if "bridge" in values else None,
        ip=_parse_ip(values["ip"]) if "ip" in values else None,
        rate=parse_rate(values["rate"]) if "rate" in values else None,
        mtu=mtu,
        model=model,
        nictype=nictype,
        vifname=_ifname(values["vifname"], "vifname") if "vifname" in values else None,
        script=values.get("script"),
        backend=backend,
        export_kind=export_kind,
        export_path=export_path,
        queues=queues,
        extra=extra,
    )
