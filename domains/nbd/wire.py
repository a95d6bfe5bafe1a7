"""The NBD wire format: magic numbers, flags, option/command/reply codes, limits and layouts.

Only what crosses the socket, as the spec names it, plus the two limits this
server chooses (``MAX_OPTION_DATA``, ``RECV_SCRATCH_SIZE``).  The protocol
modules (``handshake``, ``transmission``, ``protocol``) build and parse
messages with these layouts; nothing here has state.

Wire format: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
"""

from __future__ import annotations

import enum
import errno as _errno
import struct

__all__ = [
    "NBDMAGIC", "IHAVEOPT", "OPTION_REPLY_MAGIC", "REQUEST_MAGIC", "SIMPLE_REPLY_MAGIC",
    "FLAG_FIXED_NEWSTYLE", "FLAG_NO_ZEROES", "FLAG_C_FIXED_NEWSTYLE", "FLAG_C_NO_ZEROES",
    "TransmissionFlag", "Opt", "Rep", "Info", "Cmd", "CmdFlag", "NbdErr",
    "MAX_BLOCK_SIZE", "MAX_STRING", "MAX_OPTION_DATA", "RECV_SCRATCH_SIZE",
    "Buffer", "nbd_error",
]

Buffer = bytes | bytearray | memoryview

# --- magic numbers ----------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943           # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054           # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# --- handshake flags ----------------------------------------------------------

FLAG_FIXED_NEWSTYLE = 1 << 0            # server -> client (16 bits)
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0          # client -> server (32 bits)
FLAG_C_NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class NbdErr(enum.IntEnum):
    """The only error values the wire may carry; they are not host errnos."""
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# --- limits -----------------------------------------------------------------

#: Largest READ/WRITE/WRITE_ZEROES we accept: the size every client is told it
#: may rely on (2**25), and what we advertise as the maximum block size.
MAX_BLOCK_SIZE = 32 * 1024 * 1024
#: The spec's hard limit on any string (export names, messages).
MAX_STRING = 4096
#: Largest option payload we buffer (GO/INFO: name + info requests).  Longer
#: known options are skipped unbuffered and answered NBD_REP_ERR_TOO_BIG.
MAX_OPTION_DATA = 16 * 1024
#: Size of the scratch buffer ``get_buffer`` offers between payloads: big
#: enough to pick up many pipelined request headers per recv.
RECV_SCRATCH_SIZE = 16 * 1024

# --- message layouts ----------------------------------------------------------

U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
CLIENT_FLAGS = U32
OPT_HEADER = struct.Struct(">QII")          # magic, option, length
OPT_REPLY = struct.Struct(">QIII")          # magic, option, type, length
REQUEST = struct.Struct(">IHHQQI")          # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")        # magic, error, handle
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")

# Host errno -> wire error.  The spec asks EDQUOT/EFBIG to be reported as
# ENOSPC; EROFS/EACCES are permission failures to a client.  Anything without
# a wire equivalent becomes EIO, the one error every client treats as "the
# device failed".
_ERRNO_TO_NBD = {
    _errno.EPERM: NbdErr.EPERM,
    _errno.EACCES: NbdErr.EPERM,
    _errno.EROFS: NbdErr.EPERM,
    _errno.EIO: NbdErr.EIO,
    _errno.ENOMEM: NbdErr.ENOMEM,
    _errno.EINVAL: NbdErr.EINVAL,
    _errno.ENOSPC: NbdErr.ENOSPC,
    _errno.EDQUOT: NbdErr.ENOSPC,
    _errno.EFBIG: NbdErr.ENOSPC,
    _errno.EOVERFLOW: NbdErr.EOVERFLOW,
    _errno.ENOTSUP: NbdErr.ENOTSUP,
    _errno.EOPNOTSUPP: NbdErr.ENOTSUP,
    _errno.ESHUTDOWN: NbdErr.ESHUTDOWN,
}

#: The same as plain ints, for the reply path (``reply`` maps every error it sends).
ERRNO_TO_WIRE = {k: int(v) for k, v in _ERRNO_TO_NBD.items()}
WIRE_EIO = int(NbdErr.EIO)


def nbd_error(err: int) -> int:
    """Map a host errno (0 = success) to the value the NBD wire allows."""
    if err == 0:
        return 0
    return ERRNO_TO_WIRE.get(err, WIRE_EIO)


def nbytes(b: Buffer) -> int:
    """Bytes in ``b``, without building a memoryview for the common bytes/bytearray."""
    return len(b) if type(b) is bytes or type(b) is bytearray else memoryview(b).nbytes
