"""The management API: the toolstack's view of the broker.

Domains are created, listed, inspected, paused, destroyed and restarted
over the broker's ZeroMQ ROUTER; lifecycle events come out of its PUB
socket; ``xdom list`` renders the table.  Domain processes here are real
child processes (``spawn_domain``), never this test process: pausing or
destroying a domain signals its process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import msgpack
import psutil
import pytest
import zmq
from helpers import wait_until  # noqa: E402

from xdom.broker.mgmt_client import EventSubscriber, ManagementClient, ManagementError, events_endpoint_for
from xdom.deploy.launcher import BrokerProcess, spawn_domain, stop_process

T = TypeVar("T")

DOMAIN_PROGRAM = [sys.executable, "-c",
                  "from xdom.domains.xenhost import connect; import time; h=connect(); time.sleep(60)"]
SUMMARY_FIELDS = {"domid", "name", "state", "pid", "memory_kib", "privileged", "grant_frames",
                  "mappings_held", "grants_mapped_by_others", "event_channels", "restarts",
                  "shutdown_reason", "uptime"}



def info(mgmt: ManagementClient, **key: Any) -> dict[str, Any]:
    return mgmt.request("info", **key)["domain"]


def wait_state(mgmt: ManagementClient, domid: int, state: str, timeout: float = 15.0) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        d = info(mgmt, domid=domid)
        return d if d["state"] == state else None
    return wait_until(reached, timeout, f"domain {domid} to become {state}")


def refused(errno_name: str, call: Callable[[], Any]) -> ManagementError:
    """``call`` must fail with ``errno_name``."""
    try:
        result = call()
    except ManagementError as e:
        assert e.errno_name == errno_name, str(e)
        return e
    raise AssertionError(f"expected {errno_name}, got {result!r:.200}")


class Processes:
    """Domain processes a test started; every one is stopped at teardown."""

    def __init__(self, mgmt: ManagementClient) -> None:
        self.mgmt = mgmt
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, memory: int | str = "1M") -> tuple[dict[str, Any], subprocess.Popen[bytes]]:
        creds, proc = spawn_domain(self.mgmt, name, DOMAIN_PROGRAM, memory=memory)
        self.procs.append(proc)
        return creds, proc

    def start_with(self, creds: dict[str, Any]) -> subprocess.Popen[bytes]:
        """Start a domain process with given credentials (after a restart)."""
        env = dict(os.environ, XDOM_HYPERCALL=creds["hypercall"], XDOM_TOKEN=creds["token"],
                   XDOM_DOMID=str(creds["domid"]), XDOM_NAME=creds["name"])
        proc = subprocess.Popen(DOMAIN_PROGRAM, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def running(self, name: str, memory: int | str = "1M") -> tuple[dict[str, Any], subprocess.Popen[bytes]]:
        creds, proc = self.spawn(name, memory)
        d = wait_state(self.mgmt, creds["domid"], "running")
        assert d["pid"] == proc.pid
        return creds, proc

    def stop_all(self) -> None:
        for p in self.procs:
            stop_process(p)


@pytest.fixture
def procs(mgmt: ManagementClient) -> Iterator[Processes]:
    p = Processes(mgmt)
    try:
        yield p
    finally:
        p.stop_all()


def status_of(pid: int) -> str:
    try:
        return psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return "gone"


# ---- create ----------------------------------------------------------------------


MEMORY_SIZES = [
    (1, 1024), (2, 2048), (32, 32768), ("256K", 256), ("32M", 32768), ("1G", 1 << 20), ("4K", 4),
    ("64KiB", 64), ("8m", 8192), ("2MB", 2048), (" 12M ", 12288), ("16", 16384),
]


def test_create_memory_sizes(mgmt: ManagementClient, broker: BrokerProcess) -> None:
    for i, (memory, kib) in enumerate(MEMORY_SIZES):
        creds = mgmt.request("create", name=f"dom{i}", memory=memory)
        assert creds["nr_frames"] == kib // 4, memory
        assert creds["name"] == f"dom{i}" and isinstance(creds["domid"], int) and creds["domid"] > 0
        assert creds["hypercall"] == os.path.join(broker.run_dir, "hypercall.sock")
        assert len(creds["token"]) == 32 and int(creds["token"], 16) >= 0
        d = info(mgmt, domid=creds["domid"])
        assert (d["memory_kib"], d["state"], d["pid"], d["restarts"]) == (kib, "created", 0, 0), memory
    assert len({d["domid"] for d in mgmt.request("list")["domains"]}) == len(MEMORY_SIZES)


def test_create_default_memory_and_fields(mgmt: ManagementClient) -> None:
    creds = mgmt.request("create", name="plain")
    d = info(mgmt, domid=creds["domid"])
    assert d["memory_kib"] == 16 * 1024 and d["privileged"] is False and d["grant_frames"] == 32
    priv = mgmt.request("create", name="dom0ish", memory=1, privileged=True, grant_frames=4, domid=77)
    assert priv["domid"] == 77
    d = info(mgmt, name="dom0ish")
    assert (d["privileged"], d["grant_frames"], d["domid"]) == (True, 4, 77)
    # Two domains never share a token.
    assert priv["token"] != creds["token"]


BAD_MEMORY = [
    0, -1, -4096, "0", "0M", "1T", "abc", "", "M", "1.5M", "-1M", "1 M B", 1.5, True, False, None,
    [], {}, [1], b"1M", "3K", "4097K", "5G", 2**40, 2**63,
]


def test_create_bad_memory_is_einval(mgmt: ManagementClient) -> None:
    for memory in BAD_MEMORY:
        refused("EINVAL", lambda: mgmt.request("create", name="bad", memory=memory))
    assert mgmt.request("list")["domains"] == []
    mgmt.request("create", name="bad", memory="1M")   # the name was not taken by the failure


def test_duplicate_name_is_eexist(mgmt: ManagementClient) -> None:
    first = mgmt.request("create", name="web", memory="1M")
    refused("EEXIST", lambda: mgmt.request("create", name="web", memory="1M"))
    refused("EEXIST", lambda: mgmt.request("create", name="web", memory=64, privileged=True))
    refused("EEXIST", lambda: mgmt.request("create", name="other", domid=first["domid"]))
    assert [d["name"] for d in mgmt.request("list")["domains"]] == ["web"]
    mgmt.request("destroy", name="web")
    again = mgmt.request("create", name="web", memory="1M")   # reusable once destroyed
    assert again["token"] != first["token"]


BAD_NAMES = ["", "a/b", "/", "x" * 65, "tab\there", "new\nline", "nul\x00", "\x7f", 5, None, True,
             b"bytes", ["a"], {"a": 1}]


def test_bad_names_are_einval(mgmt: ManagementClient) -> None:
    for name in BAD_NAMES:
        refused("EINVAL", lambda: mgmt.request("create", name=name, memory="1M"))
    assert mgmt.request("list")["domains"] == []


def test_name_limits_and_other_bad_fields(mgmt: ManagementClient) -> None:
    refused("EINVAL", lambda: mgmt.request("create", memory="1M"))   # no name
    longest = mgmt.request("create", name="n" * 64, memory="1M")
    assert info(mgmt, name="n" * 64)["domid"] == longest["domid"]
    mgmt.request("create", name="unicode-\u00e9\u4e2d", memory="1M")
    for fields in ({"privileged": "yes"}, {"privileged": 1}, {"grant_frames": 0}, {"grant_frames": 257},
                   {"grant_frames": "4"}, {"grant_frames": True}, {"domid": "5"}, {"domid": 1.0},
                   {"domid": True}):
        refused("EINVAL", lambda: mgmt.request("create", name="f", memory="1M", **fields))
    assert len(mgmt.request("list")["domains"]) == 2


# ---- list, info, stats ------------------------------------------------------------


def test_list_info_and_stats(mgmt: ManagementClient, broker: BrokerProcess) -> None:
    made = [mgmt.request("create", name=n, memory=m) for n, m in (("c", "1M"), ("a", 2), ("b", "512K"))]
    listed = mgmt.request("list")["domains"]
    assert [d["name"] for d in listed] == ["c", "a", "b"]            # by domid
    assert [d["domid"] for d in listed] == sorted(c["domid"] for c in made)
    for d in listed:
        assert set(d) >= SUMMARY_FIELDS
        assert info(mgmt, domid=d["domid"]) == info(mgmt, name=d["name"])
        assert {k: info(mgmt, domid=d["domid"])[k] for k in SUMMARY_FIELDS - {"uptime"}} == \
               {k: d[k] for k in SUMMARY_FIELDS - {"uptime"}}
    # domid wins over name when both are given.
    assert info(mgmt, domid=made[0]["domid"], name="a")["name"] == "c"
    refused("ESRCH", lambda: info(mgmt, domid=9999))
    refused("ESRCH", lambda: info(mgmt, name="nobody"))
    refused("EINVAL", lambda: info(mgmt))
    refused("EINVAL", lambda: info(mgmt, domid="1"))
    refused("EINVAL", lambda: info(mgmt, domid=True))
    refused("EINVAL", lambda: info(mgmt, name=1))
    stats = mgmt.request("stats")
    assert (stats["domains"], stats["mappings"], stats["event_channels"]) == (3, 0, 0)
    assert stats["broker_pid"] == broker.proc.pid
    assert stats["broker_fds"] > 0 and stats["broker_rss"] > 0
    assert mgmt.request("ping") == {"ok": True}


# ---- pause, destroy, restart ---------------------------------------------------------


def test_pause_and_unpause_stop_and_continue_the_process(mgmt: ManagementClient, procs: Processes) -> None:
    creds, proc = procs.running("pausable")
    domid = creds["domid"]
    assert status_of(proc.pid) != psutil.STATUS_STOPPED
    reply = mgmt.request("pause", domid=domid)
    assert reply["state"] == "paused" and reply["domid"] == domid
    wait_until(lambda: status_of(proc.pid) == psutil.STATUS_STOPPED, what="the process to stop")
    assert info(mgmt, domid=domid)["state"] == "paused"
    assert mgmt.request("list")["domains"][0]["state"] == "paused"
    reply = mgmt.request("unpause", name="pausable")
    assert reply["state"] == "running"
    wait_until(lambda: status_of(proc.pid) not in (psutil.STATUS_STOPPED, "gone"),
               what="the process to continue")
    assert info(mgmt, domid=domid)["state"] == "running"
    assert proc.poll() is None
    # Pausing twice is harmless; unpausing brings it back.
    mgmt.request("pause", domid=domid)
    mgmt.request("pause", domid=domid)
    wait_until(lambda: status_of(proc.pid) == psutil.STATUS_STOPPED, what="the process to stop again")
    mgmt.request("unpause", domid=domid)
    wait_until(lambda: status_of(proc.pid) not in (psutil.STATUS_STOPPED, "gone"),
               what="the process to continue again")


def test_pause_needs_a_live_domain(mgmt: ManagementClient, procs: Processes) -> None:
    created = mgmt.request("create", name="idle", memory="1M")
    refused("EINVAL", lambda: mgmt.request("pause", domid=created["domid"]))
    refused("EINVAL", lambda: mgmt.request("unpause", domid=created["domid"]))
    refused("ESRCH", lambda: mgmt.request("pause", domid=4242))
    refused("ESRCH", lambda: mgmt.request("unpause", name="ghost"))
    refused("EINVAL", lambda: mgmt.request("pause"))
    creds, proc = procs.running("victim")
    proc.kill()
    proc.wait()
    wait_state(mgmt, creds["domid"], "crashed")
    refused("EINVAL", lambda: mgmt.request("pause", domid=creds["domid"]))


def test_destroy_kills_the_process_and_forgets_the_domain(mgmt: ManagementClient, procs: Processes) -> None:
    creds, proc = procs.running("doomed")
    keep, keep_proc = procs.running("keeper")
    assert mgmt.request("destroy", domid=creds["domid"]) == {"ok": True, "domid": creds["domid"]}
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert [d["name"] for d in mgmt.request("list")["domains"]] == ["keeper"]
    refused("ESRCH", lambda: info(mgmt, domid=creds["domid"]))
    refused("ESRCH", lambda: mgmt.request("destroy", domid=creds["domid"]))
    # A paused domain is destroyed just the same, by name.
    mgmt.request("pause", domid=keep["domid"])
    wait_until(lambda: status_of(keep_proc.pid) == psutil.STATUS_STOPPED, what="the process to stop")
    mgmt.request("destroy", name="keeper")
    assert keep_proc.wait(timeout=10) == -signal.SIGKILL
    # A domain with no process yet, and a dead one, just go away.
    idle = mgmt.request("create", name="idle", memory="1M")
    mgmt.request("destroy", domid=idle["domid"])
    assert mgmt.request("list")["domains"] == []
    assert mgmt.request("stats")["domains"] == 0


def test_restart_of_a_crashed_domain(mgmt: ManagementClient, procs: Processes, broker: BrokerProcess) -> None:
    creds, proc = procs.running("phoenix", memory="2M")
    domid = creds["domid"]
    refused("EBUSY", lambda: mgmt.request("restart", domid=domid))      # running: nothing to restart
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    dead = wait_state(mgmt, domid, "crashed")
    assert dead["pid"] == 0 and dead["restarts"] == 0
    again = mgmt.request("restart", domid=domid)
    assert again["domid"] == domid and again["name"] == "phoenix" and again["nr_frames"] == creds["nr_frames"]
    assert again["token"] != creds["token"] and len(again["token"]) == 32
    d = info(mgmt, domid=domid)
    assert (d["state"], d["restarts"]) == ("created", 1)
    refused("EBUSY", lambda: mgmt.request("restart", domid=domid))      # created: already restartable
    # The old token is dead; the new one starts a new process as the same domid.
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(10)
        s.connect(again["hypercall"])
        s.send(msgpack.packb({"op": "hello", "token": creds["token"]}))
        reply = msgpack.unpackb(s.recv(4096))
        assert reply["ok"] is False and reply["errno"] == "EACCES"
    new = procs.start_with(again)
    d = wait_state(mgmt, domid, "running")
    assert (d["pid"], d["restarts"], d["domid"]) == (new.pid, 1, domid)
    assert [x["domid"] for x in mgmt.request("list")["domains"]] == [domid]
    refused("ESRCH", lambda: mgmt.request("restart", domid=domid + 100))
    # A clean second crash and restart counts again.
    new.kill()
    new.wait()
    wait_state(mgmt, domid, "crashed")
    assert mgmt.request("restart", name="phoenix")["domid"] == domid
    assert info(mgmt, domid=domid)["restarts"] == 2
    assert broker.proc.poll() is None


# ---- a hostile management client ---------------------------------------------------


@pytest.fixture
def dealer(broker: BrokerProcess) -> Iterator[zmq.Socket]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(broker.mgmt_endpoint)
    try:
        yield sock
    finally:
        sock.close(0)


def raw_request(sock: zmq.Socket, frames: list[bytes], timeout: float = 10.0) -> tuple[list[bytes], dict[str, Any]]:
    sock.send_multipart(frames)
    assert sock.poll(int(timeout * 1000)), f"no answer to {frames!r:.120}"
    reply_frames = sock.recv_multipart()
    reply = msgpack.unpackb(reply_frames[-1], raw=False)
    return reply_frames[:-1], reply


def test_garbage_to_the_router_gets_errors(dealer: zmq.Socket, mgmt: ManagementClient,
                                           broker: BrokerProcess) -> None:
    pack = lambda obj: msgpack.packb(obj, use_bin_type=True)  # noqa: E731
    cases: list[tuple[bytes, str]] = [
        (b"", "EBADMSG"), (b"\xc1", "EBADMSG"), (b"not msgpack at all \xff\xfe", "EBADMSG"),
        (pack({"op": "ping"}) + b"trailing", "EBADMSG"), (b"\x82\x01\x02\xa2op\xa4ping", "EBADMSG"),
        (b"\x91" * 5000 + b"\xc0", "EBADMSG"), (b"\xc7\x01\x05x", "EBADMSG"),
        (pack(None), "EBADMSG"), (pack([1, 2]), "EBADMSG"), (pack("ping"), "EBADMSG"), (pack(7), "EBADMSG"),
        (pack({}), "ENOSYS"), (pack({"op": "nope"}), "ENOSYS"), (pack({"op": 5}), "ENOSYS"),
        (pack({"op": b"ping"}), "ENOSYS"), (pack({"op": None}), "ENOSYS"), (pack({"op": "PING"}), "ENOSYS"),
        (pack({"op": "handlers"}), "ENOSYS"), (pack({"op": "__class__"}), "ENOSYS"),
        (pack({"op": "create"}), "EINVAL"), (pack({"op": "create", "name": None}), "EINVAL"),
        (pack({"op": "info"}), "EINVAL"), (pack({"op": "destroy"}), "EINVAL"),
        (pack({"op": "destroy", "domid": "1"}), "EINVAL"), (pack({"op": "info", "domid": True}), "EINVAL"),
        (pack({"op": "pause", "name": 5}), "EINVAL"), (pack({"op": "restart", "domid": 1.5}), "EINVAL"),
        (pack({"op": "info", "domid": 1}), "ESRCH"), (pack({"op": "destroy", "domid": -1}), "ESRCH"),
        (pack({"op": "info", "domid": 2**64 - 1}), "ESRCH"),
        (b"\x00" * (64 * 1024 + 1), "EMSGSIZE"), (pack({"op": "ping", "pad": b"x" * 70000}), "EMSGSIZE"),
    ]
    for payload, errno_name in cases:
        # With and without the empty delimiter frame a REQ or ManagementClient sends.
        for prefix in ([], [b""]):
            envelope, reply = raw_request(dealer, [*prefix, payload])
            assert envelope == prefix
            assert reply["ok"] is False and reply["errno"] == errno_name, (payload[:60], reply)
            assert isinstance(reply["error"], str)
    # Extra envelope frames come back as they were sent.
    envelope, reply = raw_request(dealer, [b"a", b"b", msgpack.packb({"op": "ping"})])
    assert envelope == [b"a", b"b"] and reply == {"ok": True}
    assert broker.proc.poll() is None
    assert mgmt.request("ping") == {"ok": True}
    assert mgmt.request("list")["domains"] == []


def test_client_that_never_reads_does_not_stall_others(broker: BrokerProcess, mgmt: ManagementClient) -> None:
    ctx = zmq.Context.instance()
    flood = ctx.socket(zmq.DEALER)
    flood.setsockopt(zmq.LINGER, 0)
    flood.setsockopt(zmq.SNDHWM, 0)
    flood.connect(broker.mgmt_endpoint)
    try:
        for i in range(20000):
            flood.send_multipart([b"", msgpack.packb({"op": "list"})])
            if i % 5000 == 0:
                assert mgmt.request("ping") == {"ok": True}
        creds = mgmt.request("create", name="still-served", memory="1M")
        assert info(mgmt, domid=creds["domid"])["name"] == "still-served"
    finally:
        flood.close(0)
    assert mgmt.request("ping") == {"ok": True}
    assert broker.proc.poll() is None


# ---- lifecycle events ------------------------------------------------------------


class Events:
    def __init__(self, broker: BrokerProcess, mgmt: ManagementClient) -> None:
        self.sub = EventSubscriber(events_endpoint_for(broker.run_dir))
        self.mgmt = mgmt
        self.seen: list[dict[str, Any]] = []
        self.cursor = 0

    def sync(self) -> None:
        """Beat the slow joiner: churn throwaway domains until their events arrive."""
        deadline = time.monotonic() + 20
        n = 0
        while True:
            assert time.monotonic() < deadline, "the event subscription never became live"
            name = f"sync-{n}"
            n += 1
            c = self.mgmt.request("create", name=name, memory="256K")
            self.mgmt.request("destroy", domid=c["domid"])
            e = self.sub.next(0.2)
            while e is not None and not (e["name"] == name and e["event"] == "destroyed"):
                e = self.sub.next(0.2)
            if e is not None:
                return

    def wait_for(self, domid: int, event: str, timeout: float = 15.0) -> dict[str, Any]:
        """The next ``event`` for ``domid`` after the one the previous call returned."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(self.cursor, len(self.seen)):
                e = self.seen[i]
                if e["domid"] == domid and e["event"] == event:
                    self.cursor = i + 1
                    return e
            left = deadline - time.monotonic()
            assert left > 0, f"no {event!r} event for domain {domid}; saw {self.history(domid)}"
            e = self.sub.next(left)
            if e is not None:
                self.seen.append(e)

    def drain(self, quiet: float = 0.3) -> None:
        while (e := self.sub.next(quiet)) is not None:
            self.seen.append(e)

    def history(self, domid: int) -> list[str]:
        return [e["event"] for e in self.seen if e["domid"] == domid]

    def close(self) -> None:
        self.sub.close()


