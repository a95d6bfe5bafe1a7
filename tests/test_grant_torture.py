"""The grant in-use race, across processes: no lost update.

A granter process repeatedly grants a page and ends access the moment the
grantee lets go; a grantee process maps it whenever it can.  Each side
increments a counter in the page with a non-atomic read-modify-write, the
granter only after end_access succeeded, the grantee only while mapped.
If "granter ends access" and "broker pins the entry" could interleave,
both would own the page at once and increments would be lost; the final
counter must equal the sum of both sides' increments.
"""

from __future__ import annotations

import pytest
from helpers import RemoteDomain

ROUNDS = 5000


@pytest.mark.parametrize("neighbours", [0, 3], ids=["one entry", "a run of four"])
def test_end_access_versus_map_loses_no_update(mgmt, neighbours: int) -> None:
    """With ``neighbours``, the grantee maps the contended entry as the last of a run of four (pinned
    under one lock when it can be, one by one when the granter holds the last), and unmaps the run."""
    granter = RemoteDomain(mgmt, "granter")
    grantee = RemoteDomain(mgmt, "grantee")
    try:
        ref, gfn = 100, 3
        grantee.send("torture_grantee", granter=granter.domid, ref=ref, seconds=240, neighbours=neighbours)
        g = granter.call("torture_granter", grantee=grantee.domid, ref=ref, gfn=gfn, rounds=ROUNDS,
                         neighbours=neighbours, reply_within=240)
        b = grantee.read(240)
        assert "incs" in b, f"the grantee stopped: {b}"
        assert g["incs"] == ROUNDS
        # read the counter through the granter's own memory
        raw = granter.call("read_u64", gfn=gfn)["value"]
        print(f"granter rounds {g['incs']} (end_access refused {g['busy']} times), "
              f"grantee increments {b['incs']} (maps refused {b['failed_maps']})")
        assert b["incs"] > 0, "the grantee never got the page: the race was not exercised"
        assert g["busy"] > 0, "end_access never met a live mapping: the race was not exercised"
        assert raw == g["incs"] + b["incs"]
    finally:
        granter.stop()
        grantee.stop()
