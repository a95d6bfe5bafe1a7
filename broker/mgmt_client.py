"""A client of the broker's management API (ZeroMQ DEALER + SUB); the request convention is :mod:`.rpc`'s."""

from __future__ import annotations

import os
from typing import Any

import msgpack
import zmq

from .rpc import encode, reply_of


class ManagementError(Exception):
    def __init__(self, errno_name: str, message: str) -> None:
        super().__init__(f"{errno_name}: {message}")
        self.errno_name = errno_name
        self.message = message


def endpoint_for(run_dir: str) -> str:
    return f"ipc://{os.path.join(run_dir, 'mgmt.sock')}"


def events_endpoint_for(run_dir: str) -> str:
    return f"ipc://{os.path.join(run_dir, 'events.sock')}"


class RequestClient:
    """Synchronous msgpack requests to a ZeroMQ ROUTER (the broker's management
    API, the supervisor's control channel); TimeoutError after ``timeout`` s.

    Subclasses name the peer and the error type an error reply raises.
    """

    peer = "the broker"
    error: type[Exception] = ManagementError

    def __init__(self, endpoint: str, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._sock = self._connect()

    def _connect(self) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        self._sock.send_multipart([b"", encode({"op": op, **fields})])
        if not self._sock.poll(int(self.timeout * 1000)):
            # A DEALER would hand the late reply to the next request: start over.
            self._sock.close(0)
            self._sock = self._connect()
            raise TimeoutError(f"no answer from {self.peer} at {self.endpoint} within {self.timeout}s")
        return reply_of(self._sock.recv_multipart()[-1], self.error, self.peer)

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> RequestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ManagementClient(RequestClient):
    """The broker's management API."""


class EventSubscriber:
    """Lifecycle events published by the broker."""

    def __init__(self, endpoint: str) -> None:
        self._sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"domain")
        self._sock.connect(endpoint)

    def next(self, timeout: float) -> dict[str, Any] | None:
        if not self._sock.poll(int(timeout * 1000)):
            return None
        _topic, body = self._sock.recv_multipart()
        event: dict[str, Any] = msgpack.unpackb(body, raw=False)     # the broker publishes maps only
        return event

    def close(self) -> None:
        self._sock.close(0)
