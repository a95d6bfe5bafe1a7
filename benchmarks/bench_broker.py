#!/usr/bin/env python3
"""xdom broker benchmarks: our figures next to references measured in the same run.

    python benchmarks/bench_broker.py           # full run (~1 minute at most)
    python benchmarks/bench_broker.py --quick   # short run, to check that it works

Three measurements, each printed beside its reference:

1. Event-channel round trip between two domain *processes* (XenHost.notify +
   evtchn.wait, and a poll loop on the same xdom fds) against a raw
   ``os.eventfd`` ping-pong between two Python processes and, when gcc is
   present, a C eventfd ping-pong between two forked processes (the floor).
2. Grant map+unmap at batch sizes 1, 16 and 64: a backend domain process
   maps N refs of a granter domain in one ``map_grants`` call and unmaps
   them in one ``unmap_grants`` call; broker mode against the issue's
   reference, N in-process mmap + munmap of a memfd page, and the local
   (in-process) variant; with the CPU each process spent per ref.
3. Grant copy throughput, 4 KiB ops in batches of 64 (granter's granted
   pages -> copier's own frames), broker mode (broker and backend on one
   CPU, on two, not pinned) against local mode, Python preads of 4 KiB from
   a memfd and a plain Python page-by-page memoryview copy; with the CPU
   seconds per GiB of the copier and of the broker.  On one CPU, three
   rounds alternating the copy and the preads, medians and each round's
   ratio.

The round trips are measured twice: every process pinned to one CPU (what
the software costs: no wakeup crosses CPUs) and pinger and ponger pinned to
two (what a wakeup across CPUs costs here).  Unpinned, the scheduler's
placement decides each variant's figure (3 us on one CPU, 75 us across,
either at random), so their medians cannot be compared.  Nothing is
asserted about timings; a bad
status from xdom, on the other hand, stops the run (the figures would be
meaningless).  The same file is also the child program of the benchmark
(``--child ROLE``), so pinger, ponger and backend run exactly this code.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from broker_report import report
from c_pingpong import compile_c_pingpong, run_c_pingpong

PAGE = 4096
BATCHES = (1, 16, 64)
COPY_BATCH = 64
CHILD_TIMEOUT = 60.0   # seconds the parent waits for any one line from a child
_USABLE_CPUS = os.sched_getaffinity(0)     # as the benchmark started (the parent pins itself for the preads)


# ---------------------------------------------------------------------------
# small helpers shared by parent and children


def emit(obj: dict[str, Any]) -> None:
    """Child -> parent: one JSON line on stdout."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def receive() -> dict[str, Any]:
    """Parent -> child: one JSON line on stdin."""
    line = sys.stdin.readline()
    if not line:
        raise SystemExit(0)    # the parent went away
    return json.loads(line)


