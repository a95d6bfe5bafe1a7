"""VMs as guests in topologies: the ``[domain.vm]`` table and vhost-user exports (pure), what the host must
offer (QEMU, image, memory, accelerator), and supervised hosts whose guests run real VMs (TCG).

The live tests run ``xdom`` as a user does (``up --detach``, ``ps``, ``console``, ``logs``, ``down``) on a
host of their own and check from inside the VM.  Each VM is small (128 MiB, one vCPU) and the whole module
boots a handful of them; every host a test starts is brought down by that test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from helpers import wait_until
from topology_fixtures import HEAD, errors, parse

from xdom.deploy import netns
from xdom.deploy.rundir import Layout, running_pid
from xdom.deploy.topology import (
    DomainKind,
    Limits,
    Topology,
    TopologyError,
    VmConfig,
)
from xdom.deploy.vm import plan as vm_plan
from xdom.deploy.xl_disk import parse_disk
from xdom.deploy.xl_vif import parse_vif
from xdom.deploy.xlcfg import XlCfgError

pytestmark = pytest.mark.timeout(240)

XDOM = [sys.executable, "-m", "xdom.deploy.cli"]



def vm_guest(name: str = "g1", vm: str = "", **keys: Any) -> str:
    lines = ["[[domain]]", f'name = "{name}"', 'kind = "guest"']
    lines += [f"{key} = {value}" for key, value in keys.items()]
    return "\n" + "\n".join(lines) + "\n[domain.vm]\n" + vm + "\n"


# ---- xl strings: export=vhost-user ---------------------------------------------------------------

def test_vhost_user_exports_in_xl_strings() -> None:
    d = parse_disk("vdev=xvda, export=vhost-user:xvda.sock, target=/srv/a.img")
    assert (d.export_kind, d.export_path) == ("vhost-user", "xvda.sock")
    assert parse_disk(d.to_xl()) == d
    n = parse_disk("/a,,xvda,export=nbd:/r/a.sock")
    assert (n.export_kind, n.export_path) == ("nbd", "/r/a.sock")
    assert parse_disk("/a,,xvda").export_kind is None           # the topology decides: nbd, or vhost-user for a VM
    v = parse_vif("mac=00:16:3e:00:00:01, export=vhost-user:/r/g1/vif0.sock")
    assert (v.export_kind, v.export_path) == ("vhost-user", "/r/g1/vif0.sock")
    assert parse_vif(v.to_xl()) == v
    assert parse_vif("bridge=xdombr0").export_kind is None      # a TAP device, or vhost-user for a VM
    q = parse_vif("mac=00:16:3e:00:00:01, queues=4")
    assert q.queues == 4 and parse_vif(q.to_xl()) == q and parse_vif("").queues is None


def test_a_vm_nics_queue_pairs_are_its_vcpus_or_its_queues_key() -> None:
    from xdom.deploy.topology import vif_queues
    g = parse(HEAD + vm_guest(vm="cpus = 3", vif='["", "queues=1", "queues=16"]')).by_name("g1")
    assert [vif_queues(v, g.vm) for v in g.vifs] == [3, 1, 16]
    assert vif_queues(g.vifs[0], VmConfig(cpus=40)) == 16                  # at most the guest domain's 16 pairs
    plain = parse(HEAD + '\n[[domain]]\nname = "p1"\nkind = "guest"\nvif = ["export=vhost-user:v.sock, queues=2", '
                         '""]\n').by_name("p1")
    assert [vif_queues(v, plain.vm) for v in plain.vifs] == [2, 1]         # a VMM of the user's: as asked, or 1
    (err,) = errors(HEAD + '\n[[domain]]\nname = "p1"\nkind = "guest"\nvif = ["queues=2"]\n')
    assert err.startswith('topo.toml: domain[3] ("p1").vif[0]: queues=2: queues are a vhost-user NIC\'s queue pairs')


@pytest.mark.parametrize("parse_it, spec, fragment", [
    (parse_disk, "/a,,xvda,export=iscsi:/x", "expected nbd:<unix socket path> or vhost-user:<unix socket path>"),
    (parse_disk, "/a,,xvda,export=vhost-user:", "the socket path after 'vhost-user:' is empty"),
    (parse_vif, "export=nbd:/x", "expected vhost-user:<unix socket path> (a vif without export= is a TAP device"),
    (parse_vif, "export=vhost-user:/" + "x" * 200, "longer than 107 bytes"),
    (parse_vif, "queues=17", "queues 17 is outside 1..16"),
    (parse_vif, "queues=0", "queues 0 is outside 1..16"),
])
def test_bad_vhost_user_exports(parse_it: Any, spec: str, fragment: str) -> None:
    with pytest.raises(XlCfgError) as e:
        parse_it(spec)
    assert fragment in str(e.value)


# ---- the [domain.vm] table -------------------------------------------------------------------------

def test_a_vm_table_with_defaults_and_every_key() -> None:
    g = parse(HEAD + vm_guest()).by_name("g1")
    assert g.vm == VmConfig() and g.vm.own_image and g.vm.memory_mib == 256 and g.vm.accel == "auto"
    text = HEAD + vm_guest(vm='kernel = "boot/vmlinuz"\ninitrd = "/boot/initrd"\nappend = "console=ttyS0 quiet"\n'
                              'cpus = 2\nmemory = "1G"\naccel = "tcg"\nextra_args = ["-rtc", "base=utc"]\n'
                              'limits = { rss = "2G", cpu_percent = 150 }\n')
    vm = parse(text).by_name("g1").vm
    assert vm == VmConfig(kernel="boot/vmlinuz", initrd="/boot/initrd", append="console=ttyS0 quiet", cpus=2,
                          memory_mib=1024, accel="tcg", extra_args=("-rtc", "base=utc"),
                          limits=Limits(rss_bytes=2 << 30, cpu_percent=150.0))
    assert not vm.own_image
    # a relative kernel resolves against the state directory, as a disk's target does
    r = parse(text).resolved("/s", "/r").by_name("g1").vm
    assert r is not None and r.kernel == "/s/boot/vmlinuz" and r.initrd == "/boot/initrd"
    assert parse(HEAD + vm_guest(vm="fio = true\nmemory = 512")).by_name("g1").vm == VmConfig(fio=True,
                                                                                              memory_mib=512)


def test_a_vm_guests_devices_are_vhost_user_exports_by_default() -> None:
    text = HEAD + vm_guest(disk='["/img/a,,xvda", "/img/b,,xvdb,export=vhost-user:/vm/g1/b.sock"]',
                           vif='["ip=10.77.0.1/24", "devid=3, export=vhost-user:net.sock"]', vm='accel = "tcg"')
    g = parse(text).by_name("g1")
    assert [d.export_kind for d in g.disks] == ["vhost-user", "vhost-user"]
    assert [v.export_kind for v in g.vifs] == ["vhost-user", "vhost-user"]
    r = parse(text).resolved("/s", "/r").by_name("g1")
    assert [d.export_path for d in r.disks] == [None, "/vm/g1/b.sock"]          # None: RUN_DIR/exports/g1/xvda.sock
    assert [v.export_path for v in r.vifs] == [None, "/r/exports/g1/net.sock"]
    # a guest without a VM: NBD and TAP by default, and vhost-user for a VMM its user runs
    plain = parse(HEAD + "\n[[domain]]\nname = \"p1\"\nkind = \"guest\"\n"
                         "disk = [\"/img/c,,xvda\", \"/img/d,,xvdb,export=vhost-user:d.sock\"]\n"
                         "vif = [\"\", \"export=vhost-user:v.sock\"]\n").by_name("p1")
    assert [d.export_kind for d in plain.disks] == ["nbd", "vhost-user"]
    assert [v.export_kind for v in plain.vifs] == [None, "vhost-user"] and plain.vm is None


def test_vm_table_errors_name_their_keys() -> None:
    errs = errors(HEAD + vm_guest(vm='memory = "100K"\naccel = "kv"\ninitrd = "x"\nbogus = 1\n'
                                     'extra_args = ["-daemonize"]\ncpus = 0\nappend = "a\\nb"\n'))
    want = [
        ('domain[3] ("g1").vm.bogus', "unknown key; expected one of kernel, initrd, append, cpus, memory"),
        ('domain[3] ("g1").vm.initrd', "an initrd without a kernel"),
        ('domain[3] ("g1").vm.append', "the kernel command line is one line"),
        ('domain[3] ("g1").vm.cpus', "expected an integer between 1 and 255, found 0"),
        ('domain[3] ("g1").vm.memory', "is not a whole number of MiB"),
        ('domain[3] ("g1").vm.accel', "accel 'kv' is not one of kvm, tcg, auto (did you mean 'kvm'?)"),
        ('domain[3] ("g1").vm.extra_args[0]', "-daemonize is not allowed: QEMU would fork away"),
    ]
    assert len(errs) == len(want), errs
    for (where, fragment), err in zip(want, errs):
        assert err.startswith(f"topo.toml: {where}: ") and fragment in err, (where, err)
    assert errors(HEAD + vm_guest(vm='memory = "8M"'))[0].endswith("less than 16 MiB: no Linux kernel boots in that")
    assert "a VM with a kernel of its own has no such variant" in errors(HEAD + vm_guest(vm='kernel = "/k"\nfio = true'))[0]
    assert errors(HEAD + vm_guest(vm='memory = "256M"\nlimits = { rss = "200M" }'))[0].startswith(
        'topo.toml: domain[3] ("g1").vm.limits.rss: rss \'200M\' is not above the VM\'s memory (256 MiB)')
    assert errors(HEAD + '\n[[domain]]\nname = "blk1"\nkind = "blkback"\nvm = {}\n') == [
        'topo.toml: domain[3] ("blk1").vm: only guest domains run a VM; this is a blkback domain']


def test_mixes_that_cannot_work_are_refused_up_front() -> None:
    errs = errors(HEAD + vm_guest(disk='["/img/a,,xvda,export=nbd:a.sock"]', workload='["sleep", "1"]',
                                  limits='{ rss = "128M" }', vif='["export=vhost-user:a.sock"]')
                  + '\n[[domain]]\nname = "g1-console"\nkind = "guest"\n')
    text = "\n".join(errs)
    assert 'domain[3] ("g1").workload: a guest with a VM ([domain.vm]) has no workload: the VM is what it runs' \
        in text
    assert ('domain[4] ("g1-console").name: name \'g1-console\' is taken by the log of domain[3] ("g1")\'s VM '
            '(STATE_DIR/logs/g1-console.log)') in text
    assert ('domain[3] ("g1").disk[0]: export=nbd: serves the disk to programs on the host, but g1 runs a VM '
            '([domain.vm]), which reaches its disks over vhost-user only') in text
    assert ('domain[3] ("g1").limits.rss: rss 128 MiB is not above the VM\'s memory (256 MiB): the guest domain '
            'maps the VM\'s memory') in text
    assert 'domain[3] ("g1").vif[0]: export socket \'a.sock\' is already used by domain[3] ("g1").disk[0]' in text
    assert len(errs) == 5, errs


def test_vhost_user_sockets_follow_the_export_rules() -> None:
    for bad in ("a/b.sock", ".."):
        (err,) = errors(HEAD + vm_guest(vif=f'["export=vhost-user:{bad}"]'))
        assert "a relative export is a socket name in g1's own directory RUN_DIR/exports/g1/" in err
    topo = parse(HEAD + vm_guest(vif='["export=vhost-user:/r/x.sock"]')
                 + vm_guest("g2", disk='["/img/b,,xvda,export=vhost-user:/srv/g2/y.sock"]',
                            vif='["export=vhost-user:/srv/g2/n.sock"]'))
    with pytest.raises(TopologyError) as e:
        topo.resolved("/s", "/r")
    assert e.value.errors == [
        'topo.toml: domain[3] ("g1").vif[0]: export socket \'/r/x.sock\' is in the run directory /r, which no domain '
        "may write (the toolstack's and the broker's sockets and pid file live there); leave export= a plain "
        "socket name (it goes in /r/exports/g1/) or name a directory of g1's own"]
    long = "/r" + "/x" * 60
    with pytest.raises(TopologyError, match="longer than 107 bytes"):
        parse(HEAD + vm_guest(vif='[""]')).resolved("/s", long)


# ---- what the host must offer (plan_vms), without starting anything --------------------------------------

def _vm_topology(vm: str, **keys: Any) -> Topology:
    return parse("\n[[domain]]\nname = \"xs\"\nkind = \"xenstored\"\n[[domain]]\nname = \"net0\"\nkind = \"netback\"\n"
                 + vm_guest(vm=vm, **keys)).resolved("/s", "/r")


def test_host_checks_refuse_what_cannot_work(monkeypatch: pytest.MonkeyPatch) -> None:
    plans, problems = vm_plan.plan_vms(_vm_topology('kernel = "/nonexistent/vmlinuz"\naccel = "tcg"'))
    assert problems == ['topo.toml: domain[2] ("g1").vm.kernel: /nonexistent/vmlinuz: No such file or directory']
    total = vm_plan._mem_total_mib()
    assert total is not None
    _, problems = vm_plan.plan_vms(_vm_topology(f'kernel = "/proc/self/exe"\naccel = "tcg"\n'
                                                   f'memory = {total + 1024}'))
    assert problems and all("more than this host's memory" in p for p in problems), problems
    monkeypatch.setattr("xdom.deploy.vm.accel.kvm_device_problem", lambda: "no /dev/kvm (test)")
    _, problems = vm_plan.plan_vms(_vm_topology('kernel = "/proc/self/exe"\naccel = "kvm"'))
    assert problems == ['topo.toml: domain[2] ("g1").vm.accel: "kvm" cannot work here: no /dev/kvm (test); use '
                        '"tcg" or "auto"']
    monkeypatch.setattr(vm_plan.shutil, "which", lambda name: None)
    _, problems = vm_plan.plan_vms(_vm_topology('accel = "tcg"'))
    assert problems == ['topo.toml: domain[2] ("g1").vm: qemu-system-x86_64 is not installed (Debian package '
                        'qemu-system-x86): nothing can run the VM']


def test_the_projects_image_needs_its_memory_and_gets_the_vifs_addresses(vm_image: Any) -> None:
    _, problems = vm_plan.plan_vms(_vm_topology('accel = "tcg"\nmemory = "64M"'))
    assert problems == [f'topo.toml: domain[2] ("g1").vm.memory: 64 MiB is less than the '
                        f'{vm_image.min_memory_mib} MiB the project\'s image needs (its kernel unpacks the whole '
                        f'initramfs into RAM, then runs from it)']
    plans, problems = vm_plan.plan_vms(_vm_topology('accel = "tcg"\nappend = "xdom.gw=10.77.0.254"',
                                                       vif='["ip=10.77.0.1/24", "ip=10.78.0.1/16", ""]'))
    assert not problems
    plan = plans["g1"]
    assert plan.own_image and plan.kernel == str(vm_image.kernel) and plan.accel == "tcg"
    assert plan.append == vm_image.append("xdom.hostname=g1", "xdom.ip=10.77.0.1/24,10.78.0.1/16",
                                          "xdom.gw=10.77.0.254")


# ---- live: supervised hosts with VMs -----------------------------------------------------------------

@pytest.fixture(scope="module")
def vm_image() -> Any:
    from xdom.deploy.vm.image import ImageError, ensure_image
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 missing (apt-get install qemu-system-x86)")
    try:
        return ensure_image()
    except ImageError as e:
        pytest.skip(f"no VM image: {e}")


NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the broker's /proc/PID/map_files)")


def _guest_supports(option: str) -> bool:
    out = subprocess.run([sys.executable, "-m", "xdom.domains.guest", "--help"], capture_output=True, text=True)
    return option in out.stdout


def xdom(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*XDOM, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def ok(*args: str, timeout: float = 90) -> str:
    res = xdom(*args, timeout=timeout)
    assert res.returncode == 0, f"xdom {' '.join(args)}: {res.returncode}\n{res.stdout}{res.stderr}"
    return res.stdout


def vm_run(run: str, guest: str, script: str, timeout: float = 60) -> str:
    """``xdom console GUEST --run SCRIPT``: its output; the test fails unless it exits 0."""
    return ok("console", guest, "--run-dir", run, "--run", script, "--wait", str(timeout), timeout=timeout + 30)


def rows(run: str) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in json.loads(ok("ps", "--json", "--run-dir", run))}


def attach_on_a_pty(run: str, guest: str) -> None:
    """``xdom console GUEST`` with a terminal: what is typed runs in the VM, Ctrl-] leaves with status 0."""
    import pty
    import re
    import select
    import time
    master, slave = pty.openpty()
    proc = subprocess.Popen([*XDOM, "console", guest, "--run-dir", run], stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    try:
        seen = b""
        deadline = time.monotonic() + 30
        while b"escape character is ^]" not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, seen
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096)
        os.write(master, b"echo $((6*7))-from-the-terminal\r")
        deadline = time.monotonic() + 120
        while not re.search(rb"42-from-the-terminal\r?\n", seen):
            assert time.monotonic() < deadline, f"no answer through xdom console: {seen!r}"
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096)
        os.write(master, b"\x1d")                                   # Ctrl-]
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


class VmHost:
    """A host started with ``xdom up --detach`` from a topology written here; ``down()`` checks it left nothing."""

    def __init__(self, base: str, body: str) -> None:
        self.layout = Layout(os.path.join(base, "state"), os.path.join(base, "run"))
        self.path = os.path.join(base, "t.toml")
        with open(self.path, "w") as f:
            f.write(f'[host]\nstate_dir = "{self.layout.state_dir}"\nrun_dir = "{self.layout.run_dir}"\n\n' + body)
        os.makedirs(os.path.join(self.layout.state_dir, "images"), exist_ok=True)
        self.up_output = ""

    @property
    def run(self) -> str:
        return self.layout.run_dir

    def image(self, name: str, size: int) -> str:
        path = os.path.join(self.layout.state_dir, "images", name)
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def up(self) -> str:
        self.up_output = ok("up", self.path, "--detach", timeout=120)
        return self.up_output

    def qemus(self) -> list[int]:
        """QEMU processes whose command line names this host's run directory."""
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "qemu-system" in cmd and self.run + os.sep in cmd:
                found.append(p.info["pid"])
        return found

    def down(self, seen: dict[str, dict[str, Any]]) -> None:
        ok("down", "--run-dir", self.run)
        pids = [p for r in seen.values() for p in (r["pid"], (r.get("vm") or {}).get("pid")) if p]
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not alive and not self.qemus(), (alive, self.qemus())
        with open("/proc/net/unix") as f:
            sockets = [line.split()[-1] for line in f if self.run + os.sep in line]
        assert not sockets, sockets
        assert not netns.of_host(self.run)
        assert not os.path.exists(self.layout.vms_dir) and not os.path.exists(self.layout.exports_dir)

    def cleanup(self) -> None:
        """Whatever a failed test left: the supervisor, then any process still naming the run directory."""
        if os.path.isdir(self.run) and running_pid(self.run) is not None:
            xdom("down", "--run-dir", self.run)
        for p in psutil.process_iter(["pid", "cmdline"]):
            if self.run + os.sep in " ".join(p.info["cmdline"] or []) and p.info["pid"] != os.getpid():
                try:
                    p.kill()
                except psutil.Error:
                    pass


