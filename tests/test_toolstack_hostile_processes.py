"""The supervisor against hostile domain processes: lying names, reused pids, frozen peers, other uids.

What a domain controls here: its own process (its comm name, its argv and so what /proc/PID/cmdline
says, when it exits, whether it answers at all -- a frozen guest is the simplest hostile one), its
log descriptor (any volume), and, under its own uid, whatever the host's directories and sockets let
any other uid do.  The supervisor must recognise processes by pid *and* start time, never by what they
call themselves; must never wait on a domain inside its one loop; and must give nothing to a uid it
did not start the domain as.

Written in the tenth session; what they found and what became of it: the control, management and
event sockets took their mode from the umask (under ``umask 000`` a domain uid destroyed a domain:
closed, bound owner-only); a guest's workload that left its session outlived the guest and the host,
and its uid was handed to the next domain (closed: a domain's leftovers are killed by uid, a uid a
process runs as is not given out); ``xdom ps`` showed a domain's Landlock claim as fact (closed).
A domain's log had no bound (closed: cut to its tail past 32 MiB at each health round).  The supervisor
waited inside its loop for a detach (5 s; closed: followed from the loop, detaching.py) and for a
xenstored that does not answer whenever a guest (re)connected (5 s a request; closed: an introduction
first asks xenstored_probe.py without waiting).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import pytest
import test_supervisor as ts
from helpers import wait_until

from xdom.deploy import host_state
from xdom.deploy.confined import confinement_of, parse_ready
from xdom.deploy.control import ControlClient, endpoint_for
from xdom.deploy.host_state import AdoptedProcess
from xdom.deploy.isolation import UID_BASE, UID_COUNT, UidMode, is_system_user, plan_uids
from xdom.deploy.log_bound import LOG_MAX
from xdom.deploy.rundir import leftover_processes
from xdom.deploy.supervision import _last_line
from xdom.deploy.topology_parse import parse_topology

pytestmark = pytest.mark.timeout(60)

OTHER_UID = 65534           # nobody: a uid the toolstack did not start anything as


# ---- identity: pid and start time, never a name -------------------------------------------------

LIAR = r"""
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(15, ctypes.c_char_p(sys.argv[1].encode()), 0, 0, 0)     # PR_SET_NAME: what /proc/PID/stat's comm says
print("go", flush=True)
time.sleep(60)
"""


@pytest.fixture
def liar(run_dir: str) -> Iterator[subprocess.Popen[bytes]]:
    """A process whose comm is ") Z 1 1 1" (a fake end of comm, a fake zombie state) and whose argv claims to
    be the broker of ``run_dir``."""
    proc = subprocess.Popen(["python3", "-c", LIAR, ") Z 1 1 1 1", "-m", "xdom.deploy.cli", "broker", run_dir],
                            executable=sys.executable, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stdout.readline() == b"go\n"
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_a_forged_comm_does_not_fool_the_start_time(liar: subprocess.Popen[bytes]) -> None:
    with open(f"/proc/{liar.pid}/stat", "rb") as f:
        assert b"() Z 1 1 1" in f.read()
    ticks = os.sysconf("SC_CLK_TCK")
    boot = psutil.boot_time()
    st = host_state.starttime(liar.pid)
    assert st is not None, "a live process taken for a zombie by the state its comm forged"
    assert abs((boot + st / ticks) - psutil.Process(liar.pid).create_time()) < 1.0
    assert host_state.alive(host_state.identity(liar.pid))


def test_a_recorded_process_is_recognised_by_start_time_not_by_what_it_says(liar: subprocess.Popen[bytes]) -> None:
    ident = host_state.identity(liar.pid)
    assert ident is not None
    proc = AdoptedProcess.of(ident)
    assert proc is not None and proc.pid == liar.pid
    proc.close()
    # the same pid with another start time is another process (the pid was reused): never adopted, never signalled
    assert AdoptedProcess.of({"pid": liar.pid, "starttime": ident["starttime"] + 1}) is None
    assert host_state.open_pidfd({"pid": liar.pid, "starttime": ident["starttime"] - 1}) is None
    assert not host_state.alive({"pid": liar.pid, "starttime": ident["starttime"] + 1})
    # nonsense in a record costs nothing
    for bad in ({"pid": "x", "starttime": 1}, {"pid": -1, "starttime": 1}, {"starttime": 1}, {}, None):
        assert host_state.open_pidfd(bad) is None


def test_a_dead_process_is_not_adopted_when_its_pid_comes_back(run_dir: str) -> None:
    proc = subprocess.Popen(["sleep", "30"])
    ident = host_state.identity(proc.pid)
    proc.kill()
    proc.wait()
    assert ident is not None and AdoptedProcess.of(ident) is None


def test_leftovers_are_found_by_the_exact_run_directory(run_dir: str, liar: subprocess.Popen[bytes]) -> None:
    """A process claiming on its command line to be the broker of a *neighbouring* run directory (same prefix)
    is not taken for one of this host; one claiming this exact directory is (it can only get itself stopped)."""
    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}
    assert liar.pid in {p.pid for p in leftover_processes(run_dir, spared)}
    assert liar.pid not in {p.pid for p in leftover_processes(run_dir[:-1], spared)}
    assert liar.pid not in {p.pid for p in leftover_processes(run_dir + "x", spared)}


# ---- a domain's word about itself --------------------------------------------------------------------

def test_a_claimed_seccomp_filter_is_checked_against_the_kernel() -> None:
    """The ready word says "seccomp=kill:guest"; a process the kernel shows unfiltered is shown unfiltered."""
    proc = subprocess.Popen(["sleep", "30"])
    try:
        c = confinement_of(proc.pid, parse_ready(b"ready seccomp=kill:guest\n"))
        assert c is not None and c["seccomp"] is None and c["seccomp_filters"] == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_claimed_landlock_domain_is_not_reported_as_fact() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        c = confinement_of(proc.pid, parse_ready(b"ready landlock=7\n"))
        assert c is not None
        assert c["landlock"] is None and "landlock" not in c["summary"], c
    finally:
        proc.kill()
        proc.wait()


# ---- logs: any volume ----------------------------------------------------------------------------

def test_the_last_line_of_a_flooded_log_is_bounded(run_dir: str) -> None:
    path = os.path.join(run_dir, "g1.log")
    with open(path, "wb") as f:
        f.write(b"--- xdom marker\n")
        f.write(b"A" * (32 << 20))                # 32 MiB without a newline, then binary junk
        f.write(bytes(range(256)) * 16)
    t0 = time.monotonic()
    line = _last_line(path)
    assert time.monotonic() - t0 < 1.0
    assert len(line) < 4096 + 200 and line.endswith(f"(see {path})")


def test_the_last_line_of_a_log_that_is_not_a_file_is_harmless(run_dir: str) -> None:
    path = os.path.join(run_dir, "gone.log")
    assert _last_line(path).startswith("(nothing logged)")
    os.mkfifo(path)                                # nobody writes it: must not block
    done: list[str] = []
    t = threading.Thread(target=lambda: done.append(_last_line(path)), daemon=True)
    t.start()
    t.join(5)
    if not done:
        with open(path, "wb"):                     # unblock the reader before failing
            pass
        t.join(5)
    assert done, "_last_line blocked on a FIFO"


FLOOD = r"""
import os, signal, sys
from xdom.domains.xenhost import connect
host = connect()
chunk = b"x" * (1 << 20)
for _ in range(int(sys.argv[1])):
    os.write(1, chunk)
