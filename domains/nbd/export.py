"""What one NBD export offers: its size, name, block sizes and capabilities, checked once.

The handshake advertises it (``handshake``: the transmission flags, the
block sizes of ``NBD_INFO_BLOCK_SIZE``) and transmission enforces it
(``transmission``: which requests are valid); both read this one object, so
what a client is told and what it is held to cannot drift apart.
"""

from __future__ import annotations

from .wire import MAX_BLOCK_SIZE, MAX_STRING, CmdFlag, TransmissionFlag

__all__ = ["Export"]


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class Export:
    """The parameters of one export, validated (``ValueError`` on anything the spec forbids)."""

    __slots__ = ("size", "name", "name_bytes", "read_only", "can_flush", "can_trim", "can_write_zeroes",
                 "min_block", "pref_block", "max_block", "tflags", "rw_flags", "align_mask")

    def __init__(
        self,
        size: int,
        *,
        sector_size: int = 512,
        export_name: str = "",
        read_only: bool = False,
        can_flush: bool = True,
        can_trim: bool = False,
        can_write_zeroes: bool = False,
        can_multi_conn: bool = False,
        max_block_size: int = MAX_BLOCK_SIZE,
    ) -> None:
        if not 0 <= size < 1 << 63:
            raise ValueError(f"export size {size} out of range")
        # The spec caps the minimum block size at 64 KiB and wants powers of 2.
        if not (_is_pow2(sector_size) and sector_size <= 65536):
            raise ValueError(f"sector size {sector_size} must be a power of 2 <= 65536")
        if max_block_size % sector_size or not sector_size <= max_block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"max block size {max_block_size} must be a multiple of the sector size"
                             f" and at most {MAX_BLOCK_SIZE}")
        name = export_name.encode("utf-8")
        if len(name) > MAX_STRING or b"\0" in name:
            raise ValueError("export name must be at most 4096 bytes of NUL-free UTF-8")
        self.size = size
        self.name = export_name
        self.name_bytes = name
        self.read_only = read_only
        self.can_flush = can_flush
        self.can_trim = can_trim and not read_only
        self.can_write_zeroes = can_write_zeroes and not read_only
        self.min_block = sector_size
        self.pref_block = max(4096, sector_size)
        self.max_block = max_block_size

        tf = TransmissionFlag.HAS_FLAGS
        if read_only:
            tf |= TransmissionFlag.READ_ONLY
        if can_flush:
            # FUA is implemented as "write, then flush" where the device has no
            # native FUA, so it is only honest to offer it with a flush.
            tf |= TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
        if self.can_trim:
            tf |= TransmissionFlag.SEND_TRIM
        if self.can_write_zeroes:
            tf |= TransmissionFlag.SEND_WRITE_ZEROES
        if can_multi_conn:
            tf |= TransmissionFlag.CAN_MULTI_CONN
        self.tflags = int(tf)
        # What the fast path of transmission checks a READ/WRITE header against (the general path,
        # ``transmission.check_request``, handles everything else, errors included).
        self.rw_flags = int(CmdFlag.FUA) if tf & TransmissionFlag.SEND_FUA else 0
        self.align_mask = sector_size - 1

