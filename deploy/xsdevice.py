"""What the toolstack does the same way for every split device (vbd, vif): permissions and libxl's detach."""

from __future__ import annotations

import threading

from xdom.domains.xenbus import XenbusState, backend_path, frontend_path, read_state
from xdom.domains.xenstore import XenstoreClient, XenstoreError

__all__ = ["remove_device", "set_perms_under"]


def set_perms_under(xs: XenstoreClient, tx: int, path: str, perms: list[str]) -> None:
    """``perms`` on ``path`` and every node below it.

    Either side of a device may have restarted under its old domid, and
    xenstored ignores a domain's permission entries on nodes older than its
    latest introduction until they are set again.
    """
    xs.set_perms(path, perms, tx)
    for child in xs.directory(path, tx):
        set_perms_under(xs, tx, f"{path}/{child}", perms)


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
