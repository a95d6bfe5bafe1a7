"""qemu-storage-daemon as a reference vhost-user-blk back end.

xdom's own vhost-user-blk (the guest domain serving blkfront to the VM) is
judged against QEMU's: the same VM, the same image file, the same
commands, once with ``qemu-storage-daemon --export type=vhost-user-blk``
and once with ours.  Differences in what the VM sees (capacity, queues,
features, data) point at our side.  Known difference, on purpose: killing
qemu-storage-daemon leaves the VM's I/O stuck for good; xdom's back end
restarts under the VM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import IO

from .qemu import terminate

QSD = "qemu-storage-daemon"


def _opt(value: str) -> str:
    return value.replace(",", ",,")


def storage_daemon_argv(image: str, socket: str, *, fmt: str = "raw", num_queues: int = 1,
                        writable: bool = True, logical_block_size: int | None = None,
                        direct: bool = False, qsd: str = QSD) -> list[str]:
    """The command line exporting ``image`` as vhost-user-blk on the unix socket ``socket``."""
    export = (f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={_opt(socket)},"
              f"writable={'on' if writable else 'off'},num-queues={num_queues}")
    if logical_block_size:
        export += f",logical-block-size={logical_block_size}"
    ro = "" if writable else ",read-only=on"
    return [qsd,
            "--blockdev", f"driver=file,node-name=file0,filename={_opt(image)},"
                          f"cache.direct={'on' if direct else 'off'}{ro}",
            "--blockdev", f"driver={fmt},node-name=disk0,file=file0{ro}",
            "--export", export]


class StorageDaemon:
    """A running qemu-storage-daemon serving one image; a context manager that always reaps it.

    The socket exists once the daemon listens, so QEMU can be started as
    soon as the constructor returns.
    """

    def __init__(self, image: str, socket: str, log: str, *, num_queues: int = 1, writable: bool = True,
                 fmt: str = "raw", timeout: float = 10.0) -> None:
        self.image = image
        self.socket = socket
        self.log = log
        try:
            os.unlink(socket)
        except FileNotFoundError:
            pass
        self.argv = storage_daemon_argv(image, socket, fmt=fmt, num_queues=num_queues, writable=writable)
        self._log: IO[bytes] = open(log, "ab")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not os.path.exists(socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(log, errors="replace") as f:
                    raise RuntimeError(f"qemu-storage-daemon did not listen on {socket}: {f.read()[-2000:]}")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL, as a crash would (the VM's I/O then stalls for good)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 5.0) -> int:
        rc = terminate(self.proc, timeout)
        self._log.close()
        return rc

    def __enter__(self) -> StorageDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
