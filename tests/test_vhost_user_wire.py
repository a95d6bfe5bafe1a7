"""vhost-user codec: exact layouts, framing at every split, fd routing, hostile input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdom.domains.vhost_user import spec, wire
from xdom.domains.vhost_user.memory import MemoryRegion
from xdom.domains.vhost_user.spec import Request
from xdom.domains.vhost_user.wire import (
    U64,
    ConfigSpace,
    Empty,
    EndOfStream,
    InflightInfo,
    LogArea,
    MemoryTable,
    Message,
    MessageReader,
    ProtocolError,
    Raw,
    SingleRegion,
    VringAddr,
    VringFile,
    VringState,
)


def region(gpa: int = 0x1000, size: int = 0x2000, uva: int = 0x7F0000000000, off: int = 0) -> MemoryRegion:
    return MemoryRegion(guest_phys_addr=gpa, memory_size=size, userspace_addr=uva, mmap_offset=off)


def feed_all(reader: MessageReader, data: bytes, fds: tuple[int, ...] = ()) -> list[wire.Event]:
    reader.receive_data(data, fds)
    out = []
    while (ev := reader.next_event()) is not None:
        out.append(ev)
    return out


# --- layouts, against the spec's structures ------------------------------------------------

def test_numbers_are_the_specs() -> None:
    # docs/interop/vhost-user.rst, "Front-end message types" and "Protocol features".
    assert (Request.GET_FEATURES, Request.SET_MEM_TABLE, Request.GET_VRING_BASE, Request.SET_VRING_ERR) == (1, 5, 11, 14)
    assert (Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM, Request.SET_VRING_ENABLE) == (15, 17, 18)
    assert (Request.GET_CONFIG, Request.GET_INFLIGHT_FD, Request.SET_INFLIGHT_FD) == (24, 31, 32)
    assert (Request.GET_MAX_MEM_SLOTS, Request.ADD_MEM_REG, Request.REM_MEM_REG) == (36, 37, 38)
    assert (Request.SET_STATUS, Request.GET_STATUS) == (39, 40)
    pf = spec.ProtocolFeature
    assert (pf.MQ, pf.REPLY_ACK, pf.CONFIG, pf.INFLIGHT_SHMFD, pf.CONFIGURE_MEM_SLOTS, pf.STATUS) == (0, 3, 9, 12, 15, 16)
    assert spec.VhostFeature.PROTOCOL_FEATURES == 30
    assert (wire.VERSION, wire.FLAG_REPLY, wire.FLAG_NEED_REPLY) == (1, 4, 8)


def test_payload_sizes_match_qemu_structs() -> None:
    assert wire.HEADER_SIZE == 12
    assert len(wire.pack_vring_state(0, 0)) == 8                      # struct vhost_vring_state
    assert len(wire.pack_vring_addr(0, 0, 0, 0, 0, 0)) == 40          # struct vhost_vring_addr
    assert len(wire.pack_memory_table([region()] * 8)) == 8 + 8 * 32  # VhostUserMemory
    assert len(wire.pack_single_region(region())) == 40               # VhostUserMemRegMsg
    assert len(wire.pack_log_area(0, 0)) == 16                        # VhostUserLog
    assert wire.CONFIG_HEADER_SIZE == 12
    # VhostUserInflight {u64, u64, u16, u16} keeps its C tail padding: QEMU sends and checks 24.
    assert wire.INFLIGHT_PAYLOAD_SIZE == 24


def test_header_layout() -> None:
    raw = wire.encode_request(Request.SET_VRING_NUM, wire.pack_vring_state(1, 256), need_reply=True)
    assert raw == struct.pack("=III", 8, 0x9, 8) + struct.pack("=II", 1, 256)
    assert wire.encode_reply(Request.GET_FEATURES, wire.pack_u64(5))[:12] == struct.pack("=III", 1, 0x5, 8)


SAMPLES: list[tuple[int, bytes, wire.Payload, int]] = [
    (Request.GET_FEATURES, b"", Empty(), 0),
    (Request.SET_FEATURES, wire.pack_u64(1 << 32 | 1 << 30), U64(value=1 << 32 | 1 << 30), 0),
    (Request.SET_OWNER, b"", Empty(), 0),
    (Request.SET_VRING_NUM, wire.pack_vring_state(0, 128), VringState(index=0, num=128), 0),
    (Request.SET_VRING_ADDR, wire.pack_vring_addr(1, 0, 0x1000, 0x3000, 0x2000, 0),
     VringAddr(index=1, flags=0, desc_user_addr=0x1000, used_user_addr=0x3000, avail_user_addr=0x2000,
               log_guest_addr=0), 0),
    (Request.SET_VRING_KICK, wire.pack_vring_file(2), VringFile(index=2, no_fd=False), 1),
    (Request.SET_VRING_CALL, wire.pack_vring_file(3, no_fd=True), VringFile(index=3, no_fd=True), 0),
    (Request.SET_MEM_TABLE, wire.pack_memory_table([region(), region(0x100000, 0x1000, 0x10000, 0x2000)]),
     MemoryTable(regions=(region(), region(0x100000, 0x1000, 0x10000, 0x2000))), 2),
    (Request.ADD_MEM_REG, wire.pack_single_region(region()), SingleRegion(region=region()), 1),
    (Request.REM_MEM_REG, wire.pack_single_region(region()), SingleRegion(region=region()), 0),
    (Request.SET_LOG_BASE, wire.pack_log_area(4096, 0), LogArea(mmap_size=4096, mmap_offset=0), 1),
    (Request.GET_CONFIG, wire.pack_config(0, 0, bytes(60)), ConfigSpace(offset=0, size=60, flags=0, data=bytes(60)), 0),
    (Request.GET_INFLIGHT_FD, wire.pack_inflight(0, 0, 1, 128),
     InflightInfo(mmap_size=0, mmap_offset=0, num_queues=1, queue_size=128), 0),
    (Request.SET_INFLIGHT_FD, wire.pack_inflight(4160, 0, 2, 128),
     InflightInfo(mmap_size=4160, mmap_offset=0, num_queues=2, queue_size=128), 1),
    (Request.SET_STATUS, wire.pack_u64(15), U64(value=15), 0),
    (Request.IOTLB_MSG, b"\1" * 24, Raw(data=b"\1" * 24), 0),
    (999, b"xyz", Raw(data=b"xyz"), 0),
]


@pytest.mark.parametrize("request_id,payload,expected,nfds", SAMPLES)
def test_round_trip_whole_bytewise_and_with_trailing_data(request_id: int, payload: bytes,
                                                          expected: wire.Payload, nfds: int) -> None:
    raw = wire.encode_request(request_id, payload)
    fds = tuple(range(100, 100 + nfds))
    # whole
    evs = feed_all(MessageReader(), raw, fds)
    assert evs == [Message(request=request_id, flags=wire.VERSION, payload=expected, fds=fds)]
    # byte by byte, fds with the first byte
    r = MessageReader()
    got: list[wire.Event] = []
    for i in range(len(raw)):
        got += feed_all(r, raw[i:i + 1], fds if i == 0 else ())
    assert got == evs
    # after an fd-less message in the same read (a read never goes past the fds' message), then more
    other = wire.encode_request(Request.GET_QUEUE_NUM)
    r = MessageReader()
    evs2 = feed_all(r, other + raw, fds) + feed_all(r, other)
    plain = Message(request=Request.GET_QUEUE_NUM, flags=wire.VERSION, payload=Empty())
    assert evs2 == [plain] + evs + [plain]
    if not nfds:
        assert feed_all(MessageReader(), raw + other) == evs + [plain]


def test_fds_belong_to_the_message_holding_their_chunks_last_byte() -> None:
    a = wire.encode_request(Request.GET_FEATURES)
    b = wire.encode_request(Request.SET_VRING_CALL, wire.pack_vring_file(0))
    r = MessageReader()
    # The kernel returns A's tail and B's first bytes in one recvmsg with B's fd.
    assert feed_all(r, a[:5]) == []
    evs = feed_all(r, a[5:] + b[:3], (7,))
    assert evs == [Message(request=Request.GET_FEATURES, flags=1, payload=Empty())]
    evs = feed_all(r, b[3:])
    assert evs == [Message(request=Request.SET_VRING_CALL, flags=1, payload=VringFile(index=0, no_fd=False), fds=(7,))]


def test_fds_after_whole_fdless_messages_in_one_read() -> None:
    # QEMU 7.2 at device start: SET_FEATURES, then ADD_MEM_REG with its fd, returned by one recvmsg.
    a = wire.encode_request(Request.SET_FEATURES, wire.pack_u64(1 << 32))
    b = wire.encode_request(Request.ADD_MEM_REG, wire.pack_single_region(region()), need_reply=True)
    evs = feed_all(MessageReader(), a + b, (11,))
    assert [ev.fds for ev in evs] == [(), (11,)]
    assert [ev.request for ev in evs] == [Request.SET_FEATURES, Request.ADD_MEM_REG]


def test_fds_arriving_mid_message_belong_to_that_message() -> None:
    b = wire.encode_request(Request.SET_VRING_KICK, wire.pack_vring_file(1))
    r = MessageReader()
    feed_all(r, b[:4])
    feed_all(r, b[4:10], (9,))
    assert feed_all(r, b[10:]) == [Message(request=Request.SET_VRING_KICK, flags=1,
                                           payload=VringFile(index=1, no_fd=False), fds=(9,))]


def test_eof_at_boundary_and_inside_a_message() -> None:
    r = MessageReader()
    assert feed_all(r, wire.encode_request(Request.SET_OWNER)) == [Message(request=3, flags=1, payload=Empty())]
    assert feed_all(r, b"") == [EndOfStream()]
    assert r.closed
    r = MessageReader()
    evs = feed_all(r, wire.encode_request(Request.SET_VRING_CALL, wire.pack_vring_file(0))[:14], (5,))
    assert evs == []
    evs = feed_all(r, b"")
    assert len(evs) == 1 and isinstance(evs[0], ProtocolError) and evs[0].fds == (5,)


BAD = [
    ("version 2", struct.pack("=III", 1, 2, 0), ()),
    ("reply flag on a request", struct.pack("=III", 1, 5, 0), ()),
    ("undefined flag", struct.pack("=III", 1, 0x11, 0), ()),
    ("oversized payload", struct.pack("=III", 5, 1, wire.MAX_PAYLOAD_SIZE + 1), ()),
    ("short u64", wire.encode_request(Request.SET_FEATURES, b"1234"), ()),
    ("long vring state", wire.encode_request(Request.SET_VRING_NUM, bytes(12)), ()),
    ("nine regions", wire.encode_request(Request.SET_MEM_TABLE, struct.pack("=II", 9, 0) + bytes(9 * 32)),
     tuple(range(10, 19))),
    ("region count vs size", wire.encode_request(Request.SET_MEM_TABLE, struct.pack("=II", 2, 0) + bytes(32)),
     (10, 11)),
    ("fd count vs regions", wire.encode_request(Request.SET_MEM_TABLE, wire.pack_memory_table([region()])), ()),
    ("kick without fd", wire.encode_request(Request.SET_VRING_KICK, wire.pack_vring_file(0)), ()),
    ("nofd with an fd", wire.encode_request(Request.SET_VRING_CALL, wire.pack_vring_file(0, True)), (4,)),
    ("reserved vring file bits", wire.encode_request(Request.SET_VRING_ERR, wire.pack_u64(0x200)), (4,)),
    ("config size vs payload", wire.encode_request(Request.GET_CONFIG, struct.pack("=III", 0, 10, 0) + bytes(4)), ()),
    ("config too large", wire.encode_request(Request.GET_CONFIG, struct.pack("=III", 0, 300, 0) + bytes(300)), ()),
    ("inflight 20 bytes", wire.encode_request(Request.GET_INFLIGHT_FD, bytes(20)), ()),
    ("fds on GET_FEATURES", wire.encode_request(Request.GET_FEATURES), (3,)),
    ("too many fds", wire.encode_request(999, b""), tuple(range(20, 29))),
]


@pytest.mark.parametrize("what,raw,fds", BAD, ids=[b[0] for b in BAD])
def test_malformed_input_is_a_protocol_error_returning_every_fd(what: str, raw: bytes, fds: tuple[int, ...]) -> None:
    r = MessageReader()
    evs = feed_all(r, raw, fds) + feed_all(r, wire.encode_request(Request.GET_FEATURES))
    assert len(evs) == 1 and isinstance(evs[0], ProtocolError), evs
    assert sorted(evs[0].fds) == sorted(fds)
    assert r.closed
    # Whatever comes later is ignored, its fds handed back for closing.
    assert feed_all(r, wire.encode_request(Request.GET_FEATURES), (77,)) == []
    assert r.take_unclaimed_fds() == [77]


def test_buffer_and_pending_fd_limits() -> None:
    r = MessageReader()
    # A header announcing a payload that never completes, then a flood.
    evs = feed_all(r, struct.pack("=III", 5, 1, 100) + bytes(wire.MAX_BUFFERED))
    assert isinstance(evs[0], ProtocolError)
    r = MessageReader()
    evs = feed_all(r, struct.pack("=III", 999, 1, 4000))     # a long payload, arriving byte by byte
    for i in range(wire.MAX_PENDING_FDS + 1):
        evs += feed_all(r, b"\1", (1000 + i,))
    assert len(evs) == 1 and isinstance(evs[0], ProtocolError)
    assert sorted(evs[0].fds) == list(range(1000, 1000 + wire.MAX_PENDING_FDS + 1))


def test_reply_reader() -> None:
    r = MessageReader(replies=True)
    evs = feed_all(r, wire.encode_reply(Request.GET_VRING_BASE, wire.pack_vring_state(0, 7)))
    assert evs == [Message(request=Request.GET_VRING_BASE, flags=5, payload=Raw(data=wire.pack_vring_state(0, 7)))]
    evs = feed_all(MessageReader(replies=True), wire.encode_request(Request.GET_FEATURES))
    assert isinstance(evs[0], ProtocolError)


# --- properties --------------------------------------------------------------------------

def _drain(r: MessageReader) -> list[wire.Event]:
    out = []
    while (ev := r.next_event()) is not None:
        out.append(ev)
    return out


def _claimed(evs: list[wire.Event]) -> list[int]:
    return [fd for ev in evs for fd in ev.fds]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.binary(max_size=80), st.lists(st.integers(0, 10000), max_size=3)), max_size=12),
       st.booleans(), st.booleans())
def test_random_bytes_only_ever_give_events_and_every_fd_back(chunks: list[tuple[bytes, list[int]]],
                                                               eof: bool, replies: bool) -> None:
    r = MessageReader(replies=replies)
    evs: list[wire.Event] = []
    handed: list[int] = []
    serial = 0
    for data, fds in chunks:
        # unique fd numbers, so that conservation can be checked
        fds = [serial + i for i in range(len(fds))]
        serial += len(fds)
        if not data:
            data = b"\0"
        handed += fds
        r.receive_data(data, fds)
        evs += _drain(r)
    if eof:
        r.receive_data(b"")
        evs += _drain(r)
    for ev in evs:
        assert isinstance(ev, (Message, ProtocolError, EndOfStream))
    assert sum(isinstance(ev, (ProtocolError, EndOfStream)) for ev in evs) <= 1
    returned = _claimed(evs) + r.take_unclaimed_fds()
    if eof or r.closed:
        assert sorted(returned) == sorted(handed)
    else:
        assert len(returned) == len(set(returned)) and set(returned) <= set(handed)


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, Message]:
    i = draw(st.sampled_from(SAMPLES))
    request_id, payload, expected, nfds = i
    need = draw(st.booleans())
    fds = tuple(draw(st.lists(st.integers(0, 1 << 20), min_size=nfds, max_size=nfds, unique=True)))
    flags = wire.VERSION | (wire.FLAG_NEED_REPLY if need else 0)
    return wire.encode_request(request_id, payload, need_reply=need), Message(request=request_id, flags=flags,
                                                                               payload=expected, fds=fds)


@settings(max_examples=200, deadline=None)
@given(st.lists(messages(), min_size=1, max_size=8), st.data())
def test_valid_streams_split_anywhere_decode_exactly(msgs: list[tuple[bytes, Message]], data: st.DataObject) -> None:
    # The kernel's behaviour: reads are cut anywhere, except that a read returning a message's fds
    # (with its first bytes, perhaps after fd-less bytes before it) stops inside that message.
    stream = b"".join(raw for raw, _ in msgs)
    spans = []
    pos = 0
    for raw, m in msgs:
        spans.append((pos, pos + len(raw), m.fds))
        pos += len(raw)
    cuts = set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=10)) if len(stream) > 1 else [])
    cuts |= {end for _, end, fds in spans if fds} | {0}
    bounds = sorted(cuts | {len(stream)})
    r = MessageReader()
    evs: list[wire.Event] = []
    for a, b in zip(bounds, bounds[1:]):
        fds = tuple(fd for s, _, mfds in spans if a <= s < b for fd in mfds)
        r.receive_data(stream[a:b], fds)
        evs += _drain(r)
    assert evs == [m for _, m in msgs]
