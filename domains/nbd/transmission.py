"""The transmission phase's rules: which requests are valid, and the simple replies that complete them.

``check_request`` is the whole rule of what an export accepts (the spec's
error for everything else); ``parse_requests`` is the same rule for the
common READ/WRITE, unrolled into one loop over the input buffer, because that
is where a busy export spends its time.  ``InFlight`` is the table of
requests handed to the caller and not yet replied to: ``reply`` builds a
simple reply for one of them and never touches the receive side, which is
why the I/O layer may hold its lock only briefly to call it.

All pure: the receive state machine (``protocol``) calls these.
"""

from __future__ import annotations

from collections.abc import Sequence

from .events import Request
from .export import Export
from .wire import (
    ERRNO_TO_WIRE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    WIRE_EIO,
    Buffer,
    Cmd,
    CmdFlag,
    NbdErr,
    TransmissionFlag,
    nbytes,
)

__all__ = ["check_request", "parse_requests", "InFlight"]

_CMD_READ, _CMD_WRITE = Cmd.READ, Cmd.WRITE
# Plain ints: an int & an IntFlag goes through enum machinery (0.35 us), and this runs per request.
_SEND_FUA, _FUA, _NO_HOLE = int(TransmissionFlag.SEND_FUA), int(CmdFlag.FUA), int(CmdFlag.NO_HOLE)
#: ``Request(...)`` without the NamedTuple's Python-level __new__ (one per request on the fast path).
_new_tuple = tuple.__new__


def check_request(export: Export, kind: int, flags: int, offset: int, length: int) -> tuple[int, str]:
    """(0, "") if ``export`` accepts the request, else (the wire error the spec asks for, why)."""
    if kind not in (Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES):
        return NbdErr.EINVAL, f"unsupported command {kind}"
    # Plain ints on purpose: ~ of an IntFlag only covers the known bits,
    # which would let unknown flag bits through.
    allowed = 0
    if export.tflags & _SEND_FUA:
        allowed |= _FUA
    if kind == Cmd.WRITE_ZEROES:
        allowed |= _NO_HOLE
    if flags & ~allowed:
        return NbdErr.EINVAL, f"command flags {flags:#x} not valid for {Cmd(kind).name}"
    writes = kind in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
    if writes and export.read_only:
        return NbdErr.EPERM, "export is read-only"
    if kind == Cmd.FLUSH:
        if not export.can_flush:
            return NbdErr.EINVAL, "flush not supported"
        if offset or length:
            return NbdErr.EINVAL, "flush with nonzero offset/length"
        return 0, ""
    if kind == Cmd.TRIM and not export.can_trim:
        return NbdErr.EINVAL, "trim not supported"
    if kind == Cmd.WRITE_ZEROES and not export.can_write_zeroes:
        return NbdErr.EINVAL, "write zeroes not supported"
    # TRIM is the one command the spec does not bound by the maximum
    # block size (its length is not a payload).
    if kind != Cmd.TRIM and length > export.max_block:
        return NbdErr.EINVAL, f"length {length} exceeds the maximum block size {export.max_block}"
    if offset % export.min_block or length % export.min_block:
        return NbdErr.EINVAL, f"request not aligned to {export.min_block} bytes"
    if offset + length > export.size:
        # The spec: ENOSPC for writes past the end, EINVAL for reads/trims.
        err = NbdErr.ENOSPC if kind in (Cmd.WRITE, Cmd.WRITE_ZEROES) else NbdErr.EINVAL
        return err, f"request [{offset}, +{length}) beyond the export size {export.size}"
    return 0, ""


def parse_requests(inp: bytearray, pos: int, limit: int, export: Export,
                   in_flight: InFlight) -> tuple[list[Request], int]:
    """Up to ``limit`` common requests parsed out of ``inp`` from ``pos`` in one loop, recorded in
    ``in_flight``; returns them and the position after them.

    A valid READ, or a valid WRITE whose payload has arrived with it, is
    parsed straight out of the input buffer; the loop stops at anything
    else (other commands, anything ``check_request`` would refuse, a payload
    still to come), which is left untouched for the general path, so
    behaviour is the same.
    """
    avail = len(inp)
    out: list[Request] = []
    rw_flags, max_block, align, size = ~export.rw_flags, export.max_block, export.align_mask, export.size
    pending = in_flight.pending
    unpack = REQUEST.unpack_from
    while avail - pos >= 28 and len(out) < limit:
        magic, flags, kind, handle, offset, length = unpack(inp, pos)
        if (magic != REQUEST_MAGIC or kind > 1 or flags & rw_flags or not length
                or length > max_block or (offset | length) & align or offset + length > size):
            break
        if kind == 0:
            cmd, data = _CMD_READ, None
            pos += 28
        else:
            end = pos + 28 + length
            if export.read_only or avail < end:
                break
            cmd, data = _CMD_WRITE, memoryview(inp[pos + 28:end])     # a copy: the request's own buffer
            pos = end
        queue = pending.get(handle)
        if queue is None:
            pending[handle] = [(cmd, length)]
        else:
            queue.append((cmd, length))
        out.append(_new_tuple(Request, (cmd, handle, offset, length, flags, data)))
    in_flight.count += len(out)
    return out, pos


