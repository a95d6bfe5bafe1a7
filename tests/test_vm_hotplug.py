"""Hot-plug on VM guests: ``xdom block-attach/-detach`` and ``network-attach/-detach`` on a guest that runs a VM.

The toolstack writes the device's nodes as for any guest; the guest domain connects blkfront/netfront and
serves the device on a new vhost-user socket in its export directory; the supervisor adds it to the running
VM over QMP (chardev-add with reconnect, netdev_add for a NIC, device_add on one of the VM's empty PCIe
root ports).  Detach is the other way round: device_del, DEVICE_DELETED once the VM's kernel let go, the
netdev and chardev removed, then the xenbus teardown.  Everything is checked from inside the VM (TCG) and
on the host (the image, the sockets, the xenstore nodes); every host a test starts is brought down by it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_until
from test_vm_topology import NEEDS_ROOT, VM_SMALL, VmHost, ok, rows, vm_guest, vm_run, xdom

from xdom.domains.xenstore import XenstoreClient

pytestmark = [pytest.mark.timeout(420), NEEDS_ROOT]


@pytest.fixture(scope="module")
def vm_image() -> Any:
    import shutil

    from xdom.deploy.vm.image import ImageError, ensure_image
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 missing (apt-get install qemu-system-x86)")
    try:
        return ensure_image()
    except ImageError as e:
        pytest.skip(f"no VM image: {e}")


@pytest.fixture
def hosts(run_dir: str) -> Iterator[list[VmHost]]:
    made: list[VmHost] = []
    yield made
    for h in made:
        h.cleanup()


# ---- the supervisor's hot-plug steps, against a QMP peer played by the test (no QEMU) ----------------

class FakeQemu:
    """The QEMU side of a VM's QMP connection: reads the supervisor's commands, answers them."""

    def __init__(self) -> None:
        import socket
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.theirs.setblocking(False)
        self._buf = b""

    def commands(self) -> list[dict[str, Any]]:
        import json
        import select
        while select.select([self.ours], [], [], 0.2)[0]:
            self._buf += self.ours.recv(65536)
        lines, self._buf = self._buf.split(b"\n")[:-1], self._buf.split(b"\n")[-1]
        return [json.loads(line) for line in lines]

    def say(self, *msgs: dict[str, Any]) -> None:
        import json
        self.ours.sendall(b"".join(json.dumps(m).encode() + b"\n" for m in msgs))


class Guest:
    def __init__(self, spec: Any) -> None:
        self.spec, self.name, self.uid, self.netns, self.state = spec, spec.name, None, None, "running"


def supervisor_with_a_running_vm(tmp: str) -> tuple[Any, Any, Any, FakeQemu, list[tuple[str, str, str]]]:
    import tomllib

    from xdom.deploy.rundir import Layout
    from xdom.deploy.topology_parse import parse_topology
    from xdom.deploy.vm.supervised import VmPlan, VmState, VmSupervisor, _QmpLink
    topo = parse_topology(tomllib.loads(XS + BLK + NET + vm_guest(vm='accel = "tcg"\ncpus = 2')), "t.toml")
    g = Guest(topo.by_name("g1"))
    records: list[tuple[str, str, str]] = []
    sup = VmSupervisor([g], {"g1": VmPlan("/k", None, "", "tcg", "test", False, "qemu")},
                       Layout(os.path.join(tmp, "s"), os.path.join(tmp, "r")), watch_fd=lambda fd, cb: None,
                       unwatch_fd=lambda fd: None, record=lambda *r: records.append(r), progress=lambda t: None,
                       ready_timeout=10, stop_grace=1)
    vm = sup.vms["g1"]
    qemu = FakeQemu()
    vm.qmp = _QmpLink(qemu.theirs)
    vm.state = VmState.RUNNING
    vm.free_ports = ["hp0", "hp1"]
    return sup, g, vm, qemu, records


def soon() -> float:
    """A moment past the next look for a socket (and well before the plug gives up)."""
    import time
    return time.monotonic() + 1.0


def serve(path: str) -> Any:
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen()
    return s


def test_plug_steps_wait_for_the_socket_then_add_and_remove_in_order(run_dir: str) -> None:
    from xdom.deploy.control import ControlError
    from xdom.deploy.xl_disk import parse_disk
    from xdom.deploy.xl_vif import parse_vif
    sup, g, vm, qemu, records = supervisor_with_a_running_vm(run_dir)
    sock = os.path.join(run_dir, "xvdb.sock")
    out = sup.plug_disk(g, parse_disk("vdev=xvdb, target=/x"), sock)
    assert out == {"device": "xvdb", "plug": {"state": "waiting", "error": None, "bus": "hp0"}}
    sup.timers(soon())                               # no socket yet: nothing sent, still waiting
    assert qemu.commands() == [] and vm.plugs["xvdb"].state == "waiting" and sup.deadlines()
    listener = serve(sock)
    try:
        sup.timers(soon())
        (add,) = qemu.commands()                     # one command at a time, each after the one before succeeded
        assert add["execute"] == "chardev-add" and add["arguments"]["id"] == "xvdb-sock"
        assert add["arguments"]["backend"]["data"]["reconnect"] == 1
        qemu.say({"return": {}, "id": add["id"]})
        sup._on_qmp(vm)
        (dev,) = qemu.commands()
        assert dev["arguments"] == {"driver": "vhost-user-blk-pci", "id": "xvdb", "chardev": "xvdb-sock",
                                    "num-queues": 2, "bus": "hp0"}             # a queue per vCPU
        qemu.say({"event": "NIC_RX_FILTER_CHANGED", "data": {}}, {"return": {}, "id": dev["id"]})
        sup._on_qmp(vm)
        assert sup.row(g)["disks"] == [] and vm.plugs["xvdb"].state == "present" and vm.free_ports == ["hp1"]

        # a second device while the first is there; the third finds no slot (refused, nothing done)
        nic = sup.plug_nic(g, 1, parse_vif("mac=00:16:3e:00:00:31"), sock)
        assert nic["plug"]["bus"] == "hp1"
        with pytest.raises(ControlError) as e:
            sup.plug_nic(g, 2, parse_vif("mac=00:16:3e:00:00:32"), sock)
        assert e.value.errno_name == "ENOSPC" and "no free PCIe slot for vif2" in e.value.message
        sup.timers(soon())
        (add,) = qemu.commands()
        qemu.say({"return": {}, "id": add["id"]})
        sup._on_qmp(vm)
        (netdev,) = qemu.commands()
        assert netdev["arguments"] == {"type": "vhost-user", "id": "vif1", "chardev": "vif1-sock", "queues": 2}
        qemu.say({"return": {}, "id": netdev["id"]})
        sup._on_qmp(vm)
        (dev,) = qemu.commands()
        assert dev["arguments"]["vectors"] == 0 and dev["arguments"]["mq"] is True       # TCG: no MSI-X
        # QEMU refuses the device: the plug fails, saying why, and what was added is taken back, last first
        qemu.say({"error": {"class": "GenericError", "desc": "Bus 'hp1' does not support hotplugging"},
                  "id": dev["id"]})
        sup._on_qmp(vm)
        undo = qemu.commands()
        assert [c["execute"] for c in undo] == ["netdev_del", "chardev-remove"]
        assert vm.plugs["vif1"].state == "failed" and "does not support hotplugging" in vm.plugs["vif1"].error
    finally:
        listener.close()

    # removal: device_del, then (DEVICE_DELETED) its chardev, its slot back, and the toolstack's teardown
    done: list[str] = []
    out = sup.unplug_disk(g, parse_disk("vdev=xvdb, target=/x"), lambda: done.append("xvdb"))
    assert out == {"device": "xvdb", "plug": {"state": "removing", "error": None, "bus": "hp0"}}
    (dele,) = qemu.commands()
    assert dele["execute"] == "device_del" and dele["arguments"] == {"id": "xvdb"}
    qemu.say({"return": {}, "id": dele["id"]},
             {"event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/xvdb/virtio-backend"}})
    sup._on_qmp(vm)
    assert done == [] and vm.plugs["xvdb"].state == "removing"       # the VM has not let go yet
    qemu.say({"event": "DEVICE_DELETED", "data": {"device": "xvdb", "path": "/machine/peripheral/xvdb"}})
    sup._on_qmp(vm)
    assert done == ["xvdb"] and "xvdb" not in vm.plugs and "hp0" in vm.free_ports
    assert [c["execute"] for c in qemu.commands()] == ["chardev-remove"]
    # a boot device leaves its own root port; a device QEMU does not have is gone already
    gone: list[str] = []
    sup.unplug(g, "vif0", lambda: gone.append("vif0"))
    (dele,) = qemu.commands()
    assert dele["arguments"] == {"id": "vif0-dev"} and vm.plugs["vif0"].bus == "port-vif0"
    qemu.say({"error": {"class": "DeviceNotFound", "desc": "Device 'vif0-dev' not found"}, "id": dele["id"]})
    sup._on_qmp(vm)
    assert gone == ["vif0"] and "port-vif0" in vm.free_ports
    assert [r[1] for r in records if "plug" in r[1]] == ["vm-plug", "vm-plugged", "vm-plug", "vm-plug-failed",
                                                         "vm-unplug", "vm-unplugged", "vm-unplug", "vm-unplugged"]


def test_a_qemu_that_dies_mid_removal_completes_it(run_dir: str) -> None:
    from xdom.deploy.vm.supervised import VmState
    sup, g, vm, qemu, _ = supervisor_with_a_running_vm(run_dir)
    done: list[str] = []
    sup.unplug(g, "xvda", lambda: done.append("xvda"))
    assert [c["execute"] for c in qemu.commands()] == ["device_del"]
    sup._plugs_at_exit(vm, teardown=True)            # QEMU exited: the device went with it
    assert done == ["xvda"] and vm.plugs == {} and vm.free_ports == []
    # not running: nothing for the VM to do, the caller tears down at once; starting: refused
    vm.state = VmState.BACKOFF
    assert sup.unplug(g, "xvda", lambda: None) is None
    from xdom.deploy.xl_vif import parse_vif
    assert sup.plug_nic(g, 1, parse_vif("mac=00:16:3e:00:00:33"), "/x.sock") == {"device": "vif1", "plug": None,
                                                                                  "at_start": True}
    vm.state = VmState.STARTING
    assert "is starting" in (sup.devices_problem(g) or "")


XS = '\n[[domain]]\nname = "xs"\nkind = "xenstored"\n'
BLK = '\n[[domain]]\nname = "blk0"\nkind = "blkback"\n'
NET = '\n[[domain]]\nname = "net0"\nkind = "netback"\n'


def vm_disks(run: str, guest: str) -> dict[str, dict[str, Any]]:
    return {x["vdev"]: x for x in rows(run)[guest]["vm"]["disks"]}


def nodes_of(h: VmHost, kind: str, guest: str, backend: str, devid: int) -> list[str]:
    """Which of the device's two xenstore directories exist."""
    r = rows(h.run)
    fe, be = r[guest]["domid"], r[backend]["domid"]
    with XenstoreClient.unix(h.layout.xenstored_link) as xs:
        return [p for p in (f"/local/domain/{fe}/device/{kind}/{devid}", f"/local/domain/{be}/backend/{kind}/{fe}/{devid}")
                if xs.exists(p)]


