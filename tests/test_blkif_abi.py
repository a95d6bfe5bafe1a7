"""Our ring.h and blkif.h transcriptions against Xen's real headers, bit for bit.

One small C program, compiled against Debian's /usr/include/xen with
``gcc -m64`` (our X86_64 layout) and ``gcc -m32`` (X86_32), is the reference:

* ``peer layout`` prints every BLKIF_/VDISK_ constant, sizeof/offsetof of
  every field of the request, segment, discard, indirect and response
  structures, and ``__CONST_RING_SIZE(blkif, 4096 * n)``;
* ``peer RINGFILE NPAGES`` maps a ring file MAP_SHARED and obeys one command
  a line on stdin, acting as a frontend (SHARED_RING_INIT, FRONT_RING_INIT /
  FRONT_RING_ATTACH, RING_GET_REQUEST, RING_PUSH_REQUESTS_AND_CHECK_NOTIFY,
  RING_GET_RESPONSE, RING_FINAL_CHECK_FOR_RESPONSES) and/or a backend
  (BACK_RING_INIT / BACK_RING_ATTACH, RING_COPY_REQUEST with
  RING_REQUEST_PROD_OVERFLOW / RING_REQUEST_CONS_OVERFLOW, RING_GET_RESPONSE,
  RING_PUSH_RESPONSES_AND_CHECK_NOTIFY, RING_FINAL_CHECK_FOR_REQUESTS).

Python maps the same file (one mmap per page, so a multi-page SharedRing
really is a list of separate buffers) and plays the other end.  The same
script of ring operations is run with C/C (the reference), Python/C, C/Python
and Python/Python ends; every notify/work boolean, free count, request copy
(raw bytes and decoded fields), response and the four shared indices after
every step must equal the C/C run.  Rings start at index 0 and just below
2**32, on one page and on four (order 2, slots straddling page boundaries).

The last tests are pure Python: a hypothesis property that FrontRing and
BackRing never lose, duplicate or reorder anything, and that a BackRing
facing a req_prod more than a ring ahead raises RingOverflow.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import mmap
import os
import random
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xdom.domains.abi import blkif
from xdom.domains.abi.blkif import (
    BLKIF_DISCARD_SECURE,
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    SEGMENT,
    SEGMENTS_PER_INDIRECT_FRAME,
    X86_32,
    X86_64,
    BlkifABI,
    Request,
    Segment,
    pack_discard_request,
    pack_indirect_request,
    pack_request,
    pack_response,
    parse_request,
    parse_response,
)
from xdom.domains.abi.ring import (
    PAGE_SIZE,
    RING_HEADER_SIZE,
    BackRing,
    FrontRing,
    RingOverflow,
    SharedRing,
    ring_size,
)

BLKIF_H = "/usr/include/xen/io/blkif.h"
RING_H = "/usr/include/xen/io/ring.h"
MASK32 = 0xFFFFFFFF

needs_headers = pytest.mark.skipif(
    not (os.path.exists(BLKIF_H) and os.path.exists(RING_H)) or not shutil.which("gcc"),
    reason="needs Debian's libxen-dev (/usr/include/xen/io/{ring,blkif}.h) and gcc (make test installs them)")

ABIS = {"x86_64": (X86_64, "-m64"), "x86_32": (X86_32, "-m32")}

# Every field our code packs or parses, per C structure.
FIELDS = {
    "blkif_request_segment": ["gref", "first_sect", "last_sect"],
    "blkif_request": ["operation", "nr_segments", "handle", "id", "sector_number", "seg"],
    "blkif_request_discard": ["operation", "flag", "handle", "id", "sector_number", "nr_sectors"],
    "blkif_request_indirect": ["operation", "indirect_op", "nr_segments", "id", "sector_number", "handle",
                               "indirect_grefs"],
    "blkif_response": ["id", "operation", "status"],
    "blkif_sring": ["req_prod", "req_event", "rsp_prod", "rsp_event", "ring"],
}
RING_PAGES = (1, 2, 4, 8, 16)


def header_constants() -> list[str]:
    """Every BLKIF_*/VDISK_* macro blkif.h defines (its names, not ours)."""
    with open(BLKIF_H) as f:
        return re.findall(r"^#define\s+((?:BLKIF|VDISK)_\w+)\s", f.read(), re.M)


C_PEER = r"""
/* A blkif ring peer built from Xen's own macros.
 *   peer layout             print constants and structure layouts
 *   peer RINGFILE NPAGES    map RINGFILE and obey one command a line (see main)
 */
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* ring.h's legacy interface version leaves the barriers to the includer. */
#define mb()  __sync_synchronize()
#define rmb() __sync_synchronize()
#define wmb() __sync_synchronize()
#include <xen/xen.h>
#include <xen/io/blkif.h>

