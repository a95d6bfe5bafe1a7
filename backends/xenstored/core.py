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
import re
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Final

import msgpack

from xdom.domains.abi.xs_wire import (
    HEADER_SIZE,
    XENSTORE_ABS_PATH_MAX,
    XENSTORE_PAYLOAD_MAX,
    Message,
    XenstoreError,
    XsType,
)

from .paths import (
    INTRODUCE_DOMAIN,
    RELEASE_DOMAIN,
    ROOT,
    SPECIAL_WATCH_PATH_MAX,
    basename,
    canonicalize,
    child_path,
    decode,
    domain_path,
    encode,
    is_special,
    is_valid_node_path,
    parent_of,
)
from .permissions import (
    DEFAULT_PERMS,
    Access,
    Accessor,
    Perm,
    Perms,
    access_for,
    format_perms,
    parse_perms,
    without_domain,
)
from .quota import Quota, record_size
from .store import GlobalView, Node, NodeView, Store
from .transactions import Transaction, TransactionView
from .watches import Watch, WatchRegistry

__all__ = ["ConnId", "Introduced", "Released", "XenstoreCore", "Quota", "DOMID_SELF", "DOMID_FIRST_RESERVED"]

log = logging.getLogger(__name__)

ConnId = Hashable

DOMID_FIRST_RESERVED: Final = 0x7FF0
DOMID_SELF: Final = 0x7FF0
PRIVILEGED_DOMID: Final = 0
DUMP_FORMAT: Final = "xdom-xenstored-core"
DUMP_VERSION: Final = 1

_OK: Final = b"OK\0"
_READ: Final = int(XsType.XS_READ)
_DIRECTORY: Final = int(XsType.XS_DIRECTORY)
PATH_CACHE_SIZE: Final = 256     # canonical paths remembered per connection
_ASK: Final = object()
TX_ID_RESERVE: Final = 256      # transaction ids a dump covers ahead, per domid
_DECIMAL = re.compile(rb"[0-9]{1,10}")
_SIGNED_DECIMAL = re.compile(rb"-?[0-9]{1,20}")


# ---- effects: what the shell must do --------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Introduced:
    """XS_INTRODUCE succeeded: map ``domid``'s ring (grant 1 / ``gfn``) and bind ``port``.

    Sent again, with possibly new values, when an introduced domain is
    introduced once more (C rebinds the event channel and resets the
    connection): drop the old ring connection and set up the new one.
    """

    domid: int
    gfn: int
    port: int

    def __post_init__(self) -> None:
        if not 0 < self.domid < DOMID_FIRST_RESERVED or self.port <= 0:
            raise ValueError(f"impossible introduction {self!r}")


@dataclass(frozen=True, slots=True)
class Released:
    """The domain was released (XS_RELEASE) or died: unmap its ring, close its port, disconnect it."""

    domid: int


Effect = Introduced | Released


# ---- domains and connections -----------------------------------------------------------------

@dataclass(slots=True)
class _Domain:
    """What xenstored knows of one domain (C's ``struct domain``).

    ``generation`` dates the record: a generation number of its own, taken
    when xenstored first heard of the domain.  A permission entry naming it
    on a node last written *before* that is a dead namesake's and is ignored.
    """

    domid: int
    generation: int
    introduced: bool = False
    gfn: int = 0
    port: int = 0
    target: int | None = None
    incarnation: int | None = None      # the hypervisor's restart count of the domid, when it said


@dataclass(slots=True)
class _Connection:
    conn: ConnId
    domid: int
    seq: int
    transactions: dict[int, Transaction] = field(default_factory=dict)
    next_tx_id: int = 1
    stale: bool = False            # its domain was released or died: it speaks for no one
    queued_event_bytes: int = 0
    queued_events: set[bytes] = field(default_factory=set)    # payloads not yet taken, for de-duplication
    backlogged: bool = False
    # Path arguments already made canonical and found valid (for ``paths_max``): a one-argument
    # payload (with its NUL) or a bare path -> the canonical path.  Bounded; see _canonical_path.
    paths: dict[bytes, str] = field(default_factory=dict)
    paths_max: int = -1

    @property
    def privileged(self) -> bool:
        return self.domid == PRIVILEGED_DOMID

    @property
    def home(self) -> str:
        return domain_path(self.domid)


@dataclass(slots=True)
class _Request:
    """One request being handled: who asks, and through which view of the tree."""

    conn: _Connection
    who: Accessor
    view: NodeView
    tx: Transaction | None

    @property
    def unprivileged(self) -> bool:
        return not self.who.privileged


@dataclass(frozen=True, slots=True)
class _Op:
    handler: Callable[[XenstoreCore, _Request, Message], bytes]
    privileged_only: bool = False
    ignores_transaction: bool = False


class _Reply(Exception):
    """Internal: the request is answered with an error before a view exists."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


# ---- argument parsing (C's get_string / get_strings / onearg) --------------------------------

def _onearg(payload: bytes) -> str | None:
    """The single argument: the payload must hold exactly one NUL, at its end."""
    if not payload or payload.find(b"\0") != len(payload) - 1:
        return None
    return decode(payload[:-1])


def _strings(payload: bytes) -> list[bytes]:
    """NUL-terminated strings; bytes after the last NUL are ignored, as C's get_strings does."""
    return payload.split(b"\0")[:-1]