@pytest.fixture
def hosts(run_dir: str) -> Iterator[list[VmHost]]:
    made: list[VmHost] = []
    yield made
    for h in made:
        h.cleanup()


VM_SMALL = 'memory = "128M"\naccel = "tcg"\n'


@NEEDS_ROOT
def test_a_supervised_vm_guest_without_devices(vm_image: Any, run_dir: str, hosts: list[VmHost]) -> None:
    h = VmHost(run_dir, "[[domain]]\nname = \"xs\"\nkind = \"xenstored\"\n"
                        + vm_guest(vm=VM_SMALL, memory='"4M"', restart='"on-failure"', restart_backoff="0.1"))
    hosts.append(h)
    out = h.up()
    assert "g1: VM running (QEMU pid " in out and "accel tcg" in out
    seen = rows(h.run)
    g1 = seen["g1"]
    vm = g1["vm"]
    assert vm["state"] == "running" and vm["accel"] == "tcg" and vm["accel_reason"] == "asked for in the topology"
    assert vm["pid"] and vm["pid"] != g1["pid"] and vm["restarts"] == 0 and vm["memory_mib"] == 128
    assert vm["log"] == h.layout.log_path("g1-vm") and vm["console_log"] == h.layout.log_path("g1-console")
    text = ok("ps", "--run-dir", h.run)
    assert any(line.split()[:2] == ["vm", "qemu"] and str(vm["pid"]) in line and "accel tcg" in line
               for line in text.splitlines()), text

    # QEMU runs as the guest's uid, in its namespace, under its own seccomp filter, beside (not under) the guest
    qemu = psutil.Process(vm["pid"])
    assert qemu.uids().real == g1["uid"] and qemu.uids().effective == g1["uid"]
    assert os.path.basename(qemu.cmdline()[0]).startswith("qemu-system") and "-sandbox" in qemu.cmdline()
    with open(f"/proc/{vm['pid']}/status") as f:
        assert "\nSeccomp:\t2\n" in f.read()
    if g1["netns"]:
        assert os.stat(f"/proc/{vm['pid']}/ns/net").st_ino == os.stat(f"/run/netns/{g1['netns']}").st_ino
    assert qemu.ppid() != g1["pid"]

    # the console, for scripts: the command's output and exit status
    assert vm_run(h.run, "g1", "hostname; grep -c ^processor /proc/cpuinfo").split() == ["g1", "1"]
    res = xdom("console", "g1", "--run-dir", h.run, "--run", "echo to-stderr >&2; exit 3")
    assert res.returncode == 3 and res.stdout == "to-stderr\n", res

    # the console, for people: xdom console on a terminal, a line typed, Ctrl-] leaves
    attach_on_a_pty(h.run, "g1")

    # the guest domain dies: it alone is restarted, the VM goes on (QEMU waits for its sockets)
    os.kill(g1["pid"], signal.SIGKILL)
    now = wait_until(lambda: (r := rows(h.run)["g1"])["state"] == "running" and r["restarts"] == 1 and r,
                     timeout=30, what="the guest domain to come back")
    assert now["vm"]["pid"] == vm["pid"] and now["vm"]["restarts"] == 0 and now["vm"]["state"] == "running"
    assert vm_run(h.run, "g1", "echo still here").strip() == "still here"

    # QEMU dies (the VM crashed): restarted by the guest's policy; the guest domain goes on
    os.kill(vm["pid"], signal.SIGKILL)
    again = wait_until(lambda: (r := rows(h.run)["g1"])["vm"]["state"] == "running" and r["vm"]["restarts"] == 1
                       and r, timeout=30, what="the VM to be restarted")
    assert again["vm"]["pid"] != vm["pid"] and again["pid"] == now["pid"] and again["restarts"] == 1
    assert again["vm"]["last_exit"] == "killed by SIGKILL"
    assert vm_run(h.run, "g1", "cat /proc/uptime").strip()
    assert "killed by SIGKILL" in ok("logs", "g1-vm", "--run-dir", h.run)
    assert "XDOM-VM-READY" in ok("logs", "g1-console", "--run-dir", h.run)

    # destroy powers the VM off before the guest domain stops; restart brings both back
    ok("destroy", "g1", "--run-dir", h.run)
    gone = rows(h.run)["g1"]
    assert gone["state"] == "destroyed" and gone["vm"]["state"] == "stopped" and gone["vm"]["pid"] is None
    assert gone["vm"]["last_exit"] == "exited with status 0 (powered off by the toolstack)"
    assert not psutil.pid_exists(again["vm"]["pid"]) and not h.qemus()
    ok("restart", "g1", "--run-dir", h.run)
    back = wait_until(lambda: (r := rows(h.run)["g1"])["vm"]["state"] == "running" and r, timeout=30,
                      what="the VM to start with its guest domain")
    assert back["vm"]["pid"] not in (vm["pid"], again["vm"]["pid"]) and back["state"] == "running"
    assert vm_run(h.run, "g1", "echo back").strip() == "back"

    seen.update({"g1": back, "g1-first": g1, "g1-second": again})
    h.down(seen)
    with open(h.layout.log_path("g1-vm")) as f:
        assert "powered off with the host" in f.read()          # system_powerdown: the image powers off at once