#define SHOW(key, val) printf("%s %lld\n", key, (long long)(val))
#define CONST(name) SHOW(#name, name)
#define FIELD(st, f) do { SHOW("off:" #st ":" #f, offsetof(struct st, f)); \
                          SHOW("size:" #st ":" #f, sizeof(((struct st *)0)->f)); } while (0)
#define SIZEOF(st) SHOW("sizeof:" #st, sizeof(struct st))
#define RINGSIZE(n) SHOW("ring_size:" #n, __CONST_RING_SIZE(blkif, 4096 * n))

static void layout(void)
{
@LAYOUT@
    SHOW("sizeof:blkif_sring_entry", sizeof(union blkif_sring_entry));
    SHOW("segs_per_indirect_frame", 4096 / sizeof(struct blkif_request_segment));
}

static blkif_sring_t *sring;
static unsigned long ring_bytes;
static blkif_front_ring_t front;
static blkif_back_ring_t back;
static blkif_request_t copies[4096];

static unsigned long long arg(void)
{
    char *word = strtok(NULL, " \n");
    if (!word) {
        fprintf(stderr, "peer: missing argument\n");
        exit(2);
    }
    return strtoull(word, NULL, 10);      /* "-2" wraps, and int16_t status wraps back */
}

/* put rw OP ID SECTOR HANDLE NSEG (GREF FIRST LAST)*
 * put discard ID SECTOR NR_SECTORS HANDLE FLAG
 * put indirect OP ID SECTOR HANDLE NR_SEGMENTS NGREFS GREF* */
static void put_request(void)
{
    char *kind = strtok(NULL, " \n");
    blkif_request_t *req = RING_GET_REQUEST(&front, front.req_prod_pvt);

    memset(req, 0, sizeof(*req));   /* so the slot compares bytewise with Python's zero-padded packing */
    if (!strcmp(kind, "rw")) {
        req->operation = arg();
        req->id = arg();
        req->sector_number = arg();
        req->handle = arg();
        req->nr_segments = arg();
        for (int i = 0; i < req->nr_segments; i++) {
            req->seg[i].gref = arg();
            req->seg[i].first_sect = arg();
            req->seg[i].last_sect = arg();
        }
    } else if (!strcmp(kind, "discard")) {
        blkif_request_discard_t *d = (blkif_request_discard_t *)req;
        d->operation = BLKIF_OP_DISCARD;
        d->id = arg();
        d->sector_number = arg();
        d->nr_sectors = arg();
        d->handle = arg();
        d->flag = arg();
    } else {
        blkif_request_indirect_t *ind = (blkif_request_indirect_t *)req;
        ind->operation = BLKIF_OP_INDIRECT;
        ind->indirect_op = arg();
        ind->id = arg();
        ind->sector_number = arg();
        ind->handle = arg();
        ind->nr_segments = arg();
        unsigned int n = arg();
        for (unsigned int i = 0; i < n; i++)
            ind->indirect_grefs[i] = arg();
    }
    front.req_prod_pvt++;
}

/* One line: the copy's bytes in hex, then its fields as blkif.h reads them. */
static void dump_request(const blkif_request_t *req)
{
    const unsigned char *p = (const unsigned char *)req;
    for (size_t i = 0; i < sizeof(*req); i++)
        printf("%02x", p[i]);
    if (req->operation == BLKIF_OP_DISCARD) {
        const blkif_request_discard_t *d = (const blkif_request_discard_t *)req;
        printf(" discard %llu %llu %llu %u %u\n", (unsigned long long)d->id,
               (unsigned long long)d->sector_number, (unsigned long long)d->nr_sectors, d->handle, d->flag);
    } else if (req->operation == BLKIF_OP_INDIRECT) {
        const blkif_request_indirect_t *ind = (const blkif_request_indirect_t *)req;
        printf(" indirect %u %llu %llu %u %u", ind->indirect_op, (unsigned long long)ind->id,
               (unsigned long long)ind->sector_number, ind->handle, ind->nr_segments);
        for (int i = 0; i < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; i++)
            printf(" %u", ind->indirect_grefs[i]);
        printf("\n");
    } else {
        printf(" rw %u %llu %llu %u %u", req->operation, (unsigned long long)req->id,
               (unsigned long long)req->sector_number, req->handle, req->nr_segments);
        for (int i = 0; i < req->nr_segments && i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++)
            printf(" %u %u %u", req->seg[i].gref, req->seg[i].first_sect, req->seg[i].last_sect);
        printf("\n");
    }
}

/* The blkback loop: read req_prod once, refuse an impossible one, copy each slot out. */
static void take_requests(unsigned long long limit)
{
    RING_IDX rc = back.req_cons, rp = sring->req_prod;
    unsigned int n = 0;

    rmb();
    if (RING_REQUEST_PROD_OVERFLOW(&back, rp)) {
        printf("overflow\n");
        return;
    }
    while (rc != rp && n < limit) {
        if (RING_REQUEST_CONS_OVERFLOW(&back, rc))
            break;
        RING_COPY_REQUEST(&back, rc, &copies[n]);
        back.req_cons = ++rc;
        n++;
    }
    printf("reqs %u\n", n);
    for (unsigned int i = 0; i < n; i++)
        dump_request(&copies[i]);
}

static void take_responses(void)
{
    RING_IDX rc = front.rsp_cons, rp = sring->rsp_prod;

    rmb();
    if (RING_RESPONSE_PROD_OVERFLOW(&front, rp)) {
        printf("overflow\n");
        return;
    }
    printf("rsps %u", rp - rc);
    for (; rc != rp; rc++) {
        blkif_response_t *rsp = RING_GET_RESPONSE(&front, rc);
        printf(" %llu %u %d", (unsigned long long)rsp->id, rsp->operation, rsp->status);
    }
    front.rsp_cons = rc;
    printf("\n");
}

int main(int argc, char **argv)
{
    char line[65536];
    int fd, flag;

    if (argc == 2 && !strcmp(argv[1], "layout")) {
        layout();
        return 0;
    }
    if (argc != 3)
        return 2;
    fd = open(argv[1], O_RDWR);
    ring_bytes = strtoul(argv[2], NULL, 10) * 4096;
    sring = fd < 0 ? MAP_FAILED : mmap(NULL, ring_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (sring == MAP_FAILED) {
        perror("peer");
        return 1;
    }
    while (fgets(line, sizeof(line), stdin)) {
        char *cmd = strtok(line, " \n");
        if (!cmd)
            continue;
        if (!strcmp(cmd, "quit")) {
            break;
        } else if (!strcmp(cmd, "init")) {               /* SHARED_RING_INIT */
            SHARED_RING_INIT(sring);
            printf("ok\n");
        } else if (!strcmp(cmd, "set_idx")) {            /* set_idx REQ_PROD REQ_EVENT RSP_PROD RSP_EVENT */
            sring->req_prod = arg();
            sring->req_event = arg();
            sring->rsp_prod = arg();
            sring->rsp_event = arg();
            printf("ok\n");
        } else if (!strcmp(cmd, "front_attach")) {       /* front_attach START */
            RING_IDX start = arg();
            if (start == 0)
                FRONT_RING_INIT(&front, sring, ring_bytes);
            else
                FRONT_RING_ATTACH(&front, sring, start, ring_bytes);
            printf("size %u\n", RING_SIZE(&front));
        } else if (!strcmp(cmd, "back_attach")) {        /* back_attach START */
            RING_IDX start = arg();
            if (start == 0)
                BACK_RING_INIT(&back, sring, ring_bytes);
            else
                BACK_RING_ATTACH(&back, sring, start, ring_bytes);
            printf("size %u\n", RING_SIZE(&back));
        } else if (!strcmp(cmd, "put")) {
            put_request();
            printf("ok\n");
        } else if (!strcmp(cmd, "free")) {
            printf("free %u\n", RING_FREE_REQUESTS(&front));
        } else if (!strcmp(cmd, "push_req")) {
            RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&front, flag);
            printf("notify %d\n", !!flag);
        } else if (!strcmp(cmd, "take_rsp")) {
            take_responses();
        } else if (!strcmp(cmd, "final_rsp")) {
            RING_FINAL_CHECK_FOR_RESPONSES(&front, flag);
            printf("work %d\n", !!flag);
        } else if (!strcmp(cmd, "take_req")) {           /* take_req LIMIT */
            take_requests(arg());
        } else if (!strcmp(cmd, "rsp")) {                /* rsp ID OP STATUS */
            blkif_response_t *rsp = RING_GET_RESPONSE(&back, back.rsp_prod_pvt);
            rsp->id = arg();
            rsp->operation = arg();
            rsp->status = (int16_t)arg();
            back.rsp_prod_pvt++;
            printf("ok\n");
        } else if (!strcmp(cmd, "push_rsp")) {
            RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&back, flag);
            printf("notify %d\n", !!flag);
        } else if (!strcmp(cmd, "final_req")) {
            RING_FINAL_CHECK_FOR_REQUESTS(&back, flag);
            printf("work %d\n", !!flag);
        } else {
            printf("error unknown command %s\n", cmd);
        }
        fflush(stdout);
    }
    return 0;
}
"""


def c_source() -> str:
    lines = [f"    CONST({n});" for n in header_constants()]
    for st_name, fields in FIELDS.items():
        lines += [f"    FIELD({st_name}, {f});" for f in fields]
        lines.append(f"    SIZEOF({st_name});")
    lines += [f"    RINGSIZE({n});" for n in RING_PAGES]
    return C_PEER.replace("@LAYOUT@", "\n".join(lines))


@functools.cache
def _build(abi_name: str, outdir: str) -> str:
    """Compile the peer for one ABI; pytest.skip if this machine cannot."""
    flag = ABIS[abi_name][1]
    trivial = os.path.join(outdir, f"trivial{flag}")
    with open(trivial + ".c", "w") as f:
        f.write("int main(void) { return 0; }\n")
    probe = subprocess.run(["gcc", flag, "-o", trivial, trivial + ".c"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"gcc {flag} cannot build a trivial program (install gcc-multilib): {probe.stderr.strip()}")
    try:
        subprocess.run([trivial], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"this machine cannot run gcc {flag} programs: {e}")
    src = os.path.join(outdir, "peer.c")
    with open(src, "w") as f:
        f.write(c_source())
    exe = os.path.join(outdir, f"peer{flag}")
    # No skip from here on: the headers are present, so a failure is ours (or theirs) to see.
    subprocess.run(["gcc", flag, "-Wall", "-O1", "-o", exe, src], check=True)
    return exe


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("blkif-peer"))


@pytest.fixture(params=sorted(ABIS))
def abi_peer(request: pytest.FixtureRequest, build_dir: str) -> tuple[BlkifABI, str]:
    """(our layout, path of the C peer compiled with the matching gcc flag)."""
    return ABIS[request.param][0], _build(request.param, build_dir)


@functools.cache
def c_layout(exe: str) -> dict[str, int]:
    out = subprocess.run([exe, "layout"], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


# ---------------------------------------------------------------------------
# 1. constants and layouts
# ---------------------------------------------------------------------------

@needs_headers
def test_constants_match_header(abi_peer: tuple[BlkifABI, str]) -> None:
    _, exe = abi_peer
    xen = c_layout(exe)
    names = header_constants()
    # Sanity: the regex found what the brief names, so an empty list cannot pass.
    assert {"BLKIF_OP_READ", "BLKIF_OP_INDIRECT", "BLKIF_RSP_EOPNOTSUPP", "BLKIF_MAX_SEGMENTS_PER_REQUEST",
            "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST", "BLKIF_DISCARD_SECURE", "VDISK_READONLY"} <= set(names)
    missing = [n for n in names if not hasattr(blkif, n)]
    assert not missing, f"blkif.h defines constants blkif.py lacks: {missing}"
    assert {n: getattr(blkif, n) for n in names} == {n: xen[n] for n in names}
    assert xen["segs_per_indirect_frame"] == SEGMENTS_PER_INDIRECT_FRAME


def _put(buf: bytearray, off: int, width: int, value: int) -> None:
    buf[off:off + width] = value.to_bytes(width, "little", signed=value < 0)


def c_image(xen: dict[str, int], st_name: str, values: dict[str, Any], size: int) -> bytes:
    """``size`` zero bytes with each field stored where and as wide as the C compiler put it."""
    buf = bytearray(size)
    for name, value in values.items():
        off, width = xen[f"off:{st_name}:{name}"], xen[f"size:{st_name}:{name}"]
        if name == "seg":
            seg_size = xen["sizeof:blkif_request_segment"]
            for i, (gref, first, last) in enumerate(value):
                base = off + i * seg_size
                for sub, v in (("gref", gref), ("first_sect", first), ("last_sect", last)):
                    _put(buf, base + xen[f"off:blkif_request_segment:{sub}"],
                         xen[f"size:blkif_request_segment:{sub}"], v)
        elif name == "indirect_grefs":
            each = width // BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
            for i, v in enumerate(value):
                _put(buf, off + i * each, each, v)
        else:
            _put(buf, off, width, value)
    return bytes(buf)


@needs_headers
def test_struct_layouts_match_header(abi_peer: tuple[BlkifABI, str]) -> None:
    abi, exe = abi_peer
    xen = c_layout(exe)
    # Sizes our code relies on.
    assert abi.request_size == xen["sizeof:blkif_request"]
    assert abi.response_size == abi.response.size == xen["sizeof:blkif_response"]
    assert abi.discard.size == xen["sizeof:blkif_request_discard"]
    assert abi.segments_offset == xen["off:blkif_request:seg"]
    assert SEGMENT.size == xen["sizeof:blkif_request_segment"]
    assert xen["size:blkif_request:seg"] == BLKIF_MAX_SEGMENTS_PER_REQUEST * SEGMENT.size
    # blkif_request_indirect has trailing padding (8 bytes of explicit "pad" on i386, 4 of
    # alignment on x86_64) that our Struct leaves out; it must still cover every field and fit a slot.
    end_of_grefs = xen["off:blkif_request_indirect:indirect_grefs"] + xen["size:blkif_request_indirect:indirect_grefs"]
    assert abi.indirect.size == end_of_grefs <= xen["sizeof:blkif_request_indirect"] <= abi.request_size
    assert xen["sizeof:blkif_request_discard"] <= abi.request_size
    # The shared ring page.
    assert xen["off:blkif_sring:ring"] == RING_HEADER_SIZE
    assert xen["sizeof:blkif_sring_entry"] == xen["size:blkif_sring:ring"] == max(abi.request_size, abi.response_size)
    buf = bytearray(PAGE_SIZE)
    shared = SharedRing([memoryview(buf)], abi.request_size, abi.response_size)
    front = FrontRing(shared)
    for _ in range(3):
        front.put_request(bytes(abi.request_size))
    front.push_requests()
    header = {f: int.from_bytes(buf[xen[f"off:blkif_sring:{f}"]:][:xen[f"size:blkif_sring:{f}"]], "little")
              for f in ("req_prod", "req_event", "rsp_prod", "rsp_event")}
    assert header == {"req_prod": 3, "req_event": 1, "rsp_prod": 0, "rsp_event": 1}

    # Every field: what we pack sits where C reads it, and what C writes is what we parse.
    segs = [(0xA1A2A3A4, 1, 7), (0xB1B2B3B4, 0, 3), (0xFFFFFFFF, 7, 7)]
    direct = {"operation": BLKIF_OP_WRITE, "nr_segments": len(segs), "handle": 0xBEEF,
              "id": 0x0102030405060708, "sector_number": 0xF1F2F3F4F5F6F7F8, "seg": segs}
    image = c_image(xen, "blkif_request", direct, abi.request_size)
    assert pack_request(abi, BLKIF_OP_WRITE, 0x0102030405060708, 0xF1F2F3F4F5F6F7F8, 0xBEEF, segs) == image
    assert parse_request(abi, image) == Request(BLKIF_OP_WRITE, 0x0102030405060708, 0xF1F2F3F4F5F6F7F8, 0xBEEF,
                                                nr_segments=3, segments=tuple(Segment(*s) for s in segs))
    full = [(0x10000000 + i, i % 8, 7) for i in range(BLKIF_MAX_SEGMENTS_PER_REQUEST)]
    image = c_image(xen, "blkif_request", {**direct, "nr_segments": len(full), "seg": full}, abi.request_size)
    assert pack_request(abi, BLKIF_OP_WRITE, 0x0102030405060708, 0xF1F2F3F4F5F6F7F8, 0xBEEF, full) == image
    assert parse_request(abi, image).segments == tuple(Segment(*s) for s in full)

    discard = {"operation": BLKIF_OP_DISCARD, "flag": BLKIF_DISCARD_SECURE, "handle": 0xCAFE,
               "id": 0x1112131415161718, "sector_number": 0x2122232425262728, "nr_sectors": 0x3132333435363738}
    image = c_image(xen, "blkif_request_discard", discard, abi.request_size)
    assert pack_discard_request(abi, 0x1112131415161718, 0x2122232425262728, 0x3132333435363738, 0xCAFE,
                                BLKIF_DISCARD_SECURE) == image
    assert parse_request(abi, image) == Request(BLKIF_OP_DISCARD, 0x1112131415161718, 0x2122232425262728, 0xCAFE,
                                                nr_sectors=0x3132333435363738, discard_flag=BLKIF_DISCARD_SECURE)

    grefs = [0x40414243 + i for i in range(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)]
    indirect = {"operation": BLKIF_OP_INDIRECT, "indirect_op": BLKIF_OP_READ, "nr_segments": 0xABCD,
                "id": 0x5152535455565758, "sector_number": 0x6162636465666768, "handle": 0xD00D,
                "indirect_grefs": grefs}
    image = c_image(xen, "blkif_request_indirect", indirect, abi.request_size)
    assert pack_indirect_request(abi, BLKIF_OP_READ, 0x5152535455565758, 0x6162636465666768, 0xD00D,
                                 0xABCD, grefs) == image
    assert parse_request(abi, image) == Request(BLKIF_OP_READ, 0x5152535455565758, 0x6162636465666768, 0xD00D,
                                                nr_segments=0xABCD, indirect=True, indirect_grefs=tuple(grefs))

    for status in (BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP, 0x7FFF, -0x8000):
        values = {"id": 0x8182838485868788, "operation": BLKIF_OP_INDIRECT, "status": status}
        image = c_image(xen, "blkif_response", values, abi.response_size)
        assert pack_response(abi, 0x8182838485868788, BLKIF_OP_INDIRECT, status) == image
        assert parse_response(abi, image) == (0x8182838485868788, BLKIF_OP_INDIRECT, status)


@needs_headers
def test_ring_sizes_match_header(abi_peer: tuple[BlkifABI, str]) -> None:
    abi, exe = abi_peer
    xen = c_layout(exe)
    for n in RING_PAGES:
        expected = xen[f"ring_size:{n}"]
        assert ring_size(n, abi.request_size, abi.response_size) == expected, n
        separate = [memoryview(bytearray(PAGE_SIZE)) for _ in range(n)]
        assert SharedRing(separate, abi.request_size, abi.response_size).size == expected, n
        assert SharedRing([memoryview(bytearray(n * PAGE_SIZE))], abi.request_size, abi.response_size).size == expected


# ---------------------------------------------------------------------------
# The two ends, in C and in Python, behind one interface
# ---------------------------------------------------------------------------
# A request "spec" is what a frontend is asked to write:
#   ("rw", op, id, sector, handle, ((gref, first, last), ...))
#   ("discard", id, sector, nr_sectors, handle, flag)
#   ("indirect", op, id, sector, handle, nr_segments, (gref, ...))

Spec = tuple
Taken = tuple[str, Request]          # (hex of the slot copy, decoded request)


def spec_words(spec: Spec) -> list[Any]:
    if spec[0] == "rw":
        return [*spec[:5], len(spec[5]), *(v for seg in spec[5] for v in seg)]
    if spec[0] == "indirect":
        return [*spec[:6], len(spec[6]), *spec[6]]
    return list(spec)


def spec_bytes(abi: BlkifABI, spec: Spec) -> bytes:
    """Our packing of a spec."""
    kind, *a = spec
    if kind == "rw":
        return pack_request(abi, a[0], a[1], a[2], a[3], list(a[4]))
    if kind == "discard":
        return pack_discard_request(abi, a[0], a[1], a[2], a[3], a[4])
    return pack_indirect_request(abi, a[0], a[1], a[2], a[3], a[4], list(a[5]))


def spec_request(spec: Spec) -> Request:
    """What a backend must decode from a spec."""
    kind, *a = spec
    if kind == "rw":
        return Request(a[0], a[1], a[2], a[3], nr_segments=len(a[4]), segments=tuple(Segment(*s) for s in a[4]))
    if kind == "discard":
        return Request(BLKIF_OP_DISCARD, a[0], a[1], a[3], nr_sectors=a[2], discard_flag=a[4])
    grefs = tuple(a[5]) + (0,) * (BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST - len(a[5]))
    return Request(a[0], a[1], a[2], a[3], nr_segments=a[4], indirect=True, indirect_grefs=grefs)


def c_request(words: list[str]) -> Request:
    """A request as the C peer decoded it (see dump_request)."""
    kind, *rest = words
    v = [int(w) for w in rest]
    if kind == "rw":
        segs = tuple(Segment(*v[i:i + 3]) for i in range(5, len(v), 3))
        return Request(v[0], v[1], v[2], v[3], nr_segments=v[4], segments=segs)
    if kind == "discard":
        return Request(BLKIF_OP_DISCARD, v[0], v[1], v[3], nr_sectors=v[2], discard_flag=v[4])
    return Request(v[0], v[1], v[2], v[3], nr_segments=v[4], indirect=True, indirect_grefs=tuple(v[5:]))


def response_for(req: Request) -> tuple[int, int, int]:
    """The response a backend sends for ``req``: (id, operation as on the ring, status)."""
    op = BLKIF_OP_INDIRECT if req.indirect else req.operation
    return req.id, op, (BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP)[req.id % 3]


class RingFile:
    """The shared ring pages: a file, mapped by Python one page per mmap."""

    def __init__(self, path: str, npages: int) -> None:
        self.path, self.npages = path, npages
        with open(path, "wb") as f:
            f.write(bytes(npages * PAGE_SIZE))
        self.fd = os.open(path, os.O_RDWR)
        self.maps = [mmap.mmap(self.fd, PAGE_SIZE, offset=i * PAGE_SIZE) for i in range(npages)]
        self.pages = [memoryview(m) for m in self.maps]

    def header(self) -> tuple[int, int, int, int]:
        """(req_prod, req_event, rsp_prod, rsp_event), read independently of either end."""
        return struct.unpack_from("<4I", self.pages[0])

    def set_header(self, *values: int) -> None:
        struct.pack_into("<4I", self.pages[0], 0, *(v & MASK32 for v in values))

    def close(self) -> None:
        for view in self.pages:
            view.release()
        for m in self.maps:
            m.close()
        os.close(self.fd)


class CPeer:
    """The C peer process mapping the ring file; one command, one reply."""

    def __init__(self, exe: str, ring: RingFile) -> None:
        self.proc = subprocess.Popen([exe, ring.path, str(ring.npages)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def line(self) -> list[str]:
        out = self.proc.stdout.readline()
        if not out:
            raise AssertionError(f"C peer died (exit status {self.proc.wait(5)})")
        words = out.split()
        assert words[0] != "error", out
        return words

    def ask(self, *words: Any) -> list[str]:
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        return self.line()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            self.proc.stdout.close()


class CFront:
    def __init__(self, peer: CPeer, start: int) -> None:
        self.peer = peer
        peer.ask("init")                                       # SHARED_RING_INIT
        if start:
            peer.ask("set_idx", start, (start + 1) & MASK32, start, (start + 1) & MASK32)
        self.size = int(peer.ask("front_attach", start)[1])    # FRONT_RING_INIT / FRONT_RING_ATTACH

    def put(self, spec: Spec) -> None:
        self.peer.ask("put", *spec_words(spec))

    def push(self) -> bool:
        return self.peer.ask("push_req") == ["notify", "1"]

    def free(self) -> int:
        return int(self.peer.ask("free")[1])

    def responses(self) -> list[tuple[int, int, int]]:
        words = self.peer.ask("take_rsp")
        assert words[0] == "rsps", words
        v = [int(w) for w in words[2:]]
        return [tuple(v[i:i + 3]) for i in range(0, len(v), 3)]

    def final(self) -> bool:
        return self.peer.ask("final_rsp") == ["work", "1"]


class CBack:
    def __init__(self, peer: CPeer, start: int) -> None:
        self.peer = peer
        self.size = int(peer.ask("back_attach", start)[1])     # BACK_RING_INIT / BACK_RING_ATTACH

    def take(self, limit: int | None = None) -> list[Taken]:
        words = self.peer.ask("take_req", MASK32 if limit is None else limit)
        if words == ["overflow"]:
            raise RingOverflow("C: RING_REQUEST_PROD_OVERFLOW")
        assert words[0] == "reqs", words
        return [(w[0], c_request(w[1:])) for w in (self.peer.line() for _ in range(int(words[1])))]

    def respond(self, id: int, op: int, status: int) -> None:
        self.peer.ask("rsp", id, op, status)

    def push(self) -> bool:
        return self.peer.ask("push_rsp") == ["notify", "1"]

    def final(self) -> bool:
        return self.peer.ask("final_req") == ["work", "1"]


class PyFront:
    def __init__(self, abi: BlkifABI, ring: RingFile, start: int) -> None:
        self.abi = abi
        shared = SharedRing(ring.pages, abi.request_size, abi.response_size)
        if start == 0:
            self.ring = FrontRing(shared, init=True)
        else:
            shared.init()
            ring.set_header(start, start + 1, start, start + 1)
            self.ring = FrontRing(shared, init=False)
        self.size = self.ring.size

    def put(self, spec: Spec) -> None:
        self.ring.put_request(spec_bytes(self.abi, spec))

    def push(self) -> bool:
        return self.ring.push_requests()

    def free(self) -> int:
        return self.ring.free_requests()

    def responses(self) -> list[tuple[int, int, int]]:
        return [parse_response(self.abi, raw) for raw in self.ring.take_responses()]

    def final(self) -> bool:
        return self.ring.final_check_for_responses()


class PyBack:
    def __init__(self, abi: BlkifABI, ring: RingFile) -> None:
        self.abi = abi
        self.ring = BackRing(SharedRing(ring.pages, abi.request_size, abi.response_size))
        self.size = self.ring.size

    def take(self, limit: int | None = None) -> list[Taken]:
        return [(raw.hex(), parse_request(self.abi, raw)) for raw in self.ring.take_requests(limit)]

    def respond(self, id: int, op: int, status: int) -> None:
        self.ring.put_response(pack_response(self.abi, id, op, status))

    def push(self) -> bool:
        return self.ring.push_responses()

    def final(self) -> bool:
        return self.ring.final_check_for_requests()


@contextlib.contextmanager
def ring_pair(exe: str, abi: BlkifABI, npages: int, start: int, front_kind: str, back_kind: str,
              path: str) -> Iterator[tuple[Any, Any, RingFile]]:
    """A frontend and a backend ("c" or "py") over one fresh ring file starting at index ``start``."""
    ring = RingFile(path, npages)
    peers: list[CPeer] = []
    try:
        def peer() -> CPeer:
            peers.append(CPeer(exe, ring))
            return peers[-1]
        front = CFront(peer(), start) if front_kind == "c" else PyFront(abi, ring, start)
        back = CBack(peer(), start) if back_kind == "c" else PyBack(abi, ring)
        assert front.size == back.size == ring_size(npages, abi.request_size, abi.response_size)
        yield front, back, ring
    finally:
        for p in peers:
            p.close()
        front = back = None
        ring.close()


# ---------------------------------------------------------------------------
# 2a/2b. A batch of every kind of request, each direction
# ---------------------------------------------------------------------------

BATCH: list[Spec] = [
    ("rw", BLKIF_OP_WRITE, 0x8000000000000001, 2048, 0x0CA0,
     ((0x100, 0, 7), (0x101, 0, 7), (0xFFFFFFFE, 2, 5), (0x103, 7, 7))),
    ("rw", BLKIF_OP_READ, 2, 0xFFFFFFFFFFFFFFF0, 0x0CA0,
     tuple((0x200 + i, i % 8, 7) for i in range(BLKIF_MAX_SEGMENTS_PER_REQUEST))),
    ("discard", 0xDEADBEEFCAFEF00D, 1 << 40, 0x123456789, 0x0CA0, BLKIF_DISCARD_SECURE),
    ("discard", 4, 0, 8, 0x0CA0, 0),
    ("indirect", BLKIF_OP_WRITE, 5, 4096, 0x0CA0, 1000, (0x300, 0x301)),
    ("indirect", BLKIF_OP_READ, 6, 8192, 0x0CA0, 8 * SEGMENTS_PER_INDIRECT_FRAME,
     tuple(0x400 + i for i in range(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST))),
    ("rw", BLKIF_OP_FLUSH_DISKCACHE, 7, 0, 0x0CA0, ()),
    ("rw", BLKIF_OP_WRITE_BARRIER, 8, 16, 0x0CA0, ((0x500, 0, 0),)),
]
GEOMETRIES = [(1, 0), (4, 0xFFFFFFFD)]     # (pages, first index): order 0 fresh; order 2 about to wrap


def _sends(front: Any, back: Any, ring: RingFile, abi: BlkifABI, start: int) -> None:
    """Batch both ways between a frontend and a backend, checked against the specs."""
    for spec in BATCH:
        front.put(spec)
    assert front.free() == front.size - len(BATCH)
    assert front.push() is True                       # the backend waits at req_event = start + 1
    taken = back.take()
    assert [raw for raw, _ in taken] == [spec_bytes(abi, s).hex() for s in BATCH]    # bit for bit
    assert [req for _, req in taken] == [spec_request(s) for s in BATCH]
    assert back.final() is False                      # nothing more; re-arms req_event
    responses = [response_for(req) for _, req in taken]
    for rsp in responses:
        back.respond(*rsp)
    assert back.push() is True                        # the frontend waits at rsp_event = start + 1
    assert front.responses() == responses
    assert front.final() is False                     # re-arms rsp_event
    end = (start + len(BATCH)) & MASK32
    assert ring.header() == (end, (end + 1) & MASK32, end, (end + 1) & MASK32)
    assert front.free() == front.size


@needs_headers
@pytest.mark.parametrize("npages,start", GEOMETRIES)
def test_c_frontend_python_backend(abi_peer: tuple[BlkifABI, str], npages: int, start: int, tmp_path: Any) -> None:
    abi, exe = abi_peer
    with ring_pair(exe, abi, npages, start, "c", "py", str(tmp_path / "ring")) as (front, back, ring):
        _sends(front, back, ring, abi, start)


@needs_headers
@pytest.mark.parametrize("npages,start", GEOMETRIES)
def test_python_frontend_c_backend(abi_peer: tuple[BlkifABI, str], npages: int, start: int, tmp_path: Any) -> None:
    abi, exe = abi_peer
    with ring_pair(exe, abi, npages, start, "py", "c", str(tmp_path / "ring")) as (front, back, ring):
        _sends(front, back, ring, abi, start)


# ---------------------------------------------------------------------------
# 2c. The same script through C/C, Python/C, C/Python and Python/Python
# ---------------------------------------------------------------------------

def random_spec(rng: random.Random, n: int) -> Spec:
    rid = (n << 40) | rng.getrandbits(40)                  # unique, and uses all 8 bytes
    sector, handle = rng.getrandbits(64), rng.getrandbits(16)
    kind = rng.choice(["rw", "rw", "flush", "discard", "indirect"])
    if kind == "rw":
        segs = tuple((rng.getrandbits(32), f, rng.randint(f, 7)) for f in
                     (rng.randint(0, 7) for _ in range(rng.randint(1, BLKIF_MAX_SEGMENTS_PER_REQUEST))))
        return ("rw", rng.choice([BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER]), rid, sector, handle, segs)
    if kind == "flush":
        return ("rw", BLKIF_OP_FLUSH_DISKCACHE, rid, sector, handle, ())
    if kind == "discard":
        return ("discard", rid, sector, rng.getrandbits(64), handle, rng.choice([0, BLKIF_DISCARD_SECURE]))
    grefs = tuple(rng.getrandbits(32) for _ in range(rng.randint(1, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)))
    return ("indirect", rng.choice([BLKIF_OP_READ, BLKIF_OP_WRITE]), rid, sector, handle,
            rng.randint(1, len(grefs) * SEGMENTS_PER_INDIRECT_FRAME), grefs)


@dataclass
class Run:
    trace: list[tuple] = field(default_factory=list)
    produced: list[Spec] = field(default_factory=list)
    taken: list[Taken] = field(default_factory=list)
    collected: list[tuple[int, int, int]] = field(default_factory=list)


def run_script(front: Any, back: Any, ring: RingFile, script: list[tuple[str, Any]], seed: int) -> Run:
    """Play ``script``; record every result and the shared indices after each step.

    produce N: put min(N, room) requests, then RING_FREE_REQUESTS and PUSH_REQUESTS_AND_CHECK_NOTIFY
    consume L: the backend copies out up to L (None: all) requests
    respond N: answer the N oldest answered-not-yet requests, then PUSH_RESPONSES_AND_CHECK_NOTIFY
    back_final / front_final: FINAL_CHECK_FOR_REQUESTS / _RESPONSES (re-arm the event, check again)
    collect: the frontend consumes every published response
    """
    rng = random.Random(seed)
    run = Run()
    pending: collections.deque[Request] = collections.deque()

    def step(name: str, arg: Any) -> None:
        if name == "produce":
            n = min(arg, front.size - (len(run.produced) - len(run.collected)))
            for _ in range(n):
                spec = random_spec(rng, len(run.produced))
                front.put(spec)
                run.produced.append(spec)
            result: Any = (n, front.free(), front.push())
        elif name == "consume":
            result = back.take(arg)
            run.taken += result
            pending.extend(req for _, req in result)
        elif name == "respond":
            n = min(arg, len(pending))
            for _ in range(n):
                back.respond(*response_for(pending.popleft()))
            result = (n, back.push())
        elif name == "back_final":
            result = back.final()
        elif name == "collect":
            result = front.responses()
            run.collected += result
        elif name == "front_final":
            result = front.final()
        else:
            raise ValueError(name)
        run.trace.append((name, arg, result, ring.header()))

    for name, arg in script:
        step(name, arg)
    for _ in range(2):                                     # drain
        step("consume", None)
        step("respond", front.size)
        step("collect", None)
    return run


def check_delivery(run: Run) -> None:
    """Nothing lost, duplicated or reordered; every request decoded as written."""
    assert [req for _, req in run.taken] == [spec_request(s) for s in run.produced]
    assert run.collected == [response_for(spec_request(s)) for s in run.produced]


def compare_with_reference(exe: str, abi: BlkifABI, npages: int, start: int, script: list[tuple[str, Any]],
                           front_kind: str, back_kind: str, tmp_path: Any) -> Run:
    runs = {}
    for kinds in (("c", "c"), (front_kind, back_kind)):
        path = str(tmp_path / f"ring-{kinds[0]}-{kinds[1]}")
        with ring_pair(exe, abi, npages, start, *kinds, path) as (front, back, ring):
            runs[kinds] = run_script(front, back, ring, script, seed=npages * 1000 + start % 977)
    ref, got = runs[("c", "c")], runs[(front_kind, back_kind)]
    check_delivery(ref)
    assert len(got.trace) == len(ref.trace)
    for i, (theirs, ours) in enumerate(zip(ref.trace, got.trace)):
        assert ours == theirs, f"step {i} ({theirs[0]} {theirs[1]}): C/C gave {theirs[2:]}, we gave {ours[2:]}"
    check_delivery(got)
    return ref


COMBOS = [("py", "c"), ("c", "py"), ("py", "py")]
SCRIPT_GEOMETRIES = [(1, 0), (1, 0xFFFFFFFE), (4, 0xFFFFFFFE)]

# Each comment is what ring.h does; the booleans come from the C run and are checked below.
NOTIFY_SCRIPT: list[tuple[str, Any]] = [
    ("produce", 3),        # backend waits at req_event = start + 1: notify
    ("produce", 2),        # backend has not re-armed: suppressed
    ("consume", None),
    ("back_final", None),  # nothing left: req_event = req_cons + 1, no work
    ("produce", 1),        # re-armed: notify
    ("consume", 1),        # backend takes it but does not re-arm...
    ("produce", 1),        # ...so this one is suppressed
    ("back_final", None),  # work already waiting: true, req_event untouched
    ("consume", None),
    ("respond", 4),        # frontend waits at rsp_event = start + 1: notify
    ("respond", 2),        # frontend has not re-armed: suppressed
    ("collect", None),
    ("front_final", None),  # nothing left: rsp_event = rsp_cons + 1, no work
    ("respond", 1),        # re-armed: notify
    ("front_final", None),  # a response is waiting: true
    ("collect", None),
    ("respond", 0),        # pushing nothing never notifies
    ("produce", 0),
]
NOTIFY_EXPECTED = [("push_req", True), ("push_req", False), ("back_final", False), ("push_req", True),
                   ("push_req", False), ("back_final", True), ("push_rsp", True), ("push_rsp", False),
                   ("front_final", False), ("push_rsp", True), ("front_final", True), ("push_rsp", False),
                   ("push_req", False)]


def notify_flags(run: Run) -> list[tuple[str, bool]]:
    out = []
    for name, _, result, _ in run.trace:
        if name == "produce":
            out.append(("push_req", result[2]))
        elif name == "respond":
            out.append(("push_rsp", result[1]))
        elif name.endswith("final"):
            out.append((name, result))
    return out


@needs_headers
@pytest.mark.parametrize("front_kind,back_kind", COMBOS)
@pytest.mark.parametrize("npages,start", SCRIPT_GEOMETRIES)
def test_notification_suppression_matches_c(abi_peer: tuple[BlkifABI, str], npages: int, start: int,
                                            front_kind: str, back_kind: str, tmp_path: Any) -> None:
    abi, exe = abi_peer
    ref = compare_with_reference(exe, abi, npages, start, NOTIFY_SCRIPT, front_kind, back_kind, tmp_path)
    assert notify_flags(ref)[:len(NOTIFY_EXPECTED)] == NOTIFY_EXPECTED
    if start:
        assert ref.trace[-1][3][0] < start, "the indices should have wrapped past 2**32"


def random_script(seed: int, length: int) -> list[tuple[str, Any]]:
    rng = random.Random(seed)
    script: list[tuple[str, Any]] = []
    for _ in range(length):
        name = rng.choices(["produce", "consume", "respond", "back_final", "collect", "front_final"],
                           weights=[4, 3, 3, 2, 3, 2])[0]
        if name == "produce":
            arg: Any = rng.randint(1, 40)
        elif name == "consume":
            arg = rng.choice([None, rng.randint(1, 24)])
        elif name == "respond":
            arg = rng.randint(0, 40)
        else:
            arg = None
        script.append((name, arg))
    return script


def straddling_slots(npages: int, abi: BlkifABI) -> list[int]:
    slot = max(abi.request_size, abi.response_size)
    return [i for i in range(ring_size(npages, abi.request_size, abi.response_size))
            if (RING_HEADER_SIZE + i * slot) // PAGE_SIZE != (RING_HEADER_SIZE + (i + 1) * slot - 1) // PAGE_SIZE]


@needs_headers
@pytest.mark.parametrize("front_kind,back_kind", COMBOS)
@pytest.mark.parametrize("npages,start", [(1, 0), (1, 0xFFFFFFF0), (4, 0xFFFFFF9B)])
def test_random_exchange_matches_c(abi_peer: tuple[BlkifABI, str], npages: int, start: int,
                                   front_kind: str, back_kind: str, tmp_path: Any) -> None:
    abi, exe = abi_peer
    size = ring_size(npages, abi.request_size, abi.response_size)
    script = random_script(seed=npages * 7 + start % 13, length=size + 60)
    ref = compare_with_reference(exe, abi, npages, start, script, front_kind, back_kind, tmp_path)
    # The script did what it is for: every slot used at least twice, the indices wrapped,
    # and both answers of every notify/final check came up.
    assert len(ref.produced) >= 2 * size
    if start:
        assert ref.trace[-1][3][0] < start
    if npages > 1:
        assert straddling_slots(npages, abi), "no slot straddles a page: the multi-page path is not exercised"
    flags = notify_flags(ref)
    for name in ("push_req", "push_rsp", "back_final", "front_final"):
        assert {v for n, v in flags if n == name} == {True, False}, name


@needs_headers
@pytest.mark.parametrize("npages,start", [(1, 0), (4, 0xFFFFFFF0)])
def test_request_prod_overflow_matches_c(abi_peer: tuple[BlkifABI, str], npages: int, start: int,
                                         tmp_path: Any) -> None:
    """A req_prod that claims more requests than the ring holds: C refuses exactly when we raise."""
    abi, exe = abi_peer
    with ring_pair(exe, abi, npages, start, "py", "c", str(tmp_path / "ring")) as (front, back, ring):
        size = front.size
        for ahead in (0, 1, size - 1, size, size + 1, 2 * size, 1 << 31, MASK32):
            ring.set_header(start + ahead, start + 1, start, start + 1)
            theirs = CBack(back.peer, start)                   # re-attach: req_cons back to start
            ours = PyBack(abi, ring)
            try:
                c_count: int | str = len(theirs.take())
            except RingOverflow:
                c_count = "overflow"
            try:
                py_count: int | str = len(ours.take())
            except RingOverflow:
                py_count = "overflow"
            assert py_count == c_count, f"req_prod {ahead} ahead"
            assert c_count == (ahead if ahead <= size else "overflow")


# ---------------------------------------------------------------------------
# 3. Pure Python properties
# ---------------------------------------------------------------------------

def _ring(abi: BlkifABI, npages: int, split: bool, start: int) -> tuple[FrontRing, BackRing, bytearray]:
    buf = bytearray(npages * PAGE_SIZE)
    view = memoryview(buf)
    pages = [view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(npages)] if split else [view]
    shared = SharedRing(pages, abi.request_size, abi.response_size)
    shared.init()
    struct.pack_into("<4I", buf, 0, start, (start + 1) & MASK32, start, (start + 1) & MASK32)
    return FrontRing(shared, init=False), BackRing(shared), buf


starts = st.one_of(st.just(0), st.integers(0, MASK32), st.integers(MASK32 - 300, MASK32))


@settings(max_examples=80, deadline=None)
@given(abi=st.sampled_from([X86_64, X86_32]), npages=st.sampled_from([1, 2, 4]), split=st.booleans(),
       start=starts,
       ops=st.lists(st.tuples(st.sampled_from(["produce", "consume", "respond", "collect", "back_final",
                                               "front_final"]), st.integers(0, 200)), max_size=40))
def test_front_back_never_lose_duplicate_or_reorder(abi: BlkifABI, npages: int, split: bool, start: int,
                                                    ops: list[tuple[str, int]]) -> None:
    front, back, _ = _ring(abi, npages, split, start)
    size = front.size
    sent: list[bytes] = []
    received: list[bytes] = []
    pending: collections.deque[int] = collections.deque()
    answered: list[int] = []
    collected: list[int] = []

    def request(i: int) -> bytes:
        return pack_request(abi, BLKIF_OP_WRITE, i, i * 8, 0x51, [(i & MASK32, 0, 7)])

    def check() -> None:
        assert 0 <= front.free_requests() <= size
        assert front.free_requests() == size - (len(sent) - len(collected))
        assert received == sent[:len(received)]
        assert collected == answered[:len(collected)]

    for name, n in ops:
        if name == "produce":
            room = front.free_requests()
            for _ in range(min(n, room)):
                sent.append(request(len(sent)))
                front.put_request(sent[-1])
            if n > room:
                with pytest.raises(RingOverflow):
                    front.put_request(request(len(sent)))
            front.push_requests()
        elif name == "consume":
            got = back.take_requests(n or None)
            received += got
            pending.extend(parse_request(abi, raw).id for raw in got)
        elif name == "respond":
            for _ in range(min(n, len(pending))):
                rid = pending.popleft()
                back.put_response(pack_response(abi, rid, BLKIF_OP_WRITE, BLKIF_RSP_OKAY))
                answered.append(rid)
            back.push_responses()
        elif name == "collect":
            collected += [parse_response(abi, raw)[0] for raw in front.take_responses()]
        elif name == "back_final":
            assert back.final_check_for_requests() == (len(received) < len(sent))
        else:
            assert front.final_check_for_responses() == (len(collected) < len(answered))
        check()
    # Drain: everything sent comes back, once, in order.
    received += back.take_requests()
    pending.extend(parse_request(abi, raw).id for raw in received[len(answered) + len(pending):])
    while pending:
        rid = pending.popleft()
        back.put_response(pack_response(abi, rid, BLKIF_OP_WRITE, BLKIF_RSP_OKAY))
        answered.append(rid)
    back.push_responses()
    collected += [parse_response(abi, raw)[0] for raw in front.take_responses()]
    check()
    assert received == sent
    assert collected == answered == list(range(len(sent)))
    assert front.free_requests() == size


@settings(max_examples=80, deadline=None)
@given(abi=st.sampled_from([X86_64, X86_32]), npages=st.sampled_from([1, 4]), start=starts,
       outstanding=st.integers(0, 40), data=st.data())
def test_back_ring_refuses_req_prod_beyond_the_ring(abi: BlkifABI, npages: int, start: int, outstanding: int,
                                                    data: st.DataObject) -> None:
    front, back, buf = _ring(abi, npages, split=npages > 1, start=start)
    size = back.size
    # Some requests taken but not yet answered: the bound is relative to rsp_prod_pvt, not req_cons.
    outstanding = min(outstanding, size)
    for i in range(outstanding):
        front.put_request(pack_request(abi, BLKIF_OP_READ, i, 0, 0, []))
    front.push_requests()
    assert len(back.take_requests()) == outstanding
    ahead = data.draw(st.integers(size + 1, MASK32), label="req_prod - rsp_prod")
    struct.pack_into("<I", buf, 0, (start + ahead) & MASK32)
    with pytest.raises(RingOverflow):
        back.take_requests()
    with pytest.raises(RingOverflow):
        back.final_check_for_requests()
    # Exactly a ring ahead is legal: the rest of the ring's requests are there to take.
    struct.pack_into("<I", buf, 0, (start + size) & MASK32)
    assert len(back.take_requests()) == size - outstanding


def test_a_missing_protocol_node_means_x86_32() -> None:
    """Linux blkback's BLKIF_PROTOCOL_DEFAULT on x86 (xen-blkback/common.h) is the x86_32 layout.

    xenbus_scanf("%63s") of an empty node fails too, so an empty value is
    "absent" as well; a name Linux does not know fails the device.
    """
    assert blkif.abi_for(None) is blkif.X86_32
    assert blkif.abi_for("") is blkif.X86_32
    assert blkif.abi_for(blkif.PROTOCOL_X86_64) is blkif.X86_64
    assert blkif.abi_for(blkif.PROTOCOL_X86_32) is blkif.X86_32
    with pytest.raises(ValueError):
        blkif.abi_for("x86_64-abi ")
