"""xen/include/public/io/xenbus.h: the states either end of a split device walks through.

A transcription (tests/test_xenbus_machine.py checks it against Debian's
libxen-dev header); what each end does on each state is
:mod:`xdom.domains.xenbus_machine`.
"""

from __future__ import annotations

from enum import IntEnum


class XenbusState(IntEnum):
    """``enum xenbus_state``: the value of a device's ``state`` node."""
    Unknown = 0
    Initialising = 1
    InitWait = 2            # early set-up done, waiting for the peer (or hotplug scripts)
    Initialised = 3         # waiting for a connection from the peer
    Connected = 4
    Closing = 5             # being closed, for an error or an unplug
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8
