"""The front door: a host's control operations and lifecycle events over tcp, for remote ``xdom`` clients only.

A host whose topology says ``[host] listen = "tcp://ADDR:PORT"`` serves
there what ``xdom`` does locally over ``RUN_DIR/supervisor.sock``, and
publishes its broker's lifecycle events on ``events_listen`` (default: the
next port).  Both are CurveZMQ sockets (RFC 26): encrypted, the server
authenticated by its key, every client by its key against the host's
allow-list (:mod:`xdom.deploy.curvekeys`), checked on each new connection by
a ZAP handler (RFC 27) that runs in this module's own loop.  There is no
plaintext tcp listener, ever: without a readable secret key and a non-empty
allow-list the listener is refused, and the ZAP handler is bound before the
listener so that no handshake can pass unchecked.

It is thin on purpose.  The supervisor runs it as a thread of its own with
its own ZeroMQ context (so its ZAP handler sees no other socket); it only
relays: a request goes, unchanged, to the local control socket (the
supervisor answers every request at once, see :mod:`.control`), and its
reply comes back; events come from the broker's ``events.sock``.  It keeps no
state of the host, so the supervisor's core only starts and stops it.  What
it does itself is the two operations that are not the running host's:
``up`` of a topology file on this machine (``xdom up FILE --detach``, run
here) and ``down`` of another host of this machine (``xdom down -t FILE``);
``down`` of its own host is the supervisor's ``stop``.

Only the operations listed in :data:`RELAYED` and :data:`JOBS` pass;
anything else (an unknown op, a request too large, something undecodable)
is answered here and never reaches the supervisor.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.utils.z85

from xdom.broker.rpc import MAX_REQUEST, RequestError, decode, encode, error_reply

from . import curvekeys

__all__ = ["JOBS", "RELAYED", "FrontDoor", "ListenerConfig", "RemoteError", "RemoteProtocol", "events_address",
           "listener_config"]

log = logging.getLogger("xdom.supervisor.remote")

# The supervisor's control operations a remote client may ask for (deploy/control.py).
RELAYED = frozenset({"ping", "ps", "info", "restart", "destroy", "stop", "block-attach", "block-detach",
                     "network-attach", "network-detach"})
# What the front door does itself, as a job in a thread of its own (it takes seconds).
JOBS = frozenset({"up", "down"})
RELAY_TIMEOUT = 10.0        # s the supervisor has to answer a relayed request (it answers at once)
JOB_TIMEOUT = 300.0         # s an `xdom up --detach` or `xdom down` run here may take
MAX_JOBS = 4
MESSAGES_PER_TURN = 64
OUTPUT_TAIL = 8192          # bytes of a job's output sent back


class RemoteError(Exception):
    """A listener that must not start (no key, no allow-list, address in use); the message says why."""


@dataclass(frozen=True)
class ListenerConfig:
    listen: str
    events_listen: str
    server_key: str             # the server's secret key file
    allowed_clients: str        # the allow-list directory


def events_address(listen: str) -> str:
    """``tcp://ADDR:PORT`` -> ``tcp://ADDR:PORT+1``: where events are published unless the topology says."""
    head, _, port = listen.rpartition(":")
    return f"{head}:{int(port) + 1}"


def listener_config(host: Any, state_dir: str) -> ListenerConfig | None:
    """The listener a topology's ``[host]`` table asks for (paths resolved against the state directory), or None."""
    if not getattr(host, "listen", None):
        return None

    def path(value: str | None, default: str) -> str:
        return os.path.join(state_dir, value or default)    # an absolute value stays as it is
    return ListenerConfig(host.listen, host.events_listen or events_address(host.listen),
                          path(host.server_key, "keys/server.key_secret"),
                          path(host.allowed_clients, "keys/allowed_clients"))


