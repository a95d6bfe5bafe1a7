"""A self-pipe that wakes an event loop from a signal handler or another thread."""

from __future__ import annotations

import os


class WakePipe:
    """``wake()`` is async-signal-safe; the loop polls ``fileno()`` and calls ``drain()``."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._r

    def wake(self) -> None:
        try:
            os.write(self._w, b"x")
        except OSError:       # full (already awake) or closed (loop gone)
            pass

    def drain(self) -> None:
        while True:
            try:
                if not os.read(self._r, 512):
                    return
            except BlockingIOError:
                return

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
