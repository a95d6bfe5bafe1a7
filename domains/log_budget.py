"""How often a peer's bad input is logged: the first few one by one, then every thousandth.

A hostile peer decides how often it misbehaves; a line for each would let
it fill the other side's log (blkback's for a frontend's refused
requests, blkfront's for a backend's forged responses).  The count in each
line says how many there were in between.
"""

from __future__ import annotations

LOGGED_FIRST = 20          # logged one by one; after these, every EVERY-th
EVERY = 1000


def worth_logging(count: int) -> bool:
    """Whether the ``count``-th occurrence (from 1) of a peer's bad input gets a log line."""
    return count <= LOGGED_FIRST or count % EVERY == 0
