"""A backend device's xenbus life, written once for blkback's vbds and netback's vifs.

Linux's xenbus core probes a backend driver for each device directory and
calls its ``otherend_changed`` on every change of the frontend's state; the
driver answers with its own.  Here :class:`XenbusBackend` is that core and
the common half of the driver: it checks the device's ``frontend`` node,
watches the frontend's ``state`` and its own, asks
:mod:`xdom.domains.xenbus_machine` what to do for (own state, frontend's
state), does it, and writes the state the machine names.  A device class
(:class:`~xdom.backends.blkback.vbd.Vbd`, :class:`~xdom.backends.netback.vif.Vif`)
fills in what is its own:

* :meth:`_publish`: open what the device needs (a disk, a switch port) and
  return the feature nodes written with InitWait;
* :meth:`_connect`: read what the frontend published, map its rings, bind
  its event channels, and return the nodes written with Connected;
* :meth:`_disconnect`: unmap and unbind it all (idempotent);
* :meth:`_release`: after the last disconnect, when the toolstack removed
  the device.

Rules: every callback runs under the device's lock and does nothing once
the device is removed; a failing ``_connect`` leaves nothing mapped and
the device Closing (Linux's ``xenbus_dev_fatal``); a frontend that breaks
a ring while connected gets the same, from a thread of its own
(:meth:`_close_from_ring`).  The toolstack re-creating the device (it
writes our ``state`` back to Initialising, as when the frontend's domain
restarted) makes us start over from the probe.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import ClassVar

from xdom.domains.xenbus import XenbusState, read_or_none, read_state, switch_state
from xdom.domains.xenbus_machine import BACKEND_FAILED, BACKEND_WRITES, BackendAction, backend_action
from xdom.domains.xenstore import XenstoreClient

Nodes = dict[str, str | int]


class XenbusBackend:
    """One device of a backend driver domain (see the module docstring); subclasses set the class attributes."""

    kind: ClassVar[str]                                     # "vbd", "vif": the xenbus device type
    log: ClassVar[logging.Logger]
    bad_frontend: ClassVar[type[Exception]]                 # raised by probe() on a wrong ``frontend`` node
    publish_errors: ClassVar[tuple[type[BaseException], ...]]     # _publish failing: the device goes Closed
    connect_errors: ClassVar[tuple[type[BaseException], ...]]     # _connect failing: the device goes Closing

    def __init__(self, xs: XenstoreClient, path: str, frontend_domid: int, devid: int) -> None:
        self.xs, self.path = xs, path
        self.fe, self.devid = frontend_domid, devid
        self.name = f"{self.kind}{frontend_domid}.{devid}"
        self.frontend_path = ""
        self.state = XenbusState.Initialising          # what we last wrote (Initialising: start over)
        self._lock = threading.RLock()
        self._removed = False
        self._tokens = (f"fe:{path}", f"be:{path}")

    # ---- what a device class fills in ----------------------------------------------------

    def _prepare(self) -> None:
        """Once, at probe, before the first :meth:`_publish` and outside the lock."""

    def _publish(self) -> Nodes:
        raise NotImplementedError

    def _connect(self) -> Nodes:
        raise NotImplementedError

    def _disconnect(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        """The device is removed and disconnected: let go of what :meth:`_prepare` and :meth:`_publish` took."""

    # ---- probe and remove (backends/device_table.py calls them) ---------------------------

    def probe(self) -> None:
        """Check the ``frontend`` node, publish the features, InitWait, and start following both states.

        Raises (``bad_frontend``, a publish error, XenstoreError) when the
        device cannot be served: the device table reports it.
        """
        fe_path = (read_or_none(self.xs, f"{self.path}/frontend") or b"").decode(errors="replace")
        expected = f"/local/domain/{self.fe}/device/{self.kind}/{self.devid}"
        if fe_path != expected:
            raise self.bad_frontend(f"{self.path}/frontend is {fe_path!r}, expected {expected}")
        self.frontend_path = fe_path
        self._prepare()
        with self._lock:
            nodes = self._publish()
            switch_state(self.xs, self.path, XenbusState.InitWait, nodes)     # the features with the state
            self.state = XenbusState.InitWait
        # Both watches fire once at once: the frontend's state is acted on from there.
        self.xs.watch(f"{fe_path}/state", self._tokens[0], self._frontend_changed)
        self.xs.watch(f"{self.path}/state", self._tokens[1], self._own_state_changed)

    def remove(self) -> None:
        """The toolstack removed the device: stop watching, disconnect, let go of everything."""
        with self._lock:
            if self._removed:
                return
            self._removed = True
        for watched, token in zip((f"{self.frontend_path}/state", f"{self.path}/state"), self._tokens,
                                  strict=True):
            with contextlib.suppress(Exception):
                self.xs.unwatch(watched, token)
        with self._lock:
            self._disconnect()
        self._release()
        self.log.info("%s: removed", self.name)

    # ---- the state machine's shell -------------------------------------------------------

    def _own_state_changed(self, path: str, token: str) -> None:
        with self._lock:
            if self._removed or read_state(self.xs, self.path) != XenbusState.Initialising:
                return
            self.log.info("%s: the toolstack re-created the device: starting over", self.name)
            self.state = XenbusState.Initialising
            self._step(read_state(self.xs, self.frontend_path))

    def _frontend_changed(self, path: str, token: str) -> None:
        with self._lock:
            if not self._removed:
                self._step(read_state(self.xs, self.frontend_path))

    def _step(self, frontend: XenbusState) -> None:
        """Do what the machine says for (our state, ``frontend``); after a probe, what it says then."""
        action = backend_action(self.state, frontend)
        if action is BackendAction.PROBE:
            self._disconnect()
            try:
                nodes = self._publish()
            except self.publish_errors as e:
                self.log.error("%s: %s", self.name, e)
                self._switch(BACKEND_FAILED[action][-1])
                return
            self._switch(BACKEND_WRITES[action][-1], nodes)
            action = backend_action(self.state, frontend)
        if action is BackendAction.NONE:
            return
        self._disconnect()          # every other action starts from nothing mapped (Linux: idempotent too)
        nodes = {}
        if action is BackendAction.CONNECT:
            try:
                nodes = self._connect()
            except self.connect_errors as e:
                self.log.error("%s: cannot connect to d%d: %s", self.name, self.fe, e)
                self._disconnect()
                self._switch(BACKEND_FAILED[action][-1])
                return
        for state in BACKEND_WRITES[action]:
            self._switch(state, nodes)

    def _switch(self, state: XenbusState, nodes: Nodes | None = None) -> None:
        """Write our state (with ``nodes``, in one transaction); the toolstack may have removed the device."""
        self.state = state
        try:
            switch_state(self.xs, self.path, state, nodes)
        except Exception as e:
            self.log.info("%s: cannot switch to %s: %s", self.name, state.name, e)

    def _close_from_ring(self, still_current: Callable[[], bool], why: str) -> None:
        """A ring of this device failed (a hostile or broken frontend): close this device only, if
        ``still_current()`` says the failing connection is still the device's (it may have moved on).

        Called on the failing ring's own thread, which must not wait for the
        device lock (whoever holds it may be joining that very thread), so
        the closing happens on a thread of its own.
        """
        self.log.error("%s: closing: %s", self.name, why)

        def close() -> None:
            with self._lock:
                if not self._removed and still_current():
                    self._disconnect()
                    self._switch(XenbusState.Closing)
        threading.Thread(target=close, name=f"close-{self.name}", daemon=True).start()
