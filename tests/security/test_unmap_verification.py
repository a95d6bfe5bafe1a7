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

Secure outcome: the unmap is refused (GNTST_general_error) while X can
still reach the page, so A's end_access is refused too.  When a broker
accepts the claim instead, the test shows the damage: A ends access,
reuses the page, and X writes into it.
"""

from __future__ import annotations

import pytest

from xdom.domains.abi.grant_table import GNTST_general_error, GNTST_okay

from .rig import World

A_GFN = 6
HIJACK_GFN = 11
SECRET = "A's page, lent to X for a while"
REUSED = "A's page, reused for something private"
MARK = "X STILL WRITES HERE"


@pytest.mark.parametrize("how", ["mmap", "mremap", "fd", "fork", "inflight"])
def test_page_kept_after_claimed_unmap_stays_granted(world: World, how: str) -> None:
    a = world.spawn("granter")
    x = world.spawn("grantee")
    ref = a.call("grant", domid=x.domid, gfn=A_GFN, data=SECRET)["ref"]
    res = x.call("hide", domid=a.domid, ref=ref, how=how, gfn=HIJACK_GFN)
    assert res["status"] == GNTST_okay and res["setup"] == "ok", f"the attack could not be set up: {res}"
    ended = a.call("end", ref=ref)["ok"]
    damage = ""
    if ended:
        a.call("write", gfn=A_GFN, data=REUSED)
        wrote = x.call("hidden_write", how=how, data=MARK)
        page = a.call("read", gfn=A_GFN, len=len(REUSED))["data"]
        damage = f"; A ended access and reused the page, then X wrote it ({wrote}): A's page reads {page!r}"
    if res["unmap"] == GNTST_okay or ended:
        pytest.fail(f"X kept A's writable page ({how}) and the broker believed it unmapped: unmap status "
                    f"{res['unmap']}, A's end_access {'accepted' if ended else 'refused'}{damage}")
    assert res["unmap"] == GNTST_general_error, res
    world.assert_serving(a, x)


def test_page_kept_readable_after_claimed_unmap_stays_granted(world: World) -> None:
    a = world.spawn("granter")
    x = world.spawn("grantee")
    ref = a.call("grant", domid=x.domid, gfn=A_GFN, ro=True, data=SECRET)["ref"]
    res = x.call("hide", domid=a.domid, ref=ref, how="vmsplice", ro=True)
    assert res["status"] == GNTST_okay and res["setup"] == "ok", f"the attack could not be set up: {res}"
    ended = a.call("end", ref=ref)["ok"]
    damage = ""
    if ended:
        a.call("write", gfn=A_GFN, data=REUSED)
        seen = x.call("hidden_read", how="vmsplice", len=len(REUSED))["data"]
        damage = f"; A ended access and reused the page, and X read what A wrote since: {seen!r}"
    if res["unmap"] == GNTST_okay or ended:
        pytest.fail(f"X kept A's page in a pipe (vmsplice) and the broker believed it unmapped: unmap status "
                    f"{res['unmap']}, A's end_access {'accepted' if ended else 'refused'}{damage}")
    assert res["unmap"] == GNTST_general_error, res
    world.assert_serving(a, x)
