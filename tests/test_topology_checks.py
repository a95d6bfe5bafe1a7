"""Topology files across their domains: devices and backends, duplicates, generated MACs, start order, resolving."""

from __future__ import annotations

import ipaddress

import pytest
from topology_fixtures import HEAD, errors, guest, one_error, parse

from xdom.deploy import topology_checks
from xdom.deploy.export_paths import export_problem
from xdom.deploy.topology import DomainKind, HostSettings, TopologyError
from xdom.deploy.xl_vif import generate_mac
from xdom.deploy.xlcfg import default_export, export_dir

# --------------------------------------------------------------------------
# devices: the xl strings, with the file and key path in front


def test_bad_vdev_message_names_file_and_key_path() -> None:
    text = ('[[domain]]\nname = "xs"\nkind = "xenstored"\n[[domain]]\nname = "blk0"\nkind = "blkback"\n'
            + guest(disk='["/a,,xvda", "/b,,xvdz9x"]'))
    err = one_error(text)
    assert err.startswith("topo.toml: domain[2] (\"g1\").disk[1]: vdev 'xvdz9x' is not a Xen virtual device name")


def test_bad_vif_message_names_file_and_key_path() -> None:
    err = one_error(HEAD + guest(vif='["", "mac=00:16:3e:00:00"]'))
    assert err.startswith("topo.toml: domain[3] (\"g1\").vif[1]: mac '00:16:3e:00:00' is not a MAC address")


def test_disk_and_vif_forms_both_accepted() -> None:
    g = parse(HEAD + guest(disk='["/img/a.img,raw,xvda,rw", "format=raw, vdev=xvdb, access=ro, target=/img/b.img"]',
                           vif='["bridge=xdombr0, ip=10.77.0.9"]')).by_name("g1")
    assert [(d.vdev, d.target, d.mode, d.backend) for d in g.disks] == \
        [("xvda", "/img/a.img", "w", "blk0"), ("xvdb", "/img/b.img", "r", "blk0")]
    assert g.vifs[0].ip == ipaddress.ip_interface("10.77.0.9/24")


def test_only_raw_images_are_served() -> None:
    err = one_error(HEAD + guest(disk='["/a.qcow2,qcow2,xvda"]'))
    assert err == ("topo.toml: domain[3] (\"g1\").disk[0]: format 'qcow2' is not served: "
                   "xdom's blkback serves raw images only")


def test_empty_cdrom_is_not_served() -> None:
    err = one_error(HEAD + guest(disk='["vdev=hdc, devtype=cdrom"]'))
    assert "an empty cdrom drive (no target) is not served" in err


# --------------------------------------------------------------------------
# backends


def test_only_backend_is_the_default() -> None:
    g = parse(HEAD + guest(disk='["/a,,xvda"]', vif='[""]')).by_name("g1")
    assert g.disks[0].backend == "blk0" and g.vifs[0].backend == "net0"


def test_backend_required_when_several() -> None:
    text = HEAD + '[[domain]]\nname = "blk1"\nkind = "blkback"\n' + guest(disk='["/a,,xvda", "/b,,xvdb,backend=blk1"]')
    err = one_error(text)
    assert err == ('topo.toml: domain[4] ("g1").disk[0]: backend= is required: there are 2 blkback domains '
                   '(blk0, blk1)')
    g = parse(text.replace("/a,,xvda", "/a,,xvda,backend=blk0")).by_name("g1")
    assert [d.backend for d in g.disks] == ["blk0", "blk1"]
    assert g.backends == ("blk0", "blk1")


def test_no_backend_domain_at_all() -> None:
    text = '[[domain]]\nname = "xs"\nkind = "xenstored"\n' + guest(disk='["/a,,xvda"]', vif='[""]')
    assert errors(text) == [
        'topo.toml: domain[1] ("g1").disk[0]: no blkback domain in this topology to serve it '
        '(add a [[domain]] with kind = "blkback")',
        'topo.toml: domain[1] ("g1").vif[0]: no netback domain in this topology to serve it '
        '(add a [[domain]] with kind = "netback")',
    ]


def test_backend_of_the_wrong_kind_or_unknown() -> None:
    assert one_error(HEAD + guest(disk='["/a,,xvda,backend=net0"]')) == \
        ("topo.toml: domain[3] (\"g1\").disk[0]: backend 'net0' is a netback domain; "
         "a disk's backend must be a blkback")
    assert one_error(HEAD + guest(vif='["backend=g2"]') + guest("g2")) == \
        "topo.toml: domain[3] (\"g1\").vif[0]: backend 'g2' is a guest domain; a vif's backend must be a netback"
    assert one_error(HEAD + guest(disk='["/a,,xvda,backend=blk9"]')) == \
        "topo.toml: domain[3] (\"g1\").disk[0]: backend 'blk9' is not a domain of this topology (did you mean 'blk0'?)"