def check_listener(cfg: ListenerConfig) -> tuple[bytes, bytes, set[bytes]]:
    """(public, secret, allowed): what the listener needs, or RemoteError saying what is missing."""
    try:
        public, secret = curvekeys.load_secret(cfg.server_key)
        allowed = curvekeys.load_allowed(cfg.allowed_clients)
    except curvekeys.KeyFileError as e:
        raise RemoteError(f"not listening on {cfg.listen}: {e}") from None
    if not allowed:
        raise RemoteError(f"not listening on {cfg.listen}: the allow-list {cfg.allowed_clients} has no client key "
                          f"(xdom keys allow CLIENT.key --dir {os.path.dirname(cfg.allowed_clients)})")
    return public, secret, allowed


# ---- the protocol: what to do with one request, sans-IO ------------------------------------------------

@dataclass(frozen=True)
class Decision:
    """``reply`` (answer now), ``relay`` (send ``payload`` to the supervisor) or ``job`` (run ``argv`` here)."""

    action: str
    reply: dict[str, Any] | None = None
    payload: bytes = b""
    argv: tuple[str, ...] = ()
    op: str = ""


class RemoteProtocol:
    """Decides what a remote request becomes.  ``own_topology`` is the running host's topology file."""

    def __init__(self, own_topology: str) -> None:
        self.own_topology = os.path.realpath(own_topology)

    def decide(self, payload: bytes) -> Decision:
        try:
            req = decode(payload)
        except RequestError as e:
            return Decision("reply", e.reply())
        op = req.get("op") if isinstance(req, dict) else None
        if not isinstance(req, dict) or not isinstance(op, str) or op not in RELAYED | JOBS:
            return Decision("reply", error_reply(errno.ENOSYS, f"{op!r:.40} is not served remotely; what is: "
                                                               f"{', '.join(sorted(RELAYED | JOBS))}"))
        if op in RELAYED:
            return Decision("relay", payload=payload, op=op)
        topology = req.get("topology")
        if topology is None and op == "down":
            return Decision("relay", payload=encode({"op": "stop"}), op="stop")
        if not isinstance(topology, str) or not topology.startswith("/") or "\0" in topology:
            return Decision("reply", error_reply(errno.EINVAL, f"{op}: 'topology' must be the absolute path of a "
                                                               f"topology file on this host"))
        own = os.path.realpath(topology) == self.own_topology
        if op == "down" and own:
            return Decision("relay", payload=encode({"op": "stop"}), op="stop")
        if op == "up" and own:
            return Decision("reply", {"ok": True, "status": 0, "already": True,
                                      "output": f"{topology} is this host's own topology: it is up\n"})
        if not os.path.isfile(topology):
            return Decision("reply", error_reply(errno.ENOENT, f"no topology file {topology} on this host"))
        cli = (sys.executable, "-m", "xdom.deploy.cli")
        argv = (*cli, "up", topology, "--detach") if op == "up" else (*cli, "down", "--topology", topology)
        return Decision("job", argv=argv, op=op)


# ---- the front door: sockets and a thread -----------------------------------------------------------

