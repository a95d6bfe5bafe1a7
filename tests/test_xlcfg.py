"""xl.cfg disk and vif strings, checked against the examples and numbers in Xen's own documents.

Sources: xl-disk-configuration(5), xl-network-configuration(5) and
xen-vbd-interface(7) in xen.git (docs/man/), and xl's parsers where the
documents are silent.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xdom.deploy.xl_disk import DiskSpec, parse_disk, vdev_to_devid
from xdom.deploy.xl_vif import (
    DEFAULT_RATE_INTERVAL_US,
    VifRate,
    VifSpec,
    generate_mac,
    parse_mac,
    parse_rate,
    parse_vif,
)
from xdom.deploy.xlcfg import MAX_SPEC_LEN, XlCfgError

# --------------------------------------------------------------------------
# vdev -> xenstore device number (xen-vbd-interface(7))


@pytest.mark.parametrize("vdev, devid", [
    # the document's own examples, with the encoding table applied
    ("xvda", 202 << 8),                                  # d0 / d0p0
    ("d0p0", 202 << 8),
    ("xvdb2", (202 << 8) | (1 << 4) | 2),                # d1p2
    ("d1p2", (202 << 8) | (1 << 4) | 2),
    ("xvdtq37", (1 << 28) | (536 << 8) | 37),            # d536p37
    ("d536p37", (1 << 28) | (536 << 8) | 37),
    ("sdb3", (8 << 8) | (1 << 4) | 3),                   # SCSI disk 1 partition 3
    ("hdc2", (22 << 8) | (0 << 6) | 2),                  # IDE disk 2 partition 2
    # boundaries of each encoding
    ("xvdp15", (202 << 8) | (15 << 4) | 15),             # last disk and partition of 202<<8
    ("xvdq", (1 << 28) | (16 << 8)),                     # disk 16: extended
    ("xvda16", (1 << 28) | 16),                          # partition 16: extended
    ("xvdz", (1 << 28) | (25 << 8)),                     # disk 25: extended
    ("xvdaa", (1 << 28) | (26 << 8)),                    # bijective base 26: aa follows z
    ("xvdaz", (1 << 28) | (51 << 8)),
    ("xvdba", (1 << 28) | (52 << 8)),
    ("xvda255", (1 << 28) | 255),
    ("xvdbgqcv", (1 << 28) | (((1 << 20) - 1) << 8)),    # the last disk number, 2^20 - 1
    ("d1048575p255", (1 << 28) | (((1 << 20) - 1) << 8) | 255),
    ("hda", 3 << 8),
    ("hdb", (3 << 8) | (1 << 6)),
    ("hdd", (22 << 8) | (1 << 6)),
    ("hda63", (3 << 8) | 63),
    ("sda", 8 << 8),
    ("sdp15", (8 << 8) | (15 << 4) | 15),
])
def test_vdev_to_devid_matches_xen_vbd_interface(vdev: str, devid: int) -> None:
    assert vdev_to_devid(vdev) == devid


def test_xvd_first_sixteen_disks_are_51712_plus_16n() -> None:
    for n in range(16):
        assert vdev_to_devid("xvd" + chr(ord("a") + n)) == 51712 + 16 * n
        assert vdev_to_devid(f"xvd{chr(ord('a') + n)}5") == 51712 + 16 * n + 5


@pytest.mark.parametrize("vdev, fragment", [
    ("xvdz9x", "is not a Xen virtual device name"),
    ("xvd", "is not a Xen virtual device name"),
    ("xvdA", "is not a Xen virtual device name"),
    ("xvda0", "is not a Xen virtual device name"),       # libxl: no leading zero, not even "0"
    ("xvda01", "is not a Xen virtual device name"),
    ("vda", "is not a Xen virtual device name"),
    ("51712", "is not a Xen virtual device name"),       # the deprecated bare number is not taken
    ("d0", "is not a Xen virtual device name"),          # libxl needs both d and p
    ("d01p1", "is not a Xen virtual device name"),
    ("", "is not a Xen virtual device name"),
    ("xvda256", "out of range"),
    ("xvdbgqcw", "out of range"),                        # disk 2^20
    ("d1048576p0", "out of range"),
    ("d0p256", "out of range"),
    ("hde", "out of range: IDE disks hda..hdd"),
    ("hda64", "out of range"),
    ("sdq", "out of range: SCSI disks sda..sdp"),
    ("sda16", "out of range"),
    ("xvd" + "z" * 500, "out of range"),
])
def test_bad_vdevs(vdev: str, fragment: str) -> None:
    with pytest.raises(XlCfgError) as e:
        vdev_to_devid(vdev)
    assert fragment in str(e.value)
    assert repr(vdev) in str(e.value)


# --------------------------------------------------------------------------
# disks (xl-disk-configuration(5))

XVDA = DiskSpec(vdev="xvda", target="/path/disk.img", format="raw", mode="w")


@pytest.mark.parametrize("spec", [
    "format=raw, vdev=xvda, access=rw, target=/path/disk.img",
    "/path/disk.img,raw,xvda,rw",
    "/path/disk.img,,xvda",
    "/path/disk.img,raw,xvda",
    "/path/disk.img,,xvda,",                              # trailing comma ends the list
    "/path/disk.img,raw,xvda,rw,",
    "  /path/disk.img ,  raw,xvda , rw  ",                # whitespace around items
    "vdev=xvda, /path/disk.img",                          # named vdev, positional target
    "format=raw,/path/disk.img,xvda",                     # named format is skipped positionally
    "access=rw, vdev=xvda, format=raw, /path/disk.img",
    "/path/disk.img,raw,vdev=xvda,rw",                   # named and positional mixed
    ",raw,xvda,rw,target=/path/disk.img",                 # empty positional target, then target=
    "vdev=xvda,target=/path/disk.img,",                   # xl strips one trailing comma from target=
    "vdev=xvda, target=/path/disk.img  ",
    "format=, vdev=xvda, access=, target=/path/disk.img",  # empty value = default
    "vdev = xvda , target = /path/disk.img",
])
def test_equivalent_disk_forms(spec: str) -> None:
    assert parse_disk(spec) == XVDA


def test_xl_doc_first_group_is_one_disk() -> None:
    # xl-disk-configuration(5): "these strings are equivalent" (bar the deprecated one)
    specs = ["/dev/vg/guest-volume,,hda", "/dev/vg/guest-volume,raw,hda,rw",
             "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume"]
    disks = {parse_disk(s) for s in specs}
    assert disks == {DiskSpec(vdev="hda", target="/dev/vg/guest-volume")}
    assert next(iter(disks)).devid == 768


def test_xl_doc_cdrom_group_is_one_disk() -> None:
    specs = ["/root/image.iso,,hdc,cdrom", "/root/image.iso,,hdc,,cdrom", "/root/image.iso,raw,hdc,devtype=cdrom",
             "format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso"]
    disks = {parse_disk(s) for s in specs}
    assert disks == {DiskSpec(vdev="hdc", target="/root/image.iso", mode="r", devtype="cdrom")}
    assert next(iter(disks)).readonly


def test_target_keyword_takes_the_rest_commas_included() -> None:
    d = parse_disk("vdev=xvda, target=/images/a,b c.img")
    assert d.target == "/images/a,b c.img"
    assert parse_disk(",,xvda,,target=/x,y").target == "/x,y"


def test_target_before_other_keys_is_reported_as_misplaced() -> None:
    # xl would make ", backend=blk0" part of the path; xdom says what happened
    with pytest.raises(XlCfgError) as e:
        parse_disk("format=raw, vdev=xvda, target=/srv/g1.img, backend=blk0, export=nbd:/run/g1.sock")
    assert "target= takes the rest of the string" in str(e.value)
    assert "move backend=... before it" in str(e.value)


def test_positional_access_and_readonly() -> None:
    assert parse_disk("/a,raw,xvda,ro").mode == "r"
    assert parse_disk("/a,raw,xvda,r").mode == "r"
    assert parse_disk("/a,raw,xvda,w").mode == "w"
    assert parse_disk("/a,,xvda,access=ro").mode == "r"
    assert parse_disk("/a,qcow2,xvdb").format == "qcow2"
    assert parse_disk("/a,vhd,xvdb").format == "vhd"


def test_cdrom_defaults_and_empty_drive() -> None:
    d = parse_disk("vdev=hdc, devtype=cdrom")
    assert d.target is None and d.mode == "r" and d.devtype == "cdrom"
    assert parse_disk(",,hdc,,cdrom").target is None
    with pytest.raises(XlCfgError, match="a cdrom is read-only"):
        parse_disk("/a.iso,,hdc,rw,cdrom")


def test_backend_and_export() -> None:
    d = parse_disk("vdev=xvda, backend=blk0, export=nbd:/run/xdom/g1-xvda.sock, target=/srv/g1.img")
    assert d.backend == "blk0"
    assert d.export_path == "/run/xdom/g1-xvda.sock"
    assert parse_disk("/a,,xvda,export=nbd:rel/g1.sock").export_path == "rel/g1.sock"


@pytest.mark.parametrize("spec, fragment", [
    ("/a,,xvda,export=/run/x.sock", "expected nbd:<unix socket path>"),
    ("/a,,xvda,export=iscsi:/x", "expected nbd:<unix socket path> or vhost-user:<unix socket path>"),
    ("/a,,xvda,export=nbd:", "the socket path after 'nbd:' is empty"),
    ("/a,,xvda,export=nbd:/" + "x" * 200, "longer than 107 bytes"),
])
def test_bad_exports(spec: str, fragment: str) -> None:
    with pytest.raises(XlCfgError) as e:
        parse_disk(spec)
    assert fragment in str(e.value)


def test_flags_and_ignored_keys_are_kept_in_extra() -> None:
    d = parse_disk("no-discard, untrusted, direct-io-safe, backendtype=phy, specification=xen, script=block-foo, "
                   "colo, colo-host=h, colo-port=9000, colo-export=e, active-disk=/a, hidden-disk=/h, "
                   "grant_usage=1, /dev/x, , xvda")
    assert d.extra == {"discard": False, "trusted": False, "direct-io-safe": True, "backendtype": "phy",
                       "specification": "xen", "script": "block-foo", "colo": True, "colo-host": "h",
                       "colo-port": "9000", "colo-export": "e", "active-disk": "/a", "hidden-disk": "/h",
                       "grant_usage": "1"}
    assert parse_disk(d.to_xl()) == d


@pytest.mark.parametrize("spec, fragment", [
    ("", "no vdev specified"),
    ("target=/a", "no vdev specified"),
    ("vdev=xvda", "no target specified"),
    ("/a,,xvdz9x", "vdev 'xvdz9x' is not a Xen virtual device name"),
    ("/a,ext4,xvda", "format 'ext4' is not one of raw, qcow, qcow2, vhd, qed"),
    ("/a,raw,xvda,rx", "access 'rx' is not one of r, ro"),
    ("/a,raw,xvda,rw,extra", "too many positional parameters at 'extra'"),
    ("/a,raw,xvda,vdev=xvdb", "vdev respecified"),
    ("format=raw,/a,qcow2,xvda", "vdev 'qcow2' is not"),     # format is named, so qcow2 lands on vdev
    ("/a,raw,xvda,format=qcow2", "format respecified"),
    ("discard,no-discard,/a,,xvda", "discard respecified"),
    ("cdrom,devtype=disk,/a,,hdc", "devtype respecified"),
    ("/a,,xvda,devtype=floppy", "devtype 'floppy'"),
    ("/a,,xvda,formt=raw", "unknown disk parameter 'formt' in 'formt=raw' (did you mean 'format'?)"),
    ("/a,,xvda,size=1G", "unknown disk parameter 'size'"),
    ("/a=b,,xvda", "a positional parameter cannot contain '='"),
    ("/a,,xvda,backendtype=nbd", "backendtype 'nbd' in 'backendtype=nbd' is not one of phy, qdisk, standalone, tap"),
    ("/a,,xvda,specification=scsi", "specification 'scsi'"),
    ("/a,,xvda,grant_usage=2", "grant_usage '2'"),
    ("/a,,xvda,colo-port=0", "not a TCP port"),
    ("/a,,xvda,colo-port=http", "not a decimal number"),
    ("/a,,xvda,backend=a b", "is not a domain name"),
    # deprecated xend syntax: refused with a pointer to the modern form
    ("phy:/dev/vg/lv,xvda,w", "deprecated xend prefix 'phy:'"),
    ("tap:aio:/img,xvda,w", "deprecated xend prefix 'tap:'"),
    ("file:images/a.img,xvda,w", "deprecated xend prefix 'file:'"),
    ("foo:/img,,xvda", "deprecated xend prefix 'foo:'"),
    ("raw:/dev/vg/guest-volume,hda,w", "deprecated xend prefix 'raw:'"),
    ("/a,raw,hdc:cdrom,r", "the deprecated vdev:devtype form is not supported"),
    ("/a\0b,,xvda", "control character"),
    ("/a\x1b,,xvda", "control character"),
])
def test_bad_disks(spec: str, fragment: str) -> None:
    with pytest.raises(XlCfgError) as e:
        parse_disk(spec)
    assert fragment in str(e.value)


def test_disk_spec_limits() -> None:
    with pytest.raises(XlCfgError, match="at most 4096"):
        parse_disk("/" + "a" * MAX_SPEC_LEN + ",,xvda")
    with pytest.raises(XlCfgError, match="must be a string"):
        parse_disk(123)  # type: ignore[arg-type]


def test_disk_to_xl_round_trips() -> None:
    for spec in ["/a,,xvda", "/a,qcow2,xvdb,ro", "vdev=hdc, devtype=cdrom", ",,xvdc,,target=/x,y,",
                 "/a,,sdb3,backend=blk1,export=nbd:s.sock,trusted"]:
        d = parse_disk(spec)
        assert parse_disk(d.to_xl()) == d


def test_disk_spec_is_hashable_and_frozen() -> None:
    d = parse_disk("/a,,xvda,discard")
    hash(d)
    with pytest.raises(AttributeError):
        d.vdev = "xvdb"  # type: ignore[misc]


# --------------------------------------------------------------------------
# rates (xl-network-configuration(5), "rate")


@pytest.mark.parametrize("text, bytes_per_sec, interval_us", [
    # the document's examples
    ("10Mb/s", 10_000_000 // 8, 50_000),                 # "up to 10 megabits every second"
    ("250KB/s", 250_000, 50_000),                        # "up to 250 kilobytes every second"
    ("1MB/s@20ms", 1_000_000, 20_000),                   # "20,000 bytes in every 20 millisecond period"
    # every unit
    ("100B/s", 100, 50_000),
    ("800b/s", 100, 50_000),
    ("1Kb/s", 125, 50_000),
    ("2GB/s", 2_000_000_000, 50_000),
    ("1Gb/s", 125_000_000, 50_000),
    ("5GB/s", 5_000_000_000, 50_000),                    # the number fits 32 bits, the product need not
    ("1MB/s@1s", 1_000_000, 1_000_000),
    ("1MB/s@250us", 1_000_000, 250),
    ("4294967295B/s", 4294967295, 50_000),
])
def test_rates(text: str, bytes_per_sec: int, interval_us: int) -> None:
    rate = parse_rate(text)
    assert rate == VifRate(bytes_per_sec, interval_us)
    assert parse_rate(rate.to_xl()) == rate


def test_rate_credit_per_interval_is_as_documented() -> None:
    # "for 1MB/s@20ms ... a credit of 20,000 bytes replenished every 20,000 us"
    rate = parse_rate("1MB/s@20ms")
    assert rate.bytes_per_interval == 20_000 and rate.interval_us == 20_000
    assert parse_rate("250KB/s").interval_us == DEFAULT_RATE_INTERVAL_US == 50_000


@pytest.mark.parametrize("text, fragment", [
    ("", "is not RATE/s"),
    ("10Mb", "is not RATE/s"),
    ("10mb/s", "is not RATE/s"),                          # xl's multipliers are upper case
    ("10 MB/s", "is not RATE/s"),
    ("10TB/s", "is not RATE/s"),
    ("-1MB/s", "is not RATE/s"),
    ("0MB/s", "between 1 and 4294967295"),
    ("4294967296B/s", "between 1 and 4294967295"),
    ("010MB/s", "no leading zero"),                      # octal to xl's strtoull(..., 0)
    ("1b/s", "less than one byte per second"),
    ("1MB/s@20", "is not a number with unit s, ms or us"),  # the manual says us, xl's code says s
    ("1MB/s@20m", "is not a number with unit s, ms or us"),
    ("1MB/s@", "is not a number with unit"),
    ("1MB/s@0ms", "interval must be between"),
    ("1MB/s@5000s", "interval must be between"),          # beyond 2^32 us
    ("1B/s@1ms", "less than one byte per 1000us interval"),
    ("1MB/s@20ms@1s", "is not a number with unit"),
])
def test_bad_rates(text: str, fragment: str) -> None:
    with pytest.raises(XlCfgError) as e:
        parse_rate(text)
    assert fragment in str(e.value)


# --------------------------------------------------------------------------
# MAC addresses


def test_mac_validation() -> None:
    assert parse_mac("00:16:3E:74:3d:76") == "00:16:3e:74:3d:76"
    assert parse_mac("02:00:00:00:00:01") == "02:00:00:00:00:01"      # locally administered
    for bad in ["00:16:3e:74:3d", "00:16:3e:74:3d:76:01", "0:16:3e:74:3d:76", "00-16-3e-74-3d-76",
                "00:16:3e:74:3d:7g", "", "001:16:3e:74:3d:76"]:
        with pytest.raises(XlCfgError, match="is not a MAC address"):
            parse_mac(bad)
    with pytest.raises(XlCfgError, match="multicast"):
        parse_mac("01:00:5e:00:00:01")
    with pytest.raises(XlCfgError, match="multicast"):
        parse_mac("ff:ff:ff:ff:ff:ff")
    with pytest.raises(XlCfgError, match="all zeros"):
        parse_mac("00:00:00:00:00:00")


def test_generated_macs_are_reproducible_and_in_xens_space() -> None:
    macs = {generate_mac(dom, i) for dom in ("g1", "g2", "a-long-domain-name") for i in range(4)}
    assert len(macs) == 12
    for mac in macs:
        assert mac.startswith("00:16:3e:")
        assert int(mac.split(":")[3], 16) < 0x80         # xl's range: fourth octet below 0x80
        assert parse_mac(mac) == mac
    assert generate_mac("g1", 0) == generate_mac("g1", 0)
    assert generate_mac("g1", 0, attempt=1) != generate_mac("g1", 0)


# --------------------------------------------------------------------------
# vifs (xl-network-configuration(5))


def test_xl_doc_vif_examples() -> None:
    v = parse_vif("mac=00:16:3E:74:3d:76,model=rtl8139,bridge=xenbr0")
    assert v == VifSpec(mac="00:16:3e:74:3d:76", model="rtl8139", bridge="xenbr0")
    assert parse_vif("mac=00:16:3E:74:34:32").mac == "00:16:3e:74:34:32"
    assert parse_vif("") == VifSpec()                     # "The empty string"
    assert parse_vif("mac=00:16:3e:5f:48:e4,bridge=xenbr1").bridge == "xenbr1"


def test_vif_all_keys() -> None:
    v = parse_vif(" mac=00:16:3e:00:00:01, bridge=xdombr0 ,ip=10.77.0.1/24, rate=10Mb/s@20ms, mtu=1400, "
                  "model=e1000, type=vif, vifname=vif-g1, script=vif-bridge, backend=net0,, ")
    assert v.mac == "00:16:3e:00:00:01"
    assert v.bridge == "xdombr0"
    assert v.ip == ipaddress.ip_interface("10.77.0.1/24")
    assert v.rate == VifRate(1_250_000, 20_000)
    assert v.mtu == 1400
    assert (v.model, v.nictype, v.vifname, v.script, v.backend) == ("e1000", "vif", "vif-g1", "vif-bridge", "net0")
    assert parse_vif(v.to_xl()) == v


def test_vif_ip_default_prefix_and_ipv6() -> None:
    assert parse_vif("ip=10.77.0.3").ip == ipaddress.IPv4Interface("10.77.0.3/24")
    assert parse_vif("ip=192.168.1.5/16").ip == ipaddress.IPv4Interface("192.168.1.5/16")
    assert parse_vif("ip=10.0.0.1/32").ip == ipaddress.IPv4Interface("10.0.0.1/32")
    assert parse_vif("ip=fd00::5").ip == ipaddress.IPv6Interface("fd00::5/64")
    assert parse_vif("ip=fd00::5/120").ip == ipaddress.IPv6Interface("fd00::5/120")


def test_vif_extra_keys() -> None:
    v = parse_vif("gatewaydev=eth0, devid=3, vlan=10p/100+10x4, untrusted")
    assert v.extra == {"gatewaydev": "eth0", "devid": "3", "vlan": "10p/100+10x4", "trusted": False}
    assert parse_vif("netdev=eth1").extra == {"gatewaydev": "eth1"}  # deprecated alias
    for vlan in ["10", "10p/20", "10p/100+10x4", "5-9u/10p"]:
        assert parse_vif(f"vlan={vlan}").extra["vlan"] == vlan
    assert parse_vif(v.to_xl()) == v


@pytest.mark.parametrize("spec, fragment", [
    ("brige=xenbr0", "unknown vif parameter 'brige' in 'brige=xenbr0' (did you mean 'bridge'?)"),
    ("accel=x", "unknown vif parameter 'accel'"),
    ("colo_checkpoint_host=h", "unknown vif parameter"),
    ("xenbr0", "is not key=value"),
    ("mac=00:16:3e:00:00", "is not a MAC address"),
    ("mac=00:16:3e:00:00:01,mac=00:16:3e:00:00:02", "mac respecified"),
    ("netdev=eth0,gatewaydev=eth1", "gatewaydev respecified"),
    ("bridge=", "has an empty value"),
    ("bridge=averyveryverylongname", "longer than 15 bytes"),
    ("bridge=a/b", "not a valid Linux interface name"),
    ("vifname=a:b", "not a valid Linux interface name"),
    ("ip=10.77.0.300", "is not an address"),
    ("ip=10.77.0.1/33", "prefix length 33 is more than 32"),
    ("ip=10.77.0.1/255.255.255.0", "not a decimal number"),
    ("ip=10.77.0.1 10.77.0.2", "expected one address"),
    ("ip=10.77.0.0/24", "network or broadcast address"),
    ("ip=10.77.0.255/24", "network or broadcast address"),
    ("ip=224.0.0.1", "multicast"),
    ("ip=127.0.0.1", "loopback"),
    ("ip=fe80::1%eth0", "scoped"),
    ("mtu=67", "outside 68..9000"),
    ("mtu=9001", "outside 68..9000"),
    ("mtu=1500b", "not a decimal number"),
    ("rate=10Mbit/s", "is not RATE/s"),
    ("type=virtio", "type 'virtio' is not 'vif' or 'ioemu'"),
    ("model=e1000 x", "is not a device model name"),
    ("devid=-1", "not a decimal number"),
    ("vlan=0", "not in 1..4094"),
    ("vlan=4095", "not in 1..4094"),
    ("vlan=10q", "is not VLAN"),
    ("trusted,untrusted", "contradicts"),
    ("backend=net 0", "is not a domain name"),
    ("mac=00:16:3e:00:00:01\x07", "control character"),
])
def test_bad_vifs(spec: str, fragment: str) -> None:
    with pytest.raises(XlCfgError) as e:
        parse_vif(spec)
    assert fragment in str(e.value)


# --------------------------------------------------------------------------
# nothing but XlCfgError, whatever the input

_FRAGMENTS = st.sampled_from([
    ",", ", ", "=", "target=", "format=", "vdev=", "access=", "devtype=", "backend=", "export=nbd:", "export=",
    "script=", "backendtype=", "colo-port=", "grant_usage=", "cdrom", "discard", "no-discard", "trusted",
    "untrusted", "raw", "qcow2", "xvda", "xvdq17", "hdc", "sdb3", "d1p2", "ro", "rw", "/img", "images/g1.img",
    "phy:", "tap:", ":", "mac=", "00:16:3e:00:00:01", "01:", "bridge=", "ip=", "10.77.0.1", "/24", "::1", "rate=",
    "10Mb/s", "@20ms", "@", "mtu=", "1500", "0", "99999999999999999999", "vlan=", "10p/", "+10x4", "netdev=",
    "gatewaydev=", "devid=", "type=", "vif", "model=", "vifname=", " ", "\t", "\n", "\x00", "é", "%",
])


@settings(max_examples=500, deadline=None, database=None)
@given(st.one_of(st.text(max_size=200), st.lists(_FRAGMENTS, max_size=24).map("".join)))
def test_parsers_raise_only_xlcfgerror(text: str) -> None:
    for parse in (parse_disk, parse_vif, parse_rate, parse_mac, vdev_to_devid):
        try:
            result = parse(text)
        except XlCfgError:
            continue
        # whatever parses, prints back to the same thing
        if isinstance(result, DiskSpec):
            assert parse_disk(result.to_xl()) == result
        elif isinstance(result, VifSpec):
            assert parse_vif(result.to_xl()) == result
        elif isinstance(result, VifRate):
            assert parse_rate(result.to_xl()) == result


@st.composite
def _disk_strings(draw: st.DrawFn) -> str:
    """Mostly valid disk strings in every form: positional, keyword, mixed, shuffled, with flags."""
    target = draw(st.sampled_from(["/img/a.img", "images/b.img", "/dev/vg/lv", "/p,with,commas", ""]))
    fmt = draw(st.sampled_from(["", "raw", "qcow2", "vhd"]))
    vdev = draw(st.sampled_from(["xvda", "xvdb3", "xvdaa", "hdc", "sdb3", "d5p1", "xvdz9x"]))
    access = draw(st.sampled_from(["", "r", "ro", "w", "rw"]))
    named = draw(st.lists(st.sampled_from(["format", "vdev", "access"]), unique=True))
    values = {"format": fmt, "vdev": vdev, "access": access}
    items = [f"{k}={values[k]}" for k in named]
    items += draw(st.lists(st.sampled_from(["backend=blk0", "export=nbd:/run/a.sock", "export=nbd:b.sock",
                                             "discard", "no-discard", "untrusted", "script=block-x",
                                             "backendtype=phy", "cdrom", "direct-io-safe", "colo-port=7"]),
                           unique=True, max_size=4))
    items = draw(st.permutations(items))
    positional = [target if "," not in target else "", *(values[k] for k in ("format", "vdev", "access")
                                                          if k not in named)]
    # positional parameters keep their relative order; keyword items go anywhere
    merged = list(items)
    at = 0
    for p in positional:
        at = draw(st.integers(at, len(merged)))
        merged.insert(at, p)
        at += 1
    sep = draw(st.sampled_from([",", ", ", " ,  "]))
    text = sep.join(merged)
    if "," in target or draw(st.booleans()):
        text += f"{sep}target={target}"
    return text


@st.composite
def _vif_strings(draw: st.DrawFn) -> str:
    items = draw(st.lists(st.sampled_from([
        "mac=00:16:3e:00:00:01", "mac=02:AB:cd:00:00:02", "bridge=xdombr0", "ip=10.77.0.5", "ip=10.77.0.5/16",
        "ip=fd00::1", "rate=10Mb/s", "rate=1MB/s@20ms", "rate=3GB/s@1s", "mtu=1400", "model=e1000", "type=vif",
        "vifname=vif1.0", "script=vif-bridge", "backend=net0", "gatewaydev=eth0", "devid=2", "vlan=10p/20",
        "trusted", "", "mtu=10",
    ]), max_size=8))
    return draw(st.sampled_from([",", ", "])).join(items)


@settings(max_examples=300, deadline=None, database=None)
@given(_disk_strings(), _vif_strings())
def test_plausible_strings_round_trip(disk: str, vif: str) -> None:
    for parse, text in ((parse_disk, disk), (parse_vif, vif)):
        try:
            result = parse(text)
        except XlCfgError:
            continue
        assert parse(result.to_xl()) == result  # type: ignore[attr-defined]
