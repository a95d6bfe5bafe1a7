"""Topology files: every rule of the schema, the cross-checks, start order, and the shipped examples."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xdom.broker.mgmt import parse_memory as broker_parse_memory
from xdom.deploy import topology as topology_mod
from xdom.deploy.topology import (
    DomainKind,
    HostSettings,
    Limits,
    RestartPolicy,
    Topology,
    TopologyError,
    default_export,
    export_dir,
    export_problem,
    load_topology,
    parse_memory_size,
    parse_topology,
)
from xdom.deploy.xlcfg import DiskSpec, generate_mac

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "deploy", "examples")

HEAD = """
[[domain]]
name = "xs"
kind = "xenstored"

[[domain]]
name = "blk0"
kind = "blkback"

[[domain]]
name = "net0"
kind = "netback"
"""


def parse(text: str) -> Topology:
    return parse_topology(tomllib.loads(text), "topo.toml")


def errors(text: str) -> list[str]:
    with pytest.raises(TopologyError) as e:
        parse(text)
    assert str(e.value) == "\n".join(e.value.errors)
    for line in e.value.errors:
        assert line.startswith("topo.toml: "), line
    return e.value.errors


def one_error(text: str) -> str:
    errs = errors(text)
    assert len(errs) == 1, errs
    return errs[0]


def guest(name: str = "g1", **keys: Any) -> str:
    lines = ["[[domain]]", f'name = "{name}"', 'kind = "guest"']
    for key, value in keys.items():
        lines.append(f"{key} = {value}")
    return "\n" + "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# the shipped examples


def test_default_example_loads() -> None:
    topo = load_topology(os.path.join(EXAMPLES, "default.toml"))
    assert [d.name for d in topo.domains] == ["xs", "blk0", "net0", "g1", "g2"]
    assert [d.kind for d in topo.domains] == ["xenstored", "blkback", "netback", "guest", "guest"]
    g1, g2 = topo.by_name("g1"), topo.by_name("g2")
    for g, n in ((g1, 1), (g2, 2)):
        assert g.memory_bytes == 32 << 20
        (disk,) = g.disks
        assert disk == DiskSpec(vdev="xvda", target=f"images/g{n}.img", format="raw", mode="w", backend="blk0",
                                export_path="xvda.sock", export_kind="vhost-user")
        assert g.vm is not None and g.vm.memory_mib == 128 and g.vm.own_image    # each guest runs a VM
        (vif,) = g.vifs
        assert vif.backend == "net0" and vif.bridge == "xdombr0"
        assert vif.ip == ipaddress.ip_interface(f"10.77.0.{n}/24")
        assert vif.mac == f"00:16:3e:00:00:0{n}"
        assert g.backends == ("blk0", "net0")
    resolved = topo.resolved(state_dir="/var/lib/xdom", run_dir="/run/xdom")
    assert resolved.by_name("g1").disks[0].target == "/var/lib/xdom/images/g1.img"
    assert resolved.by_name("g2").disks[0].export_path == "/run/xdom/exports/g2/xvda.sock"


def test_minimal_example_loads() -> None:
    topo = load_topology(os.path.join(EXAMPLES, "minimal.toml"))
    assert [(d.name, d.kind) for d in topo.domains] == [("xs", "xenstored"), ("hello", "program")]
    assert topo.by_name("hello").command
    assert topo.host == HostSettings()


def test_examples_are_packaged() -> None:
    # pyproject's package-data ships deploy/examples/*.toml with xdom.deploy
    import importlib.resources
    files = importlib.resources.files("xdom.deploy") / "examples"
    assert (files / "default.toml").is_file() and (files / "minimal.toml").is_file()


# --------------------------------------------------------------------------
# defaults and fields


def test_defaults_per_kind() -> None:
    topo = parse(HEAD + guest() + '[[domain]]\nname = "p"\nkind = "program"\ncommand = ["true"]\n')
    expect = {"xs": (4 << 20, "always"), "blk0": (4 << 20, "always"), "net0": (4 << 20, "always"),
              "g1": (32 << 20, "never"), "p": (4 << 20, "never")}
    for d in topo.domains:
        assert (d.memory_bytes, d.restart) == expect[d.name]
        assert (d.restart_backoff, d.flap_limit, d.flap_window) == (0.5, 5, 60.0)
        assert d.limits == Limits() and d.uid is None
        assert d.memory_frames * 4096 == d.memory_bytes
        assert broker_parse_memory(d.memory_arg) == d.memory_frames
    assert isinstance(topo.by_name("g1").kind, DomainKind)
    assert topo.by_name("g1").restart is RestartPolicy.NEVER
    assert topo.by_name("g1").workload is None and topo.by_name("g1").command is None
    assert topo.by_name("p").command == ("true",)


@pytest.mark.parametrize("value, nbytes", [
    ("64", 64 << 20), ('"256K"', 256 << 10), ('"32M"', 32 << 20), ('"1G"', 1 << 30), ('"8"', 8 << 20),
    ('"16MiB"', 16 << 20), ('"4k"', 4 << 10), ('" 2 M "', 2 << 20),
])
def test_memory_forms(value: str, nbytes: int) -> None:
    d = parse(HEAD + guest(memory=value)).by_name("g1")
    assert d.memory_bytes == nbytes
    # the broker reads the same strings the same way
    raw = tomllib.loads(f"v = {value}")["v"]
    assert broker_parse_memory(raw) * 4096 == nbytes


@pytest.mark.parametrize("value, fragment", [
    ('"1K"', "is not a multiple of 4 KiB"),
    ('"6K"', "is not a multiple of 4 KiB"),
    ("0", "must be positive"),
    ("-4", "must be positive"),
    ('"0M"', "must be positive"),
    ('"lots"', "is not a size like"),
    ('"1T"', "is not a size like"),
    ("1.5", "not a float"),
    ("true", "not a boolean"),
])
def test_bad_memory(value: str, fragment: str) -> None:
    err = one_error(HEAD + guest(memory=value))
    assert err.startswith('topo.toml: domain[3] ("g1").memory: ')
    assert fragment in err


def test_parse_memory_size_directly() -> None:
    assert parse_memory_size(1) == 1 << 20
    assert parse_memory_size("3G") == 3 << 30
    with pytest.raises(ValueError, match="rss"):
        parse_memory_size([], "rss")


def test_restart_and_flap_settings() -> None:
    d = parse(HEAD + guest(restart='"on-failure"', restart_backoff="2", flap_limit="3", flap_window="10.5")
              ).by_name("g1")
    assert (d.restart, d.restart_backoff, d.flap_limit, d.flap_window) == ("on-failure", 2.0, 3, 10.5)
    assert parse(HEAD + guest(restart_backoff="0")).by_name("g1").restart_backoff == 0.0
    assert parse(HEAD.replace('kind = "blkback"', 'kind = "blkback"\nrestart = "never"')
                 ).by_name("blk0").restart == "never"


@pytest.mark.parametrize("key, value, fragment", [
    ("restart", '"alway"', "restart 'alway' is not one of never, on-failure, always (did you mean 'always'?)"),
    ("restart", "true", "restart True is not one of"),
    ("restart_backoff", "-1", "expected a finite number >= 0"),
    ("restart_backoff", "inf", "expected a finite number >= 0"),
    ("restart_backoff", "nan", "expected a finite number >= 0"),
    ("restart_backoff", '"1s"', "expected a number, found a string"),
    ("flap_limit", "0", "expected an integer >= 1"),
    ("flap_limit", "2.5", "expected an integer, found a float"),
    ("flap_window", "0", "expected a finite number > 0"),
    ("flap_window", "false", "expected a number, found a boolean"),
])
def test_bad_restart_settings(key: str, value: str, fragment: str) -> None:
    err = one_error(HEAD + guest(**{key: value}))
    assert err.startswith(f'topo.toml: domain[3] ("g1").{key}: ')
    assert fragment in err


def test_limits_and_uid() -> None:
    d = parse(HEAD + guest(limits='{ rss = "64M", fds = 256, cpu_percent = 50 }', uid="1234")).by_name("g1")
    assert d.limits == Limits(rss_bytes=64 << 20, fds=256, cpu_percent=50.0)
    assert d.uid == 1234
    assert parse(HEAD + guest(limits="{ rss = 128 }")).by_name("g1").limits == Limits(rss_bytes=128 << 20)
    assert parse(HEAD + guest(limits="{}")).by_name("g1").limits == Limits()


@pytest.mark.parametrize("key, value, where, fragment", [
    ("limits", '"64M"', "limits", "expected a table"),
    ("limits", '{ rs = "64M" }', "limits.rs", "unknown key (did you mean 'rss'?)"),
    ("limits", '{ rss = "big" }', "limits.rss", "rss 'big' is not a size"),
    ("limits", "{ fds = 4 }", "limits.fds", "expected an integer between 16 and"),
    ("limits", '{ fds = "many" }', "limits.fds", "expected an integer, found a string"),
    ("limits", "{ cpu_percent = 0 }", "limits.cpu_percent", "expected a finite number > 0"),
    ("uid", "0", "uid", "uid 0 is root"),
    ("uid", "-5", "uid", "expected an integer between 1 and 4294967294"),
    ("uid", "4294967295", "uid", "expected an integer between 1 and 4294967294"),
    ("uid", '"nobody"', "uid", "expected an integer, found a string"),
])
def test_bad_limits_and_uid(key: str, value: str, where: str, fragment: str) -> None:
    err = one_error(HEAD + guest(**{key: value}))
    assert err.startswith(f'topo.toml: domain[3] ("g1").{where}: ')
    assert fragment in err


def test_duplicate_uid() -> None:
    err = one_error(HEAD + guest("g1", uid="2000") + guest("g2", uid="2000"))
    assert err == ('topo.toml: domain[4] ("g2").uid: uid 2000 is already used by domain[3] ("g1"); '
                   'each domain needs its own uid')


# --------------------------------------------------------------------------
# names, kinds, unknown keys


@pytest.mark.parametrize("name", ["g", "0", "g-1_x", "a" * 32, "9lives"])
def test_good_names(name: str) -> None:
    assert parse(HEAD + guest(name)).domains[-1].name == name


@pytest.mark.parametrize("name", ["G1", "-g", "_g", "a" * 33, "g.1", "g 1", "", "gé"])
def test_bad_names(name: str) -> None:
    err = one_error(HEAD + guest(name))
    assert err.startswith("topo.toml: domain[3].name: name ")
    assert "is not 1-32 characters of a-z, 0-9, '_' and '-'" in err


def test_name_and_kind_are_required() -> None:
    errs = errors(HEAD + '[[domain]]\nmemory = "4M"\n')
    assert errs == ['topo.toml: domain[3]: name is required (a string like "g1")',
                    "topo.toml: domain[3]: kind is required (one of xenstored, blkback, netback, guest, program)"]
    assert one_error(HEAD + '[[domain]]\nname = 7\nkind = "guest"\n') == \
        "topo.toml: domain[3].name: expected a string, found an integer"


def test_duplicate_names() -> None:
    err = one_error(HEAD + guest("g1") + guest("blk0"))
    assert err == "topo.toml: domain[4] (\"blk0\").name: name 'blk0' is already used by domain[1] (\"blk0\")"


def test_bad_kind_with_hint() -> None:
    errs = errors(HEAD + '[[domain]]\nname = "p"\nkind = "programme"\n')
    assert errs[0] == ("topo.toml: domain[3] (\"p\").kind: kind 'programme' is not one of xenstored, blkback, "
                       "netback, guest, program (did you mean 'program'?)")


def test_unknown_keys_everywhere_with_hints() -> None:
    text = ('[hots]\n[host]\nstate_dri = "/x"\n' + HEAD
            + guest(memroy='"32M"', disks='["/a,,xvda"]', limits='{ fd = 100 }'))
    errs = errors(text)
    assert "topo.toml: hots: unknown key (did you mean 'host'?); expected one of domain, host" in errs
    assert ("topo.toml: host.state_dri: unknown key (did you mean 'state_dir'?); "
            "expected one of state_dir, run_dir, listen, events_listen, server_key, allowed_clients") in errs
    assert any(e.startswith("topo.toml: domain[3] (\"g1\").memroy: unknown key (did you mean 'memory'?)")
               for e in errs)
    assert any(e.startswith("topo.toml: domain[3] (\"g1\").disks: unknown key (did you mean 'disk'?)")
               for e in errs)
    assert any(e.startswith("topo.toml: domain[3] (\"g1\").limits.fd: unknown key (did you mean 'fds'?)")
               for e in errs)
    assert len(errs) == 5


def test_top_level_shape() -> None:
    assert one_error("") == "topo.toml: no [[domain]] tables: a topology has at least one domain"
    assert one_error("domain = []") == "topo.toml: domain: the array is empty: a topology has at least one domain"
    assert one_error('[domain]\nname = "xs"\nkind = "xenstored"\n') == \
        "topo.toml: domain: expected an array of tables: write [[domain]], not [domain]"
    assert one_error('domain = "xs"') == "topo.toml: domain: expected an array of tables ([[domain]]), found a string"
    assert one_error("domain = [1]") == "topo.toml: domain[0]: expected a table, found an integer"
    with pytest.raises(TopologyError, match="expected a table at the top level"):
        parse_topology([], "topo.toml")  # type: ignore[arg-type]


def test_host_settings() -> None:
    topo = parse('[host]\nstate_dir = "/var/lib/xdom/"\nrun_dir = "/run/xdom"\n' + HEAD)
    assert topo.host == HostSettings(state_dir="/var/lib/xdom", run_dir="/run/xdom")
    assert one_error('[host]\nstate_dir = "state"\n' + HEAD) == \
        "topo.toml: host.state_dir: expected an absolute directory path, found 'state'"
    assert one_error("[host]\nrun_dir = 1\n" + HEAD) == \
        "topo.toml: host.run_dir: expected a string (an absolute directory path), found an integer"
    assert one_error('host = "x"\n' + HEAD) == "topo.toml: host: expected a table ([host]), found a string"


# --------------------------------------------------------------------------
# which kinds take which keys


def test_devices_only_on_guests() -> None:
    text = HEAD.replace('kind = "blkback"', 'kind = "blkback"\ndisk = ["/a,,xvda"]\nvif = [""]')
    errs = errors(text)
    assert errs == [
        'topo.toml: domain[1] ("blk0").disk: only guest domains have disk devices; this is a blkback domain',
        'topo.toml: domain[1] ("blk0").vif: only guest domains have vif devices; this is a blkback domain',
    ]


def test_command_required_for_programs_and_forbidden_elsewhere() -> None:
    assert one_error('[[domain]]\nname = "p"\nkind = "program"\n') == \
        'topo.toml: domain[0] ("p"): command is required for a program domain (an array: program and arguments)'
    err = one_error(HEAD + guest(command='["sh"]'))
    assert err.startswith('topo.toml: domain[3] ("g1").command: only program domains take a command')
    err = one_error(HEAD.replace('kind = "netback"', 'kind = "netback"\ncommand = ["sh"]'))
    assert err.startswith('topo.toml: domain[2] ("net0").command: only program domains take a command')


@pytest.mark.parametrize("value, where, fragment", [
    ("[]", "command", "found an empty array"),
    ('"sleep 1"', "command", "expected a non-empty array of strings (program and arguments), found a string"),
    ('["sleep", 1]', "command[1]", "expected a string, found an integer"),
    ('["", "x"]', "command[0]", "the program to run is an empty string"),
    ('["a\\u0000b"]', "command[0]", "contains a NUL character"),
])
def test_bad_commands(value: str, where: str, fragment: str) -> None:
    err = one_error(f'[[domain]]\nname = "p"\nkind = "program"\ncommand = {value}\n')
    assert err.startswith(f'topo.toml: domain[0] ("p").{where}: ')
    assert fragment in err


def test_workload_only_for_guests() -> None:
    g = parse(HEAD + guest(workload='["ping", "-c", "1", "10.77.0.2"]')).by_name("g1")
    assert g.workload == ("ping", "-c", "1", "10.77.0.2")
    err = one_error('[[domain]]\nname = "p"\nkind = "program"\ncommand = ["x"]\nworkload = ["y"]\n')
    assert err == 'topo.toml: domain[0] ("p").workload: only guest domains have a workload; this is a program domain'
    assert "found an empty array" in one_error(HEAD + guest(workload="[]"))


def test_device_lists_must_be_arrays_of_strings() -> None:
    assert one_error(HEAD + guest(disk='"/a,,xvda"')) == \
        ('topo.toml: domain[3] ("g1").disk: expected an array of xl disk strings, e.g. disk = ["..."], '
         'found a string')
    assert one_error(HEAD + guest(vif="[1]")) == \
        'topo.toml: domain[3] ("g1").vif[0]: expected an xl vif string, found an integer'


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
    monkeypatch.setattr(topology_mod, "generate_mac", colliding)
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
# collecting every error


def test_all_errors_are_reported_at_once() -> None:
    text = ('[[domain]]\nname = "xs"\nkind = "xenstored"\nmemory = "3K"\n'
            '[[domain]]\nname = "blk0"\nkind = "blkback"\n'
            + guest("g1", disk='["/a,,xvdz9x", "/b,qcow2,xvdb"]', vif='["mac=01:00:00:00:00:00"]',
                    restart='"sometimes"')
            + guest("g1"))
    errs = errors(text)
    assert len(errs) == 6, errs
    wheres = [e.split(": ")[1] for e in errs]
    assert wheres == ['domain[0] ("xs").memory', 'domain[2] ("g1").restart', 'domain[2] ("g1").disk[0]',
                      'domain[2] ("g1").vif[0]', 'domain[3] ("g1").name', 'domain[2] ("g1").disk[1]']


# --------------------------------------------------------------------------
# files


def test_load_errors_name_the_file(tmp_path: Any) -> None:
    missing = str(tmp_path / "missing.toml")
    with pytest.raises(TopologyError) as e:
        load_topology(missing)
    assert str(e.value).startswith(f"{missing}: cannot read: ")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[domain]]\nname = "xs\n')
    with pytest.raises(TopologyError, match=f"^{bad}: not valid TOML: "):
        load_topology(str(bad))
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"name = '\xff'\n")
    with pytest.raises(TopologyError, match=f"^{binary}: not UTF-8 text"):
        load_topology(str(binary))
    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"#" * (topology_mod.MAX_TOPOLOGY_BYTES + 1))
    with pytest.raises(TopologyError, match="not a topology file"):
        load_topology(str(huge))
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[[domain]]\nname = "g1"\nkind = "guest"\n')
    with pytest.raises(TopologyError, match=f"^{wrong}: no xenstored domain"):
        load_topology(str(wrong))


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


# --------------------------------------------------------------------------
# nothing but TopologyError, whatever the data

_JUNK = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
                  st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _or_junk(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(strategy, strategy, strategy, _JUNK)


_NAMES = st.sampled_from(["xs", "blk0", "blk1", "net0", "g1", "g2", "p"])
_DISKS = st.lists(st.sampled_from(["/a,,xvda", "/a,,xvda,backend=blk0", "/b,,xvdb,ro", "/b,,d1p0,backend=blk1",
                                   "vdev=xvdc, export=nbd:s.sock, target=c.img", "/q,qcow2,xvdd", "/a,,xvdz9x",
                                   "vdev=hdc, cdrom"]), max_size=3)
_VIFS = st.lists(st.sampled_from(["", "mac=00:16:3e:00:00:01", "ip=10.0.0.1", "ip=10.0.0.2/24, backend=net0",
                                  "backend=g1", "bridge=xdombr0, rate=1MB/s", "mac=bad"]), max_size=3)
_DOMAIN = st.fixed_dictionaries(
    {"name": _or_junk(_NAMES),
     "kind": _or_junk(st.sampled_from(["xenstored", "blkback", "netback", "guest", "program", "guset"]))},
    optional={
        "memory": _or_junk(st.sampled_from([1, 32, "4M", "1K", "256K", "0"])),
        "restart": _or_junk(st.sampled_from(["never", "on-failure", "always", "sometimes"])),
        "restart_backoff": _or_junk(st.floats(min_value=-1, max_value=10)),
        "flap_limit": _or_junk(st.integers(min_value=-1, max_value=10)),
        "flap_window": _or_junk(st.floats(min_value=-1, max_value=100)),
        "disk": _or_junk(_DISKS),
        "vif": _or_junk(_VIFS),
        "command": _or_junk(st.lists(st.sampled_from(["true", "", "x\0"]), max_size=2)),
        "workload": _or_junk(st.lists(st.sampled_from(["ping", "x"]), max_size=2)),
        "limits": _or_junk(st.fixed_dictionaries({}, optional={"rss": _or_junk(st.just("8M")),
                                                               "fds": _or_junk(st.just(64)),
                                                               "cpu_percent": _or_junk(st.just(50)),
                                                               "x": st.just(1)})),
        "uid": _or_junk(st.integers(min_value=-1, max_value=3)),
        "bogus": _JUNK,
    })


@settings(max_examples=300, deadline=None, database=None)
@given(st.one_of(
    st.fixed_dictionaries({"domain": st.lists(_or_junk(_DOMAIN), max_size=6)},
                          optional={"host": _or_junk(st.fixed_dictionaries(
                              {}, optional={"state_dir": _or_junk(st.sampled_from(["/s", "s"])),
                                            "run_dir": _or_junk(st.just("/r")), "x": _JUNK}))}),
    st.dictionaries(st.text(max_size=8), _JUNK, max_size=3),
))
def test_parse_topology_raises_only_topology_error(data: dict[str, Any]) -> None:
    try:
        topo = parse_topology(data, "fuzz.toml")
    except TopologyError as e:
        assert e.errors and all(line.startswith("fuzz.toml: ") for line in e.errors)
        return
    names = [d.name for d in topo.domains]
    assert len(names) == len(set(names))
    position = {n: i for i, n in enumerate(names)}
    for d in topo.domains:
        assert all(position[b] < position[d.name] for b in d.backends)
        assert all(v.mac is not None for v in d.vifs)
        assert all(disk.backend is not None for disk in d.disks)
    try:
        topo.resolved(state_dir="/s", run_dir="/r")
    except TopologyError as e:
        assert all(line.startswith("fuzz.toml: ") for line in e.errors)


@st.composite
def _plausible_topologies(draw: st.DrawFn) -> dict[str, Any]:
    """Topologies that are mostly valid, in random file order, to check what a successful parse promises."""
    domains: list[dict[str, Any]] = []
    if draw(st.integers(0, 9)):
        domains.append({"name": "xs", "kind": "xenstored"})
    blks = [f"blk{i}" for i in range(draw(st.integers(0, 2)))]
    nets = [f"net{i}" for i in range(draw(st.integers(0, 2)))]
    domains += [{"name": n, "kind": "blkback"} for n in blks] + [{"name": n, "kind": "netback"} for n in nets]
    for g in range(draw(st.integers(0, 3))):
        disks = []
        for j in range(draw(st.integers(0, 3))):
            backend = draw(st.sampled_from([None, *blks]))
            item = f"/img/g{g}-{j}.img,,xvd{'abcd'[j]}" + (f",backend={backend}" if backend else "")
            if draw(st.booleans()):
                item += f",export=nbd:g{g}-{j}.sock"
            disks.append(item)
        vifs = []
        for j in range(draw(st.integers(0, 3))):
            parts = [f"backend={b}" for b in [draw(st.sampled_from([None, *nets]))] if b]
            if draw(st.booleans()):
                parts.append(f"ip=10.1.{g}.{j + 1}/24")
            if draw(st.booleans()):
                parts.append(f"mac=00:16:3e:00:0{g}:0{j}")
            vifs.append(", ".join(parts))
        domains.append({"name": f"g{g}", "kind": "guest", "disk": disks, "vif": vifs})
    for p in range(draw(st.integers(0, 2))):
        domains.append({"name": f"p{p}", "kind": "program", "command": ["true"]})
    return {"domain": draw(st.permutations(domains))}


@settings(max_examples=200, deadline=None, database=None)
@given(_plausible_topologies())
def test_plausible_topologies_keep_their_promises(data: dict[str, Any]) -> None:
    try:
        topo = parse_topology(data, "fuzz.toml")
    except TopologyError as e:
        assert all(line.startswith("fuzz.toml: ") for line in e.errors)
        return
    names = [d.name for d in topo.domains]
    assert sorted(names) == sorted(d["name"] for d in data["domain"])
    kinds = [START_RANK_OF[d.kind] for d in topo.domains]
    assert kinds == sorted(kinds)                                  # xenstored, driver domains, the rest
    for rank in set(kinds):                                        # file order within a rank
        indices = [d.index for d in topo.domains if START_RANK_OF[d.kind] == rank]
        assert indices == sorted(indices)
    position = {n: i for i, n in enumerate(names)}
    macs = [v.mac for d in topo.domains for v in d.vifs]
    assert None not in macs and len(macs) == len(set(macs))
    for d in topo.domains:
        assert all(position[b] < position[d.name] for b in d.backends)
        assert all(disk.backend in names for disk in d.disks)
        assert all(topo.by_name(v.backend).kind == "netback" for v in d.vifs if v.backend)
    assert topo.stop_order() == topo.domains[::-1]
    topo.resolved(state_dir="/s", run_dir="/r")


START_RANK_OF = {"xenstored": 0, "blkback": 1, "netback": 1, "guest": 2, "program": 2}
