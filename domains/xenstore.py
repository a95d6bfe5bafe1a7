"""The xenstore client every driver uses, over a unix socket or a domain's ring.

Synchronous calls (``read``, ``write``, ``directory``, ...) from any thread;
a reader thread matches replies to requests by req_id and hands watch
events to a dispatcher thread, which runs the callbacks (so a callback may
itself call the store).

``transaction()`` runs its body again from the start whenever xenstored
answers EAGAIN: to the commit (a conflict, as libxenstore's callers retry),
and to the start or any request inside it (the transaction died with a
xenstored that was restarted: the new one answers EAGAIN for its id).

xenstored restarts are invisible on a ring (it keeps its positions).  A
unix-socket connection dies with the process; a client made with
``reconnect`` (``XenstoreClient.unix(path, reconnect=True)``) connects
again, for up to its timeout, registers its watches again (each fires once)
and sends again every request that was in flight, so each is answered once:
reads and writes outside transactions are idempotent, a request naming a
transaction of the old connection gets EAGAIN and ``transaction()`` starts
over.  Requests that are not safe to repeat (INTRODUCE, RELEASE,
SET_TARGET, RESUME, RESET_WATCHES, CONTROL) fail with ConnectionError
instead: they may or may not have been done.
"""

from __future__ import annotations

import itertools
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .abi.hvm_params import HVM_PARAM_STORE_EVTCHN, HVM_PARAM_STORE_PFN
from .abi.xs_ring import RingIndexError, ring_read, ring_write
from .abi.xs_wire import (
    RING_REQ_CONS,
    RING_REQ_OFFSET,
    RING_REQ_PROD,
    RING_RSP_CONS,
    RING_RSP_OFFSET,
    RING_RSP_PROD,
    Message,
    MessageReader,
    XenstoreError,
    XsType,
)

T = TypeVar("T")
DEFAULT_SOCKET = "/run/xenstored/socket"
WatchCallback = Callable[[str, str], None]
RECONNECT_INTERVAL = 0.05     # seconds between attempts to reach a restarting xenstored
# What a reconnected client sends again: repeating it cannot do anything twice that
# matters (a transaction of the old connection is answered EAGAIN).
_RESENDABLE = frozenset({
    XsType.XS_READ, XsType.XS_DIRECTORY, XsType.XS_DIRECTORY_PART, XsType.XS_GET_PERMS,
    XsType.XS_GET_DOMAIN_PATH, XsType.XS_IS_DOMAIN_INTRODUCED, XsType.XS_WRITE, XsType.XS_MKDIR,
    XsType.XS_RM, XsType.XS_SET_PERMS, XsType.XS_WATCH, XsType.XS_UNWATCH,
    XsType.XS_TRANSACTION_START, XsType.XS_TRANSACTION_END,
})


class UnixTransport:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(path)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> bytes:
        return self.sock.recv(65536)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class RingTransport:
    """The guest side of ``struct xenstore_domain_interface``."""

    def __init__(self, page: memoryview, host: Any, port: int) -> None:
        self.page, self.host, self.port = page, host, port
        self._progress = threading.Condition()
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            with self._progress:
                n = ring_write(self.page, RING_REQ_OFFSET, RING_REQ_CONS, RING_REQ_PROD, view)
                if n:
                    self.host.notify(self.port)
                    view = view[n:]
                elif not self._progress.wait(0.05):
                    if self._closed:
                        raise ConnectionError("xenstore ring closed")

    def recv(self) -> bytes:
        fd = self.host.evtchn.fileno(self.port)
        while True:
            try:
                data = ring_read(self.page, RING_RSP_OFFSET, RING_RSP_CONS, RING_RSP_PROD)
            except RingIndexError as e:
                raise ConnectionError(f"xenstored broke the ring: {e}") from None
            with self._progress:
                self._progress.notify_all()      # requests may fit now
            if data:
                self.host.notify(self.port)
                return data
            r, _, _ = select.select([fd, self._wake_r], [], [])
            if self._wake_r in r:
                return b""
            self.host.evtchn.consume(self.port)

    def close(self) -> None:
        self._closed = True
        os.write(self._wake_w, b"x")


class _Pending:
    __slots__ = ("done", "reply", "msg", "epoch", "error")

    def __init__(self, msg: Message) -> None:
        self.done = threading.Event()
        self.reply: Message | None = None
        self.msg = msg
        self.epoch: int | None = None       # the connection it was sent on; None: not sent yet
        self.error: BaseException | None = None


