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

__all__ = ["add_device", "remove_device", "set_perms_under"]


def set_perms_under(xs: XenstoreClient, tx: int, path: str, perms: list[str]) -> None:
    """``perms`` on ``path`` and every node below it.

    Either side of a device may have restarted under its old domid, and
    xenstored ignores a domain's permission entries on nodes older than its
    latest introduction until they are set again.
    """
    xs.set_perms(path, perms, tx)
    for child in xs.directory(path, tx):
        set_perms_under(xs, tx, f"{path}/{child}", perms)


def add_device(xs: XenstoreClient, kind: str, backend_domid: int, frontend_domid: int, devid: int,
               be_nodes: Mapping[str, str | int], fe_nodes: Mapping[str, str | int]) -> None:
    """Create a device's nodes (or write them again for a restarted backend), in one transaction, as libxl does.

    The backend directory (``frontend`` and ``be_nodes``) is the backend
    domain's and the frontend may read it; the frontend directory
    (``backend`` and ``fe_nodes``) is the frontend's and the backend may read
    it.  A frontend directory that is there already (its ``state`` written)
    is left as it is: a live frontend keeps its nodes across a backend restart.
    """
    be = backend_path(backend_domid, kind, frontend_domid, devid)
    fe = frontend_path(frontend_domid, kind, devid)
    be_perms = [f"n{backend_domid}", f"r{frontend_domid}"]
    fe_perms = [f"n{frontend_domid}", f"r{backend_domid}"]
    be_dirs = [f"/local/domain/{backend_domid}/backend", f"/local/domain/{backend_domid}/backend/{kind}",
               f"/local/domain/{backend_domid}/backend/{kind}/{frontend_domid}"]
    fe_dirs = [f"/local/domain/{frontend_domid}/device/{kind}"]

    def body(tx: int) -> None:
        fe_exists = xs.exists(f"{fe}/state", tx)
        # The directories above the device are dom0's, readable by the domain that
        # lists them.  Set again every time: xenstored ignores a restarted
        # domain's permissions on nodes made before it was introduced again.
        for path, reader in [(d, backend_domid) for d in be_dirs] + [(d, frontend_domid) for d in fe_dirs]:
            xs.mkdir(path, tx)
            xs.set_perms(path, ["n0", f"r{reader}"], tx)
        xs.mkdir(be, tx)
        for key, value in {"frontend": fe, **be_nodes}.items():
            xs.write(f"{be}/{key}", str(value), tx)
        set_perms_under(xs, tx, be, be_perms)
        if not fe_exists:
            xs.mkdir(fe, tx)
            xs.set_perms(fe, fe_perms, tx)
            for key, value in {"backend": be, **fe_nodes}.items():
                xs.write(f"{fe}/{key}", str(value), tx)
        # Either side may have restarted under its old domid; xenstored ignores its
        # permissions on nodes older than its new introduction until they are set again.
        set_perms_under(xs, tx, fe, fe_perms)
    xs.transaction(body)


def remove_device(xs: XenstoreClient, kind: str, backend_domid: int, frontend_domid: int, devid: int,
                  timeout: float = 10.0) -> bool:
    """libxl's detach: ``online = 0`` and backend ``Closing``, wait for Closed (True) or the timeout (False),
    then remove both directories.  A device that is not there is not created by asking it to close."""
    be = backend_path(backend_domid, kind, frontend_domid, devid)
    fe = frontend_path(frontend_domid, kind, devid)
    closed = threading.Event()
    token = f"detach:{be}"

    def changed(path: str, tok: str) -> None:
        if read_state(xs, be) in (XenbusState.Closed, XenbusState.Unknown):
            closed.set()

    def ask(tx: int) -> bool:
        if not xs.exists(f"{be}/state", tx):
            return False
        xs.write(f"{be}/online", "0", tx)
        xs.write(f"{be}/state", str(int(XenbusState.Closing)), tx)
        return True
    try:
        present = xs.transaction(ask)
    except XenstoreError:
        present = False
    ok = False
    if present:
        xs.watch(f"{be}/state", token, changed)
        try:
            ok = closed.wait(timeout)
        finally:
            xs.unwatch(f"{be}/state", token)
    for path in (be, fe):
        try:
            xs.rm(path)
        except XenstoreError:
            pass
    return ok
