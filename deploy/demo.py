"""`make demo`: the default topology (deploy/examples/default.toml), two real VMs, on live processes.

First the hypervisor alone: four bare domains, grants and a backend's death.
Then ``xdom up`` on the default topology: xenstored, blkback, netback and two
guests, each its own process in its own network namespace, and each guest
running a real VM (QEMU, the project's image, TCG where KVM does not work):
the guest domain serves the VM's virtio disk and NIC over vhost-user, with
blkfront and netfront behind them, so the VM's I/O goes through the driver
domains.  Then, printing after every step what it proved: the domain table
with the VMMs; a checksum written and read back inside VM 1 (and found in
the image on the host) through blkback; a ping between the VMs through
netback; the broker itself killed with SIGKILL while VM 1 writes (a new
broker takes over the running domains), then netback killed while VM 1
pings VM 2 and blkback killed while VM 1 writes -- their restarts going
through the new broker -- each time with the VM unaffected (its program
goes on, its data verifies, its kernel logs no error, QEMU is the same
process); the xenstore tree; and ``xdom down``, checked to leave no
process, namespace, TAP device or socket behind.  It ends with the elapsed
time.

It needs root (namespaces, TAP devices, the broker's /proc/PID/map_files),
QEMU and the packages of the VM image (linux-image-cloud-amd64,
busybox-static), iproute2 and xenstore-utils, which ``make demo`` installs
as root.  A missing prerequisite or a failed check ends it with status 1 and
says why; whatever it started is stopped in every case.
"""

from __future__ import annotations

import hashlib
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
from collections.abc import Callable
from typing import Any

import psutil

from . import netns

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "default.toml")
TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "ip": "iproute2", "xenstore-ls": "xenstore-utils"}
IMAGE_SIZE = 64 << 20
GUESTS = ("g1", "g2")


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


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


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


def in_vm(run: str, guest: str, script: str, timeout: float = 60) -> tuple[int, str]:
    """``xdom console GUEST --run SCRIPT``: the script's exit status and output (the VM's console protocol)."""
    res = xdom("console", guest, "--run-dir", run, "--run", script, "--wait", str(timeout), check=False,
               timeout=timeout + 30)
    if res.returncode != 0 and res.stderr.startswith("xdom:"):
        raise DemoError(f"xdom console {guest} --run {script!r}: {res.stderr.strip()}")
    return res.returncode, res.stdout


def vm_check(run: str, guest: str, script: str, timeout: float = 60) -> str:
    status, out = in_vm(run, guest, script, timeout)
    if status != 0:
        raise DemoError(f"in {guest}'s VM, {script!r} exited with {status}: {out.strip()[-600:]}")
    return out


class InVm:
    """A command running in a VM (``xdom console --run``) while the demo does something on the host."""

    def __init__(self, run: str, guest: str, script: str, timeout: float = 90) -> None:
        self.result: tuple[int, str] | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._go, args=(run, guest, script, timeout), daemon=True)
        self._thread.start()

    def _go(self, run: str, guest: str, script: str, timeout: float) -> None:
        try:
            self.result = in_vm(run, guest, script, timeout)
        except BaseException as e:
            self.error = e

    def running(self) -> bool:
        return self._thread.is_alive()

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise DemoError(f"the command in the VM did not finish within {timeout:g}s")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def kernel_errors(run: str, guest: str) -> list[str]:
    """What the VM's kernel logged about I/O or link errors since it booted."""
    out = vm_check(run, guest, "dmesg")
    return [line for line in out.splitlines()
            if re.search(r"I/O error|blk_update_request|critical|Buffer I/O|link is down|NETDEV WATCHDOG", line)]


