"""Hostile frontends against netback over live rings (Linux xen-netback semantics).

Every test runs a :class:`~test_net_local.NetRig` (its own xenstored, an
in-process hypervisor, a :class:`NetbackServer`) with two *good* guests whose
real netfronts own TAP devices in network namespaces of their own, plus a
*hostile* frontend domain driven by hand from this file: it does the xenbus
handshake with ring pages and an event channel of its own and writes
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
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from helpers import wait_until
from test_net_local import NetRig, in_ns
from xs_fixtures import introduce

from xdom.backends.netback.switch import PORT_QUEUE, Port
from xdom.backends.netback.tx import TxDrop, TxFatal, TxMulticast, TxPacket, TxProcessor
from xdom.deploy import netns
from xdom.deploy.vif import VifConfig, add_vif
from xdom.domains.abi.grant_table import GTF_permit_access, GTF_reading, GTF_type_mask, GTF_writing
from xdom.domains.abi.netif import (
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    RX_SLOT_SIZE,
    TX_SLOT_SIZE,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_GSO_TYPE_TCPV4,
    ExtraInfo,
    GsoInfo,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    NETTXF_more_data,
    TxRequest,
    TxResponse,
    gso_extra,
    hash_extra,
    mcast_extra,
    pack_extra_info,
    pack_tx_request,
    parse_extra_info,
    parse_rx_response,
    parse_tx_response,
    rx_shared_ring,
    tx_shared_ring,
)
from xdom.domains.abi.ring import RING_HEADER_SIZE, FrontRing
from xdom.domains.frame_pool import FramePool
from xdom.domains.netfront.device import Netfront
from xdom.domains.xenbus import XenbusState, read_state

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(netns.unavailable_reason() is not None or not shutil.which("ping"),
                                 reason="needs root, iproute2 and ping (make test installs them as root)")]

PAGE = 4096
WAIT = 20.0                   # generous (loaded CI): every wait is a deadline, never a sleep before an assertion
M32 = 0xFFFFFFFF
_REQ_PROD, _REQ_EVENT, _RSP_PROD, _RSP_EVENT = 0, 4, 8, 12
OK, ERR, NULL = NETIF_RSP_OKAY, NETIF_RSP_ERROR, NETIF_RSP_NULL
MORE, EXTRA, CSUM, VALID = NETTXF_more_data, NETTXF_extra_info, NETTXF_csum_blank, NETTXF_data_validated
EVIL_MAC = bytes.fromhex("00163e0000ee")
GOOD_MACS = (bytes.fromhex("00163e000001"), bytes.fromhex("00163e000002"))   # g1, g2 (as NetRig.plug)
FLOOD_DST = bytes.fromhex("02000000ab01")    # a unicast address nobody has: the switch floods it to every port
# Frames addressed to the hostile guest itself: the switch learns EVIL_MAC on its port and delivers them nowhere.
# Tests that push thousands of frames use it, or the flood would fill the good guests' port queues (a broadcast
# storm drops the good pair's frames there: a separate matter from the abuse under test).
SELF_DST = EVIL_MAC
ETHERTYPE = b"\x88\xb5"                       # IEEE local experimental: no stack in the guests acts on it
MAX_FRAME = 1500 + 14 + 4                     # MTU + Ethernet header + VLAN tag: what Linux lets through
RX_PAD = 0xA5A5                               # an RX request's padding: overlaps the response's offset
STALL_MS = 750.0              # the good pair's worst ping RTT during any abuse (idle: 1-2 ms; seen: < 160 ms)
GOOD_RTT_MS = 250.0           # ... while another guest is merely lazy (seen: < 10 ms)


# ---- frames and slots ------------------------------------------------------------------------------

def frame(tag: bytes, length: int = 96, dst: bytes = FLOOD_DST, src: bytes = EVIL_MAC) -> bytes:
    """An Ethernet frame of ``length`` bytes carrying ``tag`` (make it unique: the sniffer looks for it)."""
    head = dst + src + ETHERTYPE + tag
    body = bytes((i * 7 + len(tag)) & 0xFF for i in range(max(0, length - len(head))))
    return (head + body)[:length]


def naive_sum(data: bytes) -> int:
    """One's-complement sum of 16-bit big-endian words, the textbook loop (independent of xdom.domains.packet)."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


def tcp_frame(tag: bytes, length: int = 100, dst: bytes = FLOOD_DST, src: bytes = EVIL_MAC) -> bytes:
    """An Ethernet/IPv4/TCP frame carrying ``tag``, its TCP checksum field holding the pseudo-header sum
    (what a GSO or csum_blank packet carries: the rest is left to offload)."""
    payload_len = length - 14 - 20 - 20
    tcp_len = 20 + payload_len
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 1, 0x4000, 64, 6, 0,
                               bytes([10, 99, 0, 9]), bytes([10, 99, 0, 8])))
    ip[10:12] = (~naive_sum(bytes(ip)) & 0xFFFF).to_bytes(2, "big")
    pseudo = naive_sum(bytes(ip[12:20]) + struct.pack("!xBH", 6, tcp_len))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 1000, 0, 5 << 4, 0x18, 65535, pseudo, 0)
    body = (tag + bytes((i * 7) & 0xFF for i in range(payload_len)))[:payload_len]
    return dst + src + b"\x08\x00" + bytes(ip) + tcp + body


def req(gref: int, offset: int, flags: int, rid: int, size: int) -> bytes:
    return pack_tx_request(TxRequest(gref, offset, flags, rid, size))


def extra(info: ExtraInfo) -> bytes:
    return pack_extra_info(info, TX_SLOT_SIZE)


def raw_extra(etype: int, flags: int = 0, body: bytes = b"\x5a" * 6) -> bytes:
    return extra(ExtraInfo(etype, flags, body))


class Ids:
    """Request ids with no zero byte (the id is what a response names); unique within a test."""

    def __init__(self) -> None:
        self.next = 0x0101

    def __call__(self) -> int:
        rid = self.next
        self.next += 1
        if self.next & 0xFF == 0:
            self.next += 1
        if self.next > 0xFFFF:
            self.next = 0x0101
        return rid


def tx_expect(slots: Sequence[bytes], status: int) -> list[tuple[int, int]]:
    """What a packet's slots are answered with: each request its id and ``status``, each extra (0, NULL)."""
    out = []
    is_extra = False
    for raw in slots:
        if is_extra:
            out.append((0, NULL))
            is_extra = parse_extra_info(raw).more
            continue
        r = TxRequest(*struct.unpack("<IHHHH", raw))
        out.append((r.id, status))
        is_extra = bool(r.flags & EXTRA)
    return out


