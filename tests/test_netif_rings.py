"""netif.h's TX and RX rings shared with C peers that use ring.h's macros on the same page.

A C netfront-alike pushes packet chains on a TX ring our BackRing serves, and
a C netback-alike answers our FrontRing's RX requests; both sides mmap one
file as the ring page.  The C programs (built against Xen's header by
tests/netif_c.py) print what they wrote; the Python side must parse exactly
that.
"""

from __future__ import annotations

import mmap
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from netif_c import build_c, needs_headers

from xdom.domains.abi import netif as n
from xdom.domains.abi.ring import BackRing, FrontRing

# Lines both sides print for what they put on / took off a ring.
C_PRINTERS = r"""
static void print_extra(const netif_extra_info_t *x) {
    printf("E %u %u", x->type, x->flags);
    switch (x->type) {
    case XEN_NETIF_EXTRA_TYPE_GSO:
        printf(" G %u %u %u %u\n", x->u.gso.size, x->u.gso.type, x->u.gso.pad, x->u.gso.features); break;
    case XEN_NETIF_EXTRA_TYPE_MCAST_ADD: case XEN_NETIF_EXTRA_TYPE_MCAST_DEL:
        printf(" M %02x%02x%02x%02x%02x%02x\n", x->u.mcast.addr[0], x->u.mcast.addr[1], x->u.mcast.addr[2],
               x->u.mcast.addr[3], x->u.mcast.addr[4], x->u.mcast.addr[5]); break;
    case XEN_NETIF_EXTRA_TYPE_HASH:
        printf(" H %u %u %02x%02x%02x%02x\n", x->u.hash.type, x->u.hash.algorithm, x->u.hash.value[0],
               x->u.hash.value[1], x->u.hash.value[2], x->u.hash.value[3]); break;
    default: printf(" ?\n");
    }
}
static void *map_ring(const char *path) {
    int fd = open(path, O_RDWR);
    if (fd < 0) { perror("open"); exit(2); }
    void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) { perror("mmap"); exit(2); }
    close(fd);
    return p;
}
static void wait_for(const char *word) {
    char buf[64];
    fflush(stdout);
    if (!fgets(buf, sizeof buf, stdin) || strncmp(buf, word, strlen(word))) { fprintf(stderr, "no %s\n", word); exit(3); }
}
"""


def _extra_line(x: n.ExtraInfo) -> str:
    b = x.body
    if isinstance(b, n.GsoInfo):
        tail = f"G {b.size} {b.type} {b.pad} {b.features}"
    elif isinstance(b, n.McastInfo):
        tail = f"M {b.addr.hex()}"
    elif isinstance(b, n.HashInfo):
        tail = f"H {b.type} {b.algorithm} {b.value.hex()}"
    else:
        tail = "?"
    return f"E {x.type} {x.flags} {tail}"


def _tx_line(q: n.TxRequest) -> str:
    return f"T {q.gref} {q.offset} {q.flags} {q.id} {q.size}"


def _rx_line(r: n.RxResponse) -> str:
    return f"S {r.id} {r.offset} {r.flags} {r.status}"