@pytest.fixture
def events(broker: BrokerProcess, mgmt: ManagementClient) -> Iterator[Events]:
    ev = Events(broker, mgmt)     # subscribed before anything of interest is created
    try:
        ev.sync()
        yield ev
    finally:
        ev.close()


def test_lifecycle_events(events: Events, mgmt: ManagementClient, procs: Processes) -> None:
    creds, proc = procs.spawn("evented")
    domid = creds["domid"]
    created = events.wait_for(domid, "created")
    assert (created["name"], created["state"]) == ("evented", "created")
    running = events.wait_for(domid, "running")
    assert running["state"] == "running" and running["time"] >= created["time"]
    mgmt.request("pause", domid=domid)
    assert events.wait_for(domid, "paused")["state"] == "paused"
    mgmt.request("unpause", domid=domid)
    assert events.wait_for(domid, "unpaused")["state"] == "running"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    crashed = events.wait_for(domid, "crashed")
    assert crashed["state"] == "crashed" and crashed["reason"]
    again = mgmt.request("restart", domid=domid)
    assert events.wait_for(domid, "reset")["state"] == "created"
    new_proc = procs.start_with(again)
    assert events.wait_for(domid, "running")["state"] == "running"
    new_proc.kill()
    new_proc.wait()
    events.wait_for(domid, "crashed")
    mgmt.request("destroy", domid=domid)
    destroyed = events.wait_for(domid, "destroyed")
    assert destroyed["name"] == "evented"
    events.drain()
    assert events.history(domid) == ["created", "running", "paused", "unpaused", "crashed", "reset",
                                      "running", "crashed", "destroyed"]


