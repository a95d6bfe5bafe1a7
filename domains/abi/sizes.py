"""Sizes as xl.cfg writes them: ``memory = 32`` is MiB, ``"256K"``, ``"32M"``, ``"1G"`` carry units.

Rules:

* One parser for every reader of these strings: the topology (memory,
  limits), the broker's management API and the in-process xenhost.  A
  size is hostile input at the management socket: bounded digits, no
  booleans, no floats.
* Pure: no I/O, nothing of xdom but the page size.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping

from .grant_table import PAGE_SIZE

__all__ = ["described_type", "memory_frames", "parse_size"]

_SIZE_RE = re.compile(r"\s*([0-9]+)\s*([KMG]i?B?)?\s*", re.ASCII | re.IGNORECASE)


def described_type(value: object) -> str:
    """What ``value`` is, with its article, for messages about values read from TOML or msgpack."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, (datetime.date, datetime.time)):
        return "a date/time"
    return f"a {type(value).__name__}"


def parse_size(value: object, what: str = "memory") -> int:
    """A size in bytes: an integer is MiB, a string is a number with an optional K, M or G
    (binary units; ``KiB`` and ``MB`` spellings too).

    Raises ValueError saying what was expected.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{what} must be an integer (MiB) or a string like '256K', '32M' or '1G', not {described_type(value)}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{what} must be positive, not {value}")
        return value << 20
    m = _SIZE_RE.fullmatch(value)
    if not m or len(m.group(1)) > 15:
        raise ValueError(f"{what} {value!r:.40} is not a size like 32 (MiB), '256K', '32M' or '1G'")
    nbytes = int(m.group(1)) << {"K": 10, "M": 20, "G": 30}[(m.group(2) or "M")[0].upper()]
    if nbytes <= 0:
        raise ValueError(f"{what} {value!r} must be positive")
    return nbytes


def memory_frames(value: object, what: str = "memory") -> int:
    """A domain's memory as a number of 4 KiB frames (:func:`parse_size`, then a whole number of pages)."""
    nbytes = parse_size(value, what)
    if nbytes % PAGE_SIZE:
        raise ValueError(f"{what} {value!r:.40} is not a multiple of 4 KiB")
    return nbytes // PAGE_SIZE
