"""backends/device_table.py against a real xenstored: which events probe, remove or are ignored.

The table watches its whole ``backend/<kind>`` tree; it must look again only
where an event points (Linux's ``xenbus_dev_changed``), so that a driver
domain's xenstore traffic grows with its devices, not with their square.
"""

from __future__ import annotations

import os
import threading

from helpers import wait_until
from xs_fixtures import Xenstored

from xdom.backends.device_table import DeviceTable
from xdom.domains.xenstore import UnixTransport, XenstoreClient, XenstoreError

ROOT = "/local/domain/0/backend/vbd"


class Recorder:
    """What the table did: probes and removes in order, and how many directory requests it made."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []
        self.lock = threading.Lock()
        self.fail: set[tuple[int, int]] = set()

    def make(self, path: str, fe: int, dev: int) -> Device:
        assert path == f"{ROOT}/{fe}/{dev}"
        return Device(self, fe, dev)

    def seen(self, what: str) -> list[tuple[int, int]]:
        with self.lock:
            return [(fe, dev) for w, fe, dev in self.events if w == what]


class Device:
    def __init__(self, rec: Recorder, fe: int, dev: int) -> None:
        self.rec, self.fe, self.dev = rec, fe, dev

    def probe(self) -> None:
        with self.rec.lock:
            self.rec.events.append(("probe", self.fe, self.dev))
        if (self.fe, self.dev) in self.rec.fail:
            raise ValueError("unusable configuration")

    def remove(self) -> None:
        with self.rec.lock:
            self.rec.events.append(("remove", self.fe, self.dev))


class CountingClient(XenstoreClient):
    directories = 0

    def directory(self, path: str, tx: int = 0) -> list[str]:
        CountingClient.directories += 1
        return super().directory(path, tx)


def client(path: str, cls: type[XenstoreClient] = XenstoreClient) -> XenstoreClient:
    return cls(UnixTransport(path), timeout=10)


def add_device(xs: XenstoreClient, fe: int, dev: int) -> None:
    def body(tx: int) -> None:
        xs.write(f"{ROOT}/{fe}/{dev}/frontend-id", str(fe), tx)
        xs.write(f"{ROOT}/{fe}/{dev}/state", "1", tx)
    xs.transaction(body)


def test_events_probe_and_remove_only_where_they_point(xenstored: Xenstored) -> None:
    rec = Recorder()
    rec.fail.add((7, 1))
    writer = client(xenstored.socket_path)
    table_xs = client(xenstored.socket_path, CountingClient)
    table = DeviceTable(table_xs, 0, "vbd", rec.make, expected=(ValueError,))
    try:
        add_device(writer, 5, 51712)                  # there before the table: its first scan finds it
        table.start()
        wait_until(lambda: rec.seen("probe") == [(5, 51712)], 10, "the first scan's probe")
        for fe, dev in ((5, 51728), (6, 51712), (6, 51728), (7, 1)):
            add_device(writer, fe, dev)
        wait_until(lambda: len(rec.seen("probe")) == 5, 10, "every device probed")
        assert sorted(rec.seen("probe")) == [(5, 51712), (5, 51728), (6, 51712), (6, 51728), (7, 1)]
        # the one whose probe failed says so where xl looks, and is not probed again
        wait_until(lambda: _read(writer, f"{ROOT}/7/1/hotplug-status") == "error", 10, "hotplug-status")
        assert _read(writer, f"{ROOT}/7/1/hotplug-error") == "unusable configuration"
        # the table writes hotplug-status, then removes the device: the status can be seen first
        wait_until(lambda: rec.seen("remove") == [(7, 1)], 10, "the failed device removed")

        # 200 writes inside known devices (the two ends' state changes): no probe, no remove, and no
        # directory request at all (before: one per frontend and one for the root, on every event)
        before = CountingClient.directories
        for i in range(50):
            for fe, dev in ((5, 51712), (5, 51728), (6, 51712), (7, 1)):
                writer.write(f"{ROOT}/{fe}/{dev}/state", str(i % 7))
        writer.write(f"{ROOT}/6/51728/marker", "last")
        wait_until(lambda: _events_drained(table_xs, writer), 10, "the table's events handled")
        assert CountingClient.directories == before
        assert len(rec.seen("probe")) == 5 and rec.seen("remove") == [(7, 1)]

        # a device removed goes alone; a frontend's directory removed takes all of its devices
        writer.rm(f"{ROOT}/5/51728")
        wait_until(lambda: (5, 51728) in rec.seen("remove"), 10, "5/51728 removed")
        writer.rm(f"{ROOT}/6")
        wait_until(lambda: {(6, 51712), (6, 51728)} <= set(rec.seen("remove")), 10, "frontend 6's devices removed")
        assert set(table.devices) == {(5, 51712), (7, 1)}
        # written again, a device is probed again
        add_device(writer, 6, 51712)
        wait_until(lambda: rec.seen("probe").count((6, 51712)) == 2, 10, "6/51712 probed again")
        # names that are not devices are not probed
        writer.write(f"{ROOT}/junk/1/state", "1")
        writer.write(f"{ROOT}/5/junk", "1")
        wait_until(lambda: _events_drained(table_xs, writer), 10, "the table's events handled")
        assert set(table.devices) == {(5, 51712), (6, 51712), (7, 1)}
    finally:
        table.close()
        table_xs.close()
        writer.close()
    assert set(rec.seen("remove")[-3:]) == {(5, 51712), (6, 51712), (7, 1)}      # close removes what is left


def _read(xs: XenstoreClient, path: str) -> str | None:
    try:
        return xs.read(path).decode()
    except XenstoreError:
        return None


def _events_drained(table_xs: XenstoreClient, writer: XenstoreClient) -> bool:
    """True once a marker watch registered after the writes has fired on the table's connection: events
    are delivered in order on one connection, so every earlier one has been handled by then."""
    fired = threading.Event()
    token = f"drain-{os.urandom(4).hex()}"
    table_xs.watch("/drain-marker", token, lambda p, t: fired.set())
    try:
        return fired.wait(5)
    finally:
        table_xs.unwatch("/drain-marker", token)
