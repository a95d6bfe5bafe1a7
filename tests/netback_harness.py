"""The rig of netback's hostile tests: good guests pinging, a hostile frontend, a sniffer, crash detectors.

Every hostile test (tests/test_netback_hostile_*.py) runs a
:class:`~test_net_local.NetRig` (its own xenstored, an in-process
hypervisor, a :class:`NetbackServer`) with two *good* guests whose real
netfronts own TAP devices in network namespaces of their own, plus a
*hostile* frontend domain driven by hand (tests/hostile_vif.py): it does the
xenbus handshake with ring pages and an event channel of its own and writes
crafted slots straight into its TX and RX rings.  The toolstack's nodes
are written by :func:`xdom.deploy.vif.add_vif` (libxl's single transaction).

For each abuse netback must do what Linux ``xen-netback`` does: answer the
packet ``NETIF_RSP_ERROR`` and carry on (``xenvif_tx_err``), or close that
one vif (``xenvif_fatal_tx_err``; here: backend state Closing).  In every
case it must never crash, the good guests keep pinging each other during and
after the abuse, netback's loop keeps serving their vifs, every slot netback consumes is
answered exactly once, no response carries bytes netback did not mean to
write (a TX response is 4 bytes: the 8 request bytes after it in the slot
stay the frontend's; an RX request's padding overlaps the response's
``offset``, which must come back 0), the shared ring headers' padding stays
zero, every grant the hostile frontend gave is unmapped again once its vif is
closed, :meth:`NetbackServer.close` works and no ``netback-*`` thread
survives it.

A port of the test's own on netback's switch (:class:`Sniffer`) sees every
frame the switch floods, so the bytes a hostile packet delivers are checked
exactly.  Tests are parallel-safe: each has its own run directory, and the
namespaces are named after it.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from fake_frontend import req
from helpers import wait_until
from hostile_vif import EVIL_MAC, OK, WAIT, HostileVif, Ids, frame
from test_net_local import NetRig, in_ns
from xs_fixtures import introduce

from xdom.backends.netback.switch import Port
from xdom.deploy import netns
from xdom.deploy.vif import VifConfig, add_vif
from xdom.domains.netfront.device import Netfront
from xdom.domains.xenbus import XenbusState

NEEDS_ROOT_AND_PING = pytest.mark.skipif(
    netns.unavailable_reason() is not None or not shutil.which("ping"),
    reason="needs root, iproute2 and ping (make test installs them as root)")

GOOD_MACS = (bytes.fromhex("00163e000001"), bytes.fromhex("00163e000002"))   # g1, g2 (as NetRig.plug)
STALL_MS = 750.0              # the good pair's worst ping RTT during any abuse (idle: 1-2 ms; seen: < 160 ms)
GOOD_RTT_MS = 250.0           # ... while another guest is merely lazy (seen: < 10 ms)


# ---- crashes -----------------------------------------------------------------------------------

class CrashLog(logging.Handler):
    """Records what only a crash logs: a traceback (log.exception) or a failed watch callback."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or "watch callback failed" in record.getMessage():
            self.records.append(record)

    def summary(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}: {r.exc_info[1]!r}" if r.exc_info else r.getMessage()
                for r in self.records]


def netback_threads(prefix: str = "netback-") -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


def served(server: object, key: tuple[int, int]) -> bool:
    """Whether netback's loop is moving the packets of vif ``key`` (its connection is in the loop)."""
    vif = server.vifs.get(key)            # type: ignore[attr-defined]
    return vif is not None and vif.served


# ---- the good pair's traffic -----------------------------------------------------------------------

@dataclass
class PingResult:
    transmitted: int
    replied: set[int]                 # icmp_seq of every reply
    rtts: list[float]
    output: str

    @property
    def lost(self) -> list[int]:
        """Requests never answered although a later one was: the ones still in flight at SIGINT are not lost."""
        return sorted(set(range(1, max(self.replied, default=0))) - self.replied)


