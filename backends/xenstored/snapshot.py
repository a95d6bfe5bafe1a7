"""The core's saved state: the format of ``XenstoreCore.dump`` and of its journal records, both ways.

Why a module of its own: the format is a contract with every store an
earlier xdom left on disk, so it is written down, written and read in one
place; the core decides *what* to save and when.

Format (msgpack, ``DUMP_VERSION`` 1):

* dump: ``{"format": DUMP_FORMAT, "version", "generation", "nodes",
  "domains", "special_perms", "watches", "transactions"}``, nodes each
  parent before its children;
* node: ``[path, value, perms, generation, children]``, perms
  ``[[domid, access, ignored], ...]``, children in their order;
* domain: ``[domid, generation, introduced, gfn, port, target,
  incarnation]`` (dumps made before incarnations have six fields);
* watches: ``[[domid, path, token, relative_base], ...]`` in registration
  order; in a journal record, per domid: ``[[domid, [[path, token, base],
  ...]], ...]`` (an empty list: none left);
* transactions: ``[[domid, an id above every one it gave out], ...]``;
* journal record: ``{"g": generation}`` plus, for what changed, ``"n"``
  (nodes, or ``[path]`` for a node removed), ``"d"`` (``[domid, domain or
  None]``), ``"w"``, ``"s"`` (special perms) and ``"t"`` (transactions),
  each replacing what the dump or an earlier record said.

Reading checks what it can (paths, permissions, the tree's invariants,
domid and id ranges) and raises ValueError for anything else it finds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from xdom.domains.abi.xs_wire import XENSTORE_ABS_PATH_MAX

from .domains import DOMID_FIRST_RESERVED, Domain
from .paths import INTRODUCE_DOMAIN, RELEASE_DOMAIN, is_valid_node_path
from .permissions import Access, Perm, Perms
from .store import Node, Store

DUMP_FORMAT: Final = "xdom-xenstored-core"
DUMP_VERSION: Final = 1

KeptWatch = tuple[str, bytes, str | None]       # path, token, relative base

_pack = msgpack.Packer(use_bin_type=True).pack      # one packer, reset after each record


# ---- writing ------------------------------------------------------------------------------------

def perms_out(perms: Perms) -> list[list[Any]]:
    return [[p.domid, int(p.access), p.ignored] for p in perms]


def node_out(node: Node) -> list[Any]:
    return [node.path, node.value, perms_out(node.perms), node.generation, list(node.children)]


def domain_out(d: Domain) -> list[Any]:
    return [d.domid, d.generation, d.introduced, d.gfn, d.port, d.target, d.incarnation]


def pack_dump(generation: int, nodes: Iterable[Node], domains: Iterable[Domain], special_perms: dict[str, Perms],
              watches: list[list[Any]], transactions: list[list[int]]) -> bytes:
    """A dump; ``watches`` as ``[domid, path, token, base]`` rows."""
    state = {
        "format": DUMP_FORMAT,
        "version": DUMP_VERSION,
        "generation": generation,
        "nodes": [node_out(node) for node in nodes],
        "domains": [domain_out(d) for d in domains],
        "special_perms": {name: perms_out(p) for name, p in special_perms.items()},
        "watches": watches,
        "transactions": transactions,
    }
    return msgpack.packb(state, use_bin_type=True)


def pack_changes(generation: int, nodes: list[Node | str] | None = None,
                 domains: list[tuple[int, Domain | None]] | None = None,
                 watches: list[list[Any]] | None = None, special_perms: dict[str, Perms] | None = None,
                 transactions: list[list[int]] | None = None) -> bytes:
    """A journal record: the generation counter and each table given (a path alone: node removed)."""
    record: dict[str, Any] = {"g": generation}
    if nodes is not None:
        record["n"] = [node_out(n) if isinstance(n, Node) else [n] for n in nodes]
    if domains is not None:
        record["d"] = [[domid, domain_out(d) if d is not None else None] for domid, d in domains]
    if watches is not None:
        record["w"] = watches
    if special_perms is not None:
        record["s"] = {name: perms_out(p) for name, p in special_perms.items()}
    if transactions is not None:
        record["t"] = transactions
    return _pack(record)


# ---- reading ------------------------------------------------------------------------------------

@dataclass(slots=True)
class SavedState:
    """A dump with its journal replayed, checked and ready to take over."""

    store: Store
    domains: list[Domain] = field(default_factory=list)
    special_perms: dict[str, Perms] = field(default_factory=dict)
    watches: dict[int, list[KeptWatch]] = field(default_factory=dict)     # per domid, in order
    transactions: dict[int, int] = field(default_factory=dict)            # domid -> first id to give out


def _perms_in(raw: list[list[Any]]) -> Perms:
    perms = tuple(Perm(int(d), Access(int(a) & 3), bool(i)) for d, a, i in raw)
    if not perms:
        raise ValueError("node without permissions")
    return perms


def _node_in(row: list[Any]) -> Node:
    path, value, perms, generation, children = row
    if not isinstance(path, str) or not is_valid_node_path(path, XENSTORE_ABS_PATH_MAX):
        raise ValueError(f"bad node path {path!r}")
    return Node(path, bytes(value), _perms_in(perms), int(generation), {str(c): None for c in children})


def _domain_in(row: list[Any]) -> Domain:
    domid, generation, introduced, gfn, port, target = row[:6]
    incarnation = row[6] if len(row) > 6 else None      # dumps made before incarnations
    return Domain(int(domid), int(generation), bool(introduced), int(gfn), int(port),
                  None if target is None else int(target), None if incarnation is None else int(incarnation))


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def load(data: bytes, journal: Iterable[bytes | dict[str, Any]] = ()) -> SavedState:
    """Read a dump and replay the journal records made after it, in order (as given, or
    unpacked).  Raises ValueError, TypeError, KeyError or msgpack's errors on what it cannot read."""
    state = _unpack(data)
    if not isinstance(state, dict) or state.get("format") != DUMP_FORMAT:
        raise ValueError("not a xenstored core dump")
    if state.get("version") != DUMP_VERSION:
        raise ValueError(f"unsupported dump version {state.get('version')!r}")
    nodes = {node.path: node for node in map(_node_in, state["nodes"])}
    generation = int(state["generation"])
    domains = {int(row[0]): row for row in state["domains"]}
    special = dict(state["special_perms"])
    kept: dict[int, list[list[Any]]] = {}
    for domid, path, token, base in state["watches"]:
        kept.setdefault(int(domid), []).append([path, token, base])
    tx_table = state.get("transactions", [])
    for raw in journal:
        record = raw if isinstance(raw, dict) else _unpack(raw)
        if not isinstance(record, dict):
            raise ValueError("journal record is not a map")
        generation = max(generation, int(record["g"]))
        for row in record.get("n", ()):
            if len(row) == 1:
                nodes.pop(row[0], None)
            else:
                node = _node_in(row)
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
    saved = SavedState(store, [_domain_in(row) for row in domains.values()])
    for name in (INTRODUCE_DOMAIN, RELEASE_DOMAIN):
        if name in special:
            saved.special_perms[name] = _perms_in(special[name])
    for domid, watches in kept.items():
        saved.watches[domid] = [(str(path), bytes(token), None if base is None else str(base))
                                for path, token, base in watches]
    for domid, next_id in tx_table:
        if not 0 <= int(domid) < DOMID_FIRST_RESERVED or not 1 <= int(next_id) <= 0xFFFFFFFF:
            raise ValueError(f"transaction ids {domid!r}: {next_id!r}")
        saved.transactions[int(domid)] = int(next_id)
    return saved
