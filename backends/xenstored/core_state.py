"""The core's state, and what every request goes through: C's rules for looking up, creating and
removing nodes, the quota checks before a write, watch events, and a domain's removal.

``CoreState`` is the base of the core: ``RequestHandlers`` (requests.py)
builds one handler per request type on these operations, and
``XenstoreCore`` (core.py) adds the shell's API.  The rules are those of
core.py's docstring; what is here:

* Lookups answer C's errno: a missing or forbidden node is ENOENT/EACCES
  only if the nearest existing ancestor grants the access asked, else
  EACCES, so a stranger learns nothing about what exists where it may not
  look (C's ``get_node`` and ``ask_parents``).
* Quotas are checked before anything changes; a failed write inside a
  transaction poisons it, as in C, which cannot undo half a request.
* A change fires watches at once outside a transaction, at commit inside;
  a watcher hears of a node only if it may read it (or its parent, or the
  node before the change), and an event still queued is not queued twice.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Final

from xdom.domains.abi.xs_wire import HEADER_SIZE, XENSTORE_PAYLOAD_MAX, Message, XenstoreError, XsType

from .domains import PRIVILEGED_DOMID, DomainExists, DomainTable, Effect, Released
from .paths import (
    INTRODUCE_DOMAIN,
    RELEASE_DOMAIN,
    ROOT,
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
from .permissions import DEFAULT_PERMS, Access, Accessor, Perm, Perms, access_for, without_domain
from .quota import Quota, record_size
from .store import GlobalView, Node, NodeView, Store
from .transactions import Transaction, TransactionView
from .watches import ConnId, Watch, WatchRegistry

log = logging.getLogger(__name__)

PATH_CACHE_SIZE: Final = 256     # canonical paths remembered per connection


@dataclass(slots=True)
class Connection:
    """The core's side of one connection (C's ``struct connection``): for which domain it speaks,
    its open transactions and the events queued for it.  (The shell's side is transport.py's.)"""

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
class Request:
    """One request being handled: who asks, and through which view of the tree."""

    conn: Connection
    who: Accessor
    view: NodeView
    tx: Transaction | None

    @property
    def unprivileged(self) -> bool:
        return not self.who.privileged


class CoreState:
    """The store, domains, connections, watches and quotas, and the operations requests share."""

    def __init__(self, quota: Quota | None = None,
                 domain_exists: DomainExists | None = None) -> None:
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
        self._store = Store.initial()
        # Records and nodes share the store's generation counter (the store is replaced on restore).
        self._domains = DomainTable(lambda: self._store.next_generation(), domain_exists)
        self._adjust_perms = self._domains.adjust_perms
        self._conns: dict[ConnId, Connection] = {}
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
        self._changed_watches: set[int] = set()        # domids whose kept watches changed
        self._changed_special = False
        self._changed_tx = False
        self._tracking = True
        self._event_conns: dict[ConnId, Connection] = {}    # connections with events since take_output
        self._backlogged: dict[ConnId, None] = {}            # backlogged since take_backlogged
        self._global_view = GlobalView(self._store, self._adjust_perms)
        self.internal_errors = 0      # requests answered EIO because of a bug here (tests expect 0)

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

    # ---- the request's view of the tree ----------------------------------------------------------

    def _accessor(self, c: Connection) -> Accessor:
        domain = self._domains.get(c.domid)
        return Accessor(c.domid, c.privileged, domain.target if domain is not None else None)

    def _request(self, c: Connection, tx: Transaction | None) -> Request:
        who = self._accessor(c)
        view: NodeView
        if tx is None:
            view = self._global_view
            if view._store is not self._store:        # restored
                view = self._global_view = GlobalView(self._store, self._adjust_perms)
        else:
            limit = None if who.privileged else self.quota.transaction_nodes
            view = TransactionView(tx, self._store, self._adjust_perms, limit)
        return Request(c, who, view, tx)

    def _system_request(self) -> Request:
        """xenstored acting on its own (C passes conn == NULL): privileged, global."""
        system = Connection(None, PRIVILEGED_DOMID, 0)
        return Request(system, Accessor(PRIVILEGED_DOMID, True), GlobalView(self._store, self._adjust_perms),
                       None)

    # ---- node lookup with C's permission and errno rules ---------------------------------------

    def _path_arg(self, req: Request, raw: str | None) -> str:
        """A request's path argument made canonical; EINVAL if missing or not a valid node path."""
        if raw is None:
            raise XenstoreError("EINVAL")
        path = canonicalize(raw, req.conn.home)
        if not is_valid_node_path(path, self.quota.path_max):
            raise XenstoreError("EINVAL")
        return path

    def _canonical_path(self, req: Request, key: bytes, raw: bytes) -> str:
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

    def _onearg_path(self, req: Request, payload: bytes) -> str:
        """The single argument (C's onearg) as a canonical node path; EINVAL if it is none."""
        if not payload or payload.find(b"\0") != len(payload) - 1:
            raise XenstoreError("EINVAL")
        return self._canonical_path(req, payload, payload[:-1])

    def _get_node(self, req: Request, path: str, need: Access) -> Node:
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

    def _ancestor_access(self, req: Request, path: str) -> Access:
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

    def _check_node_write(self, req: Request, node_path: str, perms: Perms, value_len: int, children_len: int,
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

    def _fire(self, req: Request, path: str, node: Node | None, exact: bool, old_perms: Perms | None) -> None:
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

    def _may_see(self, c: Connection, path: str, node: Node | None, old_perms: Perms | None) -> bool:
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

    def _queue_event(self, c: Connection, path: str, token: bytes) -> None:
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

    def _add_watch(self, c: Connection, path: str, token: bytes, relative_base: str | None) -> Watch:
        watch = self._watches.add(c.conn, path, token, relative_base)
        if c.domid != PRIVILEGED_DOMID:
            self._changed_watches.add(c.domid)
        self._watch_count[c.domid] += 1
        self._watch_memory[c.domid] += watch.memory()
        return watch

    def _forget_watch(self, c: Connection, watch: Watch) -> None:
        if c.domid != PRIVILEGED_DOMID:
            self._changed_watches.add(c.domid)
        self._watch_count[c.domid] -= 1
        self._watch_memory[c.domid] -= watch.memory()
        if self._watch_count[c.domid] <= 0:
            del self._watch_count[c.domid]
            self._watch_memory.pop(c.domid, None)

    def _drop_watches(self, c: Connection) -> None:
        for watch in self._watches.remove_all(c.conn):
            self._forget_watch(c, watch)

    # ---- a domain's end ----------------------------------------------------------------------------

    def _destroy_domain(self, domid: int, dead: bool) -> None:
        """RELEASE or death (C's ``destroy_conn`` + ``destroy_domain``).

        The domain's connections lose their watches and transactions and
        speak for no one any more; every node it owns goes, subtree and all,
        firing watches; it leaves the special-watch permissions; then
        @releaseDomain fires.
        """
        domain = self._domains.remove(domid)
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

    def _create_node(self, req: Request, path: str, value: bytes) -> Node:
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

    def _rm_node(self, req: Request, path: str) -> None:
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

