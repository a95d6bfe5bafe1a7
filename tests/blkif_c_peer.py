"""The C reference for the blkif ABI tests: a small program built against Xen's own ring.h and blkif.h.

Compiled with ``gcc -m64`` (our X86_64 layout) and ``gcc -m32`` (X86_32):

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

Used by test_blkif_abi.py (constants and layouts) and, through
blkif_ring_ends.py, test_blkif_rings.py (rings shared with C peers).  A test
module takes the fixtures by assigning them (``abi_peer = blkif_c_peer.abi_peer``).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

import pytest

from xdom.domains.abi.blkif import (
    X86_32,
    X86_64,
    BlkifABI,
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

