"""xenstored's journal: a snapshot plus the changes appended after it restore what a full dump restores.

The core's ``take_changes`` records, replayed by ``restore(dump, journal)``,
must give back the state a dump made at the same moment gives back; the
state directory (journal.py) must drop a record cut short by a power loss
and ignore a journal older than its snapshot; and a xenstored killed with
SIGKILL must come back with every write it answered, whether the write is
still in the journal or was compacted into a new snapshot, without the
snapshot being rewritten per write.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
import zlib
from typing import Any

import msgpack
import pytest
from helpers import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_xenstore_fuzz import CONNS, MESSAGES, new_core, send
from xs_fixtures import Xenstored, start_xenstored

from xdom.backends.xenstored import journal as journal_mod
from xdom.backends.xenstored.core import TX_ID_RESERVE, XenstoreCore
from xdom.backends.xenstored.journal import StateDir
from xdom.deploy.launcher import start_ready, start_xenstored_domain
from xdom.domains.abi.xs_wire import Message, XsType
from xdom.domains.xenstore import XenstoreClient

T = XsType


def normalized(core: XenstoreCore) -> dict[str, Any]:
    """A dump with every permission entry's ``ignored`` mark computed (the core marks them lazily,
    on reads, and a mark is a pure function of the node and the domain records)."""
    for node in list(core._store):
        core._adjust_perms(node)
    state = msgpack.unpackb(core.dump(), raw=False, strict_map_key=False)
    state["transactions"] = dict(state["transactions"])
    state["domains"].sort()                                    # a table: its order means nothing
    state["watches"].sort(key=lambda w: w[0])                  # kept per domain, in order within one
    return state


def replay_matches(snapshot: bytes, journal: list[bytes], live: XenstoreCore) -> None:
    replayed = normalized(XenstoreCore.restore(snapshot, journal=journal))
    expected = normalized(XenstoreCore.restore(live.dump()))
    for key in ("nodes", "domains", "special_perms", "watches"):
        assert replayed[key] == expected[key], key
    # Transaction ids: the journal keeps a ceiling above every id given out (a reserve ahead).
    for domid, ceiling in expected["transactions"].items():
        assert replayed["transactions"].get(domid, 1) >= ceiling - TX_ID_RESERVE, (domid, replayed, expected)
    assert replayed["generation"] >= max(n[3] for n in replayed["nodes"])


def _z(*fields: str) -> bytes:
    return b"".join(f.encode() + b"\0" for f in fields)


NODE = st.sampled_from(["/a", "/a/b", "/a/c", "/a/b/d", "/local/domain/5/x", "/local/domain/6/y", "x", "@releaseDomain"])
PERMS = st.lists(st.sampled_from(["n0", "r5", "b6", "w7", "n5", "n6", "r0"]), min_size=1, max_size=3)
DOMID = st.sampled_from(["5", "6", "7"])
TX = st.sampled_from([0, 0, 0, 1, 2])
VALID = st.one_of(
    st.builds(lambda p, v, tx: Message(T.XS_WRITE, 1, tx, p.encode() + b"\0" + v), NODE, st.binary(max_size=8), TX),
    st.builds(lambda p, tx: Message(T.XS_MKDIR, 1, tx, _z(p)), NODE, TX),
    st.builds(lambda p, tx: Message(T.XS_RM, 1, tx, _z(p)), NODE, TX),
    st.builds(lambda p, perms, tx: Message(T.XS_SET_PERMS, 1, tx, _z(p, *perms)), NODE, PERMS, TX),
    st.builds(lambda p, t: Message(T.XS_WATCH, 1, 0, _z(p, t)), NODE, st.sampled_from(["t1", "t2"])),
    st.builds(lambda p, t: Message(T.XS_UNWATCH, 1, 0, _z(p, t)), NODE, st.sampled_from(["t1", "t2"])),
    st.builds(lambda d: Message(T.XS_INTRODUCE, 1, 0, _z(d, d, d)), DOMID),
    st.builds(lambda d: Message(T.XS_RELEASE, 1, 0, _z(d)), DOMID),
    st.builds(lambda d, t: Message(T.XS_SET_TARGET, 1, 0, _z(d, t)), DOMID, DOMID),
    st.just(Message(T.XS_TRANSACTION_START, 1, 0, b"\0")),
    st.builds(lambda tx, c: Message(T.XS_TRANSACTION_END, 1, tx, _z(c)), st.sampled_from([1, 2]),
              st.sampled_from(["T", "F"])),
    st.just(Message(T.XS_RESET_WATCHES, 1, 0, b"")),
)
STEPS = st.lists(st.one_of(st.tuples(st.sampled_from(sorted(CONNS)), MESSAGES),
                           st.tuples(st.sampled_from(sorted(CONNS)), VALID),
                           st.tuples(st.sampled_from(sorted(CONNS)), VALID),
                           st.tuples(st.sampled_from(sorted(CONNS)), VALID),
                           st.tuples(st.just("gone"), st.sampled_from([5, 6, 7])),
                           st.tuples(st.just("snapshot"), st.none())), min_size=1, max_size=40)
SCRIPTED = [Message(T.XS_INTRODUCE, 1, 0, b"5\0" b"5\0" b"5\0"), Message(T.XS_INTRODUCE, 1, 0, b"6\0" b"6\0" b"6\0"),
            Message(T.XS_WRITE, 1, 0, b"/a/b\0v"), Message(T.XS_SET_PERMS, 1, 0, b"/a/b\0n5\0r6\0"),
            Message(T.XS_SET_TARGET, 1, 0, b"6\0" b"5\0"), Message(T.XS_SET_PERMS, 1, 0, b"@releaseDomain\0n0\0r5\0")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(STEPS)
def test_a_snapshot_and_its_journal_restore_what_a_dump_restores(steps: list[tuple[Any, Any]]) -> None:
    core = new_core()
    for msg in SCRIPTED:
        send(core, "dom0", msg)
    for conn, domid in CONNS.items():       # reconnected: kept watches come back to them
        core.connect(conn, domid)
    core.take_output()
    send(core, "dom5", Message(T.XS_WATCH, 1, 0, b"/a\0tok\0"))
    send(core, "dom6", Message(T.XS_TRANSACTION_START, 2, 0, b"\0"))
    snapshot, journal = core.dump(), []
    for what, arg in steps:
        if what == "gone":
            core.domain_gone(arg)
            core.take_output()
            for conn, domid in CONNS.items():
                if domid == arg:
                    core.connect(conn, domid)
            core.take_output()
        elif what == "snapshot":
            snapshot, journal = core.dump(), []
        else:
            send(core, what, arg)
        record = core.take_changes()
        if record is not None:
            journal.append(record)
        assert core.take_changes() is None          # taken: nothing left until something changes
    replay_matches(snapshot, journal, core)


def test_a_record_costs_what_changed_not_the_store() -> None:
    core = XenstoreCore()
    core.connect("c", 0)
    for i in range(2000):
        core.handle("c", Message(T.XS_WRITE, i, 0, f"/big/n{i}\0".encode() + b"x" * 100))
    core.take_output()
    core.dump()
    core.handle("c", Message(T.XS_WRITE, 1, 0, b"/big/n7\0changed"))
    core.take_output()
    record = core.take_changes()
    assert record is not None and len(record) < 200
    core.handle("c", Message(T.XS_READ, 1, 0, b"/big/n7\0"))
    core.take_output()
    assert core.take_changes() is None             # a read changes nothing a restart needs


def test_change_tracking_off_keeps_nothing() -> None:
    core = XenstoreCore()
    core.track_changes(False)
    core.connect("c", 0)
    for i in range(10):
        core.handle("c", Message(T.XS_WRITE, i, 0, f"/n{i}\0".encode()))
        core.handle("c", Message(T.XS_RM, i, 0, f"/n{i}\0".encode()))
    assert core._store.changed is None
    with pytest.raises(RuntimeError):
        core.take_changes()


# ---- the state directory --------------------------------------------------------------------


def journal_end(path: str) -> int:
    """Where the records of a journal end (the mapped kind is zeros after them)."""
    data = open(path, "rb").read()
    pos = 12
    while pos + 8 <= len(data):
        length, crc = struct.unpack_from("<II", data, pos)
        if length == 0 and crc == 0:
            break
        pos += 8 + length
    return pos


def tear(path: str) -> None:
    """A record cut short by a power loss, right after the last whole one."""
    with open(path, "r+b") as f:
        f.seek(journal_end(path))
        f.write(struct.pack("<II", 100, 0) + b"thr")


@pytest.mark.parametrize("fsync", [False, True], ids=["mapped", "fsync"])
def test_state_dir_drops_a_damaged_tail_and_ignores_an_older_journal(tmp_path: Any, fsync: bool) -> None:
    d = StateDir(str(tmp_path), fsync=fsync)
    assert d.load() == (None, [])
    d.write_snapshot({"core": b"c1", "rings": {}})
    d.append(b"one")
    d.append(b"two")
    d.close()
    tear(d.journal_path)
    again = StateDir(str(tmp_path), fsync=fsync)
    saved, records = again.load()
    assert saved is not None and saved["core"] == b"c1" and records == [b"one", b"two"]
    with open(again.journal_path, "r+b") as f:     # a bad CRC ends the journal too
        f.seek(12 + 8 + len(b"one") + 8)
        f.write(b"tw0")
    assert StateDir(str(tmp_path)).load()[1] == [b"one"]
    # Killed between the snapshot's rename and the new journal's: the journal is of the older epoch.
    old_journal = open(again.journal_path, "rb").read()
    again = StateDir(str(tmp_path), fsync=fsync)
    again.load()
    again.write_snapshot({"core": b"c2", "rings": {}})
    again.append(b"three")
    again.close()
    with open(again.journal_path, "wb") as f:
        f.write(old_journal)
    saved, records = StateDir(str(tmp_path)).load()
    assert saved is not None and saved["core"] == b"c2" and records == []


def test_state_dir_reads_a_store_of_the_whole_store_rewritten_era(tmp_path: Any) -> None:
    with open(os.path.join(tmp_path, journal_mod.DB_NAME), "wb") as f:
        f.write(msgpack.packb({"version": 1, "core": b"c0", "rings": {}}, use_bin_type=True))
    saved, records = StateDir(str(tmp_path)).load()
    assert saved is not None and saved["core"] == b"c0" and records == []


def test_state_dir_record_frames(tmp_path: Any) -> None:
    d = StateDir(str(tmp_path), fsync=True)
    d.write_snapshot({"core": b"", "rings": {}})
    d.append(b"payload")
    d.close()
    data = open(d.journal_path, "rb").read()
    assert data[:4] == b"XSJ1" and struct.unpack_from("<Q", data, 4)[0] == 1
    assert data[12:20] == struct.pack("<II", 7, zlib.crc32(b"payload")) and data[20:] == b"payload"


def test_a_mapped_journal_that_is_full_asks_for_a_snapshot(tmp_path: Any) -> None:
    d = StateDir(str(tmp_path))
    d.write_snapshot({"core": b"", "rings": {}})
    size = os.path.getsize(d.journal_path)
    assert size >= journal_mod.MAPPED_MIN_BYTES
    big = b"x" * (1 << 20)
    n = 0
    while d.append(big):
        n += 1
    assert n == (size - 12) // (len(big) + 8)
    d.close()
    assert StateDir(str(tmp_path)).load()[1] == [big] * n


# ---- a xenstored process killed with SIGKILL ---------------------------------------------------


def sigkill(xsd: Xenstored) -> None:
    xsd.proc.send_signal(signal.SIGKILL)
    xsd.proc.wait()


def files(state_dir: str) -> tuple[os.stat_result, int]:
    """The snapshot's stat, and how many records the journal holds."""
    return os.stat(os.path.join(state_dir, journal_mod.DB_NAME)), len(StateDir(state_dir).load()[1])


