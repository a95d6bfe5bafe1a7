"""xenstored's state directory: a snapshot and an append-only journal after it.

* ``xenstore.db`` is a snapshot: msgpack ``{"version", "epoch", "core",
  "rings"}`` (``core`` is ``XenstoreCore.dump()``), written to a temporary
  file and renamed over the old one, so a SIGKILL leaves the old or the new.
* ``xenstore.journal`` holds what changed after the snapshot of the same
  epoch: a 12-byte header (``XSJ1`` and the epoch, u64 little-endian), then
  records, each ``<u32 length><u32 crc32>`` and that many bytes (never
  empty), then zeros up to the file's size.  A record is in the journal
  before the replies of the turn it describes leave.  Without ``fsync`` the
  file is made at its full size and mapped (MAP_SHARED): a record is copied
  into the page cache, where a SIGKILL cannot take it back, without a
  system call; a record that does not fit starts a new snapshot instead.
  With ``fsync`` it is appended with ``write`` and ``fdatasync``-ed (one
  flush per loop turn, shared by the replies of that turn), so it survives
  a power loss too.
* Compaction (``write_snapshot``): a new snapshot with the next epoch, then
  a new, empty journal of that epoch (created beside it, renamed over the
  old one).  Killed between the two renames, the new snapshot is found with
  the old journal, whose epoch is older: the journal is ignored, as the
  snapshot holds all of it.
* Reading stops at the first record that is cut short or fails its CRC:
  one being appended when the power went.  Its turn's replies never left.
  The caller writes a new snapshot right after loading, so a damaged tail
  is never appended to.

Snapshots of version 1 (before the journal: the whole store rewritten
after every change) are read as an epoch-0 snapshot without a journal.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import zlib
from typing import Any

import msgpack

log = logging.getLogger("xdom.xenstored")

DB_NAME = "xenstore.db"
JOURNAL_NAME = "xenstore.journal"
DB_VERSION = 2
READABLE_VERSIONS = (1, 2)
_MAGIC = b"XSJ1"
_HEADER = struct.Struct("<4sQ")
_RECORD = struct.Struct("<II")
COMPACT_MIN_BYTES = 1 << 20      # a journal is compacted past this, or twice the snapshot, whichever is more
MAPPED_MIN_BYTES = 4 << 20       # a mapped journal's size: this, or four times the snapshot, whichever is more


class StateDir:
    def __init__(self, state_dir: str, fsync: bool = False) -> None:
        self.dir = state_dir
        self.fsync = fsync
        self.db_path = os.path.join(state_dir, DB_NAME)
        self.journal_path = os.path.join(state_dir, JOURNAL_NAME)
        self.epoch = 0
        self.snapshot_bytes = 0
        self.journal_bytes = 0
        self._fd = -1
        self._map: mmap.mmap | None = None

    # ---- reading -----------------------------------------------------------------------------

    def load(self) -> tuple[dict[str, Any] | None, list[bytes]]:
        """The snapshot (None: no state yet) and the journal records made after it, in order."""
        if not os.path.exists(self.db_path):
            return None, []
        with open(self.db_path, "rb") as f:
            raw = f.read()
        saved = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        if not isinstance(saved, dict) or saved.get("version") not in READABLE_VERSIONS:
            raise SystemExit(f"xenstored: {self.db_path} is not a database this version reads")
        self.epoch = int(saved.get("epoch", 0))
        self.snapshot_bytes = len(raw)
        return saved, self._read_journal()

    def _read_journal(self) -> list[bytes]:
        try:
            with open(self.journal_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        if len(data) < _HEADER.size:
            return []
        magic, epoch = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise SystemExit(f"xenstored: {self.journal_path} is not a journal this version reads")
        if epoch != self.epoch:
            return []           # older than the snapshot: killed during a compaction, the snapshot has it all
        records = []
        pos = _HEADER.size
        view = memoryview(data)
        while pos + _RECORD.size <= len(data):
            length, crc = _RECORD.unpack_from(data, pos)
            if length == 0 and crc == 0:
                break                   # the unused end of a mapped journal
            start = pos + _RECORD.size
            if start + length > len(data) or zlib.crc32(view[start:start + length]) != crc:
                log.warning("xenstored: %s ends with a damaged record at byte %d (%d bytes dropped): "
                            "cut short when the machine stopped", self.journal_path, pos, len(data) - pos)
                break
            records.append(bytes(view[start:start + length]))
            pos = start + length
        return records

    # ---- writing -----------------------------------------------------------------------------

    def append(self, payload: bytes) -> bool:
        """One (non-empty) record, in the page cache (with fsync: on stable storage) when this
        returns True.  False: the mapped journal has no room left; write a snapshot instead."""
        m = self._map
        if m is not None:
            pos = self.journal_bytes
            end = pos + _RECORD.size + len(payload)
            if end > len(m):
                return False
            m[pos + _RECORD.size:end] = payload
            m[pos:pos + _RECORD.size] = _RECORD.pack(len(payload), zlib.crc32(payload))
            self.journal_bytes = end
            return True
        record = _RECORD.pack(len(payload), zlib.crc32(payload)) + payload
        n = os.write(self._fd, record)
        if n != len(record):            # a full disk: the tail is damaged, the next load drops it
            raise OSError(f"short write to {self.journal_path} ({n} of {len(record)} bytes)")
        self.journal_bytes += n
        if self.fsync:
            os.fdatasync(self._fd)
        return True

    def wants_compaction(self) -> bool:
        return self.journal_bytes > max(COMPACT_MIN_BYTES, 2 * self.snapshot_bytes)

    def write_snapshot(self, state: dict[str, Any]) -> None:
        """Everything in one new snapshot (the next epoch), then an empty journal after it."""
        epoch = self.epoch + 1
        data = msgpack.packb({"version": DB_VERSION, "epoch": epoch, **state}, use_bin_type=True)
        self._replace(self.db_path, data)
        self.epoch = epoch
        self.snapshot_bytes = len(data)
        self._open_journal()

    def _open_journal(self) -> None:
        tmp = self.journal_path + ".tmp"
        mapped = not self.fsync
        flags = os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | (os.O_RDWR if mapped else os.O_WRONLY | os.O_APPEND)
        fd = os.open(tmp, flags, 0o600)
        new_map = None
        try:
            os.write(fd, _HEADER.pack(_MAGIC, self.epoch))
            if mapped:
                # Written, not sparse: the blocks are the file's before a record needs them.
                size = -(-max(MAPPED_MIN_BYTES, 4 * self.snapshot_bytes) // mmap.PAGESIZE) * mmap.PAGESIZE
                zeros = bytes(1 << 20)
                left = size - _HEADER.size
                while left > 0:
                    left -= os.write(fd, zeros[:left])
                new_map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            if self.fsync:
                os.fdatasync(fd)
            os.replace(tmp, self.journal_path)
            if self.fsync:
                self._sync_dir()
        except BaseException:
            if new_map is not None:
                new_map.close()
            os.close(fd)
            raise
        self.close()
        self._fd, self._map = fd, new_map
        self.journal_bytes = _HEADER.size

    def _replace(self, path: str, data: bytes) -> None:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            if self.fsync:
                f.flush()
                os.fdatasync(f.fileno())
        os.replace(tmp, path)     # atomic: a SIGKILL leaves the old or the new file
        if self.fsync:
            self._sync_dir()

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
