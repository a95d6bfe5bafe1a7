"""xs_wire: our codec against Xen's xs_wire.h, and the framer's edge cases."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xdom.domains.abi import xs_wire
from xdom.domains.abi.xs_ring import RingIndexError, ring_read, ring_write
from xdom.domains.abi.xs_wire import HEADER_SIZE, Message, MessageReader, ProtocolError, XsType

HEADER = "/usr/include/xen/io/xs_wire.h"
needs_headers = pytest.mark.skipif(not os.path.exists(HEADER) or not shutil.which("gcc"),
                                   reason="needs Debian's libxen-dev and gcc (make test installs them as root)")
# the types in Xen 4.17's header; 23..26 arrived in 4.18
HEADER_TYPES = [t for t in XsType if t < XsType.XS_GET_FEATURE]


@needs_headers
def test_constants_and_layout_match_xs_wire_h(tmp_path: os.PathLike[str]) -> None:
    src = os.path.join(tmp_path, "xs.c")
    body = "".join(f'printf("{t.name} %d\\n", (int){t.name});\n' for t in HEADER_TYPES)
    for name in ("XS_INVALID", "XS_WATCH_PATH", "XS_WATCH_TOKEN", "XENSTORE_PAYLOAD_MAX", "XENSTORE_ABS_PATH_MAX",
                 "XENSTORE_REL_PATH_MAX", "XENSTORE_RING_SIZE", "XENSTORE_SERVER_FEATURE_RECONNECTION",
                 "XENSTORE_SERVER_FEATURE_ERROR", "XENSTORE_CONNECTED", "XENSTORE_RECONNECT",
                 "XENSTORE_ERROR_NONE", "XENSTORE_ERROR_COMM", "XENSTORE_ERROR_RINGIDX", "XENSTORE_ERROR_PROTO"):
        body += f'printf("{name} %d\\n", (int){name});\n'
    body += 'printf("HEADER_SIZE %zu\\n", sizeof(struct xsd_sockmsg));\n'
    for field in ("req", "rsp", "req_cons", "req_prod", "rsp_cons", "rsp_prod", "server_features",
                  "connection", "error"):
        body += f'printf("OFF_{field} %zu\\n", offsetof(struct xenstore_domain_interface, {field}));\n'
    body += ('for (unsigned i = 0; i < sizeof(xsd_errors)/sizeof(xsd_errors[0]); i++) '
             'printf("ERR%u %s\\n", i, xsd_errors[i].errstring);\n')
    with open(src, "w") as f:
        f.write("#include <stdint.h>\n#include <stdio.h>\n#include <stddef.h>\n#include <errno.h>\n"
                "#include <xen/io/xs_wire.h>\nint main(void) {\n" + body + "return 0; }\n")
    exe = os.path.join(tmp_path, "xs")
    subprocess.run(["gcc", "-o", exe, src], check=True, capture_output=True)
    xen = dict(line.split() for line in subprocess.run([exe], check=True, capture_output=True,
                                                       text=True).stdout.splitlines())
    for t in HEADER_TYPES:
        assert int(xen[t.name]) == t.value, t.name
    assert int(xen["XS_INVALID"]) == xs_wire.XS_INVALID
    for name in ("XS_WATCH_PATH", "XS_WATCH_TOKEN", "XENSTORE_PAYLOAD_MAX", "XENSTORE_ABS_PATH_MAX",
                 "XENSTORE_REL_PATH_MAX", "XENSTORE_RING_SIZE", "XENSTORE_SERVER_FEATURE_RECONNECTION",
                 "XENSTORE_SERVER_FEATURE_ERROR", "XENSTORE_CONNECTED", "XENSTORE_RECONNECT",
                 "XENSTORE_ERROR_NONE", "XENSTORE_ERROR_COMM", "XENSTORE_ERROR_RINGIDX", "XENSTORE_ERROR_PROTO"):
        assert int(xen[name]) == getattr(xs_wire, name), name
    assert int(xen["HEADER_SIZE"]) == HEADER_SIZE
    offsets = {"req": xs_wire.RING_REQ_OFFSET, "rsp": xs_wire.RING_RSP_OFFSET, "req_cons": xs_wire.RING_REQ_CONS,
               "req_prod": xs_wire.RING_REQ_PROD, "rsp_cons": xs_wire.RING_RSP_CONS,
               "rsp_prod": xs_wire.RING_RSP_PROD, "server_features": xs_wire.RING_SERVER_FEATURES,
               "connection": xs_wire.RING_CONNECTION, "error": xs_wire.RING_ERROR}
    for field, ours in offsets.items():
        assert int(xen[f"OFF_{field}"]) == ours, field
    assert tuple(xen[f"ERR{i}"] for i in range(len(xs_wire.XSD_ERRORS))) == xs_wire.XSD_ERRORS


def test_reader_whole_bytewise_and_with_trailing_data() -> None:
    msgs = [Message(XsType.XS_READ, 7, 0, b"/a\0"), Message(XsType.XS_WRITE, 8, 3, b"/b\0value")]
    stream = b"".join(m.encode() for m in msgs)
    assert MessageReader().feed(stream) == msgs
    r = MessageReader()
    out = []
    for i in range(len(stream)):
        out += r.feed(stream[i:i + 1])
    assert out == msgs and r.pending == 0
    r = MessageReader()
    assert r.feed(stream + stream[:5]) == msgs and r.pending == 5


def test_reader_refuses_oversized_payload() -> None:
    header = xs_wire.HEADER.pack(XsType.XS_WRITE, 1, 0, xs_wire.XENSTORE_PAYLOAD_MAX + 1)
    with pytest.raises(ProtocolError):
        MessageReader().feed(header)
    ok = Message(XsType.XS_WRITE, 1, 0, b"x" * xs_wire.XENSTORE_PAYLOAD_MAX)
    assert MessageReader().feed(ok.encode()) == [ok]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.lists(st.integers(1, 64), max_size=40))
def test_reader_never_raises_anything_but_protocol_error(data: bytes, cuts: list[int]) -> None:
    r = MessageReader()
    pos = 0
    try:
        for n in cuts + [len(data)]:
            for m in r.feed(data[pos:pos + n]):
                assert len(m.payload) <= xs_wire.XENSTORE_PAYLOAD_MAX
            pos += n
    except ProtocolError:
        pass


def test_ring_round_trip_with_wraparound() -> None:
    page = memoryview(bytearray(4096))
    sent = b""
    got = b""
    chunk = bytes(range(256)) * 3
    for _ in range(20):                    # indices run far past the ring size
        n = ring_write(page, 0, 2048, 2052, chunk)
        sent += chunk[:n]
        got += ring_read(page, 0, 2048, 2052)
    assert got == sent and len(sent) > 10 * 1024


def test_ring_rejects_impossible_indices() -> None:
    page = memoryview(bytearray(4096))
    import struct
    struct.pack_into("<II", page, 2048, 0, 5000)        # prod - cons > ring size
    with pytest.raises(RingIndexError):
        ring_read(page, 0, 2048, 2052)
    with pytest.raises(RingIndexError):
        ring_write(page, 0, 2048, 2052, b"x")
    struct.pack_into("<II", page, 2048, 0xFFFFFFF0, 0x10)  # wrapped, 32 bytes: fine
    assert len(ring_read(page, 0, 2048, 2052)) == 32
