"""The virtio-blk device a VM is shown: feature bits, request vocabulary, limits and config space.

Everything here is what virtio 1.2 section 5.2 defines, or a limit this
export promises the VM's driver through the config space (``seg_max``,
``size_max``, the discard and write-zeroes limits); the data path
(``blk``) holds requests to the same numbers.  ``blk_device_spec`` is read
again on every front-end connection, so a reconnecting VMM sees the disk as
it is now (blkfront may have reconnected to a blkback with other features).
"""

from __future__ import annotations

import struct

from ..blockdev import BlockDevice
from .device import DeviceSpec

__all__ = [
    "VIRTIO_BLK_F_SIZE_MAX", "VIRTIO_BLK_F_SEG_MAX", "VIRTIO_BLK_F_RO", "VIRTIO_BLK_F_BLK_SIZE",
    "VIRTIO_BLK_F_FLUSH", "VIRTIO_BLK_F_MQ", "VIRTIO_BLK_F_DISCARD", "VIRTIO_BLK_F_WRITE_ZEROES",
    "VIRTIO_BLK_T_IN", "VIRTIO_BLK_T_OUT", "VIRTIO_BLK_T_FLUSH", "VIRTIO_BLK_T_GET_ID", "VIRTIO_BLK_T_DISCARD",
    "VIRTIO_BLK_T_WRITE_ZEROES", "VIRTIO_BLK_S_OK", "VIRTIO_BLK_S_IOERR", "VIRTIO_BLK_S_UNSUPP",
    "VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP", "VIRTIO_BLK_ID_BYTES", "SECTOR", "CONFIG_SIZE", "SEG_MAX", "SIZE_MAX",
    "MAX_DWZ_SEGMENTS", "MAX_DISCARD_SECTORS", "MAX_WRITE_ZEROES_SECTORS", "MAX_QUEUE_SIZE",
    "blk_features", "blk_config", "blk_device_spec",
]

# virtio 1.2, 5.2.3: feature bits of the block device.
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# 5.2.6: request types and status values.
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20

SECTOR = 512                              # virtio-blk's sector numbers are always in 512-byte units

#: Segments per request the driver may use (``seg_max``).  A chain is header + data + status, and the
#: virtqueue refuses chains longer than the ring (indirect tables included, as the spec says), so this is
#: QEMU's default queue size for vhost-user-blk (128) minus 2: a VM whose disk has a smaller
#: ``queue-size`` must not be given more.
SEG_MAX = 126
#: Largest segment (``size_max``): 126 of them are under 32 MiB, well inside the core's chain limit.
SIZE_MAX = 256 << 10
#: Ranges one DISCARD or WRITE_ZEROES request may carry (``max_discard_seg``, ``max_write_zeroes_seg``).
MAX_DWZ_SEGMENTS = 16
#: Sectors one range may cover: 1 GiB of discard, 32 MiB of zeroes (written from blkfront's one zero page).
MAX_DISCARD_SECTORS = (1 << 30) // SECTOR
MAX_WRITE_ZEROES_SECTORS = (32 << 20) // SECTOR
#: Ring size accepted (QEMU's limit for vhost-user-blk's ``queue-size``).
MAX_QUEUE_SIZE = 1024
#: ``struct virtio_blk_config`` up to ``unused1`` (60 bytes); later fields (secure erase, zoned) read as zero.
CONFIG_SIZE = 60


def blk_features(dev: BlockDevice, num_queues: int) -> int:
    """virtio-blk feature bits for what blkfront negotiated with its backend.

    FLUSH only where blkback has a cache to flush (a VM without it writes
    through, as it should); DISCARD and WRITE_ZEROES only on a writable disk
    (and DISCARD only where blkback offers it); RO for a read-only disk.
    """
    f = (1 << VIRTIO_BLK_F_SIZE_MAX) | (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE)
    if dev.read_only:
        f |= 1 << VIRTIO_BLK_F_RO
    if dev.can_flush:
        f |= 1 << VIRTIO_BLK_F_FLUSH
    if dev.can_trim and not dev.read_only:
        f |= 1 << VIRTIO_BLK_F_DISCARD
    if dev.can_write_zeroes and not dev.read_only:
        f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES
    if num_queues > 1:
        f |= 1 << VIRTIO_BLK_F_MQ
    return f


def blk_config(dev: BlockDevice, num_queues: int) -> bytearray:
    """``struct virtio_blk_config`` (little-endian) for ``dev``.

    Offsets: capacity 0 (512-byte sectors), size_max 8, seg_max 12, geometry
    16, blk_size 20, topology 24..31, writeback 32, num_queues 34,
    max_discard_sectors 36, max_discard_seg 40, discard_sector_alignment 44,
    max_write_zeroes_sectors 48, max_write_zeroes_seg 52,
    write_zeroes_may_unmap 56.  Discard is aligned to the logical sector
    (blkif takes whole sectors); write-zeroes never unmaps (blkfront writes
    real zeroes).
    """
    cfg = bytearray(CONFIG_SIZE)
    struct.pack_into("<Q", cfg, 0, dev.size // SECTOR)
    struct.pack_into("<I", cfg, 8, SIZE_MAX)
    struct.pack_into("<I", cfg, 12, SEG_MAX)
    struct.pack_into("<I", cfg, 20, dev.sector_size)
    struct.pack_into("<H", cfg, 34, num_queues)
    struct.pack_into("<III", cfg, 36, MAX_DISCARD_SECTORS, MAX_DWZ_SEGMENTS, dev.sector_size // SECTOR)
    struct.pack_into("<II", cfg, 48, MAX_WRITE_ZEROES_SECTORS, MAX_DWZ_SEGMENTS)
    return cfg


def blk_device_spec(dev: BlockDevice, num_queues: int) -> DeviceSpec:
    """The vhost-user device for one front-end connection (read again each time: a reconnecting
    VMM must find what the disk is now).  No config field is writable (no CONFIG_WCE)."""
    return DeviceSpec(device_features=blk_features(dev, num_queues), num_queues=num_queues,
                      config=blk_config(dev, num_queues), max_queue_size=MAX_QUEUE_SIZE)
