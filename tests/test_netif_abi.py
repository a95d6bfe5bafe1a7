"""xen/io/netif.h in Python (domains/abi/netif.py) against Xen's own header: constants, layouts, Toeplitz.

The reference is always the C compiler's view of /usr/include/xen/io/netif.h
(Debian's libxen-dev): constants and layouts are printed by programs built
from it (tests/netif_c.py).  Rings exchanged with C frontends/backends on a
shared page are tested in test_netif_rings.py; the pack/parse properties
here need no compiler.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from netif_c import HEADER, build_c, needs_headers, run_c

from xdom.domains.abi import netif as n
from xdom.domains.abi.ring import RING_HEADER_SIZE, ring_size

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
    exe = build_c(tmp_path, "layout", "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n", arch)
    xen_consts: dict[str, int] = {}
    sizes: dict[int, int] = {}
    members: dict[tuple[int, str], tuple[int, int]] = {}
    rings: dict[int, int] = {}
    for line in run_c(exe).splitlines():
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
    exe = build_c(tmp_path, "toeplitz", TOEPLITZ_MAIN, defines="#define XEN_NETIF_DEFINE_TOEPLITZ\n")
    rng = random.Random(4242)
    cases = [(RSS_KEY, bytes(range(36))), (b"", b"\xff" * 8), (b"\x01\x02\x03", b"\x80"), (RSS_KEY, b"")]
    cases += [(rng.randbytes(rng.randrange(0, 64)), rng.randbytes(rng.randrange(0, 64))) for _ in range(300)]
    text = "".join(f"{len(k)} {' '.join(map(str, k))} {len(d)} {' '.join(map(str, d))}\n" for k, d in cases)
    got = [int(x) for x in run_c(exe, stdin=text).split()]
    assert got == [n.toeplitz_hash(k, d) for k, d in cases]


# ---------------------------------------------------------------------------
# 2. properties: pack -> parse is identity; parse never raises
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
