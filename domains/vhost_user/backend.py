"""Sans-IO vhost-user back end: one front-end connection as a pure state machine.

Rules of this module:

* The front end (the VMM) is not trusted more than its messages deserve:
  every ring index, size, address and feature word is checked against what
  we offered and what the memory table allows before it changes any state.
  A request we cannot honour is *refused*: with NEED_REPLY set the front end
  gets a non-zero REPLY_ACK and the connection goes on; without it the front
  end would carry on believing we complied, so the connection fails instead
  (the spec: a back end "may also close the connection" on such errors).
* The guest is not trusted at all: its rings are only read through
  ``virtqueue.SplitVirtqueue`` and ``memory.GuestMemory`` (see there).
* No I/O, no fds opened or closed here.  The core turns bytes (and their
  SCM_RIGHTS fds) into *actions* for the I/O shell: map this region fd,
  unmap, start/stop queue N, install this kick/call/err fd, send these reply
  bytes, close these fds.  Every fd that arrives leaves in exactly one
  action, so the shell owns every descriptor and leaks none.
* Bounded: one message is decoded at a time (the codec's limits hold), at
  most ``device.num_queues`` rings, ``memory.MAX_REGIONS`` regions.

How the shell drives it (the h11 pattern)::

    backend.receive_data(data, fds)          # b"" on EOF
    while (action := backend.next_action()) is not None:
        carry_out(action)                    # before asking for the next one

``next_action`` is only called once the previous action has been carried
out, and some actions are completed by a call back into the core before that
next call: ``MapRegion`` by ``region_mapped(slot, view)``,
``AllocateInflight`` by ``inflight_allocated(fd, view)``, ``MapInflight`` by
``inflight_mapped(view)``.  A shell that cannot complete one simply does not
call back; the core then answers the front end with a failure.  Replies that
depend on the shell's work are computed lazily, after it: GET_VRING_BASE
reads the ring's ``last_avail_idx`` only after ``StopQueue`` was carried out,
so a device that finishes in-flight work while stopping reports the final
index.

Ring life cycle (the spec's "Ring states"): a ring is *stopped* until
SET_VRING_KICK (libvhost-user's reading of "start the ring upon receiving a
kick"), then *started* until GET_VRING_BASE stops it; started rings are
*enabled* or *disabled* by SET_VRING_ENABLE, and start enabled only if
VHOST_USER_F_PROTOCOL_FEATURES was not negotiated.  A disabled ring must be
processed "without side effects" (a net device drops TX, supplies no RX):
that is the device's business, told by ``QueueEnabled``.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from . import wire
from .inflight import MAX_INFLIGHT_SIZE, InflightArea, area_size
from .memory import MAX_REGIONS, GuestMemory, GuestMemoryError, MemoryRegion, MemoryTableError
from .spec import ProtocolFeature as PF
from .spec import Request
from .spec import VhostFeature as VF
from .virtqueue import DEFAULT_MAX_CHAIN_BYTES, MAX_QUEUE_SIZE, RingLayout, SplitVirtqueue

__all__ = [
    "TRANSPORT_FEATURES", "FORBIDDEN_DEVICE_FEATURES", "DEVICE_STATUS_NEEDS_RESET", "MAX_QUEUES",
    "VhostUserDevice", "DeviceSpec",
    "SendReply", "CloseFds", "MapRegion", "UnmapRegion", "SetQueueFd", "StartQueue", "StopQueue",
    "QueueEnabled", "AllocateInflight", "MapInflight", "UnmapInflight", "FeaturesAcked", "Refused", "Closed",
    "Action", "FdKind", "VhostUserBackend",
]

#: Feature bits the transport (this package) implements, offered on top of the device's own.
TRANSPORT_FEATURES = (1 << VF.VERSION_1) | (1 << VF.PROTOCOL_FEATURES) \
    | (1 << VF.RING_INDIRECT_DESC) | (1 << VF.RING_EVENT_IDX)
#: Bits a device must not offer: dirty logging (no LOG_SHMFD), an IOMMU (no
#: IOTLB), packed or in-order rings, notify-on-empty: none is implemented.
FORBIDDEN_DEVICE_FEATURES = (1 << VF.LOG_ALL) | (1 << VF.ACCESS_PLATFORM) | (1 << VF.RING_PACKED) \
    | (1 << VF.IN_ORDER) | (1 << VF.NOTIFY_ON_EMPTY)
#: virtio status bit reported through GET_STATUS once a ring needs a reset.
DEVICE_STATUS_NEEDS_RESET = 0x40
#: Requests remembered in ``VhostUserBackend.log``.
LOG_SIZE = 1024
#: Most rings a device may have: SET_VRING_KICK/CALL/ERR carry the index in 8 bits.
MAX_QUEUES = 256


class VhostUserDevice(Protocol):
    """What a device class supplies (the rust-vmm ``VhostUserBackend`` split): the
    core does the protocol, the device knows its features, queues and config."""

    #: virtio feature bits of the device itself (e.g. VIRTIO_BLK_F_*); the
    #: transport bits of ``TRANSPORT_FEATURES`` are added by the core.
    device_features: int
    num_queues: int
    #: Largest ring the device accepts (a power of two <= 32768).
    max_queue_size: int

    def read_config(self, offset: int, size: int) -> bytes | None:
        """``size`` bytes of config space at ``offset``, or None if the window is invalid."""
        ...

    def write_config(self, offset: int, data: bytes, flags: int) -> bool:
        """Apply a driver's (flags 0) or migration's (flags 1) config write; False refuses it."""
        ...


@dataclass(slots=True, kw_only=True)
class DeviceSpec:
    """A device described by data: features, queue count and a config space.

    Only the byte ranges in ``writable_config`` (start, end) accept driver
    writes (the spec: back ends "MUST NOT accept SET_CONFIG for read-only
    configuration space fields unless the live migration bit is set").
    """
    device_features: int
    num_queues: int
    config: bytearray = field(default_factory=bytearray)
    max_queue_size: int = MAX_QUEUE_SIZE
    writable_config: tuple[tuple[int, int], ...] = ()

    def read_config(self, offset: int, size: int) -> bytes | None:
        if offset + size > wire.MAX_CONFIG_SIZE:
            return None
        # A driver may read past what the device defines (QEMU asks for its own struct size):
        # undefined bytes read as zero.
        return bytes(self.config[offset:offset + size]).ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes, flags: int) -> bool:
        end = offset + len(data)
        if end > len(self.config):
            return False
        if flags != 1 and not any(lo <= offset and end <= hi for lo, hi in self.writable_config):
            return False
        self.config[offset:end] = data
        return True


# --- actions --------------------------------------------------------------------

class FdKind(enum.Enum):
    KICK = "kick"
    CALL = "call"
    ERR = "err"


@dataclass(frozen=True, slots=True, kw_only=True)
class SendReply:
    """Write ``data`` to the front end, with ``fds`` as SCM_RIGHTS.  The fds are
    only lent: they stay the shell's (the inflight memfd, which it keeps)."""
    data: bytes
    fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseFds:
    """Descriptors the core does not keep: close them."""
    fds: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class MapRegion:
    """mmap ``region.mapping_length`` bytes of ``fd`` from offset 0, shared read/write,
    close ``fd`` (mapped or not), and on success call ``region_mapped(slot, view)``."""
    slot: int
    region: MemoryRegion
    fd: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UnmapRegion:
    """The core dropped its view of this slot: unmap it."""
    slot: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SetQueueFd:
    """Install ``fd`` as ring ``index``'s kick/call/err eventfd (None: no fd, i.e.
    poll the ring / do not signal), closing the one it replaces."""
    index: int
    kind: FdKind
    fd: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StartQueue:
    """Start processing ring ``index`` through ``queue`` (process it once right away:
    kicks sent before the start are lost)."""
    index: int
    queue: SplitVirtqueue
    enabled: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class StopQueue:
    """Stop processing ring ``index`` and forget its queue object (finish or abandon
    in-flight chains first: the reply that follows reports ``last_avail_idx``)."""
    index: int


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueEnabled:
    index: int
    enabled: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class AllocateInflight:
    """Create a zeroed shared memfd of ``size`` bytes, map it, and call
    ``inflight_allocated(fd, view)``; keep the fd until ``UnmapInflight``."""
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MapInflight:
    """mmap ``size`` bytes of ``fd`` at ``offset`` shared read/write and call
    ``inflight_mapped(view)``; keep (or close) the fd until ``UnmapInflight``."""
    fd: int
    size: int
    offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UnmapInflight:
    """Drop the inflight area's mapping and its fd."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FeaturesAcked:
    """The front end acknowledged these virtio features (the device may need to know)."""
    features: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """Informational: a request was refused (and answered, or the connection fails next)."""
    request: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Closed:
    """The connection is over (``error``: because of a protocol error); every resource
    was released by the actions before this one.  Close the socket."""
    reason: str
    error: bool


Action = (SendReply | CloseFds | MapRegion | UnmapRegion | SetQueueFd | StartQueue | StopQueue | QueueEnabled
          | AllocateInflight | MapInflight | UnmapInflight | FeaturesAcked | Refused | Closed)
_Step = Action | Callable[[], Action | None]


class _Vring:
    """What the front end told us about one ring, and its queue once started."""
    __slots__ = ("num", "addr", "base", "fds", "enabled", "queue")

    def __init__(self) -> None:
        self.num: int | None = None
        self.addr: wire.VringAddr | None = None
        self.base = 0
        self.fds: dict[FdKind, bool] = {}        # kinds the shell holds an fd for
        self.enabled = False
        self.queue: SplitVirtqueue | None = None


class _ConnectionFailed(Exception):
    pass


_ACK_OK = 0
_ACK_FAIL = 1


class VhostUserBackend:
    """The back end of one vhost-user connection.  See the module docstring for the loop."""

    def __init__(self, device: VhostUserDevice, *, offer_inflight: bool = True,
                 offer_configure_mem_slots: bool = True, offer_reset_device: bool = True,
                 offer_status: bool = False, max_chain_bytes: int = DEFAULT_MAX_CHAIN_BYTES) -> None:
        if not 1 <= device.num_queues <= MAX_QUEUES:
            raise ValueError(f"a device has 1..{MAX_QUEUES} queues, not {device.num_queues}")
        mq = device.max_queue_size
        if not 1 <= mq <= MAX_QUEUE_SIZE or mq & (mq - 1):
            raise ValueError(f"max queue size {mq} is not a power of two <= {MAX_QUEUE_SIZE}")
        if device.device_features & FORBIDDEN_DEVICE_FEATURES:
            raise ValueError(f"device offers unimplemented transport features "
                             f"{device.device_features & FORBIDDEN_DEVICE_FEATURES:#x}")
        self.device = device
        self.offered_features = (device.device_features | TRANSPORT_FEATURES) & ((1 << 64) - 1)
        pf = (1 << PF.MQ) | (1 << PF.REPLY_ACK) | (1 << PF.CONFIG)
        if offer_inflight:
            pf |= 1 << PF.INFLIGHT_SHMFD
        if offer_configure_mem_slots:
            pf |= 1 << PF.CONFIGURE_MEM_SLOTS
        if offer_reset_device:
            pf |= 1 << PF.RESET_DEVICE
        if offer_status:
            pf |= 1 << PF.STATUS
        self.offered_protocol_features = pf
        self._max_chain_bytes = max_chain_bytes
        self._reader = wire.MessageReader()
        self._steps: deque[_Step] = deque()
        self._closed = False
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.owner = False
        self.status = 0
        self.memory = GuestMemory()
        self._vrings = [_Vring() for _ in range(device.num_queues)]
        self._inflight: InflightArea | None = None
        self._inflight_held = False          # the shell holds an inflight mapping/fd
        self._pending_view: tuple[int, memoryview] | None = None
        self._mapped_slots: set[int] = set()
        #: The last ``LOG_SIZE`` requests handled, in order (the shell drains it for diagnostics).
        self.log: deque[int] = deque(maxlen=LOG_SIZE)
        self._handlers: dict[int, Callable[[wire.Message], None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_LOG_BASE: self._set_log,
            Request.SET_LOG_FD: self._set_log,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            Request.SET_INFLIGHT_FD: self._set_inflight_fd,
            Request.RESET_DEVICE: self._reset_device,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_STATUS: self._set_status,
            Request.GET_STATUS: self._get_status,
        }

    # --- the shell's interface ----------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def receive_data(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Feed what ``recvmsg`` returned (``b""`` at EOF); the fds become the core's to route."""
        self._reader.receive_data(data, fds)

    def next_action(self) -> Action | None:
        """The next thing for the shell to do, or None when more input is needed.

        Never raises: an internal error fails the connection like a protocol error.
        """
        while True:
            if self._steps:
                step = self._steps.popleft()
                try:
                    act = step() if callable(step) else step
                except _ConnectionFailed as e:
                    self._fail(str(e))
                    continue
                except Exception as exc:       # a bug must not take the shell down
                    self._fail(f"internal error: {exc!r}")
                    continue
                if act is not None:
                    return act
                continue
            if self._closed:
                stray = self._reader.take_unclaimed_fds()
                return CloseFds(fds=tuple(stray)) if stray else None
            ev = self._reader.next_event()
            if ev is None:
                return None
            try:
                self._dispatch(ev)
            except _ConnectionFailed as e:
                self._fail(str(e))
            except Exception as exc:
                self._fail(f"internal error: {exc!r}")

    def region_mapped(self, slot: int, view: memoryview) -> None:
        """Completion of ``MapRegion``: the region is now reachable through ``view``."""
        if slot in self.memory.regions():
            self.memory.attach(slot, view)
            self._mapped_slots.add(slot)

    def inflight_allocated(self, fd: int, view: memoryview) -> None:
        """Completion of ``AllocateInflight``: the new memfd and the shell's mapping of it."""
        self._pending_view = (fd, view)

    def inflight_mapped(self, view: memoryview) -> None:
        """Completion of ``MapInflight``."""
        self._pending_view = (-1, view)

    def close(self, reason: str = "closed by the back end") -> None:
        """End the connection from our side: release everything (actions follow)."""
        if not self._closed:
            self._steps.extend(self._teardown())
            self._steps.append(Closed(reason=reason, error=False))
            self._closed = True
            self._reader.close()

    def queue(self, index: int) -> SplitVirtqueue | None:
        """Ring ``index``'s queue while it is started."""
        return self._vrings[index].queue

    def queue_enabled(self, index: int) -> bool:
        return self._vrings[index].enabled

    def has_protocol_feature(self, bit: int) -> bool:
        return bool(self.acked_protocol_features & (1 << bit))

    # --- dispatch -------------------------------------------------------------------

    def _dispatch(self, ev: wire.Event) -> None:
        if isinstance(ev, wire.ProtocolError):
            if ev.fds:
                self._steps.append(CloseFds(fds=ev.fds))
            raise _ConnectionFailed(f"protocol error: {ev.reason}")
        if isinstance(ev, wire.EndOfStream):
            if ev.fds:
                self._steps.append(CloseFds(fds=ev.fds))
            self.close("front end closed the connection")
            return
        msg = ev
        self.log.append(int(msg.request))
        handler = self._handlers.get(msg.request)
        if handler is None:
            name = msg.request.name if isinstance(msg.request, Request) else str(msg.request)
            self._drop_fds(msg)
            self._refuse(msg, f"{name} is not supported")
            return
        handler(msg)

    def _fail(self, reason: str) -> None:
        """End the connection because of an error.  Actions already decided stay queued (they carry
        fds and match the core's state); deferred replies are dropped; then everything is released."""
        if self._closed:
            return
        self._steps = deque(s for s in self._steps if not callable(s))
        self._steps.extend(self._teardown())
        self._steps.append(Closed(reason=reason, error=True))
        self._closed = True
        self._reader.close()

    def _teardown(self) -> list[_Step]:
        """Actions releasing every ring, fd and mapping the shell holds for us."""
        out: list[_Step] = []
        for i, vr in enumerate(self._vrings):
            if vr.queue is not None:
                out.append(StopQueue(index=i))
                vr.queue = None
            for kind in list(vr.fds):
                out.append(SetQueueFd(index=i, kind=kind, fd=None))
            vr.fds.clear()
        for slot in list(self.memory.regions()):
            self.memory.remove(slot)
            out.append(UnmapRegion(slot=slot))
        self._mapped_slots.clear()
        out.extend(self._drop_inflight())
        return out

    def _drop_inflight(self) -> list[_Step]:
        if self._inflight is not None:
            self._inflight.release()
            self._inflight = None
        if self._inflight_held:
            self._inflight_held = False
            return [UnmapInflight()]
        return []

    def _drop_fds(self, msg: wire.Message) -> None:
        if msg.fds:
            self._steps.append(CloseFds(fds=msg.fds))

    # --- replies and refusals ---------------------------------------------------------

    def _reply(self, msg: wire.Message, payload: bytes, fds: tuple[int, ...] = ()) -> SendReply:
        return SendReply(data=wire.encode_reply(msg.request, payload), fds=fds)

    def _ack(self, msg: wire.Message, ok: bool = True, reason: str = "") -> None:
        """Finish a request that has no reply of its own (REPLY_ACK if asked, else a refusal fails)."""
        if not ok:
            self._refuse(msg, reason)
        elif msg.need_reply:
            self._steps.append(self._reply(msg, wire.pack_u64(_ACK_OK)))

    def _ack_later(self, msg: wire.Message, check: Callable[[], str | None]) -> None:
        """Like ``_ack`` but decided when the shell has carried out the steps queued before."""
        def step() -> Action | None:
            reason = check()
            if reason is None:
                return self._reply(msg, wire.pack_u64(_ACK_OK)) if msg.need_reply else None
            if not msg.need_reply:
                raise _ConnectionFailed(f"{_name(msg)} refused: {reason}")
            self._steps.appendleft(self._reply(msg, wire.pack_u64(_ACK_FAIL)))
            return Refused(request=int(msg.request), reason=reason)
        self._steps.append(step)

    def _refuse(self, msg: wire.Message, reason: str) -> None:
        if not msg.need_reply:
            raise _ConnectionFailed(f"{_name(msg)} refused: {reason}")
        self._steps.append(Refused(request=int(msg.request), reason=reason))
        self._steps.append(self._reply(msg, wire.pack_u64(_ACK_FAIL)))

    def _vring(self, msg: wire.Message, index: int) -> _Vring:
        if not 0 <= index < len(self._vrings):
            self._drop_fds(msg)
            raise _ConnectionFailed(f"{_name(msg)} for ring {index}: the device has {len(self._vrings)}")
        return self._vrings[index]

    # --- features -------------------------------------------------------------------

    def _get_features(self, msg: wire.Message) -> None:
        self._steps.append(self._reply(msg, wire.pack_u64(self.offered_features)))

    def _set_features(self, msg: wire.Message) -> None:
        assert isinstance(msg.payload, wire.U64)
        features = msg.payload.value
        extra = features & ~self.offered_features
        if extra:
            return self._refuse(msg, f"features {extra:#x} were not offered")
        if not features & (1 << VF.VERSION_1):
            # Legacy (pre-1.0) rings are guest-endian and laid out differently: not implemented.
            return self._refuse(msg, "VIRTIO_F_VERSION_1 not acknowledged; legacy devices are not supported")
        self.acked_features = features
        self._steps.append(FeaturesAcked(features=features))
        if not features & (1 << VF.PROTOCOL_FEATURES):
            # "If VHOST_USER_F_PROTOCOL_FEATURES has not been negotiated, the ring starts directly
            # in the enabled state."
            for i, vr in enumerate(self._vrings):
                if not vr.enabled:
                    vr.enabled = True
                    self._steps.append(QueueEnabled(index=i, enabled=True))
        self._ack(msg)

    def _get_protocol_features(self, msg: wire.Message) -> None:
        # "Back-ends that report VHOST_USER_F_PROTOCOL_FEATURES must support this message even
        # before VHOST_USER_SET_FEATURES was called."
        self._steps.append(self._reply(msg, wire.pack_u64(self.offered_protocol_features)))

    def _set_protocol_features(self, msg: wire.Message) -> None:
        assert isinstance(msg.payload, wire.U64)
        features = msg.payload.value
        extra = features & ~self.offered_protocol_features
        if extra:
            return self._refuse(msg, f"protocol features {extra:#x} were not offered")
        self.acked_protocol_features = features
        self._ack(msg)

    def _set_owner(self, msg: wire.Message) -> None:
        # "Issued when a new connection is established ... a 'session start' flag."
        self.owner = True
        self._ack(msg)

    def _reset_owner(self, msg: wire.Message) -> None:
        # Deprecated: "back-ends either ignore this message, or use it to disable all rings."
        for i, vr in enumerate(self._vrings):
            if vr.enabled:
                vr.enabled = False
                self._steps.append(QueueEnabled(index=i, enabled=False))
        self._ack(msg)

    def _reset_device(self, msg: wire.Message) -> None:
        # "disable all rings and reset all internal device state to the initial state, ready to
        # be reinitialized. The back-end retains ownership of the device."
        if not self.offered_protocol_features & (1 << PF.RESET_DEVICE):
            return self._refuse(msg, "RESET_DEVICE was not offered")
        self._steps.extend(self._teardown())
        self._vrings = [_Vring() for _ in self._vrings]
        self.acked_features = 0
        self.status = 0
        self._ack(msg)

    def _set_status(self, msg: wire.Message) -> None:
        # Only the status byte is kept: QEMU sends SET_STATUS(0) on stop *before* GET_VRING_BASE,
        # so a reset here would lose the ring indexes it is about to ask for.
        assert isinstance(msg.payload, wire.U64)
        if not self.offered_protocol_features & (1 << PF.STATUS):
            return self._refuse(msg, "STATUS was not offered")
        if msg.payload.value > 0xFF:
            return self._refuse(msg, f"device status {msg.payload.value:#x} is not a byte")
        self.status = msg.payload.value
        self._ack(msg)

    def _get_status(self, msg: wire.Message) -> None:
        if not self.offered_protocol_features & (1 << PF.STATUS):
            return self._refuse(msg, "STATUS was not offered")
        status = self.status
        if any(vr.queue is not None and vr.queue.needs_reset for vr in self._vrings):
            status |= DEVICE_STATUS_NEEDS_RESET
        self._steps.append(self._reply(msg, wire.pack_u64(status)))

    def _get_queue_num(self, msg: wire.Message) -> None:
        self._steps.append(self._reply(msg, wire.pack_u64(len(self._vrings))))

    # --- config space ---------------------------------------------------------------

    def _get_config(self, msg: wire.Message) -> None:
        # "vhost-user back-end's payload size MUST match the front-end's request, vhost-user
        # back-end uses zero length of payload to indicate an error."
        p = msg.payload
        assert isinstance(p, wire.ConfigSpace)
        data = None
        if p.offset + p.size <= wire.MAX_CONFIG_SIZE:
            data = self.device.read_config(p.offset, p.size)
        if data is None or len(data) != p.size:
            self._steps.append(Refused(request=int(msg.request), reason=f"config window {p.offset}+{p.size}"))
            self._steps.append(self._reply(msg, b""))
            return
        self._steps.append(self._reply(msg, wire.pack_config(p.offset, p.flags, data)))

    def _set_config(self, msg: wire.Message) -> None:
        p = msg.payload
        assert isinstance(p, wire.ConfigSpace)
        ok = p.offset + p.size <= wire.MAX_CONFIG_SIZE and p.flags in (0, 1) \
            and self.device.write_config(p.offset, p.data, p.flags)
        self._ack(msg, ok, f"config write of {p.size} bytes at {p.offset} (flags {p.flags})")

    # --- memory table ---------------------------------------------------------------

    def _set_mem_table(self, msg: wire.Message) -> None:
        p = msg.payload
        assert isinstance(p, wire.MemoryTable)
        trial = GuestMemory()
        try:
            for r in p.regions:
                trial.add(r)
        except MemoryTableError as e:
            self._drop_fds(msg)
            return self._refuse(msg, f"memory table: {e}")
        for slot in list(self.memory.regions()):
            self.memory.remove(slot)
            self._mapped_slots.discard(slot)
            self._steps.append(UnmapRegion(slot=slot))
        new_slots = []
        for r, fd in zip(p.regions, msg.fds):
            slot = self.memory.add(r)
            new_slots.append(slot)
            self._steps.append(MapRegion(slot=slot, region=r, fd=fd))
        self._ack_later(msg, lambda: self._after_memory_change(new_slots))

    def _add_mem_reg(self, msg: wire.Message) -> None:
        p = msg.payload
        assert isinstance(p, wire.SingleRegion)
        if not self.offered_protocol_features & (1 << PF.CONFIGURE_MEM_SLOTS):
            self._drop_fds(msg)
            return self._refuse(msg, "CONFIGURE_MEM_SLOTS was not offered")
        try:
            slot = self.memory.add(p.region)
        except MemoryTableError as e:
            self._drop_fds(msg)
            return self._refuse(msg, f"ADD_MEM_REG: {e}")
        self._steps.append(MapRegion(slot=slot, region=p.region, fd=msg.fds[0]))
        self._ack_later(msg, lambda: self._after_memory_change([slot]))

    def _rem_mem_reg(self, msg: wire.Message) -> None:
        # "If a file descriptor is passed, the back-end MUST close it without using it otherwise."
        p = msg.payload
        assert isinstance(p, wire.SingleRegion)
        self._drop_fds(msg)
        if not self.offered_protocol_features & (1 << PF.CONFIGURE_MEM_SLOTS):
            return self._refuse(msg, "CONFIGURE_MEM_SLOTS was not offered")
        slot = self.memory.find(p.region)
        if slot is None:
            return self._refuse(msg, f"REM_MEM_REG: no region at GPA {p.region.guest_phys_addr:#x}")
        self.memory.remove(slot)
        self._mapped_slots.discard(slot)
        self._steps.append(UnmapRegion(slot=slot))
        self._ack_later(msg, lambda: self._after_memory_change([]))

    def _after_memory_change(self, new_slots: list[int]) -> str | None:
        """After the shell mapped (or failed to map) new regions: check them, and the running rings."""
        for i, vr in enumerate(self._vrings):
            q = vr.queue
            if q is None or vr.addr is None or vr.num is None:
                continue
            try:
                layout = self._layout(vr.addr, vr.num)
            except GuestMemoryError as e:
                q.mark_needs_reset(f"memory table change removed ring {i}: {e}")
                continue
            if layout != q.layout:
                # The ring moved under a running queue: its indexes mean nothing at the new place.
                q.mark_needs_reset(f"memory table change moved ring {i}")
        unmapped = [s for s in new_slots if s not in self._mapped_slots]
        if unmapped:
            return f"the shell could not map region slot(s) {unmapped}"
        return None

    def _set_log(self, msg: wire.Message) -> None:
        # Dirty logging needs LOG_SHMFD and VHOST_F_LOG_ALL, neither of which is offered: a front end
        # that sends these anyway would migrate with a log nobody writes.
        self._drop_fds(msg)
        self._refuse(msg, "dirty logging is not supported (no LOG_SHMFD)")

    # --- rings ------------------------------------------------------------------------

    def _layout(self, addr: wire.VringAddr, num: int) -> RingLayout:
        """The ring's guest-physical layout; each part must lie inside one region (a UVA range that
        spans two regions need not be contiguous in guest-physical space)."""
        event_idx = bool(self.acked_features & (1 << VF.RING_EVENT_IDX))
        probe = RingLayout(num=num, desc_gpa=0, avail_gpa=0, used_gpa=0)
        desc = self.memory.uva_to_gpa(addr.desc_user_addr, probe.desc_size)
        avail = self.memory.uva_to_gpa(addr.avail_user_addr, probe.avail_size(event_idx))
        used = self.memory.uva_to_gpa(addr.used_user_addr, probe.used_size(event_idx))
        return RingLayout(num=num, desc_gpa=desc, avail_gpa=avail, used_gpa=used)

    def _set_vring_num(self, msg: wire.Message) -> None:
        p = msg.payload
        assert isinstance(p, wire.VringState)
        vr = self._vring(msg, p.index)
        n = p.num
        if vr.queue is not None:
            return self._refuse(msg, f"ring {p.index} is running")
        if not 1 <= n <= self.device.max_queue_size or n & (n - 1):
            return self._refuse(msg, f"ring size {n} is not a power of two <= {self.device.max_queue_size}")
        vr.num = n
        self._ack(msg)

    def _set_vring_addr(self, msg: wire.Message) -> None:
        p = msg.payload
        assert isinstance(p, wire.VringAddr)
        vr = self._vring(msg, p.index)
        if p.flags & wire.VRING_F_LOG:
            return self._refuse(msg, "used-ring logging is not supported")
        if p.flags & ~wire.VRING_F_LOG:
            return self._refuse(msg, f"unknown vring address flags {p.flags:#x}")
        # virtio 1.x alignment: descriptor table 16, avail ring 2, used ring 4.
        if p.desc_user_addr % 16 or p.avail_user_addr % 2 or p.used_user_addr % 4:
            return self._refuse(msg, "misaligned ring address")
        if vr.queue is not None and p != vr.addr:
            return self._refuse(msg, f"ring {p.index} is running")
        if vr.num is not None and len(self.memory):
            try:
                self._layout(p, vr.num)
            except GuestMemoryError as e:
                return self._refuse(msg, f"ring {p.index}: {e}")
        vr.addr = p
        self._ack(msg)

    def _set_vring_base(self, msg: wire.Message) -> None:
        p = msg.payload
        assert isinstance(p, wire.VringState)
        vr = self._vring(msg, p.index)
        if vr.queue is not None:
            return self._refuse(msg, f"ring {p.index} is running")
        if p.num > 0xFFFF:
            # Split rings only: a packed ring's wrap counter would sit in bit 15 and above.
            return self._refuse(msg, f"ring base {p.num:#x} is not a split-ring index")
        vr.base = p.num
        self._ack(msg)

    def _get_vring_base(self, msg: wire.Message) -> None:
        # "stop ring upon receiving VHOST_USER_GET_VRING_BASE"; like libvhost-user we also let go
        # of the kick and call fds: the front end sends new ones when it starts the ring again.
        p = msg.payload
        assert isinstance(p, wire.VringState)
        index = p.index
        vr = self._vring(msg, index)
        if vr.queue is not None:
            self._steps.append(StopQueue(index=index))
        for kind in (FdKind.KICK, FdKind.CALL):
            if vr.fds.pop(kind, False):
                self._steps.append(SetQueueFd(index=index, kind=kind, fd=None))

        def reply() -> Action:
            q = vr.queue
            if q is not None:
                vr.base = q.last_avail_idx
                vr.queue = None
            return self._reply(msg, wire.pack_vring_state(index, vr.base))
        self._steps.append(reply)

    def _vring_file(self, msg: wire.Message, kind: FdKind) -> tuple[int, _Vring, int | None]:
        p = msg.payload
        assert isinstance(p, wire.VringFile)
        vr = self._vring(msg, p.index)
        fd = None if p.no_fd else msg.fds[0]
        self._steps.append(SetQueueFd(index=p.index, kind=kind, fd=fd))
        if fd is None:
            vr.fds.pop(kind, None)
        else:
            vr.fds[kind] = True
        return p.index, vr, fd

    def _set_vring_kick(self, msg: wire.Message) -> None:
        index, vr, _fd = self._vring_file(msg, FdKind.KICK)
        if vr.queue is not None:
            return self._ack(msg)          # a new kick fd for a running ring
        if vr.num is None or vr.addr is None:
            return self._refuse(msg, f"ring {index} started before its size and addresses were set")
        try:
            layout = self._layout(vr.addr, vr.num)
        except GuestMemoryError as e:
            return self._refuse(msg, f"ring {index}: {e}")
        inflight = None
        if self._inflight is not None and self.has_protocol_feature(PF.INFLIGHT_SHMFD) \
                and index < self._inflight.num_queues and self._inflight.queue_size >= vr.num:
            inflight = self._inflight.queue(index)
        q = SplitVirtqueue(self.memory, layout,
                           event_idx=bool(self.acked_features & (1 << VF.RING_EVENT_IDX)),
                           indirect_desc=bool(self.acked_features & (1 << VF.RING_INDIRECT_DESC)),
                           last_avail_idx=vr.base, max_chain_bytes=self._max_chain_bytes, inflight=inflight)
        vr.queue = q
        self._steps.append(StartQueue(index=index, queue=q, enabled=vr.enabled))
        self._ack(msg)

    def _set_vring_call(self, msg: wire.Message) -> None:
        self._vring_file(msg, FdKind.CALL)
        self._ack(msg)

    def _set_vring_err(self, msg: wire.Message) -> None:
        self._vring_file(msg, FdKind.ERR)
        self._ack(msg)

    def _set_vring_enable(self, msg: wire.Message) -> None:
        p = msg.payload
        assert isinstance(p, wire.VringState)
        vr = self._vring(msg, p.index)
        if p.num not in (0, 1):
            return self._refuse(msg, f"ring enable value {p.num}")
        enabled = bool(p.num)
        if enabled != vr.enabled:
            vr.enabled = enabled
            self._steps.append(QueueEnabled(index=p.index, enabled=enabled))
        self._ack(msg)

    # --- in-flight tracking --------------------------------------------------------------

    def _inflight_geometry(self, p: wire.InflightInfo) -> str | None:
        if not self.has_protocol_feature(PF.INFLIGHT_SHMFD):
            return "INFLIGHT_SHMFD was not negotiated"
        qs = p.queue_size
        if not 1 <= p.num_queues <= len(self._vrings):
            return f"{p.num_queues} queues, the device has {len(self._vrings)}"
        if not 1 <= qs <= self.device.max_queue_size or qs & (qs - 1):
            return f"queue size {qs}"
        if area_size(p.num_queues, qs) > MAX_INFLIGHT_SIZE:
            return "inflight area too large"
        return None

    def _get_inflight_fd(self, msg: wire.Message) -> None:
        p = msg.payload
        assert isinstance(p, wire.InflightInfo)
        bad = self._inflight_geometry(p)
        if bad is not None:
            # QEMU reads mmap_size 0 as "no inflight tracking" and goes on without it.
            self._steps.append(Refused(request=int(msg.request), reason=bad))
            self._steps.append(self._reply(msg, wire.pack_inflight(0, 0, p.num_queues, p.queue_size)))
            return
        size = area_size(p.num_queues, p.queue_size)
        self._steps.extend(self._drop_inflight())
        self._pending_view = None
        self._steps.append(AllocateInflight(size=size))
        self._inflight_held = True      # from here the shell may hold a mapping to release

        def reply() -> Action:
            got, self._pending_view = self._pending_view, None
            if got is None or got[0] < 0:
                return self._reply(msg, wire.pack_inflight(0, 0, p.num_queues, p.queue_size))
            fd, view = got
            self._inflight = InflightArea(view, p.num_queues, p.queue_size)
            return self._reply(msg, wire.pack_inflight(size, 0, p.num_queues, p.queue_size), fds=(fd,))
        self._steps.append(reply)

    def _set_inflight_fd(self, msg: wire.Message) -> None:
        p = msg.payload
        assert isinstance(p, wire.InflightInfo)
        bad = self._inflight_geometry(p)
        if bad is None and p.mmap_size < area_size(p.num_queues, p.queue_size):
            bad = f"inflight area of {p.mmap_size} bytes is too small"
        if bad is None and p.mmap_size > MAX_INFLIGHT_SIZE:
            bad = "inflight area too large"
        if bad is not None:
            self._drop_fds(msg)
            return self._refuse(msg, bad)
        self._steps.extend(self._drop_inflight())
        self._pending_view = None
        self._steps.append(MapInflight(fd=msg.fds[0], size=p.mmap_size, offset=p.mmap_offset))
        self._inflight_held = True

        def check() -> str | None:
            got, self._pending_view = self._pending_view, None
            if got is None:
                return "the shell could not map the inflight area"
            try:
                self._inflight = InflightArea(got[1], p.num_queues, p.queue_size)
            except ValueError as e:
                return f"inflight area: {e}"
            return None
        self._ack_later(msg, check)

    def _get_max_mem_slots(self, msg: wire.Message) -> None:
        self._steps.append(self._reply(msg, wire.pack_u64(MAX_REGIONS)))


def _name(msg: wire.Message) -> str:
    return msg.request.name if isinstance(msg.request, Request) else f"request {msg.request}"
