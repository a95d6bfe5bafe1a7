"""`xdom down` stops in reverse start order; guests without a VM, which depend on nothing of each
other, are stopped side by side (STOP_TOGETHER at a time), every other domain alone."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from xdom.deploy.supervisor import STOP_TOGETHER, _stop_batches
from xdom.deploy.topology import DomainKind


def dom(name: str, kind: DomainKind, vm: bool = False) -> Any:
    return SimpleNamespace(name=name, kind=kind, spec=SimpleNamespace(vm=object() if vm else None))


def names(batches: list[list[Any]]) -> list[list[str]]:
    return [[d.name for d in b] for b in batches]


def test_guests_stop_together_in_reverse_order_and_driver_domains_alone() -> None:
    order = [dom("xs", DomainKind.XENSTORED), dom("blk0", DomainKind.BLKBACK), dom("net0", DomainKind.NETBACK),
             dom("g1", DomainKind.GUEST), dom("g2", DomainKind.GUEST), dom("vm1", DomainKind.GUEST, vm=True),
             dom("g3", DomainKind.GUEST)]
    assert names(_stop_batches(order)) == [["g3"], ["vm1"], ["g2", "g1"], ["net0"], ["blk0"], ["xs"]]


def test_a_long_run_of_guests_is_cut_into_batches() -> None:
    order = [dom("xs", DomainKind.XENSTORED)] + [dom(f"g{i}", DomainKind.GUEST) for i in range(1, 41)]
    batches = names(_stop_batches(order))
    assert [len(b) for b in batches] == [STOP_TOGETHER, STOP_TOGETHER, 40 - 2 * STOP_TOGETHER, 1]
    assert [n for b in batches for n in b] == [f"g{i}" for i in range(40, 0, -1)] + ["xs"]