@NEEDS_ROOT
def test_a_vm_disk_served_by_blkback(vm_image: Any, run_dir: str, hosts: list[VmHost]) -> None:
    if not _guest_supports("--vhost-user-disk"):
        pytest.skip("the guest domain has no --vhost-user-disk yet (domains/guest.py)")
    h = VmHost(run_dir, HEAD.replace('[[domain]]\nname = "net0"\nkind = "netback"\n', "")
               + vm_guest(vm=VM_SMALL, disk='["format=raw, vdev=xvda, access=rw, target=images/g1.img"]',
                          restart='"on-failure"'))
    hosts.append(h)
    image = h.image("g1.img", 32 << 20)
    h.up()
    seen = rows(h.run)
    assert seen["g1"]["vm"]["disks"] == [{"vdev": "xvda", "id": "xvda", "socket": os.path.join(h.run, "exports", "g1",
                                                                                             "xvda.sock"),
                                          "plug": {"state": "present", "error": None, "bus": "port-xvda"}}]
    assert seen["g1"]["devices"][0]["export_kind"] == "vhost-user"
    size = vm_run(h.run, "g1", "cat /sys/block/vda/size").strip()
    assert int(size) * 512 == 32 << 20
    # 8 MiB of random data written through the VM's virtio-blk (vhost-user -> guest domain -> blkfront ->
    # blkback -> image), read back with the page cache dropped, and checked on the host in the image itself
    out = vm_run(h.run, "g1", "dd if=/dev/urandom of=/tmp/d bs=1M count=8 2>/dev/null && sha256sum </tmp/d && "
                              "dd if=/tmp/d of=/dev/vda bs=1M oflag=direct 2>/dev/null && sync && "
                              "echo 3 >/proc/sys/vm/drop_caches && "
                              "dd if=/dev/vda bs=1M count=8 iflag=direct 2>/dev/null | sha256sum")
    written, read = [line.split()[0] for line in out.strip().splitlines()]
    assert written == read
    import hashlib
    with open(image, "rb") as f:
        assert hashlib.sha256(f.read(8 << 20)).hexdigest() == written

    # the guest domain killed while the VM writes: it alone restarts, QEMU reconnects, the writes go on
    import threading
    import time
    result: dict[str, str] = {}
    script = ("i=0; while [ $i -lt 30 ]; do dd if=/dev/urandom of=/dev/vda bs=64k count=1 seek=$((256 + i)) "
              "oflag=direct 2>/dev/null || echo FAIL $i; i=$((i + 1)); usleep 100000; done; echo done")
    writer = threading.Thread(target=lambda: result.setdefault("out", vm_run(h.run, "g1", script, timeout=90)))
    writer.start()
    time.sleep(1.5)
    assert writer.is_alive()                    # the writes are under way (they take 3 s at least)
    os.kill(seen["g1"]["pid"], signal.SIGKILL)
    writer.join(120)
    assert result.get("out", "").strip() == "done", result
    now = rows(h.run)["g1"]
    assert now["restarts"] == 1 and now["vm"]["pid"] == seen["g1"]["vm"]["pid"] and now["vm"]["restarts"] == 0
    assert "I/O error" not in vm_run(h.run, "g1", "dmesg")
    seen["g1-first"], seen["g1"] = seen["g1"], now
    h.down(seen)


