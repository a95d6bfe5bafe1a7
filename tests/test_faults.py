"""Fault injection: every kind of xdom process killed with SIGKILL at random moments, under load.

A host started with ``xdom up --detach`` (xenstored, blkback, netback on a
Linux bridge, guests g1 and g2 each with a disk and a vif, as
deploy/examples/processes.toml) carries two loads for the whole run:

* DISK  a loop of fio jobs on g1's NBD export: 4 KiB random writes at QD16,
        rate-limited, each block carrying a crc32c that fio reads back and
        checks while it runs (verify_backlog) and after (do_verify); every
        job must end with no error, every byte written and every byte
        verified;
* NET   one TCP connection from g1 to g2 carrying a deterministic byte
        stream that g2 checks byte by byte as it arrives; it must survive
        everything and end with every byte sent received and correct.

Meanwhile a seeded schedule kills, in a random order each round and at a
random moment, each kind of process: blkback, netback, xenstored, the broker
(a new one takes over the running domains), guest g2 (restart =
on-failure: its pattern, written before the schedule, must read back from
its disk after its restart, and the TCP stream from g1 must ride out its
restart) and the supervisor (the host runs on without it; a new ``xdom up``
of the topology, up to half a second later, adopts it).  A domain that the
broker's takeover fails (it was still starting when the broker died) may
restart once more than it was killed, and the supervisor's log must say so.  After each kill the test waits until the supervisor reports the
victim (or a new broker) running and both loads have moved on.  At the end,
``xdom down`` must leave nothing: no process, network namespace (with the
guests' TAPs and netback's bridge and TAPs in them), socket, run directory
or xenstored state.

Every wait has a deadline; a failure names the seed, which
``XDOM_FAULT_SEED`` replays.  ``make test`` runs two rounds (twelve kills, about
20 s); ``XDOM_FAULT_ROUNDS=N`` runs N rounds on the same host (a broker
kill waits when three happened within the last minute: the supervisor gives
the host up at the fourth).  Nothing here asserts a timing: the stalls are
printed (``-s``) and measured by ``benchmarks/bench_stall.py``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest
from helpers import wait_until

from xdom.deploy import netns
from xdom.deploy.control import ControlClient, endpoint_for
from xdom.deploy.rundir import Layout, running_pid
from xdom.deploy.supervisor import TAKEOVER_FAILED

pytestmark = [pytest.mark.timeout(900),
              pytest.mark.skipif(netns.unavailable_reason() is not None
                                 or not all(shutil.which(t) for t in ("fio", "qemu-io", "nbdinfo")),
                                 reason="needs root, iproute2, fio, qemu-io and nbdinfo (make test installs them)")]

XDOM = [sys.executable, "-m", "xdom.deploy.cli"]
ROUNDS = int(os.environ.get("XDOM_FAULT_ROUNDS", "2"))
OVERLAP = float(os.environ.get("XDOM_FAULT_OVERLAP", "0.25"))   # odds that a kill comes before the last is back
WAIT = 60.0                     # seconds for anything to come back after a kill; a hang fails the test
KINDS = ("blkback", "netback", "xenstored", "broker", "guest", "supervisor")
VICTIM = {"blkback": "blk0", "netback": "net0", "xenstored": "xs", "broker": None, "guest": "g2", "supervisor": None}
BROKER_FLAP = (3, 60.0)         # the supervisor gives the host up at a 4th broker death within a minute
FIO_JOB = 8 << 20               # bytes per fio job
FIO_SPAN = 48 << 20             # the jobs go round this much of g1's disk, a job's worth at a time
STREAM_RATE = 16 << 20          # bytes/s the TCP stream carries (leaves the CPUs to the rest)
PATTERN = (0x5A, 4 << 20)       # g2's disk: this byte over this many bytes, written before the kills

# The stream's two ends run in the guests' namespaces.  Block k of the stream is
# random.Random(k).randbytes(65536): the sink knows what must arrive without being told.
SINK = r"""
import random, socket, sys, time
s = socket.create_server((sys.argv[1], int(sys.argv[2]))); print("ready", flush=True)
c, _ = s.accept(); c.settimeout(float(sys.argv[3]))
k, want, got, last = 0, b"", 0, 0.0
while True:
    data = c.recv(1 << 18)
    if not data:
        break
    view = memoryview(data)
    while view:
        if not want:
            want = random.Random(k).randbytes(65536); k += 1
        n = min(len(want), len(view))
        if view[:n] != want[:n]:
            bad = next(i for i in range(n) if view[i] != want[i])
            print(f"corrupt {got + bad}", flush=True); sys.exit(1)
        want, view, got = want[n:], view[n:], got + n
    if time.monotonic() - last > 0.1:
        print(f"at {got}", flush=True); last = time.monotonic()
