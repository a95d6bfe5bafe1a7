"""netfront against a compromised netback: a ring it breaks is let go once, not fought on every event.

The backend writes the response producer index of the rings in the
guest's pages; one that publishes more responses than the guest posted
requests has broken the ring (RING_RESPONSE_PROD_OVERFLOW in Linux).
netfront then does what Linux's does ("disabled for further use"): the
rings go, once, and the vif waits for the backend to come back with new
ones, however many events the backend sends after; the data thread
lives on.
"""

from __future__ import annotations

import logging
import struct
import threading

import pytest
from helpers import wait_until
from test_net_local import NetRig

pytestmark = pytest.mark.timeout(120)

RSP_PROD = 8          # offset of rsp_prod in a ring's shared header (xen/io/ring.h: req_prod, req_event, rsp_prod)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")   # a dead thread fails it
def test_a_response_index_past_the_ring_takes_the_rings_down_once(run_dir: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    rig = NetRig(run_dir, guests=1)
    try:
        rig.plug(1)
        front = rig.fronts[0]
        assert front.queues == 1
        rx_page = front._queues[0].rx.shared._head                # the ring's first page, in the guest's memory
        with caplog.at_level(logging.ERROR, logger="xdom.netfront"):
            # What a compromised netback writes there: far more responses than receive requests posted.
            (prod,) = struct.unpack_from("<I", rx_page, RSP_PROD)
            struct.pack_into("<I", rx_page, RSP_PROD, (prod + 100_000) & 0xFFFFFFFF)
            for _ in range(50):            # passes of the data thread, as the events a backend sends after cause
                front._kick()
                threading.Event().wait(0.005)
            wait_until(lambda: front.stats["broken_rings"] == 1, what="the broken ring seen")
            threading.Event().wait(0.3)
        broke = [r for r in caplog.records if "broke a ring" in r.getMessage()]
        assert len(broke) == 1 and front.stats["broken_rings"] == 1
        assert front.queues == 0                                   # the rings are gone: nothing reads them
    finally:
        rig.close()
