"""The fleet: many xdom hosts, each reached over CurveZMQ at the address its fleet file names.

A fleet file (TOML; ``--fleet``, ``$XDOM_FLEET``, else
``~/.config/xdom/fleet.toml``)::

    [client]
    key = "keys/admin.key_secret"     # this client's secret key (relative: to the fleet file's directory)
    timeout = 3.0                     # seconds a host has to answer before it is reported unreachable

    [[host]]
    name = "h1"
    address = "tcp://10.0.0.1:7700"             # its [host] listen
    server_key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"   # its public key (xdom keys show)
    # events = "tcp://10.0.0.1:7701"            # its events_listen, when not the next port
    # key = "keys/other.key_secret"             # another client key for this host

:class:`HostClient` talks to one host and never waits longer than its
timeout: a host that does not answer (down, unreachable, stopped mid-way,
or one that refused our key) is an error, :class:`HostUnreachable`, never a
hang; sockets have linger 0, so nothing waits at exit either.
:func:`ask_all` asks every host at once, so ``ps --all`` over a fleet takes
one timeout at most, whatever the number of dead hosts.
"""

from __future__ import annotations

import os
import re
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from xdom.broker.rpc import encode, reply_of

from . import curvekeys
from .control import ControlError

__all__ = ["DEFAULT_TIMEOUT", "Fleet", "FleetError", "FleetHost", "HostClient", "HostUnreachable", "ask_all",
           "default_fleet_path", "follow_events", "load_fleet"]

DEFAULT_TIMEOUT = 3.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ADDRESS = re.compile(r"tcp://[^\s/]+:[0-9]{1,5}")


class FleetError(Exception):
    """A fleet file that cannot be used, or a host it does not name."""


class HostUnreachable(Exception):
    """No answer from a host within the timeout (or it refused this client's key); the message says which."""


@dataclass(frozen=True)
class FleetHost:
    name: str
    address: str
    events: str
    server_key: bytes           # Z85
    client_key: str             # this client's secret key file for it


@dataclass(frozen=True)
class Fleet:
    path: str
    hosts: dict[str, FleetHost]
    timeout: float

    def host(self, name: str) -> FleetHost:
        try:
            return self.hosts[name]
        except KeyError:
            raise FleetError(f"no host {name!r:.70} in {self.path} (hosts: {', '.join(self.hosts) or 'none'})") \
                from None


def default_fleet_path() -> str:
    return os.environ.get("XDOM_FLEET") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "xdom", "fleet.toml")


def load_fleet(path: str | None = None) -> Fleet:
    path = os.path.abspath(path or default_fleet_path())
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise FleetError(f"no fleet file at {path} (give --fleet or $XDOM_FLEET; README: Many hosts)") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise FleetError(f"{path}: {e}") from None
    base = os.path.dirname(path)
    errors: list[str] = []
    client = raw.get("client", {})
    if not isinstance(client, dict):
        raise FleetError(f"{path}: [client] must be a table")
    for key in set(raw) - {"client", "host"}:
        errors.append(f"unknown key {key!r} (known: client, host)")
    timeout = client.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 600:
        errors.append(f"client.timeout: expected seconds (0 < t <= 600), found {timeout!r:.40}")
        timeout = DEFAULT_TIMEOUT
    default_key = client.get("key")
    hosts: dict[str, FleetHost] = {}
    entries = raw.get("host", [])
    if not isinstance(entries, list):
        errors.append("host: expected [[host]] tables")
        entries = []
    for i, h in enumerate(entries):
        where = f"host[{i}]"
        if not isinstance(h, dict):
            errors.append(f"{where}: expected a table")
            continue
        for key in set(h) - {"name", "address", "events", "server_key", "key"}:
            errors.append(f"{where}: unknown key {key!r} (known: name, address, events, server_key, key)")
        name, address = h.get("name"), h.get("address")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            errors.append(f"{where}.name: expected a host name, found {name!r:.40}")
            continue
        where = f"host {name}"
        if name in hosts:
            errors.append(f"{where}: named twice")
        if not isinstance(address, str) or not _ADDRESS.fullmatch(address):
            errors.append(f"{where}.address: expected tcp://ADDRESS:PORT, found {address!r:.60}")
            continue
        events = h.get("events")
        if events is None:
            from .remote import events_address
            events = events_address(address)
        elif not isinstance(events, str) or not _ADDRESS.fullmatch(events):
            errors.append(f"{where}.events: expected tcp://ADDRESS:PORT, found {events!r:.60}")
            continue
        try:
            server_key = curvekeys.public_of(str(h.get("server_key", "")))
        except curvekeys.KeyFileError as e:
            errors.append(f"{where}.server_key: {e} (xdom keys show SERVER.key prints it)")
            continue
        client_key = h.get("key", default_key)
        if not isinstance(client_key, str) or not client_key:
            errors.append(f"{where}: no client key (key = \"...key_secret\" in [client] or in the host)")
            continue
        hosts[name] = FleetHost(name, address, events, server_key,
                                os.path.join(base, os.path.expanduser(client_key)))
    if errors:
        raise FleetError(f"{path}:\n  " + "\n  ".join(errors))
    return Fleet(path, hosts, float(timeout))