def test_writes_are_journaled_not_rewritten_and_survive_sigkill(run_dir: str) -> None:
    xsd = start_xenstored(run_dir)
    try:
        with XenstoreClient.unix(xsd.socket_path) as c:
            c.write("/keep/first", "1")
            db_before, journal_before = files(xsd.state_dir)
            for i in range(300):
                c.write(f"/keep/n{i}", f"value {i}")
            c.introduce(3, 0, 1)
            c.set_perms("/keep/n7", ["n3", "r0"])
            c.rm("/keep/n8")
            c.transaction(lambda tx: [c.write(f"/keep/tx{i}", "t", tx) for i in range(5)])
            db_after, journal_after = files(xsd.state_dir)
        assert (db_after.st_ino, db_after.st_size, db_after.st_mtime_ns) == \
            (db_before.st_ino, db_before.st_size, db_before.st_mtime_ns)       # the snapshot was not rewritten
        assert journal_after >= journal_before + 300
        sigkill(xsd)
    finally:
        xsd.stop()
    xsd = start_xenstored(run_dir, xsd.state_dir)
    try:
        with XenstoreClient.unix(xsd.socket_path) as c:
            values = [c.read(f"/keep/n{i}") if i != 8 else None for i in range(300)]
            assert values == [f"value {i}".encode() if i != 8 else None for i in range(300)]
            assert not c.exists("/keep/n8")
            assert c.get_perms("/keep/n7") == ["n3", "r0"]
            assert c.is_domain_introduced(3)
            assert c.directory("/keep")[-5:] == [f"tx{i}" for i in range(5)]
    finally:
        xsd.stop()