os.write(1, b"\nflooded\n")
signal.pause()
"""


def test_a_domain_flooding_its_log_is_bounded(run_dir: str) -> None:
    flood_mib = 96
    script = os.path.join(run_dir, "flood.py")
    with open(script, "w") as f:
        f.write(FLOOD)
    text = (f'[[domain]]\nname = "loud"\nkind = "program"\ncommand = ["{sys.executable}", "{script}", '
            f'"{flood_mib}"]\nrestart = "never"\n')
    with ts.Host(run_dir, text) as h:
        log = h.layout.log_path("loud")

        def done() -> bool:
            with open(log, "rb") as f:
                f.seek(max(0, os.path.getsize(log) - 64))
                return b"flooded" in f.read() or h.row("loud")["state"] != "running"
        wait_until(done, 30, "the flood written (or the domain stopped for it)", interval=0.1)
        # Cut at the supervisor's next health round (log_bound.py): LOG_MAX plus a round's writing at most.
        def cut() -> bytes | None:
            with open(log, "rb") as f:
                kept = f.read(LOG_MAX + 1)
            return kept if len(kept) <= LOG_MAX and b"--- xdom: this log passed" in kept else None
        kept = wait_until(cut, 5, "the log cut to its tail", interval=0.1)     # (cut, then its tail written)
        assert kept.rstrip().endswith(b"flooded"), kept[-200:]
        assert h.row("loud")["state"] == "running"          # its own log's bound costs the domain nothing
    os.unlink(log)


# ---- sockets other uids could reach ----------------------------------------------------------------

CONNECT = r"""
import socket, sys
out = []
for path in sys.argv[1:]:
    for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):
        s = socket.socket(socket.AF_UNIX, kind)
        try:
            s.connect(path)
            out.append("connected")
            break
        except OSError as e:
            if e.errno == 91 and kind == socket.SOCK_STREAM:     # EPROTOTYPE: a SEQPACKET socket
                continue
            out.append(type(e).__name__)
            break
        finally:
            s.close()
