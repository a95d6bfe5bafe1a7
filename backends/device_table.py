"""A driver domain's devices, as the toolstack lists them under ``/local/domain/<self>/backend/<type>``.

Linux's xenbus probes a backend driver for every ``<frontend>/<devid>``
directory that appears there and removes it when the directory goes;
blkback and netback share this table for the same job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from xdom.domains.xenstore import XenstoreClient, XenstoreError

log = logging.getLogger("xdom.backend")


class BackendDevice(Protocol):
    def probe(self) -> None: ...
    def remove(self) -> None: ...


D = TypeVar("D", bound=BackendDevice)


class DeviceTable(Generic[D]):
    """Probes ``make(path, frontend, devid)`` for each new device directory, removes the ones that vanish.

    A device whose probe fails (with one of ``expected`` errors: a
    half-written or unusable configuration) is reported in its directory's
    ``hotplug-error``/``hotplug-status`` nodes, where xl looks, and kept so
    that it is not probed again on every event; the toolstack removes and
    re-adds it to retry.
    """

    def __init__(self, xs: XenstoreClient, domid: int, kind: str, make: Callable[[str, int, int], D],
                 expected: tuple[type[BaseException], ...]) -> None:
        self.xs, self.kind, self.make, self.expected = xs, kind, make, expected
        self._errors: tuple[type[BaseException], ...] = (*expected, XenstoreError)
        self.root = f"{xs.get_domain_path(domid)}/backend/{kind}"
        self.devices: dict[tuple[int, int], D] = {}
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Watch the directory (the watch fires once at once: existing devices are probed)."""
        self.xs.watch(self.root, self.kind, self._changed)

    def _changed(self, path: str, token: str) -> None:
        """Look again only where the event points (Linux's ``xenbus_dev_changed``).

        The watch is recursive, so every node a device's two ends write
        fires it; rescanning every frontend on each made a driver domain with
        N devices do N directory requests per event and N^2 for a bring-up.
        An event inside a known device changes nothing here; one on a
        device's own directory probes or removes that device; one on a
        frontend's directory reconciles that frontend; the root (the watch's
        first firing) rescans all.
        """
        with self._lock:
            if self._closed:
                return
            where = self._device_of(path)
            if where is None:
                self._rescan()
            elif where[1] is None:
                self._rescan(where[0])
            else:
                self._check_device(where[0], where[1], exact=path.count("/") == self.root.count("/") + 2)

    def _device_of(self, path: str) -> tuple[int, int | None] | None:
        """(frontend, devid) of an event's path below the root, devid None for a frontend's own
        directory; None for the root itself or anything that is not a device's path."""
        if not path.startswith(self.root + "/"):
            return None
        parts = path[len(self.root) + 1:].split("/")
        if not _is_id(parts[0]):
            return None
        if len(parts) == 1:
            return int(parts[0]), None
        return (int(parts[0]), int(parts[1])) if _is_id(parts[1]) else None

    def _list(self, path: str) -> list[int] | None:
        """The numeric entries of a directory; None when it is not there."""
        try:
            return [int(n) for n in self.xs.directory(path) if _is_id(n)]
        except XenstoreError:
            return None

    def _rescan(self, only_frontend: int | None = None) -> None:
        """Probe what appeared and remove what went, everywhere or below one frontend's directory."""
        frontends = (self._list(self.root) or []) if only_frontend is None else [only_frontend]
        present = {(fe, dev) for fe in frontends for dev in self._list(f"{self.root}/{fe}") or []}
        for key in [k for k in self.devices if k not in present and only_frontend in (None, k[0])]:
            self.devices.pop(key).remove()
        for fe, dev in sorted(present - set(self.devices)):
            self._probe(fe, dev)

    def _check_device(self, fe: int, dev: int, exact: bool) -> None:
        """One device's directory: probe it if it is new, remove it if it went.

        A node below a known device's directory changed: the device is
        still there (its directory's removal fires an event of its own).
        """
        known = (fe, dev) in self.devices
        if known and not exact:
            return
        exists = self._list(f"{self.root}/{fe}/{dev}") is not None
        if known and not exists:
            self.devices.pop((fe, dev)).remove()
        elif exists and not known:
            self._probe(fe, dev)

    def _probe(self, fe: int, dev: int) -> None:
        path = f"{self.root}/{fe}/{dev}"
        device = self.make(path, fe, dev)
        try:
            device.probe()
        except self._errors as e:
            log.error("%s %d/%d: %s", self.kind, fe, dev, e)
            try:
                self.xs.write(f"{path}/hotplug-error", str(e))
                self.xs.write(f"{path}/hotplug-status", "error")
            except XenstoreError:
                pass
            device.remove()
        self.devices[(fe, dev)] = device

    def close(self) -> None:
        with self._lock:
            self._closed = True
            devices, self.devices = list(self.devices.values()), {}
        try:
            self.xs.unwatch(self.root, self.kind)
        except Exception:
            pass
        for device in devices:
            device.remove()


def _is_id(name: str) -> bool:
    return name.isdigit() and len(name) < 10
