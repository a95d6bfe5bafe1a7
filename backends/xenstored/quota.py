"""Quotas: how much of xenstored one unprivileged domain may use.

Rules (Xen 4.17 ``xenstored_core.c`` defaults, ``xenstored_control.c`` names):

* Only unprivileged domains are limited; domain 0 is exempt everywhere.
* Node counts and node memory follow *ownership* (the first permission entry),
  not the connection that wrote the node.
* The checks keep C's exact comparisons, off-by-ones included: a domain may
  hold ``watches + 1`` watches and ``transactions + 1`` open transactions,
  because C compares the count *before* adding with ``>``.
* Errors are C's: ENOSPC for nodes, node size, permissions, transactions and
  transaction nodes; E2BIG for watches; ENOMEM for the memory quota.
* ``outstanding`` is enforced by the I/O shell (it stops reading a ring with
  that many replies unread); the core only carries the number.
* ``event_backlog_bytes`` is xdom's own bound on watch events queued for one
  connection between two ``take_output`` calls (C bounds them through the
  domain's memory quota and a 20 s timeout instead).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final

# sizeof(struct xs_tdb_record_hdr) and sizeof(struct xs_permissions): a node's
# accounted size is header + 8 bytes per permission + value + children names.
RECORD_HEADER_SIZE: Final = 24
PERMISSION_SIZE: Final = 8


@dataclass(frozen=True, slots=True)
class Quota:
    nodes: int = 1000                  # nodes owned per domain
    watches: int = 128                 # watches per domain
    transactions: int = 10             # open transactions per connection
    transaction_nodes: int = 1024      # nodes one transaction may touch
    node_size: int = 2048              # accounted record size of one node (must stay below)
    path_max: int = 2048               # path length below /local/domain/<domid>/
    permissions: int = 5               # permission entries per node
    outstanding: int = 20              # requests awaiting a reply, per domain (shell-enforced)
    memory: int = 2 * 1024 * 1024 + 512 * 1024          # hard memory quota per domain (bytes)
    memory_soft: int = 2 * 1024 * 1024                  # warning level only
    event_backlog_bytes: int = 4 * 1024 * 1024         # watch events queued per connection

    # C's `xenstore-control quota` names and descriptions, in its order.
    @staticmethod
    def control_table() -> tuple[tuple[str, str, str], ...]:
        return (
            ("nodes", "nodes", "Nodes per domain"),
            ("watches", "watches", "Watches per domain"),
            ("transactions", "transactions", "Transactions per domain"),
            ("outstanding", "outstanding", "Outstanding requests per domain"),
            ("transaction-nodes", "transaction_nodes", "Max. number of accessed nodes per transaction"),
            ("memory", "memory", "Total Xenstore memory per domain (error level)"),
            ("node-size", "node_size", "Max. size of a node"),
            ("path-max", "path_max", "Max. length of a node path"),
            ("permissions", "permissions", "Max. number of permissions per node"),
        )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"quota {f.name} must be a positive integer, not {value!r}")


def record_size(n_perms: int, value_len: int, children_len: int) -> int:
    """The size C checks against ``node_size`` (``write_node_raw``)."""
    return RECORD_HEADER_SIZE + PERMISSION_SIZE * n_perms + value_len + children_len
