"""The VM's serial console, for programs (:meth:`Console.run`) and for people (:func:`attach`).

QEMU serves the console on a unix socket (``-chardev socket,server=on``)
and takes one client at a time.  Programs speak the line protocol of
:mod:`.initscript`: a request carries a unique id, so an answer that
arrives late (a request that timed out, a ping sent while the VM was still
booting) is recognised and skipped rather than taken for the answer to the
next one.  People get a raw byte pipe between their terminal and the
console, left with Ctrl-], as ``xl console`` and ``virsh console`` do.
"""

from __future__ import annotations

import base64
import itertools
import os
import re
import select
import socket
import sys
import termios
import time
import tty
from typing import NamedTuple

from . import initscript as proto

_ids = itertools.count(1)
_LINE = re.compile(r"(XDOM-(?:BEGIN|OUT|END|VM-READY|WARN))(?: (\S+))?(?: (\S+))?")
DETACH = 0x1D      # Ctrl-]


class ConsoleError(RuntimeError):
    """The console closed, or a request got no answer in time."""


class CommandResult(NamedTuple):
    """What a command run in the VM gave: ``status, output = console.run(...)``."""

    status: int
    output: str


class Console:
    """A connection to one VM's serial console socket.

    Everything read is also kept in :attr:`transcript` (decoded, ``\\r``
    removed), which is what a failing test wants to print.
    """

    def __init__(self, path: str, connect_timeout: float = 10.0, sock: socket.socket | None = None) -> None:
        """Connect to ``path`` (retrying while QEMU makes it), or use ``sock``, already connected to it."""
        self.path = path
        deadline = time.monotonic() + connect_timeout
        while sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise ConsoleError(f"cannot connect to the console {path}") from None
                time.sleep(0.02)
                continue
            sock = s
        self.sock = sock
        self._buf = b""
        self.transcript: list[str] = []
        self.ready_release: str | None = None
        self.warnings: list[str] = []

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_line(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def _readline(self, deadline: float) -> str | None:
        """The next line from the VM, or None at the deadline."""
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConsoleError("the console closed (QEMU exited?)")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\n", 1)
        line = raw.decode(errors="replace").replace("\r", "")
        self.transcript.append(line)
        return line

    def _submit(self, script: str) -> str:
        rid = f"r{next(_ids)}x{os.urandom(3).hex()}"
        b64 = base64.b64encode(script.encode()).decode()
        chunks = [b64[i:i + proto.CHUNK] for i in range(0, len(b64), proto.CHUNK)] or [""]
        for c in chunks[:-1]:
            self.send_line(f"{proto.DATA} {rid} {c}")
        self.send_line(f"{proto.RUN} {rid} {chunks[-1]}".rstrip())
        return rid

    def _collect(self, rid: str, deadline: float, until_ready: bool = False) -> tuple[int, bytes] | None:
        out: list[str] = []
        while True:
            line = self._readline(deadline)
            if line is None:
                return None
            m = _LINE.search(line)
            if not m:
                continue
            kind, a, b = m.groups()
            if kind == proto.READY:
                self.ready_release = a
                if until_ready:
                    return None
            elif kind == proto.WARN:
                self.warnings.append(line[m.start():])
            elif a != rid:
                continue                          # an answer to an earlier request
            elif kind == proto.OUT and b:
                out.append(b)
            elif kind == proto.END:
                return int(b or 255), base64.b64decode("".join(out))

    def run_bytes(self, script: str, timeout: float = 30.0) -> tuple[int, bytes]:
        """Run ``script`` with ``sh`` in the VM; its exit status and raw output (stdout + stderr).

        The VM runs one request at a time: after a timeout here the script
        goes on inside, and later requests wait behind it (their answers are
        still told apart by id).
        """
        rid = self._submit(script)
        got = self._collect(rid, time.monotonic() + timeout)
        if got is None:
            raise ConsoleError(f"no answer to {script!r} within {timeout}s; console tail:\n"
                               + "\n".join(self.transcript[-20:]))
        return got

    def run(self, script: str, timeout: float = 30.0) -> CommandResult:
        """Run ``script`` in the VM; ``(exit status, output)`` with the output decoded as UTF-8."""
        status, out = self.run_bytes(script, timeout)
        return CommandResult(status, out.decode(errors="replace"))

    def check(self, script: str, timeout: float = 30.0) -> str:
        """:meth:`run` that raises unless the status is 0; returns the output."""
        status, out = self.run(script, timeout)
        if status != 0:
            raise ConsoleError(f"{script!r} exited with {status}: {out}")
        return out

    def wait_ready(self, timeout: float = 60.0, interval: float = 1.0) -> float:
        """Wait until the VM answers requests; returns the seconds waited.

        Pings (``true``) are sent every ``interval`` seconds rather than
        waiting for the readiness marker alone: the VM may have printed it
        before we connected, and bytes sent while the kernel resets the
        UART can be lost, so one request is not enough.  Late answers to
        earlier pings are skipped by their ids.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            rid = self._submit("true")
            # the readiness marker means init reads the console from now on: ping again at once
            got = self._collect(rid, min(deadline, time.monotonic() + interval),
                                until_ready=self.ready_release is None)
            if got is not None:
                return time.monotonic() - t0
        raise ConsoleError(f"the VM did not answer on its console within {timeout}s; console tail:\n"
                           + "\n".join(self.transcript[-20:]))

    def poweroff(self) -> None:
        """Ask init to sync and power off (QEMU exits: it runs with -no-reboot)."""
        self.send_line(proto.POWEROFF)


def attach(path: str, name: str | None = None, stdin: int | None = None, stdout: int | None = None,
           sock: socket.socket | None = None) -> int:
    """Connect the terminal to the console at ``path`` (or ``sock``, already connected) until Ctrl-] or the
    VM goes away.

    The terminal is put in raw mode (every key goes to the VM, Ctrl-C
    included) and restored on the way out, whatever happens.  Returns 0
    after Ctrl-], 1 when the console closed.
    """
    fd_in = sys.stdin.fileno() if stdin is None else stdin
    fd_out = sys.stdout.fileno() if stdout is None else stdout
    s = sock
    if s is None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except OSError as e:
            s.close()
            raise ConsoleError(f"cannot connect to the console {path}: {e}") from e
    saved = termios.tcgetattr(fd_in) if os.isatty(fd_in) else None
    status = 1
    try:
        # Raw mode before the banner, and without TCSAFLUSH: keys typed as soon as the banner shows (or
        # before) must reach the VM, not be echoed by the cooked terminal and then thrown away.
        if saved is not None:
            tty.setraw(fd_in, termios.TCSANOW)
        os.write(fd_out, f"Connected to {name or path}; escape character is ^]\r\n".encode())
        while True:
            r, _, _ = select.select([fd_in, s], [], [])
            if s in r:
                data = s.recv(65536)
                if not data:
                    os.write(fd_out, b"\r\n[console closed]\r\n")
                    break
                os.write(fd_out, data)
            if fd_in in r:
                data = os.read(fd_in, 4096)
                if not data:
                    status = 0
                    break
                if DETACH in data:
                    before = data[:data.index(DETACH)]
                    if before:
                        s.sendall(before)
                    status = 0
                    break
                s.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(fd_in, termios.TCSADRAIN, saved)
        s.close()
    if status == 0:
        os.write(fd_out, b"\r\n")
    return status