# --------------------------------------------------------------------------
# xenstored


def test_xenstored_count() -> None:
    err = one_error(HEAD + '[[domain]]\nname = "xs2"\nkind = "xenstored"\n')
    assert err == ('topo.toml: domain[3] ("xs2"): a second xenstored domain (domain[0] ("xs") is one); '
                   'a topology has at most one')
    err = one_error('[[domain]]\nname = "blk0"\nkind = "blkback"\n')
    assert err == ('topo.toml: no xenstored domain, but domain[0] ("blk0") is a blkback: guests and driver domains '
                   'need one (add a [[domain]] with kind = "xenstored")')
    # programs alone need none
    topo = parse('[[domain]]\nname = "p"\nkind = "program"\ncommand = ["true"]\n')
    assert [d.name for d in topo.domains] == ["p"]


# --------------------------------------------------------------------------
# duplicates


def test_duplicate_vdevs_within_a_guest() -> None:
    assert one_error(HEAD + guest(disk='["/a,,xvda", "/b,,xvda"]')) == \
        ("topo.toml: domain[3] (\"g1\").disk[1]: vdev 'xvda' duplicates disk[0]; "
         "each disk of a guest needs its own vdev")
    # different names, one device number
    assert one_error(HEAD + guest(disk='["/a,,xvdb2", "/b,,d1p2"]')) == \
        ("topo.toml: domain[3] (\"g1\").disk[1]: vdev 'd1p2' duplicates disk[0] 'xvdb2', the same device "
         "number 51730; each disk of a guest needs its own vdev")
    # the same vdev in two guests is normal
    parse(HEAD + guest("g1", disk='["/a,,xvda"]') + guest("g2", disk='["/b,,xvda"]'))


def test_duplicate_macs_across_the_topology() -> None:
    err = one_error(HEAD + guest("g1", vif='["mac=00:16:3e:00:00:01"]') + guest("g2", vif='["mac=00:16:3E:00:00:01"]'))
    assert err == 'topo.toml: domain[4] ("g2").vif[0]: mac 00:16:3e:00:00:01 is already used by domain[3] ("g1").vif[0]'


def test_duplicate_ips() -> None:
    err = one_error(HEAD + guest("g1", vif='["ip=10.77.0.1/24"]') + guest("g2", vif='["ip=10.77.0.1/16"]'))
    assert err == 'topo.toml: domain[4] ("g2").vif[0]: ip 10.77.0.1 is already used by domain[3] ("g1").vif[0]'
    parse(HEAD + guest("g1", vif='["ip=10.77.0.1"]') + guest("g2", vif='["ip=10.77.0.2"]'))


def test_duplicate_export_paths() -> None:
    err = one_error(HEAD + guest("g1", disk='["/a,,xvda,export=nbd:/srv/e/x.sock"]')
                    + guest("g2", disk='["/b,,xvda,export=nbd:/srv//e/./x.sock"]'))
    assert err == ("topo.toml: domain[4] (\"g2\").disk[0]: export socket '/srv//e/./x.sock' is already used by "
                   "domain[3] (\"g1\").disk[0]")
    # a relative export is a name in its guest's own directory: two guests may use the same one
    parse(HEAD + guest("g1", disk='["/a,,xvda,export=nbd:x.sock"]') + guest("g2", disk='["/b,,xvda,export=nbd:x.sock"]'))
    # ... but one guest may not use it twice
    err = one_error(HEAD + guest("g1", disk='["/a,,xvda,export=nbd:x.sock", "/b,,xvdb,export=nbd:./x.sock"]'))
    assert err == ("topo.toml: domain[3] (\"g1\").disk[1]: export socket './x.sock' is already used by "
                   "domain[3] (\"g1\").disk[0]")