def summarise(samples_ns: array.array) -> dict[str, float]:
    s = sorted(samples_ns)
    n = len(s)
    return {"n": n, "mean_us": sum(s) / n / 1e3, "median_us": s[n // 2] / 1e3,
            "p99_us": s[min(n - 1, (n * 99) // 100)] / 1e3, "min_us": s[0] / 1e3}


def timed_loop(step: Callable[[], None], seconds: float, min_iters: int = 3) -> tuple[int, float]:
    """Run ``step`` until ``seconds`` have passed (at least ``min_iters`` times)."""
    step()   # warm-up, untimed
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        step()
        n += 1
        now = time.perf_counter()
        if n >= min_iters and now >= deadline:
            return n, now - t0


# ---------------------------------------------------------------------------
# event channel ping-pong (runs in the children)


class _XdomPort:
    """Pinger/ponger ends over an xdom event channel."""

    def __init__(self, host: Any, port: int) -> None:
        self.h = host
        self.port = port
        self.fd = host.evtchn.fileno(port)

    def loops(self, style: str) -> tuple[Callable[[], None], Callable[[], None]]:
        h, port = self.h, self.port
        if style == "api":
            wait = h.evtchn.wait

            def await_event() -> None:
                while port not in wait(10.0):
                    pass  # (a timeout would loop; the parent's own timeout catches a dead peer)
            return (lambda: h.notify(port)), await_event
        if style == "poll":
            return (lambda: h.notify(port)), _poll_waiter(self.fd, lambda: h.evtchn.consume(port))
        raise ValueError(style)


def _poll_waiter(fd: int, clear: Callable[[], int]) -> Callable[[], None]:
    p = select.poll()
    p.register(fd, select.POLLIN)
    poll = p.poll

    def await_event() -> None:
        while True:
            poll(10_000)
            if clear():
                return
    return await_event


class _RawPort:
    """Pinger/ponger ends over two plain eventfds handed down by the parent."""

    def __init__(self, wait_fd: int, notify_fd: int) -> None:
        self.wait_fd = wait_fd
        self.notify_fd = notify_fd

    def loops(self, style: str) -> tuple[Callable[[], None], Callable[[], None]]:
        wfd, nfd = self.wait_fd, self.notify_fd
        write, read = os.eventfd_write, os.eventfd_read
        if style == "poll":      # non-blocking fds, as xdom's are
            os.set_blocking(wfd, False)

            def clear() -> int:
                try:
                    return read(wfd)
                except BlockingIOError:
                    return 0
            return (lambda: write(nfd, 1)), _poll_waiter(wfd, clear)
        if style == "block":     # the fastest Python can do: blocking eventfd_read
            os.set_blocking(wfd, True)
            return (lambda: write(nfd, 1)), (lambda: read(wfd))
        raise ValueError(style)


def child_evtchn(role: str) -> None:
    cfg = receive()
    host = None
    if cfg["mode"] == "xdom":
        from xdom.domains.xenhost import connect
        host = connect()
        if role == "ping":
            port = host.alloc_unbound(cfg["peer"])
            emit({"port": port, "domid": host.domid})
            receive()   # "bound"
        else:
            port = host.bind_interdomain(cfg["peer"], cfg["port"])
            host.evtchn.consume(port)   # Xen marks a freshly bound port pending: drain it
        end: Any = _XdomPort(host, port)
    else:
        end = _RawPort(cfg["wait_fd"], cfg["notify_fd"])
    emit({"ready": True})
    try:
        while True:
            cmd = receive()
            if cmd.get("exit"):
                break
            notify, await_event = end.loops(cmd["style"])
            warm, iters = cmd["warmup"], cmd["iters"]
            if role == "pong":
                emit({"armed": True})
                for _ in range(warm + iters):
                    await_event()
                    notify()
                emit({"done": True})
                continue
            clock = time.perf_counter_ns
            for _ in range(warm):
                notify()
                await_event()
            samples = array.array("q", bytes(8 * iters))
            for i in range(iters):
                t0 = clock()
                notify()
                await_event()
                samples[i] = clock() - t0
            emit({"samples": samples.tobytes().hex()})
    finally:
        if host is not None:
            host.close()


# ---------------------------------------------------------------------------
# grant map/unmap and copy (backend side; in a child for broker mode, inline for local)


def map_sanity_check(h: Any, granter: int, refs: list[int], marker: bytes) -> None:
    """One checked round first: the mapped page must be the granter's page."""
    (res,) = h.map_grants([(granter, refs[0], False)])
    if res.status != 0 or bytes(res.mapping.view[:len(marker)]) != marker:
        raise RuntimeError(f"map sanity check failed: status {res.status}")
    if h.unmap_grants([res.mapping]) != [0]:
        raise RuntimeError("unmap sanity check failed")


def map_benchmark(h: Any, granter: int, refs: list[int], n: int, seconds: float) -> dict[str, float]:
    """Map ``n`` refs in one call and unmap them in one, again and again; with this process's CPU."""
    ops = [(granter, ref, False) for ref in refs[:n]]

    def cycle() -> None:
        results = h.map_grants(ops)
        for r in results:
            if r.status:
                raise RuntimeError(f"map_grants: status {r.status}")
        statuses = h.unmap_grants([r.mapping for r in results])
        if any(statuses):
            raise RuntimeError(f"unmap_grants: statuses {statuses}")
    cpu0 = time.process_time()
    iters, elapsed = timed_loop(cycle, seconds)
    return {"refs_per_s": iters * n / elapsed, "calls": iters, "us_per_batch": elapsed / iters * 1e6,
            "refs": iters * n, "cpu_s": time.process_time() - cpu0}


def copy_benchmark(h: Any, granter: int, refs: list[int], marker: bytes, seconds: float) -> dict[str, Any]:
    """Copy the granter's first COPY_BATCH granted pages into our own frames, COPY_BATCH ops a call."""
    from xdom.domains.xenhost import CopyOp
    h.memory.ensure(range(COPY_BATCH))          # our side: frames we have (memory is populated as it is used)
    copy_ops = [CopyOp(src_ref_or_gfn=ref, src_offset=0, dst_ref_or_gfn=gfn, dst_offset=0, length=PAGE,
                       src_domid=granter, dst_domid=None)
                for gfn, ref in enumerate(refs[:COPY_BATCH])]

    def copy() -> None:
        statuses = h.copy_grants(copy_ops)
        if any(statuses):
            raise RuntimeError(f"copy_grants: statuses {statuses}")
    copy()
    for gfn in range(COPY_BATCH):
        if bytes(h.memory.frame(gfn)[:len(marker)]) != marker:
            raise RuntimeError(f"copy sanity check failed at gfn {gfn}")
    cpu0 = time.process_time()
    iters, elapsed = timed_loop(copy, seconds)
    return {"mib_s": iters * COPY_BATCH * PAGE / elapsed / 2**20, "calls": iters,
            "us_per_batch": elapsed / iters * 1e6, "bytes": iters * COPY_BATCH * PAGE,
            "cpu_s": time.process_time() - cpu0}


def child_grants() -> None:
    from xdom.domains.xenhost import connect
    h = connect()
    try:
        emit({"domid": h.domid})
        cfg = receive()
        granter, refs, marker, seconds = cfg["granter"], cfg["refs"], bytes.fromhex(cfg["marker"]), cfg["seconds"]
        map_sanity_check(h, granter, refs, marker)
        emit({"ready": True})
        # One measurement a request, so that the parent samples the broker's CPU around each.
        while (ask := receive()):
            if "map" in ask:
                emit(map_benchmark(h, granter, refs, ask["map"], seconds))
            else:                           # copy, once per placement: the parent pins us, then asks
                emit(copy_benchmark(h, granter, refs, marker, seconds))
    finally:
        h.close()


def child_main(role: str) -> None:
    if role in ("ping", "pong"):
        child_evtchn(role)
    elif role == "grants":
        child_grants()
    else:
        raise SystemExit(f"unknown child role {role!r}")


# ---------------------------------------------------------------------------
# the parent


class Child:
    """A child process spoken to in JSON lines over its stdin/stdout."""

    def __init__(self, proc: subprocess.Popen[bytes], what: str) -> None:
        self.proc = proc
        self.what = what
        self._buf = b""

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def recv(self, timeout: float = CHILD_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"{self.what}: no answer within {timeout}s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"{self.what} exited (status {self.proc.wait()}) before answering")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)


PIPES = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)


def child_argv(role: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--child", role]


def ping_pong(ping: Child, pong: Child, style: str, warmup: int, iters: int) -> array.array:
    """One chunk of round trips in ``style``; returns the pinger's samples (ns)."""
    cmd = {"style": style, "warmup": warmup, "iters": iters}
    pong.send(cmd)
    pong.recv()              # armed: the ponger is in its loop (or about to wait)
    ping.send(cmd)
    samples = array.array("q", bytes.fromhex(ping.recv()["samples"]))
    pong.recv()              # done
    return samples


def start_xdom_pair(client: Any, procs: list[subprocess.Popen[bytes]]) -> tuple[Child, Child]:
    """Two domain processes with an interdomain event channel between them."""
    from xdom.deploy.launcher import spawn_domain
    ping_creds, p1 = spawn_domain(client, "bench-ping", child_argv("ping"), memory="1M", **PIPES)
    procs.append(p1)
    pong_creds, p2 = spawn_domain(client, "bench-pong", child_argv("pong"), memory="1M", **PIPES)
    procs.append(p2)
    ping, pong = Child(p1, "ping domain"), Child(p2, "pong domain")
    ping.send({"mode": "xdom", "peer": pong_creds["domid"]})
    port = ping.recv()["port"]
    pong.send({"mode": "xdom", "peer": ping_creds["domid"], "port": port})
    pong.recv()              # ready (bound, initial pending drained)
    ping.send({"bound": True})
    ping.recv()              # ready
    return ping, pong


def start_raw_pair(fds: tuple[int, int], procs: list[subprocess.Popen[bytes]]) -> tuple[Child, Child]:
    """Two plain Python processes sharing two eventfds (no xdom at all)."""
    a_to_b, b_to_a = fds
    p1 = subprocess.Popen(child_argv("ping"), pass_fds=fds, start_new_session=True, **PIPES)
    procs.append(p1)
    p2 = subprocess.Popen(child_argv("pong"), pass_fds=fds, start_new_session=True, **PIPES)
    procs.append(p2)
    ping, pong = Child(p1, "raw pinger"), Child(p2, "raw ponger")
    ping.send({"mode": "raw", "wait_fd": b_to_a, "notify_fd": a_to_b})
    pong.send({"mode": "raw", "wait_fd": a_to_b, "notify_fd": b_to_a})
    ping.recv()
    pong.recv()
    return ping, pong


def placements() -> dict[str, tuple[int, int]]:
    """(pinger's CPU, ponger's CPU) for each placement measured; -1: not pinned."""
    cpus = sorted(_USABLE_CPUS)
    out = {"one CPU": (cpus[0], cpus[0])}
    if len(cpus) > 1:
        out["two CPUs"] = (cpus[0], cpus[1])
    out["not pinned"] = (-1, -1)
    return out


def _pin(pid: int, cpu: int) -> None:
    """Pin ``pid`` to ``cpu``; -1: let it run on every CPU the benchmark may use."""
    os.sched_setaffinity(pid, {cpu} if cpu >= 0 else _USABLE_CPUS)


def bench_evtchn(client: Any, warmup: int, iters: int, rounds: int) -> dict[str, Any]:
    """All five round-trip variants in each placement, interleaved in ``rounds`` chunks so drift
    hits them alike."""
    from xdom.deploy.launcher import stop_process
    procs: list[subprocess.Popen[bytes]] = []
    fds = (os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC))
    cdir = tempfile.mkdtemp(prefix="xdb-c-", dir="/tmp")
    try:
        xping, xpong = start_xdom_pair(client, procs)
        rping, rpong = start_raw_pair(fds, procs)
        try:
            exe: str | None = compile_c_pingpong(cdir)
            c_note = ""
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            exe, c_note = None, str(e)
        chunk = max(1, iters // rounds)
        out: dict[str, Any] = {"rounds": rounds, "iters": chunk * rounds, "warmup": warmup, "placements": {}}
        for placement, cpus in placements().items():
            for ping, pong in ((xping, xpong), (rping, rpong)):
                _pin(ping.proc.pid, cpus[0])
                _pin(pong.proc.pid, cpus[1])
            variants: list[tuple[str, Callable[[int, int], array.array]]] = [
                ("xdom_api", lambda w, n: ping_pong(xping, xpong, "api", w, n)),
                ("xdom_poll", lambda w, n: ping_pong(xping, xpong, "poll", w, n)),
                ("raw_poll", lambda w, n: ping_pong(rping, rpong, "poll", w, n)),
                ("raw_block", lambda w, n: ping_pong(rping, rpong, "block", w, n)),
            ]
            if exe is not None:
                variants.append(("c", lambda w, n, c=cpus: run_c_pingpong(exe, w, n, c)))
            samples = {name: array.array("q") for name, _ in variants}
            for r in range(rounds):
                order = variants if r % 2 == 0 else variants[::-1]
                for name, run in order:
                    samples[name].extend(run(warmup if r == 0 else warmup // 4, chunk))
            result: dict[str, Any] = {name: summarise(v) for name, v in samples.items()}
            if exe is None:
                result["c"] = c_note
            out["placements"][placement] = result
        for ping, pong in ((xping, xpong), (rping, rpong)):
            ping.send({"exit": True})
            pong.send({"exit": True})
        for p in procs:
            p.wait(10)
        return out
    finally:
        for p in procs:
            stop_process(p)
        for fd in fds:
            os.close(fd)
        shutil.rmtree(cdir, ignore_errors=True)


def grant_setup(granter: Any, grantee_domid: int, marker: bytes) -> list[int]:
    refs = []
    for gfn in range(max(max(BATCHES), COPY_BATCH)):
        page = granter.memory.frame(gfn)
        page[:len(marker)] = marker
        page.release()
        refs.append(granter.gnttab.grant_access(grantee_domid, gfn, readonly=False))
    return refs


def bench_grants_broker(client: Any, broker_pid: int, seconds: float, marker: bytes,
                        rounds: int) -> dict[str, Any]:
    """Map/unmap (not pinned), then copy with broker and backend in each placement.

    A copy is one hypercall, so each call pays a wakeup of the broker and
    one of the backend: on one CPU that is a few microseconds, across two
    some 40 each way here, which is most of a batch's time.  On one CPU the
    copy is measured in ``rounds``, each followed by the pread reference on
    that same CPU (``copy_rounds``): the machine's drift moves both alike,
    and a single run of each swung their ratio by a tenth.
    """
    from xdom.deploy.launcher import spawn_domain, stop_process
    from xdom.domains.xenhost import BrokerXenHost
    creds = client.request("create", name="bench-granter", memory="1M")
    granter = BrokerXenHost(creds["hypercall"], creds["token"])
    proc = None
    try:
        _, proc = spawn_domain(client, "bench-backend", child_argv("grants"), memory="1M", **PIPES)
        backend = Child(proc, "backend domain")
        backend_domid = backend.recv()["domid"]
        refs = grant_setup(granter, backend_domid, marker)
        backend.send({"granter": granter.domid, "refs": refs, "marker": marker.hex(), "seconds": seconds})
        backend.recv()

        def measured(ask: dict[str, Any]) -> dict[str, Any]:
            """The child's figures for ``ask``, with the broker's CPU seconds over the same run."""
            before = process_cpu(broker_pid)
            backend.send(ask)
            out = backend.recv(timeout=CHILD_TIMEOUT + 2 * seconds)
            out["broker_cpu_s"] = process_cpu(broker_pid) - before
            return out
        result: dict[str, Any] = {"map": {str(n): measured({"map": n}) for n in BATCHES}, "copy": {}}
        for placement, (broker_cpu, backend_cpu) in placements().items():
            _pin(broker_pid, broker_cpu)
            _pin(proc.pid, backend_cpu)
            if placement != "one CPU":
                result["copy"][placement] = measured({"copy": True})
                continue
            result["copy_rounds"] = []
            for _ in range(rounds):
                copied = measured({"copy": True})
                _pin(os.getpid(), broker_cpu)
                try:
                    result["copy_rounds"].append({"copy": copied, "pread": bench_pread(seconds)})
                finally:
                    _pin(os.getpid(), -1)
            by_time = sorted(result["copy_rounds"], key=lambda r: r["copy"]["us_per_batch"])
            result["copy"][placement] = by_time[len(by_time) // 2]["copy"]      # the median round's
        backend.send({})
        proc.wait(10)
        return result
    finally:
        _pin(broker_pid, -1)
        if proc is not None:
            stop_process(proc)
        granter.close()


def bench_grants_local(seconds: float, marker: bytes) -> dict[str, Any]:
    from xdom.domains.xenhost import LocalHypervisor
    hv = LocalHypervisor()
    try:
        granter = hv.create_domain("bench-granter", "1M")
        backend = hv.create_domain("bench-backend", "1M")
        try:
            refs = grant_setup(granter, backend.domid, marker)
            map_sanity_check(backend, granter.domid, refs, marker)
            return {"map": {str(n): map_benchmark(backend, granter.domid, refs, n, seconds) for n in BATCHES},
                    "copy": copy_benchmark(backend, granter.domid, refs, marker, seconds)}
        finally:
            backend.close()
            granter.close()
    finally:
        hv.close()


def bench_pread(seconds: float) -> dict[str, float]:
    """The issue's reference: COPY_BATCH preads of 4 KiB from a memfd, in Python."""
    fd = os.memfd_create("xdom-bench-pread", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, COPY_BATCH * PAGE)
        os.pwrite(fd, os.urandom(COPY_BATCH * PAGE), 0)
        offsets = [i * PAGE for i in range(COPY_BATCH)]

        def copy() -> None:
            for o in offsets:
                os.pread(fd, PAGE, o)
        iters, elapsed = timed_loop(copy, seconds)
    finally:
        os.close(fd)
    return {"mib_s": iters * COPY_BATCH * PAGE / elapsed / 2**20, "calls": iters,
            "us_per_batch": elapsed / iters * 1e6}


def process_cpu(pid: int) -> float:
    """User + system seconds ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_mmap(seconds: float) -> dict[str, dict[str, float]]:
    """The issue's map reference: in-process mmap + munmap of N memfd pages (one memfd each, as frames are)."""
    import mmap
    fds = [os.memfd_create(f"xdom-bench-page{i}", os.MFD_CLOEXEC) for i in range(max(BATCHES))]
    out: dict[str, dict[str, float]] = {}
    try:
        for fd in fds:
            os.ftruncate(fd, PAGE)
        for n in BATCHES:
            def cycle(some: list[int] = fds[:n]) -> None:
                for m in [mmap.mmap(fd, PAGE) for fd in some]:
                    m.close()
            iters, elapsed = timed_loop(cycle, seconds)
            out[str(n)] = {"refs_per_s": iters * n / elapsed, "us_per_batch": elapsed / iters * 1e6}
    finally:
        for fd in fds:
            os.close(fd)
    return out


def bench_memcpy(seconds: float) -> dict[str, float]:
    src = bytearray(os.urandom(COPY_BATCH * PAGE))
    dst = bytearray(COPY_BATCH * PAGE)
    s, d = memoryview(src), memoryview(dst)
    offsets = [i * PAGE for i in range(COPY_BATCH)]

    def copy() -> None:
        for o in offsets:
            d[o:o + PAGE] = s[o:o + PAGE]
    iters, elapsed = timed_loop(copy, seconds)
    if dst != src:
        raise RuntimeError("memcpy reference copied wrongly")
    return {"mib_s": iters * COPY_BATCH * PAGE / elapsed / 2**20, "calls": iters,
            "us_per_batch": elapsed / iters * 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (a few seconds) to check the benchmark works")
    ap.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args.child)
        return 0

    if args.quick:
        warmup, iters, rounds, seconds = 200, 2000, 2, 0.25
    else:
        warmup, iters, rounds, seconds = 1000, 20000, 4, 2.0

    from xdom.deploy.launcher import start_broker

    t_start = time.monotonic()
    marker = b"xdom-bench-page!" + os.urandom(16)
    res: dict[str, Any] = {"grants": {}}
    run_dir = tempfile.mkdtemp(prefix="xdb-", dir="/tmp")
    broker = client = None
    try:
        print("starting broker ...", file=sys.stderr, flush=True)
        broker = start_broker(run_dir)
        client = broker.client()

        print("1/3 event channel round trips ...", file=sys.stderr, flush=True)
        res["evtchn"] = bench_evtchn(client, warmup, iters, rounds)

        print("2/3 + 3/3 grant map/unmap and copy ...", file=sys.stderr, flush=True)
        res["grants"]["broker"] = bench_grants_broker(client, broker.proc.pid, seconds, marker, rounds=3)
        res["grants"]["local"] = bench_grants_local(seconds, marker)
        res["memcpy"] = bench_memcpy(seconds)
        res["mmap"] = bench_mmap(seconds)
        preads = sorted((r["pread"] for r in res["grants"]["broker"]["copy_rounds"]), key=lambda r: r["mib_s"])
        res["pread"] = preads[len(preads) // 2]         # the median of the rounds beside the copies
    finally:
        if client is not None:
            client.close()
        if broker is not None:
            broker.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    res["wall"] = time.monotonic() - t_start
    report(res, args.quick, BATCHES, COPY_BATCH)
    if args.json:
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
