"""A booted VM: its QEMU and its console together, for tests, the demo and benchmarks.

Starting QEMU and being able to run a command inside are separate steps
(QEMU creates its sockets at once; the guest needs a few seconds under TCG
before init reads the console).  :func:`boot_vm` does both and hands back
something that stops QEMU whatever happened in between.
"""

from __future__ import annotations

import time

from .accel import start_qemu
from .console import CommandResult, Console
from .qemu import QemuProcess, VmPaths, VmSpec


class RunningVm:
    """QEMU plus a console connection; ``stop()`` (or leaving the ``with``) ends both."""

    def __init__(self, qemu: QemuProcess, console: Console, boot_seconds: float) -> None:
        self.qemu = qemu
        self.console = console
        self.boot_seconds = boot_seconds

    @property
    def paths(self) -> VmPaths:
        return self.qemu.paths

    @property
    def accel(self) -> str:
        return self.qemu.accel

    def run(self, script: str, timeout: float = 30.0) -> CommandResult:
        return self.console.run(script, timeout)

    def check(self, script: str, timeout: float = 30.0) -> str:
        return self.console.check(script, timeout)

    def stop(self, timeout: float = 5.0) -> int:
        self.console.close()
        return self.qemu.stop(timeout)

    def __enter__(self) -> RunningVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def boot_vm(spec: VmSpec, paths: VmPaths, *, accel: str | None = None, ready_timeout: float = 60.0,
            qemu: str | None = None) -> RunningVm:
    """Start QEMU for ``spec`` and wait until the VM answers on its console.

    ``boot_seconds`` on the result is from QEMU's start to the first answer.
    On any failure QEMU is stopped before the exception leaves, with
    QEMU's own output in the message.
    """
    q = start_qemu(spec, paths, accel=accel, **({"qemu": qemu} if qemu else {}))
    try:
        q.wait_socket(paths.console)
        con = Console(paths.console)
        try:
            con.wait_ready(ready_timeout)
        except BaseException:
            con.close()
            raise
    except BaseException as e:
        q.stop()
        log = q.log_text().strip()
        if log:
            e.add_note(f"QEMU said: {log[-2000:]}")
        raise
    return RunningVm(q, con, time.monotonic() - q.started)
