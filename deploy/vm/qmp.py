"""A minimal QMP client: enough to ask QEMU its state and to tell it to stop.

QMP (QEMU's JSON control protocol) is how the supervisor learns what the
console cannot say: whether the VM runs, is paused, or stopped on an
accelerator error (``query-status`` answers ``internal-error`` when KVM
could not emulate an instruction).  Events that arrive between commands
are kept in :attr:`Qmp.events`.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any


class QmpError(RuntimeError):
    """QEMU answered a command with an error, or the socket closed."""


class Qmp:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"cannot connect to QMP at {path}") from None
                time.sleep(0.02)
        s.settimeout(timeout)
        self.sock = s
        self._buf = b""
        self.events: list[dict[str, Any]] = []
        self.greeting = self._read()
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QmpError("QMP socket closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command``; its ``return`` value, or :class:`QmpError` with QEMU's description."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise QmpError(f"{command}: {r['error'].get('desc', r['error'])}")
            return r.get("return")

    def status(self) -> str:
        """``running``, ``paused``, ``internal-error``, ``shutdown``, ..."""
        return str(self.execute("query-status")["status"])

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
