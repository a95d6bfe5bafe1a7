"""Sans-IO codec for vhost-user messages (the front end's requests and our replies).

Rules of this module:

* It owns every byte of the vhost-user wire format and nothing else: no
  sockets, no fds opened or closed, no clocks (the h11 style).  The I/O shell
  feeds ``MessageReader.receive_data(bytes, fds)`` with what ``recvmsg``
  returned, including SCM_RIGHTS descriptors, and takes events out.
* Nothing from the peer is trusted.  Every length is bounded by a named limit
  (``MAX_PAYLOAD_SIZE``, ``MAX_FDS_PER_MESSAGE``, ``MAX_BUFFERED``,
  ``MAX_MEM_TABLE_REGIONS``, ``MAX_CONFIG_SIZE``); a payload must have exactly
  the size its request defines.  Malformed input becomes a ``ProtocolError``
  event, never an exception, and the reader stays in error for good: the
  byte stream has no resynchronisation point, and a vhost-user front end
  that breaks framing is not one to keep talking to.
* Every descriptor handed in comes out exactly once: attached to a
  ``Message``, listed in a ``ProtocolError``/``EndOfStream``, or returned by
  ``take_unclaimed_fds()``.  Whoever receives it owns it (must close it).

Where the numbers come from: QEMU's ``docs/interop/vhost-user.rst`` ("Message
Specification"; the request ids and feature bits are in ``spec``) and the
structures of ``subprojects/libvhost-user/libvhost-user.h`` and
``hw/virtio/vhost-user.c``.  All numbers are in the machine's native byte
order (the spec says so); the structs are packed, except that the payload of
``VhostUserInflight`` keeps the C tail padding of its ``u64, u64, u16, u16``
layout (24 bytes, what QEMU sends and checks).

Which descriptors go with which message.  QEMU sends each message with one
``sendmsg`` and attaches the fds to it.  A unix stream ``recvmsg`` may return
the tail of earlier fd-less messages together with it, but it hands over the
fds when it first copies from the segment carrying them and then stops
(``unix_stream_read_generic``: "if (scm.fp) break"), so the chunk that
brings fds always *ends* inside the message they were sent with.  The rule
here is therefore: the fds that arrived with a chunk belong to the message
holding that chunk's last byte.  (Seen with QEMU 7.2: SET_FEATURES and the
ADD_MEM_REG after it, with its fd, arrive in one read.)
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .memory import MemoryRegion
from .spec import Request

__all__ = [
    "VERSION", "VERSION_MASK", "FLAG_REPLY", "FLAG_NEED_REPLY", "VRING_IDX_MASK", "VRING_NOFD_MASK",
    "VRING_F_LOG", "HEADER_SIZE", "MAX_PAYLOAD_SIZE", "MAX_FDS_PER_MESSAGE", "MAX_BUFFERED",
    "MAX_MEM_TABLE_REGIONS", "MAX_CONFIG_SIZE", "CONFIG_HEADER_SIZE", "INFLIGHT_PAYLOAD_SIZE",
    "Empty", "U64", "VringState", "VringAddr", "VringFile", "MemoryTable", "SingleRegion", "LogArea",
    "ConfigSpace", "InflightInfo", "Raw", "Payload",
    "Message", "ProtocolError", "EndOfStream", "Event", "MessageReader", "decode_payload",
    "encode_message", "encode_request", "encode_reply",
    "pack_u64", "pack_vring_state", "pack_vring_addr", "pack_vring_file", "pack_memory_table",
    "pack_single_region", "pack_log_area", "pack_config", "pack_inflight",
]


# --- header flags ---------------------------------------------------------------

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
#: SET_VRING_KICK/CALL/ERR: bits 0-7 are the ring index, bit 8 says "no fd".
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100
#: SET_VRING_ADDR flags: bit 0 asks for logging of used-ring writes.
VRING_F_LOG = 0x1

# --- limits -------------------------------------------------------------------

_HEADER = struct.Struct("=III")          # request, flags, size
HEADER_SIZE = _HEADER.size
#: Largest payload accepted.  QEMU's own VhostUserPayload union is well under
#: 1 KiB (its largest member is the crypto session); anything larger is not a
#: vhost-user message.
MAX_PAYLOAD_SIZE = 4096
#: Most descriptors one message may carry: SET_MEM_TABLE's 8 regions
#: (``VHOST_MEMORY_BASELINE_NREGIONS``).
MAX_FDS_PER_MESSAGE = 8
#: Most regions in one SET_MEM_TABLE.
MAX_MEM_TABLE_REGIONS = 8
#: Largest virtio config space (``VHOST_USER_MAX_CONFIG_SIZE``).
MAX_CONFIG_SIZE = 256
#: Most bytes held unparsed.  The shell drains events after every recv, so
#: this is only reached by a peer that floods us while we wait on ourselves.
MAX_BUFFERED = 256 * 1024
#: Most descriptors held before the message they belong to is complete.
MAX_PENDING_FDS = 64

_U64 = struct.Struct("=Q")
_VRING_STATE = struct.Struct("=II")                  # struct vhost_vring_state
_VRING_ADDR = struct.Struct("=IIQQQQ")               # struct vhost_vring_addr
_MEM_HEADER = struct.Struct("=II")                   # nregions, padding
_MEM_REGION = struct.Struct("=QQQQ")                 # VhostUserMemoryRegion
_MEM_REG_MSG = struct.Struct("=QQQQQ")               # padding u64, region
_LOG = struct.Struct("=QQ")                          # VhostUserLog
_CONFIG_HEADER = struct.Struct("=III")               # offset, size, flags
CONFIG_HEADER_SIZE = _CONFIG_HEADER.size
_INFLIGHT = struct.Struct("=QQHHxxxx")               # VhostUserInflight, with its C tail padding
INFLIGHT_PAYLOAD_SIZE = _INFLIGHT.size


# --- payloads -----------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Empty:
    """A request without payload (any bytes the front end attached are ignored)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class U64:
    value: int


