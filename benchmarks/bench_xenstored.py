#!/usr/bin/env python3
"""xdom xenstored benchmark: operations per second over the unix socket, beside Xen's C xenstored.

    python benchmarks/bench_xenstored.py           # full run (about three minutes)
    python benchmarks/bench_xenstored.py --quick   # short run (under a minute), to check that it works

Rows (raw xs_wire messages over a unix socket, each client its own process,
every reply checked):

* XS_READ       ``/bench/c0/k``: 1 and 8 clients (synchronous), and 1 client
                keeping 16 requests outstanding (pipelined, as a busy ring does)
* XS_WRITE      ``/bench/cN/k`` = ``value`` (client N writes its own node): 1 and 8 clients
* XS_DIRECTORY  ``/bench/dir`` (a node with 20 children): 1 and 8 clients
* transaction   TRANSACTION_START, 10 WRITEs of ``/bench/cN/tx/0..9``, TRANSACTION_END "T"
                (counted as transactions/s; client N has its own subtree, so no conflicts)
* scale         a store grown by 10,000 nodes (``/scale/gKK/nJJ``, 100 x 100) with 100
                watchers (100 connections of one watcher process, each watching one
                ``/scale/gKK``): READ and WRITE of random nodes by 8 clients; every write
                fires one watch event, and the watch events delivered per second are
                counted by the watcher process
* bring-up      N guests' worth of toolstack traffic (INTRODUCE, the libxl-style home
                written in one transaction, a disk's and a vif's backend and frontend
                directories and their state changes 1..4) from one client; each guest's
                frontend and the backends watch their directories: the CPU xenstored
                burns per guest

Servers, all started before the first measurement and measured interleaved
(rotating order), so that drift hits them alike:

* REF    Xen 4.17's C xenstored on a unix socket.  Debian's xen-utils-4.17
         carries it, but it cannot start without a hypervisor (it opens
         privcmd first), so the benchmark runs it only through a launcher:
         ``--ref-xenstored CMD`` or ``XDOM_REF_XENSTORED`` (CMD gets the socket
         path as its last argument and must exec xenstored in the foreground,
         e.g. a wrapper that fakes the hypervisor calls with LD_PRELOAD).
         Without one the reference is reported missing and ratios fall back
         to ECHO.
* OURS   ``python -m xdom.deploy.cli xenstored --unix-socket ...`` (store in memory)
* OURS   the same with ``--state-dir`` (what a restart needs is on disk before
         the replies leave), and for the WRITE and transaction rows also
         ``python -m xdom.backends.xenstored ... --state-dir ... --fsync`` (on
         stable storage before the replies leave), where this xdom has it
* ECHO   a trivial Python unix-socket server with xenstored's loop shape,
         echoing each framed message: the floor of a Python server of this kind

Each measurement runs for a fixed time after a warm-up; the clients of one
measurement share the same window (CLOCK_MONOTONIC deadlines).  ops/s is the
sum over clients.  CPU us/op is the server process's CPU time (all its
threads, from /proc/PID/task/*/schedstat) during the window divided by the
operations completed in it, so a change that only moves cost shows.  An
unexpected reply stops the run: figures from a broken run are worthless.
Nothing is pinned and nothing is asserted about timings.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import select
import selectors
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

MAX_CLIENTS = 8
PIPELINE_DEPTH = 16
DIR_CHILDREN = 20
TX_WRITES = 10
VALUE = b"value"
SCALE_GROUPS = 100         # watched subtrees (one watcher connection each)
SCALE_PER_GROUP = 100      # nodes per subtree: 10,000 nodes
READY_TIMEOUT = 60.0       # seconds a server may take to say "ready"
RESULT_SLACK = 30.0        # seconds past its window a measurement may take before we call it hung


class BenchError(Exception):
    """The run is broken (bad reply, dead server, hung client): its figures would mean nothing."""


# ---------------------------------------------------------------------------
# the echo server (``--echo-server PATH --ready-fd N``): same loop shape as xenstored's server.py

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


# ---------------------------------------------------------------------------
# the client side (runs in the worker processes, and in the parent for set-up)


def _xs_wire() -> Any:
    from xdom.domains.abi import xs_wire
    return xs_wire


class Client:
    """One connection; synchronous request/response with raw xs_wire messages."""

    def __init__(self, path: str) -> None:
        xs = _xs_wire()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Blocking, no timeout: a socket timeout would add a poll() before every send and
        # recv.  A hung server is caught by the parent's deadline instead.
        self.sock.connect(path)
        self.reader = xs.MessageReader()

    def rpc(self, data: bytes) -> Any:
        self.sock.sendall(data)
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BenchError("the server closed the connection")
            msgs = self.reader.feed(chunk)
            if msgs:
                if len(msgs) != 1 or self.reader.pending:
                    raise BenchError(f"expected one reply, got {len(msgs)} message(s) "
                                     f"(types {[m.type for m in msgs]}) and {self.reader.pending} more bytes")
                return msgs[0]

    def close(self) -> None:
        self.sock.close()


def _describe(msg: Any) -> str:
    xs = _xs_wire()
    try:
        name = xs.XsType(msg.type).name
    except ValueError:
        name = f"type {msg.type}"
    return f"{name} req_id={msg.req_id} tx_id={msg.tx_id} payload={msg.payload[:80]!r}"


def check(reply: Any, what: str, type_: int, req_id: int, tx_id: int, payload: bytes | None) -> None:
    """The reply must be exactly the expected one (payload None: any payload)."""
    xs = _xs_wire()
    if reply.type == xs.XsType.XS_ERROR and type_ != xs.XsType.XS_ERROR:
        raise BenchError(f"{what}: the server answered {reply.error_name} ({_describe(reply)})")
    if (reply.type != type_ or reply.req_id != req_id or reply.tx_id != tx_id
            or (payload is not None and reply.payload != payload)):
        raise BenchError(f"{what}: unexpected reply {_describe(reply)}; expected "
                         f"{xs.XsType(type_).name} req_id={req_id} tx_id={tx_id}"
                         + (f" payload={payload[:80]!r}" if payload is not None else ""))


def scale_node(k: int, j: int) -> tuple[str, bytes]:
    return f"/scale/g{k:02d}/n{j:02d}", f"v{k}.{j}".encode()


def simple_requests(kind: str, op: str, idx: int, expected: dict[str, Any]) -> list[tuple[bytes, int, int, bytes]]:
    """The requests an op cycles through: (encoded request, reply type, req_id, expected reply payload)."""
    xs = _xs_wire()
    T, Message = xs.XsType, xs.Message
    echo = kind == "echo"
    ok = b"OK\0"

    def req(type_: int, rid: int, payload: bytes, want: bytes) -> tuple[bytes, int, int, bytes]:
        return Message(type_, rid, 0, payload).encode(), type_, rid, payload if echo else want

    if op == "read":
        return [req(T.XS_READ, 1, b"/bench/c0/k\0", VALUE)]
    if op == "write":
        return [req(T.XS_WRITE, 2, f"/bench/c{idx}/k\0".encode() + VALUE, ok)]
    if op == "directory":
        return [req(T.XS_DIRECTORY, 3, b"/bench/dir\0", expected.get("listing", b""))]
    if op in ("sread", "swrite"):
        rng = random.Random(1000 + idx)
        out = []
        for i in range(1024):
            path, value = scale_node(rng.randrange(SCALE_GROUPS), rng.randrange(SCALE_PER_GROUP))
            rid = 100 + i
            if op == "sread":
                out.append(req(T.XS_READ, rid, path.encode() + b"\0", value))
            else:
                out.append(req(T.XS_WRITE, rid, path.encode() + b"\0" + value, ok))
        return out
    raise ValueError(op)


def make_step(client: Client, kind: str, op: str, idx: int, expected: dict[str, Any]) -> Callable[[], None]:
    """One operation as a callable.  ``kind`` 'echo' expects each request back verbatim."""
    xs = _xs_wire()
    T, Message, rpc = xs.XsType, xs.Message, client.rpc
    echo = kind == "echo"
    ok = b"OK\0"

    if op == "tx":
        start_payload = b"\0"
        start = Message(T.XS_TRANSACTION_START, 4, 0, start_payload).encode()
        writes = [(f"/bench/c{idx}/tx/{j}\0".encode() + str(j).encode(), 5 + j) for j in range(TX_WRITES)]
        end_payload = b"T\0"
        end_rid = 5 + TX_WRITES

        def tx_step() -> None:
            r = rpc(start)
            if echo:
                check(r, "TRANSACTION_START", T.XS_TRANSACTION_START, 4, 0, start_payload)
                tx = 1
            else:
                check(r, "TRANSACTION_START", T.XS_TRANSACTION_START, 4, 0, None)
                try:
                    tx = int(r.payload.rstrip(b"\0"))
                except ValueError:
                    raise BenchError(f"TRANSACTION_START: not a transaction id: {_describe(r)}") from None
                if not r.payload.endswith(b"\0") or tx == 0:
                    raise BenchError(f"TRANSACTION_START: bad transaction id: {_describe(r)}")
            for payload, rid in writes:
                check(rpc(Message(T.XS_WRITE, rid, tx, payload).encode()), f"XS_WRITE in transaction {tx}",
                      T.XS_WRITE, rid, tx, payload if echo else ok)
            check(rpc(Message(T.XS_TRANSACTION_END, end_rid, tx, end_payload).encode()),
                  f'TRANSACTION_END "T" of transaction {tx}', T.XS_TRANSACTION_END, end_rid, tx,
                  end_payload if echo else ok)
        return tx_step

    reqs = simple_requests(kind, op, idx, expected)
    if len(reqs) == 1:
        data, type_, rid, want = reqs[0]

        def one_step() -> None:
            check(rpc(data), op, type_, rid, 0, want)
        return one_step
    pos = [0]

    def cycle_step() -> None:
        data, type_, rid, want = reqs[pos[0]]
        pos[0] = (pos[0] + 1) % len(reqs)
        check(rpc(data), op, type_, rid, 0, want)
    return cycle_step


def run_pipelined(client: Client, reqs: list[tuple[bytes, int, int, bytes]], depth: int, op: str,
                  t_start: float, t_end: float) -> dict[str, Any]:
    """Keep ``depth`` requests outstanding: each batch of replies is answered by as many new requests,
    sent in one write.  Counts the replies received between ``t_start`` and ``t_end``.

    Each reply is checked by comparing its bytes with the exact reply expected (header and
    payload), which costs the client far less than decoding it: the row measures the server.
    A reply that differs is decoded for the error message."""
    xs = _xs_wire()
    sock, mono = client.sock, time.monotonic
    n_req = len(reqs)
    expect = [xs.Message(type_, rid, 0, want).encode() for _, type_, rid, want in reqs]
    sent = got = n = warm = 0
    t0 = now = mono()
    counting = late = False
    buf = b""

    def send(k: int) -> None:
        nonlocal sent
        sock.sendall(b"".join(reqs[(sent + i) % n_req][0] for i in range(k)))
        sent += k

    send(depth)
    sending = True
    while got < sent:
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError("the server closed the connection")
        buf = buf + chunk if buf else chunk
        pos = 0
        before = got
        while got < sent:
            want = expect[got % n_req]
            end = pos + len(want)
            if buf[pos:end] != want:
                if end <= len(buf) or not want.startswith(buf[pos:]):
                    msgs = xs.MessageReader().feed(buf[pos:])
                    _, type_, rid, payload = reqs[got % n_req]
                    if not msgs:
                        raise BenchError(f"{op}: a reply that is not one: {buf[pos:pos + 80]!r}")
                    check(msgs[0], op, type_, rid, 0, payload)
                    raise BenchError(f"{op}: reply {got} differs from the one expected: {bytes(buf[pos:end])!r}")
                break
            pos = end
            got += 1
        buf = buf[pos:]
        msgs = range(got - before)
        now = mono()
        if counting:
            n += len(msgs)
        else:
            warm += len(msgs)
            if now >= t_start:
                counting, t0 = True, now
                late = warm <= depth
        if sending and counting and now >= t_end:
            sending = False
            t_stop = now
        if sending and msgs:
            send(len(msgs))
    return {"ops": n, "elapsed": t_stop - t0, "warmup_ops": warm, "late": late}


def run_measurement(idx: int, path: str, kind: str, op: str, depth: int, t_start: float, t_end: float,
                    expected: dict[str, Any]) -> dict[str, Any]:
    """Warm up until ``t_start``, then count operations until ``t_end`` (CLOCK_MONOTONIC)."""
    client = Client(path)
    try:
        if depth > 1:
            return run_pipelined(client, simple_requests(kind, op, idx, expected), depth, op, t_start, t_end)
        step = make_step(client, kind, op, idx, expected)
        mono = time.monotonic
        step()                         # at least one warm-up operation
        warm = 1
        late = mono() > t_start        # connect + first operation overran the warm-up
        while mono() < t_start:
            step()
            warm += 1
        n = 0
        t0 = mono()
        while True:
            step()
            n += 1
            now = mono()
            if now >= t_end:
                break
        return {"ops": n, "elapsed": now - t0, "warmup_ops": warm, "late": late}
    finally:
        client.close()


def worker_main(conn: Any, idx: int) -> None:
    """A client process: run each measurement the parent sends; None ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent cleans up on ^C
    while True:
        try:
            cmd = conn.recv()
        except EOFError:
            return
        if cmd is None:
            return
        try:
            conn.send(("ok", run_measurement(idx, **cmd)))
        except BenchError as e:
            conn.send(("error", f"client {idx}: {e}"))
        except Exception as e:
            conn.send(("error", f"client {idx}: {type(e).__name__}: {e}"))