def _parse_u32(raw: bytes | str | None) -> int | None:
    """A decimal number 0..2^32-1.  Stricter than C's atoi, which reads 'abc' as 0."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = encode(raw)
    if not _DECIMAL.fullmatch(raw):
        return None
    value = int(raw)
    return value if value <= 0xFFFFFFFF else None


_pack = msgpack.Packer(use_bin_type=True).pack      # one packer, reset after each record


def _perms_out(perms: Perms) -> list[list[Any]]:
    return [[p.domid, int(p.access), p.ignored] for p in perms]


def _node_out(node: Node) -> list[Any]:
    return [node.path, node.value, _perms_out(node.perms), node.generation, list(node.children)]


def _domain_out(d: _Domain) -> list[Any]:
    return [d.domid, d.generation, d.introduced, d.gfn, d.port, d.target, d.incarnation]


class XenstoreCore:
    """The store, its transactions, watches, permissions, quotas and domains.

    Connections are opaque hashable ids chosen by the shell.  See the module
    docstring for the rules; see ``handle`` for the request contract.
    """

    def __init__(self, quota: Quota | None = None,
                 domain_exists: Callable[[int], int | bool] | None = None) -> None:
        """``domain_exists`` asks the hypervisor whether a domid xenstored does
        not know yet is a live domain, as C's ``get_domain_info`` does (it may
        raise: the domain then counts as absent).  It answers False (or None)
        for no, True or the domid's incarnation (an int, not a bool) for yes;
        the incarnation is kept in the record it makes.  It is also asked for
        the incarnation when a record is made for an introduced or connected
        domain.  Without it (standalone, no hypervisor) a domain exists only
        once xenstored knows it: domain 0, an introduced domain or a connected
        one."""
        self.quota = quota or Quota()
        self._domain_exists_hook = domain_exists
        self._store = Store.initial()
        self._domains: dict[int, _Domain] = {PRIVILEGED_DOMID: _Domain(PRIVILEGED_DOMID, 0, introduced=True)}
        self._conns: dict[ConnId, _Connection] = {}
        self._conn_order: dict[ConnId, int] = {}
        self._next_conn_seq = 0
        self._watches = WatchRegistry()
        self._watch_count: Counter[int] = Counter()     # per domain
        self._watch_memory: Counter[int] = Counter()    # per domain
        self._special_perms: dict[str, Perms] = {INTRODUCE_DOMAIN: DEFAULT_PERMS, RELEASE_DOMAIN: DEFAULT_PERMS}
        # Watches of domain connections restored from a dump, waiting for connect(conn, domid).
        self._restored_watches: dict[int, list[tuple[str, bytes, str | None]]] = {}
        self._output: list[tuple[ConnId, Message]] = []
        self._effects: list[Effect] = []
        # Work that C does after queueing the reply: a new watch's first event, a release.
        self._after_reply: list[Callable[[], None]] = []
        # Per domid, from a restored dump: the first transaction id its connections give out;
        # a request naming an id below it names a transaction of an earlier process (EAGAIN).
        self._tx_floor: dict[int, int] = {}
        self._tx_saved: dict[int, int] = {}      # per domid: ids below this are covered by the last dump
        self._tx_unsaved = False
        # What changed since the last dump or take_changes (the journal; nodes: Store.changed).
        self._changed_domains: set[int] = set()
        self._changed_watches: set[int] = set()        # domids whose kept watches changed
        self._changed_special = False
        self._changed_tx = False
        self._tracking = True
        self._event_conns: dict[ConnId, _Connection] = {}    # connections with events since take_output
        self._backlogged: dict[ConnId, None] = {}            # backlogged since take_backlogged
        self._global_view = GlobalView(self._store, self._adjust_perms)
        self.internal_errors = 0      # requests answered EIO because of a bug here (tests expect 0)

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
        c = _Connection(conn, domid, self._next_conn_seq, next_tx_id=self._tx_floor.get(domid, 1))
        self._conns[conn] = c
        self._conn_order[conn] = c.seq
        if domid != PRIVILEGED_DOMID:
            self._find_or_alloc_domain(domid)      # a domain with a connection exists
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
        return {d.domid: d.introduced for d in self._domains.values() if d.domid != PRIVILEGED_DOMID}

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
            self._changed_domains.add(domid)

    def node_count(self) -> int:
        return len(self._store)

    def check(self) -> list[str]:
        """Internal consistency (tree, accounting, watch counts); empty when all is well."""
        problems = self._store.check_invariants()
        counts: Counter[int] = Counter()
        memory: Counter[int] = Counter()
        for w in self._watches.all():
            c = self._conns.get(w.conn)
            if c is None:
                problems.append(f"watch {w.path} of unknown connection {w.conn!r}")
                continue
            counts[c.domid] += 1
            memory[c.domid] += w.memory()
        if counts != +self._watch_count or memory != +self._watch_memory:
            problems.append(f"watch accounting {dict(self._watch_count)} != {dict(counts)}")
        return problems

    # ---- persistence -----------------------------------------------------------------------------

    def dump(self) -> bytes:
        """Everything that must survive a restart, as versioned msgpack.

        Kept: nodes (value, perms, generation, child order), domains
        (introduction, ring, target, generation, incarnation), the special
        watch perms, the watches of domain connections by domid, and per domid
        the next transaction id.  Not kept: unix-socket (domain 0) watches and
        open transactions; a restored core answers EAGAIN for their ids.
        """
        self._forget_changes()
        nodes = []
        for node in self._tree_order():
            nodes.append(_node_out(node))
        watches: list[list[Any]] = []
        for w in sorted(self._watches.all(), key=lambda w: w.seq):
            c = self._conns.get(w.conn)
            if c is not None and not c.privileged and not c.stale:
                watches.append([c.domid, w.path, w.token, w.relative_base])
        for domid, kept in self._restored_watches.items():
            watches.extend([domid, path, token, base] for path, token, base in kept)
        state = {
            "format": DUMP_FORMAT,
            "version": DUMP_VERSION,
            "generation": self._store.generation,
            "nodes": nodes,
            "domains": [_domain_out(d) for d in self._domains.values() if d.domid != PRIVILEGED_DOMID],
            "special_perms": {name: _perms_out(p) for name, p in self._special_perms.items()},
            "watches": watches,
            "transactions": self._transactions_out(),
        }
        return msgpack.packb(state, use_bin_type=True)

    def track_changes(self, on: bool) -> None:
        """Whether to note changes for ``take_changes`` (on by default; off: a store kept in memory
        only, which would otherwise note every path it ever removed)."""
        self._tracking = on
        self._forget_changes()

    def _forget_changes(self) -> None:
        self._store.changed = {} if self._tracking else None
        self._changed_domains = set()
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
        tables = (self._changed_domains or self._changed_watches or self._changed_special or self._changed_tx
                  or self._tx_unsaved)
        if not changed and not tables:
            return None
        record: dict[str, Any] = {"g": store.generation}
        if changed:
            get = store.get
            nodes = []
            for path in changed:
                node = get(path)
                nodes.append(_node_out(node) if node is not None else [path])
            record["n"] = nodes
            store.changed = {}
            if not tables:
                return _pack(record)
        if self._changed_domains:
            domains = self._domains
            record["d"] = [[domid, _domain_out(domains[domid]) if domid in domains else None]
                           for domid in sorted(self._changed_domains)]
            self._changed_domains = set()
        if self._changed_watches:
            record["w"] = [[domid, self._kept_watches(domid)] for domid in sorted(self._changed_watches)]
            self._changed_watches = set()
        if self._changed_special:
            record["s"] = {name: _perms_out(p) for name, p in self._special_perms.items()}
            self._changed_special = False
        if self._changed_tx or self._tx_unsaved:
            record["t"] = self._transactions_out()
            self._changed_tx = False
        return _pack(record)

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
                domain_exists: Callable[[int], int | bool] | None = None,
                journal: Iterable[bytes | dict[str, Any]] = ()) -> XenstoreCore:
        """Rebuild a core from ``dump()`` and the ``take_changes()`` records made after it, in
        order (as given, or unpacked); raises ValueError if they are not something we can read.

        ``take_effects()`` then holds one ``Introduced`` per restored
        introduced domain, so the shell maps their rings again as it would
        after XS_INTRODUCE (no @introduceDomain fires: nothing is new).
        """
        try:
            state = msgpack.unpackb(data, raw=False, strict_map_key=False)
            if not isinstance(state, dict) or state.get("format") != DUMP_FORMAT:
                raise ValueError("not a xenstored core dump")
            if state.get("version") != DUMP_VERSION:
                raise ValueError(f"unsupported dump version {state.get('version')!r}")
            core = cls(quota, domain_exists)

            def perms_in(raw: list[list[Any]]) -> Perms:
                perms = tuple(Perm(int(d), Access(int(a) & 3), bool(i)) for d, a, i in raw)
                if not perms:
                    raise ValueError("node without permissions")
                return perms

            def node_in(row: list[Any]) -> Node:
                path, value, perms, generation, children = row
                if not isinstance(path, str) or not is_valid_node_path(path, XENSTORE_ABS_PATH_MAX):
                    raise ValueError(f"bad node path {path!r}")
                return Node(path, bytes(value), perms_in(perms), int(generation), {str(c): None for c in children})

            nodes = {node.path: node for node in map(node_in, state["nodes"])}
            generation = int(state["generation"])
            domains = {int(row[0]): row for row in state["domains"]}
            special = dict(state["special_perms"])
            kept: dict[int, list[list[Any]]] = {}
            for domid, path, token, base in state["watches"]:
                kept.setdefault(int(domid), []).append([path, token, base])
            tx_table = state.get("transactions", [])
            for raw in journal:
                record = raw if isinstance(raw, dict) else msgpack.unpackb(raw, raw=False, strict_map_key=False)
                if not isinstance(record, dict):
                    raise ValueError("journal record is not a map")
                generation = max(generation, int(record["g"]))
                for row in record.get("n", ()):
                    if len(row) == 1:
                        nodes.pop(row[0], None)
                    else:
                        node = node_in(row)
                        nodes[node.path] = node
                for domid, row in record.get("d", ()):
                    if row is None:
                        domains.pop(int(domid), None)
                    else:
                        domains[int(domid)] = row
                for domid, watches in record.get("w", ()):
                    if watches:
                        kept[int(domid)] = watches
                    else:
                        kept.pop(int(domid), None)
                if "s" in record:
                    special = dict(record["s"])
                if "t" in record:
                    tx_table = record["t"]
            store = Store()
            for node in nodes.values():
                store.put(node)
            store.changed = {}
            # Never hand out a generation again, even if the dump's counter were behind.
            store.generation = max([generation] + [n.generation for n in store])
            problems = store.check_invariants()
            if problems:
                raise ValueError(f"inconsistent tree: {problems[:3]}")
            core._store = store
            for row in domains.values():
                domid, generation, introduced, gfn, port, target = row[:6]
                incarnation = row[6] if len(row) > 6 else None      # dumps made before incarnations
                core._domains[int(domid)] = _Domain(int(domid), int(generation), bool(introduced), int(gfn),
                                                    int(port), None if target is None else int(target),
                                                    None if incarnation is None else int(incarnation))
            for name in (INTRODUCE_DOMAIN, RELEASE_DOMAIN):
                if name in special:
                    core._special_perms[name] = perms_in(special[name])
            for domid, watches in kept.items():
                core._restored_watches[domid] = [(str(path), bytes(token), None if base is None else str(base))
                                                 for path, token, base in watches]
            for domid, next_id in tx_table:
                if not 0 <= int(domid) < DOMID_FIRST_RESERVED or not 1 <= int(next_id) <= 0xFFFFFFFF:
                    raise ValueError(f"transaction ids {domid!r}: {next_id!r}")
                core._tx_floor[int(domid)] = int(next_id)
            core._effects = [Introduced(d.domid, d.gfn, d.port) for d in core._domains.values()
                             if d.introduced and d.domid != PRIVILEGED_DOMID]
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

    def _process(self, c: _Connection, msg: Message) -> None:
        op = _OPS.get(msg.type)
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

    def _accessor(self, c: _Connection) -> Accessor:
        domain = self._domains.get(c.domid)
        return Accessor(c.domid, c.privileged, domain.target if domain is not None else None)

    def _request(self, c: _Connection, tx: Transaction | None) -> _Request:
        who = self._accessor(c)
        view: NodeView
        if tx is None:
            view = self._global_view
            if view._store is not self._store:        # restored
                view = self._global_view = GlobalView(self._store, self._adjust_perms)
        else:
            limit = None if who.privileged else self.quota.transaction_nodes
            view = TransactionView(tx, self._store, self._adjust_perms, limit)
        return _Request(c, who, view, tx)

    def _system_request(self) -> _Request:
        """xenstored acting on its own (C passes conn == NULL): privileged, global."""
        system = _Connection(None, PRIVILEGED_DOMID, 0)
        return _Request(system, Accessor(PRIVILEGED_DOMID, True), GlobalView(self._store, self._adjust_perms),
                        None)

    # ---- node lookup with C's permission and errno rules ---------------------------------------

    def _adjust_perms(self, node: Node) -> None:
        """Mark entries naming a domain that is gone, or newer than the node, as ignored (C's
        ``domain_adjust_node_perms``).  Once ignored, an entry stays ignored."""
        perms = node.perms
        for i in range(1, len(perms)):
            entry = perms[i]
            if entry.ignored:
                continue
            domain = self._domains.get(entry.domid)
            if domain is None or domain.generation > node.generation:
                node.perms = perms = perms[:i] + (replace(entry, ignored=True),) + perms[i + 1:]

    def _path_arg(self, req: _Request, raw: str | None) -> str:
        """A request's path argument made canonical; EINVAL if missing or not a valid node path."""
        if raw is None:
            raise XenstoreError("EINVAL")
        path = canonicalize(raw, req.conn.home)
        if not is_valid_node_path(path, self.quota.path_max):
            raise XenstoreError("EINVAL")
        return path

    def _canonical_path(self, req: _Request, key: bytes, raw: bytes) -> str:
        """``_path_arg`` of ``raw`` (wire bytes), remembered per connection under ``key`` (the
        one-argument payload, or the path itself), as long as the path-max quota stays."""
        c = req.conn
        if c.paths_max != self.quota.path_max:
            c.paths.clear()
            c.paths_max = self.quota.path_max
        path = c.paths.get(key)
        if path is None:
            path = self._path_arg(req, decode(raw))
            if len(c.paths) >= PATH_CACHE_SIZE:
                c.paths.clear()
            c.paths[key] = path
        return path

    def _onearg_path(self, req: _Request, payload: bytes) -> str:
        """The single argument (C's onearg) as a canonical node path; EINVAL if it is none."""
        if not payload or payload.find(b"\0") != len(payload) - 1:
            raise XenstoreError("EINVAL")
        return self._canonical_path(req, payload, payload[:-1])

    def _get_node(self, req: _Request, path: str, need: Access) -> Node:
        """The node at (valid, canonical) ``path`` if ``req`` may ``need`` it; else C's errno.

        A missing or forbidden node answers ENOENT/EACCES only if the nearest
        existing ancestor grants ``need``; otherwise EACCES, so a stranger
        learns nothing about what exists where it may not look.
        """
        node = req.view.read(path)
        if node is not None:
            if req.who.privileged or access_for(req.who, node.perms) & need == need:
                return node
            errno = "EACCES"
        else:
            errno = "ENOENT"
        if self._ancestor_access(req, path) & need:
            raise XenstoreError(errno)
        raise XenstoreError("EACCES")

    def _ancestor_access(self, req: _Request, path: str) -> Access:
        """What ``req`` may do at the nearest existing ancestor of ``path`` (C's ``ask_parents``)."""
        name = path
        while True:
            name = parent_of(name)
            node = req.view.read(name)
            if node is not None:
                return access_for(req.who, node.perms)
            if name == ROOT:
                return Access.NONE

    # ---- quota checks before a node is written ---------------------------------------------------

    def _domain_memory(self, domid: int) -> int:
        return self._store.memory[domid] + self._watch_memory[domid]

    def _check_node_write(self, req: _Request, node_path: str, perms: Perms, value_len: int, children_len: int,
                          pending_memory: Counter[int] | None = None) -> None:
        """C's write_node_raw + do_tdb_write quota checks for one node about to be written.

        Node size is checked for unprivileged writers; memory is charged to the
        node's owner (outside transactions) or to the writer (inside, where C
        charges the transaction's private copy).  Raises ENOSPC / ENOMEM and
        poisons the transaction, as a failed write does in C.
        """
        record = record_size(len(perms), value_len, children_len)
        size = len(node_path) + record
        try:
            if req.unprivileged and record >= self.quota.node_size:
                raise XenstoreError("ENOSPC", "node too big")
            charged_to = req.conn.domid if req.tx is not None else perms[0].domid
            if charged_to != PRIVILEGED_DOMID:
                current = self._domain_memory(charged_to)
                if req.tx is None:
                    old = self._store.charged_memory(node_path)
                    if old is not None and old[0] == charged_to:
                        current -= old[1]
                if pending_memory is not None:
                    current += pending_memory[charged_to]
                if current + size >= self.quota.memory:
                    raise XenstoreError("ENOMEM", "memory quota")
                if pending_memory is not None:
                    pending_memory[charged_to] += size
        except XenstoreError:
            if req.tx is not None:
                req.tx.failed = True
            raise

    # ---- watches ----------------------------------------------------------------------------------

    def _fire(self, req: _Request, path: str, node: Node | None, exact: bool, old_perms: Perms | None) -> None:
        """A node changed: inside a transaction remember it for commit, else notify watchers now."""
        if req.tx is not None:
            req.tx.queue_watch(path, exact)
        else:
            self._fire_now(path, node, exact, old_perms)

    def _fire_now(self, path: str, node: Node | None, exact: bool, old_perms: Perms | None) -> None:
        watches = self._watches.matching(path, exact, self._conn_order)
        verdicts: dict[ConnId, bool] = {}
        for watch in watches:
            c = self._conns.get(watch.conn)
            if c is None:
                continue
            allowed = verdicts.get(watch.conn)
            if allowed is None:
                allowed = verdicts[watch.conn] = self._may_see(c, path, node, old_perms)
            if allowed:
                self._queue_event(c, watch.event_path(path), watch.token)

    def _may_see(self, c: _Connection, path: str, node: Node | None, old_perms: Perms | None) -> bool:
        """C's ``watch_permitted``: the node (before or after the change) or its parent must be readable."""
        who = self._accessor(c)
        if is_special(path):
            perms = self._special_perms.get(path)
            return perms is not None and bool(access_for(who, perms) & Access.READ)
        if old_perms is not None and access_for(who, old_perms) & Access.READ:
            return True
        if node is None:
            node = self._store.get(path)
            if node is None:
                return False
            self._adjust_perms(node)
        if access_for(who, node.perms) & Access.READ:
            return True
        parent = self._store.get(parent_of(node.path))
        if parent is None:
            return False
        self._adjust_perms(parent)
        return bool(access_for(who, parent.perms) & Access.READ)

    def _queue_event(self, c: _Connection, path: str, token: bytes) -> None:
        """Queue a WATCH_EVENT unless it is too long, or the same event is still queued for
        ``c`` (C's ``send_event`` drops such duplicates, special events excepted)."""
        payload = encode(path) + b"\0" + token + b"\0"
        if len(payload) > XENSTORE_PAYLOAD_MAX:       # C: "Don't try to send over-long events."
            return
        if not is_special(path):
            if payload in c.queued_events:
                return
            c.queued_events.add(payload)
            self._event_conns[c.conn] = c
        size = HEADER_SIZE + len(payload)
        self._event_conns[c.conn] = c
        if c.queued_event_bytes + size > self.quota.event_backlog_bytes:
            if not c.backlogged:
                log.warning("xenstored: watch events for domain %d piled up; dropping them", c.domid)
                self._backlogged[c.conn] = None
            c.backlogged = True
            return
        c.queued_event_bytes += size
        self._output.append((c.conn, Message(XsType.XS_WATCH_EVENT, 0, 0, payload)))

    def _add_watch(self, c: _Connection, path: str, token: bytes, relative_base: str | None) -> Watch:
        watch = self._watches.add(c.conn, path, token, relative_base)
        if c.domid != PRIVILEGED_DOMID:
            self._changed_watches.add(c.domid)
        self._watch_count[c.domid] += 1
        self._watch_memory[c.domid] += watch.memory()
        return watch

    def _forget_watch(self, c: _Connection, watch: Watch) -> None:
        if c.domid != PRIVILEGED_DOMID:
            self._changed_watches.add(c.domid)
        self._watch_count[c.domid] -= 1
        self._watch_memory[c.domid] -= watch.memory()
        if self._watch_count[c.domid] <= 0:
            del self._watch_count[c.domid]
            self._watch_memory.pop(c.domid, None)

    def _drop_watches(self, c: _Connection) -> None:
        for watch in self._watches.remove_all(c.conn):
            self._forget_watch(c, watch)

    # ---- domains ---------------------------------------------------------------------------------

    def _ask_hypervisor(self, domid: int) -> tuple[bool, int | None]:
        """Whether a domid is a live domain (C's ``get_domain_info``), and its incarnation if told.

        Only the hypervisor can say; without it, or when asking fails, the
        answer is no: a permission for a domain nobody vouches for is exactly
        what a later domain with that domid would inherit.
        """
        if domid >= DOMID_FIRST_RESERVED or self._domain_exists_hook is None:
            return False, None
        try:
            answer = self._domain_exists_hook(domid)
        except Exception as e:
            log.warning("xenstored: cannot ask the hypervisor about domain %d (%s): taking it for absent",
                        domid, e)
            return False, None
        if answer is None or isinstance(answer, bool):
            return bool(answer), None
        return True, int(answer)

    def _find_or_alloc_existing_domain(self, domid: int) -> _Domain | None:
        """The known domain, or a new record if the hypervisor says it exists (C's namesake)."""
        domain = self._domains.get(domid)
        if domain is None:
            exists, incarnation = self._ask_hypervisor(domid)
            if exists:
                domain = self._find_or_alloc_domain(domid, incarnation)
        return domain

    def _find_or_alloc_domain(self, domid: int, incarnation: Any = _ASK) -> _Domain:
        """The record of ``domid``, made now if there is none.

        A new record takes a generation of its own: C dates it with the
        current count without a step, so the node written last before it
        shares its generation and counts as younger, and a grant on that node
        to a dead namesake passes to the new domain.  With the step, every
        node written before the record is older than it, everything after
        younger (nodes the toolstack writes for it before its introduction).
        """
        domain = self._domains.get(domid)
        if domain is None:
            if incarnation is _ASK:
                incarnation = self._ask_hypervisor(domid)[1] if domid != PRIVILEGED_DOMID else None
            domain = self._domains[domid] = _Domain(domid, self._store.next_generation(),
                                                    incarnation=incarnation)
            self._changed_domains.add(domid)
        return domain

    def _introduced(self, domid: int | None) -> _Domain | None:
        domain = self._domains.get(domid) if domid is not None else None
        return domain if domain is not None and domain.introduced else None

    def _alloc_permrefs(self, perms: Perms) -> Perms:
        """C's ``domain_alloc_permrefs``: an existing domain not known yet gets its record
        (dated now, so the node about to be written is younger than it); entries naming a
        domain that does not exist are marked ignored."""
        out = []
        for p in perms:
            if self._find_or_alloc_existing_domain(p.domid) is None:
                p = replace(p, ignored=True)
            out.append(p)
        return tuple(out)

    def _destroy_domain(self, domid: int, dead: bool) -> None:
        """RELEASE or death (C's ``destroy_conn`` + ``destroy_domain``).

        The domain's connections lose their watches and transactions and
        speak for no one any more; every node it owns goes, subtree and all,
        firing watches; it leaves the special-watch permissions; then
        @releaseDomain fires.
        """
        domain = self._domains.pop(domid, None)
        self._changed_domains.add(domid)
        self._changed_watches.add(domid)
        self._changed_special = self._changed_tx = True
        for c in self._conns.values():
            if c.domid == domid:
                self._drop_watches(c)
                c.transactions.clear()
                c.stale = True
        self._restored_watches.pop(domid, None)
        self._tx_floor.pop(domid, None)          # a later domain with this domid starts afresh
        self._tx_saved.pop(domid, None)
        self._remove_owned_nodes(domid)
        for name, perms in self._special_perms.items():
            self._special_perms[name] = without_domain(perms, domid)
        if domain is not None and domain.introduced:
            self._effects.append(Released(domid))
        if dead or (domain is not None and domain.introduced):
            self._fire_now(RELEASE_DOMAIN, None, True, None)

    def _remove_owned_nodes(self, domid: int) -> None:
        """C's ``domain_tree_remove``: pre-order walk, removing each subtree rooted at a node ``domid`` owns."""
        if not self._store.entries.get(domid):
            return
        root = self._store.get(ROOT)
        if root is not None and root.owner == domid:       # never delete the root: hand it to dom0
            root.perms = (Perm(PRIVILEGED_DOMID, root.perms[0].access),) + root.perms[1:]
            self._store.recharge(root)
        system = self._system_request()
        stack = [ROOT]
        while stack and self._store.entries.get(domid):
            node = self._store.get(stack.pop())
            if node is None:
                continue
            if node.owner == domid and node.path != ROOT:
                self._rm_node(system, node.path)
                continue
            stack.extend(child_path(node.path, c) for c in reversed(node.children))

    # ---- tree operations shared by several requests ----------------------------------------------

    def _create_node(self, req: _Request, path: str, value: bytes) -> Node:
        """Create ``path`` and any missing parents (C's ``construct_node`` + ``create_node``).

        New nodes inherit the nearest existing ancestor's permissions; an
        unprivileged creator becomes their owner.  All quota checks run
        before anything is written.
        """
        view = req.view
        missing = [path]                 # bottom-up: the node, then its missing parents
        parent_path = parent_of(path)
        parent = view.read(parent_path)
        while parent is None:
            if parent_path == ROOT:
                raise XenstoreError("ENOENT")
            missing.append(parent_path)
            parent_path = parent_of(parent_path)
            parent = view.read(parent_path)

        perms = parent.perms
        if req.unprivileged:
            perms = (replace(perms[0], domid=req.conn.domid),) + perms[1:]

        pending: Counter[int] = Counter()
        owned_before = self._store.entries[req.conn.domid]
        for i, new_path in enumerate(missing):
            if req.unprivileged and owned_before + (0 if req.tx else i) >= self.quota.nodes:
                if req.tx is not None and i > 0:
                    req.tx.failed = True     # C had written (and then destroyed) the first nodes
                raise XenstoreError("ENOSPC", "node quota")
            child_len = len(basename(missing[i - 1])) + 1 if i > 0 else 0
            self._check_node_write(req, new_path, perms, len(value) if i == 0 else 0, child_len, pending)
        top_name = basename(missing[-1])
        added_len = 0 if top_name in parent.children else len(top_name) + 1
        self._check_node_write(req, parent.path, parent.perms, len(parent.value), parent.children_len + added_len,
                               pending)

        nodes = [Node(new_path, value if i == 0 else b"", perms) for i, new_path in enumerate(missing)]
        for below, above in zip(nodes, nodes[1:]):
            above.add_child(basename(below.path))
        for node in nodes:                    # C's order, hence its generation numbers
            view.write(node)
            if req.tx is not None:
                req.tx.entry_delta[node.owner] += 1
                req.tx.node_created = True
        parent.add_child(basename(nodes[-1].path))
        view.write(parent)
        return nodes[0]

    def _rm_node(self, req: _Request, path: str) -> None:
        """Remove ``path`` and everything below it, children first, firing watches per node
        (C's ``rm_node``): the named node fires for its watchers and theirs above; each
        removed descendant fires only for watches on exactly its path."""
        view = req.view
        parent = view.read(parent_of(path))
        if parent is None:
            raise XenstoreError("EINVAL")
        top = view.read(path)
        if top is None:
            return
        # Iterative post-order walk; each entry holds its children still to visit, last first.
        stack: list[tuple[Node, list[str]]] = [(top, list(reversed(top.children)))]
        while stack:
            node, pending = stack[-1]
            if pending:
                child = view.read(child_path(node.path, pending.pop()))
                if child is None:
                    # Only a transaction's view can be torn like this (it read the parent
                    # before someone removed the child); C's walk gives up with EIO, and
                    # the commit will fail with EAGAIN anyway.
                    raise XenstoreError("EIO", "child listed but missing")
                stack.append((child, list(reversed(child.children))))
                continue
            stack.pop()
            view.delete(node.path)
            self._fire(req, node.path, node, node.path != path, None)
            if req.tx is not None:
                req.tx.entry_delta[node.owner] -= 1
            listed_in = stack[-1][0] if stack else parent
            if basename(node.path) not in listed_in.children:
                # Torn transaction view again: C's delete_child gives up with EIO.
                raise XenstoreError("EIO", "child not listed by its parent")
            listed_in.remove_child(basename(node.path))
            view.write(listed_in)

    # ==== the requests ===========================================================================

    def _op_read(self, req: _Request, msg: Message) -> bytes:
        return self._get_node(req, self._onearg_path(req, msg.payload), Access.READ).value

    def _op_directory(self, req: _Request, msg: Message) -> bytes:
        return self._get_node(req, self._onearg_path(req, msg.payload), Access.READ).children_bytes()

    def _op_directory_part(self, req: _Request, msg: Message) -> bytes:
        """``<gencnt>\\0`` then children from byte ``offset`` on, as many as fit; a final
        empty string marks the end of the list (C's ``send_directory_part``)."""
        if msg.payload.count(b"\0") != 2:
            raise XenstoreError("EINVAL")
        raw_path, raw_offset, _ = msg.payload.split(b"\0")
        node = self._get_node(req, self._path_arg(req, decode(raw_path)), Access.READ)
        offset = _parse_u32(raw_offset)
        if offset is None:
            raise XenstoreError("EINVAL")
        gen = str(node.generation).encode() + b"\0"
        children = node.children_bytes()
        if offset >= len(children):
            return gen + b"\0"
        max_len = XENSTORE_PAYLOAD_MAX - len(gen) - 1
        length = 0
        while True:
            name_len = children.find(b"\0", offset + length) - (offset + length)
            if length + name_len >= max_len:
                break
            length += name_len + 1
            if offset + length == len(children):
                break
        chunk = gen + children[offset:offset + length]
        return chunk + b"\0" if offset + length == len(children) else chunk

    def _op_get_perms(self, req: _Request, msg: Message) -> bytes:
        node = self._get_node(req, self._onearg_path(req, msg.payload), Access.READ)
        return format_perms(node.perms)

    def _op_write(self, req: _Request, msg: Message) -> bytes:
        cut = msg.payload.find(b"\0")
        if cut < 0:
            raise XenstoreError("EINVAL")
        raw_path = msg.payload[:cut]
        path = self._canonical_path(req, raw_path, raw_path)
        value = msg.payload[cut + 1:]
        try:
            node = self._get_node(req, path, Access.WRITE)
        except XenstoreError as e:
            if e.name != "ENOENT":
                raise
            node = self._create_node(req, path, value)
        else:
            self._check_node_write(req, node.path, node.perms, len(value), node.children_len)
            node.value = value
            req.view.write(node)
        self._fire(req, node.path, node, False, None)
        return _OK

    def _op_mkdir(self, req: _Request, msg: Message) -> bytes:
        path = self._onearg_path(req, msg.payload)
        try:
            self._get_node(req, path, Access.WRITE)
        except XenstoreError as e:
            if e.name != "ENOENT":
                raise
            node = self._create_node(req, path, b"")
            self._fire(req, node.path, node, False, None)
        return _OK

    def _op_rm(self, req: _Request, msg: Message) -> bytes:
        path = self._onearg_path(req, msg.payload)
        try:
            self._get_node(req, path, Access.WRITE)
        except XenstoreError as e:
            if e.name != "ENOENT":
                raise
            # Not there: fine, as long as its parent is.
            if req.view.read(parent_of(path)) is not None:
                return _OK
            raise
        if path == ROOT:
            raise XenstoreError("EINVAL")
        self._rm_node(req, path)
        return _OK

    def _op_set_perms(self, req: _Request, msg: Message) -> bytes:
        count = msg.payload.count(b"\0")
        if count < 2:
            raise XenstoreError("EINVAL")
        count -= 1
        if req.unprivileged and count > self.quota.permissions:
            raise XenstoreError("ENOSPC")
        fields_ = msg.payload.split(b"\0")
        perms = self._alloc_permrefs(parse_perms([decode(f) for f in fields_[1:count + 1]]))
        if perms[0].ignored:
            raise XenstoreError("ENOENT", "owner does not exist")
        raw_path = decode(fields_[0])
        if is_special(raw_path):
            current = self._special_perms.get(raw_path)
            if current is None:
                raise XenstoreError("EINVAL")
            need = Access.WRITE | Access.OWNER
            if access_for(req.who, current) & need != need:
                raise XenstoreError("EACCES")
            self._special_perms[raw_path] = perms
            self._changed_special = True
            return _OK
        node = self._get_node(req, self._path_arg(req, raw_path), Access.WRITE | Access.OWNER)
        if req.unprivileged and perms[0].domid != node.owner:
            raise XenstoreError("EPERM", "only a privileged domain may change the owner")
        self._check_node_write(req, node.path, perms, len(node.value), node.children_len)
        old_perms = node.perms
        if req.tx is not None:
            req.tx.entry_delta[node.owner] -= 1
            req.tx.entry_delta[perms[0].domid] += 1
        node.perms = perms
        req.view.write(node)
        self._fire(req, node.path, node, False, old_perms)
        return _OK

    def _op_watch(self, req: _Request, msg: Message) -> bytes:
        args = _strings(msg.payload)
        if len(args) != 2:
            raise XenstoreError("EINVAL")
        path, token = decode(args[0]), args[1]
        relative_base = None
        if is_special(path):
            if len(path) > SPECIAL_WATCH_PATH_MAX:
                raise XenstoreError("EINVAL")
        else:
            if not path.startswith(ROOT):
                relative_base = req.conn.home
            path = canonicalize(path, req.conn.home)
            if not is_valid_node_path(path, self.quota.path_max):
                raise XenstoreError("EINVAL")
        c = req.conn
        if self._watches.find(c.conn, path, token) is not None:
            raise XenstoreError("EEXIST")
        if req.unprivileged:
            if self._watch_count[c.domid] > self.quota.watches:
                raise XenstoreError("E2BIG")
            if self._domain_memory(c.domid) + len(path) + len(token) >= self.quota.memory:
                raise XenstoreError("ENOMEM")
        watch = self._add_watch(c, path, token, relative_base)
        self._after_reply.append(lambda: self._queue_event(c, watch.event_path(watch.path), token))
        return _OK

    def _op_unwatch(self, req: _Request, msg: Message) -> bytes:
        args = _strings(msg.payload)
        if len(args) != 2:
            raise XenstoreError("EINVAL")
        path = canonicalize(decode(args[0]), req.conn.home)
        watch = self._watches.remove(req.conn.conn, path, args[1])
        if watch is None:
            raise XenstoreError("ENOENT")
        self._forget_watch(req.conn, watch)
        return _OK

    def _op_transaction_start(self, req: _Request, msg: Message) -> bytes:
        c = req.conn
        if req.tx is not None:
            raise XenstoreError("EBUSY", "no nested transactions")
        if req.unprivileged and len(c.transactions) > self.quota.transactions:
            raise XenstoreError("ENOSPC")
        tx_id = c.next_tx_id
        while tx_id == 0 or tx_id in c.transactions:
            tx_id = (tx_id + 1) & 0xFFFFFFFF
        c.next_tx_id = (tx_id + 1) & 0xFFFFFFFF
        if tx_id >= self._tx_saved.get(c.domid, 1):
            self._tx_unsaved = True
        c.transactions[tx_id] = Transaction(tx_id, self._store.next_generation())
        return str(tx_id).encode() + b"\0"

    def _op_transaction_end(self, req: _Request, msg: Message) -> bytes:
        arg = _onearg(msg.payload)
        if arg not in ("T", "F"):
            raise XenstoreError("EINVAL")
        tx = req.tx
        if tx is None:
            raise XenstoreError("ENOENT")
        del req.conn.transactions[tx.id]
        if arg == "F":
            return _OK
        if tx.failed:
            raise XenstoreError("ENOMEM", "a request in the transaction failed half-way")
        check_quota = tx.node_created and req.unprivileged
        for domid, delta in tx.entry_delta.items():
            # C's transaction_fix_domains: every domain whose node count the commit
            # changes must still exist, or it would own nodes a later namesake inherits.
            if self._find_or_alloc_existing_domain(domid) is None:
                raise XenstoreError("ENOMEM", f"domain {domid} owning nodes of the transaction is gone")
            if check_quota and domid != PRIVILEGED_DOMID and \
                    max(0, self._store.entries[domid] + delta) >= self.quota.nodes:
                raise XenstoreError("ENOSPC", "node quota")
        if tx.conflicts_with(self._store):
            raise XenstoreError("EAGAIN")
        for path, accessed in tx.modified_nodes():
            if accessed.node is not None:
                self._adjust_perms(accessed.node)      # against when it was written, before its new generation
                accessed.node.generation = self._store.next_generation()
                self._store.put(accessed.node)
            elif accessed.generation is not None:
                self._store.remove(path)
            if accessed.fire_watch:
                self._fire_now(path, None, accessed.watch_exact, accessed.original_perms)
        return _OK

    def _op_introduce(self, req: _Request, msg: Message) -> bytes:
        args = _strings(msg.payload)
        if len(args) < 3:
            raise XenstoreError("EINVAL")
        domid, port = _parse_u32(args[0]), _parse_u32(args[2])
        gfn = int(args[1]) if _SIGNED_DECIMAL.fullmatch(args[1]) else None
        # C takes atoi's word for it; xdom refuses what cannot be a guest's ring.
        if domid is None or port is None or gfn is None or port == 0 or \
                not PRIVILEGED_DOMID < domid < DOMID_FIRST_RESERVED:
            raise XenstoreError("EINVAL")
        domain = self._find_or_alloc_domain(domid)       # introducing a domain makes it exist (C too)
        again = domain.introduced
        domain.introduced, domain.gfn, domain.port = True, gfn, port
        self._changed_domains.add(domid)
        if again:
            # C's domain_conn_reset: the domain starts over on its ring.
            for c in self._conns.values():
                if c.domid == domid:
                    self._drop_watches(c)
                    c.transactions.clear()
        self._effects.append(Introduced(domid, gfn, port))
        if not again:
            self._fire_now(INTRODUCE_DOMAIN, None, True, None)
        return _OK

    def _onearg_domain(self, msg: Message) -> _Domain:
        """C's ``onearg_domain``: an introduced domain other than 0, else EINVAL/ENOENT."""
        domid = _parse_u32(_onearg(msg.payload))
        if not domid:
            raise XenstoreError("EINVAL")
        domain = self._introduced(domid)
        if domain is None:
            raise XenstoreError("ENOENT")
        return domain

    def _op_release(self, req: _Request, msg: Message) -> bytes:
        """The reply goes first, then the removal's watch events and @releaseDomain: what C
        does in the usual case, where its main loop holds the dying connection until the
        request is answered."""
        domid = self._onearg_domain(msg).domid
        self._after_reply.append(lambda: self._destroy_domain(domid, dead=False))
        return _OK

    def _op_resume(self, req: _Request, msg: Message) -> bytes:
        self._onearg_domain(msg)    # no shutdown tracking here: nothing to re-arm
        return _OK

    def _op_set_target(self, req: _Request, msg: Message) -> bytes:
        args = _strings(msg.payload)
        if len(args) < 2:
            raise XenstoreError("EINVAL")
        domid, target = _parse_u32(args[0]), _parse_u32(args[1])
        if domid is None or target is None:
            raise XenstoreError("EINVAL")
        domain = self._introduced(domid)
        if domain is None or self._introduced(target) is None:
            raise XenstoreError("ENOENT")
        domain.target = target
        self._changed_domains.add(domid)
        return _OK

    def _op_get_domain_path(self, req: _Request, msg: Message) -> bytes:
        domid = _parse_u32(_onearg(msg.payload))
        if domid is None:
            raise XenstoreError("EINVAL")
        return encode(domain_path(domid)) + b"\0"

    def _op_is_domain_introduced(self, req: _Request, msg: Message) -> bytes:
        domid = _parse_u32(_onearg(msg.payload))
        if domid is None:
            raise XenstoreError("EINVAL")
        return b"T\0" if domid == DOMID_SELF or self._introduced(domid) else b"F\0"

    def _op_reset_watches(self, req: _Request, msg: Message) -> bytes:
        self._drop_watches(req.conn)
        req.conn.transactions.clear()
        return _OK

    def _op_control(self, req: _Request, msg: Message) -> bytes:
        """A small subset of C's CONTROL commands: check, help, log, print, quota, quota-soft."""
        cut = msg.payload.find(b"\0")
        if cut < 0:
            raise XenstoreError("EINVAL")
        command = decode(msg.payload[:cut])
        args = [decode(a) for a in _strings(msg.payload)[1:]]
        if command == "check":
            if args:
                raise XenstoreError("EINVAL")
            for problem in self.check():
                log.error("xenstored check: %s", problem)
            return _OK
        if command in ("log", "print"):
            if len(args) != 1 or (command == "log" and args[0] not in ("on", "off")):
                raise XenstoreError("EINVAL")
            if command == "print":
                log.info("control: %s", args[0])
            return _OK
        if command == "help":
            if args:
                raise XenstoreError("EINVAL")
            return (b"check\t\nlog\ton|off\nprint\t<string>\nquota\t[set <name> <val>|<domid>]\n"
                    b"quota-soft\t[set <name> <val>]\nhelp\t\n") + b"\0"
        if command in ("quota", "quota-soft"):
            return self._control_quota(args, soft=command == "quota-soft")
        raise XenstoreError("EINVAL")

    def _control_quota(self, args: list[str], soft: bool) -> bytes:
        table = ((("memory", "memory_soft", "Total Xenstore memory per domain (warning level)"),) if soft
                 else Quota.control_table())
        if not args:
            lines = "".join(f"{name:<17}: {getattr(self.quota, attr):8d} {descr}\n" for name, attr, descr in table)
            return f"Quota settings:\n{lines}".encode() + b"\0"
        if args[0] == "set":
            value = _parse_u32(args[2]) if len(args) == 3 else None
            attr = next((a for name, a, _ in table if len(args) == 3 and name == args[1]), None)
            if attr is None or not value:
                raise XenstoreError("EINVAL")
            self.quota = replace(self.quota, **{attr: value})
            return _OK
        domid = _parse_u32(args[0]) if len(args) == 1 and not soft else None
        if domid is None:
            raise XenstoreError("EINVAL")
        if domid not in self._domains:
            raise XenstoreError("ENOENT")       # (C) only domains xenstored knows
        transactions = sum(len(c.transactions) for c in self._conns.values() if c.domid == domid)
        rows = (("nodes", self._store.entries[domid]), ("watches", self._watch_count[domid]),
                ("transactions", transactions), ("outstanding", 0), ("memory", self._domain_memory(domid)))
        text = f"Domain {domid}:\n" + "".join(f"{name:<16}: {value:8d}\n" for name, value in rows)
        return text.encode() + b"\0"