# A C netfront-alike: builds packet chains on the TX ring the way netfront
# does (first slot's size = whole packet; RING_GET_REQUEST cast to
# netif_extra_info_t for extras), pushes, waits, then reads responses.
TX_FRONT = C_PRINTERS + r"""
static netif_tx_front_ring_t front;
static unsigned seq;

static void put_req(uint32_t gref, uint16_t offset, uint16_t flags, uint16_t id, uint16_t size) {
    netif_tx_request_t *q = RING_GET_REQUEST(&front, front.req_prod_pvt);
    q->gref = gref; q->offset = offset; q->flags = flags; q->id = id; q->size = size;
    front.req_prod_pvt++;
    printf("T %u %u %u %u %u\n", gref, offset, flags, id, size);
}
static void put_extra(netif_extra_info_t x) {
    netif_extra_info_t *e = (netif_extra_info_t *)RING_GET_REQUEST(&front, front.req_prod_pvt);
    *e = x;
    front.req_prod_pvt++;
    print_extra(e);
}
static void packet(void) {
    unsigned shape = seq % 4, ndata, k, total, first_size, sizes[8];
    netif_extra_info_t x[2];
    unsigned nx = 0;
    memset(x, 0, sizeof x);
    switch (shape) {
    case 0:  /* TSO over IPv4: GSO extra, 3..5 data slots */
        ndata = 3 + seq % 3;
        x[0].type = XEN_NETIF_EXTRA_TYPE_GSO; x[0].u.gso.size = 1448; x[0].u.gso.type = XEN_NETIF_GSO_TYPE_TCPV4;
        nx = 1; break;
    case 1:  /* a plain one-slot packet */
        ndata = 1; break;
    case 2:  /* multicast add chained to a hash extra */
        ndata = 1 + seq % 3;
        x[0].type = XEN_NETIF_EXTRA_TYPE_MCAST_ADD; x[0].flags = XEN_NETIF_EXTRA_FLAG_MORE;
        x[0].u.mcast.addr[0] = 0x01; x[0].u.mcast.addr[2] = 0x5e; x[0].u.mcast.addr[4] = seq & 0xff; x[0].u.mcast.addr[5] = 7;
        x[1].type = XEN_NETIF_EXTRA_TYPE_HASH; x[1].u.hash.type = _XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP;
        x[1].u.hash.algorithm = XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ;
        for (k = 0; k < 4; k++) x[1].u.hash.value[k] = (seq + k * 61) & 0xff;
        nx = 2; break;
    default: /* TSO over IPv6 with a feature bit, one data slot */
        ndata = 1;
        x[0].type = XEN_NETIF_EXTRA_TYPE_GSO; x[0].u.gso.size = 1428; x[0].u.gso.type = XEN_NETIF_GSO_TYPE_TCPV6;
        x[0].u.gso.features = 1;
        nx = 1; break;
    }
    first_size = 1000 + (seq * 37) % 3000;
    total = first_size;
    for (k = 1; k < ndata; k++) { sizes[k] = 100 + (seq * 7 + k * 13) % 3900; total += sizes[k]; }
    put_req(0x1000 + seq * 8, (seq * 64) % 4096,
            (nx ? NETTXF_extra_info : 0) | (ndata > 1 ? NETTXF_more_data : 0) | NETTXF_csum_blank | (shape == 1 ? NETTXF_data_validated : 0),
            (seq * 8) & 0xffff, total);
    for (k = 0; k < nx; k++) put_extra(x[k]);
    for (k = 1; k < ndata; k++)
        put_req(0x1000 + seq * 8 + k, 0, k + 1 < ndata ? NETTXF_more_data : 0, (seq * 8 + k) & 0xffff, sizes[k]);
    seq++;
}
int main(int argc, char **argv) {
    netif_tx_sring_t *s = map_ring(argv[1]);
    int rounds = atoi(argv[2]), per_round = atoi(argv[3]), r, i, notify, more;
    SHARED_RING_INIT(s);
    FRONT_RING_INIT(&front, s, 4096);
    printf("SIZE %u\n", RING_SIZE(&front));
    for (r = 0; r < rounds; r++) {
        for (i = 0; i < per_round; i++) packet();
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&front, notify);
        printf("PUSH %d %u\n", notify, front.req_prod_pvt);
        wait_for("RSP");
        RING_IDX prod = front.sring->rsp_prod, cons;
        rmb();
        for (cons = front.rsp_cons; cons != prod; cons++) {
            netif_tx_response_t *p = RING_GET_RESPONSE(&front, cons);
            printf("R %u %d\n", p->id, p->status);
        }
        front.rsp_cons = prod;
        RING_FINAL_CHECK_FOR_RESPONSES(&front, more);
        printf("DONE %d %u\n", more, RING_FREE_REQUESTS(&front));
        fflush(stdout);
    }
    return 0;
}
"""

