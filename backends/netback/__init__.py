"""netback: the network driver domain (Linux xen-netback's protocol).

:mod:`.tx` and :mod:`.rx` are the sans-IO core: what to do with the
frontend's TX slots and how to place a packet into its RX slots, with no
grant, socket or thread in sight.  The I/O around them comes later.
"""

from .rx import OutgoingPacket, RxCopy, RxDecision, RxDrop, RxPlan, RxPlanner, RxShortage
from .tx import Checksum, TxAction, TxDrop, TxFatal, TxMulticast, TxPacket, TxPiece, TxProcessor

__all__ = [
    "Checksum", "OutgoingPacket", "RxCopy", "RxDecision", "RxDrop", "RxPlan", "RxPlanner", "RxShortage",
    "TxAction", "TxDrop", "TxFatal", "TxMulticast", "TxPacket", "TxPiece", "TxProcessor",
]