print(f"done {got}", flush=True)
"""
SOURCE = r"""
import random, select, socket, sys, time
host, port, rate, patience = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
c = socket.create_connection((host, port), timeout=patience)
k, sent, began = 0, 0, time.monotonic()
while not select.select([sys.stdin], [], [], max(0.0, began + sent / rate - time.monotonic()))[0]:
    c.sendall(random.Random(k).randbytes(65536)); k += 1; sent += 65536
c.shutdown(socket.SHUT_WR)
c.recv(1)
print(f"sent {sent}", flush=True)
"""


def xdom(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*XDOM, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def topology(base: str) -> tuple[str, Layout]:
    lay = Layout(os.path.join(base, "state"), os.path.join(base, "run"))
    os.makedirs(os.path.join(lay.state_dir, "images"), exist_ok=True)
    for g in ("g1", "g2"):
        with open(os.path.join(lay.state_dir, "images", f"{g}.img"), "wb") as f:
            f.truncate(64 << 20)
    often = "restart_backoff = 0.05\nflap_limit = 1000\n"       # every kill is restarted at once
    text = (f'[host]\nstate_dir = "{lay.state_dir}"\nrun_dir = "{lay.run_dir}"\n\n'
            f'[[domain]]\nname = "xs"\nkind = "xenstored"\n{often}'
            f'[[domain]]\nname = "blk0"\nkind = "blkback"\n{often}'
            f'[[domain]]\nname = "net0"\nkind = "netback"\nswitch = "bridge"\n{often}')
    for n in (1, 2):
        text += (f'[[domain]]\nname = "g{n}"\nkind = "guest"\nmemory = "32M"\nrestart = "on-failure"\n{often}'
                 f'disk = ["format=raw, vdev=xvda, access=rw, backend=blk0, export=nbd:xvda.sock, '
                 f'target=images/g{n}.img"]\n'
                 f'vif = ["mac=00:16:3e:00:00:0{n}, bridge=xdombr0, backend=net0, ip=10.77.0.{n}/24"]\n')
    path = os.path.join(base, "faults.toml")
    with open(path, "w") as f:
        f.write(text)
    return path, lay


def uri(export: str) -> str:
    return f"nbd+unix:///?socket={export}"


class FioLoop:
    """fio jobs one after the other on an export until stopped; each one's outcome."""

    def __init__(self, export: str, cwd: str) -> None:
        self.export, self.cwd = export, cwd
        self.results: list[tuple[float, str]] = []      # (monotonic end, "" or what went wrong)
        self.clat_max = 0.0
        self._stop = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._thread = threading.Thread(target=self._run, name="fio-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            offset = (n * FIO_JOB) % FIO_SPAN
            n += 1
            self._proc = subprocess.Popen(
                ["fio", f"--name=faults{n}", "--ioengine=nbd", f"--uri={uri(self.export)}", "--rw=randwrite",
                 "--bs=4k", "--iodepth=16", f"--offset={offset}", f"--size={FIO_JOB}", "--rate=8m",
                 "--verify=crc32c", "--do_verify=1", "--verify_backlog=512", "--verify_fatal=1",
                 "--verify_state_save=0", "--output-format=json"],
                cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
            try:
                out, err = self._proc.communicate(timeout=WAIT + 30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                out, err = self._proc.communicate()
                err = f"still running {WAIT + 30:g}s after it started; {err}"
            self.results.append((time.monotonic(), self._judge(n, out, err)))

    def _judge(self, n: int, out: str, err: str) -> str:
        assert self._proc is not None
        try:
            job = json.loads(out[out.index("{"):])["jobs"][0]
        except (ValueError, KeyError, IndexError):
            return f"fio job {n}: exit status {self._proc.returncode}, no report: {err.strip()[-500:]}"
        self.clat_max = max([self.clat_max] + [job[d]["clat_ns"]["max"] / 1e9 for d in ("read", "write")])
        if self._proc.returncode != 0 or job["error"]:
            return f"fio job {n}: exit status {self._proc.returncode}, error {job['error']}: {err.strip()[-500:]}"
        if job["write"]["io_bytes"] != FIO_JOB or job["read"]["io_bytes"] != FIO_JOB:
            return f"fio job {n}: wrote {job['write']['io_bytes']}, verified {job['read']['io_bytes']} of {FIO_JOB}"
        return ""

    def done_since(self, t: float) -> int:
        """Jobs that ended well after ``t``."""
        return sum(1 for end, err in list(self.results) if end > t and not err)

    def errors(self) -> list[str]:
        return [err for _, err in list(self.results) if err]

    def stop(self, timeout: float = WAIT + 60) -> None:
        """Let the job under way finish (it is checked like the others), run no more."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive() and self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._thread.join(10)


class Stream:
    """A TCP stream g1 -> g2, checked byte by byte by g2's end; ``received`` follows its progress."""

    def __init__(self, src_ns: str, dst_ns: str, dst_ip: str, port: int = 5003) -> None:
        self.received = 0
        self.progress_at = 0.0                # monotonic time of the last progress report
        self.lines: list[str] = []
        self._at: dict[float, int] = {}       # bytes received at each marked moment
        self.sink = subprocess.Popen(["ip", "netns", "exec", dst_ns, sys.executable, "-c", SINK, dst_ip, str(port),
                                      str(WAIT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL)
        self.source: subprocess.Popen[str] | None = None
        assert self.sink.stdout is not None
        ready = self.sink.stdout.readline().strip()
        assert ready == "ready", (ready, self.sink.stderr.read() if self.sink.stderr else "")
        self._reader = threading.Thread(target=self._read, name="stream-sink", daemon=True)
        self._reader.start()
        self.source = subprocess.Popen(["ip", "netns", "exec", src_ns, sys.executable, "-c", SOURCE, dst_ip,
                                        str(port), str(STREAM_RATE), str(WAIT)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)

    def _read(self) -> None:
        assert self.sink.stdout is not None
        for line in self.sink.stdout:
            line = line.strip()
            self.lines.append(line)
            if line.startswith(("at ", "done ")):
                self.received = int(line.split()[1])
                self.progress_at = time.monotonic()

    def moved_since(self, t: float, amount: int) -> bool:
        """At least ``amount`` bytes more than at ``t`` have arrived (checked) since ``t``."""
        if self.progress_at <= t:
            return False
        return self.received >= self._at.get(t, 0) + amount

    def mark(self, t: float) -> None:
        self._at[t] = self.received

    def finish(self) -> tuple[int, int, str]:
        """Stop the source; (bytes sent, bytes received correct, what went wrong)."""
        assert self.source is not None
        try:
            out, err = self.source.communicate("stop\n", timeout=WAIT + 30)
            self.sink.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.stop()
            return 0, self.received, "the stream did not end"
        self._reader.join(10)
        sink_err = self.sink.stderr.read() if self.sink.stderr else ""
        sent = int(out.split()[1]) if out.startswith("sent ") else -1
        problem = ""
        if self.source.returncode != 0 or sent < 0:
            problem = f"the source failed (status {self.source.returncode}): {err.strip()[-500:]}"
        elif self.sink.returncode != 0 or not self.lines or not self.lines[-1].startswith("done "):
            problem = f"the sink failed (status {self.sink.returncode}): {self.lines[-3:]} {sink_err.strip()[-500:]}"
        return sent, self.received, problem

    def stop(self) -> None:
        for p in (self.source, self.sink):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


@dataclass
class Kill:
    kind: str
    at: float                                   # seconds into the schedule
    back: float = float("nan")                  # seconds until the replacement ran
    moved: float = float("nan")                 # seconds until both loads had moved on after that
    notes: list[str] = field(default_factory=list)


class Round:
    """One host, its loads and the kill schedule."""

    def __init__(self, base: str, seed: int) -> None:
        self.base, self.seed = base, seed
        self.rng = random.Random(seed)
        self.path, self.lay = topology(base)
        self.control: ControlClient | None = None
        self.fio: FioLoop | None = None
        self.stream: Stream | None = None
        self.kills: list[Kill] = []
        self.broker_kills: list[float] = []
        self.adoptions = 0
        self.began = 0.0

    def say(self, what: str) -> str:
        return f"seed {self.seed} (XDOM_FAULT_SEED={self.seed} replays it): {what}"

    # ---- the host ----------------------------------------------------------------------

    def start(self) -> None:
        up = xdom("up", self.path, "--detach")
        assert up.returncode == 0, self.say(up.stdout + up.stderr)
        self.control = ControlClient(endpoint_for(self.lay.control_socket), timeout=WAIT)

    def adopt(self, why: str) -> None:
        """``xdom up`` again: it finds the host running without a supervisor and adopts it."""
        if self.control is not None:
            self.control.close()
            self.control = None
        up = xdom("up", self.path, "--detach", timeout=WAIT * 2)
        assert up.returncode == 0 and "adopting the host" in up.stdout, self.say(f"{why}: {up.stdout}{up.stderr}")
        self.control = ControlClient(endpoint_for(self.lay.control_socket), timeout=WAIT)
        self.adoptions += 1

    def rows(self) -> dict[str, dict[str, Any]]:
        assert self.control is not None
        return {r["name"]: r for r in self.control.request("ps")["domains"]}

    def row(self, name: str) -> dict[str, Any]:
        assert self.control is not None
        return self.control.request("info", name=name)["domain"]

    def broker_pid(self) -> int | None:
        assert self.control is not None
        return self.control.request("ping")["broker_pid"]

    def export(self, guest: str) -> str:
        return next(d["export"] for d in self.row(guest)["devices"] if d["type"] == "vbd")

    def qemu_io(self, guest: str, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["qemu-io", "-f", "raw", "-c", command, uri(self.export(guest))],
                              capture_output=True, text=True, timeout=WAIT)

    # ---- the loads ---------------------------------------------------------------------

    def load(self) -> None:
        byte, size = PATTERN
        res = self.qemu_io("g2", f"write -P {byte:#x} 0 {size}")
        assert res.returncode == 0 and "wrote" in res.stdout, self.say(f"g2's pattern: {res.stdout}{res.stderr}")
        rows = self.rows()
        self.fio = FioLoop(self.export("g1"), self.base)
        self.stream = Stream(rows["g1"]["netns"], rows["g2"]["netns"], "10.77.0.2")
        t = time.monotonic()
        self.stream.mark(t)
        self.moved_on(t, "the loads to start")

    def moved_on(self, t: float, what: str) -> None:
        """Both loads made progress after ``t``: a fio job ended well, the stream carried 1 MiB more."""
        assert self.fio is not None and self.stream is not None

        def moved() -> bool:
            if self.fio is not None and self.fio.errors():
                raise AssertionError(self.say(f"{what}: {self.fio.errors()[0]}"))
            return self.fio.done_since(t) > 0 and self.stream.moved_since(t, 1 << 20)
        try:
            wait_until(moved, WAIT, what, interval=0.02)
        except AssertionError as e:
            raise AssertionError(self.say(f"{what}: {e}; stream {self.stream.lines[-3:]}, "
                                          f"fio {len(self.fio.results)} jobs")) from None

    # ---- the kills ---------------------------------------------------------------------

    def victim(self, kind: str) -> int | None:
        name = VICTIM[kind]
        if kind == "supervisor":
            assert self.control is not None
            pid = self.control.request("ping")["pid"]
        elif name is None:
            pid = self.broker_pid()
        else:
            r = self.row(name)
            assert r["state"] not in ("failed", "stopped"), self.say(f"{name} is {r['state']}: {r['last_exit']}")
            pid = r["pid"] if r["state"] == "running" else None
        return pid

    def is_back(self, kind: str, old: int) -> bool:
        name = VICTIM[kind]
        if name is None:
            pid = self.broker_pid()
            return pid is not None and pid != old
        r = self.row(name)
        assert r["state"] not in ("failed", "stopped"), self.say(f"{name} is {r['state']}: {r['last_exit']}")
        return r["state"] == "running" and r["pid"] not in (None, old)

    def broker_patience(self) -> float:
        """Seconds to wait before the broker may be killed again (the supervisor gives the host up at a
        fourth death within a minute)."""
        limit, window = BROKER_FLAP
        recent = [t for t in self.broker_kills if time.monotonic() - t < window + 2]
        return recent[0] + window + 2 - time.monotonic() if len(recent) >= limit else 0.0

    def fire(self, kind: str) -> tuple[Kill, int, float]:
        """SIGKILL to ``kind``'s process (once it runs); the kill, the pid and when."""
        if kind == "broker":
            time.sleep(max(0.0, self.broker_patience()))
        pid = wait_until(lambda: self.victim(kind), WAIT, self.say(f"{kind} running before its kill"), interval=0.02)
        k = Kill(kind, time.monotonic() - self.began)
        self.kills.append(k)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        if kind == "supervisor":
            # The host runs on unsupervised for a moment, then a new `xdom up` of the topology adopts it.
            time.sleep(self.rng.uniform(0.0, 0.5))
            self.adopt(f"the supervisor killed {k.at:.2f}s in")
            k.back = time.monotonic() - killed
        if kind == "broker":
            self.broker_kills.append(killed)
            # Nothing but ``ping`` until a new broker runs: the supervisor answers ``ps`` and ``info``
            # with the broker's domain list, and waits for a dead broker's answer (10 s) first.
            wait_until(lambda: self.is_back(kind, pid), WAIT, self.say(f"a new broker after the kill {k.at:.2f}s "
                                                                        f"in"), interval=0.02)
            k.back = time.monotonic() - killed
        return k, pid, killed

    def settle(self, fired: list[tuple[Kill, int, float]]) -> None:
        """Every victim runs again, then both loads move on; a killed guest's disk holds what it held."""
        assert self.stream is not None
        for k, pid, killed in fired:
            if k.back == k.back:
                continue                        # (a broker: waited for when it was killed)
            wait_until(lambda: self.is_back(k.kind, pid), WAIT, self.say(f"{k.kind} back after its kill "
                                                                           f"{k.at:.2f}s in"), interval=0.02)
            k.back = time.monotonic() - killed
        last = fired[-1][2]
        self.stream.mark(last)
        what = " and ".join(f"{k.kind} (killed {k.at:.2f}s in)" for k, _, _ in fired)
        self.moved_on(last, f"the loads moving on after {what}")
        for k, _, killed in fired:
            k.moved = time.monotonic() - killed
        if any(k.kind == "guest" for k, _, _ in fired):
            byte, size = PATTERN
            res = self.qemu_io("g2", f"read -P {byte:#x} 0 {size}")
            assert res.returncode == 0 and "read " in res.stdout and "Pattern verification failed" not in \
                res.stdout + res.stderr, self.say(f"g2's pattern after its restart: {res.stdout}{res.stderr}")
        for k, _, _ in fired:
            print(self.say(f"{k.kind} killed {k.at:.2f}s in{' (overlapping)' if len(fired) > 1 else ''}: "
                           f"back {k.back:.3f}s, loads moving {k.moved:.3f}s"))

    def schedule(self, rounds: int) -> None:
        """Each round kills every kind once, in a random order, each at a random moment: mostly once the
        one before is back and the loads moved on, sometimes (OVERLAP) while it is still coming back."""
        self.began = time.monotonic()
        for _ in range(rounds):
            kinds = list(KINDS)
            self.rng.shuffle(kinds)
            fired: list[tuple[Kill, int, float]] = []
            for i, kind in enumerate(kinds):
                if kind == "broker" and fired and self.broker_patience() > 0:
                    self.settle(fired)
                    fired = []
                time.sleep(self.rng.uniform(0.0, 0.3 if fired else 1.0))
                fired.append(self.fire(kind))
                if i + 1 == len(kinds) or self.rng.random() >= OVERLAP:
                    self.settle(fired)
                    fired = []

    # ---- the end -----------------------------------------------------------------------

    def finish_loads(self) -> None:
        assert self.fio is not None and self.stream is not None
        self.fio.stop()
        errors = self.fio.errors()
        assert not errors, self.say(f"fio: {errors}")
        sent, received, problem = self.stream.finish()
        assert not problem, self.say(f"stream: {problem}")
        assert sent == received > 0, self.say(f"stream: {sent} bytes sent, {received} received and checked")
        print(self.say(f"{len(self.fio.results)} fio jobs verified (clat max {self.fio.clat_max:.3f}s), "
                       f"{received >> 20} MiB streamed and checked"))

    def others_untouched(self, before: dict[str, dict[str, Any]]) -> None:
        """Only the victims were restarted, each as often as it was killed."""
        after = self.rows()
        with open(self.lay.log_path("supervisor"), errors="replace") as f:
            log = f.read()
        for name, r in after.items():
            kills = sum(1 for k in self.kills if VICTIM[k.kind] == name)
            # A domain restarting when the broker dies is failed by the new broker, which says so (README).
            failed = log.count(f" domain {name}: {TAKEOVER_FAILED}")
            if failed:
                print(self.say(f"{name}: {TAKEOVER_FAILED} ({failed} time(s))"))
            assert r["state"] == "running", self.say(f"{name} is {r['state']}: {r['last_exit']}")
            assert r["restarts"] - before[name]["restarts"] == kills + failed, \
                self.say(f"{name} restarted {r['restarts']} times, killed {kills} times, "
                         f"failed by a broker takeover {failed} times ({r['last_exit']})")

    def down(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None
        supervisor = running_pid(self.lay.run_dir)
        res = xdom("down", "--run-dir", self.lay.run_dir, timeout=WAIT * 2)
        assert res.returncode == 0, self.say(f"xdom down: {res!r}")
        assert supervisor is None or not psutil.pid_exists(supervisor) or \
            psutil.Process(supervisor).status() == psutil.STATUS_ZOMBIE, self.say("the supervisor is still there")
        left = leftovers(self.lay)
        assert not left, self.say(f"left behind after xdom down: {left}")

    def abandon(self) -> None:
        """After a failure: stop whatever runs, so the test leaves nothing either way."""
        if self.fio is not None:
            self.fio._stop.set()
            if self.fio._proc is not None and self.fio._proc.poll() is None:
                self.fio._proc.kill()
            self.fio._thread.join(30)
        if self.stream is not None:
            self.stream.stop()
        if self.control is not None:
            self.control.close()
            self.control = None
        try:
            if running_pid(self.lay.run_dir) is not None:
                xdom("down", "--run-dir", self.lay.run_dir, timeout=WAIT * 2)
        except Exception:
            pass
        for p in psutil.process_iter(["cmdline"]):
            try:
                if self.lay.run_dir in " ".join(p.info["cmdline"] or []):
                    p.kill()
            except psutil.Error:
                pass
        for name in netns.of_host(self.lay.run_dir):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def print_logs(lay: Layout, lines: int = 40) -> None:
    """A failed round's story is in the supervisor's and the domains' logs: show their ends."""
    if not os.path.isdir(lay.logs_dir):
        return
    for name in sorted(os.listdir(lay.logs_dir)):
        with open(os.path.join(lay.logs_dir, name), errors="replace") as f:
            tail = f.readlines()[-lines:]
        print(f"----- {name} (last {len(tail)} lines) -----\n{''.join(tail)}")


def leftovers(lay: Layout) -> list[str]:
    """What a host that is down still has: processes, namespaces (and the TAPs and bridges in them), files."""
    found = []
    if os.path.exists(lay.run_dir):
        found.append(f"run directory {lay.run_dir}: {os.listdir(lay.run_dir)}")
    if os.path.exists(lay.xenstored_state):
        found.append(f"xenstored's state {lay.xenstored_state}")
    for name in netns.of_host(lay.run_dir):
        links = subprocess.run(["ip", "-n", name, "-o", "link"], capture_output=True, text=True).stdout
        found.append(f"namespace {name} with {[ln.split(':')[1].strip() for ln in links.splitlines()]}")
    for p in psutil.process_iter(["pid", "cmdline", "environ"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            env = p.info["environ"] or {}
        except psutil.Error:
            continue
        if (lay.run_dir in cmd or lay.run_dir in env.get("XDOM_HYPERCALL", "")) and p.pid != os.getpid():
            found.append(f"process {p.pid} {cmd[:160]}")
    return found


def test_every_kind_of_process_killed_under_fio_verify_and_a_tcp_stream(run_dir: str) -> None:
    seed = int(os.environ.get("XDOM_FAULT_SEED", random.randrange(1 << 30)))
    r = Round(run_dir, seed)
    done = False
    try:
        r.start()
        before = r.rows()
        r.load()
        r.schedule(ROUNDS)
        r.finish_loads()
        r.others_untouched(before)
        r.down()
        done = True
    finally:
        if not done:
            r.abandon()
            print_logs(r.lay)