def wait_for_block_device(run: str, guest: str, dev: str, present: bool) -> None:
    script = (f"i=0; while [ $i -lt 200 ]; do [ -b /dev/{dev} ] && [ -e /sys/block/{dev} ] && exit 0; "
              f"usleep 50000; i=$((i+1)); done; exit 1") if present else (
              f"i=0; while [ $i -lt 200 ]; do [ -e /sys/block/{dev} ] || exit 0; usleep 50000; i=$((i+1)); done; "
              f"exit 1")
    vm_run(run, guest, script, timeout=60)


def test_hot_attach_and_detach_a_vm_disk(vm_image: Any, run_dir: str, hosts: list[VmHost]) -> None:
    h = VmHost(run_dir, XS + BLK + vm_guest(vm=VM_SMALL, restart='"on-failure"'))
    hosts.append(h)
    image = h.image("hot.img", 16 << 20)
    h.up()
    seen = rows(h.run)
    assert seen["g1"]["vm"]["disks"] == [] and seen["g1"]["vm"]["free_slots"] == 4
    assert vm_run(h.run, "g1", "ls /sys/block | grep -c ^vd || true").strip() == "0"
    sock = os.path.join(h.run, "exports", "g1", "xvdb.sock")
    spec = "format=raw, vdev=xvdb, access=rw, backend=blk0, target=images/hot.img"

    for round_ in (1, 2):       # attached, used, detached; then all of it again on the freed slot
        out = ok("block-attach", "g1", spec, "--run-dir", h.run, timeout=180)
        assert "xvdb (devid 51728) attached to g1 on blk0" in out and f"vhost-user on {sock}" in out, out
        disk = vm_disks(h.run, "g1")["xvdb"]
        assert disk["plug"]["state"] == "present" and disk["socket"] == sock and os.path.exists(sock)
        assert [d["export_kind"] for d in rows(h.run)["g1"]["devices"]] == ["vhost-user"]
        wait_for_block_device(h.run, "g1", "vda", present=True)
        # the VM's new /dev/vda: the image's size, the vbd's vdev as its serial (GET_ID)
        size, serial = vm_run(h.run, "g1", "cat /sys/block/vda/size /sys/block/vda/serial").split()
        assert int(size) * 512 == 16 << 20 and serial == "xvdb"
        # 4 MiB written through vhost-user -> guest domain -> blkfront -> blkback -> image, read back uncached
        out = vm_run(h.run, "g1", f"dd if=/dev/urandom of=/tmp/d bs=1M count=4 2>/dev/null && sha256sum </tmp/d && "
                                  f"dd if=/tmp/d of=/dev/vda bs=1M seek={round_} oflag=direct 2>/dev/null && sync && "
                                  f"echo 3 >/proc/sys/vm/drop_caches && "
                                  f"dd if=/dev/vda bs=1M skip={round_} count=4 iflag=direct 2>/dev/null | sha256sum",
                     timeout=120)
        written, read = [line.split()[0] for line in out.strip().splitlines()]
        assert written == read
        with open(image, "rb") as f:
            f.seek(round_ << 20)
            assert hashlib.sha256(f.read(4 << 20)).hexdigest() == written
        assert nodes_of(h, "vbd", "g1", "blk0", 51728) != []

        out = ok("block-detach", "g1", "xvdb", "--run-dir", h.run, timeout=180)
        assert "xvdb detached from g1" in out, out
        wait_for_block_device(h.run, "g1", "vda", present=False)
        assert vm_run(h.run, "g1", "ls /sys/block | grep -c ^vd || true").strip() == "0"
        assert "xvdb" not in vm_disks(h.run, "g1") and rows(h.run)["g1"]["devices"] == []
        wait_until(lambda: not os.path.exists(sock), 30, "the detached disk's socket to go")
        assert nodes_of(h, "vbd", "g1", "blk0", 51728) == []
        assert rows(h.run)["g1"]["vm"]["free_slots"] == 4
        assert "I/O error" not in vm_run(h.run, "g1", "dmesg")

    # the VM and its guest domain never restarted; what cannot be done is refused and changes nothing
    now = rows(h.run)["g1"]
    assert now["restarts"] == 0 and now["vm"]["restarts"] == 0 and now["vm"]["pid"] == seen["g1"]["vm"]["pid"]
    bad = xdom("block-attach", "g1", spec.replace("target=", "export=nbd:x.sock, target="), "--run-dir", h.run)
    assert bad.returncode == 1 and "runs a VM, which reaches its disks over vhost-user only" in bad.stderr
    assert rows(h.run)["g1"]["devices"] == []
    seen["g1"] = now
    h.down(seen)


