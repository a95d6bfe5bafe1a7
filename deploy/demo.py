"""`make demo`: what the broker gives driver domains, shown on live processes.

Starts a broker and four domain processes, then walks through the
hypervisor's promises one by one, printing what each step proved.  Every
process it starts is stopped at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

from xdom.domains.abi.event_channel import VIRQ_DOM_EXC
from xdom.domains.abi.grant_table import GNTST_NAMES, GNTST_okay

from .agent_client import AgentProcess
from .launcher import start_broker


def step(title: str) -> None:
    print(f"\n== {title}")


def proved(text: str) -> None:
    print(f"   -> {text}")


def run() -> int:
    run_dir = tempfile.mkdtemp(prefix="xdom-demo-", dir="/tmp")
    os.chmod(run_dir, 0o755)
    broker = None
    doms: list[AgentProcess] = []
    t0 = time.monotonic()
    try:
        step("start the broker (the hypervisor) and four domains, each its own process")
        broker = start_broker(os.path.join(run_dir, "broker"))
        mgmt = broker.client()
        watcher = AgentProcess(mgmt, "xenstore", memory="1M", privileged=True)
        guest1 = AgentProcess(mgmt, "guest1", memory="32M")
        guest2 = AgentProcess(mgmt, "guest2", memory="32M")
        backend = AgentProcess(mgmt, "backend", memory="1M")
        doms += [watcher, guest1, guest2, backend]
        port_exc = watcher.call("bind_virq", virq=VIRQ_DOM_EXC)["port"]
        subprocess.run([sys.executable, "-m", "xdom.deploy.cli", "list", "--run-dir", broker.run_dir], check=True)
        proved("domains created over ZeroMQ management; each proved its identity with a one-time token")

        step("guest1 grants 64 pages to the backend; the backend maps them")
        refs = guest1.call("grant_many", domid=backend.domid, first_gfn=100, count=64)["refs"]
        res = backend.call("map", domid=guest1.domid, refs=refs)["results"]
        handles = [h for s, h in res if s == GNTST_okay]
        check = backend.call("check_maps")
        print(f"   64 refs mapped in one batch; every page carries guest1's stamp: {not check['bad']}; "
              f"backend holds {check['fds']} fds")
        proved("grant mapping is page-granular: each map hands over one frame, not the guest's memory")

        step("guest1 tries to end access while the backend still maps the page")
        print(f"   end_access(ref {refs[0]}) -> {'refused' if not guest1.call('end', ref=refs[0])['ok'] else 'ALLOWED'}")
        proved("a granter cannot pull a page out from under a live mapping (GTF_reading/GTF_writing)")

        step("the backend guesses references it was never given")
        guesses = backend.call("map", domid=guest2.domid, refs=list(range(0, 32)))["results"]
        codes = sorted({GNTST_NAMES[s] for s, _ in guesses})
        print(f"   32 guesses at guest2's table -> {sum(s == GNTST_okay for s, _ in guesses)} mapped; status: {codes}")
        proved("no domain reaches another's frames except through a grant the owner wrote")

        step("a read-only grant: the kernel refuses to let the backend write")
        ro = guest2.call("grant", domid=backend.domid, gfn=7, ro=True, data="guest2's read-only page")["ref"]
        (status, _), = backend.call("map", domid=guest2.domid, refs=[ro], ro=True)["results"]
        (status_rw, _), = backend.call("map", domid=guest2.domid, refs=[ro], ro=False)["results"]
        print(f"   read-only map: {GNTST_NAMES[status]}; writable map of the same ref: {GNTST_NAMES[status_rw]}")
        proved("read-only grants arrive as O_RDONLY frames: mmap(PROT_WRITE) and mprotect fail with "
               f"{errno.errorcode[errno.EACCES]} (see tests/test_domain_processes.py)")

        step("event channel between guest1 and the backend: 2000 round trips")
        p1 = guest1.call("alloc_unbound", remote=backend.domid)["port"]
        pb = backend.call("bind", remote=guest1.domid, port=p1)["port"]
        backend.send("pingpong", port=pb, n=2000, first=False)
        elapsed = guest1.call("pingpong", port=p1, n=2000, first=True)["elapsed"]
        backend.read(30)
        print(f"   {elapsed / 2000 * 1e6:.1f} us per round trip (eventfd written directly, broker not involved)")
        proved("notifications go domain to domain without a hypervisor round trip")

        step("kill -9 the backend while it holds 65 mappings")
        backend.kill()
        ports = watcher.call("wait", secs=10)["ports"]
        print(f"   xenstore domain woke on VIRQ_DOM_EXC: {ports == [port_exc]}")
        deadline = time.monotonic() + 10
        while mgmt.request("info", domid=backend.domid)["domain"]["state"] != "crashed":
            if time.monotonic() > deadline:
                raise RuntimeError("the broker did not notice the backend's death")
            time.sleep(0.01)
        ended = sum(guest1.call("end", ref=r)["ok"] for r in refs)
        print(f"   broker released its mappings: guest1 ended access to {ended}/64 pages")
        proved("a dead domain's mappings are released; the xenstore domain learns of the death")

        step("restart the backend under the same domid and map again")
        creds = mgmt.request("restart", domid=backend.domid)
        doms.remove(backend)
        backend.stop()
        backend2 = AgentProcess(mgmt, "backend", creds=creds)
        doms.append(backend2)
        refs = guest1.call("grant_many", domid=backend2.domid, first_gfn=100, count=8)["refs"]
        res = backend2.call("map", domid=guest1.domid, refs=refs)["results"]
        print(f"   backend is domain {backend2.domid} again; mapped {sum(s == GNTST_okay for s, _ in res)}/8")
        backend2.call("unmap", handles=[h for s, h in res if s == GNTST_okay])
        proved("a driver domain comes back with its identity, so its guests' device paths stay valid")

        step("the domain table and broker statistics")
        subprocess.run([sys.executable, "-m", "xdom.deploy.cli", "list", "--run-dir", broker.run_dir], check=True)
        stats = mgmt.request("stats")
        print(f"   broker: {stats['broker_fds']} open fds for {stats['domains']} domains "
              f"(2 x 32 MiB guests) - no descriptor per frame")
        del handles
    finally:
        for d in reversed(doms):
            d.stop()
        if broker is not None:
            broker.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    supervised()
    default_topology()
    print(f"\ndemo finished in {time.monotonic() - t0:.1f}s")
    return 0


def _xdom(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "xdom.deploy.cli", *args], capture_output=True, text=True,
                         timeout=120)
    if check and res.returncode != 0:
        raise RuntimeError(f"xdom {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def supervised() -> None:
    """The same pieces under the supervisor: a topology up, xenstored killed, guests unharmed."""
    base = tempfile.mkdtemp(prefix="xdom-demo-up-", dir="/tmp")
    os.chmod(base, 0o755)
    state, run = os.path.join(base, "state"), os.path.join(base, "run")
    topology = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "guests.toml")
    up = False
    try:
        step("xdom up deploy/examples/guests.toml --detach: broker, xenstored and two guests, supervised")
        _xdom("up", topology, "--detach", "--state-dir", state, "--run-dir", run)
        up = True
        print(_xdom("ps", "--run-dir", run).stdout.rstrip())

        def rows() -> dict[str, dict]:
            return {r["name"]: r for r in json.loads(_xdom("ps", "--json", "--run-dir", run).stdout)}
        proved("domains started in dependency order, each once the one before was ready")

        step("kill -9 the xenstore domain")
        xs = rows()["xs"]
        os.kill(xs["pid"], signal.SIGKILL)
        _until("xenstored to come back", lambda: rows()["xs"]["restarts"] == 1 and rows()["xs"]["state"] == "running")
        print(f"   xs is domain {rows()['xs']['domid']} again (restarts: 1), on its saved store")
        g1 = rows()["g1"]
        _xdom("xenstore", "write", f"/local/domain/{g1['domid']}/control/shutdown", "poweroff",
              "--socket", os.path.join(run, "xenstored.sock"))
        _until("g1 to power off", lambda: rows()["g1"]["state"] != "running")
        print(f"   g1's watch, set before the crash, fired through its ring: g1 is {rows()['g1']['state']} "
              f"({rows()['g1']['last_exit']})")
        proved("a crashed xenstore domain comes back with its store and its domains' rings and watches")
    finally:
        if up:
            _xdom("down", "--run-dir", run, check=False)
        shutil.rmtree(base, ignore_errors=True)


def _fio(export: str, cwd: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["fio", "--name=demo", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={export}",
                             "--verify_state_save=0", "--bs=4k", "--iodepth=16", "--size=32M", "--verify=crc32c",
                             "--do_verify=1", "--output-format=terse", *args],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def default_topology() -> None:
    """The default topology: blkback, netback and two guests; a disk and a link each survive their driver's crash."""
    missing = [t for t in ("fio", "qemu-img", "ping") if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        why = f"{' and '.join(missing)} not installed" if missing else "it needs root (TAP devices, namespaces)"
        print(f"\n(skipping the default topology: {why}; make demo as root installs what it needs)")
        return
    base = tempfile.mkdtemp(prefix="xdom-demo-default-", dir="/tmp")
    os.chmod(base, 0o755)
    state, run = os.path.join(base, "state"), os.path.join(base, "run")
    os.makedirs(os.path.join(state, "images"))
    for guest in ("g1", "g2"):
        with open(os.path.join(state, "images", f"{guest}.img"), "wb") as f:
            f.write(os.urandom(64 << 20))
    image = os.path.join(state, "images", "g1.img")
    topology = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "default.toml")
    up = False

    def rows() -> dict[str, dict]:
        return {r["name"]: r for r in json.loads(_xdom("ps", "--json", "--run-dir", run).stdout)}
    try:
        step("xdom up deploy/examples/default.toml: xenstored, blkback, netback and two guests")
        _xdom("up", topology, "--detach", "--state-dir", state, "--run-dir", run)
        up = True
        print(_xdom("ps", "--run-dir", run).stdout.rstrip())
        ps = rows()
        for g in ("g1", "g2"):
            devs = ", ".join(f"{d['vdev']} -> {d['export']}" if d["type"] == "vbd" else
                             f"{d['ifname']} {d['mac']} {d['ip']}" for d in ps[g]["devices"])
            print(f"   {g}: namespace {ps[g]['netns']}; {devs}")
        proved("every domain is its own process, in a network namespace of its own")

        step("ping g2 from g1's namespace: frames cross netfront, the rings and netback's switch")
        res = subprocess.run(["ip", "netns", "exec", ps["g1"]["netns"], "ping", "-c", "3", "-i", "0.2",
                              "10.77.0.2"], capture_output=True, text=True, timeout=60)
        print("   " + "\n   ".join(res.stdout.strip().splitlines()[-2:]))
        if res.returncode != 0:
            raise RuntimeError(f"ping failed: {res.stdout}{res.stderr}")
        proved("guests reach each other only through the netback driver domain")

        step("qemu-img convert g1's disk out through its NBD export")
        export = os.path.join(run, "g1-xvda.sock")
        copy = os.path.join(base, "copy.img")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", f"nbd+unix:///?socket={export}", copy],
                       check=True, capture_output=True, timeout=120)
        with open(image, "rb") as a, open(copy, "rb") as b:
            same = a.read() == b.read()
        os.unlink(copy)
        print(f"   64 MiB through blkfront -> ring -> blkback -> image: {'byte-identical' if same else 'DIFFERENT'}")
        if not same:
            raise RuntimeError("the copy differs from the image")

        step("fio randrw with crc32c verification on g1's disk; kill -9 blkback in the middle of it")
        fio = _fio(export, base, "--rw=randrw", "--time_based", "--runtime=5")
        time.sleep(1.5)
        os.kill(ps["blk0"]["pid"], signal.SIGKILL)
        print(f"   killed blk0 (pid {ps['blk0']['pid']}) with fio's I/O in flight")
        _, err = fio.communicate(timeout=120)
        now = rows()
        print(f"   blk0: restarts {now['blk0']['restarts']}, domid {now['blk0']['domid']} (same); "
              f"g1 restarts {now['g1']['restarts']}")
        if fio.returncode != 0:
            raise RuntimeError(f"fio failed across the blkback restart: {err.strip()[-500:]}")
        print("   fio finished with every block verified")
        proved("a crashed disk driver domain is a stall for the guest's programs, not an error")

        step("ping g2 from g1 while netback is killed with SIGKILL")
        ping = subprocess.Popen(["ip", "netns", "exec", ps["g1"]["netns"], "ping", "-c", "20", "-i", "0.2", "-W", "1",
                                 "10.77.0.2"], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        os.kill(ps["net0"]["pid"], signal.SIGKILL)
        out, _ = ping.communicate(timeout=60)
        print("   " + out.strip().splitlines()[-2])
        last = [line for line in out.splitlines() if "icmp_seq=" in line][-1:]
        print(f"   net0 restarts {rows()['net0']['restarts']}; last reply: {last[0].split(': ', 1)[1] if last else '-'}")
        if not last or int(last[0].split("icmp_seq=")[1].split()[0]) < 18:
            raise RuntimeError("the ping did not resume after netback came back")
        proved("a crashed network driver domain costs a few packets, then traffic resumes")

        step("the xenstore tree of g1's devices")
        sock = os.path.join(run, "xenstored.sock")
        g1 = now["g1"]["domid"]
        for kind in ("vbd", "vif"):
            listing = _xdom("xenstore", "ls", f"/local/domain/{g1}/device/{kind}", "--socket", sock).stdout
            print("\n".join(line for line in listing.splitlines() if "ring-ref" in line or "state" in line
                            or "backend" in line or "event-channel" in line))
    finally:
        if up:
            _xdom("down", "--run-dir", run, check=False)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run())
