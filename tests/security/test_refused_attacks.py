"""Attack 5: what the broker and the kernel refuse already, tried from a domain process under its own uid.

tests/test_hostile_hypercalls.py tries most of these in-process (every
domain under the test's own uid); here the attacker is a separate process
under a uid of its own, granted pages by a domain under another uid, as the
supervisor runs them: writing through a read-only mapping every way a
process can, copying into a read-only grant, copies that cross the page or
name frames without a grant, handles and ports that are someone else's,
the global VIRQ_DOM_EXC, and frames the wire format forbids.
"""

from __future__ import annotations

import errno

from xdom.domains.abi.event_channel import DOMID_SELF, VIRQ_DOM_EXC
from xdom.domains.abi.grant_table import (
    GNTTAB_COPY,
    PAGE_SIZE,
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTST_bad_copy_arg,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_general_error,
    GNTST_okay,
    GNTST_permission_denied,
)

from .rig import Dom, World

A_GFN = 5
SECRET = "A's page, nobody writes it but A"
MINE = "X's own bytes, not A's"
MARK = "WRITTEN BY THE ATTACKER"


def _a_page(a: Dom) -> str:
    return a.call("read", gfn=A_GFN, len=len(SECRET))["data"]


def test_read_only_mapping_cannot_be_written_any_way(world: World) -> None:
    a = world.spawn("granter")
    x = world.spawn("grantee")
    ref = a.call("grant", domid=x.domid, gfn=A_GFN, ro=True, data=SECRET)["ref"]
    res = x.call("write_read_only", domid=a.domid, ref=ref, data=MARK)
    assert res["status"] == GNTST_okay, res
    assert _a_page(a) == SECRET, f"X wrote A's read-only page: {res}"
    ways = {k: v for k, v in res.items() if k not in ("status", "handle", "unmap")}
    assert all(v != 0 for v in ways.values()), f"a way to write a read-only mapping worked: {ways}"
    # Reopening the read-only descriptor for writing: the file is another uid's (or root's), mode 0600.
    assert res["reopen_proc_fd"] == errno.EACCES, res
    assert res["mmap_writable"] == errno.EACCES and res["mprotect"] == errno.EACCES, res
    assert res["store_instruction"] == "signal SIGSEGV", res
    assert res["reopen_in_user_namespace"] != "exit 0", res
    assert res["unmap"] == GNTST_okay
    assert a.call("end", ref=ref)["ok"]
    world.assert_serving(a, x)


def test_copies_into_read_only_grants_and_across_pages_are_refused(world: World) -> None:
    a = world.spawn("granter")
    x = world.spawn("attacker")
    z = world.spawn("bystander")
    ro = a.call("grant", domid=x.domid, gfn=A_GFN, ro=True, data=SECRET)["ref"]
    rw = a.call("grant", domid=x.domid, gfn=A_GFN + 1, data=SECRET)["ref"]
    theirs = a.call("grant", domid=z.domid, gfn=A_GFN, ro=True)["ref"]
    x.call("write", gfn=3, data=MARK)
    x.call("write", gfn=4, data=MINE)
    cases = {
        "into a read-only grant": ([GNTCOPY_dest_gref, DOMID_SELF, 3, 0, a.domid, ro, 0, 16], GNTST_general_error),
        "into a grant for someone else": ([GNTCOPY_dest_gref, DOMID_SELF, 3, 0, a.domid, theirs, 0, 16],
                                          GNTST_general_error),
        "out of a grant for someone else": ([GNTCOPY_source_gref, a.domid, theirs, 0, DOMID_SELF, 4, 0, 16],
                                            GNTST_general_error),
        "A's gfn as a local source": ([0, a.domid, A_GFN, 0, DOMID_SELF, 4, 0, 16], GNTST_permission_denied),
        "A's gfn as a local destination": ([0, DOMID_SELF, 3, 0, a.domid, A_GFN, 0, 16], GNTST_permission_denied),
        "destination offset past the page": ([GNTCOPY_dest_gref, DOMID_SELF, 3, 0, a.domid, rw, PAGE_SIZE - 8, 16],
                                             GNTST_bad_copy_arg),
        "source offset past the page": ([GNTCOPY_source_gref, a.domid, rw, PAGE_SIZE - 8, DOMID_SELF, 4, 0, 16],
                                        GNTST_bad_copy_arg),
        "longer than a page": ([GNTCOPY_source_gref, a.domid, rw, 0, DOMID_SELF, 4, 0, PAGE_SIZE + 1],
                               GNTST_bad_copy_arg),
        "a reference past the table": ([GNTCOPY_source_gref, a.domid, 2**32 - 1, 0, DOMID_SELF, 4, 0, 16],
                                       GNTST_bad_gntref),
    }
    got = {}
    for what, (op, _) in cases.items():
        res = x.hypercall("copy", ops=[op])
        got[what] = res["reply"]["results"][0] if res["errno"] is None else res["errno"]
    assert got == {what: want for what, (_, want) in cases.items()}, got
    assert _a_page(a) == SECRET
    assert a.call("read", gfn=A_GFN + 1, len=len(SECRET))["data"] == SECRET
    assert x.call("peek_gfn", gfn=4, len=len(MINE))["data"] == MINE, "A's bytes reached X"
    # What the wire refuses outright: segments of Xen's struct gnttab_copy (40 bytes) cut short or run over.
    one = GNTTAB_COPY.pack(3, DOMID_SELF, 0, rw, a.domid, 0, 16, GNTCOPY_dest_gref, 0)
    for blob in (one[:-1], one + b"\0", one * 2 + one[:20]):
        assert x.hypercall("copy", ops=blob.hex())["errno"] == "EINVAL", blob
    # The grant X does hold still copies, within the page.
    res = x.hypercall("copy", ops=[[GNTCOPY_dest_gref, DOMID_SELF, 3, 0, a.domid, rw, 0, len(MARK)]])
    assert res["reply"]["results"] == [GNTST_okay]
    assert a.call("read", gfn=A_GFN + 1, len=len(MARK))["data"] == MARK
    world.assert_serving(a, x, z)