def default_topology(base: str) -> None:
    state, run = os.path.join(base, "state"), os.path.join(base, "run")
    os.makedirs(os.path.join(state, "images"))
    for guest in GUESTS:
        with open(os.path.join(state, "images", f"{guest}.img"), "wb") as f:
            f.truncate(IMAGE_SIZE)
    step("the VM image: Debian's cloud kernel and a busybox initramfs, built by xdom (cached)")
    say(xdom("vm-image").stdout.rstrip().replace("\n", "\n   "))
    up = False
    try:
        step("xdom up deploy/examples/default.toml --detach")
        t_up = time.monotonic()
        out = xdom("up", EXAMPLE, "--detach", "--state-dir", state, "--run-dir", run).stdout
        up = True
        say(out.rstrip().replace("\n", "\n   "))
        order = [line.split(":")[0].strip() for line in out.splitlines()
                 if line.startswith("  ") and (" ready " in line or "VM running" in line)]
        if order != ["broker", "xs", "blk0", "net0", "g1", "g1", "g2", "g2"]:
            raise DemoError(f"domains came up in the order {order}")
        proved(f"the broker, then xenstored, blkback, netback, then each guest domain and its VM (QEMU, once the "
               f"guest domain served its vhost-user sockets) started in dependency order in "
               f"{time.monotonic() - t_up:.1f}s")

        step("xdom ps: the domain table, each guest with its VMM")
        say(xdom("ps", "--run-dir", run).stdout.rstrip().replace("\n", "\n   "))
        ps = rows(run)
        for g in GUESTS:
            vm = ps[g]["vm"]
            if not vm or vm["state"] != "running" or not vm["pid"]:
                raise DemoError(f"{g}'s VM is not running: {vm}")
            qemu = psutil.Process(vm["pid"])
            say(f"{g}: guest domain pid {ps[g]['pid']} (uid {ps[g]['uid']}); QEMU pid {vm['pid']} (uid "
                f"{qemu.uids().effective}, parent {qemu.ppid()}: the supervisor), accel {vm['accel']}")
            say(f"{g}: disk {vm['disks'][0]['vdev']} on {vm['disks'][0]['socket']}, NIC {vm['nics'][0]['mac']} on "
                f"{vm['nics'][0]['socket']}")
            if qemu.uids().effective != ps[g]["uid"] or qemu.ppid() == ps[g]["pid"]:
                raise DemoError(f"{g}'s QEMU does not run beside its guest domain under the guest's uid")
        if len({r["pid"] for r in ps.values()}) != len(ps) or any(r["state"] != "running" for r in ps.values()):
            raise DemoError("not every domain is a running process of its own")
        say(f"the accelerator: {ps['g1']['vm']['accel']}, because {ps['g1']['vm']['accel_reason']}")
        proved("every domain is its own process in its own network namespace, and each VM's QEMU is a process of "
               "the guest's uid beside its guest domain, supervised like a domain")

        step("the VMs boot (xdom console g1 --run ...)")
        booted = {g: InVm(run, g, "uname -r; ip -o -4 addr show eth0 | cut -d' ' -f2,7; "
                               "cat /sys/block/vda/size") for g in GUESTS}
        for g in GUESTS:
            status, text = booted[g].finish()
            if status != 0:
                raise DemoError(f"{g}'s VM: {text}")
            release, nic, sectors = text.split("\n")[:3]
            say(f"{g}: Linux {release} answered on its console after {time.monotonic() - t_up:.1f}s; "
                f"{nic}; /dev/vda is {mib(int(sectors) * 512)}")
            if int(sectors) * 512 != IMAGE_SIZE:
                raise DemoError(f"{g}'s /dev/vda is {int(sectors) * 512} bytes, not the image's {IMAGE_SIZE}")
        proved("both VMs booted with a virtio disk of the image's size and a NIC with the vif's address")

        step("a checksum written and read back inside VM 1 (virtio-blk -> vhost-user -> blkfront -> blkback -> "
             "image)")
        size = 8 << 20
        out = vm_check(run, "g1", f"dd if=/dev/urandom of=/tmp/d bs=1M count={size >> 20} 2>/dev/null && "
                                  "sha256sum </tmp/d && dd if=/tmp/d of=/dev/vda bs=1M oflag=direct 2>/dev/null && "
                                  "sync && echo 3 >/proc/sys/vm/drop_caches && "
                                  f"dd if=/dev/vda bs=1M count={size >> 20} iflag=direct 2>/dev/null | sha256sum")
        written, read = [line.split()[0] for line in out.strip().splitlines()]
        with open(os.path.join(state, "images", "g1.img"), "rb") as f:
            on_host = hashlib.sha256(f.read(size)).hexdigest()
        say(f"VM 1 wrote {mib(size)} of random data with O_DIRECT: sha256 {written[:16]}...")
        say(f"read back with the page cache dropped:           sha256 {read[:16]}...")
        say(f"the first {mib(size)} of g1.img on the host:          sha256 {on_host[:16]}...")
        if not written == read == on_host:
            raise DemoError("the checksums differ")
        proved("VM 1's block I/O crosses the guest domain and the disk driver domain intact, into the image")

        step("ping VM 2 (10.77.0.2) from VM 1 (virtio-net -> vhost-user -> netfront -> netback -> bridge)")
        out = vm_check(run, "g1", "ping -c 3 -i 0.2 -W 5 10.77.0.2")
        for line in out.strip().splitlines()[1:4] + out.strip().splitlines()[-1:]:
            say(line)
        if " 0% packet loss" not in out:
            raise DemoError(f"ping lost packets: {out}")
        proved("VM 1 reaches VM 2 through the network driver domain")

        vm_pids = {g: ps[g]["vm"]["pid"] for g in GUESTS}
        kill_broker(run, ps)
        kill_netback(run, ps)
        kill_blkback(run, ps, state)
        now = rows(run)
        for g in GUESTS:
            if now[g]["vm"]["pid"] != vm_pids[g] or now[g]["vm"]["restarts"] or now[g]["restarts"]:
                raise DemoError(f"{g}'s VM or guest domain was restarted: {now[g]['vm']}")
        say(f"QEMU pids unchanged ({', '.join(str(p) for p in vm_pids.values())}), no VM or guest domain restarted")

        step("the xenstore tree under /local/domain (Xen's own xenstore-ls, XENSTORED_PATH=RUN_DIR/xenstored.sock)")
        tree = subprocess.run(["xenstore-ls", "/local/domain"], capture_output=True, text=True, timeout=30,
                              env=dict(os.environ, XENSTORED_PATH=os.path.join(run, "xenstored.sock")))
        if tree.returncode != 0:
            raise DemoError(f"xenstore-ls failed: {tree.stderr.strip()}")
        lines = tree.stdout.rstrip().splitlines()
        say("\n   ".join(lines[:40]) + (f"\n   ... ({len(lines) - 40} more lines)" if len(lines) > 40 else ""))
        flat = xdom("xenstore", "ls", "/local/domain", "--run-dir", run).stdout.splitlines()
        states = {line.split(" = ")[0]: line.split(" = ")[1].strip('"') for line in flat
                  if line.split(" = ")[0].endswith("/state") and ("/device/" in line or "/backend/" in line)}
        if len(states) != 8 or set(states.values()) != {"4"}:      # 2 disks and 2 vifs, each end
            raise DemoError(f"device states: {states}")
        proved("the toolstack wrote libxl's nodes: backend/vbd and backend/vif in the driver domains, device/vbd "
               "and device/vif in the guest domains, all 8 ends Connected (state 4)")
    except BaseException:
        if up:
            xdom("down", "--run-dir", run, check=False)
        raise
    down(run, ps)


