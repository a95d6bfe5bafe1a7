"""The node tree: values, permissions, children, generation counts, accounting.

Rules (Xen 4.17 ``xenstored_core.c`` and the theory in ``xenstored_transaction.c``):

* Every node but the root has a parent that lists it; children keep the
  order in which they were added (DIRECTORY shows that order).
* One global generation counter.  Each write or delete of a node, inside a
  transaction or not, and each TRANSACTION_START takes the next value; a
  written node records it.  Commit gives each committed node a fresh one.
  Generation counts are what transaction conflict checks compare.
* Every ``put``/``remove`` notes the path in ``changed`` (what a journal
  must write since the last time it looked; the owner empties it).
* Accounting follows ownership: the store keeps, per owning domain, how many
  nodes it owns and their size in bytes (path + record), updated on every
  ``put``/``remove``, so the numbers can never drift from the tree.
* ``Store`` does no permission or quota checks: that is the caller's job,
  *before* it changes anything, so a refused request leaves no trace.
* A ``NodeView`` is how request handlers see the tree: ``GlobalView`` here,
  ``TransactionView`` in transactions.py.  Nodes a view hands out belong to
  that view; a handler may change one in place only right before writing it
  back through the same view.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Protocol

from .paths import ROOT, basename, parent_of
from .permissions import DEFAULT_PERMS, Perms
from .quota import record_size


class Node:
    """One node; ``children`` is an insertion-ordered set of leaf names."""

    __slots__ = ("path", "value", "perms", "generation", "children", "children_len", "_listing")

    def __init__(self, path: str, value: bytes = b"", perms: Perms = DEFAULT_PERMS,
                 generation: int = 0, children: dict[str, None] | None = None) -> None:
        self.path = path
        self.value = value
        self.perms = perms
        self.generation = generation
        self.children: dict[str, None] = children if children is not None else {}
        self.children_len = sum(len(c) + 1 for c in self.children)
        self._listing: bytes | None = None      # children_bytes(), until the children change

    @property
    def owner(self) -> int:
        return self.perms[0].domid

    def copy(self) -> Node:
        return Node(self.path, self.value, self.perms, self.generation, dict(self.children))

    def add_child(self, name: str) -> None:
        if name not in self.children:
            self.children[name] = None
            self.children_len += len(name) + 1
            self._listing = None

    def remove_child(self, name: str) -> None:
        if name in self.children:
            del self.children[name]
            self.children_len -= len(name) + 1
            self._listing = None

    def children_bytes(self) -> bytes:
        """The children as C stores them: each name NUL-terminated.  (``children`` changes only
        through add_child/remove_child, which forget the listing made here.)"""
        listing = self._listing
        if listing is None:
            listing = self._listing = b"".join(c.encode("latin-1") + b"\0" for c in self.children)
        return listing

    def record_size(self) -> int:
        return record_size(len(self.perms), len(self.value), self.children_len)

    def memory(self) -> int:
        """Bytes charged to the owner: the key (path) plus the record, as C's do_tdb_write."""
        return len(self.path) + self.record_size()

    def __repr__(self) -> str:
        return (f"Node({self.path!r}, value={self.value[:32]!r}, perms={[p.to_string() for p in self.perms]}, "
                f"gen={self.generation}, children={list(self.children)[:8]})")


