"""vhost-user-net over netfront with real VMs through netback (the sans-IO parts: test_vhost_user_net.py).

VM tests (TCG, deploy/vm): a broker, xenstored, a netback domain
(built-in switch) and two guest domains each serving vhost-user-net to a
QEMU VM, all separate processes (VM 1's NIC with two queue pairs, its
driver using one).  Ping between the VMs, a TCP transfer (busybox nc)
checked by sha256, and netback killed with SIGKILL during a ping and during
a TCP stream and started again: the pings resume, the stream completes
intact, the VM's link never went down.  Then VM 2's QEMU is replaced by a
new one on the same guest domain, and pings again; and VM 1's guest domain
is SIGKILLed under a running ping and started again (QEMU reconnects): the
pings resume.  QEMU 7.2 under TCG
crashes when a vhost-user-net device uses MSI-X (``virtio_pci_vector_unmask``
takes the KVM irqfd path with no irqfd table), so the VMs' NICs run with
``vectors=0`` (INTx): ``qemu_argv`` writes it for every NIC under TCG.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import threading
from typing import Any

import pytest
from helpers import wait_until

QEMU = shutil.which("qemu-system-x86_64")
WAIT = 60.0
# QEMU 7.2 under TCG dereferences a missing irqfd table when a vhost-user-net device's MSI-X vectors are
# unmasked (virtio_pci_vector_unmask -> kvm_virtio_pci_irqfd_use): without MSI-X the NIC uses INTx.
# qemu_argv writes vectors=0 on the vhost-user NICs under TCG; this covers any other virtio-net-pci
# (bench_vm_net's QEMU-only reference NICs).
TCG_NET_ARGS = ["-global", "virtio-net-pci.vectors=0"]


class VmNet:
    """A broker, xenstored, a netback domain and guest domains, each a process of its own (the toolstack's
    steps done by hand, as tests/test_blk_processes.py does), each guest serving its vif to a QEMU VM as
    vhost-user-net; the VMs at 10.78.0.N/24.  ``close()`` stops everything it started."""

    def __init__(self, run_dir: str, guests: int = 2, image: Any = None, netback_args: tuple[str, ...] = (),
                 accel: str = "tcg", pairs: dict[int, int] | None = None) -> None:
        from xdom.deploy.launcher import start_broker, start_xenstored_domain
        from xdom.deploy.xsnodes import write_dom0_nodes
        from xdom.domains.xenstore import XenstoreClient
        self.run_dir = run_dir
        self.netback_args = netback_args
        self.accel = accel
        self.pairs = pairs or {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.creds: dict[str, dict[str, Any]] = {}
        self.vms: list[Any] = []
        self.mgmt: Any = None
        self.xenstored: Any = None
        self.xs: Any = None
        self.broker = start_broker(os.path.join(run_dir, "broker"))
        try:
            self.mgmt = self.broker.client()
            self.xenstored = start_xenstored_domain(self.mgmt, os.path.join(run_dir, "xs.sock"),
                                                    os.path.join(run_dir, "xs-state"))
            self.xs = XenstoreClient.unix(self.xenstored.socket_path)
            write_dom0_nodes(self.xs)
            self.creds["net0"] = self.mgmt.request("create", name="net0", memory="4M")
            self.start_netback()
            self.names = [f"g{i}" for i in range(1, guests + 1)]
            for i, name in enumerate(self.names, 1):
                self.creds[name] = self.mgmt.request("create", name=name, memory="16M")
                self._start(name, ["-m", "xdom.domains.guest", "--vhost-user-vif",
                                   f"0:{self.socket(i)}:{self.pairs.get(i, 1)}"], 16 << 10, vif=i)
            if image is not None:
                self.boot(image)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def mac(i: int) -> str:
        return f"00:16:3e:00:01:{i:02x}"

    def socket(self, i: int) -> str:
        return os.path.join(self.run_dir, f"g{i}-net.sock")

    def domid(self, name: str) -> int:
        return int(self.creds[name]["domid"])

    def log(self, name: str) -> str:
        with open(os.path.join(self.run_dir, f"{name}.log"), errors="replace") as f:
            return f.read()

    def _start(self, name: str, args: list[str], kib: int, vif: int | None = None) -> None:
        """Start ``python ARGS --ready-fd N`` in domain ``name``, introduce it, add its vif; return once ready."""
        from xdom.deploy.launcher import start_domain_process
        from xdom.deploy.vif import VifConfig, add_vif
        from xdom.deploy.xsnodes import write_domain_nodes
        from xdom.domains.xenstore import XenstoreError
        creds = self.creds[name]
        domid = int(creds["domid"])
        store = self.mgmt.request("setup_store", domid=domid, xenstore_domid=self.xenstored.domid)
        rfd, wfd = os.pipe()
        try:
            with open(os.path.join(self.run_dir, f"{name}.log"), "ab") as log:
                proc = start_domain_process(creds, [sys.executable, *args, "--ready-fd", str(wfd)], pass_fds=(wfd,),
                                            stdout=log, stderr=subprocess.STDOUT)
            self.procs[name] = proc
            os.close(wfd)
            wfd = -1
            wait_until(lambda: proc.poll() is not None or self.state(domid) == "running", WAIT,
                       f"{name} to connect to the broker")
            assert proc.poll() is None, self.log(name)[-3000:]
            try:                               # the supervisor's order (a restarted domid is ENOENT until introduced)
                write_domain_nodes(self.xs, domid, name, kib)
                written = True
            except XenstoreError as e:
                if e.name != "ENOENT":
                    raise
                written = False
            if not self.xs.is_domain_introduced(domid):
                self.xs.introduce(domid, int(store["gfn"]), int(store["port"]))
            if not written:
                write_domain_nodes(self.xs, domid, name, kib)
            if vif is not None:
                add_vif(self.xs, VifConfig(self.domid("net0"), domid, 0, self.mac(vif)))
            ready, _, _ = select.select([rfd], [], [], WAIT)
            assert ready and os.read(rfd, 64), f"{name} did not get ready: {self.log(name)[-3000:]}"
        finally:
            os.close(rfd)
            if wfd >= 0:
                os.close(wfd)

    def state(self, domid: int) -> str:
        return str(self.mgmt.request("info", domid=domid)["domain"]["state"])

    def start_netback(self) -> None:
        self._start("net0", ["-m", "xdom.backends.netback", *self.netback_args], 4 << 10)

    def kill_netback(self) -> None:
        """SIGKILL; returns once the broker buried it and xenstored dropped the nodes it owned."""
        from xdom.domains.xenbus import backend_path
        proc = self.procs["net0"]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        be = self.domid("net0")
        wait_until(lambda: self.state(be) not in ("running", "paused"), WAIT, "the broker to see netback die")
        wait_until(lambda: not self.xs.exists(backend_path(be, "vif", self.domid("g1"), 0)), WAIT,
                   "xenstored to release the dead netback's nodes")

    def restart_netback(self) -> None:
        """What the supervisor does for a dead driver domain: same domid, a new process, its vifs again."""
        from xdom.deploy.vif import VifConfig, add_vif
        self.creds["net0"] = self.mgmt.request("restart", domid=self.domid("net0"))
        self.start_netback()
        for i, name in enumerate(self.names, 1):
            add_vif(self.xs, VifConfig(self.domid("net0"), self.domid(name), 0, self.mac(i)))

    def restart_guest(self, i: int) -> None:
        """SIGKILL guest domain ``i`` under its running VM, then the supervisor's steps: same domid, a new
        process with the same arguments (QEMU reconnects to the socket it makes), its vif written again."""
        name = self.names[i - 1]
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        domid = self.domid(name)
        wait_until(lambda: self.state(domid) not in ("running", "paused"), WAIT, f"the broker to see {name} die")
        self.creds[name] = self.mgmt.request("restart", domid=domid)
        self._start(name, ["-m", "xdom.domains.guest", "--vhost-user-vif",
                           f"0:{self.socket(i)}:{self.pairs.get(i, 1)}"], 16 << 10, vif=i)

    def vm_spec(self, image: Any, i: int) -> Any:
        from xdom.deploy.vm.qemu import VhostUserNet, VmSpec
        return VmSpec(kernel=str(image.kernel), initrd=str(image.initrd),
                      append=image.append(f"xdom.ip=10.78.0.{i}/24"), accel=self.accel, name=f"vm{i}",
                      vhost_user_net=[VhostUserNet(self.socket(i), self.mac(i), self.pairs.get(i, 1))])

    def boot(self, image: Any) -> None:
        """Boot one VM per guest, at the same time (TCG boots are CPU-bound but mostly waiting)."""
        from xdom.deploy.vm.machine import boot_vm
        from xdom.deploy.vm.qemu import VmPaths
        results: dict[int, Any] = {}

        def one(i: int) -> None:
            try:
                results[i] = boot_vm(self.vm_spec(image, i), VmPaths.in_dir(self.run_dir, f"vm{i}"),
                                     ready_timeout=120)
            except BaseException as e:
                results[i] = e
        threads = [threading.Thread(target=one, args=(i,)) for i in range(1, len(self.names) + 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.vms = [r for _, r in sorted(results.items()) if not isinstance(r, BaseException)]
        for r in results.values():
            if isinstance(r, BaseException):
                raise r

    def close(self) -> None:
        from xdom.deploy.launcher import stop_process
        for vm in self.vms:
            vm.stop()
        self.vms = []
        for name in sorted(self.procs, key=lambda n: n == "net0"):      # guests first, then netback
            stop_process(self.procs[name])
        if self.xs is not None:
            self.xs.close()
        if self.xenstored is not None:
            self.xenstored.stop()
        if self.mgmt is not None:
            self.mgmt.close()
        self.broker.stop()


@pytest.fixture(scope="module")
def vm_image() -> Any:
    from xdom.deploy.vm.image import ImageError, ensure_image
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 missing (apt-get install qemu-system-x86)")
    try:
        return ensure_image()
    except ImageError as e:
        pytest.skip(f"no VM image: {e}")


def sha256_in(vm: Any, path: str) -> str:
    return vm.check(f"sha256sum {path}").split()[0]


SENDER = "for i in $(seq {n}); do cat /tmp/chunk; usleep 100000; done"


@pytest.mark.timeout(240)
def test_two_vms_talk_through_netback_and_ride_out_its_restart(run_dir: str, vm_image: Any) -> None:
    rig = VmNet(run_dir, image=vm_image, pairs={1: 2}, netback_args=("--max-queues", "2"))
    try:
        vm1, vm2 = rig.vms
        # the NIC as the VM sees it: the vif's MAC, link up.  VM 1's NIC has two queue pairs (one per netif
        # queue of its guest domain); its driver uses one (one vCPU), and QEMU disables our second pair.
        link = vm1.check("cat /sys/class/net/eth0/address /sys/class/net/eth0/carrier")
        assert link.split() == [rig.mac(1), "1"]
        assert "(2 queues)" in rig.log("g1") and "(1 queue)" in rig.log("g2")
        out = vm1.check("ping -c 3 -W 5 10.78.0.2", timeout=60)
        assert "3 packets received" in out, out

        # a TCP transfer (TCP super-frames both ways across the rings), checked by sha256
        vm2.check("(sleep 600 | nc -l -p 5000 > /tmp/rx) >/dev/null 2>&1 &")
        vm1.check("dd if=/dev/urandom of=/tmp/data bs=64k count=128 2>/dev/null")
        want = sha256_in(vm1, "/tmp/data")
        vm1.check("nc 10.78.0.2 5000 < /tmp/data", timeout=120)
        wait_until(lambda: vm2.check("wc -c < /tmp/rx").strip() == str(128 << 16), 30, "the whole file in vm2")
        assert sha256_in(vm2, "/tmp/rx") == want

        # a ping and a paced TCP stream running across a SIGKILL of netback and its restart
        chunks = 50
        vm1.check("dd if=/dev/urandom of=/tmp/chunk bs=64k count=4 2>/dev/null")
        want = vm1.check(SENDER.replace("; usleep 100000", "").format(n=chunks) + " | sha256sum").split()[0]
        vm2.check("killall sleep; (sleep 600 | nc -l -p 5001 > /tmp/stream) >/dev/null 2>&1 &")
        vm1.check("ping -i 0.2 -W 1 10.78.0.2 > /tmp/ping 2>&1 &")
        vm1.check(f"({SENDER.format(n=chunks)} | nc 10.78.0.2 5001; echo $? > /tmp/sent) >/dev/null 2>&1 &")
        wait_until(lambda: int(vm2.check("wc -c < /tmp/stream") or 0) > (8 << 16), 60, "the stream to flow")
        replies_before = vm1.check("grep -c 'bytes from' /tmp/ping || true").strip()
        rig.kill_netback()
        killed_at = int(vm2.check("wc -c < /tmp/stream"))
        rig.restart_netback()
        wait_until(lambda: "came back: reconnecting" in rig.log("g1") and "came back: reconnecting" in rig.log("g2"),
                   WAIT, "both netfronts to reconnect")
        wait_until(lambda: vm1.run("cat /tmp/sent").output.strip() == "0", 120, "the stream to complete")
        assert killed_at < chunks << 18, "the stream was over before netback was killed"
        wait_until(lambda: vm2.check("wc -c < /tmp/stream").strip() == str(chunks << 18), 30, "the whole stream")
        assert sha256_in(vm2, "/tmp/stream") == want
        # the pings came back after the restart; the VM never saw its link go down
        before = int(replies_before)
        wait_until(lambda: int(vm1.check("grep -c 'bytes from' /tmp/ping || true")) > before + 5, 30,
                   "pings after the restart")
        ping = vm1.check("killall ping; sleep 0.2; cat /tmp/ping")
        seqs = [int(line.split("seq=")[1].split()[0]) for line in ping.splitlines() if "bytes from" in line]
        assert seqs and seqs[-1] > seqs[before - 1] + 5, ping
        assert "unreachable" not in ping.lower(), ping
        assert vm1.check("cat /sys/class/net/eth0/carrier").strip() == "1"
        dmesg = vm1.check("dmesg")
        assert "Link is Down" not in dmesg and "TX timeout" not in dmesg.lower(), dmesg[-2000:]

        # VM 2's QEMU goes away and a new one connects to the same guest domain: its NIC works again
        from xdom.deploy.vm.machine import boot_vm
        from xdom.deploy.vm.qemu import VmPaths
        rig.vms.remove(vm2)
        vm2.stop()
        vm2 = boot_vm(rig.vm_spec(vm_image, 2), VmPaths.in_dir(run_dir, "vm2b"), ready_timeout=120)
        rig.vms.append(vm2)
        out = vm2.check("ping -c 2 -W 5 10.78.0.1", timeout=60)
        assert "2 packets received" in out, out
        assert rig.procs["g2"].poll() is None

        # VM 1's guest domain SIGKILLed under a running ping and started again: QEMU reconnects, the
        # pings resume
        vm1.check("ping -i 0.2 -W 1 10.78.0.2 > /tmp/ping2 2>&1 &")
        wait_until(lambda: int(vm1.check("grep -c 'bytes from' /tmp/ping2 || true")) >= 3, 30, "pings")
        rig.restart_guest(1)
        before = int(vm1.check("grep -c 'bytes from' /tmp/ping2 || true"))
        wait_until(lambda: int(vm1.check("grep -c 'bytes from' /tmp/ping2 || true")) > before + 5, 30,
                   "pings after the guest domain's restart")
        vm1.check("killall ping")
    finally:
        rig.close()
