"""The layers, read from the source as it is imported: no import cycles; the broker uses only the ABI and the host system calls.

Every ``import`` of an xdom module (top-level or inside a function: both
are dependencies; ``if TYPE_CHECKING:`` blocks aside) is an arrow of the
graph.  The packages, from the bottom:

* ``xdom.domains.abi``: the Xen ABI and wire formats (ring.h, blkif.h,
  netif.h, grant_table.h, xs_wire.h, the hypercall frames), shared by the
  broker, the domains and the backends;
* host system-call wrappers (memfd frames, eventfd wake-ups, the grant
  table's OFD locks, fallocate), also shared;
* the broker, which imports only those two; the domains' code; the
  backends; deploy.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("broker", "domains", "backends", "deploy")

# What the broker may take from domains/: the ABI package, and the host system-call wrappers.
BROKER_MAY_IMPORT = ("xdom.domains.abi", "xdom.domains.hostsys")
# None today; a cycle that must stay for a while would be listed here, so that no new one appears.
KNOWN_CYCLES: set[frozenset[str]] = set()


def _modules() -> dict[str, str]:
    """Module name -> file, for every module of the four packages."""
    out = {}
    for pkg in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, pkg)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for fn in filenames:
                if not fn.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, fn), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(["xdom", *rel])] = os.path.join(dirpath, fn)
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    is_pkg = path.endswith("__init__.py")
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                found.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.add(sub if sub in modules else mod)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(g: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


def test_the_graph_sees_the_imports() -> None:
    g = graph()
    assert "xdom.domains.abi.grant_table" in g["xdom.broker.gnttab"]
    assert "xdom.domains.abi.xs_wire" in g["xdom.domains.abi.xs_ring"]          # relative, inside a package


def test_no_import_cycles() -> None:
    cycles = [frozenset(c) for c in _cycles(graph())]
    new = [sorted(c) for c in cycles if c not in KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in cycles]
    assert not gone, f"no longer cycles, delete them from KNOWN_CYCLES: {gone}"


def test_the_broker_imports_only_the_abi_and_the_system_calls_of_domains() -> None:
    allowed = BROKER_MAY_IMPORT
    bad = sorted((m, dep) for m, deps in graph().items() if m.startswith("xdom.broker")
                 for dep in deps if not dep.startswith("xdom.broker")
                 and not any(dep == a or dep.startswith(a + ".") for a in allowed))
    assert not bad, bad


def test_the_moved_wire_formats_are_imported_from_the_abi() -> None:
    # The transitional aliases are gone (domains/xs_wire.py and domains/nbd/device.py with the frontends'
    # xenbus rework, domains/wakeup.py with the supervisor split): nothing may import them again.
    gone = {"xdom.domains.xs_wire", "xdom.domains.nbd.device", "xdom.domains.wakeup"}
    assert not [m for m, deps in graph().items() if gone & set(deps)]


def test_frontends_do_not_import_the_exports() -> None:
    # The guest-side exports (the NBD server, vhost-user) drive a frontend through xdom.domains.blockdev.
    fronts, exports = ("xdom.domains.blkfront", "xdom.domains.netfront"), ("xdom.domains.nbd", "xdom.domains.vhost_user")
    bad = sorted((m, dep) for m, deps in graph().items() if m.startswith(fronts)
                 for dep in deps if dep.startswith(exports))
    assert not bad, bad


def test_nothing_of_the_abi_and_the_system_calls_imports_the_layers_above() -> None:
    low = ("xdom.domains.abi", "xdom.domains.hostsys")
    bad = sorted((m, dep) for m, deps in graph().items() if m.startswith(low)
                 for dep in deps if not dep.startswith(low))
    assert not bad, bad
