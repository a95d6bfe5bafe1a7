"""A backend's loop thread: one epoll set, owned by one thread, which other threads hand work to.

netback moves every vif's frames and blkback serves its rings on such
threads (``netback/loop.py``, ``blkback/ring_loop.py``).  Whatever the loop
serves is touched by the loop thread only; xenbus threads add and remove
things with :meth:`LoopThread.call`, run on the loop between two passes
and waited for, so a loop never sees a half-built or half-released
connection.
"""

from __future__ import annotations

import os
import queue
import select
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class LoopThread(ABC):
    """Subclasses set up their own state, then :meth:`_start`; their ``_run`` waits with :meth:`_wait`,
    runs :meth:`_run_calls` after it, and returns once ``_stopping`` is set."""

    def __init__(self, name: str) -> None:
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._calls: queue.SimpleQueue[tuple[Callable[[], object], threading.Event, list[object]]] = \
            queue.SimpleQueue()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _start(self) -> None:
        self._thread.start()

    @abstractmethod
    def _run(self) -> None:
        """The loop itself, on the thread."""

    # ---- from other threads -------------------------------------------------------------

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the loop thread and return its result (or raise its exception)."""
        if threading.current_thread() is self._thread:
            return fn()
        if not self._thread.is_alive():
            raise RuntimeError(f"{self._thread.name} has stopped")
        done = threading.Event()
        box: list[object] = []
        self._calls.put((fn, done, box))
        os.eventfd_write(self._wake, 1)
        while not done.wait(1.0):
            if not self._thread.is_alive():
                raise RuntimeError(f"{self._thread.name} stopped")
        if box and isinstance(box[0], BaseException):
            raise box[0]
        return box[0] if box else None     # type: ignore[return-value]

    def post(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the loop thread soon, without waiting for it (nothing, once the loop stopped)."""
        self._calls.put((fn, threading.Event(), []))
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop the thread; what it still serves is its owners' to release.  Idempotent."""
        if self._thread.is_alive():
            self._stopping = True
            os.eventfd_write(self._wake, 1)
            self._thread.join()
        if self._wake >= 0:
            self._epoll.close()
            os.close(self._wake)
            self._wake = -1

    # ---- on the loop thread -------------------------------------------------------------

    def _on_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def _wait(self, timeout: float) -> list[int]:
        """The descriptors that became ready within ``timeout`` seconds (-1: until one does); a wake-up
        from another thread is consumed here, not returned."""
        try:
            events = self._epoll.poll(timeout)
        except InterruptedError:
            return []
        ready = []
        for fd, _ in events:
            if fd != self._wake:
                ready.append(fd)
                continue
            try:
                os.eventfd_read(self._wake)
            except BlockingIOError:
                pass
        return ready

    def _run_calls(self) -> None:
        while True:
            try:
                fn, done, box = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                box.append(fn())
            except BaseException as e:
                box.append(e)
            done.set()
