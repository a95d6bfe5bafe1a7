"""bench_xenstored's client side: the requests each row sends and checks, the worker and watcher
processes, and the set-up connection.

Runs in the forked worker processes (a measurement: warm up, then count
operations until the window closes), in the watcher process (counting the
watch events of the scale rows) and in the parent (set-up).  Every reply is
checked against the one expected; anything else raises ``BenchError``.
"""

from __future__ import annotations

import random
import selectors
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

MAX_CLIENTS = 8
DIR_CHILDREN = 20
TX_WRITES = 10
VALUE = b"value"
SCALE_GROUPS = 100         # watched subtrees (one watcher connection each)
SCALE_PER_GROUP = 100      # nodes per subtree: 10,000 nodes


class BenchError(Exception):
    """The run is broken (bad reply, dead server, hung client): its figures would mean nothing."""


def xs_wire() -> Any:
    from xdom.domains.abi import xs_wire
    return xs_wire


class Client:
    """One connection; synchronous request/response with raw xs_wire messages."""

    def __init__(self, path: str) -> None:
        xs = xs_wire()
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


def describe(msg: Any) -> str:
    xs = xs_wire()
    try:
        name = xs.XsType(msg.type).name
    except ValueError:
        name = f"type {msg.type}"
    return f"{name} req_id={msg.req_id} tx_id={msg.tx_id} payload={msg.payload[:80]!r}"


def check(reply: Any, what: str, type_: int, req_id: int, tx_id: int, payload: bytes | None) -> None:
    """The reply must be exactly the expected one (payload None: any payload)."""
    xs = xs_wire()
    if reply.type == xs.XsType.XS_ERROR and type_ != xs.XsType.XS_ERROR:
        raise BenchError(f"{what}: the server answered {reply.error_name} ({describe(reply)})")
    if (reply.type != type_ or reply.req_id != req_id or reply.tx_id != tx_id
            or (payload is not None and reply.payload != payload)):
        raise BenchError(f"{what}: unexpected reply {describe(reply)}; expected "
                         f"{xs.XsType(type_).name} req_id={req_id} tx_id={tx_id}"
                         + (f" payload={payload[:80]!r}" if payload is not None else ""))


def scale_node(k: int, j: int) -> tuple[str, bytes]:
    return f"/scale/g{k:02d}/n{j:02d}", f"v{k}.{j}".encode()


def simple_requests(kind: str, op: str, idx: int, expected: dict[str, Any]) -> list[tuple[bytes, int, int, bytes]]:
    """The requests an op cycles through: (encoded request, reply type, req_id, expected reply payload)."""
    xs = xs_wire()
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
    xs = xs_wire()
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
                    raise BenchError(f"TRANSACTION_START: not a transaction id: {describe(r)}") from None
                if not r.payload.endswith(b"\0") or tx == 0:
                    raise BenchError(f"TRANSACTION_START: bad transaction id: {describe(r)}")
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
    xs = xs_wire()
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
    xs = xs_wire()
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
                        errors.append(f"{name}: watcher got {describe(m)}")
    except Exception as e:
        try:
            conn.send(("error", f"watcher: {type(e).__name__}: {e}"))
        except OSError:
            pass
    finally:
        for s in socks:
            s.close()


class Pipe:
    """Raw request/response on one connection, for set-up (numbered requests, replies checked)."""

    def __init__(self, path: str) -> None:
        self.c = Client(path)
        self.rid = 1000
        self.xs = xs_wire()
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
