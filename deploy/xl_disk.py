"""xl ``disk=`` strings (xl-disk-configuration(5)) and virtual disk names (xen-vbd-interface(7)).

``format=raw, vdev=xvda, access=rw, target=/srv/g1.img`` reads as an
``xl create`` file reads it: keyword or positional items, flags, the
``target=`` that takes the rest of the string.  The vdev decides the
xenstore device number (:func:`vdev_to_devid`), the one thing two disks of a
guest must never share.  Shared rules (the error, the bounds, ``export=``)
are in :mod:`xdom.deploy.xlcfg`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .xlcfg import DISK_EXPORTS, EXPORT_NBD, XlCfgError, check_spec, decimal, did_you_mean, parse_export

__all__ = ["DISK_FORMATS", "DiskSpec", "parse_disk", "vdev_to_devid"]

# Formats xl accepts (xl-disk-configuration(5), "format"); xdom's blkback
# serves raw only, which the topology layer enforces, not this parser.
DISK_FORMATS = ("raw", "qcow", "qcow2", "vhd", "qed")


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


_DISK_EXPORT_WHY = "nbd serves the disk to host programs, vhost-user to a VM"


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
    spec = check_spec(spec, "disk")
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
                raise XlCfgError(f"unknown disk parameter {key!r} in {item!r}{did_you_mean(key, _DISK_KEYS)}")
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
    export_kind, export_path = parse_export(export, "", DISK_EXPORTS, _DISK_EXPORT_WHY) if export else (None, None)
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
                             f"{did_you_mean(value, DISK_FORMATS)}")
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
        parse_export(value, where, DISK_EXPORTS, _DISK_EXPORT_WHY)
    elif key == "colo-port":
        port = decimal(value, "colo-port", 5)
        if not 0 < port < 65536:
            raise XlCfgError(f"colo-port {value!r}{where} is not a TCP port (1..65535)")
    else:
        allowed = _DISK_EXTRA_KEYS.get(key)
        if allowed is not None and value not in allowed:
            raise XlCfgError(f"{key} {value!r}{where} is not one of {', '.join(allowed)}")

