#!/usr/bin/env python3
"""xdom xenstored benchmark: operations per second over the unix socket, next to an echo floor.

    python benchmarks/bench_xenstored.py           # full run (about a minute)
    python benchmarks/bench_xenstored.py --quick   # short run (under 15 s), to check that it works

One run measures, with 1 and with 8 concurrent client *processes*, each doing
synchronous request/response with raw xs_wire messages:

* XS_READ       ``/bench/c0/k``                      (all clients read the same node)
* XS_WRITE      ``/bench/cN/k`` = ``value``          (client N writes its own node)
* XS_DIRECTORY  ``/bench/dir``                       (a node with 20 children)
* transaction   TRANSACTION_START, 10 WRITEs of ``/bench/cN/tx/0..9`` with the
                transaction id, TRANSACTION_END "T"  (counted as transactions/s;
                client N has its own subtree, so commits never conflict)

against three servers, all started before the first measurement and measured
interleaved (echo, xenstored, xenstored --state-dir for each row) so that drift
hits the three alike:

* ECHO  a trivial Python unix SOCK_STREAM server with the same single-threaded
        selectors loop shape as xenstored, echoing every 16-byte-header framed
        message: the round-trip floor of this kind of server.  It gets exactly
        the same requests from exactly the same client code (for a
        transaction: the same 12 round trips).
* OURS  ``python -m xdom.deploy.cli xenstored --unix-socket ...`` (store in memory)
* OURS  the same with ``--state-dir`` (the store is written to disk after every
        loop turn that handled a mutating request, before the replies leave)

Each measurement runs for a fixed time after a warm-up; all clients of one
measurement share the same window (CLOCK_MONOTONIC deadlines).  ops/s is the
sum over clients; us/op is the mean round trip one client sees (for a
transaction: one whole transaction).  Every reply is checked (type, req_id,
tx_id, payload); an unexpected reply or error stops the run, since figures
from a broken run are worthless.  Nothing is pinned to a CPU and nothing is
asserted about timings.  ``--echo-server`` makes this file the echo server.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

MAX_CLIENTS = 8
CONCURRENCY = (1, MAX_CLIENTS)
DIR_CHILDREN = 20
TX_WRITES = 10
VALUE = b"value"
OPS = ("read", "write", "directory", "tx")
OP_LABEL = {"read": "XS_READ", "write": "XS_WRITE", "directory": f"XS_DIRECTORY ({DIR_CHILDREN})",
            "tx": f"transaction ({TX_WRITES} writes)"}
SERVERS = ("echo", "xs", "xs_state")
SERVER_LABEL = {"echo": "ECHO floor", "xs": "OURS xenstored (in memory)",
                "xs_state": "OURS xenstored --state-dir"}
READY_TIMEOUT = 30.0      # seconds a server may take to say "ready"
RESULT_SLACK = 30.0       # seconds past its window a measurement may take before we call it hung


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
    from xdom.domains import xs_wire
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


def make_step(client: Client, kind: str, op: str, idx: int, expected: dict[str, Any]) -> Callable[[], None]:
    """One operation as a callable.  ``kind`` 'echo' expects each request back verbatim."""
    xs = _xs_wire()
    T, Message, rpc = xs.XsType, xs.Message, client.rpc
    echo = kind == "echo"
    ok = b"OK\0"

    if op == "read":
        payload = b"/bench/c0/k\0"
        req = Message(T.XS_READ, 1, 0, payload).encode()
        want = payload if echo else VALUE

        def step() -> None:
            check(rpc(req), "XS_READ /bench/c0/k", T.XS_READ, 1, 0, want)
        return step

    if op == "write":
        payload = f"/bench/c{idx}/k\0".encode() + VALUE
        req = Message(T.XS_WRITE, 2, 0, payload).encode()
        want = payload if echo else ok

        def step() -> None:
            check(rpc(req), f"XS_WRITE /bench/c{idx}/k", T.XS_WRITE, 2, 0, want)
        return step

    if op == "directory":
        payload = b"/bench/dir\0"
        req = Message(T.XS_DIRECTORY, 3, 0, payload).encode()
        want = payload if echo else expected["listing"]

        def step() -> None:
            check(rpc(req), "XS_DIRECTORY /bench/dir", T.XS_DIRECTORY, 3, 0, want)
        return step

    if op == "tx":
        start_payload = b"\0"
        start = Message(T.XS_TRANSACTION_START, 4, 0, start_payload).encode()
        writes = [(f"/bench/c{idx}/tx/{j}\0".encode() + str(j).encode(), 5 + j) for j in range(TX_WRITES)]
        end_payload = b"T\0"
        end_rid = 5 + TX_WRITES

        def step() -> None:
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
        return step

    raise ValueError(op)


def run_measurement(idx: int, path: str, kind: str, op: str, t_start: float, t_end: float,
                    expected: dict[str, Any]) -> dict[str, Any]:
    """Warm up until ``t_start``, then count operations until ``t_end`` (CLOCK_MONOTONIC)."""
    client = Client(path)
    try:
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
# the parent: servers, set-up, measurements, report


class Server:
    def __init__(self, name: str, argv: list[str], log_path: str, env: dict[str, str], ready_w: int,
                 ready_r: int, sock_path: str, state_dir: str | None) -> None:
        self.name = name
        self.log_path = log_path
        self.sock_path = sock_path
        self.state_dir = state_dir
        self.ready_r = ready_r
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, pass_fds=(ready_w,), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, env=env, start_new_session=True)

    def log_tail(self, n: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    | " + line for line in lines[-n:]) or "    | (empty log)"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
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
        if got != b"ready\n":
            self.proc.poll()
            raise BenchError(f"{self.name} did not start (said {got!r}, exit status {self.proc.returncode})\n"
                             f"{self.log_tail()}")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} died (exit status {self.proc.returncode})\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_server(name: str, kind: str, tmp: str) -> Server:
    sock_path = os.path.join(tmp, f"{name}.sock")
    log_path = os.path.join(tmp, f"{name}.log")
    state_dir = os.path.join(tmp, f"{name}-state") if kind == "xs_state" else None
    env = {k: v for k, v in os.environ.items() if k not in ("XDOM_HYPERCALL", "XDOM_TOKEN")}
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        if kind == "echo":
            argv = [sys.executable, os.path.abspath(__file__), "--echo-server", sock_path, "--ready-fd", str(w)]
        else:
            argv = [sys.executable, "-m", "xdom.deploy.cli", "xenstored", "--unix-socket", sock_path,
                    "--ready-fd", str(w)]
            if state_dir:
                argv += ["--state-dir", state_dir]
        return Server(name, argv, log_path, env, w, r, sock_path, state_dir)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)


def set_up_store(path: str) -> dict[str, Any]:
    """The nodes the benchmark reads and writes; returns the expected DIRECTORY listing."""
    xs = _xs_wire()
    T, Message = xs.XsType, xs.Message
    c = Client(path)
    try:
        rid = 100

        def write(node: str, value: bytes) -> None:
            nonlocal rid
            rid += 1
            check(c.rpc(Message(T.XS_WRITE, rid, 0, node.encode() + b"\0" + value).encode()),
                  f"set-up XS_WRITE {node}", T.XS_WRITE, rid, 0, b"OK\0")

        for i in range(MAX_CLIENTS):
            write(f"/bench/c{i}/k", VALUE)
            for j in range(TX_WRITES):
                write(f"/bench/c{i}/tx/{j}", b"-")
        names = [f"e{j:02d}" for j in range(DIR_CHILDREN)]
        for name in names:
            write(f"/bench/dir/{name}", b"")
        r = c.rpc(Message(T.XS_DIRECTORY, 1, 0, b"/bench/dir\0").encode())
        check(r, "set-up XS_DIRECTORY /bench/dir", T.XS_DIRECTORY, 1, 0, None)
        listing = r.payload
        got = listing.split(b"\0")[:-1]
        if sorted(got) != [n.encode() for n in names] or not r.payload.endswith(b"\0"):
            raise BenchError(f"set-up: /bench/dir lists {got!r}, expected the {DIR_CHILDREN} children e00..e19")
        r = c.rpc(Message(T.XS_READ, 2, 0, b"/bench/c0/k\0").encode())
        check(r, "set-up XS_READ /bench/c0/k", T.XS_READ, 2, 0, VALUE)
        return {"listing": listing}
    finally:
        c.close()


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

    def measure(self, server: Server, kind: str, op: str, nclients: int, warmup: float, duration: float,
                expected: dict[str, Any]) -> dict[str, Any]:
        t_start = time.monotonic() + warmup
        t_end = t_start + duration
        cmd = {"path": server.sock_path, "kind": kind, "op": op, "t_start": t_start, "t_end": t_end,
               "expected": expected}
        for pipe in self.pipes[:nclients]:
            pipe.send(cmd)
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
            raise BenchError(f"{server.name}, {OP_LABEL[op]}, {nclients} client(s): " + "; ".join(errors))
        server.check_alive()
        return {
            "ops": sum(r["ops"] for r in results),
            "ops_per_s": sum(r["ops"] / r["elapsed"] for r in results),
            "us_per_op": sum(r["elapsed"] / r["ops"] for r in results) / nclients * 1e6,
            "client_ops_per_s": [r["ops"] / r["elapsed"] for r in results],
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
            if p.is_alive():
                p.kill()
                p.join(2)
        for pipe in self.pipes:
            pipe.close()


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one server/op/concurrency: the median round, plus the spread and per-client means."""
    rates = sorted(r["ops_per_s"] for r in rounds)
    mid = rates[len(rates) // 2] if len(rates) % 2 else (rates[len(rates) // 2 - 1] + rates[len(rates) // 2]) / 2
    lat = sorted(r["us_per_op"] for r in rounds)
    mid_lat = lat[len(lat) // 2] if len(lat) % 2 else (lat[len(lat) // 2 - 1] + lat[len(lat) // 2]) / 2
    clients = [sum(r["client_ops_per_s"][i] for r in rounds) / len(rounds)
               for i in range(len(rounds[0]["client_ops_per_s"]))]
    return {
        "clients": len(clients),
        "ops_per_s": mid,
        "us_per_op": mid_lat,
        "round_ops_per_s": [r["ops_per_s"] for r in rounds],
        "spread": (rates[-1] - rates[0]) / mid if mid else 0.0,
        "ops": sum(r["ops"] for r in rounds),
        "min_client_ops_per_s": min(clients),
        "max_client_ops_per_s": max(clients),
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


def report(res: dict[str, Any], args: argparse.Namespace) -> None:
    line = "=" * 118
    print()
    print(line)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n_rounds = res["rounds"]
    print(f"xdom xenstored benchmark ({'quick' if args.quick else 'full'} run: {res['duration']:g} s per server "
          f"and row" + (f" in {n_rounds} interleaved rounds of {res['duration'] / n_rounds:g} s (median shown)"
             if n_rounds > 1 else "")
          + f", each after {res['warmup']:g} s warm-up)")
    before, after = res["loadavg_before"][0], res["loadavg_after"][0]
    print(f"{cpus} CPUs usable, nothing pinned; load average {before:.2f} before, {after:.2f} after; "
          f"Python {sys.version.split()[0]}; --state-dir on {res['state_fs']}")
    print("unix socket, synchronous request/response, each client its own process")
    print(line)
    col = "{:>10} {:>8}"
    print(f"{'':<28} {'clients':>7} | {'ECHO floor':^19} | {'OURS xenstored (in memory)':^30} | "
          f"{'OURS xenstored --state-dir':^30}")
    print(f"{'operation':<28} {'':>7} | {col.format('ops/s', 'us/op')} | {col.format('ops/s', 'us/op')} "
          f"{'ours/echo':>10} | {col.format('ops/s', 'us/op')} {'ours/echo':>10}")
    print("-" * 118)
    for op in OPS:
        for n in CONCURRENCY:
            row = res["results"][op][str(n)]
            e, a, b = row["echo"], row["xs"], row["xs_state"]
            print(f"{OP_LABEL[op]:<28} {n:>7} | {e['ops_per_s']:>10,.0f} {e['us_per_op']:>8.1f} | "
                  f"{a['ops_per_s']:>10,.0f} {a['us_per_op']:>8.1f} {a['ops_per_s'] / e['ops_per_s']:>9.2f}x | "
                  f"{b['ops_per_s']:>10,.0f} {b['us_per_op']:>8.1f} {b['ops_per_s'] / e['ops_per_s']:>9.2f}x")
    print("-" * 118)
    print("ops/s: completed operations per second, summed over the clients (transaction rows: whole "
          "transactions/s).")
    print("us/op: mean time one client waits for one operation (transaction rows: one whole transaction).")
    print(f"ours/echo: our ops/s divided by the echo floor's ops/s for the same requests and clients "
          f"(the echo floor of a transaction is its {TX_WRITES + 2} round trips, echoed).")
    print("\npersistence cost (in-memory ops/s divided by --state-dir ops/s):")
    for op in OPS:
        cells = []
        for n in CONCURRENCY:
            row = res["results"][op][str(n)]
            cells.append(f"{n} client{'s' if n > 1 else ''}: {row['xs']['ops_per_s'] / row['xs_state']['ops_per_s']:5.2f}x")
        print(f"  {OP_LABEL[op]:<28} " + "   ".join(cells))
    if res.get("db_bytes") is not None:
        print(f"  (xenstore.db at the end: {res['db_bytes']:,} bytes, rewritten after every mutating loop turn)")
    spread = []
    for op in OPS:
        row = res["results"][op][str(MAX_CLIENTS)]
        for kind in SERVERS:
            r = row[kind]
            if r["min_client_ops_per_s"] < 0.5 * r["max_client_ops_per_s"]:
                spread.append(f"{SERVER_LABEL[kind]} {OP_LABEL[op]}: slowest client {r['min_client_ops_per_s']:,.0f}"
                              f" ops/s, fastest {r['max_client_ops_per_s']:,.0f}")
    if n_rounds > 1:
        print(f"\nround-to-round spread of ops/s, (max - min) / median over the {n_rounds} rounds "
              f"(echo / in memory / --state-dir; * above 25%: the machine was busy or the server is erratic):")
        for op in OPS:
            for n in CONCURRENCY:
                row = res["results"][op][str(n)]
                cells = " / ".join(f"{row[k]['spread'] * 100:4.0f}%{'*' if row[k]['spread'] > 0.25 else ' '}"
                                   for k in SERVERS)
                print(f"  {OP_LABEL[op]:<28} {n:>2} client{'s' if n > 1 else ' '}: {cells}")
    late = sum(res["results"][op][str(n)][k]["late_clients"] for op in OPS for n in CONCURRENCY for k in SERVERS)
    if spread:
        print("\nunfair service among the 8 clients (slowest below half the fastest):")
        for s in spread:
            print("  " + s)
    if late:
        print(f"\nnote: {late} client run(s) were still connecting when their window opened (warm-up too short)")
    for name, warn in res.get("log_warnings", {}).items():
        print(f"\nnote: the {name} log has {warn} warning/error line(s)")
    print(f"\n(total wall time {res['wall']:.1f} s)")
    print(line)


def scan_log(path: str) -> int:
    try:
        with open(path, errors="replace") as f:
            return sum(1 for line in f if " WARNING " in line or " ERROR " in line or "Traceback" in line)
    except OSError:
        return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        warmup, duration, n_rounds = 0.1, 0.3, 1
    else:
        warmup, duration, n_rounds = 0.15, 2.0, 4
    if args.duration is not None:
        duration = args.duration
    if args.rounds is not None:
        n_rounds = max(1, args.rounds)
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="xsb-", dir="/tmp")       # short: unix socket paths max 108 bytes
    servers: dict[str, Server] = {}
    pool: Pool | None = None
    res: dict[str, Any] = {"warmup": warmup, "duration": duration, "rounds": n_rounds, "results": {},
                           "loadavg_before": os.getloadavg()}
    try:
        pool = Pool()      # fork the clients before anything else exists
        print("starting echo server and two xenstoreds ...", file=sys.stderr, flush=True)
        for kind in SERVERS:
            servers[kind] = start_server(kind, kind, tmp)
        for s in servers.values():
            s.wait_ready()
        expected: dict[str, dict[str, Any]] = {"echo": {}}
        for kind in ("xs", "xs_state"):
            expected[kind] = set_up_store(servers[kind].sock_path)
        res["state_fs"] = fs_type(servers["xs_state"].state_dir or tmp)
        total = len(OPS) * len(CONCURRENCY)
        k = 0
        for op in OPS:
            res["results"][op] = {}
            for n in CONCURRENCY:
                k += 1
                print(f"{k}/{total} {OP_LABEL[op]}, {n} client(s) ...", file=sys.stderr, flush=True)
                rounds: dict[str, list[dict[str, Any]]] = {kind: [] for kind in SERVERS}
                for r in range(n_rounds):
                    # rotate the order so that no server always runs first (or right after another)
                    for kind in SERVERS[r % 3:] + SERVERS[:r % 3]:
                        rounds[kind].append(pool.measure(servers[kind], kind, op, n, warmup, duration / n_rounds,
                                                         expected[kind]))
                row = {kind: combine(rounds[kind]) for kind in SERVERS}
                res["results"][op][str(n)] = row
        db = os.path.join(servers["xs_state"].state_dir or "", "xenstore.db")
        res["db_bytes"] = os.path.getsize(db) if os.path.exists(db) else None
        if res["db_bytes"] is None:
            raise BenchError(f"xenstored --state-dir wrote no {db}")
    finally:
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (under 15 s) to check the benchmark works")
    ap.add_argument("--duration", type=float, default=None, help="seconds per server per row, over all rounds (default 2, quick 0.3)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds the duration is split into (default 4, quick 1); the median is shown")
    ap.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temporary directory with the server logs")
    ap.add_argument("--echo-server", metavar="PATH", help=argparse.SUPPRESS)
    ap.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
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
