"""netback's Linux-bridge mode, the toolstack's side: the ``switch`` key, bridges and TAPs in netback's namespace.

A netback in bridge mode runs with ``--bridge --device-fd N``; for each vif
it serves the supervisor makes a bridge (the vif's ``bridge=``, else
xdombr0) and a TAP ``vif<fe domid>.<devid>`` owned by netback's uid inside
netback's own namespace, and hands netback a ``/dev/net/tun`` descriptor for
it over the device channel before the vif's nodes appear.  Checked here:
topology validation, the bridge helpers on a namespace of their own, the
plumbing on a live host (ports, owner, MTU, ``ps --json``), that a netback
killed with SIGKILL finds its TAPs where it left them and gets them offered
again, hot-attach on a second bridge, detach and destroy removing TAPs,
``xdom down`` leaving no bridge or TAP, and guests pinging each other both
ways across the bridge.  The builtin switch stays available with
``switch = "builtin"``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tomllib
import uuid
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from helpers import wait_until
from test_supervisor import Host, assert_nothing_left
from test_supervisor_cli import cleanup, leftovers, topology, xdom  # noqa: F401  (cleanup is a fixture)

from xdom.deploy import netns
from xdom.deploy.bridge import backend_tap_name, ensure_bridge, ensure_port, link_kind
from xdom.deploy.control import ControlError
from xdom.deploy.rundir import running_pid
from xdom.deploy.supervisor import Supervisor, check_switches, switch_of
from xdom.deploy.tap import TapError, delete_tap
from xdom.deploy.topology import NetSwitch, TopologyError
from xdom.deploy.topology_parse import load_topology, parse_topology
from xdom.domains.xenstore import XenstoreClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDS_ROOT = pytest.mark.skipif(netns.unavailable_reason() is not None,
                                reason="needs root and iproute2 (namespaces, bridges, TAPs)")
NEEDS_PING = pytest.mark.skipif(not shutil.which("ping"), reason="needs ping (make test installs it as root)")

HEAD = '''[[domain]]
name = "xs"
kind = "xenstored"
[[domain]]
name = "net0"
kind = "netback"
restart_backoff = 0.1
switch = "{switch}"
'''
GUESTS = '''[[domain]]
name = "g1"
kind = "guest"
memory = "16M"
vif = ["mac=00:16:3e:00:00:01, backend=net0, ip=10.77.0.1/24"]
[[domain]]
name = "g2"
kind = "guest"
memory = "16M"
vif = ["mac=00:16:3e:00:00:02, backend=net0, ip=10.77.0.2/24, mtu=9000"]
'''
BRIDGED = HEAD.format(switch="bridge") + GUESTS


def parse(text: str) -> Any:
    return parse_topology(tomllib.loads(text), "topo.toml")


def topology_errors(text: str) -> list[str]:
    with pytest.raises(TopologyError) as e:
        parse(text)
    return e.value.errors


def in_ns(ns: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout)


def links(ns: str, *select: str) -> dict[str, dict[str, Any]]:
    """``ip -d -j link show SELECT`` in namespace ``ns``, by name."""
    res = subprocess.run(["ip", "-n", ns, "-d", "-j", "link", "show", *select], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    return {link["ifname"]: link for link in json.loads(res.stdout or "[]")}


def ping(ns: str, peer: str, count: int = 3) -> subprocess.CompletedProcess[str]:
    return in_ns(ns, "ping", "-c", str(count), "-i", "0.2", "-W", "5", peer)


def log_of(h: Host, name: str) -> str:
    with open(h.layout.log_path(name)) as f:
        return f.read()


# ---- the switch key ------------------------------------------------------------------------------

def test_switch_key_is_validated_and_names_file_and_key() -> None:
    base = HEAD.replace('switch = "{switch}"\n', "")
    assert parse(base + 'switch = "bridge"\n').by_name("net0").switch == NetSwitch.BRIDGE
    assert parse(base + 'switch = "builtin"\n').by_name("net0").switch == NetSwitch.BUILTIN
    assert parse(base).by_name("net0").switch is None              # the host decides

    (err,) = topology_errors(base + 'switch = "brige"\n')
    assert err.startswith('topo.toml: domain[1] ("net0").switch: ') and "'brige'" in err
    assert "did you mean 'bridge'?" in err and "bridge, builtin" in err
    (err,) = topology_errors(base + "switch = 1\n")
    assert err.startswith('topo.toml: domain[1] ("net0").switch: ') and "an integer" in err
    (err,) = topology_errors(HEAD.replace('switch = "{switch}"\n', "")
                             + '[[domain]]\nname = "g1"\nkind = "guest"\nswitch = "bridge"\n')
    assert err.startswith('topo.toml: domain[2] ("g1").switch: ') and "only netback domains" in err
    (err,) = topology_errors(base + '[[domain]]\nname = "g1"\nkind = "guest"\n'
                                    'vif = ["backend=net0, bridge=vif3.0"]\n')
    assert err.startswith('topo.toml: domain[2] ("g1").vif[0]: ') and "'vif3.0'" in err


def test_bridge_requested_on_a_host_that_cannot_is_refused_before_anything_starts(
        run_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    topo = parse(BRIDGED)
    why = "not running as root"
    with pytest.raises(TopologyError) as e:
        check_switches(topo, why)
    first, last = e.value.errors
    assert first.startswith('topo.toml: domain[1] ("net0").switch: "bridge" needs') and why in first
    assert 'switch = "builtin"' in first and last == "topo.toml: nothing was started"
    check_switches(topo, None)
    check_switches(parse(HEAD.format(switch="builtin") + GUESTS), why)
    unset = parse(HEAD.replace('switch = "{switch}"\n', "") + GUESTS)
    check_switches(unset, why)                                      # no key: the host's default, builtin there
    assert switch_of(unset.by_name("net0"), why) == NetSwitch.BUILTIN
    assert switch_of(unset.by_name("net0"), None) == NetSwitch.BRIDGE
    assert switch_of(topo.by_name("net0"), None) == NetSwitch.BRIDGE

    # the supervisor runs the same check with the host's own answer (as `xdom up` does), starting nothing
    monkeypatch.setattr(netns, "unavailable_reason", lambda: why)
    with pytest.raises(TopologyError) as e:
        Supervisor(topo, os.path.join(run_dir, "state"), os.path.join(run_dir, "run"))
    assert why in str(e.value)
    assert not os.path.exists(os.path.join(run_dir, "run"))


def test_the_default_example_bridges() -> None:
    topo = load_topology(os.path.join(ROOT, "deploy", "examples", "default.toml"))
    assert topo.by_name("net0").switch == NetSwitch.BRIDGE
    assert {v.bridge for g in ("g1", "g2") for v in topo.by_name(g).vifs} == {"xdombr0"}


def test_backend_tap_names() -> None:
    assert backend_tap_name(3, 0) == "vif3.0"
    assert backend_tap_name(32752, 99999) == "vif32752.99999"
    with pytest.raises(TapError, match="longer than 15 bytes"):
        backend_tap_name(32752, 1 << 20)


# ---- the bridge helpers, on a namespace of their own ------------------------------------------------

@pytest.fixture
def scratch_ns() -> Iterator[str]:
    name = f"xdt-br-{uuid.uuid4().hex[:10]}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.delete(name)


@NEEDS_ROOT
def test_bridge_and_port_helpers_are_idempotent_and_refuse_other_devices(scratch_ns: str) -> None:
    ns = scratch_ns
    assert ensure_bridge(ns, "xdombr0") is True and ensure_bridge(ns, "xdombr0") is False
    assert ensure_port(ns, "vif7.1", 64321, 9000, "xdombr0") is True
    first = links(ns, "dev", "vif7.1")["vif7.1"]
    assert ensure_port(ns, "vif7.1", 64321, 9000, "xdombr0") is False    # kept, not made again
    port = links(ns, "dev", "vif7.1")["vif7.1"]
    assert port["ifindex"] == first["ifindex"] and port["mtu"] == 9000 and port["master"] == "xdombr0"
    assert port["linkinfo"]["info_kind"] == "tun"
    assert port["linkinfo"]["info_data"]["type"] == "tap" and port["linkinfo"]["info_data"]["user"] == 64321
    assert "UP" in port["flags"] and "UP" in links(ns, "dev", "xdombr0")["xdombr0"]["flags"]
    assert links(ns, "dev", "xdombr0")["xdombr0"]["linkinfo"]["info_data"]["stp_state"] == 0
    assert link_kind(ns, "xdombr0") == "bridge" and link_kind(ns, "nope") is None
    with pytest.raises(TapError, match="not a bridge"):
        ensure_bridge(ns, "vif7.1")
    with pytest.raises(TapError, match="not a TAP"):
        ensure_port(ns, "xdombr0", 64321, 1500, "xdombr0")
    with pytest.raises(TapError):                       # no such bridge: the TAP made for it is removed again
        ensure_port(ns, "vif7.2", 64321, 1500, "xdombr9")
    assert link_kind(ns, "vif7.2") is None
    delete_tap(ns, "vif7.1")
    delete_tap(ns, "vif7.1")                            # gone already: not an error
    assert set(links(ns)) == {"lo", "xdombr0"}


# ---- a live host -----------------------------------------------------------------------------------

def port_names(ns: str, bridge: str) -> set[str]:
    return set(links(ns, "master", bridge))


@NEEDS_ROOT
@NEEDS_PING
@pytest.mark.timeout(240)
def test_builtin_switch_makes_no_bridge_and_guests_still_talk(run_dir: str) -> None:
    with Host(run_dir, HEAD.format(switch="builtin") + GUESTS) as h:
        ps = h.ps()
        net0 = ps["net0"]
        assert net0["switch"] == "builtin"
        assert [(v["frontend"], v["devid"], v["bridge"], v["tap"]) for v in net0["vifs"]] == \
            [("g1", 0, None, None), ("g2", 0, None, None)]
        assert "--bridge" not in psutil.Process(net0["pid"]).cmdline()
        assert set(links(net0["netns"])) == {"lo"}                      # no bridge, no TAP
        for ns, peer in ((ps["g1"]["netns"], "10.77.0.2"), (ps["g2"]["netns"], "10.77.0.1")):
            res = ping(ns, peer)
            assert res.returncode == 0, res.stdout + res.stderr
        assert h.journal("net0", "tap") == []


@NEEDS_ROOT
@NEEDS_PING
@pytest.mark.timeout(240)
def test_bridge_ports_ping_both_ways_and_survive_a_netback_kill(run_dir: str) -> None:
    with Host(run_dir, BRIDGED) as h:
        ps = h.ps()
        net0, g1, g2 = ps["net0"], ps["g1"], ps["g2"]
        ns, d1, d2 = net0["netns"], g1["domid"], g2["domid"]
        taps = {f"vif{d1}.0", f"vif{d2}.0"}
        assert net0["switch"] == "bridge"
        assert net0["vifs"] == [
            {"frontend": "g1", "frontend_domid": d1, "devid": 0, "mac": "00:16:3e:00:00:01", "bridge": "xdombr0",
             "tap": f"vif{d1}.0"},
            {"frontend": "g2", "frontend_domid": d2, "devid": 0, "mac": "00:16:3e:00:00:02", "bridge": "xdombr0",
             "tap": f"vif{d2}.0"}]
        argv = psutil.Process(net0["pid"]).cmdline()
        assert "--bridge" in argv and "--device-fd" in argv

        # the bridge and the ports, in netback's namespace only
        assert set(links(ns, "type", "bridge")) == {"xdombr0"}
        ports = links(ns, "master", "xdombr0")
        assert set(ports) == taps
        for _name, port in ports.items():
            assert port["linkinfo"]["info_kind"] == "tun" and port["linkinfo"]["info_data"]["type"] == "tap"
            assert port["linkinfo"]["info_data"]["user"] == net0["uid"]
            assert "UP" in port["flags"]
        assert ports[f"vif{d1}.0"]["mtu"] == 1500 and ports[f"vif{d2}.0"]["mtu"] == 9000
        assert not any(t in links(g1["netns"]) for t in taps)
        with XenstoreClient.unix(h.layout.xenstored_link) as xs:
            assert xs.read(f"/local/domain/{net0['domid']}/backend/vif/{d1}/0/bridge") == b"xdombr0"
        offered = [e.detail.split()[0] for e in h.journal("net0", "tap")]
        assert sorted(offered) == sorted(taps)

        # netback takes each TAP (its log says so), and frames cross the bridge both ways
        for t in taps:
            wait_until(lambda t=t: f"{t}: bridged on TAP {t}" in log_of(h, "net0"), 30, f"net0 to take {t}")
        for nsx, peer in ((g1["netns"], "10.77.0.2"), (g2["netns"], "10.77.0.1")):
            res = ping(nsx, peer)
            assert res.returncode == 0, res.stdout + res.stderr

        # kill -9: the TAPs stay where they are (same devices), the new process is offered each again
        index = {name: port["ifindex"] for name, port in ports.items()}
        os.kill(net0["pid"], signal.SIGKILL)
        back = h.wait("net0", "restarted", state="running", generation=2)
        assert back["domid"] == net0["domid"] and back["netns"] == ns and back["pid"] != net0["pid"]
        after = links(ns, "master", "xdombr0")
        assert {name: port["ifindex"] for name, port in after.items()} == index
        offered = [e.detail.split()[0] for e in h.journal("net0", "tap")]
        assert sorted(offered) == sorted([*taps, *taps])
        for t in taps:
            wait_until(lambda t=t: log_of(h, "net0").count(f"{t}: bridged on TAP {t}") == 2, 30,
                       f"the restarted net0 to take {t}")
        for nsx, peer in ((g1["netns"], "10.77.0.2"), (g2["netns"], "10.77.0.1")):
            wait_until(lambda nsx=nsx, peer=peer: ping(nsx, peer, 1).returncode == 0, 60,
                       f"a ping to {peer} after the restart")
        assert h.row("g1")["generation"] == 1 and h.row("g2")["generation"] == 1

        # a guest restarted keeps its domid and so its TAP; it is offered again with its nodes
        h.control.request("restart", name="g2")
        r = h.wait("g2", "restarted", state="running", generation=2)
        assert r["domid"] == d2
        assert links(ns, "master", "xdombr0")[f"vif{d2}.0"]["ifindex"] == index[f"vif{d2}.0"]
        wait_until(lambda: ping(g1["netns"], "10.77.0.2", 1).returncode == 0, 60, "a ping to the restarted g2")
        layout = h.layout
    assert_nothing_left(layout)
    assert not netns.exists(ns)


@NEEDS_ROOT
@NEEDS_PING
@pytest.mark.timeout(240)
def test_network_attach_on_a_second_bridge_detach_and_destroy(run_dir: str) -> None:
    with Host(run_dir, BRIDGED) as h:
        ps = h.ps()
        ns, ns1, ns2 = ps["net0"]["netns"], ps["g1"]["netns"], ps["g2"]["netns"]
        d1, d2 = ps["g1"]["domid"], ps["g2"]["domid"]
        for name, d, ip in (("g1", d1, "10.78.0.1/24"), ("g2", d2, "10.78.0.2/24")):
            r = h.control.request("network-attach", name=name, vif=f"backend=net0, bridge=xdombr1, ip={ip}")
            assert (r["devid"], r["bridge"], r["backend_tap"]) == (1, "xdombr1", f"vif{d}.1")
        assert set(links(ns, "type", "bridge")) == {"xdombr0", "xdombr1"}
        assert port_names(ns, "xdombr1") == {f"vif{d1}.1", f"vif{d2}.1"}
        assert port_names(ns, "xdombr0") == {f"vif{d1}.0", f"vif{d2}.0"}
        assert [(v["frontend"], v["devid"], v["bridge"]) for v in h.row("net0")["vifs"]] == \
            [("g1", 0, "xdombr0"), ("g1", 1, "xdombr1"), ("g2", 0, "xdombr0"), ("g2", 1, "xdombr1")]
        wait_until(lambda: in_ns(ns1, "ping", "-c", "1", "-W", "1", "10.78.0.2").returncode == 0, 60,
                   "a ping over the hot-attached vifs")
        res = ping(ns2, "10.78.0.1")
        assert res.returncode == 0, res.stdout + res.stderr

        # a bridge name netback's namespace uses for a TAP is refused
        with pytest.raises(ControlError, match="choose another bridge name"):
            h.control.request("network-attach", name="g1", vif="backend=net0, bridge=vif1.0")

        # detach: the TAP leaves netback's namespace; the other bridge goes on
        assert h.control.request("network-detach", name="g2", vif="1").get("detaching")
        h.wait("g2", "vif 1 detached", detaching=[])           # followed from the supervisor's loop
        assert port_names(ns, "xdombr1") == {f"vif{d1}.1"}
        assert f"vif{d2}.1" not in links(ns)
        assert in_ns(ns1, "ping", "-c", "1", "-W", "1", "10.78.0.2").returncode != 0
        res = ping(ns1, "10.77.0.2")
        assert res.returncode == 0, res.stdout + res.stderr

        # destroy: the guest's TAP and its backend nodes go
        h.control.request("destroy", name="g2")
        h.wait("g2", "destroyed", state="destroyed")
        assert f"vif{d2}.0" not in links(ns) and port_names(ns, "xdombr0") == {f"vif{d1}.0"}
        with XenstoreClient.unix(h.layout.xenstored_link) as xs:
            assert not xs.exists(f"/local/domain/{ps['net0']['domid']}/backend/vif/{d2}")
        # created anew (a new domid): a new TAP, and g1 reaches it
        h.control.request("restart", name="g2")
        d2b = h.wait("g2", "created again", state="running")["domid"]
        assert port_names(ns, "xdombr0") == {f"vif{d1}.0", f"vif{d2b}.0"}
        wait_until(lambda: ping(ns1, "10.77.0.2", 1).returncode == 0, 60, "a ping to the re-created g2")


@NEEDS_ROOT
@pytest.mark.timeout(240)
def test_down_leaves_no_bridge_or_tap(run_dir: str, cleanup: list[str]) -> None:  # noqa: F811
    bridge = f"xdt{uuid.uuid4().hex[:8]}"
    body = BRIDGED.replace("ip=10.77.0.1/24", f"bridge={bridge}, ip=10.77.0.1/24")
    path, lay = topology(run_dir, body)
    cleanup.append(lay.run_dir)
    up = xdom("up", path, "--detach")
    assert up.returncode == 0, up.stdout + up.stderr
    rows = {r["name"]: r for r in json.loads(xdom("ps", "--json", "--run-dir", lay.run_dir).stdout)}
    ns, uid = rows["net0"]["netns"], rows["net0"]["uid"]
    taps = {v["tap"] for v in rows["net0"]["vifs"]}
    # there now, where the check below looks
    assert set(links(ns, "type", "bridge")) == {bridge, "xdombr0"}
    assert {n for n, link in links(ns).items() if link.get("linkinfo", {}).get("info_kind") == "tun"} == taps
    supervisor = running_pid(lay.run_dir)

    down = xdom("down", "--run-dir", lay.run_dir)
    assert down.returncode == 0, down.stdout + down.stderr
    assert supervisor is not None
    assert not psutil.pid_exists(supervisor) or psutil.Process(supervisor).status() == psutil.STATUS_ZOMBIE
    assert leftovers(lay.run_dir) == []
    assert not netns.exists(ns) and netns.of_host(lay.run_dir) == []
    # nothing moved to the host's namespace either: no such bridge, no TAP of net0's uid
    host = json.loads(subprocess.run(["ip", "-d", "-j", "link", "show"], capture_output=True, text=True,
                                     timeout=30).stdout)
    assert not [link["ifname"] for link in host if link["ifname"] == bridge
                or link.get("linkinfo", {}).get("info_data", {}).get("user") == uid
                and link.get("linkinfo", {}).get("info_kind") == "tun"]
    everywhere = subprocess.run(["ip", "-all", "netns", "exec", "ip", "-o", "link", "show"], capture_output=True,
                                text=True, timeout=60).stdout
    assert bridge not in everywhere
