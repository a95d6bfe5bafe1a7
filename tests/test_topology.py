"""Topology files, table by table: every rule of the schema, the shipped examples, and reading a file.

The rules between domains are in test_topology_checks.py, the random topologies in test_topology_fuzz.py.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from typing import Any

import pytest
from topology_fixtures import HEAD, errors, guest, one_error, parse

from xdom.broker.mgmt import parse_memory as broker_parse_memory
from xdom.deploy.topology import DomainKind, HostSettings, Limits, RestartPolicy, TopologyError
from xdom.deploy.topology_parse import MAX_TOPOLOGY_BYTES, load_topology, parse_topology
from xdom.deploy.xl_disk import DiskSpec
from xdom.domains.abi.sizes import parse_size as parse_memory_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "deploy", "examples")


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
    huge.write_bytes(b"#" * (MAX_TOPOLOGY_BYTES + 1))
    with pytest.raises(TopologyError, match="not a topology file"):
        load_topology(str(huge))
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[[domain]]\nname = "g1"\nkind = "guest"\n')
    with pytest.raises(TopologyError, match=f"^{wrong}: no xenstored domain"):
        load_topology(str(wrong))