@dataclass(frozen=True, slots=True, kw_only=True)
class VringState:
    """``struct vhost_vring_state``: a ring index and a number (size, base, enable)."""
    index: int
    num: int


@dataclass(frozen=True, slots=True, kw_only=True)
class VringAddr:
    """``struct vhost_vring_addr``: the ring's three parts as front-end *user* addresses."""
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


@dataclass(frozen=True, slots=True, kw_only=True)
class VringFile:
    """The u64 of SET_VRING_KICK/CALL/ERR: ring index and whether an fd came with it."""
    index: int
    no_fd: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryTable:
    regions: tuple[MemoryRegion, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SingleRegion:
    region: MemoryRegion


@dataclass(frozen=True, slots=True, kw_only=True)
class LogArea:
    mmap_size: int
    mmap_offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigSpace:
    """``VhostUserConfig``: a window of the device's config space (``data`` is ``size`` bytes)."""
    offset: int
    size: int
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class InflightInfo:
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Raw:
    """A payload this codec does not interpret (unsupported requests, replies)."""
    data: bytes


Payload = (Empty | U64 | VringState | VringAddr | VringFile | MemoryTable | SingleRegion | LogArea
           | ConfigSpace | InflightInfo | Raw)


# --- events -------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """One complete, well-formed message.  ``request`` is a ``Request`` when the id is known.

    ``fds`` now belong to the receiver of this event: it must keep or close each one.
    """
    request: int
    flags: int
    payload: Payload
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtocolError:
    """The peer broke the framing or sent a malformed payload; the connection must end.

    ``fds`` are every descriptor the reader still held; the receiver closes them.
    """
    reason: str
    fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class EndOfStream:
    """The peer closed the connection at a message boundary."""
    fds: tuple[int, ...] = ()


Event = Message | ProtocolError | EndOfStream


class _Malformed(Exception):
    pass


# --- payload decoders -------------------------------------------------------------

def _exact(size: int, data: bytes, what: str) -> None:
    if len(data) != size:
        raise _Malformed(f"{what} payload is {len(data)} bytes, expected {size}")


def _dec_empty(data: bytes) -> Payload:
    return Empty()


def _dec_u64(data: bytes) -> Payload:
    _exact(_U64.size, data, "u64")
    return U64(value=_U64.unpack(data)[0])


def _dec_vring_state(data: bytes) -> Payload:
    _exact(_VRING_STATE.size, data, "vring state")
    index, num = _VRING_STATE.unpack(data)
    return VringState(index=index, num=num)


def _dec_vring_addr(data: bytes) -> Payload:
    _exact(_VRING_ADDR.size, data, "vring address")
    index, flags, desc, used, avail, log = _VRING_ADDR.unpack(data)
    return VringAddr(index=index, flags=flags, desc_user_addr=desc, used_user_addr=used,
                     avail_user_addr=avail, log_guest_addr=log)


def _dec_vring_file(data: bytes) -> Payload:
    _exact(_U64.size, data, "vring file")
    v = _U64.unpack(data)[0]
    if v & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
        raise _Malformed(f"vring file word {v:#x} has reserved bits set")
    return VringFile(index=v & VRING_IDX_MASK, no_fd=bool(v & VRING_NOFD_MASK))


def _region(fields: tuple[int, ...]) -> MemoryRegion:
    gpa, size, uva, off = fields
    return MemoryRegion(guest_phys_addr=gpa, memory_size=size, userspace_addr=uva, mmap_offset=off)


def _dec_mem_table(data: bytes) -> Payload:
    if len(data) < _MEM_HEADER.size:
        raise _Malformed("memory table payload shorter than its header")
    n, _pad = _MEM_HEADER.unpack_from(data)
    if n > MAX_MEM_TABLE_REGIONS:
        raise _Malformed(f"memory table has {n} regions, at most {MAX_MEM_TABLE_REGIONS}")
    _exact(_MEM_HEADER.size + n * _MEM_REGION.size, data, "memory table")
    regions = tuple(_region(_MEM_REGION.unpack_from(data, _MEM_HEADER.size + i * _MEM_REGION.size))
                    for i in range(n))
    return MemoryTable(regions=regions)


def _dec_single_region(data: bytes) -> Payload:
    _exact(_MEM_REG_MSG.size, data, "memory region")
    return SingleRegion(region=_region(_MEM_REG_MSG.unpack(data)[1:]))


def _dec_log(data: bytes) -> Payload:
    if len(data) == _U64.size:          # the spec's table still says "u64"; QEMU sends VhostUserLog
        return U64(value=_U64.unpack(data)[0])
    _exact(_LOG.size, data, "log area")
    size, off = _LOG.unpack(data)
    return LogArea(mmap_size=size, mmap_offset=off)


def _dec_config(data: bytes) -> Payload:
    if len(data) < CONFIG_HEADER_SIZE:
        raise _Malformed("config payload shorter than its header")
    offset, size, flags = _CONFIG_HEADER.unpack_from(data)
    if size > MAX_CONFIG_SIZE:
        raise _Malformed(f"config access of {size} bytes exceeds {MAX_CONFIG_SIZE}")
    _exact(CONFIG_HEADER_SIZE + size, data, "config")
    return ConfigSpace(offset=offset, size=size, flags=flags, data=bytes(data[CONFIG_HEADER_SIZE:]))


def _dec_inflight(data: bytes) -> Payload:
    _exact(INFLIGHT_PAYLOAD_SIZE, data, "inflight description")
    size, off, nq, qs = _INFLIGHT.unpack(data)
    return InflightInfo(mmap_size=size, mmap_offset=off, num_queues=nq, queue_size=qs)


def _dec_raw(data: bytes) -> Payload:
    return Raw(data=bytes(data))


# How many fds each request may carry: (min, max), or a callable of the payload.
_FdRule = tuple[int, int] | Callable[[Payload], tuple[int, int]]


def _fds_vring_file(p: Payload) -> tuple[int, int]:
    assert isinstance(p, VringFile)
    return (0, 0) if p.no_fd else (1, 1)


def _fds_mem_table(p: Payload) -> tuple[int, int]:
    assert isinstance(p, MemoryTable)
    return len(p.regions), len(p.regions)


_NO_FDS = (0, 0)
_ONE_FD = (1, 1)

#: request -> (payload decoder, fd rule).  Requests not listed decode as Raw
#: with up to MAX_FDS_PER_MESSAGE fds: the back end refuses them.
_REQUESTS: dict[int, tuple[Callable[[bytes], Payload], _FdRule]] = {
    Request.GET_FEATURES: (_dec_empty, _NO_FDS),
    Request.SET_FEATURES: (_dec_u64, _NO_FDS),
    Request.SET_OWNER: (_dec_empty, _NO_FDS),
    Request.RESET_OWNER: (_dec_empty, _NO_FDS),
    Request.SET_MEM_TABLE: (_dec_mem_table, _fds_mem_table),
    Request.SET_LOG_BASE: (_dec_log, (0, 1)),
    Request.SET_LOG_FD: (_dec_empty, (0, 1)),
    Request.SET_VRING_NUM: (_dec_vring_state, _NO_FDS),
    Request.SET_VRING_ADDR: (_dec_vring_addr, _NO_FDS),
    Request.SET_VRING_BASE: (_dec_vring_state, _NO_FDS),
    Request.GET_VRING_BASE: (_dec_vring_state, _NO_FDS),
    Request.SET_VRING_KICK: (_dec_vring_file, _fds_vring_file),
    Request.SET_VRING_CALL: (_dec_vring_file, _fds_vring_file),
    Request.SET_VRING_ERR: (_dec_vring_file, _fds_vring_file),
    Request.GET_PROTOCOL_FEATURES: (_dec_empty, _NO_FDS),
    Request.SET_PROTOCOL_FEATURES: (_dec_u64, _NO_FDS),
    Request.GET_QUEUE_NUM: (_dec_empty, _NO_FDS),
    Request.SET_VRING_ENABLE: (_dec_vring_state, _NO_FDS),
    Request.SEND_RARP: (_dec_u64, _NO_FDS),
    Request.NET_SET_MTU: (_dec_u64, _NO_FDS),
    Request.SET_BACKEND_REQ_FD: (_dec_empty, _ONE_FD),
    Request.SET_VRING_ENDIAN: (_dec_vring_state, _NO_FDS),
    Request.GET_CONFIG: (_dec_config, _NO_FDS),
    Request.SET_CONFIG: (_dec_config, _NO_FDS),
    Request.GET_INFLIGHT_FD: (_dec_inflight, _NO_FDS),
    Request.SET_INFLIGHT_FD: (_dec_inflight, _ONE_FD),
    Request.RESET_DEVICE: (_dec_empty, _NO_FDS),
    Request.VRING_KICK: (_dec_vring_state, _NO_FDS),
    Request.GET_MAX_MEM_SLOTS: (_dec_empty, _NO_FDS),
    Request.ADD_MEM_REG: (_dec_single_region, _ONE_FD),
    # The spec: no fd SHOULD come, a back end MAY accept one and MUST close it.
    Request.REM_MEM_REG: (_dec_single_region, (0, 1)),
    Request.SET_STATUS: (_dec_u64, _NO_FDS),
    Request.GET_STATUS: (_dec_empty, _NO_FDS),
}

_ANY_FDS = (0, MAX_FDS_PER_MESSAGE)


def decode_payload(request: int, data: bytes, nfds: int) -> Payload:
    """Decode a request's payload; raises ``ValueError`` if it is malformed for that request."""
    try:
        return _decode(request, data, nfds)
    except _Malformed as e:
        raise ValueError(str(e)) from None


def _decode(request: int, data: bytes, nfds: int) -> Payload:
    decoder, rule = _REQUESTS.get(request, (_dec_raw, _ANY_FDS))
    payload = decoder(data)
    lo, hi = rule(payload) if callable(rule) else rule
    if not lo <= nfds <= hi:
        name = Request(request).name if request in Request._value2member_map_ else str(request)
        want = str(lo) if lo == hi else f"{lo}..{hi}"
        raise _Malformed(f"{name} came with {nfds} fds, expected {want}")
    return payload


# --- the reader -----------------------------------------------------------------

class MessageReader:
    """Turns the byte stream (and its SCM_RIGHTS fds) from one peer into events.

    ``replies=False`` (a back end) reads the front end's requests and decodes
    their payloads; ``replies=True`` (a front end, or a test playing one) reads
    replies and leaves payloads ``Raw``.
    """

    def __init__(self, *, replies: bool = False) -> None:
        self._replies = replies
        self._buf = bytearray()
        self._pos = 0              # parse position in _buf
        self._base = 0             # stream offset of _buf[0]
        self._received = 0         # stream offset of the next byte to arrive
        # fds not yet claimed: (stream offset where their chunk began, where it ended, fds)
        self._pending: deque[tuple[int, int, tuple[int, ...]]] = deque()
        self._unclaimed: list[int] = []
        self._eof = False
        self._done = False
        self._events: deque[Event] = deque()

    @property
    def closed(self) -> bool:
        """True once a ProtocolError or EndOfStream has been produced (or queued)."""
        return self._done

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Feed what one ``recvmsg`` returned; ``b""`` means the peer closed (EOF).

        Descriptors handed in are the reader's to pass on from here (see the
        module rules); after the reader has closed they go straight to
        ``take_unclaimed_fds()``.
        """
        fds = tuple(int(f) for f in fds)
        if self._done or self._eof:
            self._unclaimed.extend(fds)
            return
        if not data:
            self._eof = True
            if fds:
                self._pending.append((self._received, self._received, fds))
            return
        n = memoryview(data).nbytes
        if fds:
            self._pending.append((self._received, self._received + n, fds))
        self._received += n
        self._buf += data
        if self.buffered > MAX_BUFFERED:
            self._fail(f"peer sent more than {MAX_BUFFERED} bytes without them being consumed")
        elif sum(len(f) for _, _, f in self._pending) > MAX_PENDING_FDS:
            self._fail(f"peer sent more than {MAX_PENDING_FDS} descriptors ahead of their messages")

    def next_event(self) -> Event | None:
        """The next event, or None when more input is needed (or everything has been reported)."""
        if not self._events and not self._done:
            try:
                self._parse_one()
            except Exception as exc:       # a bug here must not take the shell down with it
                self._fail(f"internal codec error: {exc!r}")
        return self._events.popleft() if self._events else None

    def close(self) -> None:
        """Stop decoding (the receiver ended the connection): every fd still held, in queued
        events or waiting for its message, moves to ``take_unclaimed_fds()``."""
        if self._done and not self._events and not self._pending:
            return
        self._done = True
        for ev in self._events:
            self._unclaimed.extend(ev.fds)
        self._events.clear()
        self._unclaimed.extend(self._all_pending_fds())
        self._buf.clear()
        self._pos = 0

    def take_unclaimed_fds(self) -> list[int]:
        """Descriptors that arrived after the reader closed (or were held when ``close`` was
        called): the caller closes them."""
        out, self._unclaimed = self._unclaimed, []
        return out

    # --- internals ------------------------------------------------------------------

    def _all_pending_fds(self) -> tuple[int, ...]:
        out = tuple(fd for _, _, fds in self._pending for fd in fds)
        self._pending.clear()
        return out

    def _fail(self, reason: str) -> None:
        self._done = True
        self._events.append(ProtocolError(reason=reason, fds=self._all_pending_fds()))
        self._buf.clear()
        self._pos = 0

    def _claim_fds(self, start: int, end: int) -> tuple[int, ...]:
        """The fds of the message at stream offsets [start, end): those of every chunk whose last
        byte (offset c1 - 1) lies in it (see the module docstring).  Chunks are in stream order
        and messages are claimed in order, so the ones to take are at the front."""
        out: list[int] = []
        while self._pending:
            c0, c1, fds = self._pending[0]
            if c1 - 1 < end:
                out.extend(fds)
                self._pending.popleft()
            else:
                break
        return tuple(out)

    def _parse_one(self) -> None:
        avail = len(self._buf) - self._pos
        if avail < HEADER_SIZE:
            if self._eof:
                self._done = True
                if avail:
                    self._events.append(ProtocolError(reason=f"connection closed inside a message header"
                                                             f" ({avail} of {HEADER_SIZE} bytes)",
                                                      fds=self._all_pending_fds()))
                else:
                    self._events.append(EndOfStream(fds=self._all_pending_fds()))
            return
        request, flags, size = _HEADER.unpack_from(self._buf, self._pos)
        if flags & VERSION_MASK != VERSION:
            return self._fail(f"message {request} has version {flags & VERSION_MASK}, expected {VERSION}")
        allowed = (VERSION_MASK | FLAG_REPLY) if self._replies else (VERSION_MASK | FLAG_NEED_REPLY)
        if flags & ~allowed or bool(flags & FLAG_REPLY) != self._replies:
            return self._fail(f"message {request} has flags {flags:#x}")
        if size > MAX_PAYLOAD_SIZE:
            return self._fail(f"message {request} announces a {size}-byte payload, at most {MAX_PAYLOAD_SIZE}")
        if avail < HEADER_SIZE + size:
            if self._eof:
                self._fail(f"connection closed inside message {request}'s payload")
            return
        start = self._base + self._pos
        end = start + HEADER_SIZE + size
        data = bytes(self._buf[self._pos + HEADER_SIZE:self._pos + HEADER_SIZE + size])
        self._pos += HEADER_SIZE + size
        fds = self._claim_fds(start, end)
        if len(fds) > MAX_FDS_PER_MESSAGE:
            self._done = True
            self._events.append(ProtocolError(reason=f"message {request} came with {len(fds)} fds,"
                                                     f" at most {MAX_FDS_PER_MESSAGE}",
                                              fds=fds + self._all_pending_fds()))
            return
        if self._replies:
            payload: Payload = Raw(data=data)
        else:
            try:
                payload = _decode(request, data, len(fds))
            except _Malformed as e:
                self._done = True
                self._events.append(ProtocolError(reason=str(e), fds=fds + self._all_pending_fds()))
                return
        req: int = Request(request) if request in Request._value2member_map_ else request
        self._events.append(Message(request=req, flags=flags, payload=payload, fds=fds))
        # Drop consumed bytes now and then so the buffer does not grow with the stream.
        if self._pos > 65536 or self._pos == len(self._buf):
            del self._buf[:self._pos]
            self._base += self._pos
            self._pos = 0


# --- encoding -----------------------------------------------------------------

def encode_message(request: int, flags: int, payload: bytes = b"") -> bytes:
    """Header plus payload.  Raises ``ValueError`` on a payload no peer would accept."""
    if len(payload) > MAX_PAYLOAD_SIZE:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_SIZE}")
    return _HEADER.pack(int(request), flags, len(payload)) + bytes(payload)


def encode_request(request: int, payload: bytes = b"", *, need_reply: bool = False) -> bytes:
    """A front-end request (used by tests and by anything playing the front end)."""
    return encode_message(request, VERSION | (FLAG_NEED_REPLY if need_reply else 0), payload)


def encode_reply(request: int, payload: bytes = b"") -> bytes:
    """A back-end reply: QEMU insists the flags are exactly VERSION | REPLY."""
    return encode_message(request, VERSION | FLAG_REPLY, payload)


def pack_u64(value: int) -> bytes:
    return _U64.pack(value)


def pack_vring_state(index: int, num: int) -> bytes:
    return _VRING_STATE.pack(index, num)


def pack_vring_addr(index: int, flags: int, desc: int, used: int, avail: int, log: int = 0) -> bytes:
    return _VRING_ADDR.pack(index, flags, desc, used, avail, log)


def pack_vring_file(index: int, no_fd: bool = False) -> bytes:
    return _U64.pack((index & VRING_IDX_MASK) | (VRING_NOFD_MASK if no_fd else 0))


def _pack_region(r: MemoryRegion) -> bytes:
    return _MEM_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)


def pack_memory_table(regions: Sequence[MemoryRegion]) -> bytes:
    return _MEM_HEADER.pack(len(regions), 0) + b"".join(_pack_region(r) for r in regions)


def pack_single_region(region: MemoryRegion) -> bytes:
    return _U64.pack(0) + _pack_region(region)


def pack_log_area(mmap_size: int, mmap_offset: int) -> bytes:
    return _LOG.pack(mmap_size, mmap_offset)


def pack_config(offset: int, flags: int, data: bytes) -> bytes:
    return _CONFIG_HEADER.pack(offset, len(data), flags) + bytes(data)


def pack_inflight(mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int) -> bytes:
    return _INFLIGHT.pack(mmap_size, mmap_offset, num_queues, queue_size)

