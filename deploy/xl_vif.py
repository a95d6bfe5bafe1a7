"""xl ``vif=`` strings (xl-network-configuration(5)): MAC addresses, rates, and the vif itself.

``mac=00:16:3e:00:00:01, bridge=xdombr0, ip=10.77.0.1/24, rate=10Mb/s``
reads as xl reads it, with xdom's ``export=vhost-user:PATH`` and
``queues=N`` for a VM's NIC.  A vif without ``mac=`` gets a MAC derived from
its domain's name (:func:`generate_mac`), the same on every start.  Shared
rules (the error, the bounds, ``export=``) are in :mod:`xdom.deploy.xlcfg`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .xlcfg import EXPORT_VHOST_USER, VIF_EXPORTS, XlCfgError, check_spec, decimal, did_you_mean, parse_export

__all__ = [
    "DEFAULT_IPV4_PREFIX", "DEFAULT_IPV6_PREFIX", "DEFAULT_RATE_INTERVAL_US", "MAX_VIF_QUEUES", "MTU_MAX", "MTU_MIN",
    "XEN_OUI", "VifRate", "VifSpec", "generate_mac", "parse_mac", "parse_rate", "parse_vif",
]

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


IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

_VIF_EXPORT_WHY = "a vif without export= is a TAP device in the guest's network namespace"


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
    number = decimal(m.group(1), "rate", max_digits=10)
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
        n = decimal(mi.group(1), "rate interval", max_digits=10)
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
            prefix = decimal(prefix_text, "ip prefix length", max_digits=3)
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
    spec = check_spec(spec, "vif")
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
                             f"{did_you_mean(item, _VIF_KEYS)}")
        if key not in _VIF_KEYS:
            raise XlCfgError(f"unknown vif parameter {key!r} in {item!r}{did_you_mean(key, _VIF_KEYS)}")
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
                decimal(value, "devid", max_digits=9)
            elif key == "vlan":
                _check_vlan(value)
            elif key == "gatewaydev":
                _ifname(value, "gatewaydev")
            extra[key] = value

    mtu = None
    if "mtu" in values:
        mtu = decimal(values["mtu"], "mtu", max_digits=5)
        if not MTU_MIN <= mtu <= MTU_MAX:
            raise XlCfgError(f"mtu {mtu} is outside {MTU_MIN}..{MTU_MAX}")
    queues = None
    if "queues" in values:
        queues = decimal(values["queues"], "queues", max_digits=3)
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
        export_kind, export_path = parse_export(values["export"], "", VIF_EXPORTS, _VIF_EXPORT_WHY)
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