class Store:
    """All committed nodes, by path, with per-owner node counts and memory."""

    def __init__(self) -> None:
        self._nodes: dict[str, Node] = {}
        self._charged: dict[str, tuple[int, int]] = {}   # path -> (owner, bytes) as last charged
        self.generation = 0
        self.entries: Counter[int] = Counter()
        self.memory: Counter[int] = Counter()
        # Paths put or removed since the owner last took them (the journal of a persisted store).
        self.changed: dict[str, None] | None = {}      # None: not noted

    @classmethod
    def initial(cls) -> Store:
        """C's ``setup_structure``: ``/``, ``/tool``, ``/tool/xenstored``, all ``n0``, generations 1..3."""
        store = cls()
        for path, child in ((ROOT, "tool"), ("/tool", "xenstored"), ("/tool/xenstored", None)):
            node = Node(path, children={child: None} if child else None)
            node.generation = store.next_generation()
            store.put(node)
        return store

    def next_generation(self) -> int:
        self.generation += 1
        return self.generation

    def get(self, path: str) -> Node | None:
        return self._nodes.get(path)

    def __contains__(self, path: str) -> bool:
        return path in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self._nodes.values()))

    def put(self, node: Node) -> None:
        """Store ``node`` (new or replacing) and re-charge its owner."""
        self._uncharge(node.path)
        self._nodes[node.path] = node
        if self.changed is not None:
            self.changed[node.path] = None
        owner, size = node.owner, node.memory()
        self._charged[node.path] = (owner, size)
        self.entries[owner] += 1
        self.memory[owner] += size

    def remove(self, path: str) -> None:
        self._uncharge(path)
        self._nodes.pop(path, None)
        if self.changed is not None:
            self.changed[path] = None

    def recharge(self, node: Node) -> None:
        """Account for an in-place change that does not bump the generation (ownership handover)."""
        if self._nodes.get(node.path) is node:
            self.put(node)

    def _uncharge(self, path: str) -> None:
        charged = self._charged.pop(path, None)
        if charged is not None:
            owner, size = charged
            self.entries[owner] -= 1
            self.memory[owner] -= size
            if not self.entries[owner]:
                del self.entries[owner]
                self.memory.pop(owner, None)

    def charged_memory(self, path: str) -> tuple[int, int] | None:
        """(owner, bytes) currently charged for ``path``."""
        return self._charged.get(path)

    def check_invariants(self) -> list[str]:
        """Tree and accounting consistency; returns the problems found (empty when sound)."""
        problems = []
        if ROOT not in self._nodes:
            problems.append("no root")
        entries: Counter[int] = Counter()
        memory: Counter[int] = Counter()
        for path, node in self._nodes.items():
            if node.path != path:
                problems.append(f"{path}: stored under the wrong name {node.path}")
            if path != ROOT:
                parent = self._nodes.get(parent_of(path))
                if parent is None:
                    problems.append(f"{path}: parent missing")
                elif basename(path) not in parent.children:
                    problems.append(f"{path}: not listed by its parent")
            for child in node.children:
                if (f"/{child}" if path == ROOT else f"{path}/{child}") not in self._nodes:
                    problems.append(f"{path}: lists missing child {child}")
            if node.children_len != sum(len(c) + 1 for c in node.children):
                problems.append(f"{path}: children length out of date")
            entries[node.owner] += 1
            memory[node.owner] += node.memory()
        if entries != +self.entries:
            problems.append(f"node counts {dict(self.entries)} != {dict(entries)}")
        if memory != +self.memory:
            problems.append(f"memory {dict(self.memory)} != {dict(memory)}")
        return problems


class NodeView(Protocol):
    """How a request sees the tree: globally or through its transaction."""

    @property
    def in_transaction(self) -> bool: ...

    def read(self, path: str) -> Node | None: ...

    def write(self, node: Node) -> None: ...

    def delete(self, path: str) -> None: ...


PermsAdjuster = Callable[[Node], None]


class GlobalView:
    """Requests outside a transaction act on the store directly."""

    in_transaction = False

    def __init__(self, store: Store, adjust: PermsAdjuster) -> None:
        self._store = store
        self._adjust = adjust

    def read(self, path: str) -> Node | None:
        node = self._store.get(path)
        if node is not None:
            self._adjust(node)
        return node

    def write(self, node: Node) -> None:
        node.generation = self._store.next_generation()
        self._store.put(node)

    def delete(self, path: str) -> None:
        self._store.next_generation()
        self._store.remove(path)
