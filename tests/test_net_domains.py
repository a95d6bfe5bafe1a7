"""Networking end to end: a supervised host with a netback domain and two guests in their own namespaces.

Real programs run in the guests' namespaces (ping, iperf3, Python sockets)
and their frames cross netfront, the PV rings and netback's switch (builtin
or a Linux bridge in netback's namespace): pings both ways, a five-second
iperf3 run, 64 MiB streams checked by sha256, jumbo frames and a guest whose
MTU is smaller than its peer's, TCP super-frames (GSO) seen arriving whole
on the receiving guest's TAP, a vif detached while it carries a TCP stream
and attached again; a netback killed with SIGKILL comes back and a running
ping resumes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from helpers import wait_until
from test_net_local import stream
from test_supervisor import Host, assert_nothing_left

from xdom.deploy import netns

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(netns.unavailable_reason() is not None or not shutil.which("ping")
                                 or not shutil.which("iperf3"),
                                 reason="needs root, iproute2, ping and iperf3 (make test installs them as root)")]

TOPOLOGY = '''[[domain]]
name = "xs"
kind = "xenstored"
[[domain]]
name = "net0"
kind = "netback"
restart_backoff = 0.1
[[domain]]
name = "g1"
kind = "guest"
memory = "16M"
vif = ["mac=00:16:3e:00:00:01, backend=net0, ip=10.77.0.1/24"]
[[domain]]
name = "g2"
kind = "guest"
memory = "16M"
vif = ["mac=00:16:3e:00:00:02, backend=net0, ip=10.77.0.2/24, mtu=9000"]
'''


SWITCHES = pytest.mark.parametrize("switch", ["builtin", "bridge"])


def topology(switch: str, *mtus: int) -> str:
    """xenstored, a netback net0 with ``switch``, and per MTU a guest gN (10.77.0.N/24)."""
    text = ('[[domain]]\nname = "xs"\nkind = "xenstored"\n'
            f'[[domain]]\nname = "net0"\nkind = "netback"\nrestart_backoff = 0.1\nswitch = "{switch}"\n')
    for n, mtu in enumerate(mtus, 1):
        text += (f'[[domain]]\nname = "g{n}"\nkind = "guest"\nmemory = "16M"\n'
                 f'vif = ["mac=00:16:3e:00:00:0{n}, backend=net0, ip=10.77.0.{n}/24, mtu={mtu}"]\n')
    return text


def in_ns(ns: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout)


# Watches one interface of a guest for IPv4 frames coming in (PACKET_HOST, not those it sends) longer than a
# limit, and prints each one's length with the GSO type and size of the virtio-net header the kernel gives a
# packet socket with PACKET_VNET_HDR, as JSON: up to the first that is GSO ("first"), or until it has been idle
# for a while ("all").  The guest's TAP has no NAPI, so its kernel does no GRO: a frame longer than an MTU coming
# in there is a super-frame netfront wrote whole, as it came off the ring from netback.
FRAMES = r"""
import json, socket, struct, sys
ifname, longer_than, idle, first = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "first"
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.setsockopt(263, 15, 1)                    # SOL_PACKET, PACKET_VNET_HDR
s.bind((ifname, 0))
s.settimeout(idle)
print("ready", flush=True)
seen = []
try:
    while True:
        b, addr = s.recvfrom(1 << 17)
        if addr[2] == 0 and len(b) - 10 > longer_than:          # PACKET_HOST; 10 bytes of virtio_net_hdr
            _flags, gso_type, _hdr_len, gso_size = struct.unpack_from("=BBHH", b)
            seen.append((len(b) - 10, gso_type, gso_size))
            if first and gso_type:
                break
except TimeoutError:
    pass
