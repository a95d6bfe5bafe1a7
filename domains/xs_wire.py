"""Moved to :mod:`xdom.domains.abi.xs_wire` (issue 16: the Xen ABI and wire formats in one package).

Transitional: the two names blkfront and netfront import from here while
their xenbus rework is in flight.  Delete this file once they import
``..abi.xs_wire``; nothing new may import it (tests/test_layers.py).
"""

from .abi.xs_wire import XenstoreError, XsType

__all__ = ["XenstoreError", "XsType"]
