"""Node permissions: the ``n``/``r``/``w``/``b`` strings and who gets what.

Rules (docs/misc/xenstore.txt, ``perm_for_conn`` and ``xs_strings_to_perms``
in Xen 4.17):

* A node has one or more entries.  The first names the owner, and its access
  letter is what every domain *not listed* gets.  The owner itself always
  gets read, write and ownership.
* Privileged domains (domain 0) get everything; so does a domain over nodes
  owned by its SET_TARGET target, and it also inherits the target's entries.
* The first matching later entry decides; entries marked *ignored* (they name
  a domain that no longer exists, or one newer than the node) never match.
  That keeps a recycled domid from inheriting a dead domain's rights.
* A domid is parsed as C's ``strtol(s, &end, 0)`` (decimal, ``0x`` hex,
  ``0`` octal, optional sign), stored as a u32, printed as a signed int.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from xdom.domains.abi.xs_wire import XenstoreError


class Access(enum.IntFlag):
    NONE = 0x00
    READ = 0x01
    WRITE = 0x02
    OWNER = 0x08     # only ever computed, never stored


ALL_ACCESS: Final = Access.READ | Access.WRITE | Access.OWNER

_LETTER_TO_ACCESS: Final = {"n": Access.NONE, "r": Access.READ, "w": Access.WRITE, "b": Access.READ | Access.WRITE}
_ACCESS_TO_LETTER: Final = {v: k for k, v in _LETTER_TO_ACCESS.items()}

_LONG_MAX: Final = (1 << 63) - 1
_STRTOL_BASE0 = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


@dataclass(frozen=True, slots=True)
class Perm:
    """One permission entry: a domain and what it may do (READ/WRITE bits)."""

    domid: int
    access: Access
    ignored: bool = False

    def to_string(self) -> str:
        signed = self.domid - (1 << 32) if self.domid >= 1 << 31 else self.domid
        return f"{_ACCESS_TO_LETTER[self.access]}{signed}"


Perms = tuple[Perm, ...]
DEFAULT_PERMS: Final[Perms] = (Perm(0, Access.NONE),)


def _strtol_u32(text: str) -> int | None:
    """C ``strtol(text, &end, 0)`` requiring ``*end == 0``, truncated to u32 like C's assignment."""
    m = _STRTOL_BASE0.fullmatch(text)
    if m is None:
        return None
    sign, digits = m.groups()
    value = int(digits, 0) if digits[:2].lower() == "0x" else int(digits, 8 if digits.startswith("0") else 10)
    value = min(value, _LONG_MAX + (1 if sign == "-" else 0))
    if sign == "-":
        value = -value
    return value & 0xFFFFFFFF


def parse_perm(text: str) -> Perm:
    """One ``<letter><domid>`` string; EINVAL for anything C's parser refuses."""
    access = _LETTER_TO_ACCESS.get(text[:1])
    domid = _strtol_u32(text[1:]) if access is not None and len(text) > 1 else None
    if access is None or domid is None:
        raise XenstoreError("EINVAL", f"bad permission {text!r}")
    return Perm(domid, access)


def parse_perms(texts: Sequence[str]) -> Perms:
    return tuple(parse_perm(t) for t in texts)


def format_perms(perms: Perms) -> bytes:
    """GET_PERMS reply: each entry NUL-terminated; ignored entries still show."""
    return b"".join(p.to_string().encode() + b"\0" for p in perms)


@dataclass(frozen=True, slots=True)
class Accessor:
    """Who is asking: a connection's domain, whether it is privileged, and its SET_TARGET target."""

    domid: int
    privileged: bool
    target: int | None = None


def access_for(who: Accessor, perms: Perms) -> Access:
    """What ``who`` may do with a node carrying ``perms`` (C's ``perm_for_conn``)."""
    owner = perms[0].domid
    if who.privileged or owner == who.domid or (who.target is not None and owner == who.target):
        return ALL_ACCESS
    for entry in perms[1:]:
        if not entry.ignored and (entry.domid == who.domid or
                                  (who.target is not None and entry.domid == who.target)):
            return entry.access
    return perms[0].access


def without_domain(perms: Perms, domid: int, replacement_owner: int = 0) -> Perms:
    """Forget a destroyed domain: it loses ownership to domain 0 and its entries go."""
    owner = perms[0]
    if owner.domid == domid:
        owner = Perm(replacement_owner, owner.access, owner.ignored)
    return (owner,) + tuple(p for p in perms[1:] if p.domid != domid)
