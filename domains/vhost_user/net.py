"""vhost-user-net on top of netfront: a VM's NIC whose switching is done by the netback driver domain.

The VM's virtio-net driver puts frames in its TX virtqueues and empty
buffers in its RX virtqueues; its VMM (QEMU) hands those rings to the VM's
guest domain over vhost-user.  There :class:`VhostUserNetPort` is the
*packet port* of a netfront (:mod:`xdom.domains.netfront.port`): frames
popped from the VM's TX rings go to netif's transmit ring, frames netback
writes into netif's receive ring go into the VM's RX buffers.  The data is
copied once each way, between the VM's memory (which only this guest domain
and the VMM map) and the guest domain's persistently granted pages: netback
sees the granted pages and nothing of the VM.

Rules of this module:

* Sans-IO where it can be.  The device (features and config space:
  :func:`net_device`), the virtio-net header both ways
  (:func:`read_tx_chain`, :func:`frames_for_guest`), mergeable receive
  buffers (:func:`fill_rx`) and the control queue (:func:`control_command`)
  are pure functions over bytes, ``SplitVirtqueue`` and ``MemoryAccess``;
  only :class:`VhostUserNetPort` owns descriptors (through
  ``VhostUserServer``).
* One thread.  Every virtqueue is popped and pushed on netfront's data
  thread: the port's control fd is the vhost-user server's epoll fd (the
  protocol socket and every kick eventfd), handled by
  ``VhostUserServer.run_once``; the TX rings are read in
  :meth:`VhostUserNetPort.read_batch` within netfront's budget, received
  frames are written in :meth:`VhostUserNetPort.write_batch`.  No extra
  thread, no hop, no lock; memory regions are only unmapped between these
  calls (the server's rule), so no guest view outlives its mapping in use.
* The VM is not trusted with anything: every chain was bounded and copied
  out by ``SplitVirtqueue``; a TX chain too short for a header and an
  Ethernet header, or longer than the largest frame netif can take (a 64 KiB
  super-frame), is dropped and counted; a frame whose offload request its
  headers cannot carry is dropped as the TAP path drops it
  (:func:`xdom.domains.vnet.from_tap`); a chain that breaks ring rules puts
  that ring in NEEDS_RESET (the server signals its err fd).  Nothing a VM
  writes raises out of this module.
* A NIC, not a pipe: a frame for a VM that posted no receive buffers waits
  in a small per-ring backlog (``RX_BACKLOG`` frames) and beyond it is
  dropped and counted; while netback is gone, netfront drops what the VM
  sends (its link is down) and the VM sees a stall, then traffic again.

Offloads.  The VM's driver negotiates features once, when it starts, but a
netback (re)connects when it likes and may take less.  So the device offers
what a Linux netfront offers its stack (checksum offload, TSO4/6 both ways)
and every frame is mapped *where netfront and netback negotiated it*:
the virtio-net header of a TX frame becomes ``NETTXF_csum_blank``/
``data_validated`` and a GSO extra slot exactly as a TAP's does
(:func:`~xdom.domains.vnet.from_tap`: passed through where the backend
takes it, segmented or checksummed in software where it does not), and a
received frame's ``NETRXF_*`` flags and GSO extra become the VM's header as
for a TAP (:func:`~xdom.domains.vnet.to_tap`), then anything the VM's
driver did not accept (GUEST_CSUM, GUEST_TSO4/6) is finished here
(:func:`frames_for_guest`), as a device must (virtio 1.x 5.1.6.4.1).

Multi-queue: one queue pair per netif queue netfront may ask for
(``max_pairs``), with MQ and the control virtqueue offered when there are
several.  QEMU keeps the control queue for itself and enables or disables
our rings (SET_VRING_ENABLE) when the driver changes the pair count; a
front end that passes the control queue through gets
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET served here and every other command
answered VIRTIO_NET_ERR, as a device without those features does.  A
received frame goes to an enabled RX ring chosen by its flow (what RSS
does); TX rings are all read, netfront spreads their frames over netif's
queues by flow.

Link status: LINK_UP always.  A link-down change needs a config-change
interrupt, which a vhost-user back end can only raise on the back-end
request channel, not implemented here; so while netback is gone the VM
keeps its link and its frames are dropped (a switch port that went away),
which TCP rides out as a stall.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from xdom.domains.hostsys.unix_sockets import remove_stale_socket

from ..packet import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VirtioGso,
    VirtioNetHdr,
    finish_checksum,
    flow_hash,
    parse_headers,
    segment_tcp,
)
from .device import DeviceSpec
from .memory import GuestMemoryError, MemoryAccess
from .server import VhostUserServer
from .virtqueue import DescriptorChain, SplitVirtqueue

__all__ = [
    "VIRTIO_NET_F_CSUM", "VIRTIO_NET_F_GUEST_CSUM", "VIRTIO_NET_F_MAC", "VIRTIO_NET_F_GUEST_TSO4",
    "VIRTIO_NET_F_GUEST_TSO6", "VIRTIO_NET_F_HOST_TSO4", "VIRTIO_NET_F_HOST_TSO6", "VIRTIO_NET_F_MRG_RXBUF",
    "VIRTIO_NET_F_STATUS", "VIRTIO_NET_F_CTRL_VQ", "VIRTIO_NET_F_MQ", "VIRTIO_NET_S_LINK_UP",
    "NET_HDR_SIZE", "MAX_TX_FRAME", "RX_BACKLOG", "MAX_PAIRS",
    "parse_mac", "device_features", "config_space", "net_device", "read_tx_chain", "frames_for_guest",
    "RxRing", "fill_rx", "RX_WAIT", "RX_DROP", "control_command", "ControlState", "VhostUserNetPort",
]

log = logging.getLogger("xdom.vhost_user.net")

# ---- virtio-net (virtio 1.x 5.1) -------------------------------------------------------------------

VIRTIO_NET_F_CSUM = 0            # the device takes frames with a blank checksum (TX offload)
VIRTIO_NET_F_GUEST_CSUM = 1      # the driver takes them (RX)
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23

VIRTIO_NET_S_LINK_UP = 1
#: ``struct virtio_net_hdr_v1``: the 10-byte header plus ``num_buffers``; every VERSION_1 device uses it
#: (our transport refuses legacy drivers), with or without MRG_RXBUF.
NET_HDR_SIZE = 12
_NUM_BUFFERS = struct.Struct("<H")
_ETH_HLEN = 14
#: The longest frame a VM may send: a TCP super-frame (64 KiB of payload) and its headers, as for a TAP.
MAX_TX_FRAME = 65536 + 256
#: Frames waiting per RX ring for the VM to post buffers before new ones are dropped (a NIC's FIFO).
RX_BACKLOG = 256
#: Queue pairs: netfront's most queues.
MAX_PAIRS = 16
#: Largest ring the device accepts (QEMU's rx/tx_queue_size may go up to 1024).
MAX_QUEUE_SIZE = 1024
#: Cap on one chain's bytes (virtqueue rule: beyond it the ring needs a reset).  An RX chain of Linux's
#: "big packets" mode is ~76 KiB; mergeable buffers are a page or so.
MAX_CHAIN_BYTES = 4 << 20

# control queue (5.1.6.5)
VIRTIO_NET_OK, VIRTIO_NET_ERR = 0, 1
VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_VLAN = 0, 1, 2
VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_GUEST_OFFLOADS = 3, 4, 5
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX = 1, 0x8000


def parse_mac(text: str | bytes) -> bytes:
    """``00:16:3e:00:00:01`` (xenstore's ``mac`` node) -> 6 bytes; ValueError otherwise."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    parts = text.strip().split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"bad MAC address {text!r}")
    return bytes(int(p, 16) for p in parts)


def device_features(max_pairs: int) -> int:
    """The virtio-net feature bits offered (the transport adds VERSION_1, EVENT_IDX, INDIRECT_DESC).

    Offloads: everything a Linux netfront takes (see the module docstring);
    mergeable receive buffers; MAC and STATUS; MQ with the control queue
    when there are several pairs.  Not offered: ECN and UFO (netif carries
    neither), CTRL_RX/VLAN/MAC_ADDR/ANNOUNCE (netback does the filtering).
    """
    bits: tuple[int, ...] = (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS)
    if max_pairs > 1:
        bits += (VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ)
    out = 0
    for b in bits:
        out |= 1 << b
    return out


def config_space(mac: bytes, max_pairs: int, status: int = VIRTIO_NET_S_LINK_UP) -> bytearray:
    """``struct virtio_net_config``: mac[6], le16 status, le16 max_virtqueue_pairs (mtu and the rest 0)."""
    if len(mac) != 6:
        raise ValueError("a MAC address is 6 bytes")
    return bytearray(mac + struct.pack("<HH", status, max_pairs) + bytes(12))


def net_device(mac: bytes, max_pairs: int = 1, queue_size: int = MAX_QUEUE_SIZE) -> DeviceSpec:
    """The device for one front-end connection: ``2 * max_pairs`` rings (RX 2k, TX 2k+1), plus the control
    ring at ``2 * max_pairs`` when MQ is offered.  The config space is read-only to the driver."""
    if not 1 <= max_pairs <= MAX_PAIRS:
        raise ValueError(f"max_pairs must be in 1..{MAX_PAIRS}")
    return DeviceSpec(device_features=device_features(max_pairs), num_queues=2 * max_pairs + (max_pairs > 1),
                      config=config_space(mac, max_pairs), max_queue_size=queue_size)


# ---- TX: the VM's frames -----------------------------------------------------------------------

def read_tx_chain(mem: MemoryAccess, chain: DescriptorChain,
                  max_frame: int = MAX_TX_FRAME) -> tuple[VirtioNetHdr, bytes] | str:
    """A TX chain's virtio-net header and frame, copied out of guest memory; or why it is dropped.

    The header and frame may be spread over the readable buffers in any way
    (VERSION_1 implies ANY_LAYOUT); writable buffers in a TX chain are
    ignored (nothing is written back).  ``num_buffers`` is ignored on TX.
    The size is checked before anything is copied.
    """
    total = chain.readable_bytes
    if total < NET_HDR_SIZE + _ETH_HLEN:
        return f"{total}-byte TX chain: shorter than a header and an Ethernet header"
    if total - NET_HDR_SIZE > max_frame:
        return f"{total - NET_HDR_SIZE}-byte frame: longer than {max_frame}"
    head: list[bytes] = []
    parts: list[bytes] = []
    pos = 0
    try:
        for seg in chain.readable:
            end = pos + seg.length
            if pos < NET_HDR_SIZE:
                take = min(seg.length, NET_HDR_SIZE - pos)
                head.append(mem.read(seg.gpa, take))
                if take < seg.length:
                    parts.append(mem.read(seg.gpa + take, seg.length - take))
            elif seg.length:
                parts.append(mem.read(seg.gpa, seg.length))
            pos = end
    except GuestMemoryError as e:        # the table changed under a chain that was checked: drop it
        return f"TX chain left guest memory: {e}"
    hdr = head[0] if len(head) == 1 else b"".join(head)
    frame = parts[0] if len(parts) == 1 else b"".join(parts)
    return VirtioNetHdr.parse(hdr), frame


# ---- RX: frames for the VM -----------------------------------------------------------------------

def frames_for_guest(hdr: VirtioNetHdr, frame: bytes, acked: int) -> list[tuple[VirtioNetHdr, bytes]] | str:
    """What the VM's driver may receive for a frame netfront took off the ring (with the header ``to_tap``
    made): unchanged where the driver accepted the offload, else finished here.

    * a TCP super-frame for a driver without GUEST_TSO4/6 of its kind is
      segmented (each segment's checksum left blank if it took GUEST_CSUM,
      else complete);
    * a blank checksum for a driver without GUEST_CSUM is computed, and
      ``flags`` is 0 for it ("If VIRTIO_NET_F_GUEST_CSUM is not negotiated,
      the device MUST set flags to zero").
    """
    csum_ok = bool(acked & (1 << VIRTIO_NET_F_GUEST_CSUM))
    kind = hdr.gso_type & ~VirtioGso.ECN
    if kind != VirtioGso.NONE:
        bit = VIRTIO_NET_F_GUEST_TSO4 if kind == VirtioGso.TCPV4 else \
            VIRTIO_NET_F_GUEST_TSO6 if kind == VirtioGso.TCPV6 else None
        if bit is not None and csum_ok and acked & (1 << bit):
            return [(hdr, frame)]
        h = parse_headers(frame)
        if bit is None or h is None or h.proto != 6:
            return f"GSO type {hdr.gso_type} the VM cannot take and we cannot segment"
        segments = segment_tcp(frame, hdr.gso_size, h, partial=csum_ok)
        if segments is None:
            return "a super-frame that cannot be segmented"
        seg_hdr = VirtioNetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, h.l4_offset, h.csum_offset) if csum_ok \
            else VirtioNetHdr()
        return [(seg_hdr, s) for s in segments]
    if csum_ok or not hdr.flags:
        return [(hdr, frame)]
    if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        h = parse_headers(frame)
        if h is None or h.l4_offset != hdr.csum_start or h.csum_offset != hdr.csum_offset:
            return "a blank checksum that is not TCP/UDP's"
        frame = finish_checksum(frame, h)
    return [(VirtioNetHdr(), frame)]