print(" ".join(out))
"""


def connect_as(uid: int, paths: list[str]) -> list[str]:
    res = subprocess.run([sys.executable, "-I", "-S", "-c", CONNECT, *paths], user=uid, group=uid, extra_groups=[],
                         capture_output=True, text=True, timeout=30, cwd="/")
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


DESTROY = r"""
import sys
from xdom.deploy.control import ControlClient, endpoint_for
c = ControlClient(endpoint_for(sys.argv[1]), timeout=3)
try:
    c.request("destroy", name=sys.argv[2])
    print("done")
except Exception as e:
    print(type(e).__name__)
finally:
    c.close()
"""


def destroy_as(uid: int, control_socket: str, name: str) -> str:
    """A process under ``uid`` asks the supervisor to destroy domain ``name``."""
    res = subprocess.run([sys.executable, "-c", DESTROY, control_socket, name], user=uid, group=uid,
                         extra_groups=[], capture_output=True, text=True, timeout=30, cwd="/")
    return res.stdout.strip() or res.stderr.strip()[-200:]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to try another uid")


@needs_root
def test_under_the_usual_umask_no_other_uid_reaches_the_control_or_management_sockets(run_dir: str) -> None:
    old = os.umask(0o022)
    try:
        with ts.Host(run_dir, ts.program("p1", "wait")) as h:
            lay = h.layout
            paths = [lay.control_socket, os.path.join(lay.run_dir, "mgmt.sock"), lay.keeper_socket]
            assert connect_as(OTHER_UID, [lay.hypercall_socket]) == ["connected"]   # the probe works: 0666 by design
            assert connect_as(OTHER_UID, paths) == ["PermissionError"] * len(paths)
    finally:
        os.umask(old)


@needs_root
def test_under_a_permissive_umask_no_other_uid_reaches_the_control_or_management_sockets(run_dir: str) -> None:
    old = os.umask(0)
    try:
        with ts.Host(run_dir, ts.program("p1", "wait")) as h:
            lay = h.layout
            paths = [lay.control_socket, os.path.join(lay.run_dir, "mgmt.sock"), os.path.join(lay.run_dir,
                                                                                                "events.sock")]
            modes = {os.path.basename(p): oct(stat.S_IMODE(os.lstat(p).st_mode)) for p in paths}
            got = connect_as(OTHER_UID, paths)
            said = destroy_as(OTHER_UID, lay.control_socket, "p1")     # and what a connection is good for
            assert h.row("p1")["state"] == "running", (modes, got, said)
            assert got == ["PermissionError"] * len(paths), (modes, got)
    finally:
        os.umask(old)


# ---- what a guest's workload leaves behind ---------------------------------------------------------------

def _escapees(tag: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if (p.info.get("cmdline") or [])[-1:] == [tag]:
            out.append(p)
    return out


def test_a_guests_workload_that_leaves_its_session_does_not_outlive_the_host(run_dir: str) -> None:
    tag = f"{300 + os.getpid() % 1000}.{int(time.monotonic() * 1000) % 1000}"
    text = ts.XS + ts.GUEST + f'workload = ["sh", "-c", "setsid -f sleep {tag}; exec sleep 300"]\n'
    try:
        with ts.Host(run_dir, text) as h:
            wait_until(lambda: _escapees(tag), 10, "the workload's own session")
            assert h.row("g1")["state"] == "running"
        wait_until(lambda: not [p for p in _escapees(tag) if p.status() != psutil.STATUS_ZOMBIE], 5,
                   "nothing of g1 left once the host stopped")
    finally:
        for p in _escapees(tag):
            p.kill()


@needs_root
def test_a_uid_a_process_still_runs_as_is_not_handed_to_a_new_domain(run_dir: str) -> None:
    lock_dir = os.path.join(run_dir, "uid-locks")
    first = next(u for u in range(UID_BASE, UID_BASE + UID_COUNT) if not is_system_user(u))
    leftover = subprocess.Popen(["sleep", "60"], user=first, group=first, extra_groups=[], cwd="/")
    try:
        topo = parse_topology(tomllib.loads('[[domain]]\nname = "p"\nkind = "program"\ncommand = ["true"]\n'),
                              "t.toml")
        plan = plan_uids(topo, UidMode.SEPARATE, lock_dir=lock_dir)
        try:
            assert plan.uids["p"] != first, f"uid {first} given to p while pid {leftover.pid} still runs as it"
        finally:
            plan.release()
    finally:
        leftover.kill()
        leftover.wait()


# ---- a frozen guest and the loop -----------------------------------------------------------------------

def test_a_guest_that_never_lets_go_does_not_stall_the_supervisor_during_block_detach(run_dir: str) -> None:
    text = ts.one_disk(run_dir)
    with ts.Host(run_dir, text) as h:
        g1 = h.ps()["g1"]["pid"]
        os.kill(g1, signal.SIGSTOP)                  # its blkfront will never answer Closing
        detach: list[object] = []
        try:
            def run() -> None:
                with ControlClient(endpoint_for(h.layout.control_socket), timeout=20) as c:
                    detach.append(c.request("block-detach", name="g1", vdev="xvda"))
            t = threading.Thread(target=run, daemon=True)
            t.start()
            time.sleep(0.3)                          # the detach is being waited on
            with ControlClient(endpoint_for(h.layout.control_socket), timeout=20) as c:
                t0 = time.monotonic()
                c.request("ping")
                took = time.monotonic() - t0
            t.join(20)
            assert detach, "block-detach never answered"
        finally:
            os.kill(g1, signal.SIGCONT)
        assert took < 1.5, f"the supervisor answered ping after {took:.1f}s: its loop waited on the guest"
        wait_until(lambda: h.row("g1")["state"] == "running", 10, "g1 running")


def test_a_frozen_xenstored_does_not_stall_the_supervisor_when_a_guest_restarts(run_dir: str) -> None:
    text = ts.XS + ts.GUEST.replace('memory = "4M"\n', 'memory = "4M"\nrestart = "always"\nrestart_backoff = 0\n')
    with ts.Host(run_dir, text) as h:
        ps = h.ps()
        os.kill(ps["xs"]["pid"], signal.SIGSTOP)
        try:
            os.kill(ps["g1"]["pid"], signal.SIGKILL)
            time.sleep(0.5)                             # g1 is restarted and connects: its introduction waits
            worst = 0.0
            with ControlClient(endpoint_for(h.layout.control_socket), timeout=20) as c:
                for _ in range(6):
                    t0 = time.monotonic()
                    c.request("ping")
                    worst = max(worst, time.monotonic() - t0)
                    time.sleep(0.2)
        finally:
            os.kill(ps["xs"]["pid"], signal.SIGCONT)
        assert worst < 1.5, f"the supervisor answered ping after {worst:.1f}s: its loop waited on xenstored"


def test_bound_log_keeps_the_tail_from_a_line_start_and_touches_nothing_else(run_dir: str) -> None:
    from xdom.deploy.log_bound import bound_log
    path = os.path.join(run_dir, "d.log")
    with open(path, "wb") as f:
        f.write(b"old line\n" * 200 + b"A" * 100 + b"\nlast line\n")
    before = os.path.getsize(path)
    assert bound_log(path, limit=1024, keep=64) == before
    with open(path, "rb") as f:
        kept = f.read()
    assert kept.startswith(b"--- xdom: this log passed") and kept.endswith(b"\nlast line\n") and b"A" not in kept
    assert bound_log(path, limit=4096, keep=64) is None                 # under the bound now: left alone
    link = os.path.join(run_dir, "link.log")
    os.symlink(path, link)
    with open(path, "ab") as f:
        f.write(b"x" * 8192)
    assert bound_log(link, limit=4096, keep=64) is None                 # a symlink is not followed
    fifo = os.path.join(run_dir, "fifo.log")
    os.mkfifo(fifo)
    assert bound_log(fifo, limit=0, keep=64) is None                    # nor a FIFO opened, nor blocked on


def _guests(names: list[str], restarting: bool = False) -> str:
    """xenstored and a 4 MiB guest per name; ``restarting``: each restarted at once when it dies."""
    more = 'memory = "4M"\nrestart = "always"\nrestart_backoff = 0\n' if restarting else 'memory = "4M"\n'
    return ts.XS + "".join(ts.GUEST.replace('"g1"', f'"{n}"').replace('memory = "4M"\n', more) for n in names)


@contextmanager
def _waiting_for_a_frozen_xenstored(h: ts.Host, names: list[str]) -> Iterator[int]:
    """Every guest of ``names`` killed (and restarted) while xenstored is stopped, until all wait together to
    be introduced; yields xenstored's pid, still stopped.  xenstored runs again on leaving, whatever happened."""
    ps = h.ps()
    xs_pid = ps["xs"]["pid"]
    os.kill(xs_pid, signal.SIGSTOP)                 # their probes go unanswered: they wait together
    try:
        for n in names:
            os.kill(ps[n]["pid"], signal.SIGKILL)
        wait_until(lambda: set(names) <= set(h.sup._introduce_waiting), 30, "the guests waiting for xenstored")
        yield xs_pid
    finally:
        os.kill(xs_pid, signal.SIGCONT)


