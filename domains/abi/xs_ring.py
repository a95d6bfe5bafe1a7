"""One direction of a xenstore ring: 1024 bytes, free-running u32 indices.

The same code serves both ends (xenstored reads requests and writes
responses; a domain writes requests and reads responses).  The peer can
write the indices at any time, so each is read once and ``prod - cons`` is
checked against the ring size before any byte is touched.
"""

from __future__ import annotations

from .xs_wire import XENSTORE_RING_SIZE


def _get(page: memoryview, off: int) -> int:
    """A shared u32 index, read with one aligned load (struct's byte-wise unpacking could tear)."""
    return page[off:off + 4].cast("I")[0]


def _put(page: memoryview, off: int, value: int) -> None:
    """A shared u32 index, written with one aligned store (``struct.pack_into`` zeroes it first)."""
    page[off:off + 4].cast("I")[0] = value


_MASK = XENSTORE_RING_SIZE - 1


class RingIndexError(Exception):
    """The peer published impossible ring indices."""


def ring_peek(page: memoryview, ring: int, cons: int, prod_off: int) -> tuple[bytes, int]:
    """Bytes available from position ``cons`` on, and the position after them.

    ``cons`` is the caller's own cursor: the shared consumer index is left
    alone, so a reader can hand data on (and persist what it did) before it
    tells the producer the space is free.
    """
    prod = _get(page, prod_off)
    avail = (prod - cons) & 0xFFFFFFFF
    if avail > XENSTORE_RING_SIZE:
        raise RingIndexError(f"cons {cons} prod {prod}")
    if not avail:
        return b"", cons
    start = cons & _MASK
    first = min(avail, XENSTORE_RING_SIZE - start)
    data = bytes(page[ring + start:ring + start + first])
    if avail > first:
        data += bytes(page[ring:ring + avail - first])
    return data, (cons + avail) & 0xFFFFFFFF


def ring_read(page: memoryview, ring: int, cons_off: int, prod_off: int) -> bytes:
    """Consume everything available in the ring at offset ``ring``."""
    cons = _get(page, cons_off)
    data, new = ring_peek(page, ring, cons, prod_off)
    if data:
        _put(page, cons_off, new)
    return data


def ring_write(page: memoryview, ring: int, cons_off: int, prod_off: int, data: bytes | memoryview) -> int:
    """Produce as much of ``data`` as fits; returns how many bytes went in."""
    cons = _get(page, cons_off)
    prod = _get(page, prod_off)
    used = (prod - cons) & 0xFFFFFFFF
    if used > XENSTORE_RING_SIZE:
        raise RingIndexError(f"cons {cons} prod {prod}")
    n = min(len(data), XENSTORE_RING_SIZE - used)
    if not n:
        return 0
    start = prod & _MASK
    first = min(n, XENSTORE_RING_SIZE - start)
    page[ring + start:ring + start + first] = data[:first]
    if n > first:
        page[ring:ring + n - first] = data[first:n]
    # bytes before the index: x86 keeps stores in order, and CPython does not reorder them
    _put(page, prod_off, (prod + n) & 0xFFFFFFFF)
    return n
