"""Topology parsing over random data: nothing but TopologyError, and what a successful parse promises."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from xdom.deploy.topology import TopologyError
from xdom.deploy.topology_parse import parse_topology

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
