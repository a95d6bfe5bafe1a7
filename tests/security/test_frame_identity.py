"""Attack 1: a read-only grant made writable by passing the page off as one of the grantee's own frames.

Domain A grants domain X one page, read-only.  X maps it, then puts that
page over one of its *own* gfns with ``mmap(MAP_FIXED)`` of the frame fd
the broker sent, grants that gfn writable (to itself, or to a colluding
domain Z) and maps it.  A broker that trusts what is mapped at a gfn's
address opens ``/proc/X/map_files/<gfn>`` read-write and hands out a
writable descriptor of A's page.  The same page reached by a grant copy
(Z copies into X's grant, or X into its own gfn) must be refused as well.

X can also pass the page on read-only: Z maps X's read-only grant of that
gfn, or copies out of it, and reads A's live page although A never granted
Z anything ("no domain can reach another domain's frames except through a
grant that the owner wrote").

Secure outcome: the map or copy fails (GNTST_bad_page or another error,
never GNTST_okay), A's page keeps its bytes and Z never sees them.
"""

from __future__ import annotations

import pytest

from xdom.domains.abi.event_channel import DOMID_SELF
from xdom.domains.abi.grant_table import GNTCOPY_dest_gref, GNTCOPY_source_gref, GNTST_okay

from .rig import Dom, World

A_GFN = 5             # A's page, granted read-only to X
HIJACK_GFN = 10       # X's own gfn that A's page is put over
MARK_GFN = 3          # where X or Z keep the bytes they try to plant
SECRET = "A's page, read-only for X"
MARK = "PLANTED BY THE ATTACKER"


def _overlay(world: World) -> tuple[Dom, Dom]:
    a = world.spawn("granter")
    x = world.spawn("grantee")
    ref = a.call("grant", domid=x.domid, gfn=A_GFN, ro=True, data=SECRET)["ref"]
    ov = x.call("overlay", domid=a.domid, ref=ref, ro=True, gfn=HIJACK_GFN)
    # The set-up works everywhere: X legitimately sees A's page, now at its own gfn.
    assert ov["status"] == GNTST_okay and ov["seen"].startswith(SECRET), ov
    return a, x


def _a_page(a: Dom) -> str:
    return a.call("read", gfn=A_GFN, len=len(MARK))["data"]


@pytest.mark.parametrize("mapper", ["itself", "a third domain"])
def test_read_only_page_over_own_gfn_cannot_be_granted_on_writable(world: World, mapper: str) -> None:
    a, x = _overlay(world)
    z = x if mapper == "itself" else world.spawn("accomplice")
    xref = x.call("grant_only", domid=z.domid, gfn=HIJACK_GFN)["ref"]
    res = z.call("map_and_write", domid=x.domid, ref=xref, data=MARK)
    page = _a_page(a)
    if page.startswith(MARK):
        pytest.fail(f"X turned A's read-only grant writable: {mapper} mapped X's grant of gfn {HIJACK_GFN} "
                    f"({res}) and wrote A's page, which now reads {page!r}")
    assert res["status"] != GNTST_okay, f"the broker handed out a writable mapping of A's read-only page: {res}"
    world.assert_serving(a, x, z)


@pytest.mark.parametrize("copier", ["a third domain, into X's grant", "X, into its own gfn"])
def test_read_only_page_over_own_gfn_cannot_be_copied_into(world: World, copier: str) -> None:
    a, x = _overlay(world)
    if copier.startswith("X"):
        c = x
        op = [0, DOMID_SELF, MARK_GFN, 0, DOMID_SELF, HIJACK_GFN, 0, len(MARK)]
    else:
        c = world.spawn("accomplice")
        xref = x.call("grant_only", domid=c.domid, gfn=HIJACK_GFN)["ref"]
        op = [GNTCOPY_dest_gref, DOMID_SELF, MARK_GFN, 0, x.domid, xref, 0, len(MARK)]
    c.call("write", gfn=MARK_GFN, data=MARK)
    res = c.hypercall("copy", ops=[op])
    page = _a_page(a)
    if page.startswith(MARK):
        pytest.fail(f"{copier}: a grant copy wrote A's read-only page ({res}): {page!r}")
    assert res["errno"] is None and res["reply"]["results"] != [GNTST_okay], res
    world.assert_serving(a, x, c)


@pytest.mark.parametrize("how", ["map", "copy"])
def test_page_over_own_gfn_is_not_passed_on_to_a_third_domain(world: World, how: str) -> None:
    a, x = _overlay(world)
    z = world.spawn("accomplice")
    xref = x.call("grant_only", domid=z.domid, gfn=HIJACK_GFN, ro=True)["ref"]
    if how == "map":
        (status, handle), = z.call("map", domid=x.domid, refs=[xref], ro=True)["results"]
        seen = z.call("peek", handle=handle, len=len(SECRET))["data"] if status == GNTST_okay else ""
    else:
        res = z.hypercall("copy", ops=[[GNTCOPY_source_gref, x.domid, xref, 0, DOMID_SELF, MARK_GFN, 0, len(SECRET)]])
        status = res["reply"]["results"][0] if res["errno"] is None else res["errno"]
        seen = z.call("peek_gfn", gfn=MARK_GFN, len=len(SECRET))["data"]
    if seen == SECRET:
        pytest.fail(f"Z read A's page, never granted to Z, through X's grant of X's gfn {HIJACK_GFN} "
                    f"({how}, status {status})")
    assert status != GNTST_okay, f"the broker passed A's page off as X's frame ({how})"
    world.assert_serving(a, x, z)
