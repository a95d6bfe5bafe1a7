"""The broker process: hypercall and management servers around the Hypervisor.

One loop (zmq.Poller over the hypercall listener, every domain connection,
every domain's pidfd and the management ROUTER): wait, read, dispatch to
the hypercall handlers (broker/hypercalls.py) or the management API
(broker/mgmt.py), journal what changed, reply, repeat.  A domain's identity
is the connection it proved with its one-time token; no message field ever
names the caller.

Two tiers of failure, as in Xen's xenstored: a bad request gets an error
reply and service goes on; a connection that breaks framing (oversized or
truncated frames, a peer that does not read its replies) is closed, which
to the hypervisor is that domain's death.
"""

from __future__ import annotations

import array
import errno
import hashlib
import logging
import os
import secrets
import signal
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import msgpack
import psutil
import zmq

from xdom.domains.abi.grant_table import GNTST_okay
from xdom.domains.abi.hypercall_wire import (
    MAX_FDS,
    MAX_MESSAGE,
    HypercallError,
    decode_request,
    encode_error,
    encode_reply,
    take_fds,
)
from xdom.domains.hostsys.unix_sockets import owner_only
from xdom.domains.hostsys.wakeup import WakePipe

from .fd_budget import raise_nofile_limit
from .frames import BadFrame, ProcFrames
from .hypercalls import Connection, Hypercalls, Reply
from .hypervisor import CREATED, Domain, Hypervisor
from .mgmt import Management
from .persist import COMPACT_BYTES, StateFiles
from .takeover import Takeover, model_of, rebuild, records

log = logging.getLogger("xdom.broker")

PENDING_LIMIT = 64          # connections that have not said hello yet (oldest dropped first)
HELLO_TIMEOUT = 10.0        # seconds a connection may take to say hello
MESSAGES_PER_TURN = 32      # fairness: requests served per connection per loop turn
HOUSEKEEPING_INTERVAL = 0.1  # seconds between hello-timeout and deferred-unpin sweeps
_UCRED = struct.Struct("3i")

FAILPOINT_ENV = "XDOM_BROKER_DIE_BEFORE_REPLY"   # tests: an op name; the broker exits before replying to it

# Hypercalls whose effect a retry must not repeat: the broker remembers each
# domain's last one (its reply, and what its descriptors were: handles, a
# port, gfns) so that a domain asking again after a broker died gets the
# reply it missed.  The others are safe to run twice.
REMEMBERED: dict[str, Callable[[dict[str, Any]], Any]] = {
    "map": lambda f: [h for st, h in f["results"] if st == GNTST_okay],
    "unmap": lambda f: None,
    "replace_frames": lambda f: list(f["gfns"]),
    "populate_physmap": lambda f: [f["start"], f["count"]],
    "evtchn_alloc_unbound": lambda f: f["port"],
    "evtchn_bind_interdomain": lambda f: f["port"],
    "evtchn_bind_virq": lambda f: f["port"],
    "evtchn_close": lambda f: None,
    "shutdown": lambda f: None,
}


def check_isolation() -> None:
    """Refuse to start where page-granular mapping cannot work.

    Reaching one frame of a domain needs /proc/<pid>/map_files, which needs
    root or CAP_CHECKPOINT_RESTORE.  Without it there is no mode that keeps
    a backend from the rest of a guest's memory, so say so plainly.
    """
    with open("/proc/self/maps") as f:
        start, end = (int(x, 16) for x in f.readline().split()[0].split("-"))
    try:
        os.close(os.open(f"/proc/self/map_files/{start:x}-{end:x}", os.O_RDONLY))
    except PermissionError:
        raise SystemExit(
            "xdom broker: cannot open /proc/<pid>/map_files (needs root or CAP_CHECKPOINT_RESTORE); "
            "page-granular grant mapping is impossible without it. Run the broker as root.") from None