def test_a_large_journal_is_compacted_and_what_follows_survives(run_dir: str) -> None:
    xsd = start_xenstored(run_dir)
    value = "x" * 3000
    try:
        with XenstoreClient.unix(xsd.socket_path) as c:
            db_before, _ = files(xsd.state_dir)
            for i in range(500):               # 1.5 MB of records: past the compaction threshold
                c.write(f"/big/n{i % 50}", f"{i}:{value}")
            db_after, journal = files(xsd.state_dir)
            assert db_after.st_ino != db_before.st_ino           # a new snapshot
            assert journal < 500
            c.write("/big/after", "compaction")
        sigkill(xsd)
    finally:
        xsd.stop()
    tear(os.path.join(xsd.state_dir, journal_mod.JOURNAL_NAME))        # and a torn record at the end
    xsd = start_xenstored(run_dir, xsd.state_dir)
    try:
        with XenstoreClient.unix(xsd.socket_path) as c:
            assert [c.read(f"/big/n{i}") for i in range(50)] == [f"{450 + i}:{value}".encode() for i in range(50)]
            assert c.read("/big/after") == b"compaction"
            c.write("/big/again", "1")          # appended after the torn tail was dropped
        sigkill(xsd)
    finally:
        xsd.stop()
    xsd = start_xenstored(run_dir, xsd.state_dir)
    try:
        with XenstoreClient.unix(xsd.socket_path) as c:
            assert c.read("/big/again") == b"1" and c.read("/big/after") == b"compaction"
    finally:
        xsd.stop()


