"""The storage behind a vbd: a raw image file or a block device.

Data moves with ``preadv``/``pwritev`` straight between the disk and the
granted pages mapped into this process, so the only copies are the
kernel's.  Discard punches holes in a file (``FALLOC_FL_PUNCH_HOLE``) or
issues ``BLKDISCARD`` on a block device.

Under the supervisor the image is opened by the toolstack and its
descriptor handed over the device channel (as a Xen hotplug script opens
the backing device and blkback only finds it by ``physical-device``):
blkback itself opens nothing by path, so its Landlock domain can refuse
every file outside its interpreter.

Whether the disk has a volatile write cache decides whether blkback offers
FLUSH_DISKCACHE and WRITE_BARRIER at all, as Linux's ``flush_support =
bdev_write_cache(bdev)``: a file always has one (the page cache); a block
device says so in ``queue/write_cache`` ("write back" or "write through").
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Sequence

from xdom.domains.hostsys.files import punch_hole

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
BLKDISCARD = 0x1277
IOV_MAX = 1024


class Disk:
    """One open backing store; thread-safe (positional I/O only)."""

    def __init__(self, path: str, read_only: bool, logical_sector_size: int | None = None,
                 fd: int | None = None) -> None:
        """``fd``: the image the toolstack opened for us (now ours); else ``path`` is opened here."""
        if logical_sector_size not in (None, 512, 4096):
            if fd is not None:
                os.close(fd)
            raise ValueError(f"logical sector size {logical_sector_size}: 512 or 4096")
        self.path = path
        self.read_only = read_only
        self._nowait_reads = hasattr(os, "RWF_NOWAIT")
        self.fd = fd if fd is not None else os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        try:
            if fd is not None and not read_only and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
                raise ValueError(f"{path}: the descriptor handed over is read-only, the disk is not")
            st = os.fstat(self.fd)
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            self.write_cache = True
            if self.is_block_device:
                self.write_cache = _block_write_cache(st.st_rdev)
                buf = bytearray(8)
                fcntl.ioctl(self.fd, BLKGETSIZE64, buf)
                self.size = struct.unpack("<Q", buf)[0]
                dev_lss = struct.unpack("<i", fcntl.ioctl(self.fd, BLKSSZGET, b"\0" * 4))[0]
                self.physical_sector_size = struct.unpack("<I", fcntl.ioctl(self.fd, BLKPBSZGET, b"\0" * 4))[0]
                self.logical_sector_size = max(dev_lss, logical_sector_size or 0)
            elif stat.S_ISREG(st.st_mode):
                self.size = st.st_size
                self.logical_sector_size = logical_sector_size or 512
                self.physical_sector_size = max(self.logical_sector_size, 4096)
            else:
                raise ValueError(f"{path} is neither a regular file nor a block device")
            # A trailing partial sector is not addressable, as with a block device.
            self.size -= self.size % self.logical_sector_size
        except BaseException:
            os.close(self.fd)
            raise

    @property
    def sectors(self) -> int:
        """Size in 512-byte units: what blkif's ``sectors`` node and sector numbers count."""
        return self.size // 512

    @property
    def discard_granularity(self) -> int:
        return 4096 if not self.is_block_device else self.physical_sector_size

    def readv(self, buffers: Sequence[memoryview], offset: int, length: int = -1) -> None:
        """Fill ``buffers`` from ``offset``; ``length``, if the caller knows it, is their total size."""
        if length >= 0 and len(buffers) <= IOV_MAX and os.preadv(self.fd, buffers, offset) == length:
            return                        # the usual case: all of it in one call
        self._vector_io(os.preadv, buffers, offset, "read")

    def read_cached(self, buffers: Sequence[memoryview], offset: int, length: int) -> bool:
        """:meth:`readv` if the page cache holds all of it now (``RWF_NOWAIT``); False -- the buffers
        then hold nothing useful -- if the disk would have to be waited for.  Where the kernel cannot
        tell (no ``RWF_NOWAIT`` here), the read is done anyway."""
        if self._nowait_reads and len(buffers) <= IOV_MAX:
            try:
                return os.preadv(self.fd, buffers, offset, os.RWF_NOWAIT) == length
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait_reads = False
        self.readv(buffers, offset, length)
        return True

    def writev(self, buffers: Sequence[memoryview], offset: int, length: int = -1) -> None:
        if length >= 0 and len(buffers) <= IOV_MAX and os.pwritev(self.fd, buffers, offset) == length:
            return
        self._vector_io(os.pwritev, buffers, offset, "write")

    def _vector_io(self, call, buffers: Sequence[memoryview], offset: int, what: str) -> None:
        bufs = list(buffers)
        while bufs:
            batch = bufs[:IOV_MAX]
            want = sum(len(b) for b in batch)
            done = call(self.fd, batch, offset)
            if done == 0:
                raise OSError(errno.EIO, f"short {what} at {offset} of {self.path}")
            offset += done
            if done == want:
                bufs = bufs[IOV_MAX:]
                continue
            # Partial: drop what completed, keep the rest of the current buffer.
            rest = []
            for b in batch:
                if done >= len(b):
                    done -= len(b)
                    continue
                rest.append(b[done:])
                done = 0
            bufs = rest + bufs[IOV_MAX:]

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        if length == 0:
            return
        if self.is_block_device:
            fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("<QQ", offset, length))
            return
        try:
            punch_hole(self.fd, offset, length)
        except OSError as e:
            raise OSError(e.errno, f"punching {offset}+{length} in {self.path}: {e.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _block_write_cache(rdev: int) -> bool:
    """The kernel's view of a block device's cache; a partition has its disk's.  Unknown: assume one."""
    base = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    for queue in (f"{base}/queue", f"{base}/../queue"):
        try:
            with open(f"{queue}/write_cache") as f:
                return f.read().strip() != "write through"
        except OSError:
            continue
    return True