def kill_broker(run: str, ps: dict[str, dict[str, Any]]) -> None:
    step("kill -9 the broker (the hypervisor) while VM 1 writes to its disk")
    from xdom.broker.mgmt_client import ManagementClient, endpoint_for
    with ManagementClient(endpoint_for(run), timeout=10) as mgmt:
        old = mgmt.request("stats")["broker_pid"]
        table = {d["name"]: (d["domid"], d["pid"]) for d in mgmt.request("list")["domains"]}
    blocks, bs = 32, 256 << 10
    script = (f"dd if=/dev/urandom of=/tmp/b bs={bs} count={blocks} 2>/dev/null && sha256sum </tmp/b && "
              f"i=0; while [ $i -lt {blocks} ]; do "
              f"dd if=/tmp/b of=/dev/vda bs={bs} skip=$i seek=$((192 + i)) count=1 oflag=direct 2>/dev/null "
              f"|| {{ echo WRITE-FAILED $i; exit 1; }}; i=$((i + 1)); usleep 30000; done && "
              f"sync && echo 3 >/proc/sys/vm/drop_caches && "
              f"dd if=/dev/vda bs={bs} skip=192 count={blocks} iflag=direct 2>/dev/null | sha256sum")
    writer = InVm(run, "g1", script, timeout=120)
    time.sleep(1.0)
    if not writer.running():
        raise DemoError(f"the writes ended before the broker could be killed: {writer.finish()}")
    os.kill(old, signal.SIGKILL)
    t_kill = time.monotonic()

    def new_broker() -> int | None:
        try:
            with ManagementClient(endpoint_for(run), timeout=2) as m:
                pid = m.request("stats")["broker_pid"]
                return pid if pid != old else None
        except Exception:
            return None
    new = until("a new broker", new_broker)
    took = time.monotonic() - t_kill
    with ManagementClient(endpoint_for(run), timeout=10) as mgmt:
        after = {d["name"]: (d["domid"], d["pid"]) for d in mgmt.request("list")["domains"]}
    say(f"killed the broker (pid {old}); the supervisor started pid {new}, which took over in {took:.2f}s")
    if after != table:
        raise DemoError(f"the new broker's domain table differs: {table} -> {after}")
    say(f"its domain table: the same {len(after)} domains, same domids, same processes")
    status, out = writer.finish()
    if status != 0:
        raise DemoError(f"VM 1's writes failed across the broker's death (status {status}): {out.strip()[-400:]}")
    written, read = [line.split()[0] for line in out.strip().splitlines()]
    errors = kernel_errors(run, "g1")
    say(f"every one of VM 1's {blocks} writes succeeded; sha256 written {written[:16]}..., read back "
        f"{read[:16]}...; VM 1's kernel logged {len(errors)} I/O errors")
    if written != read or errors:
        raise DemoError(f"VM 1 saw the broker's death: {errors}")
    proved("the hypervisor itself can crash: a new broker takes over the running domains from what they hold "
           "(their memory, grants and channels never depended on it), and the VMs do not notice; the driver "
           "restarts below go through the new broker")