class FrontDoor:
    """The listener of one host; :meth:`close` stops it.  Raises RemoteError when it must not listen."""

    def __init__(self, cfg: ListenerConfig, control_endpoint: str, events_endpoint: str, own_topology: str) -> None:
        public, secret, self._allowed = check_listener(cfg)
        self.cfg = cfg
        self._allowed_stamp = self._stamp()
        self.protocol = RemoteProtocol(own_topology)
        self._ctx = zmq.Context()
        self._stopping = False
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_lock = threading.Lock()     # a job's thread never writes a closed (reused) descriptor
        self._results: queue.Queue[tuple[list[bytes], dict[str, Any]]] = queue.Queue()
        self._jobs = 0
        self._pending: dict[bytes, tuple[list[bytes], float]] = {}
        self._serial = 0
        self._refused_logged: dict[str, float] = {}
        try:
            # The ZAP handler first: a CURVE socket without one would let every client key in.
            self._zap = self._socket(zmq.ROUTER)
            self._zap.bind("inproc://zeromq.zap.01")
            self._router = self._curve_socket(zmq.ROUTER, public, secret)
            self._router.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST + 4096)
            self._router.bind(cfg.listen)
            self._pub = self._curve_socket(zmq.PUB, public, secret)
            self._pub.bind(cfg.events_listen)
            self._upstream = self._socket(zmq.DEALER)
            self._upstream.connect(control_endpoint)
            self._sub = self._socket(zmq.SUB)
            self._sub.setsockopt(zmq.SUBSCRIBE, b"")
            self._sub.connect(events_endpoint)
        except zmq.ZMQError as e:
            self._ctx.destroy(linger=0)
            os.close(self._wake)
            raise RemoteError(f"cannot listen on {cfg.listen} / {cfg.events_listen}: {e}") from None
        self._thread = threading.Thread(target=self._run, name="xdom-front-door", daemon=True)
        self._thread.start()
        log.info("serving remote clients on %s (events on %s), CurveZMQ, server key %s, %d client key(s) allowed "
                 "(%s)", cfg.listen, cfg.events_listen, public.decode(), len(self._allowed), cfg.allowed_clients)

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    def _curve_socket(self, kind: int, public: bytes, secret: bytes) -> zmq.Socket:
        sock = self._socket(kind)
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.zap_domain = b"xdom"
        sock.setsockopt(zmq.HANDSHAKE_IVL, 5000)
        return sock

    def close(self) -> None:
        """Stop listening (the clients' connections go with the sockets)."""
        if self._stopping:
            return
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        self._thread.join(5.0)
        for sock in (self._router, self._pub, self._upstream, self._sub, self._zap):   # ZAP last
            sock.close(0)
        self._ctx.term()
        with self._wake_lock:
            os.close(self._wake)
            self._wake = -1
        log.info("no longer serving remote clients on %s", self.cfg.listen)

    # ---- the loop (its own thread: these sockets are used nowhere else) -----------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        for sock in (self._zap, self._router, self._upstream, self._sub):
            poller.register(sock, zmq.POLLIN)
        poller.register(self._wake, zmq.POLLIN)
        while not self._stopping:
            try:
                ready = dict(poller.poll(250 if self._pending else 1000))
                if self._stopping:
                    break
                if self._zap in ready:
                    self._serve_zap()
                if self._router in ready:
                    self._serve_clients()
                if self._upstream in ready:
                    self._serve_replies()
                if self._sub in ready:
                    self._forward_events()
                if self._wake in ready:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                self._finish_jobs()
                self._expire()
            except Exception:      # a bug here must not leave remote clients with a dead door and no word
                log.exception("front door loop")
                time.sleep(0.1)     # not a spin, should it repeat

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.cfg.allowed_clients)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino)

    def _serve_zap(self) -> None:
        # The allow-list is read again when its directory changed: a key added or removed counts for the next
        # connection (connections already made keep going, as ssh's do).
        stamp = self._stamp()
        if stamp != self._allowed_stamp:
            try:
                self._allowed = curvekeys.load_allowed(self.cfg.allowed_clients)
                log.info("allow-list %s reread: %d client key(s)", self.cfg.allowed_clients, len(self._allowed))
            except curvekeys.KeyFileError as e:
                self._allowed = set()       # fail closed
                log.error("%s; refusing every client until it is fixed", e)
            self._allowed_stamp = stamp
        for _ in range(MESSAGES_PER_TURN):
            try:
                frames = self._zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply, key = curvekeys.zap_reply(frames, self._allowed)
            if reply:
                self._zap.send_multipart(reply)
            if key is None:
                self._log_refusal(frames)

    def _log_refusal(self, frames: list[bytes]) -> None:
        try:
            body = frames[frames.index(b"") + 1:]
            address, mechanism = body[3].decode(errors="replace"), body[5].decode(errors="replace")
            who = (zmq.utils.z85.encode(body[6]).decode() if mechanism == "CURVE" and len(body) > 6
                   and len(body[6]) == 32 else mechanism)
        except (ValueError, IndexError):
            address, who = "?", "malformed ZAP request"
        now = time.monotonic()
        if now - self._refused_logged.get(who, -60.0) >= 60.0:     # once a minute per key: no log flood
            self._refused_logged[who] = now
            log.warning("refused a client from %s: %s is not on the allow-list %s", address, who,
                        self.cfg.allowed_clients)

    def _serve_clients(self) -> None:
        for _ in range(MESSAGES_PER_TURN):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            envelope = [f.bytes for f in frames[:-1]]
            try:
                user = frames[-1].get("User-Id")
            except zmq.ZMQError:
                user = "?"
            decision = self.protocol.decide(frames[-1].bytes)
            if decision.action == "reply":
                assert decision.reply is not None
                self._reply(envelope, decision.reply)
            elif decision.action == "relay":
                if decision.op not in ("ping", "ps", "info"):
                    log.info("%s from client %s", decision.op, user)
                self._serial += 1
                tag = self._serial.to_bytes(8, "big")
                self._pending[tag] = (envelope, time.monotonic() + RELAY_TIMEOUT)
                try:
                    self._upstream.send_multipart([tag, decision.payload], zmq.NOBLOCK)
                except zmq.ZMQError as e:
                    del self._pending[tag]
                    self._reply(envelope, error_reply(errno.EHOSTDOWN, f"the supervisor is not reachable: {e}"))
            elif self._jobs >= MAX_JOBS:
                self._reply(envelope, error_reply(errno.EBUSY, f"{MAX_JOBS} up/down commands are already running "
                                                               f"on this host; try again when one is done"))
            else:
                log.info("%s from client %s: %s", decision.op, user, " ".join(decision.argv[3:]))
                self._jobs += 1
                threading.Thread(target=self._job, args=(envelope, decision.argv), daemon=True,
                                 name=f"xdom-remote-{decision.op}").start()

    def _reply(self, envelope: list[bytes], reply: dict[str, Any]) -> None:
        try:
            self._router.send_multipart([*envelope, encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass        # the client is gone

    def _serve_replies(self) -> None:
        for _ in range(MESSAGES_PER_TURN):
            try:
                frames = self._upstream.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            pending = self._pending.pop(frames[0], None) if len(frames) == 2 else None
            if pending is not None:     # else it came after its deadline: the client was told already
                try:
                    self._router.send_multipart([*pending[0], frames[1]], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass

    def _expire(self) -> None:
        now = time.monotonic()
        for tag, (envelope, deadline) in list(self._pending.items()):
            if now >= deadline:
                del self._pending[tag]
                self._reply(envelope, error_reply(errno.ETIMEDOUT, f"the supervisor did not answer within "
                                                                   f"{RELAY_TIMEOUT:g}s"))

    def _forward_events(self) -> None:
        for _ in range(MESSAGES_PER_TURN):
            try:
                frames = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._pub.send_multipart(frames, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def _job(self, envelope: list[bytes], argv: tuple[str, ...]) -> None:
        """Run ``xdom up/down`` here (a thread of its own); its status and output go back to the client."""
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=JOB_TIMEOUT,
                                  cwd="/")
            out = (proc.stdout + proc.stderr)[-OUTPUT_TAIL:].decode(errors="replace")
            reply: dict[str, Any] = {"ok": True, "status": proc.returncode, "output": out}
        except subprocess.TimeoutExpired:
            reply = error_reply(errno.ETIMEDOUT, f"{' '.join(argv[3:])} took more than {JOB_TIMEOUT:g}s")
        except OSError as e:
            reply = error_reply(e.errno or errno.EIO, f"cannot run xdom here: {e}")
        self._results.put((envelope, reply))
        with self._wake_lock:
            if self._wake >= 0:         # else the door is gone
                os.eventfd_write(self._wake, 1)

    def _finish_jobs(self) -> None:
        while True:
            try:
                envelope, reply = self._results.get_nowait()
            except queue.Empty:
                return
            self._jobs -= 1
            self._reply(envelope, reply)


def start_for(host: Any, state_dir: str, control_socket: str, events_endpoint: str,
              own_topology: str) -> FrontDoor | None:
    """The supervisor's one call: the front door its topology asks for, listening; None when it asks for none."""
    cfg = listener_config(host, state_dir)
    if cfg is None:
        return None
    return FrontDoor(cfg, f"ipc://{control_socket}", events_endpoint, own_topology)