# A C netback-alike for the RX ring: RING_COPY_REQUEST every posted buffer,
# then answer in the same slots: multi-slot GSO packets with an extra-info
# slot (which uses up a request without filling it), single slots, errors.
RX_BACK = C_PRINTERS + r"""
static netif_rx_back_ring_t back;
static unsigned seq;

static void put_rsp(uint16_t id, uint16_t offset, uint16_t flags, int16_t status) {
    netif_rx_response_t *p = RING_GET_RESPONSE(&back, back.rsp_prod_pvt);
    p->id = id; p->offset = offset; p->flags = flags; p->status = status;
    back.rsp_prod_pvt++;
    printf("S %u %u %u %d\n", id, offset, flags, status);
}
static void put_extra(netif_extra_info_t x) {
    netif_extra_info_t *e = (netif_extra_info_t *)RING_GET_RESPONSE(&back, back.rsp_prod_pvt);
    *e = x;
    back.rsp_prod_pvt++;
    print_extra(e);
}
int main(int argc, char **argv) {
    netif_rx_sring_t *s = map_ring(argv[1]);
    int rounds = atoi(argv[2]), r, notify, more;
    netif_rx_request_t reqs[256];
    BACK_RING_INIT(&back, s, 4096);
    for (r = 0; r < rounds; r++) {
        unsigned nreq = 0, i = 0, k;
        wait_for("REQ");
        RING_IDX rp = back.sring->req_prod;
        rmb();
        if (RING_REQUEST_PROD_OVERFLOW(&back, rp)) { fprintf(stderr, "overflow\n"); return 4; }
        while (back.req_cons != rp) {
            RING_COPY_REQUEST(&back, back.req_cons, &reqs[nreq]);
            printf("Q %u %u\n", reqs[nreq].id, reqs[nreq].gref);
            back.req_cons++; nreq++;
        }
        while (i < nreq) {
            unsigned shape = seq % 5, left = nreq - i;
            netif_extra_info_t x;
            memset(&x, 0, sizeof x);
            if (shape == 0 && left >= 4) {          /* GSO: first + extra + 2 more data slots */
                x.type = XEN_NETIF_EXTRA_TYPE_GSO; x.u.gso.size = 1448; x.u.gso.type = XEN_NETIF_GSO_TYPE_TCPV4;
                put_rsp(reqs[i].id, 0, NETRXF_extra_info | NETRXF_more_data | NETRXF_csum_blank | NETRXF_data_validated, 4096);
                put_extra(x);
                put_rsp(reqs[i + 2].id, 0, NETRXF_more_data, 4096);
                put_rsp(reqs[i + 3].id, 0, 0, 100 + seq % 1000);
                i += 4;
            } else if (shape == 1 && left >= 2) {   /* hash extra, one data slot at an offset */
                x.type = XEN_NETIF_EXTRA_TYPE_HASH; x.u.hash.type = _XEN_NETIF_CTRL_HASH_TYPE_IPV6;
                x.u.hash.algorithm = XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ;
                for (k = 0; k < 4; k++) x.u.hash.value[k] = (seq * 3 + k) & 0xff;
                put_rsp(reqs[i].id, 64, NETRXF_extra_info | NETRXF_data_validated, 60 + seq % 1400);
                put_extra(x);
                i += 2;
            } else if (shape == 2) {
                put_rsp(reqs[i].id, 0, 0, NETIF_RSP_ERROR); i++;
            } else if (shape == 3) {
                put_rsp(reqs[i].id, 2, NETRXF_gso_prefix, NETIF_RSP_DROPPED); i++;
            } else {
                put_rsp(reqs[i].id, (seq * 2) % 4096, NETRXF_data_validated, 1 + seq % 1500); i++;
            }
            seq++;
        }
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&back, notify);
        RING_FINAL_CHECK_FOR_REQUESTS(&back, more);
        printf("PUSH %d %d\n", notify, more);
        fflush(stdout);
    }
    return 0;
}
"""


