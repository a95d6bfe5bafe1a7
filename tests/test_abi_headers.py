"""Our ABI constants against Xen's own public headers (Debian libxen-dev).

A C program compiled against /usr/include/xen prints every value; the
Python transcription must match it.  Our copy of the numbers is never the
reference.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from xdom.domains.abi import event_channel as ec
from xdom.domains.abi import grant_table as gt

HEADER = "/usr/include/xen/grant_table.h"

GRANT_NAMES = [n for n in dir(gt) if n.startswith(("GTF_", "GNTST_", "GNTMAP_", "GNTCOPY_"))
               and n not in ("GNTST_NAMES",)] + ["GNTTAB_RESERVED_XENSTORE", "GNTTAB_RESERVED_CONSOLE",
                                                  "GNTTAB_NR_RESERVED_ENTRIES"]
EVTCHN_NAMES = [n for n in dir(ec) if n.startswith(("EVTCHNSTAT_", "VIRQ_", "DOMID_"))
                and n != "DOMID_FIRST_RESERVED"] + ["NR_VIRQS", "DOMID_FIRST_RESERVED"]


def _compile_and_run(tmp_path: os.PathLike[str], body: str) -> dict[str, int]:
    src = os.path.join(tmp_path, "abi.c")
    exe = os.path.join(tmp_path, "abi")
    with open(src, "w") as f:
        f.write("#include <stdint.h>\n#include <stdio.h>\n#include <stddef.h>\n"
                "#include <xen/xen.h>\n#include <xen/grant_table.h>\n#include <xen/event_channel.h>\n"
                "int main(void) {\n" + body + "return 0; }\n")
    subprocess.run(["gcc", "-Wall", "-o", exe, src], check=True, capture_output=True)
    out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


needs_headers = pytest.mark.skipif(
    not os.path.exists(HEADER) or not shutil.which("gcc"),
    reason="needs Debian's libxen-dev and gcc (make test installs them as root)")


@needs_headers
def test_grant_table_constants_match_xen_headers(tmp_path: os.PathLike[str]) -> None:
    body = "".join(f'printf("{n} %lld\\n", (long long)({n}));\n' for n in GRANT_NAMES)
    body += 'printf("sizeof_entry %zu\\n", sizeof(grant_entry_v1_t));\n'
    for field in ("flags", "domid", "frame"):
        body += f'printf("off_{field} %zu\\n", offsetof(grant_entry_v1_t, {field}));\n'
        body += f'printf("size_{field} %zu\\n", sizeof(((grant_entry_v1_t*)0)->{field}));\n'
    xen = _compile_and_run(tmp_path, body)
    ours = {n: getattr(gt, n) for n in GRANT_NAMES}
    assert {n: xen[n] for n in GRANT_NAMES} == ours
    # The struct layout our code packs and unpacks: "<HHI".
    assert xen["sizeof_entry"] == gt.GRANT_ENTRY_V1.size == gt.GRANT_ENTRY_V1_SIZE
    packed = gt.GRANT_ENTRY_V1.pack(0x1111, 0x2222, 0x33333333)
    for field, value, width in (("flags", 0x1111, 2), ("domid", 0x2222, 2), ("frame", 0x33333333, 4)):
        off = xen[f"off_{field}"]
        assert xen[f"size_{field}"] == width
        assert int.from_bytes(packed[off:off + width], "little") == value


@needs_headers
def test_gnttab_copy_layout_matches_xen_headers(tmp_path: os.PathLike[str]) -> None:
    """GNTTABOP_copy's segments travel to the broker in Xen's own struct gnttab_copy layout."""
    fields = {"source.u.gmfn": 0x1111111111111111, "source.domid": 0x2222, "source.offset": 0x3333,
              "dest.u.gmfn": 0x4444444444444444, "dest.domid": 0x5555, "dest.offset": 0x6666,
              "len": 0x7777, "flags": 0x0888, "status": -2}
    body = 'printf("sizeof %zu\\n", sizeof(struct gnttab_copy));\n'
    body += 'printf("ref_off %zu\\n", offsetof(struct gnttab_copy, source.u.ref));\n'
    for i, field in enumerate(fields):
        body += f'printf("off{i} %zu\\n", offsetof(struct gnttab_copy, {field}));\n'
        body += f'printf("size{i} %zu\\n", sizeof(((struct gnttab_copy*)0)->{field}));\n'
    xen = _compile_and_run(tmp_path, body)
    assert xen["sizeof"] == gt.GNTTAB_COPY.size
    packed = gt.GNTTAB_COPY.pack(*fields.values())
    for i, value in enumerate(fields.values()):
        off, width = xen[f"off{i}"], xen[f"size{i}"]
        assert int.from_bytes(packed[off:off + width], "little", signed=value < 0) == value
    # A grant reference is the union's low 32 bits: what Xen reads of a side flagged as a grant.
    assert xen["ref_off"] == xen["off0"] and gt.GNTTAB_COPY_REF_MASK == 2**32 - 1


@needs_headers
def test_event_channel_constants_match_xen_headers(tmp_path: os.PathLike[str]) -> None:
    body = "".join(f'printf("{n} %lld\\n", (long long)({n}));\n' for n in EVTCHN_NAMES)
    xen = _compile_and_run(tmp_path, body)
    assert {n: xen[n] for n in EVTCHN_NAMES} == {n: getattr(ec, n) for n in EVTCHN_NAMES}


def test_names_cover_the_grant_status_table() -> None:
    statuses = {getattr(gt, n) for n in dir(gt) if n.startswith("GNTST_") and n != "GNTST_NAMES"}
    assert statuses == set(gt.GNTST_NAMES)
