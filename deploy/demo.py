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
    disks()
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


def disks() -> None:
    """A disk through a blkback driver domain, used by real tools, surviving a kill -9 of blkback."""
    missing = [t for t in ("fio", "qemu-img") if shutil.which(t) is None]
    if missing:
        print(f"\n(skipping the disk demo: {' and '.join(missing)} not installed; make demo installs them as root)")
        return
    base = tempfile.mkdtemp(prefix="xdom-demo-disk-", dir="/tmp")
    os.chmod(base, 0o755)
    state, run = os.path.join(base, "state"), os.path.join(base, "run")
    os.makedirs(os.path.join(state, "images"))
    image = os.path.join(state, "images", "g1.img")
    with open(image, "wb") as f:
        f.write(os.urandom(64 << 20))
    topology = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "disk.toml")
    up = False
    try:
        step("xdom up deploy/examples/disk.toml: xenstored, a blkback driver domain, a guest with a disk")
        _xdom("up", topology, "--detach", "--state-dir", state, "--run-dir", run)
        up = True
        print(_xdom("ps", "--run-dir", run).stdout.rstrip())
        print(_xdom("block-list", "g1", "--run-dir", run).stdout.rstrip())
        export = os.path.join(run, "g1-xvda.sock")
        blk0 = {r["name"]: r for r in json.loads(_xdom("ps", "--json", "--run-dir", run).stdout)}["blk0"]
        print(_xdom("xenstore", "ls", f"/local/domain/{blk0['domid']}/backend/vbd",
                    "--socket", os.path.join(run, "xenstored.sock")).stdout.rstrip())

        step("qemu-img convert the guest's disk out through its NBD export")
        copy = os.path.join(base, "copy.img")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", f"nbd+unix:///?socket={export}", copy],
                       check=True, capture_output=True, timeout=120)
        with open(image, "rb") as a, open(copy, "rb") as b:
            same = a.read() == b.read()
        os.unlink(copy)
        print(f"   64 MiB through blkfront -> ring -> blkback -> image: {'byte-identical' if same else 'DIFFERENT'}")
        if not same:
            raise RuntimeError("the copy differs from the image")
        proved("the guest reaches its disk only through granted pages and an event channel")

        step("fio randrw with crc32c verification, and kill -9 blkback in the middle of it")
        fio = _fio(export, base, "--rw=randrw", "--time_based", "--runtime=5")
        time.sleep(1.5)
        os.kill(blk0["pid"], signal.SIGKILL)
        print(f"   killed blk0 (pid {blk0['pid']}) with fio's I/O in flight")
        _, err = fio.communicate(timeout=120)
        rows = {r["name"]: r for r in json.loads(_xdom("ps", "--json", "--run-dir", run).stdout)}
        print(f"   blk0: restarts {rows['blk0']['restarts']}, domid {rows['blk0']['domid']} (same), "
              f"pid {rows['blk0']['pid']}; g1 restarts {rows['g1']['restarts']}")
        if fio.returncode != 0:
            raise RuntimeError(f"fio failed across the blkback restart: {err.strip()[-500:]}")
        print("   fio finished with every block verified")
        proved("a crashed disk driver domain is a stall for the guest's programs, not an error")
    finally:
        if up:
            _xdom("down", "--run-dir", run, check=False)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run())
