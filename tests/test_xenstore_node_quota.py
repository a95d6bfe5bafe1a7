"""xenstored's node and watch quotas sized by the toolstack: a driver domain serving many devices is not stopped by
C's default of 1000 nodes (it stopped blkback at its 36th disk with ENOSPC, and the 36th guest's disk never
connected)."""

from __future__ import annotations

import os
import subprocess
import sys

from xdom.backends.xenstored.quota import Quota
from xdom.backends.xenstored.server import XenstoredServer
from xdom.deploy.host_limits import (
    DEFAULT_NODE_QUOTA,
    DEFAULT_WATCH_QUOTA,
    NODES_PER_DEVICE,
    xenstore_node_quota,
    xenstore_watch_quota,
)
from xdom.deploy.topology_parse import parse_topology


def topology_with(guests: int) -> dict:
    doms = [{"name": "xs", "kind": "xenstored"}, {"name": "blk0", "kind": "blkback"},
            {"name": "net0", "kind": "netback"}]
    for i in range(1, guests + 1):
        doms.append({"name": f"g{i}", "kind": "guest", "memory": "4M",
                     "disk": [f"format=raw, vdev=xvda, access=ro, backend=blk0, target=/tmp/g{i}.img"],
                     "vif": [f"mac=00:16:3e:02:00:{i:02x}, backend=net0"]})
    return {"domain": doms}


def test_the_quota_fits_the_busiest_backend_twice_over() -> None:
    assert xenstore_node_quota(parse_topology(topology_with(2))) == DEFAULT_NODE_QUOTA
    for n in (36, 100):
        quota = xenstore_node_quota(parse_topology(topology_with(n)))
        assert quota >= 2 * NODES_PER_DEVICE * n > DEFAULT_NODE_QUOTA // 2
        assert quota > 28 * n * 2            # blkback's 28 nodes a disk, for as many disks again hot-attached
        assert xenstore_watch_quota(parse_topology(topology_with(n))) >= 2 * 2 * n   # two watches a device
    assert xenstore_watch_quota(parse_topology(topology_with(2))) == DEFAULT_WATCH_QUOTA


def test_xenstored_keeps_its_command_line_quota_across_a_restart(tmp_path: object) -> None:
    state = os.path.join(str(tmp_path), "state")
    os.makedirs(state)
    first = XenstoredServer(None, state, quota=Quota(nodes=5000, watches=300))
    try:
        assert (first.core.quota.nodes, first.core.quota.watches) == (5000, 300)
    finally:
        first.close()
    again = XenstoredServer(None, state, quota=Quota(nodes=5000, watches=300))   # restored from its state
    try:
        assert (again.core.quota.nodes, again.core.quota.watches) == (5000, 300)
    finally:
        again.close()
    assert XenstoredServer(None, None).core.quota.nodes == DEFAULT_NODE_QUOTA


def test_the_cli_takes_c_xenstoreds_entry_nb() -> None:
    res = subprocess.run([sys.executable, "-m", "xdom.deploy.cli", "xenstored", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert "--entry-nb" in res.stdout and "-E" in res.stdout and "--watch-nb" in res.stdout