class _Peer:
    """A C program driven line by line over pipes."""

    def __init__(self, exe: str, *args: str) -> None:
        self.proc = subprocess.Popen([exe, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def line(self) -> str:
        assert self.proc.stdout is not None
        got = self.proc.stdout.readline()
        if not got:
            self.proc.wait(timeout=10)
            raise AssertionError(f"C peer ended (rc={self.proc.returncode}): {self.proc.stderr.read()}")
        return got.rstrip("\n")

    def lines_until(self, word: str) -> tuple[list[str], str]:
        out = []
        while not (got := self.line()).startswith(word):
            out.append(got)
        return out, got

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self) -> int:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()
        return rc


@pytest.fixture
def ring_page(tmp_path: Path) -> Iterator[tuple[str, memoryview]]:
    """A one-page file both sides mmap MAP_SHARED: the ring page."""
    path = tmp_path / "ring"
    path.write_bytes(bytes(4096))
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 4096)
    view = memoryview(mm)
    try:
        yield str(path), view
    finally:
        view.release()
        mm.close()


TX_STATUS = {4: n.NETIF_RSP_ERROR, 6: n.NETIF_RSP_DROPPED}   # by packet number % 7, else OKAY


@needs_headers
def test_tx_ring_c_frontend_python_backend(tmp_path: Path, ring_page: tuple[str, memoryview]) -> None:
    path, view = ring_page
    exe = build_c(tmp_path, "tx_front", TX_FRONT)
    rounds, per_round = 5, 30
    peer = _Peer(exe, path, str(rounds), str(per_round))
    try:
        assert peer.line() == f"SIZE {n.TX_RING_SIZE}"
        back = BackRing(n.tx_shared_ring([view]))
        pkt_no = 0
        for r in range(rounds):
            c_lines, push = peer.lines_until("PUSH")
            # Round 1 is not followed by final_check_for_requests, so req_event
            # is stale for round 2's push and the frontend must not notify.
            assert push.split()[1] == ("0" if r == 2 else "1"), (r, push)
            slots = back.take_requests()
            assert back.req_cons == int(push.split()[2])
            assert all(len(s) == n.TX_SLOT_SIZE for s in slots)

            packets, pos = [], 0
            while pos < len(slots):
                pkt = n.walk_tx_packet(slots[pos:])
                assert pkt is not None, f"chain at slot {pos} runs past what was pushed"
                packets.append(pkt)
                pos += pkt.slots
            ours = []
            for pkt in packets:
                ours.append(_tx_line(pkt.first))
                ours += [_extra_line(x) for x in pkt.extras]
                ours += [_tx_line(f) for f in pkt.frags]
            assert ours == c_lines
            assert len(packets) == per_round

            if r == 0:   # the brief's packet, spelled out
                p0 = packets[0]
                assert p0.first.flags & (n.NETTXF_extra_info | n.NETTXF_more_data) == \
                    n.NETTXF_extra_info | n.NETTXF_more_data
                assert p0.extras == (n.ExtraInfo(n.XEN_NETIF_EXTRA_TYPE_GSO, 0,
                                                 n.GsoInfo(1448, n.XEN_NETIF_GSO_TYPE_TCPV4, 0, 0)),)
                assert len(p0.frags) == 2 and p0.frags[-1].flags == 0
                assert p0.first.size == 1000 + sum(f.size for f in p0.frags) == \
                    p0.first_fragment_size + sum(f.size for f in p0.frags)
                assert packets[2].extras[0].more and isinstance(packets[2].extras[1].body, n.HashInfo)

            expected_r = []
            for pkt in packets:
                status = TX_STATUS.get(pkt_no % 7, n.NETIF_RSP_OKAY)
                for raw in n.tx_responses(pkt, status):
                    back.put_response(raw)
                    rsp = n.parse_tx_response(raw)
                    expected_r.append(f"R {rsp.id} {rsp.status}")
                pkt_no += 1
            assert back.push_responses() is True       # the frontend re-armed rsp_event
            if r != 1:
                assert back.final_check_for_requests() is False
            peer.send("RSP")
            r_lines, done = peer.lines_until("DONE")
            assert r_lines == expected_r
            assert done == f"DONE 0 {n.TX_RING_SIZE}"
        assert back.req_cons > n.TX_RING_SIZE, "indices should have wrapped round the ring"
        assert {"R 0 1"} & set(expected_r)
    finally:
        assert peer.close() == 0


