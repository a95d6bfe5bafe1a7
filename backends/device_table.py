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
        with self._lock:
            if not self._closed:
                self._rescan()

    def _list(self, path: str) -> list[int]:
        try:
            return [int(n) for n in self.xs.directory(path) if n.isdigit() and len(n) < 10]
        except XenstoreError:
            return []

    def _rescan(self) -> None:
        present = {(fe, dev) for fe in self._list(self.root) for dev in self._list(f"{self.root}/{fe}")}
        for key in [k for k in self.devices if k not in present]:
            self.devices.pop(key).remove()
        for fe, dev in sorted(present - set(self.devices)):
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
