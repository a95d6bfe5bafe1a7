#!/usr/bin/env python3
"""bench_xenstored's ECHO floor: a trivial Python unix-socket server with xenstored's loop shape.

    python benchmarks/xsbench_echo.py PATH [--ready-fd N]

It frames each message as xs_wire does and sends it back unchanged, with
the same select loop and buffering as xenstored's server.py: what any
Python server of this kind costs, so that bench_xenstored can tell the
cost of xenstored's logic from the cost of being a Python socket server.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import struct
import sys
from typing import Any

_LEN = struct.Struct("<I")
_HEADER_SIZE = 16
_PAYLOAD_MAX = 4096


class _EchoConn:
    __slots__ = ("sock", "inbuf", "out", "writing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.out = bytearray()
        self.writing = False


def echo_server_main(path: str, ready_fd: int | None) -> None:
    """select; read each ready peer and frame its bytes; then flush every peer's output."""
    sel = selectors.DefaultSelector()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(path)
    listener.listen(1024)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, "listen")
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    running = [True]

    def stop(signum: int, frame: Any) -> None:
        running[0] = False
        os.write(wake_w, b"x")
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    conns: dict[int, _EchoConn] = {}

    def drop(c: _EchoConn) -> None:
        fd = c.sock.fileno()
        if conns.pop(fd, None) is not None:
            sel.unregister(fd)
            c.sock.close()

    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    while running[0]:
        for key, events in sel.select(None):
            what = key.data
            if what == "listen":
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    c = _EchoConn(sock)
                    conns[sock.fileno()] = c
                    sel.register(sock.fileno(), selectors.EVENT_READ, c)
            elif what == "wake":
                try:
                    os.read(wake_r, 512)
                except BlockingIOError:
                    pass
            elif events & selectors.EVENT_READ:
                c = what
                try:
                    data = c.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    drop(c)
                    continue
                buf = c.inbuf
                buf += data
                while len(buf) >= _HEADER_SIZE:
                    length = _LEN.unpack_from(buf, 12)[0]
                    if length > _PAYLOAD_MAX:
                        drop(c)
                        break
                    end = _HEADER_SIZE + length
                    if len(buf) < end:
                        break
                    c.out += buf[:end]
                    del buf[:end]
        for c in list(conns.values()):
            if not c.out:
                continue
            try:
                n = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                drop(c)
                continue
            del c.out[:n]
            want_write = bool(c.out)
            if want_write != c.writing:
                c.writing = want_write
                sel.modify(c.sock.fileno(),
                           selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0), c)
    for c in list(conns.values()):
        drop(c)
    listener.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="the unix socket to listen on")
    ap.add_argument("--ready-fd", type=int, default=None, help='write "ready" to this fd once listening')
    args = ap.parse_args()
    echo_server_main(args.path, args.ready_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
