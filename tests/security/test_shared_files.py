"""Descriptors the broker shares with domains are files: a hostile holder resizes or seals them.

* A domain's grant table is a memfd the broker maps too.  The domain holds
  a read-write descriptor of it (it writes its entries without a
  hypercall), so it can ``ftruncate`` it to nothing; a broker that then
  reads an entry through its own mapping takes SIGBUS, and every domain
  loses its hypervisor.
* A backend that maps a guest's page writable receives a read-write
  descriptor of the guest's frame.  Shrinking that memfd makes the guest's
  own access to its memory fault (SIGBUS: a backend kills its guest);
  growing it makes the frame no longer a frame; a seal or a mode change
  would make the guest's page unusable to others.

Secure outcome: the broker survives and keeps serving; the guest keeps its
page, its bytes, and can grant it again.
"""

from __future__ import annotations

from xdom.domains.abi.event_channel import DOMID_SELF
from xdom.domains.abi.grant_table import GNTCOPY_source_gref, GNTST_okay

from .rig import World

SECRET = "the guest's own page"


def test_grant_table_truncated_by_its_domain_does_not_take_the_broker_down(world: World) -> None:
    v = world.spawn("victim")
    x = world.spawn("attacker")
    mapped = x.call("grant_only", domid=v.domid, gfn=4, ro=True)["ref"]
    later = x.call("grant_only", domid=v.domid, gfn=5, ro=True)["ref"]
    (status, handle), = v.call("map", domid=x.domid, refs=[mapped], ro=True)["results"]
    assert status == GNTST_okay
    shrink = x.call("truncate_grant_table")["shrink"]
    # Everything that reads X's table now: a map, an unmap (its flags are cleared), a copy, X's death.
    answers = {
        "map": v.hypercall("map", ops=[[x.domid, later, 1]]),
        "unmap": v.hypercall("unmap", handles=[handle]),
        "copy": v.hypercall("copy", ops=[[GNTCOPY_source_gref, x.domid, later, 0, DOMID_SELF, 2, 0, 8]]),
    }
    x.kill()
    rc = world.broker.proc.poll()
    assert rc is None, (f"X shrank its grant table (ftruncate: {'allowed' if shrink == 0 else shrink}) and the "
                        f"broker died of it (exit status {rc}); what the victim saw: {answers}")
    world.assert_serving(v)


def test_grantee_cannot_resize_or_seal_the_granters_frame(world: World) -> None:
    a = world.spawn("guest")
    b = world.spawn("backend")
    ref = a.call("grant", domid=b.domid, gfn=7, data=SECRET)["ref"]
    res = b.call("abuse_frame_fd", domid=a.domid, ref=ref)
    assert res["status"] == GNTST_okay, res
    try:
        page = a.call("read", gfn=7, len=len(SECRET))["data"]
    except (EOFError, TimeoutError):
        page = None
    worked = [k for k in ("add_seals", "fchmod", "grow", "shrink") if res[k] == 0]
    assert page == SECRET and not worked, (
        f"the backend, holding a writable grant's frame fd, could {worked} it: the guest "
        + ("died" if page is None else f"reads {page!r}") + f" (status {a.proc.poll()}); {res}")
    # The frame is still a frame: the guest grants it again and the backend maps it.
    ref2 = a.call("grant", domid=b.domid, gfn=7, ro=True)["ref"]
    (status, handle), = b.call("map", domid=a.domid, refs=[ref2], ro=True)["results"]
    assert status == GNTST_okay
    assert b.call("peek", handle=handle, len=len(SECRET))["data"] == SECRET
    b.call("unmap", handles=[handle])
    world.assert_serving(a, b)
