"""A writer for the cpio "newc" format, the one Linux unpacks as an initramfs.

Building the VM's initramfs in Python (rather than with ``cpio`` and
``find``) lets the image builder run unprivileged: device nodes such as
``/dev/console`` are just header fields here, no ``mknod`` needed, and the
archive is reproducible (every entry has uid 0, gid 0 and mtime 0, inode
numbers are assigned in order), so its hash is a function of its inputs.

The format (``Documentation/driver-api/early-userspace/buffer-format.rst``):
each entry is a 110-byte ASCII header (``070701`` and 13 eight-digit hex
fields), the NUL-terminated name padded to a multiple of 4 bytes, then the
data padded likewise; the archive ends with an entry named ``TRAILER!!!``.
The kernel does not create missing parent directories, so the writer emits
each parent before its first child.  Several archives, each optionally
compressed, may be concatenated: the kernel unpacks them in order (the image
builder uses this to add fio as a second layer).
"""

from __future__ import annotations

import stat
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Writes newc entries to a binary stream; call :meth:`close` for the trailer.

    Paths are given absolute or relative; they are stored relative to the
    archive root ("bin/sh"), as the kernel expects.
    """

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self._ino = 0
        self._dirs: set[str] = {""}
        self._names: set[str] = set()
        self._closed = False

    @staticmethod
    def _norm(path: str) -> str:
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            raise ValueError(f"cpio path may not contain '..': {path!r}")
        if not parts:
            raise ValueError("cpio path may not be the root")
        return "/".join(parts)

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        if self._closed:
            raise ValueError("archive already closed")
        if name in self._names and name != TRAILER:
            raise ValueError(f"duplicate cpio entry {name!r}")
        self._names.add(name)
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = MAGIC + b"".join(b"%08X" % f for f in fields)
        self.out.write(header + encoded + _pad4(len(header) + len(encoded)))
        if data:
            self.out.write(data)
            self.out.write(_pad4(len(data)))

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self._dirs:
                self._dirs.add(d)
                self._entry(d, stat.S_IFDIR | 0o755, nlink=2)

    def directory(self, path: str, mode: int = 0o755) -> None:
        """A directory (and its parents); a second call for the same one is a no-op."""
        name = self._norm(path)
        if name in self._dirs:
            return
        self._parents(name)
        self._dirs.add(name)
        self._entry(name, stat.S_IFDIR | (mode & 0o7777), nlink=2)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """A regular file with ``data`` as its contents."""
        name = self._norm(path)
        self._parents(name)
        self._entry(name, stat.S_IFREG | (mode & 0o7777), data)

    def symlink(self, path: str, target: str) -> None:
        """A symbolic link to ``target`` (stored verbatim, as the link's data)."""
        name = self._norm(path)
        self._parents(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def device(self, path: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        """A character (``kind="c"``) or block (``"b"``) device node."""
        fmt = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}[kind]
        name = self._norm(path)
        self._parents(name)
        self._entry(name, fmt | (mode & 0o7777), rdev=(major, minor))

    def close(self) -> None:
        """Write the trailer; the stream stays open (it is the caller's)."""
        if not self._closed:
            self._entry(TRAILER, 0)
            self._closed = True


def read_entries(data: bytes) -> list[tuple[str, int, bytes]]:
    """Parse a (decompressed, single) newc archive into ``(name, mode, data)``.

    For tests and for inspecting a built image; stops at the trailer.
    """
    out: list[tuple[str, int, bytes]] = []
    pos = 0
    while True:
        if data[pos:pos + 6] != MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += -pos % 4
        body = data[pos:pos + size]
        pos += size
        pos += -pos % 4
        if name == TRAILER:
            return out
        out.append((name, mode, body))
