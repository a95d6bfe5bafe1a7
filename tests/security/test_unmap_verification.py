"""Attack 2: keep a writable grant's page while telling the broker it is unmapped.

The broker cannot unmap inside a grantee: it checks the grantee's claim
("unmapped") before it clears GTF_writing, so that the granter can end
access and reuse the page only once nobody else can touch it.  Grantee X
maps domain A's page writable with its own raw map hypercall (so it holds
the frame fd), keeps the page some way, drops the ordinary mapping and
says "unmapped":

* mmap:     a second mapping of the frame fd put over one of X's own gfns
            (a broker that skips mappings inside a domain's own memory misses it);
* mremap:   the mapping itself moved onto one of X's own gfns;
* fd:       a dup of the frame fd, never mapped;
* fork:     a child process that inherited the mapping;
* inflight: the frame fd sent into a unix socket of X's own and left
            unread: in no fd table and in no address space until X
            receives it back;
* vmsplice: (read-only grant) the page itself spliced into a pipe of X's:
            the pipe holds the page, not a mapping or a descriptor, and
            reading it later shows the page as it is *then*.

Secure outcome: X never reaches what A puts in the page after A ends
access.  Either the unmap is refused (GNTST_general_error) because the
broker sees X still holds the page (mmap, mremap, fd), so A's end_access
is refused too; or, where no hypervisor outside X can see the page (fork,
inflight, vmsplice), the broker accepts the unmap and A, ending access to
an entry the broker once mapped (XDOM_GTF_mapped), takes a fresh frame for
that gfn: X keeps the old page and writes into it or reads it, and A's
page, reused, is untouched and unseen.  The test reuses the page and looks
for the damage either way.
"""

from __future__ import annotations

import pytest
from helpers import wait_until

from xdom.domains.abi.grant_table import GNTST_general_error, GNTST_okay

from .rig import World

A_GFN = 6
HIJACK_GFN = 11
SECRET = "A's page, lent to X for a while"
REUSED = "A's page, reused for something private"
MARK = "X STILL WRITES HERE"


VISIBLE = ["mmap", "mremap", "fd"]        # the broker sees these and refuses the unmap
HIDDEN = ["fork", "inflight"]             # no one outside X can see these: A's frame is replaced


@pytest.mark.parametrize("how", VISIBLE + HIDDEN)
def test_page_kept_after_claimed_unmap_stays_granted(world: World, how: str) -> None:
    a = world.spawn("granter")
    x = world.spawn("grantee")
    ref = a.call("grant", domid=x.domid, gfn=A_GFN, data=SECRET)["ref"]
    res = x.call("hide", domid=a.domid, ref=ref, how=how, gfn=HIJACK_GFN)
    assert res["status"] == GNTST_okay and res["setup"] == "ok", f"the attack could not be set up: {res}"
    ended = a.call("end", ref=ref)["ok"]
    if how in VISIBLE:
        assert res["unmap"] == GNTST_general_error and not ended, \
            f"X kept A's page ({how}) and the broker believed it unmapped: {res}, end_access {ended}"
    else:
        assert res["unmap"] == GNTST_okay and ended, res      # nothing to see: the claim is believed
        a.call("write", gfn=A_GFN, data=REUSED)
        wrote = x.call("hidden_write", how=how, data=MARK)
        assert wrote.get("wrote"), f"the attack lost its page: {wrote}"       # X still has *a* page
        page = a.call("read", gfn=A_GFN, len=len(REUSED))["data"]
        assert page == REUSED, f"X wrote A's page after A ended access and reused it ({how}): {page!r}"
    world.assert_serving(a, x)


def test_page_kept_readable_after_claimed_unmap_stays_granted(world: World) -> None:
    a = world.spawn("granter")
    x = world.spawn("grantee")
    ref = a.call("grant", domid=x.domid, gfn=A_GFN, ro=True, data=SECRET)["ref"]
    res = x.call("hide", domid=a.domid, ref=ref, how="vmsplice", ro=True)
    assert res["status"] == GNTST_okay and res["setup"] == "ok", f"the attack could not be set up: {res}"
    ended = a.call("end", ref=ref)["ok"]
    assert res["unmap"] == GNTST_okay and ended, res          # a page in a pipe: nothing to see
    a.call("write", gfn=A_GFN, data=REUSED)
    seen = x.call("hidden_read", how="vmsplice", len=len(REUSED))["data"]
    assert seen.startswith(SECRET[:16]), f"the attack lost its page: {seen!r}"   # what X was lent, no more
    assert REUSED not in seen, f"X read what A wrote after ending access: {seen!r}"
    world.assert_serving(a, x)


def test_a_dead_granters_page_is_released_unchecked_and_never_its_again(world: World) -> None:
    """The broker checks an unmap claim only while the granter lives: once it is dead its memory is
    gone for good (a restart brings fresh frames), so X keeping the page reaches nothing of A's
    again, and the check -- a read of X's whole memory map -- would protect no one."""
    a = world.spawn("granter")
    x = world.spawn("grantee")
    ref = a.call("grant", domid=x.domid, gfn=A_GFN, data=SECRET)["ref"]
    res = x.call("hide", domid=a.domid, ref=ref, how="mmap", gfn=HIJACK_GFN, unmap=False)
    assert res["status"] == GNTST_okay and res["setup"] == "ok", f"the attack could not be set up: {res}"
    a.kill()
    wait_until(lambda: world.mgmt.request("info", domid=a.domid)["domain"]["state"] != "running",
               what="the broker to see the granter die")
    claim = x.hypercall("unmap", handles=[res["handle"]])
    assert claim["errno"] is None and claim["reply"]["results"] == [GNTST_okay], claim
    # A again, under its domid: fresh memory.  X's kept page is the dead A's, not the new A's.
    a2 = world.adopt(world.mgmt.request("restart", domid=a.domid, uid=a.uid), a.uid)
    a2.call("write", gfn=A_GFN, data=REUSED)
    x.call("write", gfn=HIJACK_GFN, data=MARK)
    assert a2.call("read", gfn=A_GFN, len=len(REUSED))["data"] == REUSED
    assert x.call("peek_gfn", gfn=HIJACK_GFN, len=len(SECRET))["data"] == MARK + SECRET[len(MARK):]
    world.assert_serving(a2, x)