@dataclass
class RxRing:
    """One RX virtqueue's state beyond the ring: chains popped and not yet used, frames waiting for buffers.

    Chains are popped until a packet fits, and kept (``held``) when it
    does not yet: the split ring has no "peek", and a device may hold
    descriptors it fetched (a NIC prefetches them).  They are handed back
    unused (length 0) when the ring stops.
    """
    queue: SplitVirtqueue
    enabled: bool = False
    held: deque[DescriptorChain] = field(default_factory=deque)
    backlog: deque[tuple[bytes, bytes]] = field(default_factory=deque)    # (12-byte header w/o count, frame)


#: :func:`fill_rx` results besides completions.
RX_WAIT = "wait"          # not enough buffers posted yet: keep the frame, try again on the next kick
RX_DROP = "drop"          # the frame can never fit what this driver posts (no MRG_RXBUF): drop it


def fill_rx(ring: RxRing, hdr: bytes, frame: bytes, mergeable: bool,
            stats: dict[str, int] | None = None) -> list[tuple[int, int]] | str:
    """Write one frame (after its 10-byte ``hdr``) into the VM's receive buffers.

    Returns the completions ``(head, bytes written)`` to push, in order
    (the caller pushes a pass's worth at once), or :data:`RX_WAIT` /
    :data:`RX_DROP`.  With MRG_RXBUF the packet is spread over as many
    chains as it needs and ``num_buffers`` says how many; without it one
    chain must hold it whole, and a frame longer than the chain at hand is
    dropped (the chain is kept for the next frame).  A chain with room for
    less than a header breaks the driver's side of the spec: it is
    returned unused (length 0) and counted.
    """
    queue, held = ring.queue, ring.held
    need = NET_HDR_SIZE + len(frame)
    room = sum(c.writable_bytes for c in held)
    returned = 0
    while room < need if mergeable else not held:
        chain = queue.pop()
        if chain is None:
            return RX_WAIT
        if chain.writable_bytes < NET_HDR_SIZE:
            queue.push(chain.head, 0)
            if stats is not None:
                stats["rx_bad_buffers"] += 1
            returned += 1
            if returned >= queue.num:
                # A ring's worth given back in one call: a driver posting such a chain again as soon
                # as it is used would keep us here for good.  The next kick brings us back.
                return RX_WAIT
            continue
        held.append(chain)
        room += chain.writable_bytes
    if not mergeable and held[0].writable_bytes < need:
        return RX_DROP
    # How many chains the packet takes: what num_buffers says.
    used: list[DescriptorChain] = []
    left = need
    for c in held:
        used.append(c)
        left -= c.writable_bytes
        if left <= 0 or not mergeable:
            break
    packet = memoryview(hdr[:10] + _NUM_BUFFERS.pack(len(used)) + frame)
    mem = queue.memory
    out: list[tuple[int, int]] = []
    pos = 0
    for c in used:
        held.popleft()
        start = pos
        for seg in c.writable:
            if pos >= need:
                break
            n = min(seg.length, need - pos)
            mem.write(seg.gpa, packet[pos:pos + n])
            pos += n
        out.append((c.head, pos - start))
    return out


