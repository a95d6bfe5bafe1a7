"""The contract between the vhost-user core and a device (the rust-vmm ``VhostUserBackend`` split).

The core (``backend``) speaks the protocol; a device says what it is: its
own virtio feature bits, how many rings and how large, and its config
space.  The transport's feature bits are the core's to add, and the bits it
does not implement no device may offer: ``check_device`` holds those rules
in one place, so a device that breaks them fails when it is built, not when
a front end negotiates with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .spec import VhostFeature as VF
from .virtqueue import MAX_QUEUE_SIZE
from .wire import MAX_CONFIG_SIZE

__all__ = ["TRANSPORT_FEATURES", "FORBIDDEN_DEVICE_FEATURES", "MAX_QUEUES", "VhostUserDevice", "DeviceSpec",
           "check_device"]

#: Feature bits the transport (this package) implements, offered on top of the device's own.
TRANSPORT_FEATURES = (1 << VF.VERSION_1) | (1 << VF.PROTOCOL_FEATURES) \
    | (1 << VF.RING_INDIRECT_DESC) | (1 << VF.RING_EVENT_IDX)
#: Bits a device must not offer: dirty logging (no LOG_SHMFD), an IOMMU (no
#: IOTLB), packed or in-order rings, notify-on-empty: none is implemented.
FORBIDDEN_DEVICE_FEATURES = (1 << VF.LOG_ALL) | (1 << VF.ACCESS_PLATFORM) | (1 << VF.RING_PACKED) \
    | (1 << VF.IN_ORDER) | (1 << VF.NOTIFY_ON_EMPTY)
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
        if offset + size > MAX_CONFIG_SIZE:
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


def check_device(device: VhostUserDevice) -> None:
    """Raise ``ValueError`` if ``device`` breaks the contract (see the module docstring)."""
    if not 1 <= device.num_queues <= MAX_QUEUES:
        raise ValueError(f"a device has 1..{MAX_QUEUES} queues, not {device.num_queues}")
    mq = device.max_queue_size
    if not 1 <= mq <= MAX_QUEUE_SIZE or mq & (mq - 1):
        raise ValueError(f"max queue size {mq} is not a power of two <= {MAX_QUEUE_SIZE}")
    if device.device_features & FORBIDDEN_DEVICE_FEATURES:
        raise ValueError(f"device offers unimplemented transport features "
                         f"{device.device_features & FORBIDDEN_DEVICE_FEATURES:#x}")
