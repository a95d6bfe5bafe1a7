"""Moved to :mod:`xdom.domains.hostsys.wakeup` (issue 16: the host system-call wrappers in one package).

Transitional: deploy/supervision.py imports it from here while the
supervisor split is in flight.  Delete this file once it imports
``xdom.domains.hostsys.wakeup``; nothing new may import it (tests/test_layers.py).
"""

from .hostsys.wakeup import WakePipe

__all__ = ["WakePipe"]