# ---- the control queue -----------------------------------------------------------------------------

@dataclass
class ControlState:
    """What the control queue may change: the queue pairs in use (1 until the driver sets more)."""
    max_pairs: int
    pairs: int = 1


def control_command(request: bytes, acked: int, state: ControlState) -> int:
    """Answer one control command (``u8 class, u8 command`` then its data): VIRTIO_NET_OK or VIRTIO_NET_ERR.

    Only MQ's VQ_PAIRS_SET is served (with MQ negotiated and 1..max_pairs
    pairs, as QEMU's ``virtio_net_handle_mq``); every other class needs a
    feature this device does not offer, so it is answered ERR, as by a
    device without that feature.
    """
    if len(request) < 2:
        return VIRTIO_NET_ERR
    cls, cmd = request[0], request[1]
    data = request[2:]
    if cls == VIRTIO_NET_CTRL_MQ and cmd == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET:
        if not acked & (1 << VIRTIO_NET_F_MQ) or len(data) != 2:
            return VIRTIO_NET_ERR
        pairs = _NUM_BUFFERS.unpack(data)[0]
        if not VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= pairs <= min(state.max_pairs, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX):
            return VIRTIO_NET_ERR
        state.pairs = pairs
        return VIRTIO_NET_OK
    return VIRTIO_NET_ERR