@NEEDS_ROOT
def test_two_vms_ping_each_other_through_netback(vm_image: Any, run_dir: str, hosts: list[VmHost]) -> None:
    if not _guest_supports("--vhost-user-vif"):
        pytest.skip("the guest domain has no --vhost-user-vif yet (domains/guest.py)")
    body = ("\n[[domain]]\nname = \"xs\"\nkind = \"xenstored\"\n\n[[domain]]\nname = \"net0\"\nkind = \"netback\"\n"
            + vm_guest("g1", vm=VM_SMALL, vif='["mac=00:16:3e:00:00:11, ip=10.77.0.1/24"]')
            + vm_guest("g2", vm=VM_SMALL, vif='["mac=00:16:3e:00:00:12, ip=10.77.0.2/24"]'))
    h = VmHost(run_dir, body)
    hosts.append(h)
    h.up()
    seen = rows(h.run)
    assert [n["mac"] for n in seen["g1"]["vm"]["nics"]] == ["00:16:3e:00:00:11"]
    mac = vm_run(h.run, "g1", "cat /sys/class/net/eth0/address").strip()
    assert mac == "00:16:3e:00:00:11"
    out = vm_run(h.run, "g1", "ping -c 3 -W 5 10.77.0.2", timeout=60)
    assert " 0% packet loss" in out, out
    out = vm_run(h.run, "g2", "ping -c 2 -W 5 10.77.0.1", timeout=60)
    assert " 0% packet loss" in out, out
    h.down(seen)