# ---------------------------------------------------------------------------
# the watcher process: 100 connections per server, each watching one /scale/gKK, counting events


def watcher_main(conn: Any, sock_paths: dict[str, str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    xs = _xs_wire()
    T, Message = xs.XsType, xs.Message
    sel = selectors.DefaultSelector()
    counts = {name: 0 for name in sock_paths}
    errors: list[str] = []
    socks = []
    try:
        for name, path in sock_paths.items():
            for k in range(SCALE_GROUPS):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                s.connect(path)
                s.sendall(Message(T.XS_WATCH, 1, 0, f"/scale/g{k:02d}\0t{k}\0".encode()).encode())
                reader = xs.MessageReader()
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ, (name, reader))
                socks.append(s)
        sel.register(conn.fileno(), selectors.EVENT_READ, None)
        conn.send(("ok", "ready"))
        while True:
            for key, _ in sel.select(None):
                if key.data is None:
                    cmd = conn.recv()
                    if cmd is None:
                        return
                    conn.send(("error", "; ".join(errors[:3])) if errors else ("ok", dict(counts)))
                    continue
                name, reader = key.data
                try:
                    data = key.fileobj.recv(262144)
                except BlockingIOError:
                    continue
                if not data:
                    errors.append(f"{name}: a watcher connection was closed by the server")
                    sel.unregister(key.fileobj)
                    continue
                for m in reader.feed(data):
                    if m.type == T.XS_WATCH_EVENT:
                        counts[name] += 1
                    elif m.type != T.XS_WATCH:
                        errors.append(f"{name}: watcher got {_describe(m)}")
    except Exception as e:
        try:
            conn.send(("error", f"watcher: {type(e).__name__}: {e}"))
        except OSError:
            pass
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------
# the parent: servers, set-up, measurements, report


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` (ns, /proc/PID/task/*/schedstat)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


class Server:
    def __init__(self, name: str, argv: list[str], log_path: str, env: dict[str, str], sock_path: str,
                 state_dir: str | None, ready_fds: tuple[int, int] | None) -> None:
        self.name = name
        self.log_path = log_path
        self.sock_path = sock_path
        self.state_dir = state_dir
        self.ready_r = ready_fds[0] if ready_fds else None
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, pass_fds=(ready_fds[1],) if ready_fds else (),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    | " + line for line in lines[-n:]) or "    | (empty log)"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        if self.ready_r is None:          # the reference: ready once it answers on its socket
            while True:
                self.check_alive()
                try:
                    c = Client(self.sock_path)
                except OSError:
                    if time.monotonic() > deadline:
                        raise BenchError(f"{self.name} did not get ready within {READY_TIMEOUT:.0f} s\n"
                                         f"{self.log_tail()}") from None
                    time.sleep(0.05)
                    continue
                try:
                    xs = _xs_wire()
                    r = c.rpc(xs.Message(xs.XsType.XS_DIRECTORY, 1, 0, b"/\0").encode())
                    check(r, f"{self.name}: DIRECTORY /", xs.XsType.XS_DIRECTORY, 1, 0, None)
                finally:
                    c.close()
                return
        got = b""
        try:
            while not got.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"{self.name} did not get ready within {READY_TIMEOUT:.0f} s\n{self.log_tail()}")
                r, _, _ = select.select([self.ready_r], [], [], left)
                if r:
                    chunk = os.read(self.ready_r, 64)
                    if not chunk:
                        break
                    got += chunk
        finally:
            os.close(self.ready_r)
        if not got.startswith(b"ready"):
            self.proc.poll()
            raise BenchError(f"{self.name} did not start (said {got!r}, exit status {self.proc.returncode})\n"
                             f"{self.log_tail()}")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} died (exit status {self.proc.returncode})\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(5)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)


def find_reference(args: argparse.Namespace) -> tuple[list[str] | None, str]:
    """How to run Xen's C xenstored (argv before the socket path), and where it came from."""
    cmd = args.ref_xenstored or os.environ.get("XDOM_REF_XENSTORED")
    if cmd:
        return shlex.split(cmd), f"--ref-xenstored {cmd}"
    return None, ("missing: Debian's C xenstored cannot start without a hypervisor; give a launcher with "
                  "--ref-xenstored CMD (ratios below are against the ECHO floor)")


def start_server(name: str, tmp: str, ref_argv: list[str] | None) -> Server:
    sock_path = os.path.join(tmp, f"{name}.sock")
    log_path = os.path.join(tmp, f"{name}.log")
    state_dir = os.path.join(tmp, f"{name}-state") if name in ("xs_state", "xs_fsync") else None
    env = {k: v for k, v in os.environ.items() if k not in ("XDOM_HYPERCALL", "XDOM_TOKEN")}
    if name == "ref":
        assert ref_argv is not None
        env.setdefault("XS_SHIM_DOMAINS", "all")     # INTRODUCE in the bring-up rows needs live domains
        return Server(name, ref_argv + [sock_path], log_path, env, sock_path, None, None)
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        if name == "echo":
            argv = [sys.executable, os.path.abspath(__file__), "--echo-server", sock_path, "--ready-fd", str(w)]
        elif name == "xs_fsync":
            argv = [sys.executable, "-m", "xdom.deploy.cli", "xenstored", "--unix-socket", sock_path,
                    "--ready-fd", str(w), "--state-dir", state_dir, "--fsync"]
        else:
            argv = [sys.executable, "-m", "xdom.deploy.cli", "xenstored", "--unix-socket", sock_path,
                    "--ready-fd", str(w)]
            if state_dir:
                argv += ["--state-dir", state_dir]
        return Server(name, argv, log_path, env, sock_path, state_dir, (r, w))
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)


class Pipe:
    """Raw request/response on one connection, for set-up (numbered requests, replies checked)."""

    def __init__(self, path: str) -> None:
        self.c = Client(path)
        self.rid = 1000
        self.xs = _xs_wire()
        self.queue: list[Any] = []

    def call(self, type_: int, payload: bytes, tx: int = 0, want: bytes | None = b"OK\0") -> bytes:
        """One request; watch events that come before its reply (this connection's watches) are skipped."""
        self.rid += 1
        self.c.sock.sendall(self.xs.Message(type_, self.rid, tx, payload).encode())
        while True:
            while not self.queue:
                chunk = self.c.sock.recv(262144)
                if not chunk:
                    raise BenchError("the server closed the connection")
                self.queue += self.c.reader.feed(chunk)
            r = self.queue.pop(0)
            if r.type != self.xs.XsType.XS_WATCH_EVENT:
                break
        check(r, f"{self.xs.XsType(type_).name} {payload[:60]!r}", type_, self.rid, tx, want)
        return r.payload

    def pipelined(self, msgs: list[tuple[int, bytes]], depth: int = 64) -> None:
        """Many requests outside transactions, ``depth`` at a time, each expected to answer OK."""
        xs = self.xs
        for i in range(0, len(msgs), depth):
            batch = msgs[i:i + depth]
            first = self.rid + 1
            self.rid += len(batch)
            self.c.sock.sendall(b"".join(xs.Message(t, first + k, 0, p).encode() for k, (t, p) in enumerate(batch)))
            got: list[Any] = []
            while len(got) < len(batch):
                chunk = self.c.sock.recv(262144)
                if not chunk:
                    raise BenchError("set-up: the server closed the connection")
                got += self.c.reader.feed(chunk)
            for k, (m, (t, p)) in enumerate(zip(got, batch)):
                check(m, f"set-up {xs.XsType(t).name} {p[:60]!r}", t, first + k, 0, b"OK\0")

    def close(self) -> None:
        self.c.close()


def set_up_store(path: str) -> dict[str, Any]:
    """The nodes the benchmark reads and writes; returns the expected DIRECTORY listing."""
    xs = _xs_wire()
    T = xs.XsType
    p = Pipe(path)
    try:
        for i in range(MAX_CLIENTS):
            p.call(T.XS_WRITE, f"/bench/c{i}/k\0".encode() + VALUE)
            for j in range(TX_WRITES):
                p.call(T.XS_WRITE, f"/bench/c{i}/tx/{j}\0-".encode())
        names = [f"e{j:02d}" for j in range(DIR_CHILDREN)]
        for name in names:
            p.call(T.XS_WRITE, f"/bench/dir/{name}\0".encode())
        listing = p.call(T.XS_DIRECTORY, b"/bench/dir\0", want=None)
        got = listing.split(b"\0")[:-1]
        if sorted(got) != [n.encode() for n in names] or not listing.endswith(b"\0"):
            raise BenchError(f"set-up: /bench/dir lists {got!r}, expected the {DIR_CHILDREN} children e00..e19")
        p.call(T.XS_READ, b"/bench/c0/k\0", want=VALUE)
        return {"listing": listing}
    finally:
        p.close()


def set_up_scale(path: str) -> None:
    xs = _xs_wire()
    p = Pipe(path)
    try:
        msgs = []
        for k in range(SCALE_GROUPS):
            for j in range(SCALE_PER_GROUP):
                node, value = scale_node(k, j)
                msgs.append((xs.XsType.XS_WRITE, node.encode() + b"\0" + value))
        p.pipelined(msgs)
        node, value = scale_node(SCALE_GROUPS - 1, SCALE_PER_GROUP - 1)
        p.call(xs.XsType.XS_READ, node.encode() + b"\0", want=value)
    finally:
        p.close()


# ---- bring-up: what a toolstack, two backends and N guests' frontends ask of xenstored


def bringup(path: str, domids: range) -> None:
    """Bring ``domids`` up as the supervisor and drivers would (one disk, one vif each), over sockets.

    The toolstack introduces each domain and writes its home in one
    transaction (deploy/xsnodes.py's layout), then each device's backend and
    frontend directories; the backends (one connection watching
    /local/domain/0/backend) and each guest's frontend (a connection
    watching its device directory) then step their states to Connected.
    Watch events are drained as they come.  Every reply is checked.
    """
    xs = _xs_wire()
    T = xs.XsType
    tool = Pipe(path)
    back = Pipe(path)
    watchers: list[Client] = []
    try:
        back.call(T.XS_WATCH, b"/local/domain/0/backend\0b\0")

        def drain() -> None:
            back.queue = [m for m in back.queue if m.type != T.XS_WATCH_EVENT]
            for c in watchers:
                c.sock.setblocking(False)
                try:
                    while True:
                        data = c.sock.recv(262144)
                        if not data:
                            raise BenchError("bring-up: a watcher connection was closed")
                        for m in c.reader.feed(data):
                            if m.type not in (T.XS_WATCH_EVENT, T.XS_WATCH):
                                raise BenchError(f"bring-up: a watcher got {_describe(m)}")
                except BlockingIOError:
                    pass
                finally:
                    c.sock.setblocking(True)

        def z(s: str) -> bytes:
            return s.encode() + b"\0"

        for d in domids:
            home = f"/local/domain/{d}"
            tool.call(T.XS_INTRODUCE, z(str(d)) + z("0") + z("1"))
            tx = int(tool.call(T.XS_TRANSACTION_START, b"\0", want=None).rstrip(b"\0"))
            for sub in ("", "/device", "/control", "/memory"):
                tool.call(T.XS_MKDIR, z(home + sub), tx)
                tool.call(T.XS_SET_PERMS, z(home + sub) + z("n0") + z(f"r{d}"), tx)
            for node, value in (("name", f"g{d}"), ("domid", str(d)), ("memory/static-max", "32768"),
                                ("memory/target", "32768")):
                tool.call(T.XS_WRITE, z(f"{home}/{node}") + value.encode(), tx)
            for sub in ("control/shutdown", "control/feature-poweroff", "data", "drivers", "feature", "attr",
                        "error"):
                tool.call(T.XS_MKDIR, z(f"{home}/{sub}"), tx)
                tool.call(T.XS_SET_PERMS, z(f"{home}/{sub}") + z(f"n{d}"), tx)
            tool.call(T.XS_TRANSACTION_END, b"T\0", tx)
            w = Client(path)
            watchers.append(w)
            rid = 1
            w.sock.sendall(xs.Message(T.XS_WATCH, rid, 0, z(f"{home}/device") + z("f")).encode())
            for kind, devid, extra in (("vbd", 51712, (("params", "/img/disk.img"), ("mode", "w"))),
                                       ("vif", 0, (("mac", "00:16:3e:00:00:01"), ("bridge", "xdombr0")))):
                be, fe = f"/local/domain/0/backend/{kind}/{d}/{devid}", f"{home}/device/{kind}/{devid}"
                tx = int(tool.call(T.XS_TRANSACTION_START, b"\0", want=None).rstrip(b"\0"))
                for node, value in (("frontend", fe), ("frontend-id", str(d)), ("online", "1"),
                                    ("state", "1"), *extra):
                    tool.call(T.XS_WRITE, z(f"{be}/{node}") + value.encode(), tx)
                tool.call(T.XS_SET_PERMS, z(be) + z("n0") + z(f"r{d}"), tx)
                for node, value in (("backend", be), ("backend-id", "0"), ("state", "1")):
                    tool.call(T.XS_WRITE, z(f"{fe}/{node}") + value.encode(), tx)
                tool.call(T.XS_SET_PERMS, z(fe) + z(f"n{d}") + z("r0"), tx)
                tool.call(T.XS_TRANSACTION_END, b"T\0", tx)
                # the backend, then the frontend, then the backend again (as dom0 over sockets: what
                # the requests cost xenstored is the same on a ring)
                back.call(T.XS_WRITE, z(f"{be}/state") + b"2")
                back.call(T.XS_READ, z(f"{be}/frontend"), want=fe.encode())
                tool.call(T.XS_WRITE, z(f"{fe}/ring-ref") + b"8")
                tool.call(T.XS_WRITE, z(f"{fe}/event-channel") + b"5")
                tool.call(T.XS_WRITE, z(f"{fe}/state") + b"3")
                back.call(T.XS_READ, z(f"{fe}/ring-ref"), want=b"8")
                back.call(T.XS_WRITE, z(f"{be}/state") + b"4")
                tool.call(T.XS_WRITE, z(f"{fe}/state") + b"4")
                drain()
            tool.call(T.XS_WRITE, z(f"{home}/control/feature-poweroff") + b"1")
            drain()
    finally:
        for c in watchers:
            c.close()
        back.close()
        tool.close()


# ---- a real host: `xdom up` of N process guests, xenstored's CPU (opt-in: --host-guests)


def peer_pid(sock_path: str) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(sock_path)
        return struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
    finally:
        s.close()


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process since it started (/proc/PID/stat), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_bringup(n: int, tmp: str) -> dict[str, float]:
    """``xdom up --detach`` of xenstored, blkback, netback (builtin switch) and ``n`` process guests
    (32 MiB, one disk, one vif each); xenstored's CPU from its start to every guest ready, and
    the wall time of ``up``.  Then ``xdom down``."""
    base = tempfile.mkdtemp(prefix=f"host{n}-", dir=tmp)
    os.chmod(base, 0o755)
    state, run = os.path.join(base, "state"), os.path.join(base, "run")
    os.makedirs(os.path.join(state, "images"))
    text = [f'[host]\nstate_dir = "{state}"\nrun_dir = "{run}"\n',
            '[[domain]]\nname = "xs"\nkind = "xenstored"\n', '[[domain]]\nname = "blk0"\nkind = "blkback"\n',
            '[[domain]]\nname = "net0"\nkind = "netback"\nswitch = "builtin"\n']
    for g in range(1, n + 1):
        image = os.path.join(state, "images", f"g{g}.img")
        with open(image, "wb") as f:
            f.truncate(4 << 20)
        text.append(f'[[domain]]\nname = "g{g}"\nkind = "guest"\nmemory = "32M"\n'
                    f'disk = ["format=raw, vdev=xvda, access=rw, backend=blk0, target={image}"]\n'
                    f'vif = ["mac=00:16:3e:00:{g // 256:02x}:{g % 256:02x}, backend=net0"]\n')
    topo = os.path.join(base, "host.toml")
    with open(topo, "w") as f:
        f.write("\n".join(text))
    xdom = [sys.executable, "-m", "xdom.deploy.cli"]
    t0 = time.monotonic()
    up = subprocess.run([*xdom, "up", topo, "--detach"], capture_output=True, text=True, timeout=600,
                        stdin=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    try:
        if up.returncode != 0:
            raise BenchError(f"xdom up of {n} guests failed: {(up.stdout + up.stderr)[-800:]}")
        pid = peer_pid(os.path.join(run, "xenstored.sock"))
        return {"up_wall_s": wall, "xenstored_cpu_s": proc_cpu_s(pid)}
    finally:
        subprocess.run([*xdom, "down", "--run-dir", run], capture_output=True, timeout=600, stdin=subprocess.DEVNULL)


class Pool:
    """MAX_CLIENTS worker processes, forked once, each fed measurements over a pipe."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self.pipes = []
        self.procs = []
        for i in range(MAX_CLIENTS):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(child, i), name=f"bench-client-{i}", daemon=True)
            p.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(p)

    def measure(self, server: Server, op: str, nclients: int, depth: int, warmup: float, duration: float,
                expected: dict[str, Any], watcher: Watcher | None = None) -> dict[str, Any]:
        t_start = time.monotonic() + warmup
        t_end = t_start + duration
        cmd = {"path": server.sock_path, "kind": server.name if server.name == "echo" else "xs", "op": op,
               "depth": depth, "t_start": t_start, "t_end": t_end, "expected": expected}
        for pipe in self.pipes[:nclients]:
            pipe.send(cmd)
        time.sleep(max(0.0, t_start - time.monotonic()))
        cpu0 = cpu_ns(server.pid)
        ev0 = watcher.count(server.name) if watcher else 0
        time.sleep(max(0.0, t_end - time.monotonic()))
        cpu1 = cpu_ns(server.pid)
        results, errors = [], []
        for i, pipe in enumerate(self.pipes[:nclients]):
            left = t_end + RESULT_SLACK - time.monotonic()
            if not pipe.poll(max(0.0, left)):
                server.check_alive()
                raise BenchError(f"{server.name}: client {i} got no reply for {RESULT_SLACK:.0f} s past the end of "
                                 f"its window ({op}, {nclients} clients): server hung?\n{server.log_tail()}")
            status, res = pipe.recv()
            (results if status == "ok" else errors).append(res)
        if errors:
            server.check_alive()
            raise BenchError(f"{server.name}, {op}, {nclients} client(s): " + "; ".join(errors))
        server.check_alive()
        ev1 = watcher.count(server.name) if watcher else 0
        ops = sum(r["ops"] for r in results)
        elapsed = max(r["elapsed"] for r in results)
        return {
            "ops": ops,
            "ops_per_s": sum(r["ops"] / r["elapsed"] for r in results),
            "cpu_us_per_op": (cpu1 - cpu0) / 1e3 / ops if ops else 0.0,
            "cpu_share": (cpu1 - cpu0) / 1e9 / duration,
            "events_per_s": (ev1 - ev0) / elapsed if watcher else None,
            "late_clients": sum(r["late"] for r in results),
        }

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(2)
            if p.is_alive():
                p.terminate()
                p.join(2)
        for pipe in self.pipes:
            pipe.close()


class Watcher:
    """The watcher process of the scale rows."""

    def __init__(self, sock_paths: dict[str, str]) -> None:
        ctx = multiprocessing.get_context("fork")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=watcher_main, args=(child, sock_paths), name="bench-watcher", daemon=True)
        self.proc.start()
        child.close()
        self._expect("ready")

    def _expect(self, what: str) -> Any:
        if not self.pipe.poll(READY_TIMEOUT):
            raise BenchError(f"the watcher process did not answer ({what})")
        status, res = self.pipe.recv()
        if status != "ok":
            raise BenchError(res)
        return res

    def count(self, name: str) -> int:
        self.pipe.send("count")
        return self._expect("count")[name]

    def close(self) -> None:
        try:
            self.pipe.send(None)
        except OSError:
            pass
        self.proc.join(2)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(2)


# ---- the rows


ROWS = (   # key, label, op, clients, outstanding per client, scale row
    ("read1", "XS_READ", "read", 1, 1, False),
    ("read8", "XS_READ", "read", 8, 1, False),
    ("read_p16", f"XS_READ, {PIPELINE_DEPTH} outstanding", "read", 1, PIPELINE_DEPTH, False),
    ("write1", "XS_WRITE", "write", 1, 1, False),
    ("write8", "XS_WRITE", "write", 8, 1, False),
    ("dir1", f"XS_DIRECTORY ({DIR_CHILDREN})", "directory", 1, 1, False),
    ("dir8", f"XS_DIRECTORY ({DIR_CHILDREN})", "directory", 8, 1, False),
    ("tx1", f"transaction ({TX_WRITES} writes)", "tx", 1, 1, False),
    ("tx8", f"transaction ({TX_WRITES} writes)", "tx", 8, 1, False),
    ("sread8", "10k nodes: XS_READ random", "sread", 8, 1, True),
    ("swrite1", "10k nodes+100 watchers: WRITE", "swrite", 1, 1, True),
    ("swrite8", "10k nodes+100 watchers: WRITE", "swrite", 8, 1, True),
)
DURABLE_OPS = ("write", "tx", "swrite")
LABEL = {"echo": "ECHO floor", "ref": "REF C xenstored", "xs": "OURS in memory", "xs_state": "OURS --state-dir",
         "xs_fsync": "OURS --state-dir --fsync"}


def servers_for(op: str, available: list[str]) -> list[str]:
    return [k for k in available if k != "xs_fsync" or op in DURABLE_OPS]


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one server and row: the median round's rate and CPU, plus the spread."""
    def median(xs: list[float]) -> float:
        xs = sorted(xs)
        n = len(xs)
        return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    rates = [r["ops_per_s"] for r in rounds]
    mid = median(rates)
    ev = [r["events_per_s"] for r in rounds if r["events_per_s"] is not None]
    return {
        "ops_per_s": mid,
        "cpu_us_per_op": median([r["cpu_us_per_op"] for r in rounds]),
        "cpu_share": median([r["cpu_share"] for r in rounds]),
        "events_per_s": median(ev) if ev else None,
        "round_ops_per_s": rates,
        "spread": (max(rates) - min(rates)) / mid if mid else 0.0,
        "late_clients": sum(r["late_clients"] for r in rounds),
    }


def fs_type(path: str) -> str:
    """The file system holding ``path`` (from /proc/mounts), for the report."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3:
                    mnt = fields[1].replace("\\040", " ")
                    if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                        best, kind = mnt, fields[2]
    except OSError:
        pass
    return f"{kind} on {best or '?'}"


def scan_log(path: str) -> int:
    """Warning/error lines, less our standalone xenstored's notes on rings it cannot map (bring-up)."""
    try:
        with open(path, errors="replace") as f:
            return sum(1 for line in f if (" WARNING " in line or " ERROR " in line or "Traceback" in line)
                       and "cannot map the ring" not in line)
    except OSError:
        return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        warmup, duration, n_rounds, guests = 0.2, 0.6, 1, (16,)
    else:
        warmup, duration, n_rounds, guests = 0.3, 2.0, 4, (16, 100)
    if args.duration is not None:
        duration = args.duration
    if args.rounds is not None:
        n_rounds = max(1, args.rounds)
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="xsb-", dir="/tmp")       # short: unix socket paths max 108 bytes
    ref_argv, ref_source = find_reference(args)
    available = ["echo"] + (["ref"] if ref_argv else []) + ["xs", "xs_state", "xs_fsync"]
    servers: dict[str, Server] = {}
    pool: Pool | None = None
    watcher: Watcher | None = None
    res: dict[str, Any] = {"warmup": warmup, "duration": duration, "rounds": n_rounds, "results": {},
                           "bringup": {}, "loadavg_before": os.getloadavg(), "ref_source": ref_source,
                           "servers": available}
    try:
        pool = Pool()      # fork the clients before anything else exists
        print(f"starting {', '.join(LABEL[k] for k in available)} ...", file=sys.stderr, flush=True)
        for kind in available:
            servers[kind] = start_server(kind, tmp, ref_argv)
        for s in servers.values():
            s.wait_ready()
        stores = [k for k in available if k != "echo"]
        expected: dict[str, dict[str, Any]] = {"echo": {}}
        for kind in stores:
            expected[kind] = set_up_store(servers[kind].sock_path)
        res["state_fs"] = fs_type(tmp)

        def measure_row(key: str, op: str, n: int, depth: int) -> None:
            kinds = servers_for(op, available)
            rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
            for r in range(n_rounds):
                order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]   # no server always first
                for kind in order:
                    rounds[kind].append(pool.measure(servers[kind], op, n, depth, warmup, duration / n_rounds,
                                                     expected[kind], watcher if kind != "echo" else None))
            res["results"][key] = {k: combine(v) for k, v in rounds.items()}

        only = set(args.only.split(",")) if args.only else None
        rows = [row for row in ROWS if only is None or row[0] in only]
        plain = [row for row in rows if not row[5]]
        for i, (key, label, op, n, depth, _) in enumerate(plain, 1):
            print(f"{i}/{len(ROWS)} {label}, {n} client(s) ...", file=sys.stderr, flush=True)
            measure_row(key, op, n, depth)

        for kind in (stores if only is None or "bringup" in only else []):
            print(f"bring-up of {guests[-1]} guests on {LABEL[kind]} ...", file=sys.stderr, flush=True)
            s = servers[kind]
            out = res["bringup"][kind] = {}
            cpu0, w0, first = cpu_ns(s.pid), time.monotonic(), 1
            for n in guests:
                bringup(s.sock_path, range(first, n + 1))
                first = n + 1
                out[str(n)] = {"cpu_s": (cpu_ns(s.pid) - cpu0) / 1e9, "wall_s": time.monotonic() - w0}
            s.check_alive()

        scale = [row for row in rows if row[5]]
        if scale:
            print(f"growing the stores by {SCALE_GROUPS * SCALE_PER_GROUP:,} nodes, {SCALE_GROUPS} watchers each ...",
                  file=sys.stderr, flush=True)
            for kind in stores:
                set_up_scale(servers[kind].sock_path)
            watcher = Watcher({k: servers[k].sock_path for k in stores})
        for i, (key, label, op, n, depth, _) in enumerate(scale, len(plain) + 1):
            print(f"{i}/{len(ROWS)} {label}, {n} client(s) ...", file=sys.stderr, flush=True)
            measure_row(key, op, n, depth)
        for n in args.host_guests:
            print(f"xdom up of {n} guests (a real host) ...", file=sys.stderr, flush=True)
            try:
                res.setdefault("host", {})[str(n)] = host_bringup(n, tmp)
            except (BenchError, OSError, subprocess.TimeoutExpired) as e:      # the other rows still stand
                res.setdefault("host", {})[str(n)] = {"error": str(e)[-600:]}
        res["state_files"] = {}
        for kind in ("xs_state", "xs_fsync"):
            if kind in servers and servers[kind].state_dir:
                d = servers[kind].state_dir
                res["state_files"][kind] = {f: os.path.getsize(os.path.join(d, f)) for f in sorted(os.listdir(d))}
    finally:
        if watcher is not None:
            watcher.close()
        if pool is not None:
            pool.close()
        for s in servers.values():
            s.stop()
        warnings = {s.name: scan_log(s.log_path) for s in servers.values()}
        res["log_warnings"] = {k: v for k, v in warnings.items() if v}
        if args.keep_logs:
            print(f"server logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    res["wall"] = time.monotonic() - t0
    res["loadavg_after"] = os.getloadavg()
    return res


def report(res: dict[str, Any], args: argparse.Namespace) -> None:
    width = 150
    line = "=" * width
    have = res["servers"]
    has_ref = "ref" in have
    print()
    print(line)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n_rounds = res["rounds"]
    print(f"xdom xenstored benchmark ({'quick' if args.quick else 'full'} run: {res['duration']:g} s per server "
          f"and row" + (f" in {n_rounds} interleaved rounds (median shown)" if n_rounds > 1 else "")
          + f", each after {res['warmup']:g} s warm-up)")
    print(f"{cpus} CPUs usable, nothing pinned; load average {res['loadavg_before'][0]:.2f} before, "
          f"{res['loadavg_after'][0]:.2f} after; Python {sys.version.split()[0]}; state on {res['state_fs']}")
    print(f"REF: {res['ref_source']}")
    print(line)
    ref_name = "ref" if has_ref else "echo"
    hdr = (f"{'operation':<31} {'cl':>3} | {'REF C xenstored':>22} | {'OURS in memory':>31} | "
           f"{'OURS --state-dir':>31} | {'--fsync':>17} | {'ECHO':>8}")
    print(hdr)
    print(f"{'':<31} {'':>3} | {'ops/s':>10} {'cpu us/op':>11} | {'ops/s':>10} {'cpu us/op':>10} "
          f"{'/' + ('REF' if has_ref else 'ECHO'):>9} | {'ops/s':>10} {'cpu us/op':>10} {'/memory':>9} | "
          f"{'ops/s':>8} {'/memory':>8} | {'ops/s':>8}")
    print("-" * width)
    for key, label, _op, n, _depth, _ in ROWS:
        row = res["results"].get(key)
        if not row:
            continue
        xs_ = row["xs"]
        ref = row.get("ref")
        st = row["xs_state"]
        fs = row.get("xs_fsync")
        base = row[ref_name]["ops_per_s"]
        cells = [f"{label:<31} {n:>3}",
                 (f"{ref['ops_per_s']:>10,.0f} {ref['cpu_us_per_op']:>11.1f}" if ref else f"{'missing':>22}"),
                 f"{xs_['ops_per_s']:>10,.0f} {xs_['cpu_us_per_op']:>10.1f} {xs_['ops_per_s'] / base:>8.2f}x",
                 f"{st['ops_per_s']:>10,.0f} {st['cpu_us_per_op']:>10.1f} {st['ops_per_s'] / xs_['ops_per_s']:>8.2f}x",
                 (f"{fs['ops_per_s']:>8,.0f} {fs['ops_per_s'] / xs_['ops_per_s']:>7.2f}x" if fs else f"{'':>17}"),
                 f"{row['echo']['ops_per_s']:>8,.0f}"]
        print(" | ".join(cells))
    print("-" * width)
    print("ops/s: operations completed per second, summed over the clients (transaction rows: whole transactions);"
          " cl: clients")
    print(f"(a '{PIPELINE_DEPTH} outstanding' row is one client keeping that many requests in flight).  cpu us/op: "
          "the server's CPU time in the window / operations.")
    print(f"/{'REF' if has_ref else 'ECHO'}: ours in memory against "
          f"{'the C xenstored' if has_ref else 'the echo floor (no C xenstored in this run)'}; /memory: ours with "
          "its state on disk against ours in memory, same run.")
    ev_rows = [(key, label, n) for key, label, op, n, _, _ in ROWS if op == "swrite" and key in res["results"]]
    if ev_rows:
        print("\nwatch events delivered per second (each write to /scale/gKK/.. fires the watcher of /scale/gKK):")
        for key, _label, n in ev_rows:
            row = res["results"][key]
            cells = []
            for k in ("ref", "xs", "xs_state", "xs_fsync"):
                if k in row and row[k]["events_per_s"] is not None:
                    r = row[k]
                    cells.append(f"{LABEL[k]} {r['events_per_s']:,.0f}/s ({r['events_per_s'] / r['ops_per_s']:.2f} "
                                 "per write)")
            print(f"  {n} client(s): " + "; ".join(cells))
    if res["bringup"]:
        print("\nbring-up (toolstack + backends + frontends over sockets; one disk and one vif per guest): "
              "xenstored CPU seconds, wall seconds")
        ns = sorted({int(n) for v in res["bringup"].values() for n in v})
        for k, v in res["bringup"].items():
            cells = [f"{n} guests: {v[str(n)]['cpu_s']:6.2f} s CPU ({v[str(n)]['cpu_s'] / n * 1e3:5.1f} ms/guest), "
                     f"{v[str(n)]['wall_s']:6.2f} s wall" for n in ns if str(n) in v]
            ratio = ""
            if "ref" in res["bringup"] and k != "ref":
                last = str(ns[-1])
                ratio = f"   CPU {v[last]['cpu_s'] / max(res['bringup']['ref'][last]['cpu_s'], 1e-9):.2f}x REF's"
            print(f"  {LABEL[k]:<26} " + "; ".join(cells) + ratio)
    if res.get("host"):
        print("\nxdom up of N process guests (xenstored, blkback, netback; one disk and one vif each): xenstored's "
              "CPU from its start to all guests ready (no reference: the supervisor runs only ours)")
        for n, h in res["host"].items():
            if "error" in h:
                print(f"  {n:>4} guests: failed: {h['error']}")
            else:
                print(f"  {n:>4} guests: xenstored {h['xenstored_cpu_s']:6.2f} s CPU, `xdom up` {h['up_wall_s']:6.1f} s wall")
    if res.get("state_files"):
        print("\nstate directories at the end: " + "; ".join(
            f"{LABEL[k]}: " + ", ".join(f"{f} {size:,} B" for f, size in files.items())
            for k, files in res["state_files"].items()))
    if n_rounds > 1:
        busy = [f"{LABEL[k]} {key} {r['spread'] * 100:.0f}%" for key, row in res["results"].items()
                for k, r in row.items() if r["spread"] > 0.25]
        if busy:
            print("\nround-to-round spread above 25% (the machine was busy or the server is erratic): "
                  + ", ".join(busy))
    late = sum(r["late_clients"] for row in res["results"].values() for r in row.values())
    if late:
        print(f"\nnote: {late} client run(s) were still connecting when their window opened (warm-up too short)")
    for name, warn in res.get("log_warnings", {}).items():
        print(f"\nnote: the {LABEL.get(name, name)} log has {warn} warning/error line(s)")
    print(f"\n(total wall time {res['wall']:.1f} s)")
    print(line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run to check the benchmark works")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds per server per row, over all rounds (default 2, quick 0.3)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds the duration is split into (default 4, quick 1); the median is shown")
    ap.add_argument("--ref-xenstored", metavar="CMD", default=None,
                    help="command running Xen's C xenstored in the foreground on the socket path appended to it "
                         "(default: $XDOM_REF_XENSTORED)")
    ap.add_argument("--only", metavar="ROWS", default=None,
                    help="comma-separated row keys to run (" + ",".join(r[0] for r in ROWS) + ",bringup)")
    ap.add_argument("--host-guests", metavar="N,N", default="",
                    help="also bring a real host up (xdom up --detach) with N process guests, for each N, and "
                         "report xenstored's CPU (slow: not in the default run)")
    ap.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temporary directory with the server logs")
    ap.add_argument("--echo-server", metavar="PATH", help=argparse.SUPPRESS)
    ap.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.host_guests = [int(n) for n in args.host_guests.split(",") if n.strip()]
    if args.echo_server:
        echo_server_main(args.echo_server, args.ready_fd)
        return 0
    try:
        _xs_wire()
    except ImportError as e:
        print(f"bench_xenstored: cannot import xdom ({e}); run it with the project's venv python", file=sys.stderr)
        return 2
    try:
        res = run(args)
    except BenchError as e:
        print(f"\nbench_xenstored: run aborted, no figures: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench_xenstored: interrupted", file=sys.stderr)
        return 130
    report(res, args)
    if args.json:
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