print(json.dumps(seen), flush=True)
"""
VIRTIO_NET_HDR_GSO_TCPV4 = 1


@contextlib.contextmanager
def frames_watch(ns: str, longer_than: int = 1514, first: bool = True, idle: float = 10.0
                 ) -> Iterator[Callable[[], list[tuple[int, int, int]]]]:
    """Watch eth0 in ``ns`` for frames coming in longer than ``longer_than`` bytes while the body runs traffic;
    the function yielded returns them as (length, virtio GSO type, GSO size), up to the first GSO one."""
    watch = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", FRAMES, "eth0", str(longer_than),
                              str(idle), "first" if first else "all"], stdout=subprocess.PIPE, text=True)
    try:
        assert watch.stdout is not None and watch.stdout.readline().strip() == "ready"

        def seen() -> list[tuple[int, int, int]]:
            out, _ = watch.communicate(timeout=60)
            return [tuple(f) for f in json.loads(out)]
        yield seen
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()


def assert_superframe(frames: list[tuple[int, int, int]], longer_than: int, mss: tuple[int, int]) -> None:
    """A TCPv4 super-frame longer than ``longer_than`` came in, of segments within ``mss``, and nothing that long
    without GSO before it (a frame longer than the receiver's MTU must be one to be segmented)."""
    assert frames and frames[-1][1] == VIRTIO_NET_HDR_GSO_TCPV4, \
        f"no TCP super-frame longer than {longer_than} bytes came in: {frames[-5:]}"
    assert all(gso_type == VIRTIO_NET_HDR_GSO_TCPV4 for _, gso_type, _ in frames), frames
    length, _, gso_size = frames[-1]
    assert length > longer_than and mss[0] < gso_size <= mss[1], frames[-1]


def iperf3(client_ns: str, server_ns: str, server_ip: str, *args: str) -> dict:
    """One iperf3 client run against a one-off server; its JSON report."""
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", server_ip],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            res = in_ns(client_ns, "iperf3", "-c", server_ip, "-J", *args, timeout=90)
            if "Connection refused" not in res.stdout + res.stderr:
                break
            time.sleep(0.05)            # the server is still binding
        assert res.returncode == 0, res.stdout[-500:] + res.stderr
        server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    report = json.loads(res.stdout)
    assert "error" not in report, report["error"]
    return report


def test_guests_talk_through_netback_and_survive_its_restart(run_dir: str) -> None:
    with Host(run_dir, TOPOLOGY) as h:
        ps = h.ps()
        ns1, ns2 = ps["g1"]["netns"], ps["g2"]["netns"]
        assert ps["g1"]["devices"] == [{"type": "vif", "devid": 0, "ifname": "eth0", "mac": "00:16:3e:00:00:01",
                                         "backend": "net0", "ip": "10.77.0.1/24", "mtu": 1500,
                                         "export_kind": "tap", "export": None}]
        link = in_ns(ns2, "ip", "-o", "link", "show", "eth0")
        assert "mtu 9000" in link.stdout and "00:16:3e:00:00:02" in link.stdout
        for ns, peer in ((ns1, "10.77.0.2"), (ns2, "10.77.0.1")):
            res = in_ns(ns, "ping", "-c", "3", "-i", "0.2", "-W", "5", peer)
            assert res.returncode == 0, res.stdout + res.stderr

        # iperf3 TCP for five seconds; g1's kernel hands netfront super-frames (its TAP has a vnet header and
        # TSO), and they reach g2's TAP whole: over both rings and netback without being segmented
        for ns in (ns1, ns2):
            assert "vnet_hdr on" in subprocess.run(["ip", "-n", ns, "-d", "link", "show", "eth0"],
                                                   capture_output=True, text=True, timeout=30).stdout
        with frames_watch(ns2) as seen:
            report = iperf3(ns1, ns2, "10.77.0.2", "-t", "5")
            frames = seen()
        assert report["start"]["test_start"]["duration"] == 5
        received = report["end"]["sum_received"]
        assert received["bytes"] > 0 and received["seconds"] > 0, received
        # g1's MTU is 1500: one segment is at most 1460 bytes of TCP, the super-frame several of them
        assert_superframe(frames, 1514, (0, 1460))

        # a ping running across a kill -9 of netback: replies before the kill, and again after the restart
        ping = subprocess.Popen(["ip", "netns", "exec", ns1, "ping", "-c", "40", "-i", "0.2", "-W", "1",
                                 "10.77.0.2"], stdout=subprocess.PIPE, text=True)
        replies: list[int] = []          # icmp_seq of each reply, as ping prints it (one line per reply)

        def read() -> None:
            assert ping.stdout is not None
            for line in ping.stdout:
                if "icmp_seq=" in line and " from " in line:
                    replies.append(int(line.split("icmp_seq=")[1].split()[0]))
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            wait_until(lambda: len(replies) >= 3, 30, "ping replies before the kill")
            before_kill = list(replies)
            os.kill(ps["net0"]["pid"], signal.SIGKILL)
            r = h.wait("net0", "restarted", state="running", generation=2)
            assert r["domid"] == ps["net0"]["domid"]
            seen_at_restart = len(replies)
            ping.wait(60)
        finally:
            if ping.poll() is None:
                ping.kill()
                ping.wait()
            reader.join(10)
        after = replies[seen_at_restart:]
        assert before_kill and after, (before_kill, replies)     # replies came back after the restart
        assert after[-1] >= 35 and after[0] > before_kill[-1], replies
        assert h.row("g1")["generation"] == 1 and h.row("g2")["generation"] == 1
        with open(h.layout.log_path("g1")) as log:
            assert "came back: reconnecting" in log.read()
        layout = h.layout
    assert_nothing_left(layout)
    assert not netns.exists(ns1) and not netns.exists(ns2)


def test_netback_restarted_while_a_guest_of_it_is_dead_comes_up_at_once(run_dir: str,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """net0 restarts while g1 waits out a restart backoff: xenstored refuses g1's vif nodes then (its owner
    does not exist), which must not hold net0's own set-up until its ready deadline; g2 talks again at once,
    and g1's own restart writes its vif and talks too."""
    slow = TOPOLOGY.replace('name = "g1"\nkind = "guest"\n', 'name = "g1"\nkind = "guest"\nrestart = "always"\nrestart_backoff = 8\n')
    assert slow != TOPOLOGY
    caplog.set_level(logging.INFO, logger="xdom")
    with Host(run_dir, slow) as h:
        ps = h.ps()
        ns2 = ps["g2"]["netns"]
        os.kill(ps["g1"]["pid"], signal.SIGKILL)
        g1 = h.wait("g1", "restarted at once", state="running", generation=2)
        os.kill(g1["pid"], signal.SIGKILL)              # the second kill within the window waits 8 s
        h.wait("g1", "dead, waiting out its backoff", state=lambda s: s != "running")
        os.kill(ps["net0"]["pid"], signal.SIGKILL)
        h.wait("net0", "back while g1 is dead", timeout=7.0, state="running", generation=2)
        assert h.row("g1")["generation"] == 2 and h.row("g1")["state"] != "running", h.row("g1")
        g1 = h.wait("g1", "back after its backoff", timeout=30.0, state="running", generation=3)
        ns1 = g1["netns"]
        wait_until(lambda: in_ns(ns1, "ping", "-c", "1", "-W", "1", "10.77.0.2").returncode == 0, 30,
                   "g1 reaching g2 through the restarted netback")
        res = in_ns(ns2, "ping", "-c", "3", "-i", "0.2", "-W", "5", "10.77.0.1")
        assert res.returncode == 0, res.stdout + res.stderr
        assert h.row("g2")["generation"] == 1
    assert "eth0's nodes wait for g1" in caplog.text          # the case happened: g1 was dead at net0's set-up
    assert "xenstore set-up failed" not in caplog.text


def xdom(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdom.deploy.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_network_attach_and_detach_while_traffic_flows(run_dir: str) -> None:
    with Host(run_dir, TOPOLOGY) as h:
        run = ["--run-dir", h.layout.run_dir]
        ps = h.ps()
        ns1, ns2 = ps["g1"]["netns"], ps["g2"]["netns"]
        ping = subprocess.Popen(["ip", "netns", "exec", ns1, "ping", "-c", "30", "-i", "0.2", "-W", "2",
                                 "10.77.0.2"], stdout=subprocess.PIPE, text=True)
        try:
            for name, ip in (("g1", "10.78.0.1/24"), ("g2", "10.78.0.2/24")):
                res = xdom("network-attach", name, f"backend=net0, ip={ip}", *run)
                assert res.returncode == 0, res.stderr
                assert "eth1" in res.stdout
            listing = xdom("network-list", "g1", *run)
            assert listing.returncode == 0 and "eth1" in listing.stdout and "10.78.0.1/24" in listing.stdout
            try:
                wait_until(lambda: in_ns(ns1, "ping", "-c", "1", "-W", "1", "10.78.0.2").returncode == 0, 60,
                           "a ping over the hot-attached vifs")
            except AssertionError:
                logs = {n: open(h.layout.log_path(n)).read()[-3000:] for n in ("g1", "g2", "net0")}
                links = {ns: in_ns(ns, "ip", "-o", "addr").stdout for ns in (ns1, ns2)}
                raise AssertionError(f"no ping over eth1; links {links}; logs {logs}") from None
            assert "eth1" in in_ns(ns2, "ip", "-o", "link").stdout
            # a MAC in use, or a backend that is not a netback, is refused
            dup = xdom("network-attach", "g1", "mac=00:16:3e:00:00:02, backend=net0", *run)
            assert dup.returncode == 1 and "already in use" in dup.stderr
            bad = xdom("network-attach", "g1", "backend=xs", *run)
            assert bad.returncode == 1 and "not a netback domain" in bad.stderr

            res = xdom("network-detach", "g2", "1", *run)
            assert res.returncode == 0, res.stderr
            assert "did not confirm" not in res.stdout
            assert "eth1" not in in_ns(ns2, "ip", "-o", "link").stdout
            assert in_ns(ns1, "ping", "-c", "1", "-W", "1", "10.78.0.2").returncode != 0
            assert [d["devid"] for d in h.row("g2")["devices"]] == [0]
            out, _ = ping.communicate(timeout=60)
        finally:
            if ping.poll() is None:
                ping.kill()
                ping.communicate()
        # the ping on eth0 ran undisturbed through all of it
        assert "30 received" in out, out


@SWITCHES
def test_64_mib_streams_arrive_byte_identical_both_ways(run_dir: str, switch: str) -> None:
    """64 MiB each way over one TCP connection, sha256 of what was sent against sha256 of what arrived,
    with the receiver's TAP seen taking super-frames that crossed netback whole."""
    with Host(run_dir, topology(switch, 1500, 1500)) as h:
        ps = h.ps()
        assert ps["net0"]["switch"] == switch
        ns1, ns2 = ps["g1"]["netns"], ps["g2"]["netns"]
        with frames_watch(ns2) as seen:
            stream(ns1, ns2, "10.77.0.2", os.urandom(64 << 20))
            assert_superframe(seen(), 1514, (0, 1460))
        stream(ns2, ns1, "10.77.0.1", os.urandom(64 << 20))
        assert all(h.row(n)["generation"] == 1 for n in ("net0", "g1", "g2"))


def ping_big(ns: str, peer: str, size: int, count: int = 3, wait: int = 5) -> subprocess.CompletedProcess[str]:
    """``size`` bytes of ICMP payload with Don't Fragment: one IP packet of size + 28 bytes, or none."""
    return in_ns(ns, "ping", "-M", "do", "-s", str(size), "-c", str(count), "-i", "0.2", "-W", str(wait), peer)


@SWITCHES
def test_jumbo_frames_and_a_guest_with_a_smaller_mtu(run_dir: str, switch: str) -> None:
    """g1 and g2 at MTU 9000 exchange 8928-byte packets unfragmented, each in several ring slots; g3 at MTU
    1500 gets no such packet from g1 (it is dropped, not fragmented), yet TCP between g1 and g3 works, each
    side sending segments no larger than the other's MSS."""
    with Host(run_dir, topology(switch, 9000, 9000, 1500)) as h:
        ps = h.ps()
        ns1, ns2, ns3 = (ps[g]["netns"] for g in ("g1", "g2", "g3"))
        for ns, mtu in ((ns1, 9000), (ns2, 9000), (ns3, 1500)):
            assert f" mtu {mtu} " in in_ns(ns, "ip", "-o", "link", "show", "eth0").stdout
        for ns, peer in ((ns1, "10.77.0.2"), (ns2, "10.77.0.1")):
            res = ping_big(ns, peer, 8900)
            assert res.returncode == 0 and ", 3 received" in res.stdout, res.stdout + res.stderr
            assert "8908 bytes from" in res.stdout, res.stdout                # one reply of 8900 + ICMP header

        # TCP between the jumbo guests: super-frames of 8948-byte segments (9000 less IP, TCP and timestamps)
        with frames_watch(ns2, longer_than=9014) as seen:
            stream(ns1, ns2, "10.77.0.2", os.urandom(16 << 20))
            assert_superframe(seen(), 9014, (1460, 8960))

        # g3 answers the largest packet its MTU takes, from either side, and nothing larger
        for ns, peer in ((ns1, "10.77.0.3"), (ns3, "10.77.0.1")):
            res = ping_big(ns, peer, 1472)
            assert res.returncode == 0 and ", 3 received" in res.stdout, res.stdout + res.stderr
        res = ping_big(ns1, "10.77.0.3", 8900, count=2, wait=2)
        assert res.returncode == 1 and "\n2 packets transmitted, 0 received" in res.stdout, res.stdout + res.stderr
        assert "bytes from" not in res.stdout, res.stdout          # no reply, nor an error from anyone
        res = ping_big(ns3, "10.77.0.1", 8900, count=1)             # g3 cannot send one at all
        assert res.returncode != 0 and "message too long, mtu=1500" in res.stderr, res.stdout + res.stderr

        # TCP both ways between MTU 9000 and MTU 1500: MSS negotiation keeps every segment within 1500
        with frames_watch(ns3) as seen:
            stream(ns1, ns3, "10.77.0.3", os.urandom(16 << 20))
            assert_superframe(seen(), 1514, (0, 1460))
        stream(ns3, ns1, "10.77.0.1", os.urandom(16 << 20))
        # and the jumbo path still works after all of that
        res = ping_big(ns2, "10.77.0.1", 8900, count=1)
        assert res.returncode == 0, res.stdout + res.stderr
        assert all(h.row(n)["generation"] == 1 for n in ("net0", "g1", "g2", "g3"))


class PingWatch:
    """``ping -i 0.1`` from ``ns`` to ``peer`` until stopped, noting the icmp_seq of every reply."""

    def __init__(self, ns: str, peer: str) -> None:
        self.replies: list[int] = []
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "ping", "-i", "0.1", "-W", "5", peer],
                                     stdout=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "icmp_seq=" in line and " from " in line:
                self.replies.append(int(line.split("icmp_seq=")[1].split()[0]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.reader.join(10)


class Iperf3Stream:
    """An iperf3 TCP run from ``client_ns`` to ``server_ip`` for up to a minute, its progress line by line."""

    def __init__(self, client_ns: str, server_ns: str, server_ip: str) -> None:
        self.intervals: list[str] = []
        self.server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", server_ip],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client: subprocess.Popen[str] | None = None
        self.server_ip, self.client_ns = server_ip, client_ns

    def start(self) -> None:
        def connect() -> bool:
            self.client = subprocess.Popen(
                ["ip", "netns", "exec", self.client_ns, "iperf3", "-c", self.server_ip, "-t", "60", "-i", "0.2",
                 "--forceflush"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert self.client.stdout is not None
            for line in self.client.stdout:
                if "Connection refused" in line:
                    self.client.wait()
                    return False                 # the server is still binding
                if " sec " in line and "bits/sec" in line:
                    self.intervals.append(line)
                    threading.Thread(target=self._read, daemon=True).start()
                    return True
            raise AssertionError(f"iperf3 ended before its first interval: {self.client.wait()}")
        wait_until(connect, 30, "an iperf3 client connected", interval=0.05)

    def _read(self) -> None:
        assert self.client is not None and self.client.stdout is not None
        for line in self.client.stdout:
            if " sec " in line and "bits/sec" in line:
                self.intervals.append(line)

    def stop(self) -> None:
        for p in (self.client, self.server):
            if p is not None:
                if p.poll() is None:
                    p.kill()
                p.wait()


@SWITCHES
def test_detaching_a_vif_that_carries_a_tcp_stream(run_dir: str, switch: str) -> None:
    """g1's hot-attached eth1 is detached while an iperf3 stream runs over it: the detach completes cleanly,
    g1, g2 and netback go on in the same processes, a ping over eth0 loses nothing, eth1 leaves g1's
    namespace; attached again, the new eth1 carries a byte-identical stream."""
    with Host(run_dir, topology(switch, 1500, 1500)) as h:
        run = ["--run-dir", h.layout.run_dir]
        before = h.ps()
        ns1, ns2 = before["g1"]["netns"], before["g2"]["netns"]
        for name, ip in (("g1", "10.78.0.1/24"), ("g2", "10.78.0.2/24")):
            res = xdom("network-attach", name, f"backend=net0, ip={ip}", *run)
            assert res.returncode == 0 and "eth1" in res.stdout, res.stdout + res.stderr
        wait_until(lambda: in_ns(ns1, "ping", "-c", "1", "-W", "1", "10.78.0.2").returncode == 0, 60,
                   "a ping over the hot-attached vifs")
        old_eth1 = json.loads(subprocess.run(["ip", "-n", ns1, "-j", "link", "show", "eth1"], capture_output=True,
                                             text=True, timeout=30).stdout)[0]["ifindex"]

        eth0 = PingWatch(ns1, "10.77.0.2")
        traffic = Iperf3Stream(ns1, ns2, "10.78.0.2")
        try:
            traffic.start()
            wait_until(lambda: len(traffic.intervals) >= 3 and len(eth0.replies) >= 3, 30,
                       "iperf3 over eth1 and a ping over eth0 under way")
            assert not any(" 0.00 Bytes " in line for line in traffic.intervals[:3]), traffic.intervals

            res = xdom("network-detach", "g1", "1", *run)
            assert res.returncode == 0, res.stdout + res.stderr
            assert "did not confirm" not in res.stdout, res.stdout          # netback closed the busy vif
            assert "eth1" not in in_ns(ns1, "ip", "-o", "link").stdout
            assert "eth1" in in_ns(ns2, "ip", "-o", "link").stdout
            assert [d["devid"] for d in h.row("g1")["devices"]] == [0]
            assert [(v["frontend"], v["devid"]) for v in h.row("net0")["vifs"]] == \
                [("g1", 0), ("g2", 0), ("g2", 1)]
            traffic.stop()

            # the same processes, running, none restarted
            after = h.ps()
            for name in ("net0", "g1", "g2"):
                assert (after[name]["state"], after[name]["pid"], after[name]["generation"]) == \
                    ("running", before[name]["pid"], 1), (name, after[name])
            for name in ("net0", "g1"):
                with open(h.layout.log_path(name)) as log:
                    assert "Traceback" not in log.read(), name

            # attached again: a new eth1 in g1's namespace, and traffic over it
            res = xdom("network-attach", "g1", "backend=net0, ip=10.78.0.1/24", *run)
            assert res.returncode == 0 and "eth1" in res.stdout, res.stdout + res.stderr
            wait_until(lambda: in_ns(ns1, "ping", "-c", "1", "-W", "1", "10.78.0.2").returncode == 0, 60,
                       "a ping over the re-attached vif")
            new_eth1 = json.loads(subprocess.run(["ip", "-n", ns1, "-j", "link", "show", "eth1"],
                                                 capture_output=True, text=True, timeout=30).stdout)[0]["ifindex"]
            assert new_eth1 != old_eth1
            stream(ns1, ns2, "10.78.0.2", os.urandom(8 << 20))

            # eth0's ping went on throughout: answered after all of that, and every request up to then
            done = max(eth0.replies)
            last = wait_until(lambda: max(eth0.replies) > done and max(eth0.replies), 10, "a ping after it all")
            wait_until(lambda: set(range(1, last + 1)) <= set(eth0.replies), 10,
                       "a reply to every ping sent over eth0")
        finally:
            traffic.stop()
            eth0.stop()
        assert all(h.row(n)["pid"] == before[n]["pid"] for n in ("net0", "g1", "g2"))


# Request and answer: g1 writes 2896 bytes (two 1448-byte segments at MTU 1500) and waits for one byte back,
# so that each write leaves g1's kernel alone, as a 2962-byte TCP super-frame (GSO, two segments).
SMALL_SINK = r"""
import socket, sys
s = socket.create_server((sys.argv[1], 5002)); print("ready", flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); n = 0
while b := c.recv(1 << 16):
    n += len(b)
    while n >= 2896:
        n -= 2896; c.sendall(b"k")
print("done", flush=True)
"""
SMALL_SENDER = r"""
import os, socket, sys
c = socket.create_connection((sys.argv[1], 5002), timeout=30); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range(20):
    c.sendall(os.urandom(2896)); assert c.recv(1) == b"k"
c.close()
"""


def test_a_super_frame_that_fits_one_ring_slot_keeps_its_gso(run_dir: str) -> None:
    """A two-segment super-frame (2962 bytes) fits one page: one data slot without NETRXF_more_data, then its
    GSO extra slot.  netfront must read that slot before it completes the packet (it once did not, and such a
    frame reached the guest as one oversized frame without GSO)."""
    with Host(run_dir, topology("builtin", 1500, 1500)) as h:
        ps = h.ps()
        ns1, ns2 = ps["g1"]["netns"], ps["g2"]["netns"]
        with frames_watch(ns2, first=False, idle=2.0) as seen:
            sink = subprocess.Popen(["ip", "netns", "exec", ns2, sys.executable, "-c", SMALL_SINK, "10.77.0.2"],
                                    stdout=subprocess.PIPE, text=True)
            try:
                assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
                res = in_ns(ns1, sys.executable, "-c", SMALL_SENDER, "10.77.0.2")
                assert res.returncode == 0, res.stderr
                assert sink.communicate(timeout=30)[0].strip() == "done"
            finally:
                if sink.poll() is None:
                    sink.kill()
                    sink.communicate()
            frames = seen()
        # each of the 20 writes came in longer than one 1514-byte frame: the 2962 bytes of two segments
        assert len(frames) >= 1 and all(length == 2962 for length, _, _ in frames), frames
        assert all(gso_type == VIRTIO_NET_HDR_GSO_TCPV4 and gso_size == 1448 for _, gso_type, gso_size in frames), \
            f"super-frames on a 1500-byte MTU without GSO: {frames}"
