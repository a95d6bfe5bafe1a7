"""Small helpers for tests: polling with deadlines instead of sleeping."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

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


import json
import os
import select
import signal
import subprocess
import sys
from typing import Any

PROG = os.path.join(os.path.dirname(__file__), "domain_prog.py")


class RemoteDomain:
    """A tests/domain_prog.py process driven over its stdin/stdout."""

    def __init__(self, mgmt: Any, name: str, memory: str = "1M", privileged: bool = False,
                 uid: int | None = None) -> None:
        from xdom.deploy.launcher import spawn_domain
        self.creds, self.proc = spawn_domain(mgmt, name, [sys.executable, PROG], memory=memory,
                                             privileged=privileged, uid=uid, stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE)
        hello = self._read(30)
        self.domid: int = hello["domid"]
        self.pid: int = hello["pid"]

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise TimeoutError("domain process did not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError(f"domain process exited ({self.proc.wait()})")
        return json.loads(line)

    def call(self, op: str, *, reply_within: float = 30.0, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        return self._read(reply_within)

    def kill(self) -> int:
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait()

    def stop(self) -> None:
        from xdom.deploy.launcher import stop_process
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()   # type: ignore[union-attr]
            except OSError:
                pass
        stop_process(self.proc, timeout=5)
