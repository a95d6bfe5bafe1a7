"""xen/include/public/event_channel.h and xen.h: VIRQs and port status codes."""

from __future__ import annotations

from typing import Final

DOMID_SELF: Final = 0x7FF0
DOMID_FIRST_RESERVED: Final = 0x7FF0

# EVTCHNSTAT_* (evtchn_status_t.status)
EVTCHNSTAT_closed: Final = 0
EVTCHNSTAT_unbound: Final = 1
EVTCHNSTAT_interdomain: Final = 2
EVTCHNSTAT_pirq: Final = 3
EVTCHNSTAT_virq: Final = 4
EVTCHNSTAT_ipi: Final = 5

# enum virq (xen.h)
VIRQ_TIMER: Final = 0
VIRQ_DEBUG: Final = 1
VIRQ_CONSOLE: Final = 2
VIRQ_DOM_EXC: Final = 3
VIRQ_TBUF: Final = 4
VIRQ_DEBUGGER: Final = 6
VIRQ_XENOPROF: Final = 7
VIRQ_CON_RING: Final = 8
VIRQ_PCPU_STATE: Final = 9
VIRQ_MEM_EVENT: Final = 10
VIRQ_ARGO: Final = 11
VIRQ_ENOMEM: Final = 12
VIRQ_XENPMU: Final = 13
NR_VIRQS: Final = 24

# Global VIRQs are delivered to one bound domain on the host; the rest are
# per-domain.  Only the global ones the broker can raise are listed.
GLOBAL_VIRQS: Final = frozenset({VIRQ_DOM_EXC, VIRQ_CON_RING, VIRQ_ENOMEM})