def test_a_relative_export_is_a_plain_name_in_the_guests_own_directory() -> None:
    for bad in ("run/x.sock", "../x.sock", "a/../../x.sock", ".."):
        err = one_error(HEAD + guest("g1", disk=f'["/a,,xvda,export=nbd:{bad}"]'))
        assert err == (f"topo.toml: domain[3] (\"g1\").disk[0]: export socket {bad!r}: a relative export is a "
                       f"socket name in g1's own directory RUN_DIR/exports/g1/, without '/'; give a plain name or "
                       f"an absolute path"), bad
    r = parse(HEAD + guest("g1", disk='["/a,,xvda,export=nbd:./x.sock", "/b,,xvdb"]')).resolved("/s", "/r")
    assert [d.export_path for d in r.by_name("g1").disks] == ["/r/exports/g1/x.sock", None]
    assert default_export("/r", "g1", "xvdb") == "/r/exports/g1/xvdb.sock" and export_dir("/r", "g1") == "/r/exports/g1"


@pytest.mark.parametrize("path, why", [
    ("/r/x.sock", "export socket '/r/x.sock' is in the run directory /r, which no domain may write (the "
                  "toolstack's and the broker's sockets and pid file live there); leave export= a plain socket "
                  "name (it goes in /r/exports/g1/) or name a directory of g1's own"),
    ("/r/exports/x.sock", "is in the run directory /r"),
    ("/r/exports/g2/x.sock", "is in the run directory /r"),           # another guest's own directory
    ("/r/xenstored/x.sock", "is in the run directory /r"),
    ("/s/x.sock", "is in the state directory /s, which no domain may write (logs, the store and disk images"),
    ("/s/logs/x.sock", "is in the state directory /s"),
    ("/x.sock", "its directory / holds the run directory /r; g1 could write / and replace /r"),
    ("/img/x.sock", "its directory /img holds the disk image /img/a; g1 could write /img and replace the image"),
    ("/img/sub/x.sock", None),
    ("/srv/g2/x.sock", "its directory /srv/g2 is shared with g2's export '/srv/g2/y.sock'"),
    ("/srv/x.sock", "its directory /srv is shared with g2's export '/srv/g2/y.sock'"),      # above it
    ("/srv/g2/in/x.sock", "its directory /srv/g2/in is shared with g2's export"),           # below it
    ("/srv/g1/x.sock", None),
    ("/r/exports/g1/x.sock", None),                                                         # its own, spelt out
])
def test_an_absolute_export_needs_a_directory_of_the_guests_own(path: str, why: str | None) -> None:
    text = (HEAD + guest("g1", disk=f'["/img/a,,xvda,export=nbd:{path}"]')
            + guest("g2", disk='["/b,,xvda,export=nbd:/srv/g2/y.sock"]'))
    topo = parse(text)
    if why is None:
        topo.resolved("/s", "/r")
        return
    with pytest.raises(TopologyError) as e:
        topo.resolved("/s", "/r")
    assert len(e.value.errors) == 1 and why in e.value.errors[0], e.value.errors
    assert e.value.errors[0].startswith("topo.toml: domain[3] (\"g1\").disk[0]: ")
    assert export_problem("g1", path, "/r", "/s", [("g2", "/srv/g2/y.sock")], ["/img/a"]) is not None


def test_shared_images_only_read_only() -> None:
    err = one_error(HEAD + guest("g1", disk='["/img/a,,xvda"]') + guest("g2", disk='["/img/a,,xvda,ro"]'))
    assert err == ("topo.toml: domain[4] (\"g2\").disk[0]: target '/img/a' is also used by domain[3] (\"g1\").disk[0], "
                   "and one of them is writable; only read-only disks may share an image")
    parse(HEAD + guest("g1", disk='["/img/a,,xvda,ro"]') + guest("g2", disk='["/img/a,,xvda,r"]'))


# --------------------------------------------------------------------------
# generated MACs


def test_generated_macs_are_stable_and_final() -> None:
    text = HEAD + guest("g1", vif='["", "bridge=xdombr0"]') + guest("g2", vif='["mac=00:16:3e:00:00:01"]')
    a, b = parse(text), parse(text)
    macs = [v.mac for d in a.domains for v in d.vifs]
    assert macs == [v.mac for d in b.domains for v in d.vifs]
    assert macs[:2] == [generate_mac("g1", 0), generate_mac("g1", 1)]
    assert len(set(macs)) == 3 and None not in macs


def test_generated_mac_never_takes_an_explicit_one(monkeypatch: pytest.MonkeyPatch) -> None:
    def colliding(domain: str, index: int, attempt: int = 0) -> str:
        return "00:16:3e:00:00:01" if attempt == 0 else generate_mac(domain, index, attempt)
    monkeypatch.setattr(topology_checks, "generate_mac", colliding)
    # the explicit MAC comes later in the file, and still wins
    topo = parse(HEAD + guest("g1", vif='[""]') + guest("g2", vif='["mac=00:16:3e:00:00:01"]'))
    assert topo.by_name("g2").vifs[0].mac == "00:16:3e:00:00:01"
    assert topo.by_name("g1").vifs[0].mac == generate_mac("g1", 0, 1)


