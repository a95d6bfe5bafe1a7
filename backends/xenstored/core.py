"""xenstored's sans-IO core: requests in, replies, watch events and effects out.

Rules:

* Semantics are Xen 4.17's C xenstored (tools/xenstore/xenstored_*.c) and
  docs/misc/xenstore.txt; where this file departs from C it says so.
* ``handle`` answers every request exactly once and never raises.  The
  checks run in C's order: unknown type (ENOSYS), privileged-only op from an
  unprivileged domain (EACCES), unknown transaction id (ENOENT; EAGAIN for
  one of an earlier process, see below), then the op.
* A request either succeeds or leaves the store as it was: quotas and
  permissions are checked before anything changes.  (One exception, as in
  C: an RM inside a transaction whose snapshot is torn by concurrent changes
  answers EIO half-way; that transaction can only end in EAGAIN.)
* Watch events caused by a request are queued before its reply; the first
  event of a new watch comes right after the WATCH reply (C's order).
* No I/O: the shell feeds ``handle``, drains ``take_output`` and
  ``take_effects``, maps and unmaps rings, and reports dead domains.
* Domain 0 is privileged and is also what unix-socket clients are.  Every
  other domid is an unprivileged domain; a SET_TARGET gives it a target's
  rights over the target's nodes.
* Permissions may only name domains that exist (XSA-322; C's
  ``domain_alloc_permrefs``, ``chk_domain_generation`` and
  ``domain_adjust_node_perms``).  A domain exists if xenstored knows it
  (domain 0, an introduced domain, one with a connection, one an earlier
  permission named while it lived) or else if the hypervisor hook says so.
  SET_PERMS whose owner does not exist is ENOENT; any other entry naming a
  domain that does not exist is kept but marked ignored.  A domain is dated
  by the store generation when xenstored first heard of it: an entry naming
  it on a node last written before that belongs to a dead namesake and is
  ignored, for good.  Without a hook (standalone, no hypervisor) only
  known domains exist, as in C with dom0 alone, so the toolstack must
  INTRODUCE a domain before it names it.
* A domain record also keeps the domid's *incarnation* when the hypervisor
  tells it (how many times the domid was restarted): the shell compares it
  when it checks its domains, and a domid found in another incarnation is
  the old domain's death (released, @releaseDomain) and a new domain.
* Transactions do not outlive the process, but their numbering does:
  ``dump`` keeps, per domid, an id above every one its connections gave
  out (the next one plus ``TX_ID_RESERVE``, so that a dump is needed only
  once that many more were given out: ``transaction_ids_unsaved``).
  A restored core answers EAGAIN to a request naming an id below that
  (issued before the restart, so aborted by it, or committed with its reply
  lost), on any connection of that domid: the domain's ring, or a
  unix-socket client (domain 0) that connected again.  New connections of
  that domid number their transactions from there on, so no old id is
  given out again.  An id never issued is ENOENT, as in C (whose live
  update drops open transactions and then answers ENOENT for them too: its
  clients give up instead of retrying, which xdom does not copy).

Deliberate differences from C xenstored 4.17:

* Numbers (domids, ports, DIRECTORY_PART offsets, quota values) must be plain
  decimal, else EINVAL; C's atoi reads "abc" as 0 (INTRODUCE "abc" would
  re-introduce domain 0).  INTRODUCE refuses domain 0 and reserved domids.
  Permission strings do keep C's strtol syntax (hex, octal, sign).
* A missing argument (no NUL) is EINVAL; C answers whatever errno was left over.
* The memory quota answers ENOMEM (C: EIO or a stale errno); a transaction's
  private copies are not accounted, its writes are checked against the
  writer's domain instead.  Replies and events are not charged to domains
  and do not time out: ``event_backlog_bytes`` and ``backlogged()`` bound them.
* RELEASE: reply, then the removal's events, then @releaseDomain.  C's order
  depends on its connection list; this is its usual one.
* ``domain_gone`` fires @releaseDomain even for a domain never introduced
  (C fires only for introduced domains; spurious watch events are allowed).
* A domain's watches restored from a dump fire once when it reconnects.
* A connection whose domain was released or died is answered EACCES until
  the shell disconnects it (C destroys it at once).
* A failed create takes no generation numbers (C bumps them first); C can
  list a child twice in a torn transaction view, this core cannot (such a
  transaction fails with EAGAIN either way).
* CONTROL knows check, help, log, print, quota and quota-soft; RESUME only
  validates its argument (no shutdown tracking here).
* A domain record takes a generation number of its own (C reuses the
  current one, so a grant on the node written last before a domid is
  reused still reaches the new domain).
* A transaction's written nodes have their permissions checked for stale
  entries at commit against the generation they were written with, before
  they take their commit generation: a domid released and introduced again
  while the transaction was open does not gain the rights it granted the
  old domain (C checks against the commit generation only).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Final

import msgpack

from xdom.domains.abi.xs_wire import XENSTORE_PAYLOAD_MAX, Message, XenstoreError, XsType

from .core_state import Connection
from .domains import DOMID_FIRST_RESERVED, PRIVILEGED_DOMID, DomainExists, Effect, Introduced
from .paths import ROOT, child_path
from .permissions import Access, access_for
from .quota import Quota
from .requests import OPS, RequestHandlers
from .snapshot import load as load_snapshot
from .snapshot import pack_changes, pack_dump
from .store import Node
from .watches import ConnId

__all__ = ["TX_ID_RESERVE", "XenstoreCore"]

log = logging.getLogger(__name__)

_READ: Final = int(XsType.XS_READ)
_DIRECTORY: Final = int(XsType.XS_DIRECTORY)
TX_ID_RESERVE: Final = 256      # transaction ids a dump covers ahead, per domid


class _Reply(Exception):
    """Internal: the request is answered with an error before a view exists."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class XenstoreCore(RequestHandlers):
    """The store, its transactions, watches, permissions, quotas and domains.

    Connections are opaque hashable ids chosen by the shell.  See the module
    docstring for the rules; see ``handle`` for the request contract.  This
    class is the shell's API; its parts: the state and the rules every
    request goes through (``CoreState``, core_state.py), one handler per
    request type (``RequestHandlers``, requests.py), the domain records
    (domains.py) and the saved state's format (snapshot.py).
    """

    # ==== the shell's API ========================================================================

    def connect(self, conn: ConnId, domid: int) -> None:
        """A connection acting for ``domid`` (0: privileged, e.g. a unix-socket client).

        Connecting a conn id again starts it afresh.  A domain's watches kept
        across a restart (``restore``) come back to the first connection made
        for it, each firing once, as a new watch would.
        """
        if not isinstance(domid, int) or not 0 <= domid < DOMID_FIRST_RESERVED:
            raise ValueError(f"domid {domid!r} out of range")
        if conn in self._conns:
            self.disconnect(conn)
        self._next_conn_seq += 1
        c = Connection(conn, domid, self._next_conn_seq, next_tx_id=self._tx_floor.get(domid, 1))
        self._conns[conn] = c
        self._conn_order[conn] = c.seq
        if domid != PRIVILEGED_DOMID:
            self._domains.find_or_alloc(domid)      # a domain with a connection exists
            for path, token, relative_base in self._restored_watches.pop(domid, []):
                watch = self._add_watch(c, path, token, relative_base)
                self._queue_event(c, watch.event_path(watch.path), watch.token)

    def disconnect(self, conn: ConnId) -> None:
        """Forget a connection: its watches, its open transactions and output not yet taken."""
        c = self._conns.pop(conn, None)
        if c is None:
            return
        self._conn_order.pop(conn, None)
        self._event_conns.pop(conn, None)
        self._backlogged.pop(conn, None)
        self._drop_watches(c)
        c.transactions.clear()
        if any(k == conn for k, _ in self._output):
            self._output = [(k, m) for k, m in self._output if k != conn]

    def handle(self, conn: ConnId, msg: Message) -> None:
        """Process one request; exactly one reply (or error) for it joins the output.

        Never raises: bad input gets an error reply, and a bug in the core is
        logged and answered with EIO rather than taking the daemon down.  A
        connection that was never ``connect``-ed is refused with EACCES.
        """
        replies_before = len(self._output)
        try:
            c = self._conns.get(conn)
            if c is None:
                self._output.append((conn, msg.error("EACCES")))
                return
            if (msg.type == _READ or msg.type == _DIRECTORY) and msg.tx_id == 0:
                data = self.read_fast(conn, msg.type, msg.payload)
                if data is not None:
                    self._output.append((conn, Message(msg.type, msg.req_id, 0, data)))
                    return
            self._process(c, msg)
        except Exception:
            self.internal_errors += 1
            log.exception("xenstored core: internal error on %r from %r", msg, conn)
            answered = any(k == conn and m.req_id == msg.req_id and m.type != XsType.XS_WATCH_EVENT
                           for k, m in self._output[replies_before:])
            if not answered:
                self._output.append((conn, msg.error("EIO")))
        finally:
            self._after_reply.clear()

    def read_fast(self, conn: ConnId, type_: int, payload: bytes) -> bytes | None:
        """The reply payload of a READ or DIRECTORY outside a transaction, when it is a plain
        success: a path this connection named before, a node that is there and readable.  Then
        the request is answered (by the caller: nothing is queued) exactly as ``handle`` would;
        None: it is not that simple, ``handle`` it.  (A READ changes nothing and fires nothing.)"""
        c = self._conns.get(conn)
        if c is None or c.stale or c.paths_max != self.quota.path_max:
            return None
        path = c.paths.get(payload)
        if path is None:
            return None
        node = self._store.get(path)
        if node is None:
            return None
        if len(node.perms) > 1:
            self._adjust_perms(node)
        if not c.privileged and not access_for(self._accessor(c), node.perms) & Access.READ:
            return None
        data = node.value if type_ == _READ else node.children_bytes()
        return data if len(data) <= XENSTORE_PAYLOAD_MAX else None

    def has_output(self) -> bool:
        """Whether replies or events wait for ``take_output``."""
        return bool(self._output)

    def take_output(self) -> list[tuple[ConnId, Message]]:
        """Replies and watch events queued since the last call, in order."""
        out, self._output = self._output, []
        if self._event_conns:
            for c in self._event_conns.values():
                c.queued_event_bytes = 0
                c.queued_events.clear()
            self._event_conns = {}
        return out

    def has_effects(self) -> bool:
        return bool(self._effects)

    def take_effects(self) -> list[Effect]:
        """Rings to map (Introduced) or unmap (Released), in order."""
        out, self._effects = self._effects, []
        return out

    def backlogged(self, conn: ConnId) -> bool:
        """True once watch events for ``conn`` were dropped because more than
        ``quota.event_backlog_bytes`` of them piled up between two
        ``take_output`` calls.  Sticky: the shell should drop the connection,
        since the client has lost events (C drops them silently instead).
        """
        c = self._conns.get(conn)
        return c is not None and c.backlogged

    def take_backlogged(self) -> list[ConnId]:
        """The connections that became ``backlogged`` since the last call (still connected)."""
        if not self._backlogged:
            return []
        conns = self._conns
        out = [conn for conn in self._backlogged if conn in conns and conns[conn].backlogged]
        self._backlogged = {}
        return out

    def domain_gone(self, domid: int) -> None:
        """The hypervisor says ``domid`` died: release it, remove the nodes it owns, fire @releaseDomain.

        Permission entries naming it elsewhere stay (GET_PERMS shows them) but
        never match again, not even for a later domain given the same domid.
        """
        if domid == PRIVILEGED_DOMID:
            return
        self._destroy_domain(domid, dead=True)

    def known_domains(self) -> dict[int, bool]:
        """Every domain xenstored knows but domain 0, with whether it was introduced.

        The shell asks the hypervisor about each after VIRQ_DOM_EXC (and after a
        restart) and calls ``domain_gone`` for the dead, as C's
        ``check_domains`` walks its domain list: a domain only ever named in
        permissions must be forgotten when it dies too, or a new domain with
        its domid would inherit its rights.
        """
        return {d.domid: d.introduced for d in self._domains}

    def transaction_ids_unsaved(self) -> bool:
        """Whether a transaction id was given out that the last ``dump`` does not cover: the shell
        must save the state before the reply leaves, so that a restarted core knows the id."""
        return self._tx_unsaved

    def incarnation(self, domid: int) -> int | None:
        """The incarnation of ``domid`` xenstored knows (None: not known, or no record)."""
        domain = self._domains.get(domid)
        return domain.incarnation if domain is not None else None

    def set_incarnation(self, domid: int, incarnation: int) -> None:
        """Date a record the hypervisor could not date when it was made (the shell, after a check)."""
        domain = self._domains.get(domid)
        if domain is not None and domid != PRIVILEGED_DOMID:
            domain.incarnation = incarnation
            self._domains.changed.add(domid)

    def node_count(self) -> int:
        return len(self._store)

    # ---- persistence -----------------------------------------------------------------------------

    def dump(self) -> bytes:
        """Everything that must survive a restart, as versioned msgpack (snapshot.py).

        Kept: nodes (value, perms, generation, child order), domains
        (introduction, ring, target, generation, incarnation), the special
        watch perms, the watches of domain connections by domid, and per domid
        the next transaction id.  Not kept: unix-socket (domain 0) watches and
        open transactions; a restored core answers EAGAIN for their ids.
        """
        self._forget_changes()
        watches: list[list[Any]] = []
        for w in sorted(self._watches.all(), key=lambda w: w.seq):
            c = self._conns.get(w.conn)
            if c is not None and not c.privileged and not c.stale:
                watches.append([c.domid, w.path, w.token, w.relative_base])
        for domid, kept in self._restored_watches.items():
            watches.extend([domid, path, token, base] for path, token, base in kept)
        return pack_dump(self._store.generation, self._tree_order(), self._domains, self._special_perms,
                         watches, self._transactions_out())

    def track_changes(self, on: bool) -> None:
        """Whether to note changes for ``take_changes`` (on by default; off: a store kept in memory
        only, which would otherwise note every path it ever removed)."""
        self._tracking = on
        self._forget_changes()

    def _forget_changes(self) -> None:
        self._store.changed = {} if self._tracking else None
        self._domains.changed = set()
        self._changed_watches = set()
        self._changed_special = self._changed_tx = False

    def take_changes(self) -> bytes | None:
        """What changed since the last ``dump`` or ``take_changes``, as a msgpack journal record
        (None: nothing a restart must know).  ``restore(dump, [record, ...])`` replays them.

        A record holds the generation counter, each node put or removed (its
        whole record, or its path alone when it is gone), and, when they
        changed, the records of the domains concerned, their kept watches,
        the special watch permissions and the transaction-id table.  Costs
        what changed, not the size of the store.
        """
        store = self._store
        changed = store.changed
        if changed is None:
            raise RuntimeError("take_changes: change tracking is off")
        domains = self._domains
        tables = (domains.changed or self._changed_watches or self._changed_special or self._changed_tx
                  or self._tx_unsaved)
        if not changed and not tables:
            return None
        nodes: list[Node | str] | None = None
        if changed:
            get = store.get
            nodes = [get(path) or path for path in changed]
            store.changed = {}
            if not tables:
                return pack_changes(store.generation, nodes)
        changed_domains = changed_watches = special = transactions = None
        if domains.changed:
            changed_domains = [(domid, domains.get(domid)) for domid in sorted(domains.changed)]
            domains.changed = set()
        if self._changed_watches:
            changed_watches = [[domid, self._kept_watches(domid)] for domid in sorted(self._changed_watches)]
            self._changed_watches = set()
        if self._changed_special:
            special = self._special_perms
            self._changed_special = False
        if self._changed_tx or self._tx_unsaved:
            transactions = self._transactions_out()
            self._changed_tx = False
        return pack_changes(store.generation, nodes, changed_domains, changed_watches, special, transactions)

    def _kept_watches(self, domid: int) -> list[list[Any]]:
        """The watches of ``domid`` a dump keeps, in registration order (as [path, token, base])."""
        watches = [w for c in self._conns.values() if c.domid == domid and not c.stale
                   for w in self._watches.of(c.conn)]
        watches.sort(key=lambda w: w.seq)
        out = [[w.path, w.token, w.relative_base] for w in watches]
        out.extend([path, token, base] for path, token, base in self._restored_watches.get(domid, ()))
        return out

    def _transactions_out(self) -> list[list[int]]:
        """[domid, an id above all it gave out] for each domid whose connections gave any (ever, across
        restarts); the ids up to there are reserved, so giving them out needs no new dump."""
        table = dict(self._tx_floor)
        for c in self._conns.values():
            if not c.stale and c.next_tx_id > 1:
                table[c.domid] = max(table.get(c.domid, 1), min(c.next_tx_id + TX_ID_RESERVE, 0xFFFFFFFF))
        for domid, ceiling in self._tx_saved.items():
            table[domid] = max(table.get(domid, 1), ceiling)
        self._tx_saved = {domid: ceiling for domid, ceiling in table.items() if ceiling > 1}
        self._tx_unsaved = False
        return [[domid, ceiling] for domid, ceiling in sorted(self._tx_saved.items())]

    @classmethod
    def restore(cls, data: bytes, quota: Quota | None = None,
                domain_exists: DomainExists | None = None,
                journal: Iterable[bytes | dict[str, Any]] = ()) -> XenstoreCore:
        """Rebuild a core from ``dump()`` and the ``take_changes()`` records made after it, in
        order (as given, or unpacked); raises ValueError if they are not something we can read.

        ``take_effects()`` then holds one ``Introduced`` per restored
        introduced domain, so the shell maps their rings again as it would
        after XS_INTRODUCE (no @introduceDomain fires: nothing is new).
        """
        try:
            saved = load_snapshot(data, journal)
            core = cls(quota, domain_exists)
            core._store = saved.store
            for domain in saved.domains:
                core._domains.restore(domain)
            core._special_perms.update(saved.special_perms)
            core._restored_watches = saved.watches
            core._tx_floor = saved.transactions
            core._effects = [Introduced(d.domid, d.gfn, d.port) for d in core._domains if d.introduced]
            core._forget_changes()
            return core
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
            raise ValueError(f"cannot restore xenstored state: {e}") from e

    def _tree_order(self) -> list[Node]:
        """All nodes, each parent before its children (iterative: paths may be 1000 levels deep)."""
        out = []
        stack = [ROOT]
        while stack:
            node = self._store.get(stack.pop())
            if node is None:
                continue
            out.append(node)
            stack.extend(child_path(node.path, c) for c in reversed(node.children))
        return out

    # ==== request processing =====================================================================

    def _process(self, c: Connection, msg: Message) -> None:
        op = OPS.get(msg.type)
        try:
            if op is None:
                raise _Reply("ENOSYS")
            if c.stale:
                raise _Reply("EACCES")
            if op.privileged_only and not c.privileged:
                raise _Reply("EACCES")
            tx = None
            if not op.ignores_transaction and msg.tx_id != 0:
                tx = c.transactions.get(msg.tx_id)
                if tx is None:
                    # Given out before a restart, gone with the process that held it: the
                    # client retries (EAGAIN).  Any other id was never given out: C's ENOENT.
                    raise _Reply("EAGAIN" if msg.tx_id < self._tx_floor.get(c.domid, 1) else "ENOENT")
            request = self._request(c, tx)
            payload = op.handler(self, request, msg)
        except (_Reply, XenstoreError) as e:
            self._output.append((c.conn, msg.error(e.name)))
            return
        if len(payload) > XENSTORE_PAYLOAD_MAX:          # C's send_reply
            self._output.append((c.conn, msg.error("E2BIG")))
            return
        self._output.append((c.conn, msg.reply(payload)))
        for action in self._after_reply:
            action()