def _introduced_since(h: ts.Host, names: list[str] | tuple[str, ...], since: float) -> bool:
    return all(any(e.time >= since for e in h.journal(n, "introduced")) for n in names)


def test_a_xenstored_that_stops_answering_after_the_probe_costs_one_request_not_one_per_guest(run_dir: str) -> None:
    """Four guests wait to be introduced; xenstored answers the probe, then stops (frozen, or compromised
    and answering nothing else): the first introduction waits out its request (XS_TIMEOUT) and the others
    wait for xenstored's next answer, instead of each in turn holding the loop as long again (100 guests:
    over 8 minutes).  Once it answers again, every guest is introduced."""
    from xdom.deploy.supervision import XS_TIMEOUT
    names = [f"g{i}" for i in range(1, 5)]
    with ts.Host(run_dir, _guests(names, restarting=True), ready_timeout=60.0) as h:
        for n in names:
            h.wait(n, "running", state="running")
        sup = h.sup
        introduce_now = sup._introduce_now
        frozen: list[int] = []
        worst = 0.0
        with _waiting_for_a_frozen_xenstored(h, names) as xs_pid:
            def freeze_then_introduce(d: object) -> object:
                if not frozen:                      # after the probe's answer, before the first request
                    frozen.append(xs_pid)
                    os.kill(xs_pid, signal.SIGSTOP)
                return introduce_now(d)
            sup._introduce_now = freeze_then_introduce  # type: ignore[method-assign]
            resumed_at = time.monotonic()
            os.kill(xs_pid, signal.SIGCONT)
            with ControlClient(endpoint_for(h.layout.control_socket), timeout=5 * XS_TIMEOUT * len(names)) as c:
                wait_until(lambda: frozen, 20, "xenstored answered the probe")
                until = time.monotonic() + 1.8 * XS_TIMEOUT
                while time.monotonic() < until:
                    t0 = time.monotonic()
                    c.request("ping")
                    worst = max(worst, time.monotonic() - t0)
                    time.sleep(0.1)
        assert worst < 1.6 * XS_TIMEOUT, \
            f"the supervisor answered ping after {worst:.1f}s: its loop waited on xenstored once per guest"
        wait_until(lambda: _introduced_since(h, names, resumed_at), 40,
                   "every guest introduced once xenstored answers again")
        for n in names:
            h.wait(n, "running once introduced", state="running")


