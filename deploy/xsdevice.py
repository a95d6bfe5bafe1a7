"""What the toolstack does the same way for every split device (vbd, vif): libxl's attach and detach.

A kind of device (``vbd.py``, ``vif.py``) says which nodes its backend and
frontend directories hold; how they are written is the same for every kind,
as in libxl, where ``libxl__device_disk_add`` and ``libxl__device_nic_add``
fill in their arrays and ``libxl__device_generic_add`` writes them.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from xdom.domains.xenbus import XenbusState, backend_path, frontend_path, read_state
from xdom.domains.xenstore import XenstoreClient, XenstoreError

__all__ = ["add_device", "ask_to_close", "backend_closed", "remove_device", "remove_nodes", "set_perms_under"]


#: How far below a device directory permissions are set again: the protocol's nodes are at most two
#: levels down (``queue-N/tx-ring-ref``) and a few dozen.  What a domain hangs deeper, or beyond this
#: many nodes, keeps its stale permissions -- the domain's own nodes, so only it is hindered -- and
#: the toolstack's work stays bounded however deep and wide a hostile domain builds (its quotas allow
#: about a thousand levels; walked recursively, that was a RecursionError in the supervisor).
PERMS_DEPTH = 4
PERMS_NODES = 1024


def set_perms_under(xs: XenstoreClient, tx: int, path: str, perms: list[str]) -> None:
    """``perms`` on ``path`` and the nodes below it, at most ``PERMS_DEPTH`` levels and ``PERMS_NODES``
    nodes (depth first).

    Either side of a device may have restarted under its old domid, and
    xenstored ignores a domain's permission entries on nodes older than its
    latest introduction until they are set again.  Outside a transaction
    (``tx`` 0) a node its owner removes meanwhile is passed over.
    """
    xs.set_perms(path, perms, tx)
    stack = [(path, 0)]
    done = 1
    while stack:
        node, depth = stack.pop()
        if depth >= PERMS_DEPTH:
            continue
        try:
            children = xs.directory(node, tx)
        except XenstoreError as e:
            if e.name != "ENOENT" or tx:
                raise
            continue
        for child in children:
            if done >= PERMS_NODES:
                return
            below = f"{node}/{child}"
            try:
                xs.set_perms(below, perms, tx)
            except XenstoreError as e:
                if e.name != "ENOENT" or tx:
                    raise
                continue
            done += 1
            stack.append((below, depth + 1))


#: Transactions tried before a device is written node by node: a live domain that writes its own nodes
#: faster than a transaction takes would make every commit conflict.
ATOMIC_TRIES = 4


def add_device(xs: XenstoreClient, kind: str, backend_domid: int, frontend_domid: int, devid: int,
               be_nodes: Mapping[str, str | int], fe_nodes: Mapping[str, str | int]) -> None:
    """Create a device's nodes (or write them again for a restarted end), in one transaction, as libxl does.

    The backend directory (``frontend`` and ``be_nodes``) is the backend
    domain's and the frontend may read it; the frontend directory
    (``backend`` and ``fe_nodes``) is the frontend's and the backend may read
    it.  A frontend directory that is there already (its ``state`` written)
    is left as it is: a live frontend keeps its nodes across a backend restart.

    The transaction reads and writes nodes of a live domain (the other end's
    directory, re-permissioned; a live backend's, written again), and that
    domain may write them as often as it likes: each of its writes makes the
    commit conflict, and one rewriting its ``state`` once a millisecond kept
    the device -- and with it the other end, a backend serving every guest --
    from ever being set up again.  After ``ATOMIC_TRIES`` conflicts the device
    is written piece by piece instead (:func:`_add_piecewise`), which no
    domain's writes can hold up.
    """
    be = backend_path(backend_domid, kind, frontend_domid, devid)
    fe = frontend_path(frontend_domid, kind, devid)
    layout = _Layout(kind, backend_domid, frontend_domid, be, fe, {"frontend": fe, **be_nodes},
                     {"backend": be, **fe_nodes})

    def body(tx: int) -> None:
        fe_exists = xs.exists(f"{fe}/state", tx)
        layout.make_parents(xs, tx)
        xs.mkdir(be, tx)
        for key, value in layout.be_values.items():
            xs.write(f"{be}/{key}", str(value), tx)
        set_perms_under(xs, tx, be, layout.be_perms)
        if not fe_exists:
            _make(xs, tx, fe, layout.fe_perms, layout.fe_values)
        # Either side may have restarted under its old domid; xenstored ignores its
        # permissions on nodes older than its new introduction until they are set again.
        set_perms_under(xs, tx, fe, layout.fe_perms)
    try:
        xs.transaction(body, retries=ATOMIC_TRIES)
    except XenstoreError as e:
        if e.name != "EAGAIN":
            raise
        _add_piecewise(xs, layout)


class _Layout:
    """A device's two directories, what goes in them and who may do what there."""

    def __init__(self, kind: str, backend_domid: int, frontend_domid: int, be: str, fe: str,
                 be_values: Mapping[str, str | int], fe_values: Mapping[str, str | int]) -> None:
        self.be, self.fe = be, fe
        self.be_values, self.fe_values = be_values, fe_values
        self.be_perms = [f"n{backend_domid}", f"r{frontend_domid}"]
        self.fe_perms = [f"n{frontend_domid}", f"r{backend_domid}"]
        self._parents = [(f"/local/domain/{backend_domid}/backend", backend_domid),
                         (f"/local/domain/{backend_domid}/backend/{kind}", backend_domid),
                         (f"/local/domain/{backend_domid}/backend/{kind}/{frontend_domid}", backend_domid),
                         (f"/local/domain/{frontend_domid}/device/{kind}", frontend_domid)]

    def make_parents(self, xs: XenstoreClient, tx: int) -> None:
        """The directories above the device: dom0's, readable by the domain that lists them.  Set again
        every time: xenstored ignores a restarted domain's permissions on nodes made before it was
        introduced again."""
        for path, reader in self._parents:
            xs.mkdir(path, tx)
            xs.set_perms(path, ["n0", f"r{reader}"], tx)


def _add_piecewise(xs: XenstoreClient, layout: _Layout) -> None:
    """``add_device`` without a transaction over a live domain's nodes.

    A directory that is not there is made whole in one transaction (only
    the toolstack makes them: their parents are dom0's), so its domain never
    sees half of it; one that is there is written again (``state`` last:
    what the backend acts on comes after what it reads then) and
    re-permissioned node by node.
    """
    be, fe = layout.be, layout.fe
    fe_exists = xs.exists(f"{fe}/state")
    be_exists = xs.exists(be)

    def body(tx: int) -> None:
        layout.make_parents(xs, tx)
        if not be_exists:
            _make(xs, tx, be, layout.be_perms, layout.be_values)
        if not fe_exists:
            _make(xs, tx, fe, layout.fe_perms, layout.fe_values)
    xs.transaction(body)
    if be_exists:
        for key, value in sorted(layout.be_values.items(), key=lambda kv: kv[0] == "state"):
            xs.write(f"{be}/{key}", str(value))
    set_perms_under(xs, 0, be, layout.be_perms)
    set_perms_under(xs, 0, fe, layout.fe_perms)


def _make(xs: XenstoreClient, tx: int, path: str, perms: list[str], values: Mapping[str, str | int]) -> None:
    xs.mkdir(path, tx)
    xs.set_perms(path, perms, tx)
    for key, value in values.items():
        xs.write(f"{path}/{key}", str(value), tx)


def ask_to_close(xs: XenstoreClient, kind: str, backend_domid: int, frontend_domid: int, devid: int) -> bool:
    """libxl's first step of a detach: backend ``online = 0`` and ``Closing``.  False when the device has no
    backend nodes (nothing is created by asking it to close)."""
    be = backend_path(backend_domid, kind, frontend_domid, devid)

    def ask(tx: int) -> bool:
        if not xs.exists(f"{be}/state", tx):
            return False
        xs.write(f"{be}/online", "0", tx)
        xs.write(f"{be}/state", str(int(XenbusState.Closing)), tx)
        return True
    try:
        return xs.transaction(ask)
    except XenstoreError:
        return False


def backend_closed(xs: XenstoreClient, kind: str, backend_domid: int, frontend_domid: int, devid: int) -> bool:
    """Whether the backend let go of the device: ``Closed``, or its nodes gone."""
    be = backend_path(backend_domid, kind, frontend_domid, devid)
    return read_state(xs, be) in (XenbusState.Closed, XenbusState.Unknown)


def remove_nodes(xs: XenstoreClient, kind: str, backend_domid: int, frontend_domid: int, devid: int) -> None:
    """The last step of a detach: both directories go."""
    for path in (backend_path(backend_domid, kind, frontend_domid, devid), frontend_path(frontend_domid, kind, devid)):
        try:
            xs.rm(path)
        except XenstoreError:
            pass


def remove_device(xs: XenstoreClient, kind: str, backend_domid: int, frontend_domid: int, devid: int,
                  timeout: float = 10.0) -> bool:
    """libxl's detach, waited for here: ``online = 0`` and backend ``Closing``, wait for Closed (True) or the
    timeout (False), then remove both directories.  (The supervisor, which must not wait, does the same steps
    from its loop: ``deploy/detaching.py``.)"""
    be = backend_path(backend_domid, kind, frontend_domid, devid)
    closed = threading.Event()
    token = f"detach:{be}"

    def changed(path: str, tok: str) -> None:
        if backend_closed(xs, kind, backend_domid, frontend_domid, devid):
            closed.set()

    ok = False
    if ask_to_close(xs, kind, backend_domid, frontend_domid, devid):
        xs.watch(f"{be}/state", token, changed)
        try:
            ok = closed.wait(timeout)
        finally:
            xs.unwatch(f"{be}/state", token)
    remove_nodes(xs, kind, backend_domid, frontend_domid, devid)
    return ok