def transfer(run: str, sender: str, receiver: str, ip: str, port: int, kib: int) -> None:
    """``kib`` KiB of random data over TCP (busybox nc) from ``sender`` to ``receiver`` at ``ip``, checked by
    sha256 at both ends."""
    vm_run(run, receiver, f"(sleep 600 | nc -l -p {port} > /tmp/rx{port}) >/dev/null 2>&1 &")
    want = vm_run(run, sender, f"dd if=/dev/urandom of=/tmp/tx{port} bs=1k count={kib} 2>/dev/null && "
                               f"sha256sum < /tmp/tx{port}").split()[0]
    vm_run(run, sender, f"nc {ip} {port} < /tmp/tx{port}", timeout=120)
    wait_until(lambda: vm_run(run, receiver, f"wc -c < /tmp/rx{port}").strip() == str(kib << 10), 60,
               f"the whole file in {receiver}")
    assert vm_run(run, receiver, f"killall sleep; sha256sum < /tmp/rx{port}").split()[0] == want


def test_multi_queue_nics_and_nic_hot_plug(vm_image: Any, run_dir: str, hosts: list[VmHost]) -> None:
    """g1 has two vCPUs, so its NIC two queue pairs (one per vCPU, as its disks' queues); g2 one vCPU and
    ``queues=2``.  Traffic through netback (ping, TCP by sha256); then a NIC hot-added to each VM, used,
    removed from g1 (gone from the VM, its socket and nodes gone) and added again."""
    h = VmHost(run_dir, XS + NET
               + vm_guest("g1", vm=VM_SMALL + "cpus = 2\n", vif='["mac=00:16:3e:00:00:21, ip=10.77.0.1/24"]')
               + vm_guest("g2", vm=VM_SMALL, vif='["mac=00:16:3e:00:00:22, ip=10.77.0.2/24, queues=2"]'))
    hosts.append(h)
    h.up()
    seen = rows(h.run)
    assert [n["queues"] for n in seen["g1"]["vm"]["nics"]] == [2] and seen["g1"]["vm"]["cpus"] == 2
    assert [n["queues"] for n in seen["g2"]["vm"]["nics"]] == [2] and seen["g2"]["vm"]["cpus"] == 1
    import psutil
    for g in ("g1", "g2"):
        argv = " ".join(psutil.Process(seen[g]["vm"]["pid"]).cmdline())
        assert "-netdev vhost-user,id=vif0,chardev=vif0-sock,queues=2" in argv, argv
        assert ",mq=on,vectors=0,bus=port-vif0" in argv, argv          # TCG: no MSI-X, whatever the queues
    for g in ("g1", "g2"):                                 # the guest domain serves two pairs, netfront two queues
        with open(h.layout.log_path(g)) as f:
            log = f.read()
        assert re.search(r"--vhost-user-vif=0:\S+/vif0\.sock:2 ", log) and "vif0.sock (2 queues)" in log, log
    with open(h.layout.log_path("net0")) as f:
        assert f.read().count("(2 queues,") == 2            # netback connected two queues for each
    # the VM's driver uses a pair per vCPU: two in g1, one of its two in g2
    assert vm_run(h.run, "g1", "ls /sys/class/net/eth0/queues").split() == ["rx-0", "rx-1", "tx-0", "tx-1"]
    assert vm_run(h.run, "g2", "ls /sys/class/net/eth0/queues").split() == ["rx-0", "tx-0"]
    assert " 0% packet loss" in vm_run(h.run, "g1", "ping -c 3 -W 5 10.77.0.2")
    transfer(h.run, "g1", "g2", "10.77.0.2", 5001, 8192)
    transfer(h.run, "g2", "g1", "10.77.0.1", 5002, 4096)

    # hot-plugged NICs: a second one in each VM (g1's with its vCPUs' two pairs, g2's with one)
    for round_ in (1, 2):
        out = ok("network-attach", "g1", "mac=00:16:3e:00:01:21", "--run-dir", h.run, timeout=180)
        assert "vif 1 (00:16:3e:00:01:21, 2 queue pairs) attached to g1 on net0" in out, out
        if round_ == 1:
            out = ok("network-attach", "g2", "mac=00:16:3e:00:01:22, queues=1", "--run-dir", h.run, timeout=180)
            assert "vif 1 (00:16:3e:00:01:22, 1 queue pair) attached to g2" in out, out
        for g, ip in (("g1", "10.88.0.1/24"), ("g2", "10.88.0.2/24")):
            vm_run(h.run, g, f"i=0; while [ ! -e /sys/class/net/eth1 ] && [ $i -lt 200 ]; do usleep 50000; "
                             f"i=$((i+1)); done; ip addr add {ip} dev eth1 2>/dev/null; ip link set eth1 up")
        assert vm_run(h.run, "g1", "cat /sys/class/net/eth1/address").strip() == "00:16:3e:00:01:21"
        assert vm_run(h.run, "g1", "ls /sys/class/net/eth1/queues").split() == ["rx-0", "rx-1", "tx-0", "tx-1"]
        assert " 0% packet loss" in vm_run(h.run, "g2", "ping -c 3 -W 5 10.88.0.1")
        transfer(h.run, "g2", "g1", "10.88.0.1", 5010 + round_, 4096)
        nic = next(n for n in rows(h.run)["g1"]["vm"]["nics"] if n["devid"] == 1)
        assert nic["plug"]["state"] == "present" and os.path.exists(nic["socket"])

        out = ok("network-detach", "g1", "1", "--run-dir", h.run, timeout=180)
        assert "vif 1 detached from g1" in out, out
        assert vm_run(h.run, "g1", "ls /sys/class/net").split() == ["eth0", "lo"]
        assert [n["devid"] for n in rows(h.run)["g1"]["vm"]["nics"]] == [0]
        wait_until(lambda: not os.path.exists(nic["socket"]), 30, "the detached NIC's socket to go")
        assert nodes_of(h, "vif", "g1", "net0", 1) == []
        # eth0 carried on
        assert " 0% packet loss" in vm_run(h.run, "g1", "ping -c 2 -W 5 10.77.0.2")

    now = rows(h.run)
    for g in ("g1", "g2"):
        assert now[g]["restarts"] == 0 and now[g]["vm"]["restarts"] == 0 and now[g]["vm"]["pid"] == seen[g]["vm"]["pid"]
    assert [n["devid"] for n in now["g2"]["vm"]["nics"]] == [0, 1]
    h.down(now)
