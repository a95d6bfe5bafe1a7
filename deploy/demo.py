"""`make demo`: the default topology (deploy/examples/default.toml) on live processes.

xenstored, blkback, netback and two guests, each its own process in its own
network namespace, started by ``xdom up``.  Then, printing after every step
what it proved: the domain table; a ping from one guest to the other through
netback; fio with crc32c verification on a guest's disk through blkback;
blkback killed with SIGKILL while fio writes, and every block still
verified; the xenstore tree; and ``xdom down``, checked to leave no process,
namespace, TAP device or socket behind.  It ends with the elapsed time.

It needs root (namespaces, TAP devices, the broker's /proc/PID/map_files)
and fio, ping, iproute2 and xenstore-utils, which ``make demo`` installs as
root.  A missing prerequisite or a failed check ends it with status 1 and
says why; whatever it started is stopped in every case.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import psutil

from . import netns

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "default.toml")
TOOLS = {"fio": "fio", "ping": "iputils-ping", "ip": "iproute2", "xenstore-ls": "xenstore-utils"}
IMAGE_SIZE = 64 << 20


class DemoError(Exception):
    """A check failed: the demo stops here, with status 1."""


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def say(text: str) -> None:
    print(f"   {text}", flush=True)


def proved(text: str) -> None:
    print(f"   -> proved: {text}", flush=True)


def xdom(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "xdom.deploy.cli", *args], capture_output=True, text=True,
                         timeout=timeout, stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise DemoError(f"xdom {' '.join(args)} failed (status {res.returncode}): "
                        f"{(res.stderr or res.stdout).strip()}")
    return res


def until(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def missing_prerequisites() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("it must run as root (network namespaces, TAP devices, /proc/PID/map_files): "
                        "sudo make demo")
    absent = [f"{tool} (Debian package {pkg})" for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if absent:
        problems.append("not installed: " + ", ".join(absent) + "; make demo installs them as root")
    if not os.path.exists("/dev/net/tun"):
        problems.append("/dev/net/tun does not exist (modprobe tun)")
    return problems


class Fio:
    """fio on a guest's NBD export with a JSON report every half second (so the demo sees its progress)."""

    def __init__(self, export: str, cwd: str, *job: str) -> None:
        self.proc = subprocess.Popen(["fio", "--name=demo", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={export}",
                                      "--verify_state_save=0", "--output-format=json", "--status-interval=500ms",
                                      *job], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.reports: list[dict[str, Any]] = []
        self.stderr = ""
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        buf = ""
        for line in self.proc.stdout:
            if not buf and not line.startswith("{"):
                continue
            buf += line
            if line.rstrip() == "}":            # a report ends with an unindented brace
                try:
                    self.reports.append(json.loads(buf))
                except ValueError:
                    continue
                buf = ""

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def written(self) -> int:
        return self.reports[-1]["jobs"][0]["write"]["io_bytes"] if self.reports else 0

    def finish(self, timeout: float = 120) -> dict[str, Any]:
        """Wait for fio; raise DemoError unless it wrote ``size`` and read back (verified) all of it."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DemoError(f"fio did not finish within {timeout:g}s") from None
        finally:
            self.kill()
            for t in self._threads:
                t.join(10)
        if self.proc.returncode != 0 or not self.reports:
            raise DemoError(f"fio failed (status {self.proc.returncode}): {self.stderr.strip()[-800:]}")
        job: dict[str, Any] = self.reports[-1]["jobs"][0]
        if job["error"] != 0:
            raise DemoError(f"fio reported error {job['error']}")
        return job

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def verified(job: dict[str, Any], size: int) -> str:
    written, read = job["write"]["io_bytes"], job["read"]["io_bytes"]
    if written != size or read != size:
        raise DemoError(f"fio wrote {written} and verified {read} bytes; {size} expected for both")
    return f"fio wrote {mib(written)} in 4 KiB blocks, read back and checked all {mib(read)} (crc32c): 0 errors"


def hypervisor(base: str) -> None:
    """What the broker gives driver domains, on four bare domain processes: grants, event channels, death."""
    from xdom.domains.abi.event_channel import VIRQ_DOM_EXC
    from xdom.domains.abi.grant_table import GNTST_NAMES, GNTST_okay

    from .agent_client import AgentProcess
    from .launcher import start_broker
    broker = None
    doms: list[AgentProcess] = []
    try:
        step("the broker (the hypervisor) and four bare domains, each its own process")
        broker = start_broker(os.path.join(base, "broker"))
        mgmt = broker.client()
        watcher = AgentProcess(mgmt, "xenstore", memory="1M", privileged=True)
        guest1 = AgentProcess(mgmt, "guest1", memory="32M")
        guest2 = AgentProcess(mgmt, "guest2", memory="32M")
        backend = AgentProcess(mgmt, "backend", memory="1M")
        doms += [watcher, guest1, guest2, backend]
        port_exc = watcher.call("bind_virq", virq=VIRQ_DOM_EXC)["port"]
        say(xdom("list", "--run-dir", broker.run_dir).stdout.rstrip().replace("\n", "\n   "))
        proved("domains are created over ZeroMQ management; each proved its identity with a one-time token")

        step("guest1 grants 64 pages to the backend, which maps them in one batch")
        refs = guest1.call("grant_many", domid=backend.domid, first_gfn=100, count=64)["refs"]
        res = backend.call("map", domid=guest1.domid, refs=refs)["results"]
        check = backend.call("check_maps")
        say(f"{sum(s == GNTST_okay for s, _ in res)}/64 mapped; every page carries guest1's stamp: "
            f"{not check['bad']}; the backend holds {check['fds']} fds")
        if check["bad"] or any(s != GNTST_okay for s, _ in res):
            raise DemoError("the mapped pages are not guest1's")
        ended = guest1.call("end", ref=refs[0])["ok"]
        say(f"guest1 ends access to a page the backend still maps: {'ALLOWED' if ended else 'refused'}")
        guesses = backend.call("map", domid=guest2.domid, refs=list(range(0, 32)))["results"]
        say(f"the backend guesses 32 references guest2 never gave: {sum(s == GNTST_okay for s, _ in guesses)} "
            f"mapped ({', '.join(sorted({GNTST_NAMES[s] for s, _ in guesses}))})")
        ro = guest2.call("grant", domid=backend.domid, gfn=7, ro=True, data="read-only")["ref"]
        (rw_status, _), = backend.call("map", domid=guest2.domid, refs=[ro], ro=False)["results"]
        say(f"a writable map of a read-only grant: {GNTST_NAMES[rw_status]}")
        if ended or rw_status == GNTST_okay or any(s == GNTST_okay for s, _ in guesses):
            raise DemoError("a grant rule was not enforced")
        proved("mapping is page-granular: a backend reaches only the frames a guest granted, as granted")

        step("kill -9 the backend while it maps 64 pages")
        backend.kill()
        ports = watcher.call("wait", secs=10)["ports"]
        until("the broker to see the backend dead",
              lambda: mgmt.request("info", domid=backend.domid)["domain"]["state"] == "crashed", 10)
        ended_n = sum(guest1.call("end", ref=r)["ok"] for r in refs[1:])
        say(f"the xenstore domain woke on VIRQ_DOM_EXC: {ports == [port_exc]}; guest1 ended access to "
            f"{ended_n}/63 pages")
        if ports != [port_exc] or ended_n != 63:
            raise DemoError("the dead backend's mappings were not released")
        proved("a dead domain's mappings are released, and the xenstore domain hears of its death")
    finally:
        for d in reversed(doms):
            d.stop()
        if broker is not None:
            broker.stop()


def run() -> int:
    t0 = time.monotonic()
    problems = missing_prerequisites()
    if problems:
        print("make demo: cannot run the default topology:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    base = tempfile.mkdtemp(prefix="xdom-demo-", dir="/tmp")
    os.chmod(base, 0o755)       # domains run under their own uids
    try:
        hypervisor(base)
        default_topology(base)
    except DemoError as e:
        print(f"\nDEMO FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\ndemo finished in {time.monotonic() - t0:.1f}s", flush=True)
    return 0


def default_topology(base: str) -> None:
    state, run = os.path.join(base, "state"), os.path.join(base, "run")
    os.makedirs(os.path.join(state, "images"))
    for guest in ("g1", "g2"):
        with open(os.path.join(state, "images", f"{guest}.img"), "wb") as f:
            f.truncate(IMAGE_SIZE)
    up = False
    try:
        step("xdom up deploy/examples/default.toml --detach")
        out = xdom("up", EXAMPLE, "--detach", "--state-dir", state, "--run-dir", run).stdout
        up = True
        say(out.rstrip().replace("\n", "\n   "))
        order = [line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  ") and " ready " in line]
        if order != ["broker", "xs", "blk0", "net0", "g1", "g2"]:
            raise DemoError(f"domains came up in the order {order}")
        proved("the broker, then xenstored, blkback, netback and the guests started in dependency order, "
               "each once the one before it was ready")

        step("xdom ps: the domain table")
        say(xdom("ps", "--run-dir", run).stdout.rstrip().replace("\n", "\n   "))
        ps = rows(run)
        for g in ("g1", "g2"):
            devs = "; ".join(f"disk {d['vdev']} exported on {d['export']}" if d["type"] == "vbd" else
                             f"{d['ifname']} {d['mac']} {d['ip']}" for d in ps[g]["devices"])
            say(f"{g}: uid {ps[g]['uid']}, namespace {ps[g]['netns']}: {devs}")
        if len({r["pid"] for r in ps.values()}) != len(ps) or any(r["state"] != "running" for r in ps.values()):
            raise DemoError("not every domain is a running process of its own")
        proved("every domain is its own process, in a network namespace of its own"
               + (", under a uid of its own" if len({r["uid"] for r in ps.values()}) == len(ps) else ""))

        step("ping g2 (10.77.0.2) from g1's namespace")
        links = subprocess.run(["ip", "-n", ps["g1"]["netns"], "-o", "link", "show"], capture_output=True,
                               text=True, check=True).stdout
        say("g1's namespace holds: " + ", ".join(line.split(":")[1].strip() for line in links.splitlines()))
        res = subprocess.run(["ip", "netns", "exec", ps["g1"]["netns"], "ping", "-c", "3", "-i", "0.2", "-W", "2",
                              "10.77.0.2"], capture_output=True, text=True, timeout=60)
        for line in res.stdout.strip().splitlines()[1:4] + res.stdout.strip().splitlines()[-2:-1]:
            say(line)
        if res.returncode != 0:
            raise DemoError(f"ping failed: {res.stdout}{res.stderr}")
        net0 = ps["net0"]
        if net0.get("switch") == "bridge":
            ports = subprocess.run(["ip", "-n", net0["netns"], "-o", "link", "show", "type", "tun"],
                                   capture_output=True, text=True, check=True).stdout
            say("net0's namespace holds the vifs' TAPs: "
                + ", ".join(line.split(":")[1].strip() for line in ports.splitlines()))
            via = f"netback and the Linux bridge {net0['vifs'][0]['bridge']} in net0's namespace"
        else:
            via = "netback's builtin switch"
        proved(f"g1 reaches g2 through its TAP, netfront, the PV rings, {via}: the only way out of its namespace")

        step("kill -9 netback while g1 pings g2")
        ping = subprocess.Popen(["ip", "netns", "exec", ps["g1"]["netns"], "ping", "-c", "25", "-i", "0.2", "-W", "1",
                                 "10.77.0.2"], stdout=subprocess.PIPE, text=True)
        replies: list[int] = []

        def read() -> None:
            assert ping.stdout is not None
            for line in ping.stdout:
                if " from " in line and "icmp_seq=" in line:
                    replies.append(int(line.split("icmp_seq=")[1].split()[0]))
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            until("replies before the kill", lambda: len(replies) >= 3)
            before = list(replies)
            os.kill(ps["net0"]["pid"], signal.SIGKILL)
            back = until("net0 to come back", lambda: (r := rows(run)["net0"])["state"] == "running"
                         and r["restarts"] == 1 and r)
            at_restart = len(replies)
            ping.wait(60)
        finally:
            if ping.poll() is None:
                ping.kill()
                ping.wait()
            reader.join(10)
        after = replies[at_restart:]
        lost = sorted(set(range(1, 26)) - set(replies))
        say(f"replies before the kill: icmp_seq {before[0]}..{before[-1]}; killed net0 (pid {ps['net0']['pid']})")
        say(f"net0 restarted: pid {back['pid']}, same domid {back['domid']}; replies after it came back: "
            + (f"icmp_seq {after[0]}..{after[-1]}" if after else "NONE") + f"; lost: {lost or 'none'}")
        if not after or rows(run)["g1"]["restarts"] != 0:
            raise DemoError("the ping did not resume after netback came back")
        proved("a crashed network driver domain costs a few packets, then the guests' traffic resumes")

        step("fio on g1's disk (NBD export -> blkfront -> ring -> blkback -> image): random writes, crc32c verify")
        export = ps["g1"]["devices"][0]["export"]
        size = 8 << 20
        job = Fio(export, base, "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={size}", "--verify=crc32c",
                  "--do_verify=1", "--verify_fatal=1").finish()
        say(verified(job, size))
        proved("a real program's block I/O crosses the disk driver domain intact")

        step("kill -9 blkback while fio writes to g1's disk")
        size = 16 << 20
        fio = Fio(export, base, "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={size}", "--offset=16M",
                  "--verify=crc32c", "--do_verify=1", "--verify_backlog=1024", "--verify_fatal=1", "--rate=8m")
        try:
            until("fio's first progress", lambda: fio.written() > 0 or fio.proc.poll() is not None)
            done = fio.written()
            if fio.proc.poll() is not None or done >= size:
                raise DemoError(f"fio finished before blkback could be killed: {fio.stderr.strip()}")
            os.kill(ps["blk0"]["pid"], signal.SIGKILL)
            say(f"killed blk0 (pid {ps['blk0']['pid']}) with SIGKILL after fio wrote {mib(done)} of {mib(size)}")
            back = until("blk0 to come back", lambda: (r := rows(run)["blk0"])["state"] == "running"
                         and r["restarts"] == 1 and r)
            say(f"blk0 restarted by its policy: pid {back['pid']}, same domid {back['domid']}")
            job = fio.finish()
        finally:
            fio.kill()
        say(verified(job, size))
        with open(os.path.join(state, "logs", "g1.log")) as f:
            again = [line.split(": ", 1)[-1].strip() for line in f if "came back: reconnecting" in line]
        if again:
            say(f"g1's log: {again[-1]}")
        now = rows(run)
        if now["g1"]["restarts"] != 0 or back["domid"] != ps["blk0"]["domid"]:
            raise DemoError("the guest was restarted, or blkback came back as another domain")
        proved("a crashed disk driver domain is a stall for the guest's programs, not an error: fio's requests "
               "in flight went again to the new blkback and every block verified")

        step("the xenstore tree under /local/domain (Xen's own xenstore-ls, XENSTORED_PATH=RUN_DIR/xenstored.sock)")
        tree = subprocess.run(["xenstore-ls", "/local/domain"], capture_output=True, text=True, timeout=30,
                              env=dict(os.environ, XENSTORED_PATH=os.path.join(run, "xenstored.sock")))
        if tree.returncode != 0:
            raise DemoError(f"xenstore-ls failed: {tree.stderr.strip()}")
        say(tree.stdout.rstrip().replace("\n", "\n   "))
        flat = xdom("xenstore", "ls", "/local/domain", "--run-dir", run).stdout.splitlines()
        states = {line.split(" = ")[0]: line.split(" = ")[1].strip('"') for line in flat
                  if line.split(" = ")[0].endswith("/state") and ("/device/" in line or "/backend/" in line)}
        if len(states) != 8 or set(states.values()) != {"4"}:      # 2 disks and 2 vifs, each end
            raise DemoError(f"device states: {states}")
        proved("the toolstack wrote libxl's nodes: each domain's home, backend/vbd and backend/vif in the driver "
               "domains, device/vbd and device/vif in the guests, all 8 ends Connected (state 4)")
    except BaseException:
        if up:
            xdom("down", "--run-dir", run, check=False)
        raise
    down(run, ps)


def rows(run: str) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in json.loads(xdom("ps", "--json", "--run-dir", run).stdout)}


def down(run: str, ps: dict[str, dict[str, Any]]) -> None:
    step("xdom down")
    res = xdom("down", "--run-dir", run, check=False)
    say((res.stdout + res.stderr).strip())
    if res.returncode != 0:
        raise DemoError(f"xdom down failed with status {res.returncode}")
    with open(os.path.join(os.path.dirname(run), "state", "logs", "broker.log")) as f:
        gone = re.findall(r"domain \d+ \((\w+)\): destroyed", f.read())
    say(f"the broker destroyed, in this order: {', '.join(gone)}")
    if gone[-5:] != ["g2", "g1", "net0", "blk0", "xs"]:
        raise DemoError("the domains were not stopped in reverse start order")
    pids = [r["pid"] for r in ps.values() if r["pid"]]
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    strays = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if run in " ".join(p.info["cmdline"] or []) or run in p.environ().get("XDOM_HYPERCALL", ""):
                strays.append(p.pid)
        except psutil.Error:
            continue
    spaces = netns.of_host(run)
    macs = {d["mac"] for r in ps.values() for d in r["devices"] if d["type"] == "vif"}
    taps = [line for line in subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
            .splitlines() if any(m in line for m in macs)]
    with open("/proc/net/unix") as f:
        sockets = [line.split()[-1] for line in f if line.rstrip().endswith(".sock") and run in line]
    checks = [
        (f"domain processes ({len(pids)}) and the broker, by pid and by their run directory", alive + strays),
        ("network namespaces of this host (ip netns list)", spaces),
        ("TAP devices with the guests' MACs (they lived in the namespaces; none moved to the host's)", taps),
        ("unix sockets bound under the run directory", sockets),
        ("the run directory", [run] if os.path.exists(run) else []),
    ]
    for what, left in checks:
        say(f"{what}: {'none left' if not left else f'LEFT: {left}'}")
    if any(left for _, left in checks):
        raise DemoError("xdom down left something behind")
    proved("down stops guests, then driver domains, xenstored and the broker, and leaves nothing behind")


if __name__ == "__main__":
    sys.exit(run())
