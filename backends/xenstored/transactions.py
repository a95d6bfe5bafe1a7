"""Transactions: a private view of the nodes a transaction touched, checked at commit.

Theory of operation (Xen 4.17 ``xenstored_transaction.c``, kept as is):

* Nothing is copied at TRANSACTION_START; it only takes a generation number.
* The first time a transaction looks at a node (any lookup: the node a
  request names, the parents a permission check or a create walks through,
  the children an RM visits) the transaction records the node's generation
  count, or "absent", and keeps its own copy.  Later lookups see that copy,
  so the transaction reads a stable snapshot of everything it touched.
* Writes and deletes change only the copy, mark it modified, and take the
  next global generation; watch events are queued on the accessed node.
* TRANSACTION_END ``T`` fails with EAGAIN when any node recorded by a *read*
  first access has a different generation in the global store now (a node
  deleted since counts as changed, a node created since too).  Because every
  request reads a node before changing it, that covers everything touched.
* Commit then writes the modified copies (each with a fresh generation) and
  deletes what the transaction deleted, in first-access order, firing the
  queued watch events as it goes.
* A request that failed half-way inside a transaction poisons it: C cannot
  undo the partial change, so commit answers ENOMEM.

Worked example (G = global generation, g(X) = generation of X):
    I: g(A)=1, g(B)=2, G=3.  Start T1: G=4.  T1 reads A: records g(A)=1.
    Someone writes A: g(A)=5.  T1 writes B: T1's copy of B gets 6.
    End T1: recorded 1 != g(A)=5  => EAGAIN, nothing of T1 is visible.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from xdom.domains.abi.xs_wire import XenstoreError

from .permissions import Perms
from .store import Node, PermsAdjuster, Store


@dataclass(slots=True)
class AccessedNode:
    """What a transaction knows about one node."""

    generation: int | None          # global generation at first access; None: it did not exist
    check_generation: bool          # first access was a read: verify at commit
    node: Node | None               # the transaction's copy; None: absent in this transaction
    original_perms: Perms | None    # perms at first access, for watch permission checks at commit
    modified: bool = False
    fire_watch: bool = False
    watch_exact: bool = True


class Transaction:
    """One open transaction of one connection."""

    def __init__(self, tx_id: int, start_generation: int) -> None:
        self.id = tx_id
        self.generation = start_generation
        self.accessed: dict[str, AccessedNode] = {}
        self.failed = False
        self.node_created = False
        # Nodes owned, per domain, that committing would add (or remove): for the quota check.
        self.entry_delta: Counter[int] = Counter()

    def queue_watch(self, path: str, exact: bool) -> None:
        """Remember to fire watches for ``path`` at commit; a non-exact event wins over an exact one."""
        accessed = self.accessed.get(path)
        if accessed is None:
            self.failed = True
            return
        if not accessed.fire_watch:
            accessed.fire_watch = True
            accessed.watch_exact = exact
        elif not exact:
            accessed.watch_exact = False

    def conflicts_with(self, store: Store) -> bool:
        """True if a node this transaction read first has changed in the store since."""
        for path, accessed in self.accessed.items():
            if accessed.check_generation:
                current = store.get(path)
                if accessed.generation != (current.generation if current is not None else None):
                    return True
        return False

    def modified_nodes(self) -> list[tuple[str, AccessedNode]]:
        """What commit writes or deletes, in first-access order."""
        return [(path, a) for path, a in self.accessed.items() if a.modified]


class TransactionView:
    """The tree as one transaction sees it.

    ``node_limit`` is the transaction-nodes quota (None: unlimited, for
    privileged connections); touching one node more fails the transaction
    with ENOSPC, as C's ``access_node`` does.
    """

    in_transaction = True

    def __init__(self, transaction: Transaction, store: Store, adjust: PermsAdjuster,
                 node_limit: int | None) -> None:
        self.transaction = transaction
        self._store = store
        self._adjust = adjust
        self._node_limit = node_limit

    def _first_access(self, path: str, *, is_read: bool) -> AccessedNode:
        tx = self.transaction
        if self._node_limit is not None and len(tx.accessed) >= self._node_limit:
            tx.failed = True
            raise XenstoreError("ENOSPC", "transaction touches too many nodes")
        node = self._store.get(path)
        if node is not None:
            self._adjust(node)
        accessed = AccessedNode(
            generation=node.generation if node is not None else None,
            check_generation=is_read,
            node=node.copy() if node is not None and is_read else None,
            original_perms=node.perms if node is not None else None)
        tx.accessed[path] = accessed
        return accessed

    def read(self, path: str) -> Node | None:
        accessed = self.transaction.accessed.get(path)
        if accessed is None:
            accessed = self._first_access(path, is_read=True)
        return accessed.node

    def write(self, node: Node) -> None:
        accessed = self.transaction.accessed.get(node.path)
        if accessed is None:
            accessed = self._first_access(node.path, is_read=False)
        node.generation = self._store.next_generation()
        accessed.node = node
        accessed.modified = True

    def delete(self, path: str) -> None:
        accessed = self.transaction.accessed.get(path)
        if accessed is None:
            accessed = self._first_access(path, is_read=False)
        self._store.next_generation()
        accessed.node = None
        accessed.modified = True
