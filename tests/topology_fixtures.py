"""Topology text for the topology tests: the three service domains, a guest table, and parsing that expects errors."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from xdom.deploy.topology import Topology, TopologyError
from xdom.deploy.topology_parse import parse_topology

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

