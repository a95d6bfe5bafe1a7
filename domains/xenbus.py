"""Xenbus: where split drivers meet in xenstore, and the states they walk through.

Device nodes follow libxl's layout (``tools/libs/light/libxl_device.c``):
the toolstack creates

* ``/local/domain/<be>/backend/<type>/<fe>/<devid>/`` (owned by the backend
  domain, readable by the frontend): ``frontend``, ``frontend-id``,
  ``online``, ``state``, and the device's configuration (``params``,
  ``mode``, ... for a vbd);
* ``/local/domain/<fe>/device/<type>/<devid>/`` (owned by the frontend,
  readable by the backend): ``backend``, ``backend-id``, ``state``,
  ``virtual-device``.

Each end then publishes its half of the connection (the backend its
features, the frontend its rings and event channels) and moves its own
``state`` through the handshake (``xen/io/xenbus.h``)::

    backend:  Initialising -> InitWait ----------------> Connected
    frontend: Initialising ------------> Initialised -----------> Connected

and back through Closing and Closed when either side goes away.  What each
end does on each pair of states is :mod:`xdom.domains.xenbus_machine`
(pure), done by ``backends/xenbus_backend.py`` and
:mod:`xdom.domains.xenbus_frontend`; this module holds the xenstore side:
the device paths, reading and writing states and nodes.

Driver-domain restart (xdom's addition; Xen has no answer for it): a
backend that dies leaves the frontend Connected, its requests in flight
kept.  The toolstack starts it again under the same domid and writes its
device nodes again (its ``state`` Initialising); the new backend publishes
its features and goes InitWait, and the frontend, seeing InitWait while
Connected, sets up fresh rings and event channels, goes Initialised, and
issues again what the dead backend did not answer once the new one is
Connected.  The frontend sees a stall, not a reset.
"""

from __future__ import annotations

from collections.abc import Callable

from .abi.xenbus import XenbusState
from .abi.xs_wire import XsType
from .xenstore import XenstoreClient, XenstoreError

__all__ = ["XenbusState", "WatchHandler", "backend_path", "frontend_path", "parse_state", "read_or_none",
           "read_state", "switch_state", "parse_int", "read_int", "read_nodes", "write_nodes"]


def backend_path(backend_domid: int, kind: str, frontend_domid: int, devid: int) -> str:
    return f"/local/domain/{backend_domid}/backend/{kind}/{frontend_domid}/{devid}"


def frontend_path(frontend_domid: int, kind: str, devid: int) -> str:
    return f"/local/domain/{frontend_domid}/device/{kind}/{devid}"


def parse_state(raw: bytes | None) -> XenbusState:
    """A ``state`` node's value; anything unparsable or missing is Unknown, as Linux reads it."""
    if raw is None:
        return XenbusState.Unknown
    try:
        value = int(raw.decode("ascii").strip() or "0")
    except (UnicodeDecodeError, ValueError):
        return XenbusState.Unknown
    try:
        return XenbusState(value)
    except ValueError:
        return XenbusState.Unknown


def read_or_none(xs: XenstoreClient, path: str) -> bytes | None:
    try:
        return xs.read(path)
    except XenstoreError:
        return None


def read_state(xs: XenstoreClient, dev_path: str) -> XenbusState:
    return parse_state(read_or_none(xs, f"{dev_path}/state"))


class _Gone(Exception):
    """The device's ``state`` node is gone: the transaction is abandoned."""


def switch_state(xs: XenstoreClient, dev_path: str, state: XenbusState,
                 nodes: dict[str, str | int] | None = None) -> bool:
    """Write our ``state``, unless the toolstack has removed the device (Linux's ``__xenbus_switch_state``),
    with ``nodes`` (under ``dev_path``) in the same transaction: a peer sees them no later than the state.

    Writing blindly would recreate a directory the toolstack just removed.
    Returns whether the state was written.  Three round trips to xenstored
    whatever the number of nodes (start; the state read and every write
    sent together; commit, or abort when the state was not there): a
    restarted driver domain's handshake is on its guests' stall.
    """
    writes = [(XsType.XS_WRITE, f"{dev_path}/{key}".encode() + b"\0" + str(value).encode())
              for key, value in (nodes or {}).items()]
    writes.append((XsType.XS_WRITE, f"{dev_path}/state".encode() + b"\0" + str(int(state)).encode()))
    probe = (XsType.XS_READ, f"{dev_path}/state".encode() + b"\0")

    def body(tx: int) -> bool:
        there, *written = xs.requests([probe, *writes], tx)
        if isinstance(there, XenstoreError):
            raise _Gone() if there.name == "ENOENT" else there
        for r in written:
            if isinstance(r, XenstoreError):
                raise r
        return True
    try:
        return xs.transaction(body)
    except _Gone:
        return False


def parse_int(raw: bytes | None, default: int | None = None) -> int | None:
    """An unsigned decimal node's value, or ``default`` when absent or malformed (peers are not trusted)."""
    if raw is None:
        return default
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return default
    if not text.isdigit() or len(text) > 20:
        return default
    return int(text)


def read_int(xs: XenstoreClient, path: str, default: int | None = None) -> int | None:
    """An unsigned decimal node, or ``default`` when absent or malformed (peers are not trusted)."""
    return parse_int(read_or_none(xs, path), default)


def read_nodes(xs: XenstoreClient, base: str, names: list[str]) -> dict[str, bytes | None]:
    """The nodes ``names`` under ``base`` in one round trip; None for one that is absent or unreadable."""
    replies = xs.requests([(XsType.XS_READ, f"{base}/{name}".encode() + b"\0") for name in names])
    return {name: None if isinstance(r, XenstoreError) else r for name, r in zip(names, replies)}


def write_nodes(xs: XenstoreClient, base: str, values: dict[str, str | int]) -> None:
    """Write ``values`` under ``base`` in one transaction, so a peer sees all or none (three round trips)."""
    def body(tx: int) -> None:
        xs.write_many({f"{base}/{key}": str(value) for key, value in values.items()}, tx)
    xs.transaction(body)


WatchHandler = Callable[[str, str], None]