def test_the_guest_domain_is_told_to_serve_the_vms_sockets(vm_image: Any, run_dir: str) -> None:
    """The supervisor's hook: vhost-user disks and vifs become --vhost-user-disk/--vhost-user-vif, no TAP."""
    from xdom.deploy.supervisor import Supervisor
    text = (HEAD + vm_guest(vm=VM_SMALL, disk='["/img/a,,xvda", "/img/b,,xvdb,export=vhost-user:b.sock"]',
                            vif='["ip=10.77.0.1/24"]')
            + '\n[[domain]]\nname = "p1"\nkind = "guest"\ndisk = ["/img/c,,xvda"]\nvif = [""]\n')
    for img in ("a", "b", "c"):
        open(os.path.join(run_dir, img), "wb").close()
    text = text.replace("/img/", run_dir + "/")
    state, run = os.path.join(run_dir, "state"), os.path.join(run_dir, "run")
    sup = Supervisor(parse(text).resolved(state, run), state, run)       # checks everything, starts nothing
    g1 = next(d for d in sup.domains if d.name == "g1")
    argv, _ = sup._argv(g1, 9)
    exports = os.path.join(run, "exports", "g1")
    assert f"--vhost-user-disk=51712:{exports}/xvda.sock" in argv
    assert f"--vhost-user-disk=51728:{exports}/b.sock" in argv
    assert f"--vhost-user-vif=0:{exports}/vif0.sock:1" in argv              # a queue pair per vCPU
    assert not any(a.startswith(("--disk=", "--vif=")) for a in argv)
    p1 = next(d for d in sup.domains if d.name == "p1")
    argv, _ = sup._argv(p1, 9, {0: 5})
    assert f"--disk=51712:{run}/exports/p1/xvda.sock" in argv and "--vif=0:eth0:5" in argv
    assert g1.kind == DomainKind.GUEST and sup.vms.vms["g1"].plan.accel == "tcg"
    assert not os.path.exists(run)


def test_the_vm_example_loads() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from xdom.deploy.topology_parse import load_topology
    topo = load_topology(os.path.join(root, "deploy", "examples", "vm.toml"))
    g1 = topo.by_name("g1")
    assert g1.vm == VmConfig(memory_mib=128, cpus=1, accel="auto") and not g1.disks and not g1.vifs


def test_the_default_example_runs_vms_and_processes_toml_the_process_guests() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from xdom.deploy.topology_parse import load_topology
    vms = load_topology(os.path.join(root, "deploy", "examples", "default.toml"))
    procs = load_topology(os.path.join(root, "deploy", "examples", "processes.toml"))
    for g in ("g1", "g2"):
        v, p = vms.by_name(g), procs.by_name(g)
        assert v.vm is not None and p.vm is None
        assert [d.export_kind for d in v.disks] == ["vhost-user"] and [x.export_kind for x in v.vifs] == ["vhost-user"]
        assert [d.export_kind for d in p.disks] == ["nbd"] and [x.export_kind for x in p.vifs] == [None]
        assert [x.ip for x in v.vifs] == [x.ip for x in p.vifs] and [x.mac for x in v.vifs] == [x.mac for x in p.vifs]