class BrokerServer:
    def __init__(self, run_dir: str, mgmt_endpoint: str | None = None,
                 events_endpoint: str | None = None, state_dir: str | None = None) -> None:
        """``state_dir``: where the broker writes down its tables, so that a broker
        started after this one died takes over its domains (see broker.takeover)."""
        self.run_dir = run_dir
        os.makedirs(run_dir, mode=0o755, exist_ok=True)
        from .pathtrust import check_dir
        check_dir(run_dir, "run directory")     # UntrustedPath: whoever can write it could replace our sockets
        self.hypercall_sock_path = os.path.join(run_dir, "hypercall.sock")
        self.mgmt_endpoint = mgmt_endpoint or f"ipc://{os.path.join(run_dir, 'mgmt.sock')}"
        self.events_endpoint = events_endpoint or f"ipc://{os.path.join(run_dir, 'events.sock')}"
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.events = self.ctx.socket(zmq.PUB)
        self.events.setsockopt(zmq.LINGER, 0)
        with owner_only():                  # the toolstack's alone, as mgmt.sock below
            self.events.bind(self.events_endpoint)
        self.fd_limit = raise_nofile_limit()
        self.hv = Hypervisor(on_event=self._publish, fd_limit=self.fd_limit)
        # One descriptor kept spare: if accept() ever meets EMFILE, it is given
        # up to take the connection off the backlog and close it, rather than
        # leave the listener readable forever (a busy loop).
        self._spare_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self.mgmt = Management(self.hv, self)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        with owner_only():                  # whoever may connect may create and destroy domains
            self.router.bind(self.mgmt_endpoint)
        try:
            os.unlink(self.hypercall_sock_path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.listener.bind(self.hypercall_sock_path)
        os.chmod(self.hypercall_sock_path, 0o666)   # the token, not the path, authenticates
        self.listener.listen(128)
        self._wake = WakePipe()
        self.poller = zmq.Poller()
        self.poller.register(self._wake.fileno(), zmq.POLLIN)
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self.listener.fileno(), zmq.POLLIN)
        self.conns: dict[int, Connection] = {}        # socket fd -> connection
        self.pidfds: dict[int, Connection] = {}       # pidfd -> connection
        self.running = True
        self._next_housekeeping = 0.0
        self.handlers: dict[str, Callable[[Connection, dict[str, Any]], Reply]] = {
            **Hypercalls(self.hv, self._introduced).handlers, "rejoin": self._rejoin}
        self.absent: dict[int, Domain] = {}          # pidfd -> a running domain that has not rejoined yet
        self._die_before_reply = os.environ.get(FAILPOINT_ENV, "")
        self.state: StateFiles | None = StateFiles(state_dir) if state_dir else None
        self.takeover: Takeover | None = None
        if self.state is not None:
            self._take_over(self.state)

    # ---- taking over from a broker that died --------------------------------

    def _take_over(self, state: StateFiles) -> None:
        """Rebuild the tables of the broker that ran before, if there was one; start a journal."""
        if state.exists():
            model = state.load()
            self.takeover = rebuild(model, self.hv)
            for domid, pidfd in self.takeover.live.items():
                self.absent[pidfd] = self.hv.domains[domid]
                self.poller.register(pidfd, zmq.POLLIN)
            log.warning("took over from a broker that died: %s", self.takeover.summary())
        state.write_snapshot(model_of(self.hv))

    def _journal(self, last: tuple[Domain, list[Any]] | None = None) -> None:
        """Write down what changed (before the reply that makes it visible leaves)."""
        if self.state is None:
            self.hv.changes.clear()
            return
        recs = records(self.hv)
        if last is not None:
            recs.append(("last", last[0].domid, last[1]))
        self.state.append(recs)
        if self.state.journal_bytes > COMPACT_BYTES:
            self.state.write_snapshot(model_of(self.hv))

    def _journal_last(self, dom: Domain) -> None:
        if self.state is not None:
            self.state.append([("last", dom.domid, None)])

    def _rejoin(self, conn: Connection, args: dict[str, Any]) -> Reply:
        """A running domain whose broker died comes back: the same process, with its key."""
        if conn.domain is not None:
            raise HypercallError(errno.EALREADY, "already introduced")
        found = next(((p, d) for p, d in self.absent.items() if d.domid == args["domid"]), None)
        if found is None:
            raise HypercallError(errno.ESRCH, f"no domain {args['domid']} waits to rejoin")
        pidfd, dom = found
        key = args["key"].encode("utf-8", "surrogatepass")
        if not dom.rejoin_hash or not secrets.compare_digest(hashlib.sha256(key).digest(), dom.rejoin_hash) \
                or conn.pid != dom.pid:
            raise HypercallError(errno.EACCES, f"not domain {dom.domid}'s process and key")
        del self.absent[pidfd]
        conn.domain, conn.pidfd, conn.memory_set = dom, pidfd, True
        self.pidfds[pidfd] = conn
        log.info("domain %d (%s) rejoined", dom.domid, dom.name)
        return {"domid": dom.domid, "name": dom.name, "seq": dom.last[0] if dom.last else -1}, [], []

    def _replay(self, conn: Connection, op: str, seq: int) -> tuple[bytes, list[int], list[int]] | None:
        """The reply to a request this domain already made (seq, op): the broker it was
        made to died before the reply left.  Its descriptors are found or made again.
        None: not a repeat, or nothing of its effect survived -- carry it out."""
        dom = conn.domain
        if dom is None or dom.last is None or dom.last[0] != seq or dom.last[2][0] != op:
            return None
        _, payload, (_, spec) = dom.last
        # Once: a domain that asks again and again gets the same effect carried out
        # anew (or refused), never a fresh batch of frames minted at each asking.
        dom.last = None
        self._journal_last(dom)
        fds: list[int] = []
        try:
            if op == "map":
                for handle in spec:
                    m = dom.maptrack[handle]
                    if m.granter.frames is None:
                        raise HypercallError(errno.EAGAIN, "the granter of a mapping went away")
                    fd, _ = m.granter.frames.open_frame(m.gfn, m.readonly)
                    fds.append(fd)   # type: ignore[arg-type]
            elif op in ("evtchn_alloc_unbound", "evtchn_bind_interdomain", "evtchn_bind_virq"):
                p = self.hv.port_fds(dom, spec)
                fds = [p.wait_fd] + ([p.notify_fd] if p.notify_fd >= 0 else [])
                return payload, fds, []
            elif op == "replace_frames":
                # The frames made then were lost with the reply: make them again.
                assert isinstance(dom.frames, ProcFrames)
                for gfn in spec:
                    dom.frames.exposed[gfn] = 1
                done, fds = self.hv.replace_frames(dom, spec)
                self._journal()
            elif op == "populate_physmap":
                # The frames made then were lost with the reply: make them again.
                start, count = spec
                fds = Hypercalls.frame_allocator(conn).remake(start, count)
                self.hv.changes.gfns.extend((dom.domid, g) for g in range(start, start + count))
                self._journal()
        except (KeyError, HypercallError, BadFrame):
            # What it made is gone with the broker that made it (a channel whose
            # eventfds only that broker held): nothing of it is left, so doing
            # it again is doing it once.
            for fd in fds:
                os.close(fd)
            log.info("domain %d: the effect of %s (seq %d) did not survive the takeover; doing it again",
                     dom.domid, op, seq)
            return None
        return payload, fds, fds

    def _introduced(self, conn: Connection) -> None:
        """hello bound ``conn`` to its domain: watch the process (its exit is the domain's death)."""
        self.pidfds[conn.pidfd] = conn
        self.poller.register(conn.pidfd, zmq.POLLIN)

    # ---- DomainControl, for the management API -----------------------------

    def hypercall_path(self) -> str:
        return self.hypercall_sock_path

    def _conn_of(self, dom: Domain) -> Connection | None:
        for c in self.conns.values():
            if c.domain is dom:
                return c
        return None

    def destroy(self, dom: Domain) -> None:
        conn = self._conn_of(dom)
        if conn is not None:
            self._signal(conn, signal.SIGKILL)
            self._drop(conn, "destroyed")

    def pause(self, dom: Domain, paused: bool) -> None:
        conn = self._conn_of(dom)
        if conn is not None:
            self._signal(conn, signal.SIGSTOP if paused else signal.SIGCONT)

    def process_stats(self) -> dict[str, Any]:
        me = psutil.Process()
        return {"broker_pid": me.pid, "broker_fds": me.num_fds(), "broker_rss": me.memory_info().rss}

    def _signal(self, conn: Connection, sig: int) -> None:
        try:
            if conn.pidfd >= 0:
                signal.pidfd_send_signal(conn.pidfd, sig)
        except ProcessLookupError:
            pass

    # ---- loop ----------------------------------------------------------------

    def _publish(self, kind: str, dom: Domain) -> None:
        body = {"event": kind, "domid": dom.domid, "name": dom.name, "state": dom.state,
                "reason": dom.shutdown_reason, "time": time.time()}
        log.info("domain %d (%s): %s", dom.domid, dom.name, kind)
        try:
            self.events.send_multipart([b"domain", msgpack.packb(body)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def stop(self) -> None:
        """Ask the loop to finish; safe from a signal handler."""
        self.running = False
        self._wake.wake()

    def serve_forever(self) -> None:
        while self.running:
            self.run_once(1000)
        self.close()

    def run_once(self, timeout_ms: int) -> None:
        for sock, _ in self.poller.poll(timeout_ms):
            try:
                self._handle_ready(sock)
            except Exception:
                # A bug must not take the hypervisor down with every domain:
                # log it and end service to the one peer involved.
                log.exception("internal error while serving %r", sock)
                conn = self.conns.get(sock) or self.pidfds.get(sock)
                if conn is not None:
                    try:
                        self._drop(conn, "crash")
                    except Exception:
                        log.exception("dropping the connection failed too")
        self._housekeeping()

    def _handle_ready(self, sock: object) -> None:
        if sock == self._wake.fileno():
            self._wake.drain()
        elif sock is self.router:
            self._serve_management()
        elif sock == self.listener.fileno():
            self._accept()
        elif sock in self.pidfds:
            self._drop(self.pidfds[sock], "exited")
            self._journal()
        elif sock in self.absent:
            dom = self.absent.pop(sock)
            self.poller.unregister(sock)
            os.close(sock)
            self.hv.domain_died(dom, "exited")
            self._journal()
        elif sock in self.conns:
            self._serve(self.conns[sock])

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + HOUSEKEEPING_INTERVAL
        for conn in list(self.conns.values()):
            if conn.domain is None and now - conn.opened > HELLO_TIMEOUT:
                self._drop(conn, "no hello")
        self.hv.retry_deferred()

    def _serve_management(self) -> None:
        for _ in range(MESSAGES_PER_TURN):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            envelope, payload = frames[:-1], frames[-1]
            reply = self.mgmt.handle_bytes(payload)
            self._journal()
            try:
                self.router.send_multipart([*envelope, reply], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                self._shed_connection()
                return
            sock.setblocking(False)
            pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            self._make_room_for_pending()
            conn = Connection(sock, pid, uid)
            self.conns[sock.fileno()] = conn
            self.poller.register(sock.fileno(), zmq.POLLIN)

    def _shed_connection(self) -> None:
        """Out of descriptors: accept one connection on the spare fd and close it."""
        log.error("out of descriptors (limit %d): refusing a hypercall connection", self.fd_limit)
        os.close(self._spare_fd)
        try:
            sock, _ = self.listener.accept()
            sock.close()
        except OSError:
            pass
        finally:
            self._spare_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)

    def _make_room_for_pending(self) -> None:
        """Keep unauthenticated connections under PENDING_LIMIT without refusing newcomers.

        A real domain says hello as soon as it connects, so first read what
        pending connections have sent; then drop the oldest still silent.
        Idle connects (from anyone: the socket is world-writable, the token
        authenticates) thus cannot lock real domains out.
        """
        pending = [c for c in self.conns.values() if c.domain is None]
        if len(pending) < PENDING_LIMIT:
            return
        for conn in pending:
            self._serve(conn)
        silent = sorted((c for c in self.conns.values() if c.domain is None), key=lambda c: c.opened)
        for conn in silent[:max(0, len(silent) - PENDING_LIMIT + 1)]:
            self._drop(conn, "no hello")

    def _serve(self, conn: Connection) -> None:
        for _ in range(MESSAGES_PER_TURN):
            try:
                data, anc, flags, _ = conn.sock.recvmsg(MAX_MESSAGE + 1, socket.CMSG_SPACE(MAX_FDS * 4))
            except BlockingIOError:
                return
            except OSError:
                self._drop(conn, "")
                return
            fds = take_fds(anc)
            if not data and not fds and not flags & socket.MSG_TRUNC:
                self._drop(conn, "")            # EOF: the domain is gone
                return
            for fd in fds:
                os.close(fd)
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                err = HypercallError(errno.EMSGSIZE, "frame truncated: too large or too many fds")
                if not self._reply(conn, encode_error(err), []):
                    return
                continue
            if fds:
                err = HypercallError(errno.EINVAL, "no hypercall takes file descriptors")
                if not self._reply(conn, encode_error(err), []):
                    return
                continue
            payload, send_fds, close_fds = self._dispatch(conn, data)
            ok = self._reply(conn, payload, send_fds)
            for fd in close_fds:
                os.close(fd)
            if not ok or conn.sock.fileno() < 0:
                return

    def _dispatch(self, conn: Connection, data: bytes) -> tuple[bytes, list[int], list[int]]:
        try:
            op, args = decode_request(data)
            if op not in ("hello", "rejoin") and conn.domain is None:
                raise HypercallError(errno.EPERM, "say hello with your token first")
            if op not in ("hello", "rejoin", "populate_physmap", "set_memory", "shutdown") and not conn.memory_set:
                raise HypercallError(errno.EPERM, "register memory with set_memory first")
            seq = args.pop("seq", None)
            if seq is not None and op in REMEMBERED:
                again = self._replay(conn, op, seq)
                if again is not None:
                    return again
            if conn.domain is not None:
                conn.domain.stats["hypercalls"] += 1
            fields, send, close = self.handlers[op](conn, args)
            payload = encode_reply(**fields)
            last = None
            if seq is not None and op in REMEMBERED and conn.domain is not None and conn.memory_set:
                conn.domain.last = (seq, payload, [op, REMEMBERED[op](fields)])
                last = (conn.domain, list(conn.domain.last))
            self._journal(last)
            if op == self._die_before_reply:
                # A failpoint for tests of the takeover: the effect is written down, the reply never leaves.
                log.error("failpoint %s=%s: dying before the reply", FAILPOINT_ENV, op)
                os._exit(70)
            return payload, send, close
        except HypercallError as e:
            self._journal()
            return encode_error(e), [], []
        except Exception:   # a bug, not the caller's fault: report it, keep serving
            log.exception("hypercall from pid %d failed", conn.pid)
            self._journal()
            return encode_error(HypercallError(errno.EIO, "internal broker error")), [], []

    def _reply(self, conn: Connection, payload: bytes, fds: list[int]) -> bool:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            conn.sock.sendmsg([payload], anc)
            return True
        except OSError as e:
            # A domain that does not read its replies has broken the protocol.
            log.warning("pid %d: reply failed (%s); dropping", conn.pid, e)
            self._drop(conn, "crash")
            return False

    def _drop(self, conn: Connection, reason: str) -> None:
        log.debug("dropping connection of pid %d (%s)", conn.pid, reason or "closed")
        fd = conn.sock.fileno()
        if fd in self.conns:
            self.poller.unregister(fd)
            del self.conns[fd]
        if conn.pidfd >= 0:
            self.poller.unregister(conn.pidfd)
            self.pidfds.pop(conn.pidfd, None)
        dom = conn.domain
        if dom is not None and (dom.alive or dom.state == CREATED):   # CREATED: died before set_memory
            # Without its hypercall connection a domain is dead to the
            # hypervisor, whatever its process does next; the toolstack that
            # started the process reaps it.
            self.hv.domain_died(dom, reason)
        if conn.pidfd >= 0:
            os.close(conn.pidfd)
            conn.pidfd = -1
        conn.sock.close()

    def close(self) -> None:
        """A clean stop: the domains lose their hypervisor for good, and nothing is left to take over."""
        for conn in list(self.conns.values()):
            self._drop(conn, "broker stopped")
        for pidfd in list(self.absent):
            self.poller.unregister(pidfd)
            os.close(pidfd)
        self.absent.clear()
        self.hv.close()
        if self.state is not None:
            self.state.discard()
        self.poller.unregister(self.listener.fileno())
        self.listener.close()
        try:
            os.unlink(self.hypercall_sock_path)
        except FileNotFoundError:
            pass
        self.router.close(0)
        self.events.close(0)
        self.poller.unregister(self._wake.fileno())
        self._wake.close()
        os.close(self._spare_fd)
