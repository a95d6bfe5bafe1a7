"""Fixtures shared by the suite.

Every test gets its own short run directory (unix socket paths are limited
to 108 bytes, so not pytest's long tmp_path), its own broker where it needs
one, and a check at teardown that no process it started survives.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import psutil
import pytest
from xs_fixtures import Xenstored, start_xenstored

from xdom.broker.mgmt_client import ManagementClient
from xdom.deploy.launcher import BrokerProcess, start_broker
from xdom.domains.xenhost import BrokerXenHost, LocalHypervisor, XenHost
from xdom.domains.xenstore import XenstoreClient


@pytest.fixture
def run_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="xd-", dir="/tmp")
    os.chmod(d, 0o755)   # domains may run under their own uids
    try:
        yield d
    finally:
        if not os.environ.get("XDOM_KEEP_RUN_DIR"):     # set: kept, with its logs, for a post-mortem
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leaked_children() -> Iterator[None]:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    leaked = [p for p in psutil.Process().children(recursive=True)
              if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE]
    for p in leaked:
        p.kill()
    assert not leaked, f"test left processes running: {[(p.pid, p.cmdline()) for p in leaked]}"


@pytest.fixture
def broker(run_dir: str) -> Iterator[BrokerProcess]:
    b = start_broker(os.path.join(run_dir, "broker"))
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def mgmt(broker: BrokerProcess) -> Iterator[ManagementClient]:
    c = broker.client()
    try:
        yield c
    finally:
        c.close()


class DomainFactory:
    """Creates domains in this process on one hypervisor of either variant."""

    def __init__(self, variant: str, mgmt: ManagementClient | None) -> None:
        self.variant = variant
        self.mgmt = mgmt
        self.local = LocalHypervisor() if variant == "local" else None
        self.hosts: list[XenHost] = []

    def create(self, name: str, memory: str = "1M", privileged: bool = False) -> XenHost:
        if self.local is not None:
            host: XenHost = self.local.create_domain(name, memory, privileged)
        else:
            assert self.mgmt is not None
            creds = self.mgmt.request("create", name=name, memory=memory, privileged=privileged)
            host = BrokerXenHost(creds["hypercall"], creds["token"])
        self.hosts.append(host)
        return host

    def domain_state(self, domid: int) -> str:
        if self.local is not None:
            return self.local.hv.domain(domid).state
        assert self.mgmt is not None
        return self.mgmt.request("info", domid=domid)["domain"]["state"]

    def close(self) -> None:
        for h in reversed(self.hosts):
            h.close()
        if self.local is not None:
            self.local.close()


@pytest.fixture(params=["local", "broker"])
def domains(request: pytest.FixtureRequest, run_dir: str) -> Iterator[DomainFactory]:
    """The same test against the in-process and the out-of-process hypervisor."""
    if request.param == "local":
        f = DomainFactory("local", None)
        try:
            yield f
        finally:
            f.close()
        return
    b = start_broker(os.path.join(run_dir, "broker"))
    c = b.client()
    f = DomainFactory("broker", c)
    try:
        yield f
    finally:
        f.close()
        c.close()
        b.stop()


@pytest.fixture
def xenstored(run_dir: str) -> Iterator[Xenstored]:
    """A standalone xenstored on a unix socket of this test's own."""
    xsd = start_xenstored(run_dir)
    try:
        yield xsd
    finally:
        xsd.stop()


@pytest.fixture
def xs(xenstored: Xenstored) -> Iterator[XenstoreClient]:
    """A client of :func:`xenstored`."""
    c = XenstoreClient.unix(xenstored.socket_path)
    try:
        yield c
    finally:
        c.close()
