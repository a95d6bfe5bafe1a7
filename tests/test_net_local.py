"""netback and netfront in-process (local xenhost), with real TAP devices in real network namespaces.

Two guests' netfronts each own a TAP device in a namespace of their own (a 64 MiB stream is checked byte for byte);
their frames cross the PV rings to one netback's learning switch.  Real
programs (ping, iperf3, a Python socket pair) run in the namespaces.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from helpers import wait_until
from xs_fixtures import start_xenstored

from xdom.backends.kept_mappings import KeptMappings
from xdom.backends.netback.server import NetbackServer
from xdom.deploy import netns
from xdom.deploy.tap import open_tun
from xdom.domains.device_channel import DeviceChannel, offer_fd
from xdom.domains.netfront.device import Netfront
from xdom.domains.xenhost import LocalHypervisor
from xdom.domains.xenstore import XenstoreClient

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(netns.unavailable_reason() is not None or not shutil.which("ping"),
                                 reason="needs root, iproute2 and ping (make test installs them as root)")]


class NetRig:
    """``bridge=True``: netback in bridge mode, its vifs TAPs on a Linux bridge in a namespace of its own
    (what the supervisor makes for a netback domain), their descriptors handed over a device channel."""

    def __init__(self, run_dir: str, guests: int = 2, bridge: bool = False, max_queues: int = 4,
                 kept: KeptMappings | None = None) -> None:
        self.run_dir = run_dir
        self.xenstored = start_xenstored(run_dir)
        self.hv = LocalHypervisor()
        self.clients: list[XenstoreClient] = []
        self.namespaces: list[str] = []
        self.fronts: list[Netfront] = []
        self.bridge_ns: str | None = None
        self.channel: socket.socket | None = None
        try:
            self.be = self.hv.create_domain("net", "2M")
            self.guests = [self.hv.create_domain(f"g{i}", "8M") for i in range(1, guests + 1)]
            self.xs = self.client()
            devices = None
            if bridge:
                self.bridge_ns = netns.netns_name("nb", run_dir)
                netns.create(self.bridge_ns)
                self.namespaces.append(self.bridge_ns)
                for args in (["link", "add", "xdombr0", "type", "bridge"], ["link", "set", "xdombr0", "up"]):
                    subprocess.run(["ip", "-n", self.bridge_ns, *args], check=True, capture_output=True)
                self.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                devices = DeviceChannel(theirs.detach())
            self.server = NetbackServer(self.be, self.client(), devices, max_queues=max_queues, kept=kept)
            self.server.start()
        except BaseException:
            self.close()
            raise

    def client(self) -> XenstoreClient:
        c = XenstoreClient.unix(self.xenstored.socket_path)
        self.clients.append(c)
        return c

    def plug(self, index: int, mtu: int = 1500, offloads: bool = True, rate: str | None = None,
             queues: int = 1) -> str:
        """Give guest ``index`` (1-based) a vif on the netback and a TAP in its namespace; returns the namespace.

        ``offloads=False`` makes its netfront one without checksum offload or GSO; ``rate`` is the
        backend's ``rate`` node (libxl's "BYTES,USECS"); ``queues`` the most its netfront asks for.
        """
        dom = self.guests[index - 1]
        ns = netns.netns_name(f"g{index}", self.run_dir)
        netns.create(ns)
        self.namespaces.append(ns)
        mac = f"00:16:3e:00:00:{index:02x}"
        for args in (["tuntap", "add", "dev", "eth0", "mode", "tap"], ["link", "set", "eth0", "address", mac],
                     ["link", "set", "eth0", "mtu", str(mtu)],
                     ["addr", "add", f"10.99.0.{index}/24", "dev", "eth0"], ["link", "set", "eth0", "up"]):
            subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)
        if self.bridge_ns is not None:            # the toolstack's part in bridge mode: netback's TAP first
            tap = f"vif{dom.domid}.0"
            for args in (["tuntap", "add", "dev", tap, "mode", "tap"], ["link", "set", tap, "mtu", str(mtu)],
                         ["link", "set", tap, "master", "xdombr0"], ["link", "set", tap, "up"]):
                subprocess.run(["ip", "-n", self.bridge_ns, *args], check=True, capture_output=True)
            fd = open_tun(self.bridge_ns)
            try:
                assert self.channel is not None
                offer_fd(self.channel, "tap", (dom.domid, 0), fd)
            finally:
                os.close(fd)
        be_path = f"/local/domain/{self.be.domid}/backend/vif/{dom.domid}/0"
        fe_path = f"/local/domain/{dom.domid}/device/vif/0"
        be_nodes = {"frontend": fe_path, "frontend-id": dom.domid, "online": 1, "state": 1, "mac": mac,
                    "handle": 0, "mtu": mtu, **({"rate": rate} if rate else {})}
        fe_nodes = {"backend": be_path, "backend-id": self.be.domid, "state": 1, "handle": 0, "mac": mac}

        def write(tx: int) -> None:           # all at once, as libxl does: netback never sees half a device
            for base, nodes in ((be_path, be_nodes), (fe_path, fe_nodes)):
                for k, v in nodes.items():
                    self.xs.write(f"{base}/{k}", str(v), tx)
        self.xs.transaction(write)
        with netns.entered(ns):               # the TAP device is found by name in the caller's namespace
            front = Netfront(dom, self.client(), 0, "eth0", offloads=offloads, max_queues=queues)
        self.fronts.append(front)
        front.connect(20)
        return ns

    def close(self) -> None:
        for f in self.fronts:
            f.close()
        if hasattr(self, "server"):
            self.server.close()
        if self.channel is not None:
            self.channel.close()
        for c in self.clients:
            c.close()
        for dom in [*getattr(self, "guests", []), *([self.be] if hasattr(self, "be") else [])]:
            dom.close()
        self.hv.close()
        for dom in [*getattr(self, "guests", []), *([self.be] if hasattr(self, "be") else [])]:
            dom.memory.close()
        for ns in self.namespaces:
            netns.delete(ns)
        self.xenstored.stop()


@pytest.fixture
def rig(run_dir: str) -> Iterator[NetRig]:
    r = NetRig(run_dir)
    try:
        yield r
    finally:
        r.close()


def in_ns(ns: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout)


def test_ping_both_ways_through_netback(rig: NetRig) -> None:
    ns1, ns2 = rig.plug(1), rig.plug(2)
    for ns, peer in ((ns1, "10.99.0.2"), (ns2, "10.99.0.1")):
        res = in_ns(ns, "ping", "-c", "3", "-i", "0.2", "-W", "5", peer)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "3 received" in res.stdout
    stats = {k: v.stats() for k, v in rig.server.vifs.items()}
    assert all(s["tx_packets"] >= 3 and s["rx_packets"] >= 3 for s in stats.values()), stats


SINK = r"""
import hashlib, socket, sys
s = socket.create_server(("10.99.0.2", 5001)); print("ready", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""


def stream(src_ns: str, dst_ns: str, dst_ip: str, data: bytes) -> None:
    """Send ``data`` over one TCP connection from ``src_ns`` to ``dst_ns``; assert it arrived byte-identical."""
    sink = subprocess.Popen(["ip", "netns", "exec", dst_ns, sys.executable, "-c", SINK.replace("10.99.0.2", dst_ip)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        send = ("import socket, sys; d = sys.stdin.buffer.read(); "
                f"c = socket.create_connection(('{dst_ip}', 5001), timeout=60); c.sendall(d); c.close()")
        res = subprocess.run(["ip", "netns", "exec", src_ns, sys.executable, "-c", send], input=data,
                             capture_output=True, timeout=90)
        assert res.returncode == 0, res.stderr
        out, _ = sink.communicate(timeout=90)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.communicate()
    assert out.split() == [str(len(data)), hashlib.sha256(data).hexdigest()]


def test_a_64_mib_stream_arrives_byte_identical(rig: NetRig) -> None:
    """TCP with offloads on both sides: super-frames (GSO) with blank checksums cross the rings whole."""
    ns1, ns2 = rig.plug(1), rig.plug(2)
    stream(ns1, ns2, "10.99.0.2", os.urandom(64 << 20))
    sender, receiver = (rig.server.vifs[(g.domid, 0)].stats() for g in rig.guests)
    assert sender["tx_gso"] > 0 and receiver["rx_gso"] > 0, (sender, receiver)
    assert receiver["rx_segmented"] == 0, receiver
    assert rig.fronts[0].stats["tx_gso"] > 0 and rig.fronts[1].stats["rx_gso"] > 0


def test_a_receiver_without_offloads_gets_segments_it_verifies(rig: NetRig) -> None:
    """g2's netfront negotiates neither GSO nor checksum offload: netback segments g1's super-frames and
    finishes their checksums in software, flagged for the receiving kernel to verify (a wrong checksum
    would be dropped there, and the stream would not complete byte-identical).  The other way, g2's
    kernel does all the work itself and g1 gets plain frames."""
    ns1, ns2 = rig.plug(1), rig.plug(2, offloads=False)
    stream(ns1, ns2, "10.99.0.2", os.urandom(8 << 20))
    stream(ns2, ns1, "10.99.0.1", os.urandom(8 << 20))
    g1, g2 = (rig.server.vifs[(g.domid, 0)].stats() for g in rig.guests)
    assert g1["tx_gso"] > 0 and g2["rx_segmented"] > 0 and g2["rx_gso"] == 0, (g1, g2)
    assert g2["tx_gso"] == 0 and g1["rx_gso"] == 0, (g1, g2)
    assert rig.fronts[1].stats["rx_errors"] == 0 and rig.fronts[1].stats["tx_gso"] == 0


def test_multi_queue_spreads_flows_over_rings_and_split_event_channels(rig: NetRig) -> None:
    """Two queues per vif (queue-N/ nodes, event-channel-tx/-rx each): parallel TCP flows land on both
    rings in both directions, and a one-queue guest talks to a two-queue one."""
    ns1, ns2 = rig.plug(1, queues=2), rig.plug(2, queues=2)
    g1, g2 = rig.guests
    for dom in (g1, g2):
        fe = f"/local/domain/{dom.domid}/device/vif/0"
        assert rig.xs.read(f"{fe}/multi-queue-num-queues") == b"2"
        for q in range(2):
            tx, rx = (int(rig.xs.read(f"{fe}/queue-{q}/event-channel-{d}")) for d in ("tx", "rx"))
            assert tx != rx
        assert not rig.xs.exists(f"{fe}/event-channel") and not rig.xs.exists(f"{fe}/tx-ring-ref")
    assert [f.queues for f in rig.fronts] == [2, 2]
    server = subprocess.Popen(["ip", "netns", "exec", ns2, "iperf3", "-s", "-1", "-B", "10.99.0.2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: "10.99.0.2:5201" in in_ns(ns2, "ss", "-ltn").stdout, 20, "iperf3 listening")
        res = in_ns(ns1, "iperf3", "-c", "10.99.0.2", "-t", "2", "-P", "16")   # 16 flows: all on one ring 2^-15
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        server.kill()
        server.wait()
    for dom in (g1, g2):
        queues = rig.server.vifs[(dom.domid, 0)].queues
        assert len(queues) == 2
        assert all(q.stats["tx_packets"] > 0 and q.stats["rx_packets"] > 0 for q in queues), \
            [q.stats for q in queues]
    stream(ns2, ns1, "10.99.0.1", os.urandom(4 << 20))


def test_a_one_queue_guest_and_a_two_queue_guest(rig: NetRig) -> None:
    ns1, ns2 = rig.plug(1, queues=1), rig.plug(2, queues=2)
    stream(ns1, ns2, "10.99.0.2", os.urandom(4 << 20))
    stream(ns2, ns1, "10.99.0.1", os.urandom(4 << 20))
    assert [f.queues for f in rig.fronts] == [1, 2]


def test_a_rate_limited_vif_sends_no_faster_than_its_credit(rig: NetRig) -> None:
    """rate = 2 MB per 100 ms (xl: 160Mb/s@100ms) on g1's vif: netback holds g1's packets on its ring
    while credit lasts; 8 MiB cannot cross in less than (8 MiB - one window) / rate, and arrive whole."""
    ns1, ns2 = rig.plug(1, rate="2000000,100000"), rig.plug(2)
    data = os.urandom(8 << 20)
    t0 = time.monotonic()
    stream(ns1, ns2, "10.99.0.2", data)
    elapsed = time.monotonic() - t0
    g1 = rig.server.vifs[(rig.guests[0].domid, 0)].stats()
    assert g1["tx_rate_waits"] > 0, g1
    # a lower bound only (a rate limit's correctness, not the machine's speed): slow hosts just take longer
    assert elapsed >= (len(data) - 2_000_000) / 20e6, elapsed
    g2 = rig.server.vifs[(rig.guests[1].domid, 0)].stats()
    assert g2["tx_rate_waits"] == 0, g2          # the limit is g1's alone: g2's ACKs were never held


def test_jumbo_frames_cross_in_several_slots(rig: NetRig) -> None:
    """MTU 9000: a frame needs three pages, so feature-sg chains (more_data) are exercised both ways."""
    ns1 = rig.plug(1, mtu=9000)
    rig.plug(2, mtu=9000)
    res = in_ns(ns1, "ping", "-c", "3", "-i", "0.2", "-W", "5", "-M", "do", "-s", "8900", "10.99.0.2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 received" in res.stdout


@pytest.fixture
def bridged(run_dir: str) -> Iterator[NetRig]:
    r = NetRig(run_dir, bridge=True)
    try:
        yield r
    finally:
        r.close()


def test_bridge_mode_carries_ping_and_a_byte_identical_stream(bridged: NetRig) -> None:
    """netback in bridge mode: each vif a TAP on a Linux bridge; the kernel bridge switches, GSO and blank
    checksums pass through the TAPs' virtio-net headers both ways."""
    ns1, ns2 = bridged.plug(1), bridged.plug(2)
    assert bridged.server.switch is None
    ports = subprocess.run(["ip", "-n", bridged.bridge_ns or "", "-o", "link", "show", "master", "xdombr0"],
                           capture_output=True, text=True, check=True).stdout
    for g in bridged.guests:
        assert f"vif{g.domid}.0" in ports and "LOWER_UP" in ports.split(f"vif{g.domid}.0")[1].split("\n")[0]
    for ns, peer in ((ns1, "10.99.0.2"), (ns2, "10.99.0.1")):
        res = in_ns(ns, "ping", "-c", "3", "-i", "0.2", "-W", "5", peer)
        assert res.returncode == 0, res.stdout + res.stderr
    stream(ns1, ns2, "10.99.0.2", os.urandom(16 << 20))
    sender, receiver = (bridged.server.vifs[(g.domid, 0)] for g in bridged.guests)
    assert sender.stats()["tx_gso"] > 0 and receiver.stats()["rx_gso"] > 0
    assert sender.uplink.stats["tap_out"] > 0 and receiver.uplink.stats["tap_in"] > 0


def test_bridge_mode_segments_for_a_frontend_without_offloads(bridged: NetRig) -> None:
    ns1, ns2 = bridged.plug(1), bridged.plug(2, offloads=False)
    stream(ns1, ns2, "10.99.0.2", os.urandom(4 << 20))
    stream(ns2, ns1, "10.99.0.1", os.urandom(4 << 20))
    assert bridged.server.vifs[(bridged.guests[1].domid, 0)].stats()["rx_gso"] == 0


def test_a_bridged_vif_without_a_tap_is_refused_alone(bridged: NetRig) -> None:
    """A vif whose TAP never came (a toolstack bug): that vif reports a hotplug error, others work."""
    ns1 = bridged.plug(1)
    bridged.plug(2)
    dom = bridged.guests[0]
    import xdom.backends.netback.server as server_mod
    old, server_mod.TAP_TIMEOUT = server_mod.TAP_TIMEOUT, 0.2
    try:
        be_path = f"/local/domain/{bridged.be.domid}/backend/vif/{dom.domid}/1"
        fe_path = f"/local/domain/{dom.domid}/device/vif/1"
        for k, v in {"frontend": fe_path, "frontend-id": dom.domid, "online": 1, "state": 1, "handle": 1}.items():
            bridged.xs.write(f"{be_path}/{k}", str(v))
        wait_until(lambda: bridged.xs.exists(f"{be_path}/hotplug-error"), 10, "the hotplug error")
        assert b"no TAP" in bridged.xs.read(f"{be_path}/hotplug-error")
    finally:
        server_mod.TAP_TIMEOUT = old
    res = in_ns(ns1, "ping", "-c", "2", "-i", "0.2", "-W", "5", "10.99.0.2")
    assert res.returncode == 0, res.stdout + res.stderr



def test_bridge_mode_frames_whose_headers_outrun_the_head_netback_copies(bridged: NetRig,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """In bridge mode netback copies only a frame's head to check it and writes the rest to the TAP from the
    guest's pages.  Headers longer than that head (here: any TCP/IP, with the head cut to 40 bytes) are
    checked in the whole frame instead; the stream still arrives intact, GSO and all."""
    import xdom.backends.netback.connection as connection
    monkeypatch.setattr(connection, "HEAD_COPY", 40)
    ns1, ns2 = bridged.plug(1), bridged.plug(2)
    stream(ns1, ns2, "10.99.0.2", os.urandom(8 << 20))
    assert bridged.server.vifs[(bridged.guests[0].domid, 0)].stats()["tx_gso"] > 0