# --------------------------------------------------------------------------
# start and stop order


def test_start_order_whatever_the_file_order() -> None:
    text = (guest("g1", disk='["/a,,xvda"]', vif='[""]')
            + '[[domain]]\nname = "p1"\nkind = "program"\ncommand = ["true"]\n'
            + '[[domain]]\nname = "net0"\nkind = "netback"\n'
            + guest("g2")
            + '[[domain]]\nname = "blk0"\nkind = "blkback"\n'
            + '[[domain]]\nname = "xs"\nkind = "xenstored"\n')
    topo = parse(text)
    assert [d.name for d in topo.domains] == ["xs", "net0", "blk0", "g1", "p1", "g2"]
    assert [d.name for d in topo.stop_order()] == ["g2", "p1", "g1", "blk0", "net0", "xs"]
    assert [d.index for d in topo.domains] == [5, 2, 4, 0, 1, 3]
    # every backend starts before the domains it serves, and stops after them
    position = {d.name: i for i, d in enumerate(topo.domains)}
    for d in topo.domains:
        for b in d.backends:
            assert position[b] < position[d.name]


def test_by_name() -> None:
    topo = parse(HEAD)
    assert topo.by_name("blk0").kind == DomainKind.BLKBACK
    with pytest.raises(KeyError, match="no domain named 'nope'"):
        topo.by_name("nope")



# --------------------------------------------------------------------------
# resolving relative paths


def test_resolved_uses_host_settings_and_arguments_override_them() -> None:
    text = ('[host]\nstate_dir = "/srv/xdom"\nrun_dir = "/run/xdom"\n' + HEAD
            + guest(disk='["vdev=xvda, export=nbd:g1.sock, target=images/g1.img", "/abs/b.img,,xvdb"]'))
    topo = parse(text)
    r = topo.resolved()
    assert [(d.target, d.export_path) for d in r.by_name("g1").disks] == \
        [("/srv/xdom/images/g1.img", "/run/xdom/exports/g1/g1.sock"), ("/abs/b.img", None)]
    assert r.host == HostSettings("/srv/xdom", "/run/xdom")
    r2 = topo.resolved(state_dir="/tmp/st", run_dir="/tmp/run")
    assert r2.by_name("g1").disks[0].target == "/tmp/st/images/g1.img"
    assert r2.by_name("g1").disks[0].export_path == "/tmp/run/exports/g1/g1.sock"
    assert r2.resolved() == r2          # resolving again changes nothing
    assert [d.name for d in r2.domains] == [d.name for d in topo.domains]
    assert topo.by_name("g1").disks[0].target == "images/g1.img"   # the original is unchanged


def test_resolved_errors() -> None:
    topo = parse(HEAD + guest(disk='["vdev=xvda, export=nbd:g1.sock, target=images/g1.img"]'))
    with pytest.raises(TopologyError) as e:
        topo.resolved()
    assert e.value.errors == [
        "topo.toml: domain[3] (\"g1\").disk[0]: target 'images/g1.img' is relative and no state directory is set "
        "([host] state_dir or the command line)",
        "topo.toml: domain[3] (\"g1\").disk[0]: export socket 'g1.sock' is relative and no run directory is set "
        "([host] run_dir or the command line)",
    ]
    with pytest.raises(TopologyError, match="longer than 107 bytes"):
        topo.resolved(state_dir="/s", run_dir="/run/" + "d" * 100)
    # the default export socket (RUN_DIR/exports/GUEST/VDEV.sock) must fit too
    topo = parse(HEAD + guest(disk='["/a,,xvda"]'))
    with pytest.raises(TopologyError, match="longer than 107 bytes.*choose a shorter --run-dir"):
        topo.resolved(state_dir="/s", run_dir="/run/" + "d" * 90)
    # relative and absolute names of one socket collide once resolved
    topo = parse(HEAD + guest("g1", disk='["/a,,xvda,export=nbd:x.sock", "/b,,xvdb,export=nbd:/run/xdom/exports/g1/x.sock"]'))
    with pytest.raises(TopologyError, match=r"export socket '/run/xdom/exports/g1/x.sock' is already used by "
                                            r"domain\[3\]"):
        topo.resolved(run_dir="/run/xdom")


