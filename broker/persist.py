"""What the broker writes down so that a new broker can take over its domains.

Theory of operation.  The hypervisor's tables are small beside what the
domains hold: their memory, their grant tables, their mappings and the
eventfds of their channels all live in the domains' processes, which go on
running (and notifying each other) when the broker dies.  What only the
broker knows is *who is what*: which domid a process is, which inode is the
frame of which gfn, which port pairs with which and through which eventfds
(named by the kernel's ``eventfd-id``), which grant each maptrack handle
pins, and the last reply it gave each domain.  That is what this module
keeps, as a **model**: plain dicts and lists (msgpack-able), nothing live.

The model is a snapshot plus a journal of records appended after every
request that changed it and *before* the reply leaves (a process that dies
mid-way loses nothing the kernel has taken from ``write``; power loss takes
the domains too, so nothing is fsynced).  Records are absolute ("domain 3's
ports are now ...", "handle 9 of domain 4 is gone"), so replaying a journal
over a snapshot that already contains it changes nothing, and the order
"write the new snapshot, then start a new journal" needs no care.

Records (tuples, the first item the kind):

* ``("info", domid, {...})``: a domain's scalar fields, whole;
* ``("frames", domid, {"base", "inodes", "exposed"} | None)``: its memory;
* ``("gfn", domid, gfn, inode, exposed)``: one frame replaced or exposed;
* ``("ports", domid, {port: {...}})``: its event-channel table, whole;
* ``("map", domid, handle, [granter, ref, readonly, gfn, inode, granter_incarnation] | None)``;
* ``("last", domid, [seq, reply bytes, fd spec])``: the last reply, for a
  domain that asks again after the broker died before it heard it;
* ``("remove", domid)`` and ``("next_domid", n)``.

Sans-IO but for :class:`StateFiles`, the thin layer that reads and writes
the two files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import msgpack

log = logging.getLogger("xdom.broker")

VERSION = 1
SNAPSHOT = "broker.snapshot"
JOURNAL = "broker.journal"
COMPACT_BYTES = 4 << 20          # a journal this long is folded into a new snapshot

Record = tuple[Any, ...]
Model = dict[str, Any]


def empty_model() -> Model:
    return {"version": VERSION, "next_domid": 1, "domains": {}}


def apply(model: Model, record: Record) -> None:
    """Apply one journal record to the model (absolute: applying twice is applying once)."""
    kind = record[0]
    doms = model["domains"]
    if kind == "next_domid":
        model["next_domid"] = record[1]
        return
    domid = record[1]
    if kind == "remove":
        doms.pop(domid, None)
        return
    d = doms.setdefault(domid, {"info": {}, "frames": None, "ports": {}, "maps": {}, "last": None})
    if kind == "info":
        d["info"] = record[2]
    elif kind == "frames":
        d["frames"] = record[2]
    elif kind == "gfn":
        _, _, gfn, inode, exposed = record
        frames = d["frames"]
        if frames is not None and 0 <= gfn < len(frames["inodes"]) // 8:
            inodes = bytearray(frames["inodes"])
            inodes[gfn * 8:gfn * 8 + 8] = inode.to_bytes(8, "little")
            frames["inodes"] = bytes(inodes)
            exp = bytearray(frames["exposed"])
            exp[gfn] = exposed
            frames["exposed"] = bytes(exp)
    elif kind == "ports":
        d["ports"] = record[2]
    elif kind == "map":
        if record[3] is None:
            d["maps"].pop(record[2], None)
        else:
            d["maps"][record[2]] = record[3]
    elif kind == "last":
        d["last"] = record[2]
    else:
        raise ValueError(f"unknown journal record {kind!r}")


def encode(obj: Any) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


def decode_stream(data: bytes) -> Iterable[Any]:
    """The objects of a journal, stopping quietly at a torn last one."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(data), 1 << 20))
    unpacker.feed(data)
    try:
        yield from unpacker
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError):
        log.warning("journal: a damaged record ends the replay")


class StateFiles:
    """The snapshot and the journal in ``state_dir`` (the I/O around the model)."""

    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.snapshot_path = os.path.join(state_dir, SNAPSHOT)
        self.journal_path = os.path.join(state_dir, JOURNAL)
        self._journal_fd = -1
        self.journal_bytes = 0
        # one packer for every record: msgpack.packb makes a new one each call, which
        # cost more than the packing when a batch of 64 grant maps writes 64 records
        self._packer = msgpack.Packer(use_bin_type=True)

    def exists(self) -> bool:
        return os.path.exists(self.snapshot_path)

    def load(self) -> Model:
        """The model as the last broker left it: its snapshot, then its journal."""
        with open(self.snapshot_path, "rb") as f:
            model = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
        if not isinstance(model, dict) or model.get("version") != VERSION:
            raise ValueError(f"{self.snapshot_path}: not a version {VERSION} broker snapshot")
        try:
            with open(self.journal_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        n = 0
        for record in decode_stream(data):
            apply(model, tuple(record))
            n += 1
        log.info("broker state: snapshot and %d journal records read", n)
        return model

    def write_snapshot(self, model: Model) -> None:
        """Replace the snapshot, then start an empty journal after it."""
        tmp = self.snapshot_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(encode(model))
        os.replace(tmp, self.snapshot_path)
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
        self._journal_fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
                                   | os.O_CLOEXEC, 0o600)
        self.journal_bytes = 0

    def append(self, records: list[Record]) -> None:
        if not records:
            return
        data = b"".join(map(self._packer.pack, records))
        view = memoryview(data)
        while view:
            n = os.write(self._journal_fd, view)
            view = view[n:]
        self.journal_bytes += len(data)

    def discard(self) -> None:
        """The host is down: nothing to take over."""
        self.close()
        for path in (self.snapshot_path, self.journal_path, self.snapshot_path + ".tmp"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        try:
            os.rmdir(self.dir)
        except OSError:
            pass        # not empty (someone else's files), or gone: leave it

    def close(self) -> None:
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
            self._journal_fd = -1
