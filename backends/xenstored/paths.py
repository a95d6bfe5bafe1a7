"""Xenstore path syntax: validation, canonical form, parents and watch matching.

Rules (docs/misc/xenstore.txt, tools/xenstore/xenstored_core.c of Xen 4.17):

* A node path is absolute, made of ``[A-Za-z0-9-/_@]``, without ``//`` and
  without a trailing ``/`` (the root ``/`` excepted).
* A path that does not start with ``/`` (or ``@``) is relative to the
  connection's home, ``/local/domain/<domid>``; unix-socket clients are
  domain 0, so theirs is ``/local/domain/0`` as in C.
* Length: C measures ``path-max`` (XENSTORE_REL_PATH_MAX, 2048) *after* a
  leading ``/local/domain/<up to 5 digits>/``, and from the start otherwise.
* ``@`` names (``@introduceDomain``, ``@releaseDomain``) are watch-only
  pseudo paths of any syntax up to 2048 bytes.

Paths travel as ``str`` decoded from latin-1, so any byte string round-trips.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final

from xdom.domains.abi.xs_wire import XENSTORE_REL_PATH_MAX

ROOT: Final = "/"
SPECIAL_PREFIX: Final = "@"
INTRODUCE_DOMAIN: Final = "@introduceDomain"
RELEASE_DOMAIN: Final = "@releaseDomain"
SPECIAL_WATCH_PATH_MAX: Final = XENSTORE_REL_PATH_MAX

_VALID_CHARS = re.compile(r"[A-Za-z0-9\-/_@]*")
# sscanf(node, "/local/domain/%5u/%n"): %5u reads at most five characters,
# an optional sign included; '+' is no valid path character anyway.
_LOCAL_DOMAIN_PREFIX = re.compile(r"/local/domain/(?:-\d{1,4}|\d{1,5})/")


def decode(raw: bytes) -> str:
    """Wire bytes to a path string; latin-1 keeps every byte, so nothing can fail."""
    return raw.decode("latin-1")


def encode(path: str) -> bytes:
    return path.encode("latin-1")


def domain_path(domid: int) -> str:
    """A domain's home, the base of its relative paths (``get_implicit_path``)."""
    return f"/local/domain/{domid}"


def is_special(path: str) -> bool:
    return path.startswith(SPECIAL_PREFIX)


def canonicalize(path: str, home: str) -> str:
    """Absolute and ``@`` paths stay; anything else is relative to ``home``."""
    if path.startswith(ROOT) or path.startswith(SPECIAL_PREFIX):
        return path
    return f"{home}/{path}"


def is_valid_node_path(path: str, path_max: int = XENSTORE_REL_PATH_MAX) -> bool:
    """C's ``is_valid_nodename`` on an already canonical path."""
    if not path.startswith(ROOT):
        return False
    if path.endswith(ROOT) and path != ROOT:
        return False
    if "//" in path:
        return False
    m = _LOCAL_DOMAIN_PREFIX.match(path)
    local_off = m.end() if m else 0
    if len(path) > local_off + path_max:
        return False
    return _VALID_CHARS.fullmatch(path) is not None


def parent_of(path: str) -> str:
    """The parent of a valid node path other than the root."""
    cut = path.rfind("/")
    return path[:cut] if cut > 0 else ROOT


def basename(path: str) -> str:
    return path[path.rfind("/") + 1:]


def child_path(parent: str, name: str) -> str:
    return f"/{name}" if parent == ROOT else f"{parent}/{name}"


def ancestors_and_self(path: str) -> Iterator[str]:
    """``/``, then each ancestor down to ``path`` itself: the watch paths an event on ``path`` matches."""
    yield ROOT
    if path == ROOT:
        return
    end = path.find("/", 1)
    while end != -1:
        yield path[:end]
        end = path.find("/", end + 1)
    yield path


def is_child(child: str, parent: str) -> bool:
    """True if ``child`` is ``parent`` or below it; everything is below ``/``."""
    if parent == ROOT:
        return True
    if not child.startswith(parent):
        return False
    return len(child) == len(parent) or child[len(parent)] == "/"


def watch_display_path(event_path: str, relative_base: str | None) -> str:
    """The path a watch event reports: relative iff the watch was set with a relative path."""
    if relative_base is None:
        return event_path
    shown = event_path[len(relative_base):]
    return shown[1:] if shown.startswith("/") else shown
