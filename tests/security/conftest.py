"""Fixtures of the adversarial suite: uids of our own, and a World of domain processes on the test's broker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from xdom.broker.mgmt_client import ManagementClient
from xdom.deploy.launcher import BrokerProcess

from .rig import UidPool, World, uid_problem


@pytest.fixture
def uids() -> Iterator[UidPool]:
    """Distinct uids for this test's domains (root only; skipped where uids cannot run the interpreter)."""
    why = uid_problem()
    if why is not None:
        pytest.skip(why)
    pool = UidPool()
    try:
        yield pool
    finally:
        pool.release()


@pytest.fixture
def world(broker: BrokerProcess, mgmt: ManagementClient, uids: UidPool) -> Iterator[World]:
    w = World(broker, mgmt, uids)
    try:
        yield w
    finally:
        w.close()
