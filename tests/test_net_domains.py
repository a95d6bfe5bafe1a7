"""Networking end to end: a supervised host with a netback domain and two guests in their own namespaces.

Real programs run in the guests' namespaces (ping, iperf3) and their frames
cross netfront, the PV rings and netback's switch; a netback killed with
SIGKILL comes back and a running ping resumes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from test_supervisor import Host, assert_nothing_left
from xdom.deploy import netns
from helpers import wait_until

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


def in_ns(ns: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout)


def test_guests_talk_through_netback_and_survive_its_restart(run_dir: str) -> None:
    with Host(run_dir, TOPOLOGY) as h:
        ps = h.ps()
        ns1, ns2 = ps["g1"]["netns"], ps["g2"]["netns"]
        assert ps["g1"]["devices"] == [{"type": "vif", "devid": 0, "ifname": "eth0", "mac": "00:16:3e:00:00:01",
                                         "backend": "net0", "ip": "10.77.0.1/24", "mtu": 1500}]
        link = in_ns(ns2, "ip", "-o", "link", "show", "eth0")
        assert "mtu 9000" in link.stdout and "00:16:3e:00:00:02" in link.stdout
        for ns, peer in ((ns1, "10.77.0.2"), (ns2, "10.77.0.1")):
            res = in_ns(ns, "ping", "-c", "3", "-i", "0.2", "-W", "5", peer)
            assert res.returncode == 0, res.stdout + res.stderr

        # iperf3 TCP for a few seconds
        server = subprocess.Popen(["ip", "netns", "exec", ns2, "iperf3", "-s", "-1", "-B", "10.77.0.2"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                res = in_ns(ns1, "iperf3", "-c", "10.77.0.2", "-t", "2", "-J", timeout=60)
                if "Connection refused" not in res.stdout + res.stderr:
                    break
                time.sleep(0.05)            # the server is still binding
            assert res.returncode == 0, res.stdout[-500:] + res.stderr
            assert '"bits_per_second"' in res.stdout
            server.wait(30)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()

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