class InFlight:
    """Requests handed out as ``Request`` events and not yet replied to, and their replies."""

    __slots__ = ("pending", "count")

    def __init__(self) -> None:
        # handle -> FIFO (a list: almost always one entry) of (kind, length) for requests handed out, not replied.
        self.pending: dict[int, list[tuple[Cmd, int]]] = {}
        self.count = 0

    def add(self, cmd: Cmd, handle: int, length: int) -> None:
        queue = self.pending.get(handle)
        if queue is None:
            self.pending[handle] = [(cmd, length)]
        else:
            queue.append((cmd, length))
        self.count += 1

    def reply(self, handle: int, error: int, data: Buffer | Sequence[Buffer] = b"") -> list[Buffer]:
        """Complete an in-flight request; returns the buffers to send, in order.

        ``error`` is a host errno (mapped with ``nbd_error``).  For a
        successful READ, ``data`` (one buffer or a sequence of them) must
        total exactly the requested length; it is returned as-is after the
        header so it can go to ``sendmsg`` without a copy.  Other commands
        take no data.  Raises ``ValueError`` on a reply the client cannot
        parse: unknown handle or wrong data length.  Requests sharing a
        handle (which clients should not do) are completed in FIFO order.
        """
        queue = self.pending.get(handle)
        if not queue:
            raise ValueError(f"no request with handle {handle:#x} is in flight")
        kind, length = queue[0]
        err = ERRNO_TO_WIRE.get(error, WIRE_EIO) if error else 0
        if isinstance(data, (bytes, bytearray, memoryview)):
            data_list: Sequence[Buffer] = (data,)
        else:
            data_list = data
        bufs: list[Buffer] = [SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, handle)]
        if err == 0 and kind is Cmd.READ:
            sizes = [b.nbytes if type(b) is memoryview else nbytes(b) for b in data_list]
            total = sum(sizes)
            if 0 in sizes:
                bufs += [b for b, n in zip(data_list, sizes) if n]
            else:
                bufs += data_list
            if total != length:
                raise ValueError(f"READ reply carries {total} bytes, {length} requested")
        elif kind is not Cmd.READ and any(nbytes(b) for b in data_list):
            raise ValueError(f"{kind.name} replies carry no data")
        if len(queue) == 1:
            del self.pending[handle]
        else:
            queue.pop(0)
        self.count -= 1
        return bufs

    def reply_many(self, replies: Sequence[tuple[int, int, Buffer | Sequence[Buffer]]]) -> list[Buffer]:
        """``reply`` for each ``(handle, error, data)``, in order: all their buffers, for one send.

        Raises ``ValueError`` as ``reply`` does, at the first bad one (the replies before it are
        done and their buffers lost: the caller can only drop the connection then)."""
        out: list[Buffer] = []
        pending = self.pending
        pack = SIMPLE_REPLY.pack
        for handle, error, data in replies:
            queue = pending.get(handle)
            if queue and len(queue) == 1 and not error:
                kind, length = queue[0]
                if kind is _CMD_READ:
                    # The common success: one READ buffer of exactly the length asked for.
                    if (type(data) is bytes and len(data) == length) or \
                            (type(data) is memoryview and data.nbytes == length):
                        del pending[handle]
                        self.count -= 1
                        out.append(pack(SIMPLE_REPLY_MAGIC, 0, handle))
                        out.append(data)
                        continue
                elif not data:
                    del pending[handle]
                    self.count -= 1
                    out.append(pack(SIMPLE_REPLY_MAGIC, 0, handle))
                    continue
            out += self.reply(handle, error, data)
        return out