def multiset(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    return sorted(pairs)


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


# ---- the hostile frontend --------------------------------------------------------------------------

class HostileVif:
    """A vif frontend written by hand: it follows the protocol only as far as each test wants."""

    def __init__(self, env: Env, devid: int = 0) -> None:
        self.env = env
        self.host = env.evil
        self.devid = devid
        self.be_domid = env.rig.be.domid
        self.xs = env.rig.xs
        self.pool = FramePool.of(self.host)
        self.path = f"/local/domain/{self.host.domid}/device/vif/{devid}"
        self.be_path = f"/local/domain/{self.be_domid}/backend/vif/{self.host.domid}/{devid}"
        self.refs: list[int] = []            # every grant we gave (checked unmapped at the end)
        self.gfn_of: dict[int, int] = {}
        self.port = -1
        self.tx: FrontRing | None = None
        self.rx: FrontRing | None = None
        self.tx_page: memoryview | None = None
        self.rx_page: memoryview | None = None
        self.ring_refs: list[int] = []
        self.tx_written: dict[int, set[bytes]] = {}    # slot -> request tails the frontend may have left there
        self.rx_written: dict[int, tuple[int, int]] = {}   # slot -> (id, gref) posted there
        self.rx_extra_next = False
        self.closed = False
        # the toolstack's part: libxl's nodes, both directories in one transaction
        introduce(self.xs, self.be_domid, self.host.domid)
        add_vif(self.xs, VifConfig(self.be_domid, self.host.domid, devid, ":".join(f"{b:02x}" for b in EVIL_MAC)))

    # xenbus ------------------------------------------------------------------------------
    @property
    def key(self) -> tuple[int, int]:
        return (self.host.domid, self.devid)

    def backend_state(self) -> XenbusState:
        return read_state(self.xs, self.be_path)

    def wait_backend(self, *states: XenbusState, timeout: float = WAIT) -> XenbusState:
        return wait_until(lambda: self.backend_state() if self.backend_state() in states else None,
                          timeout, f"backend {self.be_path} in {[s.name for s in states]} "
                                   f"(is {self.backend_state().name})")

    def set_state(self, state: XenbusState) -> None:
        self.xs.write(f"{self.path}/state", str(int(state)))

    def publish(self, nodes: dict[str, str | int], state: XenbusState) -> None:
        def body(tx: int) -> None:
            for k, v in nodes.items():
                self.xs.write(f"{self.path}/{k}", str(v), tx)
            self.xs.write(f"{self.path}/state", str(int(state)), tx)
        self.xs.transaction(body)

    def grant(self, data: bytes | None = None, readonly: bool = False, to: int | None = None) -> tuple[int, int]:
        (gfn,) = self.pool.alloc(1)
        self.host.memory.frame(gfn)[:] = data if data is not None else bytes(PAGE)
        ref = self.host.gnttab.grant_access(self.be_domid if to is None else to, gfn, readonly=readonly)
        self.refs.append(ref)
        self.gfn_of[ref] = gfn
        return gfn, ref

    def page(self, ref: int) -> memoryview:
        return self.host.memory.frame(self.gfn_of[ref])

    def connect(self, tx_start: int = 0, rx_start: int = 0, extra_nodes: dict[str, str | int] | None = None,
                expect: XenbusState = XenbusState.Connected, ring_readonly: bool = False) -> None:
        """The handshake by hand: fresh zeroed rings and port, nodes and Initialised in one transaction."""
        self.wait_backend(XenbusState.InitWait)
        tx_gfn, tx_ref = self.grant(readonly=ring_readonly)
        rx_gfn, rx_ref = self.grant(readonly=ring_readonly)
        self.ring_refs = [tx_ref, rx_ref]
        self.tx_page, self.rx_page = self.host.memory.frame(tx_gfn), self.host.memory.frame(rx_gfn)
        rings = []
        for pg, make, start in ((self.tx_page, tx_shared_ring, tx_start), (self.rx_page, rx_shared_ring, rx_start)):
            shared = make([pg])
            shared.init()
            shared.set(_REQ_PROD, start)
            shared.set(_RSP_PROD, start)
            rings.append(FrontRing(shared, init=False))
        self.tx, self.rx = rings
        self.tx_written, self.rx_written, self.rx_extra_next = {}, {}, False
        self.port = self.host.alloc_unbound(self.be_domid)
        nodes: dict[str, str | int] = {"tx-ring-ref": tx_ref, "rx-ring-ref": rx_ref, "event-channel": self.port,
                                       "request-rx-copy": 1, "feature-sg": 1, "feature-rx-notify": 1}
        nodes.update(extra_nodes or {})
        self.publish(nodes, XenbusState.Initialised)
        self.wait_backend(expect)
        if expect == XenbusState.Connected:
            self.set_state(XenbusState.Connected)

    def recreate(self) -> None:
        """What the toolstack does to give the guest its device again: both ends back to Initialising.

        The old rings are given up (the backend must have unmapped them) and
        a fresh handshake follows with :meth:`connect`.
        """
        self.assert_unmapped()
        if self.port >= 0:
            self.host.close_port(self.port)
            self.port = -1
        for ref in self.ring_refs:
            self.end_grant(ref)
        self.ring_refs = []
        self.set_state(XenbusState.Initialising)
        self.xs.write(f"{self.be_path}/state", str(int(XenbusState.Initialising)))

    def end_grant(self, ref: int) -> None:
        assert self.host.gnttab.try_end_access(ref), f"grant {ref} is still mapped"
        self.host.gnttab.release_ref(ref)
        self.pool.free([self.gfn_of.pop(ref)])
        self.refs.remove(ref)

    # TX ring -----------------------------------------------------------------------------
    def tx_put(self, raw: bytes, tails: Sequence[bytes] = ()) -> int:
        assert self.tx is not None and len(raw) == TX_SLOT_SIZE
        idx = self.tx.req_prod_pvt
        self.tx.put_request(raw)
        self.tx_written[idx & self.tx.shared.mask] = {raw[4:], *tails}
        return idx

    def tx_push(self) -> None:
        assert self.tx is not None
        self.tx.push_requests()
        self.host.notify(self.port)          # hostile: notify whatever req_event says

    def tx_send(self, raws: Sequence[bytes]) -> None:
        for raw in raws:
            self.tx_put(raw)
        self.tx_push()

    def _tx_take(self) -> list[TxResponse]:
        assert self.tx is not None
        n = self.tx.unconsumed_responses()        # raises RingOverflow: more responses than requests
        out = []
        for i in range(n):
            idx = (self.tx.rsp_cons + i) & M32
            full = self.tx.shared.read_slot(idx, TX_SLOT_SIZE)
            tails = self.tx_written[idx & self.tx.shared.mask]
            assert full[4:] in tails, (f"tx slot {idx}: netback wrote past its 4-byte response: "
                                       f"{full.hex()} (the request left {[t.hex() for t in tails]})")
            out.append(parse_tx_response(full))
        self.tx.rsp_cons = (self.tx.rsp_cons + n) & M32
        return out

    def _wait_event(self, deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{what} within the deadline (backend {self.backend_state().name})")
        select.select([self.host.evtchn.fileno(self.port)], [], [], min(remaining, 0.05))
        self.host.evtchn.consume(self.port)

    def tx_collect(self, n: int, timeout: float = WAIT) -> list[TxResponse]:
        """Exactly ``n`` responses (the event channel with a deadline, and the ring looked at anyway)."""
        assert self.tx is not None
        out: list[TxResponse] = []
        deadline = time.monotonic() + timeout
        while True:
            out += self._tx_take()
            if len(out) >= n:
                break
            if self.tx.final_check_for_responses():
                continue
            self._wait_event(deadline, f"only {len(out)} of {n} tx responses")
        assert len(out) == n, f"{len(out)} tx responses for {n} slots"
        assert self.tx.unconsumed_responses() == 0
        return out

    def tx_roundtrip(self, packets: Sequence[tuple[Sequence[bytes], int]]) -> None:
        """Send the packets in one batch; every slot answered exactly once, as ``tx_expect`` says."""
        slots = [raw for p, _ in packets for raw in p]
        want = [pair for p, status in packets for pair in tx_expect(p, status)]
        self.tx_send(slots)
        got = [(r.id, r.status) for r in self.tx_collect(len(slots))]
        assert multiset(got) == multiset(want), f"tx responses {got}, expected {want}"

    # RX ring -----------------------------------------------------------------------------
    def rx_post(self, reqs: Sequence[tuple[int, int]]) -> None:
        """Post (id, gref) receive requests, their padding non-zero."""
        assert self.rx is not None
        for rid, gref in reqs:
            idx = self.rx.req_prod_pvt
            self.rx.put_request(struct.pack("<HHI", rid, RX_PAD, gref))
            self.rx_written[idx & self.rx.shared.mask] = (rid, gref)
        self.rx.push_requests()
        self.host.notify(self.port)

    def rx_collect(self, n: int, timeout: float = WAIT) -> list[tuple[int, int, int, int, int]]:
        """``n`` RX responses as (request id, request gref, response id, flags, status), slot by slot."""
        assert self.rx is not None
        rx = self.rx
        out: list[tuple[int, int, int, int, int]] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            avail = rx.unconsumed_responses()
            for i in range(avail):
                idx = (rx.rsp_cons + i) & M32
                full = rx.shared.read_slot(idx, RX_SLOT_SIZE)
                rid, gref = self.rx_written[idx & rx.shared.mask]
                if self.rx_extra_next:           # an extra-info slot: its padding must be zero
                    info = parse_extra_info(full)
                    if info.type == XEN_NETIF_EXTRA_TYPE_GSO:
                        assert isinstance(info.body, GsoInfo) and info.body.pad == 0, full.hex()
                    self.rx_extra_next = info.more
                    out.append((rid, gref, -1, -1, NULL))
                    continue
                rsp = parse_rx_response(full)
                assert rsp.offset == 0, (f"rx slot {idx}: offset {rsp.offset:#x} (the request's padding was "
                                         f"{RX_PAD:#x}): {full.hex()}")
                assert rsp.id == rid, f"rx slot {idx}: response id {rsp.id:#x} in the slot of request {rid:#x}"
                self.rx_extra_next = bool(rsp.flags & NETRXF_extra_info)
                out.append((rid, gref, rsp.id, rsp.flags, rsp.status))
            rx.rsp_cons = (rx.rsp_cons + avail) & M32
            if len(out) >= n or rx.final_check_for_responses():
                continue
            self._wait_event(deadline, f"only {len(out)} of {n} rx responses")
        assert len(out) == n, f"{len(out)} rx responses, expected {n}"
        return out

    # checks ------------------------------------------------------------------------------
    def check_ring_headers(self) -> None:
        for name, pg in (("tx", self.tx_page), ("rx", self.rx_page)):
            if pg is not None:
                pad = bytes(pg[16:RING_HEADER_SIZE])
                assert pad == bytes(len(pad)), f"{name} ring header padding written: {pad.hex()}"

    def mapped(self) -> list[int]:
        out = []
        for ref in self.refs:
            flags = self.host.gnttab.entry(ref)[0]
            if flags & (GTF_reading | GTF_writing):
                out.append(ref)
        return out

    def assert_unmapped(self) -> None:
        """The backend lets go of every grant we gave (it does so on its own close thread: a deadline)."""
        wait_until(lambda: not self.mapped(), WAIT, f"the backend to unmap grants {self.mapped()}")

    def close(self) -> None:
        """Closing, Closed: the backend follows and holds nothing of ours."""
        if self.closed:
            return
        self.closed = True
        self.set_state(XenbusState.Closing)
        self.set_state(XenbusState.Closed)
        if self.key in self.env.rig.server.vifs:
            self.wait_backend(XenbusState.Closed)
        self.assert_unmapped()
        if self.port >= 0:
            self.host.close_port(self.port)
            self.port = -1


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


@pytest.fixture
def env(run_dir: str) -> Iterator[Env]:
    e = Env(run_dir)
    try:
        yield e
    finally:
        e.close()


# ---- grants ------------------------------------------------------------------------------------

def test_tx_bad_grant_refs_answered_error(env: Env) -> None:
    """Grants never given, given to someone else, revoked, out of the table: ERROR for the packet, vif stays."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    gt = h.host.gnttab
    _, ro = h.grant(readonly=True)
    _, rw = h.grant()
    _, to_other = h.grant(to=env.g1.domid)
    _, revoked = h.grant()
    gt.end_access(revoked)
    bad_frame = gt.grant_access(env.rig.be.domid, h.host.memory.nr_frames + 7, readonly=True)   # no such frame
    h.refs.append(bad_frame)
    never = max(h.refs) + 100
    assert gt.entry(never)[0] == 0
    # a reference the *good* guest granted the backend, unused in the hostile table: netback must
    # look in the hostile guest's own table, never in another domain's
    good_gt = env.g1.gnttab
    (good_gfn,) = FramePool.of(env.g1).alloc(1)
    spare = []
    while True:
        good_ref = good_gt.grant_access(env.rig.be.domid, good_gfn, readonly=True)
        if gt.entry(good_ref)[0] & GTF_type_mask == 0:
            break
        spare.append(good_ref)
    for ref in spare:
        good_gt.end_and_release(ref)
    nr = gt.nr_entries
    for reserved in (0, 7):
        assert gt.entry(reserved)[0] & GTF_type_mask == 0
    bad_refs = [never, to_other, revoked, bad_frame, good_ref, nr, nr + 1, 2**31, M32, 0, 7]

    def put(ref: int, tag: bytes, off: int = 0, length: int = 80) -> bytes:
        f = frame(tag, length)
        if ref in (ro, rw):
            h.page(ref)[off:off + len(f)] = f
        return f
    packets: list[tuple[list[bytes], int]] = []
    delivered, refused = [], []
    for i, ref in enumerate(bad_refs):
        refused.append(put(ref, b"bad %d" % i))
        packets.append(([req(ref, 0, 0, ids(), 80)], ERR))
    # a bad fragment fails the whole packet, and so does a bad first slot with a good fragment
    f = put(rw, b"good-head", 0, 160)
    refused.append(f)
    packets.append(([req(rw, 0, MORE, ids(), 160), req(never, 80, 0, ids(), 80)], ERR))
    packets.append(([req(M32, 0, MORE, ids(), 160), req(rw, 80, 0, ids(), 80)], ERR))
    # good packets in the same batch are served (a read-only grant is all TX needs)
    for ref, off in ((ro, 1000), (rw, 2000), (ro, PAGE - 80)):
        delivered.append(put(ref, b"good %d" % off, off))
        packets.append(([req(ref, off, 0, ids(), 80)], OK))
    before = dict(env.server.vifs[h.key].stats())
    with env.good_traffic():
        h.tx_roundtrip(packets)
        h.tx_roundtrip(packets[::-1])          # the same again (now with some pages cached), other order
        env.sniffer.wait_for(delivered)
    stats = env.server.vifs[h.key].stats()
    assert stats["tx_dropped"] - before["tx_dropped"] == 2 * (len(bad_refs) + 2), stats
    assert stats["tx_packets"] - before["tx_packets"] == 2 * 3, stats
    seen = env.sniffer.drain()
    assert not [f for f in refused if f in seen], "a refused packet was delivered"
    assert good_gt.try_end_access(good_ref), "netback mapped the good guest's grant for the hostile vif"
    env.finish(h, ids)


# ---- sizes and slot counts ---------------------------------------------------------------------

def test_tx_sizes_checked(env: Env) -> None:
    """First slot smaller than an Ethernet header, sizes that do not add up: ERROR; over-MTU: OKAY, dropped."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    _, ref = h.grant()
    pg = h.page(ref)
    delivered, never = [], []
    cases: list[tuple[list[bytes], int]] = []
    for size in (0, 1, 13):
        cases.append(([req(ref, 0, 0, ids(), size)], ERR))
    # the first slot holds what the others leave of the total: 5 bytes is not a header
    cases.append(([req(ref, 0, MORE, ids(), 105), req(ref, 200, 0, ids(), 100)], ERR))
    # a fragment larger than what is left of the total
    cases.append(([req(ref, 0, MORE, ids(), 100), req(ref, 200, 0, ids(), 101)], ERR))
    cases.append(([req(ref, 0, MORE, ids(), 100), req(ref, 200, MORE, ids(), 50), req(ref, 300, 0, ids(), 51)],
                  ERR))
    # exactly an Ethernet header is a frame
    f14 = frame(b"", 14)
    pg[400:414] = f14
    delivered.append(f14)
    cases.append(([req(ref, 400, 0, ids(), 14)], OK))
    # a zero-sized fragment in the middle is answered and contributes nothing
    f3 = frame(b"zero-frag", 150)
    pg[500:600] = f3[:100]
    pg[700:750] = f3[100:]
    delivered.append(f3)
    cases.append(([req(ref, 500, MORE, ids(), 150), req(ref, 3000, MORE, ids(), 0), req(ref, 700, 0, ids(), 50)],
                  OK))
    # the largest frame without GSO (MTU + header + VLAN tag), and one byte more: answered OKAY, not delivered
    for length in (MAX_FRAME, MAX_FRAME + 1, 4000):
        (gfn, r) = h.grant()
        f = frame(b"len %d" % length, length)
        h.page(r)[:length] = f
        (delivered if length <= MAX_FRAME else never).append(f)
        cases.append(([req(r, 0, 0, ids(), length)], OK))
    with env.good_traffic():
        h.tx_roundtrip(cases)
        env.sniffer.wait_for(delivered)
    assert not [f for f in never if f in env.sniffer.drain()], "an over-MTU frame was delivered"
    env.finish(h, ids)


def chain(h: HostileVif, ids: Ids, nfrags: int, tag: bytes, last_more: bool = False) -> tuple[list[bytes], bytes]:
    """A packet of one first slot and ``nfrags`` fragments of 60 bytes each, spread over two pages."""
    _, a = h.grant()
    _, b = h.grant()
    data = frame(tag, 60 * (nfrags + 1))
    slots = []
    for i in range(nfrags + 1):
        ref, off = (a, 64 * i) if i % 2 == 0 else (b, PAGE - 64 * i - 60)
        h.page(ref)[off:off + 60] = data[60 * i:60 * (i + 1)]
        more = MORE if i < nfrags or last_more else 0
        slots.append(req(ref, off, more, ids(), len(data) if i == 0 else 60))
    return slots, data


def test_tx_slot_limits_drop_then_fatal(env: Env) -> None:
    """18 fragments pass, 19 or 20 are dropped (ERROR), 21 is a malicious frontend (fatal_skb_slots): closed."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    ok18, data18 = chain(h, ids, 18, b"18 frags")
    drop19, data19 = chain(h, ids, 19, b"19 frags")
    drop20, data20 = chain(h, ids, 20, b"20 frags")
    with env.good_traffic():
        h.tx_roundtrip([(ok18, OK), (drop19, ERR), (drop20, ERR)])
        env.sniffer.wait_for([data18])
        assert data19 not in env.sniffer.drain() and data20 not in env.sniffer.drain()
        fatal, _ = chain(h, ids, 21, b"21 frags")
        h.tx_send(fatal)
        h.wait_backend(XenbusState.Closing)
    env.finish(h, closed_by_backend=True)


# ---- fatal errors ------------------------------------------------------------------------------

def _fatal_cases() -> dict[str, object]:
    def first_crosses(r: int, i: Ids) -> list[bytes]:
        return [req(r, 4000, 0, i(), 200)]

    def offset_at_page_end(r: int, i: Ids) -> list[bytes]:
        return [req(r, 4096, 0, i(), 60)]

    def offset_u16_max(r: int, i: Ids) -> list[bytes]:
        return [req(r, 0xFFFF, 0, i(), 60)]

    def frag_crosses(r: int, i: Ids) -> list[bytes]:
        return [req(r, 0, MORE, i(), 160), req(r, 4090, 0, i(), 100)]

    def frag_crosses_in_dropped_packet(r: int, i: Ids) -> list[bytes]:
        # the second slot is larger than what is left (dropped), the third still crosses its page
        return [req(r, 0, MORE, i(), 50), req(r, 0, MORE, i(), 100), req(r, 4095, 0, i(), 2)]

    def unterminated(r: int, i: Ids) -> list[bytes]:
        return [req(r, 0, MORE, i(), 200), req(r, 200, MORE, i(), 50)]

    def extra_missing(r: int, i: Ids) -> list[bytes]:
        return [req(r, 0, EXTRA, i(), 60)]

    def extra_chain_unterminated(r: int, i: Ids) -> list[bytes]:
        return [req(r, 0, EXTRA, i(), 60), extra(gso_extra(1448, XEN_NETIF_GSO_TYPE_TCPV4,
                                                           flags=XEN_NETIF_EXTRA_FLAG_MORE))]

    def extra_type(t: int, later: bool = False):
        def build(r: int, i: Ids) -> list[bytes]:
            slots = [req(r, 0, EXTRA, i(), 60)]
            if later:
                slots.append(extra(hash_extra(1, 0x1234, flags=XEN_NETIF_EXTRA_FLAG_MORE)))
            return slots + [raw_extra(t)]
        return build

    def gso(size: int, gtype: int):
        def build(r: int, i: Ids) -> list[bytes]:
            return [req(r, 0, EXTRA, i(), 60), extra(ExtraInfo(XEN_NETIF_EXTRA_TYPE_GSO, 0, GsoInfo(size, gtype)))]
        return build
    return {
        "first-slot-crosses-page": first_crosses,
        "offset-at-page-end": offset_at_page_end,
        "offset-u16-max": offset_u16_max,
        "fragment-crosses-page": frag_crosses,
        "fragment-crosses-page-in-dropped-packet": frag_crosses_in_dropped_packet,
        "more-data-past-req-prod": unterminated,
        "extra-info-past-req-prod": extra_missing,
        "extra-chain-past-req-prod": extra_chain_unterminated,
        "extra-type-none": extra_type(0),
        "extra-type-6": extra_type(6),
        "extra-type-255": extra_type(255),
        "extra-type-unknown-later-in-chain": extra_type(9, later=True),
        "gso-size-0": gso(0, XEN_NETIF_GSO_TYPE_TCPV4),
        "gso-type-none": gso(1448, 0),
        "gso-type-unknown": gso(1448, 7),
    }


FATAL_CASES = _fatal_cases()


@pytest.mark.parametrize("case", list(FATAL_CASES))
def test_tx_fatal_errors_close_the_vif(env: Env, case: str) -> None:
    """What Linux's xenvif_fatal_tx_err punishes closes this vif (backend Closing), and only this one."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    gfn, ref = h.grant(frame(b"fatal", PAGE))
    with env.good_traffic():
        f = frame(b"before " + case.encode(), 90)
        h.page(ref)[1000:1090] = f
        h.tx_roundtrip([([req(ref, 1000, 0, ids(), 90)], OK)])     # the vif worked before
        env.sniffer.wait_for([f])
        h.tx_send(FATAL_CASES[case](ref, ids))
        h.wait_backend(XenbusState.Closing)
    env.finish(h, closed_by_backend=True)


def test_tx_extra_info_that_is_fine(env: Env) -> None:
    """XDP, hash (valid or unknown hash type), multicast add/del and a small GSO packet: all answered, vif stays."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    _, ref = h.grant()
    pg = h.page(ref)
    delivered = []
    cases: list[tuple[list[bytes], int]] = []

    def pkt(tag: bytes, off: int, extras: list[bytes]) -> None:
        # GSO needs TCP (Linux's checksum_setup drops anything else after answering OKAY)
        f = tcp_frame(tag, 100) if tag.startswith(b"gso") else frame(tag, 100)
        pg[off:off + 100] = f
        delivered.append(f)
        cases.append(([req(ref, off, EXTRA if extras else 0, ids(), 100), *extras], OK))
    pkt(b"xdp", 0, [raw_extra(5)])
    pkt(b"hash", 200, [extra(hash_extra(1, 0xdeadbeef))])
    pkt(b"hash-type-unknown", 400, [extra(hash_extra(17, 0x1))])
    pkt(b"gso", 600, [extra(gso_extra(1448, XEN_NETIF_GSO_TYPE_TCPV4))])
    pkt(b"gso+hash+xdp", 800, [extra(gso_extra(1448, XEN_NETIF_GSO_TYPE_TCPV4, flags=XEN_NETIF_EXTRA_FLAG_MORE)),
                               extra(hash_extra(0, 7, flags=XEN_NETIF_EXTRA_FLAG_MORE)), raw_extra(5)])
    pkt(b"gso-twice", 1000, [extra(gso_extra(9, XEN_NETIF_GSO_TYPE_TCPV4, flags=XEN_NETIF_EXTRA_FLAG_MORE)),
                             extra(gso_extra(1448, XEN_NETIF_GSO_TYPE_TCPV4))])
    # multicast control: the request and its extra are answered on their own, nothing is sent
    cases.append(([req(ref, 0, EXTRA, ids(), 0), extra(mcast_extra(b"\x01\x00\x5e\x00\x00\x01"))], OK))
    cases.append(([req(ref, 0, EXTRA, ids(), 0), extra(mcast_extra(b"\x01\x00\x5e\x00\x00\x01", add=False))], OK))
    with env.good_traffic():
        h.tx_roundtrip(cases)
        env.sniffer.wait_for(delivered)
        # a full multicast filter answers ERROR, the vif stays
        adds = [([req(ref, 0, EXTRA, ids(), 0), extra(mcast_extra(bytes([1, 0, 0x5e, 0, 1, i])))], OK)
                for i in range(64)]
        h.tx_roundtrip(adds)
        h.tx_roundtrip([([req(ref, 0, EXTRA, ids(), 0), extra(mcast_extra(b"\x01\x00\x5e\x00\x02\x00"))], ERR)])
    env.finish(h, ids)


CAPTURE = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
s.bind(("eth0", 0))
print("ready", flush=True)
while True:
    print(len(s.recv(1 << 17)), flush=True)
"""


@contextmanager
def capture(ns: str) -> Iterator[list[int]]:
    """The lengths of the frames of our ethertype that the guest in ``ns`` receives on eth0."""
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", CAPTURE], stdout=subprocess.PIPE,
                         text=True)
    lengths: list[int] = []

    def read() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            lengths.append(int(line) if line.strip().isdigit() else -1)
    t = threading.Thread(target=read, name="capture-reader", daemon=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        t.start()
        yield lengths
    finally:
        p.kill()
        p.wait()
        t.join(10)


def test_gso_packets_never_reach_others_over_mtu(env: Env) -> None:
    """A GSO packet is one frame on the TX ring; no other guest may be handed a frame longer than the MTU allows.

    Linux segments a GSO skb for a vif that did not negotiate GSO, and
    drops one whose headers do not segment (these are not even TCP:
    ``checksum_setup`` fails) after answering OKAY.  A receiver must never
    get more than MTU + 18 bytes.  Without the GSO extra the same frame is
    answered OKAY and dropped (test_tx_sizes_checked).
    """
    h = env.hostile()
    h.connect()
    ids = Ids()
    pages = [h.grant()[1] for _ in range(3)]
    f = frame(b"gso super-frame", 9000)
    slots = []
    for i, ref in enumerate(pages):
        chunk = f[i * PAGE:(i + 1) * PAGE]
        h.page(ref)[:len(chunk)] = chunk
        flags = (EXTRA if i == 0 else 0) | (MORE if i < 2 else 0)
        slots.append(req(ref, 0, flags, ids(), len(f) if i == 0 else len(chunk)))
        if i == 0:
            slots.append(extra(gso_extra(1448, XEN_NETIF_GSO_TYPE_TCPV4)))
    with capture(env.ns1) as g1_got:
        h.tx_roundtrip([(slots, OK)])
        env.sentinel(h, ids)                  # 200 bytes, after the GSO packet on the same path
        wait_until(lambda: 200 in g1_got, WAIT, "the sentinel frame in g1")
    env.sniffer.drain()
    assert max(g1_got) <= MAX_FRAME, f"g1 (MTU 1500) received frames of {sorted(set(g1_got))} bytes"
    assert env.sniffer.longest <= MAX_FRAME, f"the switch handed other vifs a {env.sniffer.longest}-byte frame"
    env.finish(h, ids)


# ---- ring indices ------------------------------------------------------------------------------

@pytest.mark.parametrize("ring,jump", [("tx", 257), ("tx", 1000), ("tx", 2**31), ("tx", -1), ("tx", "back"),
                                       ("rx", 257), ("rx", 2**31)],
                         ids=["tx+257", "tx+1000", "tx+2^31", "tx-1", "tx-moved-back", "rx+257", "rx+2^31"])
def test_ring_index_jumps_close_the_vif(env: Env, ring: str, jump: int | str) -> None:
    """req_prod more than a ring ahead of the responses (RING_REQUEST_PROD_OVERFLOW): the vif is closed."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    _, ref = h.grant()
    f = frame(b"before", 80)
    h.page(ref)[:80] = f
    assert h.tx is not None and h.rx is not None
    with env.good_traffic():
        h.tx_roundtrip([([req(ref, 0, 0, ids(), 80)], OK)])
        shared = h.tx.shared if ring == "tx" else h.rx.shared
        rsp = shared.get(_RSP_PROD)
        shared.set(_REQ_PROD, (rsp - 2 if jump == "back" else rsp + jump) & M32)
        h.host.notify(h.port)
        if ring == "rx":                 # netback looks at the RX ring when a frame comes for the guest
            with broadcasting(env.ns1, gap=0.01):
                h.wait_backend(XenbusState.Closing)
        else:
            h.wait_backend(XenbusState.Closing)
    env.finish(h, closed_by_backend=True)


def test_indices_across_the_u32_wrap(env: Env) -> None:
    """A frontend may start its indices anywhere: both rings serve across the wrap."""
    h = env.hostile()
    start = M32 - 40
    h.connect(tx_start=start, rx_start=start)
    ids = Ids()
    _, ref = h.grant()
    frames = []
    with env.good_traffic():
        for rnd in range(4):
            batch = []
            for i in range(32):
                f = frame(b"wrap %d %d" % (rnd, i), 64)
                h.page(ref)[i * 64:(i + 1) * 64] = f
                frames.append(f)
                batch.append(([req(ref, i * 64, 0, ids(), 64)], OK))
            h.tx_roundtrip(batch)
            env.sniffer.wait_for(frames[-32:])
        rx_refs = [h.grant()[1] for _ in range(64)]
        h.rx_post([(ids(), r) for r in rx_refs])
        with broadcasting(env.ns1, gap=0.002):
            got = h.rx_collect(64)
    assert all(status > 0 for *_, status in got), got
    assert h.tx.rsp_cons == (start + 128) & M32 and h.rx.rsp_cons == (start + 64) & M32
    env.finish(h, ids)


# ---- a frontend that rewrites its requests -------------------------------------------------------

def test_tx_request_rewritten_after_push(env: Env) -> None:
    """A thread keeps flipping pushed slots between variants; every slot is answered exactly once.

    Only bytes 4..11 flip (offset, flags, id kept, size); the response lives
    in bytes 0..3.  Every variant, and every byte-mix of variants, is
    non-fatal: sizes stay below 3072 and offsets below 128, so a slot never
    crosses its page; ``more_data`` flips only on the first slot of a
    two-slot packet (either it is one packet or two).  Netback copies a slot
    once and decides on the copy, so no slot can be answered twice or not at
    all, whatever it reads.
    """
    h = env.hostile()
    h.connect()
    ids = Ids()
    assert h.tx is not None
    shared = h.tx.shared
    pg = h.tx_page
    assert pg is not None
    data = [h.grant(frame(b"flip %d" % i, PAGE, dst=SELF_DST), readonly=True)[1] for i in range(4)]
    stop = threading.Event()
    live: list[tuple[int, list[bytes]]] = []
    lock = threading.Lock()

    def flipper() -> None:
        n = 0
        while not stop.is_set():
            with lock:
                current = list(live)
            for idx, variants in current:
                body = variants[n % len(variants)][4:]
                off = RING_HEADER_SIZE + (idx & shared.mask) * shared.slot_size + 4
                pg[off:off + 8] = body
            n += 1
            # every thread of the rig shares this interpreter: a flipper that never lets go of the GIL
            # would slow the good pair down by itself
            stop.wait(0.0005 if not current else 0.00002)

    t = threading.Thread(target=flipper, name="flipper", daemon=True)
    t.start()
    answered = {OK: 0, ERR: 0}
    try:
        with env.good_traffic():
            for rnd in range(60):
                batch: list[tuple[int, list[bytes]]] = []
                sent_ids = []
                for k in range(12):
                    ref = data[(rnd + k) % len(data)]
                    rid = ids()
                    sent_ids.append(rid)
                    if k % 3 == 2:           # a two-slot packet whose first slot loses/gets more_data
                        rid2 = ids()
                        sent_ids.append(rid2)
                        firsts = [req(ref, 0, MORE, rid, 160), req(ref, 0, 0, rid, 160), req(ref, 64, MORE | CSUM, rid,
                                                                                                  2000)]
                        seconds = [req(ref, 100, 0, rid2, 60), req(ref, 100, VALID, rid2, 7), req(ref, 0, 0, rid2, 0)]
                        batch.append((h.tx.req_prod_pvt, firsts))
                        h.tx_put(firsts[0], [v[4:] for v in firsts])
                        batch.append((h.tx.req_prod_pvt, seconds))
                        h.tx_put(seconds[0], [v[4:] for v in seconds])
                    else:
                        variants = [req(ref, 0, 0, rid, 60), req(ref, 0, 0, rid, 5), req(ref, 100, CSUM, rid, 3000),
                                    req(ref, 64, VALID, rid, 0), req(ref, 127, 0, rid, 1400)]
                        batch.append((h.tx.req_prod_pvt, variants))
                        h.tx_put(variants[0], [v[4:] for v in variants])
                with lock:
                    live[:] = batch
                # tx_put recorded only the first variant's tails: allow any byte-mix of the variants
                for idx, variants in batch:
                    tails = {v[4:] for v in variants}
                    mixes = {bytes(c) for c in _byte_mixes(list(tails))}
                    h.tx_written[idx & shared.mask] = mixes
                h.tx_push()
                got = h.tx_collect(len(batch))
                with lock:
                    live[:] = []
                assert sorted(r.id for r in got) == sorted(sent_ids), "a slot was answered twice or not at all"
                for r in got:
                    assert r.status in (OK, ERR), r
                    answered[r.status] += 1
    finally:
        stop.set()
        t.join(WAIT)
    assert not t.is_alive()
    assert sum(answered.values()) == 60 * 16
    env.finish(h, ids)


def _byte_mixes(tails: list[bytes]) -> list[bytes]:
    """Every slot tail a reader could see if writes of the variants interleaved byte by byte."""
    options = [sorted({t[i] for t in tails}) for i in range(len(tails[0]))]
    out = [b""]
    for opts in options:
        out = [o + bytes([b]) for o in out for b in opts]
    return out


# ---- a flood of random slots ------------------------------------------------------------------------

def random_slot(rng: random.Random, refs: list[int], after_extra: bool) -> bytes:
    """One slot a fuzzer likes: sometimes plausible, often absurd, sometimes plain random bytes."""
    if rng.random() < 0.2:
        return rng.randbytes(TX_SLOT_SIZE)
    if after_extra:
        etype = rng.choice([0, 1, 1, 1, 2, 3, 4, 4, 5, 6, 200])
        flags = XEN_NETIF_EXTRA_FLAG_MORE if rng.random() < 0.2 else 0
        if etype == XEN_NETIF_EXTRA_TYPE_GSO:
            body = struct.pack("<HBBH", rng.choice([0, 1, 536, 1448, 65535]), rng.choice([0, 1, 1, 2, 3]), 0, 0)
        else:
            body = rng.randbytes(6)
        return extra(ExtraInfo(etype, flags, body))
    gref = rng.choice(refs) if rng.random() < 0.7 else rng.choice([0, 5, 10**4, 2**16 - 1, rng.getrandbits(32)])
    offset = rng.choice([0, rng.randrange(0, 4096), rng.choice([4095, 4096, 65535])])
    size = rng.choice([rng.randrange(0, 100), rng.randrange(14, 1600), rng.randrange(0, 4096), 65535])
    flags = (MORE if rng.random() < 0.3 else 0) | (EXTRA if rng.random() < 0.1 else 0)
    flags |= rng.choice([0, CSUM, VALID, rng.getrandbits(16)])
    return req(gref, offset, flags, rng.getrandbits(16), size)


def random_packet(rng: random.Random, refs: list[int]) -> list[bytes]:
    """A packet that is well-formed more often than not, but not always: sizes lie, grefs are bad, chains long."""
    def gref() -> int:
        return rng.choice(refs) if rng.random() < 0.9 else rng.choice([0, 5, 10**4, rng.getrandbits(32)])

    def piece(limit: int) -> tuple[int, int]:
        size = rng.choice([0, rng.randrange(1, 64), rng.randrange(1, limit + 1)])
        return rng.randrange(0, PAGE - size + 1), size
    nfrags = rng.choice([0, 0, 0, 1, 2, 3, rng.randrange(0, 19), rng.choice([18, 19, 20])])
    frags = [piece(rng.choice([100, 1500, PAGE])) for _ in range(nfrags)]
    first_off, first_len = piece(rng.choice([60, 1500, PAGE]))
    first_off -= first_off % 6
    total = first_len + sum(sz for _, sz in frags)
    if rng.random() < 0.1:
        total = rng.randrange(0, total + 1)            # a lie: smaller than the fragments (dropped)
    csum = rng.choice([0, 0, CSUM, VALID, CSUM | VALID])
    extras = []
    for _ in range(rng.choice([0, 0, 0, 0, 1, 1, 2])):
        kind = rng.choice(["gso", "hash", "xdp", "mcast"])
        if kind == "gso":
            extras.append(gso_extra(rng.choice([1, 536, 1448, 9000]), rng.choice([1, 2])))
        elif kind == "hash":
            extras.append(hash_extra(rng.randrange(0, 8), rng.getrandbits(32)))
        elif kind == "xdp":
            extras.append(ExtraInfo(5, 0, rng.randbytes(6)))
        else:
            extras.append(mcast_extra(bytes([1, 0, 0x5E, 0, 0, rng.randrange(0, 80)]), add=rng.random() < 0.7))
    extras = [ExtraInfo(e.type, XEN_NETIF_EXTRA_FLAG_MORE if i < len(extras) - 1 else 0, e.body)
              for i, e in enumerate(extras)]
    first_flags = csum | (MORE if frags else 0) | (EXTRA if extras else 0)
    slots = [req(gref(), first_off, first_flags, rng.getrandbits(16), total)]
    slots += [extra(e) for e in extras]
    for i, (off, sz) in enumerate(frags):
        slots.append(req(gref(), off, MORE if i < len(frags) - 1 else 0, rng.getrandbits(16), sz))
    return slots


def predicted(h: HostileVif, proc: TxProcessor, slots: list[bytes]) -> list[tuple[int, int]] | None:
    """What Linux's rules (TxProcessor, unit-tested on its own) say the slots are answered; None: fatal."""
    gt = h.host.gnttab

    def mappable(ref: int) -> bool:
        if not 0 <= ref < gt.nr_entries:
            return False
        flags, domid, gfn = gt.entry(ref)
        return bool(flags & GTF_permit_access) and domid == h.be_domid and gfn < h.host.memory.nr_frames
    want: list[tuple[int, int]] = []
    for action in proc.feed(slots, at_req_prod=True):
        if isinstance(action, TxFatal):
            return None
        if isinstance(action, TxPacket):
            if all(mappable(p.gref) for p in action.pieces):
                want += [(r.id, r.status) for r in action.responses]
            else:
                want += [(r.id, r.status) for r in action.error_responses()]
        else:
            assert isinstance(action, (TxDrop, TxMulticast))
            want += [(r.id, r.status) for r in action.responses]
    return want


def test_flood_of_random_slots(env: Env) -> None:
    """Thousands of random slots, reconnecting each time the vif is closed: netback never crashes.

    Batches of random packets (mostly well-formed, often dropped), some
    with one packet or slot of random bytes in them, go to the ring a ring's
    worth at a time.  Each batch is checked against Linux's rules as
    TxProcessor (unit-tested on its own) states them: a batch with a fatal
    packet closes the vif, and the toolstack gives the guest its device
    again; any other batch is answered slot for slot.
    """
    h = env.hostile()
    h.connect()
    rng = random.Random(0x5EED)
    pattern = (EVIL_MAC * (PAGE // 6 + 1))[:PAGE]         # any first piece at a multiple of 6 is sent to itself
    refs = [h.grant(pattern, readonly=rng.random() < 0.5)[1] for _ in range(8)]
    proc = TxProcessor()
    total = fatal = answered = 0
    deadline = time.monotonic() + 25
    with env.good_traffic():
        while (total < 12_000 or fatal < 5) and time.monotonic() < deadline:
            assert h.tx is not None
            slots: list[bytes] = []
            limit = rng.choice([1, 8, 64, 256])
            while True:
                p = random_packet(rng, refs)
                if len(slots) + len(p) > limit:
                    break
                slots += p
            if rng.random() < 0.3 or not slots:      # and something absurd, anywhere in the batch
                junk, after_extra = [], False
                for _ in range(rng.choice([1, 1, 2, 5])):
                    raw = random_slot(rng, refs, after_extra)
                    junk.append(raw)
                    after_extra = bool(raw[1] & XEN_NETIF_EXTRA_FLAG_MORE) if after_extra else \
                        bool(struct.unpack_from("<H", raw, 6)[0] & EXTRA)
                at = rng.randrange(0, len(slots) + 1)
                slots[at:at] = junk
                slots = slots[:256]
            want = predicted(h, proc, slots)
            h.tx_send(slots)
            total += len(slots)
            if want is None:
                fatal += 1
                h.wait_backend(XenbusState.Closing)
                wait_until(lambda: not served(env.server, h.key), WAIT, "the loop to let the closed vif go")
                assert not env.dead_good_threads(), env.dead_good_threads()
                h.recreate()
                h.connect()
                proc = TxProcessor()
                continue
            got = [(r.id, r.status) for r in h.tx_collect(len(want))]
            assert multiset(got) == multiset(want), f"batch of {len(slots)}: got {got}, Linux's rules say {want}"
            answered += len(got)
    assert fatal >= 5 and answered >= 3000, (total, fatal, answered)
    env.finish(h)


def test_frontend_that_never_reads_responses(env: Env) -> None:
    """Responses pile up unread; the frontend pushes over them (legal for the backend) and storms events."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    assert h.tx is not None
    shared = h.tx.shared
    size = h.tx.size
    _, ref = h.grant(frame(b"unread", PAGE, dst=SELF_DST), readonly=True)
    prod = 0
    with env.good_traffic():
        for rnd in range(20):
            wait_until(lambda: shared.get(_RSP_PROD) == prod, WAIT, "netback to answer the ring")
            raws = [req(ref, 0, 0, ids(), 64 + rnd) for _ in range(size)]
            for i, raw in enumerate(raws):
                shared.write_slot(prod + i, raw)
            prod += size
            shared.set(_REQ_PROD, prod)
            h.host.notify(h.port)
        wait_until(lambda: shared.get(_RSP_PROD) == prod, WAIT, "netback to catch up")
        for _ in range(20_000):                  # and an event storm without any request
            h.host.notify(h.port)
        env.ping_both_ways()
    # the last ring's worth: each slot holds its response over the request's untouched tail
    for i, raw in enumerate(raws):
        full = shared.read_slot(prod - size + i, TX_SLOT_SIZE)
        assert full[4:] == raw[4:], f"slot {i}: {full.hex()} (request {raw.hex()})"
        assert parse_tx_response(full) == TxResponse(struct.unpack_from("<H", raw, 8)[0], OK)
    assert h.backend_state() == XenbusState.Connected
    h.tx.rsp_cons = h.tx.req_prod_pvt = prod
    assert env.server.vifs[h.key].stats()["tx_packets"] == 20 * size
    env.finish(h, ids)


def test_frontend_closes_its_event_channel(env: Env) -> None:
    """The frontend closes its port while connected, with buffers posted and frames coming: nothing breaks."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    _, ref = h.grant(frame(b"portless", PAGE), readonly=True)
    h.rx_post([(ids(), h.grant()[1]) for _ in range(16)])
    with env.good_traffic():
        h.tx_roundtrip([([req(ref, 0, 0, ids(), 64)], OK)])
        h.host.close_port(h.port)
        h.port = -1
        assert h.tx is not None and h.rx is not None
        h.tx.put_request(req(ref, 0, 0, ids(), 64))
        h.tx.push_requests()                     # no way to notify any more
        with broadcasting(env.ns1, gap=0.002):  # netback fills the buffers and notifies a closed port
            vif = env.server.vifs[h.key]
            wait_until(lambda: vif.stats().get("rx_packets", 0) >= 16, WAIT, "frames for the portless guest")
        assert h.rx.unconsumed_responses() == 16
        h.close()
    env.finish(None)


# ---- the receive side --------------------------------------------------------------------------

def test_lazy_frontend_never_posts_rx_buffers(env: Env) -> None:
    """Broadcasts flooded to a vif without receive buffers: its queue stays bounded, the good pair is not slowed."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    port = env.server.vifs[h.key].port
    assert h.rx is not None
    with env.good_traffic(min_replies=20, max_rtt_ms=GOOD_RTT_MS):
        with broadcasting(env.ns1, gap=0.0002):
            wait_until(lambda: port.dropped > 0, WAIT, "the lazy vif's port to drop frames")
            first = port.dropped
            wait_until(lambda: port.dropped > first + 200, WAIT, "the lazy vif's port to keep dropping")
            assert len(port.queue) <= PORT_QUEUE
        assert h.rx.shared.get(_RSP_PROD) == 0, "responses without requests"
        assert served(env.server, h.key)
    assert len(port.queue) <= PORT_QUEUE
    # once the guest posts buffers it gets what is queued (oldest first), each in its request's slot
    refs = [h.grant()[1] for _ in range(32)]
    h.rx_post([(ids(), r) for r in refs])
    got = h.rx_collect(32)
    for rid, gref, _, flags, status in got:
        assert 14 <= status <= MAX_FRAME and not flags & NETRXF_more_data, (rid, flags, status)
        f = bytes(h.page(gref)[:status])
        assert f[6:12] in GOOD_MACS, f[:16].hex()
    env.finish(h, ids)


def test_rx_requests_with_bad_grant_refs(env: Env) -> None:
    """Frames for receive buffers netback cannot write: NETIF_RSP_ERROR in that slot, good slots filled."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    gt = h.host.gnttab
    _, ro = h.grant(readonly=True)                 # netback writes received frames: read-only will not do
    _, to_other = h.grant(to=env.g1.domid)
    _, revoked = h.grant()
    gt.end_access(revoked)
    bad_frame = gt.grant_access(env.rig.be.domid, h.host.memory.nr_frames + 7)
    h.refs.append(bad_frame)
    never = max(h.refs) + 100
    nr = gt.nr_entries
    bad = [ro, to_other, revoked, bad_frame, never, nr, nr + 1, 2**31, M32, 0, 7]
    good = [h.grant(b"\xee" * PAGE)[1] for _ in range(len(bad))]
    posted = []
    for b, g in zip(bad, good):
        posted += [(ids(), b), (ids(), g)]
    h.rx_post(posted)
    before = env.server.vifs[h.key].stats()
    with env.good_traffic(), broadcasting(env.ns1, gap=0.002):
        got = h.rx_collect(len(posted))
    errors = 0
    for (rid, gref), (rid2, gref2, _, flags, status) in zip(posted, got):
        assert (rid, gref) == (rid2, gref2)
        if gref in bad:
            assert status == ERR, f"buffer with gref {gref:#x}: status {status}"
            errors += 1
        else:
            assert 14 <= status <= MAX_FRAME, status
            f = bytes(h.page(gref)[:status])
            assert f[6:12] in GOOD_MACS, f[:16].hex()
            assert bytes(h.page(gref)[status:]) == b"\xee" * (PAGE - status), "netback wrote past the frame"
        if status != ERR:     # checksum flags are fine (the guests' UDP leaves its checksum blank); nothing else
            assert flags & ~(NETRXF_csum_blank | NETRXF_data_validated) == 0, f"flags {flags:#x} for a one-slot frame"
    stats = env.server.vifs[h.key].stats()
    assert stats["rx_dropped"] - before.get("rx_dropped", 0) == errors, stats
    assert bytes(h.page(ro)) == bytes(PAGE), "netback wrote into a read-only grant"
    # a hostile stream of random receive requests: never a crash
    rng = random.Random(7)
    assert h.rx is not None
    small = [r for r in range(0, 64) if r not in h.ring_refs]       # ring pages as buffers: their own test
    posted = [(rng.getrandbits(16), rng.choice([rng.getrandbits(32), rng.choice(small), *good]))
              for _ in range(200)]
    h.rx_post(posted)
    with env.good_traffic(), broadcasting(env.ns1, gap=0.001):
        got = h.rx_collect(200)
    assert all(status == ERR or status > 0 for *_, status in got)
    env.finish(h, ids)


@pytest.mark.parametrize("which", ["rx-ring", "tx-ring"])
def test_rx_buffer_is_a_ring_page(env: Env, which: str) -> None:
    """The guest posts its own ring page as a receive buffer: netback scribbles on it, never crashes.

    The frame lands on the ring's indices; netback then either carries on or
    finds an impossible index and closes the vif.  Either is fine for a
    frontend that broke its own ring; a crash is not.
    """
    h = env.hostile()
    h.connect()
    ids = Ids()
    ring_ref = h.ring_refs[1 if which == "rx-ring" else 0]
    h.rx_post([(ids(), ring_ref)] + [(ids(), h.grant()[1]) for _ in range(7)])
    vif = env.server.vifs[h.key]
    with env.good_traffic(), broadcasting(env.ns1, gap=0.002):
        wait_until(lambda: vif.stats().get("rx_packets", 0) + vif.stats().get("rx_dropped", 0) >= 1
                   or h.backend_state() == XenbusState.Closing, WAIT, "a frame for the hostile guest")
        if which == "tx-ring":        # the TX ring's indices are garbage now: the next look at it closes
            h.host.notify(h.port)
            h.wait_backend(XenbusState.Closing)
    h.tx_page = h.rx_page = None            # a header may carry a frame now
    if h.backend_state() == XenbusState.Closing:
        env.finish(h, closed_by_backend=True)
    else:
        env.finish(h)


# ---- xenbus ------------------------------------------------------------------------------------

XENBUS_CASES: dict[str, dict] = {
    "tx-ring-ref-not-granted": dict(extra_nodes={"tx-ring-ref": 3000}),
    "rx-ring-ref-out-of-table": dict(extra_nodes={"rx-ring-ref": M32}),
    "ring-ref-not-a-u32": dict(extra_nodes={"tx-ring-ref": 2**40}),
    "ring-ref-garbage": dict(extra_nodes={"rx-ring-ref": "0x10"}),
    "ring-read-only": dict(ring_readonly=True),
    "no-rx-copy": dict(extra_nodes={"request-rx-copy": 0}),
    "event-channel-garbage": dict(extra_nodes={"event-channel": "-1"}),
    "event-channel-huge": dict(extra_nodes={"event-channel": 10**15}),
    "event-channel-not-unbound": dict(extra_nodes={"event-channel": 4000}),
    "split-rx-channel-bad": dict(extra_nodes={"event-channel-tx": "PORT", "event-channel-rx": 9999}),
    "multi-queue-too-many": dict(extra_nodes={"multi-queue-num-queues": 999}),
    "multi-queue-zero": dict(extra_nodes={"multi-queue-num-queues": 0}),
    "multi-queue-without-queue-dirs": dict(extra_nodes={"multi-queue-num-queues": 2}),
}


def test_an_unreadable_queue_count_means_one_queue(env: Env) -> None:
    """As Linux (xenbus_scanf failing: "Fall back to single queue"), not a reason to close."""
    h = env.hostile()
    with env.good_traffic(min_replies=3):
        h.connect(extra_nodes={"multi-queue-num-queues": "two"})
    assert len(env.server.vifs[h.key].queues) == 1
    env.finish(h, Ids())


@pytest.mark.parametrize("case", list(XENBUS_CASES))
def test_bad_xenbus_nodes_close_the_vif(env: Env, case: str) -> None:
    h = env.hostile()
    kw = dict(XENBUS_CASES[case])
    nodes = kw.get("extra_nodes", {})
    if nodes.get("event-channel-tx") == "PORT":
        h.wait_backend(XenbusState.InitWait)
        nodes["event-channel-tx"] = h.host.alloc_unbound(env.rig.be.domid)
    with env.good_traffic(min_replies=3):
        h.connect(expect=XenbusState.Closing, **kw)
    assert env.server.vifs[h.key].conn is None
    env.finish(h, closed_by_backend=True)


def test_state_flapping(env: Env) -> None:
    """Initialised / Initialising over and over: connections come and go, no thread or mapping leaks."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    _, ref = h.grant()
    with env.good_traffic():
        for i in range(15):
            f = frame(b"flap %d" % i, 64)
            h.page(ref)[:64] = f
            h.tx_roundtrip([([req(ref, 0, 0, ids(), 64)], OK)])
            env.sniffer.wait_for([f])
            h.set_state(XenbusState.Initialising)
            h.wait_backend(XenbusState.InitWait)
            assert not served(env.server, h.key)
            assert not h.mapped(), f"grants still mapped while disconnected: {h.mapped()}"
            # the same rings again (they still hold the indices where we left them)
            h.set_state(XenbusState.Initialised)
            h.wait_backend(XenbusState.Connected)
            h.set_state(XenbusState.Connected)
            assert served(env.server, h.key)
    env.finish(h, ids)


def test_frontend_domain_dies_mid_flight(env: Env) -> None:
    """The hostile guest dies with packets and receive buffers on its rings; the toolstack removes its nodes."""
    h = env.hostile()
    h.connect()
    ids = Ids()
    _, ref = h.grant(frame(b"dying", PAGE))
    h.rx_post([(ids(), h.grant()[1]) for _ in range(64)])
    with env.good_traffic(), broadcasting(env.ns1, gap=0.002):
        h.tx_roundtrip([([req(ref, 0, 0, ids(), 64)], OK) for _ in range(16)])
        h.tx_send([req(ref, 0, 0, ids(), 64) for _ in range(64)])
        h.host.close()                       # dies: the hypervisor takes back its grants and ports
        env.dead.append(h.host)
        h.closed = True
        env.rig.xs.rm(h.be_path)             # what libxl does for a destroyed domain
        env.rig.xs.rm(h.path)
        wait_until(lambda: h.key not in env.server.vifs, WAIT, "the vif to be removed")
        wait_until(lambda: not served(env.server, h.key), WAIT, "the loop to let the dead guest's vif go")
    be_dom = env.rig.hv.hv.domains[env.rig.be.domid]
    left = [m for m in be_dom.maptrack.values() if m.granter.domid == h.host.domid]
    assert not left, f"netback still maps {len(left)} grant(s) of the dead guest"
    env.hostiles.remove(h)
    env.finish(None)

