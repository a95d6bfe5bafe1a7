"""Sans-IO vhost-user back end: one front-end connection as a pure state machine.

Rules of this module:

* The front end (the VMM) is not trusted more than its messages deserve:
  every ring index, size, address and feature word is checked against what
  we offered and what the memory table allows before it changes any state.
  A request we cannot honour is *refused*, by the rules of ``conversation``
  (a non-zero REPLY_ACK if the front end asked for one, else the connection
  fails), which also orders replies after the work they depend on.
* The guest is not trusted at all: its rings are only read through
  ``virtqueue.SplitVirtqueue`` and ``memory.GuestMemory`` (see there).
* No I/O, no fds opened or closed here.  The core turns bytes (and their
  SCM_RIGHTS fds) into *actions* (``actions``) for the I/O shell: map this
  region fd, unmap, start/stop queue N, install this kick/call/err fd, send
  these reply bytes, close these fds.  Every fd that arrives leaves in
  exactly one action, so the shell owns every descriptor and leaks none.
* What a device must be and may offer is ``device``'s (``check_device``).
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

from collections import deque
from collections.abc import Callable

from . import wire
from .actions import (
    Action,
    AllocateInflight,
    FdKind,
    FeaturesAcked,
    MapInflight,
    MapRegion,
    QueueEnabled,
    Refused,
    SetQueueFd,
    StartQueue,
    StopQueue,
    UnmapInflight,
    UnmapRegion,
)
from .conversation import ConnectionFailed, Conversation, Step, request_name
from .device import TRANSPORT_FEATURES, VhostUserDevice, check_device
from .inflight import MAX_INFLIGHT_SIZE, InflightArea, area_size
from .memory import MAX_REGIONS, GuestMemory, GuestMemoryError, MemoryTableError
from .spec import ProtocolFeature as PF
from .spec import Request
from .spec import VhostFeature as VF
from .virtqueue import DEFAULT_MAX_CHAIN_BYTES, RingLayout, SplitVirtqueue

__all__ = ["DEVICE_STATUS_NEEDS_RESET", "VhostUserBackend"]

#: virtio status bit reported through GET_STATUS once a ring needs a reset.
DEVICE_STATUS_NEEDS_RESET = 0x40
#: Requests remembered in ``VhostUserBackend.log``.
LOG_SIZE = 1024


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


class VhostUserBackend(Conversation):
    """The back end of one vhost-user connection.  See the module docstring for the loop."""

    def __init__(self, device: VhostUserDevice, *, offer_inflight: bool = True,
                 offer_configure_mem_slots: bool = True, offer_reset_device: bool = True,
                 offer_status: bool = False, max_chain_bytes: int = DEFAULT_MAX_CHAIN_BYTES) -> None:
        check_device(device)
        super().__init__()
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

    def queue(self, index: int) -> SplitVirtqueue | None:
        """Ring ``index``'s queue while it is started."""
        return self._vrings[index].queue

    def queue_enabled(self, index: int) -> bool:
        return self._vrings[index].enabled

    def has_protocol_feature(self, bit: int) -> bool:
        return bool(self.acked_protocol_features & (1 << bit))

    # --- dispatch -------------------------------------------------------------------

    def _handle(self, msg: wire.Message) -> None:
        self.log.append(int(msg.request))
        handler = self._handlers.get(msg.request)
        if handler is None:
            name = msg.request.name if isinstance(msg.request, Request) else str(msg.request)
            self._drop_fds(msg)
            self._refuse(msg, f"{name} is not supported")
            return
        handler(msg)

    def _teardown(self) -> list[Step]:
        """Actions releasing every ring, fd and mapping the shell holds for us."""
        out: list[Step] = []
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

    def _drop_inflight(self) -> list[Step]:
        if self._inflight is not None:
            self._inflight.release()
            self._inflight = None
        if self._inflight_held:
            self._inflight_held = False
            return [UnmapInflight()]
        return []

    def _vring(self, msg: wire.Message, index: int) -> _Vring:
        if not 0 <= index < len(self._vrings):
            self._drop_fds(msg)
            raise ConnectionFailed(f"{request_name(msg)} for ring {index}: the device has {len(self._vrings)}")
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

    def _inflight_in_use(self) -> str | None:
        """Why the inflight area cannot be replaced now: a started ring records its requests there.

        QEMU asks for and sets the area while the rings are stopped (before
        SET_VRING_KICK); one that does so while a ring runs would have the
        area released under that ring's queue.
        """
        started = [i for i, vr in enumerate(self._vrings) if vr.queue is not None]
        return f"ring {started[0]} is started on the inflight area" if started else None

    def _get_inflight_fd(self, msg: wire.Message) -> None:
        p = msg.payload
        assert isinstance(p, wire.InflightInfo)
        bad = self._inflight_in_use() or self._inflight_geometry(p)
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
        bad = self._inflight_in_use() or self._inflight_geometry(p)
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

