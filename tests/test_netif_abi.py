"""xen/io/netif.h in Python (domains/abi/netif.py) against Xen's own header.

The reference is always the C compiler's view of /usr/include/xen/io/netif.h
(Debian's libxen-dev): constants and layouts are printed by programs built
from it, and rings are exchanged with C frontends/backends that use ring.h's
macros on the same shared page (a file both sides mmap).  The C programs
print what they wrote; the Python side must parse exactly that.
"""

from __future__ import annotations

import functools
import mmap
import os
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xdom.domains.abi import netif as n
from xdom.domains.abi.ring import RING_HEADER_SIZE, BackRing, FrontRing, ring_size

HEADER = "/usr/include/xen/io/netif.h"

needs_headers = pytest.mark.skipif(
    not os.path.exists(HEADER) or not shutil.which("gcc"),
    reason=f"needs {HEADER} (Debian's libxen-dev) and gcc (make test installs them as root)")

# ring.h with __XEN_INTERFACE_VERSION__ unset maps xen_mb() and friends onto
# mb()/rmb()/wmb(), which a user-space program has to supply.
PRELUDE = r"""
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
#define mb()  __sync_synchronize()
#define rmb() __sync_synchronize()
#define wmb() __sync_synchronize()
"""


@functools.cache
def _m32_works() -> bool:
    """Whether gcc can build and run 32-bit programs here (gcc-multilib)."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "p.c")
        with open(src, "w") as f:
            f.write("#include <stdio.h>\nint main(void) { return 0; }\n")
        exe = os.path.join(d, "p")
        if subprocess.run(["gcc", "-m32", "-o", exe, src], capture_output=True).returncode:
            return False
        return subprocess.run([exe], capture_output=True).returncode == 0


def _build(tmp_path: Path, name: str, body: str, arch: str = "-m64", defines: str = "") -> str:
    if arch == "-m32" and not _m32_works():
        pytest.skip("gcc -m32 cannot build here (no gcc-multilib)")
    src = tmp_path / f"{name}.c"
    exe = tmp_path / name
    src.write_text(PRELUDE + defines + "#include <xen/io/netif.h>\n" + body)
    res = subprocess.run(["gcc", "-Wall", "-O1", arch, "-o", str(exe), str(src)], capture_output=True, text=True)
    assert res.returncode == 0, f"gcc failed on {src}:\n{res.stderr}"
    return str(exe)


def _run(exe: str, *args: str, stdin: str = "") -> str:
    res = subprocess.run([exe, *args], input=stdin, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


# ---------------------------------------------------------------------------
# 1. constants, layouts, ring sizes
# ---------------------------------------------------------------------------

_PREFIXES = ("NETTXF_", "NETRXF_", "NETIF_RSP_", "XEN_NETIF_", "_XEN_NETIF_CTRL_HASH_TYPE_")
LINUX_ALIASES = {f"XEN_NETIF_RSP_{s}": f"NETIF_RSP_{s}" for s in ("DROPPED", "ERROR", "OKAY", "NULL")}
CONST_NAMES = sorted(name for name in vars(n) if name.startswith(_PREFIXES) and name not in LINUX_ALIASES)


def _header_macros() -> set[str]:
    """Every value macro of the protocol the header defines (bit-number helpers aside)."""
    text = Path(HEADER).read_text()
    names = set(re.findall(r"^#define\s+(_?(?:NETTXF|NETRXF|NETIF_RSP|XEN_NETIF)\w*)", text, re.M))
    return {m for m in names if not m.startswith("_") or m.startswith("_XEN_NETIF_CTRL_HASH_TYPE_")}


def _le(value: int, width: int, signed: bool = False) -> bytes:
    return value.to_bytes(width, "little", signed=signed)


def _layout_cases() -> list[tuple[str, bytes, dict[str, bytes]]]:
    """(C type, our packing of a sample with distinct field values, {member: expected bytes there}).

    Built at run time so a broken layout fails this test, not the whole module's collection.
    """
    gso = n.ExtraInfo(n.XEN_NETIF_EXTRA_TYPE_GSO, 0x5A, n.GsoInfo(0x1234, 0x56, 0x78, 0x9ABC))
    mcast = n.mcast_extra(bytes.fromhex("01005e7f0102"), add=False, flags=1)
    hsh = n.ExtraInfo(n.XEN_NETIF_EXTRA_TYPE_HASH, 0, n.HashInfo(3, 1, bytes.fromhex("a1b2c3d4")))
    raw = n.ExtraInfo(0x77, 0x88, bytes.fromhex("0102030405ff"))
    return [
        ("struct netif_tx_request", n.pack_tx_request(n.TxRequest(0x11223344, 0x5566, 0x7788, 0x99AA, 0xBBCC)),
         {"gref": _le(0x11223344, 4), "offset": _le(0x5566, 2), "flags": _le(0x7788, 2), "id": _le(0x99AA, 2),
          "size": _le(0xBBCC, 2)}),
        ("struct netif_tx_response", n.pack_tx_response(n.TxResponse(0x1234, -3)),
         {"id": _le(0x1234, 2), "status": _le(-3, 2, True)}),
        ("struct netif_rx_request", n.pack_rx_request(n.RxRequest(0x4321, 0xA1B2C3D4)),
         {"id": _le(0x4321, 2), "pad": bytes(2), "gref": _le(0xA1B2C3D4, 4)}),
        ("struct netif_rx_response", n.pack_rx_response(n.RxResponse(0x1111, 0x2222, 0x3333, -2)),
         {"id": _le(0x1111, 2), "offset": _le(0x2222, 2), "flags": _le(0x3333, 2), "status": _le(-2, 2, True)}),
        ("struct netif_extra_info", n.pack_extra_info(gso),
         {"type": b"\x01", "flags": b"\x5a", "u": bytes.fromhex("34125678bc9a"),
          "u.gso.size": _le(0x1234, 2), "u.gso.type": b"\x56", "u.gso.pad": b"\x78",
          "u.gso.features": _le(0x9ABC, 2)}),
        ("struct netif_extra_info", n.pack_extra_info(mcast),
         {"type": bytes([n.XEN_NETIF_EXTRA_TYPE_MCAST_DEL]), "flags": b"\x01",
          "u.mcast.addr": bytes.fromhex("01005e7f0102")}),
        ("struct netif_extra_info", n.pack_extra_info(hsh),
         {"type": bytes([n.XEN_NETIF_EXTRA_TYPE_HASH]), "u.hash.type": b"\x03", "u.hash.algorithm": b"\x01",
          "u.hash.value": bytes.fromhex("a1b2c3d4")}),
        ("struct netif_extra_info", n.pack_extra_info(raw),
         {"type": b"\x77", "flags": b"\x88", "u.pad": bytes.fromhex("0102030405ff")}),
        ("struct xen_netif_ctrl_request", n.pack_ctrl_request(n.CtrlRequest(0x0102, 0x0304, (5, 6, 0xFFFFFFFF))),
         {"id": _le(0x0102, 2), "type": _le(0x0304, 2), "data": _le(5, 4) + _le(6, 4) + _le(0xFFFFFFFF, 4),
          "data[1]": _le(6, 4)}),
        ("struct xen_netif_ctrl_response", n.pack_ctrl_response(n.CtrlResponse(7, 8, 0x01020304, 0xA0B0C0D0)),
         {"id": _le(7, 2), "type": _le(8, 2), "status": _le(0x01020304, 4), "data": _le(0xA0B0C0D0, 4)}),
        ("struct xen_netif_gref", n.pack_gref(n.Gref(0xDEADBEEF, 1, 0xFFFF)),
         {"ref": _le(0xDEADBEEF, 4), "flags": _le(1, 2), "status": _le(0xFFFF, 2)}),
    ]


RING_SIZES = {  # C expression -> ours
    "__CONST_RING_SIZE(netif_tx, 4096)": n.TX_RING_SIZE,
    "__CONST_RING_SIZE(netif_rx, 4096)": n.RX_RING_SIZE,
    "__CONST_RING_SIZE(xen_netif_ctrl, 4096)": n.CTRL_RING_SIZE,
    "__CONST_RING_SIZE(netif_tx, 2 * 4096)": ring_size(2, n.TX_REQUEST.size, n.TX_RESPONSE.size),
    "__CONST_RING_SIZE(netif_rx, 8 * 4096)": ring_size(8, n.RX_REQUEST.size, n.RX_RESPONSE.size),
    "sizeof(union netif_tx_sring_entry)": n.TX_SLOT_SIZE,
    "sizeof(union netif_rx_sring_entry)": n.RX_SLOT_SIZE,
    "sizeof(union xen_netif_ctrl_sring_entry)": n.CTRL_SLOT_SIZE,
    "offsetof(struct netif_tx_sring, ring)": RING_HEADER_SIZE,
    "offsetof(struct netif_rx_sring, ring)": RING_HEADER_SIZE,
    "sizeof(netif_tx_request_t)": n.TX_REQUEST.size,
    "sizeof(netif_tx_response_t)": n.TX_RESPONSE.size,
    "sizeof(netif_rx_request_t)": n.RX_REQUEST.size,
    "sizeof(netif_rx_response_t)": n.RX_RESPONSE.size,
    "sizeof(netif_extra_info_t)": n.EXTRA_INFO_SIZE,
    "offsetof(struct netif_extra_info, u)": n.EXTRA_UNION_OFFSET,
}


def test_constant_list_is_the_headers_list() -> None:
    """We define every protocol constant the header has, and nothing it lacks (e.g. no EXTRA_TYPE_XDP)."""
    if not os.path.exists(HEADER):
        pytest.skip(f"needs {HEADER} (Debian's libxen-dev)")
    assert set(CONST_NAMES) == _header_macros()
    for alias, name in LINUX_ALIASES.items():
        assert getattr(n, alias) == getattr(n, name)


@needs_headers
@pytest.mark.parametrize("arch", ["-m64", "-m32"])
def test_constants_layouts_and_ring_sizes_match_header(tmp_path: Path, arch: str) -> None:
    lines = [f'printf("const {c} %lld\\n", (long long)({c}));' for c in CONST_NAMES]
    cases = _layout_cases()
    for i, (ctype, _, members) in enumerate(cases):
        lines.append(f'printf("sizeof {i} %zu\\n", sizeof({ctype}));')
        for m in members:
            lines.append(f'printf("member {i} {m} %zu %zu\\n", offsetof({ctype}, {m}), '
                         f'sizeof((({ctype} *)0)->{m}));')
    for j, expr in enumerate(RING_SIZES):
        lines.append(f'printf("ring {j} %lld\\n", (long long)({expr}));')
    exe = _build(tmp_path, "layout", "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n", arch)
    xen_consts: dict[str, int] = {}
    sizes: dict[int, int] = {}
    members: dict[tuple[int, str], tuple[int, int]] = {}
    rings: dict[int, int] = {}
    for line in _run(exe).splitlines():
        kind, *rest = line.split()
        if kind == "const":
            xen_consts[rest[0]] = int(rest[1])
        elif kind == "sizeof":
            sizes[int(rest[0])] = int(rest[1])
        elif kind == "member":
            members[(int(rest[0]), rest[1])] = (int(rest[2]), int(rest[3]))
        else:
            rings[int(rest[0])] = int(rest[1])

    assert xen_consts == {c: getattr(n, c) for c in CONST_NAMES}
    for i, (ctype, packed, expect) in enumerate(cases):
        assert sizes[i] == len(packed), ctype
        for m, value in expect.items():
            off, size = members[(i, m)]
            assert size == len(value), f"{ctype}.{m}: C size {size}"
            assert packed[off:off + size] == value, f"{ctype}.{m} at C offset {off}"
    assert {expr: rings[j] for j, expr in enumerate(RING_SIZES)} == RING_SIZES
    assert n.TX_RING_SIZE == n.RX_RING_SIZE == 256


# ---------------------------------------------------------------------------
# 2. ring pages exchanged with C through a shared file
# ---------------------------------------------------------------------------

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
    exe = _build(tmp_path, "tx_front", TX_FRONT)
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
    exe = _build(tmp_path, "rx_back", RX_BACK)
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


# ---------------------------------------------------------------------------
# Toeplitz: the header's reference implementation and Microsoft's RSS vector
# ---------------------------------------------------------------------------

RSS_KEY = bytes.fromhex("6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa")


def test_toeplitz_matches_microsoft_rss_vectors() -> None:
    # IPv4 66.9.149.187 -> 161.142.100.80, and with TCP ports 2794 -> 1766.
    v4 = bytes([66, 9, 149, 187, 161, 142, 100, 80])
    assert n.toeplitz_hash(RSS_KEY, v4) == 0x323E8FC2
    assert n.toeplitz_hash(RSS_KEY, v4 + (2794).to_bytes(2, "big") + (1766).to_bytes(2, "big")) == 0x51CCC178


TOEPLITZ_MAIN = r"""
int main(void) {
    unsigned kl, dl, i, v;
    uint8_t key[64], buf[64];
    while (scanf("%u", &kl) == 1) {
        for (i = 0; i < kl; i++) { if (scanf("%u", &v) != 1) return 1; key[i] = v; }
        if (scanf("%u", &dl) != 1) return 1;
        for (i = 0; i < dl; i++) { if (scanf("%u", &v) != 1) return 1; buf[i] = v; }
        printf("%u\n", xen_netif_toeplitz_hash(key, kl, buf, dl));
    }
    return 0;
}
"""


@needs_headers
def test_toeplitz_matches_header_implementation(tmp_path: Path) -> None:
    exe = _build(tmp_path, "toeplitz", TOEPLITZ_MAIN, defines="#define XEN_NETIF_DEFINE_TOEPLITZ\n")
    rng = random.Random(4242)
    cases = [(RSS_KEY, bytes(range(36))), (b"", b"\xff" * 8), (b"\x01\x02\x03", b"\x80"), (RSS_KEY, b"")]
    cases += [(rng.randbytes(rng.randrange(0, 64)), rng.randbytes(rng.randrange(0, 64))) for _ in range(300)]
    text = "".join(f"{len(k)} {' '.join(map(str, k))} {len(d)} {' '.join(map(str, d))}\n" for k, d in cases)
    got = [int(x) for x in _run(exe, stdin=text).split()]
    assert got == [n.toeplitz_hash(k, d) for k, d in cases]


# ---------------------------------------------------------------------------
# 3. properties: pack -> parse is identity; parse never raises
# ---------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
s16 = st.integers(-0x8000, 0x7FFF)
u32 = st.integers(0, 0xFFFFFFFF)

tx_requests = st.builds(n.TxRequest, u32, u16, u16, u16, u16)
tx_responses = st.builds(n.TxResponse, u16, s16)
rx_requests = st.builds(n.RxRequest, u16, u32)
rx_responses = st.builds(n.RxResponse, u16, u16, u16, s16)
extra_infos = st.one_of(
    st.builds(n.ExtraInfo, st.just(n.XEN_NETIF_EXTRA_TYPE_GSO), u8, st.builds(n.GsoInfo, u16, u8, u8, u16)),
    st.builds(n.ExtraInfo, st.sampled_from([n.XEN_NETIF_EXTRA_TYPE_MCAST_ADD, n.XEN_NETIF_EXTRA_TYPE_MCAST_DEL]),
              u8, st.builds(n.McastInfo, st.binary(min_size=6, max_size=6))),
    st.builds(n.ExtraInfo, st.just(n.XEN_NETIF_EXTRA_TYPE_HASH), u8,
              st.builds(n.HashInfo, u8, u8, st.binary(min_size=4, max_size=4))),
    st.builds(n.ExtraInfo, u8.filter(lambda t: t not in (1, 2, 3, 4)), u8, st.binary(min_size=6, max_size=6)),
)
ctrl_requests = st.builds(n.CtrlRequest, u16, u16, st.tuples(u32, u32, u32))
ctrl_responses = st.builds(n.CtrlResponse, u16, u16, u32, u32)
grefs = st.builds(n.Gref, u32, u16, u16)

ROUND_TRIPS = [
    (tx_requests, n.pack_tx_request, n.parse_tx_request),
    (tx_responses, n.pack_tx_response, n.parse_tx_response),
    (rx_requests, n.pack_rx_request, n.parse_rx_request),
    (rx_responses, n.pack_rx_response, n.parse_rx_response),
    (extra_infos, n.pack_extra_info, n.parse_extra_info),
    (extra_infos, lambda x: n.pack_extra_info(x, n.TX_SLOT_SIZE), n.parse_extra_info),
    (ctrl_requests, n.pack_ctrl_request, n.parse_ctrl_request),
    (ctrl_responses, n.pack_ctrl_response, n.parse_ctrl_response),
    (grefs, n.pack_gref, n.parse_gref),
]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_pack_then_parse_is_identity(data: st.DataObject) -> None:
    for strategy, pack, parse in ROUND_TRIPS:
        value = data.draw(strategy)
        assert parse(pack(value)) == value


# (parser, slot length, bytes the structure covers, whether pack(parse(b)) gives those bytes back)
PARSERS = [
    (n.parse_tx_request, n.pack_tx_request, n.TX_SLOT_SIZE, 12),
    (n.parse_tx_response, n.pack_tx_response, n.TX_SLOT_SIZE, 4),
    (n.parse_extra_info, n.pack_extra_info, n.TX_SLOT_SIZE, 8),
    (n.parse_rx_request, None, n.RX_SLOT_SIZE, 8),
    (n.parse_rx_response, n.pack_rx_response, n.RX_SLOT_SIZE, 8),
    (n.parse_extra_info, n.pack_extra_info, n.RX_SLOT_SIZE, 8),
    (n.parse_ctrl_request, n.pack_ctrl_request, n.CTRL_SLOT_SIZE, 16),
    (n.parse_ctrl_response, n.pack_ctrl_response, n.CTRL_SLOT_SIZE, 12),
    (n.parse_gref, n.pack_gref, n.GREF.size, 8),
]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_parse_never_raises_on_slot_bytes(data: st.DataObject) -> None:
    for parse, pack, slot, covered in PARSERS:
        raw = data.draw(st.binary(min_size=slot, max_size=slot))
        value = parse(raw)
        if pack is not None:
            # No field is lost: re-packing gives back the bytes the structure spans.
            assert pack(value) == raw[:covered]
        else:
            assert n.pack_rx_request(value) == raw[:2] + b"\0\0" + raw[4:8]
        assert parse(memoryview(raw)) == value


@st.composite
def tx_packets(draw: st.DrawFn) -> n.TxPacket:
    extras = draw(st.lists(extra_infos, max_size=3))
    more = n.XEN_NETIF_EXTRA_FLAG_MORE
    extras = [n.ExtraInfo(x.type, (x.flags & ~more) | (more if i + 1 < len(extras) else 0), x.body)
              for i, x in enumerate(extras)]
    frags = draw(st.lists(tx_requests, max_size=n.XEN_NETIF_NR_SLOTS_MIN))
    cont = n.NETTXF_more_data
    frags = [n.TxRequest(f.gref, f.offset, (f.flags & ~cont) | (cont if i + 1 < len(frags) else 0), f.id, f.size)
             for i, f in enumerate(frags)]
    first = draw(tx_requests)
    flags = first.flags & ~(n.NETTXF_more_data | n.NETTXF_extra_info)
    flags |= (n.NETTXF_extra_info if extras else 0) | (n.NETTXF_more_data if frags else 0)
    return n.TxPacket(n.TxRequest(first.gref, first.offset, flags, first.id, first.size), tuple(extras), tuple(frags))


@settings(max_examples=200, deadline=None)
@given(tx_packets(), st.lists(st.binary(min_size=12, max_size=12), max_size=3))
def test_tx_packet_walk_round_trip(pkt: n.TxPacket, trailing: list[bytes]) -> None:
    slots = [n.pack_tx_request(pkt.first)] + [n.pack_extra_info(x, n.TX_SLOT_SIZE) for x in pkt.extras]
    slots += [n.pack_tx_request(f) for f in pkt.frags]
    assert len(slots) == pkt.slots
    assert n.walk_tx_packet(slots + trailing) == pkt          # what follows the packet is not read
    assert n.walk_tx_packet(slots[:-1]) is None               # a cut chain is incomplete, not an error
    responses = n.tx_responses(pkt, n.NETIF_RSP_OKAY)
    assert len(responses) == pkt.slots
    extra_rsps = [n.parse_tx_response(r) for r in responses[1:1 + len(pkt.extras)]]
    assert extra_rsps == [n.TxResponse(0, n.NETIF_RSP_NULL)] * len(pkt.extras)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=12, max_size=12), max_size=24),
       st.lists(st.binary(min_size=8, max_size=8), max_size=24))
def test_walkers_never_raise_on_arbitrary_slots(tx_slots: list[bytes], rx_slots: list[bytes]) -> None:
    tx = n.walk_tx_packet(tx_slots)
    assert tx is None or 1 <= tx.slots <= len(tx_slots)
    rx = n.walk_rx_packet(rx_slots)
    assert rx is None or 1 <= rx.slots <= len(rx_slots)
    if rx is not None:
        assert isinstance(rx.status, int)