def kill_netback(run: str, ps: dict[str, dict[str, Any]]) -> None:
    step("kill -9 netback while VM 1 pings VM 2")
    count, interval = 25, 0.2
    ping = InVm(run, "g1", f"ping -c {count} -i {interval} -W 5 10.77.0.2")
    time.sleep(1.5)                 # a few replies first (the console's round trip comes before the ping)
    if not ping.running():
        raise DemoError(f"the ping ended before netback could be killed: {ping.finish()}")
    os.kill(ps["net0"]["pid"], signal.SIGKILL)
    t_kill = time.monotonic()
    back = until("net0 to come back", lambda: (r := rows(run)["net0"])["state"] == "running"
                 and r["restarts"] == 1 and r)
    took = time.monotonic() - t_kill
    was_running = ping.running()
    status, out = ping.finish()
    seqs = [int(m) for m in re.findall(r"seq=(\d+)", out)]
    lost = sorted(set(range(count)) - set(seqs))
    say(f"killed net0 (pid {ps['net0']['pid']}) while the ping ran; net0 back in {took:.2f}s: pid {back['pid']}, "
        f"same domid {back['domid']}")
    say(f"VM 1's ping: {len(seqs)} of {count} replies; lost: {lost or 'none'}; last line: "
        f"{out.strip().splitlines()[-1] if out.strip() else '-'}")
    if not was_running or not seqs or max(seqs) != count - 1 or (count - 1) in lost:
        raise DemoError(f"the ping did not go on after netback came back (status {status}): {out}")
    errors = kernel_errors(run, "g1")
    carrier = vm_check(run, "g1", "cat /sys/class/net/eth0/carrier").strip()
    say(f"VM 1's eth0 carrier {carrier}; its kernel logged {len(errors)} link or I/O errors")
    if carrier != "1" or errors:
        raise DemoError(f"VM 1 saw the crash: carrier {carrier}, {errors}")
    proved(f"a crashed network driver domain costs VM 1 {len(lost)} packets ({len(lost) * interval:.1f}s of its "
           f"ping), not its link: its NIC never went down and its traffic resumed")


