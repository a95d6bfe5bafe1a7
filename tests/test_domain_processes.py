"""Domains as separate processes: isolation, death, notifications."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from helpers import RemoteDomain, wait_until

from xdom.domains.abi.event_channel import VIRQ_DOM_EXC
from xdom.domains.abi.grant_table import GNTST_bad_domain, GNTST_general_error, GNTST_okay


@pytest.fixture
def spawn(mgmt) -> Iterator:
    started: list[RemoteDomain] = []

    def make(name: str, **kw) -> RemoteDomain:
        d = RemoteDomain(mgmt, name, **kw)
        started.append(d)
        return d
    try:
        yield make
    finally:
        for d in started:
            d.stop()


def test_event_channel_ping_pong_between_processes(spawn) -> None:
    a, b = spawn("a"), spawn("b")
    pa = a.call("alloc_unbound", remote=b.domid)["port"]
    pb = b.call("bind", remote=a.domid, port=pa)["port"]
    # b answers every event; a starts each round: 2000 round trips
    b.send("pingpong", port=pb, n=2000, first=False)
    ra = a.call("pingpong", port=pa, n=2000, first=True)
    rb = b.read(30)
    assert ra["elapsed"] > 0 and rb["elapsed"] > 0


DOMAIN_UID = 61000 + os.getpid() % 1000


def _uid_can_run_domains() -> bool:
    """Can an unprivileged uid run this interpreter and import xdom from here?"""
    if os.geteuid() != 0:
        return False
    try:
        probe = subprocess.run([sys.executable, "-c", "import xdom.domains.xenhost"], user=DOMAIN_UID,
                               group=DOMAIN_UID, extra_groups=[], capture_output=True, cwd="/")
    except OSError:
        return False
    return probe.returncode == 0


@pytest.mark.parametrize("separate_uid", [False, pytest.param(True, marks=pytest.mark.skipif(
    not _uid_can_run_domains(),
    reason="needs root, and an interpreter and checkout other uids can read (make test's .venv uses /usr/bin/python3)"))])
def test_read_only_grant_cannot_be_written(spawn, mgmt, broker, separate_uid) -> None:
    granter = spawn("granter")
    backend = spawn("backend", uid=DOMAIN_UID if separate_uid else None)
    ref = granter.call("grant", domid=backend.domid, gfn=7, ro=True, data="read-only page")["ref"]
    (status, handle), = backend.call("map", domid=granter.domid, refs=[ref], ro=True)["results"]
    assert status == GNTST_okay
    assert backend.call("peek", handle=handle, len=14)["data"] == "read-only page"
    # upgrading the mapping's protection is refused by the kernel
    assert backend.call("mprotect", handle=handle)["errno"] == errno.EACCES
    # so is mapping the received fd writable, or reopening it for writing
    raw = backend.call("raw_map_write", domid=granter.domid, ref=ref)
    assert raw["results"][0][0] == GNTST_okay
    assert raw["errnos"][0] == errno.EACCES
    # Reopening the fd read-write through /proc/self/fd is stopped by the
    # frame's mode (0600, owned by the granter's uid): it holds when domains
    # run under their own uids, which is how the supervisor runs them as root.
    if separate_uid:
        assert raw["errnos"][1] == errno.EACCES
    # a direct write faults: the process dies of SIGSEGV, the page is intact
    with pytest.raises(EOFError):
        backend.call("poke", handle=handle, data="scribble")
    assert backend.proc.wait() == -signal.SIGSEGV
    assert granter.call("read", gfn=7, len=14)["data"] == "read-only page"
    # the broker is up, and the dead backend's mapping was released
    assert broker.proc.poll() is None
    wait_until(lambda: mgmt.request("info", domid=backend.domid)["domain"]["state"] == "crashed")
    assert granter.call("end", ref=ref)["ok"] is True


def test_killing_a_mapping_process_frees_its_mappings(spawn, mgmt) -> None:
    granter, backend = spawn("granter"), spawn("backend")
    refs = [granter.call("grant", domid=backend.domid, gfn=g)["ref"] for g in range(16)]
    results = backend.call("map", domid=granter.domid, refs=refs)["results"]
    assert all(s == GNTST_okay for s, _ in results)
    assert granter.call("end", ref=refs[0])["ok"] is False
    assert mgmt.request("info", domid=granter.domid)["domain"]["grants_mapped_by_others"] == 16
    backend.kill()
    wait_until(lambda: mgmt.request("info", domid=granter.domid)["domain"]["grants_mapped_by_others"] == 0)
    assert all(granter.call("end", ref=r)["ok"] for r in refs)


def test_grantee_cannot_keep_a_page_it_claims_to_have_unmapped(spawn) -> None:
    granter, backend = spawn("granter"), spawn("backend")
    ref = granter.call("grant", domid=backend.domid, gfn=1)["ref"]
    (status, handle), = backend.call("map", domid=granter.domid, refs=[ref])["results"]
    assert status == GNTST_okay
    r = backend.call("unmap_but_keep", handle=handle)
    assert r["duplicated"]
    assert r["results"] == [GNTST_general_error]     # the broker saw the page still mapped
    assert granter.call("end", ref=ref)["ok"] is False
    assert backend.call("drop_kept", handles=[handle])["results"] == [GNTST_okay]
    assert granter.call("end", ref=ref)["ok"] is True


def test_a_process_reaches_nothing_it_was_not_granted(spawn) -> None:
    victim, other, thief = spawn("victim"), spawn("other"), spawn("thief")
    for g in range(4):
        victim.call("grant", domid=other.domid, gfn=g, data="private")
    refs = list(range(0, 40))
    for target in (victim.domid, other.domid, 0, 77):
        for ro in (True, False):
            results = thief.call("map", domid=target, refs=refs, ro=ro)["results"]
            assert all(s != GNTST_okay for s, _ in results)
    assert thief.call("map", domid=77, refs=[8])["results"][0][0] == GNTST_bad_domain


def test_virq_dom_exc_on_kill_9(spawn, mgmt) -> None:
    watcher = spawn("xenstore", privileged=True)
    port = watcher.call("bind_virq", virq=VIRQ_DOM_EXC)["port"]
    victim = spawn("victim")
    assert watcher.call("wait", secs=0)["ports"] == []
    victim.kill()
    assert watcher.call("wait", secs=10)["ports"] == [port]
    info = mgmt.request("info", domid=victim.domid)["domain"]
    assert info["state"] == "crashed" and info["pid"] == 0


def test_copy_batch_between_processes_reports_each_op(spawn) -> None:
    """Each op of a batch has its own status: a granted gfn the granter has no frame at fails alone."""
    from xdom.domains.abi.grant_table import GNTST_bad_page
    granter, backend = spawn("granter"), spawn("backend")
    refs = granter.call("grant_many", domid=backend.domid, first_gfn=10, count=8)["refs"]
    granter.call("drop_frame", gfn=13)          # the granter pulls one page out of its own memory
    mixed = backend.call("copy_from", domid=granter.domid, refs=refs, first_gfn=120)
    assert mixed["statuses"] == [GNTST_okay] * 3 + [GNTST_bad_page] + [GNTST_okay] * 4
    assert [s for i, s in enumerate(mixed["stamps"]) if i != 3] == \
        [granter.domid << 32 | (10 + i) for i in range(8) if i != 3]
    again = backend.call("copy_from", domid=granter.domid, refs=refs, first_gfn=100)   # frames kept open now
    assert again["statuses"] == mixed["statuses"] and again["stamps"][:3] == mixed["stamps"][:3]