def test_clean_shutdown_event(events: Events, mgmt: ManagementClient, procs: Processes) -> None:
    program = [sys.executable, "-c",
               "from xdom.domains.xenhost import connect; h=connect(); h.shutdown('poweroff'); h.close()"]
    creds, proc = spawn_domain(mgmt, "polite", program, memory="1M")
    procs.procs.append(proc)
    assert proc.wait(timeout=30) == 0
    e = events.wait_for(creds["domid"], "shutdown")
    assert (e["state"], e["reason"]) == ("shutdown", "poweroff")
    assert info(mgmt, domid=creds["domid"])["shutdown_reason"] == "poweroff"
    assert "crashed" not in events.history(creds["domid"])


def test_destroy_of_a_running_domain_is_not_reported_as_a_crash(events: Events, mgmt: ManagementClient,
                                                                 procs: Processes) -> None:
    creds, proc = procs.running("admin-kill")
    mgmt.request("destroy", domid=creds["domid"])
    proc.wait(timeout=10)
    events.wait_for(creds["domid"], "destroyed")
    events.drain()
    assert "crashed" not in events.history(creds["domid"]), events.history(creds["domid"])


# ---- the CLI ----------------------------------------------------------------------


def xdom(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdom.deploy.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_cli_list_table_and_json(broker: BrokerProcess, mgmt: ManagementClient, procs: Processes) -> None:
    creds, proc = procs.running("frontend", memory="2M")
    mgmt.request("create", name="backend-net", memory="256K")
    for command in ("list", "ps"):
        out = xdom(command, "--run-dir", broker.run_dir)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].split()[:5] == ["Name", "ID", "Mem(KiB)", "Used(KiB)", "State"]
        rows = {line.split()[0]: line.split() for line in lines[1:]}
        assert set(rows) == {"frontend", "backend-net"}
        assert rows["frontend"][1:3] + rows["frontend"][4:6] == [str(creds["domid"]), "2048", "running", str(proc.pid)]
        assert 0 < int(rows["frontend"][3]) < 2048            # populated as used: not all of it
        assert rows["backend-net"][2:6] == ["256", "0", "created", "-"]
    out = xdom("list", "--json", "--run-dir", broker.run_dir)
    assert out.returncode == 0, out.stderr
    table = json.loads(out.stdout)
    assert [d["name"] for d in table] == ["frontend", "backend-net"]
    for d in table:
        assert {"name", "domid", "state", "pid", "restarts"} <= set(d)
    front = table[0]
    assert (front["domid"], front["state"], front["pid"], front["restarts"]) == (creds["domid"], "running", proc.pid, 0)
    assert 0 < front["populated_kib"] < front["memory_kib"] == 2048
    assert table[1]["state"] == "created" and table[1]["pid"] == 0
    # The same as the API says.
    assert table == [{**d, "uptime": t["uptime"]} for d, t in zip(mgmt.request("list")["domains"], table)]