@needs_headers
def test_rx_ring_python_frontend_c_backend(tmp_path: Path, ring_page: tuple[str, memoryview]) -> None:
    path, view = ring_page
    exe = build_c(tmp_path, "rx_back", RX_BACK)
    front = FrontRing(n.rx_shared_ring([view]))          # SHARED_RING_INIT before the backend attaches
    counts = [100, 150, 120]
    peer = _Peer(exe, path, str(len(counts)))
    seen_flags, seen_status, seen_offsets = 0, set(), set()
    try:
        next_id = 0
        for r, count in enumerate(counts):
            posted = []
            for _ in range(count):
                req = n.RxRequest(next_id & 0xFFFF, 0x20000 + next_id)
                next_id += 7
                posted.append(req)
                front.put_request(n.pack_rx_request(req))
            assert front.push_requests() is True      # the backend re-armed req_event each round
            peer.send("REQ")
            q_lines = [peer.line() for _ in range(count)]
            assert q_lines == [f"Q {q.id} {q.gref}" for q in posted]
            c_lines, push = peer.lines_until("PUSH")
            # Round 1 is not followed by final_check_for_responses: no event for round 2.
            assert push == ("PUSH 0 0" if r == 2 else "PUSH 1 0"), (r, push)

            slots = front.take_responses()
            assert len(slots) == count
            ours, pos = [], 0
            while pos < len(slots):
                pkt = n.walk_rx_packet(slots[pos:])
                assert pkt is not None
                ours.append(_rx_line(pkt.first))
                ours += [_extra_line(x) for x in pkt.extras]
                ours += [_rx_line(f) for f in pkt.frags]
                # Responses sit in their request's slot: data slots echo that slot's id.
                assert pkt.first.id == posted[pos].id
                for k, frag in enumerate(pkt.frags):
                    assert frag.id == posted[pos + 1 + len(pkt.extras) + k].id
                for resp in pkt.responses:
                    seen_flags |= resp.flags
                    seen_status.add(resp.status)
                    seen_offsets.add(resp.offset)
                if pkt.extras and isinstance(pkt.extras[0].body, n.GsoInfo):
                    assert pkt.extras[0].body == n.GsoInfo(1448, n.XEN_NETIF_GSO_TYPE_TCPV4)
                    assert pkt.status == 2 * 4096 + pkt.frags[-1].status
                pos += pkt.slots
            assert ours == c_lines
            if r != 1:
                assert front.final_check_for_responses() is False
            assert front.free_requests() == n.RX_RING_SIZE
        assert front.req_prod_pvt > n.RX_RING_SIZE, "indices should have wrapped round the ring"
        assert seen_flags == (n.NETRXF_extra_info | n.NETRXF_more_data | n.NETRXF_csum_blank
                              | n.NETRXF_data_validated | n.NETRXF_gso_prefix)
        assert {n.NETIF_RSP_ERROR, n.NETIF_RSP_DROPPED} <= seen_status
        assert {0, 2, 64} <= seen_offsets
    finally:
        assert peer.close() == 0
