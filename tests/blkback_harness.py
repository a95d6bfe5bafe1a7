"""The rig the hostile blkback tests run in (tests/test_blkback_hostile_*.py).

Every test runs its own xenstored, an in-process hypervisor with a backend
domain serving a :class:`BlkbackServer`, a *hostile* frontend domain whose
device is driven by hand (hostile_vbd.py), and a *good* frontend domain
whose device is driven by our own :class:`Blkfront`; a log handler records
whatever crashed.  :func:`finish` is what every test checks at its end.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from helpers import wait_until
from hostile_vbd import WAIT, Hostile
from xs_fixtures import introduce, start_xenstored

from xdom.backends.blkback.server import BlkbackServer
from xdom.deploy.vbd import VbdConfig, add_vbd
from xdom.domains.blkfront.device import Blkfront, FrontendOptions
from xdom.domains.xenbus import XenbusState, read_state
from xdom.domains.xenhost import LocalHypervisor
from xdom.domains.xenstore import XenstoreClient

GOOD_DEVID = 51728           # xvdb of the good guest
GOOD_IMAGE = 2 << 20


class CrashLog(logging.Handler):
    """Records what only a crash logs: a traceback (log.exception) or a failed watch callback."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or "watch callback failed" in record.getMessage():
            self.records.append(record)

    def summary(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}: {r.exc_info[1]!r}" if r.exc_info else r.getMessage()
                for r in self.records]


def blkback_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("blkback-")]


def served_rings(server: BlkbackServer, domid: int) -> list[str]:
    """The rings of ``domid``'s vbds that blkback's loops serve, by name (``vbd<domid>.<devid>q<queue>``)."""
    return [r.name for lp in server.loops.loops if lp.alive for r in list(lp.rings)
            if r.name.startswith(f"vbd{domid}.")]


# ---- the good device ---------------------------------------------------------------------------

