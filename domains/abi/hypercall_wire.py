"""The hypercall wire format between a domain and the broker (sans-IO).

One SOCK_SEQPACKET message is one msgpack map: a request ``{"op": NAME,
...fields}`` or a reply ``{"ok": true, ...}`` / ``{"ok": false, "errno":
NAME, "error": text}``.  File descriptors travel beside a message with
SCM_RIGHTS, in the order the reply documents.  No field ever names the
calling domain: the broker knows the caller from the connection.

Decoding never trusts its input: sizes and counts are bounded before
anything is built, and every failure is a ``HypercallError`` carrying the
errno to answer with.
"""

from __future__ import annotations

import array
import errno as _errno
import socket
import struct
from collections.abc import Sequence
from itertools import starmap
from typing import Any, Final

import msgpack

from .grant_table import GNTTAB_COPY

MAX_MESSAGE: Final = 64 * 1024   # one request or reply
MAX_BATCH: Final = 128           # map/unmap/copy ops per hypercall (<= SCM_MAX_FD)
MAX_FDS: Final = MAX_BATCH       # descriptors beside one reply

# op name -> {field: type}; every field is required, no other is allowed.
REQUESTS: Final[dict[str, dict[str, type]]] = {
    "hello": {"token": str},
    "rejoin": {"domid": int, "key": str},   # a running domain, to a broker that took over from a dead one
    "populate_physmap": {"start": int, "count": int},   # the broker's frames, by SCM_RIGHTS
    "set_memory": {"base": int},
    "shutdown": {"reason": str},
    "map": {"ops": list},           # [[domid, ref, readonly], ...]
    "unmap": {"handles": list},     # [handle, ...]
    "copy": {"ops": bytes},         # an array of Xen's struct gnttab_copy (see copy_columns)
    "replace_frames": {"gfns": list},   # fresh frames for gfns a grantee was given (XDOM_GTF_mapped)
    "evtchn_alloc_unbound": {"remote_dom": int},
    "evtchn_bind_interdomain": {"remote_dom": int, "remote_port": int},
    "evtchn_bind_virq": {"virq": int},
    "evtchn_close": {"port": int},
    "evtchn_status": {"port": int},
    "evtchn_send": {"port": int},
    "domain_info": {"domid": int},
    "get_param": {"index": int},
    "evtchn_fds": {"port": int},
}

SHUTDOWN_REASONS: Final = ("poweroff", "reboot", "suspend", "crash")


class HypercallError(Exception):
    """A hypercall failed; ``errno`` is what the caller is told (Linux errno)."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message

    @property
    def name(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"


def _unpack(data: bytes) -> Any:
    if len(data) > MAX_MESSAGE:
        raise HypercallError(_errno.EMSGSIZE, f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                               max_str_len=4096, max_bin_len=MAX_MESSAGE,
                               max_array_len=MAX_BATCH * 8, max_map_len=64, max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, msgpack.OutOfData) as e:
        raise HypercallError(_errno.EBADMSG, f"undecodable frame: {e.__class__.__name__}") from None
    except Exception as e:  # msgpack raises assorted types on hostile input
        raise HypercallError(_errno.EBADMSG, f"undecodable frame: {e.__class__.__name__}") from None


def decode_request(data: bytes) -> tuple[str, dict[str, Any]]:
    """Decode and shape-check one request frame; raises HypercallError."""
    msg = _unpack(data)
    if not isinstance(msg, dict):
        raise HypercallError(_errno.EBADMSG, "a request is a map")
    op = msg.get("op")
    if not isinstance(op, str) or op not in REQUESTS:
        raise HypercallError(_errno.ENOSYS, f"unknown hypercall {op!r:.40}")
    spec = REQUESTS[op]
    # Any request may carry "seq", the caller's sequence number: a domain that
    # asks again after the broker died gets the reply it missed, not a second effect.
    seq = msg.pop("seq", None)
    if seq is not None and (type(seq) is not int or not 0 <= seq < 2**63):
        raise HypercallError(_errno.EINVAL, f"{op}: seq must be a non-negative integer")
    extra = set(msg) - set(spec) - {"op"}
    if extra:
        raise HypercallError(_errno.EINVAL, f"{op}: unexpected fields {sorted(map(str, extra))[:4]}")
    args: dict[str, Any] = {}
    for name, kind in spec.items():
        if name not in msg:
            raise HypercallError(_errno.EINVAL, f"{op}: missing field {name!r}")
        value = msg[name]
        if kind is int and (type(value) is not int):
            raise HypercallError(_errno.EINVAL, f"{op}: field {name!r} must be an integer")
        if kind is not int and not isinstance(value, kind):
            raise HypercallError(_errno.EINVAL, f"{op}: field {name!r} must be {kind.__name__}")
        if kind is list and len(value) > MAX_BATCH:
            raise HypercallError(_errno.E2BIG, f"{op}: {len(value)} entries exceed the batch limit {MAX_BATCH}")
        args[name] = value
    if seq is not None:
        args["seq"] = seq
    return op, args


CopyColumns = tuple[tuple[int, ...], ...]                # a copy batch, one tuple per struct gnttab_copy field
_COPY_FIELDS: Final = 9                                  # of struct gnttab_copy, as GNTTAB_COPY unpacks it
_COPY_ARRAYS: dict[int, struct.Struct] = {}              # segments -> the struct of that many (up to MAX_BATCH)


def pack_copy_segments(segments: Sequence[tuple[int, ...]]) -> bytes:
    """The caller's side of :func:`copy_columns`; a value that does not fit its field is EINVAL."""
    try:
        return b"".join(starmap(GNTTAB_COPY.pack, segments))
    except struct.error as e:
        raise HypercallError(_errno.EINVAL, f"copy: a segment does not fit struct gnttab_copy ({e})") from None


