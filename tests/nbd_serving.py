"""Serving an image over a real unix socket for the NBD integration tests, and a client that misbehaves.

``serving`` starts an ``NbdServer`` on a ``FileBlockDevice`` and checks on
exit that the socket is gone and no thread is left; ``RawClient`` speaks
just enough NBD to do what well-behaved tools never do.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from nbd_wire import MiB, go_data, opt, req

from xdom.domains.blockdev import FileBlockDevice
from xdom.domains.nbd.server import NbdServer
from xdom.domains.nbd.wire import (
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    IHAVEOPT,
    NBDMAGIC,
    SIMPLE_REPLY_MAGIC,
    Cmd,
    Info,
    Opt,
    Rep,
)


@contextlib.contextmanager
def short_sock_dir() -> Iterator[str]:
    """A directory for the server's socket, short enough for sun_path (108 bytes); removed after."""
    d = tempfile.mkdtemp(prefix="nbd-", dir="/tmp")        # short: sun_path is 108 bytes
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def serving(tmp_path: Any, sock_dir: str, content: bytes | None = None, size: int = 8 * MiB,
            sector_size: int = 512, read_only: bool = False, export_name: str = "",
            device: Any = None, **server_kw: Any) -> Iterator[tuple[NbdServer, str, str]]:
    """Serve an image; on exit close everything and check no thread leaked."""
    img = str(tmp_path / "disk.img")
    with open(img, "wb") as f:
        if content is not None:
            f.write(content)
        else:
            f.truncate(size)
    before = set(threading.enumerate())
    dev = FileBlockDevice(img, sector_size, read_only, scribble=True)
    sock = os.path.join(sock_dir, "nbd.sock")
    srv = NbdServer(sock, device(dev) if device else dev, export_name, **server_kw)
    try:
        srv.start()
        yield srv, img, sock
    finally:
        srv.close()
        dev.close()
    assert not os.path.exists(sock)
    leaked = [t for t in threading.enumerate() if t not in before]
    assert not leaked, f"threads left running: {leaked}"


def uri(sock: str, name: str = "") -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def need(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"{t} is not installed")


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    # cwd=/tmp: tools like fio drop state files in their working directory.
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=100, cwd=tempfile.gettempdir())
    if ok:
        assert res.returncode == 0, f"{args[0]} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def nbdinfo_json(sock: str, name: str = "") -> dict[str, Any]:
    out = json.loads(run("nbdinfo", "--json", uri(sock, name)).stdout)
    [export] = out["exports"]
    return export


class RawClient:
    """Just enough of an NBD client to misbehave on purpose."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)                  # a hang fails the test instead of blocking it
        self.sock.connect(path)
        self.pending: dict[int, tuple[int, int]] = {}

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"server closed after {len(buf)}/{n} bytes")
            buf += chunk
        return bytes(buf)

    def handshake(self, name: bytes = b"") -> tuple[int, int]:
        magic, ihave, hflags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, ihave) == (NBDMAGIC, IHAVEOPT) and hflags & FLAG_FIXED_NEWSTYLE
        self.sock.sendall(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))
        self.sock.sendall(opt(Opt.GO, go_data(name, (Info.BLOCK_SIZE,))))
        infos = {}
        while True:
            magic, _o, rtype, ln = struct.unpack(">QIII", self.recv_exact(20))
            payload = self.recv_exact(ln)
            if rtype == Rep.ACK:
                break
            assert rtype == Rep.INFO, rtype
            infos[struct.unpack(">H", payload[:2])[0]] = payload[2:]
        return struct.unpack(">QH", infos[Info.EXPORT])

    def send(self, kind: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0,
             payload: bytes = b"") -> None:
        self.pending[handle] = (kind, length)
        self.sock.sendall(req(kind, handle, offset, length, flags, payload))

    def reply(self) -> tuple[int, int, bytes]:
        magic, err, handle = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC
        kind, length = self.pending.pop(handle)
        data = self.recv_exact(length) if kind == Cmd.READ and err == 0 else b""
        return handle, err, data

    def close(self) -> None:
        self.sock.close()