# C's wire_funcs[]: handler and flags per request type; anything else is ENOSYS.
_OPS: Final[dict[int, _Op]] = {
    XsType.XS_CONTROL: _Op(XenstoreCore._op_control, privileged_only=True),
    XsType.XS_DIRECTORY: _Op(XenstoreCore._op_directory),
    XsType.XS_READ: _Op(XenstoreCore._op_read),
    XsType.XS_GET_PERMS: _Op(XenstoreCore._op_get_perms),
    XsType.XS_WATCH: _Op(XenstoreCore._op_watch, ignores_transaction=True),
    XsType.XS_UNWATCH: _Op(XenstoreCore._op_unwatch, ignores_transaction=True),
    XsType.XS_TRANSACTION_START: _Op(XenstoreCore._op_transaction_start),
    XsType.XS_TRANSACTION_END: _Op(XenstoreCore._op_transaction_end),
    XsType.XS_INTRODUCE: _Op(XenstoreCore._op_introduce, privileged_only=True),
    XsType.XS_RELEASE: _Op(XenstoreCore._op_release, privileged_only=True),
    XsType.XS_GET_DOMAIN_PATH: _Op(XenstoreCore._op_get_domain_path),
    XsType.XS_WRITE: _Op(XenstoreCore._op_write),
    XsType.XS_MKDIR: _Op(XenstoreCore._op_mkdir),
    XsType.XS_RM: _Op(XenstoreCore._op_rm),
    XsType.XS_SET_PERMS: _Op(XenstoreCore._op_set_perms),
    XsType.XS_IS_DOMAIN_INTRODUCED: _Op(XenstoreCore._op_is_domain_introduced, privileged_only=True),
    XsType.XS_RESUME: _Op(XenstoreCore._op_resume, privileged_only=True),
    XsType.XS_SET_TARGET: _Op(XenstoreCore._op_set_target, privileged_only=True),
    XsType.XS_RESET_WATCHES: _Op(XenstoreCore._op_reset_watches),
    XsType.XS_DIRECTORY_PART: _Op(XenstoreCore._op_directory_part),
}