# ---- talking to hosts --------------------------------------------------------------------------------

_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def _curve_client(ctx: zmq.Context, kind: int, host: FleetHost) -> zmq.Socket:
    try:
        public, secret = curvekeys.load_secret(host.client_key)
    except curvekeys.KeyFileError as e:
        raise FleetError(f"host {host.name}: {e}") from None
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_serverkey = host.server_key
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.setsockopt(zmq.HANDSHAKE_IVL, 5000)
    return sock


class HostClient:
    """Requests to one host's front door; ControlError for an error reply, HostUnreachable for none."""

    def __init__(self, host: FleetHost, timeout: float, ctx: zmq.Context | None = None) -> None:
        self.host = host
        self.timeout = timeout
        self._ctx = ctx or zmq.Context.instance()
        self._sock = _curve_client(self._ctx, zmq.DEALER, host)
        # The handshake's outcome, so a refused key is said as such rather than as silence.
        self._monitor = self._sock.get_monitor_socket(_HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._refused: str | None = None
        self._sock.connect(host.address)

    def send(self, op: str, **fields: Any) -> None:
        self._sock.send_multipart([b"", encode({"op": op, **fields})], zmq.NOBLOCK)

    def sockets(self) -> tuple[zmq.Socket, zmq.Socket]:
        return self._sock, self._monitor

    def on_monitor(self) -> None:
        while self._monitor.poll(0):
            ev = recv_monitor_message(self._monitor)
            if ev["event"] & _HANDSHAKE_FAILED:
                self._refused = ("it refused this client's key (not on its allow-list)"
                                 if ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                 else "the CurveZMQ handshake failed (is its server_key in the fleet file right?)")

    def receive(self) -> dict[str, Any]:
        return reply_of(self._sock.recv_multipart()[-1], ControlError, self.host.name)

    def unreachable(self, timeout: float) -> HostUnreachable:
        why = self._refused or f"no answer within {timeout:g}s"
        return HostUnreachable(f"{self.host.name} ({self.host.address}) is unreachable: {why}")

    def request(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        timeout = self.timeout if timeout is None else timeout
        self.send(op, **fields)
        deadline = time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._restart()
                raise self.unreachable(timeout)
            ready = dict(poller.poll(int(left * 1000) + 1))
            if self._monitor in ready:
                self.on_monitor()
                if self._refused and "allow-list" in self._refused:
                    self._restart()
                    raise self.unreachable(timeout)
            if self._sock in ready:
                return self.receive()

    def door_closed(self, timeout: float) -> bool:
        """Whether a fresh connection to the host is refused (its door closed), not merely left unanswered.

        Silence is not an answer: a supervisor busy stopping its domains
        answers nothing for seconds, yet its door (ZeroMQ's I/O thread)
        still accepts connections.  Only a refused connection says the
        listener is gone.  False when the connection is accepted, or when
        neither is seen within ``timeout`` (an unreachable host is not a
        stopped one).
        """
        probe = self._ctx.socket(zmq.DEALER)
        probe.setsockopt(zmq.LINGER, 0)
        monitor = probe.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED)
        try:
            probe.connect(self.host.address)
            if not monitor.poll(int(timeout * 1000)):
                return False
            return bool(recv_monitor_message(monitor)["event"] == zmq.EVENT_CONNECT_RETRIED)
        finally:
            probe.disable_monitor()
            monitor.close(0)
            probe.close(0)

    def _restart(self) -> None:
        # A late reply would answer the next request: start over with a new socket.
        self.close()
        self._sock = _curve_client(self._ctx, zmq.DEALER, self.host)
        self._monitor = self._sock.get_monitor_socket(_HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._sock.connect(self.host.address)

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(0)
        self._sock.close(0)

    def __enter__(self) -> HostClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ask_all(hosts: list[FleetHost], op: str, timeout: float, **fields: Any) -> dict[str, dict[str, Any] | Exception]:
    """``op`` to every host at once; per host its reply, or the exception (HostUnreachable, ControlError).

    Takes at most ``timeout`` in all: hosts are asked together, not one after another.
    """
    clients = {h.name: HostClient(h, timeout) for h in hosts}
    out: dict[str, dict[str, Any] | Exception] = {}
    try:
        poller = zmq.Poller()
        owner: dict[zmq.Socket, tuple[str, bool]] = {}
        for name, c in clients.items():
            c.send(op, **fields)
            sock, mon = c.sockets()
            poller.register(sock, zmq.POLLIN)
            poller.register(mon, zmq.POLLIN)
            owner[sock], owner[mon] = (name, False), (name, True)
        deadline = time.monotonic() + timeout
        while len(out) < len(clients):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for sock, _ in poller.poll(int(left * 1000) + 1):
                name, is_monitor = owner[sock]
                if name in out:
                    continue
                c = clients[name]
                if is_monitor:
                    c.on_monitor()
                    if c._refused and "allow-list" in c._refused:
                        out[name] = c.unreachable(timeout)
                    continue
                try:
                    out[name] = c.receive()
                except ControlError as e:
                    out[name] = e
        for name, c in clients.items():
            if name not in out:
                out[name] = c.unreachable(timeout)
    finally:
        for c in clients.values():
            c.close()
    return out


def follow_events(hosts: list[FleetHost], stop_after: int | None = None,
                  idle_timeout: float | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(host name, event) as hosts publish them (their brokers' lifecycle events), until ``stop_after`` events
    or ``idle_timeout`` seconds without one.  A host that is down now is followed all the same: its events
    arrive once it is back (the subscription reconnects by itself)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    subs: dict[zmq.Socket[bytes], str] = {}
    try:
        poller = zmq.Poller()
        for h in hosts:
            sock = _curve_client(ctx, zmq.SUB, h)
            sock.setsockopt(zmq.SUBSCRIBE, b"domain")
            sock.connect(h.events)
            subs[sock] = h.name
            poller.register(sock, zmq.POLLIN)
        seen = 0
        while stop_after is None or seen < stop_after:
            ready = poller.poll(None if idle_timeout is None else int(idle_timeout * 1000))
            if not ready:
                return
            for sock, _ in ready:
                try:
                    _topic, body = sock.recv_multipart(zmq.NOBLOCK)
                    event = msgpack.unpackb(body, raw=False)
                except (zmq.Again, ValueError, msgpack.UnpackException):
                    continue
                if isinstance(event, dict):
                    seen += 1
                    yield subs[sock], event
                    if stop_after is not None and seen >= stop_after:
                        return
    finally:
        for sock in subs:
            sock.close(0)
