"""Hostile hypercall frames: every malformed request gets an error reply.

A domain talks to the broker over a SOCK_SEQPACKET socket, one msgpack map
per message.  These tests speak that protocol by hand on a raw socket
(tests/hypercall_client.py) and send what no well-behaved xenhost would:
garbage, non-maps, unknown ops, missing, extra and mistyped fields, replayed
tokens (batches: test_hostile_hypercall_batches.py; sizes, descriptors and
whole connections: test_hostile_hypercall_connections.py).  Each case
checks the exact errno of the reply, that the same connection still answers
a valid request afterwards, and that two well-behaved domains
(``Bystanders``) keep being served throughout.  The broker process must
survive all of it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_until  # noqa: E402
from hypercall_client import (
    REFUSALS,
    VALID_SHAPES,
    Bystanders,
    Raw,
    RawConn,
    pack,
    raw_connections,
    request_shape,
    served_bystanders,
    wire_verdict,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdom.broker.mgmt_client import ManagementClient
from xdom.deploy.launcher import BrokerProcess
from xdom.domains.abi.event_channel import (
    DOMID_SELF,
)
from xdom.domains.abi.hypercall_wire import (
    REQUESTS,
)


@pytest.fixture
def bystanders(broker: BrokerProcess, mgmt: ManagementClient) -> Iterator[Bystanders]:
    yield from served_bystanders(broker, mgmt)


@pytest.fixture
def raw(mgmt: ManagementClient) -> Iterator[Raw]:
    yield from raw_connections(mgmt)


# ---- authentication ----------------------------------------------------------


def test_every_op_before_hello_is_eperm(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.fresh()
    for op in REQUESTS:
        if op not in ("hello", "rejoin"):
            conn.expect(request_shape(op), "EPERM")
    # rejoin is for a running domain whose broker died: this broker has none waiting
    conn.expect(request_shape("rejoin"), "ESRCH")
    bystanders.check()
    # The connection can still introduce itself afterwards.
    conn.hello(creds["token"])
    conn.set_memory(creds["nr_frames"])
    conn.probe()


def test_ops_before_set_memory_are_eperm(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.introduced()
    for op in REQUESTS:
        if op not in ("hello", "rejoin", "populate_physmap", "set_memory", "shutdown"):
            conn.expect(request_shape(op), "EPERM")
    conn.expect({"op": "hello", "token": creds["token"]}, "EALREADY")
    conn.expect(request_shape("rejoin"), "EALREADY")
    bystanders.check()
    conn.set_memory(creds["nr_frames"])
    conn.probe()


def test_second_hello_is_ealready(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.running()
    conn.expect({"op": "hello", "token": creds["token"]}, "EALREADY")
    other = raw.create()
    # Even a valid, unused token of another domain: one connection, one domain.
    conn.expect({"op": "hello", "token": other["token"]}, "EALREADY")
    assert raw.mgmt.request("info", domid=other["domid"])["domain"]["state"] == "created"
    c2 = raw.connect(other["hypercall"])
    c2.hello(other["token"])         # the token was not consumed by the refused hello
    bystanders.check()


def test_wrong_and_used_tokens_are_eacces(raw: Raw, bystanders: Bystanders) -> None:
    victim, creds = raw.running()
    conn = raw.connect(creds["hypercall"])
    for token in ["", "0" * 32, creds["token"][:-1], creds["token"] + "0", creds["token"].upper(),
                  "x" * 4096, creds["token"]]:   # the last one is the used token
        conn.expect({"op": "hello", "token": token}, "EACCES")
    # A destroyed domain's unused token is dead too.
    gone = raw.create()
    raw.mgmt.request("destroy", domid=gone["domid"])
    conn.expect({"op": "hello", "token": gone["token"]}, "EACCES")
    # A refused hello does not poison the connection: a right token still works.
    fresh = raw.create()
    conn.hello(fresh["token"])
    conn.set_memory(fresh["nr_frames"])
    conn.probe()
    victim.probe()
    assert raw.mgmt.request("info", domid=creds["domid"])["domain"]["pid"] == os.getpid()
    bystanders.check()


def test_empty_token_cannot_claim_domain_mid_handshake(raw: Raw, bystanders: Bystanders) -> None:
    victim, creds = raw.introduced()        # said hello, has not registered memory yet
    intruder = raw.connect(creds["hypercall"])
    intruder.expect({"op": "hello", "token": ""}, "EACCES")


def test_domain_that_hangs_up_after_hello_can_be_restarted(raw: Raw, bystanders: Bystanders) -> None:
    # What BrokerXenHost does when DomainMemory() fails (e.g. vm.max_map_count) after hello.
    conn, creds = raw.introduced()
    conn.close()
    wait_until(lambda: raw.mgmt.request("info", domid=creds["domid"])["domain"]["state"] != "created",
               timeout=3, what="the broker to notice the domain is gone")
    again = raw.mgmt.request("restart", domid=creds["domid"])
    c2 = raw.connect(again["hypercall"])
    c2.hello(again["token"])


def test_non_ascii_token_is_eacces(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.fresh()
    conn.expect({"op": "hello", "token": "\u00e9" * 32}, "EACCES")


# ---- undecodable and misshapen frames -------------------------------------


def test_random_garbage_bytes(raw: Raw, bystanders: Bystanders) -> None:
    rng = random.Random(0x5eed)
    pre, _ = raw.fresh()
    conn, _ = raw.running()
    for i in range(300):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 2048)))
        if i % 3 == 0:
            data = b"\xc1" + data       # 0xc1 is never used by msgpack: surely undecodable
        expected = wire_verdict(data)
        assert expected is not None
        for c in (pre, conn):
            reply = c.expect(data, expected)
            assert reply["errno"] != "EIO"
        if i % 100 == 0:
            bystanders.check()
    # What the decoder can never make sense of is EBADMSG.
    for data in (b"\xc1", b"\x81", b"\x92\x01", b"\xdf\xff\xff\xff\xff", b"\xc7\x01\x05x", b"\xff" * 64):
        conn.expect(data, "EBADMSG")
        pre.expect(data, "EBADMSG")


HYPOTHESIS = settings(max_examples=200, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow])


def expect_verdict(conn: RawConn, data: bytes) -> None:
    """The broker answers ``data`` as the wire decoder judges it; a valid request gets a proper answer."""
    expected = wire_verdict(data)
    if expected is None:     # well-shaped: the hypervisor decides, but never with an internal error
        reply = conn.request(data)
        assert reply["ok"] or reply["errno"] in REFUSALS, f"{data!r:.200}: {reply}"
        conn.probe()
    else:
        conn.expect(data, expected)


def test_hypothesis_garbage_bytes(raw: Raw, bystanders: Bystanders) -> None:
    # Empty frames are left out: on SOCK_SEQPACKET a zero-length message reads
    # exactly like EOF, and the broker treats it as the domain hanging up
    # (see test_empty_frame_hangs_up_only_that_connection).
    conns = (raw.fresh()[0], raw.running()[0])

    @HYPOTHESIS
    @given(data=st.binary(min_size=1, max_size=4096))
    def check(data: bytes) -> None:
        for c in conns:
            expect_verdict(c, data)

    check()
    bystanders.check()


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**63, max_value=2**64 - 1)
    | st.floats(allow_nan=True) | st.text(max_size=24) | st.binary(max_size=24),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=12) | st.sampled_from(["op", "port", "ops", "token"]),
                      children, max_size=6),
    max_leaves=24)


def test_hypothesis_arbitrary_msgpack(raw: Raw, bystanders: Bystanders) -> None:
    conn = raw.running()[0]

    @HYPOTHESIS
    @given(obj=msgpack_values)
    def check(obj: Any) -> None:
        expect_verdict(conn, pack(obj))

    check()
    bystanders.check()


wire_ints = st.one_of(
    st.integers(min_value=-2**63, max_value=2**64 - 1),
    st.integers(min_value=-2, max_value=70000),
    st.sampled_from([0, 1, 2, DOMID_SELF, DOMID_SELF + 1, 2**31, 2**32 - 1, 2**32, -1, 2**63]))
field_values = st.one_of(
    wire_ints, st.booleans(), st.none(), st.floats(), st.text(max_size=8), st.binary(max_size=8),
    st.lists(wire_ints, max_size=9),
    st.lists(st.lists(wire_ints | st.booleans(), min_size=0, max_size=9), max_size=8))
fuzzed_ops = sorted(set(REQUESTS) - {"shutdown"})


@st.composite
def shaped_requests(draw: st.DrawFn) -> dict[str, Any]:
    """Requests naming a real op, with fields of any type and value, now and then one too many or few."""
    op = draw(st.sampled_from(fuzzed_ops))
    msg: dict[str, Any] = {"op": op}
    for name in REQUESTS[op]:
        if draw(st.integers(0, 19)):
            msg[name] = draw(field_values)
    if not draw(st.integers(0, 9)):
        msg[draw(st.sampled_from(["domid", "caller", "x", "ops", "port"]))] = draw(field_values)
    return msg


def test_hypothesis_fields_of_any_type_and_value(raw: Raw, bystanders: Bystanders) -> None:
    conn = raw.running()[0]

    @HYPOTHESIS
    @given(msg=shaped_requests())
    def check(msg: dict[str, Any]) -> None:
        expect_verdict(conn, pack(msg))

    check()
    bystanders.check()


def test_not_a_map_is_ebadmsg(raw: Raw, bystanders: Bystanders) -> None:
    pre, _ = raw.fresh()
    conn, _ = raw.running()
    for obj in [None, True, 0, -1, 2**64 - 1, 1.5, "evtchn_status", b"\x00\x01", [], ["op", "domain_info"],
                [{"op": "domain_info", "domid": DOMID_SELF}]]:
        conn.expect(pack(obj), "EBADMSG")
        pre.expect(pack(obj), "EBADMSG")
    # Two maps in one frame are not one request.
    conn.expect(pack({"op": "domain_info", "domid": DOMID_SELF}) * 2, "EBADMSG")
    # Map keys must be strings.
    conn.expect(b"\x82\x01\x02\xa2op\xa4ping", "EBADMSG")
    # Nesting beyond the decoder's limits.
    conn.expect(b"\x91" * 2000 + b"\xc0", "EBADMSG")
    conn.expect(pack({"op": "domain_info", "domid": DOMID_SELF, **{f"k{i}": i for i in range(70)}}), "EBADMSG")
    bystanders.check()


def test_unknown_op_is_enosys(raw: Raw, bystanders: Bystanders) -> None:
    pre, _ = raw.fresh()
    conn, _ = raw.running()
    for msg in [{}, {"domid": 0}, {"op": ""}, {"op": "reboot_host"}, {"op": "HELLO", "token": "x"},
                {"op": "map "}, {"op": "_hello"}, {"op": "__init__"}, {"op": "handlers"},
                {"op": 1}, {"op": None}, {"op": True}, {"op": ["map"]}, {"op": {"op": "map"}},
                {"op": b"domain_info", "domid": DOMID_SELF}, {"op": "x" * 4000}]:
        conn.expect(msg, "ENOSYS")
        pre.expect(msg, "ENOSYS")      # decoding comes before authentication
    bystanders.check()


def test_missing_extra_and_mistyped_fields_are_einval(raw: Raw, bystanders: Bystanders) -> None:
    conn, creds = raw.running()
    cases: list[dict[str, Any]] = []
    for op, shape in VALID_SHAPES.items():
        for name in shape:                                  # each field missing
            cases.append({"op": op, **{k: v for k, v in shape.items() if k != name}})
        # No field ever names the caller, and unknown fields are refused.
        for extra in ({"domid": creds["domid"]} if op not in ("domain_info", "rejoin") else {"caller": 0}, {"z": None}):
            cases.append({"op": op, **shape, **extra})
        for name, value in shape.items():                   # each field mistyped
            for wrong in (None, 1.0, "1", b"1", [1], {"a": 1}, 0 if not isinstance(value, int) else "0"):
                if type(wrong) is type(value):
                    continue
                cases.append({"op": op, **shape, name: wrong})
    cases += [{"op": "map", "ops": {"0": [0, 0, 0]}}, {"op": "map", "ops": "ops"},
              {"op": "unmap", "handles": 5}, {"op": "copy", "ops": None},
              {"op": "evtchn_bind_interdomain"}, {"op": "hello"}]
    assert len(cases) > 100
    for msg in cases:
        conn.expect(msg, "EINVAL")
    bystanders.check()
    # Before hello the shape is checked first, too.
    pre, _ = raw.fresh()
    for msg in cases[::7]:
        pre.expect(msg, "EINVAL")


def test_booleans_where_ints_belong_are_einval(raw: Raw, bystanders: Bystanders) -> None:
    conn, _ = raw.running()
    for op, shape in VALID_SHAPES.items():
        for name, value in shape.items():
            if type(value) is int:
                for b in (True, False):
                    conn.expect({"op": op, **shape, name: b}, "EINVAL")
    bystanders.check()
