"""The host's keeper: holds the descriptors a supervisor must not lose when it dies.

A host outlives its supervisor (README, "The supervisor"): the broker, the
domains and the VMs keep running, and a new ``xdom up`` adopts them.  Most of
what the supervisor knows it writes down (``deploy/host_state.py``), but some
of it is a descriptor, and a descriptor cannot be written down:

* its end of each domain's **device channel** (``domains/device_channel.py``):
  a blkback gets its disk images over it, a bridged netback its TAPs, a
  guest the tun descriptors of hot-added vifs.  If it closed, the domain
  would see EOF and never get another device;
* the **ready pipe** of a domain still starting, so that a supervisor
  adopting the host mid-start still hears it say ready;
* the **uid locks** (``deploy/isolation.py``): an ``flock`` dies with its
  holder, and a uid released while its domain runs could be given to a
  domain of another host.

So the supervisor hands a duplicate of each to this process as it makes it
and asks for them back when it adopts the host, as systemd's file descriptor
store (``FDSTORE=1``) keeps a service's sockets across its restarts.  The
keeper reads nothing from them, writes nothing to them and starts nothing:
it only holds.  It is one small process per host (stdlib only, run by path
with ``python -I -S`` like ``domain_exec.py``), in its own session, and
stops when the host stops (``exit``) or on SIGTERM.  A keeper that dies
loses what it held: the supervisor, if it runs, gives a new one everything
again; if no supervisor runs then, the device channels of the domains
running at that moment are lost (they see EOF: no new devices until they
are restarted) and their uids are unlocked until a supervisor adopts the
host and locks them again.

Protocol: ``RUN_DIR/keeper.sock``, SOCK_SEQPACKET, one JSON object per
message, descriptors by SCM_RIGHTS; only a peer of the keeper's own uid
(``SO_PEERCRED``) is served.

* ``{"op": "put", "name": N}`` with one descriptor: keep it as N (an older
  one of that name is closed);
* ``{"op": "drop", "names": [...]}`` or ``{"op": "drop", "prefix": P}``;
* ``{"op": "get", "prefix": P}``: one message ``{"name": N}`` with its
  descriptor per entry, then ``{"ok": true, "count": n}``;
* ``{"op": "ping"}``: ``{"ok": true, "pid": ..., "names": [...]}``;
* ``{"op": "exit"}``: answered, then everything is closed and the keeper exits.

Every other request is answered ``{"ok": false, "error": ...}`` (its
descriptors closed).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys
import time

__all__ = ["KEEPER_SOCKET", "KeeperClient", "KeeperError", "main"]

KEEPER_SOCKET = "keeper.sock"
MAX_MESSAGE = 4096
MAX_ENTRIES = 65536
PATH = os.path.abspath(__file__)


class KeeperError(Exception):
    """The keeper refused a request or could not be reached."""


# ---- the keeper -----------------------------------------------------------------------------------

def _peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    return int(uid)


def _say(text: str) -> None:
    sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} keeper[{os.getpid()}]: {text}\n")
    sys.stderr.flush()


class _Keeper:
    def __init__(self, path: str) -> None:
        self.entries: dict[str, int] = {}
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            os.unlink(path)         # one of an earlier keeper (the run directory is root's only)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self.listener.bind(path)
        finally:
            os.umask(old)
        self.listener.listen(16)
        self.path = path
        self.conns: list[socket.socket] = []
        self.running = True

    def serve(self, wake: int) -> None:
        while self.running:
            watched: list[socket.socket | int] = [self.listener, wake, *self.conns]
            readable, _, _ = select.select(watched, [], [])
            for r in readable:
                if r is self.listener:
                    conn, _ = self.listener.accept()
                    if _peer_uid(conn) != os.geteuid():
                        conn.close()        # only the supervisor's uid (root) is served
                    else:
                        self.conns.append(conn)
                elif r == wake:
                    self.running = False
                else:
                    assert isinstance(r, socket.socket)
                    self._serve_one(r)

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, 4)
        except OSError:
            data, fds = b"", []
        if not data and not fds:
            self.conns.remove(conn)
            conn.close()
            return
        try:
            req = json.loads(data)
            if not isinstance(req, dict):
                raise ValueError("not an object")
            reply = self._handle(conn, req, fds)
            fds = []
        except (ValueError, KeyError, TypeError, OSError) as e:
            reply = {"ok": False, "error": f"{e.__class__.__name__}: {e}"}
        for fd in fds:
            os.close(fd)
        try:
            conn.send(json.dumps(reply).encode())
        except OSError:
            self.conns.remove(conn)
            conn.close()

    def _handle(self, conn: socket.socket, req: dict, fds: list[int]) -> dict:
        op = req.get("op")
        if op == "put":
            name = req["name"]
            if not isinstance(name, str) or len(fds) != 1:
                raise ValueError("put takes a name and one descriptor")
            if name not in self.entries and len(self.entries) >= MAX_ENTRIES:
                raise ValueError(f"more than {MAX_ENTRIES} entries")
            old = self.entries.pop(name, None)
            self.entries[name] = fds[0]
            if old is not None:
                os.close(old)
            return {"ok": True}
        if fds:
            raise ValueError(f"{op!r} takes no descriptor")
        if op == "drop":
            names = req.get("names")
            prefix = req.get("prefix")
            if names is not None:
                gone = [n for n in names if isinstance(n, str) and n in self.entries]
            elif isinstance(prefix, str):
                gone = [n for n in self.entries if n.startswith(prefix)]
            else:
                raise ValueError("drop takes names or a prefix")
            for n in gone:
                os.close(self.entries.pop(n))
            return {"ok": True, "count": len(gone)}
        if op == "get":
            prefix = req.get("prefix", "")
            if not isinstance(prefix, str):
                raise ValueError("prefix must be a string")
            found = [(n, fd) for n, fd in self.entries.items() if n.startswith(prefix)]
            for n, fd in found:
                socket.send_fds(conn, [json.dumps({"name": n}).encode()], [fd])
            return {"ok": True, "count": len(found)}
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "names": sorted(self.entries)}
        if op == "exit":
            self.running = False
            return {"ok": True, "pid": os.getpid()}
        raise ValueError(f"unknown op {op!r}")

    def close(self) -> None:
        for fd in self.entries.values():
            os.close(fd)
        self.entries.clear()
        for c in self.conns:
            c.close()
        try:
            if os.stat(self.path).st_ino == os.fstat(self.listener.fileno()).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        self.listener.close()


def main(argv: list[str]) -> int:
    run_dir = ready = None
    args = list(argv)
    while args:
        opt = args.pop(0)
        if opt == "--run-dir" and args:
            run_dir = args.pop(0)
        elif opt == "--ready-fd" and args and args[0].isdigit():
            ready = int(args.pop(0))
        else:
            _say(f"bad option {opt!r}")
            return 2
    if run_dir is None:
        _say("--run-dir is required")
        return 2
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGTERM, lambda *_: os.write(wake_w, b"x"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # a Ctrl-C meant for a foreground `xdom up` is not ours
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    keeper = _Keeper(os.path.join(run_dir, KEEPER_SOCKET))
    _say(f"holding descriptors for {run_dir}")
    if ready is not None:
        os.write(ready, b"ready\n")
        os.close(ready)
    try:
        keeper.serve(wake_r)
    finally:
        _say(f"exiting; {len(keeper.entries)} descriptors released")
        keeper.close()
    return 0


# ---- the supervisor's side ------------------------------------------------------------------------

class KeeperClient:
    """A connection to a host's keeper, believed only when ``SO_PEERCRED`` names ``pid`` (and our uid)."""

    def __init__(self, path: str, pid: int, timeout: float = 5.0) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            peer, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                               struct.calcsize("3i")))
            if peer != pid or uid != os.geteuid():
                raise KeeperError(f"{path} is served by pid {peer} (uid {uid}), not by the keeper (pid {pid}): "
                                  f"not believed")
        except OSError as e:
            sock.close()
            raise KeeperError(f"cannot reach the keeper at {path}: {e.strerror or e}") from None
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.pid = pid

    def _call(self, req: dict, fds: tuple[int, ...] = ()) -> dict:
        try:
            socket.send_fds(self.sock, [json.dumps(req).encode()], list(fds))
            data, extra, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 1)
        except OSError as e:
            raise KeeperError(f"the keeper (pid {self.pid}): {e.strerror or e}") from None
        for fd in extra:
            os.close(fd)
        return self._reply(data)

    def _reply(self, data: bytes) -> dict:
        if not data:
            raise KeeperError(f"the keeper (pid {self.pid}) closed the connection")
        reply = json.loads(data)
        if not reply.get("ok"):
            raise KeeperError(f"the keeper (pid {self.pid}) refused: {reply.get('error')}")
        return reply

    def put(self, name: str, fd: int) -> None:
        self._call({"op": "put", "name": name}, (fd,))

    def drop(self, *names: str, prefix: str | None = None) -> None:
        if prefix is not None:
            self._call({"op": "drop", "prefix": prefix})
        elif names:
            self._call({"op": "drop", "names": list(names)})

    def get(self, prefix: str = "") -> dict[str, int]:
        """Every entry under ``prefix``: name -> a descriptor of ours now (the keeper keeps its own)."""
        got: dict[str, int] = {}
        try:
            socket.send_fds(self.sock, [json.dumps({"op": "get", "prefix": prefix}).encode()], [])
            while True:
                data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 1)
                msg = json.loads(data) if data else {}
                if "name" in msg and len(fds) == 1:
                    old = got.pop(msg["name"], None)
                    if old is not None:
                        os.close(old)
                    got[msg["name"]] = fds[0]
                    continue
                for fd in fds:
                    os.close(fd)
                self._reply(data)
                return got
        except BaseException as e:
            for fd in got.values():
                os.close(fd)
            if isinstance(e, OSError):
                raise KeeperError(f"the keeper (pid {self.pid}): {e.strerror or e}") from None
            raise

    def ping(self) -> dict:
        return self._call({"op": "ping"})

    def exit(self) -> None:
        """Ask the keeper to release everything and exit (it answers first)."""
        self._call({"op": "exit"})

    def close(self) -> None:
        self.sock.close()


def keeper_argv(python: str, run_dir: str) -> list[str]:
    """The keeper's command line (``launcher.start_ready`` adds ``--ready-fd``)."""
    return [python, "-I", "-S", PATH, "--run-dir", run_dir]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