def test_a_frozen_xenstored_costs_the_loop_one_request_not_one_per_guest_released(run_dir: str) -> None:
    """Three guests destroyed while xenstored is frozen: each release removes the guest's nodes, and each
    request waited XS_TIMEOUT in the loop.  After the first goes unanswered the others fail at once (the
    nodes are rewritten when the guests start again), until xenstored answers the probe."""
    from xdom.deploy.supervision import XS_TIMEOUT
    names = [f"g{i}" for i in range(1, 4)]
    with ts.Host(run_dir, _guests(names)) as h:
        for n in names:
            h.wait(n, "running", state="running")
        xs_pid = h.ps()["xs"]["pid"]
        stalls: list[float] = []
        stop = threading.Event()

        def ping() -> None:
            with ControlClient(endpoint_for(h.layout.control_socket), timeout=10 * XS_TIMEOUT) as c:
                while not stop.is_set():
                    t0 = time.monotonic()
                    c.request("ping")
                    stalls.append(time.monotonic() - t0)
                    time.sleep(0.05)
        os.kill(xs_pid, signal.SIGSTOP)
        pinger = threading.Thread(target=ping, daemon=True)
        try:
            pinger.start()
            with ControlClient(endpoint_for(h.layout.control_socket), timeout=10 * XS_TIMEOUT) as c:
                for n in names:
                    c.request("destroy", name=n)
                wait_until(lambda: all(c.request("info", name=n)["domain"]["state"] == "destroyed" for n in names),
                           10 * XS_TIMEOUT, "the three guests destroyed")
                time.sleep(1.0)
                c.request("ping")                       # after what the releases held
        finally:
            stop.set()
            pinger.join(10 * XS_TIMEOUT)
            os.kill(xs_pid, signal.SIGCONT)
        held = sum(s for s in stalls if s > 0.5)
        assert held < 1.6 * XS_TIMEOUT, f"the loop answered nothing for {held:.1f}s in all: one wait per guest"
        for n in names:                                 # xenstored answers again: they start as before
            h.control.request("restart", name=n)  # type: ignore[union-attr]
        for n in names:
            h.wait(n, "running again", 30, state="running")