class XenstoreClient:
    def __init__(self, transport: Any, timeout: float = 30.0,
                 reconnect: Callable[[], Any] | None = None) -> None:
        """``reconnect`` makes a new transport when the connection drops (xenstored
        restarted); it may raise OSError while xenstored is not back, and is tried
        for up to ``timeout`` seconds.  Without it, a dropped connection fails
        every request in flight and the client is closed."""
        self._t = transport
        self.timeout = timeout
        self._reconnect = reconnect
        self._epoch = 0             # connections made so far, less one
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._watches: dict[tuple[str, str], WatchCallback] = {}
        self._events: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._closed = False
        self._error: BaseException | None = None
        self._reader = threading.Thread(target=self._read_loop, name="xenstore-reader", daemon=True)
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="xenstore-watches", daemon=True)
        self._reader.start()
        self._dispatcher.start()

    @classmethod
    def unix(cls, path: str | None = None, reconnect: bool = False, timeout: float = 30.0) -> XenstoreClient:
        """Connect like Xen's tools: XENSTORED_PATH, else the default socket.

        With ``reconnect``, a restart of xenstored is ridden out (see the module's docstring).
        """
        where = path or os.environ.get("XENSTORED_PATH") or DEFAULT_SOCKET
        return cls(UnixTransport(where), timeout, (lambda: UnixTransport(where)) if reconnect else None)

    @classmethod
    def ring(cls, host: Any) -> XenstoreClient:
        """Connect over this domain's xenstore ring (the toolstack set it up)."""
        gfn = host.get_param(HVM_PARAM_STORE_PFN)
        port = host.adopt_port(host.get_param(HVM_PARAM_STORE_EVTCHN))
        return cls(RingTransport(host.memory.frame(gfn), host, port))

    # ---- plumbing --------------------------------------------------------------

    def _read_loop(self) -> None:
        reader = MessageReader()
        try:
            while True:
                try:
                    data = self._t.recv()
                except OSError as e:
                    if self._reconnect is None:
                        raise
                    self._error, data = e, b""
                if not data:
                    if self._reconnect is None or self._closed or not self._connect_again():
                        break
                    reader = MessageReader()
                    continue
                for msg in reader.feed(data):
                    if msg.type == XsType.XS_WATCH_EVENT:
                        parts = msg.payload.split(b"\0")
                        if len(parts) >= 2:
                            self._events.put((parts[0].decode(errors="replace"), parts[1].decode(errors="replace")))
                        continue
                    with self._lock:
                        p = self._pending.pop(msg.req_id, None)
                    if p is not None:
                        p.reply = msg
                        p.done.set()
        except BaseException as e:        # transport gone: fail every waiter
            self._error = e
        finally:
            self._closed = True
            with self._lock:
                pending, self._pending = self._pending, {}
            for p in pending.values():
                p.done.set()
            self._events.put(None)

    def _connect_again(self) -> bool:
        """The connection dropped: make a new one, register the watches again, resend what was in flight."""
        deadline = time.monotonic() + self.timeout
        while True:
            if self._closed:
                return False
            try:
                transport = self._reconnect()           # type: ignore[misc]
                break
            except OSError as e:
                self._error = e
                if time.monotonic() > deadline:
                    return False
                time.sleep(RECONNECT_INTERVAL)
        with self._send_lock:
            old, self._t = self._t, transport
            self._epoch += 1
            try:
                old.close()
            except OSError:
                pass
            with self._lock:
                in_flight = sorted((rid, p) for rid, p in self._pending.items()
                                   if p.epoch is not None and p.epoch < self._epoch)
                # A WATCH or UNWATCH still to be answered re-registers or drops its watch itself.
                asked = {(p.msg.type, *_strings(p.msg.payload)[:2]) for p in self._pending.values()
                         if p.msg.type == XsType.XS_WATCH}
                watches = [w for w in self._watches if (XsType.XS_WATCH, *w) not in asked]
            try:
                for path, token in watches:     # replies to these match no request: dropped
                    self._t.send(Message(XsType.XS_WATCH, next(self._ids) & 0xFFFFFFFF, 0,
                                         _z(path) + _z(token)).encode())
                for rid, p in in_flight:
                    if p.msg.type in _RESENDABLE:
                        p.epoch = self._epoch
                        self._t.send(p.msg.encode())
                    else:
                        with self._lock:
                            self._pending.pop(rid, None)
                        p.error = ConnectionError(f"xenstored restarted with {XsType(p.msg.type).name} in flight: "
                                                  f"it may or may not have been done")
                        p.done.set()
            except OSError as e:
                self._error = e         # dropped again: the reader sees it and starts over
        return True

    def _dispatch_loop(self) -> None:
        while True:
            item = self._events.get()
            if item is None:
                return
            path, token = item
            with self._lock:
                cb = self._find_watch(path, token)
            if cb is not None:
                try:
                    cb(path, token)
                except Exception:
                    import logging
                    logging.getLogger("xdom.xenstore").exception("watch callback failed")

    def _find_watch(self, path: str, token: str) -> WatchCallback | None:
        for (_wpath, wtoken), cb in self._watches.items():
            if wtoken == token:
                return cb
        return None

    def request(self, type_: XsType, payload: bytes, tx: int = 0) -> bytes:
        """One request; returns the reply payload or raises XenstoreError."""
        return self._wait(self._send(type_, payload, tx))

    def requests(self, batch: list[tuple[XsType, bytes]], tx: int = 0) -> list[bytes | XenstoreError]:
        """Several requests sent together, then their replies awaited (one round trip instead of one each:
        xenstored answers a connection's requests in order); each reply's payload, or its XenstoreError."""
        sent = [self._send(type_, payload, tx) for type_, payload in batch]
        out: list[bytes | XenstoreError] = []
        for p in sent:
            try:
                out.append(self._wait(p))
            except XenstoreError as e:
                out.append(e)
        return out

    def _send(self, type_: XsType, payload: bytes, tx: int) -> _Pending:
        if self._closed:
            raise ConnectionError(f"xenstore connection closed ({self._error})")
        req_id = next(self._ids) & 0xFFFFFFFF
        p = _Pending(Message(type_, req_id, tx, payload))
        with self._lock:
            self._pending[req_id] = p
        with self._send_lock:
            p.epoch = self._epoch
            try:
                self._t.send(p.msg.encode())
            except OSError:
                if self._reconnect is None:
                    with self._lock:
                        self._pending.pop(req_id, None)
                    raise
                # the connection dropped: the reader connects again and sends it again
        return p

    def _wait(self, p: _Pending) -> bytes:
        if not p.done.wait(self.timeout):
            with self._lock:
                self._pending.pop(p.msg.req_id, None)
            raise TimeoutError(f"xenstore did not answer {XsType(p.msg.type).name} within {self.timeout}s")
        if p.error is not None:
            raise p.error
        if p.reply is None:
            raise ConnectionError(f"xenstore connection lost ({self._error})")
        if p.reply.type == XsType.XS_ERROR:
            raise XenstoreError(p.reply.error_name or "EINVAL")
        return p.reply.payload

    # ---- operations ------------------------------------------------------------

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.request(XsType.XS_READ, _z(path), tx)

    def read_many(self, paths: list[str], tx: int = 0) -> list[bytes | None]:
        """Several READs in one round trip; None for a node that does not exist (ENOENT).  Any other
        error is raised (the first one), once every reply is in."""
        out: list[bytes | None] = []
        for _path, r in zip(paths, self.requests([(XsType.XS_READ, _z(path)) for path in paths], tx)):
            if isinstance(r, XenstoreError):
                if r.name != "ENOENT":
                    raise r
                out.append(None)
            else:
                out.append(r)
        return out

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        data = value.encode() if isinstance(value, str) else value
        self.request(XsType.XS_WRITE, path.encode() + b"\0" + data, tx)

    def write_many(self, values: dict[str, bytes | str], tx: int = 0) -> None:
        """Several WRITEs in one round trip (in a transaction, usually); the first error is raised, once
        every reply is in."""
        batch = [(XsType.XS_WRITE, path.encode() + b"\0" + (v.encode() if isinstance(v, str) else v))
                 for path, v in values.items()]
        for r in self.requests(batch, tx):
            if isinstance(r, XenstoreError):
                raise r

    def mkdir(self, path: str, tx: int = 0) -> None:
        self.request(XsType.XS_MKDIR, _z(path), tx)

    def rm(self, path: str, tx: int = 0) -> None:
        self.request(XsType.XS_RM, _z(path), tx)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        return _strings(self.request(XsType.XS_DIRECTORY, _z(path), tx))

    def exists(self, path: str, tx: int = 0) -> bool:
        try:
            self.read(path, tx)
            return True
        except XenstoreError as e:
            if e.name == "ENOENT":
                return False
            raise

    def get_perms(self, path: str, tx: int = 0) -> list[str]:
        return _strings(self.request(XsType.XS_GET_PERMS, _z(path), tx))

    def set_perms(self, path: str, perms: list[str], tx: int = 0) -> None:
        self.request(XsType.XS_SET_PERMS, _z(path) + b"".join(_z(p) for p in perms), tx)

    def get_domain_path(self, domid: int) -> str:
        return self.request(XsType.XS_GET_DOMAIN_PATH, _z(str(domid))).rstrip(b"\0").decode()

    def introduce(self, domid: int, gfn: int, port: int) -> None:
        self.request(XsType.XS_INTRODUCE, _z(str(domid)) + _z(str(gfn)) + _z(str(port)))

    def release(self, domid: int) -> None:
        self.request(XsType.XS_RELEASE, _z(str(domid)))

    def is_domain_introduced(self, domid: int) -> bool:
        return self.request(XsType.XS_IS_DOMAIN_INTRODUCED, _z(str(domid))).rstrip(b"\0") == b"T"

    def set_target(self, domid: int, target: int) -> None:
        self.request(XsType.XS_SET_TARGET, _z(str(domid)) + _z(str(target)))

    def watch(self, path: str, token: str, callback: WatchCallback) -> None:
        """Watch ``path``; ``callback(path, token)`` runs for the first event and every change."""
        with self._lock:
            self._watches[(path, token)] = callback
        try:
            self.request(XsType.XS_WATCH, _z(path) + _z(token))
        except BaseException:
            with self._lock:
                self._watches.pop((path, token), None)
            raise

    def unwatch(self, path: str, token: str) -> None:
        self.request(XsType.XS_UNWATCH, _z(path) + _z(token))
        with self._lock:
            self._watches.pop((path, token), None)

    def transaction_start(self) -> int:
        """A new transaction's id; a reply that is not one (a xenstored that lies) is EINVAL, as any
        other malformed reply: the id goes into every later request's u32 header."""
        reply = self.request(XsType.XS_TRANSACTION_START, b"\0").rstrip(b"\0")
        if not reply.isdigit() or len(reply) > 10 or not 0 < int(reply) < 1 << 32:
            raise XenstoreError("EINVAL", f"TRANSACTION_START answered {reply[:32]!r}, not a transaction id")
        return int(reply)

    def transaction_end(self, tx: int, commit: bool = True) -> None:
        self.request(XsType.XS_TRANSACTION_END, b"T\0" if commit else b"F\0", tx)

    def transaction(self, body: Callable[[int], T], retries: int = 16) -> T:
        """Run ``body(tx)`` in a transaction, again from the start on EAGAIN.

        EAGAIN may come from the commit (another writer changed what the body
        read) or from the start or any request of the body: a restarted
        xenstored aborted the transaction.  ``body`` must be safe to run again
        (every body is, in Xen's toolstack); its other errors abort and raise.
        """
        for _ in range(retries):
            try:
                tx = self.transaction_start()
            except XenstoreError as e:
                if e.name != "EAGAIN":
                    raise
                continue
            try:
                result = body(tx)
            except BaseException as e:
                try:
                    self.transaction_end(tx, commit=False)
                except (XenstoreError, ConnectionError):
                    pass
                if isinstance(e, XenstoreError) and e.name == "EAGAIN":
                    continue
                raise
            try:
                self.transaction_end(tx, commit=True)
                return result
            except XenstoreError as e:
                if e.name != "EAGAIN":
                    raise
        raise XenstoreError("EAGAIN", f"transaction conflicted {retries} times")

    def walk(self, path: str = "/") -> Iterator[tuple[str, bytes]]:
        """Every (path, value) below ``path``, depth first."""
        yield path, self.read(path)
        for child in self.directory(path):
            yield from self.walk(path.rstrip("/") + "/" + child)

    def close(self) -> None:
        self._closed = True
        self._t.close()
        self._reader.join(5)
        self._dispatcher.join(5)

    def __enter__(self) -> XenstoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _z(s: str) -> bytes:
    return s.encode() + b"\0"


def _strings(payload: bytes) -> list[str]:
    return [p.decode(errors="replace") for p in payload.split(b"\0") if p]


