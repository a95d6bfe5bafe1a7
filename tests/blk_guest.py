"""A test's blkback server, and guest domains with one disk of their own on it (image, vbd nodes, Blkfront)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from test_blk_matrix import call
from xs_fixtures import introduce

from xdom.backends.blkback.server import BlkbackServer
from xdom.deploy.vbd import VbdConfig, add_vbd
from xdom.domains.blkfront.device import Blkfront, FrontendOptions
from xdom.domains.xenstore import XenstoreClient

MiB = 1 << 20


@contextmanager
def running_blkback(domains, xenstored, **options: Any) -> Iterator[tuple[BlkbackServer, Any]]:
    """A BlkbackServer (``options``: its keyword arguments) on a domain of its own: (server, its domain)."""
    be = domains.create("blk", "1M")
    xs = XenstoreClient.unix(xenstored.socket_path)
    srv = BlkbackServer(be, xs, **options)
    srv.start()
    try:
        yield srv, be
    finally:
        srv.close()
        xs.close()


class BlkGuest:
    """``name``'s disk ``xvda``: ``size`` bytes seeded from its name, persistent grants and indirect segments."""

    def __init__(self, domains, socket_path: str, be, run_dir: str, name: str, size: int = 8 * MiB) -> None:
        self.xs = XenstoreClient.unix(socket_path)
        self.host = domains.create(name, "16M")
        self.image = os.path.join(run_dir, f"{name}.img")
        with open(self.image, "wb") as f:
            f.write(random.Random(name).randbytes(size))
        introduce(self.xs, be.domid, self.host.domid)
        add_vbd(self.xs, VbdConfig(be.domid, self.host.domid, 51712, "xvda", self.image))
        self.front = Blkfront(self.host, self.xs, 51712, FrontendOptions(persistent=True, indirect=True))
        self.front.connect(20)

    def read(self, offset: int, length: int) -> bytes:
        err, data = call(self.front.submit_read, offset, length)
        assert err == 0
        return data

    def close(self) -> None:
        self.front.close()
        self.xs.close()