def serve_control(queue: SplitVirtqueue, acked: int, state: ControlState, stats: dict[str, int]) -> None:
    """Pop every control command, answer it in its chain's last writable byte, push them all."""
    mem = queue.memory
    done: list[tuple[int, int]] = []
    while (chain := queue.pop()) is not None:
        if not chain.writable or chain.readable_bytes > 4096:
            # No room for the ack (QEMU fails the device here); give the chain back unanswered.
            stats["ctrl_errors"] += 1
            done.append((chain.head, 0))
            continue
        try:
            request = b"".join(mem.read(s.gpa, s.length) for s in chain.readable)
            ack = control_command(request, acked, state)
            last = chain.writable[-1]
            if last.length == 0:
                raise GuestMemoryError("a zero-length ack buffer")
            mem.write(last.gpa + last.length - 1, bytes((ack,)))
        except GuestMemoryError:
            stats["ctrl_errors"] += 1
            done.append((chain.head, 0))
            continue
        done.append((chain.head, 1))
    if done:
        queue.push_batch(done)


# ---- the port ------------------------------------------------------------------------------------

class VhostUserNetPort:
    """netfront's packet port to a VM's virtio-net device, served over vhost-user on ``socket_path``.

    A :class:`~xdom.domains.netfront.port.PacketPort` and the server's
    ``QueueHandler`` at once; everything runs on netfront's data thread
    (see the module rules).  ``stats`` counts what crossed and what was
    dropped, by reason.  The socket is made with ``mode`` (only the guest
    domain's uid, which its VMM runs under, may connect).
    """

    def __init__(self, socket_path: str, mac: str | bytes, max_pairs: int = 1,
                 queue_size: int = MAX_QUEUE_SIZE, backlog: int = RX_BACKLOG, mode: int = 0o600) -> None:
        self.name = socket_path
        self.mac = parse_mac(mac) if isinstance(mac, str) or len(mac) != 6 else bytes(mac)
        if not 1 <= max_pairs <= MAX_PAIRS:
            raise ValueError(f"max_pairs must be in 1..{MAX_PAIRS}")
        self.max_pairs = max_pairs
        self.queue_size = queue_size
        self.backlog_limit = backlog
        self.stats = {"tx_frames": 0, "tx_dropped": 0, "tx_disabled": 0, "rx_frames": 0, "rx_no_buffers": 0,
                      "rx_dropped": 0, "rx_bad_buffers": 0, "rx_segmented": 0, "ctrl_errors": 0, "connections": 0}
        self.tun_flags = 0
        self.control_state = ControlState(max_pairs)
        self._tx: dict[int, SplitVirtqueue] = {}
        self._tx_enabled: dict[int, bool] = {}
        self._rx: dict[int, RxRing] = {}
        self._ctrl: SplitVirtqueue | None = None
        self._tx_pending: dict[int, None] = {}       # TX rings kicked and not yet found empty, in order
        self._tx_signalled = False
        self._reading = False
        self._budget = 0
        self._out: list[tuple[VirtioNetHdr, bytes]] = []
        self._rx_order: list[int] = []               # enabled RX rings in use, for the flow spread
        self._tx_ready = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # No INFLIGHT_SHMFD (a NIC resubmits nothing: a frame lost in a restart is retransmitted by TCP).
        # No CONFIGURE_MEM_SLOTS: QEMU 7.2 drives each queue pair as a vhost device of its own on the one
        # connection and sends every pair's ADD_MEM_REG for the same regions (SET_MEM_TABLE it sends once).
        self._server = VhostUserServer(socket_path, self._new_device, self,
                                       backend_options={"offer_inflight": False, "offer_configure_mem_slots": False,
                                                        "max_chain_bytes": MAX_CHAIN_BYTES}, mode=mode)
        try:
            # A socket left by this guest domain's previous run is replaced (QEMU, reconnecting, finds the
            # new one); one that someone listens on is refused.
            remove_stale_socket(socket_path)
            self._server.listen()
        except BaseException:
            self._server.close()
            os.close(self._tx_ready)
            raise

    def _new_device(self) -> DeviceSpec:
        self.stats["connections"] += 1
        self.control_state = ControlState(self.max_pairs)
        return net_device(self.mac, self.max_pairs, self.queue_size)

    @property
    def acked_features(self) -> int:
        return self._server.acked_features

    # ---- PacketPort -------------------------------------------------------------------

    def fileno(self) -> int:
        """An eventfd set while a TX ring was kicked and not yet read empty."""
        return self._tx_ready

    def control_fileno(self) -> int | None:
        return self._server.fileno()

    def control(self) -> bool:
        self._server.run_once(0)
        return bool(self._tx_pending)

    def poll_interval(self) -> float | None:
        return self._server.poll_interval()

    def read_batch(self, limit: int) -> list[tuple[VirtioNetHdr, bytes]]:
        """Up to ``limit`` frames from the kicked TX rings, round robin; each ring's chains are completed
        (and its call fd signalled) as they are copied."""
        self._reading, self._budget, self._out = True, limit, []
        try:
            for index in list(self._tx_pending):
                if self._budget <= 0:
                    break
                queue = self._tx.get(index)
                if queue is None or queue.needs_reset is not None:
                    del self._tx_pending[index]          # stopped, or broken until the driver resets it
                    continue
                self._server.run_queue(index)
                if index in self._tx_pending:        # still has chains: go to the back of the line
                    del self._tx_pending[index]
                    self._tx_pending[index] = None
        finally:
            self._reading = False
        out, self._out = self._out, []
        if not self._tx_pending and self._tx_signalled:
            try:
                os.eventfd_read(self._tx_ready)
            except BlockingIOError:
                pass
            self._tx_signalled = False
        return out

    def write_batch(self, frames: Sequence[tuple[bytes, bytes]]) -> None:
        """Frames from netif's receive ring into the VM's RX rings (by flow when several are enabled)."""
        rings = self._rx_order
        if not rings:
            self.stats["rx_dropped"] += len(frames)       # no driver, or its rings are stopped/disabled
            return
        acked = self.acked_features
        touched: dict[int, None] = {}
        limit, stats = self.backlog_limit, self.stats
        for packed, frame in frames:
            index = rings[0] if len(rings) == 1 else rings[flow_hash(frame) % len(rings)]
            ring = self._rx[index]
            if len(ring.backlog) >= limit:
                stats["rx_no_buffers"] += 1
                continue
            hdr = VirtioNetHdr.parse(packed)
            if hdr.flags or hdr.gso_type:
                got = frames_for_guest(hdr, frame, acked)
                if isinstance(got, str):
                    log.debug("%s: dropping a received frame: %s", self.name, got)
                    stats["rx_dropped"] += 1
                    continue
                if len(got) == 1 and got[0][0] is hdr:
                    ring.backlog.append((packed, frame))      # the driver takes the offload as it is
                else:
                    stats["rx_segmented"] += len(got) > 1
                    ring.backlog.extend((h.pack(), f) for h, f in got)
            else:
                ring.backlog.append((packed, frame))
            touched[index] = None
        for index in touched:
            self._server.run_queue(index)

    def set_offloads(self, tun_flags: int) -> None:
        # The VM's features are fixed while its driver runs; frames are fitted to the backend per frame
        # (vnet.from_tap), so this is only recorded (for diagnostics).
        self.tun_flags = tun_flags

    def close(self) -> None:
        self._server.close()
        if self._tx_ready >= 0:
            log.info("vhost-user-net %s closed: %s", self.name, ", ".join(f"{k} {v}" for k, v in self.stats.items()))
            os.close(self._tx_ready)
            self._tx_ready = -1

    # ---- QueueHandler (called by the server, on this same thread) ---------------------------

    def _is_ctrl(self, index: int) -> bool:
        return self.max_pairs > 1 and index == 2 * self.max_pairs

    def queue_started(self, index: int, queue: SplitVirtqueue, enabled: bool) -> None:
        if self._is_ctrl(index):
            self._ctrl = queue
        elif index % 2:
            self._tx[index] = queue
            self._tx_enabled[index] = enabled
        else:
            self._rx[index] = RxRing(queue, enabled)
            self._update_rx_order()

    def queue_enabled(self, index: int, enabled: bool) -> None:
        if index in self._tx:
            self._tx_enabled[index] = enabled
        elif index in self._rx:
            self._rx[index].enabled = enabled
            self._update_rx_order()

    def queue_stopped(self, index: int) -> None:
        if self._is_ctrl(index):
            self._ctrl = None
        elif index in self._tx:
            del self._tx[index]
            self._tx_enabled.pop(index, None)
            self._tx_pending.pop(index, None)
        elif index in self._rx:
            ring = self._rx.pop(index)
            self._update_rx_order()
            self.stats["rx_dropped"] += len(ring.backlog)
            # Buffers fetched and never filled go back to the driver (length 0), or its ring would
            # shrink for good across a stop and start (QEMU stops us when the link goes down).
            if ring.held:
                try:
                    ring.queue.push_batch([(c.head, 0) for c in ring.held])
                except ValueError:
                    pass
                ring.held.clear()

    def _update_rx_order(self) -> None:
        pairs = self.control_state.pairs if self._ctrl is not None else self.max_pairs
        self._rx_order = sorted(i for i, r in self._rx.items() if r.enabled and i < 2 * pairs)

    def process(self, index: int, queue: SplitVirtqueue) -> None:
        if self._is_ctrl(index):
            serve_control(queue, self.acked_features, self.control_state, self.stats)
            self._update_rx_order()
        elif index % 2:
            self._process_tx(index, queue)
        elif index in self._rx:
            self._process_rx(self._rx[index])

    def _process_tx(self, index: int, queue: SplitVirtqueue) -> None:
        if not self._reading:
            # A kick (or the ring's start): netfront reads it when its rings have room.
            self._tx_pending[index] = None
            if not self._tx_signalled:
                os.eventfd_write(self._tx_ready, 1)
                self._tx_signalled = True
            return
        enabled = self._tx_enabled.get(index, False)
        done: list[tuple[int, int]] = []
        stats, mem, out = self.stats, queue.memory, self._out
        while self._budget > 0:
            chain = queue.pop()
            if chain is None:
                self._tx_pending.pop(index, None)        # empty (or broken): until the next kick
                break
            done.append((chain.head, 0))
            if not enabled:
                stats["tx_disabled"] += 1       # a disabled ring is processed without side effects
                continue
            got = read_tx_chain(mem, chain)
            if isinstance(got, str):
                log.debug("%s: dropping a TX chain: %s", self.name, got)
                stats["tx_dropped"] += 1
                continue
            out.append(got)
            stats["tx_frames"] += 1
            self._budget -= 1
        if done:
            queue.push_batch(done)

    def _process_rx(self, ring: RxRing) -> None:
        if not ring.enabled or not ring.backlog:
            return
        mergeable = bool(self.acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF))
        done: list[tuple[int, int]] = []
        stats, backlog = self.stats, ring.backlog
        try:
            while backlog:
                hdr, frame = backlog[0]
                got = fill_rx(ring, hdr, frame, mergeable, stats)
                if got == RX_WAIT:
                    break
                backlog.popleft()
                if got == RX_DROP:
                    stats["rx_dropped"] += 1
                    continue
                assert not isinstance(got, str)
                done += got
                stats["rx_frames"] += 1
        except GuestMemoryError as e:        # a buffer left the table under us: the ring is done for
            ring.queue.mark_needs_reset(f"RX buffer outside guest memory: {e}")
            return
        if done:
            ring.queue.push_batch(done)
