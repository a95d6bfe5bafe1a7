"""The parent side of domains/agent.py: start a domain agent and drive it."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from xdom.broker.mgmt_client import ManagementClient

from .launcher import spawn_domain, start_domain_process, stop_process

AGENT = [sys.executable, "-m", "xdom.domains.agent"]


class AgentProcess:
    """A domain process running the agent (or a subclass of it), one JSON line each way."""

    def __init__(self, mgmt: ManagementClient, name: str, memory: int | str = "1M",
                 privileged: bool = False, uid: int | None = None, argv: Sequence[str] = AGENT,
                 ready_within: float = 30.0, creds: dict[str, Any] | None = None) -> None:
        """Create domain ``name`` and start the agent in it; with ``creds``
        (from a management ``restart``) start a new process for an existing domain."""
        self.name = name
        pipes: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
        if creds is None:
            self.creds, self.proc = spawn_domain(mgmt, name, argv, memory=memory, privileged=privileged,
                                                 uid=uid, **pipes)
        else:
            self.creds, self.proc = creds, start_domain_process(creds, argv, uid=uid, **pipes)
        try:
            hello = self.read(ready_within)
        except BaseException:
            self.stop()
            raise
        self.domid: int = hello["domid"]
        self.pid: int = hello["pid"]

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise TimeoutError(f"domain {self.name} did not answer within {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError(f"domain {self.name} exited ({self.proc.wait()})")
        return json.loads(line)

    def send(self, op: str, **kw: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()

    def call(self, op: str, *, reply_within: float = 30.0, **kw: Any) -> dict[str, Any]:
        self.send(op, **kw)
        reply = self.read(reply_within)
        if "error" in reply:
            raise RuntimeError(f"domain {self.name}: {op}: {reply['error']}")
        return reply

    def kill(self) -> int:
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait()

    def stop(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        stop_process(self.proc, timeout=5)