def copy_columns(blob: bytes) -> CopyColumns:
    """A GNTTABOP_copy batch as Xen lays it out: an array of ``struct gnttab_copy``.

    It comes back as columns, one per field of the struct in order
    (source.u, source.domid, source.offset, dest.u, dest.domid,
    dest.offset, len, flags, status), each a tuple with an entry per
    segment: unpacked in one pass of C, every value is in its field's range
    by construction (a list of integers had to be checked one by one, and
    cost as much as the copies), and a batch is judged column by column
    (``zip(*columns)`` gives the segments).
    """
    size = GNTTAB_COPY.size
    if len(blob) % size:
        raise HypercallError(_errno.EINVAL, f"copy: {len(blob)} bytes are not whole {size}-byte gnttab_copy segments")
    if len(blob) > MAX_BATCH * size:
        raise HypercallError(_errno.E2BIG, f"copy: {len(blob) // size} segments exceed the batch limit {MAX_BATCH}")
    n = len(blob) // size
    layout = _COPY_ARRAYS.get(n)
    if layout is None:
        layout = _COPY_ARRAYS[n] = struct.Struct("<" + GNTTAB_COPY.format.lstrip("<") * n)
    flat = layout.unpack(blob)
    return tuple(flat[field::_COPY_FIELDS] for field in range(_COPY_FIELDS))


def int_tuple(value: Any, width: int, what: str, lo: int = 0, hi: int = 2**32 - 1) -> tuple[int, ...]:
    """Check one batch entry is a list of ``width`` integers within [lo, hi]."""
    if not isinstance(value, (list, tuple)) or len(value) != width:
        raise HypercallError(_errno.EINVAL, f"{what}: each entry is a list of {width} integers")
    for v in value:
        if type(v) is not int:
            raise HypercallError(_errno.EINVAL, f"{what}: each entry is a list of {width} integers")
        if not lo <= v <= hi:
            raise HypercallError(_errno.EINVAL, f"{what}: value {v} out of range")
    return tuple(value)


def take_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors in a recvmsg's ancillary data (SCM_RIGHTS), in order."""
    fds: list[int] = []
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(blob[: len(blob) - len(blob) % arr.itemsize])
            fds.extend(arr)
    return fds


def _pack(obj: dict[str, Any]) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


def encode_request(op: str, **fields: Any) -> bytes:
    return _pack({"op": op, **fields})


def encode_reply(**fields: Any) -> bytes:
    return _pack({"ok": True, **fields})


def encode_error(err: HypercallError) -> bytes:
    return _pack({"ok": False, "errno": err.name, "error": err.message})


def decode_reply(data: bytes) -> dict[str, Any]:
    """Decode a reply; raises HypercallError for an error reply."""
    msg = msgpack.unpackb(data, raw=False, strict_map_key=True)
    if not isinstance(msg, dict) or "ok" not in msg:
        raise HypercallError(_errno.EBADMSG, "malformed reply from the broker")
    if not msg["ok"]:
        code = getattr(_errno, str(msg.get("errno")), _errno.EIO)
        raise HypercallError(code, str(msg.get("error", "")))
    return msg
