"""Hostile hypercall batches and arguments: entries out of range, nonsense in range, bad memory bases.

Grant map/unmap/copy batches over the limit or with entries out of range,
in-range nonsense (which gets Xen's per-entry grant status codes, not an
error for the whole batch), event-channel arguments out of range, memory
registered at bad bases, and the frames populate_physmap hands out; sent by
hand on a raw connection (tests/hypercall_client.py) while two well-behaved
domains keep being served.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
from collections.abc import Iterator
from typing import Any

import pytest
from hypercall_client import Bystanders, Raw, copy_blob, pack, raw_connections, served_bystanders

from xdom.broker.mgmt_client import ManagementClient
from xdom.deploy.launcher import BrokerProcess
from xdom.domains.abi.event_channel import (
    DOMID_SELF,
    NR_VIRQS,
    VIRQ_DOM_EXC,
    EVTCHNSTAT_unbound,
)
from xdom.domains.abi.grant_table import (
    PAGE_SIZE,
    GNTCOPY_source_gref,
    GNTST_bad_copy_arg,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_bad_page,
    GNTST_general_error,
    GNTST_okay,
    GNTST_permission_denied,
    GTF_reading,
)
from xdom.domains.abi.hypercall_wire import (
    MAX_BATCH,
    MAX_FDS,
)
from xdom.domains.hostsys import sysmem
from xdom.domains.hostsys.memory import DomainMemory


@pytest.fixture
def bystanders(broker: BrokerProcess, mgmt: ManagementClient) -> Iterator[Bystanders]:
    yield from served_bystanders(broker, mgmt)


@pytest.fixture
def raw(mgmt: ManagementClient) -> Iterator[Raw]:
    yield from raw_connections(mgmt)


# ---- batches and their entries -------------------------------------------------


def test_batches_over_the_limit_are_e2big(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.running()
    me = creds["domid"]
    for n in (MAX_BATCH + 1, 2 * MAX_BATCH, 1000):
        conn.expect({"op": "map", "ops": [[bystanders.granter.domid, 8, 1]] * n}, "E2BIG")
        conn.expect({"op": "unmap", "handles": [1] * n}, "E2BIG")
        conn.expect({"op": "copy", "ops": copy_blob([[0, me, 0, 0, me, 1, 0, 8]] * n)}, "E2BIG")
    # The limit itself is fine (nothing is granted, so each entry fails on its own).
    reply = conn.ok({"op": "map", "ops": [[bystanders.granter.domid, 8, 1]] * MAX_BATCH})
    assert reply["results"] == [[GNTST_general_error, 0]] * MAX_BATCH and conn.last_fds == 0
    reply = conn.ok({"op": "unmap", "handles": list(range(1, MAX_BATCH + 1))})
    assert reply["results"] == [GNTST_bad_handle] * MAX_BATCH
    reply = conn.ok({"op": "copy", "ops": copy_blob([[0, me, 0, 0, me, 1, 0, 8]] * MAX_BATCH)})
    assert reply["results"] == [GNTST_okay] * MAX_BATCH
    # Beyond the decoder's array limit the frame is refused before it is built.
    conn.expect({"op": "unmap", "handles": [1] * (MAX_BATCH * 8 + 1)}, "EBADMSG")
    assert raw.mgmt.request("stats")["mappings"] == 0
    bystanders.check()


def test_out_of_range_batch_entries_are_einval(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.running()
    me, g = creds["domid"], bystanders.granter
    ref = g.gnttab.grant_access(me, 5, readonly=True)
    good = [g.domid, ref, 1]
    bad_map_entries: list[Any] = [
        [g.domid, 2**32, 1], [g.domid, -1, 1], [-1, ref, 1], [2**32, ref, 1], [g.domid, ref, 2**63],
        [g.domid, ref, -1], [g.domid, ref], [g.domid, ref, 1, 0], [], 5, None, "entry",
        {"domid": g.domid}, [str(g.domid), ref, 1], [g.domid, float(ref), 1], [g.domid, ref, None],
        [[g.domid], ref, 1],
    ]
    for entry in bad_map_entries:
        # One bad entry refuses the whole batch: the good entry before it is not mapped.
        conn.expect({"op": "map", "ops": [good, entry]}, "EINVAL")
        assert conn.last_fds == 0
    assert raw.mgmt.request("info", domid=me)["domain"]["mappings_held"] == 0
    assert not g.gnttab.entry(ref)[0] & GTF_reading
    for handle in (-1, 2**32, 2**64 - 1, "1", 1.0, None, [1]):
        conn.expect({"op": "unmap", "handles": [1, handle]}, "EINVAL")
    # Copy segments are Xen's struct gnttab_copy, 40 bytes each: every value fits its field by construction,
    # so what is left to refuse is a batch that is not whole segments, or not bytes at all.
    copy_ok = copy_blob([[0, me, 0, 0, me, 1, 0, 8]])
    for ops in (copy_ok[:-1], copy_ok + b"\0", copy_ok * 2 + copy_ok[:39], b"\0", [[0, me, 0, 0, me, 1, 0, 8]],
                copy_ok.hex(), None, 0):
        conn.expect({"op": "copy", "ops": ops}, "EINVAL")
    assert conn.ok({"op": "copy", "ops": copy_ok * 2})["results"] == [GNTST_okay] * 2
    # The good entry on its own still maps, exactly once.
    reply = conn.ok({"op": "map", "ops": [good]})
    assert reply["results"][0][0] == GNTST_okay and conn.last_fds == 1
    assert g.gnttab.entry(ref)[0] & GTF_reading
    assert conn.ok({"op": "unmap", "handles": [reply["results"][0][1]]})["results"] == [GNTST_okay]
    g.gnttab.end_and_release(ref)
    bystanders.check()


def test_a_read_only_map_is_sent_a_read_only_descriptor_whatever_was_sent_before(
        raw: Raw, bystanders: Bystanders) -> None:
    """The broker keeps descriptors of frames it lately sent; one opened for a writable map must never
    go out for a read-only one, where a hostile grantee would mmap it writable."""
    conn, creds = raw.running()
    me, g = creds["domid"], bystanders.granter
    ref = g.gnttab.grant_access(me, 6)
    for readonly, mode in ((0, os.O_RDWR), (1, os.O_RDONLY), (0, os.O_RDWR), (1, os.O_RDONLY)):
        fds: list[int] = []
        conn.send(pack({"op": "map", "ops": [[g.domid, ref, readonly]]}))
        reply = conn.recv(fds)
        try:
            (status, handle), = reply["results"]
            assert status == GNTST_okay and len(fds) == 1
            assert fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_ACCMODE == mode, (readonly, mode)
            if readonly:
                with pytest.raises(PermissionError):
                    mmap.mmap(fds[0], PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            for fd in fds:
                os.close(fd)
        assert conn.ok({"op": "unmap", "handles": [handle]})["results"] == [GNTST_okay]
    g.gnttab.end_and_release(ref)
    bystanders.check()


def test_a_handle_named_twice_in_one_unmap_is_released_once(raw: Raw, bystanders: Bystanders) -> None:
    """An unmap batch releases each mapping once, and two mappings of one entry are two pins: the
    entry is free for its granter only when both are gone."""
    conn, creds = raw.running()
    me, g = creds["domid"], bystanders.granter
    ref = g.gnttab.grant_access(me, 7, readonly=True)
    handles = [h for status, h in conn.ok({"op": "map", "ops": [[g.domid, ref, 1]] * 2})["results"]]
    assert len(set(handles)) == 2
    assert conn.ok({"op": "unmap", "handles": [handles[0]] * 3})["results"] == [
        GNTST_okay, GNTST_bad_handle, GNTST_bad_handle]
    assert g.gnttab.entry(ref)[0] & GTF_reading          # the second mapping still pins it
    assert not g.gnttab.try_end_access(ref)
    assert conn.ok({"op": "unmap", "handles": [handles[1], handles[0]]})["results"] == [
        GNTST_okay, GNTST_bad_handle]
    assert not g.gnttab.entry(ref)[0] & GTF_reading
    g.gnttab.end_and_release(ref)
    bystanders.check()


def test_in_range_nonsense_gets_grant_status_codes(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.running()
    me, g, p = creds["domid"], bystanders.granter, bystanders.peer
    reply = conn.ok({"op": "map", "ops": [[g.domid, 2**32 - 1, 1], [0x7FEF, 0, 1], [g.domid, 9, 0],
                                          [me, 9, 1], [DOMID_SELF, 0, 0]]})
    assert [s for s, _ in reply["results"]] == [GNTST_bad_gntref, GNTST_bad_domain, GNTST_general_error,
                                               GNTST_general_error, GNTST_bad_domain]
    assert conn.last_fds == 0
    assert conn.ok({"op": "unmap", "handles": [0, 1, 2**32 - 1]})["results"] == [GNTST_bad_handle] * 3
    reply = conn.ok({"op": "copy", "ops": copy_blob([
        [0, me, 0, 0, me, 1, 0, PAGE_SIZE + 1],            # too long
        [0, me, 0, PAGE_SIZE, me, 1, 0, 1],                # offset past the page
        [0, me, 2**32 - 1, 0, me, 0, 0, 8],                # own gfn out of range
        [0, p.domid, 0, 0, me, 0, 0, 8],                   # someone else's gfn: never
        [0, me, 0, 0, g.domid, 0, 0, 8],
        [GNTCOPY_source_gref, 0x7FEF, 0, 0, me, 0, 0, 8],  # no such granter
        [GNTCOPY_source_gref, g.domid, 2**32 - 1, 0, me, 0, 0, 8],
        [0, me, 0, 0, me, 1, 0, 0],                        # empty copy: fine
        [0, me, 2**64 - 1, 0, me, 0, 0, 8],                # the largest gfn the struct holds
        [GNTCOPY_source_gref, g.domid, 2**64 - 1, 0, me, 0, 0, 8],  # a ref is u.ref: the low 32 bits
    ])})
    assert reply["results"] == [GNTST_bad_copy_arg, GNTST_bad_copy_arg, GNTST_bad_page,
                                GNTST_permission_denied, GNTST_permission_denied, GNTST_bad_domain,
                                GNTST_bad_gntref, GNTST_okay, GNTST_bad_page, GNTST_bad_gntref]
    assert raw.mgmt.request("stats")["mappings"] == 0
    bystanders.check()


def test_event_channel_arguments_out_of_range(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.running()
    p = bystanders.peer
    for remote in (-1, DOMID_SELF + 1, 2**32, 2**64 - 1, -2**63):
        conn.expect({"op": "evtchn_alloc_unbound", "remote_dom": remote}, "EINVAL")
        conn.expect({"op": "evtchn_bind_interdomain", "remote_dom": remote, "remote_port": 1}, "EINVAL")
    conn.expect({"op": "evtchn_alloc_unbound", "remote_dom": 0x7FEF}, "ESRCH")
    conn.expect({"op": "evtchn_bind_interdomain", "remote_dom": 0x7FEF, "remote_port": 1}, "ESRCH")
    # The bystander's port is bound to its granter, not to us.
    port = p.alloc_unbound(bystanders.granter.domid)
    conn.expect({"op": "evtchn_bind_interdomain", "remote_dom": p.domid, "remote_port": port}, "EINVAL")
    p.close_port(port)
    for port in (-1, 0, 2**32, 2**64 - 1, -2**63, 4096):
        conn.expect({"op": "evtchn_bind_interdomain", "remote_dom": p.domid, "remote_port": port}, "EINVAL")
        for op in ("evtchn_close", "evtchn_status", "evtchn_send"):
            conn.expect({"op": op, "port": port}, "EINVAL")
    for virq in (-1, NR_VIRQS, 2**63):
        conn.expect({"op": "evtchn_bind_virq", "virq": virq}, "EINVAL")
    conn.expect({"op": "evtchn_bind_virq", "virq": VIRQ_DOM_EXC}, "EPERM")    # global, unprivileged
    conn.expect({"op": "domain_info", "domid": p.domid}, "EPERM")
    conn.expect({"op": "domain_info", "domid": -1}, "EPERM")
    conn.expect({"op": "set_memory", "base": conn.memory.base}, "EALREADY")  # type: ignore[union-attr]
    conn.expect({"op": "shutdown", "reason": "explode"}, "EINVAL")
    conn.expect({"op": "shutdown", "reason": ""}, "EINVAL")
    assert p.port_status(p.alloc_unbound(DOMID_SELF))["status"] == EVTCHNSTAT_unbound
    bystanders.check()


def test_set_memory_with_bad_bases(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.introduced()
    nr = creds["nr_frames"]
    conn.expect({"op": "set_memory", "base": 0x7F0000000000}, "EINVAL")   # nothing populated yet
    own = DomainMemory(nr, conn.populate)                                  # the broker's frames, mapped
    for base in (0, -PAGE_SIZE, 1, PAGE_SIZE + 1, 1 << 47, 2**64 - PAGE_SIZE):
        conn.expect({"op": "set_memory", "base": base}, "EINVAL")
    conn.expect({"op": "set_memory", "base": PAGE_SIZE}, "EFAULT")          # nothing mapped there
    anon = sysmem.mmap(0, nr * PAGE_SIZE, sysmem.PROT_READ | sysmem.PROT_WRITE,
                       sysmem.MAP_PRIVATE | sysmem.MAP_ANONYMOUS)
    homemade = DomainMemory(nr)                                            # frame-like memfds, not the broker's
    try:
        conn.expect({"op": "set_memory", "base": anon}, "EFAULT")            # not frame memfds
        conn.expect({"op": "set_memory", "base": homemade.base}, "EFAULT")   # memfds, but not its frames
    finally:
        sysmem.munmap(anon, nr * PAGE_SIZE)
        homemade.close()
    assert raw.mgmt.request("info", domid=creds["domid"])["domain"]["state"] == "created"
    conn.memory = own
    conn.ok({"op": "set_memory", "base": own.base})
    conn.probe()
    bystanders.check()


def test_populate_physmap_hands_out_each_frame_once_sealed_and_root_owned(raw: Raw, bystanders: Bystanders) -> None:
    """The broker makes a domain's frames: any gfn not populated yet, each once, in batches
    it bounds, and each sealed against truncation (a holder of a frame's fd cannot make
    another mapper fault) and closed to other uids (mode 0600, root's)."""
    conn, creds = raw.introduced()
    nr = creds["nr_frames"]
    conn.expect({"op": "populate_physmap", "start": 0, "count": 0}, "EINVAL")
    conn.expect({"op": "populate_physmap", "start": 0, "count": MAX_FDS + 1}, "E2BIG")
    conn.expect({"op": "populate_physmap", "start": -1, "count": 1}, "EINVAL")
    conn.expect({"op": "populate_physmap", "start": nr - 1, "count": 2}, "EINVAL")   # past its memory
    for fd in conn.populate(nr - 1, 1):              # out of order: the store ring's frame sits at the top
        os.close(fd)
    fds = conn.populate(0, 2)
    try:
        assert len(fds) == 2
        inodes = set()
        for fd in fds:
            st = os.fstat(fd)
            assert (st.st_size, st.st_uid, stat.S_IMODE(st.st_mode)) == (PAGE_SIZE, 0, 0o600)
            inodes.add(st.st_ino)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 2 * PAGE_SIZE)
        assert len(inodes) == 2
    finally:
        for fd in fds:
            os.close(fd)
    conn.expect({"op": "populate_physmap", "start": 0, "count": 1}, "EINVAL")     # given already
    conn.expect({"op": "populate_physmap", "start": 1, "count": 2}, "EINVAL")     # gfn 1 given already
    conn.expect({"op": "populate_physmap", "start": nr - 2, "count": 2}, "EINVAL")    # the top one too
    for start in range(2, nr - 1, MAX_FDS):
        for fd in conn.populate(start, min(MAX_FDS, nr - 1 - start)):
            os.close(fd)
    conn.expect({"op": "populate_physmap", "start": nr, "count": 1}, "EINVAL")    # beyond its memory
    for start in range(0, nr, MAX_FDS):                                          # nothing left to make
        conn.expect({"op": "populate_physmap", "start": start, "count": min(MAX_FDS, nr - start)}, "EINVAL")
    bystanders.check()