def test_grants_handles_and_ports_of_others(world: World) -> None:
    a = world.spawn("granter")
    x = world.spawn("attacker")
    z = world.spawn("bystander")
    ro = a.call("grant", domid=x.domid, gfn=A_GFN, ro=True, data=SECRET)["ref"]
    theirs = a.call("grant", domid=z.domid, gfn=A_GFN + 2)["ref"]
    res = x.hypercall("map", ops=[[a.domid, ro, 0], [a.domid, theirs, 0], [a.domid, theirs, 1],
                                  [a.domid, 2**32 - 1, 1], [a.domid, 0, 1]])
    assert [s for s, _ in res["reply"]["results"]] == [GNTST_general_error, GNTST_general_error,
                                                      GNTST_general_error, GNTST_bad_gntref,
                                                      GNTST_general_error], res
    assert res["fds"] == 0
    # Z's mapping is Z's: X cannot unmap it by its handle (nor by any other).
    (status, zh), = z.call("map", domid=a.domid, refs=[theirs])["results"]
    assert status == GNTST_okay
    res = x.hypercall("unmap", handles=[zh, 0, 12345, 2**32 - 1])
    assert res["reply"]["results"] == [GNTST_bad_handle] * 4, res
    assert not a.call("end", ref=theirs)["ok"], "A ended a grant Z still maps"
    assert z.call("unmap", handles=[zh])["results"] == [GNTST_okay]
    assert a.call("end", ref=theirs)["ok"]
    # A port offered to Z is not X's to bind; ports X does not have are nobody's business.
    port = a.call("alloc_unbound", remote=z.domid)["port"]
    assert x.hypercall("evtchn_bind_interdomain", remote_dom=a.domid, remote_port=port)["errno"] == "EINVAL"
    for op in ("evtchn_send", "evtchn_close", "evtchn_status", "evtchn_fds"):
        assert x.hypercall(op, port=port)["errno"] == "EINVAL", op
    assert z.call("bind", remote=a.domid, port=port)["port"] > 0      # still Z's to bind
    # The global VIRQ_DOM_EXC is the privileged domain's; so is asking about other domains.
    assert x.hypercall("evtchn_bind_virq", virq=VIRQ_DOM_EXC)["errno"] == "EPERM"
    assert x.hypercall("domain_info", domid=a.domid)["errno"] == "EPERM"
    world.assert_serving(a, x, z)


def test_malformed_frames_and_frames_with_descriptors(world: World) -> None:
    x = world.spawn("attacker")
    res = x.call("bad_frames")
    assert res["answers"] == ["EBADMSG", "EBADMSG", "EBADMSG", "ENOSYS", "EINVAL", "EINVAL", "EINVAL", "EBADMSG",
                              "EINVAL"], res
    assert res["with_fds"] == "EINVAL" and res["fds_released"], res
    assert res["still_served"] == x.domid, res
    world.assert_serving(x)
