"""Moved to :mod:`xdom.domains.blockdev` (issue 16: the block-device interface sits below both the frontends and the exports).

Transitional: blkfront imports ``completion_batch`` from here while its
xenbus rework is in flight.  Delete this file once it imports
``..blockdev``; nothing new may import it (tests/test_layers.py).
"""

from ..blockdev import completion_batch

__all__ = ["completion_batch"]