class GoodDevice:
    """Our well-behaved Blkfront on its own domain; :meth:`check` writes, reads back and compares."""

    def __init__(self, env: Env, options: FrontendOptions) -> None:
        self.env = env
        self.host = env.hv.create_domain("good", "8M")
        env.hosts.append(self.host)
        self.image = env.make_image("good.img", GOOD_IMAGE)
        introduce(env.xs, env.be.domid, self.host.domid)
        add_vbd(env.xs, VbdConfig(env.be.domid, self.host.domid, GOOD_DEVID, "xvdb", self.image))
        self.front = Blkfront(self.host, env.client(), GOOD_DEVID, options)
        self.front.connect(WAIT)
        self.rng = random.Random(1)
        self.lock = threading.Lock()
        self.rounds = 0
        self.closed = False

    def _sync(self, fn, *args):
        ev = threading.Event()
        res: list = []

        def done(err, data=None):
            res.append((err, b"".join(bytes(d) for d in data) if data is not None else None))
            ev.set()
        fn(*args, done)
        assert ev.wait(WAIT), f"good device: {fn.__name__} did not complete"
        return res[0]

    def check(self) -> None:
        """One write/read-back round through the backend, checked against the image file too."""
        with self.lock:
            length = self.rng.choice([512, 4096, 12288, 65536])
            offset = self.rng.randrange(0, (GOOD_IMAGE - length) // 512) * 512
            data = self.rng.randbytes(length)
            err, _ = self._sync(self.front.submit_write, offset, memoryview(data), False)
            assert err == 0, f"good device: write failed with {err}"
            err, got = self._sync(self.front.submit_read, offset, length)
            assert err == 0 and got == data, "good device: read back differs"
            with open(self.image, "rb") as f:
                f.seek(offset)
                assert f.read(length) == data, "good device: image file differs"
            self.rounds += 1

    def ring_served(self) -> bool:
        assert self.env.server is not None
        return f"vbd{self.host.domid}.{GOOD_DEVID}q0" in served_rings(self.env.server, self.host.domid)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.front.close()

# ---- the rig -----------------------------------------------------------------------------------

class Env:
    def __init__(self, run_dir: str, good_persistent: bool = True) -> None:
        self.run_dir = run_dir
        self.xenstored = start_xenstored(run_dir)
        self.clients: list[XenstoreClient] = []
        self.hosts: list = []
        self.dead: list = []              # domains a test already destroyed
        self.server: BlkbackServer | None = None
        self.good: GoodDevice | None = None
        self.crashes = CrashLog()
        logging.getLogger("xdom").addHandler(self.crashes)
        self.hv = LocalHypervisor()
        try:
            self.be = self.hv.create_domain("blk", "1M")
            self.hosts.append(self.be)
            self.xs = self.client()
            self.server = BlkbackServer(self.be, self.client())
            self.server.start()
            self.good = GoodDevice(self, FrontendOptions(persistent=good_persistent))
            self.good.check()
        except BaseException:
            self._release()
            raise

    def client(self) -> XenstoreClient:
        c = XenstoreClient.unix(self.xenstored.socket_path)
        self.clients.append(c)
        return c

    def make_image(self, name: str, size: int) -> str:
        path = os.path.join(self.run_dir, name)
        with open(path, "wb") as f:
            f.write(random.Random(name).randbytes(size))
        return path

    def hostile(self, **kw) -> Hostile:
        return Hostile(self, **kw)

    @contextmanager
    def good_load(self) -> Iterator[None]:
        """The good device doing I/O on a thread for the duration (at least one round inside)."""
        stop = threading.Event()
        errors: list[BaseException] = []
        started = self.good.rounds

        def run() -> None:
            while not stop.wait(0.001):          # pacing only: leave the GIL to the backend's threads
                try:
                    self.good.check()
                except BaseException as e:      # reported by the main thread
                    errors.append(e)
                    return
        t = threading.Thread(target=run, name="good-load", daemon=True)
        t.start()
        try:
            yield
            wait_until(lambda: self.good.rounds > started or errors, WAIT, "a good round during the abuse")
        finally:
            stop.set()
            t.join(WAIT)
        assert not t.is_alive(), "good device load is stuck"
        assert not errors, f"good device failed during the abuse: {errors[0]!r}"

    def after(self) -> None:
        """What every test checks at its end: the server is sane and the good device still works."""
        assert not self.crashes.records, f"something crashed: {self.crashes.summary()}"
        assert self.good.ring_served(), "blkback no longer serves the good device's ring"
        for _ in range(3):
            self.good.check()
        stats = self.server.vbds[(self.good.host.domid, GOOD_DEVID)].stats()
        assert stats["requests"] >= 6 and stats["errors"] == 0, stats
        assert stats["batches"] <= stats["requests"]

    def close(self) -> None:
        try:
            if self.good is not None:
                self.good.close()
            if self.server is not None:
                self.server.close()
            leaked = [t.name for t in blkback_threads()]
            assert not leaked, f"blkback threads left after close: {leaked}"
        finally:
            self._release()

    def _release(self) -> None:
        try:
            if self.good is not None:
                self.good.close()
            if self.server is not None:
                self.server.close()
            for c in self.clients:
                c.close()
            for h in reversed(self.hosts):
                if h not in self.dead:
                    h.close()
            self.hv.close()
            # In-process domains keep their memory mapped (a frame per mapping);
            # give it back, or a worker runs out of vm.max_map_count after a few tests.
            for h in self.hosts:
                h.memory.close()
        finally:
            logging.getLogger("xdom").removeHandler(self.crashes)
            self.xenstored.stop()


def hostile_env(request: pytest.FixtureRequest, run_dir: str) -> Iterator[Env]:
    """What each hostile test module's ``env`` fixture yields (its params, if indirect, are Env's keywords)."""
    e = Env(run_dir, **getattr(request, "param", {}))
    try:
        yield e
    finally:
        e.close()


def finish(env: Env, h: Hostile, closed_by_backend: bool = False) -> None:
    """End of a test: the hostile device answered (or was closed), the server and good device are fine."""
    if closed_by_backend:
        if read_state(h.xs, h.path) == XenbusState.Connected:
            # The frontend still says Connected, so nothing makes the backend try
            # again: closing the device has unmapped everything, even the ring.
            assert h.backend_state() == XenbusState.Closing
        else:
            # A frontend left in Initialised gets another connection attempt for
            # every event of its state node (the watch's first firing included),
            # as with Linux's frontend_changed(): the device may go Closing more
            # than once.  Once the frontend is Closed, the backend is settled.
            h.close()
        assert env.server.vbds[(h.host.domid, h.devid)].rings == []
        assert not served_rings(env.server, h.host.domid)
        h.assert_grants_released()
    else:
        assert h.backend_state() == XenbusState.Connected
        h.sentinel()
        stats = env.server.vbds[(h.host.domid, h.devid)].stats()
        assert stats["requests"] == h.sent, (stats, h.sent)
    env.after()
    h.close()

