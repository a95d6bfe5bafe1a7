"""CurveZMQ keys, the allow-list's ZAP decision and the front door's request filter, without a host."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import msgpack
import pytest
import zmq
import zmq.utils.z85
from helpers import wait_until

from xdom.deploy import curvekeys
from xdom.deploy.fleet import FleetHost, HostClient, HostUnreachable
from xdom.deploy.remote import FrontDoor, ListenerConfig, RemoteError, RemoteProtocol, check_listener


@pytest.fixture
def keydir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="xk-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def zap_request(mechanism: bytes, credentials: list[bytes]) -> list[bytes]:
    return [b"peer", b"", b"1.0", b"7", b"xdom", b"10.0.0.9", b"", mechanism, *credentials]


def test_keys_made_private_and_read_back(keydir: str) -> None:
    public_path, secret_path = curvekeys.make_pair(keydir, "server")
    assert os.stat(secret_path).st_mode & 0o777 == 0o600
    public, secret = curvekeys.load_secret(secret_path)
    assert curvekeys.load_public(public_path) == public
    assert zmq.curve_public(secret) == public
    with pytest.raises(curvekeys.KeyFileError, match="not overwriting"):
        curvekeys.make_pair(keydir, "server")
    os.chmod(secret_path, 0o640)
    with pytest.raises(curvekeys.KeyFileError, match="lets others read"):
        curvekeys.load_secret(secret_path)
    os.chmod(public_path, 0o600)
    with pytest.raises(curvekeys.KeyFileError, match="public key only"):
        curvekeys.load_secret(public_path)


def test_zap_lets_in_only_curve_keys_on_the_list(keydir: str) -> None:
    good, _ = curvekeys.make_pair(keydir, "good")
    bad, _ = curvekeys.make_pair(keydir, "bad")
    allowed_dir = os.path.join(keydir, "allowed")
    curvekeys.allow(allowed_dir, good)
    allowed = curvekeys.load_allowed(allowed_dir)
    good_key = curvekeys.load_public(good)
    assert allowed == {good_key}
    reply, who = curvekeys.zap_reply(zap_request(b"CURVE", [zmq.utils.z85.decode(good_key)]), allowed)
    assert who == good_key and reply[:2] == [b"peer", b""] and reply[4] == b"200" and reply[6] == good_key
    reply, who = curvekeys.zap_reply(zap_request(b"CURVE", [zmq.utils.z85.decode(curvekeys.load_public(bad))]),
                                     allowed)
    assert who is None and reply[4] == b"400"
    for mechanism, creds in ((b"NULL", []), (b"PLAIN", [b"admin", b"secret"]), (b"CURVE", [b"short"])):
        reply, who = curvekeys.zap_reply(zap_request(mechanism, creds), allowed)
        assert who is None and reply[4] == b"400"
    assert curvekeys.zap_reply([b"no", b"delimiter"], allowed) == ([], None)
    os.chmod(allowed_dir, 0o777)
    with pytest.raises(curvekeys.KeyFileError, match="others can change it"):
        curvekeys.load_allowed(allowed_dir)


def test_no_listener_without_a_secret_key_and_an_allow_list(keydir: str) -> None:
    cfg = ListenerConfig("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", os.path.join(keydir, "server.key_secret"),
                         os.path.join(keydir, "allowed"))
    with pytest.raises(RemoteError, match="no secret key"):
        check_listener(cfg)
    curvekeys.make_pair(keydir, "server")
    with pytest.raises(RemoteError, match="no allow-list"):
        check_listener(cfg)
    os.mkdir(cfg.allowed_clients, 0o700)
    with pytest.raises(RemoteError, match="has no client key"):
        FrontDoor(cfg, "ipc:///nonexistent", "ipc:///nonexistent", "/t.toml")


def test_front_door_passes_only_the_operations_it_serves(keydir: str) -> None:
    own = os.path.join(keydir, "own.toml")
    other = os.path.join(keydir, "other.toml")
    for p in (own, other):
        open(p, "w").close()
    proto = RemoteProtocol(own)

    def decide(req: object) -> object:
        return proto.decide(msgpack.packb(req))
    assert decide({"op": "ps"}).action == "relay"
    for req in ({"op": "logs"}, {"op": 3}, ["op", "ps"], {"op": "up", "topology": "relative.toml"}):
        d = decide(req)
        assert d.action == "reply" and not d.reply["ok"]
    assert proto.decide(b"\xc1").reply["errno"] == "EBADMSG"
    assert proto.decide(b"\x00" * (1 << 17)).reply["errno"] == "EMSGSIZE"
    assert msgpack.unpackb(decide({"op": "down"}).payload) == {"op": "stop"}
    assert msgpack.unpackb(decide({"op": "down", "topology": own}).payload) == {"op": "stop"}
    assert decide({"op": "up", "topology": own}).reply["already"]
    assert decide({"op": "up", "topology": os.path.join(keydir, "missing.toml")}).reply["errno"] == "ENOENT"
    job = decide({"op": "up", "topology": other})
    assert job.action == "job" and job.argv[-3:] == ("up", other, "--detach")
    assert decide({"op": "down", "topology": other}).argv[-3:] == ("down", "--topology", other)


def test_up_refuses_a_listener_without_keys_before_starting_anything(keydir: str) -> None:
    import subprocess
    import sys

    def up(listen: str) -> subprocess.CompletedProcess[str]:
        path = os.path.join(keydir, "t.toml")
        with open(path, "w") as f:
            f.write(f'[host]\nstate_dir = "{keydir}/state"\nrun_dir = "{keydir}/run"\nlisten = "{listen}"\n\n'
                    '[[domain]]\nname = "xs"\nkind = "xenstored"\n')
        return subprocess.run([sys.executable, "-m", "xdom.deploy.cli", "up", path, "--detach"], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
    r = up("tcp://127.0.0.1:17799")
    assert r.returncode == 2 and "not listening on tcp://127.0.0.1:17799: no secret key" in r.stderr
    curvekeys.make_pair(os.path.join(keydir, "state", "keys"), "server")
    r = up("tcp://127.0.0.1:17799")
    assert r.returncode == 2 and "no allow-list" in r.stderr
    os.mkdir(os.path.join(keydir, "state", "keys", "allowed_clients"), 0o700)
    r = up("tcp://127.0.0.1:17799")
    assert r.returncode == 2 and "has no client key" in r.stderr
    for plaintext in ("ipc:///tmp/x.sock", "tcp://127.0.0.1", "udp://127.0.0.1:1"):
        r = up(plaintext)
        assert r.returncode == 2 and "host.listen: expected tcp://ADDRESS:PORT" in r.stderr
    assert not os.path.exists(os.path.join(keydir, "run", "supervisor.pid"))


def test_door_closed_only_when_the_connection_is_refused(keydir: str) -> None:
    """A door that accepts but answers nothing (a supervisor busy stopping) is not a closed door."""
    server_public, _ = curvekeys.make_pair(keydir, "server")
    _, client_secret = curvekeys.make_pair(keydir, "client")
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)         # accepts connections, never replies
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    address = f"tcp://127.0.0.1:{port}"
    host = FleetHost("h", address, f"tcp://127.0.0.1:{port + 1}",
                     curvekeys.load_public(server_public), client_secret)
    client = HostClient(host, 0.3, ctx)
    try:
        with pytest.raises(HostUnreachable):
            client.request("ping", 0.3)
        assert client.door_closed(2.0) is False
        silent.close(0)     # ZeroMQ closes the listener in its I/O thread, a moment later
        wait_until(lambda: client.door_closed(0.5), 10.0, "a connection to the closed door to be refused")
    finally:
        client.close()
        silent.close(0)
        ctx.term()
