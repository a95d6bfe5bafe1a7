"""xenstored's I/O shell: sockets, rings and persistence around the core.

One loop: wait (epoll), read bytes, frame them, hand each message to
the core, persist if anything changed, then deliver the core's replies and
watch events and act on its effects (mapping the ring of a domain it was
told to introduce).  Nothing here knows xenstore semantics.

Persistence (``state_dir``, see journal.py): a snapshot, and a journal
record appended after every loop turn that changed what a restart must
know (the core's ``take_changes``: nodes written or removed, domains, their
watches, transaction ids given out beyond the last reservation; and each
domain ring's position, unsent replies and half-received request), *before*
the replies leave, so a reply a client saw is on disk when xenstored is
killed with SIGKILL (with ``fsync``, also when the machine loses power).
A turn costs what it changed, not the size of the store; the journal is
compacted into a new snapshot once it outgrows twice the last one.  A
restarted xenstored replays it, then starts a new snapshot.

Domains: the shell asks the hypervisor (``domain_info``) about every domain
the core knows when ``VIRQ_DOM_EXC`` fires and when it starts on a saved
store, before it maps any restored ring.  A domain that is dead or gone, or
that runs in another incarnation than the one recorded (restarted under its
domid), is released: the core removes what it owned and fires
@releaseDomain.  A pending ``VIRQ_DOM_EXC`` is handled before the requests
of a turn, and before those read from a unix socket, so a toolstack that
restarted a domain after its death never finds the dead one's record.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from xdom.domains.abi.event_channel import VIRQ_DOM_EXC
from xdom.domains.abi.grant_table import GNTTAB_RESERVED_XENSTORE
from xdom.domains.abi.xs_wire import HEADER, Message, ProtocolError, XsType
from xdom.domains.hostsys.wakeup import WakePipe

from .core import XenstoreCore
from .domains import Introduced, Released
from .journal import StateDir
from .quota import Quota
from .transport import FrameReader, RingTransport, SocketTransport, TransportClosed
from .watches import ConnId

log = logging.getLogger("xdom.xenstored")

OUTPUT_LIMIT = 1 << 20        # bytes queued for a peer that does not read before we drop it
READ_PAUSE = 64 << 10         # stop reading a peer while this much output waits for it
_READ, _DIRECTORY = int(XsType.XS_READ), int(XsType.XS_DIRECTORY)
_pack = HEADER.pack
FSYNC_ENV = "XDOM_XENSTORED_FSYNC"   # "1": as --fsync (for a xenstored started by a toolstack)


@dataclass(eq=False)
class Connection:
    transport: Any
    domid: int
    reader: FrameReader = field(default_factory=FrameReader)
    out: bytearray = field(default_factory=bytearray)
    port: int = 0                 # ring connections: the event channel
    mapping: Any = None           # ring connections: the grant mapping of the page
    committed: int = 0            # ring connections: req_cons as last published
    is_ring: bool = False
    sock: Any = None              # unix-socket connections: the socket
    writing: bool = False         # sockets: waiting for room to write (EVENT_WRITE registered)

    @property
    def kind(self) -> str:
        return "ring" if self.is_ring else "socket"


EVENT_READ, EVENT_WRITE = select.EPOLLIN, select.EPOLLOUT


class _Poller:
    """epoll with a value per descriptor (what the loop does when it is ready)."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self.data: dict[int, Any] = {}

    def register(self, fd: Any, events: int, data: Any) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        self._ep.register(fd, events)
        self.data[fd] = data

    def modify(self, fd: int, events: int, data: Any) -> None:
        self._ep.modify(fd, events)
        self.data[fd] = data

    def unregister(self, fd: Any) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        if self.data.pop(fd, None) is None:
            raise KeyError(fd)
        self._ep.unregister(fd)

    def select(self, timeout: float | None) -> list[tuple[int, int]]:
        return self._ep.poll(-1 if timeout is None else timeout)

    def close(self) -> None:
        self._ep.close()