def kill_blkback(run: str, ps: dict[str, dict[str, Any]], state: str) -> None:
    step("kill -9 blkback while VM 1 writes to its disk")
    blocks, bs = 64, 256 << 10          # 16 MiB at offset 16 MiB, one 256 KiB O_DIRECT write every 20 ms
    size = blocks * bs
    script = (f"dd if=/dev/urandom of=/tmp/w bs={bs} count={blocks} 2>/dev/null && sha256sum </tmp/w && "
              f"i=0; while [ $i -lt {blocks} ]; do "
              f"dd if=/tmp/w of=/dev/vda bs={bs} skip=$i seek=$((64 + i)) count=1 oflag=direct 2>/dev/null "
              f"|| {{ echo WRITE-FAILED $i; exit 1; }}; i=$((i + 1)); usleep 20000; done && "
              f"sync && echo 3 >/proc/sys/vm/drop_caches && "
              f"dd if=/dev/vda bs={bs} skip=64 count={blocks} iflag=direct 2>/dev/null | sha256sum")
    blk0 = psutil.Process(ps["blk0"]["pid"])
    before = blk0.io_counters().write_bytes
    writer = InVm(run, "g1", script, timeout=120)
    until("VM 1's writes to reach blkback", lambda: blk0.io_counters().write_bytes > before + (1 << 20)
          or not writer.running(), timeout=60)
    if not writer.running():
        raise DemoError(f"the writes ended before blkback could be killed: {writer.finish()}")
    done = blk0.io_counters().write_bytes - before
    os.kill(ps["blk0"]["pid"], signal.SIGKILL)
    t_kill = time.monotonic()
    say(f"killed blk0 (pid {ps['blk0']['pid']}) with SIGKILL after it had written {mib(done)} of VM 1's "
        f"{mib(size)}")
    back = until("blk0 to come back", lambda: (r := rows(run)["blk0"])["state"] == "running"
                 and r["restarts"] == 1 and r)
    say(f"blk0 restarted by its policy in {time.monotonic() - t_kill:.2f}s: pid {back['pid']}, same domid "
        f"{back['domid']}")
    if not writer.running():
        raise DemoError("VM 1's writes were over before blkback came back: nothing was in flight across the kill")
    status, out = writer.finish()
    if status != 0:
        raise DemoError(f"VM 1's writes failed (status {status}): {out.strip()[-400:]}")
    written, read = [line.split()[0] for line in out.strip().splitlines()]
    with open(os.path.join(state, "images", "g1.img"), "rb") as f:
        f.seek(64 * bs)
        on_host = hashlib.sha256(f.read(size)).hexdigest()
    say(f"every one of VM 1's {blocks} writes succeeded; sha256 written {written[:16]}..., read back {read[:16]}..., "
        f"in g1.img {on_host[:16]}...")
    errors = kernel_errors(run, "g1")
    say(f"VM 1's kernel logged {len(errors)} I/O errors")
    with open(os.path.join(state, "logs", "g1.log")) as f:
        again = [line.split(": ", 1)[-1].strip() for line in f if "came back" in line or "reconnect" in line]
    if again:
        say(f"g1's guest domain log: {again[-1]}")
    if not written == read == on_host or errors:
        raise DemoError(f"VM 1's data or kernel log shows the crash: {errors}")
    proved("a crashed disk driver domain is a stall for the VM, not an error: its in-flight writes went again "
           "to the new blkback and every block reads back")


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
    for g in GUESTS:
        with open(os.path.join(os.path.dirname(run), "state", "logs", f"{g}-vm.log")) as f:
            last = [line for line in f if line.startswith("--- xdom")][-1]
        say(f"{g}'s VM: {last.split(': ', 1)[-1].strip()}")
        if "with the host" not in last:
            raise DemoError(f"{g}'s VM was not stopped with the host")
    pids = [p for r in ps.values() for p in (r["pid"], (r.get("vm") or {}).get("pid")) if p]
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
        sockets = [line.split()[-1] for line in f if run + os.sep in line]
    checks = [
        (f"domain processes and VMs' QEMUs ({len(pids)}) and the broker, by pid and by their run directory",
         alive + strays),
        ("network namespaces of this host (ip netns list)", spaces),
        ("TAP devices with the guests' MACs", taps),
        ("unix sockets bound under the run directory (vhost-user, console, QMP, xdom's)", sockets),
        ("the run directory", [run] if os.path.exists(run) else []),
    ]
    for what, left in checks:
        say(f"{what}: {'none left' if not left else f'LEFT: {left}'}")
    if any(left for _, left in checks):
        raise DemoError("xdom down left something behind")
    proved("down powers the VMs off, then stops guests, driver domains, xenstored and the broker, and leaves "
           "nothing behind")


if __name__ == "__main__":
    sys.exit(run())
