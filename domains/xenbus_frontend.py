"""A frontend device's xenbus life, written once for blkfront and netfront.

Linux's xenbus core calls a frontend driver's ``otherend_changed`` on every
change of the backend's state; :class:`XenbusFrontend` is that core and the
common half of the driver: it finds the device's backend (the toolstack's
``backend``/``backend-id`` nodes), goes Initialising and watches the
backend's ``state``, asks :mod:`xdom.domains.xenbus_machine` what to do for
(own state, backend's state), does it, and writes the state the machine
names.  :meth:`connect` waits for Connected.  A device class
(:class:`~xdom.domains.blkfront.device.Blkfront`,
:class:`~xdom.domains.netfront.device.Netfront`) fills in what is its own:

* :meth:`_talk_to_backend`: read the backend's features, set up rings and
  event channels, and publish them with the state it is given, in one
  transaction (TALK; RECONNECT after :meth:`_backend_came_back`);
* :meth:`_backend_came_back`: the backend restarted; drop the old rings,
  keeping what was in flight for the new ones;
* :meth:`_read_backend` then :meth:`_on_connected`: before and after our
  Connected is written (CONNECT);
* :meth:`_backend_closing`: a detach; fail what is in flight, let go.

Rules: every callback runs under the device's lock and does nothing once
:meth:`close` began; a step that fails with one of ``step_errors`` records
the error, which :meth:`connect` raises (or the log shows, once connected),
and leaves the state as it was.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import ClassVar

from .abi.xs_wire import XenstoreError
from .xenbus import XenbusState, read_int, read_or_none, read_state, switch_state
from .xenbus_machine import FRONTEND_WRITES, FrontendAction, frontend_action
from .xenstore import XenstoreClient

A = FrontendAction


class XenbusFrontend:
    """One device of this guest (see the module docstring); subclasses set the class attributes."""

    kind: ClassVar[str]                              # "vbd", "vif": the xenbus device type
    driver: ClassVar[str]                            # "blkfront", "netfront": names the watch
    log: ClassVar[logging.Logger]
    error: ClassVar[type[Exception]]                 # what connect() raises
    step_errors: ClassVar[tuple[type[BaseException], ...]]     # a step failing with these: recorded, not raised

    _thread: threading.Thread                        # the device's own thread, started by connect()

    def __init__(self, xs: XenstoreClient, domid: int, devid: int) -> None:
        self.xs, self.devid = xs, devid
        self.path = f"{xs.get_domain_path(domid)}/device/{self.kind}/{devid}"
        be = read_or_none(xs, f"{self.path}/backend")
        be_id = read_int(xs, f"{self.path}/backend-id")
        if be is None or be_id is None:
            raise self.error(f"{self.path}: no backend/backend-id: the toolstack has not added this {self.kind}")
        self.backend_path = be.decode(errors="replace")
        self.backend_domid = be_id
        self.state = XenbusState.Initialising            # what we last wrote
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._error = ""
        self._closing = False
        self._gone = False                               # the toolstack removed the device (abandon())
        self._token = f"{self.driver}:{devid}"

    # ---- what a device class fills in ----------------------------------------------------

    def _talk_to_backend(self, state: XenbusState) -> None:
        raise NotImplementedError

    def _backend_came_back(self) -> None:
        raise NotImplementedError

    def _read_backend(self) -> None:
        """What the Connected backend published, checked (raise one of ``step_errors`` if unusable)."""

    def _on_connected(self) -> None:
        """We are Connected: start moving data."""

    def _backend_closing(self) -> None:
        raise NotImplementedError

    # ---- connecting and closing ----------------------------------------------------------

    def connect(self, timeout: float = 30.0) -> None:
        """Run the handshake; returns once Connected (raises ``error`` otherwise)."""
        self._thread.start()
        switch_state(self.xs, self.path, XenbusState.Initialising)
        self.xs.watch(f"{self.backend_path}/state", self._token, self._backend_changed)
        with self._changed:
            if not self._changed.wait_for(lambda: self.state == XenbusState.Connected or self._error or self._gone,
                                          timeout):
                raise self.error(f"{self.kind} {self.devid}: backend {self.backend_path} did not connect within "
                                 f"{timeout:g}s (backend state {read_state(self.xs, self.backend_path).name})")
            if self._gone:
                raise self.error(f"{self.kind} {self.devid}: removed by the toolstack while connecting")
            if self._error:
                raise self.error(f"{self.kind} {self.devid}: {self._error}")

    def abandon(self) -> None:
        """The toolstack removed this device (its directory is gone): take no further step, write nothing.

        It may add a device under the same id at once, and this one's state
        writes (a step under way, or Closing and Closed from :meth:`close`)
        would land in the new device's nodes.  A :meth:`connect` under way
        raises ``error``; the caller still calls :meth:`close` to let go.
        """
        with self._changed:
            self._gone = True
            self._changed.notify_all()

    def _stop_watching(self) -> None:
        """The first step of closing (under the lock): no more steps."""
        with contextlib.suppress(Exception):
            self.xs.unwatch(f"{self.backend_path}/state", self._token)

    def _say(self, state: XenbusState) -> bool:
        """Write our state while closing, if the device is still there; whether it was written."""
        if self._gone:
            return False
        try:
            return switch_state(self.xs, self.path, state)
        except Exception:
            return False

    # ---- the state machine's shell -------------------------------------------------------

    def _backend_changed(self, path: str, token: str) -> None:
        with self._lock:
            if self._closing or self._gone:
                return
            be = read_state(self.xs, self.backend_path)
            action = frontend_action(self.state, be)
            errors: tuple[type[BaseException], ...] = (*self.step_errors, XenstoreError)
            try:
                self._do(action, be)
            except errors as e:
                self._error = f"{type(e).__name__}: {e}"
                self.log.error("%s %d: %s", self.kind, self.devid, self._error)
            self._changed.notify_all()

    def _do(self, action: FrontendAction, be: XenbusState) -> None:
        writes = FRONTEND_WRITES[action]
        if action is A.TALK:
            self._talk_to_backend(writes[-1])
        elif action is A.RECONNECT:
            self._backend_came_back()
            self._talk_to_backend(writes[-1])
        elif action is A.CONNECT:
            self._read_backend()
            switch_state(self.xs, self.path, writes[-1])
            self.state = writes[-1]
            self._on_connected()
        elif action is A.CLOSE:
            # A detach (the toolstack closes the backend): fail what is in flight, let go.
            self.log.info("%s %d: backend is %s: closing", self.kind, self.devid, be.name)
            self._backend_closing()
            for state in writes:
                self._say(state)
        elif action is A.WAIT:
            self.log.info("%s %d: backend d%d is away (%s): waiting for it to come back", self.kind, self.devid,
                          self.backend_domid, be.name)
        if writes:
            self.state = writes[-1]