def test_cli_empty_list(broker: BrokerProcess) -> None:
    out = xdom("list", "--run-dir", broker.run_dir)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 1
    out = xdom("ps", "--json", "--run-dir", broker.run_dir)
    assert out.returncode == 0 and json.loads(out.stdout) == []


def test_cli_without_a_broker_exits_3(run_dir: str) -> None:
    nowhere = tempfile.mkdtemp(prefix="nb-", dir=run_dir)
    started = time.monotonic()
    out = xdom("list", "--timeout", "1", "--run-dir", nowhere, timeout=30)
    assert out.returncode == 3, (out.returncode, out.stdout, out.stderr)
    assert "no answer from the broker" in out.stderr and out.stdout == ""
    out = xdom("ps", "--json", "--timeout", "1", "--run-dir", nowhere, timeout=30)
    assert out.returncode == 3 and out.stdout == ""
    assert time.monotonic() - started < 25


def test_hello_is_accepted_only_from_the_uid_given_at_create(mgmt: ManagementClient) -> None:
    """A token is bound to the uid the toolstack runs the domain as: another uid that
    reads or guesses it gets EACCES, and the token stays good for the real process."""
    from xdom.domains.abi.hypercall_wire import HypercallError
    from xdom.domains.xenhost import BrokerXenHost

    other = os.geteuid() + 4242
    creds = mgmt.request("create", name="uidbound", memory="1M", uid=other)
    with pytest.raises(HypercallError) as e:
        BrokerXenHost(creds["hypercall"], creds["token"])
    assert e.value.name == "EACCES" and f"uid {other}" in e.value.message
    assert mgmt.request("info", domid=creds["domid"])["domain"]["state"] == "created"
    creds = mgmt.request("create", name="mine", memory="1M", uid=os.geteuid())
    host = BrokerXenHost(creds["hypercall"], creds["token"])
    try:
        assert mgmt.request("info", domid=creds["domid"])["domain"]["uid"] == os.geteuid()
    finally:
        host.close()
    with pytest.raises(ManagementError):
        mgmt.request("create", name="baduid", memory="1M", uid=-1)