def test_fsync_mode_serves_and_survives_sigkill(run_dir: str) -> None:
    sock, state_dir = os.path.join(run_dir, "xs.sock"), os.path.join(run_dir, "xs-state")
    proc = start_ready([sys.executable, "-m", "xdom.deploy.cli", "xenstored", "--unix-socket", sock,
                        "--state-dir", state_dir, "--fsync"], os.path.join(run_dir, "xenstored.log"), "xenstored")
    xsd = Xenstored(proc, sock, state_dir)
    try:
        with XenstoreClient.unix(sock) as c:
            for i in range(20):
                c.write(f"/durable/n{i}", str(i))
        sigkill(xsd)
    finally:
        xsd.stop()
    xsd = start_xenstored(run_dir, state_dir)
    try:
        with XenstoreClient.unix(xsd.socket_path) as c:
            assert [c.read(f"/durable/n{i}") for i in range(20)] == [str(i).encode() for i in range(20)]
    finally:
        xsd.stop()


@pytest.mark.parametrize("fsync", [False, True], ids=["mapped", "fsync"])
def test_a_confined_xenstored_domain_compacts_its_journal_and_restarts_on_it(mgmt: Any, run_dir: str, fsync: bool,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The compaction after the domain locked itself down (seccomp, Landlock) uses only what its
    policy allows: a new snapshot, a new mapped journal, renames; with --fsync, fdatasync and fsync."""
    if fsync:
        monkeypatch.setenv("XDOM_XENSTORED_FSYNC", "1")
    sock, state = os.path.join(run_dir, "xs.sock"), os.path.join(run_dir, "xs-state")
    xs = start_xenstored_domain(mgmt, sock, state)
    value = "y" * 3000
    try:
        with XenstoreClient.unix(sock) as c:
            db_before, _ = files(state)
            for i in range(500):
                c.write(f"/big/n{i % 40}", f"{i}:{value}")
            assert files(state)[0].st_ino != db_before.st_ino        # compacted while confined
            c.write("/big/after", "compaction")
        xs.proc.send_signal(signal.SIGKILL)
        xs.proc.wait()
        wait_until(lambda: mgmt.request("info", domid=xs.domid)["domain"]["state"] == "crashed",
                   what="the broker to see xenstored die")
        xs = start_xenstored_domain(mgmt, sock, state, creds=mgmt.request("restart", domid=xs.domid))
        with XenstoreClient.unix(sock) as c:
            last = {i % 40: i for i in range(500)}
            assert [c.read(f"/big/n{k}") for k in range(40)] == [f"{last[k]}:{value}".encode() for k in range(40)]
            assert c.read("/big/after") == b"compaction"
    finally:
        xs.stop()
