"""bench_xenstored's stores and bring-ups: the nodes the rows read and write, the 10,000-node scale
store, N guests' worth of toolstack and driver traffic, and (opt-in) a real host brought up.

The set-up goes through ``Pipe`` (every reply checked), so a server that
answers it wrongly stops the run before anything is measured.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

from xsbench_client import (
    DIR_CHILDREN,
    MAX_CLIENTS,
    SCALE_GROUPS,
    SCALE_PER_GROUP,
    TX_WRITES,
    VALUE,
    BenchError,
    Client,
    Pipe,
    describe,
    scale_node,
    xs_wire,
)


def set_up_store(path: str) -> dict[str, Any]:
    """The nodes the benchmark reads and writes; returns the expected DIRECTORY listing."""
    xs = xs_wire()
    T = xs.XsType
    p = Pipe(path)
    try:
        for i in range(MAX_CLIENTS):
            p.call(T.XS_WRITE, f"/bench/c{i}/k\0".encode() + VALUE)
            for j in range(TX_WRITES):
                p.call(T.XS_WRITE, f"/bench/c{i}/tx/{j}\0-".encode())
        names = [f"e{j:02d}" for j in range(DIR_CHILDREN)]
        for name in names:
            p.call(T.XS_WRITE, f"/bench/dir/{name}\0".encode())
        listing = p.call(T.XS_DIRECTORY, b"/bench/dir\0", want=None)
        got = listing.split(b"\0")[:-1]
        if sorted(got) != [n.encode() for n in names] or not listing.endswith(b"\0"):
            raise BenchError(f"set-up: /bench/dir lists {got!r}, expected the {DIR_CHILDREN} children e00..e19")
        p.call(T.XS_READ, b"/bench/c0/k\0", want=VALUE)
        return {"listing": listing}
    finally:
        p.close()


def set_up_scale(path: str) -> None:
    xs = xs_wire()
    p = Pipe(path)
    try:
        msgs = []
        for k in range(SCALE_GROUPS):
            for j in range(SCALE_PER_GROUP):
                node, value = scale_node(k, j)
                msgs.append((xs.XsType.XS_WRITE, node.encode() + b"\0" + value))
        p.pipelined(msgs)
        node, value = scale_node(SCALE_GROUPS - 1, SCALE_PER_GROUP - 1)
        p.call(xs.XsType.XS_READ, node.encode() + b"\0", want=value)
    finally:
        p.close()


# ---- bring-up: what a toolstack, two backends and N guests' frontends ask of xenstored


def bringup(path: str, domids: range) -> None:
    """Bring ``domids`` up as the supervisor and drivers would (one disk, one vif each), over sockets.

    The toolstack introduces each domain and writes its home in one
    transaction (deploy/xsnodes.py's layout), then each device's backend and
    frontend directories; the backends (one connection watching
    /local/domain/0/backend) and each guest's frontend (a connection
    watching its device directory) then step their states to Connected.
    Watch events are drained as they come.  Every reply is checked.
    """
    xs = xs_wire()
    T = xs.XsType
    tool = Pipe(path)
    back = Pipe(path)
    watchers: list[Client] = []
    try:
        back.call(T.XS_WATCH, b"/local/domain/0/backend\0b\0")

        def drain() -> None:
            back.queue = [m for m in back.queue if m.type != T.XS_WATCH_EVENT]
            for c in watchers:
                c.sock.setblocking(False)
                try:
                    while True:
                        data = c.sock.recv(262144)
                        if not data:
                            raise BenchError("bring-up: a watcher connection was closed")
                        for m in c.reader.feed(data):
                            if m.type not in (T.XS_WATCH_EVENT, T.XS_WATCH):
                                raise BenchError(f"bring-up: a watcher got {describe(m)}")
                except BlockingIOError:
                    pass
                finally:
                    c.sock.setblocking(True)

        def z(s: str) -> bytes:
            return s.encode() + b"\0"

        for d in domids:
            home = f"/local/domain/{d}"
            tool.call(T.XS_INTRODUCE, z(str(d)) + z("0") + z("1"))
            tx = int(tool.call(T.XS_TRANSACTION_START, b"\0", want=None).rstrip(b"\0"))
            for sub in ("", "/device", "/control", "/memory"):
                tool.call(T.XS_MKDIR, z(home + sub), tx)
                tool.call(T.XS_SET_PERMS, z(home + sub) + z("n0") + z(f"r{d}"), tx)
            for node, value in (("name", f"g{d}"), ("domid", str(d)), ("memory/static-max", "32768"),
                                ("memory/target", "32768")):
                tool.call(T.XS_WRITE, z(f"{home}/{node}") + value.encode(), tx)
            for sub in ("control/shutdown", "control/feature-poweroff", "data", "drivers", "feature", "attr",
                        "error"):
                tool.call(T.XS_MKDIR, z(f"{home}/{sub}"), tx)
                tool.call(T.XS_SET_PERMS, z(f"{home}/{sub}") + z(f"n{d}"), tx)
            tool.call(T.XS_TRANSACTION_END, b"T\0", tx)
            w = Client(path)
            watchers.append(w)
            rid = 1
            w.sock.sendall(xs.Message(T.XS_WATCH, rid, 0, z(f"{home}/device") + z("f")).encode())
            for kind, devid, extra in (("vbd", 51712, (("params", "/img/disk.img"), ("mode", "w"))),
                                       ("vif", 0, (("mac", "00:16:3e:00:00:01"), ("bridge", "xdombr0")))):
                be, fe = f"/local/domain/0/backend/{kind}/{d}/{devid}", f"{home}/device/{kind}/{devid}"
                tx = int(tool.call(T.XS_TRANSACTION_START, b"\0", want=None).rstrip(b"\0"))
                for node, value in (("frontend", fe), ("frontend-id", str(d)), ("online", "1"),
                                    ("state", "1"), *extra):
                    tool.call(T.XS_WRITE, z(f"{be}/{node}") + value.encode(), tx)
                tool.call(T.XS_SET_PERMS, z(be) + z("n0") + z(f"r{d}"), tx)
                for node, value in (("backend", be), ("backend-id", "0"), ("state", "1")):
                    tool.call(T.XS_WRITE, z(f"{fe}/{node}") + value.encode(), tx)
                tool.call(T.XS_SET_PERMS, z(fe) + z(f"n{d}") + z("r0"), tx)
                tool.call(T.XS_TRANSACTION_END, b"T\0", tx)
                # the backend, then the frontend, then the backend again (as dom0 over sockets: what
                # the requests cost xenstored is the same on a ring)
                back.call(T.XS_WRITE, z(f"{be}/state") + b"2")
                back.call(T.XS_READ, z(f"{be}/frontend"), want=fe.encode())
                tool.call(T.XS_WRITE, z(f"{fe}/ring-ref") + b"8")
                tool.call(T.XS_WRITE, z(f"{fe}/event-channel") + b"5")
                tool.call(T.XS_WRITE, z(f"{fe}/state") + b"3")
                back.call(T.XS_READ, z(f"{fe}/ring-ref"), want=b"8")
                back.call(T.XS_WRITE, z(f"{be}/state") + b"4")
                tool.call(T.XS_WRITE, z(f"{fe}/state") + b"4")
                drain()
            tool.call(T.XS_WRITE, z(f"{home}/control/feature-poweroff") + b"1")
            drain()
    finally:
        for c in watchers:
            c.close()
        back.close()
        tool.close()


# ---- a real host: `xdom up` of N process guests, xenstored's CPU (opt-in: --host-guests)


def peer_pid(sock_path: str) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(sock_path)
        return struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
    finally:
        s.close()


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process since it started (/proc/PID/stat), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_bringup(n: int, tmp: str) -> dict[str, float]:
    """``xdom up --detach`` of xenstored, blkback, netback (builtin switch) and ``n`` process guests
    (32 MiB, one disk, one vif each); xenstored's CPU from its start to every guest ready, and
    the wall time of ``up``.  Then ``xdom down``."""
    base = tempfile.mkdtemp(prefix=f"host{n}-", dir=tmp)
    os.chmod(base, 0o755)
    state, run = os.path.join(base, "state"), os.path.join(base, "run")
    os.makedirs(os.path.join(state, "images"))
    text = [f'[host]\nstate_dir = "{state}"\nrun_dir = "{run}"\n',
            '[[domain]]\nname = "xs"\nkind = "xenstored"\n', '[[domain]]\nname = "blk0"\nkind = "blkback"\n',
            '[[domain]]\nname = "net0"\nkind = "netback"\nswitch = "builtin"\n']
    for g in range(1, n + 1):
        image = os.path.join(state, "images", f"g{g}.img")
        with open(image, "wb") as f:
            f.truncate(4 << 20)
        text.append(f'[[domain]]\nname = "g{g}"\nkind = "guest"\nmemory = "32M"\n'
                    f'disk = ["format=raw, vdev=xvda, access=rw, backend=blk0, target={image}"]\n'
                    f'vif = ["mac=00:16:3e:00:{g // 256:02x}:{g % 256:02x}, backend=net0"]\n')
    topo = os.path.join(base, "host.toml")
    with open(topo, "w") as f:
        f.write("\n".join(text))
    xdom = [sys.executable, "-m", "xdom.deploy.cli"]
    t0 = time.monotonic()
    up = subprocess.run([*xdom, "up", topo, "--detach"], capture_output=True, text=True, timeout=600,
                        stdin=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    try:
        if up.returncode != 0:
            raise BenchError(f"xdom up of {n} guests failed: {(up.stdout + up.stderr)[-800:]}")
        pid = peer_pid(os.path.join(run, "xenstored.sock"))
        return {"up_wall_s": wall, "xenstored_cpu_s": proc_cpu_s(pid)}
    finally:
        subprocess.run([*xdom, "down", "--run-dir", run], capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
