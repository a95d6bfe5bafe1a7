"""xen/include/public/hvm/params.h: the parameters a toolstack sets for a domain.

xdom uses the two a domain needs to find xenstore: the frame of its
xenstore ring and the event channel to xenstored.
"""

from __future__ import annotations

from typing import Final

HVM_PARAM_STORE_PFN: Final = 1
HVM_PARAM_STORE_EVTCHN: Final = 2
HVM_PARAM_CONSOLE_PFN: Final = 17
HVM_NR_PARAMS: Final = 39
