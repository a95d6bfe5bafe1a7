"""Small helpers for tests: polling with deadlines instead of sleeping."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.005) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)



import os
import sys

from xdom.deploy.agent_client import AgentProcess

PROG = os.path.join(os.path.dirname(__file__), "domain_prog.py")


class RemoteDomain(AgentProcess):
    """A domain running tests/domain_prog.py (the agent plus hostile commands)."""

    def __init__(self, mgmt, name: str, memory: str = "1M", privileged: bool = False,
                 uid: int | None = None, creds: dict | None = None) -> None:
        super().__init__(mgmt, name, memory=memory, privileged=privileged, uid=uid,
                         argv=[sys.executable, PROG], creds=creds)