def test_the_probes_pause_grows_until_a_request_is_answered_not_until_a_probe_is(run_dir: str) -> None:
    """A xenstored that answers the probe but leaves requests unanswered, twice, with nothing to introduce in
    between: the second silence pauses the probe twice as long as the first (a probe's answer alone does
    not end the pauses), and the first request answered after it does."""
    from xdom.deploy.supervision import XS_TIMEOUT
    from xdom.deploy.xenstored_probe import UNANSWERED_PAUSE
    names = ["g1", "g2"]
    with ts.Host(run_dir, _guests(names)) as h:
        for n in names:
            h.wait(n, "running", state="running")
        sup = h.sup
        xs_pid = h.ps()["xs"]["pid"]
        with ControlClient(endpoint_for(h.layout.control_socket), timeout=10 * XS_TIMEOUT) as c:
            for n, pause in (("g1", UNANSWERED_PAUSE), ("g2", 2 * UNANSWERED_PAUSE)):
                os.kill(xs_pid, signal.SIGSTOP)
                try:
                    c.request("destroy", name=n)            # its release's request goes unanswered
                    wait_until(lambda: sup._store_silent, 4 * XS_TIMEOUT, f"{n}'s release unanswered")
                    assert sup._probe is not None and sup._probe._pause == pause
                finally:
                    os.kill(xs_pid, signal.SIGCONT)
                # xenstored answers the probe once the pause is over; nothing waits to be introduced
                wait_until(lambda: not sup._store_silent, 4 * XS_TIMEOUT, "the probe answered")
            assert sup._probe._pause == 2 * UNANSWERED_PAUSE     # a probe's answer did not end it
            c.request("restart", name="g1")              # introduced: requests answered
            h.wait("g1", "running again", 30, state="running")
            assert sup._probe._pause == 0.0


def test_a_guest_whose_introduction_goes_unanswered_does_not_keep_the_others_waiting(run_dir: str) -> None:
    """Each time g1 is introduced xenstored stops answering (for a moment): the round ends at g1, and the
    next round starts after it, so g2 and g3 are introduced instead of waiting behind g1 every time."""
    from xdom.deploy.supervision import XS_TIMEOUT
    names = ["g1", "g2", "g3"]
    with ts.Host(run_dir, _guests(names, restarting=True), ready_timeout=120.0) as h:
        for n in names:
            h.wait(n, "running", state="running")
        sup = h.sup
        introduce_now = sup._introduce_now
        thaws: list[threading.Timer] = []
        with _waiting_for_a_frozen_xenstored(h, names) as xs_pid:
            def stall_at_g1(d: Any) -> object:
                if d.name == "g1":                  # xenstored stops while g1's request waits
                    os.kill(xs_pid, signal.SIGSTOP)
                    thaws.append(threading.Timer(XS_TIMEOUT + 0.5, os.kill, (xs_pid, signal.SIGCONT)))
                    thaws[-1].start()
                return introduce_now(d)
            sup._introduce_now = stall_at_g1  # type: ignore[method-assign]
            try:
                resumed_at = time.monotonic()
                os.kill(xs_pid, signal.SIGCONT)
                wait_until(lambda: _introduced_since(h, ("g2", "g3"), resumed_at), 6 * XS_TIMEOUT,
                           "g2 and g3 introduced while g1's introduction stalls")
            finally:
                sup._introduce_now = introduce_now  # type: ignore[method-assign]
                for t in thaws:
                    t.cancel()
        for n in names:
            h.wait(n, "running", 60, state="running")