class XenstoredServer:
    def __init__(self, unix_path: str | None = None, state_dir: str | None = None,
                 xenhost: Any = None, core: XenstoreCore | None = None, fsync: bool | None = None,
                 quota: Quota | None = None) -> None:
        """``fsync``: journal records reach stable storage before the replies leave (safe across
        a power loss; a flush per loop turn).  None: as the environment's XDOM_XENSTORED_FSYNC.
        ``quota``: the limits from the command line (C's ``-E`` and the like), the same after a restart."""
        self.state_dir = state_dir
        self._quota = quota
        if fsync is None:
            fsync = os.environ.get(FSYNC_ENV, "") == "1"
        self.files = StateDir(state_dir, fsync) if state_dir else None
        self.xenhost = xenhost
        self._ring_saved: dict[int, tuple[int, int, int, bytes, bytes]] = {}   # domid -> as last journaled
        self._rings_touched: set[int] = set()
        self._rings_read: dict[int, Connection] = {}     # this turn: rings whose requests were read
        self._pending: dict[int, Connection] = {}        # connections with output to write
        self.core = core or self._load()
        if self.files is None:
            self.core.track_changes(False)
        self.sel = _Poller()
        self.conns: dict[ConnId, Connection] = {}       # id(conn) -> conn
        self.rings: dict[int, Connection] = {}          # domid -> ring connection
        self.port_conns: dict[int, Connection] = {}     # event channel port -> ring connection
        self.running = True
        self.xenhost = xenhost
        self.unix_path = unix_path
        self.listener: socket.socket | None = None
        self._wake = WakePipe()
        self.sel.register(self._wake.fileno(), EVENT_READ, ("wake", None))
        if unix_path:
            self._listen(unix_path)
        self.virq_port = 0
        self._virq_fd = -1
        if xenhost is not None:
            self.virq_port = xenhost.bind_virq(VIRQ_DOM_EXC)
            self._virq_fd = xenhost.evtchn.fileno(self.virq_port)
            self.sel.register(self._virq_fd, EVENT_READ, ("virq", None))
        if xenhost is not None:
            # C's lu_read_state ends with check_domains: a domain that died (or was restarted
            # under its domid) while no xenstored ran is released now, not inherited by whoever
            # has its domid, and before its ring is mapped: a new incarnation's page is not
            # the ring whose positions were saved.
            self._check_domains()
        self._apply_effects()   # rings of domains restored from the database
        self._resume_rings()
        if self.files is not None:
            self._snapshot()      # the replayed journal (and any damaged tail) goes into a new snapshot

    # ---- set-up ------------------------------------------------------------

    def _load(self) -> XenstoreCore:
        self._saved_rings: dict[int, dict[str, Any]] = {}
        saved, records = self.files.load() if self.files is not None else (None, [])
        if saved is None:
            return XenstoreCore(self._quota, domain_exists=self._exists_hook())
        rings = {int(k): v for k, v in saved["rings"].items()}
        core_records = []
        for raw in records:
            core_record, ring_changes = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            if core_record is not None:
                core_records.append(core_record)
            for domid, ring in ring_changes.items():
                if ring is None:
                    rings.pop(int(domid), None)
                else:
                    rings[int(domid)] = ring
        core = XenstoreCore.restore(saved["core"], self._quota, domain_exists=self._exists_hook(),
                                    journal=core_records)
        self._saved_rings = rings
        log.info("restored the store from %s and %d journal records (%d nodes, %d domain rings)",
                 self.files.db_path if self.files is not None else "nowhere", len(records), core.node_count(), len(rings))
        return core

    def _exists_hook(self) -> Callable[[int], int | bool] | None:
        """Standalone (no hypervisor), only the domains the core knows exist: no hook."""
        return self._domain_exists if self.xenhost is not None else None

    def _domain_exists(self, domid: int) -> int | bool:
        """For the core's permission checks, as C xenstored asks the hypervisor
        (a domain the broker created but that has not started yet exists):
        False, or the domid's incarnation, which the core keeps in its record."""
        try:
            info = self.xenhost.domain_info(domid)
        except Exception as e:
            if getattr(e, "errno", None) == errno.ESRCH:
                return False
            raise
        if info["state"] in ("shutdown", "crashed"):
            return False
        incarnation = info.get("incarnation")
        return int(incarnation) if isinstance(incarnation, int) and not isinstance(incarnation, bool) else True

    def _listen(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(path)
        os.chmod(path, 0o600)       # socket clients are dom0: privileged
        self.listener.listen(1024)
        self.listener.setblocking(False)
        self.sel.register(self.listener, EVENT_READ, ("listen", None))

    # ---- loop ----------------------------------------------------------------

    def stop(self) -> None:
        self.running = False
        self._wake.wake()

    def serve_forever(self, ready: Callable[[], None] | None = None) -> None:
        if ready:
            ready()
        while self.running:
            self.run_once(None)
        self.close()

    def run_once(self, timeout: float | None) -> None:
        ready = self.sel.select(timeout)
        handlers = self.sel.data
        if self.virq_port and len(ready) > 1:
            # A domain's death first: requests that arrived with it may concern its successor.
            ready.sort(key=lambda r: r[0] != self._virq_fd)
        for fd, _ in ready:
            data = handlers.get(fd)
            if data is None:
                continue                # dropped earlier in this turn
            kind, conn = data
            try:
                if kind == "conn":
                    self._read_socket(conn)
                elif kind == "listen":
                    self._accept()
                elif kind == "wake":
                    self._wake.drain()
                elif kind == "virq":
                    self._virq()
                elif kind == "ring":
                    self.xenhost.evtchn.consume(conn.port)
                    self._read(conn)
            except Exception:
                log.exception("internal error serving %s", kind)
                if conn is not None:
                    self._drop(conn, "internal error")
        self._after_turn()

    def _after_turn(self) -> None:
        """Route output, persist, free ring space, then let replies go.

        Persisting before replies leave means a reply a client saw describes
        a state on disk.  For rings, the consumer index, the unsent replies
        and any partial request are saved too, so a restarted xenstored
        neither loses nor repeats a domain's request or reply.
        """
        core = self.core
        if core.has_output():
            self._route(core.take_output())
        for conn_key in core.take_backlogged():       # watch events it cannot keep up with
            conn = self.conns.get(conn_key)
            if conn is not None:
                self._drop(conn, "watch event backlog")
        if self.files is not None:
            self._journal()
        notify: dict[int, Connection] = {}
        if self._rings_read:
            for key, conn in self._rings_read.items():
                if self.rings.get(conn.domid) is conn:
                    if conn.transport.commit(notify=False):
                        notify[key] = conn          # told below, with the replies if there are any
                    conn.committed = conn.transport.cursor
            self._rings_read = {}
        if core.has_effects():
            self._apply_effects()
        if self._pending:
            pending, self._pending = self._pending, {}
            for key, conn in pending.items():
                if conn.out and key in self.conns:
                    if self._flush(conn) and notify:
                        notify.pop(key, None)            # the ring's event covers both
                    if conn.out and key in self.conns:
                        self._pending[key] = conn        # the rest when it has room
        for key, conn in notify.items():
            if key in self.conns:
                conn.transport.notify()                  # room freed, no reply written
    def _route(self, out: list[tuple[Any, Message]]) -> None:
        """Replies and events to their connections' output (one buffer each, written once a turn)."""
        conns, pending, pack = self.conns, self._pending, HEADER.pack
        for conn_key, msg in out:
            target = conns.get(conn_key)
            if target is None:
                continue
            payload = msg.payload
            target.out += pack(msg.type, msg.req_id, msg.tx_id, len(payload))
            target.out += payload
            pending[conn_key] = target
            if target.is_ring:
                self._rings_touched.add(target.domid)

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            conn = Connection(SocketTransport(sock), domid=0, sock=sock)
            self._add(conn, ("conn", conn), sock.fileno())

    def _add(self, conn: Connection, data: tuple[str, Connection], fd: int) -> None:
        self.conns[id(conn)] = conn
        self.core.connect(id(conn), conn.domid)
        self.sel.register(fd, EVENT_READ, data)

    def _read_socket(self, conn: Connection) -> None:
        """A unix-socket client: one recv, every whole request in it handled, replies routed."""
        if len(conn.out) > READ_PAUSE:
            return            # let it drain its replies first
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(conn, str(e))
            return
        if not data:
            self._drop(conn, "peer closed")
            return
        try:
            frames = conn.reader.frames(data)
        except ProtocolError as e:
            self._drop(conn, str(e))
            return
        if not frames:
            return
        if self.virq_port:
            # The toolstack may have seen a death we have not handled yet (VIRQ_DOM_EXC raised
            # after this turn's select) and restarted the domain: handle the death first.
            self._virq()
        self._handle_frames(conn, frames)

    def _handle_frames(self, conn: Connection, frames: list[tuple[int, int, int, bytes]]) -> None:
        core, key, out = self.core, id(conn), conn.out
        for type_, req_id, tx_id, payload in frames:
            if type_ in (_READ, _DIRECTORY) and tx_id == 0:
                # A plain read: its reply straight into the buffer, after whatever came before it.
                reply = core.read_fast(key, type_, payload)
                if reply is not None:
                    if core.has_output():
                        self._route(core.take_output())
                    out += _pack(type_, req_id, 0, len(reply))
                    out += reply
                    continue
            core.handle(key, Message(type_, req_id, tx_id, payload))
        if core.has_output():
            self._route(core.take_output())
        if out:
            self._pending[key] = conn
            if conn.is_ring:
                self._rings_touched.add(conn.domid)

    def _read(self, conn: Connection) -> None:
        if conn.is_ring:
            self._rings_touched.add(conn.domid)
            self._rings_read[id(conn)] = conn
        if conn.is_ring and conn.transport.reconnect_requested():
            conn.reader = FrameReader()
            conn.out.clear()
            conn.transport.reset()
            return
        if len(conn.out) > READ_PAUSE:
            return            # let it drain its replies first
        try:
            data = conn.transport.recv()
            frames = conn.reader.frames(data) if data else []
        except (TransportClosed, ProtocolError) as e:
            self._drop(conn, str(e))
            return
        if frames:
            self._handle_frames(conn, frames)

    def _flush(self, conn: Connection) -> bool:
        """Write what the connection can take; True if a ring was written (and told so)."""
        if conn.sock is not None:
            try:
                n = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                self._drop(conn, str(e))
                return False
        else:
            try:
                n = conn.transport.send(memoryview(conn.out))
            except TransportClosed as e:
                self._drop(conn, str(e))
                return False
        del conn.out[:n]
        if len(conn.out) > OUTPUT_LIMIT:
            self._drop(conn, f"{len(conn.out)} bytes of replies not read")
            return False
        if conn.is_ring:
            return n > 0
        if conn.writing != bool(conn.out):
            conn.writing = bool(conn.out)
            events = EVENT_READ | (EVENT_WRITE if conn.out else 0)
            self.sel.modify(conn.transport.fileno(), events, ("conn", conn))
        return False

    def _drop(self, conn: Connection, why: str) -> None:
        if id(conn) not in self.conns:
            return
        log.info("dropping %s connection of domain %d: %s", conn.kind, conn.domid, why)
        del self.conns[id(conn)]
        self._pending.pop(id(conn), None)
        self._rings_read.pop(id(conn), None)
        self.core.disconnect(id(conn))
        if conn.kind == "socket":
            self.sel.unregister(conn.transport.fileno())
            conn.transport.close()
        else:
            self._unmap_ring(conn)

    @staticmethod
    def _ring_state(c: Connection) -> tuple[int, int, int, bytes, bytes]:
        return c.port, c.transport.cursor, c.transport.rsp_prod, bytes(c.out), c.reader.partial

    @staticmethod
    def _ring_record(state: tuple[int, int, int, bytes, bytes]) -> dict[str, Any]:
        port, cons, rsp_prod, out, partial = state
        return {"port": port, "cons": cons, "rsp_prod": rsp_prod, "out": out, "partial": partial}

    def _ring_changes(self) -> dict[int, dict[str, Any] | None]:
        """The rings whose saved state a restart would get wrong now (None: the ring is gone).

        A ring whose replies were only written out since its last record
        needs none: the restart skips what the guest's ``rsp_prod`` says was
        written (``_resume_rings``).
        """
        changes: dict[int, dict[str, Any] | None] = {}
        for domid in self._rings_touched:
            conn = self.rings.get(domid)
            if conn is None:
                if self._ring_saved.pop(domid, None) is not None:
                    changes[domid] = None
                continue
            state = self._ring_state(conn)
            prev = self._ring_saved.get(domid)
            if prev == state:
                continue
            if prev is not None and prev[:2] == state[:2] and prev[4] == state[4] and \
                    state[3] == prev[3][(state[2] - prev[2]) & 0xFFFFFFFF:]:
                continue
            self._ring_saved[domid] = state
            changes[domid] = self._ring_record(state)
        self._rings_touched.clear()
        return changes

    def _journal(self) -> None:
        """Append what this turn changed, before its replies leave; compact a journal grown large."""
        assert self.files is not None
        core_record = self.core.take_changes()
        rings = self._ring_changes() if self._rings_touched else {}
        if core_record is None and not rings:
            return
        # [core record, ring changes] as one msgpack array; the core's record is already msgpack
        if not self.files.append(b"\x92" + (core_record or b"\xc0") + (msgpack.packb(rings) if rings else b"\x80")) \
                or self.files.wants_compaction():
            self._snapshot()          # (a record that did not fit is in the snapshot: it is the state now)

    def _snapshot(self) -> None:
        """Everything in a new snapshot, and an empty journal after it."""
        assert self.files is not None
        states = {domid: self._ring_state(c) for domid, c in self.rings.items()}
        self.files.write_snapshot({"core": self.core.dump(),
                                   "rings": {domid: self._ring_record(st) for domid, st in states.items()}})
        self._ring_saved = states
        self._rings_touched.clear()

    def _resume_rings(self) -> None:
        """Pick up each restored domain's ring where the previous xenstored left it."""
        for domid, saved in self._saved_rings.items():
            conn = self.rings.get(domid)
            if conn is None:
                continue
            t = conn.transport
            t.resume_at(saved["cons"])
            conn.committed = t.cursor
            conn.reader = FrameReader(partial=saved["partial"])
            sent = (t.rsp_prod - saved["rsp_prod"]) & 0xFFFFFFFF     # written before we died
            out = saved["out"]
            conn.out = bytearray(out[sent:] if sent <= len(out) else out)
            self._rings_touched.add(domid)
            if conn.out:
                # Replies persisted but never written: the guest waits for them and sends
                # nothing that would bring us to its ring, so they go now.
                self._flush(conn)
                if conn.out and id(conn) in self.conns:
                    self._pending[id(conn)] = conn
        self._saved_rings = {}

    # ---- domains (rings) -----------------------------------------------------

    def _apply_effects(self) -> None:
        for effect in self.core.take_effects():
            if isinstance(effect, Introduced):
                if not self.core.known_domains().get(effect.domid):
                    continue          # released since (a restored domain found dead at start)
                self._map_ring(effect.domid, effect.port)
            elif isinstance(effect, Released):
                conn = self.rings.get(effect.domid)
                if conn is not None:
                    self._drop(conn, "released")

    def _map_ring(self, domid: int, port: int) -> None:
        """Map the domain's ring through reserved grant 1 and bind its port."""
        self._rings_touched.add(domid)
        if self.xenhost is None:
            log.warning("cannot map the ring of domain %d: no hypervisor connection", domid)
            return
        if domid in self.rings:
            self._drop(self.rings[domid], "introduced again")
        try:
            mapping = self.xenhost.map_grant(domid, GNTTAB_RESERVED_XENSTORE)
        except Exception as e:
            log.warning("domain %d: cannot map its xenstore ring: %s", domid, e)
            return
        try:
            local = self.xenhost.bind_interdomain(domid, port)
        except Exception as e:
            log.warning("domain %d: cannot bind event channel %d: %s", domid, port, e)
            self.xenhost.unmap_grants([mapping])
            return
        transport = RingTransport(mapping.view, lambda: self.xenhost.notify(local))
        conn = Connection(transport, domid, port=local, mapping=mapping, committed=transport.cursor, is_ring=True)
        self.rings[domid] = conn
        self.port_conns[local] = conn
        self._add(conn, ("ring", conn), self.xenhost.evtchn.fileno(local))
        # bind_interdomain left our new port pending: the first turn reads what is waiting

    def _unmap_ring(self, conn: Connection) -> None:
        self._rings_touched.add(conn.domid)
        self.rings.pop(conn.domid, None)
        self.port_conns.pop(conn.port, None)
        try:
            self.sel.unregister(self.xenhost.evtchn.fileno(conn.port))
        except (KeyError, ValueError):
            pass
        conn.transport.close()
        for action in (lambda: self.xenhost.close_port(conn.port),
                       lambda: self.xenhost.unmap_grants([conn.mapping])):
            try:
                action()
            except Exception as e:       # the domain may be gone already
                log.debug("ring teardown of domain %d: %s", conn.domid, e)

    def _virq(self) -> None:
        """Handle VIRQ_DOM_EXC if it is pending (it is a counter: reading it clears it)."""
        if self.virq_port and self.xenhost.evtchn.consume(self.virq_port):
            self._check_domains()

    def _check_domains(self) -> None:
        """VIRQ_DOM_EXC: some domain died; find out which of ours (C's ``check_domains``).

        Every domain the core knows is asked about, not only those with a ring:
        one that was merely named in permissions (or introduced without a ring
        we could map) must be forgotten when it dies too, or a new domain given
        its domid would inherit its rights.  A domain whose incarnation is not
        the one recorded was restarted under its domid: the one we knew is
        dead, whatever state its successor is in (running already, when the
        restart beat us or happened while no xenstored ran).  Without a
        recorded incarnation: an introduced domain had run, so finding it back
        in "created" means it was restarted; a domain never introduced may be
        "created" legitimately (the toolstack writes its nodes before it
        starts), so only a dead or vanished one is released.
        """
        known = self.core.known_domains()
        for domid in sorted(set(self.rings) | set(known)):
            incarnation = None
            try:
                info = self.xenhost.domain_info(domid)
                state = info["state"]
                incarnation = info.get("incarnation")
            except Exception as e:
                state = "gone" if getattr(e, "errno", None) == errno.ESRCH else "unknown"
            introduced = known.get(domid, False) or domid in self.rings
            recorded = self.core.incarnation(domid)
            if recorded is not None and incarnation is not None and incarnation != recorded:
                state = f"restarted (incarnation {incarnation}, not {recorded})"
            elif state in ("running", "paused", "unknown") or (state == "created" and not introduced):
                if recorded is None and incarnation is not None and state != "unknown" and domid in known:
                    self.core.set_incarnation(domid, incarnation)      # a record from an older store
                continue
            log.info("domain %d is %s: releasing it", domid, state)
            ring = self.rings.get(domid)
            if ring is not None:
                self._drop(ring, state)
            self.core.domain_gone(domid)

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._drop(conn, "xenstored stopping")
        if self.listener is not None:
            self.sel.unregister(self.listener)
            self.listener.close()
            if self.unix_path:
                try:
                    os.unlink(self.unix_path)
                except FileNotFoundError:
                    pass
        self.sel.close()
        self._wake.close()
        if self.files is not None:
            self.files.close()