class PingLoad:
    """``ping -i 0.05`` from one good guest to the other, for as long as the abuse lasts."""

    def __init__(self, ns: str, peer: str, interval: float = 0.05) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "ping", "-n", "-i", str(interval), peer],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, name="ping-reader", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def replies(self) -> int:
        return sum("bytes from" in line for line in list(self.lines))

    def stop(self, min_replies: int = 5) -> PingResult:
        try:
            wait_until(lambda: self.replies() >= min_replies or self.proc.poll() is not None, WAIT,
                       f"{min_replies} ping replies")
        finally:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.reader.join(10)
        out = "".join(self.lines)
        m = re.search(r"(\d+) packets transmitted", out)
        assert m, f"no ping summary: {out[-500:]}"
        replied = {int(x) for x in re.findall(r"icmp_seq=(\d+) ", out)}
        rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", out)]
        return PingResult(int(m.group(1)), replied, rtts, out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(10)


BCAST = r"""
import socket, sys, time
n, gap = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
for i in range(n):
    try:
        s.sendto(b"bcast %06d " % i + bytes(64), ("10.99.0.255", 9))
    except OSError:
        pass
    if gap:
        time.sleep(gap)
"""


@contextmanager
def broadcasting(ns: str, count: int = 100_000, gap: float = 0.0002) -> Iterator[subprocess.Popen]:
    """A process in ``ns`` sending UDP broadcasts (flooded by the switch to every vif) until the block ends."""
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", BCAST, str(count), str(gap)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ---- the sniffer -----------------------------------------------------------------------------------

class Sniffer:
    """A port of the test's own on netback's switch: it is offered every frame the switch floods.

    It keeps the hostile guest's frames and the length of the longest frame
    of anyone's (drained often: the port holds at most PORT_QUEUE frames).
    """

    def __init__(self, rig: NetRig) -> None:
        self.switch = rig.server.switch
        self.port = Port("sniffer")
        self.switch.attach(self.port)
        self.frames: list[bytes] = []
        self.longest = 0

    def drain(self) -> list[bytes]:
        """The hostile guest's frames seen so far."""
        while True:
            taken = self.port.take()
            if taken is None:
                return self.frames
            f = taken.data
            self.longest = max(self.longest, len(f))
            if f[6:12] == EVIL_MAC:
                self.frames.append(f)

    def wait_for(self, frames: Sequence[bytes], timeout: float = WAIT) -> None:
        def seen() -> bool:
            got = self.drain()
            return all(f in got for f in frames)
        wait_until(seen, timeout, f"{len(frames)} frame(s) of the hostile guest at the sniffer")

    def close(self) -> None:
        self.switch.detach(self.port)
        self.port.close()



# ---- the rig -----------------------------------------------------------------------------------

class Env:
    """A NetRig with g1 and g2 plugged (pinging each other), a hostile domain and a sniffer."""

    def __init__(self, run_dir: str) -> None:
        self.crashes = CrashLog()
        logging.getLogger("xdom").addHandler(self.crashes)
        self.thread_errors: list[str] = []
        self._old_hook = threading.excepthook
        threading.excepthook = self._excepthook
        self.rig: NetRig | None = None
        self.sniffer: Sniffer | None = None
        self.hostiles: list[HostileVif] = []
        self.dead: list = []
        try:
            self.rig = NetRig(run_dir)
            self.ns1, self.ns2 = self.plug(1), self.plug(2)
            self.g1, self.g2 = self.rig.guests[0], self.rig.guests[1]
            self.evil = self.rig.hv.create_domain("evil", "8M")
            self.rig.guests.append(self.evil)          # NetRig.close() closes it and gives its memory back
            self.sniffer = Sniffer(self.rig)
            self.ping_both_ways()
        except BaseException:
            self.close()
            raise

    def plug(self, index: int) -> str:
        """NetRig.plug, but the toolstack's nodes written as libxl does: all in one transaction.

        (NetRig.plug writes the backend's nodes one by one before the
        frontend's: netback may see the frontend's state missing, go Closed
        and never hear of the device again.)
        """
        rig = self.rig
        assert rig is not None
        dom = rig.guests[index - 1]
        ns = netns.netns_name(f"g{index}", rig.run_dir)
        netns.create(ns)
        rig.namespaces.append(ns)
        mac = ":".join(f"{b:02x}" for b in GOOD_MACS[index - 1])
        for args in (["tuntap", "add", "dev", "eth0", "mode", "tap"], ["link", "set", "eth0", "address", mac],
                     ["addr", "add", f"10.99.0.{index}/24", "dev", "eth0"], ["link", "set", "eth0", "up"]):
            subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)
        introduce(rig.xs, rig.be.domid, dom.domid)
        add_vif(rig.xs, VifConfig(rig.be.domid, dom.domid, 0, mac))
        with netns.entered(ns):               # the TAP device is found by name in the caller's namespace
            front = Netfront(dom, rig.client(), 0, "eth0")
        rig.fronts.append(front)
        front.connect(WAIT)
        return ns

    def _excepthook(self, args: threading.ExceptHookArgs) -> None:
        self.thread_errors.append(f"{args.thread.name if args.thread else '?'}: {args.exc_type.__name__}: "
                                  f"{args.exc_value}")
        self._old_hook(args)

    @property
    def server(self):
        assert self.rig is not None
        return self.rig.server

    def hostile(self, devid: int = 0) -> HostileVif:
        h = HostileVif(self, devid)
        self.hostiles.append(h)
        return h

    def ping_both_ways(self, count: int = 3) -> None:
        for ns, peer in ((self.ns1, "10.99.0.2"), (self.ns2, "10.99.0.1")):
            # -w: wait for ``count`` replies (with -W alone ping gives up on late ones after two RTTs)
            res = in_ns(ns, "ping", "-n", "-c", str(count), "-i", "0.1", "-w", "15", peer, timeout=WAIT)
            assert res.returncode == 0 and f" {count} received" in res.stdout, res.stdout + res.stderr

    def dead_good_threads(self) -> list[str]:
        """The good vifs netback no longer serves (and its loop thread, if that died)."""
        dead = [f"vif{g.domid}.0" for g in (self.g1, self.g2) if not served(self.server, (g.domid, 0))]
        return dead + ([] if self.server.loop.alive else ["netback-loop"])

    @contextmanager
    def good_traffic(self, min_replies: int = 5, max_rtt_ms: float = STALL_MS) -> Iterator[None]:
        """Both good guests ping each other for the duration: no reply may go missing or come late."""
        loads = [PingLoad(self.ns1, "10.99.0.2"), PingLoad(self.ns2, "10.99.0.1")]
        try:
            yield
            results = [ld.stop(min_replies) for ld in loads]
        finally:
            for ld in loads:
                ld.kill()
        for r in results:
            assert len(r.replied) >= min_replies, r.output[-600:]
            assert not r.lost, f"good pair lost pings {r.lost}: {r.output[-600:]}"
            assert max(r.rtts) < max_rtt_ms, f"good pair slowed down: max RTT {max(r.rtts)} ms: {r.output[-600:]}"

    def assert_sane(self) -> None:
        assert not self.crashes.records, f"something crashed: {self.crashes.summary()}"
        assert not self.thread_errors, f"a thread died: {self.thread_errors}"
        assert not self.dead_good_threads(), f"good vif threads died: {self.dead_good_threads()}"
        for g in (self.g1, self.g2):
            assert self.server.vifs[(g.domid, 0)].conn is not None

    def sentinel(self, h: HostileVif, ids: Ids) -> None:
        """A well-formed packet after everything else: answered OKAY and delivered byte for byte."""
        _, ref = h.grant()
        f = frame(b"sentinel %d" % ids.next, 200)
        h.page(ref)[100:100 + len(f)] = f
        assert self.sniffer is not None
        self.sniffer.drain()                 # room in its queue
        h.tx_roundtrip([([req(ref, 100, 0, ids(), len(f))], OK)])
        self.sniffer.wait_for([f])

    def finish(self, h: HostileVif | None, ids: Ids | None = None, closed_by_backend: bool = False) -> None:
        """End of a test: the hostile vif answered (or was closed), the good pair is fine, the server closes."""
        if h is not None:
            if closed_by_backend:
                h.wait_backend(XenbusState.Closing)
                vif = self.server.vifs[h.key]
                wait_until(lambda: vif.conn is None, WAIT, "the hostile vif's connection to go")
                wait_until(lambda: not served(self.server, h.key), WAIT, "the loop to let the hostile vif go")
                h.assert_unmapped()
            else:
                assert h.backend_state() == XenbusState.Connected
                assert served(self.server, h.key)
                if ids is not None:
                    self.sentinel(h, ids)
            h.check_ring_headers()
        self.assert_sane()
        self.ping_both_ways()
        for x in self.hostiles:
            x.close()
        self.assert_sane()
        # NetbackServer.close() works and leaves no thread behind
        done = threading.Event()
        errors: list[BaseException] = []

        def close() -> None:
            try:
                self.server.close()
            except BaseException as e:
                errors.append(e)
            done.set()
        t = threading.Thread(target=close, name="test-server-close", daemon=True)
        t.start()
        assert done.wait(WAIT), "NetbackServer.close() hangs"
        assert not errors, f"NetbackServer.close() failed: {errors[0]!r}"
        assert self.server.vifs == {}
        left = [t.name for t in netback_threads()]
        assert not left, f"netback threads left after close: {left}"
        assert not self.crashes.records, f"something crashed: {self.crashes.summary()}"

    def close(self) -> None:
        try:
            if self.sniffer is not None:
                self.sniffer.close()
            if self.rig is not None:
                for h in self.dead:             # already destroyed by the test: memory only
                    if h in self.rig.guests:
                        self.rig.guests.remove(h)
                self.rig.close()
                for h in self.dead:
                    h.memory.close()
        finally:
            threading.excepthook = self._old_hook
            logging.getLogger("xdom").removeHandler(self.crashes)



def hostile_env(run_dir: str) -> Iterator[Env]:
    """What each hostile test module's ``env`` fixture yields: an :class:`Env`, closed whatever the test did."""
    e = Env(run_dir)
    try:
        yield e
    finally:
        e.close()
