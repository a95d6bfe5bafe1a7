"""A vif frontend written by hand for netback's hostile tests, and the frames and slots it sends.

:class:`HostileVif` does the xenbus handshake with ring pages and an event
channel of its own, writes crafted slots straight into its TX and RX rings,
and checks what netback writes back: every slot answered exactly once, no
byte written past a response (a TX response is 4 bytes: the 8 request bytes
after it in the slot stay the frontend's; an RX request's padding overlaps
the response's ``offset``, which must come back 0), ring header padding left
zero, every grant unmapped again once the vif is closed.  It follows the
protocol only as far as each test wants.  The rig around it is
tests/netback_harness.py.
"""

from __future__ import annotations

import select
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from helpers import wait_until
from reference_frames import textbook_sum
from xs_fixtures import introduce

from xdom.deploy.vif import VifConfig, add_vif
from xdom.domains.abi.grant_table import GTF_reading, GTF_writing
from xdom.domains.abi.netif import (
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    RX_SLOT_SIZE,
    TX_SLOT_SIZE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    ExtraInfo,
    GsoInfo,
    NETRXF_extra_info,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    NETTXF_more_data,
    TxRequest,
    TxResponse,
    pack_extra_info,
    parse_extra_info,
    parse_rx_response,
    parse_tx_response,
    rx_shared_ring,
    tx_shared_ring,
)
from xdom.domains.abi.ring import RING_HEADER_SIZE, FrontRing
from xdom.domains.frame_pool import FramePool
from xdom.domains.xenbus import XenbusState, read_state

if TYPE_CHECKING:
    from netback_harness import Env

PAGE = 4096
WAIT = 20.0                   # generous (loaded CI): every wait is a deadline, never a sleep before an assertion
M32 = 0xFFFFFFFF
REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT = 0, 4, 8, 12
OK, ERR, NULL = NETIF_RSP_OKAY, NETIF_RSP_ERROR, NETIF_RSP_NULL
MORE, EXTRA, CSUM, VALID = NETTXF_more_data, NETTXF_extra_info, NETTXF_csum_blank, NETTXF_data_validated
EVIL_MAC = bytes.fromhex("00163e0000ee")
FLOOD_DST = bytes.fromhex("02000000ab01")    # a unicast address nobody has: the switch floods it to every port
# Frames addressed to the hostile guest itself: the switch learns EVIL_MAC on its port and delivers them nowhere.
# Tests that push thousands of frames use it, or the flood would fill the good guests' port queues (a broadcast
# storm drops the good pair's frames there: a separate matter from the abuse under test).
SELF_DST = EVIL_MAC
ETHERTYPE = b"\x88\xb5"                       # IEEE local experimental: no stack in the guests acts on it
MAX_FRAME = 1500 + 14 + 4                     # MTU + Ethernet header + VLAN tag: what Linux lets through
RX_PAD = 0xA5A5                               # an RX request's padding: overlaps the response's offset


# ---- frames and slots ------------------------------------------------------------------------------

def frame(tag: bytes, length: int = 96, dst: bytes = FLOOD_DST, src: bytes = EVIL_MAC) -> bytes:
    """An Ethernet frame of ``length`` bytes carrying ``tag`` (make it unique: the sniffer looks for it)."""
    head = dst + src + ETHERTYPE + tag
    body = bytes((i * 7 + len(tag)) & 0xFF for i in range(max(0, length - len(head))))
    return (head + body)[:length]


def tcp_frame(tag: bytes, length: int = 100, dst: bytes = FLOOD_DST, src: bytes = EVIL_MAC) -> bytes:
    """An Ethernet/IPv4/TCP frame carrying ``tag``, its TCP checksum field holding the pseudo-header sum
    (what a GSO or csum_blank packet carries: the rest is left to offload)."""
    payload_len = length - 14 - 20 - 20
    tcp_len = 20 + payload_len
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 1, 0x4000, 64, 6, 0,
                               bytes([10, 99, 0, 9]), bytes([10, 99, 0, 8])))
    ip[10:12] = (~textbook_sum(bytes(ip)) & 0xFFFF).to_bytes(2, "big")
    pseudo = textbook_sum(bytes(ip[12:20]) + struct.pack("!xBH", 6, tcp_len))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 1000, 0, 5 << 4, 0x18, 65535, pseudo, 0)
    body = (tag + bytes((i * 7) & 0xFF for i in range(payload_len)))[:payload_len]
    return dst + src + b"\x08\x00" + bytes(ip) + tcp + body


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
            shared.set(REQ_PROD, start)
            shared.set(RSP_PROD, start)
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

