"""Where a guest's export sockets may be, and which devices may share a path.

A guest serves its disks (NBD, vhost-user-blk) and a VM's NICs (vhost-user-net)
on unix sockets it creates, so the directory a socket lives in is writable by
the guest's uid: it must hold nothing anyone else trusts.  A relative
``export=nbd:NAME`` is a plain file name in the guest's own export directory,
``RUN_DIR/exports/GUEST/`` (:func:`xdom.deploy.xlcfg.export_dir`); an absolute
one may not be in the run directory (except that directory), in the state
directory, above either, above a disk image, or in (or above or below) another
guest's export directory (:func:`export_problem`).  Two devices on one socket,
or one image writable through two disks, are refused too
(:func:`shared_path_problems`).

These rules are checked when a topology is read (the relative names), when it
is resolved against its directories (the absolute paths: :meth:`Topology.resolved
<xdom.deploy.topology.Topology.resolved>`), and when a device is hot-plugged
(``deploy/control_ops.py``); they are written once, here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .xl_disk import DiskSpec
from .xl_vif import VifSpec
from .xlcfg import EXPORTS_DIR, export_dir

__all__ = ["export_problem", "relative_export_problem", "shared_path_problems"]


def _within(path: str, top: str) -> bool:
    """``path`` is ``top`` or below it (both normalised, absolute)."""
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


def export_problem(guest: str, path: str, run_dir: str | None, state_dir: str | None,
                   others: Iterable[tuple[str, str]] = (), targets: Iterable[str] = ()) -> str | None:
    """Why the absolute export socket ``path`` of ``guest`` cannot be, or None.

    The guest's uid gets write access to the socket's directory, so that
    directory must be the guest's alone: not the run directory or anything in
    it but ``RUN_DIR/exports/GUEST``, not the state directory or anything in
    it, not a directory above either, not one holding a disk image (the guest
    could swap it), and not the directory of another guest's export, or one
    above or below it (``others``: (guest, socket path) pairs).
    """
    folder = os.path.dirname(os.path.normpath(path))
    own = None if run_dir is None else export_dir(os.path.normpath(run_dir), guest)
    hint = (f"; leave export= a plain socket name (it goes in {own}/) or name a directory of {guest}'s own"
            if own else "")
    for what, top in (("run", run_dir), ("state", state_dir)):
        if top is None or folder == own:
            continue
        top = os.path.normpath(top)
        if _within(folder, top):
            why = ("the toolstack's and the broker's sockets and pid file live there" if what == "run" else
                   "logs, the store and disk images live there")
            return (f"export socket {path!r} is in the {what} directory {top}, which no domain may write "
                    f"({why}){hint}")
        if _within(top, folder):
            return (f"export socket {path!r}: its directory {folder} holds the {what} directory {top}; "
                    f"{guest} could write {folder} and replace {top}{hint}")
    for target in targets:
        if _within(os.path.normpath(target), folder):
            return (f"export socket {path!r}: its directory {folder} holds the disk image {target}; "
                    f"{guest} could write {folder} and replace the image{hint}")
    for other, other_path in others:
        if other == guest:
            continue
        theirs = os.path.dirname(os.path.normpath(other_path))
        if _within(folder, theirs) or _within(theirs, folder):
            return (f"export socket {path!r}: its directory {folder} is shared with {other}'s export "
                    f"{other_path!r}; each guest's exports need a directory of their own, or one guest could "
                    f"replace the other's socket")
    return None


def relative_export_problem(guest: str | None, export: str | None) -> str | None:
    """Why a relative ``export=`` of ``guest`` (None: a name not yet valid) cannot be, or None.

    A relative export is a socket name in the guest's own directory: a path
    with a ``/`` in it (or ``..``) would leave that directory.
    """
    if export is not None and not os.path.isabs(export) and (
            os.sep in os.path.normpath(export) or os.path.normpath(export) == ".."):
        return (f"export socket {export!r}: a relative export is a socket name in "
                f"{guest or 'the guest'}'s own directory RUN_DIR/{EXPORTS_DIR}/"
                f"{guest or 'GUEST'}/, without '/'; give a plain name or an absolute path")
    return None


def shared_path_problems(disks: Iterable[tuple[str, str | None, DiskSpec]],
                         vifs: Iterable[tuple[str, str | None, VifSpec]] = ()) -> list[tuple[str, str]]:
    """(where, why) for each device on an export socket another one uses, or on an image another writes.

    ``disks`` and ``vifs`` are (where, guest, device) triples.  Read-only
    sharing of an image is fine (Xen allows it too); a writable image seen by
    two frontends is corrupted by the first write.  A relative export socket
    is a name in its guest's own directory, so two guests may use the same
    one.
    """
    problems: list[tuple[str, str]] = []
    exports: dict[object, str] = {}
    targets: dict[str, tuple[str, DiskSpec]] = {}
    devices: list[tuple[str, str | None, DiskSpec | VifSpec]] = [*disks, *vifs]
    for where, guest, dev in devices:
        if dev.export_path is not None:
            key: object = os.path.normpath(dev.export_path)
            if not os.path.isabs(dev.export_path):
                key = (guest, key)
            if key in exports:
                problems.append((where, f"export socket {dev.export_path!r} is already used by {exports[key]}"))
            else:
                exports[key] = where
        if isinstance(dev, DiskSpec) and dev.target is not None:
            target = os.path.normpath(dev.target)
            other = targets.get(target)
            if other is None:
                targets[target] = (where, dev)
            elif not (dev.readonly and other[1].readonly):
                problems.append((where, f"target {dev.target!r} is also used by {other[0]}, and one of them is "
                                        f"writable; only read-only disks may share an image"))
    return problems
