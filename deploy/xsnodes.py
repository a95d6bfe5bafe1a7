"""The xenstore nodes a toolstack writes for a domain: libxl's layout, so Xen users and tools find their way.

``libxl__domain_make`` and ``libxl__build_post`` (tools/libs/light) give each
domain a home, ``/local/domain/<domid>``, that **dom0 owns and the domain may
only read**, holding ``name``, ``domid``, ``memory/{static-max,target}`` and the
(read-only) ``device`` and ``control`` directories; and a few nodes that **the
domain owns**: ``control/shutdown`` (where the toolstack asks for a poweroff
and the guest acknowledges), ``control/feature-poweroff``, ``data``,
``drivers``, ``feature``, ``attr`` and ``error``.

Why not let the domain own its whole home: a guest could then rename itself
(``xl`` and our ``ps`` trust ``name``), and xenstored removes every node a
domain owns when it dies, so its home would vanish with it; a dom0-owned home
survives a restart, and only the domain's own nodes are written again.

Domain 0 gets ``/local/domain/0/name = Domain-0`` and ``domid = 0``, as Xen's
``xen-init-dom0`` writes them.
"""

from __future__ import annotations

from xdom.domains.xenstore import XenstoreClient

__all__ = ["DOMAIN_OWNED", "domain_path", "write_dom0_nodes", "write_domain_nodes"]

# Nodes the domain owns (libxl's rwperm), relative to its home.
DOMAIN_OWNED = ("control/shutdown", "control/feature-poweroff", "data", "drivers", "feature", "attr", "error")
# Directories dom0 owns and the domain reads (libxl's roperm), besides the home itself.
DOM0_OWNED = ("device", "control", "memory")


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def write_dom0_nodes(xs: XenstoreClient) -> None:
    xs.write("/local/domain/0/name", "Domain-0")
    xs.write("/local/domain/0/domid", "0")


def write_domain_nodes(xs: XenstoreClient, domid: int, name: str, memory_kib: int) -> None:
    """Write (or write again) domain ``domid``'s nodes in one transaction; values the domain wrote stay.

    Raises XenstoreError; ENOENT when xenstored takes ``domid`` for a dead
    domain (until it is introduced again).
    """
    home = domain_path(domid)
    ro, rw = ["n0", f"r{domid}"], [f"n{domid}"]

    def body(tx: int) -> None:
        for path in (home, *(f"{home}/{d}" for d in DOM0_OWNED)):
            xs.mkdir(path, tx)
            xs.set_perms(path, ro, tx)
        xs.write(f"{home}/name", name, tx)          # a new node inherits its parent's permissions
        xs.write(f"{home}/domid", str(domid), tx)
        xs.write(f"{home}/memory/static-max", str(memory_kib), tx)
        xs.write(f"{home}/memory/target", str(memory_kib), tx)
        for sub in DOMAIN_OWNED:
            xs.mkdir(f"{home}/{sub}", tx)
            xs.set_perms(f"{home}/{sub}", rw, tx)
    xs.transaction(body)
