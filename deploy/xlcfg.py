"""xl.cfg device strings: ``disk = [...]`` and ``vif = [...]`` items, read as Xen's xl reads them.

A topology describes devices in the syntax a Xen user already knows, so that
``disk = ["format=raw, vdev=xvda, access=rw, target=/srv/g1.img"]`` means in
xdom what it means in an ``xl create`` file.  The rules below follow
xl-disk-configuration(5), xl-network-configuration(5) and
xen-vbd-interface(7), and where those documents are silent, what xl itself
does (tools/libs/util/libxlu_disk_l.l, libxlu_vif.c, tools/xl/xl_parse.c and
libxl_device.c in xen.git).  xdom adds one key of its own, ``export=``: on a
disk ``export=nbd:PATH`` (the unix socket on which the guest serves the disk
to host programs over NBD) or ``export=vhost-user:PATH`` (the socket on which
the guest serves it to a VM as a vhost-user-blk device); on a vif
``export=vhost-user:PATH`` (a vhost-user-net device for a VM; without it a
vif is a TAP device in the guest's network namespace).

Where xdom is deliberately stricter than xl, it is because xl would silently
do something surprising (last-one-wins respecification, octal rate numbers, a
bare replenishment interval meaning seconds although the manual says
microseconds); each such place says so.

The parsers are pure: no file is opened, no name is resolved.  They raise
:class:`XlCfgError`, and nothing else, for any input string (the test suite
checks this with random strings), so a caller can report a bad topology
instead of crashing on it.

The disk strings are :mod:`xdom.deploy.xl_disk`, the vif strings
:mod:`xdom.deploy.xl_vif`; this module holds what both follow: the error
they raise, the bounds on a string, xl's numbers read the way xdom reads
them, and xdom's ``export=`` key with the socket paths a device without one
gets.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable

__all__ = [
    "DISK_EXPORTS", "EXPORTS_DIR", "EXPORT_NBD", "EXPORT_VHOST_USER", "MAX_SPEC_LEN", "MAX_UNIX_PATH", "VIF_EXPORTS",
    "XlCfgError", "check_spec", "decimal", "default_export", "default_vif_export", "did_you_mean", "export_dir",
    "parse_export",
]

# A device string longer than this is a mistake, not a configuration; the
# limit also keeps every later step (regexes, int()) on small inputs.
MAX_SPEC_LEN = 4096
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_UNIX_PATH = 107
# A guest's export sockets live in RUN_DIR/exports/GUEST/, a directory only its uid may write; a relative
# export=nbd:NAME (or vhost-user:NAME) is a name there, a disk without export= gets VDEV.sock there, a vif of a
# VM guest vifDEVID.sock.
EXPORTS_DIR = "exports"
# The export= schemes: NBD for host programs, vhost-user for a VM (a VMM connects to the guest's socket).
EXPORT_NBD = "nbd"
EXPORT_VHOST_USER = "vhost-user"
DISK_EXPORTS = (EXPORT_NBD, EXPORT_VHOST_USER)
VIF_EXPORTS = (EXPORT_VHOST_USER,)


class XlCfgError(ValueError):
    """An xl device string xl would reject, or one xdom cannot honour.

    The message names the offending item and what was expected, and is
    meant to be shown to the user as is (prefixed with where the string came
    from).
    """


# --------------------------------------------------------------------------
# helpers shared by both parsers


def check_spec(spec: object, what: str) -> str:
    """``spec`` if it is a string of at most MAX_SPEC_LEN printable characters (blanks allowed), else XlCfgError."""
    if not isinstance(spec, str):
        raise XlCfgError(f"a {what} specification must be a string, not {type(spec).__name__}")
    if len(spec) > MAX_SPEC_LEN:
        raise XlCfgError(f"{what} specification is {len(spec)} characters long; at most {MAX_SPEC_LEN} are allowed")
    for ch in spec:
        if not ch.isprintable() and ch not in " \t\n":
            raise XlCfgError(f"{what} specification contains the control character {ch!r}")
    return spec


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when ``word`` is a string close to one of ``choices``, else ""."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def decimal(text: str, what: str, max_digits: int = 10) -> int:
    """A plain decimal number: ASCII digits, no sign, no leading zero.

    xl reads several numbers with ``strtoul(..., 0)``, where ``010`` is
    eight; refusing leading zeros means xdom never reads a number differently
    from xl without saying so.
    """
    if not re.fullmatch(r"0|[1-9][0-9]*", text, re.ASCII):
        raise XlCfgError(f"{what} {text!r} is not a decimal number (digits only, no leading zero)")
    if len(text) > max_digits:
        raise XlCfgError(f"{what} {text!r} is too large")
    return int(text)


# --------------------------------------------------------------------------
# export= and the sockets a device without it gets


def export_dir(run_dir: str, guest: str) -> str:
    """The directory of ``guest``'s export sockets: its own, the only place in the run directory it may write."""
    return os.path.join(run_dir, EXPORTS_DIR, guest)


def default_export(run_dir: str, guest: str, vdev: str) -> str:
    """The export socket of a disk without ``export=``: ``RUN_DIR/exports/GUEST/VDEV.sock``."""
    return os.path.join(export_dir(run_dir, guest), f"{vdev}.sock")


def default_vif_export(run_dir: str, guest: str, devid: int) -> str:
    """The vhost-user socket of a VM guest's vif without ``export=``: ``RUN_DIR/exports/GUEST/vifDEVID.sock``."""
    return os.path.join(export_dir(run_dir, guest), f"vif{devid}.sock")


def parse_export(value: str, where: str, schemes: tuple[str, ...], why: str) -> tuple[str, str]:
    """``SCHEME:PATH`` of an ``export=`` value: (scheme, path); XlCfgError naming what was expected."""
    scheme, sep, path = value.partition(":")
    if not sep or scheme not in schemes:
        raise XlCfgError(f"export {value!r}{where}: expected "
                         f"{' or '.join(f'{s}:<unix socket path>' for s in schemes)} ({why})")
    if not path:
        raise XlCfgError(f"export {value!r}{where}: the socket path after '{scheme}:' is empty")
    if path.startswith("/") and len(path.encode("utf-8", "surrogatepass")) > MAX_UNIX_PATH:
        raise XlCfgError(f"export socket path {path!r} is longer than {MAX_UNIX_PATH} bytes, "
                         f"the limit of a unix socket address")
    return scheme, path

